//! Command-line interface: the bridge (default), `sim` and `demo`.
//!
//! The flags of EngFlow's example client work as aliases
//! (`--notification_queue_endpoint`, `--queue_name`, `--tls_certificate`,
//! `--tls_key`, `--token`, `--forward`), in `--flag=value` and
//! `--flag value` forms.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use evbridge_sinks::Sink;
use tracing::{error, info};

use crate::bridge::{self, BridgeConfig};
use crate::normalize::Topics;
use crate::ops::logging;
use crate::pb::es::replay_mode_options::ReplayMode;
use crate::pipeline::Limits;
use crate::shutdown;
use crate::sim::world::GenConfig;
use crate::sim::{self, Sim, SimConfig};
use crate::sources::{self, SourceConfig, SourceError};

const EXAMPLES: &str = "\
Examples:
  # See it work with no cluster: a simulated EngFlow cluster bridged to stdout
  evbridge demo

  # EngFlow to stdout, token from the environment (never on the command line)
  EVBRIDGE_TOKEN=... evbridge --source grpcs://cluster.example.com --sink stdout://

  # mTLS client certificate, events counted and discarded (load test)
  evbridge --source grpcs://cluster.example.com --tls-cert me.crt --tls-key me.key \\
           --sink 'blackhole://?interval=5'

  # Several sinks: an envelope is done only when every sink confirmed it
  evbridge --source grpc://127.0.0.1:8080 --sink stdout:// --sink none://

  # Kafka: AccelByte-style prefix, one partition per invocation, zstd
  evbridge --source grpcs://cluster.example.com \
           --sink 'kafka://k1:9092,k2:9092/{topic}?prefix=ci&compression=zstd'

  # RabbitMQ: routing keys like default.invocation_finished, persistent, confirmed
  evbridge --source grpcs://cluster.example.com \
           --sink 'amqp://bridge:PASSWORD@mq:5672/ci?exchange=builds&declare=true'

  # EngFlow's demo-server receivers (same as the example client's --forward)
  evbridge --source grpcs://cluster.example.com --forward localhost:50051

  # Rejected for good? Keep it somewhere instead of blocking its notification
  evbridge --source grpc://127.0.0.1:8080 --sink kafka://k1:9092 --dead-letter stdout://

  # A broker as the source: RabbitMQ queue (BonFIRE-style binding) into Kafka,
  # each delivery acknowledged only after Kafka confirmed it
  evbridge --source 'amqp://bridge:PASSWORD@mq:5672/ci?exchange=experiments&binding_key=experiment.%23&queue=to-kafka' \
           --sink 'kafka://k1:9092/experiments'

  # ...and the reverse: an AccelByte consumer group (ci.bridge) into RabbitMQ,
  # offsets committed only after RabbitMQ confirmed, as CloudEvents
  evbridge --source 'kafka://k1:9092/events?group=bridge&prefix=ci&offset=earliest' \
           --sink 'amqp://bridge:PASSWORD@mq/ci?exchange=events&cloudevents=binary'

  # A local simulated cluster, for tests and benchmarks
  evbridge sim --listen 127.0.0.1:8080 --builds 100 --token secret

  # As a service: settings in a file, Prometheus metrics and health probes
  evbridge --config /etc/evbridge/evbridge.toml --metrics-listen 0.0.0.0:9598

  # Check a configuration: connect to the source and every sink, report, exit
  evbridge --config /etc/evbridge/evbridge.toml --check

Sink URLs:
  stdout://[?format=json|pretty]      one JSON object per line (or indented)
  blackhole://[?interval=S&rate=N]    count and discard; rate line every S s; at most N/s
  none://                             same as blackhole://
  kafka://HOST:PORT[,HOST:PORT...]/TOPIC[?prefix=P&key=K&acks=A&compression=C&rdkafka.PROP=V]
  amqp[s]://USER:PASS@HOST:PORT/VHOST?exchange=E[&routing_key=T&declare=true|passive]
  kafka and amqp also take cloudevents=binary|structured[&ce_source=T&ce_type=T] (amqp: &ce_prefix=P)
  grpc[s]://HOST:PORT[?window=N&ordered=true&timeout=S&ca=PATH]

