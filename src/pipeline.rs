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

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evbridge_sinks::{Envelope, Sink, SinkError};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::ops::health::SinkState;
use crate::ops::telemetry;
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

/// Everything derived from one notification; completes when all of it was
/// confirmed (or rejected) by every sink.
#[derive(Debug)]
pub struct Tracker {
    /// Envelopes not yet done, plus one while more may be added.
    remaining: AtomicUsize,
    failures: Mutex<Vec<String>>,
    done: Notify,
}

impl Tracker {
    fn new() -> Arc<Self> {
        Arc::new(Tracker {
            remaining: AtomicUsize::new(1),
            failures: Mutex::new(Vec::new()),
            done: Notify::new(),
        })
    }

    /// Records why this notification must not be acknowledged.
    pub fn fail(&self, reason: String) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reason);
    }

    fn one_done(&self) {
        self.done_many(1);
    }

    fn done_many(&self, n: usize) {
        if self.remaining.fetch_sub(n, Ordering::AcqRel) == n {
            self.done.notify_one();
        }
    }

    /// Declares that nothing more will be added and waits until every
    /// envelope is done. `Ok` means: safe to acknowledge.
    pub async fn finish(&self) -> Result<(), Vec<String>> {
        self.one_done();
        while self.remaining.load(Ordering::Acquire) != 0 {
            self.done.notified().await;
        }
        let failures =
            std::mem::take(&mut *self.failures.lock().unwrap_or_else(|p| p.into_inner()));
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures)
        }
    }
}

/// What the envelopes in flight may take: a count and bytes of JSON.
struct Budget {
    envelopes: Arc<Semaphore>,
    bytes: Semaphore,
    /// `bytes`' size: an envelope larger than that takes all of it (and so
    /// waits until it is alone) instead of waiting for ever.
    byte_limit: usize,
}

impl Budget {
    /// What an envelope of `len` bytes takes of the byte budget.
    fn share(&self, len: usize) -> u32 {
        len.min(self.byte_limit).min(u32::MAX as usize) as u32
    }

    fn give_back(&self, envelopes: usize, bytes: usize) {
        self.envelopes.add_permits(envelopes);
        self.bytes.add_permits(bytes);
    }
}

/// One envelope's progress across the sinks. It stands for one in-flight
/// permit and its bytes' share of the budget, which the worker that
/// finishes it gives back (a batch's worth at once, so the semaphores'
/// locks are taken per batch, not per envelope), or its drop if nobody
/// finished it.
struct Ticket {
    tracker: Arc<Tracker>,
    sinks_left: AtomicUsize,
    rejected: AtomicBool,
    budget: Arc<Budget>,
    bytes: u32,
}

impl Ticket {
    /// One sink is done with the envelope: confirmed, or rejected for good.
    /// When that was the last sink, `finished` owes the envelope's permit,
    /// count and tracker completion.
    fn done<'a>(&'a self, rejection: Option<String>, finished: &mut Finished<'a>) {
        if let Some(reason) = rejection {
            self.rejected.store(true, Ordering::Release);
            self.tracker.fail(reason);
        }
        if self.sinks_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            finished.add(
                &self.tracker,
                self.bytes,
                self.rejected.load(Ordering::Acquire),
            );
        }
    }
}

/// Envelopes a worker finished in one batch, settled together when it is
/// through: one semaphore release, one add per counter, and one decrement
/// per run of envelopes from the same notification, instead of one of
/// each per envelope on lines other threads write too.
#[derive(Default)]
struct Finished<'a> {
    permits: usize,
    bytes: usize,
    confirmed: u64,
    rejected: u64,
    /// A tracker and how many of its envelopes, not yet settled.
    run: Option<(&'a Tracker, usize)>,
}

impl<'a> Finished<'a> {
    fn add(&mut self, tracker: &'a Tracker, bytes: u32, rejected: bool) {
        self.permits += 1;
        self.bytes += bytes as usize;
        if rejected {
            self.rejected += 1;
        } else {
            self.confirmed += 1;
        }
        match &mut self.run {
            Some((t, n)) if std::ptr::eq(*t, tracker) => *n += 1,
            run => {
                if let Some((t, n)) = run.replace((tracker, 1)) {
                    t.done_many(n);
                }
            }
        }
    }

