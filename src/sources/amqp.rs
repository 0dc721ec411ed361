//! `amqp[s]://USER:PASS@HOST:PORT/VHOST?exchange=E&binding_key=K&queue=Q`
//! as a source: a queue bound to an exchange, as BonFIRE's subscribers
//! do, each delivery acknowledged only once every sink confirmed it.
//!
//! Without `queue=` the broker names the queue (exclusive, deleted when
//! the bridge disconnects): restricted users may only create those, but
//! what is published while the bridge is away is not kept for it. A named
//! queue is durable and survives both. `prefetch=` bounds the deliveries
//! in flight. A lost connection or channel is rebuilt with backoff, the
//! queue re-declared and re-bound; whatever was not acknowledged on the
//! old channel the broker delivers again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_core::Stream;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, Consumer, ExchangeKind};
use tokio::sync::Mutex;
use url::Url;

use evbridge_sinks::amqp::connection::{
    Declare, Endpoint, LAPIN_OPTIONS, declare_exchange, endpoint, exchange_error, exchange_options,
    refused,
};
use evbridge_sinks::{OpenError, Options, SinkError};

use super::broker::{Ack, Delivery, Inbound};

pub(crate) const ACCEPTED: &[&str] = &[
    "exchange",
    "binding_key",
    "queue",
    "transient",
    "prefetch",
    "exchange_type",
    "declare",
    "name",
    "ca",
];

/// The longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A connection with a consumer on the bound queue.
struct Live {
    conn: Connection,
    consumer: Consumer,
}

/// Consumes one queue bound to an exchange.
pub struct AmqpIn {
    endpoint: Endpoint,
    exchange: String,
    kind: ExchangeKind,
    declare: Declare,
    binding_keys: Vec<String>,
    /// `None`: a server-named, exclusive queue per connection.
    queue: Option<String>,
    prefetch: u16,
    live: Mutex<Option<Live>>,
    up: AtomicBool,
    /// Set once a consumer was running: refusals after that are retried
    /// (a broker restarting), before it they are configuration errors.
    ever_up: AtomicBool,
    shown: String,
}

impl std::fmt::Debug for AmqpIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpIn").field("url", &self.shown).finish()
    }
}

/// Parses an `amqp://` source URL; connects on the first [`Inbound::next`].
pub fn open(url: &Url) -> Result<AmqpIn, OpenError> {
    let mut opts = Options::new(url)?;
    let fail = |opts: &Options, reason: String| {
        opts.invalid(format!(
            "{reason}; accepted form: amqp[s]://USER:PASS@HOST:PORT/VHOST?exchange=E[&{}]",
            ACCEPTED[1..].join("&")
        ))
    };
    let Some(exchange) = opts.take("exchange").filter(|e| !e.is_empty()) else {
        return Err(fail(&opts, "option `exchange` is required".into()));
    };
    let binding_keys: Vec<String> = opts
        .take("binding_key")
        .unwrap_or_else(|| "#".into())
        .split(',')
        .map(str::to_string)
        .collect();
    if binding_keys.iter().any(|k| k.len() > 255) {
        return Err(fail(&opts, "a binding key is longer than 255 bytes".into()));
    }
    let queue = opts.take("queue");
    if let Some(q) = &queue
        && (q.is_empty() || q.len() > 255 || q.starts_with("amq."))
    {
        return Err(fail(
            &opts,
            format!(
                "option `queue={q}`: a queue name has 1 to 255 bytes and does not start with `amq.`"
            ),
        ));
    }
    // Without a named queue the broker names an exclusive, auto-deleted
    // one, and deletes it, with every message delivered but not yet
    // confirmed and every message waiting, when the connection drops:
    // at least once would not hold across a reconnect. So it is only
    // taken when asked for by name.
    let transient = opts.flag("transient")?.unwrap_or(false);
    match (&queue, transient) {
        (None, false) => {
            return Err(fail(
                &opts,
                "option `queue=NAME` is required: a named queue is durable and keeps what \
                 was delivered but not yet confirmed across reconnects and restarts; \
                 `transient=true` takes a server-named exclusive queue instead (what \
                 restricted users may create), which RabbitMQ deletes with its messages \
                 when the connection drops"
                    .into(),
            ));
        }
        (Some(q), true) => {
            return Err(fail(
                &opts,
                format!("options `queue={q}` and `transient=true` contradict each other"),
            ));
        }
        _ => {}
    }
    let prefetch: u16 = opts
        .parse("prefetch", "a whole number from 1 to 65535")?
        .unwrap_or(512);
    if prefetch == 0 {
        return Err(fail(
            &opts,
            "option `prefetch=0` would mean no limit; give 1 to 65535".into(),
        ));
    }
    let (kind, declare) = exchange_options(&mut opts)?;
    // The name filter is the bridge's (it needs the envelope).
    let _ = opts.take("name");
    let link = endpoint(url, &mut opts).map_err(|e| fail(&opts, e))?;
    let shown = opts.shown_url().to_string();
    let accepted: Vec<&str> = ACCEPTED.iter().chain(LAPIN_OPTIONS).copied().collect();
    opts.finish(&accepted)?;
    if transient {
        tracing::warn!(
            source = %shown,
            "transient=true: the server-named queue and what it holds are deleted when the \
             connection drops; messages delivered but not yet confirmed then are lost"
        );
    }
    Ok(AmqpIn {
        endpoint: link,
        exchange,
        kind,
        declare,
        binding_keys,
        queue,
        prefetch,
        live: Mutex::new(None),
        up: AtomicBool::new(false),
        ever_up: AtomicBool::new(false),
        shown,
    })
}