Source URLs (--source):
  grpc[s]://HOST[:PORT]               an EngFlow cluster's notification queue (--queue)
  kafka://HOST:PORT[,...]/TOPIC?group=G[&prefix=P&offset=earliest|latest&name=EVENT&rdkafka.PROP=V]
  amqp[s]://USER:PASS@HOST:PORT/VHOST?exchange=E[&binding_key=K[,K...]&queue=Q&prefetch=N&name=EVENT]
  (passwords in URLs are never logged, but command lines are visible to other local users)

Configuration file (--config FILE, TOML): every key is a long flag, e.g.
  source = \"grpcs://cluster.example.com\"
  token_file = \"/etc/evbridge/token\"
  sink = [\"kafka://k1:9092/{topic}\", \"amqp://bridge:${RABBITMQ_PASSWORD}@mq/ci?exchange=builds\"]
  metrics_listen = \"0.0.0.0:9598\"
${NAME} is read from the environment; flags on the command line win over the file.
";

/// evbridge: bridge EngFlow build events to sinks, never losing one.
#[derive(Debug, Parser)]
#[command(name = "evbridge", version, after_help = EXAMPLES, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    bridge: BridgeArgs,
    /// Log lines as human-readable text or one JSON object per line (stderr; RUST_LOG filters).
    #[arg(long, global = true, value_enum, default_value_t = logging::Format::Text)]
    log_format: logging::Format,
}

impl Cli {
    /// How log lines should look.
    pub fn log_format(&self) -> logging::Format {
        self.log_format
    }
}