    fn settle(self, stats: &Stats, budget: &Budget) {
        if let Some((t, n)) = self.run {
            t.done_many(n);
        }
        stats.confirmed.fetch_add(self.confirmed, Ordering::Relaxed);
        stats.rejected.fetch_add(self.rejected, Ordering::Relaxed);
        budget.give_back(self.permits, self.bytes);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Unfinished (its worker stopped, or panicked): give its permit
        // back here, and let its notification finish, unacknowledged, so
        // the task waiting on it is not stuck for ever.
        if self.sinks_left.load(Ordering::Acquire) != 0 {
            self.budget.give_back(1, self.bytes as usize);
            self.tracker
                .fail("a sink worker stopped before delivering it".into());
            self.tracker.one_done();
        }
    }
}

struct Item {
    envelope: Arc<Envelope>,
    ticket: Held,
}

/// A ticket as a worker holds it: its own when the pipeline has one sink
/// (the common case, without an allocation per envelope), shared when
/// several sinks count it down.
enum Held {
    Own(Ticket),
    Shared(Arc<Ticket>),
}

impl std::ops::Deref for Held {
    type Target = Ticket;

    fn deref(&self) -> &Ticket {
        match self {
            Held::Own(t) => t,
            Held::Shared(t) => t,
        }
    }
}

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
        // when the source keeps up; more only held memory (at 1 M events a
        // tray of --max-in-flight kept peak RSS above 100 MiB).
        let tray = limits.max_in_flight.min(2 * limits.max_batch).max(1);
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
            let taken = match self.budget.bytes.try_acquire_many(share) {
                Ok(taken) => taken,
                Err(_) => self
                    .budget
                    .bytes
                    .acquire_many(share)
                    .await
                    .expect("the semaphore is never closed"),
            };
            taken.forget();
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

/// One worker's queue, in arrival order: a locked vector the worker
/// empties a batch at a time. tokio's channel counted every message on a
/// line that both sides write (~15 % of a submit in the Kafka bench).
#[derive(Default)]
struct Lane {
    queue: Mutex<Queue>,
    ready: Notify,
}

#[derive(Default)]
struct Queue {
    items: Vec<Item>,
    closed: bool,
}

impl Lane {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After shutdown the item is dropped: its envelope stays unconfirmed
    /// and its notification unacknowledged.
    fn push(&self, item: Item) {
        let mut queue = self.queue();
        if queue.closed {
            return;
        }
        let was_empty = queue.items.is_empty();
        queue.items.push(item);
        drop(queue);
        if was_empty {
            self.ready.notify_one();
        }
    }

    fn close(&self) {
        self.queue().closed = true;
        self.ready.notify_one();
    }

    fn is_empty(&self) -> bool {
        self.queue().items.is_empty()
    }

    /// Moves up to `max` items into `out` (empty), waiting for one; false
    /// once the lane is closed and drained.
    async fn take(&self, out: &mut Vec<Item>, max: usize) -> bool {
        loop {
            {
                let mut queue = self.queue();
                let n = queue.items.len();
                if n > max {
                    out.extend(queue.items.drain(..max));
                    return true;
                }
                if n > 0 {
                    std::mem::swap(&mut queue.items, out);
                    return true;
                }
                if queue.closed {
                    return false;
                }
            }
            self.ready.notified().await;
        }
    }
}

/// Workers' references to envelopes their sink is done with, waiting to
/// be dropped by the thread that submits; with one sink (the common case)
/// dropping them frees the envelopes. That thread most likely allocated
/// them (a source normalizes and submits in one task), and mimalloc frees
/// a block from another thread at several times the cost. In the Kafka
/// bench, workers freeing their own batches cost ~0.5 µs per envelope
/// more than this (bridge CPU per record 4.3 against 3.8 µs, the raw
/// rdkafka loop's 3.6).
/// At most `limit` references (two batches) and `byte_limit` bytes wait
/// here (so besides the envelopes in flight, at most that many more of at
/// most a quarter of `max_in_flight_bytes`, plus the batch each worker is
/// settling, are alive); past that, and whenever its lane is
/// empty (the source is idle, or not keeping up and so has CPU to spare),
/// a worker drops them itself.
struct Spent {
    /// Batches handed over, and their bytes.
    tray: Mutex<(Vec<Vec<Arc<Envelope>>>, usize)>,
    /// How many references they hold: written under the lock, read without
    /// it on every submit.
    held: AtomicUsize,
    limit: usize,
    byte_limit: usize,
}

