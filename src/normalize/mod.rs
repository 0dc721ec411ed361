//! Turns EngFlow notifications and streamed build events into envelopes.
//!
//! Everything here is a pure function of its input, which is what makes
//! envelope ids deterministic across redeliveries. Nothing here panics on
//! hostile input: whatever does not decode travels on raw (type URL and
//! base64 bytes) with the reason, and the caller logs it.
//!
//! # Layout
//! - `lifecycle`: a notification → its envelope and what to fetch.
//! - `build_event`: a streamed event → its envelope.
//! - `keywords`: `notification_keywords` parsed and rendered once per set.
//! - `raw`: what travels raw, and undeliverable notifications.
//! - `view`: a lifecycle payload decoded without copying its strings.
//! - `bep`: Bazel's events named by kind, routing attributes from their ids.
//! - `unknown`: fields the schema does not know, found on the wire.
//! - `json`: proto3 JSON written straight from the prost structs.
//! - here: the [`Normalizer`], envelope ids, timestamps.

use std::sync::{Arc, OnceLock};

use evbridge_sinks::{Attributes, Envelope, Event, Payload, SmolStr, push_json_str};
use prost::Message as _;
use uuid::Uuid;

use crate::pb::{self, BAZEL_EVENT_TYPE_URL, LIFECYCLE_TYPE_URL, es, nq};

pub mod bep;
mod build_event;
pub mod json;
mod keywords;
mod lifecycle;
mod raw;
pub mod unknown;
mod view;

use self::json::{JsonWriter, ProtoJson};
use self::keywords::*;
pub use self::keywords::{Keywords, RenderedKeywords};
use self::raw::*;
use self::unknown::UnknownField;
use self::view::LifecycleView;

/// Namespace of the v5 UUIDs evbridge derives its envelope ids from.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1e_3c0a_8d2b_4b7e_9a51_0c4d_e2f3_a7b9);

/// Topic names given to the two kinds of envelope.
#[derive(Debug, Clone)]
pub struct Topics {
    /// Topic of lifecycle envelopes (one per notification).
    pub lifecycle: String,
    /// Topic of build-event envelopes (one per streamed event).
    pub build_events: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            lifecycle: "lifecycle".into(),
            build_events: "build-events".into(),
        }
    }
}

/// The invocation whose build events a notification asks to fetch, with
/// the context every one of its envelopes carries.
///
/// Only [`Normalizer::lifecycle`] makes one (a field is private to the
/// crate), so the JSON it rendered always matches its fields: read them,
/// do not change them.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// Id of the notification that announced it (for logs).
    pub notification_id: SmolStr,
    /// EngFlow instance name.
    pub instance: String,
    /// Build the invocation belongs to.
    pub build_id: SmolStr,
    /// The invocation.
    pub invocation_id: SmolStr,
    /// The envelopes' namespace: the instance, or `default`.
    pub namespace: SmolStr,
    /// Time of the notification, used when an event has none.
    pub timestamp: SmolStr,
    /// The notification's keywords, parsed and rendered once: its events
    /// usually carry the same ones.
    pub keywords: Arc<RenderedKeywords>,
    /// The JSON its build-event envelopes share, rendered once.
    pub(crate) parts: Arc<SharedJson>,
}

/// JSON text every build-event envelope of one invocation repeats,
/// rendered once: writing it field by field (escaping each string) was the
/// larger part of the cost of an envelope.
#[derive(Debug)]
pub struct SharedJson {
    /// `","namespace":"…","timestamp":"`, between the name and the time.
    namespace: String,
    /// From after the time to the opening of the attributes (those of a
    /// Bazel event's id that sort first, `aspect` and `bep_id`, come next).
    head: String,
    /// The `build_id` attribute (the `command_name` attribute, from the
    /// event's keywords, and a Bazel event's `configuration` come next).
    build: String,
    /// The `invocation_id` attribute (a Bazel event's `label` comes next).
    invocation: String,
    /// The `notification_id` attribute.
    notification: String,
    /// The members of an event's `BuildProgressEvent` before `buildEvent`
    /// (stream id, service level, keywords), rendered from the first
    /// event and reused by those with the same ones.
    stream: OnceLock<(StreamKey, String)>,
}

