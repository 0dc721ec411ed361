//! A broker (Kafka topic, RabbitMQ queue) as the bridge's source: each
//! message a broker consumer ([`Inbound`]) yields becomes an envelope
//! ([`super::ingest`]) and is acknowledged to its broker only after every
//! sink confirmed it, as EngFlow notifications are.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use evbridge_sinks::{OpenError, SinkError, redact};
use tracing::{debug, info, warn};

use super::ingest::{self, Record};
use super::{ACCEPTED, Source, SourceError, SourceStats};
use crate::metric_names as names;
use crate::pipeline::Pipeline;
use crate::shutdown::Shutdown;

/// One message as a broker delivered it.
pub struct Delivery {
    /// The message body.
    pub body: Vec<u8>,
    /// Kafka record key (AMQP has none).
    pub key: Option<Vec<u8>>,
    /// Where it came from, stable across redeliveries; seeds the envelope
    /// id of messages that carry none.
    pub origin: String,
    /// The topic or routing key it arrived on.
    pub topic: String,
    /// The broker's timestamp, RFC 3339, if it has one.
    pub timestamp: Option<String>,
    /// Facts about the delivery (`kafka_topic`, `routing_key`, …).
    pub attributes: BTreeMap<String, String>,
    /// Acknowledges it; dropped unacknowledged, the broker delivers the
    /// message again (Kafka: after a restart or rebalance; AMQP: when the
    /// channel closes).
    pub ack: Box<dyn Ack>,
}

impl Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("origin", &self.origin)
            .field("topic", &self.topic)
            .field("bytes", &self.body.len())
            .finish()
    }
}

/// Acknowledges one delivery to its broker.
#[async_trait]
pub trait Ack: Send + Sync {
    /// Marks the message done: Kafka commits up to the lowest offset still
    /// in progress, AMQP acks the delivery tag.
    async fn ack(self: Box<Self>);

    /// Gives the message back undone (some sink rejected it for good):
    /// AMQP requeues it now; Kafka commits nothing past it, so it is read
    /// again after a restart or rebalance.
    async fn reject(self: Box<Self>) {}
}

/// A broker consumer.
#[async_trait]
pub trait Inbound: Send + Sync + Debug {
    /// The URL with secrets redacted.
    fn describe(&self) -> &str;

    /// The next message. Connection losses are retried inside (with
    /// backoff, re-subscribing or re-binding); an error is for good.
    async fn next(&self) -> Result<Delivery, SinkError>;

    /// Connected and receiving (an assignment, a consumer on the queue).
    fn up(&self) -> bool;

    /// Checks, without consuming, that the broker answers and what the
    /// URL names (topic, exchange) exists.
    async fn healthcheck(&self) -> Result<(), SinkError>;

    /// Checked periodically while running, for readiness: sources whose
    /// [`Inbound::up`] cannot see the broker going away (a Kafka consumer
    /// keeps its assignment through an outage) override it. Must answer
    /// within about 10 s, the broker away or not.
    async fn liveness(&self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Commits what was acknowledged and leaves cleanly.
    async fn close(&self);
}

/// Builds the broker consumer a source URL names.
pub async fn open_inbound(raw: &str) -> Result<Arc<dyn Inbound>, SourceError> {
    open_consumer(raw)
        .await
        .map_err(|e| SourceError::Config(e.render("source", ACCEPTED)))
}

async fn open_consumer(raw: &str) -> Result<Arc<dyn Inbound>, OpenError> {
    let scheme = raw.split_once("://").map_or("", |(s, _)| s);
    match scheme {
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(super::kafka::open(raw)?)),
        #[cfg(not(feature = "kafka"))]
        "kafka" => Err(OpenError::FeatureDisabled {
            scheme: "kafka".into(),
            feature: "kafka",
        }),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => {
            let url = url::Url::parse(raw).map_err(|e| OpenError::Invalid {
                url: redact(raw),
                reason: format!("not a URL ({e}); accepted: {ACCEPTED}"),
            })?;
            Ok(Arc::new(super::amqp::open(&url)?))
        }
        #[cfg(not(feature = "amqp"))]
        s @ ("amqp" | "amqps") => Err(OpenError::FeatureDisabled {
            scheme: s.to_string(),
            feature: "amqp",
        }),
        other => Err(OpenError::Invalid {
            url: redact(raw),
            reason: format!("`{other}` is not a broker source; accepted: {ACCEPTED}"),
        }),
    }
}

