//! Fields the schema does not know are carried, never dropped: bytes with
//! an unknown field at every level of a streamed event, normalized
//! directly and served by the simulator to the real bridge.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use evbridge::normalize::Normalizer;
use evbridge::pb::{self, bep, bes, es};
use evbridge::sim::Sim;
use evbridge::sim::world::{GenConfig, generate};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use serde_json::Value;

/// A varint field numbered `field` (one the schema does not have).
fn unknown(field: u32) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key(field, WireType::Varint, &mut out);
    encode_varint(42, &mut out);
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The fields added, one per level, innermost first.
const EXPECTED: [&str; 6] = [
    "build_event_stream.TestResult#1999",
    "build_event_stream.BuildEvent#1998",
    "google.protobuf.Any#1997",
    "google.devtools.build.v1.BuildEvent#1996",
    "engflow.eventstore.v1.BuildProgressEvent#1995",
    "engflow.eventstore.v1.StreamedBuildEvent#1994",
];

/// A streamed test result with an unknown field at every level, its
/// Bazel event's bytes, and the same event without them.
fn layered() -> (Vec<u8>, Vec<u8>, es::StreamedBuildEvent) {
    let result = bep::TestResult {
        status: bep::TestStatus::Flaky as i32,
        ..Default::default()
    };
    let id = bep::BuildEventId {
        id: Some(bep::build_event_id::Id::TestResult(
            bep::build_event_id::TestResultId {
                label: "//lib:test".into(),
                run: 1,
                shard: 1,
                attempt: 2,
                ..Default::default()
            },
        )),
    };
    let bazel = bep::BuildEvent {
        id: Some(id.clone()),
        ..Default::default()
    };
    // BEP `BuildEvent.test_result` is field 10.
    let bazel_bytes = cat(&[
        &bazel.encode_to_vec(),
        &ld(10, &cat(&[&result.encode_to_vec(), &unknown(1999)])),
        &unknown(1998),
    ]);
    let any = cat(&[
        &ld(1, pb::BAZEL_EVENT_TYPE_URL.as_bytes()),
        &ld(2, &bazel_bytes),
        &unknown(1997),
    ]);
    let time = prost_types::Timestamp {
        seconds: 1_795_564_801,
        nanos: 0,
    };
    let bes_event = bes::BuildEvent {
        event_time: Some(time),
        event: None,
    };
    // BES `BuildEvent.bazel_event` is field 60.
    let bes_bytes = cat(&[&bes_event.encode_to_vec(), &ld(60, &any), &unknown(1996)]);
    let progress = es::BuildProgressEvent {
        stream_id: Some(bes::StreamId {
            build_id: "b".into(),
            component: bes::stream_id::BuildComponent::Tool as i32,
            invocation_id: "i".into(),
        }),
        service_level: Some(1),
        notification_keywords: vec!["command_name=test".into()],
        build_event: None,
    };
    // `BuildProgressEvent.build_event` is field 4.
    let progress_bytes = cat(&[
        &progress.encode_to_vec(),
        &ld(4, &bes_bytes),
        &unknown(1995),
    ]);
    let streamed = es::StreamedBuildEvent {
        principal: "alice@example.com".into(),
        ..Default::default()
    };
    // `StreamedBuildEvent.event` is field 3.
    let raw = cat(&[
        &streamed.encode_to_vec(),
        &ld(3, &progress_bytes),
        &unknown(1994),
    ]);

    let decoded = es::StreamedBuildEvent::decode(raw.as_slice()).unwrap();
    (raw, bazel_bytes, decoded)
}

fn invocation() -> evbridge::normalize::Invocation {
    let world = generate(&GenConfig {
        builds: 1,
        ..GenConfig::default()
    });
    let norm = Normalizer::default();
    world
        .notifications
        .iter()
        .find_map(|n| norm.lifecycle(n).fetch)
        .unwrap()
}

fn json(env: &evbridge::sinks::Envelope) -> Value {
    serde_json::from_slice(env.json()).unwrap()
}

