//! A real Bazel's events through the simulator and the bridge: each
//! envelope's Bazel event must equal what Bazel itself wrote to its
//! `--build_event_json_file`, field for field, and carry its kind's name.
//!
//! The fixtures (`tests/fixtures/bazel/*/events.{bin,json}`) were written
//! by Bazel 2.1.0; `scripts/bazel_fixtures.sh` makes them again.

mod common;

use std::time::Duration;

use common::*;
use evbridge::pb::{self, bes};
use evbridge::sim::Sim;
use evbridge::sim::world::{GenConfig, generate};
use serde_json::Value;

const BUILDS: [&str; 4] = ["green", "failing", "keep_going", "test_failure"];

fn fixture(build: &str, file: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/bazel/{build}/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The varint-delimited events of a `--build_event_binary_file`.
fn binary_events(build: &str) -> Vec<Vec<u8>> {
    let data = fixture(build, "events.bin");
    let mut buf = data.as_slice();
    let mut out = Vec::new();
    while !buf.is_empty() {
        let len = prost::encoding::decode_varint(&mut buf).expect("length") as usize;
        out.push(buf[..len].to_vec());
        buf = &buf[len..];
    }
    out
}

fn json_events(build: &str) -> Vec<Value> {
    String::from_utf8(fixture(build, "events.json"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The JSON name of a payload field (`test_result` → `testResult`).
fn camel(field: &str) -> String {
    let mut out = String::new();
    let mut up = false;
    for c in field.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The envelope name Bazel's JSON event should get: its payload kind's.
fn expected_name(event: &Value) -> &'static str {
    for (name, field, _) in evbridge::normalize::bep::NAMES {
        if event.get(camel(field)).is_some() {
            return name;
        }
    }
    evbridge::normalize::bep::UNNAMED
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_bazels_events_arrive_exactly_as_its_own_json() {
    let mut differences = Vec::new();
    for build in BUILDS {
        let raw = binary_events(build);
        let json = json_events(build);
        assert_eq!(raw.len(), json.len(), "{build}: .bin and .json differ");

        let world = fixture_world(&raw);
        let invocations = world.invocations.len();
        let s = start_world(sim_config(1, 1), world).await;
        let (sink, out) = capture();
        run_until_acked(
            &s.sim,
            bridge_config(&s.url),
            vec![sink],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert!(s.sim.all_acked(), "{build}: {:?}", s.sim.report());

        let envelopes: Vec<Value> = out
            .envelopes()
            .into_iter()
            .filter(|e| e["topic"] == "build-events")
            .collect();
        assert_eq!(envelopes.len(), raw.len() * invocations, "{build}");
        for (inv, seqs) in sequences(&envelopes) {
            assert_eq!(
                seqs,
                (0..raw.len() as u64).collect::<Vec<_>>(),
                "{build} {inv}"
            );
        }
        for e in &envelopes {
            let seq: usize = e["attributes"]["sequence"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            let mut bazel = e["payload"]["event"]["buildEvent"]["bazelEvent"].clone();
            assert_eq!(bazel["@type"], pb::BAZEL_EVENT_TYPE_URL, "{build} #{seq}");
            bazel.as_object_mut().unwrap().remove("@type");
            let mut diffs = Vec::new();
            diff(&bazel, &json[seq], String::new(), &mut diffs);
            for d in diffs {
                differences.push(format!("{build} #{seq} {d}"));
            }
            assert_eq!(e["name"], expected_name(&json[seq]), "{build} #{seq}");
            assert!(
                e["attributes"].get("unknown_fields").is_none(),
                "{build} #{seq}: {}",
                e["attributes"]
            );
            // The id's routing parts are attributes.
            let id = json[seq]["id"].as_object().unwrap();
            let (kind, body) = id.iter().next().unwrap();
            if let Some(label) = body.get("label") {
                assert_eq!(e["attributes"]["label"], *label, "{build} #{seq} {kind}");
            }
            if let Some(config) = body.get("configuration").and_then(|c| c.get("id")) {
                assert_eq!(e["attributes"]["configuration"], *config, "{build} #{seq}");
            }
        }
        let names: std::collections::BTreeSet<&str> = envelopes
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        for must in [
            "bazel_build_started",
            "bazel_target_complete",
            "bazel_build_finished",
        ] {
            assert!(names.contains(must), "{build}: {names:?}");
        }
        if build != "failing" {
            assert!(names.contains("bazel_test_summary"), "{build}: {names:?}");
        }
    }
    assert!(
        differences.is_empty(),
        "{} differences from Bazel's JSON:\n{}",
        differences.len(),
        differences.join("\n")
    );
}

/// One build whose invocations stream `raw` (a fixture's events), each
/// event as a `bazel_event` in the event store's envelope.
fn fixture_world(raw: &[Vec<u8>]) -> evbridge::sim::world::World {
    let mut world = generate(&GenConfig {
        builds: 1,
        events_per_invocation: 1,
        ..GenConfig::default()
    });
    for inv in &mut world.invocations {
        let template = inv.events[0].clone();
        inv.events = raw
            .iter()
            .map(|bytes| {
                let mut ev = template.clone();
                let progress = ev.event.as_mut().unwrap();
                let be = progress.build_event.as_mut().unwrap();
                be.event = Some(bes::build_event::Event::BazelEvent(prost_types::Any {
                    type_url: pb::BAZEL_EVENT_TYPE_URL.into(),
                    value: bytes.clone(),
                }));
                ev.is_last = false;
                ev
            })
            .collect();
        inv.events.last_mut().unwrap().is_last = true;
    }
    world
}

/// Starts a simulator holding `world` on 127.0.0.1:0.
async fn start_world(
    cfg: evbridge::sim::SimConfig,
    world: evbridge::sim::world::World,
) -> RunningSim {
    start_sim_with(Sim::with_world(cfg, world)).await
}

/// Where two JSON values differ, as paths with both sides (shortened).
fn diff(ours: &Value, bazels: &Value, path: String, out: &mut Vec<String>) {
    let short = |v: &Value| {
        let s = v.to_string();
        if s.len() > 80 {
            format!("{}…", &s[..80])
        } else {
            s
        }
    };
    match (ours, bazels) {
        (Value::Object(a), Value::Object(b)) => {
            for k in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
                let (x, y) = (
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                );
                diff(x, y, format!("{path}.{k}"), out);
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(x, y, format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a != b => out.push(format!("{path}: ours {} Bazel's {}", short(a), short(b))),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_bazels_events_reach_kafka_and_rabbitmq_as_its_own_json() {
    // What independent consumers read from the brokers, not what the
    // bridge meant to write.
    let build = "keep_going";
    let raw = binary_events(build);
    let json = json_events(build);
    let world = fixture_world(&raw);
    let want = raw.len() * world.invocations.len();
    let s = start_world(sim_config(1, 1), world).await;
    let t = common::rabbit::Topology::new(&["#"]).await;
    let amqp = evbridge::sinks::open(&t.sink_url("&names=bazel_*"))
        .await
        .unwrap();
    let tansu = common::brokers::Tansu::start();
    let topic = format!("bazel-{}", std::process::id());
    let kafka = evbridge::sinks::open(&format!(
        "kafka://{}/{topic}?names=bazel_*",
        tansu.bootstrap()
    ))
    .await
    .unwrap();
    run_until_acked(
        &s.sim,
        bridge_config(&s.url),
        vec![amqp, kafka],
        Duration::from_secs(90),
    )
    .await
    .unwrap();
    assert!(s.sim.all_acked());
    let check = |from: &str, e: &Value| {
        let seq: usize = e["attributes"]["sequence"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut bazel = e["payload"]["event"]["buildEvent"]["bazelEvent"].clone();
        bazel.as_object_mut().unwrap().remove("@type");
        let mut diffs = Vec::new();
        diff(&bazel, &json[seq], String::new(), &mut diffs);
        assert!(diffs.is_empty(), "{from} #{seq}: {diffs:?}");
        assert_eq!(e["name"], expected_name(&json[seq]), "{from} #{seq}");
    };
    let from_kafka = tokio::task::spawn_blocking({
        let bootstrap = tansu.bootstrap();
        move || common::brokers::consume(&bootstrap, &[topic], want, Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert_eq!(from_kafka.len(), want, "Kafka");
    for r in &from_kafka {
        check("Kafka", &r.value);
    }
    // The sinks' `names=bazel_*` left the lifecycle envelopes out.
    let from_amqp = t.drain("#", want).await;
    assert_eq!(from_amqp.len(), want, "RabbitMQ");
    for (v, _) in &from_amqp {
        check("RabbitMQ", v);
    }
    t.cleanup().await;
}
