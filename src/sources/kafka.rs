//! `kafka://HOST:PORT[,…]/TOPIC?group=G&prefix=P&offset=earliest|latest`
//! as a source: a consumer in group `P.G` (AccelByte's convention) reading
//! `P.TOPIC`, committing an offset only when every record before it was
//! acknowledged, so nothing is skipped however acknowledgements interleave.
//!
//! Offsets are stored (librdkafka's `offset_store`) as acknowledgements
//! make them contiguous, and committed by librdkafka's auto-commit, on a
//! rebalance and on close. A rebalance forgets the partitions it takes
//! away: records of theirs still in flight are not committed here and the
//! new owner reads them again (at least once).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, ClientContext};

use evbridge_sinks::kafka::connection::{
    connection, masked, split, topic_char, warn_plaintext_credentials,
};
use evbridge_sinks::{OpenError, Options, SinkError};

use super::broker::{Ack, Delivery, Inbound};

pub(crate) const ACCEPTED: &[&str] = &[
    "group",
    "prefix",
    "offset",
    "name",
    "rdkafka.<librdkafka property>",
];

/// Progress of one partition in this assignment.
#[derive(Debug, Default)]
struct Partition {
    /// Assignment generation the state belongs to.
    generation: u64,
    /// Offsets handed out and not yet acknowledged.
    open: BTreeSet<i64>,
    /// One past the highest offset handed out.
    next: i64,
}

/// Offsets per (topic, partition), shared with the rebalance callback.
#[derive(Debug, Default)]
struct Offsets {
    parts: Mutex<HashMap<(String, i32), Partition>>,
    generation: AtomicU64,
}

impl Offsets {
    /// Notes a record handed out; returns the generation to ack under.
    fn open(&self, topic: &str, partition: i32, offset: i64) -> u64 {
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.generation.load(Ordering::Acquire);
        let p = parts
            .entry((topic.to_string(), partition))
            .or_insert_with(|| Partition {
                generation,
                ..Partition::default()
            });
        p.open.insert(offset);
        p.next = p.next.max(offset + 1);
        p.generation
    }

    /// Marks a record done; when that moved the last offset safe to commit
    /// (everything up to it is done), hands it to `store` and returns it.
    /// `store` runs under the lock: acknowledgements finish on many tasks,
    /// and a store made after the lock was let go could land after a later
    /// one and set the partition's offset back for good (the likely cause
    /// of a CI run whose commit stayed ten records short of the end).
    fn done(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        generation: u64,
        store: impl FnOnce(i64),
    ) -> Option<i64> {
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        let p = parts.get_mut(&(topic.to_string(), partition))?;
        if p.generation != generation || !p.open.remove(&offset) {
            return None;
        }
        let safe = p.open.first().copied().unwrap_or(p.next);
        let last = (safe > offset || p.open.is_empty()).then_some(safe - 1)?;
        store(last);
        Some(last)
    }

    /// Partitions taken away by a rebalance: their records in flight no
    /// longer count (the new owner reads them again). Partitions kept (an
    /// incremental rebalance) keep their state.
    fn revoke(&self, revoked: &[(String, i32)]) {
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        for key in revoked {
            parts.remove(key);
        }
    }
}

struct Context {
    offsets: Arc<Offsets>,
    shown: String,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            tracing::info!(source = %self.shown, partitions = tpl.count(), "partitions revoked");
            let revoked: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            self.offsets.revoke(&revoked);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(source = %self.shown, partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(source = %self.shown, error = %e, "rebalance failed")
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

/// Consumes one topic in a consumer group.
pub struct KafkaIn {
    consumer: Arc<StreamConsumer<Context>>,
    /// Joined the group yet: only on the first [`Inbound::next`], so that
    /// `--check` looks at the topic without joining (and rebalancing) the
    /// group of running bridges.
    subscribed: AtomicBool,
    offsets: Arc<Offsets>,
    topic: String,
    secrets: Vec<String>,
    shown: String,
}

impl std::fmt::Debug for KafkaIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaIn").field("url", &self.shown).finish()
    }
}

