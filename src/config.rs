//! The configuration file (`--config FILE`, TOML) for deployments.
//!
//! A file is read as the flags it stands for: each key is a long flag
//! (`max_in_flight = 5000` is `--max-in-flight=5000`, `sink = [..]` is one
//! `--sink` per entry, `check = true` is `--check`), and the result goes
//! through the same parser as the command line. So the file accepts
//! exactly what the flags accept, with the same checks and messages.
//! Flags given on the command line, and values from the environment
//! (`EVBRIDGE_TOKEN`), win over the file. `${NAME}` inside a string is
//! replaced by the environment variable `NAME`, so secrets (a broker
//! password inside a sink URL, say) can stay out of the file.

use clap::ArgAction;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use toml::Value;

/// Keys a file may not set.
const NOT_IN_FILE: &[&str] = &["config", "help", "version"];

/// The flags `text` stands for (by key; a list keeps its order). `given(id)` says whether
/// the command line or the environment already set that argument (then
/// the file's value is skipped); `env(name)` looks up `${name}`.
pub fn flags_from_toml(
    text: &str,
    cmd: &clap::Command,
    given: &dyn Fn(&str) -> bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<String>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        // The message and where, never the offending line: it may hold a
        // secret.
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        match line {
            Some(n) => format!("line {n}: {}", e.message()),
            None => e.message().to_string(),
        }
    })?;
    let mut flags = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .filter(|a| !NOT_IN_FILE.contains(&a.get_id().as_str()))
            .find(|a| {
                a.get_long() == Some(long.as_str())
                    || a.get_all_aliases()
                        .is_some_and(|al| al.iter().any(|x| *x == key || *x == long))
            })
            .ok_or_else(|| {
                format!(
                    "unknown key `{key}`; accepted keys: {}",
                    accepted(cmd).join(", ")
                )
            })?;
        if given(arg.get_id().as_str()) {
            continue;
        }
        let long = arg.get_long().expect("found by its long name");
        match arg.get_action() {
            ArgAction::SetTrue => match value {
                Value::Boolean(true) => flags.push(format!("--{long}")),
                Value::Boolean(false) => {}
                _ => return Err(format!("key `{key}` must be true or false")),
            },
            ArgAction::Append => {
                let items = match value {
                    Value::Array(items) => items.iter().collect(),
                    one => vec![one],
                };
                for item in items {
                    flags.push(format!("--{long}={}", scalar(key, item, env)?));
                }
            }
            _ => flags.push(format!("--{long}={}", scalar(key, value, env)?)),
        }
    }
    Ok(flags)
}

/// Every key a file may hold, as written in TOML.
fn accepted(cmd: &clap::Command) -> Vec<String> {
    cmd.get_arguments()
        .filter(|a| !NOT_IN_FILE.contains(&a.get_id().as_str()))
        .filter_map(|a| a.get_long().map(|l| l.replace('-', "_")))
        .collect()
}

fn scalar(
    key: &str,
    value: &Value,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    match value {
        Value::String(s) => expand(key, s, env),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Boolean(b) => Ok(b.to_string()),
        Value::Array(_) => Err(format!("key `{key}` takes one value, not a list")),
        _ => Err(format!(
            "key `{key}` must be a string, a number or a boolean"
        )),
    }
}

/// Replaces `${NAME}` with the environment variable (`$$` is a `$`). The
/// error names the variable, never a value.
///
/// Inside a URL, a value that lands in the userinfo or the query is
/// percent-encoded, so a password with `/ ? # @ : + &` in it (a base64
/// one, say) stays one password instead of changing where the host, path
/// or query begin; the sinks decode it back. Elsewhere (a host, a topic)
/// it is inserted as it is.
fn expand(key: &str, s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let segments = segments(key, s)?;
    // The URL's shape, judged with each substitution as one plain letter:
    // only what the file itself spells can delimit the parts.
    let skeleton: String = segments
        .iter()
        .map(|seg| match seg {
            Segment::Text(t) => t,
            Segment::Var(_) => "v",
        })
        .collect();
    let part_at = url_parts(&skeleton);
    let mut out = String::with_capacity(s.len());
    let mut at = 0;
    for seg in segments {
        match seg {
            Segment::Text(t) => {
                out.push_str(t);
                at += t.len();
            }
            Segment::Var(name) => {
                let v = env(name).ok_or_else(|| {
                    format!("key `{key}`: environment variable `{name}` is not set")
                })?;
                match part_at(at) {
                    UrlPart::Other => out.push_str(&v),
                    UrlPart::Encoded => out.extend(utf8_percent_encode(&v, COMPONENT)),
                }
                at += 1;
            }
        }
    }
    Ok(out)
}

/// What a URL may hold unencoded in a userinfo or query value: RFC 3986's
/// unreserved characters.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

enum Segment<'a> {
    Text(&'a str),
    Var(&'a str),
}

/// `s` cut into text and `${NAME}`s (`$$` is the text `$`).
fn segments<'a>(key: &str, s: &'a str) -> Result<Vec<Segment<'a>>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push(Segment::Text(&rest[..i]));
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push(Segment::Text("$"));
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("key `{key}`: `${{` without a closing `}}`"))?;
            out.push(Segment::Var(&body[..end]));
            rest = &body[end + 1..];
        } else {
            out.push(Segment::Text("$"));
            rest = after;
        }
    }
    out.push(Segment::Text(rest));
    Ok(out)
}

#[derive(Debug, PartialEq)]
enum UrlPart {
    /// The userinfo or the query: percent-encoded.
    Encoded,
    /// Not a URL, or its scheme, host or path.
    Other,
}

