//! The bridge assembled: source → normalize → pipeline → sinks, with a
//! `run` entry point that tests call in-process.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use evbridge_sinks::Sink;
use tracing::{info, warn};

use crate::normalize::{Normalizer, Topics};
use crate::pipeline::{Limits, Pipeline};
use crate::shutdown::Shutdown;
use crate::source::{Source, SourceConfig, SourceError, connect};

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
}

impl BridgeConfig {
    /// Defaults around a source.
    pub fn new(source: SourceConfig) -> Self {
        BridgeConfig {
            source,
            topics: Topics::default(),
            limits: Limits::default(),
            dead_letter: None,
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
    let (channel, auth) = connect(&cfg.source)?;
    // Tell the operator early when a destination is not reachable; the
    // pipeline retries regardless, so this only warns.
    for sink in &sinks {
        let sink = sink.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), sink.healthcheck()).await {
                Ok(Ok(())) => info!(sink = sink.describe(), "sink healthy"),
                Ok(Err(e)) => {
                    warn!(sink = sink.describe(), error = %e, "sink not healthy yet; deliveries will be retried")
                }
                Err(_) => warn!(
                    sink = sink.describe(),
                    "sink health check timed out; deliveries will be retried"
                ),
            }
        });
    }
    let (pipeline, workers) =
        Pipeline::start_with_dead_letter(sinks, cfg.dead_letter.clone(), cfg.limits);
    let source = Source::new(
        cfg.source,
        channel,
        auth,
        Normalizer::new(cfg.topics),
        pipeline.clone(),
    );
    info!("bridge running");
    let result = source.run(shutdown).await;

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
