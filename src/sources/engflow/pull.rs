//! Pull streams on the notification queue: one long-lived stream per
//! reader, reconnected with backoff; each notification handed to a task of
//! its own, its acknowledgement sent on the stream that delivered it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Code;
use tracing::{debug, info, warn};

use super::connect::is_fatal;
use super::{EngFlowSource, Latest};
use crate::pb::nq;
use crate::pipeline::Slot;
use crate::retry::Backoff;
use crate::shutdown::Shutdown;
use crate::sources::SourceError;

impl EngFlowSource {
    pub(super) async fn reader(self: Arc<Self>, mut shutdown: Shutdown) -> Result<(), SourceError> {
        let client_id = format!("evbridge/{}", uuid::Uuid::new_v4());
        let mut backoff = Backoff::default();
        let mut ever_connected = false;
        let mut first = true;
        loop {
            if shutdown.is_shutdown() {
                return Ok(());
            }
            if !std::mem::take(&mut first) {
                self.meters.reconnects.increment(1);
            }
            // Unbounded: acknowledgements (one per notification received,
            // so bounded by what was delivered) must never block the loop
            // that reads deliveries, or a server that reads acks only
            // between its sends would deadlock with us.
            let (req_tx, req_rx) = mpsc::unbounded_channel();
            let first = nq::PullNotificationRequest {
                queue: Some(nq::QueueId {
                    name: self.cfg.queue.clone(),
                }),
                client: Some(client_id.clone()),
                notification_delivery_options: Some(nq::NotificationDeliveryOptions {
                    acknowledgement_deadline: Some(prost_types::Duration {
                        seconds: self.cfg.ack_deadline.as_secs() as i64,
                        nanos: 0,
                    }),
                }),
                acknowledgement_tokens: vec![],
            };
            req_tx.send(first).expect("receiver alive");
            let mut client = self.queue.clone();
            let opened = tokio::select! {
                r = client.pull(UnboundedReceiverStream::new(req_rx)) => r,
                _ = shutdown.wait() => return Ok(()),
            };
            let inbound = match opened {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    if is_fatal(status.code()) && !ever_connected {
                        return Err(SourceError::Fatal(format!(
                            "the notification queue refused the stream: {:?}: {} (queue `{}`, source {})",
                            status.code(),
                            status.message(),
                            self.cfg.queue,
                            evbridge_sinks::redact(&self.cfg.endpoint),
                        )));
                    }
                    let delay = backoff.next_delay();
                    warn!(code = ?status.code(), error = status.message(), "opening Pull stream failed; retrying in {delay:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = shutdown.wait() => return Ok(()),
                    }
                }
            };
            ever_connected = true;
            self.stats.streams.fetch_add(1, Ordering::Relaxed);
            debug!(client = %client_id, "Pull stream open");
            self.stats.open_streams.fetch_add(1, Ordering::AcqRel);
            let ended = self.session(inbound, req_tx, shutdown.clone()).await;
            self.stats.open_streams.fetch_sub(1, Ordering::AcqRel);
            match ended {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Healthy(reason) => {
                    backoff.reset();
                    info!("Pull stream ended ({reason}); reconnecting");
                }
                SessionEnd::Broken(reason, productive) => {
                    // A stream that did work proves the server is healthy:
                    // start the backoff over instead of growing it.
                    if productive {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    warn!("Pull stream broke ({reason}); reconnecting in {delay:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.wait() => return Ok(()),
                    }
                }
            }
        }
    }

