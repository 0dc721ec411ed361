//! CloudEvents 1.0 output for the Kafka and AMQP sinks
//! (`cloudevents=binary|structured`), so consumers built on a CloudEvents
//! SDK read the bridge's events without knowing the envelope.
//!
//! Mapping: `id` = envelope id, `source` = the `ce_source` template
//! (default `/evbridge/{namespace}/{topic}`), `type` = the `ce_type`
//! template (default `{name}`), `time` = envelope timestamp, `subject` =
//! envelope key (when set), data = the envelope's payload as
//! `application/json`. The envelope's namespace, topic and attributes
//! travel as extension attributes, their names lower-cased with anything
//! but `a-z0-9` removed (`invocation_id` → `invocationid`); a name that
//! comes out empty or collides with a context attribute is left out.
//!
//! Binary mode puts the attributes in headers (Kafka `ce_<name>`, AMQP a
//! configurable prefix) and the payload alone in the body; structured mode
//! writes one `application/cloudevents+json` object.

use crate::template::Template;
use crate::{Envelope, OpenError, Options, push_json_str};

/// Content type of a structured-mode message.
pub(crate) const STRUCTURED: &str = "application/cloudevents+json; charset=UTF-8";

/// Content type of the data (the envelope's payload is always JSON).
pub(crate) const DATA_CONTENT_TYPE: &str = "application/json";

/// Context attributes an extension must not shadow.
const RESERVED: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
];

/// How events are laid out on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Attributes in headers, payload as the body.
    Binary,
    /// One JSON object holding attributes and data.
    Structured,
}

/// The CloudEvents output of one sink.
#[derive(Debug)]
pub(crate) struct CloudEvents {
    pub(crate) mode: Mode,
    source: Template,
    kind: Template,
}

impl CloudEvents {
    /// Takes `cloudevents=`, `ce_source=` and `ce_type=`; `None` when
    /// CloudEvents output was not asked for (and then `ce_*` is an error).
    pub(crate) fn from_options(opts: &mut Options) -> Result<Option<CloudEvents>, OpenError> {
        let mode = opts.choice("cloudevents", &["binary", "structured"])?;
        let source = opts.take("ce_source");
        let kind = opts.take("ce_type");
        let Some(mode) = mode else {
            if source.is_some() || kind.is_some() {
                return Err(opts.invalid(
                    "options `ce_source`/`ce_type` need `cloudevents=binary|structured`",
                ));
            }
            return Ok(None);
        };
        let template = |key: &str, text: Option<String>, default: &str| {
            let text = text.unwrap_or_else(|| default.into());
            if text.is_empty() {
                return Err(opts.invalid(format!("option `{key}` must not be empty")));
            }
            Template::parse(&text).map_err(|e| opts.invalid(format!("option `{key}`: {e}")))
        };
        Ok(Some(CloudEvents {
            mode: if mode == "binary" {
                Mode::Binary
            } else {
                Mode::Structured
            },
            source: template("ce_source", source, "/evbridge/{namespace}/{topic}")?,
            kind: template("ce_type", kind, "{name}")?,
        }))
    }

