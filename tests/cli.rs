//! The real binary: `evbridge sim` and the bridge as separate processes,
//! EngFlow example-client flag aliases, exit codes, secrets.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::process::{SimProcess as Sim, spawn_sim as sim};

const BIN: &str = env!("CARGO_BIN_EXE_evbridge");

fn wait_with_deadline(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < limit,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn bridge(args: &[&str], envs: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.env_remove("EVBRIDGE_TOKEN");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Runs the binary to completion; a run that does not end in 30 s is
/// killed and fails the test instead of hanging it.
fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut child = bridge(args, envs);
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("evbridge {args:?} did not exit within 30s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Waits for the sim (started with --exit-when-acked) to finish; returns
/// its JSON report.
fn sim_report(mut s: Sim) -> serde_json::Value {
    let status = wait_with_deadline(&mut s.child, Duration::from_secs(60));
    assert!(status.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(s.child.stdout.as_mut().unwrap(), &mut rest).unwrap();
    serde_json::from_str(rest.lines().last().expect("report line")).unwrap()
}

#[test]
fn separate_processes_with_example_client_flags() {
    let s = sim(&[
        "--builds",
        "6",
        "--events-per-invocation",
        "4",
        "--exit-when-acked",
    ]);
    let endpoint = format!("--notification_queue_endpoint={}", s.url);
    let mut b = bridge(
        &[
            &endpoint,
            "--queue_name",
            "eventstore/lifecycle-events",
            "--sink",
            "stdout://",
        ],
        &[],
    );
    // Read stdout while it runs, or the pipe fills and the sink stalls.
    let mut stdout = b.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut all).unwrap();
        all
    });
    let report = sim_report(s);
    signal(&b, "-TERM");
    let status = wait_with_deadline(&mut b, Duration::from_secs(20));
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    let lines = reader.join().unwrap();
    let n =
        report["notifications"].as_u64().unwrap() + report["invocation_events"].as_u64().unwrap();
    assert_eq!(lines.lines().count() as u64, n, "one line per envelope");
    assert_eq!(report["acked"], report["notifications"]);
    for l in lines.lines() {
        serde_json::from_str::<serde_json::Value>(l).expect("JSON line");
    }
}

#[test]
fn token_required_then_taken_from_env_and_file() {
    let s = sim(&[
        "--builds",
        "2",
        "--events-per-invocation",
        "2",
        "--token",
        "t0ps3cret",
    ]);
    let start = Instant::now();
    let out = run(&["--source", &s.url, "--sink", "none://"], &[]);
    assert_eq!(out.status.code(), Some(1), "fatal at start");
    assert!(start.elapsed() < Duration::from_secs(10), "no retry storm");
    let err = String::from_utf8(out.stderr).unwrap();
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("evbridge: "))
        .collect();
    assert_eq!(ours.len(), 1, "{err}");
    assert!(ours[0].contains("Unauthenticated"), "{err}");

    let dir = std::env::temp_dir().join(format!("evbridge-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "t0ps3cret\n").unwrap();
    for envs in [vec![("EVBRIDGE_TOKEN", "t0ps3cret")], vec![]] {
        let mut args = vec!["--source", &s.url, "--sink", "none://"];
        if envs.is_empty() {
            args.extend(["--token-file", file.to_str().unwrap()]);
        }
        let mut b = bridge(&args, &envs);
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            b.try_wait().unwrap().is_none(),
            "authenticated bridge keeps running"
        );
        signal(&b, "-INT");
        let status = wait_with_deadline(&mut b, Duration::from_secs(20));
        assert!(status.success());
        let out = b.wait_with_output().unwrap();
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(!err.contains("t0ps3cret"), "token in logs: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_input_is_one_line_and_exit_code_2() {
    let junk = std::env::temp_dir().join(format!("evbridge-junk-{}.pem", std::process::id()));
    std::fs::write(&junk, "hunter2 is not a key\n").unwrap();
    let junk = junk.to_str().unwrap().to_string();
    let pem = std::env::temp_dir().join(format!("evbridge-ca-{}.pem", std::process::id()));
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let pem = pem.to_str().unwrap().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--source", "grpc://127.0.0.1:1", "--sink", "ftp://x"],
            "unknown scheme `ftp`",
        ),
        (
            &[
                "--source",
                "grpc://127.0.0.1:1",
                "--sink",
                "stdout://?format=xml",
            ],
            "format=xml",
        ),
        (
            &[
                "--source",
                "grpc://127.0.0.1:1",
                "--sink",
                "amqp://u:hunter2@h/v",
            ],
            "option `exchange` is required",
        ),
        (
            &["--source", "grpc://127.0.0.1:1", "--sink", "grpc://h"],
            "no port",
        ),
        (
            &[
                "--source",
                "grpc://127.0.0.1:1",
                "--sink",
                "kafka://b:1/t?rdkafka.sasl.password=hunter2&rdkafka.bogus=1",
            ],
            "librdkafka refused",
        ),
        (
            &["--source", "http://127.0.0.1:1"],
            "accepted forms: grpc://",
        ),
        (&["--source", "grpc://"], "has no host"),
        (&["--source", "grpc://h:1/path"], "must not have a path"),
        (
            &[
                "--source",
                "grpc://h:1",
                "--token-file",
                "/nonexistent/evbridge-token",
            ],
            "cannot read --token-file",
        ),
        (
            &["--source", "grpcs://h:1", "--tls-ca", "/nonexistent/ca.pem"],
            "cannot read --tls-ca",
        ),
        (
            &["--source", "grpc://h:1", "--tls-ca", &pem],
            "need a grpcs:// source",
        ),
        (
            &["--source", "grpc://h:1", "--ack-deadline", "10"],
            "30..=300",
        ),
        (&["--sink", "stdout://"], "no source"),
        (
            &[
                "--source",
                "grpcs://h:1",
                "--tls-cert",
                &junk,
                "--tls-key",
                &junk,
            ],
            "holds no PEM certificate",
        ),
        (
            &["--source", "grpcs://h:1", "--tls-ca", &junk],
            "holds no PEM certificate",
        ),
        (
            &["sim", "--tls-cert", &junk, "--tls-key", &junk],
            "holds no PEM certificate",
        ),
        (&["--source", "grpc://h:1", "--bogus-flag"], "--bogus-flag"),
        // Numbers that would overflow a duration, a semaphore or an
        // allocation are refused with their range, never a panic.
        (
            &["--source", "grpc://h:1", "--shutdown-timeout", "1e300"],
            "--shutdown-timeout must be a number of seconds from 0 to 31536000",
        ),
        (
            &["--source", "grpc://h:1", "--stats-interval", "NaN"],
            "--stats-interval must be a number of seconds",
        ),
        (
            &["--source", "grpc://h:1", "--health-interval", "inf"],
            "--health-interval must be",
        ),
        (
            &[
                "--source",
                "grpc://h:1",
                "--max-batch",
                "18446744073709551615",
            ],
            "1..=1000000",
        ),
        (
            &[
                "--source",
                "grpc://h:1",
                "--max-in-flight",
                "9223372036854775807",
            ],
            "1..=100000000",
        ),
        (
            &["--source", "grpc://h:1", "--max-notifications", "0"],
            "1..=1000000",
        ),
        (
            &["--source", "grpc://h:1", "--max-message-size", "12 parsecs"],
            "is not a size",
        ),
        (
            &[
                "--source",
                "grpc://h:1",
                "--sink",
                "blackhole://?rate=1e-20",
            ],
            "from 0.001",
        ),
        (
            &[
                "--source",
                "grpc://h:1",
                "--sink",
                "amqp://u:hunt/er2@h/v?exchange=e",
            ],
            "malformed",
        ),
        (
            &["sim", "--ack-window-ms", "18446744073709551615"],
            "1..=86400000",
        ),
        (
            &[
                "--source",
                "grpc://h:1",
                "--dead-letter",
                "stdout://?names=bazel_*",
            ],
            "--dead-letter `stdout://?names=bazel_*` takes no names= filter",
        ),
    ];
    for (args, want) in cases {
        let out = run(args, &[]);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: `{err}` lacks `{want}`");
        assert!(
            !err.contains("hunter2") && !err.contains("er2"),
            "{args:?}: secret leaked: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn help_shows_no_secret_values() {
    let out = run(&["--help"], &[("EVBRIDGE_TOKEN", "very-secret-value")]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("--notification_queue_endpoint") || help.contains("--source"));
    assert!(help.contains("Examples:"));
    assert!(!help.contains("very-secret-value"));
}

#[test]
fn demo_shows_envelopes_and_exits() {
    let out = run(
        &[
            "demo",
            "--builds",
            "3",
            "--events-per-invocation",
            "4",
            "--rate",
            "0",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|e| e["name"] == "invocation_finished"));
    assert!(
        lines
            .iter()
            .any(|e| e["name"].as_str().unwrap().starts_with("bazel_"))
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("done."), "{err}");
}

#[test]
fn settings_that_void_the_guarantee_or_expose_a_secret_are_warned_about() {
    let token_file =
        std::env::temp_dir().join(format!("evbridge-readable-token-{}", std::process::id()));
    std::fs::write(&token_file, "hunter2\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = run(
        &[
            "--source",
            "grpc://127.0.0.1:1",
            "--token-file",
            token_file.to_str().unwrap(),
            "--sink",
            "kafka://u:hunter2@127.0.0.1:1/t?acks=0",
            "--sink",
            "amqp://guest:guest@127.0.0.1:1/%2f?exchange=e&persistent=false&mandatory=false",
            "--check",
        ],
        &[],
    );
    let err = String::from_utf8(out.stderr).unwrap();
    for want in [
        "token is sent in clear text over grpc://",
        "SASL credentials are sent without TLS",
        "acks=0",
        "persistent=false",
        "mandatory=false",
        "--token-file can be read by its group or by others",
    ] {
        assert!(err.contains(want), "no `{want}` in: {err}");
    }
    assert!(!err.contains("hunter2"), "{err}");
    let _ = std::fs::remove_file(&token_file);
}
