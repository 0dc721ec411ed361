//! Normalization against golden JSON, raw fallbacks, determinism, and
//! hostile input that must never panic.
//!
//! `UPDATE_GOLDEN=1 cargo test --test normalize` rewrites the fixtures.

use evbridge::normalize::json::JsonWriter;
use evbridge::normalize::{Invocation, Keywords, Normalizer};
use evbridge::pb::{self, bep, bes, es, nq};
use evbridge::sinks::Envelope;
use prost::Message;
use prost_types::{Any, Timestamp};

fn golden(name: &str, env: &Envelope) {
    let value: serde_json::Value = serde_json::from_slice(env.json()).unwrap();
    let pretty = serde_json::to_string_pretty(&value).unwrap() + "\n";
    let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &pretty).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (UPDATE_GOLDEN=1 creates it)"));
    assert_eq!(pretty, want, "{name} differs from {path}");
}

const KEYWORDS: [&str; 4] = [
    "command_name=test",
    "user_keyword=engflow:CiCdPipelineName=post-merge",
    "user_keyword=flaky",
    "bazel_version=8.4.2",
];

fn notification(kind: es::build_lifecycle_event_notification::Kind) -> nq::Notification {
    let payload = es::BuildLifecycleEventNotification {
        instance_name: "ci".into(),
        build_id: "b7f3c1de-8a0b-4c11-9d3e-5f6a7b8c9d0e".into(),
        auth_context: Some(pb::engflow::auth::AuthContext {
            user: Some(pb::engflow::iam::v1::User {
                principal: "alice@example.com".into(),
                role: vec!["admin".into()],
                profile_picture_url: None,
            }),
        }),
        keywords: KEYWORDS.iter().map(|s| s.to_string()).collect(),
        kind: Some(kind),
    };
    nq::Notification {
        id: "0d5e8f7a-1b2c-4d3e-8f9a-0b1c2d3e4f5a".into(),
        timestamp: Some(Timestamp {
            seconds: 1_795_564_800,
            nanos: 250_000_000,
        }),
        payload: Some(Any {
            type_url: pb::LIFECYCLE_TYPE_URL.into(),
            value: payload.encode_to_vec(),
        }),
    }
}

fn finished() -> nq::Notification {
    notification(
        es::build_lifecycle_event_notification::Kind::InvocationFinished(
            es::build_lifecycle_event_notification::InvocationFinished {
                invocation_id: "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d".into(),
            },
        ),
    )
}

fn invocation() -> Invocation {
    Normalizer::default()
        .lifecycle(&finished())
        .fetch
        .expect("invocation_finished fetches")
}

fn streamed(event: bes::build_event::Event) -> es::StreamedBuildEvent {
    es::StreamedBuildEvent {
        is_last: false,
        continuation_token: "ct.opaque.7".into(),
        event: Some(es::BuildProgressEvent {
            stream_id: Some(bes::StreamId {
                build_id: "b7f3c1de-8a0b-4c11-9d3e-5f6a7b8c9d0e".into(),
                component: bes::stream_id::BuildComponent::Tool as i32,
                invocation_id: "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d".into(),
            }),
            service_level: Some(0),
            notification_keywords: KEYWORDS.iter().map(|s| s.to_string()).collect(),
            build_event: Some(bes::BuildEvent {
                event_time: Some(Timestamp {
                    seconds: 1_795_564_801,
                    nanos: 0,
                }),
                event: Some(event),
            }),
        }),
        principal: "alice@example.com".into(),
    }
}

fn bazel(value: Vec<u8>) -> bes::build_event::Event {
    bes::build_event::Event::BazelEvent(Any {
        type_url: pb::BAZEL_EVENT_TYPE_URL.into(),
        value,
    })
}

