//! `amqp://USER:PASS@HOST:PORT/VHOST?exchange=E&routing_key=TEMPLATE`:
//! messages on a RabbitMQ exchange, each envelope counted as delivered only
//! on its publisher confirm.
//!
//! Subscribers bind queues with the routing keys they care about
//! (`default.invocation_finished`, `#.bazel_event`), BonFIRE-style.
//! Confirms are always on and pipelined over the batch; a confirm that does
//! not come within `confirm_timeout` is a failure to retry, never a wait
//! forever. A lost connection or channel (broker restart, exchange deleted)
//! is rebuilt on the next send, and the pipeline re-publishes everything
//! not confirmed.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};
use tokio::sync::Mutex;
use url::Url;

pub mod connection;

use self::connection::{
    Declare, Endpoint, LAPIN_OPTIONS, declare_exchange, endpoint, exchange_error, exchange_options,
    retryable,
};
use crate::cloudevents::{self, CloudEvents, Mode};
use crate::template::Template;
use crate::{BatchError, Envelope, OpenError, Options, Sink, SinkError};

/// The bridge's own options, stripped before the URI goes to lapin.
pub(crate) const ACCEPTED: &[&str] = &[
    "exchange",
    "routing_key",
    "exchange_type",
    "declare",
    "persistent",
    "mandatory",
    "content_type",
    "headers",
    "confirm_timeout",
    "max_message_size",
    "ca",
    "cloudevents",
    "ce_source",
    "ce_type",
    "ce_prefix",
];
/// Publishes envelopes to an AMQP 0-9-1 exchange.
pub struct AmqpSink {
    endpoint: Endpoint,
    exchange: String,
    kind: ExchangeKind,
    declare: Declare,
    routing_key: Template,
    /// Larger bodies are refused before publishing (permanent).
    max_message_size: usize,
    persistent: bool,
    mandatory: bool,
    content_type: String,
    headers: bool,
    confirm_timeout: Duration,
    cloudevents: Option<CloudEvents>,
    /// Header name prefix of CloudEvents attributes in binary mode.
    ce_prefix: String,
    link: Mutex<Option<Connection>>,
    /// Confirm-mode channels not in use. Each send has a channel of its
    /// own, so the broker's returns and confirms on it belong to that send.
    idle: std::sync::Mutex<Vec<Channel>>,
    shown: String,
}

impl std::fmt::Debug for AmqpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSink")
            .field("url", &self.shown)
            .finish()
    }
}

/// Characters a routing-key value keeps; `.`, `*` and `#` would change
/// what topic bindings match, so they (and anything odd) become `_`.
pub(crate) fn routing_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '@' | '/' | '+' | '=')
}

/// Parses an `amqp://` or `amqps://` URL; connects lazily (first send or
/// health check), so a broker that is down at start only delays delivery.
pub fn open(url: &Url) -> Result<AmqpSink, OpenError> {
    let mut opts = Options::new(url)?;
    let fail = |opts: &Options, reason: String| {
        opts.invalid(format!(
            "{reason}; accepted form: amqp[s]://USER:PASS@HOST:PORT/VHOST?exchange=E[&{}]",
            ACCEPTED[1..].join("&")
        ))
    };
    if url.host_str().is_none_or(str::is_empty) {
        return Err(fail(&opts, "no host".into()));
    }
    let Some(exchange) = opts.take("exchange").filter(|e| !e.is_empty()) else {
        return Err(fail(&opts, "option `exchange` is required".into()));
    };
    let routing_key = Template::parse(
        &opts
            .take("routing_key")
            .unwrap_or_else(|| "{namespace}.{name}".into()),
    )
    .map_err(|e| fail(&opts, e))?;
    let (kind, declare) = exchange_options(&mut opts)?;
    let persistent = opts.flag("persistent")?.unwrap_or(true);
    let mandatory = opts.flag("mandatory")?.unwrap_or(true);
    let headers = opts.flag("headers")?.unwrap_or(true);
    let content_type = opts.take("content_type");
    let cloudevents = CloudEvents::from_options(&mut opts)?;
    let ce_prefix = opts.take("ce_prefix");
    if cloudevents.is_none() && ce_prefix.is_some() {
        return Err(fail(
            &opts,
            "option `ce_prefix` needs `cloudevents=binary`".into(),
        ));
    }
    if cloudevents.is_some() && content_type.is_some() {
        return Err(fail(
            &opts,
            "option `content_type` is set by `cloudevents` (application/json in binary mode, application/cloudevents+json in structured mode)".into(),
        ));
    }
    let content_type = match &cloudevents {
        Some(ce) if ce.mode == Mode::Structured => cloudevents::STRUCTURED.to_string(),
        Some(_) => cloudevents::DATA_CONTENT_TYPE.to_string(),
        None => content_type.unwrap_or_else(|| "application/json".into()),
    };
    // The RabbitMQ binding's `ce-`; the AMQP binding's `cloudEvents:` or
    // `cloudEvents_` can be asked for.
    let ce_prefix = ce_prefix.unwrap_or_else(|| "ce-".into());
    let confirm_timeout = opts
        .seconds("confirm_timeout")?
        .unwrap_or(Duration::from_secs(30));
    // RabbitMQ's own default since 4.0 (3.x: 128 MiB). Larger envelopes
    // are refused here, permanently and by name, instead of making the
    // broker close the channel on every retry.
    let max_message_size = opts.size("max_message_size")?.unwrap_or(16 << 20);
    let link = endpoint(url, &mut opts).map_err(|e| fail(&opts, e))?;
    let shown = opts.shown_url().to_string();
    let accepted: Vec<&str> = ACCEPTED.iter().chain(LAPIN_OPTIONS).copied().collect();
    opts.finish(&accepted)?;
    if !persistent {
        tracing::warn!(sink = %shown, "persistent=false: a broker restart loses what its queues hold");
    }
    if !mandatory {
        tracing::warn!(
            sink = %shown,
            "mandatory=false: an envelope no queue is bound for is dropped by the broker and \
             still counts as delivered"
        );
    }
    Ok(AmqpSink {
        endpoint: link,
        exchange,
        kind,
        declare,
        routing_key,
        max_message_size,
        persistent,
        mandatory,
        content_type,
        headers,
        confirm_timeout,
        cloudevents,
        ce_prefix,
        link: Mutex::new(None),
        idle: std::sync::Mutex::new(Vec::new()),
        shown,
    })
}

