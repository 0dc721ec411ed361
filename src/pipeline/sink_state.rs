//! One sink's health as the pipeline sees it (last check, last delivery)
//! and its metric handles; `ops::health` reads it for `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use evbridge_sinks::Sink;
use metrics::{Counter, Gauge, Histogram};

use crate::metric_names as t;

/// One sink's health and its metric handles (labelled with the sink's
/// redacted URL).
pub struct SinkState {
    /// The sink itself, for periodic health checks.
    pub sink: Arc<dyn Sink>,
    check_ok: AtomicBool,
    send_ok: AtomicBool,
    last_error: Mutex<Option<String>>,
    pub(crate) sent: Counter,
    pub(crate) filtered: Counter,
    /// Whether the sink has a name filter to ask.
    pub(crate) filters: bool,
    pub(crate) failed_retryable: Counter,
    pub(crate) failed_permanent: Counter,
    pub(crate) retries: Counter,
    pub(crate) send_seconds: Histogram,
    up: Gauge,
}

impl SinkState {
    /// Not healthy until its first check passed.
    pub fn new(sink: Arc<dyn Sink>, role: &'static str) -> Arc<Self> {
        let name = sink.describe().to_string();
        let labels = [("sink", name), ("role", role.to_string())];
        Arc::new(SinkState {
            check_ok: AtomicBool::new(false),
            send_ok: AtomicBool::new(true),
            last_error: Mutex::new(Some("not checked yet".into())),
            sent: metrics::counter!(t::SINK_SENT, &labels),
            filtered: metrics::counter!(t::SINK_FILTERED, &labels),
            filters: sink.filters(),
            failed_retryable: metrics::counter!(t::SINK_FAILED, &labels_with(&labels, "retryable")),
            failed_permanent: metrics::counter!(t::SINK_FAILED, &labels_with(&labels, "permanent")),
            retries: metrics::counter!(t::SINK_RETRIES, &labels),
            send_seconds: metrics::histogram!(t::SINK_SEND_SECONDS, &labels),
            up: metrics::gauge!(t::SINK_UP, &labels),
            sink,
        })
    }

    /// Whether deliveries and checks currently succeed.
    pub fn is_up(&self) -> bool {
        self.check_ok.load(Ordering::Acquire) && self.send_ok.load(Ordering::Acquire)
    }

    /// Why it is not up, if it is not.
    pub fn problem(&self) -> Option<String> {
        if self.is_up() {
            return None;
        }
        Some(
            self.last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| "unhealthy".into()),
        )
    }

    fn set(&self, flag: &AtomicBool, error: Option<String>) {
        let ok = error.is_none();
        flag.store(ok, Ordering::Release);
        if let Some(e) = error {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        }
        self.up.set(if self.is_up() { 1.0 } else { 0.0 });
    }

    /// The outcome of a health check.
    pub fn checked(&self, error: Option<String>) {
        self.set(&self.check_ok, error);
    }

    /// The outcome of a delivery (permanent rejections say nothing about
    /// the sink's health and are not reported here).
    pub fn delivered(&self, error: Option<String>) {
        if error.is_some() || !self.send_ok.load(Ordering::Acquire) {
            self.set(&self.send_ok, error);
        }
    }
}

fn labels_with(base: &[(&'static str, String); 2], class: &str) -> [(&'static str, String); 3] {
    [
        base[0].clone(),
        base[1].clone(),
        ("error", class.to_string()),
    ]
}
