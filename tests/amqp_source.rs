//! RabbitMQ as the source, against the machine's real broker: a queue
//! bound to an exchange as BonFIRE's subscribers bind one, BonFIRE simple
//! and detailed messages mapped onto envelopes, each delivery acknowledged
//! only after every sink confirmed it, and refusals as clear errors.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::rabbit::*;
use common::*;
use evbridge::bridge;
use evbridge::shutdown;
use lapin::options::ConfirmSelectOptions;
use serde_json::json;

/// BonFIRE traffic: `n` simple messages, 5 detailed ones, one body that is
/// not JSON (all under `experiment.`), and 3 on a key nobody bound.
async fn bonfire_traffic(t: &Topology, n: usize) -> usize {
    t.ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..n {
        let body = json!({"timestamp": 1_795_564_800 + i, "type": "experiment",
                          "status": "running", "path": format!("/experiments/{i}")});
        let id = format!("msg-{i}");
        // Half carry a message id, half are known by their content.
        let id = (i % 2 == 0).then_some(id.as_str());
        publish(
            &t.ch,
            &t.exchange,
            "experiment.running",
            body.to_string().as_bytes(),
            id,
        )
        .await;
    }
    for i in 0..5 {
        let body = json!({"timestamp": 1_795_564_900, "objectType": "compute",
                          "eventType": "state", "objectId": format!("/computes/{i}"),
                          "source": "bonfire", "groupId": "g", "userId": "u",
                          "objectData": {"state": "Running"}});
        publish(
            &t.ch,
            &t.exchange,
            "experiment.compute.state",
            body.to_string().as_bytes(),
            None,
        )
        .await;
    }
    publish(&t.ch, &t.exchange, "experiment.raw", b"\xffnot json", None).await;
    for _ in 0..3 {
        publish(&t.ch, &t.exchange, "other.thing", b"{}", None).await;
    }
    n + 6
}

