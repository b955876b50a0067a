//! The aggregator service's Prometheus metrics. Names and labels are part of the
//! product (dashboards and alerts use them): change them only with the dashboard.

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use tally_runtime::metrics::Metrics;

/// What became of an event read from the events topic: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    Accepted,
    Unmetered,
    Duplicate,
    Conflict,
    TooLate,
    Refused,
    Invalid,
    /// Not an event: a control record (a period close).
    Control,
    /// Read on another partition than Kafka's Java partitioner gives its subject, and
    /// forwarded to that one, where it is counted.
    Forwarded,
}

impl EventOutcome {
    const ALL: [EventOutcome; 9] = [
        EventOutcome::Accepted,
        EventOutcome::Unmetered,
        EventOutcome::Duplicate,
        EventOutcome::Conflict,
        EventOutcome::TooLate,
        EventOutcome::Refused,
        EventOutcome::Invalid,
        EventOutcome::Control,
        EventOutcome::Forwarded,
    ];

    fn label(self) -> &'static str {
        match self {
            EventOutcome::Accepted => "accepted",
            EventOutcome::Unmetered => "unmetered",
            EventOutcome::Duplicate => "duplicate",
            EventOutcome::Conflict => "conflict",
            EventOutcome::TooLate => "too_late",
            EventOutcome::Refused => "refused",
            EventOutcome::Invalid => "invalid",
            EventOutcome::Control => "control",
            EventOutcome::Forwarded => "forwarded",
        }
    }
}

/// Outcomes counted on a partition's processing thread, added to the shared counters
/// once per batch rather than once per event.
#[derive(Debug, Default)]
pub(super) struct OutcomeCounts {
    events: [u64; EventOutcome::ALL.len()],
    pub late_revised: u64,
    pub late_adjusted: u64,
}

impl OutcomeCounts {
    pub fn add(&mut self, outcome: EventOutcome) {
        // `ALL` lists the variants in declaration order.
        self.events[outcome as usize] += 1;
    }
}

#[derive(Debug, Clone)]
pub struct AggregatorMetrics {
    pub registry: Registry,
    /// By [`EventOutcome`], resolved once: counted per event.
    events: [IntCounter; EventOutcome::ALL.len()],
    /// `reason`: the code written to the rejected topic.
    pub rejected: IntCounterVec,
    /// Late events that revised a window already emitted, and those carried into a
    /// later period as adjustments.
    pub late_revised: IntCounter,
    pub late_adjusted: IntCounter,
    /// Events Kafka deleted (retention) before this partition's state counted them.
    pub lost_to_retention: IntCounter,
    /// `tally_aggregator_transactions_total`, `result` committed and aborted: both
    /// exported from the start, so an alert's `increase` sees the first abort.
    pub transactions_committed: IntCounter,
    pub transactions_aborted: IntCounter,
    pub transaction_duration: Histogram,
    pub window_updates: IntCounter,
    /// From an event's append to Kafka to the commit carrying its window.
    pub window_latency: Histogram,
    pub dedupe_keys: IntGauge,
    pub series: IntGauge,
    pub assigned_partitions: IntGauge,
    /// Partitions added to the events topic after the pipeline was made.
    pub unread_partitions: IntGauge,
    pub restore_duration: Histogram,
    pub consumer_lag: IntGaugeVec,
    /// `partition`: the newest event time seen, and the time periods ending at or
    /// before which are closed; Unix seconds.
    pub watermark: IntGaugeVec,
    pub closed_before: IntGaugeVec,
}

impl AggregatorMetrics {
    pub fn new(registry: Registry) -> Self {
        let m = Metrics::new(registry.clone());
        let events = m.counter_vec(
            "tally_aggregator_events_total",
            "Events read from the events topic, by what became of them. `forwarded`: read on another partition than Kafka's Java partitioner (murmur2) gives their subject (their producer partitions otherwise, as librdkafka's default does) and written to that one, where they are counted again; set partitioner=murmur2_random in that producer (if partitions were added to the events topic, key to murmur2 over the pipeline's count: README, \"Changing the partition count\").",
            &["outcome"],
        );
        let late = m.counter_vec(
            "tally_aggregator_late_events_total",
            "Events behind the watermark's window, by what was done with them.",
            &["outcome"],
        );
        let transactions = m.counter_vec(
            "tally_aggregator_transactions_total",
            "Kafka transactions, by result.",
            &["result"],
        );
        AggregatorMetrics {
            events: EventOutcome::ALL.map(|o| events.with_label_values(&[o.label()])),
            late_revised: late.with_label_values(&["revised"]),
            late_adjusted: late.with_label_values(&["adjusted"]),
            lost_to_retention: m.counter(
                "tally_aggregator_events_lost_to_retention_total",
                "Events the events topic no longer held when a partition's state resumed (deleted by retention while the aggregator was down or behind): never billed. Raise the topic's retention.ms above the longest outage.",
            ),
            rejected: {
                let rejected = m.counter_vec(
                    "tally_aggregator_rejected_events_total",
                    "Events written to the rejected topic, by reason.",
                    &["reason"],
                );
                // Exported from the start, so TallyEventsTooLate's increase() sees the
                // first one: such usage bills nothing unless someone looks.
                rejected.with_label_values(&["too_late"]);
                rejected
            },
            transactions_committed: transactions.with_label_values(&["committed"]),
            transactions_aborted: transactions.with_label_values(&["aborted"]),
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
            series: m.gauge(
                "tally_aggregator_series",
                "Series (customer, meter, group values) held across assigned partitions; those whose every period has settled are let go.",
            ),
            assigned_partitions: m.gauge(
                "tally_aggregator_assigned_partitions",
                "Partitions of the events topic this instance owns.",
            ),
            unread_partitions: m.gauge(
                "tally_aggregator_unread_partitions",
                "Partitions of the events topic past the pipeline's partition count (added after it was made): no aggregator reads them, so events written there are not billed. Checked every minute.",
            ),
            restore_duration: m.latency(
                "tally_aggregator_restore_duration_seconds",
                "Time to restore a partition's state from the changelog.",
            ),
            consumer_lag: m.consumer_lag(),
            watermark: m.gauge_vec(
                "tally_aggregator_watermark_timestamp_seconds",
                "Per owned partition of the events topic: the newest event time seen.",
                &["partition"],
            ),
            closed_before: m.gauge_vec(
                "tally_aggregator_closed_before_timestamp_seconds",
                "Per owned partition: periods ending at or before this time are closed (the watermark less period_close_grace, or a later tally close-period).",
                &["partition"],
            ),
            registry,
        }
    }

    pub(super) fn count(&self, counts: &OutcomeCounts) {
        for (counter, &n) in self.events.iter().zip(&counts.events) {
            counter.inc_by(n);
        }
        self.late_revised.inc_by(counts.late_revised);
        self.late_adjusted.inc_by(counts.late_adjusted);
    }
}
