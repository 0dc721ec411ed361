//! RabbitMQ stopped (`rabbitmqctl stop_app`) and started again mid-run:
//! nothing acknowledged while it is down, nothing lost after. As a sink
//! behind the EngFlow simulator, and with the real binary bridging
//! RabbitMQ → Kafka (RabbitMQ the source) and Kafka → RabbitMQ (RabbitMQ
//! the sink). Alone in its test binary because it stops the shared broker;
//! the tests take turns.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::brokers::*;
use common::process::{Killed, spawn_throttled};
use common::rabbit::*;
use common::*;
use lapin::options::ConfirmSelectOptions;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;

const LONG: Duration = Duration::from_secs(90);
/// One restart at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn wait_for_amqp() {
    let start = Instant::now();
    while Connection::connect(&broker_url(), ConnectionProperties::default())
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "RabbitMQ did not come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_run_loses_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut t = Topology::new(&["#"]).await;
    let mut cfg = sim_config(40, 8);
    cfg.rate = 60.0;
    let s = start_sim(cfg).await;
    let sink = evbridge::sinks::open(&t.sink_url("&confirm_timeout=5"))
        .await
        .unwrap();
    let (trigger, shutdown) = evbridge::shutdown::channel();
    let bridge = tokio::spawn(evbridge::bridge::run(
        bridge_config(&s.url),
        vec![sink],
        shutdown,
    ));

    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(s.sim.report().queue.acked > 0, "ran before the restart");
    tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
        .await
        .unwrap();
    // Whatever happens below, leave the shared broker running.
    let _restart = StartAppOnDrop;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acked_down = s.sim.report().queue.acked;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.sim.report().queue.acked,
        acked_down,
        "acknowledged while the broker was down"
    );
    tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"]))
        .await
        .unwrap();
    wait_for_amqp().await;
    let back = Instant::now();
    while !s.sim.all_acked() && back.elapsed() < LONG {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "all acknowledged {:?} after RabbitMQ came back",
        back.elapsed()
    );
    trigger.fire();
    let summary = bridge.await.unwrap().unwrap();
    assert!(s.sim.all_acked(), "{:?}", s.sim.report());
    assert!(summary.retries > 0, "{summary:?}");

    t.reconnect().await;
    let report = s.sim.report();
    let all = t
        .drain("#", report.notifications + report.invocation_events)
        .await;
    let lines: Vec<String> = all.iter().map(|(v, _)| v.to_string()).collect();
    assert_complete(&s.sim, &lines);
    t.cleanup().await;
}

struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
    }
}

/// Stops RabbitMQ's app, waits, starts it again and waits until it takes
/// connections; the returned guard starts it should the test fail between.
async fn restart_rabbitmq(down_for: Duration) -> StartAppOnDrop {
    tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
        .await
        .unwrap();
    let guard = StartAppOnDrop;
    tokio::time::sleep(down_for).await;
    tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"]))
        .await
        .unwrap();
    wait_for_amqp().await;
    guard
}

/// The real binary from `source` to `sink` and a blackhole at 250/s (which
/// keeps the run going while RabbitMQ restarts); its log goes to a file
/// whose tail is shown when an assertion fails.
fn spawn_bridge(source: &str, sink: &str) -> (Killed, std::path::PathBuf) {
    let log = std::env::temp_dir().join(format!("{}.log", unique("evb-bridge")));
    (spawn_throttled(source, sink, 250, Some(&log)), log)
}

fn tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    // Everything but the periodic stats lines, and the last of those.
    let stats = text.lines().rfind(|l| l.contains(" stats "));
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains(" stats "))
        .chain(stats)
        .collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// SIGTERM, then the exit status must be success.
