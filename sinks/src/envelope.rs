//! The one shape every event takes on its way to a sink.

use std::collections::BTreeMap;
use std::ops::Deref;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
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
    pub id: String,
    /// Short machine name such as `invocation_finished` or `bazel_event`.
    pub name: String,
    /// The EngFlow instance name.
    pub namespace: String,
    /// The event's own time, RFC 3339 UTC.
    pub timestamp: String,
    /// Schema version of the envelope (AccelByte's `version`).
    pub version: u32,
    /// Logical stream (`lifecycle`, `build-events`) that sinks may map to a
    /// real topic or routing key.
    pub topic: String,
    /// Partition/ordering key: events with the same key keep their order.
    pub key: String,
    /// Flat string facts (keywords, principal, ids) for headers and routing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// The event itself as JSON.
    pub payload: Box<RawValue>,
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

    /// Seals an event: encodes its JSON once.
    pub fn new(event: Event) -> Self {
        // Serializing a struct of strings, a map of strings and a RawValue
        // cannot fail.
        let json = serde_json::to_vec(&event).expect("envelope serializes");
        Envelope {
            event,
            json: Bytes::from(json),
        }
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

    #[test]
    fn json_has_accelbyte_fields_and_round_trips() {
        let env = Envelope::new(Event {
            id: "0123456789abcdef0123456789abcdef".into(),
            name: "invocation_finished".into(),
            namespace: "default".into(),
            timestamp: "2026-11-25T01:02:03Z".into(),
            version: Envelope::VERSION,
            topic: "lifecycle".into(),
            key: "inv".into(),
            attributes: BTreeMap::from([("command_name".into(), "test".into())]),
            payload: RawValue::from_string(r#"{"a":1}"#.into()).unwrap(),
        });
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
        assert_eq!(env.name, "invocation_finished");
    }
}