fn source_url(t: &Topology, extra: &str) -> String {
    format!(
        "{}?exchange={}&binding_key=experiment.%23{extra}",
        broker_url(),
        t.exchange
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bonfire_messages_become_envelopes_and_are_acknowledged() {
    let t = Topology::new(&[]).await;
    let queue = unique("evb-src");
    let (sink, buf) = capture();
    let (trigger, stop) = shutdown::channel();
    let run = tokio::spawn(bridge::run(
        bridge_config(&source_url(&t, &format!("&queue={queue}&prefetch=8"))),
        vec![sink],
        stop,
    ));
    // The bridge declares and binds the queue; publish once it exists.
    t.wait_for_queue(&queue).await;
    let want = bonfire_traffic(&t, 40).await;
    let got = wait_for(&buf, want, Duration::from_secs(60)).await;
    // Let acknowledgements reach the broker before looking at the queue.
    let start = Instant::now();
    while t.ready(&queue).await > 0 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    trigger.fire();
    let summary = run.await.unwrap().unwrap();

    let ids: HashSet<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), want, "every bound message once");
    assert_eq!(summary.acked, want as u64, "{summary:?}");
    let running: Vec<_> = got
        .iter()
        .filter(|e| e["name"] == "experiment_running")
        .collect();
    assert_eq!(running.len(), 40);
    for e in &running {
        assert_eq!(e["topic"], "experiment.running");
        assert_eq!(e["attributes"]["amqp_exchange"], t.exchange.as_str());
        assert!(
            e["attributes"]["path"]
                .as_str()
                .unwrap()
                .starts_with("/experiments/")
        );
        assert!(
            e["timestamp"]
                .as_str()
                .unwrap()
                .starts_with("2026-11-25T00:")
        );
        assert_eq!(e["payload"]["status"], "running");
    }
    let detailed: Vec<_> = got
        .iter()
        .filter(|e| e["name"] == "compute_state")
        .collect();
    assert_eq!(detailed.len(), 5);
    assert!(detailed.iter().all(|e| {
        e["attributes"]["object_id"]
            .as_str()
            .unwrap()
            .starts_with("/computes/")
    }));
    let raw: Vec<_> = got.iter().filter(|e| e["name"] == "raw_record").collect();
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0]["payload"]["value"], "/25vdCBqc29u");
    assert!(got.iter().all(|e| e["topic"] != "other.thing"));
    assert_eq!(t.ready(&queue).await, 0, "everything acknowledged");
    t.delete_queue(&queue).await;
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_deliveries_stay_queued_and_keep_their_ids() {
    let t = Topology::new(&[]).await;
    let queue = unique("evb-src");
    let url = source_url(&t, &format!("&queue={queue}&prefetch=5"));

    // First run: the sink confirms 10 envelopes, then stalls; the bridge
    // is stopped with the rest unconfirmed.
    let stall = std::sync::Arc::new(FakeSink::new("stall://").confirm_at_most(10));
    let (trigger, stop) = shutdown::channel();
    let mut cfg = bridge_config(&url);
    cfg.source.shutdown_grace = Duration::from_secs(1);
    let run = tokio::spawn(bridge::run(cfg, vec![stall.clone()], stop));
    t.wait_for_queue(&queue).await;
    let want = bonfire_traffic(&t, 34).await;
    let start = Instant::now();
    while stall.confirmed().len() < 10 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    trigger.fire();
    let first = run.await.unwrap().unwrap();
    assert_eq!(first.acked, 10, "{first:?}");
    let offered: std::collections::HashSet<String> = stall.offered().into_iter().collect();
    assert!(
        offered.len() > 10,
        "the stalled sink was offered more than it confirmed"
    );
    // Closing the channel put every unacknowledged delivery back.
    assert_eq!(t.ready(&queue).await as usize, want - 10);

    // Second run: a working sink gets exactly what was left, and the
    // envelopes offered before keep their ids (with or without a
    // message id of their own).
    let (sink, buf) = capture();
    let (trigger, stop) = shutdown::channel();
    let run = tokio::spawn(bridge::run(bridge_config(&url), vec![sink], stop));
    let got = wait_for(&buf, want - 10, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    trigger.fire();
    run.await.unwrap().unwrap();
    let second: HashSet<String> = got
        .iter()
        .map(|e| e["id"].as_str().unwrap().into())
        .collect();
    assert_eq!(second.len(), want - 10);
    let unconfirmed: Vec<&String> = offered.iter().filter(|id| second.contains(*id)).collect();
    assert_eq!(
        unconfirmed.len(),
        offered.len() - 10,
        "every delivery offered but not confirmed came again with the same id"
    );
    assert_eq!(t.ready(&queue).await, 0);
    t.delete_queue(&queue).await;
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_named_queue_and_a_name_filter() {
    let t = Topology::new(&[]).await;
    // transient=true: the broker names an exclusive queue. Probe with
    // one message until the bridge receives it, then send the rest.
    let (sink, buf) = capture();
    let (trigger, stop) = shutdown::channel();
    let run = tokio::spawn(bridge::run(
        bridge_config(&source_url(&t, "&transient=true&name=compute_state")),
        vec![sink],
        stop,
    ));
    t.ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let probe = json!({"timestamp": 1, "objectType": "compute", "eventType": "state",
                       "objectId": "/probe"})
    .to_string();
    let start = Instant::now();
    while buf.envelopes().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the bridge never consumed"
        );
        publish(
            &t.ch,
            &t.exchange,
            "experiment.probe",
            probe.as_bytes(),
            Some("probe"),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bonfire_traffic(&t, 10).await;
    let got = wait_for(&buf, 6, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    trigger.fire();
    let summary = run.await.unwrap().unwrap();
    let names: HashSet<&str> = got.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, HashSet::from(["compute_state"]));
    let ids: HashSet<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids.len(),
        6,
        "the probe (one id however often sent) and 5 detailed"
    );
    // Filtered-out messages were acknowledged too: nothing is left behind.
    assert_eq!(summary.acked, summary.notifications, "{summary:?}");
    t.cleanup().await;
}

#[tokio::test]
async fn refusals_are_clear_errors_at_start() {
    let t = Topology::new(&[]).await;
    // Wrong password: refused for good, and the password is never shown.
    let bad = broker_url().replace("guest:guest", "guest:hunter2");
    let url = format!("{bad}?exchange={}&transient=true", t.exchange);
    let refused = |url: String| async move {
        let (_trigger, stop) = shutdown::channel();
        tokio::time::timeout(
            Duration::from_secs(30),
            bridge::run(bridge_config(&url), vec![capture().0], stop),
        )
        .await
        .expect("a refusal ends the run")
        .unwrap_err()
        .to_string()
    };
    let err = refused(url).await;
    assert!(err.contains("ACCESS") || err.contains("refused"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    // A missing exchange is named, with the hint.
    let err = refused(format!(
        "{}?exchange=evb-missing-{}&transient=true",
        broker_url(),
        unique("x")
    ))
    .await;
    assert!(
        err.contains("evb-missing-") && err.contains("declare=true"),
        "{err}"
    );
    t.cleanup().await;
}

/// `evbridge --source amqp://… --check`: exit status and report lines.
fn check(source: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_evbridge"))
        .args(["--source", source, "--sink", "none://", "--check"])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn check_looks_at_the_broker_without_consuming() {
    let t = Topology::new(&[]).await;
    let url = format!(
        "{}?exchange={}&queue={}",
        broker_url(),
        t.exchange,
        unique("evb-never")
    );
    let (ok, out) = tokio::task::spawn_blocking(move || check(&url))
        .await
        .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("ok      source amqp://guest:***@"), "{out}");
    let url = format!("{}?exchange=evb-missing-{}", broker_url(), unique("x"));
    let (ok, out) = tokio::task::spawn_blocking(move || check(&url))
        .await
        .unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAILED  source") && out.contains("evb-missing-"),
        "{out}"
    );
    t.cleanup().await;
}

/// The real binary SIGKILLed three times mid-stream, RabbitMQ to RabbitMQ:
/// deliveries it had not acknowledged come again, so the other exchange's
/// queue ends up with every message and the source queue empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing() {
    let from = Topology::new(&[]).await;
    let to = Topology::new(&["#"]).await;
    let queue = unique("evb-src");
    let source = source_url(&from, &format!("&queue={queue}&prefetch=100"));
    let sink = to.sink_url("");
    let spawn = || common::process::spawn_throttled(&source, &sink, 300, None);
    let mut first = spawn();
    from.wait_for_queue(&queue).await;
    from.ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    const N: usize = 1500;
    let messages: Vec<(String, Vec<u8>, String)> = (0..N)
        .map(|i| {
            let body = json!({"timestamp": 1_795_564_800 + i, "type": "job",
                              "status": "done", "path": format!("/jobs/{i}")});
            (
                "experiment.job".into(),
                body.to_string().into_bytes(),
                format!("k-{i}"),
            )
        })
        .collect();
    publish_all(&from.ch, &from.exchange, &messages).await;
    let mut before = N as u32;
    for round in 0..3 {
        if round > 0 {
            first = spawn();
        }
        // Kill it once it has taken a few hundred messages.
        let start = Instant::now();
        while from.ready(&queue).await + 200 > before {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no progress in round {round}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        first.0.kill().unwrap(); // SIGKILL
        first.0.wait().unwrap();
        // The broker notices the dead connection and requeues.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let left = from.ready(&queue).await;
        eprintln!("kill {}: {left} messages left", round + 1);
        assert!(left > 0, "the kill must come mid-stream");
        before = left;
    }
    let mut last = spawn();
    let got = to.drain("#", N).await;
    let ids: HashSet<&str> = got.iter().map(|(v, _)| v["id"].as_str().unwrap()).collect();
    eprintln!(
        "after 3 kills: {} distinct of {N}, {} duplicates",
        ids.len(),
        got.len() - ids.len()
    );
    assert_eq!(ids.len(), N, "lost messages");
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &last.0.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(last.0.wait().unwrap().success(), "clean exit on SIGTERM");
    assert_eq!(from.ready(&queue).await, 0, "everything acknowledged");
    from.delete_queue(&queue).await;
    from.cleanup().await;
    to.cleanup().await;
}

/// The source queue deleted under the running binary: the broker cancels
/// the consumer, the bridge declares and binds the queue again and goes on
/// consuming; `/metrics` counts the messages and `/readyz` is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_queue_is_bound_again_and_metrics_count_messages() {
    use common::http;
    let from = Topology::new(&[]).await;
    let to = Topology::new(&["#"]).await;
    let queue = unique("evb-src");
    let port = common::brokers::free_port();
    let source = source_url(&from, &format!("&queue={queue}"));
    let mut bridge = common::process::Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_evbridge"))
            .args(["--source", &source, "--sink", &to.sink_url("")])
            .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    from.wait_for_queue(&queue).await;
    from.ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let batch = |range: std::ops::Range<usize>| -> Vec<(String, Vec<u8>, String)> {
        range
            .map(|i| {
                let body = json!({"timestamp": 1_795_564_800, "type": "node",
                                  "status": "up", "path": format!("/nodes/{i}")});
                (
                    "experiment.node".into(),
                    body.to_string().into_bytes(),
                    format!("n-{i}"),
                )
            })
            .collect()
    };
    publish_all(&from.ch, &from.exchange, &batch(0..100)).await;
    assert_eq!(to.drain("#", 100).await.len(), 100);
    let ready = move || http::wait_for(port, "/readyz", "ready", |status, _| status == 200);
    tokio::task::spawn_blocking(ready).await.unwrap();

    from.delete_queue(&queue).await;
    from.wait_for_queue(&queue).await;
    publish_all(&from.ch, &from.exchange, &batch(100..200)).await;
    let got = to.drain("#", 100).await;
    let ids: HashSet<&str> = got.iter().map(|(v, _)| v["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids.len(),
        100,
        "consuming again after the queue was re-declared"
    );

    tokio::task::spawn_blocking(ready).await.unwrap();
    let metrics = tokio::task::spawn_blocking(move || http::get(port, "/metrics").unwrap().1)
        .await
        .unwrap();
    assert_eq!(
        http::sample(&metrics, "evbridge_notifications_received_total"),
        200.0
    );
    assert_eq!(
        http::sample(&metrics, "evbridge_notifications_acked_total"),
        200.0
    );
    assert_eq!(http::sample(&metrics, "evbridge_source_up"), 1.0);
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &bridge.0.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success() && bridge.0.wait().unwrap().success());
    from.delete_queue(&queue).await;
    from.cleanup().await;
    to.cleanup().await;
}

/// A message some sink rejected for good is handed back (nack, requeue)
/// after a pause: with a prefetch of 1 the queue would otherwise stall
/// behind it; it comes again and, accepted this time, is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_message_is_handed_back_and_delivered_again() {
    let t = Topology::new(&[]).await;
    let queue = unique("evb-src");
    let sink = std::sync::Arc::new(FakeSink::new("reject-first://").reject(|_, nth| nth == 0));
    let (trigger, stop) = shutdown::channel();
    let url = source_url(&t, &format!("&queue={queue}&prefetch=1"));
    let run = tokio::spawn(bridge::run(bridge_config(&url), vec![sink.clone()], stop));
    t.wait_for_queue(&queue).await;
    t.ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let messages: Vec<(String, Vec<u8>, String)> = (0..4)
        .map(|i| {
            let body = json!({"type": "job", "status": "done", "path": format!("/r/{i}")});
            (
                "experiment.r".into(),
                body.to_string().into_bytes(),
                format!("r-{i}"),
            )
        })
        .collect();
    publish_all(&t.ch, &t.exchange, &messages).await;
    let start = Instant::now();
    while sink.offered().len() < 5 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    trigger.fire();
    let summary = run.await.unwrap().unwrap();
    let seen = sink.offered();
    assert_eq!(seen.len(), 5, "four messages, the first twice: {seen:?}");
    assert_eq!(seen.iter().filter(|id| **id == seen[0]).count(), 2);
    assert_eq!(summary.acked, 4, "{summary:?}");
    assert_eq!(t.ready(&queue).await, 0);
    t.delete_queue(&queue).await;
    t.cleanup().await;
}
