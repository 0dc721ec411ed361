//! Kafka as the source, against a real Kafka-protocol broker (tansu):
//! records written by an independent librdkafka producer come out as
//! envelopes, offsets are committed only for what every sink confirmed,
//! a rebalance or a bridge stopped abruptly (SIGKILL) mid-stream loses
//! nothing.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::brokers::*;
use common::*;
use evbridge::bridge;
use evbridge::shutdown;
use serde_json::{Value, json};

/// `n` AccelByte events, plus BonFIRE notifications and bytes that are
/// not JSON, as (key, body).
fn records(n: usize, tag: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let id = format!("{:032x}", (i as u128) << 8 | 0xab);
            let body = json!({
                "id": id, "name": "userLoggedIn", "namespace": tag,
                "timestamp": "2026-11-25T10:00:00Z", "version": 1, "topic": "auth",
                "payload": {"n": i}, "userId": format!("u{i}")
            });
            (format!("user-{}", i % 7), body.to_string().into_bytes())
        })
        .collect();
    for i in 0..5 {
        let body = json!({"timestamp": 1_795_564_800 + i, "type": "experiment",
                          "status": "running", "path": format!("/experiments/{i}")});
        out.push((format!("exp-{i}"), body.to_string().into_bytes()));
    }
    out.push(("raw".into(), b"\xffnot json".to_vec()));
    out
}

