//! Crash chaos: ≥ 50,000 events from the simulator into a real broker while
//! the bridge process is SIGKILLed at random moments and restarted, then
//! an independent consumer checks that every event is in the broker at
//! least once and that duplicates stay within what was in progress
//! (`--max-notifications` notifications and their envelopes per kill).
//! Prints lost / duplicated / kills.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const KILLS: usize = 10;
/// The two runs each want both cores: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const MAX_IN_FLIGHT: usize = 2000;
const MAX_NOTIFICATIONS: usize = 64;
/// Envelopes one notification can carry here: its own and 25 events.
const PER_NOTIFICATION: usize = 26;

fn spawn_bridge(source: &str, sink: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_evbridge"))
        .args([
            "--source",
            source,
            "--sink",
            sink,
            "--max-in-flight",
            &MAX_IN_FLIGHT.to_string(),
            "--max-notifications",
            &MAX_NOTIFICATIONS.to_string(),
        ])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Starts and SIGKILLs the bridge `KILLS` times at random moments, then
/// runs it until the simulator saw everything acknowledged.
async fn crash_loop(s: &RunningSim, sink: &str, seed: u64) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut kills = 0;
    for _ in 0..KILLS {
        let mut child = spawn_bridge(&s.url, sink);
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    let mut child = spawn_bridge(&s.url, sink);
    let start = Instant::now();
    while !s.sim.all_acked() && start.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();
    assert!(s.sim.all_acked(), "{:?}", s.sim.report());
    kills
}

fn verdict(s: &RunningSim, bodies: &[String], kills: usize, what: &str) {
    let report = s.sim.report();
    let expected = report.notifications + report.invocation_events;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for b in bodies {
        let v: serde_json::Value = serde_json::from_str(b).unwrap();
        *counts
            .entry(v["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let duplicated: usize = counts.values().map(|c| c - 1).sum();
    let lost = expected.saturating_sub(counts.len());
    eprintln!(
        "chaos {what}: {expected} envelopes expected, lost {lost}, duplicated {duplicated}, kills {kills}, \
         redelivered notifications {}",
        report.queue.redelivered
    );
    assert!(report.invocation_events >= 50_000);
    assert_eq!(lost, 0);
    assert_all_present(&s.sim, bodies);
    // A kill can only make the cluster redeliver what was in progress:
    // at most MAX_NOTIFICATIONS notifications and their envelopes.
    let bound = kills * MAX_NOTIFICATIONS * PER_NOTIFICATION;
    assert!(
        duplicated <= bound,
        "{duplicated} duplicates for {kills} kills (bound {bound})"
    );
}

fn big_sim() -> evbridge::sim::SimConfig {
    let mut cfg = sim_config(1700, 25);
    cfg.gen_config.seed = 42;
    cfg
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_ten_times_into_kafka_loses_nothing() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    let _turn = ONE_AT_A_TIME.lock().await;
    let broker = common::brokers::Tansu::start();
    let s = start_sim(big_sim()).await;
    let prefix = format!("chaos{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let sink = format!("kafka://{}/{{topic}}?prefix={prefix}", broker.bootstrap());
    let kills = crash_loop(&s, &sink, 7).await;

    let bootstrap = broker.bootstrap();
    let topics = [
        format!("{prefix}.lifecycle"),
        format!("{prefix}.build-events"),
    ];
    let want = s.sim.report().notifications + s.sim.report().invocation_events;
    let bodies = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "evbridge-chaos")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for t in &topics {
            let md = c.fetch_metadata(Some(t), Duration::from_secs(10)).unwrap();
            for topic in md.topics() {
                for p in topic.partitions() {
                    tpl.add_partition_offset(t, p.id(), Offset::Beginning)
                        .unwrap();
                }
            }
        }
        c.assign(&tpl).unwrap();
        let mut bodies = Vec::new();
        let mut quiet = Instant::now();
        while quiet.elapsed() < Duration::from_secs(5) || bodies.len() < want {
            if quiet.elapsed() > Duration::from_secs(60) {
                break;
            }
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                bodies.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
                quiet = Instant::now();
            }
        }
        bodies
    })
    .await
    .unwrap();
    verdict(&s, &bodies, kills, "kafka (tansu)");
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_ten_times_into_rabbitmq_loses_nothing() {
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    use lapin::types::FieldTable;
    use tokio_stream::StreamExt;

    let _turn = ONE_AT_A_TIME.lock().await;
    let t = common::rabbit::Topology::new(&["#"]).await;
    let s = start_sim(big_sim()).await;
    let kills = crash_loop(&s, &t.sink_url(""), 11).await;

    let want = s.sim.report().notifications + s.sim.report().invocation_events;
    t.ch.basic_qos(2000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer =
        t.ch.basic_consume(
            t.queues["#"].as_str().into(),
            "chaos".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut bodies = Vec::new();
    loop {
        let wait = if bodies.len() < want { 60 } else { 3 };
        match tokio::time::timeout(Duration::from_secs(wait), consumer.next()).await {
            Ok(Some(Ok(d))) => bodies.push(String::from_utf8(d.data).unwrap()),
            _ => break,
        }
    }
    verdict(&s, &bodies, kills, "rabbitmq");
    t.cleanup().await;
}
