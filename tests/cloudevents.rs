//! CloudEvents output of the Kafka and AMQP sinks, decoded by an
//! independent implementation: the CloudEvents Python SDK's own Kafka,
//! RabbitMQ and AMQP bindings (`tests/cloudevents_decode.py`, reading with
//! confluent-kafka and pika). Every envelope must come out as a CloudEvent
//! whose id, source, type, time, subject and data map the envelope's.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::brokers::*;
use common::rabbit::*;
use common::*;
use serde_json::Value;

/// Runs the Python witness and returns the events it decoded.
async fn decode(args: Vec<String>) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cloudevents_decode.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the CloudEvents SDK could not decode (pip install cloudevents confluent-kafka pika): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every envelope has exactly one decoded event with the mapped
/// attributes, `ce_type` being `type_prefix` + name.
fn assert_maps(envelopes: &[Value], events: &[Value], mode: &str, type_prefix: &str) {
    assert_eq!(
        events.len(),
        envelopes.len(),
        "{mode}: one event per envelope"
    );
    let by_id: HashMap<&str, &Value> = events
        .iter()
        .map(|e| (e["id"].as_str().unwrap(), e))
        .collect();
    assert_eq!(by_id.len(), envelopes.len(), "{mode}: distinct ids");
    for env in envelopes {
        let id = env["id"].as_str().unwrap();
        let ev = by_id
            .get(id)
            .unwrap_or_else(|| panic!("{mode}: {id} missing"));
        assert_eq!(ev["mode"], mode);
        assert_eq!(ev["specversion"], "1.0");
        let source = format!(
            "/evbridge/{}/{}",
            env["namespace"].as_str().unwrap(),
            env["topic"].as_str().unwrap()
        );
        assert_eq!(ev["source"], source.as_str());
        assert_eq!(
            ev["type"],
            format!("{type_prefix}{}", env["name"].as_str().unwrap()).as_str()
        );
        // The SDK parses `time`; same instant to the second (its isoformat
        // writes +00:00 where the envelope has Z).
        let (ours, theirs) = (
            env["timestamp"].as_str().unwrap(),
            ev["time"].as_str().unwrap(),
        );
        assert_eq!(&ours[..19], &theirs[..19], "{mode}: time of {id}");
        assert!(theirs.ends_with("+00:00"), "{theirs}");
        match env["key"].as_str() {
            Some("") | None => assert!(ev.get("subject").is_none()),
            Some(key) => assert_eq!(ev["subject"], key),
        }
        assert_eq!(ev["datacontenttype"], "application/json");
        assert_eq!(ev["data"], env["payload"], "{mode}: data of {id}");
        assert_eq!(ev["extensions"]["namespace"], env["namespace"]);
        if let Some(inv) = env["attributes"]["invocation_id"].as_str() {
            assert_eq!(ev["extensions"]["invocationid"], inv);
        }
    }
}

/// Simulated EngFlow traffic through `sinks` and a capture sink; the
/// captured envelopes.
async fn bridge_to(sinks: Vec<String>) -> Vec<Value> {
    let s = start_sim(sim_config(4, 6)).await;
    let mut all = Vec::new();
    for url in &sinks {
        all.push(evbridge::sinks::open(url).await.unwrap());
    }
    let (capture_sink, buf) = capture();
    all.push(capture_sink);
    run_until_acked(&s.sim, bridge_config(&s.url), all, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(s.sim.all_acked(), "{:?}", s.sim.report());
    let envelopes = buf.envelopes();
    assert!(envelopes.len() > 20, "{}", envelopes.len());
    assert!(
        envelopes.iter().any(|e| e["key"] != ""),
        "some envelopes have a key"
    );
    envelopes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_binary_and_structured_decode_with_the_sdk() {
    let t = Tansu::start();
    let b = t.bootstrap();
    let envelopes = bridge_to(vec![
        format!("kafka://{b}/ce-binary?cloudevents=binary"),
        format!("kafka://{b}/ce-structured?cloudevents=structured&ce_type=com.engflow.{{name}}"),
    ])
    .await;
    let n = envelopes.len().to_string();
    let binary = decode(vec![
        "kafka".into(),
        b.clone(),
        "ce-binary".into(),
        n.clone(),
    ])
    .await;
    assert_maps(&envelopes, &binary, "binary", "");
    let structured = decode(vec!["kafka".into(), b, "ce-structured".into(), n]).await;
    assert_maps(&envelopes, &structured, "structured", "com.engflow.");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_binary_and_structured_decode_with_the_sdk() {
    // One exchange per form, each with a queue bound to everything.
    let rabbit = Topology::new(&["#"]).await;
    let amqp = Topology::new(&["#"]).await;
    let structured = Topology::new(&["#"]).await;
    let envelopes = bridge_to(vec![
        rabbit.sink_url("&cloudevents=binary"),
        amqp.sink_url("&cloudevents=binary&ce_prefix=cloudEvents_"),
        structured.sink_url("&cloudevents=structured"),
    ])
    .await;
    let n = envelopes.len().to_string();
    for (t, mode) in [
        (&rabbit, "binary ce-"),
        (&amqp, "binary amqp"),
        (&structured, "structured"),
    ] {
        let events = decode(vec![
            "amqp".into(),
            broker_url(),
            t.queues["#"].clone(),
            n.clone(),
        ])
        .await;
        assert_maps(&envelopes, &events, mode, "");
    }
    for t in [rabbit, amqp, structured] {
        t.cleanup().await;
    }
}

#[tokio::test]
async fn cloudevents_options_are_checked() {
    for (url, want) in [
        (
            "kafka://127.0.0.1:9/t?cloudevents=maybe",
            "binary, structured",
        ),
        ("kafka://127.0.0.1:9/t?ce_source=x", "need `cloudevents"),
        (
            "amqp://u:hunter2@h/v?exchange=e&ce_prefix=x",
            "needs `cloudevents=binary`",
        ),
        (
            "amqp://u:hunter2@h/v?exchange=e&cloudevents=binary&content_type=text/plain",
            "set by `cloudevents`",
        ),
    ] {
        let err = evbridge::sinks::open(url).await.unwrap_err().to_string();
        assert!(err.contains(want), "{url}: {err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
