//! One scriptable sink instead of a hand-written one per test: each
//! misbehaviour is a builder call, and it records what it was offered and
//! what it confirmed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use evbridge::sinks::{BatchError, Envelope, Sink, SinkError};

type Reject = Box<dyn Fn(&Envelope, usize) -> bool + Send + Sync>;

/// A sink whose behaviour the test sets. In `send`, in this order: its
/// first `panic_first` calls panic; its first `slow_first` calls wait; the
/// first batch holding an envelope keyed `slow_key` waits once; a closed
/// gate waits for permits; its first `fail_first` calls fail retryably;
/// an envelope `reject` picks is refused for good (those before it
/// confirmed); past `confirm_at_most` envelopes it fails retryably; the
/// rest is passed to `inner` (if any) and confirmed.
pub struct FakeSink {
    name: String,
    inner: Option<Arc<dyn Sink>>,
    panic_first: usize,
    slow_first: (usize, Duration),
    slow_key: Option<(String, Duration)>,
    gate: Option<tokio::sync::Semaphore>,
    fail_first: usize,
    reject: Option<Reject>,
    confirm_at_most: Option<usize>,
    calls: AtomicUsize,
    slept: AtomicBool,
    offered: Mutex<Vec<String>>,
    confirmed: Mutex<Vec<String>>,
    largest_batch: AtomicUsize,
    handles: Mutex<Vec<Weak<Envelope>>>,
}

impl std::fmt::Debug for FakeSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeSink")
            .field("name", &self.name)
            .finish()
    }
}

impl FakeSink {
    /// Confirms everything, keeping nothing but its records.
    pub fn new(name: &str) -> Self {
        FakeSink {
            name: name.into(),
            inner: None,
            panic_first: 0,
            slow_first: (0, Duration::ZERO),
            slow_key: None,
            gate: None,
            fail_first: 0,
            reject: None,
            confirm_at_most: None,
            calls: AtomicUsize::new(0),
            slept: AtomicBool::new(false),
            offered: Mutex::default(),
            confirmed: Mutex::default(),
            largest_batch: AtomicUsize::new(0),
            handles: Mutex::default(),
        }
    }

    /// Passes what it confirms on to `inner` (a capture, a real sink).
    pub fn forward_to(mut self, inner: Arc<dyn Sink>) -> Self {
        self.inner = Some(inner);
        self
    }

    /// Its first `n` calls panic (a bug in a sink).
    pub fn panic_first(mut self, n: usize) -> Self {
        self.panic_first = n;
        self
    }

    /// Its first `n` calls wait `delay` first (a congested broker).
    pub fn slow_first(mut self, n: usize, delay: Duration) -> Self {
        self.slow_first = (n, delay);
        self
    }

    /// The first batch holding an envelope keyed `key` waits `delay`.
    pub fn slow_once_for_key(mut self, key: &str, delay: Duration) -> Self {
        self.slow_key = Some((key.into(), delay));
        self
    }

    /// Every call waits for a permit of [`FakeSink::open`] (one per call).
    pub fn closed(mut self) -> Self {
        self.gate = Some(tokio::sync::Semaphore::new(0));
        self
    }

    /// Its first `n` calls fail, retryably, with nothing confirmed.
    pub fn fail_first(mut self, n: usize) -> Self {
        self.fail_first = n;
        self
    }

    /// Refuses for good every envelope `pick(envelope, nth offered)` picks.
    pub fn reject(
        mut self,
        pick: impl Fn(&Envelope, usize) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.reject = Some(Box::new(pick));
        self
    }

    /// Refuses for good every envelope named `name`.
    pub fn reject_name(self, name: &'static str) -> Self {
        self.reject(move |e, _| e.name == name)
    }

    /// Confirms `n` envelopes, then fails retryably for ever (a stalled
    /// broker).
    pub fn confirm_at_most(mut self, n: usize) -> Self {
        self.confirm_at_most = Some(n);
        self
    }

    /// Lets `calls` more calls through a [`FakeSink::closed`] gate.
    pub fn open(&self, calls: usize) {
        self.gate
            .as_ref()
            .expect("a closed sink")
            .add_permits(calls);
    }

    /// Ids of every envelope it was offered, in order, repeats included.
    pub fn offered(&self) -> Vec<String> {
        self.offered.lock().unwrap().clone()
    }

    /// Ids of every envelope it confirmed, in order.
    pub fn confirmed(&self) -> Vec<String> {
        self.confirmed.lock().unwrap().clone()
    }

    /// Calls of `send` so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The largest batch it was sent.
    pub fn largest_batch(&self) -> usize {
        self.largest_batch.load(Ordering::SeqCst)
    }

    /// Envelopes it was sent that are still allocated somewhere.
    pub fn alive(&self) -> usize {
        let handles = self.handles.lock().unwrap();
        handles.iter().filter(|w| w.strong_count() > 0).count()
    }

    async fn confirm(&self, batch: &[Arc<Envelope>]) -> Result<(), BatchError> {
        if let Some(inner) = &self.inner {
            inner.send(batch).await?;
        }
        let mut confirmed = self.confirmed.lock().unwrap();
        confirmed.extend(batch.iter().map(|e| e.id.to_string()));
        Ok(())
    }
}

#[async_trait::async_trait]
impl Sink for FakeSink {
    fn describe(&self) -> &str {
        &self.name
    }

    async fn send(&self, batch: &[Arc<Envelope>]) -> Result<(), BatchError> {
        let first_offered = {
            let mut offered = self.offered.lock().unwrap();
            let at = offered.len();
            offered.extend(batch.iter().map(|e| e.id.to_string()));
            at
        };
        self.handles
            .lock()
            .unwrap()
            .extend(batch.iter().map(Arc::downgrade));
        self.largest_batch.fetch_max(batch.len(), Ordering::SeqCst);
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call < self.panic_first {
            panic!("a bug in the sink");
        }
        if call < self.slow_first.0 {
            tokio::time::sleep(self.slow_first.1).await;
        }
        if let Some((key, delay)) = &self.slow_key
            && batch.iter().any(|e| e.key == key.as_str())
            && !self.slept.swap(true, Ordering::SeqCst)
        {
            tokio::time::sleep(*delay).await;
        }
        let _permit = match &self.gate {
            Some(gate) => Some(gate.acquire().await.unwrap()),
            None => None,
        };
        if call < self.fail_first {
            return Err(BatchError::all(SinkError::Retryable("broker away".into())));
        }
        if let Some(pick) = &self.reject
            && let Some(at) = batch
                .iter()
                .enumerate()
                .position(|(i, e)| pick(e, first_offered + i))
        {
            self.confirm(&batch[..at]).await?;
            return Err(BatchError::new(
                at,
                SinkError::Permanent("message too large (refused by the script)".into()),
            ));
        }
        if let Some(most) = self.confirm_at_most {
            let room = most
                .saturating_sub(self.confirmed.lock().unwrap().len())
                .min(batch.len());
            if room < batch.len() {
                self.confirm(&batch[..room]).await?;
                return Err(BatchError::new(
                    room,
                    SinkError::Retryable("stalled".into()),
                ));
            }
        }
        self.confirm(batch).await
    }
}
