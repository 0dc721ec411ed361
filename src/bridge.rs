//! The bridge assembled: source → normalize → pipeline → sinks, with a
//! `run` entry point that tests call in-process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use evbridge_sinks::Sink;
use tracing::{info, warn};

use crate::normalize::Topics;
use crate::ops::admin::{self, Admin};
use crate::ops::health::{self, Health};
use crate::ops::telemetry;
use crate::pipeline::{Limits, Pipeline};
use crate::shutdown::{self, Shutdown};
use crate::sources::{self, SourceConfig, SourceError};

/// Everything the bridge needs besides its sinks.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Where the events come from.
    pub source: SourceConfig,
    /// Topic names of the envelopes.
    pub topics: Topics,
    /// In-flight bound, batch size and lanes per sink.
    pub limits: Limits,
    /// Where envelopes a sink rejected for good go (else their
    /// notifications stay unacknowledged).
    pub dead_letter: Option<Arc<dyn Sink>>,
    /// Serve `/metrics`, `/healthz` and `/readyz` here.
    pub metrics_listen: Option<SocketAddr>,
    /// How often each sink's health is checked.
    pub health_interval: Duration,
    /// How often the stats line is logged (never if `None`).
    pub stats_interval: Option<Duration>,
}

impl BridgeConfig {
    /// Defaults around a source.
    pub fn new(source: SourceConfig) -> Self {
        BridgeConfig {
            source,
            topics: Topics::default(),
            limits: Limits::default(),
            dead_letter: None,
            metrics_listen: None,
            health_interval: Duration::from_secs(5),
            stats_interval: None,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Notifications received (repeats included).
    pub notifications: u64,
    /// Acknowledgements sent.
    pub acked: u64,
    /// Build events received.
    pub events: u64,
    /// Envelopes confirmed by every sink.
    pub envelopes: u64,
    /// Envelopes some sink rejected for good.
    pub rejected: u64,
    /// Rejected envelopes the dead-letter sink took.
    pub dead_lettered: u64,
    /// Sink calls retried.
    pub retries: u64,
}

/// Runs the bridge until `shutdown` fires (then drains and returns) or the
/// source fails for good.
pub async fn run(
    cfg: BridgeConfig,
    sinks: Vec<Arc<dyn Sink>>,
    shutdown: Shutdown,
) -> Result<Summary, SourceError> {
    // The URL checked and connections made first, so a bad source is
    // the first error a user sees.
    let opened = sources::open(cfg.source).await?;
    // The recorder must exist before the pipeline and source make their
    // metric handles; the listener is bound now so a taken port is a
    // clear error at start.
    let admin = match cfg.metrics_listen {
        None => None,
        Some(addr) => {
            let handle = telemetry::install().map_err(SourceError::Config)?;
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                SourceError::Config(format!("cannot listen on {addr} (--metrics-listen): {e}"))
            })?;
            Some((handle, listener))
        }
    };
    let (pipeline, workers) =
        Pipeline::start_with_dead_letter(sinks, cfg.dead_letter.clone(), cfg.limits);
    let source = opened.start(cfg.topics, pipeline.clone(), cfg.health_interval);
    let running = source.clone().run(shutdown);
    // Helpers live until the bridge has drained, not just until the
    // shutdown asks it to.
    let (helpers_done, helpers) = shutdown::channel();
    for state in pipeline.sinks() {
        tokio::spawn(health::monitor(
            state.clone(),
            cfg.health_interval,
            helpers.clone(),
        ));
    }
    if let Some(every) = cfg.stats_interval {
        tokio::spawn(telemetry::stats_line(
            pipeline.clone(),
            source.clone(),
            every,
            helpers.clone(),
        ));
    }
    if let Some((handle, listener)) = admin {
        let refresh = {
            let (p, s) = (pipeline.clone(), source.clone());
            Arc::new(move || telemetry::refresh_gauges(&p, s.as_ref()))
        };
        let health = Arc::new(Health {
            source: source.clone(),
            sinks: pipeline.sinks().to_vec(),
        });
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "serving /metrics, /healthz and /readyz");
        }
        tokio::spawn(admin::serve(
            listener,
            Admin {
                metrics: handle,
                health,
                refresh,
            },
            helpers.clone(),
        ));
    }
    info!("bridge running");
    let result = running.await;

    let s = source.stats();
    let p = pipeline.stats();
    let summary = Summary {
        notifications: s.received.load(Ordering::Relaxed),
        acked: s.acks_sent.load(Ordering::Relaxed),
        events: s.events.load(Ordering::Relaxed),
        envelopes: p.confirmed.load(Ordering::Relaxed),
        rejected: p.rejected.load(Ordering::Relaxed),
        dead_lettered: p.dead_lettered.load(Ordering::Relaxed),
        retries: p.retries.load(Ordering::Relaxed),
    };
    helpers_done.fire();
    // Workers flush and stop once every sender is gone; tasks of broken
    // streams may still hold one, so wait only so long.
    drop(source);
    drop(pipeline);
    let all = async {
        for w in workers {
            let _ = w.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), all)
        .await
        .is_err()
    {
        warn!("sinks did not finish within 5s of shutdown");
    }
    result.map(|()| summary)
}