    /// Serves one Pull stream until it ends or shutdown has drained it.
    async fn session(
        self: &Arc<Self>,
        mut inbound: tonic::Streaming<nq::PullNotificationResponse>,
        req_tx: mpsc::UnboundedSender<nq::PullNotificationRequest>,
        mut shutdown: Shutdown,
    ) -> SessionEnd {
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<String>();
        let mut tasks = JoinSet::new();
        // Token → notification id, to name notifications in receipt logs.
        let mut pending: HashMap<String, String> = HashMap::new();
        // Room for one more notification (held until it is done) and for
        // its first envelope, reserved before reading the next one.
        let mut slot: Option<(OwnedSemaphorePermit, Slot)> = None;
        let mut drain_until: Option<tokio::time::Instant> = None;
        let mut delivered_any = false;
        let mut tokens = Vec::new();

        let end = loop {
            if drain_until.is_some() && tasks.is_empty() && ack_rx.is_empty() {
                break SessionEnd::Shutdown;
            }
            tokio::select! {
                biased;
                n = ack_rx.recv_many(&mut tokens, self.cfg.ack_batch) => {
                    debug_assert!(n > 0, "the session holds a sender");
                    let req = nq::PullNotificationRequest {
                        acknowledgement_tokens: std::mem::take(&mut tokens),
                        ..Default::default()
                    };
                    self.stats.acks_sent.fetch_add(n as u64, Ordering::Relaxed);
                    self.meters.acked.increment(n as u64);
                    if req_tx.send(req).is_err() {
                        break SessionEnd::Broken("request stream closed".into(), delivered_any);
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                s = self.reserve(), if slot.is_none() && drain_until.is_none() => slot = Some(s),
                msg = inbound.message(), if slot.is_some() && drain_until.is_none() => match msg {
                    Ok(Some(resp)) => {
                        for r in resp.acknowledgement_receipt {
                            let id = pending.remove(&r.token).unwrap_or_else(|| "?".into());
                            let status = r.status.unwrap_or_default();
                            if status.code != 0 {
                                self.stats.receipts_failed.fetch_add(1, Ordering::Relaxed);
                                self.meters.receipts_failed.increment(1);
                                warn!(notification = %id, code = ?Code::from(status.code), error = %status.message,
                                    "acknowledgement not accepted; the notification will come again");
                            }
                        }
                        if let Some(an) = resp.notification {
                            let Some(n) = an.notification else {
                                warn!("a delivery without a notification; ignored");
                                continue;
                            };
                            delivered_any = true;
                            self.stats.received.fetch_add(1, Ordering::Relaxed);
                            self.meters.received.increment(1);
                            if self.seen.lock().unwrap_or_else(|p| p.into_inner()).again(&n.id) {
                                self.meters.redelivered.increment(1);
                            }
                            pending.insert(an.token.clone(), n.id.clone());
                            if self.given_up.lock().unwrap_or_else(|p| p.into_inner()).contains(&n.id) {
                                info!(notification = %n.id, "given up before; acknowledged again");
                                let _ = ack_tx.send(an.token);
                                continue;
                            }
                            let latest = Latest { token: an.token, ack: ack_tx.clone() };
                            // A redelivery of one still in progress: its task
                            // takes the new token (the old one expires with
                            // the window), and no second fetch starts.
                            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some(l) = running.get(&n.id) {
                                *l.lock().unwrap_or_else(|p| p.into_inner()) = latest;
                                drop(running);
                                self.meters.handed_over.increment(1);
                                continue;
                            }
                            let latest = Arc::new(Mutex::new(latest));
                            running.insert(n.id.clone(), latest.clone());
                            drop(running);
                            let (permit, slot) = slot.take().expect("guarded");
                            let task = self.clone().handle(n, latest, slot, shutdown.clone());
                            self.stats.in_progress.fetch_add(1, Ordering::AcqRel);
                            // Counted down however the task ends, aborted
                            // before it ran included.
                            let done = InProgress(self.clone());
                            tasks.spawn(async move {
                                let _done = done;
                                task.await;
                                drop(permit);
                            });
                        }
                    }
                    // A stream that ended after doing work is normal server
                    // behaviour; one that ends at once should not spin.
                    Ok(None) if delivered_any => break SessionEnd::Healthy("server ended the stream".into()),
                    Ok(None) => break SessionEnd::Broken("server ended the stream at once".into(), false),
                    Err(status) => break SessionEnd::Broken(format!("{:?}: {}", status.code(), status.message()), delivered_any),
                },
                _ = shutdown.wait(), if drain_until.is_none() => {
                    let grace = self.cfg.shutdown_grace;
                    info!(in_flight = tasks.len(), "shutting down: no new notifications; draining for up to {grace:?}");
                    drain_until = Some(tokio::time::Instant::now() + grace);
                }
                _ = tokio::time::sleep_until(drain_until.unwrap_or_else(tokio::time::Instant::now)), if drain_until.is_some() => {
                    warn!(abandoned = tasks.len(), "shutdown grace elapsed; unacknowledged notifications will be redelivered");
                    break SessionEnd::Shutdown;
                }
            }
        };
        if matches!(end, SessionEnd::Shutdown) {
            tasks.abort_all();
            // Half-close our side and wait (briefly) for the server to end
            // the stream, so the acknowledgements sent last are processed
            // rather than cancelled with the call.
            drop(req_tx);
            let closing = async {
                while let Ok(Some(resp)) = inbound.message().await {
                    for r in resp.acknowledgement_receipt {
                        if r.status.is_some_and(|s| s.code != 0) {
                            self.stats.receipts_failed.fetch_add(1, Ordering::Relaxed);
                            self.meters.receipts_failed.increment(1);
                            let id = pending.get(&r.token).map_or("?", String::as_str);
                            warn!(notification = %id, "acknowledgement not accepted at shutdown; it will come again");
                        }
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), closing)
                .await
                .is_err()
            {
                warn!("the server did not end the Pull stream within 5s of our half-close");
            }
        } else {
            // Tasks of a broken stream finish delivering; their tokens are
            // worthless now and the server delivers those notifications
            // again.
            tasks.detach_all();
        }
        end
    }

    /// Waits for room for one more notification and its first envelope.
    async fn reserve(&self) -> (OwnedSemaphorePermit, Slot) {
        let permit = self
            .in_progress
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        (permit, self.pipeline.reserve().await)
    }
}

/// Counts a notification task out when it ends, however it ends.
struct InProgress(Arc<EngFlowSource>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.stats.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

enum SessionEnd {
    Shutdown,
    /// Ended cleanly by the server: reconnect at once.
    Healthy(String),
    /// Broke with an error: reconnect after backoff (reset first when the
    /// stream had delivered something).
    Broken(String, bool),
}