fn test_result() -> bep::BuildEvent {
    bep::BuildEvent {
        id: Some(bep::BuildEventId {
            id: Some(bep::build_event_id::Id::TestResult(
                bep::build_event_id::TestResultId {
                    label: "//lib/cache:lru_test".into(),
                    run: 1,
                    shard: 1,
                    attempt: 1,
                    ..Default::default()
                },
            )),
        }),
        payload: Some(bep::build_event::Payload::TestResult(bep::TestResult {
            status: bep::TestStatus::Flaky as i32,
            test_attempt_duration: Some(prost_types::Duration {
                seconds: 2,
                nanos: 500_000_000,
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[test]
fn lifecycle_invocation_finished_golden() {
    let out = Normalizer::default().lifecycle(&finished());
    assert!(out.problems.is_empty());
    assert_eq!(out.envelope.name, "invocation_finished");
    assert_eq!(out.envelope.key, "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d");
    golden("lifecycle_invocation_finished", &out.envelope);
    let inv = out.fetch.unwrap();
    assert_eq!(inv.instance, "ci");
    assert_eq!(inv.invocation_id, "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d");
}

#[test]
fn lifecycle_kinds_have_names_and_keys() {
    use es::build_lifecycle_event_notification as l;
    let n = Normalizer::default();
    let started = n.lifecycle(&notification(l::Kind::BuildStarted(l::BuildStarted {})));
    assert_eq!(started.envelope.name, "build_started");
    assert_eq!(started.envelope.key, "b7f3c1de-8a0b-4c11-9d3e-5f6a7b8c9d0e");
    assert!(started.fetch.is_none());
    let inv = n.lifecycle(&notification(l::Kind::InvocationStarted(
        l::InvocationStarted {
            invocation_id: "x".into(),
        },
    )));
    assert_eq!(inv.envelope.name, "invocation_started");
    assert!(inv.fetch.is_none(), "only invocation_finished fetches");
}

#[test]
fn bazel_test_result_golden() {
    let ev = streamed(bazel(test_result().encode_to_vec()));
    let out = Normalizer::default().build_event(&invocation(), 7, &ev);
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    assert!(out.unknown.is_empty(), "{:?}", out.unknown);
    assert_eq!(out.envelope.name, "bazel_test_result");
    let attr = |n: &str| out.envelope.attributes.get(n).map(|v| v.as_str());
    assert_eq!(attr("label"), Some("//lib/cache:lru_test"));
    assert_eq!(attr("bep_id"), Some("test_result"));
    assert_eq!(attr("test_status"), Some("FLAKY"));
    assert_eq!(out.envelope.topic, "build-events");
    assert_eq!(out.envelope.timestamp, "2026-11-25T00:00:01Z");
    golden("bazel_test_result", &out.envelope);
    let json = String::from_utf8(out.envelope.json().to_vec()).unwrap();
    assert!(
        !json.contains("ct.opaque"),
        "continuation token is not content"
    );
}

#[test]
fn console_output_golden() {
    let ev = streamed(bes::build_event::Event::ConsoleOutput(
        bes::build_event::ConsoleOutput {
            r#type: bes::ConsoleOutputStream::Stderr as i32,
            output: Some(bes::build_event::console_output::Output::TextOutput(
                "INFO: Elapsed time: 84.213s\n".into(),
            )),
        },
    ));
    let out = Normalizer::default().build_event(&invocation(), 0, &ev);
    golden("console_output", &out.envelope);
}

#[test]
fn unknown_type_url_is_delivered_raw_golden() {
    let mut n = finished();
    n.payload = Some(Any {
        type_url: "type.googleapis.com/acme.Secret".into(),
        value: vec![1, 2, 3, 255],
    });
    let out = Normalizer::default().lifecycle(&n);
    assert_eq!(out.envelope.name, "raw_notification");
    assert_eq!(out.problems.len(), 1);
    assert!(out.fetch.is_none());
    golden("raw_unknown_type", &out.envelope);
}

#[test]
fn undecodable_lifecycle_is_raw_with_reason() {
    let mut n = finished();
    n.payload.as_mut().unwrap().value = vec![0x0f, 0xde, 0xad];
    let out = Normalizer::default().lifecycle(&n);
    assert_eq!(out.envelope.name, "raw_notification");
    let v: serde_json::Value = serde_json::from_slice(out.envelope.json()).unwrap();
    assert_eq!(v["payload"]["value"], "D96t");
    assert!(
        v["payload"]["error"]
            .as_str()
            .unwrap()
            .contains("does not decode")
    );
    assert_eq!(
        v["id"], "0d5e8f7a1b2c4d3e8f9a0b1c2d3e4f5a",
        "same id as when decodable"
    );
}

#[test]
fn a_keyword_that_is_not_utf8_leaves_the_notification_raw() {
    // Keywords are looked up among the recent sets before being checked:
    // a set differing from a cached one only by a bad byte must still
    // fail as prost fails, never pass as the cached set.
    let norm = Normalizer::default();
    let good = finished();
    assert_eq!(norm.lifecycle(&good).envelope.name, "invocation_finished");
    let mut bad = good.clone();
    let value = &mut bad.payload.as_mut().unwrap().value;
    let at = value
        .windows(KEYWORDS[0].len())
        .position(|w| w == KEYWORDS[0].as_bytes())
        .expect("keyword encoded as is");
    value[at] = 0xff;
    for norm in [&norm, &Normalizer::default()] {
        let out = norm.lifecycle(&bad);
        assert_eq!(out.envelope.name, "raw_notification");
        assert!(out.fetch.is_none());
        assert!(
            out.problems[0].contains("does not decode"),
            "{:?}",
            out.problems
        );
        assert!(out.problems[0].contains("UTF-8"), "{:?}", out.problems);
    }
    assert_eq!(norm.lifecycle(&good).envelope.name, "invocation_finished");
}

#[test]
fn bad_nested_any_is_kept_raw_inside_the_event() {
    let out = Normalizer::default().build_event(
        &invocation(),
        3,
        &streamed(bazel(vec![0xff, 0xff, 0xff])),
    );
    assert_eq!(out.envelope.name, "bazel_event");
    assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
    let v: serde_json::Value = serde_json::from_slice(out.envelope.json()).unwrap();
    let any = &v["payload"]["event"]["buildEvent"]["bazelEvent"];
    assert_eq!(any["@type"], "type.googleapis.com/evbridge.v1.RawAny");
    assert_eq!(any["typeUrl"], pb::BAZEL_EVENT_TYPE_URL);
    assert_eq!(any["value"], "////");
}

#[test]
fn ids_are_deterministic() {
    let n = Normalizer::default();
    let a = n.lifecycle(&finished());
    let b = n.lifecycle(&finished());
    assert_eq!(a.envelope.json(), b.envelope.json());
    let ev = streamed(bazel(test_result().encode_to_vec()));
    let x = n.build_event(&invocation(), 5, &ev);
    let y = n.build_event(&invocation(), 5, &ev);
    let z = n.build_event(&invocation(), 6, &ev);
    assert_eq!(x.envelope.json(), y.envelope.json());
    assert_ne!(x.envelope.id, z.envelope.id);
}

#[test]
fn keywords_become_structured() {
    let json = |kws: &[&str]| {
        let kws: Vec<String> = kws.iter().map(|s| s.to_string()).collect();
        let mut w = JsonWriter::default();
        Keywords::parse(&kws).write(&mut w);
        let text = w.finish().0;
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    assert_eq!(
        json(&KEYWORDS),
        serde_json::json!({
            "commandName": "test",
            "userKeywords": {"engflow:CiCdPipelineName": "post-merge", "flaky": ""},
            "other": {"bazel_version": "8.4.2"}
        })
    );
    // The last of a repeated key wins; a bare word is a key with no value.
    assert_eq!(
        json(&[
            "command_name=build",
            "user_keyword=a=1",
            "zz=1",
            "user_keyword=a=2",
            "command_name=test",
            "bare",
            "zz=2",
            "user_keyword=b",
        ]),
        serde_json::json!({
            "commandName": "test",
            "userKeywords": {"a": "2", "b": ""},
            "other": {"bare": "", "zz": "2"}
        })
    );
}

/// An event's keywords are its own: the invocation's (parsed once) are
/// used only when they are the same.
#[test]
fn an_event_with_other_keywords_keeps_them() {
    let inv = invocation();
    let same = streamed(bazel(test_result().encode_to_vec()));
    let mut other = same.clone();
    if let Some(p) = other.event.as_mut() {
        p.notification_keywords = vec!["command_name=coverage".into(), "x=1".into()];
    }
    let norm = Normalizer::default();
    let (a, b) = (
        norm.build_event(&inv, 1, &same),
        norm.build_event(&inv, 2, &other),
    );
    let payload =
        |e: &Envelope| -> serde_json::Value { serde_json::from_str(&e.payload.text()).unwrap() };
    assert_eq!(a.envelope.attributes["command_name"], "test");
    assert_eq!(
        payload(&a.envelope)["parsedKeywords"]["commandName"],
        "test"
    );
    assert_eq!(b.envelope.attributes["command_name"], "coverage");
    assert_eq!(
        payload(&b.envelope)["parsedKeywords"],
        serde_json::json!({"commandName": "coverage", "other": {"x": "1"}})
    );
    let mut none = same.clone();
    if let Some(p) = none.event.as_mut() {
        p.notification_keywords.clear();
    }
    let c = norm.build_event(&inv, 3, &none);
    assert!(!c.envelope.attributes.contains_key("command_name"));
    assert!(payload(&c.envelope).get("parsedKeywords").is_none());
}

/// Random bytes, truncations and nesting in every decodable position:
/// never a panic, always one envelope with valid JSON.
#[test]
fn hostile_input_never_panics() {
    let n = Normalizer::default();
    let inv = invocation();
    let mut rng = fastrand::Rng::with_seed(7);
    let good_lifecycle = finished().payload.unwrap().value;
    let good_bazel = test_result().encode_to_vec();
    // Any inside Any inside Any ... deeper than expansion goes.
    let mut deep = Any {
        type_url: pb::BAZEL_EVENT_TYPE_URL.into(),
        value: good_bazel.clone(),
    };
    for _ in 0..40 {
        deep = Any {
            type_url: "type.googleapis.com/google.protobuf.Any".into(),
            value: deep.encode_to_vec(),
        };
    }
    let type_urls = [
        pb::LIFECYCLE_TYPE_URL,
        pb::BAZEL_EVENT_TYPE_URL,
        "type.googleapis.com/google.protobuf.Any",
        "type.googleapis.com/nope.Nope",
        "",
        "no-slash",
    ];
    for i in 0..3000 {
        let bytes: Vec<u8> = match i % 5 {
            0 => (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect(),
            1 => good_lifecycle[..rng.usize(0..=good_lifecycle.len())].to_vec(),
            2 => {
                let mut b = good_bazel.clone();
                let at = rng.usize(..b.len());
                b[at] = rng.u8(..);
                b
            }
            3 => vec![0xff; rng.usize(0..5000)],
            _ => deep.encode_to_vec(),
        };
        let type_url = type_urls[rng.usize(..type_urls.len())].to_string();
        let mut note = finished();
        note.payload = Some(Any {
            type_url: type_url.clone(),
            value: bytes.clone(),
        });
        if i % 7 == 0 {
            note.id = String::from_utf8_lossy(&bytes).into_owned();
        }
        let out = n.lifecycle(&note);
        serde_json::from_slice::<serde_json::Value>(out.envelope.json()).unwrap();

        let ev = streamed(bes::build_event::Event::BazelEvent(Any {
            type_url,
            value: bytes,
        }));
        let out = n.build_event(&inv, i, &ev);
        serde_json::from_slice::<serde_json::Value>(out.envelope.json()).unwrap();
    }
    // Invalid UTF-8 inside a string field of a known type.
    let mut bad_utf8 = vec![0x0a, 0x04];
    bad_utf8.extend([0xc3, 0x28, 0xa0, 0xa1]);
    let out = n.lifecycle(&nq::Notification {
        id: "x".into(),
        timestamp: None,
        payload: Some(Any {
            type_url: pb::LIFECYCLE_TYPE_URL.into(),
            value: bad_utf8,
        }),
    });
    assert_eq!(out.envelope.name, "raw_notification");
    // A huge payload survives intact.
    let huge = vec![7u8; 8 * 1024 * 1024];
    let out = n.lifecycle(&nq::Notification {
        id: "y".into(),
        timestamp: None,
        payload: Some(Any {
            type_url: "type.googleapis.com/big.Blob".into(),
            value: huge,
        }),
    });
    assert!(out.envelope.json().len() > 8 * 1024 * 1024);
}

/// `notification` with other ids: an instance, build, notification and
/// invocation id that all need escaping in JSON.
fn with_odd_ids(mut n: nq::Notification) -> nq::Notification {
    let any = n.payload.as_mut().expect("has a payload");
    let mut l = es::BuildLifecycleEventNotification::decode(any.value.as_slice()).unwrap();
    l.instance_name = "ci \"east\"\n\\".into();
    l.build_id = "b\"1\u{1}".into();
    if let Some(es::build_lifecycle_event_notification::Kind::InvocationFinished(i)) = &mut l.kind {
        i.invocation_id = "inv\t\"x\"".into();
    }
    any.value = l.encode_to_vec();
    n.id = "not a \"uuid\"".into();
    n
}

/// Build-event envelopes are written from parts rendered once per
/// invocation. Each must be what the field-by-field encoder writes for its
/// fields, and its payload what the generated encoder writes for the event
/// (plain assertions, so this holds in release builds too), whatever the
/// event looks like and in whatever order they come.
#[test]
fn prewritten_build_events_match_the_field_by_field_encoders() {
    use evbridge::normalize::json::ProtoJson;
    use evbridge::sinks::{Event, Payload};

    fn progress(ev: &mut es::StreamedBuildEvent) -> &mut es::BuildProgressEvent {
        ev.event.as_mut().expect("has an event")
    }
    let base = streamed(bazel(test_result().encode_to_vec()));
    let vary = |f: &dyn Fn(&mut es::StreamedBuildEvent)| {
        let mut ev = base.clone();
        f(&mut ev);
        ev
    };
    let events = [
        base.clone(),
        vary(&|ev| progress(ev).build_event.as_mut().unwrap().event_time = None),
        vary(&|ev| ev.principal.clear()),
        vary(&|ev| ev.principal = "eve \"q\"".into()),
        vary(&|ev| ev.is_last = true),
        vary(&|ev| {
            ev.is_last = true;
            ev.event = None;
        }),
        vary(&|ev| {
            progress(ev).stream_id.as_mut().unwrap().component =
                bes::stream_id::BuildComponent::Controller as i32
        }),
        vary(&|ev| progress(ev).service_level = Some(1)),
        vary(&|ev| progress(ev).notification_keywords = vec!["command_name=run".into()]),
        vary(&|ev| progress(ev).notification_keywords.clear()),
        base.clone(),
    ];
    for note in [finished(), with_odd_ids(finished())] {
        let norm = Normalizer::default();
        let inv = norm.lifecycle(&note).fetch.expect("invocation_finished");
        for (seq, ev) in events.iter().enumerate() {
            let env = norm.build_event(&inv, seq as u64, ev).envelope;
            let text = env.payload.text().into_owned();
            let fields = Event {
                payload: Payload::parse(text.clone()).unwrap(),
                ..env.event().clone()
            };
            assert_eq!(
                std::str::from_utf8(Envelope::new(fields).json()).unwrap(),
                std::str::from_utf8(env.json()).unwrap(),
                "event {seq}"
            );
            let mut w = JsonWriter::default();
            ev.write_json(&mut w);
            let mut want: serde_json::Value = serde_json::from_str(&w.finish().0).unwrap();
            let raw = ev
                .event
                .as_ref()
                .map_or(&[][..], |p| &p.notification_keywords);
            let keywords = Keywords::parse(raw);
            if !keywords.is_empty() {
                let mut w = JsonWriter::default();
                keywords.write(&mut w);
                want["parsedKeywords"] = serde_json::from_str(&w.finish().0).unwrap();
            }
            let got: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(got, want, "event {seq}");
            assert_eq!(env.key, inv.invocation_id);
        }
    }
}

/// Lifecycle envelopes are written directly too (id, name, time and
/// attribute names unescaped, version and topic rendered once): each must
/// be what the field-by-field encoder writes for its fields, in release
/// builds too, for every kind, odd ids, an odd topic, no principal and no
/// keywords.
#[test]
fn prewritten_lifecycle_envelopes_match_the_field_by_field_encoder() {
    use es::build_lifecycle_event_notification::{self as l, Kind};
    use evbridge::normalize::Topics;
    use evbridge::sinks::{Event, Payload};

    let kinds = [
        Kind::BuildStarted(l::BuildStarted {}),
        Kind::InvocationStarted(l::InvocationStarted {
            invocation_id: "i-1".into(),
        }),
        Kind::InvocationFinished(l::InvocationFinished {
            invocation_id: String::new(),
        }),
        Kind::BuildFinished(l::BuildFinished {}),
    ];
    let mut notes: Vec<nq::Notification> = kinds.into_iter().map(notification).collect();
    notes.push(finished());
    let plain = |n: &nq::Notification, f: &dyn Fn(&mut es::BuildLifecycleEventNotification)| {
        let mut n = n.clone();
        let any = n.payload.as_mut().unwrap();
        let mut l = es::BuildLifecycleEventNotification::decode(any.value.as_slice()).unwrap();
        f(&mut l);
        any.value = l.encode_to_vec();
        n
    };
    for n in notes.clone() {
        notes.push(with_odd_ids(n.clone()));
        notes.push(plain(&n, &|l| l.auth_context = None));
        notes.push(plain(&n, &|l| l.keywords.clear()));
        notes.push(plain(&n, &|l| l.kind = None));
        notes.push(nq::Notification {
            timestamp: None,
            ..n.clone()
        });
    }
    let odd = Topics {
        lifecycle: "life\"cycle\"\n".into(),
        ..Topics::default()
    };
    for norm in [Normalizer::default(), Normalizer::new(odd)] {
        for (i, n) in notes.iter().enumerate() {
            let env = norm.lifecycle(n).envelope;
            let fields = Event {
                payload: Payload::parse(env.payload.text().into_owned()).unwrap(),
                ..env.event().clone()
            };
            assert_eq!(
                std::str::from_utf8(Envelope::new(fields).json()).unwrap(),
                std::str::from_utf8(env.json()).unwrap(),
                "notification {i}"
            );
        }
    }
}

#[test]
fn service_levels_are_named_as_upstream_numbers_them() {
    // google/devtools/build/v1/publish_build_event.proto:
    // NONINTERACTIVE = 0 (the default), INTERACTIVE = 1.
    use bes::publish_lifecycle_event_request::ServiceLevel;
    assert_eq!(ServiceLevel::Noninteractive as i32, 0);
    assert_eq!(ServiceLevel::Interactive as i32, 1);
    let norm = Normalizer::default();
    for (level, name) in [(0, "NONINTERACTIVE"), (1, "INTERACTIVE")] {
        let mut ev = streamed(bazel(test_result().encode_to_vec()));
        ev.event.as_mut().unwrap().service_level = Some(level);
        let out = norm.build_event(&invocation(), 1, &ev);
        let v: serde_json::Value = serde_json::from_slice(out.envelope.json()).unwrap();
        assert_eq!(v["payload"]["event"]["serviceLevel"], name, "level {level}");
    }
}

#[test]
fn bazel_events_are_named_by_kind_and_bad_ones_stay_bazel_event() {
    use bep::build_event::Payload;
    let norm = Normalizer::default();
    let named = |payload: Option<Payload>| {
        let ev = bep::BuildEvent {
            payload,
            ..test_result()
        };
        norm.build_event(&invocation(), 0, &streamed(bazel(ev.encode_to_vec())))
            .envelope
            .name
            .to_string()
    };
    assert_eq!(
        named(Some(Payload::Progress(Default::default()))),
        "bazel_progress"
    );
    assert_eq!(
        named(Some(Payload::Aborted(Default::default()))),
        "bazel_aborted"
    );
    assert_eq!(
        named(Some(Payload::TestSummary(Default::default()))),
        "bazel_test_summary"
    );
    assert_eq!(
        named(Some(Payload::Completed(Default::default()))),
        "bazel_target_complete"
    );
    assert_eq!(
        named(Some(Payload::StructuredCommandLine(Default::default()))),
        "bazel_command_line"
    );
    assert_eq!(named(None), "bazel_event");
    let bad = norm.build_event(&invocation(), 0, &streamed(bazel(vec![0xff])));
    assert_eq!(bad.envelope.name, "bazel_event");
}
