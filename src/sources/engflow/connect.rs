//! The EngFlow cluster's gRPC channels, its auth header and `--check`.

use std::time::Duration;

use tonic::Code;
use tonic::Status;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::warn;

use super::SourceConfig;
use crate::pb::{es, nq};
use crate::sources::{ACCEPTED, SourceError};

/// Adds the EngFlow auth headers to every call.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = &self.0 {
            let md = req.metadata_mut();
            md.insert(
                "x-engflow-auth-method",
                MetadataValue::from_static("jwt-v0"),
            );
            md.insert("x-engflow-auth-token", token.clone());
        }
        Ok(req)
    }
}

pub(super) type QueueClient =
    nq::notification_queue_client::NotificationQueueClient<InterceptedService<Channel, Auth>>;

/// The gRPC connections of a source: one for the notification queue and
/// one for the event store. Separate HTTP/2 connections, because their
/// flow-control windows must not be shared: acknowledgements a server is
/// slow to read would otherwise block the event-store calls the
/// notifications in progress wait for, and the pull with them.
#[derive(Clone)]
pub struct Channels {
    /// For `Pull`.
    pub queue: Channel,
    /// For `GetInvocation`.
    pub store: Channel,
    /// Auth headers for both.
    pub auth: Auth,
}

/// Builds the gRPC channels (lazy: connection errors surface on calls and
/// are retried there) and the auth interceptor.
pub fn connect(cfg: &SourceConfig) -> Result<Channels, SourceError> {
    let url = url::Url::parse(&cfg.endpoint).map_err(|e| {
        SourceError::Config(format!(
            "source `{}` is not a URL ({e}); accepted forms: grpc://HOST[:PORT], grpcs://HOST[:PORT], or a broker: {}",
            evbridge_sinks::redact(&cfg.endpoint),
            ACCEPTED,
        ))
    })?;
    let tls = match url.scheme() {
        "grpc" => false,
        "grpcs" => true,
        other => {
            return Err(SourceError::Config(format!(
                "source scheme `{other}` is not supported; accepted forms: grpc://HOST[:PORT], grpcs://HOST[:PORT], or a broker: {}",
                ACCEPTED
            )));
        }
    };
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| {
        SourceError::Config(format!(
            "source `{}` has no host; accepted forms: grpc://HOST[:PORT], grpcs://HOST[:PORT], or a broker: {}",
            evbridge_sinks::redact(&cfg.endpoint),
            ACCEPTED,
        ))
    })?;
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return Err(SourceError::Config(format!(
            "source `{}` must not have a path or query; the queue is set with --queue",
            evbridge_sinks::redact(&cfg.endpoint)
        )));
    }
    if !tls && cfg.token.is_some() {
        warn!(
            source = %evbridge_sinks::redact(&cfg.endpoint),
            "the auth token is sent in clear text over grpc://; use grpcs://"
        );
    }
    let port = url.port().unwrap_or(if tls { 443 } else { 80 });
    let uri = format!("{}://{host}:{port}", if tls { "https" } else { "http" });
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| SourceError::Config(format!("source endpoint: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if tls {
        let mut tls_cfg = ClientTlsConfig::new().domain_name(host.trim_matches(['[', ']']));
        tls_cfg = match &cfg.tls_ca {
            Some(ca) => tls_cfg.ca_certificate(Certificate::from_pem(ca)),
            None => tls_cfg.with_native_roots(),
        };
        if let Some((cert, key)) = &cfg.tls_identity {
            tls_cfg = tls_cfg.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint
            .tls_config(tls_cfg)
            .map_err(|e| SourceError::Config(format!("TLS configuration: {}", chain(&e))))?;
    } else if cfg.tls_identity.is_some() || cfg.tls_ca.is_some() {
        return Err(SourceError::Config(
            "TLS options need a grpcs:// source".into(),
        ));
    }
    let auth = match &cfg.token {
        None => Auth(None),
        Some(t) => {
            let mut v: MetadataValue<Ascii> = t.trim().parse().map_err(|_| {
                SourceError::Config("the token contains characters not allowed in a header".into())
            })?;
            v.set_sensitive(true);
            Auth(Some(v))
        }
    };
    Ok(Channels {
        queue: endpoint.connect_lazy(),
        store: endpoint.connect_lazy(),
        auth,
    })
}

/// Checks that the cluster answers and accepts the credentials, without
/// pulling (a pulled notification would be held back for the ack
/// deadline): asks the event store for an invocation that does not exist,
/// where "not found" is the healthy answer. The queue name itself is only
/// checked by the first Pull.
pub async fn probe(cfg: &SourceConfig) -> Result<(), String> {
    let c = connect(cfg).map_err(|e| e.to_string())?;
    let mut store = es::event_store_client::EventStoreClient::with_interceptor(c.store, c.auth);
    let req = es::GetInvocationRequest {
        instance_name: String::new(),
        invocation_id: format!("evbridge-check-{}", uuid::Uuid::new_v4()),
        continuation_token: None,
        replay_mode: es::replay_mode_options::ReplayMode::StopAfterLastKnown as i32,
    };
    let status =
        match tokio::time::timeout(Duration::from_secs(15), store.get_invocation(req)).await {
            Err(_) => return Err("no answer within 15s".into()),
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(status)) => status,
        };
    match status.code() {
        Code::NotFound | Code::InvalidArgument | Code::OutOfRange => Ok(()),
        Code::Unauthenticated | Code::PermissionDenied => Err(format!(
            "credentials refused: {:?}: {}",
            status.code(),
            status.message()
        )),
        Code::Unimplemented => Err(format!(
            "the endpoint does not serve the EngFlow event store: {}",
            status.message()
        )),
        code => {
            let mut text = format!("{code:?}: {}", status.message());
            if let Some(cause) = std::error::Error::source(&status) {
                text.push_str(": ");
                text.push_str(&chain(cause));
            }
            Err(text)
        }
    }
}

/// An error with its sources ("transport error: invalid key …").
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Codes that mean "this configuration will never work" at start.
pub(super) fn is_fatal(code: Code) -> bool {
    matches!(
        code,
        Code::Unauthenticated | Code::PermissionDenied | Code::NotFound | Code::InvalidArgument
    )
}