impl Spent {
    fn new(limit: usize, byte_limit: usize) -> Self {
        Spent {
            tray: Mutex::new((Vec::new(), 0)),
            held: AtomicUsize::new(0),
            limit,
            byte_limit,
        }
    }

    fn tray(&self) -> std::sync::MutexGuard<'_, (Vec<Vec<Arc<Envelope>>>, usize)> {
        self.tray.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `batch` (leaving it empty, with room for as many), or frees it
    /// here when the tray is full (by count or by bytes).
    fn put(&self, batch: &mut Vec<Arc<Envelope>>) {
        let n = batch.len();
        let bytes: usize = batch.iter().map(|e| e.json().len()).sum();
        let mut tray = self.tray();
        let held = self.held.load(Ordering::Relaxed);
        if n == 0 || held + n > self.limit || tray.1 + bytes > self.byte_limit {
            drop(tray);
            batch.clear();
            return;
        }
        tray.0.push(std::mem::replace(
            batch,
            Vec::with_capacity(batch.capacity()),
        ));
        tray.1 += bytes;
        self.held.store(held + n, Ordering::Relaxed);
    }

    /// Frees everything handed over so far.
    fn free(&self) {
        if self.held.load(Ordering::Relaxed) == 0 {
            return;
        }
        let batches = {
            let mut tray = self.tray();
            self.held.store(0, Ordering::Relaxed);
            tray.1 = 0;
            std::mem::take(&mut tray.0)
        };
        drop(batches);
    }
}

/// Same key, same lane: that is what keeps an invocation in order.
fn lane_of(key: &str) -> usize {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::default().hash_one(key) as usize
}

/// Sends `envelopes` through `sink` until each one is confirmed or
/// rejected for good, retrying retryable failures with backoff from the
/// first unconfirmed envelope on (which keeps the order) and skipping
/// those the sink reported confirmed anyway. Reports each envelope once:
/// `done(i, None)` confirmed, `done(i, Some(e))` rejected.
async fn deliver(
    state: &SinkState,
    envelopes: &[Arc<Envelope>],
    backoff: &mut Backoff,
    stats: &Stats,
    mut done: impl FnMut(usize, Option<SinkError>),
) {
    let sink = &*state.sink;
    // Indices (into `envelopes`) still to deliver, in order.
    let mut pending: Vec<usize> = (0..envelopes.len()).collect();
    while !pending.is_empty() {
        let retry;
        let started = std::time::Instant::now();
        let result = if pending.len() == envelopes.len() {
            sink.send(envelopes).await
        } else {
            retry = pending
                .iter()
                .map(|&i| envelopes[i].clone())
                .collect::<Vec<_>>();
            sink.send(&retry).await
        };
        state.send_seconds.record(started.elapsed().as_secs_f64());
        let e = match result {
            Ok(()) => {
                state.sent.increment(pending.len() as u64);
                state.delivered(None);
                pending.iter().for_each(|&i| done(i, None));
                backoff.reset();
                return;
            }
            Err(e) => e,
        };
        let at = e.at.min(pending.len());
        state.sent.increment(at as u64);
        pending[..at].iter().for_each(|&i| done(i, None));
        let mut also: Vec<usize> = e
            .confirmed
            .iter()
            .filter(|&&c| c > at && c < pending.len())
            .map(|&c| pending[c])
            .collect();
        also.sort_unstable();
        also.dedup();
        state.sent.increment(also.len() as u64);
        also.iter().for_each(|&i| done(i, None));
        let rest: Vec<usize> = pending[at..]
            .iter()
            .copied()
            .filter(|i| also.binary_search(i).is_err())
            .collect();
        let Some(&first) = rest.first() else { return };
        if e.error.is_retryable() {
            stats.retries.fetch_add(1, Ordering::Relaxed);
            state.retries.increment(1);
            state.failed_retryable.increment(rest.len() as u64);
            state.delivered(Some(e.error.to_string()));
            let delay = backoff.next_delay();
            tracing::warn!(
                sink = sink.describe(),
                envelope = %envelopes[first].id,
                error = %e.error,
                "sink delivery failed; retrying in {delay:?}"
            );
            tokio::time::sleep(delay).await;
            pending = rest;
        } else {
            state.failed_permanent.increment(1);
            done(first, Some(e.error));
            pending = rest[1..].to_vec();
        }
    }
}

