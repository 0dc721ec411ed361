//! A worker's queue.

use std::sync::Mutex;

use tokio::sync::Notify;

use super::tracker::Item;

/// One worker's queue, in arrival order: a locked vector the worker
/// empties a batch at a time. tokio's channel counted every message on a
/// line that both sides write (BENCHMARKS.md, "What bounds each figure").
#[derive(Default)]
pub(super) struct Lane {
    pub(super) queue: Mutex<Queue>,
    pub(super) ready: Notify,
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) items: Vec<Item>,
    pub(super) closed: bool,
}

impl Lane {
    pub(super) fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After shutdown the item is dropped: its envelope stays unconfirmed
    /// and its notification unacknowledged.
    pub(super) fn push(&self, item: Item) {
        let mut queue = self.queue();
        if queue.closed {
            return;
        }
        let was_empty = queue.items.is_empty();
        queue.items.push(item);
        drop(queue);
        if was_empty {
            self.ready.notify_one();
        }
    }

    pub(super) fn close(&self) {
        self.queue().closed = true;
        self.ready.notify_one();
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue().items.is_empty()
    }

    /// Moves up to `max` items into `out` (empty), waiting for one; false
    /// once the lane is closed and drained.
    pub(super) async fn take(&self, out: &mut Vec<Item>, max: usize) -> bool {
        loop {
            {
                let mut queue = self.queue();
                let n = queue.items.len();
                if n > max {
                    out.extend(queue.items.drain(..max));
                    return true;
                }
                if n > 0 {
                    std::mem::swap(&mut queue.items, out);
                    return true;
                }
                if queue.closed {
                    return false;
                }
            }
            self.ready.notified().await;
        }
    }
}