async fn open_channel(conn: &Connection) -> Result<Channel, SinkError> {
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| retryable("opening a channel", e))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| retryable("enabling publisher confirms", e))?;
    Ok(ch)
}

/// The broker's `max_message_size` when `e` says it closed the channel
/// over a message above it ("message size N is larger than configured max
/// size M"). Every confirm pending on that channel fails with the same
/// words, so only envelopes above M are the ones it refused.
fn broker_size_limit(e: &impl std::fmt::Display) -> Option<usize> {
    let text = e.to_string();
    let (_, after) = text.split_once("larger than configured max size ")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What a publish or confirm error means for an envelope of `size` bytes.
fn classify_publish(what: &str, e: lapin::Error, id: &str, size: usize) -> SinkError {
    match broker_size_limit(&e) {
        Some(limit) if size > limit => SinkError::Permanent(format!(
            "envelope {id} is {size} bytes, above the broker's max_message_size of {limit} \
             bytes (set this sink's max_message_size to it to refuse such envelopes before \
             publishing): {what}: {e}"
        )),
        Some(limit) => SinkError::Retryable(format!(
            "{what}: the broker closed the channel over another envelope above its \
             max_message_size of {limit} bytes"
        )),
        None => retryable(what, e),
    }
}

impl AmqpSink {
    /// A confirm-mode channel for one send: an idle one, or a new one on
    /// the connection, connecting (and declaring or checking the exchange)
    /// first when there is none or it broke.
    async fn channel(&self) -> Result<Channel, SinkError> {
        loop {
            let Some(ch) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                break;
            };
            if ch.status().connected() {
                return Ok(ch);
            }
        }
        let mut link = self.link.lock().await;
        if let Some(conn) = link.as_ref()
            && conn.status().connected()
        {
            return open_channel(conn).await;
        }
        *link = None;
        let conn = self.endpoint.connect().await?;
        let ch = open_channel(&conn).await?;
        declare_exchange(&ch, &self.exchange, &self.kind, self.declare)
            .await
            .map_err(|e| exchange_error(&self.exchange, &self.endpoint.vhost, self.declare, e))?;
        *link = Some(conn);
        Ok(ch)
    }

    /// Returns a channel after a send that left it healthy.
    fn give_back(&self, ch: Channel) {
        if ch.status().connected() {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(ch);
        }
    }

    /// Forgets the connection so the next send builds a new one.
    async fn reset(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if let Some(conn) = self.link.lock().await.take() {
            // Closing a broken connection may not finish: do not wait long.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                conn.close(0, "evbridge reconnecting".into()),
            )
            .await;
        }
    }

    fn properties(&self, env: &Envelope) -> BasicProperties {
        let mut props = BasicProperties::default()
            .with_delivery_mode(if self.persistent { 2 } else { 1 })
            .with_content_type(self.content_type.as_str().into())
            .with_message_id(env.id.as_str().into())
            .with_app_id("evbridge".into())
            .with_type(env.name.as_str().into());
        if let Some(ce) = self
            .cloudevents
            .as_ref()
            .filter(|ce| ce.mode == Mode::Binary)
        {
            let mut table = FieldTable::default();
            for (name, value) in ce.attributes(env) {
                table.insert(
                    ShortString::from(format!("{}{name}", self.ce_prefix)),
                    AMQPValue::LongString(LongString::from(value)),
                );
            }
            props = props.with_headers(table);
        } else if self.headers {
            let mut table = FieldTable::default();
            let mut put = |k: &str, v: &str| {
                table.insert(
                    ShortString::from(k),
                    AMQPValue::LongString(LongString::from(v)),
                );
            };
            put("id", &env.id);
            put("name", &env.name);
            put("namespace", &env.namespace);
            put("topic", &env.topic);
            put("timestamp", &env.timestamp);
            put("key", &env.key);
            for (k, v) in &env.attributes {
                put(k, v);
            }
            props = props.with_headers(table);
        }
        props
    }

    /// The message body: the envelope JSON, or the CloudEvent's payload
    /// (binary mode) or whole JSON form (structured mode).
    fn body<'a>(&self, env: &'a Envelope) -> Cow<'a, [u8]> {
        match &self.cloudevents {
            None => Cow::Borrowed(env.json().as_ref()),
            Some(ce) if ce.mode == Mode::Binary => Cow::Borrowed(env.payload.as_bytes()),
            Some(ce) => Cow::Owned(ce.structured(env)),
        }
    }

    fn routing_key_for(&self, env: &Envelope) -> String {
        let mut key = self.routing_key.render(env, routing_char);
        if key.len() > 255 {
            let mut cut = 255;
            while !key.is_char_boundary(cut) {
                cut -= 1;
            }
            key.truncate(cut);
        }
        key
    }
}

