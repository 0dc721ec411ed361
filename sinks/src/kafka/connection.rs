//! What a Kafka producer and a Kafka consumer share: the broker-list URL
//! split by hand, SASL credentials and `rdkafka.*` pass-through, and
//! librdkafka errors with secrets masked.

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;

use crate::Options;

/// librdkafka properties whose values are secrets.
pub const SECRET_PROPERTIES: &[&str] = &[
    "sasl.password",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.config",
];

/// Characters Kafka allows in a topic name.
pub fn topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// What [`split`] finds: user and password, brokers, topic, query.
pub type Parts = (Option<(String, String)>, Vec<String>, String, String);

/// Splits `kafka://[user:pass@]b1:9092,b2:9092/TOPIC?query` by hand: the
/// `url` crate refuses a comma-separated broker list as an authority.
pub fn split(raw: &str) -> Result<Parts, String> {
    let rest = raw
        .strip_prefix("kafka://")
        .ok_or("expected kafka://HOST:PORT[,HOST:PORT...]/TOPIC")?;
    // The userinfo ends at the last `@` a broker list follows, so a
    // password typed with `/ ? # @` in it is neither split nor shown.
    let (userinfo, rest) = match crate::userinfo_end(rest) {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (hosts, path) = main.split_once('/').unwrap_or((main, ""));
    let credentials = match userinfo {
        None => None,
        Some(u) => {
            let (user, pass) = u.split_once(':').unwrap_or((u, ""));
            // Percent-decoded as a userinfo is: a `+` stays a `+`.
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            Some((decode(user), decode(pass)))
        }
    };
    let mut brokers = Vec::new();
    for b in hosts.split(',') {
        let (host, port) = b
            .rsplit_once(':')
            .ok_or_else(|| format!("broker `{b}` needs a port (HOST:PORT)"))?;
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_[]:".contains(c));
        if !host_ok {
            return Err(format!("broker `{b}` has a bad host"));
        }
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("broker `{b}` has a bad port `{port}`"));
        }
        brokers.push(b.to_string());
    }
    let topic = url::form_urlencoded::parse(format!("x={path}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    Ok((credentials, brokers, topic, query.to_string()))
}

/// The settings a producer and a consumer share: SASL credentials from the
/// URL, then every `rdkafka.<property>` (last, so they win). Returns the
/// secret values, to be masked in librdkafka's errors.
pub fn connection(
    config: &mut ClientConfig,
    credentials: Option<&(String, String)>,
    opts: &mut Options,
) -> Vec<String> {
    if let Some((user, pass)) = credentials {
        config
            .set("security.protocol", "sasl_plaintext")
            .set("sasl.mechanism", "PLAIN")
            .set("sasl.username", user)
            .set("sasl.password", pass);
    }
    let mut secrets: Vec<String> = credentials.iter().map(|(_, p)| p.clone()).collect();
    for (k, v) in opts.take_prefixed("rdkafka.") {
        if SECRET_PROPERTIES.contains(&k.as_str()) {
            secrets.push(v.clone());
        }
        config.set(k, v);
    }
    secrets
}

/// Warns when SASL credentials would cross the network unencrypted
/// (`user:pass@` in the URL sets `sasl_plaintext` unless told otherwise).
pub fn warn_plaintext_credentials(config: &ClientConfig, shown: &str) {
    if config.get("security.protocol") == Some("sasl_plaintext") {
        tracing::warn!(
            url = %shown,
            "SASL credentials are sent without TLS (security.protocol=sasl_plaintext); set \
             rdkafka.security.protocol=sasl_ssl for a broker reached over a network"
        );
    }
}

/// librdkafka's error with every secret masked.
pub fn masked(e: &KafkaError, secrets: &[String]) -> String {
    let mut msg = e.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        msg = msg.replace(s.as_str(), "***");
    }
    msg
}