/// Which part of the URL `skeleton` each byte offset falls in.
fn url_parts(skeleton: &str) -> impl Fn(usize) -> UrlPart {
    let scheme_end = skeleton.find("://").filter(|&i| {
        i > 0
            && skeleton[..i]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    let (userinfo, query) = match scheme_end {
        None => (0..0, usize::MAX),
        Some(i) => {
            let start = i + 3;
            let rest = &skeleton[start..];
            let userinfo = match evbridge_sinks::userinfo_end(rest) {
                Some(at) => start..start + at,
                None => start..start,
            };
            let query = skeleton[userinfo.end..]
                .find('?')
                .map_or(usize::MAX, |q| userinfo.end + q);
            (userinfo, query)
        }
    };
    move |at| {
        if userinfo.contains(&at) || at > query {
            UrlPart::Encoded
        } else {
            UrlPart::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn flags(text: &str) -> Result<Vec<String>, String> {
        let cmd = crate::cli::Cli::command();
        let env = |k: &str| (k == "MQ_PASSWORD").then(|| "s3cret".to_string());
        flags_from_toml(text, &cmd, &|id| id == "queue", &env)
    }

    #[test]
    fn keys_become_flags() {
        let got = flags(
            r#"
source = "grpcs://cluster.example.com"
sink = ["stdout://", "amqp://bridge:${MQ_PASSWORD}@mq/ci?exchange=builds"]
max_in_flight = 5000
shutdown-timeout = 2.5
check = true
queue_name = "skipped: given on the command line"
"#,
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "--check",
                "--max-in-flight=5000",
                "--shutdown-timeout=2.5",
                "--sink=stdout://",
                "--sink=amqp://bridge:s3cret@mq/ci?exchange=builds",
                "--source=grpcs://cluster.example.com",
            ]
        );
    }

    #[test]
    fn the_example_configuration_parses_as_flags() {
        let text = include_str!("../deploy/evbridge.toml");
        let cmd = crate::cli::Cli::command();
        let env = |k: &str| Some(format!("v-{k}"));
        let flags = flags_from_toml(text, &cmd, &|_| false, &env).unwrap();
        assert!(flags.contains(&"--token-file=v-CREDENTIALS_DIRECTORY/token".to_string()));
        assert!(
            flags
                .iter()
                .any(|f| f.contains("evbridge:v-RABBITMQ_PASSWORD@rabbitmq"))
        );
        let mut argv = vec!["evbridge".to_string()];
        argv.extend(flags);
        cmd.try_get_matches_from(argv)
            .expect("every key is a valid flag");
    }

    #[test]
    fn bad_files_say_what_and_where_without_values() {
        let cases: &[(&str, &str)] = &[
            ("colour = 1", "unknown key `colour`; accepted keys: source"),
            ("config = 'x'", "unknown key `config`"),
            ("source = ['a', 'b']", "takes one value"),
            ("check = 'yes'", "must be true or false"),
            ("sink = 'amqp://u:${NOPE}@h'", "`NOPE` is not set"),
            ("sink = 'amqp://u:${NOPE@h'", "without a closing"),
            ("source = \"grpc://x\"\ntoken = hunter2", "line 2"),
            ("[source]\nx = 1", "must be a string"),
        ];
        for (text, want) in cases {
            let e = flags(text).expect_err(text);
            assert!(e.contains(want), "{text}: `{e}` lacks `{want}`");
            assert!(!e.contains("hunter2"), "{e}");
        }
        assert_eq!(flags("sink = 'a$$b$c'").unwrap(), ["--sink=a$b$c"]);
    }

    #[test]
    fn substitutions_in_a_urls_userinfo_and_query_are_percent_encoded() {
        let pass = "a/b?c#d@e:f+g&h=i j%k";
        let env = |k: &str| match k {
            "P" => Some(pass.to_string()),
            "U" => Some("ci@east".to_string()),
            "HOST" => Some("mq.example.com:5671".to_string()),
            "TOPIC" => Some("builds.v1".to_string()),
            _ => None,
        };
        let expand = |s: &str| expand("sink", s, &env).unwrap();
        let encoded = "a%2Fb%3Fc%23d%40e%3Af%2Bg%26h%3Di%20j%25k";
        let cases = [
            (
                "amqp://${U}:${P}@${HOST}/%2f",
                format!("amqp://ci%40east:{encoded}@mq.example.com:5671/%2f"),
            ),
            (
                "kafka://u:${P}@b1:9092,b2:9092/${TOPIC}",
                format!("kafka://u:{encoded}@b1:9092,b2:9092/builds.v1"),
            ),
            (
                "kafka://${P}@b:9092/t",
                format!("kafka://{encoded}@b:9092/t"),
            ),
            (
                "kafka://b:9092/t?rdkafka.sasl.password=${P}&acks=all",
                format!("kafka://b:9092/t?rdkafka.sasl.password={encoded}&acks=all"),
            ),
            ("grpcs://${HOST}", "grpcs://mq.example.com:5671".to_string()),
            // Not a URL: as it is.
            ("${P}", pass.to_string()),
            (
                "/etc/${TOPIC}/key.pem",
                "/etc/builds.v1/key.pem".to_string(),
            ),
        ];
        for (template, want) in cases {
            assert_eq!(expand(template), want, "{template}");
        }
        // The sinks read the password back as it was.
        let url = url::Url::parse(&expand("amqp://u:${P}@h/%2f")).unwrap();
        assert_eq!(url.host_str(), Some("h"));
        let decoded = percent_encoding::percent_decode_str(url.password().unwrap());
        assert_eq!(decoded.decode_utf8().unwrap(), pass);
    }
}
