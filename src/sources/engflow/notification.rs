//! One notification's task: its lifecycle envelope, for a finished
//! invocation its events from the event store (resumed after transient
//! errors), acknowledgement once the pipeline confirmed them all, and
//! giving up after `--max-attempts`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use tonic::{Code, Status};
use tracing::{error, warn};

use super::EngFlowSource;
use super::store::RawStreamed;
use crate::normalize::Invocation;
use crate::pb::{es, nq};
use crate::pipeline::{Slot, Tracker};
use crate::retry::Backoff;
use crate::shutdown::Shutdown;

/// Notification ids seen lately, to count redeliveries; bounded so a
/// long-running bridge does not grow.
#[derive(Default)]
pub(super) struct Seen {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    pub(super) const CAPACITY: usize = 100_000;

    /// Remembers `id`; true if it was seen before.
    pub(super) fn again(&mut self, id: &str) -> bool {
        if self.ids.contains(id) {
            return true;
        }
        if self.order.len() == Self::CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        self.ids.insert(id.to_string());
        self.order.push_back(id.to_string());
        false
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
}

/// The newest delivery of a notification in progress: its token and the
/// stream to acknowledge it on.
pub(super) struct Latest {
    pub(super) token: String,
    pub(super) ack: mpsc::UnboundedSender<String>,
}

/// Takes a notification's own entry out of `running` however its task
/// ends (a later task's entry for the same id is left alone).
pub(super) struct RunningEntry(Arc<EngFlowSource>, String, Arc<Mutex<Latest>>);

impl RunningEntry {
    /// Leaves `running` now; the newest token and its stream.
    pub(super) fn finish(&self) -> (String, mpsc::UnboundedSender<String>) {
        let mut running = self.0.running.lock().unwrap_or_else(|p| p.into_inner());
        if running
            .get(&self.1)
            .is_some_and(|e| Arc::ptr_eq(e, &self.2))
        {
            running.remove(&self.1);
        }
        let latest = self.2.lock().unwrap_or_else(|p| p.into_inner());
        (latest.token.clone(), latest.ack.clone())
    }
}

impl Drop for RunningEntry {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// How often each notification's handling failed here.
#[derive(Default)]
pub(super) struct Failures {
    counts: HashMap<String, u32>,
    order: VecDeque<String>,
}

impl Failures {
    /// One more failure of `id`; how many so far.
    pub(super) fn record(&mut self, id: &str) -> u32 {
        if let Some(n) = self.counts.get_mut(id) {
            *n += 1;
            return *n;
        }
        if self.order.len() == Seen::CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.counts.remove(&old);
        }
        self.counts.insert(id.to_string(), 1);
        self.order.push_back(id.to_string());
        1
    }

    pub(super) fn forget(&mut self, id: &str) {
        self.counts.remove(id);
    }
}

/// Ends of an event stream without `is_last` and without new events after
/// which the invocation is taken as the store has it.
const MAX_SHORT_ENDS: u32 = 3;

/// Codes after which retrying the same event-store call may help.
fn is_transient(code: Code) -> bool {
    !matches!(
        code,
        Code::NotFound
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::Unimplemented
            | Code::OutOfRange
    )
}

impl EngFlowSource {
    /// One notification: deliver everything derived from it, then ack.
    pub(super) async fn handle(
        self: Arc<Self>,
        n: nq::Notification,
        latest: Arc<Mutex<Latest>>,
        slot: Slot,
        shutdown: Shutdown,
    ) {
        let entry = RunningEntry(self.clone(), n.id.clone(), latest);
        let received = Instant::now();
        let tracker = self.pipeline.tracker();
        let life = self.normalizer.lifecycle(&n);
        for problem in &life.problems {
            warn!(notification = %n.id, "{problem}; delivered raw");
        }
        if !life.unknown.is_empty() {
            crate::normalize::unknown::report(&life.envelope.id, &life.unknown);
        }
        self.pipeline.submit_in(slot, &tracker, life.envelope).await;
        if let Some(inv) = life.fetch
            && let Err(reason) = self.fetch_invocation(&inv, &tracker, shutdown).await
        {
            tracker.fail(reason);
        }
        let outcome = tracker.finish().await;
        match outcome {
            Ok(()) => {
                // The newest delivery's token: a redelivery while this ran
                // handed it over, and the first one's window may be long
                // gone.
                let (token, ack) = entry.finish();
                // The stream may be gone: then the token is worthless anyway.
                if ack.send(token).is_ok() {
                    self.meters
                        .ack_seconds
                        .record(received.elapsed().as_secs_f64());
                }
            }
            Err(reasons) => {
                let attempts = self
                    .failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(&n.id);
                let max = self.cfg.max_attempts;
                if max == 0 || attempts < max {
                    self.meters.unacked.increment(1);
                    error!(
                        notification = %n.id, attempt = attempts, max_attempts = max,
                        "not acknowledged (it will be redelivered): {}",
                        reasons.join("; ")
                    );
                } else if self.give_up(&n, &reasons, attempts).await {
                    // Still running while it was dead-lettered, so a
                    // redelivery meanwhile handed its token over; one
                    // after this is acknowledged without a second copy.
                    self.given_up
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .again(&n.id);
                    let (token, ack) = entry.finish();
                    if ack.send(token).is_ok() {
                        self.meters.given_up.increment(1);
                    }
                    self.failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .forget(&n.id);
                } else {
                    self.meters.unacked.increment(1);
                }
            }
        }
    }

