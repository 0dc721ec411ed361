//! Hands envelopes to every sink and tells the source when a notification
//! may be acknowledged: only after every envelope derived from it was
//! confirmed by every sink.
//!
//! Each sink has a few workers ("lanes"); an envelope goes to the lane its
//! key hashes to, so every invocation's events stay in one lane, in
//! order, while the lanes keep several batches in flight at once. A lane
//! takes envelopes in arrival order, in batches, and retries retryable
//! failures with backoff from the first unconfirmed envelope on, so
//! per-invocation order survives retries. Two budgets bound what is not
//! yet confirmed everywhere: `max_in_flight` envelopes and
//! `max_in_flight_bytes` of their JSON, so a slow sink stalls the pull
//! instead of growing memory, whether the events are small or 20 MiB each.
//!
//! A worker's references to envelopes its sink is done with are dropped
//! by the thread that submits (see `Spent`), which most likely allocated
//! them, while it submits; a worker drops them itself when its lane is
//! empty or the tray is full.

mod lane;
mod sink_state;
mod tracker;
mod tray;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use evbridge_sinks::{Envelope, Sink, SinkError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::metric_names as telemetry;
use crate::retry::Backoff;

/// Counters of the pipeline, for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Envelopes accepted into the pipeline.
    pub submitted: AtomicU64,
    /// Envelopes confirmed by every sink.
    pub confirmed: AtomicU64,
    /// Sink deliveries retried after a retryable error.
    pub retries: AtomicU64,
    /// Envelopes some sink rejected permanently (and no dead-letter sink
    /// took).
    pub rejected: AtomicU64,
    /// Rejected envelopes the dead-letter sink confirmed.
    pub dead_lettered: AtomicU64,
}

use lane::Lane;
pub use sink_state::SinkState;
pub use tracker::Tracker;
use tracker::{Budget, Held, Item, Ticket};
use tray::Spent;
use worker::{Worker, supervise, to_dead_letter};

/// Generous: 10,000 envelopes of 25 KiB; the usual ~1 KiB ones never
/// reach it, while 10,000 events of 20 MiB stop at it instead of taking
/// 200 GB.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 256 << 20;

/// Bounds of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Envelopes not yet confirmed by every sink, at most.
    pub max_in_flight: usize,
    /// Bytes of envelope JSON not yet confirmed by every sink, at most
    /// (one larger envelope passes alone).
    pub max_in_flight_bytes: usize,
    /// Envelopes per sink call, at most.
    pub max_batch: usize,
    /// Concurrent workers per sink (batches in flight per sink).
    pub lanes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_in_flight: 10_000,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            max_batch: 2048,
            lanes: 4,
        }
    }
}

/// The fan-out to every sink.
pub struct Pipeline {
    /// Per sink, its workers' lanes.
    lanes: Vec<Vec<Arc<Lane>>>,
    budget: Arc<Budget>,
    spent: Arc<Spent>,
    stats: Arc<Stats>,
    /// Health and metric handles of every sink, dead-letter sink last.
    sinks: Vec<Arc<SinkState>>,
    /// The dead-letter sink, also last in `sinks`.
    dead_letter: Option<Arc<SinkState>>,
    submitted: metrics::Counter,
}

/// A reserved place in the pipeline, taken before reading a notification
/// so the pull waits when the pipeline is full.
pub struct Slot(OwnedSemaphorePermit);

impl Pipeline {
    /// Starts `limits.lanes` workers per sink.
    pub fn start(
        sinks: Vec<Arc<dyn Sink>>,
        limits: Limits,
    ) -> (Arc<Pipeline>, Vec<JoinHandle<()>>) {
        Self::start_with_dead_letter(sinks, None, limits)
    }

    /// Like [`Pipeline::start`]; envelopes a sink rejects for good go to
    /// `dead_letter` (with the reason), and count as delivered once it
    /// confirms them.
    pub fn start_with_dead_letter(
        sinks: Vec<Arc<dyn Sink>>,
        dead_letter: Option<Arc<dyn Sink>>,
        limits: Limits,
    ) -> (Arc<Pipeline>, Vec<JoinHandle<()>>) {
        let stats = Arc::new(Stats::default());
        let byte_limit = limits.max_in_flight_bytes.clamp(1, Semaphore::MAX_PERMITS);
        let budget = Arc::new(Budget {
            envelopes: Arc::new(Semaphore::new(
                limits.max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
            )),
            bytes: Semaphore::new(byte_limit),
            byte_limit,
        });
        // Two batches' worth: what workers finish between two submits
        // when the source keeps up; more only held memory (BENCHMARKS.md,
        // peak RSS). Nothing without mimalloc, whose cross-thread frees are
        // what the tray saves.
        let tray = if cfg!(feature = "mimalloc") {
            limits.max_in_flight.min(2 * limits.max_batch).max(1)
        } else {
            0
        };
        let spent = Arc::new(Spent::new(tray, byte_limit / 4));
        let mut all_lanes = Vec::with_capacity(sinks.len());
        let mut workers = Vec::with_capacity(sinks.len() * limits.lanes);
        let dead_letter = dead_letter.map(|dl| SinkState::new(dl, "dead_letter"));
        let mut states = Vec::with_capacity(sinks.len() + 1);
        for sink in sinks {
            let state = SinkState::new(sink, "sink");
            let mut lanes = Vec::with_capacity(limits.lanes.max(1));
            for _ in 0..limits.lanes.max(1) {
                let lane = Arc::new(Lane::default());
                lanes.push(lane.clone());
                workers.push(tokio::spawn(supervise(Worker {
                    state: state.clone(),
                    dead_letter: dead_letter.clone(),
                    lane,
                    max_batch: limits.max_batch.max(1),
                    stats: stats.clone(),
                    budget: budget.clone(),
                    spent: spent.clone(),
                })));
            }
            all_lanes.push(lanes);
            states.push(state);
        }
        states.extend(dead_letter.clone());
        let pipeline = Pipeline {
            lanes: all_lanes,
            budget,
            spent,
            stats,
            sinks: states,
            dead_letter,
            submitted: metrics::counter!(telemetry::SUBMITTED),
        };
        (Arc::new(pipeline), workers)
    }

