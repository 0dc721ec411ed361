//! Normalization + JSON encoding, the CPU cost every envelope pays before
//! any sink: a lifecycle notification → its envelope, and a streamed
//! build event (a Bazel BEP event inside an `Any`) → its envelope, each
//! sealed (its JSON encoded once). Throughput is reported per envelope on
//! one core (criterion runs single-threaded); the target is 1 M/s/core.
//!
//! `cargo bench --bench normalize`

/// The allocator the `evbridge` binary uses, so the figure is the binary's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use evbridge::normalize::Normalizer;
use evbridge::sim::world::{GenConfig, generate};

fn normalize(c: &mut Criterion) {
    let world = generate(&GenConfig {
        builds: 50,
        events_per_invocation: 20,
        ..GenConfig::default()
    });
    let norm = Normalizer::default();
    let notes = &world.notifications;
    let mut fetches = Vec::new();
    for n in notes {
        if let Some(inv) = norm.lifecycle(n).fetch {
            let stored = world
                .invocations
                .iter()
                .find(|i| i.id == inv.invocation_id)
                .expect("generated");
            fetches.push((inv, stored));
        }
    }
    let events: Vec<_> = fetches
        .iter()
        .flat_map(|(inv, stored)| {
            stored
                .events
                .iter()
                .enumerate()
                .map(move |(seq, ev)| (inv, seq as u64, ev))
        })
        .collect();
    let life_bytes: usize = notes
        .iter()
        .map(|n| norm.lifecycle(n).envelope.json().len())
        .sum();
    let event_bytes: usize = events
        .iter()
        .map(|(inv, seq, ev)| norm.build_event(inv, *seq, ev).envelope.json().len())
        .sum();
    eprintln!(
        "{} lifecycle notifications (mean envelope {} B), {} build events (mean envelope {} B)",
        notes.len(),
        life_bytes / notes.len(),
        events.len(),
        event_bytes / events.len()
    );

    let mut g = c.benchmark_group("normalize");
    g.throughput(Throughput::Elements(notes.len() as u64));
    g.bench_function("lifecycle", |b| {
        b.iter_batched_ref(
            || (),
            |_| {
                for n in notes {
                    std::hint::black_box(norm.lifecycle(n).envelope);
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("build_event", |b| {
        b.iter(|| {
            for (inv, seq, ev) in &events {
                std::hint::black_box(norm.build_event(inv, *seq, ev).envelope);
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(5));
    targets = normalize
}
criterion_main!(benches);
