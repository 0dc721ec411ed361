//! What each notification and envelope owes: trackers, tickets and the
//! in-flight budget they give back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use evbridge_sinks::Envelope;
use tokio::sync::{Notify, Semaphore};

use super::Stats;

/// Everything derived from one notification; completes when all of it was
/// confirmed (or rejected) by every sink.
#[derive(Debug)]
pub struct Tracker {
    /// Envelopes not yet done, plus one while more may be added.
    pub(super) remaining: AtomicUsize,
    failures: Mutex<Vec<String>>,
    done: Notify,
}

impl Tracker {
    pub(super) fn new() -> Arc<Self> {
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

    pub(super) fn one_done(&self) {
        self.done_many(1);
    }

    pub(super) fn done_many(&self, n: usize) {
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
pub(super) struct Budget {
    pub(super) envelopes: Arc<Semaphore>,
    pub(super) bytes: Semaphore,
    /// `bytes`' size: an envelope larger than that takes all of it (and so
    /// waits until it is alone) instead of waiting for ever.
    pub(super) byte_limit: usize,
}

impl Budget {
    /// What an envelope of `len` bytes takes of the byte budget.
    pub(super) fn share(&self, len: usize) -> u32 {
        len.min(self.byte_limit).min(u32::MAX as usize) as u32
    }

    pub(super) fn give_back(&self, envelopes: usize, bytes: usize) {
        self.envelopes.add_permits(envelopes);
        self.bytes.add_permits(bytes);
    }
}

/// One envelope's progress across the sinks. It stands for one in-flight
/// permit and its bytes' share of the budget, which the worker that
/// finishes it gives back (a batch's worth at once, so the semaphores'
/// locks are taken per batch, not per envelope), or its drop if nobody
/// finished it.
pub(super) struct Ticket {
    pub(super) tracker: Arc<Tracker>,
    pub(super) sinks_left: AtomicUsize,
    pub(super) rejected: AtomicBool,
    pub(super) budget: Arc<Budget>,
    pub(super) bytes: u32,
}

impl Ticket {
    /// One sink is done with the envelope: confirmed, or rejected for good.
    /// When that was the last sink, `finished` owes the envelope's permit,
    /// count and tracker completion.
    pub(super) fn done<'a>(&'a self, rejection: Option<String>, finished: &mut Finished<'a>) {
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
pub(super) struct Finished<'a> {
    pub(super) permits: usize,
    pub(super) bytes: usize,
    pub(super) confirmed: u64,
    pub(super) rejected: u64,
    /// A tracker and how many of its envelopes, not yet settled.
    pub(super) run: Option<(&'a Tracker, usize)>,
}

impl<'a> Finished<'a> {
    pub(super) fn add(&mut self, tracker: &'a Tracker, bytes: u32, rejected: bool) {
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

    pub(super) fn settle(self, stats: &Stats, budget: &Budget) {
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

pub(super) struct Item {
    pub(super) envelope: Arc<Envelope>,
    pub(super) ticket: Held,
}

/// A ticket as a worker holds it: its own when the pipeline has one sink
/// (the common case, without an allocation per envelope), shared when
/// several sinks count it down.
pub(super) enum Held {
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
