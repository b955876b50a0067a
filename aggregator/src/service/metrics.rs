//! The aggregator service's Prometheus metrics. Names and labels are part of the
//! product (dashboards and alerts use them): change them only with the dashboard.

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use tally_runtime::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct AggregatorMetrics {
    pub registry: Registry,
    /// `outcome`: accepted, unmetered, duplicate, conflict, too_late, refused, invalid.
    pub events: IntCounterVec,
    /// `reason`: the code written to the rejected topic.
    pub rejected: IntCounterVec,
    /// `outcome`: revised (a window already emitted changed).
    pub late: IntCounterVec,
    /// `result`: committed, aborted.
    pub transactions: IntCounterVec,
    pub transaction_duration: Histogram,
    pub window_updates: IntCounter,
    /// From an event's append to Kafka to the commit carrying its window.
    pub window_latency: Histogram,
    pub dedupe_keys: IntGauge,
    pub assigned_partitions: IntGauge,
    pub restore_duration: Histogram,
    pub consumer_lag: IntGaugeVec,
}

impl AggregatorMetrics {
    pub fn new(registry: Registry) -> Self {
        let m = Metrics::new(registry.clone());
        AggregatorMetrics {
            events: m.counter_vec(
                "tally_aggregator_events_total",
                "Events read from the events topic, by what became of them.",
                &["outcome"],
            ),
            rejected: m.counter_vec(
                "tally_aggregator_rejected_events_total",
                "Events written to the rejected topic, by reason.",
                &["reason"],
            ),
            late: m.counter_vec(
                "tally_aggregator_late_events_total",
                "Events that arrived after their window had been emitted, by what was done.",
                &["outcome"],
            ),
            transactions: m.counter_vec(
                "tally_aggregator_transactions_total",
                "Kafka transactions, by result.",
                &["result"],
            ),
            transaction_duration: m.latency(
                "tally_aggregator_transaction_duration_seconds",
                "Time to commit a transaction (produce, send offsets, commit).",
            ),
            window_updates: m.counter(
                "tally_aggregator_window_updates_total",
                "Window aggregates written to the windows topic.",
            ),
            window_latency: m.latency(
                "tally_aggregator_window_latency_seconds",
                "From the oldest event of a transaction reaching Kafka to its windows being committed.",
            ),
            dedupe_keys: m.gauge(
                "tally_aggregator_dedupe_keys",
                "(source, id) keys held for dedupe across assigned partitions.",
            ),
            assigned_partitions: m.gauge(
                "tally_aggregator_assigned_partitions",
                "Partitions of the events topic this instance owns.",
            ),
            restore_duration: m.latency(
                "tally_aggregator_restore_duration_seconds",
                "Time to restore a partition's state from the changelog.",
            ),
            consumer_lag: m.gauge_vec(
                "tally_kafka_consumer_lag_messages",
                "Messages between a partition's position and its high watermark.",
                &["topic", "partition"],
            ),
            registry,
        }
    }
}
