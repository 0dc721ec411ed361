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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use tracing::{debug, error, info, warn};

use crate::normalize::{Invocation, Normalizer};
use crate::ops::telemetry as t;
use crate::pb::{es, nq};
use crate::pipeline::{Pipeline, Slot, Tracker};
use crate::retry::Backoff;
use crate::shutdown::Shutdown;
use crate::store_client::{RawStreamed, StoreClient};

/// Default of [`SourceConfig::max_message_size`]: 128 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 128 << 20;

/// Where and how to reach the cluster.
#[derive(Clone)]
pub struct SourceConfig {
    /// `grpc://host[:port]` or `grpcs://host[:port]`.
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

/// Why the source stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The configuration cannot work (bad URL, unreadable TLS material).
    #[error("{0}")]
    Config(String),
    /// The cluster refused us in a way retrying cannot fix.
    #[error("{0}")]
    Fatal(String),
}

/// Adds the EngFlow auth headers to every call.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = &self.0 {
            let md = req.metadata_mut();
            md.insert(
                "x-engflow-auth-method",
                MetadataValue::from_static("jwt-v0"),
            );
            md.insert("x-engflow-auth-token", token.clone());
        }
        Ok(req)
    }
}

type QueueClient =
    nq::notification_queue_client::NotificationQueueClient<InterceptedService<Channel, Auth>>;

/// The gRPC connections of a source: one for the notification queue and
/// one for the event store. Separate HTTP/2 connections, because their
/// flow-control windows must not be shared: acknowledgements a server is
/// slow to read would otherwise block the event-store calls the
/// notifications in progress wait for, and the pull with them.
#[derive(Clone)]
pub struct Channels {
    /// For `Pull`.
    pub queue: Channel,
    /// For `GetInvocation`.
    pub store: Channel,
    /// Auth headers for both.
    pub auth: Auth,
}

/// Builds the gRPC channels (lazy: connection errors surface on calls and
/// are retried there) and the auth interceptor.
pub fn connect(cfg: &SourceConfig) -> Result<Channels, SourceError> {
    let url = url::Url::parse(&cfg.endpoint).map_err(|e| {
        SourceError::Config(format!(
            "source `{}` is not a URL ({e}); accepted forms: grpc://HOST[:PORT], grpcs://HOST[:PORT], or a broker: {}",
            evbridge_sinks::redact(&cfg.endpoint),
            evbridge_sinks::ACCEPTED_SOURCES,
        ))
    })?;
    let tls = match url.scheme() {
        "grpc" => false,
        "grpcs" => true,
        other => {
            return Err(SourceError::Config(format!(
                "source scheme `{other}` is not supported; accepted forms: grpc://HOST[:PORT], grpcs://HOST[:PORT], or a broker: {}",
                evbridge_sinks::ACCEPTED_SOURCES
            )));
        }
    };
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| {
        SourceError::Config(format!(
            "source `{}` has no host; accepted forms: grpc://HOST[:PORT], grpcs://HOST[:PORT], or a broker: {}",
            evbridge_sinks::redact(&cfg.endpoint),
            evbridge_sinks::ACCEPTED_SOURCES,
        ))
    })?;
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return Err(SourceError::Config(format!(
            "source `{}` must not have a path or query; the queue is set with --queue",
            evbridge_sinks::redact(&cfg.endpoint)
        )));
    }
    if !tls && cfg.token.is_some() {
        warn!(
            source = %evbridge_sinks::redact(&cfg.endpoint),
            "the auth token is sent in clear text over grpc://; use grpcs://"
        );
    }
    let port = url.port().unwrap_or(if tls { 443 } else { 80 });
    let uri = format!("{}://{host}:{port}", if tls { "https" } else { "http" });
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| SourceError::Config(format!("source endpoint: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if tls {
        let mut tls_cfg = ClientTlsConfig::new().domain_name(host.trim_matches(['[', ']']));
        tls_cfg = match &cfg.tls_ca {
            Some(ca) => tls_cfg.ca_certificate(Certificate::from_pem(ca)),
            None => tls_cfg.with_native_roots(),
        };
        if let Some((cert, key)) = &cfg.tls_identity {
            tls_cfg = tls_cfg.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint
            .tls_config(tls_cfg)
            .map_err(|e| SourceError::Config(format!("TLS configuration: {}", chain(&e))))?;
    } else if cfg.tls_identity.is_some() || cfg.tls_ca.is_some() {
        return Err(SourceError::Config(
            "TLS options need a grpcs:// source".into(),
        ));
    }
    let auth = match &cfg.token {
        None => Auth(None),
        Some(t) => {
            let mut v: MetadataValue<Ascii> = t.trim().parse().map_err(|_| {
                SourceError::Config("the token contains characters not allowed in a header".into())
            })?;
            v.set_sensitive(true);
            Auth(Some(v))
        }
    };
    Ok(Channels {
        queue: endpoint.connect_lazy(),
        store: endpoint.connect_lazy(),
        auth,
    })
}

/// Checks that the cluster answers and accepts the credentials, without
/// pulling (a pulled notification would be held back for the ack
/// deadline): asks the event store for an invocation that does not exist,
/// where "not found" is the healthy answer. The queue name itself is only
/// checked by the first Pull.
pub async fn probe(cfg: &SourceConfig) -> Result<(), String> {
    let c = connect(cfg).map_err(|e| e.to_string())?;
    let mut store = es::event_store_client::EventStoreClient::with_interceptor(c.store, c.auth);
    let req = es::GetInvocationRequest {
        instance_name: String::new(),
        invocation_id: format!("evbridge-check-{}", uuid::Uuid::new_v4()),
        continuation_token: None,
        replay_mode: es::replay_mode_options::ReplayMode::StopAfterLastKnown as i32,
    };
    let status =
        match tokio::time::timeout(Duration::from_secs(15), store.get_invocation(req)).await {
            Err(_) => return Err("no answer within 15s".into()),
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(status)) => status,
        };
    match status.code() {
        Code::NotFound | Code::InvalidArgument | Code::OutOfRange => Ok(()),
        Code::Unauthenticated | Code::PermissionDenied => Err(format!(
            "credentials refused: {:?}: {}",
            status.code(),
            status.message()
        )),
        Code::Unimplemented => Err(format!(
            "the endpoint does not serve the EngFlow event store: {}",
            status.message()
        )),
        code => {
            let mut text = format!("{code:?}: {}", status.message());
            if let Some(cause) = std::error::Error::source(&status) {
                text.push_str(": ");
                text.push_str(&chain(cause));
            }
            Err(text)
        }
    }
}

