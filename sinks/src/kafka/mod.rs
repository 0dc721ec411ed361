//! `kafka://HOST:PORT[,HOST:PORT…]/TOPIC`: records on Kafka topics through
//! librdkafka, each envelope counted as delivered only on its delivery
//! report.
//!
//! The record value is the envelope JSON (a superset of AccelByte's event),
//! the key keeps each invocation's events in one partition by default, and
//! headers carry `id`, `name`, `namespace`, `topic` and `content-type`.
//! With `cloudevents=binary` the value is the payload and the headers are
//! `ce_*` (Kafka binding); with `cloudevents=structured` the value is one
//! `application/cloudevents+json` object.
//! Idempotence is on by default, so retries neither duplicate nor reorder
//! within a partition.

use std::borrow::Cow;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::util::Timeout;

pub mod connection;
mod deliveries;

use self::connection::{connection, masked, split, topic_char, warn_plaintext_credentials};
use self::deliveries::{KafkaProducer, create};
use crate::cloudevents::{self, CloudEvents, Mode};
use crate::template::Template;
use crate::{BatchError, Envelope, OpenError, Options, Sink, SinkError};

/// Options a `kafka://` URL takes.
pub(crate) const ACCEPTED: &[&str] = &[
    "prefix",
    "key",
    "acks",
    "compression",
    "idempotence",
    "cloudevents",
    "ce_source",
    "ce_type",
    "rdkafka.<librdkafka property>",
];
#[derive(Debug, Clone)]
enum Key {
    Field(Template),
    None,
}

/// Publishes envelopes to Kafka.
pub struct KafkaSink {
    config: ClientConfig,
    producer: RwLock<Arc<KafkaProducer>>,
    /// The topic template, with the prefix (if any) before it.
    topic: Template,
    key: Key,
    idempotent: bool,
    cloudevents: Option<CloudEvents>,
    shown: String,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("url", &self.shown)
            .finish()
    }
}

