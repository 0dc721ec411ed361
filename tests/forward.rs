//! The gRPC forward sink against an in-test Forwarding receiver over real
//! gRPC, and fan-out to several sinks.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use evbridge::pb::forward::forwarding_server::{Forwarding, ForwardingServer};
use evbridge::pb::forward::{EngFlowRequest, EngFlowResponse};
use tonic::{Request, Response, Status};

const LONG: Duration = Duration::from_secs(60);

/// A receiver that records requests; it can fail the first calls, reject
/// some envelope names for good, or hold replies until released.
#[derive(Default)]
struct Receiver {
    got: Mutex<Vec<EngFlowRequest>>,
    calls: AtomicUsize,
    fail_first: usize,
    reject_name: Option<&'static str>,
    hold: Option<Arc<tokio::sync::Semaphore>>,
}

/// The service handle (the trait is foreign, so not on `Arc` directly).
struct Shared(Arc<Receiver>);

#[tonic::async_trait]
impl Forwarding for Shared {
    async fn forward_stream(
        &self,
        request: Request<EngFlowRequest>,
    ) -> Result<Response<EngFlowResponse>, Status> {
        let this = &self.0;
        if this.calls.fetch_add(1, Ordering::SeqCst) < this.fail_first {
            return Err(Status::unavailable("warming up"));
        }
        let r = request.into_inner();
        if let Some(name) = this.reject_name {
            let v: serde_json::Value = serde_json::from_str(&r.payload)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if v["name"] == name {
                return Err(Status::invalid_argument(format!("we do not take {name}")));
            }
        }
        if let Some(hold) = &this.hold {
            let _p = hold.acquire().await.unwrap();
        }
        this.got.lock().unwrap().push(r);
        Ok(Response::new(EngFlowResponse {
            message: "ok".into(),
        }))
    }
}

