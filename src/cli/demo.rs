//! `evbridge sim` (the simulator as a server) and `evbridge demo` (the
//! simulator and the bridge in one process, to stdout).

use super::*;

pub(super) fn world_config(w: &WorldArgs, rate: f64) -> SimConfig {
    SimConfig {
        gen_config: GenConfig {
            builds: w.builds,
            events_per_invocation: w.events_per_invocation as usize,
            seed: w.seed,
            instance: w.instance.clone(),
            bad_payload_every: w.bad_payload_every,
        },
        queue_name: w.queue.clone(),
        rate: rate.max(0.0),
        ..SimConfig::default()
    }
}

pub(super) fn write_report(sim: &Sim, path: Option<&Path>) {
    let json = serde_json::to_string(&sim.report()).expect("report serializes");
    println!("{json}");
    if let Some(path) = path
        && let Err(e) = std::fs::write(path, format!("{json}\n"))
    {
        error!("cannot write report to {}: {e}", path.display());
    }
}

pub(super) async fn run_sim(args: SimArgs) -> Result<(), Failure> {
    let mut cfg = world_config(&args.world, args.rate);
    cfg.token = args.token.as_ref().map(|t| t.0.clone());
    cfg.drop_stream_every = args.drop_stream_every;
    cfg.drop_event_stream_every = args.drop_event_stream_every;
    cfg.max_unacked_per_reader = args.max_unacked_per_reader;
    cfg.ack_window_override = args.ack_window_ms.map(Duration::from_millis);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => {
            let identity = tonic::transport::Identity::from_pem(
                read_pem("--tls-cert", c, "CERTIFICATE")?,
                read_pem("--tls-key", k, "PRIVATE KEY")?,
            );
            let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
            if let Some(ca) = &args.client_ca {
                tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read_pem(
                    "--client-ca",
                    ca,
                    "CERTIFICATE",
                )?));
            }
            Some(tls)
        }
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| Failure::usage(format!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::usage(e.to_string()))?;
    let sim = Sim::new(cfg);
    let scheme = if tls.is_some() { "grpcs" } else { "grpc" };
    println!("evbridge sim listening on {scheme}://{addr}");
    info!(
        notifications = sim.world().notifications.len(),
        invocations = sim.world().invocations.len(),
        events = sim.world().invocation_events(),
        "simulated cluster ready"
    );

    let (trigger, shutdown) = shutdown::channel();
    let server = tokio::spawn(sim::serve(listener, sim.clone(), tls, shutdown));
    let report_path = args.report_file.clone();
    #[cfg(unix)]
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .map_err(|e| Failure::usage(format!("cannot install SIGUSR1 handler: {e}")))?;
    let mut poll = tokio::time::interval(Duration::from_millis(10));
    let stop = shutdown::signal();
    tokio::pin!(stop);
    loop {
        #[cfg(unix)]
        let usr1_recv = usr1.recv();
        #[cfg(not(unix))]
        let usr1_recv = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = &mut stop => break,
            _ = usr1_recv => write_report(&sim, report_path.as_deref()),
            _ = poll.tick(), if args.exit_when_acked => if sim.all_acked() { break },
        }
    }
    trigger.fire();
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), server).await {
        return Err(Failure {
            code: 1,
            message: format!("simulator failed: {e}"),
        });
    }
    write_report(&sim, report_path.as_deref());
    Ok(())
}

pub(super) async fn run_demo(args: DemoArgs) -> Result<(), Failure> {
    let cfg = world_config(&args.world, args.rate);
    let sinks = open_sinks(&args.sinks).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Failure::usage(format!("cannot listen on 127.0.0.1:0: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::usage(e.to_string()))?;
    let sim = Sim::new(cfg);
    eprintln!(
        "evbridge demo: simulated EngFlow cluster on grpc://{addr} with {} notifications and {} build events; bridging to {}",
        sim.world().notifications.len(),
        sim.world().invocation_events(),
        args.sinks.join(", ")
    );
    let (sim_trigger, sim_shutdown) = shutdown::channel();
    tokio::spawn(sim::serve(listener, sim.clone(), None, sim_shutdown));

    let (trigger, shutdown) = shutdown::channel();
    let watcher = {
        let sim = sim.clone();
        tokio::spawn(async move {
            let stop = shutdown::signal();
            tokio::pin!(stop);
            let mut poll = tokio::time::interval(Duration::from_millis(10));
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = poll.tick() => if sim.all_acked() { break },
                }
            }
            trigger.fire();
        })
    };
    let mut source = SourceConfig::new(format!("grpc://{addr}"));
    source.queue = args.world.queue.clone();
    source.shutdown_grace = Duration::from_secs(5);
    let summary = bridge::run(BridgeConfig::new(source), sinks, shutdown).await?;
    let _ = watcher.await;
    sim_trigger.fire();
    let report = sim.report();
    eprintln!(
        "evbridge demo: done. {} notifications acknowledged, {} envelopes delivered ({} build events). Report: {}",
        report.queue.acked,
        summary.envelopes,
        summary.events,
        serde_json::to_string(&report).expect("report serializes")
    );
    Ok(())
}
