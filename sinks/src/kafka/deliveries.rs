//! Delivery reports routed to the batch their records came from, so a
//! send resolves once per batch and nothing is allocated per record.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::Notify;

/// A producer whose delivery reports are counted per batch.
pub(super) type KafkaProducer = ThreadedProducer<Deliveries>;

pub(super) fn create(config: &ClientConfig) -> Result<KafkaProducer, KafkaError> {
    config.create_with_context(Deliveries::default())
}

/// Routes each delivery report to the batch its record came from. Each
/// record's opaque is a sequence number, and the batches in flight (one
/// per lane) own consecutive ranges of them: nothing is allocated per
/// record and the sending task is woken once per batch. rdkafka's
/// `FutureProducer` allocates a channel per record and wakes for each.
#[derive(Default)]
pub(super) struct Deliveries {
    next: AtomicUsize,
    in_flight: Mutex<Vec<Arc<Batch>>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let Some(batch) = in_flight.iter().find(|b| seq.wrapping_sub(b.first) < b.len) else {
            // Its batch stopped waiting (the send was cancelled).
            return;
        };
        if let Err((e, _)) = result {
            batch
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((seq.wrapping_sub(batch.first), e.clone()));
        }
        if batch.reported.fetch_add(1, Ordering::SeqCst) + 1
            == batch.enqueued.load(Ordering::SeqCst)
        {
            batch.all_reported.notify_one();
        }
    }
}

impl Deliveries {
    /// A batch of `len` records, with sequence numbers of its own.
    pub(super) fn start(self: &Arc<Self>, len: usize) -> InFlight {
        let batch = Arc::new(Batch {
            first: self.next.fetch_add(len, Ordering::Relaxed),
            len,
            enqueued: AtomicUsize::new(usize::MAX),
            reported: AtomicUsize::new(0),
            failures: Mutex::new(Vec::new()),
            all_reported: Notify::new(),
        });
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(batch.clone());
        InFlight {
            deliveries: self.clone(),
            batch,
        }
    }
}

/// One `send` call's records in librdkafka's hands.
pub(super) struct Batch {
    /// The sequence number of its first record.
    first: usize,
    len: usize,
    /// How many were enqueued; unknown (`usize::MAX`) while enqueuing.
    enqueued: AtomicUsize,
    reported: AtomicUsize,
    /// Failed records: index in the batch and why.
    failures: Mutex<Vec<(usize, KafkaError)>>,
    all_reported: Notify,
}

/// A batch registered for its reports; unregistered when dropped, even if
/// the send is cancelled.
pub(super) struct InFlight {
    deliveries: Arc<Deliveries>,
    batch: Arc<Batch>,
}

impl InFlight {
    /// The opaque of the batch's record `index`.
    pub(super) fn seq(&self, index: usize) -> usize {
        self.batch.first.wrapping_add(index)
    }

    /// Waits until each of the first `enqueued` records is reported; the
    /// failed ones, in no particular order.
    pub(super) async fn reports(self, enqueued: usize) -> Vec<(usize, KafkaError)> {
        let b = &self.batch;
        b.enqueued.store(enqueued, Ordering::SeqCst);
        while b.reported.load(Ordering::SeqCst) != enqueued {
            b.all_reported.notified().await;
        }
        std::mem::take(&mut *b.failures.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut in_flight = self
            .deliveries
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        in_flight.retain(|b| !Arc::ptr_eq(b, &self.batch));
    }
}
