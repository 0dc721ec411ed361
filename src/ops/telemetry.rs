//! The Prometheus recorder, metric descriptions and the periodic stats
//! line (the names are in `crate::metric_names`).
//!
//! Metrics go through the `metrics` facade; a Prometheus recorder is
//! installed only when an endpoint serves it (`--metrics-listen`), so the
//! handles cost next to nothing otherwise. Labels carry sink URLs only as
//! `describe()` shows them: passwords and secret options redacted.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::pipeline::Pipeline;
use crate::shutdown::Shutdown;
use crate::sources::Source;

pub use crate::metric_names::*;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its
/// handle. Metric handles created before this call stay no-ops, so call it
/// before building the pipeline and the source.
pub fn install() -> Result<PrometheusHandle, String> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let buckets = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        300.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets(&buckets)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn describe() {
    describe_counter!(
        RECEIVED,
        "Notifications received from the queue, repeats included."
    );
    describe_counter!(
        REDELIVERED,
        "Notifications this process had already received once."
    );
    describe_counter!(ACKED, "Acknowledgement tokens sent to the queue.");
    describe_counter!(
        UNACKED,
        "Notifications left unacknowledged because a sink rejected an envelope."
    );
    describe_counter!(
        RECEIPTS_FAILED,
        "Acknowledgements the server answered with a non-OK receipt."
    );
    describe_histogram!(
        ACK_SECONDS,
        Unit::Seconds,
        "From receiving a notification to acknowledging it."
    );
    describe_counter!(EVENTS, "Build events read from the event store.");
    describe_counter!(
        RECONNECTS,
        "Pull streams reopened after one ended or failed."
    );
    describe_counter!(
        RESUMES,
        "Event-store streams resumed after an interruption."
    );
    describe_gauge!(SOURCE_UP, "Pull streams open now.");
    describe_counter!(
        HANDED_OVER,
        "Redeliveries of a notification in progress handed to its running task."
    );
    describe_counter!(
        GIVEN_UP,
        "Notifications given up after --max-attempts failures and acknowledged."
    );
    describe_counter!(
        INCOMPLETE,
        "Invocations taken as stored after their event stream kept ending without its last event."
    );
    describe_gauge!(
        IN_PROGRESS,
        "Notifications received and not yet acknowledged."
    );
    describe_counter!(SUBMITTED, "Envelopes accepted into the pipeline.");
    describe_gauge!(IN_FLIGHT, "Envelopes not yet confirmed by every sink.");
    describe_gauge!(
        IN_FLIGHT_BYTES,
        "Bytes of envelope JSON not yet confirmed by every sink."
    );
    describe_counter!(CONFIRMED, "Envelopes confirmed by every sink.");
    describe_counter!(
        DEAD_LETTERED,
        "Envelopes rejected for good and confirmed by the dead-letter sink."
    );
    describe_counter!(SINK_SENT, "Envelopes the sink confirmed.");
    describe_counter!(SINK_FAILED, "Envelopes the sink failed, by error class.");
    describe_counter!(SINK_RETRIES, "Sink calls retried after a retryable error.");
    describe_histogram!(
        SINK_SEND_SECONDS,
        Unit::Seconds,
        "One sink call: a batch, confirmations included."
    );
    describe_gauge!(SINK_UP, "1 while the sink is healthy.");
    describe_counter!(
        UNKNOWN_FIELDS,
        "Envelopes carrying fields the schema does not know (original bytes kept), by message type."
    );
    describe_counter!(
        WORKER_PANICS,
        "Sink workers that panicked and were restarted (their batch stays unacknowledged)."
    );
    describe_counter!(
        SINK_FILTERED,
        "Envelopes the sink's names= filter skipped (delivered for that sink)."
    );
}

/// Sets the gauges that are read off the pipeline and source rather than
/// kept up to date on every change.
pub fn refresh_gauges(pipeline: &Pipeline, source: &dyn Source) {
    metrics::gauge!(IN_FLIGHT).set(pipeline.in_flight() as f64);
    metrics::gauge!(IN_FLIGHT_BYTES).set(pipeline.in_flight_bytes() as f64);
    metrics::gauge!(IN_PROGRESS).set(source.in_progress() as f64);
    metrics::gauge!(SOURCE_UP).set(source.open_streams() as f64);
    let confirmed = pipeline.stats().confirmed.load(Ordering::Relaxed);
    metrics::counter!(CONFIRMED).absolute(confirmed);
}

/// Logs a one-line summary every `every` until shutdown: rates in and
/// out, what is in flight, and the lag (notifications received but not
/// yet acknowledged).
pub async fn stats_line(
    pipeline: std::sync::Arc<Pipeline>,
    source: std::sync::Arc<dyn Source>,
    every: Duration,
    mut shutdown: Shutdown,
) {
    let snapshot = |p: &Pipeline, s: &dyn Source| {
        (
            s.stats().received.load(Ordering::Relaxed),
            s.stats().events.load(Ordering::Relaxed),
            p.stats().confirmed.load(Ordering::Relaxed),
            s.stats().acks_sent.load(Ordering::Relaxed),
        )
    };
    let mut last = (snapshot(&pipeline, source.as_ref()), Instant::now());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
        let now = (snapshot(&pipeline, source.as_ref()), Instant::now());
        let secs = now.1.duration_since(last.1).as_secs_f64().max(1e-9);
        let rate = |a: u64, b: u64| (a - b) as f64 / secs;
        let ((n, e, c, a), (n0, e0, c0, a0)) = (now.0, last.0);
        let p = pipeline.stats();
        tracing::info!(
            notifications_per_s = format_args!("{:.1}", rate(n, n0)),
            events_per_s = format_args!("{:.1}", rate(e, e0)),
            envelopes_out_per_s = format_args!("{:.1}", rate(c, c0)),
            acks_per_s = format_args!("{:.1}", rate(a, a0)),
            in_flight = pipeline.in_flight(),
            lag = source.in_progress(),
            streams = source.open_streams(),
            retries = p.retries.load(Ordering::Relaxed),
            rejected = p.rejected.load(Ordering::Relaxed),
            "stats"
        );
        last = now;
    }
}
