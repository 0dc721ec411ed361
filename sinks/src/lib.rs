//! evbridge's sinks: the [`Envelope`] every event becomes, the [`Sink`]
//! trait every destination implements, and [`open`], which turns a sink URL
//! into a sink.
//!
//! # Layout
//! - `envelope`: the normalized event and its JSON, encoded once.
//! - `attributes`: the envelope's sorted name → value strings.
//! - `error`: [`SinkError`] (retryable or permanent), [`BatchError`],
//!   [`OpenError`] for bad URLs.
//! - `filter`: `names=`, which any sink takes to receive only some
//!   envelope names.
//! - `options`: query-string options, strict about unknown keys, and
//!   [`redact`] for showing URLs without secrets.
//! - `stdout`: `stdout://`, one JSON line per envelope (any `AsyncWrite`).
//! - `blackhole`: `blackhole://` / `none://`, counts and discards.
//! - `amqp/` (feature `amqp`): `amqp://`/`amqps://`, lapin with publisher
//!   confirms; `amqp::connection` is what the AMQP source shares with it.
//! - `grpc` (feature `grpc`): `grpc://`/`grpcs://`, EngFlow's Forwarding
//!   demo API.
//! - `kafka/` (feature `kafka`): `kafka://`, librdkafka with delivery
//!   reports; `kafka::connection` is what the Kafka source shares with it.
//! - `template`: `{namespace}.{name}`-style names for topics and keys.
//! - `cloudevents`: CloudEvents 1.0 (binary or structured) output for the
//!   Kafka and AMQP sinks.
//!
//! Each sink with a heavy dependency sits behind a cargo feature of its own.

#![warn(missing_docs, unreachable_pub)]

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

#[cfg(feature = "amqp")]
pub mod amqp;
mod attributes;
mod blackhole;
#[cfg(any(feature = "kafka", feature = "amqp"))]
mod cloudevents;
mod envelope;
mod error;
mod filter;
#[cfg(feature = "grpc")]
mod grpc;
#[cfg(feature = "kafka")]
pub mod kafka;
mod options;
mod stdout;
mod template;

pub use attributes::Attributes;
pub use blackhole::Blackhole;
pub use envelope::{Envelope, Event, Payload, push_json_str, push_rfc3339};
pub use error::{BatchError, OpenError, SinkError};
pub use filter::NameFilter;
#[cfg(feature = "grpc")]
pub use grpc::{EngFlowRequest, EngFlowResponse};
pub use options::{MAX_DURATION, MAX_SECONDS, Options, parse_size, redact, userinfo_end};
pub use smol_str::SmolStr;
pub use stdout::{Format, WriterSink};
pub use template::{PLACEHOLDERS, Template};

/// Every accepted sink URL form, for error messages and `--help`.
pub const ACCEPTED: &str = "stdout://[?format=json|pretty], blackhole://[?interval=SECONDS], \
     none://, kafka://HOST:PORT[,HOST:PORT...]/TOPIC[?prefix=P&key=K&acks=A&compression=C], \
     amqp[s]://USER:PASS@HOST:PORT/VHOST?exchange=E&routing_key=TEMPLATE, grpc[s]://HOST:PORT; \
     every sink also takes names=NAME,PREFIX*,... to take only those envelope names";

/// The query options a sink scheme takes (`names` included), so the docs
/// can be checked against the parsers; `None` for a scheme that is not a
/// sink of this build.
pub fn options(scheme: &str) -> Option<Vec<&'static str>> {
    let own: Vec<&'static str> = match scheme {
        "stdout" => stdout::OPTIONS.to_vec(),
        "blackhole" | "none" => blackhole::OPTIONS.to_vec(),
        #[cfg(feature = "kafka")]
        "kafka" => kafka::ACCEPTED.to_vec(),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => [amqp::ACCEPTED, amqp::connection::LAPIN_OPTIONS].concat(),
        #[cfg(feature = "grpc")]
        "grpc" | "grpcs" => grpc::ACCEPTED.to_vec(),
        _ => return None,
    };
    Some(own.into_iter().chain(["names"]).collect())
}

/// A destination for envelopes.
///
/// `send` resolves only once the destination has confirmed, which is what
/// lets the bridge acknowledge upstream without ever losing an event.
#[async_trait]
pub trait Sink: Send + Sync + Debug {
    /// The sink's URL with secrets redacted, for logs and metrics.
    fn describe(&self) -> &str;

    /// Delivers `batch` in order and resolves when the destination has
    /// confirmed all of it. On error, every envelope before
    /// [`BatchError::at`] was confirmed and none from it on.
    async fn send(&self, batch: &[Arc<Envelope>]) -> Result<(), BatchError>;

