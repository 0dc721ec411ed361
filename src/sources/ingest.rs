//! Records read from a broker (Kafka, RabbitMQ) → envelopes.
//!
//! What the seeds' systems put on their brokers maps onto the envelope:
//! evbridge's own envelopes and AccelByte eventstream events (`id`, `name`,
//! `payload`, …) keep their fields; BonFIRE-style notifications (simple:
//! `timestamp`, `type`, `status`, `path`; detailed: `objectType`,
//! `eventType`, `objectId`, …) get a name from their type and event; any
//! other JSON travels as the payload of a `json_record`, and bytes that are
//! not JSON as the base64 `value` of a `raw_record`, with the reason.
//! Nothing is dropped. Ids are deterministic (the record's own, else a v5
//! UUID of where the record came from), so a redelivered record keeps
//! its id.

use std::collections::BTreeMap;

use base64::Engine as _;
use evbridge_sinks::{Envelope, Event, Payload, SmolStr};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Namespace of the v5 UUIDs given to records without an id of their own.
const RECORD_ID_NAMESPACE: Uuid = Uuid::from_u128(0x2b7c_5e1d_94a0_4f3b_8c62_1d0e_a5b4_c3f2);

/// One record as a broker delivered it.
#[derive(Debug, Clone, Default)]
pub struct Record<'a> {
    /// The message body.
    pub body: &'a [u8],
    /// Kafka record key (AMQP has none).
    pub key: Option<&'a [u8]>,
    /// Where it came from, stable across redeliveries (Kafka:
    /// `topic/partition/offset`; AMQP: the message id, else exchange,
    /// routing key and body): seeds the id of records without one.
    pub origin: String,
    /// The broker's topic or routing key: the envelope's `topic` when the
    /// record names none.
    pub topic: &'a str,
    /// The broker's timestamp (RFC 3339), used when the record has none.
    pub timestamp: Option<String>,
    /// Facts about the delivery (`kafka_topic`, `routing_key`, …) added to
    /// the envelope's attributes.
    pub attributes: BTreeMap<String, String>,
}

/// The envelope of a record, and why it was wrapped raw, if it was.
#[derive(Debug)]
pub struct Ingested {
    /// The envelope.
    pub envelope: Envelope,
    /// Set when the body was not JSON (logged by the caller with the id).
    pub problem: Option<String>,
}

/// Maps one record onto an envelope.
pub fn envelope(rec: &Record) -> Ingested {
    let parsed: Result<Value, _> = serde_json::from_slice(rec.body);
    let (event, problem) = match parsed {
        Ok(Value::Object(obj)) if is_event(&obj) => (event_record(rec, obj), None),
        Ok(Value::Object(obj)) if is_bonfire(&obj) => (bonfire_record(rec, obj), None),
        Ok(_) => {
            // Valid JSON of no known shape: the body is the payload as is.
            let text = one_line(&String::from_utf8_lossy(rec.body));
            (base(rec, "json_record", Payload::trusted(text)), None)
        }
        Err(e) => {
            let problem = format!("body is not JSON ({e}); wrapped raw");
            let payload = serde_json::json!({
                "value": base64::engine::general_purpose::STANDARD.encode(rec.body),
                "error": problem,
            });
            (
                base(rec, "raw_record", Payload::trusted(payload.to_string())),
                Some(problem),
            )
        }
    };
    Ingested {
        envelope: Envelope::new(event),
        problem,
    }
}

/// An evbridge envelope or an AccelByte event: a string `id` and `name`
/// and a `payload`.
fn is_event(obj: &Map<String, Value>) -> bool {
    obj.get("id")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
        && obj
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
        && obj.contains_key("payload")
}

/// A BonFIRE simple (`type`, `status`) or detailed (`objectType`,
/// `eventType`) notification.
fn is_bonfire(obj: &Map<String, Value>) -> bool {
    let s = |k: &str| obj.get(k).is_some_and(Value::is_string);
    (s("type") && s("status")) || (s("objectType") && s("eventType"))
}

