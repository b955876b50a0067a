//! The operational endpoints every service serves: `/metrics` (Prometheus text format),
//! `/healthz` (the process is alive: always 200) and `/readyz` (200 when the service
//! can do its work, 503 with the reason when not, e.g. Kafka unreachable or a
//! partition still restoring). The ingest service mounts the same routes on its API.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::core::{Collector, Desc};
use prometheus::process_collector::ProcessCollector;
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, IntGauge, Registry, TextEncoder};

use crate::metrics::Metrics;
use crate::threads::lock;
use crate::Shutdown;

/// Whether a service is ready, and if not, why. Two reasons are kept apart, so that
/// neither clears the other: the service's own (restoring partitions, ClickHouse
/// down), and its Kafka consumer failing ([`crate::kafka::ConsumerHealth`]).
#[derive(Debug, Clone)]
pub struct Readiness {
    not_ready: Arc<Mutex<Option<String>>>,
    consumer_failing: Arc<Mutex<Option<String>>>,
    /// Since when the service's reason has been that it holds no partitions
    /// ([`Readiness::ready_holding`]).
    holding_none_since: Arc<Mutex<Option<Instant>>>,
}

impl Readiness {
    /// Not ready until [`Readiness::ready`] is called.
    pub fn new(reason: &str) -> Self {
        Readiness {
            not_ready: Arc::new(Mutex::new(Some(reason.to_owned()))),
            consumer_failing: Arc::new(Mutex::new(None)),
            holding_none_since: Arc::new(Mutex::new(None)),
        }
    }

    pub fn ready(&self) {
        *lock(&self.holding_none_since) = None;
        set_reason(&self.not_ready, None);
    }

    pub fn not_ready(&self, reason: impl Into<String>) {
        *lock(&self.holding_none_since) = None;
        set_reason(&self.not_ready, Some(reason.into()));
    }

    /// A consumer-group member that has restored what it was assigned: ready if it
    /// holds `held` > 0 partitions. One holding none is ready only once its consumer
    /// finds the group settled with it as a standby ([`crate::kafka::ConsumerHealth`]):
    /// while a group moves partitions to a member that joined, the member holds none
    /// between the rebalance's two steps, and a rolling restart that waited for it
    /// would stop the next instance before this one works.
    pub fn ready_holding(&self, held: usize) {
        if held > 0 {
            return self.ready();
        }
        set_reason(
            &self.not_ready,
            Some("a member of its consumer group holding no partitions yet: ready once it restored some, or once the group has settled with this instance as a standby".to_owned()),
        );
        lock(&self.holding_none_since).get_or_insert_with(Instant::now);
    }

    /// A member's partitions changed without an assignment (revoked, or lost with its
    /// session): as [`Readiness::ready_holding`] says for `held`, unless the service is
    /// not ready for a reason of its own (restoring, ClickHouse down), which stands.
    pub fn held_changed(&self, held: usize) {
        if self.holding_none_since().is_some() || reason_in(&self.not_ready).is_none() {
            self.ready_holding(held);
        }
    }

    /// Since when the only reason has been [`Readiness::ready_holding`]'s, none held.
    pub(crate) fn holding_none_since(&self) -> Option<Instant> {
        *lock(&self.holding_none_since)
    }

    /// The service's consumer has kept failing: not ready, whatever the service says.
    pub fn consumer_failing(&self, reason: impl Into<String>) {
        set_reason(&self.consumer_failing, Some(reason.into()));
    }

    pub fn consumer_recovered(&self) {
        set_reason(&self.consumer_failing, None);
    }

    /// `None` when ready, else the reason: a failing consumer's first, as it explains
    /// the service's own (still joining its group, say).
    pub fn reason(&self) -> Option<String> {
        reason_in(&self.consumer_failing).or_else(|| reason_in(&self.not_ready))
    }
}

fn set_reason(slot: &Mutex<Option<String>>, value: Option<String>) {
    *lock(slot) = value;
}

fn reason_in(slot: &Mutex<Option<String>>) -> Option<String> {
    lock(slot).clone()
}

#[derive(Debug, Clone)]
struct OpsState {
    registry: Registry,
    readiness: Readiness,
    /// `tally_service_ready`, set from `readiness` at each scrape.
    ready: IntGauge,
}