#[async_trait]
impl Sink for AmqpSink {
    fn describe(&self) -> &str {
        &self.shown
    }

    async fn send(&self, batch: &[Arc<Envelope>]) -> Result<(), BatchError> {
        let ch = self.channel().await.map_err(BatchError::all)?;
        let options = BasicPublishOptions {
            mandatory: self.mandatory,
            ..BasicPublishOptions::default()
        };
        let mut confirms = Vec::with_capacity(batch.len());
        let mut publish_error = None;
        for env in batch {
            let key = self.routing_key_for(env);
            let body = self.body(env);
            if body.len() > self.max_message_size {
                publish_error = Some(SinkError::Permanent(format!(
                    "envelope {} is {} bytes, above this sink's max_message_size of {} bytes \
                     (RabbitMQ refuses messages above its own max_message_size, 16 MiB by default \
                     since 4.0; raise both to send it)",
                    env.id,
                    body.len(),
                    self.max_message_size
                )));
                break;
            }
            match ch
                .basic_publish(
                    self.exchange.as_str().into(),
                    key.as_str().into(),
                    options,
                    &body,
                    self.properties(env),
                )
                .await
            {
                Ok(confirm) => confirms.push((confirm, key, body.len())),
                Err(e) => {
                    publish_error = Some(classify_publish("publishing", e, &env.id, body.len()));
                    break;
                }
            }
        }
        let published = confirms.len();
        // One timer for the whole batch (confirms come in order); a confirm
        // still missing at the deadline leaves its outcome unset.
        let mut outcomes: Vec<Option<Option<SinkError>>> = vec![None; published];
        let mut returned = Vec::new();
        let waiting = async {
            for (i, (confirm, key, size)) in confirms.iter_mut().enumerate() {
                outcomes[i] = Some(match confirm.await {
                    Ok(Confirmation::Ack(r)) => {
                        returned.extend(r);
                        None
                    }
                    Ok(Confirmation::NotRequested) => None,
                    Ok(Confirmation::Nack(r)) => {
                        returned.extend(r);
                        Some(SinkError::Retryable(format!(
                            "the broker nacked the message (routing key `{key}`)"
                        )))
                    }
                    Err(e) => Some(classify_publish(
                        "waiting for the publisher confirm",
                        e,
                        &batch[i].id,
                        *size,
                    )),
                });
            }
        };
        let _ = tokio::time::timeout(self.confirm_timeout, waiting).await;
        let mut outcomes: Vec<Option<SinkError>> = outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Some(SinkError::Retryable(format!(
                        "no publisher confirm within {:?}",
                        self.confirm_timeout
                    )))
                })
            })
            .collect();
        // lapin hands a returned (unroutable) message to whichever confirm
        // completes next, so find its envelope by message id instead.
        for r in returned {
            let id = r.delivery.properties.message_id().clone();
            let at = id.as_ref().and_then(|id| {
                (0..published).find(|&j| batch[j].id == id.as_str() && outcomes[j].is_none())
            });
            let Some(j) = at else {
                tracing::warn!(sink = %self.shown, message_id = ?id, "returned message not from this batch");
                continue;
            };
            outcomes[j] = Some(SinkError::Permanent(format!(
                "unroutable: exchange `{}` has no binding for routing key `{}` ({} {})",
                self.exchange, r.delivery.routing_key, r.reply_code, r.reply_text
            )));
        }
        let first = outcomes.iter().position(Option::is_some);
        let (at, error) = match (first, publish_error) {
            (None, None) => {
                self.give_back(ch);
                return Ok(());
            }
            (Some(at), _) => (at, outcomes[at].take().expect("found above")),
            (None, Some(e)) => (published, e),
        };
        let confirmed = (at + 1..published)
            .filter(|&i| outcomes[i].is_none())
            .collect();
        if error.is_retryable() {
            self.reset().await;
        } else {
            self.give_back(ch);
        }
        Err(BatchError::new(at, error).with_confirmed(confirmed))
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        // A live channel on a live connection (reconnecting if needed);
        // it goes back to the pool rather than leaking on the broker.
        let ch = self.channel().await?;
        self.give_back(ch);
        Ok(())
    }

    async fn flush(&self) -> Result<(), SinkError> {
        // Every send already waited for its confirms; close politely.
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if let Some(conn) = self.link.lock().await.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                conn.close(200, "evbridge done".into()),
            )
            .await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<AmqpSink, OpenError> {
        open(&Url::parse(raw).unwrap())
    }

    #[test]
    fn only_envelopes_above_the_brokers_limit_are_refused_for_it() {
        let closed = "PRECONDITION_FAILED - message size 20971600 is larger than configured max size 16777216";
        assert_eq!(broker_size_limit(&closed), Some(16_777_216));
        assert_eq!(broker_size_limit(&"connection reset"), None);
    }

    #[test]
    fn url_forms() {
        let s = parse("amqp://guest:hunter2@127.0.0.1:5672/%2f?exchange=ev&heartbeat=10").unwrap();
        assert_eq!(s.endpoint.vhost, "/");
        assert_eq!(s.exchange, "ev");
        assert!(
            s.endpoint.uri.contains("heartbeat=10") && !s.endpoint.uri.contains("exchange="),
            "{}",
            s.endpoint.uri
        );
        assert!(!s.describe().contains("hunter2"));
        assert_eq!(s.declare, Declare::Passive);
        assert!(s.persistent && s.mandatory && s.headers);
        let s = parse("amqp://u:p@h/ci?exchange=e&routing_key={topic}.{name}&exchange_type=fanout&declare=true&persistent=false&mandatory=false&confirm_timeout=2.5").unwrap();
        assert_eq!(s.endpoint.vhost, "ci");
        assert_eq!(s.declare, Declare::Create);
        assert_eq!(s.kind, ExchangeKind::Fanout);
        assert!(!s.persistent && !s.mandatory);
        assert_eq!(s.confirm_timeout, Duration::from_millis(2500));

        let bad: &[(&str, &str)] = &[
            ("amqp://u:hunter2@h/v", "option `exchange` is required"),
            (
                "amqp://u:hunter2@h/v?exchange=e&routing_key={nope}",
                "unknown placeholder",
            ),
            (
                "amqp://u:hunter2@h/v?exchange=e&exchange_type=x",
                "exchange_type=x",
            ),
            (
                "amqp://u:hunter2@h/v?exchange=e&declare=maybe",
                "declare=maybe",
            ),
            (
                "amqp://u:hunter2@h/v?exchange=e&colour=red",
                "unknown option `colour`",
            ),
            (
                "amqp://u:hunter2@h/v?exchange=e&ca=/x.pem",
                "needs an amqps:// URL",
            ),
            (
                "amqps://u:hunter2@h/v?exchange=e&ca=/nonexistent.pem",
                "cannot read option `ca",
            ),
            (
                "amqp://u:hunter2@h/v?exchange=e&confirm_timeout=0",
                "above 0",
            ),
        ];
        for (url, want) in bad {
            let e = parse(url).expect_err(url).to_string();
            assert!(e.contains(want), "{url}: `{e}` lacks `{want}`");
            assert!(!e.contains("hunter2"), "{url}: {e}");
        }
    }

    #[test]
    fn routing_keys_keep_topic_routing_intact() {
        let s = parse("amqp://h/?exchange=e&routing_key=ci.{namespace}.{name}").unwrap();
        let mut event = crate::test_envelope("x").event().clone();
        event.namespace = "team.a*#b".into();
        let env = Envelope::new(event);
        assert_eq!(s.routing_key_for(&env), "ci.team_a__b.test");
    }
}
