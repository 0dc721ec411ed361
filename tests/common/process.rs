//! The real binary as a child process: `evbridge sim` on a free port, and
//! children that are killed when the test lets go of them.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A child process killed (and reaped) on drop, so a failing test leaves
/// nothing running.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `evbridge sim` on a free port and the URL it printed.
pub struct SimProcess {
    /// The process; its stdout carries the reports.
    pub child: Child,
    /// `grpc://127.0.0.1:PORT`.
    pub url: String,
}

impl SimProcess {
    /// The simulator's JSON report, asked for with SIGUSR1.
    pub fn report(&mut self) -> serde_json::Value {
        let ok = Command::new("kill")
            .args(["-USR1", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let mut line = String::new();
        BufReader::new(self.child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        serde_json::from_str(&line).unwrap()
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `evbridge sim --listen 127.0.0.1:0 ARGS` and reads its first
/// line for the bound URL.
pub fn spawn_sim(args: &[&str]) -> SimProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_evbridge"))
        .args(["sim", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("evbridge sim listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_string();
    SimProcess { child, url }
}

/// The bridge binary bridging `source` to `sink` plus a throttled
/// blackhole (`rate` envelopes/s), which keeps messages in flight long
/// enough for a fault to land mid-stream. Quiet unless it is given a log.
pub fn spawn_throttled(
    source: &str,
    sink: &str,
    rate: u32,
    log: Option<&std::path::Path>,
) -> Killed {
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
        None => Stdio::null(),
    };
    let child = Command::new(env!("CARGO_BIN_EXE_evbridge"))
        .args(["--source", source, "--sink", sink, "--sink"])
        .arg(format!("blackhole://?rate={rate}"))
        .args(["--stats-interval", "1"])
        .env("RUST_LOG", if log.is_some() { "info" } else { "error" })
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    Killed(child)
}
