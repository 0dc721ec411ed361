//! Turns EngFlow notifications and streamed build events into envelopes.
//!
//! Everything here is a pure function of its input, which is what makes
//! envelope ids deterministic across redeliveries. Nothing here panics on
//! hostile input: whatever does not decode travels on raw (type URL and
//! base64 bytes) with the reason, and the caller logs it.

use std::sync::{Arc, OnceLock};

use evbridge_sinks::{Attributes, Envelope, Event, Payload, SmolStr, push_json_str};
use prost::Message as _;
use uuid::Uuid;

use crate::bep;
use crate::json::{JsonWriter, ProtoJson};
use crate::lifecycle_view::LifecycleView;
use crate::pb::{self, BAZEL_EVENT_TYPE_URL, LIFECYCLE_TYPE_URL, es, nq};
use crate::unknown::{self, UnknownField};

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

/// Keywords with what every envelope derives from them, computed once.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RenderedKeywords {
    /// The keywords as given.
    pub raw: Vec<String>,
    /// `command_name=…`, for the `command_name` attribute.
    pub command_name: Option<SmolStr>,
    /// That attribute as an envelope writes it (`,"command_name":"…"`),
    /// or empty.
    pub command_attribute: String,
    /// The `parsedKeywords` object (empty when there are none).
    pub json: String,
    /// The keywords as a JSON array of strings (the payload's `keywords`).
    pub array: String,
}

impl RenderedKeywords {
    /// Renders `keywords`, parsed from `raw`.
    pub fn from_parsed(raw: &[String], keywords: &Keywords) -> Self {
        let json = if keywords.is_empty() {
            String::new()
        } else {
            let mut w = JsonWriter::with_capacity(256);
            keywords.write(&mut w);
            w.finish().0
        };
        let mut w = JsonWriter::with_capacity(raw.iter().map(|k| k.len() + 3).sum::<usize>() + 2);
        w.begin_array();
        for k in raw {
            w.elem();
            w.str(k);
        }
        w.end_array();
        let mut command_attribute = String::new();
        if let Some(cmd) = keywords.command_name {
            command_attribute.push_str(",\"command_name\":");
            push_json_str(&mut command_attribute, cmd);
        }
        RenderedKeywords {
            raw: raw.to_vec(),
            command_name: keywords.command_name.map(SmolStr::from),
            command_attribute,
            json,
            array: w.finish().0,
        }
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
    /// bytes), for [`crate::unknown::report`].
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
    /// bytes), for [`crate::unknown::report`].
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

/// Rendered keyword sets by the hash of their bytes.
type RecentKeywords =
    std::collections::HashMap<u64, Arc<RenderedKeywords>, foldhash::fast::RandomState>;

/// A keyword set hashed by its bytes, whether `String`s or raw slices.
struct KeywordBytes<'a, K>(&'a [K]);

impl<K: AsRef<[u8]>> std::hash::Hash for KeywordBytes<'_, K> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_usize(self.0.len());
        for k in self.0 {
            h.write_usize(k.as_ref().len());
            h.write(k.as_ref());
        }
    }
}