impl AmqpIn {
    /// Connects, declares and binds the queue and starts consuming. The
    /// flag says whether the failure is a refusal (not worth retrying).
    async fn subscribe(&self) -> Result<Live, (bool, SinkError)> {
        let conn = self.endpoint.connect_classified().await?;
        let setup = async {
            let ch = conn
                .create_channel()
                .await
                .map_err(|e| (false, e.to_string()))?;
            declare_exchange(&ch, &self.exchange, &self.kind, self.declare)
                .await
                .map_err(|e| {
                    let refused = refused(&e);
                    let e = exchange_error(&self.exchange, &self.endpoint.vhost, self.declare, e);
                    (refused, e.to_string())
                })?;
            let amqp = |what: String| move |e: lapin::Error| (refused(&e), format!("{what}: {e}"));
            let options = match &self.queue {
                Some(_) => QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                None => QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
            };
            let name = self.queue.clone().unwrap_or_default();
            let queue = ch
                .queue_declare(name.as_str().into(), options, FieldTable::default())
                .await
                .map_err(amqp(format!("declaring queue `{name}`")))?;
            let queue = queue.name().to_string();
            for key in &self.binding_keys {
                ch.queue_bind(
                    queue.as_str().into(),
                    self.exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp(format!(
                    "binding queue `{queue}` to exchange `{}` with `{key}`",
                    self.exchange
                )))?;
            }
            ch.basic_qos(self.prefetch, BasicQosOptions::default())
                .await
                .map_err(amqp("setting the prefetch window".into()))?;
            let consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp(format!("consuming from queue `{queue}`")))?;
            tracing::info!(source = %self.shown, %queue, keys = ?self.binding_keys, "consuming");
            Ok::<_, (bool, String)>(consumer)
        };
        match setup.await {
            Ok(consumer) => Ok(Live { conn, consumer }),
            Err((refused, e)) => {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), conn.close(0, "".into())).await;
                Err((refused, SinkError::Retryable(e)))
            }
        }
    }
}

struct AmqpAck(lapin::Acker);

#[async_trait]
impl Ack for AmqpAck {
    async fn ack(self: Box<Self>) {
        // Fails only when the channel is gone: the broker has put the
        // message back and delivers it again.
        if let Err(e) = self.0.ack(BasicAckOptions::default()).await {
            tracing::debug!(error = %e, "ack not sent; the broker will redeliver");
        }
    }

    async fn reject(self: Box<Self>) {
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        if let Err(e) = self.0.nack(requeue).await {
            tracing::debug!(error = %e, "nack not sent; the broker will redeliver");
        }
    }
}

#[async_trait]
impl Inbound for AmqpIn {
    fn describe(&self) -> &str {
        &self.shown
    }

    async fn next(&self) -> Result<Delivery, SinkError> {
        let mut live = self.live.lock().await;
        let mut backoff = Duration::from_millis(100);
        loop {
            let Some(l) = live.as_mut() else {
                match self.subscribe().await {
                    Ok(l) => {
                        *live = Some(l);
                        self.up.store(true, Ordering::Release);
                        self.ever_up.store(true, Ordering::Release);
                        backoff = Duration::from_millis(100);
                    }
                    Err((true, e)) if !self.ever_up.load(Ordering::Acquire) => {
                        return Err(e);
                    }
                    Err((_, e)) => {
                        tracing::warn!(source = %self.shown, error = %e, retry_in = ?backoff, "AMQP source not consuming");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
                continue;
            };
            let next =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut l.consumer).poll_next(cx)).await;
            match next {
                Some(Ok(d)) => return Ok(self.delivery(d)),
                other => {
                    let why = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "consumer cancelled".into(),
                    };
                    tracing::warn!(source = %self.shown, error = %why, "AMQP source lost its consumer; reconnecting");
                    self.up.store(false, Ordering::Release);
                    if let Some(old) = live.take() {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            old.conn.close(0, "evbridge reconnecting".into()),
                        )
                        .await;
                    }
                }
            }
        }
    }

    fn up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        let conn = self.endpoint.connect().await?;
        let checked = async {
            let ch = conn
                .create_channel()
                .await
                .map_err(|e| SinkError::Retryable(e.to_string()))?;
            // Only look: a check creates nothing.
            let look = match self.declare {
                Declare::Skip => Declare::Skip,
                _ => Declare::Passive,
            };
            declare_exchange(&ch, &self.exchange, &self.kind, look)
                .await
                .map_err(|e| exchange_error(&self.exchange, &self.endpoint.vhost, look, e))
        }
        .await;
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            conn.close(200, "evbridge check".into()),
        )
        .await;
        checked
    }

    async fn close(&self) {
        self.up.store(false, Ordering::Release);
        if let Some(l) = self.live.lock().await.take() {
            // Unacknowledged deliveries go back to the queue.
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                l.conn.close(200, "evbridge done".into()),
            )
            .await;
        }
    }
}

