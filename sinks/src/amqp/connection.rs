//! What the AMQP sink and the AMQP source share: the URI lapin connects
//! to (with `ca=` and lapin's own options), the exchange options and
//! declaration, and how broker refusals are told from outages.

use std::time::Duration;

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use url::Url;

use crate::{OpenError, Options, SinkError};

/// Query options lapin itself understands; passed through.
pub const LAPIN_OPTIONS: &[&str] = &[
    "heartbeat",
    "channel_max",
    "frame_max",
    "connection_timeout",
    "auth_mechanism",
];

/// What `declare=` asks of the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declare {
    /// Declare the exchange (durable) if it is missing.
    Create,
    /// Check that it exists; fail clearly if not.
    Passive,
    /// Assume it exists.
    Skip,
}

/// `exchange_type=` and `declare=`, shared with the AMQP source.
pub fn exchange_options(opts: &mut Options) -> Result<(ExchangeKind, Declare), OpenError> {
    let kind = match opts
        .choice("exchange_type", &["topic", "direct", "fanout", "headers"])?
        .as_deref()
    {
        Some("direct") => ExchangeKind::Direct,
        Some("fanout") => ExchangeKind::Fanout,
        Some("headers") => ExchangeKind::Headers,
        _ => ExchangeKind::Topic,
    };
    let declare = match opts
        .choice("declare", &["true", "passive", "false"])?
        .as_deref()
    {
        Some("true") => Declare::Create,
        Some("false") => Declare::Skip,
        _ => Declare::Passive,
    };
    Ok((kind, declare))
}

/// Declares the exchange (durable), checks it exists, or does nothing,
/// as `declare` says.
pub async fn declare_exchange(
    ch: &Channel,
    exchange: &str,
    kind: &ExchangeKind,
    declare: Declare,
) -> Result<(), lapin::Error> {
    if declare == Declare::Skip {
        return Ok(());
    }
    let options = ExchangeDeclareOptions {
        passive: declare == Declare::Passive,
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(
        exchange.into(),
        kind.clone(),
        options,
        FieldTable::default(),
    )
    .await
}

/// The error for an exchange that cannot be declared or is missing.
pub fn exchange_error(exchange: &str, vhost: &str, declare: Declare, e: lapin::Error) -> SinkError {
    let hint = if declare == Declare::Passive {
        " (add declare=true to create it)"
    } else {
        ""
    };
    SinkError::Retryable(format!(
        "exchange `{exchange}` in vhost `{vhost}` is not usable{hint}: {e}"
    ))
}

/// Where and how to connect: shared by the sink and the AMQP source.
#[derive(Clone)]
pub struct Endpoint {
    /// Full URI for lapin, credentials included: never shown.
    pub(crate) uri: String,
    /// PEM of a private CA for amqps.
    ca: Option<String>,
    /// The vhost, decoded, for messages.
    pub vhost: String,
}

/// Takes `ca=` and lapin's own options from `opts` and builds the URI
/// lapin connects to (everything else of ours stripped). The caller adds
/// [`LAPIN_OPTIONS`] to its accepted list.
pub fn endpoint(url: &Url, opts: &mut Options) -> Result<Endpoint, String> {
    let ca = match opts.take("ca") {
        None => None,
        Some(_) if url.scheme() != "amqps" => {
            return Err("option `ca` needs an amqps:// URL".into());
        }
        Some(path) => Some(
            std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read option `ca={path}`: {e}"))?,
        ),
    };
    if url.host_str().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    let passthrough: Vec<(String, String)> = LAPIN_OPTIONS
        .iter()
        .filter_map(|k| opts.take(k).map(|v| (k.to_string(), v)))
        .collect();
    let mut lapin_url = url.clone();
    lapin_url.set_query(None);
    if !passthrough.is_empty() {
        lapin_url.query_pairs_mut().extend_pairs(passthrough);
    }
    let vhost = match url.path() {
        "" | "/" => "/".to_string(),
        p => url::form_urlencoded::parse(format!("v={}", &p[1..]).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default(),
    };
    Ok(Endpoint {
        uri: lapin_url.to_string(),
        ca,
        vhost,
    })
}

impl Endpoint {
    /// Connects (TLS with the private CA when one was given), giving up
    /// after 15 s so a hung broker is an error, not a wait forever.
    pub async fn connect(&self) -> Result<Connection, SinkError> {
        self.connect_classified().await.map_err(|(_, e)| e)
    }

    /// [`Self::connect`], also telling whether the broker refused us for
    /// good (bad credentials, vhost not allowed) rather than being away.
    pub async fn connect_classified(&self) -> Result<Connection, (bool, SinkError)> {
        let connecting = async {
            let props = ConnectionProperties::default();
            match &self.ca {
                None => Connection::connect(&self.uri, props).await,
                Some(pem) => {
                    let tls = lapin::tcp::OwnedTLSConfig {
                        identity: None,
                        cert_chain: Some(pem.clone()),
                    };
                    let runtime = lapin::runtime::default_runtime()?;
                    Connection::connect_with_config(&self.uri, props, tls, runtime).await
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(15), connecting).await {
            Err(_) => Err((
                false,
                SinkError::Retryable("connecting to the AMQP broker timed out".into()),
            )),
            Ok(Err(e)) => Err((refused(&e), retryable("connecting to the AMQP broker", e))),
            Ok(Ok(conn)) => Ok(conn),
        }
    }
}

/// Whether the broker answered with a refusal that retrying cannot cure:
/// access refused (403), not found (404), precondition failed (406),
/// not allowed (530).
pub fn refused(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if matches!(amqp.get_id(), 403 | 404 | 406 | 530))
}

/// lapin errors carry the broker's reply text but never the URI, so they
/// are safe to show.
pub fn retryable(what: &str, e: impl std::fmt::Display) -> SinkError {
    SinkError::Retryable(format!("{what}: {e}"))
}
