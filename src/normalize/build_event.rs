//! A streamed build event → its envelope: named by its Bazel kind,
//! routing attributes from its id, the BEP payload expanded.

use super::*;

impl Normalizer {
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
            Some(t) => crate::normalize::json::push_timestamp(&mut out, t),
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

/// Appends attribute `name` when it has a value (in name order).
pub(super) fn push_some(attributes: &mut Attributes, name: &'static str, value: Option<&str>) {
    if let Some(v) = value {
        attributes.push_in_order(SmolStr::new_static(name), SmolStr::new(v));
    }
}

/// A Bazel event inside a Build Event Service event, decoded, with its
/// `Any`; `None` when it is something else or does not decode (the
/// JSON writer then leaves it raw, with the reason).
pub(super) fn bazel_event(
    b: &pb::bes::BuildEvent,
) -> Option<(&prost_types::Any, pb::bep::BuildEvent)> {
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
pub(super) fn stream_members<'a>(
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

/// Appends a streamed event's payload as [`write_payload`] would, with the
/// members of its `BuildProgressEvent` before `buildEvent` taken from
/// `stream` when given (debug builds check the two agree).
pub(super) fn write_streamed_event(
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

pub(super) fn build_event_name(event: &pb::bes::build_event::Event) -> &'static str {
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