/// How many keyword sets [`Normalizer`] keeps rendered; when full it
/// starts afresh (the sets in use come back at once).
const RECENT_KEYWORDS: usize = 64;

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

    /// `raw` parsed and rendered: from the recent ones when it is one of
    /// them, else rendered now and remembered.
    fn rendered_keywords(&self, raw: &[String]) -> Arc<RenderedKeywords> {
        self.recent_or_rendered(raw).unwrap_or_else(|| {
            debug_assert!(false, "strings are UTF-8");
            Arc::new(RenderedKeywords::from_parsed(raw, &Keywords::parse(raw)))
        })
    }

    /// As [`Self::rendered_keywords`] for keywords still in their encoded
    /// form; `None` when one that is not among the recent ones is not
    /// UTF-8.
    fn recent_or_rendered<K: AsRef<[u8]>>(&self, raw: &[K]) -> Option<Arc<RenderedKeywords>> {
        let recent = || {
            self.recent_keywords
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        let hash = std::hash::BuildHasher::hash_one(&self.keyword_hasher, KeywordBytes(raw));
        let same = |r: &RenderedKeywords| {
            r.raw.len() == raw.len()
                && r.raw
                    .iter()
                    .zip(raw)
                    .all(|(a, b)| a.as_bytes() == b.as_ref())
        };
        if let Some(found) = recent().get(&hash).filter(|r| same(r)) {
            return Some(found.clone());
        }
        // Checked and rendered without holding the lock.
        let raw = raw
            .iter()
            .map(|k| std::str::from_utf8(k.as_ref()).ok().map(str::to_owned))
            .collect::<Option<Vec<String>>>()?;
        let rendered = Arc::new(RenderedKeywords::from_parsed(&raw, &Keywords::parse(&raw)));
        let mut recent = recent();
        if recent.len() >= RECENT_KEYWORDS {
            recent.clear();
        }
        recent.insert(hash, rendered.clone());
        Some(rendered)
    }

    /// The lifecycle envelope of one notification.
    pub fn lifecycle(&self, n: &nq::Notification) -> Lifecycle {
        let timestamp = n.timestamp.map(|t| rfc3339(&t)).unwrap_or_else(now_rfc3339);
        let id = notification_envelope_id(&n.id);
        let event =
            |name: &'static str, namespace: SmolStr, key: SmolStr, attributes, payload| Event {
                id: id.clone(),
                name: SmolStr::new_static(name),
                namespace,
                timestamp: timestamp.clone(),
                version: Envelope::VERSION,
                topic: self.lifecycle_topic.clone(),
                key,
                attributes,
                payload,
            };
        let notification_id = || (SmolStr::new_static("notification_id"), n.id.as_str().into());

        let (type_url, value) = match &n.payload {
            Some(any) => (any.type_url.as_str(), any.value.as_slice()),
            None => ("", &[][..]),
        };
        // Decoded in place, its keywords found among the recent ones
        // before being copied; whatever that does not take, prost judges.
        let in_place = if type_url == LIFECYCLE_TYPE_URL {
            LifecycleView::decode(value)
                .and_then(|l| Some((self.recent_or_rendered(&l.keywords)?, l)))
        } else {
            None
        };
        let decoded;
        let (keywords, l) = match in_place {
            Some(found) => found,
            None => match decode_lifecycle(type_url, value) {
                Ok(message) => {
                    decoded = message;
                    let keywords = self.rendered_keywords(&decoded.keywords);
                    (keywords, LifecycleView::of(&decoded))
                }
                Err(problem) => {
                    let (attribute, notification) = notification_id();
                    let mut attributes = Attributes::with_capacity(1);
                    attributes.insert(attribute, notification);
                    let raw = raw_any_json(type_url, value, &problem);
                    let envelope = Envelope::new(event(
                        "raw_notification",
                        SmolStr::new_static("default"),
                        n.id.as_str().into(),
                        attributes,
                        raw,
                    ));
                    return Lifecycle {
                        envelope,
                        fetch: None,
                        problems: vec![problem],
                        unknown: Vec::new(),
                    };
                }
            },
        };
        debug_assert_eq!(
            l.to_message(),
            pb::es::BuildLifecycleEventNotification::decode(value).ok(),
            "decoded in place unlike prost"
        );
        let unknown = if l.maybe_unknown {
            unknown::find(LIFECYCLE_TYPE, value)
        } else {
            Vec::new()
        };

        use es::build_lifecycle_event_notification::Kind;
        let (name, invocation_id) = match &l.kind {
            Some(Kind::BuildStarted(_)) => ("build_started", None),
            Some(Kind::BuildFinished(_)) => ("build_finished", None),
            Some(Kind::InvocationStarted(i)) => ("invocation_started", Some(&i.invocation_id)),
            Some(Kind::InvocationFinished(i)) => ("invocation_finished", Some(&i.invocation_id)),
            None => ("lifecycle_event", None),
        };
        let namespace = instance_or_default(l.instance_name);
        let key = invocation_id
            .map(String::as_str)
            .filter(|i| !i.is_empty())
            .or(Some(l.build_id).filter(|b| !b.is_empty()))
            .unwrap_or(&n.id);
        let key = SmolStr::from(key);
        let build_id = SmolStr::from(l.build_id);
        // Added in name order, so each is appended.
        let mut attributes = Attributes::with_capacity(5);
        attributes.push_in_order(SmolStr::new_static("build_id"), build_id.clone());
        if let Some(cmd) = &keywords.command_name {
            attributes.push_in_order(SmolStr::new_static("command_name"), cmd.clone());
        }
        if let Some(inv) = invocation_id {
            let shared = if key == inv.as_str() {
                key.clone()
            } else {
                inv.as_str().into()
            };
            attributes.push_in_order(SmolStr::new_static("invocation_id"), shared);
        }
        let (attribute, notification) = notification_id();
        attributes.push_in_order(attribute, notification);
        if let Some(user) = l.auth_context.as_ref().and_then(|a| a.user.as_ref()) {
            attributes.push_in_order(
                SmolStr::new_static("principal"),
                user.principal.as_str().into(),
            );
        }
        if !unknown.is_empty() {
            attributes.push_in_order(
                SmolStr::new_static("unknown_fields"),
                unknown_list(&unknown).into(),
            );
        }

        let fetch = match &l.kind {
            Some(Kind::InvocationFinished(i)) => {
                let parts = SharedJson::new(
                    &self.topics.build_events,
                    &namespace,
                    [l.build_id, &i.invocation_id, &n.id],
                );
                Some(Invocation {
                    notification_id: n.id.as_str().into(),
                    instance: l.instance_name.to_owned(),
                    build_id: build_id.clone(),
                    invocation_id: i.invocation_id.as_str().into(),
                    namespace: namespace.clone(),
                    timestamp: timestamp.clone(),
                    keywords: keywords.clone(),
                    parts: Arc::new(parts),
                })
            }
            _ => None,
        };
        // The envelope's JSON, written here rather than field by field: id,
        // name, time and attribute names never need escaping, and the
        // version and topic were rendered once.
        let attributes_len: usize = attributes.iter().map(|(k, v)| k.len() + v.len() + 6).sum();
        let mut out = String::with_capacity(
            96 + namespace.len()
                + self.lifecycle_head.len()
                + key.len()
                + attributes_len
                + PAYLOAD_HINT,
        );
        out.push_str("{\"id\":\"");
        out.push_str(&id);
        out.push_str("\",\"name\":\"");
        out.push_str(name);
        out.push_str("\",\"namespace\":");
        push_json_str(&mut out, &namespace);
        out.push_str(",\"timestamp\":\"");
        out.push_str(&timestamp);
        out.push('"');
        out.push_str(&self.lifecycle_head);
        push_json_str(&mut out, &key);
        let mut separator = ",\"attributes\":{\"";
        for (attribute, value) in &attributes {
            out.push_str(separator);
            out.push_str(attribute);
            out.push_str("\":");
            push_json_str(&mut out, value);
            separator = ",\"";
        }
        out.push_str("},\"payload\":");
        let start = out.len();
        let problems = write_lifecycle(&mut out, &l, &keywords);
        #[cfg(debug_assertions)]
        if let Some(message) = l.to_message() {
            let mut generic = String::new();
            write_payload(&mut generic, &message, &keywords.json);
            assert_eq!(generic, out[start..], "rendered keywords differ");
        }
        if !unknown.is_empty() {
            write_original(&mut out, type_url, value, &unknown);
        }
        let end = out.len();
        out.push('}');
        let event = event(name, namespace, key, attributes, Payload::default());
        Lifecycle {
            envelope: Envelope::prewritten(event, out, start..end),
            fetch,
            problems,
            unknown,
        }
    }

    /// The envelope of the `seq`-th event (0-based) streamed for `inv`.
    /// Without the bytes it arrived as, only the Bazel event inside is
    /// searched for fields the schema does not know.
    pub fn build_event(
        &self,
        inv: &Invocation,
        seq: u64,
        ev: &es::StreamedBuildEvent,
    ) -> BuildEvent {
        self.build_event_from(inv, seq, ev, None)
    }

    /// As [`Self::build_event`], with `raw`, the bytes `ev` was decoded
    /// from: fields the schema does not know are found at every level.
    pub fn build_event_from(
        &self,
        inv: &Invocation,
        seq: u64,
        ev: &es::StreamedBuildEvent,
        raw: Option<&[u8]>,
    ) -> BuildEvent {
        let progress = ev.event.as_ref();
        let build_event = progress.and_then(|p| p.build_event.as_ref());
        // A Bazel event is decoded once, here: its kind names the envelope,
        // its id gives routing attributes, and the payload is written from
        // it.
        let bazel = build_event.and_then(bazel_event);
        // Fields the schema does not know, and the bytes carried then. A
        // message prost re-encodes to as many bytes as arrived held none
        // outside its `Any`s (Bazel's and EngFlow's writers are canonical,
        // as prost is), and the Bazel event gets the same check, so the
        // walk that finds them runs only on a mismatch, or where an `Any`
        // other than the Bazel event could hide some.
        let bazel_bytes = bazel
            .as_ref()
            .map(|(any, _)| (any.type_url.as_str(), any.value.as_slice()));
        let bazel_clean = bazel.as_ref().is_none_or(|(any, decoded)| {
            decoded.encoded_len() == any.value.len() && !bep::holds_any(decoded)
        });
        let (original, unknown) = match (raw, bazel_bytes) {
            (Some(bytes), Some((_, inner))) if ev.encoded_len() == bytes.len() => {
                let unknown = if bazel_clean {
                    Vec::new()
                } else {
                    unknown::find(BAZEL_TYPE, inner)
                };
                (Some((STREAMED_TYPE_URL, bytes)), unknown)
            }
            (Some(bytes), _) => (
                Some((STREAMED_TYPE_URL, bytes)),
                unknown::find(STREAMED_TYPE, bytes),
            ),
            (None, Some((url, inner))) if !bazel_clean => {
                (Some((url, inner)), unknown::find(BAZEL_TYPE, inner))
            }
            _ => (None, Vec::new()),
        };
        let name = match &bazel {
            Some((_, decoded)) => bep::name(decoded),
            None => build_event
                .and_then(|b| b.event.as_ref())
                .map_or("build_event", build_event_name),
        };
        let routing = bazel
            .as_ref()
            .map(|(_, decoded)| bep::routing(decoded))
            .unwrap_or_default();
        let event_time = build_event.and_then(|b| b.event_time);
        let raw_keywords = progress.map_or(&[][..], |p| &p.notification_keywords);
        // The invocation's keywords, rendered once, unless this event has
        // others (then rendered as a lifecycle notification's are).
        let own_keywords = raw_keywords == inv.keywords.raw.as_slice();
        let others;
        let keywords = if own_keywords {
            &inv.keywords
        } else {
            others = self.rendered_keywords(raw_keywords);
            &others
        };
        let mut seq_text = itoa::Buffer::new();
        let seq_text = seq_text.format(seq);

        // In name order, so each is appended; a Bazel event's routing
        // attributes fall in between.
        let mut attributes = Attributes::with_capacity(11);
        push_some(&mut attributes, "aspect", routing.aspect);
        push_some(&mut attributes, "bep_id", routing.bep_id);
        attributes.push_in_order(SmolStr::new_static("build_id"), inv.build_id.clone());
        if let Some(cmd) = &keywords.command_name {
            attributes.push_in_order(SmolStr::new_static("command_name"), cmd.clone());
        }
        push_some(&mut attributes, "configuration", routing.configuration);
        attributes.push_in_order(
            SmolStr::new_static("invocation_id"),
            inv.invocation_id.clone(),
        );
        push_some(&mut attributes, "label", routing.label);
        attributes.push_in_order(
            SmolStr::new_static("notification_id"),
            inv.notification_id.clone(),
        );
        if !ev.principal.is_empty() {
            attributes.push_in_order(
                SmolStr::new_static("principal"),
                ev.principal.as_str().into(),
            );
        }
        attributes.push_in_order(
            SmolStr::new_static("sequence"),
            SmolStr::new_inline(seq_text),
        );
        push_some(&mut attributes, "test_status", routing.test_status);
        let unknown_list = (!unknown.is_empty()).then(|| unknown_list(&unknown));
        if let Some(list) = &unknown_list {
            attributes.push_in_order(SmolStr::new_static("unknown_fields"), list.into());
        }
        debug_assert!(
            attributes.iter().is_sorted_by(|a, b| a.0 < b.0),
            "attributes out of order"
        );

        // The envelope's JSON, written here rather than field by field:
        // the parts its invocation's envelopes share were rendered once.
        // Id, name, time and attribute names never need escaping.
        let id = build_event_id(&inv.invocation_id, seq);
        let parts = &inv.parts;
        let routing_len: usize = routing.pairs().map(|(n, v)| n.len() + v.len() + 8).sum();
        let mut out = String::with_capacity(160 + parts.len() + routing_len + PAYLOAD_HINT);
        out.push_str("{\"id\":\"");
        out.push_str(&id);
        out.push_str("\",\"name\":\"");
        out.push_str(name);
        out.push_str(&parts.namespace);
        // The time is formatted into the JSON, and the field copied from
        // there.
        let time_start = out.len();
        match &event_time {
            Some(t) => crate::json::push_timestamp(&mut out, t),
            None => out.push_str(&inv.timestamp),
        }
        let time_at = time_start..out.len();
        let timestamp = match event_time {
            Some(_) => SmolStr::new(&out[time_at.clone()]),
            None => inv.timestamp.clone(),
        };
        out.push_str(&parts.head);
        // An attribute after the first: `,"name":"value"`.
        let attr = |out: &mut String, name: &str, value: Option<&str>| {
            if let Some(v) = value {
                out.push_str(",\"");
                out.push_str(name);
                out.push_str("\":");
                push_json_str(out, v);
            }
        };
        // Those before `build_id`, which the shared part starts without a
        // comma: each followed by one.
        for (name, value) in [("aspect", routing.aspect), ("bep_id", routing.bep_id)] {
            if let Some(v) = value {
                out.push('"');
                out.push_str(name);
                out.push_str("\":");
                push_json_str(&mut out, v);
                out.push(',');
            }
        }
        out.push_str(&parts.build);
        out.push_str(&keywords.command_attribute);
        attr(&mut out, "configuration", routing.configuration);
        out.push_str(&parts.invocation);
        attr(&mut out, "label", routing.label);
        out.push_str(&parts.notification);
        if !ev.principal.is_empty() {
            out.push_str(",\"principal\":");
            push_json_str(&mut out, &ev.principal);
        }
        out.push_str(",\"sequence\":\"");
        out.push_str(seq_text);
        out.push('"');
        attr(&mut out, "test_status", routing.test_status);
        if let Some(list) = &unknown_list {
            out.push_str(",\"unknown_fields\":");
            push_json_str(&mut out, list);
        }
        out.push_str("},\"payload\":");
        let start = out.len();
        // The stream members shared by the invocation's events, when this
        // event has the invocation's keywords and the first event's stream.
        let stream = match progress {
            Some(p) if own_keywords => Some(stream_members(parts, p)).filter(|(key, _)| {
                key.stream_id == p.stream_id && key.service_level == p.service_level
            }),
            _ => None,
        };
        let known_time = event_time.map(|t| (t, time_at));
        let problems = write_streamed_event(
            &mut out,
            ev,
            stream.map(|(_, m)| m.as_str()),
            &keywords.json,
            known_time,
            bazel
                .as_ref()
                .map(|(any, decoded)| (any.type_url.as_str(), decoded)),
        );
        #[cfg(debug_assertions)]
        {
            let mut generic = String::new();
            write_payload(&mut generic, ev, &keywords.json);
            assert_eq!(generic, out[start..], "cached stream members differ");
        }
        if let (Some((type_url, bytes)), false) = (original, unknown.is_empty()) {
            // Without its continuation token, which is transport state (a
            // redelivery has another): the same id, the same content.
            let bytes = if type_url == STREAMED_TYPE_URL {
                std::borrow::Cow::Owned(unknown::without_field(bytes, CONTINUATION_TOKEN_FIELD))
            } else {
                std::borrow::Cow::Borrowed(bytes)
            };
            write_original(&mut out, type_url, &bytes, &unknown);
        }
        let end = out.len();
        out.push('}');

        // The continuation token is transport state, not content: the
        // generated encoder leaves it out.
        let event = Event {
            id,
            name: SmolStr::new_static(name),
            namespace: inv.namespace.clone(),
            timestamp,
            version: Envelope::VERSION,
            topic: self.build_events_topic.clone(),
            key: inv.invocation_id.clone(),
            attributes,
            payload: Payload::default(),
        };
        let envelope = Envelope::prewritten(event, out, start..end);
        BuildEvent {
            envelope,
            problems,
            unknown,
        }
    }
}