/// An error with its sources ("transport error: invalid key …").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What health checks, metrics and the stats line need from any source
/// (EngFlow's queue or a broker).
pub trait Upstream: Send + Sync {
    /// Its counters.
    fn stats(&self) -> &SourceStats;
    /// Streams (Pull streams, broker subscriptions) receiving now.
    fn open_streams(&self) -> usize;
    /// Messages received and not yet acknowledged or given up.
    fn in_progress(&self) -> usize;
    /// Why it is not ready, when it has no open stream.
    fn down_reason(&self) -> String;
    /// What an operator should see in `/readyz` that does not make the
    /// bridge unready (notifications given up and kept only in the log).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

impl Upstream for Source {
    fn stats(&self) -> &SourceStats {
        Source::stats(self)
    }
    fn open_streams(&self) -> usize {
        Source::open_streams(self)
    }
    fn in_progress(&self) -> usize {
        Source::in_progress(self)
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

/// Counters of the source.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Notifications received (repeats included).
    pub received: AtomicU64,
    /// Acknowledgement tokens sent.
    pub acks_sent: AtomicU64,
    /// Receipts with a non-OK status.
    pub receipts_failed: AtomicU64,
    /// Pull streams opened.
    pub streams: AtomicU64,
    /// Build events received from the event store.
    pub events: AtomicU64,
    /// Pull streams open now.
    pub open_streams: AtomicUsize,
    /// Notifications received and not yet acknowledged or given up.
    pub in_progress: AtomicUsize,
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
            received: metrics::counter!(t::RECEIVED),
            redelivered: metrics::counter!(t::REDELIVERED),
            acked: metrics::counter!(t::ACKED),
            unacked: metrics::counter!(t::UNACKED),
            receipts_failed: metrics::counter!(t::RECEIPTS_FAILED),
            events: metrics::counter!(t::EVENTS),
            reconnects: metrics::counter!(t::RECONNECTS),
            resumes: metrics::counter!(t::RESUMES),
            incomplete: metrics::counter!(t::INCOMPLETE),
            given_up: metrics::counter!(t::GIVEN_UP),
            handed_over: metrics::counter!(t::HANDED_OVER),
            ack_seconds: metrics::histogram!(t::ACK_SECONDS),
        }
    }
}

