//! A lane's worker: delivery with retries, dead-lettering, and the
//! supervisor that restarts it after a panic.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use evbridge_sinks::{Envelope, Sink, SinkError};

use super::SinkState;
use crate::metric_names as telemetry;
use crate::retry::Backoff;

use super::Stats;
use super::lane::Lane;
use super::tracker::{Budget, Finished, Item};
use super::tray::Spent;

/// Sends `envelopes` through `sink` until each one is confirmed or
/// rejected for good, retrying retryable failures with backoff from the
/// first unconfirmed envelope on (which keeps the order) and skipping
/// those the sink reported confirmed anyway. Reports each envelope once:
/// `done(i, None)` confirmed, `done(i, Some(e))` rejected.
pub(super) async fn deliver(
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
pub(super) async fn to_dead_letter(
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
pub(super) fn dead_letter_copy(
    env: &Envelope,
    sink: &dyn Sink,
    error: &SinkError,
) -> Arc<Envelope> {
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
pub(super) struct Worker {
    pub(super) state: Arc<SinkState>,
    pub(super) dead_letter: Option<Arc<SinkState>>,
    pub(super) lane: Arc<Lane>,
    pub(super) max_batch: usize,
    pub(super) stats: Arc<Stats>,
    pub(super) budget: Arc<Budget>,
    pub(super) spent: Arc<Spent>,
}

/// Runs a lane's worker, and starts it again when it panics (a sink's
/// bug): the panic is logged and counted, the sink reported unhealthy
/// until it delivers again, and the batch it held finishes unconfirmed
/// (its notifications unacknowledged, so the source delivers them again)
/// instead of stalling the lane until --max-in-flight is used up.
pub(super) async fn supervise(w: Worker) {
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

pub(super) async fn worker(w: Worker) {
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
