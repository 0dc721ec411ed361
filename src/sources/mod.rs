//! Where envelopes come from: an EngFlow cluster or a broker, behind one
//! contract.
//!
//! Every source hands envelopes to the [`Pipeline`] with a tracker
//! ([`Pipeline::tracker`]) and acknowledges upstream only once that tracker
//! says every sink confirmed them. What "acknowledge" means stays inside
//! each source: an EngFlow notification's token on its Pull stream (after
//! its whole invocation went through), a Kafka offset once every offset
//! before it is done, an AMQP delivery tag.
//!
//! # Layout
//! - `engflow/`: the EngFlow cluster (`grpc[s]://`): `connect` (channels,
//!   auth, `--check`), `pull` (Pull streams and acknowledgements),
//!   `notification` (one task per notification: lifecycle envelope,
//!   invocation events with resume, give-up), `store` (GetInvocation
//!   keeping each event's bytes).
//! - `broker`: the loop every broker source shares, the [`Inbound`]
//!   consumer trait, [`open_inbound`].
//! - `kafka` (feature `kafka`): a consumer group, offsets committed only
//!   when contiguous.
//! - `amqp` (feature `amqp`): a queue bound to an exchange, acks after
//!   delivery.
//! - `ingest`: a broker record (an evbridge envelope, an AccelByte event, a
//!   BonFIRE notification, anything else raw) → an envelope.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use async_trait::async_trait;

use crate::normalize::{Normalizer, Topics};
use crate::pipeline::Pipeline;
use crate::shutdown::Shutdown;

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod broker;
pub mod engflow;
pub mod ingest;
#[cfg(feature = "kafka")]
pub mod kafka;

pub use broker::{Ack, BrokerSource, Delivery, Inbound, open_inbound};
pub use engflow::{DEFAULT_MAX_MESSAGE_SIZE, EngFlowSource, SourceConfig};

/// Every accepted source URL form, for error messages and `--help`.
pub const ACCEPTED: &str = "grpc[s]://HOST[:PORT] (EngFlow; the queue is set with --queue), \
     kafka://HOST:PORT[,HOST:PORT...]/TOPIC?group=G[&prefix=P&offset=earliest|latest&name=EVENT], \
     amqp[s]://USER:PASS@HOST:PORT/VHOST?exchange=E&queue=Q|transient=true[&binding_key=K&prefetch=N]";

/// Why the source stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The configuration cannot work (bad URL, unreadable TLS material).
    #[error("{0}")]
    Config(String),
    /// The cluster refused us in a way retrying cannot fix.
    #[error("{0}")]
    Fatal(String),
}

/// Counters every source keeps (a broker message counts as a
/// notification).
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Notifications received (repeats included).
    pub received: AtomicU64,
    /// Acknowledgements sent.
    pub acks_sent: AtomicU64,
    /// Receipts with a non-OK status.
    pub receipts_failed: AtomicU64,
    /// Pull streams opened.
    pub streams: AtomicU64,
    /// Build events received from the event store.
    pub events: AtomicU64,
    /// Pull streams open now.
    pub open_streams: AtomicUsize,
    /// Notifications received and not yet acknowledged or given up.
    pub in_progress: AtomicUsize,
}

/// A running source: the bridge runs it, health checks and metrics read
/// it.
#[async_trait]
pub trait Source: Send + Sync {
    /// Reads, submits and acknowledges until `shutdown` (then drains for
    /// at most its grace period) or a fatal error.
    async fn run(self: Arc<Self>, shutdown: Shutdown) -> Result<(), SourceError>;
    /// Its counters.
    fn stats(&self) -> &SourceStats;
    /// Streams (Pull streams, broker subscriptions) receiving now.
    fn open_streams(&self) -> usize;
    /// Messages received and not yet acknowledged or given up.
    fn in_progress(&self) -> usize;
    /// Why it is not ready, when it has no open stream.
    fn down_reason(&self) -> String;
    /// What an operator should see in `/readyz` that does not make the
    /// bridge unready (notifications given up and kept only in the log).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A source URL checked and its connections made, not yet reading.
pub struct Opened {
    cfg: SourceConfig,
    kind: Kind,
}

enum Kind {
    Broker(Arc<dyn Inbound>),
    EngFlow(engflow::Channels),
}

/// The query options a broker source scheme takes, so the docs can be
/// checked against the parsers; `None` for a scheme that is not a broker
/// source of this build.
pub fn options(scheme: &str) -> Option<Vec<&'static str>> {
    match scheme {
        #[cfg(feature = "kafka")]
        "kafka" => Some(kafka::ACCEPTED.to_vec()),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => Some(
            [
                amqp::ACCEPTED,
                evbridge_sinks::amqp::connection::LAPIN_OPTIONS,
            ]
            .concat(),
        ),
        _ => None,
    }
}

/// Whether a source URL names a broker rather than an EngFlow cluster.
pub fn is_broker_url(url: &str) -> bool {
    ["kafka://", "amqp://", "amqps://"]
        .iter()
        .any(|s| url.starts_with(s))
}

/// Turns `cfg.endpoint` into a source: `grpc[s]://` is an EngFlow
/// cluster, `kafka://` and `amqp[s]://` a broker. Bad URLs are errors
/// that name the part and the accepted forms ([`ACCEPTED`]).
pub async fn open(cfg: SourceConfig) -> Result<Opened, SourceError> {
    let kind = if is_broker_url(&cfg.endpoint) {
        Kind::Broker(open_inbound(&cfg.endpoint).await?)
    } else {
        Kind::EngFlow(engflow::connect(&cfg)?)
    };
    Ok(Opened { cfg, kind })
}

