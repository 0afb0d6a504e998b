//! Prometheus metrics and the HTTP endpoints beside gRPC: `/metrics`, `/healthz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::scheduler::Counts;

/// The coordinator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    queued: Gauge<i64, AtomicI64>,
    leased: Gauge<i64, AtomicI64>,
    done: Gauge<i64, AtomicI64>,
    failed: Gauge<i64, AtomicI64>,
    workers: Gauge<i64, AtomicI64>,
    retries: Gauge<i64, AtomicI64>,
    /// Rows committed to the tables.
    pub rows_written: Counter<u64, AtomicU64>,
    /// Results accepted.
    pub completions: Counter<u64, AtomicU64>,
    /// Seconds a worker spent on each accepted job.
    pub job_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("causal_trace");
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::<i64, AtomicI64>::default();
            registry.register(name, help, g.clone());
            g
        };
        let queued = gauge(&mut registry, "jobs_queued", "Jobs waiting for a worker");
        let leased = gauge(&mut registry, "jobs_leased", "Jobs being computed");
        let done = gauge(&mut registry, "jobs_done", "Jobs done (earlier runs included)");
        let failed = gauge(&mut registry, "jobs_failed", "Jobs given up after their retries");
        let workers = gauge(&mut registry, "workers", "Workers seen within one lease period");
        let retries = gauge(
            &mut registry,
            "job_retries",
            "Tries that failed or expired and were queued again",
        );
        let rows_written = Counter::default();
        registry.register(
            "rows_written",
            "Rows committed to the Parquet tables",
            rows_written.clone(),
        );
        let completions = Counter::default();
        registry.register("job_completions", "Results accepted", completions.clone());
        let job_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 20));
        registry.register("job_seconds", "Seconds a worker spent on a job", job_seconds.clone());
        Self {
            registry,
            queued,
            leased,
            done,
            failed,
            workers,
            retries,
            rows_written,
            completions,
            job_seconds,
        }
    }
}

impl Metrics {
    /// Publishes the scheduler's counts.
    pub fn set_counts(&self, c: &Counts) {
        let set = |g: &Gauge<i64, AtomicI64>, v: u64| g.set(i64::try_from(v).unwrap_or(i64::MAX));
        set(&self.queued, c.queued);
        set(&self.leased, c.leased);
        set(&self.done, c.done);
        set(&self.failed, c.failed);
        set(&self.workers, c.workers);
        set(&self.retries, c.retries);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = encode(&mut text, &self.registry) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        text
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(|State(m): State<Arc<Metrics>>| async move { m.render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
