//! `evbridge sim`: an EngFlow-compatible cluster in a box. It serves
//! `NotificationQueue.Pull` and `EventStore.GetInvocation`/`GetBuild` over
//! real gRPC with the real semantics, checks tokens and client
//! certificates when told to, injects faults on request and reports what
//! it delivered and what was acknowledged.

mod bazel;
pub mod queue;
mod service;
mod store;
pub mod world;

pub use service::serve;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::pb::{es, nq};
use crate::shutdown::Shutdown;
use crate::sim::queue::{AckOutcome, Queue, QueueStats};
use crate::sim::store::{CallResult, EventStoreServer, StoredEvent, StoredEvents, encode_all};
use crate::sim::world::{GenConfig, World, generate};

/// How the simulated cluster behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// What it holds.
    pub gen_config: GenConfig,
    /// The one queue it serves.
    pub queue_name: String,
    /// When set, every call must carry this token (jwt-v0).
    pub token: Option<String>,
    /// End each Pull stream with UNAVAILABLE after it received K
    /// acknowledgements (its unacknowledged notifications come again).
    pub drop_stream_every: usize,
    /// End each GetInvocation stream with UNAVAILABLE after K events.
    pub drop_event_stream_every: usize,
    /// End each GetInvocation stream cleanly (no error, no `is_last`)
    /// after K events: a store returning a prefix.
    pub end_event_stream_every: usize,
    /// Serve events without continuation tokens.
    pub omit_continuation_tokens: bool,
    /// With `drop_event_stream_every`: drop at most this many event
    /// streams in all (0 = no limit), so a store without tokens, replayed
    /// from the start each time, can still finish.
    pub drop_event_stream_limit: usize,
    /// Cap on unacknowledged notifications per reader.
    pub max_unacked_per_reader: usize,
    /// Notifications released per second; 0 releases all at start.
    pub rate: f64,
    /// Release nothing by itself: the caller releases with [`Sim::release`].
    pub hold: bool,
    /// Overrides every reader's acknowledgement window (fault injection:
    /// a short window makes slow acks late).
    pub ack_window_override: Option<Duration>,
    /// Read acknowledgements only when there is nothing left to send
    /// (fault injection: a server the bridge must not deadlock with by
    /// blocking its reads on sending acks).
    pub lazy_acks: bool,
    /// HTTP/2 receive window per stream, in bytes (a small window makes
    /// flow control bite with small test worlds).
    pub http2_window: Option<u32>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            gen_config: GenConfig::default(),
            queue_name: "eventstore/lifecycle-events".into(),
            token: None,
            drop_stream_every: 0,
            drop_event_stream_every: 0,
            end_event_stream_every: 0,
            omit_continuation_tokens: false,
            drop_event_stream_limit: 0,
            max_unacked_per_reader: 1000,
            rate: 0.0,
            hold: false,
            ack_window_override: None,
            lazy_acks: false,
            http2_window: None,
        }
    }
}

/// What the simulator did, for tests and the operator.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct Report {
    /// Notifications in the queue (including bad ones).
    pub notifications: usize,
    /// Of which carry a deliberately undecodable payload.
    pub bad_payloads: usize,
    /// Builds generated.
    pub builds: usize,
    /// Invocations generated.
    pub invocations: usize,
    /// Build events stored over all invocations.
    pub invocation_events: usize,
    /// Queue counters.
    #[serde(flatten)]
    pub queue: QueueStats,
    /// Pull streams opened.
    pub streams_opened: u64,
    /// Pull streams ended by `drop_stream_every`.
    pub streams_dropped: u64,
    /// GetInvocation/GetBuild calls.
    pub event_calls: u64,
    /// Events sent on those calls (repeats included).
    pub events_served: u64,
    /// Event streams ended by `drop_event_stream_every`.
    pub event_streams_dropped: u64,
    /// Calls refused for a missing or wrong token.
    pub unauthenticated: u64,
}

#[derive(Default)]
struct Counters {
    streams_opened: AtomicU64,
    streams_dropped: AtomicU64,
    event_calls: AtomicU64,
    events_served: AtomicU64,
    event_streams_dropped: AtomicU64,
    unauthenticated: AtomicU64,
    next_stream: AtomicU64,
}

/// The simulated cluster's state, shared by its services.
pub struct Sim {
    cfg: SimConfig,
    world: World,
    /// Invocation and build ids → their index in `world`: a lookup per
    /// GetInvocation, not a scan of every invocation.
    invocation_index: std::collections::HashMap<String, usize>,
    build_index: std::collections::HashMap<String, usize>,
    /// Every invocation's and build's events, encoded once (what an event
    /// store keeps), in `world`'s order.
    stored_invocations: Vec<Vec<bytes::Bytes>>,
    stored_builds: Vec<Vec<bytes::Bytes>>,
    queue: Queue,
    counters: Counters,
}