#[test]
fn an_unknown_field_at_every_level_is_found_and_the_bytes_carried() {
    let (raw, bazel_bytes, decoded) = layered();
    let norm = Normalizer::default();
    let inv = invocation();

    let out = norm.build_event_from(&inv, 0, &decoded, Some(&raw));
    let found: Vec<String> = out.unknown.iter().map(ToString::to_string).collect();
    let mut want: Vec<String> = EXPECTED.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(found, want);
    let v = json(&out.envelope);
    assert_eq!(v["attributes"]["unknown_fields"], want.join(","));
    let original = &v["payload"]["original"];
    assert_eq!(
        original["typeUrl"],
        "type.googleapis.com/engflow.eventstore.v1.StreamedBuildEvent"
    );
    let carried = base64::prelude::BASE64_STANDARD
        .decode(original["value"].as_str().unwrap())
        .unwrap();
    assert_eq!(carried, raw, "the bytes as they arrived");
    assert_eq!(original["unknownFields"], serde_json::json!(want));
    // Everything known is still expanded as usual.
    assert_eq!(out.envelope.name, "bazel_test_result");
    let bazel = &v["payload"]["event"]["buildEvent"]["bazelEvent"];
    assert_eq!(bazel["testResult"]["status"], "FLAKY");
    assert_eq!(v["attributes"]["label"], "//lib:test");

    // Without the outer bytes, the Bazel event's own are searched.
    let out = norm.build_event(&inv, 0, &decoded);
    let found: Vec<String> = out.unknown.iter().map(ToString::to_string).collect();
    assert_eq!(
        found,
        [
            "build_event_stream.BuildEvent#1998",
            "build_event_stream.TestResult#1999"
        ]
    );
    let v = json(&out.envelope);
    assert_eq!(
        v["payload"]["original"]["typeUrl"],
        pb::BAZEL_EVENT_TYPE_URL
    );
    let carried = base64::prelude::BASE64_STANDARD
        .decode(v["payload"]["original"]["value"].as_str().unwrap())
        .unwrap();
    assert_eq!(carried, bazel_bytes);

    // Re-encoded by prost, the outer levels lose theirs; the Bazel event,
    // still bytes inside its `Any`, keeps its own.
    let reencoded = decoded.encode_to_vec();
    let out = norm.build_event_from(&inv, 0, &decoded, Some(&reencoded));
    let found: Vec<String> = out.unknown.iter().map(ToString::to_string).collect();
    assert_eq!(
        found,
        [
            "build_event_stream.BuildEvent#1998",
            "build_event_stream.TestResult#1999"
        ]
    );

    // An event without any is left as it was.
    let clean = es::StreamedBuildEvent {
        event: Some(es::BuildProgressEvent {
            build_event: Some(bes::BuildEvent {
                event_time: None,
                event: Some(bes::build_event::Event::BazelEvent(prost_types::Any {
                    type_url: pb::BAZEL_EVENT_TYPE_URL.into(),
                    value: bep::BuildEvent::decode(bazel_bytes.as_slice())
                        .unwrap()
                        .encode_to_vec(),
                })),
            }),
            ..decoded.event.clone().unwrap()
        }),
        ..decoded.clone()
    };
    let bytes = clean.encode_to_vec();
    let out = norm.build_event_from(&inv, 0, &clean, Some(&bytes));
    assert!(out.unknown.is_empty(), "{:?}", out.unknown);
    let v = json(&out.envelope);
    assert!(v["payload"].get("original").is_none());
    assert!(v["attributes"].get("unknown_fields").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_carries_unknown_fields_from_the_event_store() {
    let (raw, _, decoded) = layered();
    let mut world = generate(&GenConfig {
        builds: 2,
        events_per_invocation: 3,
        ..GenConfig::default()
    });
    // Every invocation's second event is the layered one.
    let mut stored = Vec::new();
    for inv in &mut world.invocations {
        inv.events[1] = decoded.clone();
        let mut bytes: Vec<bytes::Bytes> = inv
            .events
            .iter()
            .map(|e| bytes::Bytes::from(e.encode_to_vec()))
            .collect();
        bytes[1] = bytes::Bytes::from(raw.clone());
        stored.push(bytes);
    }
    let invocations = world.invocations.len();
    // The process-wide recorder, as `--metrics-listen` installs it.
    let metrics = evbridge::ops::telemetry::install().unwrap();
    let s = start_sim_with(Sim::with_stored(sim_config(2, 3), world, stored)).await;
    let (sink, out) = capture();
    run_until_acked(
        &s.sim,
        bridge_config(&s.url),
        vec![sink],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert!(s.sim.all_acked());
    let carrying: Vec<Value> = out
        .envelopes()
        .into_iter()
        .filter(|e| e["attributes"].get("unknown_fields").is_some())
        .collect();
    assert_eq!(carrying.len(), invocations, "one per invocation");
    for e in carrying {
        assert_eq!(e["attributes"]["sequence"], "1");
        let list = e["attributes"]["unknown_fields"].as_str().unwrap();
        for want in EXPECTED {
            assert!(list.contains(want), "{list} lacks {want}");
        }
        let value = e["payload"]["original"]["value"].as_str().unwrap();
        let carried = base64::prelude::BASE64_STANDARD.decode(value).unwrap();
        // What arrived, without the continuation token the store adds
        // (transport state: a redelivery carries another).
        assert_eq!(carried, raw, "original bytes carried");
    }
    // Counted by message type in /metrics.
    let text = metrics.render();
    for want in EXPECTED {
        let message = want.split('#').next().unwrap();
        let line = format!("evbridge_unknown_fields_total{{message=\"{message}\"}} {invocations}");
        assert!(text.contains(&line), "no `{line}` in:\n{text}");
    }
}

#[test]
fn a_lifecycle_payload_with_an_unknown_field_carries_its_bytes() {
    let world = generate(&GenConfig {
        builds: 1,
        ..GenConfig::default()
    });
    let mut n = world.notifications[0].clone();
    n.payload.as_mut().unwrap().value.extend(unknown(77));
    let sent = n.payload.clone().unwrap().value;
    let out = Normalizer::default().lifecycle(&n);
    let found: Vec<String> = out.unknown.iter().map(ToString::to_string).collect();
    assert_eq!(
        found,
        ["engflow.eventstore.v1.BuildLifecycleEventNotification#77"]
    );
    let v = json(&out.envelope);
    assert_eq!(v["name"], "build_started");
    assert_eq!(v["attributes"]["unknown_fields"], found[0]);
    let original = &v["payload"]["original"];
    assert_eq!(original["typeUrl"], pb::LIFECYCLE_TYPE_URL);
    let carried = base64::prelude::BASE64_STANDARD
        .decode(original["value"].as_str().unwrap())
        .unwrap();
    assert_eq!(carried, sent);
    // Without it, nothing is added.
    let clean = Normalizer::default().lifecycle(&world.notifications[0]);
    assert!(clean.unknown.is_empty());
    assert!(json(&clean.envelope)["payload"].get("original").is_none());
}

fn action_with(details: Vec<prost_types::Any>) -> bep::BuildEvent {
    bep::BuildEvent {
        id: Some(bep::BuildEventId {
            id: Some(bep::build_event_id::Id::ActionCompleted(
                bep::build_event_id::ActionCompletedId {
                    primary_output: "out".into(),
                    ..Default::default()
                },
            )),
        }),
        payload: Some(bep::build_event::Payload::Action(bep::ActionExecuted {
            strategy_details: details,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn streamed_bazel(ev: &bep::BuildEvent) -> es::StreamedBuildEvent {
    es::StreamedBuildEvent {
        event: Some(es::BuildProgressEvent {
            build_event: Some(bes::BuildEvent {
                event_time: None,
                event: Some(bes::build_event::Event::BazelEvent(prost_types::Any {
                    type_url: pb::BAZEL_EVENT_TYPE_URL.into(),
                    value: ev.encode_to_vec(),
                })),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn an_unknown_field_inside_an_any_inside_the_bazel_event_is_found() {
    // ActionExecuted.strategy_details holds Anys, whose bytes prost keeps
    // as they came: a re-encoded length that matches proves nothing there.
    let detail = pb::failure_details::FailureDetail {
        message: "remote cache miss".into(),
        ..Default::default()
    };
    let any = prost_types::Any {
        type_url: "type.googleapis.com/failure_details.FailureDetail".into(),
        value: cat(&[&detail.encode_to_vec(), &unknown(1990)]),
    };
    let ev = streamed_bazel(&action_with(vec![any]));
    let raw = ev.encode_to_vec();
    let out = Normalizer::default().build_event_from(&invocation(), 0, &ev, Some(&raw));
    let found: Vec<String> = out.unknown.iter().map(ToString::to_string).collect();
    assert_eq!(found, ["failure_details.FailureDetail#1990"]);
    assert!(json(&out.envelope)["payload"].get("original").is_some());
}

#[test]
fn anys_nested_past_the_limit_are_left_raw_as_the_generic_encoder_leaves_them() {
    // Bazel events inside strategy_details, 20 deep: the direct writer must
    // count the outer one as a level, as the generic one does (debug
    // builds compare the two).
    let mut ev = action_with(Vec::new());
    for _ in 0..20 {
        ev = action_with(vec![prost_types::Any {
            type_url: pb::BAZEL_EVENT_TYPE_URL.into(),
            value: ev.encode_to_vec(),
        }]);
    }
    let out = Normalizer::default().build_event(&invocation(), 0, &streamed_bazel(&ev));
    assert!(
        out.problems.iter().any(|p| p.contains("nested deeper")),
        "{:?}",
        out.problems
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_does_not_decode_is_delivered_raw_and_the_stream_goes_on() {
    // A principal that is not UTF-8 (field 4) and a truncated message: prost
    // refuses both. Before, each failed the call as INTERNAL, retried
    // without end.
    let mut world = generate(&GenConfig {
        builds: 2,
        events_per_invocation: 4,
        ..GenConfig::default()
    });
    let mut stored = Vec::new();
    for inv in &mut world.invocations {
        let mut bytes: Vec<bytes::Bytes> = inv
            .events
            .iter()
            .map(|e| bytes::Bytes::from(e.encode_to_vec()))
            .collect();
        bytes[1] = bytes::Bytes::from(cat(&[&bytes[1], &ld(4, b"\xff\xfe")]));
        let whole = bytes[2].to_vec();
        bytes[2] = bytes::Bytes::from(whole[..whole.len() - 3].to_vec());
        stored.push(bytes);
    }
    let invocations = world.invocations.len();
    let s = start_sim_with(Sim::with_stored(sim_config(2, 4), world, stored)).await;
    let (sink, out) = capture();
    run_until_acked(
        &s.sim,
        bridge_config(&s.url),
        vec![sink],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let report = s.sim.report();
    assert!(s.sim.all_acked(), "{report:?}");
    assert_eq!(
        report.event_calls as usize, invocations,
        "no retry loop: {report:?}"
    );
    let raw: Vec<Value> = out
        .envelopes()
        .into_iter()
        .filter(|e| e["name"] == "raw_build_event")
        .collect();
    assert_eq!(raw.len(), 2 * invocations);
    for e in &raw {
        let seq = e["attributes"]["sequence"].as_str().unwrap();
        assert!(seq == "1" || seq == "2", "{seq}");
        assert!(
            e["payload"]["error"]
                .as_str()
                .unwrap()
                .contains("does not decode")
        );
        assert!(
            e["payload"]["value"]
                .as_str()
                .is_some_and(|v| !v.is_empty())
        );
    }
    for (inv, seqs) in sequences(&out.envelopes()) {
        assert_eq!(seqs, [0, 1, 2, 3], "{inv}");
    }
}
