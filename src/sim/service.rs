//! The simulator's gRPC services: the notification queue's `Pull` and
//! the event store's `GetInvocation`/`GetBuild`, over plain TCP or TLS.

use super::*;

/// Serves the simulator on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    sim: Arc<Sim>,
    tls: Option<ServerTlsConfig>,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    tokio::spawn(sim.clone().release_loop(shutdown.clone()));
    tokio::spawn(sim.clone().expiry_loop(shutdown.clone()));
    let window = sim.cfg.http2_window;
    let svc = Service {
        sim,
        shutdown: shutdown.clone(),
    };
    let mut builder = Server::builder().initial_stream_window_size(window);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let mut stop = shutdown;
    builder
        .add_service(nq::notification_queue_server::NotificationQueueServer::new(
            svc.clone(),
        ))
        .add_service(EventStoreServer(svc))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            stop.wait().await
        })
        .await
}

#[derive(Clone)]
pub(super) struct Service {
    sim: Arc<Sim>,
    shutdown: Shutdown,
}

/// A response stream of the simulator's services.
pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// True for `((segment)/)*<uuid>` with lowercase segments, ≤ 128 chars.
pub(super) fn valid_client(client: &str) -> bool {
    let mut parts: Vec<&str> = client.split('/').collect();
    let Some(last) = parts.pop() else {
        return false;
    };
    let segment_ok = |s: &str| {
        s.starts_with(|c: char| c.is_ascii_lowercase())
            && !s.ends_with('-')
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    client.len() <= 128
        && uuid::Uuid::try_parse(last).is_ok_and(|u| u.hyphenated().to_string() == last)
        && parts.into_iter().all(segment_ok)
}

#[tonic::async_trait]
impl nq::notification_queue_server::NotificationQueue for Service {
    type PullStream = BoxStream<nq::PullNotificationResponse>;

    async fn pull(
        &self,
        req: Request<Streaming<nq::PullNotificationRequest>>,
    ) -> Result<Response<Self::PullStream>, Status> {
        self.sim.check_auth(&req)?;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream ended before the first request"))?;
        let queue = first
            .queue
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("the first request must name a queue"))?;
        if queue.name != self.sim.cfg.queue_name {
            return Err(Status::not_found(format!("no such queue: {}", queue.name)));
        }
        if let Some(client) = &first.client
            && !valid_client(client)
        {
            return Err(Status::invalid_argument(format!(
                "client id `{client}` does not match ((segment)/)*<uuid>"
            )));
        }
        if !first.acknowledgement_tokens.is_empty() {
            return Err(Status::invalid_argument(
                "acknowledgement tokens are not allowed on the first request",
            ));
        }
        let mut window = Duration::from_secs(60);
        if let Some(d) = first
            .notification_delivery_options
            .as_ref()
            .and_then(|o| o.acknowledgement_deadline)
        {
            if !(30..=300).contains(&d.seconds) || d.nanos != 0 && d.seconds == 300 {
                return Err(Status::invalid_argument(
                    "acknowledgement_deadline must be between 30s and 300s",
                ));
            }
            window = Duration::new(d.seconds as u64, d.nanos.max(0) as u32);
        }
        if let Some(w) = self.sim.cfg.ack_window_override {
            window = w;
        }

        let c = &self.sim.counters;
        c.streams_opened.fetch_add(1, Ordering::Relaxed);
        let stream = c.next_stream.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(64);
        let sim = self.sim.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            pull_loop(&sim, stream, window, inbound, tx, shutdown).await;
            sim.queue.stream_closed(stream);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

pub(super) async fn pull_loop(
    sim: &Sim,
    stream: u64,
    window: Duration,
    mut inbound: Streaming<nq::PullNotificationRequest>,
    tx: mpsc::Sender<Result<nq::PullNotificationResponse, Status>>,
    mut shutdown: Shutdown,
) {
    let cap = sim.cfg.max_unacked_per_reader.max(1);
    let mut acks_here = 0usize;
    // Whether the queue may have something for this stream; cleared when
    // it had nothing, set again when it changes or acks free room.
    let mut want_more = true;
    loop {
        let notified = sim.queue.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Acknowledgements are read whenever they come, between
        // deliveries, as the real service does: a client that waits for
        // its acks to be taken must never stall the stream.
        tokio::select! {
            permit = tx.reserve(), if want_more => {
                let Ok(permit) = permit else { return };
                match sim.queue.take(stream, window, cap) {
                    Some((token, n)) => permit.send(Ok(nq::PullNotificationResponse {
                        notification: Some(
                            nq::pull_notification_response::AcknowledgeableNotification {
                                token,
                                notification: Some((*n).clone()),
                            },
                        ),
                        acknowledgement_receipt: vec![],
                    })),
                    None => want_more = false,
                }
            }
            msg = inbound.message(), if !(sim.cfg.lazy_acks && want_more) => {
                let req = match msg {
                    Ok(Some(req)) => req,
                    Ok(None) | Err(_) => return,
                };
                if req.queue.as_ref().is_some_and(|q| q.name != sim.cfg.queue_name) {
                    let _ = tx.send(Err(Status::invalid_argument("the queue cannot change on a stream"))).await;
                    return;
                }
                let mut receipts = Vec::with_capacity(req.acknowledgement_tokens.len());
                for token in req.acknowledgement_tokens {
                    let (code, message) = match sim.queue.ack(stream, &token) {
                        AckOutcome::Ok => {
                            acks_here += 1;
                            (0, String::new())
                        }
                        AckOutcome::Late => (4, "acknowledgement deadline exceeded".to_string()),
                        AckOutcome::Unknown => (3, "token not delivered on this stream".to_string()),
                    };
                    receipts.push(nq::pull_notification_response::AcknowledgementReceipt {
                        token,
                        status: Some(crate::pb::google::rpc::Status { code, message, details: vec![] }),
                    });
                }
                if !receipts.is_empty() {
                    let resp = nq::PullNotificationResponse { notification: None, acknowledgement_receipt: receipts };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
                want_more = true;
                let every = sim.cfg.drop_stream_every;
                if every > 0 && acks_here >= every {
                    sim.counters.streams_dropped.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(Err(Status::unavailable("simulated stream drop"))).await;
                    return;
                }
            }
            _ = &mut notified => want_more = true,
            _ = shutdown.wait() => {
                let _ = tx.send(Err(Status::unavailable("simulator shutting down"))).await;
                return;
            }
        }
    }
}

pub(super) fn parse_continuation(owner: &str, token: Option<&str>) -> Result<usize, Status> {
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Ok(0);
    };
    token
        .strip_prefix("ct.")
        .and_then(|t| t.rsplit_once('.'))
        .filter(|(o, _)| *o == owner)
        .and_then(|(_, e)| e.parse::<usize>().ok())
        .map(|e| e + 1)
        .ok_or_else(|| {
            Status::invalid_argument("continuation token does not belong to this stream")
        })
}

impl Service {
    /// Checks the token, counts the call and requires the id field.
    fn admit<T>(
        &self,
        req: Request<T>,
        id: impl Fn(&T) -> &String,
        field: &str,
    ) -> Result<T, Status> {
        self.sim.check_auth(&req)?;
        self.sim
            .counters
            .event_calls
            .fetch_add(1, Ordering::Relaxed);
        let req = req.into_inner();
        if id(&req).is_empty() {
            return Err(Status::invalid_argument(format!("{field} is required")));
        }
        Ok(req)
    }

    /// Streams `events[from..]` as stored now (waiting for more while
    /// `follow` and not complete).
    fn stream_events(
        &self,
        owner: String,
        mut from: usize,
        stored: impl Fn(&Sim) -> (usize, bool) + Send + 'static,
        events: impl Fn(&Sim) -> &[bytes::Bytes] + Send + 'static,
        follow: bool,
    ) -> BoxStream<StoredEvent> {
        let owner: Arc<str> = owner.into();
        let sim = self.sim.clone();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut sent_here = 0usize;
            loop {
                let notified = sim.queue.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let (upto, complete) = stored(&sim);
                while from < upto {
                    let end = sim.cfg.end_event_stream_every;
                    if end > 0 && sent_here >= end {
                        // Closed cleanly: the client sees the end of the
                        // stream, without an error and without `is_last`.
                        return;
                    }
                    let every = sim.cfg.drop_event_stream_every;
                    let limit = sim.cfg.drop_event_stream_limit;
                    let dropped = sim.counters.event_streams_dropped.load(Ordering::Relaxed);
                    if every > 0 && sent_here >= every && (limit == 0 || (dropped as usize) < limit)
                    {
                        sim.counters
                            .event_streams_dropped
                            .fetch_add(1, Ordering::Relaxed);
                        let _ = tx
                            .send(Err(Status::unavailable("simulated event stream drop")))
                            .await;
                        return;
                    }
                    let ev = StoredEvent {
                        event: events(&sim)[from].clone(),
                        owner: owner.clone(),
                        index: from,
                        token: !sim.cfg.omit_continuation_tokens,
                    };
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                    sim.counters.events_served.fetch_add(1, Ordering::Relaxed);
                    sent_here += 1;
                    from += 1;
                }
                if complete || !follow {
                    return;
                }
                tokio::select! {
                    _ = &mut notified => {}
                    _ = shutdown.wait() => {
                        let _ = tx.send(Err(Status::unavailable("simulator shutting down"))).await;
                        return;
                    }
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

impl StoredEvents for Service {
    fn get_invocation(&self, req: Request<es::GetInvocationRequest>) -> CallResult {
        let req = self.admit(req, |r| &r.invocation_id, "invocation_id")?;
        let found = self
            .sim
            .invocation_index
            .get(&req.invocation_id)
            .copied()
            .filter(|&i| self.sim.stored(i).0 > 0);
        let Some(inv) = found else {
            return Err(Status::not_found(format!(
                "no invocation {}",
                req.invocation_id
            )));
        };
        let from = parse_continuation(&req.invocation_id, req.continuation_token.as_deref())?;
        let follow =
            req.replay_mode != es::replay_mode_options::ReplayMode::StopAfterLastKnown as i32;
        Ok(Response::new(self.stream_events(
            req.invocation_id,
            from,
            move |sim| sim.stored(inv),
            move |sim| &sim.stored_invocations[inv],
            follow,
        )))
    }

    fn get_build(&self, req: Request<es::GetBuildRequest>) -> CallResult {
        let req = self.admit(req, |r| &r.build_id, "build_id")?;
        let Some(b) = self
            .sim
            .build_index
            .get(&req.build_id)
            .copied()
            .filter(|&b| self.sim.queue.stats().released > self.sim.world.builds[b].started_at)
        else {
            return Err(Status::not_found(format!("no build {}", req.build_id)));
        };
        let from = parse_continuation(&req.build_id, req.continuation_token.as_deref())?;
        Ok(Response::new(self.stream_events(
            req.build_id,
            from,
            // Enqueued at once; the rest once the build finished.
            move |sim| {
                let build = &sim.world.builds[b];
                if sim.queue.stats().released > build.finished_at {
                    (build.events.len(), true)
                } else {
                    (1, false)
                }
            },
            move |sim| &sim.stored_builds[b],
            false,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::store::continuation;

    #[test]
    fn client_grammar() {
        let u = "4f0c6a1e-2b7d-4c3e-9a8f-0123456789ab";
        for ok in [
            u.to_string(),
            format!("evbridge/{u}"),
            format!("a-b/c1/{u}"),
        ] {
            assert!(valid_client(&ok), "{ok}");
        }
        for bad in [
            "evbridge".to_string(),
            format!("Evbridge/{u}"),
            format!("evbridge-/{u}"),
            format!("1x/{u}"),
            format!("evbridge/{}", u.to_uppercase()),
            format!("{}/{u}", "a".repeat(120)),
        ] {
            assert!(!valid_client(&bad), "{bad}");
        }
    }

    #[test]
    fn continuation_tokens_resume_after_their_event() {
        assert_eq!(parse_continuation("inv", None).unwrap(), 0);
        assert_eq!(
            parse_continuation("inv", Some(&continuation("inv", 4))).unwrap(),
            5
        );
        assert!(parse_continuation("other", Some(&continuation("inv", 4))).is_err());
        assert!(parse_continuation("inv", Some("garbage")).is_err());
    }
}
