//! Deterministic content for the simulator: builds with realistic
//! keywords, principals, console output and Bazel events, all derived from
//! one seed so every run (and every test) sees the same cluster.

use prost::Message as _;
use prost_types::{Any, Timestamp};
use uuid::Uuid;

pub use super::bazel::sample_envelopes;
use super::bazel::{bazel_any, build_status, started};
use crate::pb::{self, LIFECYCLE_TYPE_URL, bep, bes, es, nq};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenConfig {
    /// Number of builds; each has one or two invocations.
    pub builds: usize,
    /// Events streamed per invocation (at least 1).
    pub events_per_invocation: usize,
    /// Seed of everything random.
    pub seed: u64,
    /// EngFlow instance name.
    pub instance: String,
    /// After every K good notifications, add one whose payload does not
    /// decode (alternately: garbage bytes, unknown type URL). 0 = never.
    pub bad_payload_every: usize,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            builds: 10,
            events_per_invocation: 20,
            seed: 1,
            instance: "default".into(),
            bad_payload_every: 0,
        }
    }
}

/// One invocation's stored events.
#[derive(Debug, Clone)]
pub struct GenInvocation {
    /// Invocation id.
    pub id: String,
    /// Events in stream order (continuation tokens are added when served).
    pub events: Vec<es::StreamedBuildEvent>,
    /// Index (in [`World::notifications`]) of its `invocation_started`.
    pub started_at: usize,
    /// Index of its `invocation_finished`.
    pub finished_at: usize,
}

/// One build's stored build-level events.
#[derive(Debug, Clone)]
pub struct GenBuild {
    /// Build id.
    pub id: String,
    /// `build_enqueued` … `build_finished`.
    pub events: Vec<es::StreamedBuildEvent>,
    /// Index of its `build_started` notification.
    pub started_at: usize,
    /// Index of its `build_finished` notification.
    pub finished_at: usize,
}

/// Everything the simulated cluster holds.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// The queue's notifications, in release order.
    pub notifications: Vec<nq::Notification>,
    /// Indices of notifications whose payload is deliberately undecodable.
    pub bad: Vec<usize>,
    /// Invocations, in order of their start.
    pub invocations: Vec<GenInvocation>,
    /// Builds, in order.
    pub builds: Vec<GenBuild>,
}

impl World {
    /// Total build events over all invocations.
    pub fn invocation_events(&self) -> usize {
        self.invocations.iter().map(|i| i.events.len()).sum()
    }
}

const PRINCIPALS: [&str; 5] = [
    "alice@example.com",
    "bob@example.com",
    "ci-runner@example.iam.gserviceaccount.com",
    "carol@example.com",
    "release-bot@example.com",
];
const PIPELINES: [&str; 4] = ["post-merge", "pre-submit", "nightly", "release"];
const TARGETS: [&str; 8] = [
    "//server:server_test",
    "//server/api:handlers_test",
    "//client/cli:cli_test",
    "//lib/cache:lru_test",
    "//lib/net:retry_test",
    "//tools/lint:lint_test",
    "//web:e2e_test",
    "//proto:compat_test",
];
const CONSOLE: [&str; 8] = [
    "Loading: 0 packages loaded",
    "Analyzing: 214 targets (312 packages loaded, 9120 targets configured)",
    "INFO: Analyzed 214 targets (312 packages loaded, 9120 targets configured).",
    "INFO: Found 180 targets and 34 test targets...",
    "[1,024 / 3,311] Compiling server/api/handlers.cc; 3s remote, remote-cache",
    "[2,870 / 3,311] Testing //lib/cache:lru_test; 1s remote",
    "INFO: From Linking server/server: ld: warning: -pie being ignored",
    "INFO: Elapsed time: 84.213s, Critical Path: 41.77s",
];
/// 2026-11-25T00:00:00Z.
const BASE_SECONDS: i64 = 1_795_564_800;

