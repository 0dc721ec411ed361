//! A lifecycle notification → its envelope (and, for a finished
//! invocation, what to fetch), decoded without copying where it can.

use super::*;

impl Normalizer {
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
}

/// Appends a lifecycle notification's payload as [`write_payload`] would,
/// with its keywords (array and `parsedKeywords`) as rendered before.
pub(super) fn write_lifecycle(
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

/// A lifecycle payload decoded by prost, or why it is not one.
pub(super) fn decode_lifecycle(
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
