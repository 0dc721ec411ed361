//! The bridge and the simulator as a library: start a simulated EngFlow
//! cluster on an ephemeral port, bridge it to stdout until every
//! notification is acknowledged, print the simulator's report.
//!
//! `cargo run --example embedded`

use std::time::Duration;

use evbridge::bridge::{self, BridgeConfig};
use evbridge::shutdown;
use evbridge::sim::{self, Sim, SimConfig};
use evbridge::sources::SourceConfig;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = SimConfig::default();
    cfg.gen_config.builds = 2;
    cfg.gen_config.events_per_invocation = 6;
    let sim = Sim::new(cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("grpc://{}", listener.local_addr()?);
    let (_sim_stop, sim_shutdown) = shutdown::channel();
    tokio::spawn(sim::serve(listener, sim.clone(), None, sim_shutdown));

    let sink = evbridge::sinks::open("stdout://").await?;
    let (stop, shutdown) = shutdown::channel();
    let bridge = tokio::spawn(bridge::run(
        BridgeConfig::new(SourceConfig::new(url)),
        vec![sink],
        shutdown,
    ));
    while !sim.all_acked() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.fire();
    let summary = bridge.await??;
    eprintln!("bridge: {summary:?}");
    eprintln!("simulator: {:?}", sim.report());
    Ok(())
}
