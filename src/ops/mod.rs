//! What operators see: readiness, metrics, the admin endpoint and logs.
//! They read state the source and the pipeline expose.

pub mod admin;
pub mod health;
pub mod logging;
pub mod telemetry;
