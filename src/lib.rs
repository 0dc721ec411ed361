//! evbridge reads build events from an EngFlow cluster (notification queue
//! and event store, over gRPC), normalizes each into one envelope and
//! delivers it to sinks chosen by URL, acknowledging upstream only after
//! every sink confirmed: at least once, nothing lost.
//!
//! # Layout
//! - `cli`: flags (with EngFlow's example-client aliases), `sim`, `demo`.
//! - `bridge`: `run(config, sinks, shutdown)`, the whole bridge in-process.
//! - `source`: Pull streams, acknowledgements, GetInvocation with resume.
//! - `normalize`: notifications and build events → envelopes (pure).
//! - `pipeline`: fan-out to sinks, confirm-before-ack, in-flight bound.
//! - `retry`: exponential backoff with jitter.
//! - `shutdown`: the shutdown signal every task listens to.
//! - `sim`, `sim_queue`, `sim_gen`: the EngFlow-compatible simulator.
//! - `pb`: generated protobuf/gRPC code and the descriptor pool.
//! - `logging`: tracing to stderr, text or JSON.
//! - `health`, `telemetry`, `admin`: readiness, metrics, the periodic stats
//!   line and the `/metrics` `/healthz` `/readyz` endpoint.
//! - `config`: the TOML configuration file, read as the flags it stands for.
//!
//! The sinks, the envelope and the `Sink` trait live in `evbridge-sinks`.

pub mod admin;
pub mod bridge;
pub mod cli;
pub mod config;
pub mod health;
pub mod logging;
pub mod normalize;
pub mod pb;
pub mod pipeline;
pub mod retry;
pub mod shutdown;
pub mod sim;
pub mod sim_gen;
pub mod sim_queue;
pub mod source;
pub mod telemetry;

pub use evbridge_sinks as sinks;