/// Parses the command line, reading `--config FILE` as the flags it
/// stands for (see `config`): flags on the command line and values from
/// the environment win over the file. `--help`, `--version` and usage
/// errors exit here, as clap does.
pub fn parse_args(args: Vec<OsString>) -> Result<Cli, Failure> {
    let cmd = Cli::command();
    let matches = cmd
        .clone()
        .try_get_matches_from(&args)
        .unwrap_or_else(|e| e.exit());
    let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
        return Cli::from_arg_matches(&matches).map_err(|e| Failure::usage(e.to_string()));
    };
    let in_file = |m: String| Failure::usage(format!("config file `{}`: {m}", path.display()));
    let raw = read_file("--config", &path)?;
    let text = String::from_utf8(raw).map_err(|_| in_file("not UTF-8 text".into()))?;
    let given = |id: &str| {
        matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let flags =
        crate::config::flags_from_toml(&text, &cmd, &given, &|name| std::env::var(name).ok())
            .map_err(in_file)?;
    let mut merged = args;
    let rest = merged.split_off(1.min(merged.len()));
    merged.extend(flags.into_iter().map(OsString::from));
    merged.extend(rest);
    let matches = cmd.try_get_matches_from(merged).map_err(|e| {
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or("invalid value");
        in_file(first.trim_start_matches("error: ").to_string())
    })?;
    Cli::from_arg_matches(&matches).map_err(|e| Failure::usage(e.to_string()))
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a simulated EngFlow cluster (notification queue + event store).
    Sim(SimArgs),
    /// Start a simulated cluster in-process and bridge it to stdout.
    Demo(DemoArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Replay {
    /// Replay what is stored, then stop.
    StopAfterLastKnown,
    /// Replay, then follow live events until the invocation completes.
    UntilComplete,
}

/// Flags of the bridge itself.
#[derive(Debug, Args)]
struct BridgeArgs {
    /// EngFlow cluster (grpc[s]://HOST[:PORT]) or a broker (kafka://…, amqp[s]://…; see below).
    #[arg(long, alias = "notification_queue_endpoint", value_name = "URL")]
    source: Option<String>,
    /// Notification queue to pull.
    #[arg(
        long,
        alias = "queue_name",
        value_name = "NAME",
        default_value = "eventstore/lifecycle-events"
    )]
    queue: String,
    /// Sink URL; repeat for several (default stdout://).
    #[arg(long = "sink", value_name = "URL")]
    sinks: Vec<String>,
    /// Sink URL for envelopes a sink rejected for good (with the reason);
    /// without it their notifications stay unacknowledged.
    #[arg(long, value_name = "URL")]
    dead_letter: Option<String>,
    /// Forward to an EngFlow demo-server receiver (same as --sink grpc://…).
    #[arg(long, value_name = "URL")]
    forward: Vec<String>,
    /// Auth token (prefer EVBRIDGE_TOKEN or --token-file: command lines are
    /// visible to other local users).
    #[arg(
        long,
        env = "EVBRIDGE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<Secret>,
    /// File holding the auth token.
    #[arg(long, value_name = "PATH", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS.
    #[arg(
        long,
        alias = "tls_certificate",
        value_name = "PATH",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    #[arg(long, alias = "tls_key", value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate (PEM) to trust instead of the system roots.
    #[arg(long, value_name = "PATH")]
    tls_ca: Option<PathBuf>,
    /// Acknowledgement window asked of the server, in seconds (30–300).
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(30..=300))]
    ack_deadline: u64,
    /// Concurrent Pull streams sharing the queue.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    readers: u64,
    /// How GetInvocation replays an invocation's events.
    #[arg(long, value_enum, default_value_t = Replay::StopAfterLastKnown)]
    replay: Replay,
    /// Envelopes not yet confirmed by every sink, at most (bounds memory).
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    max_in_flight: u64,
    /// Bytes of envelope JSON not yet confirmed by every sink, at most (e.g. 256MiB, 1GB):
    /// bounds memory when events are large. A larger envelope passes alone.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = in_flight_bytes)]
    max_in_flight_bytes: usize,
    /// Notifications handled at once, at most (bounds redelivery after a crash).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_notifications: u64,
    /// Largest gRPC message taken from the queue and the event store (e.g. 128MiB, 20MB, 1048576).
    /// Bazel events reach tens of MiB; a larger one fails its invocation with a clear error.
    #[arg(long, value_name = "SIZE", default_value = "128MiB", value_parser = evbridge_sinks::parse_size)]
    max_message_size: usize,
    /// Failed attempts after which a notification is given up: sent to --dead-letter as
    /// undeliverable_notification (or logged whole) and acknowledged. 0 = never.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=1000))]
    max_attempts: u32,
    /// Envelopes per sink call, at most.
    #[arg(long, value_name = "N", default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_batch: u64,
    /// Batches in flight per sink (envelopes with the same key share a lane, in order).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    sink_lanes: u64,
    /// On SIGINT/SIGTERM, how long to finish in-flight work before giving up on it.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    shutdown_timeout: f64,
    /// Topic of lifecycle envelopes.
    #[arg(long, value_name = "NAME", default_value = "lifecycle")]
    lifecycle_topic: String,
    /// Topic of build-event envelopes.
    #[arg(long, value_name = "NAME", default_value = "build-events")]
    build_events_topic: String,
    /// Read settings from this TOML file (keys are the long flags; flags given here win).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Connect to the source and every sink, report their health, and exit (0 if all are healthy).
    #[arg(long)]
    check: bool,
    /// Serve /metrics (Prometheus), /healthz and /readyz on this address.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Seconds between health checks of each sink (readiness follows them).
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    health_interval: f64,
    /// Seconds between one-line stats summaries in the log (0 = none).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    stats_interval: f64,
}

/// Flags of `evbridge sim`.
#[derive(Debug, Args)]
struct SimArgs {
    /// Address to listen on (port 0 picks a free one; the bound address is printed).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    world: WorldArgs,
    /// Notifications released per second (0 = all at start).
    #[arg(long, value_name = "PER_SECOND", default_value_t = 0.0)]
    rate: f64,
    /// Require this token on every call (else UNAUTHENTICATED).
    #[arg(
        long,
        env = "EVBRIDGE_SIM_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<Secret>,
    /// Serve TLS with this certificate (PEM)…
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// …and this private key (PEM).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mTLS).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// End each Pull stream with UNAVAILABLE after it received K acknowledgements.
    #[arg(long, value_name = "K", default_value_t = 0)]
    drop_stream_every: usize,
    /// End each GetInvocation stream with UNAVAILABLE after K events.
    #[arg(long, value_name = "K", default_value_t = 0)]
    drop_event_stream_every: usize,
    /// Override every reader's acknowledgement window (milliseconds).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    ack_window_ms: Option<u64>,
    /// Unacknowledged notifications per reader, at most.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_unacked_per_reader: usize,
    /// Also write the JSON report to this file (on exit and on SIGUSR1).
    #[arg(long, value_name = "PATH")]
    report_file: Option<PathBuf>,
    /// Exit once every notification was acknowledged.
    #[arg(long)]
    exit_when_acked: bool,
}

