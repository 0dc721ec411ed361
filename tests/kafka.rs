//! The Kafka sink against a real Kafka-protocol broker (tansu), read back
//! by an independent librdkafka consumer.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::brokers::{Proxy, Rec, Tansu, consume, free_port};
use common::*;

const LONG: Duration = Duration::from_secs(90);

async fn consume_async(bootstrap: String, topics: Vec<String>, want: usize) -> Vec<Rec> {
    tokio::task::spawn_blocking(move || consume(&bootstrap, &topics, want, Duration::from_secs(60)))
        .await
        .unwrap()
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

fn accelbyte_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b.last().unwrap().is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"'_.-".contains(c))
        && b.windows(2)
            .all(|w| !b"'_.-".contains(&w[0]) || w[1].is_ascii_alphanumeric())
}

/// Every notification and build event of the simulator is among the
/// records, each invocation in one partition and in order.
fn assert_all_in_kafka(sim: &evbridge::sim::Sim, recs: &[Rec]) {
    let values: Vec<String> = recs.iter().map(|r| r.value.to_string()).collect();
    assert_complete(sim, &values);
    let mut by_inv: BTreeMap<String, Vec<&Rec>> = BTreeMap::new();
    for r in recs.iter().filter(|r| r.value["topic"] == "build-events") {
        by_inv
            .entry(r.key.clone().expect("build events are keyed"))
            .or_default()
            .push(r);
    }
    for (inv, mut rs) in by_inv {
        let partitions: HashSet<i32> = rs.iter().map(|r| r.partition).collect();
        assert_eq!(
            partitions.len(),
            1,
            "invocation {inv} spread over partitions"
        );
        rs.sort_by_key(|r| r.offset);
        let mut seen = Vec::new();
        for r in rs {
            let seq: u64 = r.value["attributes"]["sequence"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            if !seen.contains(&seq) {
                seen.push(seq);
            }
        }
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "invocation {inv} out of order: {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_to_kafka_exactly_once_keyed_ordered_accelbyte() {
    let broker = Tansu::start();
    let s = start_sim(sim_config(20, 10)).await;
    let prefix = unique("evb");
    let url = format!("kafka://{}/{{topic}}?prefix={prefix}", broker.bootstrap());
    let sink = evbridge::sinks::open(&url).await.unwrap();
    sink.healthcheck().await.expect("metadata from tansu");
    run_until_acked(&s.sim, bridge_config(&s.url), vec![sink], LONG)
        .await
        .unwrap();
    assert!(s.sim.all_acked());
    let report = s.sim.report();
    let want = report.notifications + report.invocation_events;
    let topics = vec![
        format!("{prefix}.lifecycle"),
        format!("{prefix}.build-events"),
    ];
    let recs = consume_async(broker.bootstrap(), topics, want).await;
    assert_eq!(recs.len(), want, "every envelope once");
    assert_all_in_kafka(&s.sim, &recs);
    let ids: HashSet<&str> = recs
        .iter()
        .map(|r| r.value["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), want, "no duplicates without faults");
    for r in &recs {
        let v = &r.value;
        // AccelByte's event: id (32 hex), name pattern, RFC 3339 time.
        let id = v["id"].as_str().unwrap();
        assert!(id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(accelbyte_name(v["name"].as_str().unwrap()), "{}", v["name"]);
        assert!(
            v["timestamp"]
                .as_str()
                .unwrap()
                .parse::<prost_types::Timestamp>()
                .is_ok()
        );
        assert!(v["payload"].is_object() && v["version"] == 1);
        assert_eq!(
            r.topic,
            format!("{prefix}.{}", v["topic"].as_str().unwrap())
        );
        assert_eq!(
            r.key.as_deref(),
            v["key"].as_str(),
            "default key is the envelope key"
        );
        assert_eq!(r.headers["id"], id);
        assert_eq!(r.headers["name"], v["name"].as_str().unwrap());
        assert_eq!(r.headers["namespace"], v["namespace"].as_str().unwrap());
        assert_eq!(r.headers["content-type"], "application/json");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_templates_and_key_choice() {
    let broker = Tansu::start();
    let s = start_sim(sim_config(3, 4)).await;
    let ns = unique("ns");
    let mut cfg = sim_config(3, 4);
    cfg.gen_config.instance = ns.clone();
    drop(s);
    let s = start_sim(cfg).await;
    let url = format!(
        "kafka://{}/{{namespace}}.{{name}}?key=id&compression=zstd",
        broker.bootstrap()
    );
    let sink = evbridge::sinks::open(&url).await.unwrap();
    run_until_acked(&s.sim, bridge_config(&s.url), vec![sink], LONG)
        .await
        .unwrap();
    let names = [
        "build_started",
        "invocation_finished",
        "bazel_test_result",
        "invocation_attempt_started",
    ];
    let topics: Vec<String> = names.iter().map(|n| format!("{ns}.{n}")).collect();
    let world = s.sim.world();
    let want = world.builds.len() + 2 * world.invocations.len();
    let recs = consume_async(broker.bootstrap(), topics, want).await;
    assert!(recs.len() >= want, "{} < {want}", recs.len());
    for r in &recs {
        assert_eq!(
            r.topic,
            format!("{ns}.{}", r.value["name"].as_str().unwrap())
        );
        assert_eq!(r.key.as_deref(), r.value["id"].as_str(), "key=id");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_unreachable_mid_run_loses_nothing_and_recovers_by_itself() {
    let broker_port = free_port();
    let proxy_port = free_port();
    let broker = Tansu::start_on(broker_port, proxy_port);
    let proxy = Proxy::start(proxy_port, broker_port).await;
    let mut cfg = sim_config(40, 10);
    cfg.rate = 60.0;
    let s = start_sim(cfg).await;
    let prefix = unique("cut");
    let url = format!(
        "kafka://{}/{{topic}}?prefix={prefix}&rdkafka.message.timeout.ms=3000",
        broker.bootstrap()
    );
    let sink = evbridge::sinks::open(&url).await.unwrap();
    let (trigger, shutdown) = evbridge::shutdown::channel();
    let bridge = tokio::spawn(evbridge::bridge::run(
        bridge_config(&s.url),
        vec![sink],
        shutdown,
    ));

    tokio::time::sleep(Duration::from_millis(800)).await;
    let acked_before = s.sim.report().queue.acked;
    proxy.cut();
    // Reports already on their way may still land; after that, nothing
    // can be confirmed, so nothing may be acknowledged.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acked_early = s.sim.report().queue.acked;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let acked_while_down = s.sim.report().queue.acked;
    assert!(acked_before > 0, "ran before the cut");
    proxy.restore().await;
    let cut_over = Instant::now();
    while !s.sim.all_acked() && cut_over.elapsed() < LONG {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovery = cut_over.elapsed();
    trigger.fire();
    let summary = bridge.await.unwrap().unwrap();
    assert!(s.sim.all_acked(), "{:?}", s.sim.report());
    assert!(
        summary.retries > 0,
        "deliveries failed while the broker was away: {summary:?}"
    );
    assert_eq!(
        acked_early, acked_while_down,
        "acknowledged while the broker was unreachable"
    );
    eprintln!("recovered in {recovery:?} after the broker came back");

    let report = s.sim.report();
    let want = report.notifications + report.invocation_events;
    let topics = vec![
        format!("{prefix}.lifecycle"),
        format!("{prefix}.build-events"),
    ];
    let recs = consume_async(broker.bootstrap(), topics, want).await;
    assert_all_in_kafka(&s.sim, &recs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_is_permanent_and_keeps_the_notification() {
    let broker = Tansu::start();
    let s = start_sim(sim_config(3, 3)).await;
    // Lifecycle envelopes are > 1,500 bytes; build events of 3-event
    // invocations are smaller. Uncompressed here, so that codec is
    // exercised against the broker too (lz4, the default, elsewhere).
    let url = format!(
        "kafka://{}/{}?compression=none&rdkafka.message.max.bytes=1500",
        broker.bootstrap(),
        unique("big")
    );
    let sink = evbridge::sinks::open(&url).await.unwrap();
    let summary = run_until_acked(
        &s.sim,
        bridge_config(&s.url),
        vec![sink],
        Duration::from_secs(4),
    )
    .await
    .unwrap();
    let report = s.sim.report();
    assert!(summary.rejected > 0, "{summary:?}");
    assert!(report.queue.acked < report.notifications, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_the_bridge_resumes_by_itself() {
    // tansu keeps its data in memory, so records confirmed before a kill
    // die with it. To tell the bridge's losses from the broker's, the kill
    // comes after the first half was confirmed and read back; the second
    // half arrives while the broker is dead, and must all be in the
    // restarted broker. (Losing the broker mid-delivery is the proxy test.)
    let mut broker = Tansu::start();
    let mut cfg = sim_config(30, 8);
    cfg.hold = true;
    let s = start_sim(cfg).await;
    let world = s.sim.world().clone();
    let half = world.builds[world.builds.len() / 2].started_at;
    let prefix = unique("kill");
    let topics = vec![
        format!("{prefix}.lifecycle"),
        format!("{prefix}.build-events"),
    ];
    let url = format!(
        "kafka://{}/{{topic}}?prefix={prefix}&rdkafka.message.timeout.ms=3000",
        broker.bootstrap()
    );
    let sink = evbridge::sinks::open(&url).await.unwrap();
    let (trigger, shutdown) = evbridge::shutdown::channel();
    let bridge = tokio::spawn(evbridge::bridge::run(
        bridge_config(&s.url),
        vec![sink],
        shutdown,
    ));

    let envelopes_of = |range: std::ops::Range<usize>| {
        range.len()
            + world
                .invocations
                .iter()
                .filter(|i| range.contains(&i.finished_at))
                .map(|i| i.events.len())
                .sum::<usize>()
    };
    s.sim.release(half);
    while s.sim.report().queue.acked < half {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_want = envelopes_of(0..half);
    let first = consume_async(broker.bootstrap(), topics.clone(), first_want).await;
    assert_eq!(first.len(), first_want);

    broker.kill();
    s.sim.release(usize::MAX);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        s.sim.report().queue.acked,
        half,
        "acknowledged while the broker was dead"
    );
    broker.restart();
    let restarted = Instant::now();
    while !s.sim.all_acked() && restarted.elapsed() < LONG {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovery = restarted.elapsed();
    trigger.fire();
    bridge.await.unwrap().unwrap();
    assert!(s.sim.all_acked(), "{:?}", s.sim.report());
    eprintln!("all acknowledged {recovery:?} after the broker restarted");

    let second_want = envelopes_of(half..world.notifications.len());
    let second = consume_async(broker.bootstrap(), topics, second_want).await;
    assert!(second.len() >= second_want);
    let mut all = first;
    all.extend(second);
    assert_all_in_kafka(&s.sim, &all);
}

/// A record librdkafka refuses to enqueue (too large for
/// `message.max.bytes`) stops the batch there: the records before it are
/// confirmed only once the broker took them, none after it is sent (the
/// pipeline sends them again), and the producer goes on serving the next
/// batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_stops_the_batch_and_the_producer_goes_on() {
    let broker = Tansu::start();
    let topic = unique("mixed");
    let url = format!(
        "kafka://{}/{topic}?key=id&compression=none&rdkafka.message.max.bytes=1500",
        broker.bootstrap()
    );
    let sink = evbridge::sinks::open(&url).await.unwrap();
    let record = |i: usize, big: bool| {
        let text = if big {
            "x".repeat(3000)
        } else {
            "small".into()
        };
        std::sync::Arc::new(evbridge::sinks::Envelope::new(evbridge::sinks::Event {
            id: format!("r{i}").into(),
            name: "test".into(),
            namespace: "default".into(),
            timestamp: "2026-11-29T00:00:00Z".into(),
            version: 1,
            topic: "t".into(),
            key: format!("r{i}").into(),
            attributes: Default::default(),
            payload: evbridge::sinks::Payload::trusted(serde_json::json!(text).to_string()),
        }))
    };
    let big = [false, false, true, false, true, false, false];
    let batch: Vec<_> = big.iter().enumerate().map(|(i, &b)| record(i, b)).collect();
    let e = sink.send(&batch).await.expect_err("two are too large");
    assert_eq!(e.at, 2, "{e:?}");
    assert!(!e.error.is_retryable(), "{e:?}");
    assert!(e.confirmed.is_empty(), "{e:?}");
    // A batch after it goes through whole, on the same producer.
    let again: Vec<_> = (7..9).map(|i| record(i, false)).collect();
    sink.send(&again).await.expect("small records");
    // Asks for one more than expected, so it reads until the limit.
    let bootstrap = broker.bootstrap();
    let recs = tokio::task::spawn_blocking(move || {
        consume(&bootstrap, &[topic], 5, Duration::from_secs(5))
    })
    .await
    .unwrap();
    let mut ids: Vec<String> = recs.iter().map(|r| r.headers["id"].clone()).collect();
    ids.sort();
    assert_eq!(ids, ["r0", "r1", "r7", "r8"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_names_filtered_sink_beside_an_all_events_sink_takes_only_its_kinds() {
    // `kafka://…/flaky?names=…` beside a topic of everything: the filtered
    // topic gets test results and summaries only, the other all, and
    // every notification is acknowledged (skipped counts as delivered
    // for the filtered sink).
    let broker = Tansu::start();
    let s = start_sim(sim_config(6, 8)).await;
    let (all_topic, flaky_topic) = (unique("all"), unique("flaky"));
    let all = evbridge::sinks::open(&format!("kafka://{}/{all_topic}", broker.bootstrap()))
        .await
        .unwrap();
    let flaky = evbridge::sinks::open(&format!(
        "kafka://{}/{flaky_topic}?names=bazel_test_*,invocation_finished",
        broker.bootstrap()
    ))
    .await
    .unwrap();
    assert!(
        flaky
            .describe()
            .ends_with("?names=bazel_test_*,invocation_finished")
    );
    let (seen, out) = capture();
    run_until_acked(&s.sim, bridge_config(&s.url), vec![all, flaky, seen], LONG)
        .await
        .unwrap();
    assert!(s.sim.all_acked());
    let envelopes = out.envelopes();
    let wanted = |name: &str| name.starts_with("bazel_test_") || name == "invocation_finished";
    let want: HashSet<String> = envelopes
        .iter()
        .filter(|e| wanted(e["name"].as_str().unwrap()))
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!want.is_empty() && want.len() < envelopes.len());
    let got = consume_async(broker.bootstrap(), vec![flaky_topic], want.len()).await;
    let got_ids: HashSet<String> = got
        .iter()
        .map(|r| r.value["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got_ids, want, "exactly the filtered names");
    assert!(
        got.iter()
            .all(|r| wanted(r.value["name"].as_str().unwrap()))
    );
    let everything = consume_async(broker.bootstrap(), vec![all_topic], envelopes.len()).await;
    let ids: HashSet<&str> = everything
        .iter()
        .map(|r| r.value["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), envelopes.len(), "the other sink got everything");
}
