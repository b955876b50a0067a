//! Registering Prometheus metrics without repeating the boilerplate. Each service owns a
//! [`Registry`] (so `tally serve all` still shows each service its own series) and
//! builds its metrics here. Names follow Prometheus conventions: `tally_` prefix,
//! `_total` for counters, base units (`_seconds`, `_bytes`) in the name. Labels are
//! bounded sets (outcome, reason, route, partition), never customer or event ids.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Latency buckets from 1 ms to 1 h, for everything Tally times: requests and inserts
/// take milliseconds, but a restore or the age of usage behind a backlog can take
/// minutes, and a quantile must not stop at the last bucket just when it matters.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Observes, in seconds, how long ago a Kafka timestamp (ms since the epoch) was, and
/// returns that age in ms; a timestamp from a clock ahead of this one counts as now.
pub fn observe_age(histogram: &Histogram, timestamp_ms: i64) -> u64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let age_ms = now_ms.saturating_sub(timestamp_ms).max(0).unsigned_abs();
    histogram.observe(std::time::Duration::from_millis(age_ms).as_secs_f64());
    age_ms
}

/// Registers metrics in one registry. Registration only fails for a name registered
/// twice or an invalid name, both programming errors caught by every test that starts
/// a service; those panic with the name.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(registry: Registry) -> Self {
        Metrics { registry }
    }

    fn register<M: prometheus::core::Collector + Clone + 'static>(&self, name: &str, m: M) -> M {
        if let Err(e) = self.registry.register(Box::new(m.clone())) {
            panic!("metric {name} cannot be registered: {e}");
        }
        m
    }

    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        let m = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
        self.register(name, m)
    }

    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let m = IntCounterVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| panic!("metric {name}: {e}"));
        self.register(name, m)
    }

    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let m = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
        self.register(name, m)
    }

    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let m = IntGaugeVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| panic!("metric {name}: {e}"));
        self.register(name, m)
    }

    /// A latency histogram in seconds.
    pub fn latency(&self, name: &str, help: &str) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        let m = Histogram::with_opts(opts).unwrap_or_else(|e| panic!("metric {name}: {e}"));
        self.register(name, m)
    }

    /// `tally_kafka_consumer_lag_messages{topic, partition}`, kept by
    /// [`crate::kafka::record_lag`].
    pub fn consumer_lag(&self) -> IntGaugeVec {
        self.gauge_vec(
            "tally_kafka_consumer_lag_messages",
            "Messages between a partition's position and its high watermark.",
            &["topic", "partition"],
        )
    }

    pub fn latency_vec(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        let m = HistogramVec::new(opts, labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
        self.register(name, m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_age_is_observed_in_seconds_and_a_timestamp_from_ahead_counts_as_now() {
        let histogram = Histogram::with_opts(HistogramOpts::new("age", "age")).unwrap();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let age = observe_age(&histogram, now_ms - 1_500);
        assert!((1_500..60_000).contains(&age), "{age} ms");
        assert_eq!(observe_age(&histogram, now_ms + 60_000), 0);
        assert_eq!(histogram.get_sample_count(), 2);
        let sum = histogram.get_sample_sum();
        assert!((1.5..60.0).contains(&sum), "{sum} s");
    }
}