/// Delivers `envelope` to the dead-letter sink, retrying what can be
/// retried, and counts it when stored. One its `names=` filter skips is
/// not stored: that is a rejection too.
async fn to_dead_letter(
    dl: &SinkState,
    envelope: Arc<Envelope>,
    backoff: &mut Backoff,
    stats: &Stats,
) -> Result<(), SinkError> {
    if !dl.sink.accepts(&envelope) {
        return Err(SinkError::Permanent(
            "the dead-letter sink's names= filter does not take it".into(),
        ));
    }
    let mut outcome = None;
    deliver(dl, &[envelope], backoff, stats, |_, o| outcome = o).await;
    match outcome {
        None => {
            stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::DEAD_LETTERED).increment(1);
            Ok(())
        }
        Some(e) => Err(e),
    }
}

/// The envelope as the dead-letter sink receives it: unchanged, plus why
/// and where it was rejected.
fn dead_letter_copy(env: &Envelope, sink: &dyn Sink, error: &SinkError) -> Arc<Envelope> {
    let mut event = env.event().clone();
    event
        .attributes
        .insert("dead_letter_reason".into(), error.to_string().into());
    event
        .attributes
        .insert("dead_letter_sink".into(), sink.describe().into());
    Arc::new(Envelope::new(event))
}

/// What a lane's worker works with (all shared, so a restarted worker
/// takes over where a panicked one stopped).
#[derive(Clone)]
struct Worker {
    state: Arc<SinkState>,
    dead_letter: Option<Arc<SinkState>>,
    lane: Arc<Lane>,
    max_batch: usize,
    stats: Arc<Stats>,
    budget: Arc<Budget>,
    spent: Arc<Spent>,
}

/// Runs a lane's worker, and starts it again when it panics (a sink's
/// bug): the panic is logged and counted, the sink reported unhealthy
/// until it delivers again, and the batch it held finishes unconfirmed
/// (its notifications unacknowledged, so the source delivers them again)
/// instead of stalling the lane until --max-in-flight is used up.
async fn supervise(w: Worker) {
    loop {
        let run = tokio::spawn(worker(w.clone()));
        match run.await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                let what = e
                    .into_panic()
                    .downcast::<String>()
                    .map(|s| *s)
                    .or_else(|p| p.downcast::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|_| "a panic".into());
                tracing::error!(sink = w.state.sink.describe(), panic = %what,
                    "a sink worker panicked; restarting it (its batch stays unacknowledged)");
                metrics::counter!(telemetry::WORKER_PANICS, "sink" => w.state.sink.describe().to_string())
                    .increment(1);
                w.state
                    .delivered(Some(format!("a worker panicked: {what}")));
            }
            Err(_) => return,
        }
    }
}