/// What the cached `BuildProgressEvent` members were rendered from (the
/// keywords are the invocation's whenever the cache is used).
#[derive(Debug, PartialEq, Eq)]
struct StreamKey {
    stream_id: Option<pb::bes::StreamId>,
    service_level: Option<i32>,
}

impl SharedJson {
    fn new(topic: &str, namespace: &str, ids: [&str; 3]) -> Self {
        let [build_id, invocation_id, notification_id] = ids;
        let mut s = SharedJson {
            namespace: String::with_capacity(32 + namespace.len()),
            head: String::with_capacity(64 + topic.len() + invocation_id.len()),
            build: String::with_capacity(16 + build_id.len()),
            invocation: String::with_capacity(24 + invocation_id.len()),
            notification: String::with_capacity(24 + notification_id.len()),
            stream: OnceLock::new(),
        };
        s.namespace.push_str("\",\"namespace\":");
        push_json_str(&mut s.namespace, namespace);
        s.namespace.push_str(",\"timestamp\":\"");
        let head = &mut s.head;
        head.push_str("\",\"version\":");
        head.push_str(itoa::Buffer::new().format(Envelope::VERSION));
        head.push_str(",\"topic\":");
        push_json_str(head, topic);
        head.push_str(",\"key\":");
        push_json_str(head, invocation_id);
        head.push_str(",\"attributes\":{");
        s.build.push_str("\"build_id\":");
        push_json_str(&mut s.build, build_id);
        s.invocation.push_str(",\"invocation_id\":");
        push_json_str(&mut s.invocation, invocation_id);
        s.notification.push_str(",\"notification_id\":");
        push_json_str(&mut s.notification, notification_id);
        s
    }

    fn len(&self) -> usize {
        self.namespace.len()
            + self.head.len()
            + self.build.len()
            + self.invocation.len()
            + self.notification.len()
    }
}

/// A lifecycle envelope and what else the notification asks for.
#[derive(Debug)]
pub struct Lifecycle {
    /// The envelope of the notification itself.
    pub envelope: Envelope,
    /// Set for `invocation_finished`: fetch this invocation's events.
    pub fetch: Option<Invocation>,
    /// Why parts were left raw, if any (to be logged with the id).
    pub problems: Vec<String>,
    /// Fields the schema does not know (the envelope carries the original
    /// bytes), for [`crate::normalize::unknown::report`].
    pub unknown: Vec<UnknownField>,
}

/// A build-event envelope and any parts that were left raw.
#[derive(Debug)]
pub struct BuildEvent {
    /// The envelope.
    pub envelope: Envelope,
    /// Why parts were left raw, if any (to be logged with the id).
    pub problems: Vec<String>,
    /// Fields the schema does not know (the envelope carries the original
    /// bytes), for [`crate::normalize::unknown::report`].
    pub unknown: Vec<UnknownField>,
}

/// Normalizes notifications and build events into envelopes.
#[derive(Debug, Clone)]
pub struct Normalizer {
    topics: Topics,
    /// The topics as envelopes carry them (cloned, not copied, into each).
    lifecycle_topic: SmolStr,
    build_events_topic: SmolStr,
    /// `,"version":…,"topic":"…","key":` of lifecycle envelopes.
    lifecycle_head: String,
    /// Keywords rendered lately: a build's notifications (and those of
    /// builds running at once) repeat the same few sets. Found by a hash of
    /// their bytes (so a lifecycle payload's keywords are looked up before
    /// being copied or checked as UTF-8), then compared.
    recent_keywords: Arc<std::sync::Mutex<RecentKeywords>>,
    /// Hashes keyword sets for `recent_keywords` (by their bytes).
    keyword_hasher: foldhash::fast::RandomState,
}

