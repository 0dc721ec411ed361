//! Poison among the good: more than 10,000 good notifications with every
//! kind of bad input mixed in, through a real RabbitMQ sink and a
//! dead-letter sink, with a short acknowledgement window. Every good one
//! must be delivered and acknowledged, every poison one dead-lettered or
//! flagged once, the pull must never stop, and duplicates stay bounded.
//!
//! The poison, by kind (issue 19, items 4-7):
//! - notifications that do not decode (`raw_notification`);
//! - streamed events that do not decode: a principal that is not UTF-8, a
//!   cut message (`raw_build_event`);
//! - an `invocation_finished` naming an invocation the store does not have
//!   (NOT_FOUND), and one with an empty invocation id;
//! - an event above the source's `--max-message-size`;
//! - an event whose envelope is above the AMQP sink's `max_message_size`;
//! - an invocation slower to deliver than the acknowledgement window.
//!
//! Prints its figures; `cargo test --test poison -- --nocapture`.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::rabbit::Topology;
use common::*;
use evbridge::sim::Sim;
use evbridge::sim::world::{GenConfig, generate};
use prost::Message;

const WINDOW: Duration = Duration::from_secs(2);
const ATTEMPTS: u32 = 3;
const SOURCE_LIMIT: usize = 1 << 20;
const AMQP_LIMIT: usize = 256 << 10;
/// What the simulated queue lets one reader hold unacknowledged.
const UNACKED: usize = 512;
/// Envelopes of one notification at most here: its own and 2 events.
const PER_NOTIFICATION: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_among_ten_thousand_good_notifications() {
    let mut world = generate(&GenConfig {
        builds: 2300,
        events_per_invocation: 2,
        bad_payload_every: 1000,
        ..GenConfig::default()
    });
    let n_inv = world.invocations.len();
    // Poison, each kind on invocations of its own, spread over the run.
    let pick = |k: usize| (k * 997 + 31) % n_inv;
    let not_found = [pick(1), pick(2), pick(3)];
    let empty_id = [pick(4), pick(5)];
    let above_source = [pick(6), pick(7)];
    let above_amqp = [pick(8), pick(9)];
    let undecodable = [pick(10), pick(11), pick(12)];
    let slow = pick(13);
    let all: Vec<usize> = [
        &not_found[..],
        &empty_id,
        &above_source,
        &above_amqp,
        &undecodable,
        &[slow],
    ]
    .concat();
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        all.len(),
        "distinct"
    );
    let mut given_up = HashSet::new(); // notification ids
    for (k, &i) in not_found.iter().enumerate() {
        let at = world.invocations[i].finished_at;
        retarget(
            &mut world.notifications[at],
            &format!("no-such-invocation-{k}"),
        );
        given_up.insert(world.notifications[at].id.clone());
    }
    for &i in &empty_id {
        let at = world.invocations[i].finished_at;
        retarget(&mut world.notifications[at], "");
        given_up.insert(world.notifications[at].id.clone());
    }
    for &i in &above_source {
        make_progress(&mut world.invocations[i], 1, 2 * SOURCE_LIMIT);
        given_up.insert(
            world.notifications[world.invocations[i].finished_at]
                .id
                .clone(),
        );
    }
    let mut too_big_for_amqp = HashSet::new(); // envelope ids
    for &i in &above_amqp {
        make_progress(&mut world.invocations[i], 1, 2 * AMQP_LIMIT);
        let id = evbridge::normalize::build_event_id(&world.invocations[i].id, 1);
        too_big_for_amqp.insert(id.to_string());
    }
    let mut stored = Vec::new();
    for (i, inv) in world.invocations.iter().enumerate() {
        let mut bytes: Vec<bytes::Bytes> = inv
            .events
            .iter()
            .map(|e| bytes::Bytes::from(e.encode_to_vec()))
            .collect();
        if undecodable.contains(&i) {
            // A principal (field 4) that is not UTF-8, and a cut message.
            let mut bad = bytes[0].to_vec();
            bad.extend(ld(4, b"\xff\xfe"));
            bytes[0] = bad.into();
            let whole = bytes[1].to_vec();
            bytes[1] = whole[..whole.len() - 3].to_vec().into();
        }
        stored.push(bytes);
    }
    // Invocations none of whose events can reach the sinks.
    let unfetched: HashSet<&str> = not_found
        .iter()
        .chain(&empty_id)
        .chain(&above_source)
        .map(|&i| world.invocations[i].id.as_str())
        .collect::<HashSet<_>>();
    let unfetched: HashSet<String> = unfetched.into_iter().map(String::from).collect();
    let good = world.notifications.len() - world.bad.len() - given_up.len();
    assert!(good >= 10_000, "{good} good notifications");
    let slow_key = world.invocations[slow].id.clone();

    let mut cfg = sim_config(0, 2);
    cfg.ack_window_override = Some(WINDOW);
    // As a real queue caps what one reader holds unacknowledged: without
    // it the simulator pushes thousands into the stream's buffers, whose
    // window runs out before the bridge reads them (duplicates that say
    // nothing about poison).
    cfg.max_unacked_per_reader = UNACKED;
    let s = start_sim_with(Sim::with_stored(cfg, world, stored)).await;
    let t = Topology::new(&["#"]).await;
    let amqp = evbridge::sinks::open(&t.sink_url(&format!("&max_message_size={AMQP_LIMIT}")))
        .await
        .unwrap();
    let (inner, out) = capture();
    let sink = Arc::new(
        FakeSink::new("slow-for-one-key")
            .forward_to(inner)
            .slow_once_for_key(&slow_key, WINDOW + WINDOW / 4),
    );
    let (dl, dead) = capture();
    let mut bridge = bridge_config(&s.url);
    bridge.dead_letter = Some(dl);
    bridge.source.max_attempts = ATTEMPTS;
    bridge.source.max_message_size = SOURCE_LIMIT;
    let started = Instant::now();
    run_until_acked(&s.sim, bridge, vec![sink, amqp], Duration::from_secs(240))
        .await
        .unwrap();
    let took = started.elapsed();
    let report = s.sim.report();
    assert!(
        s.sim.all_acked(),
        "the pull went on and everything was acknowledged: {report:?}"
    );

    let envelopes = out.envelopes();
    let world = s.sim.world();
    // Every good notification and every event that can be fetched, in
    // order per invocation.
    let lifecycle: HashSet<&str> = envelopes
        .iter()
        .filter(|e| e["topic"] == "lifecycle")
        .filter_map(|e| e["attributes"]["notification_id"].as_str())
        .collect();
    for n in &world.notifications {
        assert!(
            lifecycle.contains(n.id.as_str()),
            "notification {} lost",
            n.id
        );
    }
    let seqs = sequences(&envelopes);
    for inv in world
        .invocations
        .iter()
        .filter(|i| !unfetched.contains(&i.id))
    {
        let got = seqs
            .get(&inv.id)
            .unwrap_or_else(|| panic!("{} lost", inv.id));
        assert_eq!(first_seen(got), [0, 1], "invocation {}", inv.id);
    }
    // Flagged in the stream: raw notifications and raw events.
    let distinct = |name: &str| -> HashSet<String> {
        envelopes
            .iter()
            .filter(|e| e["name"] == name)
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(distinct("raw_notification").len(), world.bad.len());
    assert_eq!(distinct("raw_build_event").len(), 2 * undecodable.len());

    // Dead-lettered once each: the notifications given up, and the
    // envelopes RabbitMQ's sink refused.
    let dead = dead.envelopes();
    let mut undeliverable: HashMap<String, usize> = HashMap::new();
    let mut refused: HashMap<String, usize> = HashMap::new();
    for e in &dead {
        if e["name"] == "undeliverable_notification" {
            let id = e["payload"]["notificationId"].as_str().unwrap().to_string();
            assert_eq!(e["payload"]["attempts"], ATTEMPTS, "{e}");
            *undeliverable.entry(id).or_default() += 1;
        } else {
            let reason = e["attributes"]["dead_letter_reason"].as_str().unwrap();
            assert!(reason.contains("max_message_size"), "{reason}");
            *refused
                .entry(e["id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(
        undeliverable.keys().cloned().collect::<HashSet<_>>(),
        given_up,
        "every notification given up, and only those"
    );
    assert!(undeliverable.values().all(|&n| n == 1), "{undeliverable:?}");
    assert_eq!(
        refused.keys().cloned().collect::<HashSet<_>>(),
        too_big_for_amqp
    );
    assert!(refused.values().all(|&n| n == 1), "{refused:?}");

    // RabbitMQ holds everything the other sink got but the refused two.
    let ids: HashSet<String> = envelopes
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    let want = ids.len() - too_big_for_amqp.len();
    let got = t.drain("#", want).await;
    let in_rabbit: HashSet<String> = got
        .iter()
        .map(|(v, _)| v["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(in_rabbit.len(), want);
    assert!(in_rabbit.is_disjoint(&too_big_for_amqp));
    t.cleanup().await;

    // Duplicates: the poison notifications' own envelopes once per attempt,
    // and what the stalled lane held past the window: at most every
    // notification the queue had out at the time, once.
    let duplicates = envelopes.len() - ids.len();
    println!(
        "poison: {} notifications ({good} good, {} raw, {} given up), {} envelopes \
         delivered ({} distinct, {duplicates} duplicates), {} dead-lettered, \
         {} redeliveries, {} event calls for {} invocations, {:.1} s",
        world.notifications.len(),
        world.bad.len(),
        given_up.len(),
        envelopes.len(),
        ids.len(),
        dead.len(),
        report.queue.redelivered,
        report.event_calls,
        world.invocations.len(),
        took.as_secs_f64(),
    );
    let bound = UNACKED * PER_NOTIFICATION + given_up.len() * ATTEMPTS as usize;
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates of {} envelopes (bound {bound})",
        ids.len()
    );
    // No fetch storm: each poison invocation at most once per attempt,
    // the rest about once.
    assert!(
        report.event_calls as usize <= world.invocations.len() + UNACKED,
        "{report:?}"
    );
}
