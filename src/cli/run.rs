//! The bridge command: sinks opened, flags turned into a
//! [`BridgeConfig`], `--check`, and the run itself.

use super::*;

pub(super) async fn open_sinks(urls: &[String]) -> Result<Vec<Arc<dyn Sink>>, Failure> {
    let mut sinks = Vec::with_capacity(urls.len());
    for url in urls {
        sinks.push(
            evbridge_sinks::open(url)
                .await
                .map_err(|e| Failure::usage(e.to_string()))?,
        );
    }
    Ok(sinks)
}

pub(super) fn bridge_config(args: &BridgeArgs, source: String) -> Result<BridgeConfig, Failure> {
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.0.clone()),
        (None, Some(path)) => {
            warn_if_readable_by_others("--token-file", path);
            let raw = read_file("--token-file", path)?;
            let text = String::from_utf8(raw).map_err(|_| {
                Failure::usage(format!(
                    "--token-file `{}` is not UTF-8 text",
                    path.display()
                ))
            })?;
            Some(text.trim().to_string())
        }
        (None, None) => None,
    };
    if token.as_deref() == Some("") {
        return Err(Failure::usage("the auth token is empty"));
    }
    let tls_identity = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some((read_pem("--tls-cert", c, "CERTIFICATE")?, {
            warn_if_readable_by_others("--tls-key", k);
            read_pem("--tls-key", k, "PRIVATE KEY")?
        })),
        _ => None,
    };
    let tls_ca = args
        .tls_ca
        .as_ref()
        .map(|p| read_pem("--tls-ca", p, "CERTIFICATE"))
        .transpose()?;
    let seconds = |flag: &str, v: f64| {
        if (0.0..=evbridge_sinks::MAX_SECONDS).contains(&v) {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(Failure::usage(format!(
                "{flag} must be a number of seconds from 0 to {} (a year)",
                evbridge_sinks::MAX_SECONDS
            )))
        }
    };
    let shutdown_grace = seconds("--shutdown-timeout", args.shutdown_timeout)?;
    let health_interval = seconds("--health-interval", args.health_interval)?;
    let stats_interval = seconds("--stats-interval", args.stats_interval)?;
    if health_interval < Duration::from_millis(100) {
        return Err(Failure::usage(
            "--health-interval must be at least 0.1 seconds",
        ));
    }
    let mut source = SourceConfig::new(source);
    source.queue = args.queue.clone();
    source.token = token;
    source.tls_identity = tls_identity;
    source.tls_ca = tls_ca;
    source.ack_deadline = Duration::from_secs(args.ack_deadline);
    source.readers = args.readers as usize;
    source.replay = match args.replay {
        Replay::StopAfterLastKnown => ReplayMode::StopAfterLastKnown,
        Replay::UntilComplete => ReplayMode::UntilComplete,
    };
    source.shutdown_grace = shutdown_grace;
    source.max_notifications = args.max_notifications as usize;
    source.max_message_size = args.max_message_size;
    source.max_attempts = args.max_attempts;
    let mut cfg = BridgeConfig::new(source);
    cfg.topics = Topics {
        lifecycle: args.lifecycle_topic.clone(),
        build_events: args.build_events_topic.clone(),
    };
    cfg.limits = Limits {
        max_in_flight: args.max_in_flight as usize,
        max_in_flight_bytes: args.max_in_flight_bytes,
        max_batch: args.max_batch as usize,
        lanes: args.sink_lanes as usize,
    };
    cfg.metrics_listen = args.metrics_listen;
    cfg.health_interval = health_interval;
    cfg.stats_interval = (!stats_interval.is_zero()).then_some(stats_interval);
    Ok(cfg)
}

pub(super) async fn run_bridge(args: BridgeArgs) -> Result<(), Failure> {
    let Some(source) = args.source.clone() else {
        return Err(Failure::usage(
            "no source: give --source grpc[s]://HOST[:PORT], kafka://… or amqp[s]://… (or run `evbridge demo`)",
        ));
    };
    let mut cfg = bridge_config(&args, source)?;
    let mut urls = args.sinks.clone();
    for f in &args.forward {
        // The example client's --forward takes host:port or a grpc URL.
        urls.push(if f.contains("://") {
            f.clone()
        } else {
            format!("grpc://{f}")
        });
    }
    if urls.is_empty() {
        urls.push("stdout://".into());
    }
    let sinks = open_sinks(&urls).await?;
    if let Some(url) = &args.dead_letter {
        let sink = open_sinks(std::slice::from_ref(url)).await?.remove(0);
        if sink.filters() {
            return Err(Failure::usage(format!(
                "--dead-letter `{}` takes no names= filter: a rejected envelope it skipped \
                 would be stored nowhere",
                sink.describe()
            )));
        }
        cfg.dead_letter = Some(sink);
    }
    if args.check {
        return check(&cfg, &sinks).await;
    }
    let (trigger, shutdown) = shutdown::channel();
    tokio::spawn(async move {
        shutdown::signal().await;
        trigger.fire();
        // Keep the trigger alive: dropping it would fire it again, harmlessly.
        std::future::pending::<()>().await;
    });
    let summary = bridge::run(cfg, sinks, shutdown).await?;
    info!(?summary, "stopped");
    Ok(())
}

/// A size from 1 MiB to 1 TiB.
pub(super) fn in_flight_bytes(text: &str) -> Result<usize, String> {
    let n = evbridge_sinks::parse_size(text)?;
    if (1 << 20..=1 << 40).contains(&n) {
        Ok(n)
    } else {
        Err(format!("`{text}` is outside 1MiB..=1TiB"))
    }
}

/// `--check`: one line per part, then exit 0 only if all are healthy.
pub(super) async fn check(cfg: &BridgeConfig, sinks: &[Arc<dyn Sink>]) -> Result<(), Failure> {
    let mut failed = 0;
    let mut report = |what: String, outcome: Result<(), String>| match outcome {
        Ok(()) => println!("ok      {what}"),
        Err(e) => {
            failed += 1;
            println!("FAILED  {what}: {e}");
        }
    };
    let endpoint = &cfg.source.endpoint;
    let what = if sources::is_broker_url(endpoint) {
        format!("source {}", evbridge_sinks::redact(endpoint))
    } else {
        format!(
            "source {} (queue `{}`)",
            evbridge_sinks::redact(endpoint),
            cfg.source.queue
        )
    };
    report(what, sources::probe(&cfg.source).await);
    let all = sinks
        .iter()
        .map(|s| ("sink", s))
        .chain(cfg.dead_letter.iter().map(|s| ("dead-letter sink", s)));
    for (role, sink) in all {
        let outcome = match tokio::time::timeout(Duration::from_secs(15), sink.healthcheck()).await
        {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("no answer within 15s".into()),
        };
        report(format!("{role} {}", sink.describe()), outcome);
        let _ = sink.flush().await;
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(Failure {
            code: 1,
            message: format!("check failed: {failed} part(s) not healthy"),
        })
    }
}