/// The `unknown_fields` attribute: `message#number`, comma-separated.
fn unknown_list(unknown: &[UnknownField]) -> String {
    unknown
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Full names of the messages searched for unknown fields first.
const LIFECYCLE_TYPE: &str = "engflow.eventstore.v1.BuildLifecycleEventNotification";
const STREAMED_TYPE: &str = "engflow.eventstore.v1.StreamedBuildEvent";
const BAZEL_TYPE: &str = "build_event_stream.BuildEvent";

/// `StreamedBuildEvent.continuation_token`.
const CONTINUATION_TOKEN_FIELD: u32 = 2;

/// Type URL of what the event store streams, as carried in `original`.
const STREAMED_TYPE_URL: &str = "type.googleapis.com/engflow.eventstore.v1.StreamedBuildEvent";

/// Adds the `original` member to the payload object that ends `out`: the
/// bytes a message arrived as (base64) with its type and the fields the
/// schema did not know, so nothing a newer schema added is lost.
fn write_original(out: &mut String, type_url: &str, bytes: &[u8], unknown: &[UnknownField]) {
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

/// Appends attribute `name` when it has a value (in name order).
fn push_some(attributes: &mut Attributes, name: &'static str, value: Option<&str>) {
    if let Some(v) = value {
        attributes.push_in_order(SmolStr::new_static(name), SmolStr::new(v));
    }
}

/// A Bazel event inside a Build Event Service event, decoded, with its
/// `Any`; `None` when it is something else or does not decode (the
/// JSON writer then leaves it raw, with the reason).
fn bazel_event(b: &pb::bes::BuildEvent) -> Option<(&prost_types::Any, pb::bep::BuildEvent)> {
    match &b.event {
        Some(pb::bes::build_event::Event::BazelEvent(any))
            if any.type_url == BAZEL_EVENT_TYPE_URL =>
        {
            pb::bep::BuildEvent::decode(any.value.as_slice())
                .ok()
                .map(|decoded| (any, decoded))
        }
        _ => None,
    }
}

/// The cached stream members of `parts`, rendered from `p` if this is the
/// invocation's first event.
fn stream_members<'a>(
    parts: &'a SharedJson,
    p: &es::BuildProgressEvent,
) -> &'a (StreamKey, String) {
    parts.stream.get_or_init(|| {
        let head = es::BuildProgressEvent {
            stream_id: p.stream_id.clone(),
            service_level: p.service_level,
            notification_keywords: p.notification_keywords.clone(),
            build_event: None,
        };
        let mut w = JsonWriter::with_capacity(256);
        w.begin_object();
        head.write_members(&mut w);
        let key = StreamKey {
            stream_id: head.stream_id,
            service_level: head.service_level,
        };
        // Without the opening brace.
        (key, w.finish().0.split_off(1))
    })
}

