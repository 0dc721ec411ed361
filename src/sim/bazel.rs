//! The Bazel events the simulator's builds carry (a `started` event, the
//! final status) and sample envelopes for tests and benchmarks.

use prost::Message as _;
use prost_types::Any;

use super::world::{GenConfig, generate, ts};
use crate::pb::{self, bep, bes};

pub(super) fn started(inv: &str, command: &str, t: i64) -> bep::BuildEvent {
    use bep::build_event::Payload;
    bep::BuildEvent {
        id: Some(bep::BuildEventId {
            id: Some(bep::build_event_id::Id::Started(Default::default())),
        }),
        payload: Some(Payload::Started(bep::BuildStarted {
            uuid: inv.to_string(),
            start_time: Some(ts(t, 0)),
            build_tool_version: "8.4.2".into(),
            command: command.to_string(),
            working_directory: "/home/ci/workspace".into(),
            workspace_directory: "/home/ci/workspace".into(),
            server_pid: 4242,
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub(super) fn bazel_any(event: bep::BuildEvent) -> Any {
    Any {
        type_url: pb::BAZEL_EVENT_TYPE_URL.into(),
        value: event.encode_to_vec(),
    }
}

pub(super) fn build_status(ok: bool, final_invocation_id: &str) -> bes::BuildStatus {
    use bes::build_status::Result as R;
    bes::BuildStatus {
        result: if ok {
            R::CommandSucceeded
        } else {
            R::CommandFailed
        } as i32,
        details: None,
        final_invocation_id: final_invocation_id.to_string(),
        build_tool_exit_code: Some(if ok { 0 } else { 3 }),
        error_message: if ok {
            String::new()
        } else {
            "build failed: 1 test failed".into()
        },
    }
}

/// `n` realistic envelopes (lifecycle and build events, in the order the
/// bridge would produce them), for benchmarks.
pub fn sample_envelopes(n: usize) -> Vec<evbridge_sinks::Envelope> {
    let world = generate(&GenConfig {
        builds: n / 20 + 1,
        events_per_invocation: 20,
        ..GenConfig::default()
    });
    let norm = crate::normalize::Normalizer::default();
    let mut out = Vec::with_capacity(n);
    for note in &world.notifications {
        let life = norm.lifecycle(note);
        if let Some(inv) = &life.fetch
            && let Some(stored) = world.invocations.iter().find(|i| i.id == inv.invocation_id)
        {
            for (seq, ev) in stored.events.iter().enumerate() {
                out.push(norm.build_event(inv, seq as u64, ev).envelope);
            }
        }
        out.push(life.envelope);
        if out.len() >= n {
            break;
        }
    }
    out.truncate(n);
    out
}