impl Opened {
    /// The source, feeding `pipeline`; `check_every` paces its liveness
    /// checks. Metric handles are made here, so a recorder must be
    /// installed before.
    pub fn start(
        self,
        topics: Topics,
        pipeline: Arc<Pipeline>,
        check_every: Duration,
    ) -> Arc<dyn Source> {
        let cfg = self.cfg;
        match self.kind {
            Kind::Broker(inbound) => BrokerSource::new(
                inbound,
                pipeline,
                broker::name_filter(&cfg.endpoint),
                cfg.shutdown_grace,
                cfg.max_notifications,
                check_every,
            ),
            Kind::EngFlow(channels) => {
                EngFlowSource::new(cfg, channels, Normalizer::new(topics), pipeline)
            }
        }
    }
}

/// `--check`: the source answers and accepts us, without consuming.
pub async fn probe(cfg: &SourceConfig) -> Result<(), String> {
    if is_broker_url(&cfg.endpoint) {
        broker::probe(&cfg.endpoint).await
    } else {
        engflow::probe(cfg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(url: &str) -> Option<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            open(SourceConfig::new(url))
                .await
                .err()
                .map(|e| e.to_string())
        })
    }

    /// Every source URL form: accepted ones open (nothing connects yet),
    /// rejected ones say "source", name the bad part and never a secret.
    #[test]
    fn url_table() {
        let cases: &[(&str, Result<(), &[&str]>)] = &[
            ("grpc://127.0.0.1:1", Ok(())),
            ("grpcs://cluster.example.com", Ok(())),
            ("grpc://[::1]:8080", Ok(())),
            (
                "grpc://127.0.0.1:1/queue",
                Err(&["must not have a path", "--queue"]),
            ),
            ("grpc://h?x=1", Err(&["must not have a path or query"])),
            ("grpc://", Err(&["no host", "grpc://HOST[:PORT]"])),
            (
                "nonsense",
                Err(&["source `nonsense` is not a URL", "kafka://"]),
            ),
            (
                "ftp://u:hunter2@x/y",
                Err(&["source scheme `ftp`", "amqp[s]://"]),
            ),
            #[cfg(feature = "kafka")]
            ("kafka://127.0.0.1:9/t?group=g", Ok(())),
            #[cfg(feature = "kafka")]
            (
                "kafka://u:hunter2@127.0.0.1:9/t?colour=red",
                Err(&["source URL `kafka://", "unknown option `colour`"]),
            ),
            #[cfg(feature = "kafka")]
            ("kafka://nohost/t", Err(&["source URL", "needs a port"])),
            #[cfg(not(feature = "kafka"))]
            (
                "kafka://127.0.0.1:9/t",
                Err(&["source scheme `kafka://`", "feature `kafka`"]),
            ),
            #[cfg(feature = "amqp")]
            ("amqp://u:p@127.0.0.1:1/v?exchange=e&queue=q", Ok(())),
            #[cfg(feature = "amqp")]
            (
                "amqp://u:hunter2@127.0.0.1:1/v",
                Err(&["source URL `amqp://u:***@", "exchange"]),
            ),
            #[cfg(feature = "amqp")]
            (
                "amqps://u:p@h:1/v?exchange=e&queue=q&prefetch=0",
                Err(&["source URL", "prefetch"]),
            ),
        ];
        for (url, want) in cases {
            match (error_of(url), want) {
                (None, Ok(())) => {}
                (Some(e), Err(parts)) => {
                    for part in *parts {
                        assert!(e.contains(part), "{url}: `{e}` lacks `{part}`");
                    }
                    assert!(!e.contains("sink URL"), "{url}: `{e}` says sink");
                    assert!(!e.contains("hunter2"), "{url}: secret in `{e}`");
                }
                (None, Err(_)) => panic!("{url}: accepted, expected an error"),
                (Some(e), Ok(())) => panic!("{url}: rejected: {e}"),
            }
        }
    }

    /// Passwords typed without percent-encoding never appear in a source
    /// error, whatever else is wrong with the URL.
    #[test]
    fn no_error_shows_a_password_with_url_characters_in_it() {
        for c in ['/', '?', '#', '@', ':', '%', '&', '='] {
            let pass = format!("hun{c}ter2");
            for url in [
                format!("kafka://u:{pass}@b:9092/t?colour=red"),
                format!("kafka://u:{pass}@b:notaport/t"),
                format!("kafka://u:{pass}@/t"),
                format!("kafka://{pass}@b:9092/t?acks=7"),
                format!("amqp://u:{pass}@h:5672/v"),
                format!("amqp://u:{pass}@h:5672/v?exchange=e&colour=red"),
                format!("amqps://u:{pass}@h:99999/v?exchange=e"),
                format!("grpc://u:{pass}@h/x"),
                format!("grpcs://u:{pass}@h:notaport"),
                format!("fancy://u:{pass}@h/x"),
            ] {
                if let Some(e) = error_of(&url) {
                    assert!(!e.contains("hunter2") && !e.contains("ter2"), "{url}: {e}");
                }
            }
        }
    }
}
