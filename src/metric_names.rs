//! Every metric's name, in one place: the parts that record a metric take
//! its name from here, and `ops::telemetry` describes them all for
//! Prometheus (docs/operations.md lists them; a test checks it does).

/// Notifications received from the queue, repeats included.
pub const RECEIVED: &str = "evbridge_notifications_received_total";
/// Notifications received again after an earlier delivery to this process.
pub const REDELIVERED: &str = "evbridge_notifications_redelivered_total";
/// Acknowledgement tokens sent.
pub const ACKED: &str = "evbridge_notifications_acked_total";
/// Notifications left unacknowledged because a sink rejected something.
pub const UNACKED: &str = "evbridge_notifications_unacked_total";
/// Acknowledgements the server did not accept (receipt not OK).
pub const RECEIPTS_FAILED: &str = "evbridge_ack_receipts_failed_total";
/// Receipt of a notification to its acknowledgement.
pub const ACK_SECONDS: &str = "evbridge_ack_latency_seconds";
/// Build events read from the event store.
pub const EVENTS: &str = "evbridge_build_events_received_total";
/// Pull streams reopened after one ended or failed.
pub const RECONNECTS: &str = "evbridge_source_reconnects_total";
/// Event-store streams resumed after an interruption.
pub const RESUMES: &str = "evbridge_event_stream_resumes_total";
/// Invocations taken as the store had them after their event stream kept
/// ending without its last event.
pub const INCOMPLETE: &str = "evbridge_invocations_incomplete_total";
/// Notifications given up after `--max-attempts` failed attempts and
/// acknowledged (to the dead-letter sink, or logged whole).
pub const GIVEN_UP: &str = "evbridge_notifications_given_up_total";
/// Redeliveries of a notification still in progress, whose token its
/// running task took over (no second fetch).
pub const HANDED_OVER: &str = "evbridge_notifications_handed_over_total";
/// Pull streams open now.
pub const SOURCE_UP: &str = "evbridge_source_up";
/// Notifications being handled now.
pub const IN_PROGRESS: &str = "evbridge_notifications_in_progress";
/// Envelopes accepted into the pipeline.
pub const SUBMITTED: &str = "evbridge_envelopes_submitted_total";
/// Envelopes not yet confirmed by every sink.
pub const IN_FLIGHT: &str = "evbridge_envelopes_in_flight";
/// Bytes of their JSON (bounded by --max-in-flight-bytes).
pub const IN_FLIGHT_BYTES: &str = "evbridge_envelopes_in_flight_bytes";
/// Envelopes confirmed by every sink.
pub const CONFIRMED: &str = "evbridge_envelopes_confirmed_total";
/// Envelopes rejected for good and taken by the dead-letter sink.
pub const DEAD_LETTERED: &str = "evbridge_envelopes_dead_lettered_total";
/// Envelopes a sink confirmed.
pub const SINK_SENT: &str = "evbridge_sink_envelopes_sent_total";
/// Envelopes a sink failed, by `error` class (retryable, permanent).
pub const SINK_FAILED: &str = "evbridge_sink_envelopes_failed_total";
/// Sink calls retried after a retryable error.
pub const SINK_RETRIES: &str = "evbridge_sink_retries_total";
/// Duration of one sink call (a batch, confirmations included).
pub const SINK_SEND_SECONDS: &str = "evbridge_sink_send_duration_seconds";
/// 1 while the sink is healthy.
pub const SINK_UP: &str = "evbridge_sink_up";
/// Envelopes that carried fields the schema does not know, by `message` type.
pub const UNKNOWN_FIELDS: &str = "evbridge_unknown_fields_total";
/// Sink workers that panicked (and were restarted), by sink.
pub const WORKER_PANICS: &str = "evbridge_sink_worker_panics_total";
/// Envelopes a sink's `names=` filter skipped (delivered for that sink).
pub const SINK_FILTERED: &str = "evbridge_sink_envelopes_filtered_total";

/// Every name above, for the docs check and for describing them all.
pub const ALL: &[&str] = &[
    RECEIVED,
    REDELIVERED,
    ACKED,
    UNACKED,
    RECEIPTS_FAILED,
    ACK_SECONDS,
    EVENTS,
    RECONNECTS,
    RESUMES,
    INCOMPLETE,
    GIVEN_UP,
    HANDED_OVER,
    SOURCE_UP,
    IN_PROGRESS,
    SUBMITTED,
    IN_FLIGHT,
    IN_FLIGHT_BYTES,
    CONFIRMED,
    DEAD_LETTERED,
    SINK_SENT,
    SINK_FAILED,
    SINK_RETRIES,
    SINK_SEND_SECONDS,
    SINK_UP,
    UNKNOWN_FIELDS,
    WORKER_PANICS,
    SINK_FILTERED,
];