    /// Sends `envelope` to the dead-letter sink alone, retrying what can
    /// be retried; `None` without one. For what a source gives up on
    /// (a notification that failed too often), not for sink rejections.
    pub async fn dead_letter(&self, envelope: Envelope) -> Option<Result<(), SinkError>> {
        let dl = self.dead_letter.as_ref()?;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        Some(to_dead_letter(dl, Arc::new(envelope), &mut backoff, &self.stats).await)
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Health and metric handles of every sink (the dead-letter sink last).
    pub fn sinks(&self) -> &[Arc<SinkState>] {
        &self.sinks
    }

    /// Envelopes accepted but not yet confirmed everywhere.
    pub fn in_flight(&self) -> u64 {
        let s = &self.stats;
        s.submitted.load(Ordering::Relaxed)
            - s.confirmed.load(Ordering::Relaxed)
            - s.rejected.load(Ordering::Relaxed)
    }

    /// Bytes of envelope JSON accepted but not yet confirmed everywhere
    /// (an envelope above the byte limit counts as the limit), plus what
    /// a waiting submit already holds of the budget.
    pub fn in_flight_bytes(&self) -> usize {
        self.budget.byte_limit - self.budget.bytes.available_permits()
    }

    /// A new tracker for one notification.
    pub fn tracker(&self) -> Arc<Tracker> {
        Tracker::new()
    }

    /// Waits for room for one more envelope.
    pub async fn reserve(&self) -> Slot {
        Slot(
            self.budget
                .envelopes
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed"),
        )
    }

    /// Sends `envelope` to every sink, waiting for room first.
    pub async fn submit(&self, tracker: &Arc<Tracker>, envelope: Envelope) {
        let slot = self.reserve().await;
        self.submit_in(slot, tracker, envelope).await;
    }

    /// Sends `envelope` to every sink in a slot already reserved, once
    /// its bytes fit in the budget.
    pub async fn submit_in(&self, slot: Slot, tracker: &Arc<Tracker>, envelope: Envelope) {
        self.spent.free();
        let bytes = if self.lanes.is_empty() {
            0
        } else {
            let share = self.budget.share(envelope.json().len());
            self.budget
                .bytes
                .acquire_many(share)
                .await
                .expect("the semaphore is never closed")
                .forget();
            share
        };
        tracker.remaining.fetch_add(1, Ordering::AcqRel);
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        self.submitted.increment(1);
        if self.lanes.is_empty() {
            self.stats.confirmed.fetch_add(1, Ordering::Relaxed);
            tracker.one_done();
            return; // `slot` gives its permit back
        }
        // The ticket stands for the permit from here on.
        slot.0.forget();
        let ticket = Ticket {
            tracker: tracker.clone(),
            sinks_left: AtomicUsize::new(self.lanes.len()),
            rejected: AtomicBool::new(false),
            budget: self.budget.clone(),
            bytes,
        };
        let envelope = Arc::new(envelope);
        let lane = lane_of(&envelope.key);
        // A closed worker means shutdown; the envelope stays unconfirmed
        // and its notification unacknowledged.
        if let [lanes] = self.lanes.as_slice() {
            let item = Item {
                envelope,
                ticket: Held::Own(ticket),
            };
            lanes[lane % lanes.len()].push(item);
            return;
        }
        let ticket = Arc::new(ticket);
        for lanes in &self.lanes {
            let item = Item {
                envelope: envelope.clone(),
                ticket: Held::Shared(ticket.clone()),
            };
            lanes[lane % lanes.len()].push(item);
        }
    }
}

impl Drop for Pipeline {
    /// The workers finish what their lanes hold, flush and stop.
    fn drop(&mut self) {
        self.lanes.iter().flatten().for_each(|lane| lane.close());
    }
}

/// Same key, same lane: that is what keeps an invocation in order.
fn lane_of(key: &str) -> usize {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::default().hash_one(key) as usize
}