/// Appends a lifecycle notification's payload as [`write_payload`] would,
/// with its keywords (array and `parsedKeywords`) as rendered before.
fn write_lifecycle(
    out: &mut String,
    l: &LifecycleView,
    keywords: &RenderedKeywords,
) -> Vec<String> {
    use es::build_lifecycle_event_notification::Kind;
    let mut w = JsonWriter::over(std::mem::take(out));
    w.begin_object();
    if !l.instance_name.is_empty() {
        w.key("instanceName");
        w.str(l.instance_name);
    }
    if !l.build_id.is_empty() {
        w.key("buildId");
        w.str(l.build_id);
    }
    if let Some(a) = &l.auth_context {
        w.key("authContext");
        a.write_json(&mut w);
    }
    if !l.keywords.is_empty() {
        w.key("keywords");
        w.raw(&keywords.array);
    }
    let kind: Option<(&str, &dyn ProtoJson)> = match &l.kind {
        Some(Kind::BuildStarted(v)) => Some(("buildStarted", v)),
        Some(Kind::BuildFinished(v)) => Some(("buildFinished", v)),
        Some(Kind::InvocationStarted(v)) => Some(("invocationStarted", v)),
        Some(Kind::InvocationFinished(v)) => Some(("invocationFinished", v)),
        None => None,
    };
    if let Some((name, v)) = kind {
        w.key(name);
        v.write_json(&mut w);
    }
    write_keywords(&mut w, &keywords.json);
    w.end_object();
    let (text, problems) = w.finish();
    *out = text;
    problems
}

