//! What travels raw: payloads that do not decode (type URL, base64
//! bytes, reason), events with fields the schema does not know (the
//! original bytes beside), and notifications given up.

use super::*;

/// The `unknown_fields` attribute: `message#number`, comma-separated.
pub(super) fn unknown_list(unknown: &[UnknownField]) -> String {
    unknown
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Full names of the messages searched for unknown fields first.
pub(super) const LIFECYCLE_TYPE: &str = "engflow.eventstore.v1.BuildLifecycleEventNotification";
pub(super) const STREAMED_TYPE: &str = "engflow.eventstore.v1.StreamedBuildEvent";
pub(super) const BAZEL_TYPE: &str = "build_event_stream.BuildEvent";

/// `StreamedBuildEvent.continuation_token`.
pub(super) const CONTINUATION_TOKEN_FIELD: u32 = 2;

/// Type URL of what the event store streams, as carried in `original`.
pub(super) const STREAMED_TYPE_URL: &str =
    "type.googleapis.com/engflow.eventstore.v1.StreamedBuildEvent";

/// Adds the `original` member to the payload object that ends `out`: the
/// bytes a message arrived as (base64) with its type and the fields the
/// schema did not know, so nothing a newer schema added is lost.
pub(super) fn write_original(
    out: &mut String,
    type_url: &str,
    bytes: &[u8],
    unknown: &[UnknownField],
) {
    debug_assert!(out.ends_with('}'));
    out.pop();
    let empty = out.ends_with('{');
    if empty {
        out.pop();
    }
    let mut w = JsonWriter::over(std::mem::take(out));
    if empty {
        w.begin_object();
    }
    w.key("original");
    w.begin_object();
    w.key("typeUrl");
    w.str(type_url);
    w.key("value");
    w.bytes(bytes);
    w.key("unknownFields");
    w.begin_array();
    for f in unknown {
        w.elem();
        w.str(&f.to_string());
    }
    w.end_array();
    w.end_object();
    w.end_object();
    *out = w.finish().0;
}

impl Normalizer {
    /// What a source gives up on: `undeliverable_notification`, the
    /// notification as it came (its payload raw, in base64) with why each
    /// attempt failed, for the dead-letter sink. Its id is derived from
    /// the notification's, so a repeat of the same give-up is the same.
    pub fn undeliverable(
        &self,
        n: &nq::Notification,
        reasons: &[String],
        attempts: u32,
    ) -> Envelope {
        let (type_url, value) = match &n.payload {
            Some(any) => (any.type_url.as_str(), any.value.as_slice()),
            None => ("", &[][..]),
        };
        let mut w = JsonWriter::with_capacity(128 + value.len() * 4 / 3);
        w.begin_object();
        w.key("notificationId");
        w.str(&n.id);
        w.key("attempts");
        w.u32(attempts);
        w.key("reasons");
        w.begin_array();
        for r in reasons {
            w.elem();
            w.str(r);
        }
        w.end_array();
        w.key("payload");
        w.begin_object();
        w.raw_any_members(type_url, value, "");
        w.end_object();
        w.end_object();
        let mut attributes = Attributes::with_capacity(2);
        attributes.push_in_order(
            SmolStr::new_static("attempts"),
            SmolStr::new(itoa::Buffer::new().format(attempts)),
        );
        attributes.push_in_order(SmolStr::new_static("notification_id"), n.id.as_str().into());
        let timestamp = n.timestamp.map(|t| rfc3339(&t)).unwrap_or_else(now_rfc3339);
        Envelope::new(Event {
            id: v5_simple(&ID_NAMESPACE, format!("{}/undeliverable", n.id).as_bytes()),
            name: SmolStr::new_static("undeliverable_notification"),
            namespace: SmolStr::new_static("default"),
            timestamp,
            version: Envelope::VERSION,
            topic: self.lifecycle_topic.clone(),
            key: n.id.as_str().into(),
            attributes,
            payload: Payload::trusted(w.finish().0),
        })
    }

    /// The envelope of the `seq`-th event of `inv` when its bytes do not
    /// decode: `raw_build_event`, the bytes in base64 with the reason, so
    /// it is delivered (and the stream goes on) rather than lost or
    /// fetched again forever.
    pub fn raw_build_event(
        &self,
        inv: &Invocation,
        seq: u64,
        raw: &[u8],
        reason: &str,
    ) -> Envelope {
        let mut attributes = Attributes::with_capacity(5);
        attributes.push_in_order(SmolStr::new_static("build_id"), inv.build_id.clone());
        attributes.push_in_order(
            SmolStr::new_static("invocation_id"),
            inv.invocation_id.clone(),
        );
        attributes.push_in_order(
            SmolStr::new_static("notification_id"),
            inv.notification_id.clone(),
        );
        attributes.push_in_order(
            SmolStr::new_static("sequence"),
            SmolStr::new(itoa::Buffer::new().format(seq)),
        );
        Envelope::new(Event {
            id: build_event_id(&inv.invocation_id, seq),
            name: SmolStr::new_static("raw_build_event"),
            namespace: inv.namespace.clone(),
            timestamp: inv.timestamp.clone(),
            version: Envelope::VERSION,
            topic: self.build_events_topic.clone(),
            key: inv.invocation_id.clone(),
            attributes,
            payload: raw_any_json(STREAMED_TYPE_URL, raw, reason),
        })
    }
}

/// `{"typeUrl", "value" (base64), "error"}`: the payload of anything that
/// could not be decoded at all.
pub(super) fn raw_any_json(type_url: &str, value: &[u8], problem: &str) -> Payload {
    let mut w = JsonWriter::with_capacity(64 + value.len() * 4 / 3 + problem.len());
    w.begin_object();
    w.raw_any_members(type_url, value, problem);
    w.end_object();
    Payload::trusted(w.finish().0)
}