/// Parses a `kafka://` URL and creates the producer (no connection yet:
/// librdkafka connects in the background; see [`Sink::healthcheck`]).
pub fn open(raw: &str) -> Result<KafkaSink, OpenError> {
    let shown = crate::redact(raw);
    let invalid = |reason: String| OpenError::Invalid {
        url: shown.clone(),
        reason: format!(
            "{reason}; accepted form: kafka://HOST:PORT[,HOST:PORT...]/TOPIC[?{}]",
            ACCEPTED.join("&")
        ),
    };
    let (credentials, brokers, topic, query) = split(raw).map_err(invalid)?;
    let query_url =
        url::Url::parse(&format!("kafka://x/?{query}")).map_err(|e| invalid(e.to_string()))?;
    let mut opts = Options::new(&query_url)?;
    let fail = |reason: String| OpenError::Invalid {
        url: shown.clone(),
        reason,
    };

    let topic = Template::parse(if topic.is_empty() { "{topic}" } else { &topic }).map_err(fail)?;
    let prefix = opts.take("prefix");
    if let Some(p) = &prefix
        && (p.is_empty() || !p.chars().all(topic_char) || p.len() > 248)
    {
        return Err(fail(format!(
            "option `prefix={p}` is not a valid topic prefix"
        )));
    }
    // The prefix is part of the topic name Kafka checks.
    let topic = match &prefix {
        Some(p) => topic.prefixed(&format!("{p}.")),
        None => topic,
    };
    if let Some(t) = topic.constant()
        && (!t.chars().all(topic_char) || t.len() > 249)
    {
        return Err(fail(format!(
            "topic `{t}` is not a valid Kafka topic name (letters, digits, `.`, `_`, `-`; at most 249)"
        )));
    }
    let key = match opts.take("key").as_deref() {
        None => Key::Field(Template::parse("{key}").expect("valid")),
        Some("none") => Key::None,
        Some("id") => Key::Field(Template::parse("{id}").expect("valid")),
        Some("invocation") => Key::Field(Template::parse("{attr.invocation_id}").expect("valid")),
        Some("build") => Key::Field(Template::parse("{attr.build_id}").expect("valid")),
        Some(t) if t.contains('{') => Key::Field(Template::parse(t).map_err(fail)?),
        Some(t) => {
            return Err(fail(format!(
                "option `key={t}` is not one of: id, invocation, build, none, or a template such as {{namespace}}.{{key}}"
            )));
        }
    };
    let acks = opts
        .choice("acks", &["all", "-1", "1", "0"])?
        .unwrap_or_else(|| "all".into());
    // lz4 unless told otherwise: envelope JSON compresses well, and the
    // broker then handles a fraction of the bytes (BENCHMARKS.md, the
    // Kafka rows). librdkafka-based and Java clients decompress it
    // natively; KafkaJS and kafka-python need their optional lz4 codec.
    let compression = opts
        .choice("compression", &["none", "gzip", "snappy", "lz4", "zstd"])?
        .unwrap_or_else(|| "lz4".into());
    let idempotence = opts.flag("idempotence")?;
    let all_acks = matches!(acks.as_str(), "all" | "-1");
    if idempotence == Some(true) && !all_acks {
        return Err(fail("idempotence=true needs acks=all".into()));
    }

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers.join(","))
        .set("client.id", "evbridge")
        .set("acks", &acks)
        .set("compression.type", &compression)
        .set(
            "enable.idempotence",
            idempotence.unwrap_or(all_acks).to_string(),
        )
        // Fail a delivery (which the pipeline then retries) rather than
        // wait librdkafka's default five minutes with a broker down.
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "5");
    let cloudevents = CloudEvents::from_options(&mut opts)?;
    let secrets = connection(&mut config, credentials.as_ref(), &mut opts);
    opts.finish(ACCEPTED)?;
    warn_plaintext_credentials(&config, &shown);
    if config.get("acks") == Some("0") {
        tracing::warn!(
            sink = %shown,
            "acks=0: the broker confirms nothing, so an envelope counts as delivered once sent \
             and at-least-once does not hold for this sink"
        );
    }
    let producer = create(&config).map_err(|e| {
        let fail = |reason: String| OpenError::Invalid {
            url: shown.clone(),
            reason,
        };
        fail(format!(
            "librdkafka refused the configuration: {}",
            masked(&e, &secrets)
        ))
    })?;
    Ok(KafkaSink {
        idempotent: config.get("enable.idempotence") == Some("true"),
        config,
        producer: RwLock::new(Arc::new(producer)),
        topic,
        key,
        cloudevents,
        shown,
    })
}

fn code_of(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    match e {
        KafkaError::MessageProduction(c) => Some(*c),
        _ => e.rdkafka_error_code(),
    }
}

/// Errors after which this producer's idempotence state is spoiled (seen
/// with tansu after message timeouts: every later send is fenced), so only
/// a new producer with a new producer id can make progress.
fn spoils_producer(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code_of(e),
        Some(
            C::ProducerFenced
                | C::InvalidProducerEpoch
                | C::OutOfOrderSequenceNumber
                | C::UnknownProducerId
                | C::InvalidProducerIdMapping
                | C::Fatal
        )
    )
}

/// Whether retrying the same record can succeed.
fn classify(e: &KafkaError) -> SinkError {
    use RDKafkaErrorCode as C;
    match code_of(e) {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidRequiredAcks,
        ) => SinkError::Permanent(e.to_string()),
        _ => SinkError::Retryable(e.to_string()),
    }
}