/// What the simulated cluster holds.
#[derive(Debug, Args)]
struct WorldArgs {
    /// Builds to generate (each has one or two invocations).
    #[arg(long, value_name = "N", default_value_t = 10)]
    builds: usize,
    /// Build events per invocation.
    #[arg(long, value_name = "M", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    events_per_invocation: u64,
    /// Seed of the generated content.
    #[arg(long, value_name = "S", default_value_t = 1)]
    seed: u64,
    /// EngFlow instance name.
    #[arg(long, value_name = "NAME", default_value = "default")]
    instance: String,
    /// Queue name served.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "eventstore/lifecycle-events"
    )]
    queue: String,
    /// After every K notifications add one whose payload does not decode.
    #[arg(long, value_name = "K", default_value_t = 0)]
    bad_payload_every: usize,
}

/// Flags of `evbridge demo`.
#[derive(Debug, Args)]
struct DemoArgs {
    #[command(flatten)]
    world: WorldArgs,
    /// Notifications released per second (0 = all at start).
    #[arg(long, value_name = "PER_SECOND", default_value_t = 20.0)]
    rate: f64,
    /// Where the envelopes go.
    #[arg(long = "sink", value_name = "URL", default_value = "stdout://")]
    sinks: Vec<String>,
}

/// A secret flag value (a token): its `Debug` shows `***`, so no debug
/// print of the parsed flags can reveal it.
#[derive(Clone)]
struct Secret(String);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A failure with the exit code it deserves (2: bad input, 1: runtime).
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// Reports it on stderr and gives the exit code.
    pub fn exit_code(&self) -> ExitCode {
        eprintln!("evbridge: {}", self.message);
        ExitCode::from(self.code)
    }

    fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<SourceError> for Failure {
    fn from(e: SourceError) -> Self {
        let code = match e {
            SourceError::Config(_) => 2,
            SourceError::Fatal(_) => 1,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path)
        .map_err(|e| Failure::usage(format!("cannot read {flag} `{}`: {e}", path.display())))
}

/// Warns when a file holding a secret (a token, a private key) can be read
/// by its group or by everyone.
fn warn_if_readable_by_others(flag: &str, path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "{flag} can be read by its group or by others; `chmod 600` it"
            );
        }
    }
}

/// Reads a PEM file and checks it holds a block of the expected kind
/// (`CERTIFICATE` or `PRIVATE KEY`), so a wrong file is a clear error at
/// start instead of an opaque TLS failure later. Contents never appear in
/// the message.
fn read_pem(flag: &str, path: &Path, kind: &str) -> Result<Vec<u8>, Failure> {
    let bytes = read_file(flag, path)?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{kind}-----")));
    if found {
        Ok(bytes)
    } else {
        Err(Failure::usage(format!(
            "{flag} `{}` holds no PEM {} (expected a `-----BEGIN …{kind}-----` block)",
            path.display(),
            kind.to_lowercase()
        )))
    }
}

/// Runs the parsed command line; returns the process exit code.
pub async fn main(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Some(Command::Sim(args)) => run_sim(args).await,
        Some(Command::Demo(args)) => run_demo(args).await,
        None => run_bridge(cli.bridge).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            error!("{}", f.message);
            f.exit_code()
        }
    }
}

mod demo;
mod run;

use self::demo::{run_demo, run_sim};
use self::run::{in_flight_bytes, open_sinks, run_bridge};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parsed_flags_never_debug_print_the_token() {
        let cli = Cli::parse_from(["evbridge", "--source", "grpc://h:1", "--token", "hunter2"]);
        let shown = format!("{cli:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }
}
