//! The operations endpoint (`--metrics-listen`): `/metrics` in the
//! Prometheus text format, `/healthz` (the process answers) and `/readyz`
//! (the source has a stream open and every sink is healthy; 503 with the
//! reasons otherwise), the conventions of Vector and Redpanda Connect.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::ops::health::Health;
use crate::shutdown::Shutdown;

/// What the endpoint reads from.
#[derive(Clone)]
pub struct Admin {
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Answers `/readyz`.
    pub health: Arc<Health>,
    /// Called before each scrape to bring read-off gauges up to date.
    pub refresh: Arc<dyn Fn() + Send + Sync>,
}

/// Serves the endpoint on `listener` until shutdown.
pub async fn serve(listener: TcpListener, admin: Admin, mut shutdown: Shutdown) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(admin);
    let stop = async move { shutdown.wait().await };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
}

async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    (admin.refresh)();
    admin.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        admin.metrics.render(),
    )
}

async fn ready(State(admin): State<Admin>) -> impl IntoResponse {
    let (status, mut body) = match admin.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", problems.join("\n")),
        ),
    };
    for note in admin.health.notes() {
        body.push_str("note: ");
        body.push_str(&note);
        body.push('\n');
    }
    (status, body)
}
