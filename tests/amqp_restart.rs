//! RabbitMQ stopped (`rabbitmqctl stop_app`) and started again mid-run:
//! nothing acknowledged while it is down, nothing lost after. Alone in its
//! test binary because it stops the shared broker.

mod common;

use std::time::{Duration, Instant};

use common::rabbit::*;
use common::*;
use lapin::{Connection, ConnectionProperties};

const LONG: Duration = Duration::from_secs(90);

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
