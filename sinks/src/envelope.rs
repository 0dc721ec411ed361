//! The one shape every event takes on its way to a sink.

use crate::Attributes;
use smol_str::SmolStr;
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// The fields of an envelope, as they appear in its JSON.
///
/// The JSON is a superset of AccelByte's eventstream event (`id`, `name`,
/// `namespace`, `timestamp`, `version`, `topic`, `payload`), so consumers
/// built on that SDK read evbridge's output unchanged and ignore the rest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Deterministic: a redelivered notification yields the same ids, which
    /// makes at-least-once duplicates easy to drop downstream.
    pub id: SmolStr,
    /// Short machine name such as `invocation_finished` or `bazel_event`.
    pub name: SmolStr,
    /// The EngFlow instance name.
    pub namespace: SmolStr,
    /// The event's own time, RFC 3339 UTC.
    pub timestamp: SmolStr,
    /// Schema version of the envelope (AccelByte's `version`).
    pub version: u32,
    /// Logical stream (`lifecycle`, `build-events`) that sinks may map to a
    /// real topic or routing key.
    pub topic: SmolStr,
    /// Partition/ordering key: events with the same key keep their order.
    pub key: SmolStr,
    /// Flat string facts (keywords, principal, ids) for headers and routing.
    #[serde(default, skip_serializing_if = "Attributes::is_empty")]
    pub attributes: Attributes,
    /// The event itself as JSON.
    pub payload: Payload,
}

/// The JSON text of an event's payload.
///
/// Checked when it comes from outside ([`Payload::parse`], [`From`] a
/// `RawValue`); evbridge's own encoders, whose output is tested against an
/// independent encoder, hand over their text with [`Payload::trusted`]
/// so that the hot path does not parse every payload again. Once sealed
/// in an [`Envelope`] it shares the envelope's JSON bytes (no second copy).
/// Always UTF-8.
#[derive(Clone)]
pub struct Payload(Text);

#[derive(Clone)]
enum Text {
    Owned(String),
    Sealed(Bytes),
}

impl Default for Payload {
    /// No payload yet (what [`Envelope::with_payload`] fills in); not
    /// itself JSON.
    fn default() -> Self {
        Payload(Text::Sealed(Bytes::new()))
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Payload {}

impl Payload {
    /// Checks that `text` is one JSON value.
    pub fn parse(text: String) -> Result<Self, serde_json::Error> {
        Ok(RawValue::from_string(text)?.into())
    }

    /// Text an encoder of this project produced; checked in debug builds
    /// (so in every test), taken as is in release builds.
    pub fn trusted(text: String) -> Self {
        debug_assert!(
            serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok(),
            "not JSON: {text}"
        );
        Payload(Text::Owned(text))
    }

    /// The JSON text, as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Text::Owned(s) => s.as_bytes(),
            Text::Sealed(b) => b,
        }
    }

    /// The JSON text.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        // Built only from `String`s, `RawValue`s or whole JSON values cut
        // out of an envelope, so this never has anything to replace.
        match &self.0 {
            Text::Owned(s) => std::borrow::Cow::Borrowed(s),
            Text::Sealed(b) => String::from_utf8_lossy(b),
        }
    }
}

impl From<Box<RawValue>> for Payload {
    fn from(raw: Box<RawValue>) -> Self {
        Payload(Text::Owned(String::from(Box::<str>::from(raw))))
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Only off the hot path (Envelope::new writes the JSON itself).
        let raw =
            RawValue::from_string(self.text().into_owned()).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(Payload::from)
    }
}