/// Parses a `kafka://` source URL and creates the consumer (it joins the
/// group on the first [`Inbound::next`]).
pub fn open(raw: &str) -> Result<KafkaIn, OpenError> {
    let shown = evbridge_sinks::redact(raw);
    let invalid = |reason: String| OpenError::Invalid {
        url: shown.clone(),
        reason: format!(
            "{reason}; accepted form: kafka://HOST:PORT[,HOST:PORT...]/TOPIC?group=G[&{}]",
            ACCEPTED[1..].join("&")
        ),
    };
    let (credentials, brokers, topic, query) = split(raw).map_err(&invalid)?;
    if topic.is_empty() || !topic.chars().all(topic_char) {
        return Err(invalid(format!("`{topic}` is not a topic to read")));
    }
    let query_url =
        url::Url::parse(&format!("kafka://x/?{query}")).map_err(|e| invalid(e.to_string()))?;
    let mut opts = Options::new(&query_url)?;
    let group = opts.take("group").unwrap_or_else(|| "evbridge".into());
    let prefix = opts.take("prefix");
    for (what, v) in [("group", Some(&group)), ("prefix", prefix.as_ref())] {
        if let Some(v) = v
            && (v.is_empty() || !v.chars().all(topic_char))
        {
            return Err(invalid(format!("option `{what}={v}` is not a valid name")));
        }
    }
    let offset = opts
        .choice("offset", &["earliest", "latest"])?
        .unwrap_or_else(|| "earliest".into());
    // The name filter is the bridge's (it needs the envelope); accept it here.
    let _ = opts.take("name");
    let (topic, group) = match &prefix {
        Some(p) => (format!("{p}.{topic}"), format!("{p}.{group}")),
        None => (topic, group),
    };
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers.join(","))
        .set("client.id", "evbridge")
        .set("group.id", &group)
        .set("auto.offset.reset", &offset)
        // Offsets are stored only once a record is delivered everywhere;
        // librdkafka commits what is stored.
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        // Short, so a crash re-reads little that was already delivered.
        .set("auto.commit.interval.ms", "250");
    // The source stores offsets only once every sink confirmed; letting
    // librdkafka store them itself (or stop committing them) would lose
    // records or re-read everything.
    for key in ["enable.auto.offset.store", "enable.auto.commit"] {
        if opts.take(&format!("rdkafka.{key}")).is_some() {
            return Err(invalid(format!(
                "option `rdkafka.{key}` is not accepted: the source stores each offset only \
                 after every sink confirmed its record, and commits what it stored"
            )));
        }
    }
    let secrets = connection(&mut config, credentials.as_ref(), &mut opts);
    opts.finish(ACCEPTED)?;
    warn_plaintext_credentials(&config, &shown);
    let offsets = Arc::new(Offsets::default());
    let context = Context {
        offsets: offsets.clone(),
        shown: shown.clone(),
    };
    let consumer: StreamConsumer<Context> =
        config
            .create_with_context(context)
            .map_err(|e| OpenError::Invalid {
                url: shown.clone(),
                reason: format!(
                    "librdkafka refused the configuration: {}",
                    masked(&e, &secrets)
                ),
            })?;
    Ok(KafkaIn {
        consumer: Arc::new(consumer),
        subscribed: AtomicBool::new(false),
        offsets,
        topic,
        secrets,
        shown,
    })
}

struct KafkaAck {
    consumer: Arc<StreamConsumer<Context>>,
    offsets: Arc<Offsets>,
    topic: String,
    partition: i32,
    offset: i64,
    generation: u64,
}

#[async_trait]
impl Ack for KafkaAck {
    async fn ack(self: Box<Self>) {
        let (topic, partition) = (&self.topic, self.partition);
        self.offsets
            .done(topic, partition, self.offset, self.generation, |last| {
                // Fails when the partition was taken away meanwhile: its
                // new owner reads from the last commit, nothing is lost.
                if let Err(e) = self.consumer.store_offset(topic, partition, last) {
                    tracing::info!(%topic, partition, offset = last, error = %e, "offset not stored");
                }
            });
    }
}

#[async_trait]
impl Inbound for KafkaIn {
    fn describe(&self) -> &str {
        &self.shown
    }

    async fn next(&self) -> Result<Delivery, SinkError> {
        if !self.subscribed.swap(true, Ordering::AcqRel) {
            self.consumer.subscribe(&[&self.topic]).map_err(|e| {
                SinkError::Permanent(format!(
                    "cannot subscribe to `{}`: {}",
                    self.topic,
                    masked(&e, &self.secrets)
                ))
            })?;
        }
        let mut backoff = std::time::Duration::from_millis(200);
        loop {
            let msg = match self.consumer.recv().await {
                Ok(m) => m,
                Err(e) => {
                    // librdkafka reconnects by itself; report and go on.
                    tracing::warn!(source = %self.shown, error = %masked(&e, &self.secrets), retry_in = ?backoff, "Kafka consumer error");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                    continue;
                }
            };
            let (topic, partition, offset) =
                (msg.topic().to_string(), msg.partition(), msg.offset());
            let generation = self.offsets.open(&topic, partition, offset);
            let mut attributes = std::collections::BTreeMap::from([
                ("kafka_topic".to_string(), topic.clone()),
                ("kafka_partition".to_string(), partition.to_string()),
                ("kafka_offset".to_string(), offset.to_string()),
            ]);
            if let Some(headers) = msg.headers() {
                for h in headers.iter() {
                    if let Some(v) = h.value.and_then(|v| std::str::from_utf8(v).ok()) {
                        attributes
                            .entry(format!("kafka_header_{}", h.key))
                            .or_insert_with(|| v.to_string());
                    }
                }
            }
            let timestamp = msg.timestamp().to_millis().and_then(rfc3339_millis);
            return Ok(Delivery {
                body: msg.payload().unwrap_or_default().to_vec(),
                key: msg.key().map(<[u8]>::to_vec),
                origin: format!("kafka:{topic}/{partition}/{offset}"),
                topic: self.topic.clone(),
                timestamp,
                attributes,
                ack: Box::new(KafkaAck {
                    consumer: self.consumer.clone(),
                    offsets: self.offsets.clone(),
                    topic,
                    partition,
                    offset,
                    generation,
                }),
            });
        }
    }

