//! Is the bridge ready? The source must have a Pull stream open and every
//! sink must be healthy, so `/readyz` is not green while a broker is down.
//!
//! A sink is healthy when its last health check passed and its last
//! delivery did not fail with a retryable error: the periodic check sees a
//! broker that went away while idle, the deliveries see one that fails
//! under load even though it still answers checks.

use std::sync::Arc;
use std::time::Duration;

use crate::pipeline::SinkState;
use crate::shutdown::Shutdown;
use crate::sources::Source;

/// Everything readiness depends on.
pub struct Health {
    /// The source; up while a Pull stream is open.
    pub source: Arc<dyn Source>,
    /// Every sink, the dead-letter sink included.
    pub sinks: Vec<Arc<SinkState>>,
}

impl Health {
    /// `Ok` when ready; otherwise every reason it is not, one per line.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.source.open_streams() == 0 {
            problems.push(format!("source: {}", self.source.down_reason()));
        }
        for s in &self.sinks {
            if let Some(p) = s.problem() {
                problems.push(format!("sink {}: {p}", s.sink.describe()));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Facts shown under the verdict that do not change it.
    pub fn notes(&self) -> Vec<String> {
        self.source.notes()
    }
}

/// Checks `state`'s sink every `interval` until shutdown; a check that
/// takes longer than the interval (at most 10 s) counts as failed.
pub async fn monitor(state: Arc<SinkState>, interval: Duration, mut shutdown: Shutdown) {
    let limit = interval.clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut was_up = None;
    loop {
        let error = match tokio::time::timeout(limit, state.sink.healthcheck()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("health check timed out after {limit:?}")),
        };
        state.checked(error.clone());
        let up = error.is_none();
        if was_up != Some(up) {
            match &error {
                None => tracing::info!(sink = state.sink.describe(), "sink healthy"),
                Some(e) => tracing::warn!(sink = state.sink.describe(), error = %e,
                    "sink not healthy; deliveries are retried and nothing is acknowledged meanwhile"),
            }
            was_up = Some(up);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait() => return,
        }
    }
}
