//! The AMQP sink against the real RabbitMQ on 127.0.0.1:5672 (or
//! `$EVBRIDGE_AMQP_URL`), read back by an independent lapin subscriber
//! that binds queues by routing key, BonFIRE-style. Every test uses
//! exchanges and queues of its own and deletes them. (The broker-restart
//! test lives in `amqp_restart.rs`: it stops RabbitMQ, so it must not run
//! beside these.)

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::brokers::{Proxy, free_port};
use common::rabbit::*;
use common::*;
use evbridge::sinks::Envelope;
use lapin::ExchangeKind;
use lapin::options::*;
use lapin::types::FieldTable;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_exactly_their_routing_keys_all_persistent_json() {
    let t = Topology::new(&["default.invocation_finished", "#.bazel_test_result", "#"]).await;
    let s = start_sim(sim_config(12, 10)).await;
    let sink = evbridge::sinks::open(&t.sink_url("")).await.unwrap();
    sink.healthcheck()
        .await
        .expect("exchange exists (passive check)");
    run_until_acked(
        &s.sim,
        bridge_config(&s.url),
        vec![sink],
        Duration::from_secs(90),
    )
    .await
    .unwrap();
    assert!(s.sim.all_acked());
    let report = s.sim.report();

    let all = t
        .drain("#", report.notifications + report.invocation_events)
        .await;
    let lines: Vec<String> = all.iter().map(|(v, _)| v.to_string()).collect();
    assert_complete(&s.sim, &lines);
    assert_eq!(
        all.len(),
        report.notifications + report.invocation_events,
        "exactly once"
    );
    for (v, p) in &all {
        assert_eq!(p.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            p.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(
            p.message_id().as_ref().map(|c| c.as_str()),
            v["id"].as_str()
        );
        let headers = p.headers().as_ref().expect("headers");
        assert!(headers.inner().contains_key("name") && headers.inner().contains_key("namespace"));
    }
    let count = |name: &str| all.iter().filter(|(v, _)| v["name"] == name).count();

    let finished = t
        .drain("default.invocation_finished", report.invocations)
        .await;
    assert_eq!(finished.len(), report.invocations);
    assert!(
        finished
            .iter()
            .all(|(v, _)| v["name"] == "invocation_finished")
    );
    // A subscriber can bind to Bazel's test results alone.
    let tests = count("bazel_test_result");
    assert!(tests > 0);
    let results = t.drain("#.bazel_test_result", tests).await;
    assert_eq!(results.len(), tests);
    for (v, p) in &results {
        assert_eq!(v["name"], "bazel_test_result");
        let headers = p.headers().as_ref().expect("headers");
        assert!(headers.inner().contains_key("label"), "{headers:?}");
        assert!(headers.inner().contains_key("test_status"), "{headers:?}");
    }
    t.cleanup().await;
}

fn envelope() -> Arc<Envelope> {
    envelopes(1).remove(0)
}

#[tokio::test]
async fn unroutable_is_an_error_naming_the_routing_key() {
    let t = Topology::new(&[]).await;
    let sink = evbridge::sinks::open(&t.sink_url("&routing_key=nobody.{name}"))
        .await
        .unwrap();
    let e = sink
        .send(&[envelope()])
        .await
        .expect_err("no binding matches");
    assert_eq!(e.at, 0);
    assert!(!e.error.is_retryable(), "{e}");
    let msg = e.error.to_string();
    assert!(
        msg.contains("unroutable") && msg.contains("nobody.build_started"),
        "{msg}"
    );
    t.cleanup().await;
}

#[tokio::test]
async fn missing_exchange_is_named_and_declare_creates_it() {
    let exchange = unique("evb-missing");
    let url = format!("{}?exchange={exchange}", broker_url());
    let sink = evbridge::sinks::open(&url).await.unwrap();
    let e = sink.healthcheck().await.expect_err("missing exchange");
    let msg = e.to_string();
    assert!(
        msg.contains(&exchange) && msg.contains("declare=true") && msg.contains("NOT_FOUND"),
        "{msg}"
    );
    let e = sink
        .send(&[envelope()])
        .await
        .expect_err("missing exchange");
    assert!(e.error.is_retryable() && e.error.to_string().contains(&exchange));

    let sink = evbridge::sinks::open(&format!("{url}&declare=true&mandatory=false"))
        .await
        .unwrap();
    sink.send(&[envelope()])
        .await
        .expect("declared, then published");
    let conn = common::rabbit::connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("the sink declared it");
    ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_hung_broker_fails_the_confirm_instead_of_waiting_forever() {
    let t = Topology::new(&["#"]).await;
    let port = free_port();
    let proxy = Proxy::start(port, 5672).await;
    let via_proxy = broker_url().replace("127.0.0.1:5672", &format!("127.0.0.1:{port}"));
    let url = format!("{via_proxy}?exchange={}&confirm_timeout=1", t.exchange);
    let sink = evbridge::sinks::open(&url).await.unwrap();
    sink.send(&[envelope()]).await.expect("healthy path");

    proxy.freeze(true);
    let start = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(10), sink.send(&[envelope()]))
        .await
        .expect("send returned")
        .expect_err("no confirm can arrive");
    assert!(e.error.is_retryable(), "{e}");
    assert!(
        e.error.to_string().contains("no publisher confirm within"),
        "{e}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    proxy.freeze(false);
    proxy.cut();
    proxy.restore().await;
    sink.send(&[envelope()])
        .await
        .expect("reconnected after the hang");
    t.cleanup().await;
}

/// Terminates TLS with `leaf` on a free port and forwards to RabbitMQ.
async fn tls_front(leaf: &common::pki::Leaf) -> u16 {
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rustls::pki_types::CertificateDer::from(leaf.cert_der.clone());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf.key_der.clone().into());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await
                    && let Ok(mut plain) = tokio::net::TcpStream::connect("127.0.0.1:5672").await
                {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn amqps_with_a_private_ca_and_verification_on_by_default() {
    let t = Topology::new(&["#"]).await;
    let ca = common::pki::ca("evbridge amqps test CA");
    let port = tls_front(&common::pki::leaf(&["localhost"], &ca)).await;
    let dir =
        std::env::temp_dir().join(format!("evbridge-amqps-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("ca.pem");
    std::fs::write(&good, ca.pem()).unwrap();
    let other = dir.join("other.pem");
    std::fs::write(&other, common::pki::ca("another CA").pem()).unwrap();
    let base = format!(
        "amqps://guest:guest@localhost:{port}/%2f?exchange={}",
        t.exchange
    );

    for (url, what) in [
        (base.clone(), "system roots do not know the private CA"),
        (
            format!("{base}&ca={}", other.display()),
            "a CA that did not sign the server",
        ),
    ] {
        let sink = evbridge::sinks::open(&url).await.unwrap();
        let e = sink.send(&[envelope()]).await.expect_err(what);
        assert!(e.error.is_retryable(), "{what}: {e}");
    }
    let sink = evbridge::sinks::open(&format!("{base}&ca={}", good.display()))
        .await
        .unwrap();
    sink.send(&[envelope()])
        .await
        .expect("TLS with the private CA");
    let got = t.drain("#", 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0["id"], envelope().id.as_str());
    let _ = std::fs::remove_dir_all(dir);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_envelopes_can_go_to_a_dead_letter_sink() {
    // Only invocation_finished has a subscriber; everything else is
    // unroutable and goes to the dead-letter sink instead of blocking.
    let t = Topology::new(&["*.invocation_finished"]).await;
    let s = start_sim(sim_config(4, 3)).await;
    let sink = evbridge::sinks::open(&t.sink_url("")).await.unwrap();
    let (dead, dead_out) = capture();
    let mut cfg = bridge_config(&s.url);
    cfg.dead_letter = Some(dead);
    let summary = run_until_acked(&s.sim, cfg, vec![sink], Duration::from_secs(60))
        .await
        .unwrap();
    assert!(s.sim.all_acked(), "{:?}", s.sim.report());
    let report = s.sim.report();
    let routed = t.drain("*.invocation_finished", report.invocations).await;
    assert_eq!(routed.len(), report.invocations);
    let dead = dead_out.envelopes();
    assert_eq!(
        dead.len(),
        report.notifications + report.invocation_events - report.invocations
    );
    assert_eq!(summary.dead_lettered as usize, dead.len());
    for e in &dead {
        let reason = e["attributes"]["dead_letter_reason"].as_str().unwrap();
        assert!(
            reason.contains("unroutable")
                && reason.contains(&format!("default.{}", e["name"].as_str().unwrap())),
            "{reason}"
        );
    }
    t.cleanup().await;
}

fn envelopes(n: usize) -> Vec<Arc<Envelope>> {
    let n_ = evbridge::normalize::Normalizer::default();
    let world = evbridge::sim::world::generate(&Default::default());
    world.notifications[..n]
        .iter()
        .map(|x| Arc::new(n_.lifecycle(x).envelope))
        .collect()
}

#[tokio::test]
async fn exchange_deleted_mid_run_reconnects_redeclares_and_redelivers() {
    let t = Topology::new(&["#"]).await;
    let sink = evbridge::sinks::open(&t.sink_url("&declare=true"))
        .await
        .unwrap();
    let batch = envelopes(6);
    sink.send(&batch[..3]).await.expect("exchange exists");

    // Somebody deletes the exchange (and with it the binding) mid-run.
    t.ch.exchange_delete(t.exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    let e = sink
        .send(&batch[3..])
        .await
        .expect_err("the broker closes the channel: no such exchange");
    assert!(e.error.is_retryable(), "{e}");
    assert!(e.at == 0, "nothing of the batch counts as confirmed: {e}");

    // The sink re-declares it on reconnect; the operator re-binds the
    // queue; the retried batch then arrives.
    sink.healthcheck()
        .await
        .expect("reconnected, exchange re-declared");
    t.ch.exchange_declare(
        t.exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("the sink declared the exchange again");
    t.ch.queue_bind(
        t.queues["#"].as_str().into(),
        t.exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    sink.send(&batch[3..])
        .await
        .expect("retried after reconnect");
    let got = t.drain("#", 6).await;
    let mut ids: Vec<&str> = got.iter().map(|(v, _)| v["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut want: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
    want.sort_unstable();
    assert_eq!(ids, want, "every envelope arrived");
    t.cleanup().await;
}

#[tokio::test]
async fn a_nack_is_a_retryable_failure_and_the_retry_delivers() {
    // A queue that refuses publishes when full makes RabbitMQ nack them.
    let t = Topology::new(&[]).await;
    let q = unique("evb-q-full");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(2));
    args.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    t.ch.queue_declare(q.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    t.ch.queue_bind(
        q.as_str().into(),
        t.exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let sink = evbridge::sinks::open(&t.sink_url("")).await.unwrap();
    let batch = envelopes(3);
    let e = sink.send(&batch).await.expect_err("the third is nacked");
    assert_eq!(e.at, 2, "two confirmed, the third not: {e}");
    assert!(e.error.is_retryable(), "{e}");
    assert!(e.error.to_string().contains("nacked"), "{e}");

    // Room again: the retry of what was not confirmed succeeds.
    t.ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    sink.send(&batch[2..]).await.expect("retry delivers");
    let m =
        t.ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("the retried message");
    assert_eq!(
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        batch[2].id
    );
    let _ =
        t.ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    t.cleanup().await;
}

/// Runs `rabbitmqctl` (installed with RabbitMQ, see `.ci/run`).
fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
}

#[test]
fn a_config_files_password_with_url_delimiters_reaches_rabbitmq_intact() {
    // A RabbitMQ user whose password has every character that would
    // otherwise move the host, path or query of the sink URL.
    let user = unique("evb-user");
    let password = "p/a?s#s@w:o+r&d=1 %2F~";
    rabbitmqctl(&["add_user", &user, password]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let dir = std::env::temp_dir().join(unique("evb-config"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("evbridge.toml");
    std::fs::write(
        &file,
        "source = \"grpc://127.0.0.1:1\"\n\
         sink = \"amqp://${EVB_TEST_USER}:${EVB_TEST_PASSWORD}@127.0.0.1:5672/%2f?exchange=amq.topic\"\n",
    )
    .unwrap();
    let check = |pass: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_evbridge"))
            .args(["--config", file.to_str().unwrap(), "--check"])
            .env("EVB_TEST_USER", &user)
            .env("EVB_TEST_PASSWORD", pass)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(pass), "the password was shown: {text}");
        text
    };
    let right = check(password);
    let wrong = check("p/a?s#s@w:o+r&d=2 %2F~");
    rabbitmqctl(&["delete_user", &user]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        right.contains(&format!("ok      sink amqp://{user}:***@127.0.0.1:5672")),
        "{right}"
    );
    assert!(wrong.contains("FAILED  sink amqp://"), "{wrong}");
}
