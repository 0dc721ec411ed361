//! The simulator's notification queue: EngFlow's delivery semantics
//! (ack window, redelivery with the same id and a new token, readers
//! sharing one queue, per-reader cap) over an in-memory list.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::pb::nq;

/// Why an acknowledgement was not accepted; becomes the receipt status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// Acknowledged: the notification is gone for good.
    Ok,
    /// The window had passed; the notification is (or will be) redelivered.
    Late,
    /// Not a token this stream holds (another stream's, or made up).
    Unknown,
}

/// Counters of what the queue did; part of the simulator's report.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct QueueStats {
    /// Notifications made visible so far.
    pub released: usize,
    /// Deliveries, first and repeated.
    pub delivered: u64,
    /// Deliveries of a notification that had been delivered before.
    pub redelivered: u64,
    /// Notifications acknowledged (each counted once).
    pub acked: usize,
    /// Acknowledgements that came after the window.
    pub late_acks: u64,
    /// Acknowledgements with a token the stream did not hold.
    pub unknown_acks: u64,
    /// Microseconds from the first delivery to the latest first
    /// acknowledgement of a notification: the bridge's working time, without
    /// process start or exit (what throughput benchmarks divide by).
    pub delivery_us: Option<u64>,
}

struct Delivery {
    index: usize,
    stream: u64,
    deadline: Instant,
}

struct State {
    notifications: Vec<Arc<nq::Notification>>,
    acked: Vec<bool>,
    delivered_before: Vec<bool>,
    visible: VecDeque<usize>,
    /// Current deliveries by token.
    live: HashMap<String, Delivery>,
    /// Tokens whose window passed (or whose stream ended), for receipts.
    expired: HashMap<String, u64>,
    in_flight: HashMap<u64, usize>,
    next_token: u64,
    stats: QueueStats,
    first_delivery: Option<Instant>,
    last_first_ack: Option<Instant>,
}

/// A queue shared by every reader of the simulator.
pub struct Queue {
    state: Mutex<State>,
    /// Woken whenever notifications become visible.
    pub changed: Notify,
}