fn source_url(t: &Tansu, group: &str, extra: &str) -> String {
    format!(
        "kafka://{}/events?group={group}&prefix=p&offset=earliest&{GROUP_TIMEOUTS}{extra}",
        t.bootstrap()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_become_envelopes_and_offsets_are_committed() {
    let t = Tansu::start();
    create_topic(&t.bootstrap(), "p.events", 3).await;
    let recs = records(300, "game");
    let ends = produce(&t.bootstrap(), "p.events", &recs).await;

    let (sink, buf) = capture();
    let (trigger, stop) = shutdown::channel();
    let run = tokio::spawn(bridge::run(
        bridge_config(&source_url(&t, "g1", "")),
        vec![sink],
        stop,
    ));
    let got = wait_for(&buf, recs.len(), Duration::from_secs(60)).await;
    // A rebalance under load (the machine shared with other tests) makes
    // records in flight count for nothing and come again: wait until the
    // commit has caught up rather than assume none happened.
    let start = Instant::now();
    while committed_and_end(&t.bootstrap(), "p.g1", "p.events", &ends).0 < recs.len() as i64
        && start.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    trigger.fire();
    let summary = run.await.unwrap().unwrap();

    let ids: HashSet<String> = got
        .iter()
        .map(|e| e["id"].as_str().unwrap().into())
        .collect();
    assert_eq!(ids.len(), recs.len(), "every record delivered once");
    let users: Vec<&Value> = got.iter().filter(|e| e["name"] == "userLoggedIn").collect();
    assert_eq!(users.len(), 300);
    for e in &users {
        assert_eq!(e["namespace"], "game");
        assert_eq!(e["topic"], "auth");
        assert_eq!(e["attributes"]["kafka_topic"], "p.events");
        assert!(
            e["attributes"]["user_id"]
                .as_str()
                .unwrap()
                .starts_with('u')
        );
        assert!(e["payload"]["n"].is_u64());
        assert!(e["key"].as_str().unwrap().starts_with("user-"));
    }
    assert_eq!(
        got.iter()
            .filter(|e| e["name"] == "experiment_running")
            .count(),
        5
    );
    let raw: Vec<&Value> = got.iter().filter(|e| e["name"] == "raw_record").collect();
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0]["payload"]["value"], "/25vdCBqc29u");
    assert!(summary.notifications >= recs.len() as u64, "{summary:?}");
    assert!(summary.acked >= recs.len() as u64, "{summary:?}");

    // Everything was confirmed, so everything is committed for group p.g1.
    let (committed, end) = committed_and_end(&t.bootstrap(), "p.g1", "p.events", &ends);
    assert_eq!(committed, end);
    assert_eq!(end, recs.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_records_are_not_committed_and_come_again() {
    let t = Tansu::start();
    create_topic(&t.bootstrap(), "p.events", 2).await;
    let recs = records(200, "x");
    let ends = produce(&t.bootstrap(), "p.events", &recs).await;

    // First run: the sink confirms 50 and then stalls; the bridge is
    // stopped (its grace runs out) with the rest unconfirmed.
    let stall = std::sync::Arc::new(FakeSink::new("stall://").confirm_at_most(50));
    let (trigger, stop) = shutdown::channel();
    let mut cfg = bridge_config(&source_url(&t, "g2", ""));
    cfg.source.shutdown_grace = Duration::from_secs(1);
    let run = tokio::spawn(bridge::run(cfg, vec![stall.clone()], stop));
    let start = Instant::now();
    while stall.confirmed().len() < 50 && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    trigger.fire();
    let first = run.await.unwrap().unwrap();
    assert!(
        first.acked <= 50,
        "acked {} of which only 50 confirmed",
        first.acked
    );
    let (committed, end) = committed_and_end(&t.bootstrap(), "p.g2", "p.events", &ends);
    assert!(committed <= 50, "committed {committed} > confirmed 50");
    assert_eq!(end, recs.len() as i64);

    // Second run, same group, a sink that works: everything not committed
    // arrives; together the two runs delivered every record.
    let (sink, buf) = capture();
    let (trigger, stop) = shutdown::channel();
    let run = tokio::spawn(bridge::run(
        bridge_config(&source_url(&t, "g2", "")),
        vec![sink],
        stop,
    ));
    let want = recs.len() - committed as usize;
    let got = wait_for(&buf, want, Duration::from_secs(60)).await;
    trigger.fire();
    run.await.unwrap().unwrap();
    let ids: HashSet<String> = got
        .iter()
        .map(|e| e["id"].as_str().unwrap().into())
        .collect();
    assert!(
        ids.len() >= want,
        "second run delivered {} of {want}",
        ids.len()
    );
    let (committed, end) = committed_and_end(&t.bootstrap(), "p.g2", "p.events", &ends);
    assert_eq!(committed, end, "all committed after the second run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_filter_passes_only_that_event_and_commits_the_rest() {
    let t = Tansu::start();
    create_topic(&t.bootstrap(), "p.events", 1).await;
    let recs = records(20, "f");
    let ends = produce(&t.bootstrap(), "p.events", &recs).await;
    let (sink, buf) = capture();
    let (trigger, stop) = shutdown::channel();
    let run = tokio::spawn(bridge::run(
        bridge_config(&source_url(&t, "g3", "&name=experiment_running")),
        vec![sink],
        stop,
    ));
    let start = Instant::now();
    loop {
        let (committed, end) = committed_and_end(&t.bootstrap(), "p.g3", "p.events", &ends);
        if committed == end || start.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    trigger.fire();
    run.await.unwrap().unwrap();
    let got = buf.envelopes();
    assert_eq!(got.len(), 5);
    assert!(got.iter().all(|e| e["name"] == "experiment_running"));
}

#[tokio::test]
async fn bad_source_urls_name_the_problem() {
    for (url, want) in [
        ("kafka://127.0.0.1:9/", "not a topic"),
        ("kafka://127.0.0.1:9/t?offset=middle", "offset"),
        ("kafka://127.0.0.1:9/t?group=a%20b", "group=a b"),
        ("kafka://127.0.0.1:9/t?colour=red", "colour"),
        ("kafka://nohost/t", "needs a port"),
        ("ftp://x/y", "not a broker source"),
        // Would let librdkafka store or stop committing offsets itself.
        (
            "kafka://127.0.0.1:9/t?rdkafka.enable.auto.offset.store=true",
            "`rdkafka.enable.auto.offset.store` is not accepted",
        ),
        (
            "kafka://127.0.0.1:9/t?rdkafka.enable.auto.commit=false",
            "`rdkafka.enable.auto.commit` is not accepted",
        ),
    ] {
        let err = evbridge::sources::open_inbound(url)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{url}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_looks_at_the_topic_without_consuming() {
    let t = Tansu::start();
    create_topic(&t.bootstrap(), "p.events", 1).await;
    let run = |url: String| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_evbridge"))
            .args(["--source", &url, "--sink", "none://", "--check"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let url = source_url(&t, "g4", "");
    let (ok, out) = tokio::task::spawn_blocking(move || run(url)).await.unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("ok      source kafka://"), "{out}");
    let url = format!("kafka://{}/absent?group=g", t.bootstrap());
    let (ok, out) = tokio::task::spawn_blocking(move || run(url)).await.unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAILED  source") && out.contains("absent"),
        "{out}"
    );
}

/// Two bridges in one consumer group: the second joining makes the group
/// rebalance mid-stream (partitions move while records are in flight), and
/// together they still deliver every record and commit to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_mid_stream_loses_nothing() {
    let t = Tansu::start();
    create_topic(&t.bootstrap(), "p.events", 4).await;
    let recs = records(800, "rb");
    let ends = produce(&t.bootstrap(), "p.events", &recs).await;
    let url = source_url(&t, "g5", "");
    // A slow second sink keeps records in flight when the group rebalances.
    let slow = || evbridge::sinks::open("blackhole://?rate=100");

    let (sink_a, buf_a) = capture();
    let (trigger_a, stop_a) = shutdown::channel();
    let a = tokio::spawn(bridge::run(
        bridge_config(&url),
        vec![sink_a, slow().await.unwrap()],
        stop_a,
    ));
    wait_for(&buf_a, 50, Duration::from_secs(60)).await;
    let (sink_b, buf_b) = capture();
    let (trigger_b, stop_b) = shutdown::channel();
    let b = tokio::spawn(bridge::run(
        bridge_config(&url),
        vec![sink_b, slow().await.unwrap()],
        stop_b,
    ));

    let start = Instant::now();
    let all = loop {
        let ids: HashSet<String> = buf_a
            .envelopes()
            .iter()
            .chain(buf_b.envelopes().iter())
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        let (committed, end) = committed_and_end(&t.bootstrap(), "p.g5", "p.events", &ends);
        if (ids.len() == recs.len() && committed == end)
            || start.elapsed() > Duration::from_secs(120)
        {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    trigger_a.fire();
    trigger_b.fire();
    let (sa, sb) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    eprintln!(
        "rebalance: bridge A took {} records, B {}; {} distinct of {}",
        sa.notifications,
        sb.notifications,
        all.len(),
        recs.len()
    );
    assert_eq!(all.len(), recs.len(), "every record delivered");
    assert!(sb.notifications > 0, "the second bridge got partitions");
    let (committed, end) = committed_and_end(&t.bootstrap(), "p.g5", "p.events", &ends);
    assert_eq!(committed, end);
}

/// The real binary SIGKILLed three times mid-stream, Kafka to Kafka: what
/// it had not committed is read again, so the output topic ends up with
/// every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing() {
    let t = Tansu::start();
    create_topic(&t.bootstrap(), "p.events", 2).await;
    create_topic(&t.bootstrap(), "out", 2).await;
    let recs = records(1500, "kill");
    let ends = produce(&t.bootstrap(), "p.events", &recs).await;
    let (source, sink) = (
        source_url(&t, "g6", ""),
        format!("kafka://{}/out", t.bootstrap()),
    );
    let spawn = || common::process::spawn_throttled(&source, &sink, 500, None);
    let mut before = 0;
    for round in 0..3 {
        let mut bridge = spawn();
        // Kill it once it is making progress (a restarted member first
        // waits for the killed one's session to time out).
        let start = Instant::now();
        loop {
            let (committed, _) = committed_and_end(&t.bootstrap(), "p.g6", "p.events", &ends);
            if committed > before {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no progress in round {round}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        bridge.0.kill().unwrap(); // SIGKILL
        bridge.0.wait().unwrap();
        let (committed, end) = committed_and_end(&t.bootstrap(), "p.g6", "p.events", &ends);
        eprintln!("kill {}: committed {committed} of {end}", round + 1);
        assert!(committed < end, "the kill must come mid-stream");
        before = committed;
    }
    let _last = spawn();
    let start = Instant::now();
    loop {
        let (committed, end) = committed_and_end(&t.bootstrap(), "p.g6", "p.events", &ends);
        if committed == end {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "committed {committed} of {end}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (b, want) = (t.bootstrap(), recs.len());
    let out = tokio::task::spawn_blocking(move || {
        consume(&b, &["out".to_string()], want, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let ids: HashSet<&str> = out
        .iter()
        .map(|r| r.value["id"].as_str().unwrap())
        .collect();
    eprintln!(
        "after 3 kills: {} distinct of {want}, {} duplicates",
        ids.len(),
        out.len() - ids.len()
    );
    assert_eq!(ids.len(), want, "lost records");
}

/// `/readyz` follows the Kafka broker behind a source: a consumer keeps
/// its assignment through an outage, so the bridge checks the topic
/// itself (`--health-interval`) and reports the source, then ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_source_broker() {
    use common::http;
    let mut t = Tansu::start();
    create_topic(&t.bootstrap(), "p.events", 1).await;
    produce(&t.bootstrap(), "p.events", &records(10, "ready")).await;
    let port = free_port();
    let _bridge = common::process::Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_evbridge"))
            .args(["--source", &source_url(&t, "g7", ""), "--sink", "none://"])
            .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
            .args(["--health-interval", "0.5"])
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let readyz = move |want: u16| {
        tokio::task::spawn_blocking(move || {
            http::wait_for(port, "/readyz", "readiness", |status, _| status == want)
        })
    };
    readyz(200).await.unwrap();
    t.kill();
    let body = readyz(503).await.unwrap();
    // Named either by the liveness check (not reachable) or because the
    // consumer lost its assignment (not consuming), whichever comes first.
    assert!(body.contains("source: kafka://127.0.0.1"), "{body}");
    t.restart();
    create_topic(&t.bootstrap(), "p.events", 1).await;
    readyz(200).await.unwrap();
}

/// `offset=latest`: a new group starts at the end of the topic, so what
/// was there before it joined is not delivered, and what comes after is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_latest_starts_at_the_end() {
    let t = Tansu::start();
    create_topic(&t.bootstrap(), "p.events", 1).await;
    let old = records(20, "old");
    let ends = produce(&t.bootstrap(), "p.events", &old).await;
    let old_end = ends[&0];
    let (sink, buf) = capture();
    let (trigger, stop) = shutdown::channel();
    let url = source_url(&t, "g8", "").replace("offset=earliest", "offset=latest");
    let run = tokio::spawn(bridge::run(bridge_config(&url), vec![sink], stop));
    // Until the group has joined, new records may land before its start:
    // send probes until one arrives.
    let start = Instant::now();
    let mut probes = 0;
    while buf.envelopes().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60), "nothing arrived");
        let probe = json!({"id": format!("{:032x}", 0xbeef_0000u64 + probes), "name": "probe",
                           "namespace": "new", "payload": {}});
        produce(
            &t.bootstrap(),
            "p.events",
            &[("p".into(), probe.to_string().into_bytes())],
        )
        .await;
        probes += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let fresh = records(15, "new");
    produce(&t.bootstrap(), "p.events", &fresh).await;
    let got = wait_for(&buf, 1 + fresh.len(), Duration::from_secs(30)).await;
    trigger.fire();
    run.await.unwrap().unwrap();
    for e in &got {
        let offset: i64 = e["attributes"]["kafka_offset"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            offset >= old_end,
            "offset {offset} was there before the group joined"
        );
    }
    let new = got
        .iter()
        .filter(|e| e["namespace"] == "new" && e["name"] != "probe")
        .count();
    assert!(new >= fresh.len() - 6, "{new}"); // BonFIRE/raw records have no namespace
    let ids: HashSet<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert!(ids.len() > fresh.len(), "{}", ids.len());
}
