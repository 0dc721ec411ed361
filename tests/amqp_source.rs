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