    fn up(&self) -> bool {
        self.consumer
            .assignment()
            .is_ok_and(|partitions| partitions.count() > 0)
    }

    async fn liveness(&self) -> Result<(), SinkError> {
        self.healthcheck().await
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        let metadata = tokio::task::spawn_blocking(move || {
            consumer.fetch_metadata(Some(&topic), std::time::Duration::from_secs(10))
        })
        .await
        .map_err(|e| SinkError::Retryable(e.to_string()))?
        .map_err(|e| SinkError::Retryable(format!("metadata: {}", masked(&e, &self.secrets))))?;
        match metadata.topics().first() {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
            Some(t) => Err(SinkError::Retryable(format!(
                "topic `{}` is not readable: {:?}",
                self.topic,
                t.error()
            ))),
            None => Err(SinkError::Retryable(format!(
                "topic `{}` not found",
                self.topic
            ))),
        }
    }

    async fn close(&self) {
        let consumer = self.consumer.clone();
        let shown = self.shown.clone();
        // A synchronous commit blocks; keep it off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(source = %shown, error = %e, "final commit");
            }
            consumer.unsubscribe();
        })
        .await;
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC.
fn rfc3339_millis(ms: i64) -> Option<String> {
    let mut s = String::with_capacity(24);
    let nanos = u32::try_from(ms.rem_euclid(1000) * 1_000_000).ok()?;
    evbridge_sinks::push_rfc3339(&mut s, ms.div_euclid(1000), nanos).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_contiguous_acknowledgements() {
        let o = Offsets::default();
        let g = o.open("t", 0, 10);
        o.open("t", 0, 11);
        o.open("t", 0, 12);
        assert_eq!(o.done("t", 0, 11, g, drop), None, "10 is still open");
        assert_eq!(o.done("t", 0, 10, g, drop), Some(11), "10 and 11 done");
        assert_eq!(o.done("t", 0, 12, g, drop), Some(12));
        assert_eq!(o.done("t", 0, 12, g, drop), None, "acked twice");
        // A revoked partition's old acknowledgements count for nothing,
        // even once it is assigned again.
        o.open("t", 0, 13);
        o.revoke(&[("t".into(), 0)]);
        let g2 = o.open("t", 0, 14);
        assert_ne!(g, g2);
        assert_eq!(o.done("t", 0, 13, g, drop), None);
        assert_eq!(o.done("t", 0, 14, g2, drop), Some(14));
    }

    #[test]
    fn a_partition_kept_through_an_incremental_rebalance_keeps_its_gaps() {
        let o = Offsets::default();
        let g = o.open("t", 0, 10);
        o.open("t", 0, 11);
        let other = o.open("t", 1, 5);
        // Partition 1 moves away; partition 0 stays with its records in
        // flight.
        o.revoke(&[("t".into(), 1)]);
        assert_eq!(o.open("t", 0, 12), g);
        assert_eq!(
            o.done("t", 0, 12, g, drop),
            None,
            "10 and 11 are still open"
        );
        assert_eq!(o.done("t", 0, 10, g, drop), Some(10));
        assert_eq!(o.done("t", 0, 11, g, drop), Some(12));
        assert_eq!(o.done("t", 1, 5, other, drop), None, "revoked");
    }

    #[test]
    fn offsets_are_stored_in_order_however_acknowledgements_race() {
        // Eight threads acknowledge a partition's records in interleaved
        // order; every store must move forward and the last must cover
        // them all (a store made outside the lock can land late and set the
        // offset back). Ten rounds, as the race is one of timing.
        const N: i64 = 20_000;
        for round in 0..10 {
            let o = Offsets::default();
            let g = (0..N).map(|i| o.open("t", 0, i)).last().unwrap();
            let stored = Mutex::new(Vec::new());
            std::thread::scope(|s| {
                for t in 0..8 {
                    let (o, stored) = (&o, &stored);
                    s.spawn(move || {
                        for i in (t..N).step_by(8) {
                            o.done("t", 0, i, g, |last| {
                                // Widen the window a late store would need.
                                std::thread::yield_now();
                                stored.lock().unwrap().push(last);
                            });
                        }
                    });
                }
            });
            let stored = stored.into_inner().unwrap();
            let back = stored.windows(2).find(|w| w[0] >= w[1]);
            assert!(back.is_none(), "round {round}: a store went back: {back:?}");
            assert_eq!(stored.last(), Some(&(N - 1)), "round {round}");
        }
    }

    #[test]
    fn kafka_timestamps_are_rfc3339() {
        let t = |ms| rfc3339_millis(ms).unwrap();
        assert_eq!(t(1_795_564_800_000), "2026-11-25T00:00:00Z");
        assert_eq!(t(1_795_564_800_250), "2026-11-25T00:00:00.250Z");
        assert_eq!(t(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_millis(i64::MAX), None);
    }
}