impl Default for Normalizer {
    fn default() -> Self {
        Self::new(Topics::default())
    }
}

impl Normalizer {
    /// A normalizer writing the given topic names.
    pub fn new(topics: Topics) -> Self {
        let mut lifecycle_head = String::from(",\"version\":");
        lifecycle_head.push_str(itoa::Buffer::new().format(Envelope::VERSION));
        lifecycle_head.push_str(",\"topic\":");
        push_json_str(&mut lifecycle_head, &topics.lifecycle);
        lifecycle_head.push_str(",\"key\":");
        Normalizer {
            lifecycle_head,
            lifecycle_topic: topics.lifecycle.as_str().into(),
            build_events_topic: topics.build_events.as_str().into(),
            topics,
            recent_keywords: Arc::default(),
            keyword_hasher: foldhash::fast::RandomState::default(),
        }
    }
}

/// Room reserved for a payload's JSON (most are 0.5–2 KB).
const PAYLOAD_HINT: usize = 2048;

/// Appends the message's JSON, with the rendered `parsedKeywords` object
/// (empty for none) as the last member, to `out`; returns what was left
/// raw inside it.
fn write_payload<T: ProtoJson>(out: &mut String, msg: &T, keywords: &str) -> Vec<String> {
    let mut w = JsonWriter::over(std::mem::take(out));
    w.begin_object();
    msg.write_members(&mut w);
    write_keywords(&mut w, keywords);
    w.end_object();
    let (text, problems) = w.finish();
    *out = text;
    problems
}

fn instance_or_default(instance: &str) -> SmolStr {
    if instance.is_empty() {
        SmolStr::new_static("default")
    } else {
        instance.into()
    }
}

/// The envelope id of a notification: its UUID as 32 hex digits (the
/// AccelByte form), or a v5 UUID of it when it is not a UUID.
pub fn notification_envelope_id(notification_id: &str) -> SmolStr {
    match Uuid::parse_str(notification_id) {
        Ok(u) => SmolStr::new(u.simple().encode_lower(&mut [0u8; 32])),
        Err(_) => v5_simple(&ID_NAMESPACE, notification_id.as_bytes()),
    }
}

/// The envelope id of the `seq`-th event of an invocation.
pub fn build_event_id(invocation_id: &str, seq: u64) -> SmolStr {
    // The name `<invocation>/<seq>`, hashed in parts (no buffer).
    v5_simple_parts(
        &ID_NAMESPACE,
        &[
            invocation_id.as_bytes(),
            b"/",
            itoa::Buffer::new().format(seq).as_bytes(),
        ],
    )
}

/// The v5 UUID (RFC 9562) of `name` in `namespace` as 32 lowercase hex
/// digits, exactly `Uuid::new_v5(namespace, name).simple()`, hashed by
/// the `sha1` crate, which uses the CPU's SHA instructions where it has
/// them (the SHA-1 inside `uuid` is portable code, several times slower).
pub fn v5_simple(namespace: &Uuid, name: &[u8]) -> SmolStr {
    v5_simple_parts(namespace, &[name])
}

