//! `blackhole://` and `none://`: confirm everything at once and count it,
//! so load tests measure the bridge itself and not a destination.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use url::Url;

use crate::{BatchError, Envelope, OpenError, Options, Sink};

/// Discards envelopes; optionally prints a rate line every `interval`,
/// and optionally confirms at most `rate` envelopes per second (a slow
/// destination, to load-test back-pressure and memory bounds).
#[derive(Debug)]
pub struct Blackhole {
    count: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    shown: String,
    reporter: Option<tokio::task::JoinHandle<()>>,
    /// Seconds per envelope when throttled.
    pace: Option<f64>,
    /// When the throttle is free again: sends on every lane share it, so
    /// `rate` holds for the sink as a whole.
    free_at: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Blackhole {
    /// A silent blackhole.
    pub fn new() -> Self {
        Blackhole {
            count: Arc::default(),
            bytes: Arc::default(),
            shown: "blackhole://".into(),
            reporter: None,
            pace: None,
            free_at: std::sync::Mutex::new(None),
        }
    }

    /// Envelopes discarded so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn report_every(&mut self, interval: Duration) {
        let count = self.count.clone();
        let bytes = self.bytes.clone();
        self.reporter = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            let (mut last_n, mut last_b) = (0, 0);
            loop {
                tick.tick().await;
                let (n, b) = (count.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed));
                let secs = interval.as_secs_f64();
                eprintln!(
                    "blackhole: {n} envelopes, {:.0}/s, {:.1} MiB/s over the last {secs}s",
                    (n - last_n) as f64 / secs,
                    (b - last_b) as f64 / secs / 1048576.0,
                );
                (last_n, last_b) = (n, b);
            }
        }));
    }
}

impl Default for Blackhole {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        if let Some(r) = self.reporter.take() {
            r.abort();
        }
    }
}

/// The slowest and fastest `rate=` (envelopes per second).
const MIN_RATE: f64 = 0.001;
const MAX_RATE: f64 = 1e12;

/// Options a `blackhole://` URL takes.
pub(crate) const OPTIONS: &[&str] = &["interval", "rate"];

/// Parses `blackhole://[?interval=SECONDS&rate=PER_SECOND]` (also `none://`); must be
/// called inside a tokio runtime when `interval` is set.
pub(crate) fn open(url: &Url) -> Result<Blackhole, OpenError> {
    let mut opts = Options::new(url)?;
    if url.host_str().is_some_and(|h| !h.is_empty()) || !matches!(url.path(), "" | "/") {
        return Err(opts.invalid(format!(
            "{0}:// takes no host or path; accepted form: {0}://[?interval=SECONDS&rate=PER_SECOND]",
            url.scheme()
        )));
    }
    let interval = opts.seconds("interval")?;
    let rate: Option<f64> = opts.parse("rate", "envelopes per second")?;
    if let Some(r) = rate.filter(|r| !(MIN_RATE..=MAX_RATE).contains(r)) {
        return Err(opts.invalid(format!(
            "option `rate={r}` must be a number of envelopes per second from {MIN_RATE} to {MAX_RATE}"
        )));
    }
    let mut hole = Blackhole::new();
    hole.shown = opts.shown_url().to_string();
    hole.pace = rate.map(|r| 1.0 / r);
    opts.finish(OPTIONS)?;
    if let Some(every) = interval {
        hole.report_every(every);
    }
    Ok(hole)
}

#[async_trait]
impl Sink for Blackhole {
    fn describe(&self) -> &str {
        &self.shown
    }

    async fn send(&self, batch: &[Arc<Envelope>]) -> Result<(), BatchError> {
        if let Some(pace) = self.pace {
            let done = {
                let mut free_at = self.free_at.lock().unwrap_or_else(|p| p.into_inner());
                let now = tokio::time::Instant::now();
                let start = free_at.filter(|t| *t > now).unwrap_or(now);
                let wait = Duration::try_from_secs_f64(pace * batch.len() as f64)
                    .unwrap_or(crate::MAX_DURATION);
                let done = start + wait.min(crate::MAX_DURATION);
                *free_at = Some(done);
                done
            };
            tokio::time::sleep_until(done).await;
        }
        let bytes: usize = batch.iter().map(|e| e.json().len()).sum();
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.count.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_envelope;

    #[tokio::test]
    async fn counts_everything() {
        let hole = Blackhole::new();
        let batch: Vec<_> = (0..5)
            .map(|i| Arc::new(test_envelope(&i.to_string())))
            .collect();
        hole.send(&batch).await.unwrap();
        hole.send(&batch[..2]).await.unwrap();
        assert_eq!(hole.count(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_throttles_confirmations() {
        let hole = open(&Url::parse("blackhole://?rate=100").unwrap()).unwrap();
        let batch: Vec<_> = (0..50)
            .map(|i| Arc::new(test_envelope(&i.to_string())))
            .collect();
        let start = tokio::time::Instant::now();
        hole.send(&batch).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        for bad in ["blackhole://?rate=0", "blackhole://?rate=x"] {
            let e = open(&Url::parse(bad).unwrap()).unwrap_err().to_string();
            assert!(e.contains("rate"), "{e}");
        }
    }
}
