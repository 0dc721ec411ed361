//! The EngFlow source: Pull streams on the notification queue, build
//! events from the event store, acknowledgements only after delivery.
//!
//! Each reader keeps one long-lived `Pull` stream open, reconnecting with
//! backoff and jitter whenever it ends. Each notification is handled by a
//! task of its own: its lifecycle envelope, and for `invocation_finished`
//! the invocation's events (resumed from the last continuation token after
//! a transient error), all go into the pipeline; the notification's token
//! is acknowledged on the stream that delivered it once the pipeline
//! confirmed everything. Tokens of a broken stream are dropped: the server
//! delivers those notifications again.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::metric_names as names;
use crate::normalize::Normalizer;
use crate::pb::{es, nq};
use crate::pipeline::Pipeline;
use crate::shutdown::Shutdown;
use crate::sources::{Source, SourceError, SourceStats};

mod connect;
mod notification;
mod pull;
mod store;

use connect::QueueClient;
pub use connect::{Auth, Channels, connect, probe};
use notification::{Failures, Latest, Seen};
use store::StoreClient;

/// Default of [`SourceConfig::max_message_size`]: 128 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 128 << 20;

/// Where and how to reach the source. Named for EngFlow, whose settings
/// most of it is; a broker source uses `endpoint`, `shutdown_grace` and
/// `max_notifications` and ignores the rest.
#[derive(Clone)]
pub struct SourceConfig {
    /// The source URL: `grpc[s]://HOST[:PORT]` for an EngFlow cluster, or
    /// a broker's ([`crate::sources::ACCEPTED`]).
    pub endpoint: String,
    /// Queue to pull, e.g. `eventstore/lifecycle-events`.
    pub queue: String,
    /// Sent as `x-engflow-auth-token` on every call.
    pub token: Option<String>,
    /// PEM of a private CA to trust instead of the system roots.
    pub tls_ca: Option<Vec<u8>>,
    /// PEM client certificate and key for mTLS.
    pub tls_identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Acknowledgement window asked of the server (30–300 s).
    pub ack_deadline: Duration,
    /// Concurrent Pull streams sharing the queue.
    pub readers: usize,
    /// Replay mode of GetInvocation.
    pub replay: es::replay_mode_options::ReplayMode,
    /// How long shutdown waits for in-flight notifications.
    pub shutdown_grace: Duration,
    /// Most acknowledgement tokens per request.
    pub ack_batch: usize,
    /// Notifications handled at once, at most. With `max_in_flight` this
    /// bounds what a crash can make the cluster redeliver (and the sinks
    /// see twice).
    pub max_notifications: usize,
    /// Largest message taken from the queue or the event store. Real
    /// Bazel events reach tens of MiB; tonic's default is 4 MiB.
    pub max_message_size: usize,
    /// Attempts after which a notification whose handling keeps failing
    /// (a sink rejected part of it for good, its events cannot be
    /// fetched) is given up: sent to the dead-letter sink as
    /// `undeliverable_notification` (or, without one, logged whole and
    /// counted) and acknowledged. 0: never give up.
    pub max_attempts: u32,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("endpoint", &self.endpoint)
            .field("queue", &self.queue)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("tls_ca", &self.tls_ca.is_some())
            .field("tls_identity", &self.tls_identity.is_some())
            .field("ack_deadline", &self.ack_deadline)
            .field("readers", &self.readers)
            .finish()
    }
}

impl SourceConfig {
    /// Defaults for everything but the endpoint.
    pub fn new(endpoint: impl Into<String>) -> Self {
        SourceConfig {
            endpoint: endpoint.into(),
            queue: "eventstore/lifecycle-events".into(),
            token: None,
            tls_ca: None,
            tls_identity: None,
            ack_deadline: Duration::from_secs(60),
            readers: 1,
            replay: es::replay_mode_options::ReplayMode::StopAfterLastKnown,
            shutdown_grace: Duration::from_secs(10),
            ack_batch: 1000,
            max_notifications: 256,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_attempts: 5,
        }
    }
}