    /// Every attribute but `datacontenttype` (which bindings carry as the
    /// content type), as (name, value): the required ones, then `time`,
    /// `subject` and the extensions.
    pub(crate) fn attributes(&self, env: &Envelope) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(8 + env.attributes.len());
        out.push(("specversion".into(), "1.0".into()));
        out.push(("id".into(), env.id.to_string()));
        out.push(("source".into(), self.source.render(env, |_| true)));
        out.push(("type".into(), self.kind.render(env, |_| true)));
        if !env.timestamp.is_empty() {
            out.push(("time".into(), env.timestamp.to_string()));
        }
        if !env.key.is_empty() {
            out.push(("subject".into(), env.key.to_string()));
        }
        let fields = [("namespace", &env.namespace), ("topic", &env.topic)];
        let extensions = fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .chain(env.attributes.iter().map(|(k, v)| (extension_name(k), v)));
        for (name, value) in extensions {
            let taken = RESERVED.contains(&name.as_str()) || out.iter().any(|(n, _)| *n == name);
            if !name.is_empty() && !value.is_empty() && !taken {
                out.push((name, value.to_string()));
            }
        }
        out
    }

    /// The structured-mode body: attributes, `datacontenttype` and the
    /// payload as `data`, in one JSON object.
    pub(crate) fn structured(&self, env: &Envelope) -> Vec<u8> {
        let payload = env.payload.text();
        let mut out = String::with_capacity(256 + payload.len());
        out.push('{');
        for (name, value) in self.attributes(env) {
            push_json_str(&mut out, &name);
            out.push(':');
            push_json_str(&mut out, &value);
            out.push(',');
        }
        out.push_str("\"datacontenttype\":\"");
        out.push_str(DATA_CONTENT_TYPE);
        out.push_str("\",\"data\":");
        out.push_str(&payload);
        out.push('}');
        out.into_bytes()
    }
}

/// An envelope attribute's name as a CloudEvents extension name.
fn extension_name(key: &str) -> String {
    key.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Event;

    fn options(query: &str) -> Options {
        Options::new(&url::Url::parse(&format!("x://h/?{query}")).unwrap()).unwrap()
    }

    fn envelope() -> Envelope {
        let mut event = crate::test_envelope("0123abcd").event().clone();
        event.key = "inv-1".into();
        event
            .attributes
            .insert("invocation_id".into(), "inv-1".into());
        event.attributes.insert("ID".into(), "shadow".into());
        event.attributes.insert("__".into(), "empty name".into());
        Envelope::new(Event { ..event })
    }

    #[test]
    fn options_and_defaults() {
        assert!(
            CloudEvents::from_options(&mut options(""))
                .unwrap()
                .is_none()
        );
        let e = CloudEvents::from_options(&mut options("ce_type=x")).unwrap_err();
        assert!(e.to_string().contains("need `cloudevents"), "{e}");
        let e = CloudEvents::from_options(&mut options("cloudevents=yes")).unwrap_err();
        assert!(e.to_string().contains("binary, structured"), "{e}");
        let e = CloudEvents::from_options(&mut options("cloudevents=binary&ce_type={nope}"))
            .unwrap_err();
        assert!(e.to_string().contains("unknown placeholder"), "{e}");
        let ce = CloudEvents::from_options(&mut options(
            "cloudevents=structured&ce_type=com.example.{name}",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(ce.mode, Mode::Structured);
    }

    #[test]
    fn attributes_map_the_envelope() {
        let ce = CloudEvents::from_options(&mut options("cloudevents=binary"))
            .unwrap()
            .unwrap();
        let env = envelope();
        let attrs = ce.attributes(&env);
        let get = |n: &str| attrs.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("specversion"), Some("1.0"));
        assert_eq!(get("id"), Some(env.id.as_str()));
        assert_eq!(
            get("source").unwrap(),
            format!("/evbridge/{}/{}", env.namespace, env.topic)
        );
        assert_eq!(get("type"), Some(env.name.as_str()));
        assert_eq!(get("time"), Some(env.timestamp.as_str()));
        assert_eq!(get("subject"), Some("inv-1"));
        assert_eq!(get("invocationid"), Some("inv-1"));
        assert_eq!(get("namespace"), Some(env.namespace.as_str()));
        // `ID` would shadow `id`, `__` has no name left: both left out.
        assert_eq!(attrs.iter().filter(|(k, _)| k == "id").count(), 1);
        assert!(attrs.iter().all(|(k, _)| !k.is_empty()));

        let body: serde_json::Value = serde_json::from_slice(&ce.structured(&env)).unwrap();
        assert_eq!(body["specversion"], "1.0");
        assert_eq!(body["datacontenttype"], "application/json");
        assert_eq!(
            body["data"],
            serde_json::from_str::<serde_json::Value>(&env.payload.text()).unwrap()
        );
    }
}