/// The envelope every record starts from: id from its origin, name given,
/// namespace `default`, the broker's topic and time.
fn base(rec: &Record, name: &str, payload: Payload) -> Event {
    Event {
        id: origin_id(&rec.origin),
        name: name.into(),
        namespace: "default".into(),
        timestamp: rec.timestamp.clone().unwrap_or_else(now).into(),
        version: Envelope::VERSION,
        topic: rec.topic.into(),
        key: rec
            .key
            .map(|k| String::from_utf8_lossy(k).into())
            .unwrap_or_default(),
        attributes: rec.attributes.clone().into(),
        payload,
    }
}

/// JSON text on one line: in valid JSON a line break can only be
/// whitespace (inside strings it is escaped), so it becomes a space, and
/// `stdout://` keeps one object per line.
fn one_line(json: &str) -> String {
    if json.contains(['\n', '\r']) {
        json.replace(['\n', '\r'], " ")
    } else {
        json.to_string()
    }
}

/// The `payload` member of an event's JSON body, exactly as written.
fn verbatim_payload(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Only<'a> {
        #[serde(borrow)]
        payload: Option<&'a serde_json::value::RawValue>,
    }
    let only: Only<'_> = serde_json::from_slice(body).ok()?;
    only.payload.map(|p| one_line(p.get()))
}

fn event_record(rec: &Record, mut obj: Map<String, Value>) -> Event {
    let text = |obj: &mut Map<String, Value>, k: &str| match obj.remove(k) {
        Some(Value::String(s)) if !s.is_empty() => Some(SmolStr::from(s)),
        _ => None,
    };
    obj.remove("payload");
    // The payload as it came (key order, numbers beyond 64 bits), not as
    // serde_json's Value would write it again.
    let payload = verbatim_payload(rec.body).unwrap_or_else(|| "null".into());
    let mut ev = base(rec, "", Payload::trusted(payload));
    ev.id = text(&mut obj, "id").unwrap_or(ev.id);
    ev.name = text(&mut obj, "name")
        .map(|n| sanitize_name(&n).into())
        .unwrap_or_default();
    if let Some(ns) = text(&mut obj, "namespace") {
        ev.namespace = ns;
    }
    if let Some(ts) = text(&mut obj, "timestamp") {
        ev.timestamp = ts;
    }
    if let Some(v) = obj.remove("version").and_then(|v| v.as_u64()) {
        ev.version = u32::try_from(v).unwrap_or(Envelope::VERSION);
    }
    if let Some(t) = text(&mut obj, "topic") {
        ev.topic = t;
    }
    // An evbridge envelope names its key; an AccelByte event is keyed by
    // its id on Kafka.
    ev.key = text(&mut obj, "key")
        .or_else(|| Some(ev.key.clone()).filter(|k| !k.is_empty()))
        .unwrap_or_else(|| ev.id.clone());
    if let Some(Value::Object(attrs)) = obj.remove("attributes") {
        for (k, v) in attrs {
            ev.attributes.insert(k.into(), flat(v).into());
        }
    }
    // AccelByte's optional fields become attributes, nothing is dropped.
    for (field, attr) in [
        ("traceId", "trace_id"),
        ("spanContext", "span_context"),
        ("userId", "user_id"),
        ("sessionId", "session_id"),
        ("clientId", "client_id"),
        ("additional_fields", "additional_fields"),
    ] {
        if let Some(v) = obj.remove(field).filter(|v| !v.is_null()) {
            ev.attributes.insert(attr.into(), flat(v).into());
        }
    }
    ev
}

fn bonfire_record(rec: &Record, obj: Map<String, Value>) -> Event {
    let s = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or_default();
    let name = if obj.contains_key("objectType") {
        format!("{}_{}", s("objectType"), s("eventType"))
    } else {
        format!("{}_{}", s("type"), s("status"))
    };
    // The whole message is the payload, as it came.
    let mut ev = base(
        rec,
        &sanitize_name(&name),
        Payload::trusted(one_line(&String::from_utf8_lossy(rec.body))),
    );
    if let Some(secs) = obj.get("timestamp").and_then(Value::as_f64) {
        ev.timestamp = unix_rfc3339(secs).map_or(ev.timestamp, SmolStr::from);
    }
    for (field, attr) in [
        ("path", "path"),
        ("objectId", "object_id"),
        ("source", "source"),
        ("groupId", "group_id"),
        ("userId", "user_id"),
    ] {
        if let Some(v) = obj.get(field).filter(|v| !v.is_null()) {
            ev.attributes.insert(attr.into(), flat(v.clone()).into());
        }
    }
    if ev.key.is_empty() {
        ev.key = obj
            .get("objectId")
            .or_else(|| obj.get("path"))
            .map(|v| flat(v.clone()).into())
            .unwrap_or_else(|| ev.id.clone());
    }
    ev
}