async fn worker(w: Worker) {
    let Worker {
        state,
        dead_letter,
        lane,
        max_batch,
        stats,
        budget,
        spent,
    } = w;
    let mut items = Vec::with_capacity(max_batch);
    let mut envelopes = Vec::with_capacity(max_batch);
    let mut tickets = Vec::with_capacity(max_batch);
    let mut rejected = Vec::new();
    // Short ceiling: a broker that comes back should see traffic soon.
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut dl_backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let sink = &*state.sink;
    while lane.take(&mut items, max_batch).await {
        for Item { envelope, ticket } in items.drain(..) {
            envelopes.push(envelope);
            tickets.push(ticket);
        }
        let mut finished = Finished::default();
        // What this sink's name filter skips is delivered for it: settled
        // now, never sent. The rest keeps its order at the front.
        let mut taken = envelopes.len();
        if state.filters {
            taken = 0;
            for i in 0..envelopes.len() {
                if sink.accepts(&envelopes[i]) {
                    envelopes.swap(taken, i);
                    tickets.swap(taken, i);
                    taken += 1;
                }
            }
            let skipped = envelopes.len() - taken;
            if skipped > 0 {
                state.filtered.increment(skipped as u64);
                tickets[taken..]
                    .iter()
                    .for_each(|t| t.done(None, &mut finished));
            }
        }
        deliver(
            &state,
            &envelopes[..taken],
            &mut backoff,
            &stats,
            |i, outcome| match outcome {
                None => tickets[i].done(None, &mut finished),
                Some(error) => rejected.push((i, error)),
            },
        )
        .await;
        // Settled before any dead-lettering, which may take a while.
        finished.settle(&stats, &budget);
        let mut finished = Finished::default();
        for (i, error) in rejected.drain(..) {
            let (envelope, ticket) = (&envelopes[i], &tickets[i]);
            let reason = format!(
                "{} rejected envelope {}: {}",
                sink.describe(),
                envelope.id,
                error
            );
            let Some(dl) = &dead_letter else {
                tracing::error!(
                    sink = sink.describe(),
                    envelope = %envelope.id,
                    name = %envelope.name,
                    %error,
                    "sink rejected envelope permanently; its notification stays unacknowledged"
                );
                ticket.done(Some(reason), &mut finished);
                continue;
            };
            let copy = dead_letter_copy(envelope, sink, &error);
            match to_dead_letter(dl, copy, &mut dl_backoff, &stats).await {
                Ok(()) => {
                    tracing::warn!(
                        sink = sink.describe(),
                        envelope = %envelope.id,
                        name = %envelope.name,
                        %error,
                        dead_letter = dl.sink.describe(),
                        "sink rejected envelope permanently; sent to the dead-letter sink"
                    );
                    ticket.done(None, &mut finished);
                }
                Err(dl_error) => {
                    tracing::error!(
                        sink = sink.describe(),
                        envelope = %envelope.id,
                        %error,
                        dead_letter = dl.sink.describe(),
                        %dl_error,
                        "the dead-letter sink rejected it too; its notification stays unacknowledged"
                    );
                    ticket.done(
                        Some(format!("{reason}; dead letter: {dl_error}")),
                        &mut finished,
                    );
                }
            }
        }
        finished.settle(&stats, &budget);
        tickets.clear();
        spent.put(&mut envelopes);
        if lane.is_empty() {
            spent.free();
        }
    }
    spent.free();
    if let Err(e) = sink.flush().await {
        tracing::warn!(sink = sink.describe(), error = %e, "flush on shutdown failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize) -> Vec<Arc<Envelope>> {
        crate::sim::world::sample_envelopes(n)
            .into_iter()
            .map(Arc::new)
            .collect()
    }

    #[test]
    fn the_tray_holds_at_most_its_limit_and_frees_the_rest_in_place() {
        let spent = Spent::new(10, usize::MAX);
        let (mut first, mut second) = (batch(6), batch(6));
        let watch: Vec<_> = first.iter().chain(&second).map(Arc::downgrade).collect();
        spent.put(&mut first);
        assert!(
            first.is_empty() && first.capacity() >= 6,
            "taken, room left"
        );
        spent.put(&mut second);
        assert!(second.is_empty(), "freed in place");
        let alive =
            |w: &[std::sync::Weak<Envelope>]| w.iter().filter(|w| w.strong_count() > 0).count();
        assert_eq!(alive(&watch[..6]), 6, "the first waits in the tray");
        assert_eq!(alive(&watch[6..]), 0, "6 more would pass the limit of 10");
        spent.free();
        assert_eq!(alive(&watch), 0);
        assert_eq!(spent.held.load(Ordering::Relaxed), 0);
    }
}
