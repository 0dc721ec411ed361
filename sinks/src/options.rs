//! Query-string options of sink URLs: every option a sink reads is taken
//! explicitly, and anything left over is an error that lists what is
//! accepted, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::str::FromStr;

use url::Url;

use crate::OpenError;

/// Names whose values are secrets wherever they appear in a URL query.
const SECRET_WORDS: [&str; 7] = [
    "password",
    "passwd",
    "secret",
    "token",
    "key.pem",
    "oauthbearer.config",
    "credential",
];

/// The URL with its password and secret-looking query values replaced by
/// `***`, for logs and errors. Works on text that is not a valid URL too,
/// and on passwords typed without percent-encoding (`/ ? # @ :` inside, as
/// a base64 password or a `${VAR}` substitution gives): the userinfo is
/// everything from `://` to the last `@` that a host follows, and a
/// userinfo without a `:` (a token as the user) is hidden whole.
pub fn redact(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://").map(|i| i + 3) else {
        return redact_query_of(raw);
    };
    let rest = &raw[scheme_end..];
    let at = userinfo_end(rest);
    let mut out = String::with_capacity(raw.len());
    out.push_str(&raw[..scheme_end]);
    let after = match at {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***@");
                }
                None => out.push_str("***@"),
            }
            &rest[at + 1..]
        }
        None => rest,
    };
    out.push_str(&redact_query_of(after));
    out
}

/// Where the userinfo of `rest` (a URL after `://`) ends: the last `@`
/// that a host list follows, or else (no host at all) the last `@`, so
/// that whatever could be a password counts as one.
pub fn userinfo_end(rest: &str) -> Option<usize> {
    let ats = || rest.rmatch_indices('@').map(|(i, _)| i);
    ats()
        .find(|&i| looks_like_host(&rest[i + 1..]))
        .or_else(|| ats().next())
}

/// Whether `text` starts with a host list (`h`, `h:1`, `b1:1,b2:2`,
/// `[::1]:5672`) ending where a URL's authority ends.
fn looks_like_host(text: &str) -> bool {
    let end = text.find(['/', '?', '#']).unwrap_or(text.len());
    let host = &text[..end];
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:,[]%".contains(c))
}

/// `text` with the values of secret-looking query options replaced.
fn redact_query_of(text: &str) -> String {
    let Some((base, query)) = text.split_once('?') else {
        return text.to_string();
    };
    let pairs = url::form_urlencoded::parse(query.as_bytes()).map(|(k, v)| {
        let lower = k.to_ascii_lowercase();
        let secret = SECRET_WORDS.iter().any(|w| lower.contains(w));
        (
            k.into_owned(),
            if secret { "***".into() } else { v.into_owned() },
        )
    });
    let encoded = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("{base}?{encoded}")
}

/// A size in bytes: a whole number with an optional unit (`KiB`, `MiB`,
/// `GiB` powers of 1024; `KB`, `MB`, `GB` powers of 1000; `B`).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let unit_size: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "`{text}` is not a size (e.g. 128MiB, 20MB, 1048576)"
            ));
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_size))
        .filter(|&n| n > 0)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("`{text}` is not a positive size (e.g. 128MiB, 20MB, 1048576)"))
}

/// The longest duration any option or flag may give, in seconds (a
/// year): far beyond any sensible wait, far below an overflow.
pub const MAX_SECONDS: f64 = 31_536_000.0;

/// [`MAX_SECONDS`] as a duration.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(31_536_000);

/// The options of one sink URL, consumed as the sink reads them.
#[derive(Debug)]
pub struct Options {
    url: String,
    values: BTreeMap<String, String>,
}

impl Options {
    /// Collects the query of `url`; a repeated key is an error.
    pub fn new(url: &Url) -> Result<Self, OpenError> {
        let shown = redact(url.as_str());
        let mut values = BTreeMap::new();
        for (k, v) in url.query_pairs() {
            if values.insert(k.to_string(), v.to_string()).is_some() {
                return Err(OpenError::Invalid {
                    url: shown,
                    reason: format!("option `{k}` is given twice"),
                });
            }
        }
        Ok(Options { url: shown, values })
    }

    /// The URL with secrets redacted, for messages.
    pub fn shown_url(&self) -> &str {
        &self.url
    }