/// Appends a streamed event's payload as [`write_payload`] would, with the
/// members of its `BuildProgressEvent` before `buildEvent` taken from
/// `stream` when given (debug builds check the two agree).
fn write_streamed_event(
    out: &mut String,
    ev: &es::StreamedBuildEvent,
    stream: Option<&str>,
    keywords: &str,
    known_time: Option<(prost_types::Timestamp, std::ops::Range<usize>)>,
    bazel: Option<(&str, &pb::bep::BuildEvent)>,
) -> Vec<String> {
    let (Some(members), Some(p)) = (stream, &ev.event) else {
        return write_payload(out, ev, keywords);
    };
    let mut w = JsonWriter::over(std::mem::take(out));
    if let Some((t, at)) = known_time {
        w.known_timestamp(t, at);
    }
    w.begin_object();
    if ev.is_last {
        w.key("isLast");
        w.bool(true);
    }
    w.key("event");
    w.begin_object();
    w.members(members);
    if let Some(b) = &p.build_event {
        w.key("buildEvent");
        match bazel {
            // As the generated encoder writes it, without decoding the
            // Bazel event again.
            Some((type_url, decoded)) => {
                w.begin_object();
                if let Some(t) = &b.event_time {
                    w.key("eventTime");
                    w.timestamp(t);
                }
                w.key("bazelEvent");
                w.decoded_any(type_url, decoded);
                w.end_object();
            }
            None => b.write_json(&mut w),
        }
    }
    w.end_object();
    if !ev.principal.is_empty() {
        w.key("principal");
        w.str(&ev.principal);
    }
    write_keywords(&mut w, keywords);
    w.end_object();
    let (text, problems) = w.finish();
    *out = text;
    problems
}

