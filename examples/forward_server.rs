//! A receiver like EngFlow's demo server: serves
//! `com.engflow.notificationqueue.demoserver.Forwarding/ForwardStream`
//! (by default on localhost:50051) and prints every request it gets, one
//! line each: the id, then the payload (evbridge's envelope JSON).
//!
//! ```sh
//! cargo run --example forward_server            # terminal 1
//! cargo run -- demo --sink grpc://127.0.0.1:50051   # terminal 2
//! ```

use std::net::SocketAddr;

use clap::Parser;
use evbridge::pb::forward::forwarding_server::{Forwarding, ForwardingServer};
use evbridge::pb::forward::{EngFlowRequest, EngFlowResponse};
use tonic::{Request, Response, Status};

/// Print what evbridge (or EngFlow's example client) forwards.
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
}

struct Printer;

#[tonic::async_trait]
impl Forwarding for Printer {
    async fn forward_stream(
        &self,
        request: Request<EngFlowRequest>,
    ) -> Result<Response<EngFlowResponse>, Status> {
        let r = request.into_inner();
        println!("{} {}", r.id, r.payload);
        Ok(Response::new(EngFlowResponse {
            message: format!("received {}", r.id),
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    eprintln!("forward server listening on {}", args.listen);
    tonic::transport::Server::builder()
        .add_service(ForwardingServer::new(Printer))
        .serve_with_shutdown(args.listen, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