    /// Gives up on a notification after `attempts` failed: to the
    /// dead-letter sink, or logged whole. True when it may be acknowledged.
    async fn give_up(&self, n: &nq::Notification, reasons: &[String], attempts: u32) -> bool {
        let envelope = self.normalizer.undeliverable(n, reasons, attempts);
        match self.pipeline.dead_letter(envelope.clone()).await {
            Some(Ok(())) => {
                warn!(notification = %n.id, attempts, "given up after {attempts} failed attempts; \
                    sent to the dead-letter sink as undeliverable_notification and acknowledged: {}",
                    reasons.join("; "));
                true
            }
            Some(Err(e)) => {
                error!(notification = %n.id, attempts, error = %e,
                    "the dead-letter sink refused the undeliverable notification; not acknowledged");
                false
            }
            None => {
                // Nowhere to keep it but the log: all of it goes there.
                let mut logged = self.logged_only.lock().unwrap_or_else(|p| p.into_inner());
                let count = logged.as_ref().map_or(0, |(c, _)| *c);
                *logged = Some((count + 1, n.id.clone()));
                drop(logged);
                error!(notification = %n.id, attempts,
                    envelope = %String::from_utf8_lossy(envelope.json()),
                    "given up after {attempts} failed attempts and acknowledged (no --dead-letter \
                     sink; the notification is in this line): {}", reasons.join("; "));
                true
            }
        }
    }

    /// Streams an invocation's events into the pipeline in order, resuming
    /// after the last continuation token on transient errors.
    async fn fetch_invocation(
        &self,
        inv: &Invocation,
        tracker: &Arc<Tracker>,
        mut shutdown: Shutdown,
    ) -> Result<(), String> {
        let mut continuation: Option<String> = None;
        let mut seq: u64 = 0;
        // Where a resume starts: the sequence number after the event whose
        // token we hold (0 without one: the store replays from the start,
        // and the repeats get the same ids and sequence numbers).
        let mut resume_seq: u64 = 0;
        // Streams that ended without `is_last` and without a new event.
        let mut short_ends = 0u32;
        let mut backoff = Backoff::default();
        let follow = self.cfg.replay == es::replay_mode_options::ReplayMode::UntilComplete;
        loop {
            let req = es::GetInvocationRequest {
                instance_name: inv.instance.clone(),
                invocation_id: inv.invocation_id.to_string(),
                continuation_token: continuation.clone(),
                replay_mode: self.cfg.replay as i32,
            };
            let mut store = self.store.clone();
            let seq_before = seq;
            seq = resume_seq;
            let failure = match store.get_invocation(req).await {
                Err(status) => status,
                Ok(resp) => {
                    let mut stream = resp;
                    loop {
                        match stream.message().await {
                            Ok(Some(RawStreamed {
                                event: Err(reason),
                                raw,
                            })) => {
                                // Delivered raw; its token (inside the bytes)
                                // is lost, so a resume replays from the one
                                // before, with the same ids.
                                self.stats.events.fetch_add(1, Ordering::Relaxed);
                                self.meters.events.increment(1);
                                warn!(notification = %inv.notification_id, invocation = %inv.invocation_id, sequence = seq,
                                    "{reason}; delivered raw");
                                let envelope =
                                    self.normalizer.raw_build_event(inv, seq, &raw, &reason);
                                self.pipeline.submit(tracker, envelope).await;
                                seq += 1;
                                backoff.reset();
                            }
                            Ok(Some(RawStreamed { event: Ok(ev), raw })) => {
                                if ev.event.is_some() {
                                    self.stats.events.fetch_add(1, Ordering::Relaxed);
                                    self.meters.events.increment(1);
                                    let out =
                                        self.normalizer.build_event_from(inv, seq, &ev, Some(&raw));
                                    drop(raw);
                                    for problem in &out.problems {
                                        warn!(notification = %inv.notification_id, invocation = %inv.invocation_id, sequence = seq,
                                            "{problem}; delivered raw");
                                    }
                                    if !out.unknown.is_empty() {
                                        crate::normalize::unknown::report(
                                            &out.envelope.id,
                                            &out.unknown,
                                        );
                                    }
                                    self.pipeline.submit(tracker, out.envelope).await;
                                    seq += 1;
                                }
                                if !ev.continuation_token.is_empty() {
                                    continuation = Some(ev.continuation_token);
                                    resume_seq = seq;
                                }
                                if ev.is_last {
                                    return Ok(());
                                }
                                backoff.reset();
                            }
                            // Without `is_last`, what the store gave may be
                            // a prefix (the invocation finished, so all its
                            // events are stored): resume. A store that never
                            // marks the last event is taken at its word after
                            // a few ends with nothing new, with a warning.
                            Ok(None) => {
                                if !follow {
                                    short_ends = if seq > seq_before { 0 } else { short_ends + 1 };
                                    if short_ends >= MAX_SHORT_ENDS {
                                        warn!(notification = %inv.notification_id, invocation = %inv.invocation_id,
                                            events = seq, "the event stream ended {MAX_SHORT_ENDS} times without its last event \
                                            and without new events; taking what the store has");
                                        self.meters.incomplete.increment(1);
                                        return Ok(());
                                    }
                                }
                                break Status::unavailable(
                                    "event stream ended before its last event",
                                );
                            }
                            Err(status) => break status,
                        }
                    }
                }
            };
            if !is_transient(failure.code()) {
                let hint = if failure.message().contains("message length too large") {
                    " (an event above --max-message-size; raise it to take this invocation)"
                } else {
                    ""
                };
                return Err(format!(
                    "GetInvocation {} failed: {:?}: {}{hint}",
                    inv.invocation_id,
                    failure.code(),
                    failure.message()
                ));
            }
            self.meters.resumes.increment(1);
            let delay = backoff.next_delay();
            warn!(notification = %inv.notification_id, invocation = %inv.invocation_id, code = ?failure.code(),
                error = failure.message(), after = seq, "event stream interrupted; resuming in {delay:?}");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait() => return Err("shutdown while fetching events".into()),
            }
        }
    }
}