/// A string as itself, anything else as compact JSON.
fn flat(v: Value) -> String {
    match v {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// A name valid under AccelByte's pattern: letters and digits, single
/// `_`, `.`, `-` or `'` between them; anything else becomes `_`.
pub fn sanitize_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with(['_', '.', '-', '\'']) {
            out.push(if matches!(c, '.' | '-' | '\'') {
                c
            } else {
                '_'
            });
        }
    }
    while out.ends_with(['_', '.', '-', '\'']) {
        out.pop();
    }
    if out.is_empty() {
        out.push_str("record");
    }
    out
}

fn origin_id(origin: &str) -> SmolStr {
    crate::normalize::v5_simple(&RECORD_ID_NAMESPACE, origin.as_bytes())
}

fn unix_rfc3339(secs: f64) -> Option<String> {
    if !secs.is_finite() || secs.abs() > 1e11 {
        return None;
    }
    let whole = secs.floor();
    let t = prost_types::Timestamp {
        seconds: whole as i64,
        nanos: ((secs - whole) * 1e9).round().min(999_999_999.0) as i32,
    };
    let mut s = String::new();
    crate::normalize::json::push_timestamp(&mut s, &t);
    Some(s)
}

fn now() -> String {
    let mut s = String::new();
    crate::normalize::json::push_timestamp(
        &mut s,
        &prost_types::Timestamp::from(std::time::SystemTime::now()),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(body: &[u8]) -> Record<'_> {
        Record {
            body,
            key: Some(b"k1"),
            origin: "kafka:events/0/42".into(),
            topic: "events",
            timestamp: Some("2026-11-25T10:00:00Z".into()),
            attributes: BTreeMap::from([("kafka_topic".into(), "p.events".into())]),
        }
    }

    fn json(env: &Envelope) -> Value {
        serde_json::from_slice(env.json()).unwrap()
    }

    #[test]
    fn an_accelbyte_event_keeps_its_fields() {
        let body = br#"{"id":"0123456789abcdef0123456789abcdef","name":"userLoggedIn",
            "namespace":"game","timestamp":"2026-01-02T03:04:05Z","version":2,
            "topic":"auth","payload":{"user":"u1"},"traceId":"t-9","userId":"u1",
            "additional_fields":{"x":1}}"#;
        let out = envelope(&rec(body));
        assert!(out.problem.is_none());
        let e = &out.envelope;
        assert_eq!(e.id, "0123456789abcdef0123456789abcdef");
        assert_eq!(e.name, "userLoggedIn");
        assert_eq!(e.namespace, "game");
        assert_eq!(e.timestamp, "2026-01-02T03:04:05Z");
        assert_eq!(e.version, 2);
        assert_eq!(e.topic, "auth");
        assert_eq!(e.key, "k1", "the record's key");
        assert_eq!(e.attributes["trace_id"], "t-9");
        assert_eq!(e.attributes["user_id"], "u1");
        assert_eq!(e.attributes["additional_fields"], r#"{"x":1}"#);
        assert_eq!(e.attributes["kafka_topic"], "p.events");
        assert_eq!(json(e)["payload"], serde_json::json!({"user": "u1"}));
    }

    #[test]
    fn an_evbridge_envelope_passes_through_unchanged() {
        let original = crate::sim::world::sample_envelopes(3).pop().unwrap();
        let mut r = rec(original.json());
        r.key = None;
        r.attributes.clear();
        let out = envelope(&r);
        assert_eq!(json(&out.envelope), json(&original));
    }

    #[test]
    fn bonfire_messages_get_a_name_time_and_key() {
        let simple = br#"{"timestamp":1795564800,"type":"experiment","status":"running","path":"/experiments/12"}"#;
        let mut r = rec(simple);
        r.key = None;
        let e = envelope(&r).envelope;
        assert_eq!(e.name, "experiment_running");
        assert_eq!(e.timestamp, "2026-11-25T00:00:00Z");
        assert_eq!(e.key, "/experiments/12");
        assert_eq!(e.attributes["path"], "/experiments/12");
        assert_eq!(json(&e)["payload"]["status"], "running");

        let detailed = br#"{"timestamp":1795564800.5,"objectType":"compute","eventType":"state",
            "objectId":"/locations/fr-inria/computes/3","source":"fr-inria","groupId":"g7",
            "userId":"alice","objectData":{"state":"ACTIVE"}}"#;
        let mut r = rec(detailed);
        r.key = None;
        let e = envelope(&r).envelope;
        assert_eq!(e.name, "compute_state");
        assert_eq!(e.timestamp, "2026-11-25T00:00:00.500Z");
        assert_eq!(e.key, "/locations/fr-inria/computes/3");
        assert_eq!(e.attributes["group_id"], "g7");
        assert_eq!(json(&e)["payload"]["objectData"]["state"], "ACTIVE");
    }

    #[test]
    fn other_json_and_non_json_are_wrapped_never_dropped() {
        let e = envelope(&rec(b"[1,2,3]")).envelope;
        assert_eq!(e.name, "json_record");
        assert_eq!(json(&e)["payload"], serde_json::json!([1, 2, 3]));

        let out = envelope(&rec(b"\xff\x00not json"));
        assert!(out.problem.as_deref().unwrap().contains("not JSON"));
        let e = out.envelope;
        assert_eq!(e.name, "raw_record");
        assert_eq!(json(&e)["payload"]["value"], "/wBub3QganNvbg==");
        assert_eq!(e.timestamp, "2026-11-25T10:00:00Z");
    }

    #[test]
    fn payloads_stay_as_written_and_on_one_line() {
        // Pretty-printed bodies: line breaks would split stdout's one
        // object per line. Key order and a number beyond 64 bits are kept
        // as written (serde_json's Value would sort and round them).
        let event = b"{\n  \"id\": \"e1\",\n  \"name\": \"thing_done\",\n  \"payload\": {\"z\": 1,\r\n \"a\": 123456789012345678901234567890}\n}";
        let e = envelope(&rec(event)).envelope;
        let line = String::from_utf8(e.json().to_vec()).unwrap();
        assert!(!line.contains(['\n', '\r']), "{line}");
        assert!(
            line.contains(r#""payload":{"z": 1,   "a": 123456789012345678901234567890}"#),
            "{line}"
        );
        let other = envelope(&rec(b"[1,\n2]")).envelope;
        assert!(!other.json().contains(&b'\n'));
        assert_eq!(json(&other)["payload"], serde_json::json!([1, 2]));
        let bonfire =
            b"{\"timestamp\": 1,\n \"type\": \"job\", \"status\": \"done\", \"path\": \"/x\"}";
        let b = envelope(&rec(bonfire)).envelope;
        assert!(!b.json().contains(&b'\n'));
        assert_eq!(json(&b)["payload"]["path"], "/x");
    }

    #[test]
    fn ids_are_deterministic_per_origin() {
        let a = envelope(&rec(b"[1]")).envelope;
        let b = envelope(&rec(b"[1]")).envelope;
        assert_eq!(a.id, b.id);
        let mut other = rec(b"[1]");
        other.origin = "kafka:events/0/43".into();
        assert_ne!(a.id, envelope(&other).envelope.id);
        assert_eq!(a.id.len(), 32);
    }

    #[test]
    fn names_follow_the_accelbyte_pattern() {
        for (given, want) in [
            ("compute_state", "compute_state"),
            ("a b//c", "a_b_c"),
            ("__x--y..", "x-y"),
            ("", "record"),
            ("état", "tat"),
        ] {
            assert_eq!(sanitize_name(given), want, "{given:?}");
        }
    }
}