impl AmqpIn {
    fn delivery(&self, d: lapin::message::Delivery) -> Delivery {
        let props = &d.properties;
        let mut attributes = BTreeMap::from([
            ("amqp_exchange".to_string(), d.exchange.to_string()),
            ("routing_key".to_string(), d.routing_key.to_string()),
        ]);
        if let Some(id) = props.message_id() {
            attributes.insert("amqp_message_id".into(), id.to_string());
        }
        if let Some(t) = props.kind() {
            attributes.insert("amqp_type".into(), t.to_string());
        }
        if let Some(headers) = props.headers() {
            for (k, v) in headers.inner() {
                let text = match v {
                    AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    AMQPValue::ShortString(s) => Some(s.to_string()),
                    AMQPValue::Boolean(b) => Some(b.to_string()),
                    AMQPValue::LongLongInt(n) => Some(n.to_string()),
                    AMQPValue::LongInt(n) => Some(n.to_string()),
                    _ => None,
                };
                if let Some(text) = text {
                    attributes.entry(format!("amqp_header_{k}")).or_insert(text);
                }
            }
        }
        let timestamp = props.timestamp().and_then(|secs| {
            let mut s = String::with_capacity(20);
            evbridge_sinks::push_rfc3339(&mut s, i64::try_from(secs).ok()?, 0).then_some(s)
        });
        // The message id identifies a message across redeliveries; without
        // one, where it was published and what it says do.
        let origin = match props.message_id() {
            Some(id) => format!("amqp:{}/{id}", d.exchange),
            None => format!(
                "amqp:{}/{}/{}/{:016x}",
                d.exchange,
                d.routing_key,
                props.timestamp().unwrap_or_default(),
                fnv1a(&d.data)
            ),
        };
        Delivery {
            topic: d.routing_key.to_string(),
            key: None,
            origin,
            timestamp,
            attributes,
            body: d.data,
            ack: Box::new(AmqpAck(d.acker)),
        }
    }
}

/// A stable 64-bit digest of a body (FNV-1a): the same bytes give the same
/// value in every process and version, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<AmqpIn, OpenError> {
        open(&Url::parse(raw).unwrap())
    }

    #[test]
    fn url_forms() {
        let s = parse("amqp://u:hunter2@h:5672/ci?exchange=experiments&transient=true").unwrap();
        assert_eq!(s.binding_keys, ["#"]);
        assert_eq!(s.queue, None);
        assert_eq!(s.prefetch, 512);
        assert_eq!(s.declare, Declare::Passive);
        assert!(!s.describe().contains("hunter2"));
        let s = parse("amqp://h/?exchange=e&binding_key=a.*,b.%23&queue=q1&prefetch=10&declare=true&name=x&heartbeat=5").unwrap();
        assert_eq!(s.binding_keys, ["a.*", "b.#"]);
        assert_eq!(s.queue.as_deref(), Some("q1"));
        assert_eq!(s.prefetch, 10);
        assert_eq!(s.declare, Declare::Create);

        for (url, want) in [
            ("amqp://u:hunter2@h/v", "option `exchange` is required"),
            // A server-named queue only when asked for: it loses messages
            // on a reconnect.
            (
                "amqp://u:hunter2@h/v?exchange=e",
                "option `queue=NAME` is required",
            ),
            (
                "amqp://u:hunter2@h/v?exchange=e&transient=false",
                "transient=true",
            ),
            (
                "amqp://u:hunter2@h/v?exchange=e&queue=q&transient=true",
                "contradict",
            ),
            (
                "amqp://u:hunter2@h/v?exchange=e&queue=q&prefetch=0",
                "prefetch=0",
            ),
            (
                "amqp://u:hunter2@h/v?exchange=e&queue=q&prefetch=-1",
                "prefetch=-1",
            ),
            ("amqp://u:hunter2@h/v?exchange=e&queue=amq.x", "amq."),
            (
                "amqp://u:hunter2@h/v?exchange=e&queue=q&routing_key=x",
                "unknown option `routing_key`",
            ),
        ] {
            let e = parse(url).expect_err(url).to_string();
            assert!(e.contains(want), "{url}: `{e}` lacks `{want}`");
            assert!(!e.contains("hunter2"), "{url}: {e}");
        }
    }

    #[test]
    fn body_digest_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