    /// Checks that the destination is reachable and usable.
    async fn healthcheck(&self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Waits until everything sent was written out; called on shutdown.
    async fn flush(&self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Whether this sink takes `envelope` (`names=`); one it does not take
    /// counts as delivered for this sink without being sent.
    fn accepts(&self, _envelope: &Envelope) -> bool {
        true
    }

    /// Whether [`Sink::accepts`] can say no, so callers ask only then.
    fn filters(&self) -> bool {
        false
    }
}

/// Builds the sink a URL names.
///
/// Errors name the bad part (scheme, host, option) and the accepted forms;
/// passwords and secret options never appear in them.
pub async fn open(raw: &str) -> Result<Arc<dyn Sink>, OpenError> {
    // Every sink takes `names=`: it is taken out here, the sink opened from
    // the rest and put behind the filter.
    let (rest, names) = filter::split(raw)?;
    let sink = open_unfiltered(&rest).await?;
    Ok(match names {
        Some((filter, shown)) => filter::wrap(sink, filter, &shown),
        None => sink,
    })
}

async fn open_unfiltered(raw: &str) -> Result<Arc<dyn Sink>, OpenError> {
    // A broker list (`b1:9092,b2:9092`) is not a URL authority, so Kafka
    // URLs are split by hand before the generic parser sees them.
    if raw.starts_with("kafka://") {
        #[cfg(feature = "kafka")]
        return Ok(Arc::new(kafka::open(raw)?));
        #[cfg(not(feature = "kafka"))]
        return Err(OpenError::FeatureDisabled {
            scheme: "kafka".into(),
            feature: "kafka",
        });
    }
    let url = url::Url::parse(raw).map_err(|e| OpenError::Malformed {
        url: redact(raw),
        reason: e.to_string(),
    })?;
    match url.scheme() {
        "stdout" => Ok(Arc::new(stdout::open(&url)?)),
        "blackhole" | "none" => Ok(Arc::new(blackhole::open(&url)?)),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => Ok(Arc::new(amqp::open(&url)?)),
        #[cfg(not(feature = "amqp"))]
        scheme @ ("amqp" | "amqps") => Err(OpenError::FeatureDisabled {
            scheme: scheme.to_string(),
            feature: "amqp",
        }),
        #[cfg(feature = "grpc")]
        "grpc" | "grpcs" => Ok(Arc::new(grpc::open(&url)?)),
        #[cfg(not(feature = "grpc"))]
        scheme @ ("grpc" | "grpcs") => Err(OpenError::FeatureDisabled {
            scheme: scheme.to_string(),
            feature: "grpc",
        }),
        scheme => Err(OpenError::UnknownScheme {
            url: redact(raw),
            scheme: scheme.to_string(),
        }),
    }
}

#[cfg(test)]
pub(crate) fn test_envelope(id: &str) -> Envelope {
    Envelope::new(Event {
        id: id.into(),
        name: "test".into(),
        namespace: "default".into(),
        timestamp: "2026-11-25T00:00:00Z".into(),
        version: Envelope::VERSION,
        topic: "lifecycle".into(),
        key: id.into(),
        attributes: Default::default(),
        payload: Payload::trusted(r#"{"n":1}"#.into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passwords typed without percent-encoding never appear in an error,
    /// whatever else is wrong with the URL (sources: `src/sources/mod.rs`).
    #[tokio::test]
    async fn no_error_shows_a_password_with_url_characters_in_it() {
        for c in ['/', '?', '#', '@', ':', '%', '&', '='] {
            let pass = format!("hun{c}ter2");
            let urls = [
                format!("kafka://u:{pass}@b:9092/t?colour=red"),
                format!("kafka://u:{pass}@b:notaport/t"),
                format!("kafka://u:{pass}@/t"),
                format!("kafka://{pass}@b:9092/t?acks=7"),
                format!("amqp://u:{pass}@h:5672/v"),
                format!("amqp://u:{pass}@h:5672/v?exchange=e&colour=red"),
                format!("amqps://u:{pass}@h:99999/v?exchange=e"),
                format!("grpc://u:{pass}@h"),
                format!("stdout://u:{pass}@h"),
                format!("fancy://u:{pass}@h/x"),
                format!("kafka://u:{pass}@b:9092/t?names=a b"),
                format!("kafka://u:{pass}@b:notaport/t?acks=all&names=a"),
                format!("amqp://u:{pass}@h:5672/v?exchange=e&names=a&colour=red"),
            ];
            for url in &urls {
                if let Err(e) = open(url).await {
                    let msg = e.to_string();
                    assert!(
                        !msg.contains("hunter2") && !msg.contains("ter2"),
                        "{url}: {msg}"
                    );
                }
            }
        }
    }

    /// Every accepted and rejected URL form, and what the error must say.
    #[tokio::test]
    async fn url_table() {
        let cases: &[(&str, Result<&str, &[&str]>)] = &[
            ("stdout://", Ok("stdout://")),
            ("stdout://?format=pretty", Ok("stdout://?format=pretty")),
            ("stdout://?format=json", Ok("stdout://?format=json")),
            ("blackhole://", Ok("blackhole://")),
            ("none://", Ok("none://")),
            ("blackhole://?interval=2", Ok("blackhole://?interval=2")),
            (
                "blackhole://?interval=2&names=bazel_test_*",
                Ok("blackhole://?interval=2&names=bazel_test_*"),
            ),
            ("stdout://?names=a,b", Ok("stdout://?names=a,b")),
            ("stdout://?names=a b", Err(&["names=a b", "`a b` is not"])),
            (
                "stdout://?names=x&colour=1",
                Err(&["unknown option `colour`"]),
            ),
            ("stdout://?format=xml", Err(&["format=xml", "json, pretty"])),
            (
                "stdout://?colour=1",
                Err(&["unknown option `colour`", "accepted: format"]),
            ),
            (
                "stdout://somehost",
                Err(&["takes no host or path", "stdout://[?format"]),
            ),
            ("blackhole://?interval=0", Err(&["interval=0", "above 0"])),
            (
                "blackhole://?interval=1e300",
                Err(&["interval=1e300", "a year"]),
            ),
            (
                "blackhole://?interval=NaN",
                Err(&["interval=NaN", "a year"]),
            ),
            (
                "blackhole://?rate=1e-20",
                Err(&["rate=0.00000000000000000001", "from 0.001"]),
            ),
            ("blackhole://?rate=0.5", Ok("blackhole://?rate=0.5")),
            #[cfg(feature = "amqp")]
            (
                "amqp://u:p@h/v?exchange=e&confirm_timeout=1e30",
                Err(&["confirm_timeout", "a year"]),
            ),
            #[cfg(feature = "grpc")]
            ("grpc://h:1?timeout=-1", Err(&["timeout=-1", "above 0"])),
            (
                "blackhole://?interval=x",
                Err(&["interval=x", "number of seconds"]),
            ),
            ("none://?x=1", Err(&["unknown option `x`"])),
            (
                "ftp://x",
                Err(&["unknown scheme `ftp`", "kafka://HOST:PORT"]),
            ),
            (
                "stdout",
                Err(&["malformed", "relative URL without a base", "stdout://"]),
            ),
            ("", Err(&["malformed", "accepted forms"])),
            #[cfg(feature = "kafka")]
            ("kafka://b:9092/t", Ok("kafka://b:9092/t")),
            #[cfg(feature = "kafka")]
            (
                "kafka://b:9092/flaky?names=bazel_test_summary",
                Ok("kafka://b:9092/flaky?names=bazel_test_summary"),
            ),
            #[cfg(not(feature = "kafka"))]
            ("kafka://b:9092/t", Err(&["feature `kafka`"])),
            #[cfg(feature = "amqp")]
            (
                "amqp://u:hunter2@h/v?exchange=e",
                Ok("amqp://u:***@h/v?exchange=e"),
            ),
            #[cfg(feature = "amqp")]
            (
                "amqp://u:hunter2@h/v",
                Err(&["option `exchange` is required", "amqp[s]://USER:PASS@HOST"]),
            ),
            #[cfg(not(feature = "amqp"))]
            ("amqp://u:hunter2@h/v", Err(&["feature `amqp`"])),
            #[cfg(feature = "grpc")]
            ("grpc://h:1", Ok("grpc://h:1")),
            #[cfg(feature = "grpc")]
            ("grpc://h", Err(&["no port", "grpc[s]://HOST:PORT"])),
            #[cfg(not(feature = "grpc"))]
            ("grpc://h:1", Err(&["feature `grpc`"])),
            (
                "fancy://u:hunter2@h/",
                Err(&["unknown scheme `fancy`", "u:***@h"]),
            ),
        ];
        for (url, want) in cases {
            let got = open(url).await;
            match (got, want) {
                (Ok(sink), Ok(shown)) => assert_eq!(sink.describe(), *shown, "{url}"),
                (Err(e), Err(parts)) => {
                    let msg = e.to_string();
                    for part in *parts {
                        assert!(msg.contains(part), "{url}: `{msg}` lacks `{part}`");
                    }
                    assert!(!msg.contains("hunter2"), "{url}: secret leaked in `{msg}`");
                }
                (Ok(_), Err(_)) => panic!("{url}: accepted, expected an error"),
                (Err(e), Ok(_)) => panic!("{url}: rejected: {e}"),
            }
        }
    }
}