/// `/metrics`, `/healthz` and `/readyz` for one service; `/metrics` also shows the
/// readiness as `tally_service_ready`, so an alert sees a service that is up but stuck
/// (a rater waiting for ClickHouse at start, say), which `up` does not, the build as
/// `tally_build_info`, since upgrade rules are stated per build, and the hash of the
/// price book the service runs as `tally_price_book_info` (with the pipeline's topic
/// prefix), so a dashboard sees a pipeline's services on different books (a rollout
/// half done).
pub fn router(
    registry: Registry,
    readiness: Readiness,
    price_book: &str,
    topic_prefix: &str,
) -> Router {
    let gauges = Metrics::new(registry.clone());
    let ready = gauges.gauge(
        "tally_service_ready",
        "1 while the service is ready (/readyz answers 200), else 0; /readyz and the log say why not.",
    );
    gauges
        .gauge_vec(
            "tally_build_info",
            "1, labelled with the release and the commit the service was built from.",
            &["version", "commit"],
        )
        .with_label_values(&[crate::VERSION, crate::COMMIT])
        .set(1);
    gauges
        .gauge_vec(
            "tally_price_book_info",
            "1, labelled with the hash of the price book the service runs (as `tally validate` prints it and lines carry it as config_hash) and its pipeline's topic prefix.",
            &["hash", "topic_prefix"],
        )
        .with_label_values(&[price_book, topic_prefix])
        .set(1);
    // The process's memory, CPU, open files and start time (`process_*`), which the
    // state a service holds shows in; once per registry (`tally serve all` gives
    // its three services one process).
    match registry.register(Box::new(ProcessMetrics(ProcessCollector::for_self()))) {
        Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
        Err(e) => tracing::warn!(error = %e, "process metrics not exported"),
    }
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState {
            registry,
            readiness,
            ready,
        })
}

/// prometheus' process metrics, with `process_cpu_seconds_total` to the clock tick:
/// its own counts whole seconds, so a service's `rate()` of it moved in steps of a
/// core and read 0 for a process younger than a second of CPU.
struct ProcessMetrics(ProcessCollector);

impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.0.collect();
        let Some(seconds) = cpu_seconds() else {
            return families;
        };
        let cpu = (families.iter_mut()).find(|f| f.name() == "process_cpu_seconds_total");
        for metric in cpu.into_iter().flat_map(|family| family.mut_metric()) {
            let mut counter = metric.get_counter().clone();
            counter.set_value(seconds);
            metric.set_counter(counter);
        }
        families
    }
}

/// The CPU time this process used, user and system, in seconds.
// A metric's seconds, which Prometheus holds as a float: no money passes here.
#[allow(clippy::float_arithmetic)]
fn cpu_seconds() -> Option<f64> {
    let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
    let ticks = stat.utime + stat.stime;
    Some(ticks as f64 / procfs::ticks_per_second() as f64)
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    state
        .ready
        .set(i64::from(state.readiness.reason().is_none()));
    let mut body = Vec::new();
    let encoder = TextEncoder::new();
    match encoder.encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_owned())],
            format!("cannot encode metrics: {e}\n").into_bytes(),
        ),
    }
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    match state.readiness.reason() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// Could not listen where configured.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for {what}: {source}; is another process using the port?")]
pub struct BindError {
    pub addr: SocketAddr,
    pub what: &'static str,
    pub source: std::io::Error,
}

/// Binds `addr` now (so a taken port fails at startup), then serves `router` until
/// shutdown, letting requests in flight finish.
pub async fn serve(
    addr: SocketAddr,
    what: &'static str,
    router: Router,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, BindError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, what, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(%local, what, "listening");
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.requested().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, what, "HTTP server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::float_arithmetic)]
    fn process_cpu_seconds_are_counted_to_the_tick_not_the_second() {
        // Spin until the CPU time is mid-second, where whole seconds are 0.3 s off.
        let mut spun = 0u64;
        while !cpu_seconds().is_some_and(|s| (0.3..0.7).contains(&s.fract())) {
            spun = std::hint::black_box(spun.wrapping_add(1));
        }
        let registry = Registry::new();
        registry
            .register(Box::new(ProcessMetrics(ProcessCollector::for_self())))
            .unwrap();
        let exported = (registry.gather().iter())
            .find(|family| family.name() == "process_cpu_seconds_total")
            .map(|family| family.get_metric()[0].get_counter().get_value())
            .unwrap();
        let used = cpu_seconds().unwrap();
        assert!(
            (used - exported).abs() < 0.2,
            "{exported} s exported, {used} s used"
        );
    }

    #[test]
    fn a_member_holding_none_waits_and_a_reason_of_its_own_outlasts_a_revoke() {
        let readiness = Readiness::new("joining");
        readiness.ready_holding(0);
        let since = readiness.holding_none_since().expect("holding none");
        assert!(readiness.reason().is_some());
        // Still none held: it has held none since the first time.
        readiness.held_changed(0);
        assert_eq!(readiness.holding_none_since(), Some(since));
        readiness.ready_holding(2);
        assert_eq!(
            (readiness.reason(), readiness.holding_none_since()),
            (None, None)
        );
        // Every partition revoked: holding none again, from now.
        readiness.held_changed(0);
        assert!(readiness
            .holding_none_since()
            .is_some_and(|now| now >= since));
        // A reason of the service's own stands through a revoke.
        readiness.not_ready("cannot store the lines in ClickHouse");
        readiness.held_changed(1);
        assert_eq!(
            readiness.reason().as_deref(),
            Some("cannot store the lines in ClickHouse")
        );
    }
}
