//! Shared harness: a simulator on loopback, the real bridge in-process,
//! and a `stdout://`-format sink writing into memory.

#![allow(dead_code)]

pub mod brokers;
pub mod fake;
pub mod http;
pub mod pki;
pub mod process;
#[cfg(feature = "amqp")]
pub mod rabbit;

#[allow(unused_imports)]
pub use fake::FakeSink;

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use evbridge::bridge::{self, BridgeConfig, Summary};
use evbridge::shutdown::{self, Trigger};
use evbridge::sim::{self, Sim, SimConfig};
use evbridge::sinks::{Format, Sink, WriterSink};
use evbridge::sources::{SourceConfig, SourceError};
use serde_json::Value;

/// An in-memory writer whose contents the test can read while the sink
/// owns it.
#[derive(Clone, Default)]
pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

impl tokio::io::AsyncWrite for SharedBuf {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl SharedBuf {
    /// Every JSON line written so far.
    pub fn envelopes(&self) -> Vec<Value> {
        let data = self.0.lock().unwrap().clone();
        String::from_utf8(data)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
            .collect()
    }

    /// Raw lines written so far.
    pub fn lines(&self) -> Vec<String> {
        let data = self.0.lock().unwrap().clone();
        String::from_utf8(data)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// A memory-backed stdout sink and the buffer it writes to.
pub fn capture() -> (Arc<dyn Sink>, SharedBuf) {
    let buf = SharedBuf::default();
    (Arc::new(WriterSink::new(buf.clone(), Format::Json)), buf)
}

pub struct RunningSim {
    pub sim: Arc<Sim>,
    pub url: String,
    _trigger: Trigger,
}

/// Starts a simulator on 127.0.0.1:0.
pub async fn start_sim(cfg: SimConfig) -> RunningSim {
    start_sim_tls(cfg, None).await
}

pub async fn start_sim_tls(
    cfg: SimConfig,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> RunningSim {
    start_sim_tls_with(Sim::new(cfg), tls).await
}

/// Starts a simulator made by hand (`Sim::with_world`) on 127.0.0.1:0.
pub async fn start_sim_with(sim: Arc<Sim>) -> RunningSim {
    start_sim_tls_with(sim, None).await
}

async fn start_sim_tls_with(
    sim: Arc<Sim>,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> RunningSim {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = shutdown::channel();
    let scheme = if tls.is_some() { "grpcs" } else { "grpc" };
    tokio::spawn(sim::serve(listener, sim.clone(), tls, shutdown));
    RunningSim {
        sim,
        url: format!("{scheme}://{addr}"),
        _trigger: trigger,
    }
}

pub fn bridge_config(url: &str) -> BridgeConfig {
    let mut source = SourceConfig::new(url);
    source.shutdown_grace = Duration::from_secs(5);
    BridgeConfig::new(source)
}

/// Runs the bridge until the simulator saw every notification acked (or
/// the deadline passes), then shuts it down gracefully.
pub async fn run_until_acked(
    sim: &Arc<Sim>,
    cfg: BridgeConfig,
    sinks: Vec<Arc<dyn Sink>>,
    deadline: Duration,
) -> Result<Summary, SourceError> {
    let (trigger, shutdown) = shutdown::channel();
    let bridge = tokio::spawn(bridge::run(cfg, sinks, shutdown));
    let start = tokio::time::Instant::now();
    while !sim.all_acked() && start.elapsed() < deadline && !bridge.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    trigger.fire();
    bridge.await.unwrap()
}

/// Build-event envelopes grouped by invocation, in output order, as
/// sequence numbers.
pub fn sequences(envelopes: &[Value]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in envelopes.iter().filter(|e| e["topic"] == "build-events") {
        let inv = e["attributes"]["invocation_id"]
            .as_str()
            .unwrap()
            .to_string();
        let seq = e["attributes"]["sequence"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        out.entry(inv).or_default().push(seq);
    }
    out
}

/// Asserts every notification and every build event of the simulator's
/// world is among `envelopes`, each invocation's events first seen in
/// order, and every repeat of an id byte-identical to its first copy.
pub fn assert_complete(sim: &Sim, lines: &[String]) {
    check_complete(sim, lines, true);
}

/// Like [`assert_complete`], for sinks that do not promise order.
pub fn assert_all_present(sim: &Sim, lines: &[String]) {
    check_complete(sim, lines, false);
}

fn check_complete(sim: &Sim, lines: &[String], ordered: bool) {
    let envelopes: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let world = sim.world();
    let mut by_id: HashMap<String, &String> = HashMap::new();
    for (line, e) in lines.iter().zip(&envelopes) {
        let id = e["id"].as_str().unwrap().to_string();
        if let Some(first) = by_id.insert(id.clone(), line) {
            assert_eq!(first, line, "envelope {id} differs between deliveries");
        }
    }
    let lifecycle: HashMap<&str, &Value> = envelopes
        .iter()
        .filter(|e| e["topic"] == "lifecycle")
        .map(|e| (e["attributes"]["notification_id"].as_str().unwrap(), e))
        .collect();
    for n in &world.notifications {
        assert!(
            lifecycle.contains_key(n.id.as_str()),
            "notification {} lost",
            n.id
        );
    }
    let seqs = sequences(&envelopes);
    for inv in &world.invocations {
        let got = seqs
            .get(&inv.id)
            .unwrap_or_else(|| panic!("invocation {} lost", inv.id));
        let mut first_seen = first_seen(got);
        let want: Vec<u64> = (0..inv.events.len() as u64).collect();
        if !ordered {
            first_seen.sort_unstable();
        }
        assert_eq!(
            first_seen, want,
            "invocation {}: events missing or out of order",
            inv.id
        );
    }
}

/// Counts of each envelope id.
pub fn id_counts(envelopes: &[Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for e in envelopes {
        *counts
            .entry(e["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

pub fn sim_config(builds: usize, events: usize) -> SimConfig {
    let mut cfg = SimConfig::default();
    cfg.gen_config.builds = builds;
    cfg.gen_config.events_per_invocation = events;
    cfg
}

/// Waits until `buf` holds `ids` distinct envelope ids (or `limit`
/// passed) and returns every envelope in it.
pub async fn wait_for(buf: &SharedBuf, ids: usize, limit: Duration) -> Vec<Value> {
    let start = std::time::Instant::now();
    loop {
        let got = buf.envelopes();
        let distinct: std::collections::HashSet<_> =
            got.iter().map(|e| e["id"].to_string()).collect();
        if distinct.len() >= ids || start.elapsed() > limit {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Makes event `at` of `inv` a Bazel progress event of at least `bytes`
/// bytes of console output (as huge as real ones get).
pub fn make_progress(inv: &mut evbridge::sim::world::GenInvocation, at: usize, bytes: usize) {
    use evbridge::pb::{self, bep, bes};
    use prost::Message;
    let line = "[1,024 / 3,311] Compiling server/api/handlers.cc; 3s remote\n";
    let event = bep::BuildEvent {
        id: Some(bep::BuildEventId {
            id: Some(bep::build_event_id::Id::Progress(
                bep::build_event_id::ProgressId { opaque_count: 7 },
            )),
        }),
        payload: Some(bep::build_event::Payload::Progress(bep::Progress {
            stdout: line.repeat(bytes / line.len() + 1),
            stderr: String::new(),
        })),
        ..Default::default()
    };
    let be = inv.events[at]
        .event
        .as_mut()
        .unwrap()
        .build_event
        .as_mut()
        .unwrap();
    be.event = Some(bes::build_event::Event::BazelEvent(prost_types::Any {
        type_url: pb::BAZEL_EVENT_TYPE_URL.into(),
        value: event.encode_to_vec(),
    }));
}

/// A length-delimited protobuf field, for hand-made wire bytes.
pub fn ld(field: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// Points `n` (an `invocation_finished` notification) at `invocation`.
pub fn retarget(n: &mut evbridge::pb::nq::Notification, invocation: &str) {
    use evbridge::pb::es::BuildLifecycleEventNotification as Lifecycle;
    use evbridge::pb::es::build_lifecycle_event_notification::{InvocationFinished, Kind};
    use prost::Message;
    let any = n.payload.as_mut().unwrap();
    let mut l = Lifecycle::decode(any.value.as_slice()).unwrap();
    l.kind = Some(Kind::InvocationFinished(InvocationFinished {
        invocation_id: invocation.into(),
    }));
    any.value = l.encode_to_vec();
}

/// An envelope `id` keyed `k0` whose payload is a JSON string of `body`
/// bytes.
pub fn sized_envelope(id: &str, body: usize) -> evbridge::sinks::Envelope {
    evbridge::sinks::Envelope::new(evbridge::sinks::Event {
        id: id.into(),
        name: "test".into(),
        namespace: "default".into(),
        timestamp: "2026-11-25T00:00:00Z".into(),
        version: 1,
        topic: "t".into(),
        key: "k0".into(),
        attributes: Default::default(),
        payload: evbridge::sinks::Payload::trusted(format!("\"{}\"", "x".repeat(body))),
    })
}

/// Sequence numbers in the order they first appear (repeats dropped).
pub fn first_seen(seqs: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for s in seqs {
        if !out.contains(s) {
            out.push(*s);
        }
    }
    out
}
