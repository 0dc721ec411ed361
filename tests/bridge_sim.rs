//! The bridge against the simulator over real gRPC on loopback.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

fn valid_name(name: &str) -> bool {
    // ^[a-zA-Z0-9]+((['_.-][a-zA-Z0-9])?[a-zA-Z0-9]*)*$ : alphanumeric runs,
    // each separator single and followed by an alphanumeric.
    let b = name.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b.windows(2)
            .all(|w| !b"'_.-".contains(&w[0]) || w[1].is_ascii_alphanumeric())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"'_.-".contains(c))
        && b.last().unwrap().is_ascii_alphanumeric()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_notification_acked_every_event_delivered_once_in_order() {
    let s = start_sim(sim_config(25, 15)).await;
    let (sink, out) = capture();
    let summary = run_until_acked(&s.sim, bridge_config(&s.url), vec![sink], LONG)
        .await
        .unwrap();
    let report = s.sim.report();
    assert!(s.sim.all_acked(), "not all acked: {report:?}");
    assert_eq!(report.queue.redelivered, 0);
    let lines = out.lines();
    assert_complete(&s.sim, &lines);
    // No faults: exactly once.
    let envelopes = out.envelopes();
    assert_eq!(
        envelopes.len(),
        report.notifications + report.invocation_events
    );
    assert!(id_counts(&envelopes).values().all(|c| *c == 1));
    assert_eq!(summary.envelopes as usize, envelopes.len());
    assert_eq!(summary.acked as usize, report.notifications);
    for e in &envelopes {
        let name = e["name"].as_str().unwrap();
        assert!(valid_name(name), "bad name {name}");
        let id = e["id"].as_str().unwrap();
        assert!(
            id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit()),
            "id {id}"
        );
        let ts = e["timestamp"].as_str().unwrap();
        assert!(
            ts.parse::<prost_types::Timestamp>().is_ok() && ts.ends_with('Z'),
            "timestamp {ts}"
        );
        assert_eq!(e["version"], 1);
        assert_eq!(e["namespace"], "default");
    }
    // Bazel events are expanded, not left raw.
    let bazel: Vec<&Value> = envelopes
        .iter()
        .filter(|e| e["name"].as_str().unwrap().starts_with("bazel_"))
        .collect();
    assert!(!bazel.is_empty());
    for e in bazel {
        let any = &e["payload"]["event"]["buildEvent"]["bazelEvent"];
        assert_eq!(
            any["@type"], "type.googleapis.com/build_event_stream.BuildEvent",
            "{e}"
        );
        assert!(any.get("id").is_some(), "{any}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_streams_lose_nothing_and_repeat_identical_ids() {
    let mut cfg = sim_config(30, 12);
    cfg.drop_stream_every = 4;
    cfg.drop_event_stream_every = 5;
    let s = start_sim(cfg).await;
    let (sink, out) = capture();
    run_until_acked(&s.sim, bridge_config(&s.url), vec![sink], LONG)
        .await
        .unwrap();
    let report = s.sim.report();
    assert!(s.sim.all_acked(), "{report:?}");
    assert!(report.streams_dropped > 3, "{report:?}");
    assert!(report.event_streams_dropped > 3, "{report:?}");
    assert_complete(&s.sim, &out.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_resume_from_continuation_token_without_duplicates() {
    let mut cfg = sim_config(10, 23);
    cfg.drop_event_stream_every = 4;
    let s = start_sim(cfg).await;
    let (sink, out) = capture();
    run_until_acked(&s.sim, bridge_config(&s.url), vec![sink], LONG)
        .await
        .unwrap();
    let report = s.sim.report();
    assert!(report.event_streams_dropped >= 50, "{report:?}");
    let envelopes = out.envelopes();
    assert_complete(&s.sim, &out.lines());
    // Resuming after the last token neither repeats nor skips an event.
    assert!(id_counts(&envelopes).values().all(|c| *c == 1));
    assert_eq!(report.events_served as usize, report.invocation_events);
    for (inv, seqs) in sequences(&envelopes) {
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{inv}: {seqs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_slower_than_the_window_are_redelivered_and_acked_with_the_newest_token() {
    // A window shorter than the sink takes: every first token expires
    // before its notification is delivered. The redeliveries hand their
    // tokens to the running tasks, which acknowledge the newest.
    let mut cfg = sim_config(4, 3);
    cfg.ack_window_override = Some(Duration::from_millis(150));
    let s = start_sim(cfg).await;
    let (inner, out) = capture();
    let slow = std::sync::Arc::new(
        FakeSink::new("slow-first")
            .forward_to(inner)
            .slow_first(3, Duration::from_millis(400)),
    );
    run_until_acked(&s.sim, bridge_config(&s.url), vec![slow], LONG)
        .await
        .unwrap();
    let report = s.sim.report();
    assert!(s.sim.all_acked(), "{report:?}");
    assert!(report.queue.redelivered > 0, "{report:?}");
    let lines = out.lines();
    assert_complete(&s.sim, &lines);
    // Handed over, not fetched again for each redelivery.
    assert!(
        report.event_calls as usize <= 2 * report.invocations,
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_readers_share_the_queue() {
    let s = start_sim(sim_config(30, 4)).await;
    let (sink, out) = capture();
    let mut cfg = bridge_config(&s.url);
    cfg.source.readers = 3;
    run_until_acked(&s.sim, cfg, vec![sink], LONG)
        .await
        .unwrap();
    let report = s.sim.report();
    assert!(s.sim.all_acked());
    assert_eq!(report.streams_opened, 3);
    assert_eq!(report.queue.redelivered, 0);
    assert_complete(&s.sim, &out.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_reads_acks_only_between_bursts_does_not_deadlock_us() {
    // The server sends everything it may before it reads a single ack;
    // a bridge that blocks reading while its acks queue up never gets
    // there (found by the load benchmark: 53,000 notifications in, 0
    // acks taken, both sides waiting).
    let mut cfg = sim_config(1500, 1);
    cfg.lazy_acks = true;
    cfg.http2_window = Some(16 * 1024);
    cfg.max_unacked_per_reader = 1_000_000;
    let s = start_sim(cfg).await;
    let mut cfg = bridge_config(&s.url);
    cfg.source.max_notifications = 8;
    let summary = run_until_acked(
        &s.sim,
        cfg,
        vec![std::sync::Arc::new(evbridge::sinks::Blackhole::new())],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert!(s.sim.all_acked(), "{:?}", s.sim.report());
    assert_eq!(summary.acked as usize, s.sim.report().notifications);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_enforced() {
    let mut cfg = sim_config(3, 3);
    cfg.token = Some("s3cret-token".into());
    let s = start_sim(cfg).await;

    let (sink, _) = capture();
    let err = run_until_acked(&s.sim, bridge_config(&s.url), vec![sink], LONG)
        .await
        .expect_err("no token must fail");
    let msg = err.to_string();
    assert!(msg.contains("Unauthenticated"), "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert_eq!(s.sim.report().unauthenticated, 1, "no retry storm");

    let mut wrong = bridge_config(&s.url);
    wrong.source.token = Some("wrong".into());
    let (sink, _) = capture();
    let err = run_until_acked(&s.sim, wrong, vec![sink], LONG)
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("wrong"), "token echoed: {err}");

    let mut right = bridge_config(&s.url);
    right.source.token = Some("s3cret-token".into());
    let (sink, out) = capture();
    run_until_acked(&s.sim, right, vec![sink], LONG)
        .await
        .unwrap();
    assert!(s.sim.all_acked());
    assert_complete(&s.sim, &out.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_queue_is_a_clear_error() {
    let s = start_sim(sim_config(1, 1)).await;
    let mut cfg = bridge_config(&s.url);
    cfg.source.queue = "no/such-queue".into();
    let (sink, _) = capture();
    let err = run_until_acked(&s.sim, cfg, vec![sink], LONG)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("NotFound") && msg.contains("no/such-queue"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_delivered_raw_and_acked() {
    let mut cfg = sim_config(6, 3);
    cfg.gen_config.bad_payload_every = 3;
    let s = start_sim(cfg).await;
    let (sink, out) = capture();
    run_until_acked(&s.sim, bridge_config(&s.url), vec![sink], LONG)
        .await
        .unwrap();
    let report = s.sim.report();
    assert!(s.sim.all_acked(), "{report:?}");
    assert!(report.bad_payloads >= 8);
    let envelopes = out.envelopes();
    let raw: Vec<&Value> = envelopes
        .iter()
        .filter(|e| e["name"] == "raw_notification")
        .collect();
    assert_eq!(raw.len(), report.bad_payloads);
    let mut unknown = 0;
    for e in raw {
        let p = &e["payload"];
        assert!(
            p["typeUrl"]
                .as_str()
                .unwrap()
                .starts_with("type.googleapis.com/")
        );
        assert!(
            !p["value"].as_str().unwrap().is_empty(),
            "raw bytes kept: {p}"
        );
        assert!(!p["error"].as_str().unwrap().is_empty());
        unknown += p["error"]
            .as_str()
            .unwrap()
            .contains("unknown payload type") as usize;
    }
    assert!(
        unknown > 0 && unknown < report.bad_payloads,
        "both kinds of bad payload"
    );
    assert_complete(&s.sim, &out.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_nothing() {
    let mut cfg = sim_config(60, 10);
    cfg.rate = 150.0;
    let s = start_sim(cfg).await;

    // First run: stopped part-way.
    let (sink, first) = capture();
    let (trigger, shutdown) = evbridge::shutdown::channel();
    let run = tokio::spawn(evbridge::bridge::run(
        bridge_config(&s.url),
        vec![sink],
        shutdown,
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    trigger.fire();
    run.await
        .unwrap()
        .expect("graceful shutdown is not an error");
    let acked = s.sim.acked_ids();
    assert!(
        !acked.is_empty() && !s.sim.all_acked(),
        "stopped part-way: {}",
        acked.len()
    );

    // Everything acknowledged in the first run was delivered by it.
    let envelopes = first.envelopes();
    let world = s.sim.world();
    let seqs = sequences(&envelopes);
    for id in &acked {
        assert!(
            envelopes
                .iter()
                .any(|e| e["attributes"]["notification_id"] == id.as_str()
                    && e["topic"] == "lifecycle"),
            "acked {id} without delivering it"
        );
        let index = world
            .notifications
            .iter()
            .position(|n| &n.id == id)
            .unwrap();
        if let Some(inv) = world.invocations.iter().find(|i| i.finished_at == index) {
            assert_eq!(
                seqs.get(&inv.id).map(Vec::len),
                Some(inv.events.len()),
                "acked {id} before its events"
            );
        }
    }

    // Second run picks up the rest; together nothing is lost.
    let (sink, second) = capture();
    run_until_acked(&s.sim, bridge_config(&s.url), vec![sink], LONG)
        .await
        .unwrap();
    assert!(s.sim.all_acked());
    let mut lines = first.lines();
    lines.extend(second.lines());
    assert_complete(&s.sim, &lines);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sink_gets_everything() {
    let s = start_sim(sim_config(8, 6)).await;
    let (a, out_a) = capture();
    let (b, out_b) = capture();
    let hole = std::sync::Arc::new(evbridge::sinks::Blackhole::new());
    run_until_acked(
        &s.sim,
        bridge_config(&s.url),
        vec![a, b, hole.clone()],
        LONG,
    )
    .await
    .unwrap();
    assert!(s.sim.all_acked());
    assert_complete(&s.sim, &out_a.lines());
    assert_complete(&s.sim, &out_b.lines());
    assert_eq!(hole.count() as usize, out_a.lines().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_complete_follows_a_running_invocation() {
    // Released slowly: invocation_started comes before the invocation is
    // complete, and UNTIL_COMPLETE waits for the rest.
    let mut cfg = sim_config(5, 8);
    cfg.rate = 40.0;
    let s = start_sim(cfg).await;
    let (sink, out) = capture();
    let mut bc = bridge_config(&s.url);
    bc.source.replay = evbridge::pb::es::replay_mode_options::ReplayMode::UntilComplete;
    run_until_acked(&s.sim, bc, vec![sink], LONG).await.unwrap();
    assert!(s.sim.all_acked());
    assert_complete(&s.sim, &out.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_continuation_tokens_replays_with_the_same_ids_and_sequences() {
    // No tokens and streams broken after 4 events (8 times): each resume replays
    // from the start, so the repeats must get the ids and sequence
    // numbers they had, never new ones past the end.
    let mut cfg = sim_config(4, 9);
    cfg.omit_continuation_tokens = true;
    cfg.drop_event_stream_every = 4;
    cfg.drop_event_stream_limit = 8;
    let s = start_sim(cfg).await;
    let (sink, out) = capture();
    run_until_acked(&s.sim, bridge_config(&s.url), vec![sink], LONG)
        .await
        .unwrap();
    assert!(s.sim.all_acked(), "{:?}", s.sim.report());
    assert!(s.sim.report().event_streams_dropped > 0);
    let envelopes = out.envelopes();
    assert_complete(&s.sim, &out.lines());
    let mut by_id = std::collections::HashMap::new();
    for e in envelopes.iter().filter(|e| e["topic"] == "build-events") {
        let seq: u64 = e["attributes"]["sequence"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(seq < 9, "sequence {seq} past the invocation's 9 events");
        let prev = by_id.insert(e["id"].as_str().unwrap().to_string(), seq);
        assert!(prev.is_none_or(|p| p == seq), "one id, two sequences");
    }
    assert_eq!(by_id.len(), s.sim.report().invocation_events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_without_its_last_event_is_resumed_not_taken_as_complete() {
    // The store ends every stream cleanly after 4 events, without
    // `is_last`: taking that as the end would lose each invocation's tail.
    let mut cfg = sim_config(4, 11);
    cfg.end_event_stream_every = 4;
    let s = start_sim(cfg).await;
    let (sink, out) = capture();
    run_until_acked(&s.sim, bridge_config(&s.url), vec![sink], LONG)
        .await
        .unwrap();
    assert!(s.sim.all_acked(), "{:?}", s.sim.report());
    assert_complete(&s.sim, &out.lines());
    for (inv, seqs) in sequences(&out.envelopes()) {
        assert_eq!(seqs, (0..11).collect::<Vec<u64>>(), "{inv}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_never_marks_the_last_event_is_taken_at_its_word_after_a_few_tries() {
    let mut world = evbridge::sim::world::generate(&evbridge::sim::world::GenConfig {
        builds: 3,
        events_per_invocation: 5,
        ..Default::default()
    });
    for inv in &mut world.invocations {
        for ev in &mut inv.events {
            ev.is_last = false;
        }
    }
    let s = start_sim_with(evbridge::sim::Sim::with_world(sim_config(3, 5), world)).await;
    let (sink, out) = capture();
    run_until_acked(&s.sim, bridge_config(&s.url), vec![sink], LONG)
        .await
        .unwrap();
    let report = s.sim.report();
    assert!(s.sim.all_acked(), "{report:?}");
    assert_complete(&s.sim, &out.lines());
    // The first call, then one per end without anything new.
    assert_eq!(
        report.event_calls as usize,
        4 * report.invocations,
        "{report:?}"
    );
}

/// A world whose first invocation_finished names an invocation the store
/// does not have (NOT_FOUND on every attempt): a poison notification.
fn world_with_a_poison_notification() -> (evbridge::sim::world::World, String) {
    let mut world = evbridge::sim::world::generate(&evbridge::sim::world::GenConfig {
        builds: 3,
        events_per_invocation: 2,
        ..Default::default()
    });
    let at = world.invocations[0].finished_at;
    let n = &mut world.notifications[at];
    retarget(n, "no-such-invocation");
    let id = n.id.clone();
    (world, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_notification_is_dead_lettered_after_its_attempts_and_acked() {
    let (world, poison) = world_with_a_poison_notification();
    let mut cfg = sim_config(3, 2);
    cfg.ack_window_override = Some(Duration::from_millis(300));
    let s = start_sim_with(evbridge::sim::Sim::with_world(cfg, world)).await;
    let (sink, out) = capture();
    let (dead, dead_out) = capture();
    let mut bridge = bridge_config(&s.url);
    bridge.dead_letter = Some(dead);
    bridge.source.max_attempts = 3;
    run_until_acked(&s.sim, bridge, vec![sink], LONG)
        .await
        .unwrap();
    let report = s.sim.report();
    assert!(
        s.sim.all_acked(),
        "the pull goes on and all is acked: {report:?}"
    );
    let given_up = dead_out.envelopes();
    assert_eq!(given_up.len(), 1, "flagged once");
    let e = &given_up[0];
    assert_eq!(e["name"], "undeliverable_notification");
    assert_eq!(e["payload"]["notificationId"], poison.as_str());
    assert_eq!(e["payload"]["attempts"], 3);
    let reasons = e["payload"]["reasons"].as_array().unwrap();
    assert!(
        reasons[0].as_str().unwrap().contains("NotFound"),
        "{reasons:?}"
    );
    assert!(e["payload"]["payload"]["value"].as_str().is_some());
    // Delivered (its lifecycle envelope) once per attempt, not without end.
    let copies = out
        .envelopes()
        .iter()
        .filter(|e| {
            e["attributes"]["notification_id"] == poison.as_str() && e["topic"] == "lifecycle"
        })
        .count();
    assert_eq!(copies, 3, "one delivery per attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_sink_a_poison_notification_is_logged_and_acked() {
    let (world, poison) = world_with_a_poison_notification();
    let mut cfg = sim_config(3, 2);
    cfg.ack_window_override = Some(Duration::from_millis(300));
    let s = start_sim_with(evbridge::sim::Sim::with_world(cfg, world)).await;
    let (sink, _out) = capture();
    let mut bridge = bridge_config(&s.url);
    bridge.source.max_attempts = 2;
    let port = common::brokers::free_port();
    bridge.metrics_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let (trigger, shutdown) = evbridge::shutdown::channel();
    let running = tokio::spawn(evbridge::bridge::run(bridge, vec![sink], shutdown));
    let start = std::time::Instant::now();
    while !s.sim.all_acked() && start.elapsed() < LONG {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(s.sim.all_acked(), "{:?}", s.sim.report());
    // Ready, and /readyz says what was given up with nowhere to keep it.
    let body = tokio::task::spawn_blocking(move || {
        common::http::wait_for(port, "/readyz", "ready with a note", |status, body| {
            status == 200 && body.contains("note: 1 notification(s) given up")
        })
    })
    .await
    .unwrap();
    trigger.fire();
    running.await.unwrap().unwrap();
    assert!(body.contains(&poison), "{body}");
    // 0 keeps the old behaviour: never given up, never acknowledged.
    let (world, _) = world_with_a_poison_notification();
    let mut cfg = sim_config(3, 2);
    cfg.ack_window_override = Some(Duration::from_millis(200));
    let s = start_sim_with(evbridge::sim::Sim::with_world(cfg, world)).await;
    let (sink, _out) = capture();
    let mut bridge = bridge_config(&s.url);
    bridge.source.max_attempts = 0;
    run_until_acked(&s.sim, bridge, vec![sink], Duration::from_secs(3))
        .await
        .unwrap();
    let report = s.sim.report();
    assert_eq!(report.queue.acked, report.notifications - 1, "{report:?}");
    assert!(report.queue.redelivered >= 3, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_slower_than_the_ack_window_is_still_acknowledged() {
    // Every invocation takes longer to deliver (a sink at 40 envelopes/s,
    // 12 events each) than the 250 ms window: each attempt's token expires
    // before it is done. Redeliveries while it runs must hand their token
    // to it, not start another fetch and ack a dead token again and again.
    let mut cfg = sim_config(2, 12);
    cfg.ack_window_override = Some(Duration::from_millis(250));
    let s = start_sim(cfg).await;
    let slow = evbridge::sinks::open("blackhole://?rate=40").await.unwrap();
    run_until_acked(
        &s.sim,
        bridge_config(&s.url),
        vec![slow],
        Duration::from_secs(40),
    )
    .await
    .unwrap();
    let report = s.sim.report();
    assert!(s.sim.all_acked(), "never acknowledged: {report:?}");
    assert!(
        report.queue.redelivered > 0,
        "the window was too long to test: {report:?}"
    );
    // Redeliveries in progress start no fetch: a few per invocation at
    // most (the newest token can still expire just before the task is
    // done, and that redelivery fetches again), never one per redelivery.
    assert!(
        report.event_calls as usize <= 3 * report.invocations,
        "{report:?}"
    );
}