/// Shared state of every reader and notification task.
pub struct EngFlowSource {
    cfg: SourceConfig,
    queue: QueueClient,
    store: StoreClient,
    normalizer: Normalizer,
    pipeline: Arc<Pipeline>,
    /// Notifications being handled (not yet acknowledged or given up).
    in_progress: Arc<Semaphore>,
    stats: SourceStats,
    seen: Mutex<Seen>,
    /// Failed attempts by notification id (bounded as `seen` is).
    failures: Mutex<Failures>,
    /// Notifications given up (dead-lettered or logged) lately: one that
    /// comes again (its acknowledgement did not stick) is acknowledged at
    /// once, not handled, and so given up, again.
    given_up: Mutex<Seen>,
    /// Given up without a dead-letter sink: how many, and the last id.
    logged_only: Mutex<Option<(u64, String)>>,
    /// Notifications being handled, by id, with their newest delivery: a
    /// redelivery of one still in progress hands its token over instead of
    /// starting a second fetch, and the task acknowledges the newest.
    running: Mutex<HashMap<String, Arc<Mutex<Latest>>>>,
    meters: Meters,
}

/// Metric handles, made once (a lookup per event would cost at full rate).
struct Meters {
    received: metrics::Counter,
    redelivered: metrics::Counter,
    acked: metrics::Counter,
    unacked: metrics::Counter,
    receipts_failed: metrics::Counter,
    events: metrics::Counter,
    reconnects: metrics::Counter,
    resumes: metrics::Counter,
    incomplete: metrics::Counter,
    given_up: metrics::Counter,
    handed_over: metrics::Counter,
    ack_seconds: metrics::Histogram,
}

impl Meters {
    fn new() -> Self {
        Meters {
            received: metrics::counter!(names::RECEIVED),
            redelivered: metrics::counter!(names::REDELIVERED),
            acked: metrics::counter!(names::ACKED),
            unacked: metrics::counter!(names::UNACKED),
            receipts_failed: metrics::counter!(names::RECEIPTS_FAILED),
            events: metrics::counter!(names::EVENTS),
            reconnects: metrics::counter!(names::RECONNECTS),
            resumes: metrics::counter!(names::RESUMES),
            incomplete: metrics::counter!(names::INCOMPLETE),
            given_up: metrics::counter!(names::GIVEN_UP),
            handed_over: metrics::counter!(names::HANDED_OVER),
            ack_seconds: metrics::histogram!(names::ACK_SECONDS),
        }
    }
}

impl EngFlowSource {
    /// A source over its channels.
    pub fn new(
        cfg: SourceConfig,
        channels: Channels,
        normalizer: Normalizer,
        pipeline: Arc<Pipeline>,
    ) -> Arc<Self> {
        let max = cfg.max_message_size;
        Arc::new(EngFlowSource {
            queue: nq::notification_queue_client::NotificationQueueClient::with_interceptor(
                channels.queue,
                channels.auth.clone(),
            )
            .max_decoding_message_size(max),
            store: StoreClient::new(channels.store, channels.auth, max),
            in_progress: Arc::new(Semaphore::new(cfg.max_notifications.max(1))),
            cfg,
            normalizer,
            pipeline,
            stats: SourceStats::default(),
            meters: Meters::new(),
            seen: Mutex::default(),
            failures: Mutex::default(),
            given_up: Mutex::default(),
            logged_only: Mutex::default(),
            running: Mutex::default(),
        })
    }
}

#[async_trait]
impl Source for EngFlowSource {
    /// Runs every reader until shutdown (after draining) or a fatal error.
    async fn run(self: Arc<Self>, shutdown: Shutdown) -> Result<(), SourceError> {
        let mut readers = JoinSet::new();
        for _ in 0..self.cfg.readers.max(1) {
            readers.spawn(self.clone().reader(shutdown.clone()));
        }
        let mut result = Ok(());
        while let Some(done) = readers.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    // One reader's fatal error is everyone's: same config.
                    readers.abort_all();
                    result = Err(e);
                }
                Err(e) if e.is_cancelled() => {}
                Err(e) => result = Err(SourceError::Fatal(format!("reader task failed: {e}"))),
            }
        }
        result
    }
    fn stats(&self) -> &SourceStats {
        &self.stats
    }
    fn open_streams(&self) -> usize {
        self.stats.open_streams.load(Ordering::Acquire)
    }
    fn in_progress(&self) -> usize {
        self.stats.in_progress.load(Ordering::Acquire)
    }
    fn down_reason(&self) -> String {
        "no Pull stream open".into()
    }
    fn notes(&self) -> Vec<String> {
        let logged = self.logged_only.lock().unwrap_or_else(|p| p.into_inner());
        match &*logged {
            None => Vec::new(),
            Some((n, last)) => vec![format!(
                "{n} notification(s) given up and acknowledged with no --dead-letter sink, kept \
                 only in the error log (last: {last}); see evbridge_notifications_given_up_total"
            )],
        }
    }
}