    /// Takes a string option.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    /// Takes an option parsed with `FromStr`; a bad value names the option,
    /// the value and what is expected.
    pub fn parse<T: FromStr>(&mut self, key: &str, expected: &str) -> Result<Option<T>, OpenError> {
        match self.values.remove(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                let secret = SECRET_WORDS.iter().any(|w| key.contains(w));
                let shown = if secret { "***" } else { v.as_str() };
                self.invalid(format!("option `{key}={shown}` is not {expected}"))
            }),
        }
    }

    /// Takes a duration in seconds: above 0 and at most [`MAX_SECONDS`],
    /// so no later arithmetic on it can overflow.
    pub fn seconds(&mut self, key: &str) -> Result<Option<std::time::Duration>, OpenError> {
        match self.parse::<f64>(key, "a number of seconds")? {
            None => Ok(None),
            Some(s) if s > 0.0 && s <= MAX_SECONDS => {
                Ok(Some(std::time::Duration::from_secs_f64(s)))
            }
            Some(s) => Err(self.invalid(format!(
                "option `{key}={s}` must be a number of seconds above 0 and at most \
                 {MAX_SECONDS} (a year)"
            ))),
        }
    }

    /// Takes a size option (`16MiB`, `1000000`; see [`parse_size`]).
    pub fn size(&mut self, key: &str) -> Result<Option<usize>, OpenError> {
        match self.values.remove(key) {
            None => Ok(None),
            Some(v) => parse_size(&v)
                .map(Some)
                .map_err(|e| self.invalid(format!("option `{key}`: {e}"))),
        }
    }

    /// Takes a boolean option (`true`/`false`, `1`/`0`, `yes`/`no`).
    pub fn flag(&mut self, key: &str) -> Result<Option<bool>, OpenError> {
        match self.values.remove(key).as_deref() {
            None => Ok(None),
            Some("true" | "1" | "yes" | "on") => Ok(Some(true)),
            Some("false" | "0" | "no" | "off") => Ok(Some(false)),
            Some(v) => Err(self.invalid(format!("option `{key}={v}` is not true or false"))),
        }
    }

    /// Takes one of a fixed set of words.
    pub fn choice(&mut self, key: &str, accepted: &[&str]) -> Result<Option<String>, OpenError> {
        match self.values.remove(key) {
            None => Ok(None),
            Some(v) if accepted.contains(&v.as_str()) => Ok(Some(v)),
            Some(v) => Err(self.invalid(format!(
                "option `{key}={v}` is not one of: {}",
                accepted.join(", ")
            ))),
        }
    }

    /// Takes every option whose key starts with `prefix`, prefix removed.
    pub fn take_prefixed(&mut self, prefix: &str) -> Vec<(String, String)> {
        let keys: Vec<String> = self
            .values
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.into_iter()
            .map(|k| {
                let v = self.values.remove(&k).unwrap_or_default();
                (k[prefix.len()..].to_string(), v)
            })
            .collect()
    }

    /// An error about this URL.
    pub fn invalid(&self, reason: impl Into<String>) -> OpenError {
        OpenError::Invalid {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    /// Fails if any option was not taken, listing the accepted ones.
    pub fn finish(self, accepted: &[&str]) -> Result<(), OpenError> {
        match self.values.keys().next() {
            None => Ok(()),
            Some(k) => Err(OpenError::Invalid {
                reason: if accepted.is_empty() {
                    format!("unknown option `{k}`; this sink takes no options")
                } else {
                    format!("unknown option `{k}`; accepted: {}", accepted.join(", "))
                },
                url: self.url,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_and_secret_options() {
        let cases = [
            (
                "amqp://user:hunter2@host:5672/vh",
                "amqp://user:***@host:5672/vh",
            ),
            (
                "kafka://b:9092/t?rdkafka.sasl.password=hunter2&acks=all",
                "kafka://b:9092/t?rdkafka.sasl.password=***&acks=all",
            ),
            ("stdout://", "stdout://"),
            ("not a url user:hunter2@x", "not a url user:hunter2@x"),
            (
                "kafka://u:hunter2@b1:1,b2:2/t?rdkafka.ssl.key.password=hunter2",
                "kafka://u:***@b1:1,b2:2/t?rdkafka.ssl.key.password=***",
            ),
            ("bad://user:hunter2@[::1/x", "bad://user:***@[::1/x"),
            // Passwords typed without percent-encoding.
            (
                "amqp://u:hunt/er2@h:5672/vh?exchange=e",
                "amqp://u:***@h:5672/vh?exchange=e",
            ),
            ("amqp://u:hu?nter2@h/vh", "amqp://u:***@h/vh"),
            ("amqp://u:hu#nter2@h/vh", "amqp://u:***@h/vh"),
            ("amqp://u:hu@nt:er2@h/vh", "amqp://u:***@h/vh"),
            (
                "kafka://u:aHVudGVy/Mg+=@b1:9092,b2:9092/t",
                "kafka://u:***@b1:9092,b2:9092/t",
            ),
            (
                "amqps://u:p@ss/w?rd#x@[::1]:5671/v",
                "amqps://u:***@[::1]:5671/v",
            ),
            // A token as the user is hidden whole.
            ("kafka://hunter2@b:9092/t", "kafka://***@b:9092/t"),
            (
                "grpcs://hunter2@cluster.example.com",
                "grpcs://***@cluster.example.com",
            ),
        ];
        for (input, want) in cases {
            let got = redact(input);
            assert_eq!(got, want, "redact({input})");
        }
        assert!(!redact("amqp://u:hunter2@h/?x=1").contains("hunter2"));
        // Every character a password may hold, in every position.
        for c in ['/', '?', '#', '@', ':', '=', '+', '&', '%'] {
            for pass in [
                format!("{c}hunter2"),
                format!("hun{c}ter2"),
                format!("hunter2{c}"),
            ] {
                for url in [
                    format!("amqp://u:{pass}@host:5672/vh?exchange=e"),
                    format!("kafka://u:{pass}@b1:9092,b2:9092/topic?acks=all"),
                    format!("grpcs://u:{pass}@cluster:443"),
                ] {
                    let shown = redact(&url);
                    assert!(!shown.contains("hunter2"), "{url} -> {shown}");
                    assert!(shown.contains("u:***@"), "{url} -> {shown}");
                }
            }
        }
    }

    #[test]
    fn leftover_option_is_an_error_listing_accepted() {
        let url = Url::parse("stdout://?format=pretty&colour=red").unwrap();
        let mut o = Options::new(&url).unwrap();
        assert_eq!(o.take("format").as_deref(), Some("pretty"));
        let e = o.finish(&["format"]).unwrap_err().to_string();
        assert!(e.contains("unknown option `colour`"), "{e}");
        assert!(e.contains("accepted: format"), "{e}");
    }

    #[test]
    fn bad_values_name_the_option() {
        let url = Url::parse("x://?n=abc&b=maybe&c=zz&n2=1").unwrap();
        let mut o = Options::new(&url).unwrap();
        let e = o
            .parse::<u64>("n", "a whole number")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`n=abc` is not a whole number"), "{e}");
        let e = o.flag("b").unwrap_err().to_string();
        assert!(e.contains("`b=maybe`"), "{e}");
        let e = o.choice("c", &["json", "pretty"]).unwrap_err().to_string();
        assert!(e.contains("not one of: json, pretty"), "{e}");
        assert_eq!(o.parse::<u64>("n2", "n").unwrap(), Some(1));
        assert_eq!(o.parse::<u64>("absent", "n").unwrap(), None);
    }

    #[test]
    fn sizes_take_units() {
        for (text, want) in [
            ("1048576", Some(1 << 20)),
            ("16MiB", Some(16 << 20)),
            ("20MB", Some(20_000_000)),
            ("4 KiB", Some(4096)),
            ("1gib", Some(1 << 30)),
            ("0", None),
            ("", None),
            ("MiB", None),
            ("12 parsecs", None),
            ("99999999999999999999", None),
        ] {
            assert_eq!(parse_size(text).ok(), want, "{text}");
        }
        assert!(parse_size("x").unwrap_err().contains("128MiB"));
    }

    #[test]
    fn repeated_option_is_an_error() {
        let url = Url::parse("x://?a=1&a=2").unwrap();
        assert!(
            Options::new(&url)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }
}
