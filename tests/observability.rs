//! Operations on the real binary: `/metrics` agrees with the simulator's
//! own report, `/readyz` follows the source and the sinks (not ready while
//! a broker is down, ready again when it returns), the stats line, JSON
//! logs, `--check` and the configuration file.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::brokers::free_port;
use common::http::{get, sample, wait_for};
use common::process::{Killed, spawn_sim};

const BIN: &str = env!("CARGO_BIN_EXE_evbridge");

fn bridge(args: &[&str], stderr: &std::path::Path) -> Killed {
    Killed(
        Command::new(BIN)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(stderr).unwrap())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn metrics_agree_with_the_simulator_and_readiness_follows_the_source() {
    let mut s = spawn_sim(&["--builds", "12", "--rate", "40"]);
    let port = free_port();
    let log = std::env::temp_dir().join(format!("evb-obs-{}.log", std::process::id()));
    let listen = format!("127.0.0.1:{port}");
    let mut b = bridge(
        &[
            "--source",
            &s.url,
            "--sink",
            "blackhole://",
            "--metrics-listen",
            &listen,
            "--stats-interval",
            "0.2",
            "--log-format",
            "json",
        ],
        &log,
    );
    wait_for(port, "/healthz", "healthz", |st, b| {
        st == 200 && b == "ok\n"
    });
    wait_for(port, "/readyz", "ready", |st, _| st == 200);

    // Everything acknowledged, by the simulator's count.
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let r = s.report();
        if r["acked"] == r["notifications"] || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let n = report["notifications"].as_u64().unwrap() as f64;
    assert_eq!(report["acked"].as_u64().unwrap() as f64, n, "{report}");
    let events = report["invocation_events"].as_u64().unwrap() as f64;
    // The last acks may still be on their way to the metrics.
    let m = wait_for(port, "/metrics", "all acks counted", |_, m| {
        sample(m, "evbridge_notifications_acked_total") >= n
    });
    let delivered = report["delivered"].as_u64().unwrap() as f64;
    assert_eq!(
        sample(&m, "evbridge_notifications_received_total"),
        delivered
    );
    assert_eq!(sample(&m, "evbridge_notifications_acked_total"), n);
    assert_eq!(
        sample(&m, "evbridge_notifications_redelivered_total"),
        report["redelivered"].as_u64().unwrap() as f64
    );
    assert_eq!(sample(&m, "evbridge_build_events_received_total"), events);
    assert_eq!(
        sample(&m, "evbridge_build_events_received_total"),
        report["events_served"].as_u64().unwrap() as f64
    );
    let sent = sample(
        &m,
        r#"evbridge_sink_envelopes_sent_total{sink="blackhole://",role="sink"}"#,
    );
    assert_eq!(sent, n + events);
    assert_eq!(sample(&m, "evbridge_envelopes_submitted_total"), n + events);
    assert_eq!(sample(&m, "evbridge_source_reconnects_total"), 0.0);
    assert_eq!(sample(&m, "evbridge_envelopes_in_flight"), 0.0);
    assert_eq!(sample(&m, "evbridge_notifications_in_progress"), 0.0);
    assert_eq!(sample(&m, "evbridge_source_up"), 1.0);
    assert_eq!(
        sample(&m, r#"evbridge_sink_up{sink="blackhole://",role="sink"}"#),
        1.0
    );
    assert_eq!(sample(&m, "evbridge_ack_latency_seconds_count"), n);
    assert!(m.contains("# TYPE evbridge_sink_send_duration_seconds histogram"));

    // The source goes away: not ready, and the reason names it.
    drop(s);
    let body = wait_for(port, "/readyz", "not ready without source", |st, _| {
        st == 503
    });
    assert!(body.contains("source"), "{body}");
    let m = get(port, "/metrics").unwrap().1;
    assert_eq!(sample(&m, "evbridge_source_up"), 0.0);
    wait_for(port, "/metrics", "reconnect attempts counted", |_, m| {
        sample(m, "evbridge_source_reconnects_total") >= 1.0
    });
    let _ = Command::new("kill")
        .args(["-TERM", &b.0.id().to_string()])
        .status();
    let status = b.0.wait().unwrap();
    assert!(status.success(), "{status}");

    // JSON log lines, among them the periodic stats line.
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let stats = lines
        .iter()
        .find(|l| l["message"] == "stats")
        .expect("a stats line");
    for field in [
        "notifications_per_s",
        "envelopes_out_per_s",
        "in_flight",
        "lag",
    ] {
        assert!(stats.get(field).is_some(), "{stats}");
    }
}

#[cfg(feature = "kafka")]
#[test]
fn readiness_flips_while_the_kafka_broker_is_down() {
    let mut tansu = common::brokers::Tansu::start();
    let s = spawn_sim(&["--builds", "3", "--rate", "2"]);
    let port = free_port();
    let log = std::env::temp_dir().join(format!("evb-ready-{}.log", std::process::id()));
    let sink = format!("kafka://{}/evb-ready", tansu.bootstrap());
    let listen = format!("127.0.0.1:{port}");
    let _b = bridge(
        &[
            "--source",
            &s.url,
            "--sink",
            &sink,
            "--metrics-listen",
            &listen,
            "--health-interval",
            "0.5",
        ],
        &log,
    );
    wait_for(port, "/readyz", "ready", |st, _| st == 200);

    tansu.kill();
    let body = wait_for(
        port,
        "/readyz",
        "not ready with the broker down",
        |st, _| st == 503,
    );
    assert!(body.contains("kafka://"), "{body}");
    let m = get(port, "/metrics").unwrap().1;
    assert!(
        m.lines().any(|l| l.starts_with("evbridge_sink_up{")
            && l.contains("kafka://")
            && l.ends_with(" 0")),
        "{m}"
    );

    tansu.restart();
    wait_for(port, "/readyz", "ready again", |st, _| st == 200);
    let _ = std::fs::remove_file(&log);
}

#[test]
fn check_and_the_configuration_file() {
    let s = spawn_sim(&["--builds", "1"]);
    let dir = std::env::temp_dir().join(format!("evb-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("evbridge.toml");
    std::fs::write(
        &file,
        format!(
            "source = \"{}\"\nsink = [\"blackhole://\", \"${{EVB_SECOND_SINK}}\"]\nmax_in_flight = 100\n",
            s.url
        ),
    )
    .unwrap();
    let run = |extra: &[&str], env: Option<&str>| {
        let mut c = Command::new(BIN);
        c.arg("--config").arg(&file).args(extra).arg("--check");
        match env {
            Some(v) => c.env("EVB_SECOND_SINK", v),
            None => c.env_remove("EVB_SECOND_SINK"),
        };
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    let (code, out, err) = run(&[], Some("stdout://"));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("ok      source grpc://"), "{out}");
    assert!(out.contains("ok      sink blackhole://") && out.contains("ok      sink stdout://"));

    // The variable the file needs is missing: a usage error naming it.
    let (code, _, err) = run(&[], None);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("EVB_SECOND_SINK") && err.contains("is not set"),
        "{err}"
    );

    // Flags on the command line win over the file: this source is down,
    // and --check says so with exit 1.
    let (code, out, _) = run(&["--source", "grpc://127.0.0.1:1"], Some("stdout://"));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAILED  source grpc://127.0.0.1:1"), "{out}");

    // A value the flag would refuse is refused in the file too.
    std::fs::write(&file, "source = \"grpc://x\"\nmax_in_flight = \"lots\"\n").unwrap();
    let (code, _, err) = run(&[], None);
    assert_eq!(code, Some(2));
    assert!(err.contains("config file") && err.contains("lots"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