impl Queue {
    /// A queue holding `notifications`, none visible yet.
    pub fn new(notifications: Vec<nq::Notification>) -> Self {
        let n = notifications.len();
        Queue {
            state: Mutex::new(State {
                notifications: notifications.into_iter().map(Arc::new).collect(),
                acked: vec![false; n],
                delivered_before: vec![false; n],
                visible: VecDeque::new(),
                live: HashMap::new(),
                expired: HashMap::new(),
                in_flight: HashMap::new(),
                next_token: 0,
                stats: QueueStats::default(),
                first_delivery: None,
                last_first_ack: None,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes up to `n` more notifications visible; returns how many are
    /// released in all.
    pub fn release(&self, n: usize) -> usize {
        let mut s = self.lock();
        let from = s.stats.released;
        let to = from.saturating_add(n).min(s.notifications.len());
        s.visible.extend(from..to);
        s.stats.released = to;
        drop(s);
        self.changed.notify_waiters();
        to
    }

    /// Total notifications, released or not.
    pub fn len(&self) -> usize {
        self.lock().notifications.len()
    }

    /// True when the queue holds no notifications at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Delivers the next visible notification to `stream`, unless it
    /// already holds `cap` unacknowledged ones.
    pub fn take(
        &self,
        stream: u64,
        window: Duration,
        cap: usize,
    ) -> Option<(String, Arc<nq::Notification>)> {
        let mut s = self.lock();
        if s.in_flight.get(&stream).copied().unwrap_or(0) >= cap {
            return None;
        }
        let index = loop {
            let i = s.visible.pop_front()?;
            if !s.acked[i] {
                break i;
            }
        };
        s.next_token += 1;
        let token = format!("ack-{stream}-{}-{index}", s.next_token);
        s.live.insert(
            token.clone(),
            Delivery {
                index,
                stream,
                deadline: Instant::now() + window,
            },
        );
        *s.in_flight.entry(stream).or_default() += 1;
        s.first_delivery.get_or_insert_with(Instant::now);
        s.stats.delivered += 1;
        if s.delivered_before[index] {
            s.stats.redelivered += 1;
        }
        s.delivered_before[index] = true;
        Some((token, s.notifications[index].clone()))
    }

    /// Acknowledges `token` on `stream`.
    pub fn ack(&self, stream: u64, token: &str) -> AckOutcome {
        let mut s = self.lock();
        match s.live.get(token) {
            Some(d) if d.stream == stream => {
                let d = s.live.remove(token).expect("present");
                if let Some(c) = s.in_flight.get_mut(&stream) {
                    *c -= 1;
                }
                if Instant::now() > d.deadline {
                    // Past the window but not yet swept: it comes again.
                    s.stats.late_acks += 1;
                    s.visible.push_front(d.index);
                    drop(s);
                    self.changed.notify_waiters();
                    return AckOutcome::Late;
                }
                if !s.acked[d.index] {
                    s.acked[d.index] = true;
                    s.stats.acked += 1;
                    s.last_first_ack = Some(Instant::now());
                }
                AckOutcome::Ok
            }
            Some(_) => {
                s.stats.unknown_acks += 1;
                AckOutcome::Unknown
            }
            None if s.expired.get(token) == Some(&stream) => {
                s.stats.late_acks += 1;
                AckOutcome::Late
            }
            None => {
                s.stats.unknown_acks += 1;
                AckOutcome::Unknown
            }
        }
    }

    /// Makes every delivery whose window passed visible again.
    pub fn expire(&self) {
        let now = Instant::now();
        self.requeue(|d| d.deadline <= now);
    }

    /// A stream ended: its tokens are worthless, its notifications come again.
    pub fn stream_closed(&self, stream: u64) {
        self.requeue(|d| d.stream == stream);
        self.lock().in_flight.remove(&stream);
    }

    fn requeue(&self, pred: impl Fn(&Delivery) -> bool) {
        let mut s = self.lock();
        let gone: Vec<String> = s
            .live
            .iter()
            .filter(|(_, d)| pred(d))
            .map(|(t, _)| t.clone())
            .collect();
        if gone.is_empty() {
            return;
        }
        let mut indices = Vec::with_capacity(gone.len());
        for token in gone {
            let d = s.live.remove(&token).expect("present");
            if let Some(c) = s.in_flight.get_mut(&d.stream) {
                *c = c.saturating_sub(1);
            }
            s.expired.insert(token, d.stream);
            indices.push(d.index);
        }
        // Oldest first, ahead of everything not yet delivered.
        indices.sort_unstable();
        for i in indices.into_iter().rev() {
            s.visible.push_front(i);
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// Counters so far.
    pub fn stats(&self) -> QueueStats {
        let s = self.lock();
        let delivery = s.last_first_ack.zip(s.first_delivery).map(|(a, d)| a - d);
        QueueStats {
            delivery_us: delivery.map(|d| d.as_micros() as u64),
            ..s.stats.clone()
        }
    }

    /// Ids of the notifications acknowledged so far.
    pub fn acked_ids(&self) -> Vec<String> {
        let s = self.lock();
        s.acked
            .iter()
            .enumerate()
            .filter(|(_, a)| **a)
            .map(|(i, _)| s.notifications[i].id.clone())
            .collect()
    }

    /// True once every notification was released and acknowledged.
    pub fn all_acked(&self) -> bool {
        let s = self.lock();
        s.stats.acked == s.notifications.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(n: usize) -> Queue {
        let q = Queue::new(
            (0..n)
                .map(|i| nq::Notification {
                    id: format!("n{i}"),
                    ..Default::default()
                })
                .collect(),
        );
        q.release(n);
        q
    }

    const W: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn unacked_comes_back_after_window_with_new_token() {
        let q = queue(1);
        let (t1, n1) = q.take(1, W, 10).unwrap();
        assert!(q.take(1, W, 10).is_none(), "invisible during the window");
        tokio::time::advance(Duration::from_secs(61)).await;
        q.expire();
        let (t2, n2) = q.take(2, W, 10).unwrap();
        assert_eq!(n1.id, n2.id);
        assert_ne!(t1, t2);
        assert_eq!(q.ack(1, &t1), AckOutcome::Late);
        assert_eq!(q.ack(2, &t2), AckOutcome::Ok);
        assert!(q.all_acked());
        let s = q.stats();
        assert_eq!((s.delivered, s.redelivered, s.late_acks), (2, 1, 1));
    }

    #[tokio::test]
    async fn tokens_belong_to_their_stream_and_closing_requeues() {
        let q = queue(2);
        let (t1, _) = q.take(1, W, 10).unwrap();
        assert_eq!(q.ack(2, &t1), AckOutcome::Unknown);
        q.stream_closed(1);
        assert_eq!(q.ack(1, &t1), AckOutcome::Late);
        let (t, n) = q.take(2, W, 10).unwrap();
        assert_eq!(n.id, "n0", "requeued ahead of the rest");
        assert_eq!(q.ack(2, &t), AckOutcome::Ok);
        assert_eq!(q.ack(2, &t), AckOutcome::Unknown, "a token acks once");
    }

    #[tokio::test]
    async fn readers_share_and_cap_applies() {
        let q = queue(3);
        let a = q.take(1, W, 1).unwrap();
        assert!(q.take(1, W, 1).is_none(), "cap of one");
        let b = q.take(2, W, 5).unwrap();
        assert_ne!(a.1.id, b.1.id, "each goes to one reader");
        assert_eq!(q.ack(1, &a.0), AckOutcome::Ok);
        assert!(q.take(1, W, 1).is_some());
    }
}
