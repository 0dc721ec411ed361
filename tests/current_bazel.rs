//! Events with the fields only a current Bazel writes (failure details,
//! structured command lines, test execution info, build metrics, host and
//! user), built with the project's schema: encoded and decoded back equal,
//! normalized with every field in the JSON and nothing unknown.

// BuildFinished.overall_success is deprecated, and Bazel still writes it.
#![allow(deprecated)]

use evbridge::normalize::Normalizer;
use evbridge::pb::{self, bep, bes, command_line, es, failure_details as fd};
use evbridge::sim::world::{GenConfig, generate};
use prost::Message;
use serde_json::{Value, json};

fn failure(message: &str) -> fd::FailureDetail {
    fd::FailureDetail {
        message: message.into(),
        category: Some(fd::failure_detail::Category::Spawn(fd::Spawn {
            code: fd::spawn::Code::NonZeroExit as i32,
            catastrophic: false,
            spawn_exit_code: 1,
        })),
    }
}

fn id(kind: bep::build_event_id::Id) -> Option<bep::BuildEventId> {
    Some(bep::BuildEventId { id: Some(kind) })
}

fn events() -> Vec<bep::BuildEvent> {
    use bep::build_event::Payload as P;
    use bep::build_event_id::{self as bid, Id};
    let config = Some(bid::ConfigurationId {
        id: "k8-fastbuild".into(),
    });
    let ts = |s| {
        Some(prost_types::Timestamp {
            seconds: s,
            nanos: 5_000_000,
        })
    };
    vec![
        bep::BuildEvent {
            id: id(Id::Started(bid::BuildStartedId {})),
            payload: Some(P::Started(bep::BuildStarted {
                uuid: "6c0e3b4e-0f5b-4b8e-9a51-2f0c4d3e2a1b".into(),
                start_time: ts(1_795_564_800),
                build_tool_version: "9.0.0".into(),
                command: "test".into(),
                host: "ci-worker-7".into(),
                user: "alice".into(),
                server_pid: 4242,
                ..Default::default()
            })),
            ..Default::default()
        },
        bep::BuildEvent {
            id: id(Id::StructuredCommandLine(bid::StructuredCommandLineId {
                command_line_label: "canonical".into(),
            })),
            payload: Some(P::StructuredCommandLine(command_line::CommandLine {
                command_line_label: "canonical".into(),
                sections: vec![command_line::CommandLineSection {
                    section_label: "command options".into(),
                    section_type: Some(
                        command_line::command_line_section::SectionType::OptionList(
                            command_line::OptionList {
                                option: vec![command_line::Option {
                                    combined_form: "--keep_going".into(),
                                    option_name: "keep_going".into(),
                                    option_value: "1".into(),
                                    effect_tags: vec![
                                        pb::options::OptionEffectTag::EagernessToExit as i32,
                                    ],
                                    metadata_tags: vec![],
                                    source: "command line".into(),
                                }],
                            },
                        ),
                    ),
                }],
            })),
            ..Default::default()
        },
        bep::BuildEvent {
            id: id(Id::ActionCompleted(bid::ActionCompletedId {
                primary_output: "bazel-out/k8-fastbuild/bin/server/handlers.o".into(),
                label: "//server:handlers".into(),
                configuration: config.clone(),
            })),
            payload: Some(P::Action(bep::ActionExecuted {
                success: false,
                r#type: "CppCompile".into(),
                exit_code: 1,
                command_line: vec!["gcc".into(), "-c".into(), "handlers.cc".into()],
                failure_detail: Some(failure(
                    "C++ compilation of rule '//server:handlers' failed",
                )),
                start_time: ts(1_795_564_810),
                end_time: ts(1_795_564_812),
                ..Default::default()
            })),
            ..Default::default()
        },
        bep::BuildEvent {
            id: id(Id::TargetCompleted(bid::TargetCompletedId {
                label: "//server:handlers".into(),
                configuration: config.clone(),
                aspect: String::new(),
            })),
            payload: Some(P::Completed(bep::TargetComplete {
                success: false,
                failure_detail: Some(failure("target failed to build")),
                ..Default::default()
            })),
            ..Default::default()
        },
        bep::BuildEvent {
            id: id(Id::TestResult(bid::TestResultId {
                label: "//lib:cache_test".into(),
                configuration: config.clone(),
                run: 1,
                shard: 2,
                attempt: 1,
            })),
            payload: Some(P::TestResult(bep::TestResult {
                status: bep::TestStatus::Flaky as i32,
                status_details: "passed on retry".into(),
                test_attempt_start: ts(1_795_564_820),
                test_attempt_duration: Some(prost_types::Duration {
                    seconds: 3,
                    nanos: 0,
                }),
                execution_info: Some(bep::test_result::ExecutionInfo {
                    strategy: "remote".into(),
                    cached_remotely: true,
                    exit_code: 0,
                    hostname: "worker-12".into(),
                    timing_breakdown: Some(bep::test_result::execution_info::TimingBreakdown {
                        name: "totalTime".into(),
                        time: Some(prost_types::Duration {
                            seconds: 3,
                            nanos: 0,
                        }),
                        ..Default::default()
                    }),
                    resource_usage: vec![bep::test_result::execution_info::ResourceUsage {
                        name: "peakMemory".into(),
                        value: 123_456_789,
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        },
        bep::BuildEvent {
            id: id(Id::BuildMetrics(bid::BuildMetricsId {})),
            payload: Some(P::BuildMetrics(bep::BuildMetrics {
                action_summary: Some(bep::build_metrics::ActionSummary {
                    actions_created: 3311,
                    actions_executed: 1024,
                    ..Default::default()
                }),
                timing_metrics: Some(bep::build_metrics::TimingMetrics {
                    wall_time_in_ms: 84_213,
                    critical_path_time: Some(prost_types::Duration {
                        seconds: 41,
                        nanos: 770_000_000,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        },
        bep::BuildEvent {
            id: id(Id::BuildFinished(bid::BuildFinishedId {})),
            last_message: true,
            payload: Some(P::Finished(bep::BuildFinished {
                overall_success: false,
                exit_code: Some(bep::build_finished::ExitCode {
                    name: "BUILD_FAILURE".into(),
                    code: 1,
                }),
                finish_time: ts(1_795_564_900),
                failure_detail: Some(failure("build did NOT complete successfully")),
                ..Default::default()
            })),
            ..Default::default()
        },
    ]
}

#[test]
fn current_bazel_fields_survive_encoding_and_normalization() {
    let world = generate(&GenConfig {
        builds: 1,
        ..GenConfig::default()
    });
    let norm = Normalizer::default();
    let inv = world
        .notifications
        .iter()
        .find_map(|n| norm.lifecycle(n).fetch)
        .unwrap();
    let template = world.invocations[0].events[0].clone();
    let mut names = Vec::new();
    for (seq, ev) in events().into_iter().enumerate() {
        let bytes = ev.encode_to_vec();
        assert_eq!(bep::BuildEvent::decode(bytes.as_slice()).unwrap(), ev);
        let mut streamed: es::StreamedBuildEvent = template.clone();
        streamed
            .event
            .as_mut()
            .unwrap()
            .build_event
            .as_mut()
            .unwrap()
            .event = Some(bes::build_event::Event::BazelEvent(prost_types::Any {
            type_url: pb::BAZEL_EVENT_TYPE_URL.into(),
            value: bytes,
        }));
        let raw = streamed.encode_to_vec();
        let out = norm.build_event_from(&inv, seq as u64, &streamed, Some(&raw));
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        assert!(out.unknown.is_empty(), "{:?}", out.unknown);
        let v: Value = serde_json::from_slice(out.envelope.json()).unwrap();
        names.push(v["name"].as_str().unwrap().to_string());
        let bazel = &v["payload"]["event"]["buildEvent"]["bazelEvent"];
        if let Some(fd) = ["action", "completed", "finished"]
            .iter()
            .find_map(|k| bazel.get(k))
            .map(|p| &p["failureDetail"])
        {
            assert_eq!(
                fd["spawn"],
                json!({"code": "NON_ZERO_EXIT", "spawnExitCode": 1}),
                "{bazel}"
            );
            assert!(fd["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
    assert_eq!(
        names,
        [
            "bazel_build_started",
            "bazel_command_line",
            "bazel_action_executed",
            "bazel_target_complete",
            "bazel_test_result",
            "bazel_build_metrics",
            "bazel_build_finished"
        ]
    );
}

#[test]
fn the_json_of_current_fields_is_what_bazel_would_print() {
    // Spot checks of the names and forms Bazel's own JSON uses.
    let evs = events();
    let json_of = |ev: &bep::BuildEvent| {
        let mut w = evbridge::normalize::json::JsonWriter::default();
        evbridge::normalize::json::ProtoJson::write_json(ev, &mut w);
        serde_json::from_str::<Value>(&w.finish().0).unwrap()
    };
    let started = json_of(&evs[0]);
    assert_eq!(started["started"]["host"], "ci-worker-7");
    assert_eq!(started["started"]["user"], "alice");
    assert_eq!(started["started"]["serverPid"], "4242");
    assert_eq!(started["started"]["startTime"], "2026-11-25T00:00:00.005Z");
    let cmd = json_of(&evs[1]);
    assert_eq!(
        cmd["structuredCommandLine"]["sections"][0]["optionList"]["option"][0]["effectTags"],
        json!(["EAGERNESS_TO_EXIT"])
    );
    let test = json_of(&evs[4]);
    let info = &test["testResult"]["executionInfo"];
    assert_eq!(info["timingBreakdown"]["time"], "3s");
    assert_eq!(info["resourceUsage"][0]["value"], "123456789");
    let metrics = json_of(&evs[5]);
    assert_eq!(
        metrics["buildMetrics"]["timingMetrics"]["criticalPathTime"],
        "41.770s"
    );
}
