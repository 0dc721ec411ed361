//! Brokers as sources: the [`Inbound`] trait every broker consumer
//! implements and the [`Delivery`] it yields, acknowledged only once the
//! bridge has delivered it everywhere.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::{OpenError, SinkError, redact};

/// Every accepted source URL form besides EngFlow's `grpc[s]://`.
pub const ACCEPTED_SOURCES: &str = "kafka://HOST:PORT[,HOST:PORT...]/TOPIC?group=G[&prefix=P&offset=earliest|latest&name=EVENT], \
     amqp[s]://USER:PASS@HOST:PORT/VHOST?exchange=E[&binding_key=K&queue=Q&prefetch=N]";

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
pub async fn open_inbound(raw: &str) -> Result<Arc<dyn Inbound>, OpenError> {
    let scheme = raw.split_once("://").map_or("", |(s, _)| s);
    match scheme {
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(crate::kafka_in::open(raw)?)),
        #[cfg(not(feature = "kafka"))]
        "kafka" => Err(OpenError::FeatureDisabled {
            scheme: "kafka".into(),
            feature: "kafka",
        }),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => {
            let url = url::Url::parse(raw).map_err(|e| OpenError::Invalid {
                url: redact(raw),
                reason: format!("not a URL ({e}); accepted: {ACCEPTED_SOURCES}"),
            })?;
            Ok(Arc::new(crate::amqp_in::open(&url)?))
        }
        #[cfg(not(feature = "amqp"))]
        s @ ("amqp" | "amqps") => Err(OpenError::FeatureDisabled {
            scheme: s.to_string(),
            feature: "amqp",
        }),
        other => Err(OpenError::Invalid {
            url: redact(raw),
            reason: format!("`{other}` is not a broker source; accepted: {ACCEPTED_SOURCES}"),
        }),
    }
}