/// How long a message some sink rejected for good is held before it is
/// handed back to its broker.
const REJECT_PAUSE: Duration = Duration::from_secs(5);

/// Reads a broker and feeds the pipeline.
pub struct BrokerSource {
    inbound: Arc<dyn Inbound>,
    pipeline: Arc<Pipeline>,
    /// Only envelopes of this name go on; the rest are acknowledged.
    name: Option<String>,
    grace: Duration,
    /// Messages received and not yet acknowledged or given up: bounds
    /// what a crash makes the broker deliver again.
    in_progress: Arc<tokio::sync::Semaphore>,
    stats: SourceStats,
    meters: Meters,
    /// Why the last liveness check failed; `None` while it passes.
    dead: std::sync::Mutex<Option<String>>,
    check_every: Duration,
}

/// The source's metric handles (the EngFlow source's names: a message
/// counts as a notification).
struct Meters {
    received: metrics::Counter,
    acked: metrics::Counter,
    unacked: metrics::Counter,
    ack_seconds: metrics::Histogram,
}

impl BrokerSource {
    /// A source over `inbound`; `name` filters by envelope name, at most
    /// `max_in_progress` messages are handled at once, and the broker's
    /// liveness is checked every `check_every`.
    pub fn new(
        inbound: Arc<dyn Inbound>,
        pipeline: Arc<Pipeline>,
        name: Option<String>,
        grace: Duration,
        max_in_progress: usize,
        check_every: Duration,
    ) -> Arc<Self> {
        Arc::new(BrokerSource {
            inbound,
            pipeline,
            name,
            grace,
            in_progress: Arc::new(tokio::sync::Semaphore::new(max_in_progress.max(1))),
            stats: SourceStats::default(),
            meters: Meters {
                received: metrics::counter!(names::RECEIVED),
                acked: metrics::counter!(names::ACKED),
                unacked: metrics::counter!(names::UNACKED),
                ack_seconds: metrics::histogram!(names::ACK_SECONDS),
            },
            dead: std::sync::Mutex::new(None),
            check_every,
        })
    }

