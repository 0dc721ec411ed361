//! Per-envelope names from templates such as `{namespace}.{name}`: Kafka
//! topics, record keys and (later) routing keys.

use std::borrow::Cow;

use smol_str::SmolStr;

use crate::Envelope;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Topic,
    Namespace,
    Name,
    Key,
    Id,
    Attr(String),
}

/// A parsed template; rendering never fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// Placeholders a template may use, for error messages.
pub const PLACEHOLDERS: &str = "{topic}, {namespace}, {name}, {key}, {id}, {attr.NAME}";

impl Template {
    /// Parses `text`; an unknown or unclosed placeholder is an error that
    /// lists the accepted ones.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("template `{text}` has an unclosed `{{`"))?;
            let name = &after[..close];
            parts.push(match name {
                "topic" => Part::Topic,
                "namespace" => Part::Namespace,
                "name" => Part::Name,
                "key" => Part::Key,
                "id" => Part::Id,
                n if n.starts_with("attr.") && n.len() > 5 => Part::Attr(n[5..].to_string()),
                n => {
                    return Err(format!(
                        "template `{text}` uses unknown placeholder `{{{n}}}`; accepted: {PLACEHOLDERS}"
                    ));
                }
            });
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("template `{text}` has a `}}` without `{{`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// True when the template has no placeholders.
    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The text, when the template has no placeholders.
    pub fn constant(&self) -> Option<String> {
        self.is_constant().then(|| {
            self.parts
                .iter()
                .map(|p| match p {
                    Part::Text(t) => t.as_str(),
                    _ => "",
                })
                .collect()
        })
    }

    /// The template filled in from `env` (a missing attribute renders as
    /// `none`), with every character `keep` refuses replaced by `_`.
    pub fn render(&self, env: &Envelope, keep: impl Fn(char) -> bool) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                _ => out.extend(
                    value(part, env)
                        .chars()
                        .map(|c| if keep(c) { c } else { '_' }),
                ),
            }
        }
        out
    }

    /// As [`Template::render`], but borrowed when the template is one
    /// literal, or one placeholder whose value `keep` takes whole: a Kafka
    /// record's topic and key are rendered for every record.
    pub fn render_borrowed<'a>(
        &'a self,
        env: &'a Envelope,
        keep: impl Fn(char) -> bool,
    ) -> Cow<'a, str> {
        if let [part] = self.parts.as_slice() {
            let whole = value(part, env);
            if matches!(part, Part::Text(_)) || whole.chars().all(&keep) {
                return Cow::Borrowed(whole);
            }
        }
        Cow::Owned(self.render(env, keep))
    }

    /// The template with literal `text` before it.
    pub fn prefixed(mut self, text: &str) -> Self {
        match self.parts.first_mut() {
            Some(Part::Text(first)) => first.insert_str(0, text),
            _ => self.parts.insert(0, Part::Text(text.to_string())),
        }
        self
    }
}

/// What one part stands for in `env` (a literal is itself; a missing
/// attribute is `none`).
fn value<'a>(part: &'a Part, env: &'a Envelope) -> &'a str {
    match part {
        Part::Text(t) => t,
        Part::Topic => env.topic.as_str(),
        Part::Namespace => env.namespace.as_str(),
        Part::Name => env.name.as_str(),
        Part::Key => env.key.as_str(),
        Part::Id => env.id.as_str(),
        Part::Attr(a) => env.attributes.get(a).map_or("none", SmolStr::as_str),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_envelope;

    #[test]
    fn renders_and_sanitizes_values_only() {
        let mut env = test_envelope("abc");
        let mut event = env.event().clone();
        event.namespace = "team/a b".into();
        event
            .attributes
            .insert("command_name".into(), "test".into());
        env = Envelope::new(event);
        let t =
            Template::parse("ci.{namespace}.{name}-{attr.command_name}.{attr.missing}").unwrap();
        let kafka_ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
        assert_eq!(t.render(&env, kafka_ok), "ci.team_a_b.test-test.none");
        assert!(!t.is_constant());
        assert_eq!(
            Template::parse("plain").unwrap().constant().as_deref(),
            Some("plain")
        );
        assert_eq!(t.constant(), None);
    }

    #[test]
    fn borrowed_when_nothing_changes_and_prefixed() {
        let mut event = test_envelope("abc").event().clone();
        event.namespace = "team a".into();
        let env = Envelope::new(event);
        let kafka_ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
        let render = |t: &Template| {
            let cow = t.render_borrowed(&env, kafka_ok);
            assert_eq!(cow, t.render(&env, kafka_ok));
            (cow.to_string(), matches!(cow, Cow::Borrowed(_)))
        };
        let t = |text: &str| Template::parse(text).unwrap();
        assert_eq!(render(&t("fixed")), ("fixed".into(), true));
        assert_eq!(render(&t("{id}")), ("abc".into(), true));
        assert_eq!(render(&t("{namespace}")), ("team_a".into(), false));
        assert_eq!(render(&t("{attr.missing}")), ("none".into(), true));
        assert_eq!(render(&t("x.{id}")), ("x.abc".into(), false));
        assert_eq!(render(&t("{id}").prefixed("p.")), ("p.abc".into(), false));
        assert_eq!(render(&t("fixed").prefixed("p.")), ("p.fixed".into(), true));
        assert_eq!(render(&t("x{id}").prefixed("p.")), ("p.xabc".into(), false));
    }

    #[test]
    fn bad_templates_say_what_is_accepted() {
        for (t, want) in [
            ("{nope}", "unknown placeholder `{nope}`"),
            ("a{name", "unclosed"),
            ("a}b", "without"),
            ("{attr.}", "unknown placeholder"),
        ] {
            let e = Template::parse(t).unwrap_err();
            assert!(e.contains(want), "{t}: {e}");
        }
        assert!(Template::parse("{x}").unwrap_err().contains(PLACEHOLDERS));
    }
}
