//! A 20 MiB Bazel event end to end: through the simulator's event store
//! and the bridge, whole to a sink that takes it, and to the dead-letter
//! sink, with its id, size and the limit, from sinks that cannot (RabbitMQ
//! at its 16 MiB default, Kafka at librdkafka's 1 MB) — never dropped,
//! never retried forever.

mod common;

use std::time::Duration;

use common::brokers::Tansu;
use common::rabbit::Topology;
use common::*;

use evbridge::sim::Sim;
use evbridge::sim::world::{GenConfig, World, generate};

const BIG: usize = 20 << 20;

/// One build whose first invocation's second event is a 20 MiB progress
/// event (Bazel's console output, as huge as real ones get).
fn world_with_a_big_event() -> (World, String) {
    let mut world = generate(&GenConfig {
        builds: 1,
        events_per_invocation: 4,
        ..GenConfig::default()
    });
    let inv = &mut world.invocations[0];
    make_progress(inv, 1, BIG);
    let id = inv.id.clone();
    (world, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mib_event_passes_whole_or_goes_to_the_dead_letter_sink_with_its_reason() {
    let (world, invocation) = world_with_a_big_event();
    let big_id = evbridge::normalize::build_event_id(&invocation, 1);
    let s = start_sim_with(Sim::with_world(sim_config(1, 4), world)).await;

    let t = Topology::new(&["#"]).await;
    let amqp = evbridge::sinks::open(&t.sink_url("")).await.unwrap();
    let tansu = Tansu::start();
    let kafka = evbridge::sinks::open(&format!("kafka://{}/big-events", tansu.bootstrap()))
        .await
        .unwrap();
    let (all, out) = capture();
    let (dl, dead) = capture();
    let mut cfg = bridge_config(&s.url);
    cfg.dead_letter = Some(dl);
    let summary = run_until_acked(&s.sim, cfg, vec![all, amqp, kafka], Duration::from_secs(90))
        .await
        .unwrap();
    assert!(s.sim.all_acked(), "{:?}", s.sim.report());
    assert_eq!(summary.dead_lettered, 2, "{summary:?}");

    // Whole where it fits.
    let envelopes = out.envelopes();
    let big = envelopes
        .iter()
        .find(|e| e["id"] == big_id.as_str())
        .expect("the big event reached the stdout sink");
    assert_eq!(big["name"], "bazel_progress");
    let stdout = big["payload"]["event"]["buildEvent"]["bazelEvent"]["progress"]["stdout"]
        .as_str()
        .unwrap();
    assert!(stdout.len() >= BIG, "{}", stdout.len());

    // Dead-lettered, by id, size and limit, from each sink that refused it.
    let copies = dead.envelopes();
    assert_eq!(copies.len(), 2, "one per refusing sink");
    for copy in &copies {
        assert_eq!(copy["id"], big_id.as_str());
        let reason = copy["attributes"]["dead_letter_reason"].as_str().unwrap();
        assert!(reason.contains(big_id.as_str()), "{reason}");
        assert!(reason.contains("bytes"), "{reason}");
        assert!(
            reason.contains("max_message_size of 16777216") || reason.contains("1000000"),
            "{reason}"
        );
        assert!(reason.contains("(permanent)"), "{reason}");
    }
    // Everything else reached RabbitMQ.
    let others = envelopes.len() - 1;
    let got = t.drain("#", others).await;
    assert_eq!(got.len(), others);
    assert!(got.iter().all(|(v, _)| v["id"] != big_id.as_str()));
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_above_the_sources_limit_fails_its_invocation_without_a_retry_storm() {
    let (world, invocation) = world_with_a_big_event();
    let s = start_sim_with(Sim::with_world(sim_config(1, 4), world)).await;
    let (all, out) = capture();
    let mut cfg = bridge_config(&s.url);
    cfg.source.max_message_size = 8 << 20;
    run_until_acked(&s.sim, cfg, vec![all], Duration::from_secs(4))
        .await
        .unwrap();
    let report = s.sim.report();
    // Its notification stays unacknowledged (the cluster will redeliver
    // it); the stream was asked for once, not again and again.
    assert!(!s.sim.all_acked());
    let calls_for_it = report.event_calls;
    assert!(calls_for_it <= report.invocations as u64 + 1, "{report:?}");
    let seqs = sequences(&out.envelopes());
    assert_eq!(
        seqs.get(&invocation),
        Some(&vec![0]),
        "events after it were not taken"
    );
}

/// The node's own `max_message_size` (128 MiB on RabbitMQ 3.x, 16 MiB
/// on 4.x), read from the node rather than assumed.
fn rabbitmq_max_message_size() -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["eval", "application:get_env(rabbit, max_message_size)."])
        .output()
        .expect("rabbitmqctl (installed with RabbitMQ, see .ci/run)");
    let text = String::from_utf8_lossy(&out.stdout);
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no max_message_size in `{text}`"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_rabbitmq_itself_refuses_is_dead_lettered_and_the_rest_delivered() {
    // The sink's own limit set above the node's, so the refusal comes from
    // RabbitMQ (it closes the channel, failing every confirm pending on
    // it): only the envelope above the limit it states is permanent.
    use evbridge::pipeline::{Limits, Pipeline};
    let limit = rabbitmq_max_message_size();
    let t = Topology::new(&["#"]).await;
    let sink = evbridge::sinks::open(&t.sink_url(&format!("&max_message_size={}", limit * 2)))
        .await
        .unwrap();
    let (dl, dead) = capture();
    let (pipeline, _workers) = Pipeline::start_with_dead_letter(
        vec![sink],
        Some(dl),
        Limits {
            max_in_flight: 16,
            max_batch: 16,
            lanes: 1,
            ..Limits::default()
        },
    );
    let tracker = pipeline.tracker();
    for (id, size) in [("before", 10), ("huge", limit + 1024), ("after", 10)] {
        pipeline.submit(&tracker, sized_envelope(id, size)).await;
    }
    let outcome = tokio::time::timeout(Duration::from_secs(60), tracker.finish())
        .await
        .expect("settled, not retried for ever");
    // Dead-lettered counts as delivered: the notification may be acked.
    outcome.expect("the huge one dead-lettered, the others delivered");
    let copies = dead.envelopes();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0]["id"], "huge");
    let reason = copies[0]["attributes"]["dead_letter_reason"]
        .as_str()
        .unwrap();
    assert!(
        reason.contains(&format!(
            "above the broker's max_message_size of {limit} bytes"
        )),
        "{reason}"
    );
    assert!(reason.contains("(permanent)"), "{reason}");
    let got = t.drain("#", 2).await;
    let mut ids: Vec<_> = got.iter().map(|(v, _)| v["id"].to_string()).collect();
    ids.sort();
    assert_eq!(ids, ["\"after\"", "\"before\""]);
    t.cleanup().await;
}
