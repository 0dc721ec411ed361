//! Exponential backoff with jitter for every "try again later" in the
//! bridge: stream reconnects, resumed event fetches, sink retries.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// An endless sequence of growing, jittered delays, resettable after a
/// success so the next failure starts small again.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    current: ExponentialBackoff,
}

impl Backoff {
    /// Delays from `min` doubling up to `max`, with jitter, forever.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Backoff {
            current: builder.build(),
            builder,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        self.current.next().unwrap_or(Duration::from_secs(1))
    }

    /// Starts over from the smallest delay.
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_is_capped_never_ends_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(10) && first <= Duration::from_millis(20));
        let later: Vec<_> = (0..50).map(|_| b.next_delay()).collect();
        assert!(later.iter().all(|d| *d <= Duration::from_millis(160)));
        assert!(later.last().unwrap() >= &Duration::from_millis(80));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(20));
    }
}
