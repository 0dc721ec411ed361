//! The bridge's AMQP path (pipeline + `amqp://` sink) against a raw
//! pipelined lapin publisher (10,000 unconfirmed, the bridge's window, the
//! same properties and headers the sink sends) and
//! against Python pika with publisher confirms, on the same RabbitMQ with
//! the same messages (persistent, to a durable queue). Prints rates and
//! ratios.
//!
//! `cargo bench --bench amqp_sink` (RabbitMQ on 127.0.0.1:5672 or
//! `$EVBRIDGE_AMQP_URL`; pika from `pip install pika` for the third row).
//! `EVBRIDGE_BENCH_N` sets the count.

/// The allocator the `evbridge` binary uses (both paths get it).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/common/brokers.rs"]
#[allow(dead_code)]
mod brokers;

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

use brokers::cpu_seconds;
use evbridge::pipeline::{Limits, Pipeline};
use evbridge::sim::world::sample_envelopes;
use evbridge::sinks::Envelope;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

fn broker_url() -> String {
    std::env::var("EVBRIDGE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn purge(ch: &Channel, queue: &str) {
    ch.queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
}

async fn raw_lapin(ch: &Channel, exchange: &str, envs: &[Envelope]) -> Duration {
    let start = Instant::now();
    let mut pending = VecDeque::with_capacity(10_001);
    for env in envs {
        let key = format!("{}.{}", env.namespace, env.name);
        let confirm = ch
            .basic_publish(
                exchange.into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                env.json().as_ref(),
                same_properties(env),
            )
            .await
            .unwrap();
        pending.push_back(confirm);
        if pending.len() > 10_000 {
            assert!(pending.pop_front().unwrap().await.unwrap().is_ack());
        }
    }
    for c in pending {
        assert!(c.await.unwrap().is_ack());
    }
    start.elapsed()
}

/// The properties the sink sends (headers included), so both sides
/// publish the same messages.
fn same_properties(env: &Envelope) -> BasicProperties {
    use lapin::types::{AMQPValue, LongString, ShortString};
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
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(env.id.as_str().into())
        .with_app_id("evbridge".into())
        .with_type(env.name.as_str().into())
        .with_headers(table)
}

async fn bridge_path(exchange: &str, envs: Vec<Envelope>) -> Duration {
    let extra = std::env::var("EVBRIDGE_BENCH_SINK_OPTS").unwrap_or_default();
    let url = format!("{}?exchange={exchange}{extra}", broker_url());
    let sink = evbridge::sinks::open(&url).await.unwrap();
    sink.healthcheck().await.unwrap();
    let mut limits = Limits::default();
    if let Some(l) = std::env::var("EVBRIDGE_BENCH_LANES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        limits.lanes = l;
    }
    if let Some(b) = std::env::var("EVBRIDGE_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        limits.max_batch = b;
    }
    let (pipeline, _workers) = Pipeline::start(vec![sink], limits);
    let start = Instant::now();
    let tracker = pipeline.tracker();
    for env in envs {
        pipeline.submit(&tracker, env).await;
    }
    tracker.finish().await.expect("all confirmed");
    start.elapsed()
}

fn pika(exchange: &str, envs: &[Envelope]) -> Option<(usize, f64)> {
    let path = std::env::temp_dir().join(format!("evbridge-pika-{}.tsv", std::process::id()));
    let mut f = std::fs::File::create(&path).unwrap();
    for env in envs {
        f.write_all(format!("{}.{}\t", env.namespace, env.name).as_bytes())
            .unwrap();
        f.write_all(env.json()).unwrap();
        f.write_all(b"\n").unwrap();
    }
    drop(f);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pika_publish.py");
    let out = std::process::Command::new("python3")
        .args([script, &broker_url(), exchange, path.to_str().unwrap()])
        .output()
        .ok()?;
    let _ = std::fs::remove_file(&path);
    if !out.status.success() {
        eprintln!("pika run failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let mut parts = text.split_whitespace();
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("EVBRIDGE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let envs = sample_envelopes(n);
    let bytes: usize = envs.iter().map(|e| e.json().len()).sum();
    let conn = Connection::connect(&broker_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 or $EVBRIDGE_AMQP_URL: start it with `rabbitmq-server -detached`");
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let exchange = format!("evb-bench-{}", &tag[..8]);
    let queue = format!("evb-bench-q-{}", &tag[..8]);
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
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    println!(
        "amqp sink bench: {n} envelopes, mean {} bytes, persistent, one durable queue",
        bytes / n
    );

    raw_lapin(&ch, &exchange, &envs[..1000]).await;
    bridge_path(&exchange, envs[..1000].to_vec()).await;
    purge(&ch, &queue).await;
    let (mut best_raw, mut best_bridge) = (f64::MAX, f64::MAX);
    for round in 1..=3 {
        let cpu = cpu_seconds(None);
        let raw = raw_lapin(&ch, &exchange, &envs).await.as_secs_f64();
        let raw_cpu = cpu_seconds(None) - cpu;
        purge(&ch, &queue).await;
        let copies = envs.clone();
        let cpu = cpu_seconds(None);
        let bridge = bridge_path(&exchange, copies).await.as_secs_f64();
        let bridge_cpu = cpu_seconds(None) - cpu;
        purge(&ch, &queue).await;
        println!(
            "round {round}: raw lapin {:>8.0}/s ({:.1} µs CPU/msg)   bridge amqp sink {:>8.0}/s ({:.1} µs CPU/msg)   ratio {:.2}",
            n as f64 / raw,
            raw_cpu * 1e6 / n as f64,
            n as f64 / bridge,
            bridge_cpu * 1e6 / n as f64,
            raw / bridge
        );
        best_raw = best_raw.min(raw);
        best_bridge = best_bridge.min(bridge);
    }
    let bridge_rate = n as f64 / best_bridge;
    println!(
        "best: raw lapin {:.0}/s, bridge {:.0}/s, ratio {:.2} (target ≥ 0.90)",
        n as f64 / best_raw,
        bridge_rate,
        best_raw / best_bridge
    );
    let pika_n = (n / 10).max(1000).min(envs.len());
    match pika(&exchange, &envs[..pika_n]) {
        Some((count, secs)) => {
            let rate = count as f64 / secs;
            println!(
                "pika with confirms: {rate:.0}/s over {count} messages; bridge / pika = {:.1} (target ≥ 3)",
                bridge_rate / rate
            );
        }
        None => println!("pika not available (pip install pika): skipped"),
    }
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
}
