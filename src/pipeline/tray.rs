//! The tray of spent envelopes: freed by the thread that made them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use evbridge_sinks::Envelope;

/// Workers' references to envelopes their sink is done with, waiting to
/// be dropped by the thread that submits; with one sink (the common case)
/// dropping them frees the envelopes. That thread most likely allocated
/// them (a source normalizes and submits in one task), and mimalloc frees
/// a block from another thread at several times the cost (BENCHMARKS.md,
/// "The spent-envelope tray"). Only worth it with mimalloc as the
/// allocator: without the `mimalloc` feature the tray holds nothing.
/// At most `limit` references (two batches) and `byte_limit` bytes wait
/// here (so besides the envelopes in flight, at most that many more of at
/// most a quarter of `max_in_flight_bytes`, plus the batch each worker is
/// settling, are alive); past that, and whenever its lane is
/// empty (the source is idle, or not keeping up and so has CPU to spare),
/// a worker drops them itself.
pub(super) struct Spent {
    /// Batches handed over, and their bytes.
    pub(super) tray: Mutex<(Vec<Vec<Arc<Envelope>>>, usize)>,
    /// How many references they hold: written under the lock, read without
    /// it on every submit.
    pub(super) held: AtomicUsize,
    pub(super) limit: usize,
    pub(super) byte_limit: usize,
}

impl Spent {
    pub(super) fn new(limit: usize, byte_limit: usize) -> Self {
        Spent {
            tray: Mutex::new((Vec::new(), 0)),
            held: AtomicUsize::new(0),
            limit,
            byte_limit,
        }
    }

    pub(super) fn tray(&self) -> std::sync::MutexGuard<'_, (Vec<Vec<Arc<Envelope>>>, usize)> {
        self.tray.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `batch` (leaving it empty, with room for as many), or frees it
    /// here when the tray is full (by count or by bytes).
    pub(super) fn put(&self, batch: &mut Vec<Arc<Envelope>>) {
        let n = batch.len();
        let bytes: usize = batch.iter().map(|e| e.json().len()).sum();
        let mut tray = self.tray();
        let held = self.held.load(Ordering::Relaxed);
        if n == 0 || held + n > self.limit || tray.1 + bytes > self.byte_limit {
            drop(tray);
            batch.clear();
            return;
        }
        tray.0.push(std::mem::replace(
            batch,
            Vec::with_capacity(batch.capacity()),
        ));
        tray.1 += bytes;
        self.held.store(held + n, Ordering::Relaxed);
    }

    /// Frees everything handed over so far.
    pub(super) fn free(&self) {
        if self.held.load(Ordering::Relaxed) == 0 {
            return;
        }
        let batches = {
            let mut tray = self.tray();
            self.held.store(0, Ordering::Relaxed);
            tray.1 = 0;
            std::mem::take(&mut tray.0)
        };
        drop(batches);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize) -> Vec<Arc<Envelope>> {
        crate::sim::world::sample_envelopes(n)
            .into_iter()
            .map(Arc::new)
            .collect()
    }

    #[test]
    fn the_tray_holds_at_most_its_limit_and_frees_the_rest_in_place() {
        let spent = Spent::new(10, usize::MAX);
        let (mut first, mut second) = (batch(6), batch(6));
        let watch: Vec<_> = first.iter().chain(&second).map(Arc::downgrade).collect();
        spent.put(&mut first);
        assert!(
            first.is_empty() && first.capacity() >= 6,
            "taken, room left"
        );
        spent.put(&mut second);
        assert!(second.is_empty(), "freed in place");
        let alive =
            |w: &[std::sync::Weak<Envelope>]| w.iter().filter(|w| w.strong_count() > 0).count();
        assert_eq!(alive(&watch[..6]), 6, "the first waits in the tray");
        assert_eq!(alive(&watch[6..]), 0, "6 more would pass the limit of 10");
        spent.free();
        assert_eq!(alive(&watch), 0);
        assert_eq!(spent.held.load(Ordering::Relaxed), 0);
    }
}
