//! Reliability and security checks on the real binary: memory stays
//! bounded behind a stalled sink while the pull pauses, and secrets never
//! reach the output, even at trace level.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::process::{Killed as Proc, spawn_sim as sim};

const BIN: &str = env!("CARGO_BIN_EXE_evbridge");

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_stalled_sink_bounds_memory_and_pauses_the_pull() {
    // 120,000+ envelopes available at once, no per-reader cap to help.
    let mut s = sim(&[
        "--builds",
        "4000",
        "--events-per-invocation",
        "25",
        "--max-unacked-per-reader",
        "1000000",
    ]);
    // stdout:// into a pipe nobody reads: the sink stalls once the pipe
    // buffer is full.
    let bridge = Proc(
        Command::new(BIN)
            .args([
                "--source",
                &s.url,
                "--sink",
                "stdout://",
                "--max-in-flight",
                "2000",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = bridge.0.id();
    let start = Instant::now();
    let mut peak = 0;
    let mut earlier = None;
    while start.elapsed() < Duration::from_secs(12) {
        peak = peak.max(rss_kib(pid));
        if earlier.is_none() && start.elapsed() > Duration::from_secs(6) {
            earlier = Some(s.report()["delivered"].as_u64().unwrap());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = s.report();
    let delivered = report["delivered"].as_u64().unwrap();
    let notifications = report["notifications"].as_u64().unwrap();
    eprintln!(
        "stalled sink: peak RSS {:.1} MiB; {delivered} of {notifications} notifications pulled \
         (in flight <= 2000, the rest waits in the HTTP/2 stream window)",
        peak as f64 / 1024.0
    );
    assert!(peak > 0, "RSS was read");
    assert!(peak <= 100 * 1024, "peak RSS {peak} KiB > 100 MiB");
    // The pull paused: nothing more was pulled in the last six seconds,
    // and most notifications were never pulled.
    assert_eq!(Some(delivered), earlier, "the pull kept going");
    assert!(
        delivered < notifications / 2,
        "pulled {delivered} of {notifications}"
    );
    assert!(notifications > 15_000);
}

#[test]
fn secrets_never_reach_logs_or_errors_even_at_trace_level() {
    let s = sim(&["--builds", "3", "--token", "tok-SECRET-4711"]);
    let url = s.url.clone();
    let kafka = "kafka://127.0.0.1:1/t?rdkafka.security.protocol=sasl_plaintext\
                 &rdkafka.sasl.mechanism=PLAIN&rdkafka.sasl.username=u\
                 &rdkafka.sasl.password=kafka-SECRET-0815";
    let amqp = "amqp://evb:amqp-SECRET-1234@127.0.0.1:5672/%2f?exchange=evb-none";
    let port = common::brokers::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .args(["--source", &url, "--sink", kafka, "--sink", amqp])
        .args(["--metrics-listen", &listen, "--stats-interval", "0.5"])
        .env("EVBRIDGE_TOKEN", "tok-SECRET-4711")
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let readers = (
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        }),
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        }),
    );
    std::thread::sleep(Duration::from_secs(5));
    // The endpoint names both sinks (unhealthy) without their secrets.
    let mut scraped = String::new();
    for path in ["/metrics", "/readyz"] {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(&mut conn, format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .unwrap();
        conn.read_to_string(&mut scraped).unwrap();
    }
    assert!(
        scraped.contains("evbridge_sink_up{sink=\"kafka://") && scraped.contains("amqp://evb:***@"),
        "{scraped}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let stdout = readers.0.join().unwrap();
    let stderr = readers.1.join().unwrap();
    assert!(stderr.len() > 10_000, "trace logging produced output");
    for text in [&stdout, &stderr, &scraped] {
        assert!(!text.contains("SECRET"), "a secret leaked: {}", {
            let at = text.find("SECRET").unwrap();
            &text[at.saturating_sub(200)..(at + 50).min(text.len())]
        });
    }
}