    /// Consumes until `shutdown`, then waits (at most the grace period)
    /// for what is in flight and commits it.
    async fn consume(self: &Arc<Self>, mut shutdown: Shutdown) -> Result<(), SourceError> {
        info!(source = %self.inbound.describe(), "consuming");
        tokio::spawn(self.clone().watch(shutdown.clone()));
        let result = loop {
            // Room first (a message in progress, an envelope in the
            // pipeline), so a full pipeline never keeps shutdown waiting.
            let room = async {
                let permit = self.in_progress.clone().acquire_owned().await;
                (permit.expect("never closed"), self.pipeline.reserve().await)
            };
            let (permit, slot) = tokio::select! {
                r = room => r,
                _ = shutdown.wait() => break Ok(()),
            };
            let delivery = tokio::select! {
                d = self.inbound.next() => d,
                _ = shutdown.wait() => break Ok(()),
            };
            let d = match delivery {
                Ok(d) => d,
                Err(e) => {
                    break Err(SourceError::Fatal(format!(
                        "{}: {e}",
                        self.inbound.describe()
                    )));
                }
            };
            let received_at = Instant::now();
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            self.meters.received.increment(1);
            let Delivery {
                body,
                key,
                origin,
                topic,
                timestamp,
                attributes,
                ack,
            } = d;
            let out = ingest::envelope(&Record {
                body: &body,
                key: key.as_deref(),
                origin: origin.clone(),
                topic: &topic,
                timestamp,
                attributes,
            });
            if let Some(problem) = &out.problem {
                warn!(id = %out.envelope.id, %origin, %problem, "record wrapped raw");
            }
            if self.name.as_ref().is_some_and(|n| *n != out.envelope.name) {
                // Not ours to deliver: done with it.
                ack.ack().await;
                self.stats.acks_sent.fetch_add(1, Ordering::Relaxed);
                self.meters.acked.increment(1);
                continue;
            }
            let tracker = self.pipeline.tracker();
            self.stats.in_progress.fetch_add(1, Ordering::Relaxed);
            self.pipeline.submit_in(slot, &tracker, out.envelope).await;
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tracker.finish().await {
                    Ok(()) => {
                        ack.ack().await;
                        me.stats.acks_sent.fetch_add(1, Ordering::Relaxed);
                        me.meters.acked.increment(1);
                        me.meters
                            .ack_seconds
                            .record(received_at.elapsed().as_secs_f64());
                    }
                    // Not acknowledged: handed back after a pause (so a
                    // message rejected for good does not spin), and the
                    // broker delivers it again.
                    Err(reasons) => {
                        me.meters.unacked.increment(1);
                        warn!(%origin, ?reasons, "not acknowledged; handed back in {REJECT_PAUSE:?}");
                        tokio::time::sleep(REJECT_PAUSE).await;
                        ack.reject().await;
                    }
                }
                me.stats.in_progress.fetch_sub(1, Ordering::Relaxed);
            });
        };
        let deadline = Instant::now() + self.grace;
        while self.in_progress() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.in_progress() > 0 {
            warn!(
                left = self.in_progress(),
                "shutdown: not all in-flight messages confirmed; they will be redelivered"
            );
        }
        self.inbound.close().await;
        debug!("broker source closed");
        result
    }
}

impl BrokerSource {
    /// Checks the broker's liveness every `check_every` until shutdown.
    async fn watch(self: Arc<Self>, mut shutdown: Shutdown) {
        loop {
            // Awaited to the end (every liveness check is bounded), so a
            // slow broker never has several checks running at once.
            let outcome = self.inbound.liveness().await.map_err(|e| e.to_string());
            {
                let mut dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
                match (&*dead, &outcome) {
                    (Some(_), Ok(())) => {
                        info!(source = %self.inbound.describe(), "source reachable again")
                    }
                    (None, Err(e)) => {
                        warn!(source = %self.inbound.describe(), error = %e, "source not reachable")
                    }
                    _ => {}
                }
                *dead = outcome.err();
            }
            tokio::select! {
                _ = tokio::time::sleep(self.check_every) => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

#[async_trait]
impl Source for BrokerSource {
    async fn run(self: Arc<Self>, shutdown: Shutdown) -> Result<(), SourceError> {
        self.consume(shutdown).await
    }
    fn stats(&self) -> &SourceStats {
        &self.stats
    }
    fn open_streams(&self) -> usize {
        let alive = self
            .dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none();
        usize::from(self.inbound.up() && alive)
    }
    fn in_progress(&self) -> usize {
        self.stats.in_progress.load(Ordering::Relaxed)
    }
    fn down_reason(&self) -> String {
        match &*self.dead.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => format!("{} is not reachable: {e}", self.inbound.describe()),
            None => format!("{} is not consuming", self.inbound.describe()),
        }
    }
}

/// The `name=` filter of a broker source URL.
pub fn name_filter(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.into_owned())
}

/// `--check` for a broker source: the broker answers and the topic or
/// exchange is there (nothing is consumed).
pub async fn probe(url: &str) -> Result<(), String> {
    let inbound = open_inbound(url).await.map_err(|e| e.to_string())?;
    let outcome = match tokio::time::timeout(Duration::from_secs(15), inbound.healthcheck()).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 15s".into()),
    };
    inbound.close().await;
    outcome
}
