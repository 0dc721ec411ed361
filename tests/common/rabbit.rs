//! RabbitMQ helpers: the broker URL, and an exchange with durable queues
//! bound by routing key that an independent lapin subscriber drains.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;

pub fn broker_url() -> String {
    std::env::var("EVBRIDGE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// What a test needing RabbitMQ says when it is not there: one line with
/// what to start.
pub const NEEDS_RABBITMQ: &str = "this test needs RabbitMQ on 127.0.0.1:5672 (guest/guest) or at \
     $EVBRIDGE_AMQP_URL: start it with `rabbitmq-server -detached` (Debian: `apt-get install -y \
     rabbitmq-server`); .ci/run does both";

/// A connection to the test broker, or a panic that says how to get one.
pub async fn connect() -> Connection {
    match Connection::connect(&broker_url(), ConnectionProperties::default()).await {
        Ok(conn) => conn,
        Err(e) => panic!("{NEEDS_RABBITMQ} ({e})"),
    }
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// An exchange and durable queues bound to it, deleted on `cleanup`.
pub struct Topology {
    pub conn: Connection,
    pub ch: Channel,
    pub exchange: String,
    pub queues: HashMap<String, String>,
}

impl Topology {
    pub async fn new(bindings: &[&str]) -> Topology {
        let conn = connect().await;
        let ch = conn.create_channel().await.unwrap();
        let exchange = unique("evb-test");
        ch.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        let mut queues = HashMap::new();
        for b in bindings {
            let q = unique("evb-q");
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
            ch.queue_bind(
                q.as_str().into(),
                exchange.as_str().into(),
                (*b).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            queues.insert(b.to_string(), q);
        }
        Topology {
            conn,
            ch,
            exchange,
            queues,
        }
    }

    pub async fn reconnect(&mut self) {
        self.conn = connect().await;
        self.ch = self.conn.create_channel().await.unwrap();
    }

    /// Every message in the queue bound with `binding`, until `want`
    /// distinct ids arrived or nothing came for a while.
    pub async fn drain(&self, binding: &str, want: usize) -> Vec<(Value, lapin::BasicProperties)> {
        let q = &self.queues[binding];
        let mut out = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let mut idle = Instant::now();
        while ids.len() < want && idle.elapsed() < Duration::from_secs(10) {
            match self
                .ch
                .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                Some(m) => {
                    let v: Value = serde_json::from_slice(&m.delivery.data).expect("JSON body");
                    ids.insert(v["id"].as_str().unwrap().to_string());
                    out.push((v, m.delivery.properties.clone()));
                    idle = Instant::now();
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        out
    }

    pub async fn cleanup(self) {
        for q in self.queues.values() {
            let _ = self
                .ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self
            .ch
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }

    pub fn sink_url(&self, extra: &str) -> String {
        format!("{}?exchange={}{extra}", broker_url(), self.exchange)
    }
}

/// Publishes `body` persistently and waits for the broker's confirm.
pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8], id: Option<&str>) {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(1_795_564_800);
    if let Some(id) = id {
        props = props.with_message_id(id.into());
    }
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

impl Topology {
    /// Ready messages in `queue`.
    pub async fn ready(&self, queue: &str) -> u32 {
        passive(&self.ch, queue).await.unwrap().message_count()
    }

    /// Waits until `queue` exists (each probe on a channel of its own: a
    /// failed passive declare closes its channel).
    pub async fn wait_for_queue(&self, queue: &str) {
        let start = Instant::now();
        loop {
            let ch = self.conn.create_channel().await.unwrap();
            if passive(&ch, queue).await.is_ok() {
                let _ = ch.close(200, "".into()).await;
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "queue `{queue}` never declared"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes a queue the test did not declare itself.
    pub async fn delete_queue(&self, queue: &str) {
        let _ = self
            .ch
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
}

/// Publishes every `(routing key, body, message id)` pipelined, then waits
/// for all the broker's confirms (the channel must be in confirm mode).
pub async fn publish_all(ch: &Channel, exchange: &str, messages: &[(String, Vec<u8>, String)]) {
    let mut confirms = Vec::with_capacity(messages.len());
    for (key, body, id) in messages {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into());
        confirms.push(
            ch.basic_publish(
                exchange.into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
}

/// Looks `queue` up without creating it.
async fn passive(ch: &Channel, queue: &str) -> lapin::Result<lapin::Queue> {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), options, FieldTable::default())
        .await
}