impl Sim {
    /// Generates the world and, unless a rate is set, releases it all.
    pub fn new(cfg: SimConfig) -> Arc<Self> {
        let world = generate(&cfg.gen_config);
        Self::with_world(cfg, world)
    }

    /// A cluster holding `world` instead of a generated one (its
    /// `gen_config` is not used): real Bazel events, or hand-made ones.
    pub fn with_world(cfg: SimConfig, world: World) -> Arc<Self> {
        let stored = world
            .invocations
            .iter()
            .map(|i| encode_all(&i.events))
            .collect();
        Self::with_stored(cfg, world, stored)
    }

    /// As [`Self::with_world`], serving `stored[i][j]` as the bytes of
    /// event `j` of invocation `i` (they may carry what `world`'s structs
    /// cannot, such as fields the schema does not know).
    pub fn with_stored(cfg: SimConfig, world: World, stored: Vec<Vec<bytes::Bytes>>) -> Arc<Self> {
        assert_eq!(
            stored.len(),
            world.invocations.len(),
            "one list per invocation"
        );
        let queue = Queue::new(world.notifications.clone());
        if cfg.rate <= 0.0 && !cfg.hold {
            queue.release(usize::MAX);
        }
        let index = |ids: Vec<&String>| {
            ids.into_iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), i))
                .collect()
        };
        let invocation_index = index(world.invocations.iter().map(|i| &i.id).collect());
        let build_index = index(world.builds.iter().map(|b| &b.id).collect());
        let stored_invocations = stored;
        let stored_builds = world.builds.iter().map(|b| encode_all(&b.events)).collect();
        Arc::new(Sim {
            cfg,
            world,
            invocation_index,
            build_index,
            stored_invocations,
            stored_builds,
            queue,
            counters: Counters::default(),
        })
    }

    /// What the cluster holds.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// Makes the next `n` notifications visible (for tests that pace the
    /// cluster themselves); returns how many are released in all.
    pub fn release(&self, n: usize) -> usize {
        self.queue.release(n)
    }

    /// Ids of the notifications acknowledged so far.
    pub fn acked_ids(&self) -> Vec<String> {
        self.queue.acked_ids()
    }

    /// True once every notification was acknowledged.
    pub fn all_acked(&self) -> bool {
        self.queue.all_acked()
    }

    /// Counters so far.
    pub fn report(&self) -> Report {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Report {
            notifications: self.world.notifications.len(),
            bad_payloads: self.world.bad.len(),
            builds: self.world.builds.len(),
            invocations: self.world.invocations.len(),
            invocation_events: self.world.invocation_events(),
            queue: self.queue.stats(),
            streams_opened: get(&c.streams_opened),
            streams_dropped: get(&c.streams_dropped),
            event_calls: get(&c.event_calls),
            events_served: get(&c.events_served),
            event_streams_dropped: get(&c.event_streams_dropped),
            unauthenticated: get(&c.unauthenticated),
        }
    }

    fn check_auth<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(want) = &self.cfg.token else {
            return Ok(());
        };
        let md = req.metadata();
        let method = md
            .get("x-engflow-auth-method")
            .and_then(|v| v.to_str().ok());
        let token = md.get("x-engflow-auth-token").and_then(|v| v.to_str().ok());
        if method == Some("jwt-v0") && token == Some(want.as_str()) {
            Ok(())
        } else {
            self.counters
                .unauthenticated
                .fetch_add(1, Ordering::Relaxed);
            Err(Status::unauthenticated(
                "missing or invalid x-engflow-auth-token (method jwt-v0)",
            ))
        }
    }

    /// Releases notifications at the configured rate until all are out.
    async fn release_loop(self: Arc<Self>, mut shutdown: Shutdown) {
        if self.cfg.rate <= 0.0 || self.cfg.hold {
            return;
        }
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait() => return,
            }
            let due = (start.elapsed().as_secs_f64() * self.cfg.rate) as usize;
            let released = self.queue.stats().released;
            if due > released && self.queue.release(due - released) >= self.queue.len() {
                return;
            }
        }
    }

    /// Sweeps expired acknowledgement windows.
    async fn expiry_loop(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = tick.tick() => self.queue.expire(),
                _ = shutdown.wait() => return,
            }
        }
    }

    /// How many of `inv`'s events are stored now, and whether that is all.
    fn stored(&self, inv: usize) -> (usize, bool) {
        let i = &self.world.invocations[inv];
        let released = self.queue.stats().released;
        if released > i.finished_at {
            (i.events.len(), true)
        } else if released > i.started_at {
            (i.events.len() / 2, false)
        } else {
            (0, false)
        }
    }
}