impl KafkaSink {
    /// [`classify`], with an envelope too large for the producer or the
    /// broker named by id, size and limit (the dead-letter sink, if any,
    /// gets it with this reason).
    fn classify_for(&self, e: &KafkaError, env: &Envelope, size: usize) -> SinkError {
        if code_of(e) != Some(RDKafkaErrorCode::MessageSizeTooLarge) {
            return classify(e);
        }
        let limit = self.config.get("message.max.bytes").unwrap_or("1000000");
        SinkError::Permanent(format!(
            "envelope {} is {size} bytes, above what this Kafka sink may send \
             (message.max.bytes = {limit}; raise it with rdkafka.message.max.bytes=N, and the \
             topic's max.message.bytes on the broker): {e}",
            env.id
        ))
    }

    fn producer(&self) -> Arc<KafkaProducer> {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// After a librdkafka fatal error, or an error that spoils the
    /// idempotent producer's state, the producer is unusable: build a new
    /// one (the failed records are retried on it by the pipeline).
    fn recover(&self, used: &Arc<KafkaProducer>, spoiled: bool) {
        let fatal = used.client().fatal_error();
        if fatal.is_none() && !spoiled {
            return;
        }
        let mut slot = self.producer.write().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&slot, used) {
            return; // someone already replaced it
        }
        match &fatal {
            Some((code, reason)) => {
                tracing::error!(sink = %self.shown, ?code, %reason, "Kafka producer hit a fatal error; rebuilding it")
            }
            None => tracing::warn!(
                sink = %self.shown,
                "Kafka deliveries timed out or were fenced; rebuilding the producer"
            ),
        }
        match create(&self.config) {
            Ok(p) => *slot = Arc::new(p),
            Err(e) => {
                tracing::error!(sink = %self.shown, error = %e, "rebuilding the Kafka producer failed")
            }
        }
    }

    fn topic_for<'a>(&'a self, env: &'a Envelope) -> Cow<'a, str> {
        self.topic.render_borrowed(env, topic_char)
    }

    fn key_for<'a>(&'a self, env: &'a Envelope) -> Option<Cow<'a, str>> {
        match &self.key {
            Key::None => None,
            Key::Field(t) => Some(t.render_borrowed(env, |_| true)),
        }
    }
}

impl KafkaSink {
    /// The record's value and headers: the envelope and its fields, or a
    /// CloudEvent in the mode asked for.
    fn value_and_headers<'a>(&self, env: &'a Envelope) -> (Cow<'a, [u8]>, OwnedHeaders) {
        let Some(ce) = &self.cloudevents else {
            return (Cow::Borrowed(env.json().as_ref()), headers(env));
        };
        let header = |hs: OwnedHeaders, key: &str, value: &str| {
            hs.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        };
        match ce.mode {
            Mode::Structured => (
                Cow::Owned(ce.structured(env)),
                header(OwnedHeaders::new(), "content-type", cloudevents::STRUCTURED),
            ),
            Mode::Binary => {
                let attrs = ce.attributes(env);
                let mut hs = OwnedHeaders::new_with_capacity(attrs.len() + 1);
                for (name, value) in &attrs {
                    hs = header(hs, &format!("ce_{name}"), value);
                }
                hs = header(hs, "content-type", cloudevents::DATA_CONTENT_TYPE);
                (Cow::Borrowed(env.payload.as_bytes()), hs)
            }
        }
    }
}

fn headers(env: &Envelope) -> OwnedHeaders {
    fn h<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a [u8]> {
        Header {
            key,
            value: Some(value.as_bytes()),
        }
    }
    OwnedHeaders::new_with_capacity(5)
        .insert(h("id", &env.id))
        .insert(h("name", &env.name))
        .insert(h("namespace", &env.namespace))
        .insert(h("topic", &env.topic))
        .insert(h("content-type", "application/json"))
}

#[async_trait]
impl Sink for KafkaSink {
    fn describe(&self) -> &str {
        &self.shown
    }

