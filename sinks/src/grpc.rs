//! `grpc://HOST:PORT` / `grpcs://HOST:PORT`: EngFlow's Forwarding demo API,
//! so receivers written for EngFlow's example client keep working.
//!
//! Each envelope is one unary `ForwardStream` call with
//! `EngFlowRequest{id = envelope id, payload = envelope JSON}`; the reply
//! is the confirmation. Calls run concurrently up to `window` over one
//! HTTP/2 connection, or one after another with `ordered=true`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use url::Url;

use crate::{BatchError, Envelope, OpenError, Options, Sink, SinkError};

pub(crate) const ACCEPTED: &[&str] = &[
    "window",
    "ordered",
    "timeout",
    "max_message_size",
    "ca",
    "cert",
    "key",
];
const PATH: &str = "/com.engflow.notificationqueue.demoserver.Forwarding/ForwardStream";

/// `com.engflow.notificationqueue.demoserver.EngFlowRequest` (wire-contracts §5).
#[derive(Clone, PartialEq, prost::Message)]
pub struct EngFlowRequest {
    /// The envelope id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// The envelope JSON.
    #[prost(string, tag = "2")]
    pub payload: String,
}

/// `com.engflow.notificationqueue.demoserver.EngFlowResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EngFlowResponse {
    /// Whatever the receiver says.
    #[prost(string, tag = "1")]
    pub message: String,
}

/// Forwards envelopes to a Forwarding receiver.
pub(crate) struct GrpcSink {
    channel: Channel,
    window: usize,
    ordered: bool,
    timeout: Duration,
    /// Larger requests are refused before sending (permanent).
    max_message_size: usize,
    shown: String,
}

impl std::fmt::Debug for GrpcSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcSink")
            .field("url", &self.shown)
            .finish()
    }
}

/// Parses a `grpc://` or `grpcs://` URL; the connection is made lazily.
pub(crate) fn open(url: &Url) -> Result<GrpcSink, OpenError> {
    let mut opts = Options::new(url)?;
    let form = |reason: String| {
        format!(
            "{reason}; accepted form: grpc[s]://HOST:PORT[?{}]",
            ACCEPTED.join("&")
        )
    };
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(opts.invalid(form("no host".into())));
    };
    let Some(port) = url.port() else {
        return Err(opts.invalid(form("no port (the demo server listens on 50051)".into())));
    };
    if !matches!(url.path(), "" | "/") {
        return Err(opts.invalid(form(format!("unexpected path `{}`", url.path()))));
    }
    let window: usize = opts.parse("window", "a whole number")?.unwrap_or(64);
    if window == 0 {
        return Err(opts.invalid("option `window=0` must be at least 1"));
    }
    let ordered = opts.flag("ordered")?.unwrap_or(false);
    let timeout = opts.seconds("timeout")?.unwrap_or(Duration::from_secs(30));
    // What gRPC servers take by default (tonic, grpc-java, grpc-python).
    let max_message_size = opts.size("max_message_size")?.unwrap_or(4 << 20);
    let tls = url.scheme() == "grpcs";
    let read = |opts: &Options,
                key: &str,
                path: Option<String>|
     -> Result<Option<Vec<u8>>, OpenError> {
        match path {
            None => Ok(None),
            Some(_) if !tls => Err(opts.invalid(format!("option `{key}` needs a grpcs:// URL"))),
            Some(p) => std::fs::read(&p)
                .map(Some)
                .map_err(|e| opts.invalid(format!("cannot read option `{key}={p}`: {e}"))),
        }
    };
    let ca = opts.take("ca");
    let ca = read(&opts, "ca", ca)?;
    let cert = opts.take("cert");
    let cert = read(&opts, "cert", cert)?;
    let key = opts.take("key");
    let key = read(&opts, "key", key)?;
    if cert.is_some() != key.is_some() {
        return Err(opts.invalid("options `cert` and `key` go together"));
    }
    let shown = opts.shown_url().to_string();
    opts.finish(ACCEPTED)?;

    let uri = format!("{}://{host}:{port}", if tls { "https" } else { "http" });
    let invalid = |reason: String| OpenError::Invalid {
        url: shown.clone(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| invalid(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30));
    if tls {
        let mut cfg = ClientTlsConfig::new().domain_name(host.trim_matches(['[', ']']));
        cfg = match ca {
            Some(ca) => cfg.ca_certificate(Certificate::from_pem(ca)),
            None => cfg.with_native_roots(),
        };
        if let (Some(c), Some(k)) = (cert, key) {
            cfg = cfg.identity(Identity::from_pem(c, k));
        }
        endpoint = endpoint
            .tls_config(cfg)
            .map_err(|e| invalid(format!("TLS configuration: {e}")))?;
    }
    Ok(GrpcSink {
        channel: endpoint.connect_lazy(),
        window,
        ordered,
        timeout,
        max_message_size,
        shown,
    })
}

/// Whether the receiver may accept the same call later.
fn classify(status: &Status) -> SinkError {
    let what = format!("{:?}: {}", status.code(), status.message());
    // A receiver's size limit (grpc-java and grpc-python say RESOURCE_EXHAUSTED
    // "Received message larger than max", tonic OUT_OF_RANGE): never retried.
    let message = status.message();
    if message.contains("larger than max") || message.contains("message length too large") {
        return SinkError::Permanent(format!(
            "{what} (the receiver's message size limit; lower this sink's max_message_size \
             to refuse such envelopes before sending)"
        ));
    }
    match status.code() {
        Code::InvalidArgument
        | Code::Unimplemented
        | Code::NotFound
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::AlreadyExists => SinkError::Permanent(what),
        _ => SinkError::Retryable(what),
    }
}