/// A lifecycle payload decoded by prost, or why it is not one.
fn decode_lifecycle(
    type_url: &str,
    value: &[u8],
) -> Result<es::BuildLifecycleEventNotification, String> {
    if type_url != LIFECYCLE_TYPE_URL {
        Err(if type_url.is_empty() {
            "notification has no payload".to_string()
        } else {
            format!("unknown payload type `{type_url}`")
        })
    } else {
        es::BuildLifecycleEventNotification::decode(value)
            .map_err(|e| format!("payload `{type_url}` does not decode: {e}"))
    }
}

/// `{"typeUrl", "value" (base64), "error"}`: the payload of anything that
/// could not be decoded at all.
fn raw_any_json(type_url: &str, value: &[u8], problem: &str) -> Payload {
    let mut w = JsonWriter::with_capacity(64 + value.len() * 4 / 3 + problem.len());
    w.begin_object();
    w.raw_any_members(type_url, value, problem);
    w.end_object();
    Payload::trusted(w.finish().0)
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

/// The `parsedKeywords` member (rendered), if there are keywords.
fn write_keywords(w: &mut JsonWriter, keywords: &str) {
    if !keywords.is_empty() {
        w.key("parsedKeywords");
        w.raw(keywords);
    }
}

/// Keywords such as `command_name=test` and
/// `user_keyword=engflow:CiCdPipelineName=post-merge`, structured: the
/// payload's `parsedKeywords` is `{"commandName", "other": {…},
/// "userKeywords": {…}}`, maps sorted by key, the last of a repeated key
/// winning.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Keywords<'a> {
    /// `command_name=…`.
    pub command_name: Option<&'a str>,
    /// `user_keyword=KEY=VALUE` (`VALUE` empty when there is no `=`).
    pub user: Vec<(&'a str, &'a str)>,
    /// Any other `KEY=VALUE`, or a bare word with an empty value.
    pub other: Vec<(&'a str, &'a str)>,
}