    async fn send(&self, batch: &[Arc<Envelope>]) -> Result<(), BatchError> {
        let producer = self.producer();
        let reports = producer.context().start(batch.len());
        let mut enqueue_error = None;
        for (i, env) in batch.iter().enumerate() {
            let topic = self.topic_for(env);
            let key = self.key_for(env);
            let (value, headers) = self.value_and_headers(env);
            let mut record = BaseRecord::with_opaque_to(&topic, reports.seq(i))
                .payload(value.as_ref())
                .headers(headers);
            if let Some(k) = &key {
                record = record.key(k.as_bytes());
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    // librdkafka's queue is full: wait for deliveries.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => {
                        enqueue_error = Some((i, self.classify_for(&e, env, value.len())));
                        break;
                    }
                }
            }
            if enqueue_error.is_some() {
                break;
            }
        }
        // Wait for every report, so a retry does not race records still in
        // flight; the first failure decides where the batch stopped.
        let enqueued = enqueue_error.as_ref().map_or(batch.len(), |(i, _)| *i);
        let mut failures = reports.reports(enqueued).await;
        if failures.is_empty() && enqueue_error.is_none() {
            return Ok(());
        }
        failures.sort_unstable_by_key(|(i, _)| *i);
        let mut spoiled = false;
        for (_, e) in &failures {
            // An idempotent producer whose records timed out may keep
            // waiting on a producer id the restarted broker no longer
            // knows (seen with tansu): start afresh.
            let timed_out = code_of(e) == Some(RDKafkaErrorCode::MessageTimedOut);
            spoiled |= spoils_producer(e) || (timed_out && self.idempotent);
        }
        self.recover(&producer, spoiled);
        let Some((at, e)) = failures.first() else {
            let (at, error) = enqueue_error.expect("a failure");
            return Err(BatchError::new(at, error));
        };
        let failed: Vec<usize> = failures.iter().map(|(i, _)| *i).collect();
        let confirmed_after = (at + 1..enqueued)
            .filter(|i| failed.binary_search(i).is_err())
            .collect();
        let error = match batch.get(*at) {
            Some(env) => self.classify_for(e, env, env.json().len()),
            None => classify(e),
        };
        Err(BatchError::new(*at, error).with_confirmed(confirmed_after))
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Timeout::After(Duration::from_secs(5)))
                .map(|_| ())
                .map_err(|e| SinkError::Retryable(format!("Kafka metadata: {e}")))
        })
        .await
        .map_err(|e| SinkError::Retryable(e.to_string()))?
    }

    async fn flush(&self) -> Result<(), SinkError> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || producer.flush(Timeout::After(Duration::from_secs(30))))
            .await
            .map_err(|e| SinkError::Retryable(e.to_string()))?
            .map_err(|e| SinkError::Retryable(format!("Kafka flush: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_percent_decoded_as_a_userinfo_is() {
        // As the config file's `${VAR}` writes them, and as typed raw.
        let (creds, brokers, topic, _) =
            split("kafka://ci%40east:a%2Fb%3Fc%23d%40e%3Af%2Bg@b1:9092,b2:9092/t").unwrap();
        assert_eq!(creds, Some(("ci@east".into(), "a/b?c#d@e:f+g".into())));
        assert_eq!((brokers.len(), topic.as_str()), (2, "t"));
        let (creds, ..) = split("kafka://u:ab+c/d=@b:9092/t").unwrap();
        assert_eq!(creds, Some(("u".into(), "ab+c/d=".into())));
    }

    #[test]
    fn a_prefix_counts_toward_the_topic_limit() {
        let long = "t".repeat(247);
        assert!(open(&format!("kafka://b:1/{long}")).is_ok());
        assert!(open(&format!("kafka://b:1/{long}?prefix=a")).is_ok());
        let e = open(&format!("kafka://b:1/{long}?prefix=ab"))
            .expect_err("250 characters")
            .to_string();
        assert!(e.contains("at most 249") && e.contains("ab.ttt"), "{e}");
        assert!(open(&format!("kafka://b:1/{{topic}}?prefix={}", "p".repeat(249))).is_err());
    }

    #[test]
    fn lz4_unless_told_otherwise() {
        let codec = |url: &str| {
            let sink = open(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            sink.config.get("compression.type").map(str::to_owned)
        };
        assert_eq!(codec("kafka://b:1/t").as_deref(), Some("lz4"));
        assert_eq!(
            codec("kafka://b:1/t?compression=none").as_deref(),
            Some("none")
        );
        assert_eq!(
            codec("kafka://b:1/t?compression=zstd").as_deref(),
            Some("zstd")
        );
    }

    #[test]
    fn url_forms() {
        let ok = [
            (
                "kafka://127.0.0.1:9092/events",
                "kafka://127.0.0.1:9092/events",
            ),
            (
                "kafka://b1:9092,b2:9093/events",
                "kafka://b1:9092,b2:9093/events",
            ),
            ("kafka://b1:9092", "kafka://b1:9092"),
            (
                "kafka://b1:9092/{topic}?prefix=ci",
                "kafka://b1:9092/{topic}?prefix=ci",
            ),
            (
                "kafka://b:1/t?key=invocation&acks=1&compression=zstd",
                "kafka://b:1/t?key=invocation&acks=1&compression=zstd",
            ),
            (
                "kafka://b:1/t?rdkafka.linger.ms=20",
                "kafka://b:1/t?rdkafka.linger.ms=20",
            ),
            (
                "kafka://u:hunter2@b:1/t?rdkafka.sasl.mechanism=PLAIN",
                "kafka://u:***@b:1/t?rdkafka.sasl.mechanism=PLAIN",
            ),
        ];
        for (url, shown) in ok {
            let sink = open(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(sink.describe(), shown, "{url}");
        }
        let bad: &[(&str, &[&str])] = &[
            ("kafka://b1/t", &["needs a port", "kafka://HOST:PORT"]),
            ("kafka://b1:x/t", &["bad port `x`"]),
            ("kafka://b1:9092,/t", &["broker `` needs a port"]),
            ("kafka://b:1/bad topic", &["not a valid Kafka topic"]),
            ("kafka://b:1/{nope}", &["unknown placeholder"]),
            ("kafka://b:1/t?key=wat", &["key=wat", "invocation"]),
            ("kafka://b:1/t?acks=2", &["acks=2", "all, -1, 1, 0"]),
            ("kafka://b:1/t?compression=brotli", &["compression=brotli"]),
            ("kafka://b:1/t?acks=1&idempotence=true", &["needs acks=all"]),
            (
                "kafka://b:1/t?colour=red",
                &["unknown option `colour`", "prefix"],
            ),
            ("kafka://b:1/t?prefix=a/b", &["prefix=a/b"]),
            (
                "kafka://b:1/t?rdkafka.no.such.thing=1",
                &["librdkafka refused", "no.such.thing"],
            ),
            (
                "kafka://u:hunter2@b:1/t?rdkafka.sasl.mechanism=BOGUS",
                &["librdkafka refused"],
            ),
        ];
        for (url, parts) in bad {
            let e = open(url).expect_err(url).to_string();
            for p in *parts {
                assert!(e.contains(p), "{url}: `{e}` lacks `{p}`");
            }
            assert!(!e.contains("hunter2"), "{url}: {e}");
        }
    }

    #[test]
    fn topics_keys_and_prefix() {
        let sink = open("kafka://b:1/{namespace}.{topic}?prefix=acc&key=build").unwrap();
        let env = crate::test_envelope("id1");
        assert_eq!(sink.topic_for(&env), "acc.default.lifecycle");
        assert_eq!(sink.key_for(&env).as_deref(), Some("none"));
        let sink = open("kafka://b:1/fixed?key=none").unwrap();
        assert_eq!(sink.topic_for(&env), "fixed");
        assert_eq!(sink.key_for(&env), None);
        let sink = open("kafka://b:1").unwrap();
        assert_eq!(sink.topic_for(&env), "lifecycle");
        assert_eq!(sink.key_for(&env).as_deref(), Some("id1"));
    }
}