async fn forward(
    channel: Channel,
    env: Arc<Envelope>,
    timeout: Duration,
    max_message_size: usize,
) -> Result<(), SinkError> {
    let payload = String::from_utf8_lossy(env.json()).into_owned();
    let message = EngFlowRequest {
        id: env.id.to_string(),
        payload,
    };
    let size = prost::Message::encoded_len(&message);
    if size > max_message_size {
        return Err(SinkError::Permanent(format!(
            "envelope {} is {size} bytes as a ForwardStream request, above this sink's \
             max_message_size of {max_message_size} bytes (gRPC servers take 4 MiB by \
             default; raise both to send it)",
            env.id
        )));
    }
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(max_message_size);
    grpc.ready()
        .await
        .map_err(|e| SinkError::Retryable(format!("connecting: {e}")))?;
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    let codec = tonic_prost::ProstCodec::<EngFlowRequest, EngFlowResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(PATH);
    grpc.unary(request, path, codec)
        .await
        .map(|_| ())
        .map_err(|s| classify(&s))
}

#[async_trait]
impl Sink for GrpcSink {
    fn describe(&self) -> &str {
        &self.shown
    }

    async fn send(&self, batch: &[Arc<Envelope>]) -> Result<(), BatchError> {
        if self.ordered {
            for (at, env) in batch.iter().enumerate() {
                forward(
                    self.channel.clone(),
                    env.clone(),
                    self.timeout,
                    self.max_message_size,
                )
                .await
                .map_err(|error| BatchError::new(at, error))?;
            }
            return Ok(());
        }
        // Up to `window` calls at a time; the first failure (by position)
        // decides where the batch stopped.
        let mut outcomes: Vec<Option<SinkError>> = vec![None; batch.len()];
        let window = self.window;
        for (c, chunk) in batch.chunks(window).enumerate() {
            let mut calls = tokio::task::JoinSet::new();
            for (i, env) in chunk.iter().enumerate() {
                let call = forward(
                    self.channel.clone(),
                    env.clone(),
                    self.timeout,
                    self.max_message_size,
                );
                calls.spawn(async move { (c * window + i, call.await) });
            }
            while let Some(done) = calls.join_next().await {
                match done {
                    Ok((i, Err(e))) => outcomes[i] = Some(e),
                    Ok((_, Ok(()))) => {}
                    Err(e) => {
                        return Err(BatchError::all(SinkError::Retryable(format!(
                            "call task failed: {e}"
                        ))));
                    }
                }
            }
        }
        let Some(at) = outcomes.iter().position(Option::is_some) else {
            return Ok(());
        };
        let confirmed = (at + 1..outcomes.len())
            .filter(|&i| outcomes[i].is_none())
            .collect();
        let error = outcomes[at].take().expect("found above");
        Err(BatchError::new(at, error).with_confirmed(confirmed))
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| SinkError::Retryable(format!("connecting to {}: {e}", self.shown)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn url_forms() {
        let s =
            open(&Url::parse("grpc://localhost:50051?window=8&ordered=true&timeout=2").unwrap())
                .unwrap();
        assert_eq!(
            (s.window, s.ordered, s.timeout),
            (8, true, Duration::from_secs(2))
        );
        assert!(open(&Url::parse("grpcs://example.com:443").unwrap()).is_ok());
        let bad = [
            ("grpc://localhost", "no port"),
            ("grpc://localhost:1/x", "unexpected path"),
            ("grpc://localhost:1?window=0", "at least 1"),
            ("grpc://localhost:1?ordered=maybe", "ordered=maybe"),
            ("grpc://localhost:1?ca=/x.pem", "needs a grpcs:// URL"),
            (
                "grpcs://localhost:1?ca=/nonexistent.pem",
                "cannot read option `ca",
            ),
            ("grpcs://localhost:1?cert=/etc/hostname", "go together"),
            ("grpc://localhost:1?colour=red", "unknown option `colour`"),
        ];
        for (url, want) in bad {
            let e = open(&Url::parse(url).unwrap()).expect_err(url).to_string();
            assert!(e.contains(want), "{url}: `{e}` lacks `{want}`");
        }
    }

    #[tokio::test]
    async fn an_envelope_above_max_message_size_is_refused_before_sending() {
        // Nothing listens on port 9: the refusal comes before any call.
        let sink = open(&Url::parse("grpc://127.0.0.1:9?max_message_size=1KiB").unwrap()).unwrap();
        assert_eq!(sink.max_message_size, 1024);
        let mut event = crate::test_envelope("big").event().clone();
        event.payload = crate::Payload::trusted(format!("{{\"x\":\"{}\"}}", "y".repeat(2000)));
        let env = Arc::new(Envelope::new(event));
        let e = sink.send(&[env]).await.unwrap_err();
        assert_eq!(e.at, 0);
        assert!(!e.error.is_retryable(), "{}", e.error);
        let text = e.error.to_string();
        for part in [
            "envelope big",
            "above this sink's max_message_size of 1024 bytes",
        ] {
            assert!(text.contains(part), "{text}");
        }
        assert!(
            open(&Url::parse("grpc://h:1?max_message_size=lots").unwrap())
                .unwrap_err()
                .to_string()
                .contains("max_message_size")
        );
        // A receiver's own limit is permanent too, whatever its code.
        let refused =
            Status::resource_exhausted("Received message larger than max (5000 vs. 4194304)");
        assert!(!classify(&refused).is_retryable());
    }

    #[test]
    fn status_classes() {
        for c in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Internal,
        ] {
            assert!(classify(&Status::new(c, "x")).is_retryable(), "{c:?}");
        }
        for c in [Code::InvalidArgument, Code::Unimplemented] {
            assert!(!classify(&Status::new(c, "x")).is_retryable(), "{c:?}");
        }
    }
}
