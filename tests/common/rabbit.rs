//! RabbitMQ helpers: the broker URL, and an exchange with durable queues
//! bound by routing key that an independent lapin subscriber drains.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;

pub fn broker_url() -> String {
    std::env::var("EVBRIDGE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
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
        let conn = Connection::connect(&broker_url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (see README)");
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
        self.conn = Connection::connect(&broker_url(), ConnectionProperties::default())
            .await
            .unwrap();
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