/// Notification ids seen lately, to count redeliveries; bounded so a
/// long-running bridge does not grow.
#[derive(Default)]
struct Seen {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    const CAPACITY: usize = 100_000;

    /// Remembers `id`; true if it was seen before.
    fn again(&mut self, id: &str) -> bool {
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

    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
}

/// Shared state of every reader and notification task.
pub struct Source {
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

/// The newest delivery of a notification in progress: its token and the
/// stream to acknowledge it on.
struct Latest {
    token: String,
    ack: mpsc::UnboundedSender<String>,
}

/// Takes a notification's own entry out of `running` however its task
/// ends (a later task's entry for the same id is left alone).
struct RunningEntry(Arc<Source>, String, Arc<Mutex<Latest>>);

impl RunningEntry {
    /// Leaves `running` now; the newest token and its stream.
    fn finish(&self) -> (String, mpsc::UnboundedSender<String>) {
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
struct Failures {
    counts: HashMap<String, u32>,
    order: VecDeque<String>,
}

impl Failures {
    /// One more failure of `id`; how many so far.
    fn record(&mut self, id: &str) -> u32 {
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

    fn forget(&mut self, id: &str) {
        self.counts.remove(id);
    }
}

/// Codes that mean "this configuration will never work" at start.
fn is_fatal(code: Code) -> bool {
    matches!(
        code,
        Code::Unauthenticated | Code::PermissionDenied | Code::NotFound | Code::InvalidArgument
    )
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

impl Source {
    /// A source over its channels.
    pub fn new(
        cfg: SourceConfig,
        channels: Channels,
        normalizer: Normalizer,
        pipeline: Arc<Pipeline>,
    ) -> Arc<Self> {
        let max = cfg.max_message_size;
        Arc::new(Source {
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
            seen: Mutex::new(Seen {
                ids: HashSet::new(),
                order: VecDeque::new(),
            }),
            failures: Mutex::default(),
            given_up: Mutex::default(),
            logged_only: Mutex::default(),
            running: Mutex::default(),
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> &SourceStats {
        &self.stats
    }

    /// Pull streams open now (the source is up while this is above 0).
    pub fn open_streams(&self) -> usize {
        self.stats.open_streams.load(Ordering::Acquire)
    }

    /// Notifications received and not yet acknowledged or given up.
    pub fn in_progress(&self) -> usize {
        self.stats.in_progress.load(Ordering::Acquire)
    }

    /// Runs every reader until shutdown (after draining) or a fatal error.
    pub async fn run(self: &Arc<Self>, shutdown: Shutdown) -> Result<(), SourceError> {
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

    async fn reader(self: Arc<Self>, mut shutdown: Shutdown) -> Result<(), SourceError> {
        let client_id = format!("evbridge/{}", uuid::Uuid::new_v4());
        let mut backoff = Backoff::default();
        let mut ever_connected = false;
        let mut first = true;
        loop {
            if shutdown.is_shutdown() {
                return Ok(());
            }
            if !std::mem::take(&mut first) {
                self.meters.reconnects.increment(1);
            }
            // Unbounded: acknowledgements (one per notification received,
            // so bounded by what was delivered) must never block the loop
            // that reads deliveries, or a server that reads acks only
            // between its sends would deadlock with us.
            let (req_tx, req_rx) = mpsc::unbounded_channel();
            let first = nq::PullNotificationRequest {
                queue: Some(nq::QueueId {
                    name: self.cfg.queue.clone(),
                }),
                client: Some(client_id.clone()),
                notification_delivery_options: Some(nq::NotificationDeliveryOptions {
                    acknowledgement_deadline: Some(prost_types::Duration {
                        seconds: self.cfg.ack_deadline.as_secs() as i64,
                        nanos: 0,
                    }),
                }),
                acknowledgement_tokens: vec![],
            };
            req_tx.send(first).expect("receiver alive");
            let mut client = self.queue.clone();
            let opened = tokio::select! {
                r = client.pull(UnboundedReceiverStream::new(req_rx)) => r,
                _ = shutdown.wait() => return Ok(()),
            };
            let inbound = match opened {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    if is_fatal(status.code()) && !ever_connected {
                        return Err(SourceError::Fatal(format!(
                            "the notification queue refused the stream: {:?}: {} (queue `{}`, source {})",
                            status.code(),
                            status.message(),
                            self.cfg.queue,
                            evbridge_sinks::redact(&self.cfg.endpoint),
                        )));
                    }
                    let delay = backoff.next_delay();
                    warn!(code = ?status.code(), error = status.message(), "opening Pull stream failed; retrying in {delay:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = shutdown.wait() => return Ok(()),
                    }
                }
            };
            ever_connected = true;
            self.stats.streams.fetch_add(1, Ordering::Relaxed);
            debug!(client = %client_id, "Pull stream open");
            self.stats.open_streams.fetch_add(1, Ordering::AcqRel);
            let ended = self.session(inbound, req_tx, shutdown.clone()).await;
            self.stats.open_streams.fetch_sub(1, Ordering::AcqRel);
            match ended {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Healthy(reason) => {
                    backoff.reset();
                    info!("Pull stream ended ({reason}); reconnecting");
                }
                SessionEnd::Broken(reason, productive) => {
                    // A stream that did work proves the server is healthy:
                    // start the backoff over instead of growing it.
                    if productive {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    warn!("Pull stream broke ({reason}); reconnecting in {delay:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.wait() => return Ok(()),
                    }
                }
            }
        }
    }

    /// Serves one Pull stream until it ends or shutdown has drained it.
    async fn session(
        self: &Arc<Self>,
        mut inbound: tonic::Streaming<nq::PullNotificationResponse>,
        req_tx: mpsc::UnboundedSender<nq::PullNotificationRequest>,
        mut shutdown: Shutdown,
    ) -> SessionEnd {
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<String>();
        let mut tasks = JoinSet::new();
        // Token → notification id, to name notifications in receipt logs.
        let mut pending: HashMap<String, String> = HashMap::new();
        // Room for one more notification (held until it is done) and for
        // its first envelope, reserved before reading the next one.
        let mut slot: Option<(OwnedSemaphorePermit, Slot)> = None;
        let mut drain_until: Option<tokio::time::Instant> = None;
        let mut delivered_any = false;
        let mut tokens = Vec::new();

        let end = loop {
            if drain_until.is_some() && tasks.is_empty() && ack_rx.is_empty() {
                break SessionEnd::Shutdown;
            }
            tokio::select! {
                biased;
                n = ack_rx.recv_many(&mut tokens, self.cfg.ack_batch) => {
                    debug_assert!(n > 0, "the session holds a sender");
                    let req = nq::PullNotificationRequest {
                        acknowledgement_tokens: std::mem::take(&mut tokens),
                        ..Default::default()
                    };
                    self.stats.acks_sent.fetch_add(n as u64, Ordering::Relaxed);
                    self.meters.acked.increment(n as u64);
                    if req_tx.send(req).is_err() {
                        break SessionEnd::Broken("request stream closed".into(), delivered_any);
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                s = self.reserve(), if slot.is_none() && drain_until.is_none() => slot = Some(s),
                msg = inbound.message(), if slot.is_some() && drain_until.is_none() => match msg {
                    Ok(Some(resp)) => {
                        for r in resp.acknowledgement_receipt {
                            let id = pending.remove(&r.token).unwrap_or_else(|| "?".into());
                            let status = r.status.unwrap_or_default();
                            if status.code != 0 {
                                self.stats.receipts_failed.fetch_add(1, Ordering::Relaxed);
                                self.meters.receipts_failed.increment(1);
                                warn!(notification = %id, code = ?Code::from(status.code), error = %status.message,
                                    "acknowledgement not accepted; the notification will come again");
                            }
                        }
                        if let Some(an) = resp.notification {
                            let Some(n) = an.notification else {
                                warn!("a delivery without a notification; ignored");
                                continue;
                            };
                            delivered_any = true;
                            self.stats.received.fetch_add(1, Ordering::Relaxed);
                            self.meters.received.increment(1);
                            if self.seen.lock().unwrap_or_else(|p| p.into_inner()).again(&n.id) {
                                self.meters.redelivered.increment(1);
                            }
                            pending.insert(an.token.clone(), n.id.clone());
                            if self.given_up.lock().unwrap_or_else(|p| p.into_inner()).contains(&n.id) {
                                info!(notification = %n.id, "given up before; acknowledged again");
                                let _ = ack_tx.send(an.token);
                                continue;
                            }
                            let latest = Latest { token: an.token, ack: ack_tx.clone() };
                            // A redelivery of one still in progress: its task
                            // takes the new token (the old one expires with
                            // the window), and no second fetch starts.
                            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some(l) = running.get(&n.id) {
                                *l.lock().unwrap_or_else(|p| p.into_inner()) = latest;
                                drop(running);
                                self.meters.handed_over.increment(1);
                                continue;
                            }
                            let latest = Arc::new(Mutex::new(latest));
                            running.insert(n.id.clone(), latest.clone());
                            drop(running);
                            let (permit, slot) = slot.take().expect("guarded");
                            let task = self.clone().handle(n, latest, slot, shutdown.clone());
                            self.stats.in_progress.fetch_add(1, Ordering::AcqRel);
                            // Counted down however the task ends, aborted
                            // before it ran included.
                            let done = InProgress(self.clone());
                            tasks.spawn(async move {
                                let _done = done;
                                task.await;
                                drop(permit);
                            });
                        }
                    }
                    // A stream that ended after doing work is normal server
                    // behaviour; one that ends at once should not spin.
                    Ok(None) if delivered_any => break SessionEnd::Healthy("server ended the stream".into()),
                    Ok(None) => break SessionEnd::Broken("server ended the stream at once".into(), false),
                    Err(status) => break SessionEnd::Broken(format!("{:?}: {}", status.code(), status.message()), delivered_any),
                },
                _ = shutdown.wait(), if drain_until.is_none() => {
                    let grace = self.cfg.shutdown_grace;
                    info!(in_flight = tasks.len(), "shutting down: no new notifications; draining for up to {grace:?}");
                    drain_until = Some(tokio::time::Instant::now() + grace);
                }
                _ = tokio::time::sleep_until(drain_until.unwrap_or_else(tokio::time::Instant::now)), if drain_until.is_some() => {
                    warn!(abandoned = tasks.len(), "shutdown grace elapsed; unacknowledged notifications will be redelivered");
                    break SessionEnd::Shutdown;
                }
            }
        };
        if matches!(end, SessionEnd::Shutdown) {
            tasks.abort_all();
            // Half-close our side and wait (briefly) for the server to end
            // the stream, so the acknowledgements sent last are processed
            // rather than cancelled with the call.
            drop(req_tx);
            let closing = async {
                while let Ok(Some(resp)) = inbound.message().await {
                    for r in resp.acknowledgement_receipt {
                        if r.status.is_some_and(|s| s.code != 0) {
                            self.stats.receipts_failed.fetch_add(1, Ordering::Relaxed);
                            self.meters.receipts_failed.increment(1);
                            let id = pending.get(&r.token).map_or("?", String::as_str);
                            warn!(notification = %id, "acknowledgement not accepted at shutdown; it will come again");
                        }
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), closing)
                .await
                .is_err()
            {
                warn!("the server did not end the Pull stream within 5s of our half-close");
            }
        } else {
            // Tasks of a broken stream finish delivering; their tokens are
            // worthless now and the server delivers those notifications
            // again.
            tasks.detach_all();
        }
        end
    }

    /// Waits for room for one more notification and its first envelope.
    async fn reserve(&self) -> (OwnedSemaphorePermit, Slot) {
        let permit = self
            .in_progress
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        (permit, self.pipeline.reserve().await)
    }

    /// One notification: deliver everything derived from it, then ack.
    async fn handle(
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
            crate::unknown::report(&life.envelope.id, &life.unknown);
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
                                        crate::unknown::report(&out.envelope.id, &out.unknown);
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

/// Counts a notification task out when it ends, however it ends.
struct InProgress(Arc<Source>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.stats.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

enum SessionEnd {
    Shutdown,
    /// Ended cleanly by the server: reconnect at once.
    Healthy(String),
    /// Broke with an error: reconnect after backoff (reset first when the
    /// stream had delivered something).
    Broken(String, bool),
}