async fn serve(receiver: Arc<Receiver>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ForwardingServer::new(Shared(receiver)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("grpc://{addr}")
}

fn payload_lines(r: &Receiver) -> Vec<String> {
    r.got
        .lock()
        .unwrap()
        .iter()
        .map(|q| q.payload.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_envelope_arrives_with_its_id_and_json() {
    let receiver = Arc::new(Receiver::default());
    let url = serve(receiver.clone()).await;
    let s = start_sim(sim_config(10, 8)).await;
    let sink = evbridge::sinks::open(&url).await.unwrap();
    sink.healthcheck().await.expect("receiver reachable");
    run_until_acked(&s.sim, bridge_config(&s.url), vec![sink], LONG)
        .await
        .unwrap();
    assert!(s.sim.all_acked());
    let got = receiver.got.lock().unwrap().clone();
    let report = s.sim.report();
    assert_eq!(got.len(), report.notifications + report.invocation_events);
    for r in &got {
        let v: serde_json::Value =
            serde_json::from_str(&r.payload).expect("payload is the envelope JSON");
        assert_eq!(v["id"], r.id.as_str());
    }
    // Concurrent calls (ordered=false) may arrive in any order.
    assert_all_present(&s.sim, &payload_lines(&receiver));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_at_first_loses_nothing_and_ordered_keeps_order() {
    let receiver = Arc::new(Receiver {
        fail_first: 25,
        ..Default::default()
    });
    let url = serve(receiver.clone()).await;
    let s = start_sim(sim_config(8, 12)).await;
    let sink = evbridge::sinks::open(&format!("{url}?ordered=true"))
        .await
        .unwrap();
    let summary = run_until_acked(&s.sim, bridge_config(&s.url), vec![sink], LONG)
        .await
        .unwrap();
    assert!(s.sim.all_acked());
    assert!(summary.retries > 0, "{summary:?}");
    let lines = payload_lines(&receiver);
    assert_complete(&s.sim, &lines);
    // ordered=true: each invocation's events reached the receiver in order.
    let envelopes: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (inv, seqs) in sequences(&envelopes) {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{inv}: {seqs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_is_permanent_and_keeps_the_notification() {
    let receiver = Arc::new(Receiver {
        reject_name: Some("build_started"),
        ..Default::default()
    });
    let url = serve(receiver.clone()).await;
    let s = start_sim(sim_config(4, 3)).await;
    let sink = evbridge::sinks::open(&url).await.unwrap();
    let summary = run_until_acked(
        &s.sim,
        bridge_config(&s.url),
        vec![sink],
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    let report = s.sim.report();
    assert_eq!(summary.rejected as usize, report.builds, "{summary:?}");
    assert_eq!(report.queue.acked, report.notifications - report.builds);
    assert_eq!(summary.retries, 0, "permanent errors are not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_acks_only_after_every_sink_confirmed() {
    let hold = Arc::new(tokio::sync::Semaphore::new(0));
    let receiver = Arc::new(Receiver {
        hold: Some(hold.clone()),
        ..Default::default()
    });
    let url = serve(receiver.clone()).await;
    let s = start_sim(sim_config(6, 5)).await;
    let forward = evbridge::sinks::open(&url).await.unwrap();
    let (stdout, out) = capture();
    let hole = Arc::new(evbridge::sinks::Blackhole::new());
    let (trigger, shutdown) = evbridge::shutdown::channel();
    let bridge = tokio::spawn(evbridge::bridge::run(
        bridge_config(&s.url),
        vec![forward, stdout, hole.clone()],
        shutdown,
    ));
    // stdout and the blackhole confirm at once; the receiver holds every
    // reply, so nothing may be acknowledged yet.
    let start = Instant::now();
    while out.lines().is_empty() && start.elapsed() < LONG {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!out.lines().is_empty() && hole.count() > 0);
    assert_eq!(
        s.sim.report().queue.acked,
        0,
        "acked before the forward sink confirmed"
    );
    hold.add_permits(1_000_000);
    while !s.sim.all_acked() && start.elapsed() < LONG {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    trigger.fire();
    bridge.await.unwrap().unwrap();
    assert!(s.sim.all_acked());
    assert_all_present(&s.sim, &payload_lines(&receiver));
    assert_complete(&s.sim, &out.lines());
    let ids: HashSet<String> = receiver
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(hole.count() as usize, ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forward_flag_of_the_example_client_works() {
    let receiver = Arc::new(Receiver::default());
    let url = serve(receiver.clone()).await;
    let s = start_sim(sim_config(3, 4)).await;
    let addr = url.trim_start_matches("grpc://").to_string();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_evbridge"))
        .args([
            format!("--notification_queue_endpoint={}", s.url),
            "--forward".into(),
            addr,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !s.sim.all_acked() && start.elapsed() < LONG {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill().await;
    assert!(s.sim.all_acked());
    assert_all_present(&s.sim, &payload_lines(&receiver));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcs_with_a_private_ca_and_a_client_certificate() {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let ca = common::pki::ca("evbridge forward CA");
    let server = common::pki::leaf(&["localhost"], &ca);
    let client = common::pki::leaf(&["evbridge"], &ca);
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&server.cert_pem, &server.key_pem))
        .client_ca_root(Certificate::from_pem(ca.pem()));
    let receiver = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(ForwardingServer::new(Shared(receiver.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = std::env::temp_dir().join(format!("evbridge-fwd-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let ca_path = write("ca.pem", &ca.pem());
    let cert = write("client.crt", &client.cert_pem);
    let key = write("client.key", &client.key_pem);
    let base = format!("grpcs://localhost:{port}");
    let env = Arc::new(
        evbridge::normalize::Normalizer::default()
            .lifecycle(&evbridge::sim::world::generate(&Default::default()).notifications[0])
            .envelope,
    );

    for (url, what) in [
        (
            format!("{base}?timeout=2"),
            "system roots do not know the CA",
        ),
        (
            format!("{base}?timeout=2&ca={ca_path}"),
            "no client certificate",
        ),
    ] {
        let sink = evbridge::sinks::open(&url).await.unwrap();
        let e = sink.send(std::slice::from_ref(&env)).await.expect_err(what);
        assert!(e.error.is_retryable(), "{what}: {e}");
    }
    let sink = evbridge::sinks::open(&format!("{base}?ca={ca_path}&cert={cert}&key={key}"))
        .await
        .unwrap();
    sink.send(std::slice::from_ref(&env))
        .await
        .expect("mTLS with the private CA");
    assert_eq!(receiver.got.lock().unwrap()[0].id, env.id);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_above_the_receivers_4_mib_limit_is_permanent_not_retried() {
    // A receiver with gRPC's default 4 MiB limit, and a 5 MiB envelope.
    let receiver = Arc::new(Receiver::default());
    let url = serve(receiver.clone()).await;
    let mut event = evbridge::sim::world::sample_envelopes(1)[0].event().clone();
    event.payload =
        evbridge::sinks::Payload::trusted(format!("{{\"stdout\":\"{}\"}}", "x".repeat(5 << 20)));
    let big = Arc::new(evbridge::sinks::Envelope::new(event));

    // By default the sink refuses it itself, before any call.
    let sink = evbridge::sinks::open(&url).await.unwrap();
    let e = sink.send(std::slice::from_ref(&big)).await.unwrap_err();
    assert!(!e.error.is_retryable(), "{}", e.error);
    assert!(e.error.to_string().contains("4194304"), "{}", e.error);
    assert_eq!(receiver.calls.load(Ordering::SeqCst), 0);

    // Told the receiver takes more, it sends; the receiver's refusal is
    // permanent too (the pipeline would dead-letter it, not retry).
    let sink = evbridge::sinks::open(&format!("{url}?max_message_size=64MiB"))
        .await
        .unwrap();
    let e = sink.send(std::slice::from_ref(&big)).await.unwrap_err();
    assert!(!e.error.is_retryable(), "{}", e.error);
    assert!(e.error.to_string().contains("size limit"), "{}", e.error);
    assert!(receiver.got.lock().unwrap().is_empty());
}
