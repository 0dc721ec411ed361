//! Bazel's events (the Build Event Protocol) as envelopes: one name per
//! kind, so a subscriber can bind to test results alone, and the parts of
//! an event's id that route well (label, configuration) as attributes.
//!
//! The table is generated from the schema in `proto/bazel/` by
//! `build/bep.rs`: a kind added to the schema is named without code here.

use crate::pb::bep;

include!(concat!(env!("OUT_DIR"), "/bep.rs"));

/// The name of a Bazel event that has no payload, or whose bytes do not
/// decode (it then travels raw, with the reason).
pub const UNNAMED: &str = "bazel_event";

/// What an event id says about the event, borrowed from it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IdParts<'a> {
    /// The id's kind, its field name in `BuildEventId` (`test_result`,
    /// `target_completed`, …): for an `aborted` event, what was aborted.
    pub kind: &'static str,
    /// The target label.
    pub label: Option<&'a str>,
    /// The configuration id.
    pub configuration: Option<&'a str>,
    /// The aspect, for events about an aspect of a target.
    pub aspect: Option<&'a str>,
}

/// The envelope name of `ev`.
pub fn name(ev: &bep::BuildEvent) -> &'static str {
    ev.payload.as_ref().map_or(UNNAMED, payload_name)
}

/// Whether `ev` holds an `Any` (only `ActionExecuted.strategy_details`
/// can): prost keeps an `Any`'s bytes as they came, so a re-encoded
/// length that matches says nothing about what is inside one.
pub fn holds_any(ev: &bep::BuildEvent) -> bool {
    matches!(&ev.payload, Some(bep::build_event::Payload::Action(a)) if !a.strategy_details.is_empty())
}

/// A test's status by name, for test results and summaries: what a
/// flaky-test tracker routes on.
pub fn test_status(ev: &bep::BuildEvent) -> Option<&'static str> {
    use bep::build_event::Payload as P;
    let status = match ev.payload.as_ref()? {
        P::TestResult(r) => r.status,
        P::TestSummary(s) => s.overall_status,
        P::TargetSummary(s) => s.overall_test_status,
        _ => return None,
    };
    bep::TestStatus::try_from(status)
        .ok()
        .map(|s| s.as_str_name())
}

/// The routing attributes of an event, empty ones left out, in fields
/// (not a list) so the envelope writer places each without comparing
/// names.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Routing<'a> {
    /// The id's aspect.
    pub aspect: Option<&'a str>,
    /// The id's kind.
    pub bep_id: Option<&'static str>,
    /// The id's configuration.
    pub configuration: Option<&'a str>,
    /// The id's label.
    pub label: Option<&'a str>,
    /// A test's status.
    pub test_status: Option<&'static str>,
}

impl<'a> Routing<'a> {
    /// Name and value of each attribute set, in name order.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &'a str)> + '_ {
        [
            ("aspect", self.aspect),
            ("bep_id", self.bep_id),
            ("configuration", self.configuration),
            ("label", self.label),
            ("test_status", self.test_status),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n, v)))
    }
}

/// The routing attributes of `ev`.
pub fn routing(ev: &bep::BuildEvent) -> Routing<'_> {
    let id = ev.id.as_ref().map(id_parts).unwrap_or_default();
    fn set(v: Option<&str>) -> Option<&str> {
        v.filter(|v| !v.is_empty())
    }
    Routing {
        aspect: set(id.aspect),
        bep_id: Some(id.kind).filter(|k| !k.is_empty()),
        configuration: set(id.configuration),
        label: set(id.label),
        test_status: test_status(ev),
    }
}

/// The routing attributes of `ev` as (name, value) pairs, in name order.
pub fn attributes(ev: &bep::BuildEvent) -> Vec<(&'static str, &str)> {
    routing(ev).pairs().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_prefixed_and_fit_the_accelbyte_pattern() {
        let mut seen = std::collections::HashSet::new();
        for (name, field, _) in NAMES {
            assert!(name.starts_with("bazel_"), "{name}");
            assert!(seen.insert(*name), "{name} twice");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    && !name.contains("__")
                    && !name.ends_with('_'),
                "{name} ({field})"
            );
            // Never one of the lifecycle or Build Event Service names.
            assert!(
                ![
                    "build_started",
                    "build_finished",
                    "invocation_started",
                    "invocation_finished",
                    "lifecycle_event",
                    "raw_notification",
                    UNNAMED,
                ]
                .contains(name),
                "{name}"
            );
        }
        assert!(NAMES.len() >= 20, "{}", NAMES.len());
    }

    #[test]
    fn a_test_result_is_named_and_routed_by_its_id() {
        use bep::build_event_id::{ConfigurationId, Id, TestResultId};
        let ev = bep::BuildEvent {
            id: Some(bep::BuildEventId {
                id: Some(Id::TestResult(TestResultId {
                    label: "//pkg:test".into(),
                    configuration: Some(ConfigurationId {
                        id: "k8-fastbuild".into(),
                    }),
                    run: 1,
                    shard: 2,
                    attempt: 3,
                })),
            }),
            payload: Some(bep::build_event::Payload::TestResult(bep::TestResult {
                status: bep::TestStatus::Flaky as i32,
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(name(&ev), "bazel_test_result");
        assert_eq!(
            attributes(&ev),
            [
                ("bep_id", "test_result"),
                ("configuration", "k8-fastbuild"),
                ("label", "//pkg:test"),
                ("test_status", "FLAKY"),
            ]
        );
        assert_eq!(name(&bep::BuildEvent::default()), UNNAMED);
        assert!(attributes(&bep::BuildEvent::default()).is_empty());
    }
}