struct Gen {
    rng: fastrand::Rng,
    cfg: GenConfig,
    world: World,
    good_since_bad: usize,
    bad_count: usize,
}

/// Generates the world a seed describes.
pub fn generate(cfg: &GenConfig) -> World {
    let mut g = Gen {
        rng: fastrand::Rng::with_seed(cfg.seed),
        cfg: cfg.clone(),
        world: World::default(),
        good_since_bad: 0,
        bad_count: 0,
    };
    for b in 0..cfg.builds {
        g.build(b);
    }
    g.world
}

pub(super) fn ts(seconds: i64, nanos: i32) -> Timestamp {
    Timestamp { seconds, nanos }
}

impl Gen {
    fn uuid(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.u128(..).to_le_bytes()).into_uuid()
    }

    fn build(&mut self, b: usize) {
        let build_id = self.uuid().to_string();
        let principal = PRINCIPALS[self.rng.usize(..PRINCIPALS.len())];
        let pipeline = PIPELINES[self.rng.usize(..PIPELINES.len())];
        let command = if self.rng.u8(..4) == 0 {
            "build"
        } else {
            "test"
        };
        let keywords = vec![
            format!("command_name={command}"),
            format!("user_keyword=engflow:CiCdPipelineName={pipeline}"),
            format!("user_keyword=engflow:CiCdJobName={pipeline}-{}", b % 7),
            "user_keyword=engflow:Branch=main".to_string(),
            format!("user_keyword=engflow:CiCdRunNumber={}", 4100 + b),
        ];
        let mut t = BASE_SECONDS + b as i64 * 45;
        let invocations = if self.rng.u8(..5) == 0 { 2 } else { 1 };
        let ctx = Ctx {
            build_id: build_id.clone(),
            principal: principal.to_string(),
            keywords,
            command,
        };

        let started_at = self.lifecycle(&ctx, t, Kind::BuildStarted);
        let mut build_events = vec![self.streamed(
            &ctx,
            "",
            t,
            bes::build_event::Event::BuildEnqueued(Default::default()),
        )];
        let mut all_ok = true;
        for attempt in 0..invocations {
            let inv_id = self.uuid().to_string();
            t += 1;
            let started = self.lifecycle(&ctx, t, Kind::InvocationStarted(inv_id.clone()));
            // A first attempt that fails is retried by a second invocation.
            let ok = attempt + 1 == invocations && self.rng.u8(..10) != 0;
            all_ok = ok;
            let events = self.invocation_events(&ctx, &inv_id, t, ok);
            t += 2 + self.cfg.events_per_invocation as i64 / 4;
            let finished = self.lifecycle(&ctx, t, Kind::InvocationFinished(inv_id.clone()));
            self.world.invocations.push(GenInvocation {
                id: inv_id,
                events,
                started_at: started,
                finished_at: finished,
            });
        }
        t += 1;
        let status = build_status(all_ok, "");
        build_events.push(self.streamed(
            &ctx,
            "",
            t,
            bes::build_event::Event::BuildFinished(bes::build_event::BuildFinished {
                status: Some(status),
                details: None,
            }),
        ));
        if let Some(last) = build_events.last_mut() {
            last.is_last = true;
        }
        let finished_at = self.lifecycle(&ctx, t, Kind::BuildFinished);
        self.world.builds.push(GenBuild {
            id: build_id,
            events: build_events,
            started_at,
            finished_at,
        });
    }

    /// Adds a lifecycle notification; returns its index.
    fn lifecycle(&mut self, ctx: &Ctx, t: i64, kind: Kind) -> usize {
        use es::build_lifecycle_event_notification as l;
        let kind = match kind {
            Kind::BuildStarted => l::Kind::BuildStarted(l::BuildStarted {}),
            Kind::BuildFinished => l::Kind::BuildFinished(l::BuildFinished {}),
            Kind::InvocationStarted(id) => {
                l::Kind::InvocationStarted(l::InvocationStarted { invocation_id: id })
            }
            Kind::InvocationFinished(id) => {
                l::Kind::InvocationFinished(l::InvocationFinished { invocation_id: id })
            }
        };
        let payload = es::BuildLifecycleEventNotification {
            instance_name: self.cfg.instance.clone(),
            build_id: ctx.build_id.clone(),
            auth_context: Some(pb::engflow::auth::AuthContext {
                user: Some(pb::engflow::iam::v1::User {
                    principal: ctx.principal.clone(),
                    role: vec!["user".into()],
                    profile_picture_url: None,
                }),
            }),
            keywords: ctx.keywords.clone(),
            kind: Some(kind),
        };
        let n = nq::Notification {
            id: self.uuid().to_string(),
            timestamp: Some(ts(t, 0)),
            payload: Some(Any {
                type_url: LIFECYCLE_TYPE_URL.into(),
                value: payload.encode_to_vec(),
            }),
        };
        self.push(n)
    }

    fn push(&mut self, n: nq::Notification) -> usize {
        self.world.notifications.push(n);
        let index = self.world.notifications.len() - 1;
        self.good_since_bad += 1;
        let every = self.cfg.bad_payload_every;
        if every > 0 && self.good_since_bad >= every {
            self.good_since_bad = 0;
            self.bad_count += 1;
            let (type_url, value) = if self.bad_count % 2 == 1 {
                // Field 1 with wire type 7, which no protobuf decoder accepts.
                (
                    LIFECYCLE_TYPE_URL.to_string(),
                    vec![0x0f, 0xde, 0xad, 0xbe, 0xef],
                )
            } else {
                (
                    "type.googleapis.com/example.unknown.v1.Mystery".to_string(),
                    b"\x0a\x03abc".to_vec(),
                )
            };
            let bad = nq::Notification {
                id: self.uuid().to_string(),
                timestamp: self.world.notifications[index].timestamp,
                payload: Some(Any { type_url, value }),
            };
            self.world.notifications.push(bad);
            self.world.bad.push(self.world.notifications.len() - 1);
        }
        index
    }

    fn streamed(
        &mut self,
        ctx: &Ctx,
        invocation_id: &str,
        t: i64,
        event: bes::build_event::Event,
    ) -> es::StreamedBuildEvent {
        let nanos = self.rng.i32(0..1_000_000_000);
        es::StreamedBuildEvent {
            is_last: false,
            continuation_token: String::new(),
            event: Some(es::BuildProgressEvent {
                stream_id: Some(bes::StreamId {
                    build_id: ctx.build_id.clone(),
                    component: if invocation_id.is_empty() {
                        bes::stream_id::BuildComponent::Controller
                    } else {
                        bes::stream_id::BuildComponent::Tool
                    } as i32,
                    invocation_id: invocation_id.to_string(),
                }),
                service_level: Some(
                    bes::publish_lifecycle_event_request::ServiceLevel::Interactive as i32,
                ),
                notification_keywords: ctx.keywords.clone(),
                build_event: Some(bes::BuildEvent {
                    event_time: Some(ts(t, nanos)),
                    event: Some(event),
                }),
            }),
            principal: ctx.principal.clone(),
        }
    }

    fn invocation_events(
        &mut self,
        ctx: &Ctx,
        inv: &str,
        t0: i64,
        ok: bool,
    ) -> Vec<es::StreamedBuildEvent> {
        use bes::build_event::Event as E;
        let m = self.cfg.events_per_invocation.max(1);
        let mut out = Vec::with_capacity(m);
        for i in 0..m {
            let t = t0 + (i as i64) / 4;
            let event = if i == 0 {
                E::InvocationAttemptStarted(bes::build_event::InvocationAttemptStarted {
                    attempt_number: 1,
                    details: None,
                })
            } else if i + 1 == m {
                E::ComponentStreamFinished(bes::build_event::BuildComponentStreamFinished {
                    r#type: bes::build_event::build_component_stream_finished::FinishType::Finished
                        as i32,
                })
            } else if i + 2 == m {
                E::InvocationAttemptFinished(bes::build_event::InvocationAttemptFinished {
                    invocation_status: Some(build_status(ok, inv)),
                    details: None,
                })
            } else if i == 1 {
                E::BazelEvent(bazel_any(started(inv, ctx.command, t)))
            } else if self.rng.u8(..3) == 0 {
                let line = CONSOLE[self.rng.usize(..CONSOLE.len())];
                E::ConsoleOutput(bes::build_event::ConsoleOutput {
                    r#type: if line.contains("warning") {
                        bes::ConsoleOutputStream::Stderr
                    } else {
                        bes::ConsoleOutputStream::Stdout
                    } as i32,
                    output: Some(bes::build_event::console_output::Output::TextOutput(
                        format!("{line}\n"),
                    )),
                })
            } else {
                E::BazelEvent(bazel_any(self.bazel_event(i, t, ok)))
            };
            out.push(self.streamed(ctx, inv, t, event));
        }
        if let Some(last) = out.last_mut() {
            last.is_last = true;
        }
        out
    }

    fn bazel_event(&mut self, i: usize, t: i64, ok: bool) -> bep::BuildEvent {
        use bep::build_event::Payload;
        use bep::build_event_id::{Id, ProgressId, TargetCompletedId, TestResultId};
        let target = TARGETS[self.rng.usize(..TARGETS.len())].to_string();
        match self.rng.u8(..3) {
            0 => bep::BuildEvent {
                id: Some(bep::BuildEventId {
                    id: Some(Id::Progress(ProgressId {
                        opaque_count: i as i32,
                    })),
                }),
                payload: Some(Payload::Progress(bep::Progress {
                    stdout: String::new(),
                    stderr: format!("{}\n", CONSOLE[i % CONSOLE.len()]),
                })),
                ..Default::default()
            },
            1 => bep::BuildEvent {
                id: Some(bep::BuildEventId {
                    id: Some(Id::TargetCompleted(TargetCompletedId {
                        label: target,
                        configuration: Some(bep::build_event_id::ConfigurationId {
                            id: "k8-fastbuild".into(),
                        }),
                        aspect: String::new(),
                    })),
                }),
                payload: Some(Payload::Completed(bep::TargetComplete {
                    success: true,
                    tag: vec!["requires-network".into()],
                    ..Default::default()
                })),
                ..Default::default()
            },
            _ => {
                let passed = ok || self.rng.u8(..3) != 0;
                let millis = self.rng.i64(50..30_000);
                bep::BuildEvent {
                    id: Some(bep::BuildEventId {
                        id: Some(Id::TestResult(TestResultId {
                            label: target,
                            configuration: Some(bep::build_event_id::ConfigurationId {
                                id: "k8-fastbuild".into(),
                            }),
                            run: 1,
                            shard: 1,
                            attempt: 1,
                        })),
                    }),
                    payload: Some(Payload::TestResult(bep::TestResult {
                        status: if passed {
                            bep::TestStatus::Passed
                        } else {
                            bep::TestStatus::Failed
                        } as i32,
                        cached_locally: self.rng.bool(),
                        test_attempt_start: Some(ts(t, 0)),
                        test_attempt_duration: Some(prost_types::Duration {
                            seconds: millis / 1000,
                            nanos: (millis % 1000) as i32 * 1_000_000,
                        }),
                        execution_info: Some(bep::test_result::ExecutionInfo {
                            strategy: "remote".into(),
                            cached_remotely: false,
                            exit_code: if passed { 0 } else { 1 },
                            hostname: format!("worker-{}", self.rng.u8(1..40)),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }
            }
        }
    }
}

struct Ctx {
    build_id: String,
    principal: String,
    keywords: Vec<String>,
    command: &'static str,
}

enum Kind {
    BuildStarted,
    BuildFinished,
    InvocationStarted(String),
    InvocationFinished(String),
}