/// [`v5_simple`] of the concatenation of `parts`.
fn v5_simple_parts(namespace: &Uuid, parts: &[&[u8]]) -> SmolStr {
    use sha1::{Digest, Sha1};
    let mut hasher = Sha1::new();
    hasher.update(namespace.as_bytes());
    for part in parts {
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x50; // version 5
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 9562 variant
    let mut hex = [0u8; 32];
    SmolStr::new(Uuid::from_bytes(bytes).simple().encode_lower(&mut hex))
}

fn now_rfc3339() -> SmolStr {
    rfc3339(&prost_types::Timestamp::from(std::time::SystemTime::now()))
}

fn rfc3339(t: &prost_types::Timestamp) -> SmolStr {
    let mut s = String::with_capacity(30);
    crate::normalize::json::push_timestamp(&mut s, t);
    SmolStr::new(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_keywords_are_reused_and_bounded() {
        let norm = Normalizer::default();
        let set = |i: usize| vec![format!("command_name=c{i}"), "user_keyword=a=b".to_string()];
        let first = norm.rendered_keywords(&set(0));
        assert!(Arc::ptr_eq(&first, &norm.rendered_keywords(&set(0))));
        assert_eq!(first.command_name.as_deref(), Some("c0"));
        assert_eq!(first.array, r#"["command_name=c0","user_keyword=a=b"]"#);
        assert_eq!(
            first.json,
            r#"{"commandName":"c0","userKeywords":{"a":"b"}}"#
        );
        for i in 1..=RECENT_KEYWORDS {
            assert_eq!(
                norm.rendered_keywords(&set(i)).command_name.as_deref(),
                Some(format!("c{i}").as_str())
            );
        }
        // Pushed out when the cache filled: rendered again, the same.
        let again = norm.rendered_keywords(&set(0));
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(*first, *again);
        assert!(norm.recent_keywords.lock().unwrap().len() <= RECENT_KEYWORDS);
        // Sets that differ only late are told apart.
        let late = |n: &str| vec!["command_name=build".into(), format!("user_keyword=run={n}")];
        let (a, b) = (
            norm.rendered_keywords(&late("41")),
            norm.rendered_keywords(&late("42")),
        );
        assert_eq!(
            (a.raw[1].as_str(), b.raw[1].as_str()),
            ("user_keyword=run=41", "user_keyword=run=42")
        );
        assert!(Arc::ptr_eq(&a, &norm.rendered_keywords(&late("41"))));
    }

    #[test]
    fn a_set_stored_under_another_sets_hash_is_not_taken_for_it() {
        // A hash collision, made by hand: set B's rendering filed under the
        // hash of set A. Looking up A (as strings, or as bytes from a
        // payload, one of them not UTF-8) must not return B.
        let norm = Normalizer::default();
        let a = vec!["command_name=a".to_string()];
        let b = norm.rendered_keywords(&["command_name=b".to_string()]);
        let hash = std::hash::BuildHasher::hash_one(&norm.keyword_hasher, KeywordBytes(&a));
        norm.recent_keywords.lock().unwrap().insert(hash, b.clone());
        let found = norm.rendered_keywords(&a);
        assert_eq!(found.raw, a);
        assert_eq!(found.command_name.as_deref(), Some("a"));
        let bad: [&[u8]; 1] = [b"command_name=\xff"];
        let hash = std::hash::BuildHasher::hash_one(&norm.keyword_hasher, KeywordBytes(&bad));
        norm.recent_keywords.lock().unwrap().insert(hash, b);
        assert!(norm.recent_or_rendered(&bad).is_none());
    }

    #[test]
    fn build_event_ids_are_v5_of_invocation_and_sequence() {
        for (inv, seq) in [
            ("inv-1", 0),
            ("8b04a64f-fb64-4a10-8831-9e7b1299772a", 12_345),
        ] {
            let name = format!("{inv}/{seq}");
            assert_eq!(
                build_event_id(inv, seq),
                Uuid::new_v5(&ID_NAMESPACE, name.as_bytes())
                    .simple()
                    .to_string()
            );
        }
    }

    #[test]
    fn v5_ids_match_the_uuid_crate() {
        let names: [&[u8]; 5] = [b"", b"a", b"inv-1/0", &[0xff; 200], "ünïcode/42".as_bytes()];
        for ns in [ID_NAMESPACE, Uuid::NAMESPACE_URL] {
            for name in names {
                assert_eq!(
                    v5_simple(&ns, name),
                    Uuid::new_v5(&ns, name).simple().to_string()
                );
            }
        }
    }
}