/// Appends `s` as a JSON string, escaped exactly as serde_json escapes it.
pub fn push_json_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let mut rest = s;
    while let Some(at) = find_special(rest.as_bytes()) {
        out.push_str(&rest[..at]);
        let b = rest.as_bytes()[at];
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
        // The special byte is ASCII, so the next one starts a character.
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

fn special(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Position of the first byte that needs escaping, eight at a time.
fn find_special(bytes: &[u8]) -> Option<usize> {
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        if needs_escape(word) {
            return chunk.iter().position(|&b| special(b)).map(|p| offset + p);
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| special(b))
        .map(|p| offset + p)
}

/// Whether any of eight bytes is a control character, `"` or `\`
/// (exact: the classic has-zero-byte / has-less-than tests).
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    (below_space | zero(word ^ (ONES * u64::from(b'"'))) | zero(word ^ (ONES * u64::from(b'\\'))))
        != 0
}

/// Appends `seconds` + `nanos` since the epoch as RFC 3339 UTC with 0, 3,
/// 6 or 9 fractional digits (as protobuf's JSON writes timestamps) and
/// returns true; returns false, writing nothing, outside years 0001–9999
/// or with `nanos` ≥ 10⁹.
pub fn push_rfc3339(out: &mut String, seconds: i64, nanos: u32) -> bool {
    const MIN: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    if !(MIN..=MAX).contains(&seconds) || nanos >= 1_000_000_000 {
        return false;
    }
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    // Days to civil date (H. Hinnant's algorithm, proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // All in range: four-digit year, two-digit fields. Written into a
    // stack buffer and appended once.
    let field = |v: i64| v as u32;
    let mut buf = *b"0000-00-00T00:00:00.000000000Z";
    put_digits(&mut buf[0..4], field(year));
    put_digits(&mut buf[5..7], field(month));
    put_digits(&mut buf[8..10], field(day));
    put_digits(&mut buf[11..13], field(secs / 3600));
    put_digits(&mut buf[14..16], field(secs / 60 % 60));
    put_digits(&mut buf[17..19], field(secs % 60));
    let len = if nanos == 0 {
        19
    } else if nanos.is_multiple_of(1_000_000) {
        put_digits(&mut buf[20..23], nanos / 1_000_000);
        23
    } else if nanos.is_multiple_of(1_000) {
        put_digits(&mut buf[20..26], nanos / 1_000);
        26
    } else {
        put_digits(&mut buf[20..29], nanos);
        29
    };
    buf[len] = b'Z';
    // Digits and punctuation only: always ASCII.
    out.push_str(std::str::from_utf8(&buf[..=len]).unwrap_or_default());
    true
}

/// Fills `slot` with `value`'s last `slot.len()` decimal digits,
/// zero-padded.
fn put_digits(slot: &mut [u8], mut value: u32) {
    for d in slot.iter_mut().rev() {
        *d = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// An [`Event`] with its JSON encoded once, so fan-out to several sinks
/// shares the same bytes instead of serializing per sink.
#[derive(Debug, Clone)]
pub struct Envelope {
    event: Event,
    json: Bytes,
}

impl Envelope {
    /// Version written into every envelope.
    pub const VERSION: u32 = 1;

    /// Seals an event: encodes its JSON once (written directly, the same
    /// bytes serde would write for [`Event`]).
    pub fn new(mut event: Event) -> Self {
        let payload = std::mem::take(&mut event.payload);
        let hint = payload.as_bytes().len();
        Self::with_payload(event, hint, |out| out.push_str(&payload.text()))
    }

    /// Seals an event whose payload `write` appends straight into the
    /// envelope's JSON (one JSON value, from an encoder of this project, as
    /// for [`Payload::trusted`]), saving a buffer and a copy per envelope;
    /// `event.payload` is ignored and `payload_hint` sizes the buffer.
    pub fn with_payload(
        event: Event,
        payload_hint: usize,
        write: impl FnOnce(&mut String),
    ) -> Self {
        let e = &event;
        let attrs: usize = e
            .attributes
            .iter()
            .map(|(k, v)| k.len() + v.len() + 6)
            .sum();
        let mut out = String::with_capacity(
            128 + e.id.len()
                + e.name.len()
                + e.namespace.len()
                + e.timestamp.len()
                + e.topic.len()
                + e.key.len()
                + attrs
                + payload_hint,
        );
        let member = |out: &mut String, name: &str, value: &str| {
            out.push_str(name);
            push_json_str(out, value);
        };
        member(&mut out, "{\"id\":", &e.id);
        member(&mut out, ",\"name\":", &e.name);
        member(&mut out, ",\"namespace\":", &e.namespace);
        member(&mut out, ",\"timestamp\":", &e.timestamp);
        out.push_str(",\"version\":");
        out.push_str(itoa::Buffer::new().format(e.version));
        member(&mut out, ",\"topic\":", &e.topic);
        member(&mut out, ",\"key\":", &e.key);
        if !e.attributes.is_empty() {
            out.push_str(",\"attributes\":{");
            for (i, (k, v)) in e.attributes.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_str(&mut out, k);
                out.push(':');
                push_json_str(&mut out, v);
            }
            out.push('}');
        }
        out.push_str(",\"payload\":");
        let start = out.len();
        write(&mut out);
        let end = out.len();
        debug_assert!(
            serde_json::from_str::<serde::de::IgnoredAny>(&out[start..end]).is_ok(),
            "payload is not JSON: {}",
            &out[start..end]
        );
        out.push('}');
        Self::sealed(event, out, start..end)
    }

    /// Seals an event whose whole JSON the caller wrote, with the payload
    /// at `payload` inside it: for an encoder that reuses parts it rendered
    /// once (an invocation's attributes), which a field-by-field writer
    /// cannot. `json` must be exactly what [`Envelope::new`] writes for
    /// `event` with that payload; debug builds (so every test) check it.
    pub fn prewritten(event: Event, json: String, payload: std::ops::Range<usize>) -> Self {
        #[cfg(debug_assertions)]
        {
            let expected =
                Self::with_payload(event.clone(), 0, |out| out.push_str(&json[payload.clone()]));
            assert_eq!(
                std::str::from_utf8(expected.json()).ok(),
                Some(json.as_str()),
                "prewritten envelope differs from its fields"
            );
        }
        Self::sealed(event, json, payload)
    }

    /// The envelope of `json`, its payload pointing into it (no second
    /// copy).
    fn sealed(mut event: Event, mut json: String, payload: std::ops::Range<usize>) -> Self {
        // Encoders reserve generously (2 KiB for a payload that may be
        // 500 B); the spare room would stay allocated while the envelope
        // is in flight: at 10,000 in flight that was tens of MiB.
        if json.capacity() - json.len() > json.len() / 4 {
            json.shrink_to_fit();
        }
        let json = Bytes::from(json.into_bytes());
        event.payload = Payload(Text::Sealed(json.slice(payload)));
        Envelope { event, json }
    }

    /// The envelope as one compact JSON object.
    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// The envelope's fields.
    pub fn event(&self) -> &Event {
        &self.event
    }
}

impl Deref for Envelope {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(attributes: Attributes) -> Event {
        Event {
            id: "0123456789abcdef0123456789abcdef".into(),
            name: "invocation_finished".into(),
            namespace: "ci \"east\"\n".into(),
            timestamp: "2026-11-25T01:02:03Z".into(),
            version: Envelope::VERSION,
            topic: "lifecycle".into(),
            key: "inv\\1\u{1}".into(),
            attributes,
            payload: Payload::parse(r#"{"a":1,"b":["x"]}"#.into()).unwrap(),
        }
    }

    #[test]
    fn json_has_accelbyte_fields_and_round_trips() {
        let env = Envelope::new(event(Attributes::from([("command_name", "test")])));
        let v: serde_json::Value = serde_json::from_slice(env.json()).unwrap();
        for field in [
            "id",
            "name",
            "namespace",
            "timestamp",
            "version",
            "topic",
            "payload",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert_eq!(v["payload"]["a"], 1);
        let back: Event = serde_json::from_slice(env.json()).unwrap();
        assert_eq!(back.attributes["command_name"], "test");
        assert_eq!(back.payload, env.payload);
        assert_eq!(env.name, "invocation_finished");
    }

    /// The hand-written encoder against serde's, byte for byte.
    #[test]
    fn json_is_what_serde_writes() {
        for attributes in [
            Attributes::default(),
            Attributes::from([
                ("b\"x".to_string(), "2\t".to_string()),
                ("a".to_string(), "ü€😀\u{7f}".to_string()),
            ]),
        ] {
            let e = event(attributes);
            let env = Envelope::new(e.clone());
            assert_eq!(
                std::str::from_utf8(env.json()).unwrap(),
                serde_json::to_string(&e).unwrap()
            );
        }
    }

    #[test]
    fn strings_are_escaped_like_serde_json() {
        let long = format!("{}\"{}\u{1f}", "a".repeat(40), "é".repeat(20));
        for s in [
            "plain",
            "q\"uote\\",
            "line\nbreak\ttab\r",
            "\u{1}\u{1f}\u{8}\u{c}",
            "é€😀",
            "",
            "exactly sixteen!",
            long.as_str(),
        ] {
            let mut out = String::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    /// Every byte value at every position of a word, against serde_json.
    #[test]
    fn every_byte_is_escaped_like_serde_json() {
        for b in 0u8..0x80 {
            for pos in 0..12 {
                let mut text = "abcdefghijkl".to_string().into_bytes();
                text[pos] = b;
                let text = String::from_utf8(text).unwrap();
                let mut out = String::new();
                push_json_str(&mut out, &text);
                assert_eq!(
                    out,
                    serde_json::to_string(&text).unwrap(),
                    "{b:#x} at {pos}"
                );
            }
        }
    }

    #[test]
    fn payload_parse_rejects_what_is_not_json() {
        assert!(Payload::parse("{\"a\":".into()).is_err());
        assert!(Payload::parse("[1,2]".into()).is_ok());
    }
}