fn stop(mut bridge: Killed, log: &std::path::Path) {
    let ok = Command::new("kill")
        .args(["-TERM", &bridge.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let status = bridge.0.wait().unwrap();
    assert!(
        status.success(),
        "bridge exited with {status}:\n{}",
        tail(log)
    );
}

async fn publish_simple(t: &Topology, range: std::ops::Range<usize>) {
    let messages: Vec<(String, Vec<u8>, String)> = range
        .map(|i| {
            let body = json!({"timestamp": 1_795_564_800 + i, "type": "experiment",
                              "status": "running", "path": format!("/experiments/{i}")});
            (
                "experiment.running".to_string(),
                body.to_string().into_bytes(),
                format!("m-{i}"),
            )
        })
        .collect();
    publish_all(&t.ch, &t.exchange, &messages).await;
}

/// `--source amqp://… --sink kafka://…`: messages in a durable queue reach
/// Kafka although RabbitMQ (the source) stops and starts mid-run; the
/// bridge re-subscribes by itself and takes what is published afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_to_kafka_loses_nothing_across_a_rabbitmq_restart() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let kafka = Tansu::start();
    create_topic(&kafka.bootstrap(), "bridged", 2).await;
    let mut t = Topology::new(&[]).await;
    let queue = unique("evb-src");
    let source = format!(
        "{}?exchange={}&binding_key=experiment.%23&queue={queue}&prefetch=50",
        broker_url(),
        t.exchange
    );
    let sink = format!("kafka://{}/bridged", kafka.bootstrap());
    let (bridge, log) = spawn_bridge(&source, &sink);
    t.wait_for_queue(&queue).await;
    t.ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    const BEFORE: usize = 1500;
    const AFTER: usize = 300;
    publish_simple(&t, 0..BEFORE).await;
    let start = Instant::now();
    while t.ready(&queue).await as usize > BEFORE - 200 {
        assert!(start.elapsed() < LONG, "not consuming:\n{}", tail(&log));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = t.ready(&queue).await;
    assert!(left > 0, "the restart must come mid-stream");
    eprintln!("RabbitMQ restarts with {left} messages still queued");
    let _guard = restart_rabbitmq(Duration::from_secs(2)).await;
    t.reconnect().await;
    t.ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish_simple(&t, BEFORE..BEFORE + AFTER).await;

    let (b, want) = (kafka.bootstrap(), BEFORE + AFTER);
    let recs = tokio::task::spawn_blocking(move || {
        consume(&b, &["bridged".to_string()], want, Duration::from_secs(120))
    })
    .await
    .unwrap();
    let ids: HashSet<&str> = recs
        .iter()
        .map(|r| r.value["id"].as_str().unwrap())
        .collect();
    let paths: HashSet<&str> = recs
        .iter()
        .map(|r| r.value["attributes"]["path"].as_str().unwrap())
        .collect();
    eprintln!(
        "amqp → kafka: {} distinct of {want}, {} records ({} duplicates)",
        ids.len(),
        recs.len(),
        recs.len() - ids.len()
    );
    assert_eq!(ids.len(), want, "lost some:\n{}", tail(&log));
    assert_eq!(paths.len(), want);
    let start = Instant::now();
    while t.ready(&queue).await > 0 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(t.ready(&queue).await, 0, "all acknowledged");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("reconnecting"),
        "the restart was noticed:\n{}",
        tail(&log)
    );
    stop(bridge, &log);
    t.delete_queue(&queue).await;
    t.cleanup().await;
}

/// `--source kafka://… --sink amqp://…`: every record reaches the queue
/// although RabbitMQ (the sink) stops and starts mid-run, and the
/// consumer group's offsets end committed at the end of the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_to_amqp_loses_nothing_across_a_rabbitmq_restart() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let kafka = Tansu::start();
    create_topic(&kafka.bootstrap(), "p.events", 2).await;
    const N: usize = 1500;
    let records: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| {
            let body = json!({"id": format!("{:032x}", i + 1), "name": "userLoggedIn",
                              "namespace": "game", "timestamp": "2026-11-25T10:00:00Z",
                              "version": 1, "topic": "auth", "payload": {"n": i}});
            (format!("user-{}", i % 11), body.to_string().into_bytes())
        })
        .collect();
    let ends = produce(&kafka.bootstrap(), "p.events", &records).await;
    let mut t = Topology::new(&["#"]).await;
    let source = format!(
        "kafka://{}/events?group=bridge&prefix=p&{GROUP_TIMEOUTS}",
        kafka.bootstrap()
    );
    let sink = t.sink_url("&confirm_timeout=5");
    let (bridge, log) = spawn_bridge(&source, &sink);
    let queue = t.queues["#"].clone();
    let start = Instant::now();
    while (t.ready(&queue).await as usize) < 200 {
        assert!(start.elapsed() < LONG, "not delivering:\n{}", tail(&log));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered = t.ready(&queue).await as usize;
    assert!(delivered < N, "the restart must come mid-stream");
    eprintln!("RabbitMQ restarts with {delivered} of {N} delivered");
    let _guard = restart_rabbitmq(Duration::from_secs(2)).await;
    t.reconnect().await;

    let got = t.drain("#", N).await;
    let ids: HashSet<&str> = got.iter().map(|(v, _)| v["id"].as_str().unwrap()).collect();
    eprintln!(
        "kafka → amqp: {} distinct of {N}, {} messages ({} duplicates)",
        ids.len(),
        got.len(),
        got.len() - ids.len()
    );
    assert_eq!(ids.len(), N, "lost some:\n{}", tail(&log));
    assert!(got.iter().all(|(v, _)| v["name"] == "userLoggedIn"));
    let start = Instant::now();
    loop {
        let (b, e) = (kafka.bootstrap(), ends.clone());
        let (committed, end) =
            tokio::task::spawn_blocking(move || committed_and_end(&b, "p.bridge", "p.events", &e))
                .await
                .unwrap();
        if committed == end {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "committed {committed} of {end}:\n{}",
            tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop(bridge, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("retries: 0,"),
        "sends failed while RabbitMQ was down and were retried:\n{}",
        tail(&log)
    );
    t.cleanup().await;
}