impl<'a> Keywords<'a> {
    /// Parses EngFlow's notification keywords.
    pub fn parse(keywords: &'a [String]) -> Self {
        let mut out = Keywords::default();
        for kw in keywords {
            match kw.split_once('=') {
                Some(("command_name", v)) => out.command_name = Some(v),
                Some(("user_keyword", v)) => out.user.push(v.split_once('=').unwrap_or((v, ""))),
                Some(kv) => out.other.push(kv),
                None => out.other.push((kw, "")),
            }
        }
        for list in [&mut out.user, &mut out.other] {
            // Stable, so among equal keys the last given stays last.
            list.sort_by(|a, b| a.0.cmp(b.0));
            let mut i = 0;
            while i + 1 < list.len() {
                if list[i].0 == list[i + 1].0 {
                    list.remove(i);
                } else {
                    i += 1;
                }
            }
        }
        out
    }

    /// No keywords at all.
    pub fn is_empty(&self) -> bool {
        self.command_name.is_none() && self.user.is_empty() && self.other.is_empty()
    }

    /// Writes the structured object.
    pub fn write(&self, w: &mut JsonWriter) {
        w.begin_object();
        if let Some(cmd) = self.command_name {
            w.key("commandName");
            w.str(cmd);
        }
        for (name, list) in [("other", &self.other), ("userKeywords", &self.user)] {
            if !list.is_empty() {
                w.key(name);
                w.begin_object();
                for (k, v) in list {
                    w.key_str(k);
                    w.str(v);
                }
                w.end_object();
            }
        }
        w.end_object();
    }
}

fn build_event_name(event: &pb::bes::build_event::Event) -> &'static str {
    use pb::bes::build_event::Event as E;
    match event {
        E::InvocationAttemptStarted(_) => "invocation_attempt_started",
        E::InvocationAttemptFinished(_) => "invocation_attempt_finished",
        E::BuildEnqueued(_) => "build_enqueued",
        E::BuildFinished(_) => "build_finished",
        E::ConsoleOutput(_) => "console_output",
        E::ComponentStreamFinished(_) => "component_stream_finished",
        E::BazelEvent(_) => "bazel_event",
        E::BuildExecutionEvent(_) => "build_execution_event",
        E::SourceFetchEvent(_) => "source_fetch_event",
    }
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
    crate::json::push_timestamp(&mut s, t);
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
