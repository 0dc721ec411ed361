//! Confirm-before-ack under sink failures, and the in-flight bound.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use evbridge::pipeline::{Limits, Pipeline};
use evbridge::sinks::{Envelope, Sink};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_errors_are_retried_and_nothing_is_lost() {
    let s = start_sim(sim_config(6, 5)).await;
    let (inner, out) = capture();
    let sink = Arc::new(FakeSink::new("faulty").forward_to(inner).fail_first(4));
    let summary = run_until_acked(
        &s.sim,
        bridge_config(&s.url),
        vec![sink],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert!(s.sim.all_acked());
    assert!(summary.retries >= 4, "{summary:?}");
    assert_complete(&s.sim, &out.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_rejection_keeps_its_notification_unacknowledged() {
    let s = start_sim(sim_config(5, 3)).await;
    let (inner, out) = capture();
    let sink = Arc::new(
        FakeSink::new("faulty")
            .forward_to(inner)
            .reject_name("build_started"),
    );
    let summary = run_until_acked(
        &s.sim,
        bridge_config(&s.url),
        vec![sink],
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    let report = s.sim.report();
    assert_eq!(summary.rejected as usize, report.builds, "{summary:?}");
    assert_eq!(
        report.queue.acked,
        report.notifications - report.builds,
        "{report:?}"
    );
    let acked = s.sim.acked_ids();
    let envelopes = out.envelopes();
    for e in &envelopes {
        assert_ne!(
            e["name"], "build_started",
            "rejected envelopes are not written"
        );
    }
    // Everything else went through and was acknowledged.
    for n in &s.sim.world().notifications {
        let delivered = envelopes.iter().any(|e| {
            e["attributes"]["notification_id"] == n.id.as_str() && e["topic"] == "lifecycle"
        });
        assert_eq!(delivered, acked.contains(&n.id), "notification {}", n.id);
    }
}

#[tokio::test]
async fn a_stalled_sink_stops_intake_at_max_in_flight() {
    let gate = Arc::new(FakeSink::new("recorder").closed());
    let (pipeline, _workers) = Pipeline::start(
        vec![gate.clone()],
        Limits {
            max_in_flight: 8,
            max_batch: 4,
            lanes: 2,
            ..Limits::default()
        },
    );
    let producer = {
        let pipeline = pipeline.clone();
        tokio::spawn(async move {
            let tracker = pipeline.tracker();
            for i in 0..20 {
                pipeline.submit(&tracker, envelope(i)).await;
            }
            tracker.finish().await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pipeline.stats().submitted.load(Ordering::SeqCst),
        8,
        "intake stops at the bound"
    );
    assert_eq!(pipeline.in_flight(), 8);
    assert!(!producer.is_finished());
    gate.open(1000);
    producer.await.unwrap().expect("all confirmed");
    assert_eq!(gate.confirmed().len(), 20);
    assert_eq!(pipeline.in_flight(), 0);
}

#[tokio::test]
async fn large_envelopes_stop_intake_at_max_in_flight_bytes() {
    // 1 MiB of budget, envelopes of ~200 KiB: five fit, whatever
    // --max-in-flight allows; one above the whole budget passes alone.
    let gate = Arc::new(FakeSink::new("recorder").closed());
    let (pipeline, _workers) = Pipeline::start(
        vec![gate.clone()],
        Limits {
            max_in_flight: 1000,
            max_in_flight_bytes: 1 << 20,
            // One envelope per call: each permit of the gate confirms one.
            max_batch: 1,
            lanes: 2,
        },
    );
    let size = sized_envelope("e0", 200 << 10).json().len();
    let fit = (1 << 20) / size;
    assert_eq!(fit, 5, "{size}");
    let producer = {
        let pipeline = pipeline.clone();
        tokio::spawn(async move {
            let tracker = pipeline.tracker();
            for i in 0..12 {
                pipeline
                    .submit(&tracker, sized_envelope(&format!("e{i}"), 200 << 10))
                    .await;
            }
            pipeline
                .submit(&tracker, sized_envelope("e12", 3 << 20))
                .await;
            pipeline.submit(&tracker, sized_envelope("e13", 10)).await;
            tracker.finish().await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pipeline.stats().submitted.load(Ordering::SeqCst),
        fit as u64,
        "intake stops at the byte bound"
    );
    // The waiting submit may already hold part of the rest.
    let level = pipeline.in_flight_bytes();
    assert!((fit * size..=1 << 20).contains(&level), "{level}");
    assert!(!producer.is_finished());
    gate.open(1000);
    producer
        .await
        .unwrap()
        .expect("all confirmed, the 3 MiB one too");
    assert_eq!(gate.confirmed().len(), 14);
    assert_eq!(pipeline.in_flight_bytes(), 0);
    assert_eq!(pipeline.in_flight(), 0);
}

/// Places come back however an envelope ends: rejected by its only sink,
/// or rejected by one and confirmed by another, in mixed batches.
#[tokio::test]
async fn finished_envelopes_give_their_places_back_even_when_rejected() {
    let rejecting = || -> Arc<dyn Sink> {
        let (inner, _) = capture();
        Arc::new(
            FakeSink::new("faulty")
                .forward_to(inner)
                .reject_name("test"),
        )
    };
    let (accepting, accepted) = capture();
    for sinks in [vec![rejecting()], vec![rejecting(), accepting]] {
        let count = sinks.len();
        let (pipeline, _workers) = Pipeline::start(
            sinks,
            Limits {
                max_in_flight: 3,
                max_batch: 4,
                lanes: 2,
                ..Limits::default()
            },
        );
        let tracker = pipeline.tracker();
        let all = async {
            for i in 0..50 {
                pipeline.submit(&tracker, envelope(i)).await;
            }
            tracker.finish().await
        };
        let failures = tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .expect("intake never stalls")
            .expect_err("rejected");
        assert_eq!(failures.len(), 50, "{count} sinks");
        assert_eq!(pipeline.stats().rejected.load(Ordering::SeqCst), 50);
        assert_eq!(pipeline.in_flight(), 0);
        // All three places are free again.
        let places = async {
            for _ in 0..3 {
                std::mem::forget(pipeline.reserve().await);
            }
        };
        tokio::time::timeout(Duration::from_secs(1), places)
            .await
            .expect("three free places");
    }
    assert_eq!(accepted.envelopes().len(), 50);
}

/// Holds every batch until released, then records its ids in order.
/// What a lane holds when the pipeline is dropped is still delivered, in
/// order and in batches no larger than the limit, before the worker stops.
#[tokio::test]
async fn a_dropped_pipeline_delivers_what_its_lanes_hold_in_order() {
    let sink = Arc::new(FakeSink::new("recorder").closed());
    let (pipeline, workers) = Pipeline::start(
        vec![sink.clone()],
        Limits {
            max_in_flight: 100,
            max_batch: 4,
            lanes: 1,
            ..Limits::default()
        },
    );
    let tracker = pipeline.tracker();
    for i in 0..10 {
        pipeline.submit(&tracker, envelope(i)).await;
    }
    drop(pipeline);
    sink.open(1000);
    tokio::time::timeout(Duration::from_secs(10), async {
        for w in workers {
            w.await.unwrap();
        }
    })
    .await
    .expect("the worker stops once its lane is empty");
    tokio::time::timeout(Duration::from_secs(1), tracker.finish())
        .await
        .expect("everything was delivered")
        .expect("all confirmed");
    let want: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
    assert_eq!(sink.confirmed(), want);
    assert!(sink.largest_batch() <= 4);
}

/// Envelopes every sink is done with wait for the submitting thread to
/// free them, but not for long and not many: at most `max_in_flight` wait,
/// and once the source is idle the workers free the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_envelopes_are_freed_and_never_pile_up() {
    let sink = Arc::new(FakeSink::new("watcher"));
    let (max_in_flight, max_batch, lanes) = (64, 8, 3);
    let (pipeline, _workers) = Pipeline::start(
        vec![sink.clone()],
        Limits {
            max_in_flight,
            max_batch,
            lanes,
            ..Limits::default()
        },
    );
    let tracker = pipeline.tracker();
    let mut most = 0;
    for i in 0..3000 {
        pipeline.submit(&tracker, keyed(i, i % 7)).await;
        if i % 50 == 0 {
            most = most.max(sink.alive());
        }
    }
    tracker.finish().await.expect("all confirmed");
    // Unconfirmed, waiting to be freed, and a batch per worker between.
    let bound = 2 * max_in_flight + lanes * max_batch;
    assert!(most <= bound, "{most} alive at once (bound {bound})");
    tokio::time::timeout(Duration::from_secs(5), async {
        while sink.alive() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} envelopes never freed", sink.alive()));
}

fn envelope(i: usize) -> Envelope {
    keyed(i, 0)
}

/// Envelope `i`, with key `k{key}`.
fn keyed(i: usize, key: usize) -> Envelope {
    Envelope::new(evbridge::sinks::Event {
        id: format!("e{i}").into(),
        name: "test".into(),
        namespace: "default".into(),
        timestamp: "2026-11-25T00:00:00Z".into(),
        version: 1,
        topic: "t".into(),
        key: format!("k{key}").into(),
        attributes: Default::default(),
        payload: evbridge::sinks::Payload::trusted("{}".into()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_sink_takes_rejections_with_the_reason() {
    let s = start_sim(sim_config(5, 3)).await;
    let (inner, out) = capture();
    let sink = Arc::new(
        FakeSink::new("faulty")
            .forward_to(inner)
            .reject_name("build_started"),
    );
    let (dead, dead_out) = capture();
    let mut cfg = bridge_config(&s.url);
    cfg.dead_letter = Some(dead);
    let summary = run_until_acked(&s.sim, cfg, vec![sink], Duration::from_secs(60))
        .await
        .unwrap();
    let report = s.sim.report();
    assert!(
        s.sim.all_acked(),
        "dead-lettered counts as delivered: {report:?}"
    );
    assert_eq!(summary.dead_lettered as usize, report.builds, "{summary:?}");
    assert_eq!(summary.rejected, 0);
    let dead = dead_out.envelopes();
    assert_eq!(dead.len(), report.builds);
    for e in &dead {
        assert_eq!(e["name"], "build_started");
        let reason = e["attributes"]["dead_letter_reason"].as_str().unwrap();
        assert!(reason.contains("message too large"), "{reason}");
        assert_eq!(e["attributes"]["dead_letter_sink"], "faulty");
    }
    let mut all = out.lines();
    all.extend(dead_out.lines().iter().map(|l| {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        let attrs = v["attributes"].as_object_mut().unwrap();
        attrs.remove("dead_letter_reason");
        attrs.remove("dead_letter_sink");
        v.to_string()
    }));
    assert_all_present(&s.sim, &all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_sink_whose_filter_skips_a_rejection_does_not_take_it() {
    // A dead letter a names= filter skips would be stored nowhere: it stays
    // rejected, and its notification unacknowledged.
    let s = start_sim(sim_config(3, 2)).await;
    let (inner, _out) = capture();
    let sink = Arc::new(
        FakeSink::new("faulty")
            .forward_to(inner)
            .reject_name("build_started"),
    );
    let dead = evbridge::sinks::open("blackhole://?names=bazel_*")
        .await
        .unwrap();
    let mut cfg = bridge_config(&s.url);
    cfg.dead_letter = Some(dead);
    let summary = run_until_acked(&s.sim, cfg, vec![sink], Duration::from_secs(3))
        .await
        .unwrap();
    let report = s.sim.report();
    assert_eq!(summary.dead_lettered, 0, "{summary:?}");
    assert_eq!(summary.rejected as usize, report.builds, "{summary:?}");
    assert_eq!(report.queue.acked, report.notifications - report.builds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_sink_worker_is_restarted_and_nothing_is_lost() {
    // Before, the lane's worker died with its batch: the lane stalled and
    // its notifications' tasks waited for ever.
    let mut cfg = sim_config(6, 4);
    cfg.ack_window_override = Some(Duration::from_millis(300));
    let s = start_sim(cfg).await;
    let (inner, out) = capture();
    let sink = Arc::new(FakeSink::new("panicky").forward_to(inner).panic_first(3));
    run_until_acked(
        &s.sim,
        bridge_config(&s.url),
        vec![sink.clone()],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let report = s.sim.report();
    assert!(s.sim.all_acked(), "{report:?}");
    assert!(sink.calls() > 3);
    assert_all_present(&s.sim, &out.lines());
}
