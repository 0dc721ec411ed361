//! grpcs:// to the simulator: a private CA, certificate verification on by
//! default, and mTLS (client certificate required, wrong one refused).

mod common;

use std::time::Duration;

use common::*;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
    stranger: (String, String),
}

fn leaf(
    names: &[&str],
    issuer: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
) -> (String, String) {
    let l = common::pki::leaf(names, issuer);
    (l.cert_pem, l.key_pem)
}

fn pki() -> Pki {
    let ca = common::pki::ca("evbridge test CA");
    let other = common::pki::ca("some other CA");
    Pki {
        ca_pem: ca.pem(),
        server: leaf(&["localhost", "127.0.0.1"], &ca),
        client: leaf(&["evbridge-client"], &ca),
        stranger: leaf(&["intruder"], &other),
    }
}

fn server_tls(p: &Pki, require_client: bool) -> ServerTlsConfig {
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(&p.server.0, &p.server.1));
    if require_client {
        tls = tls.client_ca_root(Certificate::from_pem(&p.ca_pem));
    }
    tls
}

/// The simulator URL with `localhost`, which the server certificate names.
fn localhost(url: &str) -> String {
    url.replace("127.0.0.1", "localhost")
}

/// Runs the bridge briefly; returns how many notifications got acked.
async fn attempt(
    s: &RunningSim,
    ca: Option<&str>,
    identity: Option<&(String, String)>,
    wait: Duration,
) -> usize {
    let mut cfg = bridge_config(&localhost(&s.url));
    cfg.source.tls_ca = ca.map(|c| c.as_bytes().to_vec());
    cfg.source.tls_identity = identity.map(|(c, k)| (c.as_bytes().to_vec(), k.as_bytes().to_vec()));
    let (sink, _) = capture();
    let _ = run_until_acked(&s.sim, cfg, vec![sink], wait).await;
    s.sim.report().queue.acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_private_ca_and_verification_on_by_default() {
    let p = pki();
    let s = start_sim_tls(sim_config(4, 3), Some(server_tls(&p, false))).await;
    assert!(s.url.starts_with("grpcs://"));

    // System roots do not know our CA: nothing gets through.
    assert_eq!(attempt(&s, None, None, Duration::from_secs(2)).await, 0);

    let acked = attempt(&s, Some(&p.ca_pem), None, Duration::from_secs(30)).await;
    assert_eq!(acked, s.sim.report().notifications);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_the_right_client_certificate() {
    let p = pki();
    let s = start_sim_tls(sim_config(4, 3), Some(server_tls(&p, true))).await;

    assert_eq!(
        attempt(&s, Some(&p.ca_pem), None, Duration::from_secs(2)).await,
        0,
        "no client cert"
    );
    assert_eq!(
        attempt(
            &s,
            Some(&p.ca_pem),
            Some(&p.stranger),
            Duration::from_secs(2)
        )
        .await,
        0,
        "client cert from another CA"
    );
    let acked = attempt(
        &s,
        Some(&p.ca_pem),
        Some(&p.client),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(acked, s.sim.report().notifications);
}
