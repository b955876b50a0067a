//! The rater service's Prometheus metrics. Names and labels are part of the product
//! (dashboards and alerts use them): change them only with the dashboard.

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use tally_runtime::metrics::Metrics;

use crate::Recorded;

/// Why usage is not billed, as the `reason` label of `tally_rater_unbilled_usage_total`.
const UNBILLED_REASONS: [(Recorded, &str); 4] = [
    (Recorded::UnknownCustomer, "unknown_customer"),
    (Recorded::NotPriced, "not_priced"),
    (Recorded::NotSubscribed, "not_subscribed"),
    (Recorded::SettledPeriod, "settled_period"),
];

#[derive(Debug, Clone)]
pub struct RaterMetrics {
    pub registry: Registry,
    pub usage_updates: IntCounter,
    pub lines_rated: IntCounter,
    /// By [`UNBILLED_REASONS`], each exported from the start, so an alert's `increase`
    /// sees the first unbilled update ([`RaterMetrics::count_unbilled`]).
    unbilled: [IntCounter; UNBILLED_REASONS.len()],
    /// Per stored batch: from its oldest usage update reaching Kafka to the batch being
    /// stored in ClickHouse.
    pub rating_latency: Histogram,
    pub insert_duration: Histogram,
    /// `table`: rated_lines, window_revisions.
    pub inserted_rows: IntCounterVec,
    pub insert_failures: IntCounter,
    pub query_failures: IntCounter,
    pub rating_failures: IntCounter,
    /// Partitions whose stored lines were checked against the price book.
    pub price_book_checks: IntCounter,
    /// Stored lines retired after a price-book change no longer makes them.
    pub lines_retired: IntCounter,
    /// Lines of months that have ended whose amount a price-book check changed, or
    /// that it added.
    pub ended_month_lines_repriced: IntCounter,
    /// Lines with an amount of months that had ended when their first usage here
    /// opened them.
    pub ended_month_lines_opened: IntCounter,
    /// Partitions rated again from their beginning because ClickHouse had lost their
    /// stored lines.
    pub lost_line_replays: IntCounter,
    /// Partitions whose newest lines ClickHouse held in older versions than their
    /// committed offsets account for; their open months were stored again.
    pub stale_partitions_restated: IntCounter,
    /// Lines held in the assigned partitions' ledgers: the open periods'.
    pub ledger_lines: IntGauge,
    /// Usage series the held lines hold: what a sender's distinct `group_by` values
    /// grow, where lines do not.
    pub ledger_series: IntGauge,
    /// Lines held whose last rating failed: each stays at its last stored amount.
    pub unrated_lines: IntGauge,
    pub consumer_lag: IntGaugeVec,
}

impl RaterMetrics {
    pub fn new(registry: Registry) -> Self {
        let m = Metrics::new(registry.clone());
        RaterMetrics {
            usage_updates: m.counter(
                "tally_rater_usage_updates_total",
                "Usage updates (a series' period-to-date value) read from the windows topic.",
            ),
            lines_rated: m.counter(
                "tally_rater_lines_rated_total",
                "Invoice line revisions rated and stored.",
            ),
            unbilled: {
                let unbilled = m.counter_vec(
                    "tally_rater_unbilled_usage_total",
                    "Usage updates that no line bills, by reason.",
                    &["reason"],
                );
                UNBILLED_REASONS.map(|(_, reason)| unbilled.with_label_values(&[reason]))
            },
            rating_latency: m.latency(
                "tally_rater_rating_latency_seconds",
                "Per stored batch, from its oldest usage update reaching Kafka to the batch's lines being stored.",
            ),
            insert_duration: m.latency(
                "tally_clickhouse_insert_duration_seconds",
                "Time to store one batch in ClickHouse: its lines, retired lines and windows.",
            ),
            inserted_rows: m.counter_vec(
                "tally_clickhouse_inserted_rows_total",
                "Rows inserted into ClickHouse, by table.",
                &["table"],
            ),
            insert_failures: m.counter(
                "tally_clickhouse_insert_failures_total",
                "Inserts into ClickHouse that failed (and were retried).",
            ),
            query_failures: m.counter(
                "tally_clickhouse_query_failures_total",
                "ClickHouse queries that failed and were retried: the price-book checks of the stored lines, and at start making the schema (a wrong login or database counts here from the first try).",
            ),
            rating_failures: m.counter(
                "tally_rater_rating_failures_total",
                "Flushes in which a line could not be rated (it stays pending).",
            ),
            price_book_checks: m.counter(
                "tally_rater_price_book_checks_total",
                "Partitions whose stored lines were checked against the price book (each when assigned, and every price_book_check_interval).",
            ),
            lines_retired: m.counter(
                "tally_rater_lines_retired_total",
                "Stored invoice lines retired because the current price book no longer makes them.",
            ),
            ended_month_lines_repriced: m.counter(
                "tally_rater_ended_month_lines_repriced_total",
                "Invoice lines of months that have ended whose amount a new price book changed, or that it added (a price or a customer billed in such a month): they may have been invoiced as they were.",
            ),
            ended_month_lines_opened: m.counter(
                "tally_rater_ended_month_lines_opened_total",
                "Invoice lines with an amount (flat fees, first tiers' flat amounts) of months that had ended, and had no stored line, when usage of them first reached a partition, which opened them: a month backfilled or sent late, or a pipeline started after it. They may have been invoiced already, or by another biller.",
            ),
            lost_line_replays: m.counter(
                "tally_rater_lost_line_replays_total",
                "Partitions rated again from their beginning because ClickHouse had none of their stored lines (a database dropped or emptied, or restored from a backup older than those lines).",
            ),
            stale_partitions_restated: m.counter(
                "tally_rater_stale_partitions_restated_total",
                "Partitions whose newest stored lines ClickHouse held only in versions older than their committed offsets account for (a database restored from an older backup, or a rater that wrote to another database meanwhile): their open months' lines were stored again.",
            ),
            ledger_lines: m.gauge(
                "tally_rater_ledger_lines",
                "Invoice lines held in memory across assigned partitions; a settled period's are let go.",
            ),
            ledger_series: m.gauge(
                "tally_rater_ledger_series",
                "Usage series (customer, meter, group_by values) the held lines hold, one under each line that selects it; a settled period's are let go.",
            ),
            unrated_lines: m.gauge(
                "tally_rater_unrated_lines",
                "Invoice lines held that could not be rated the last time their usage changed (an amount past what a line stores); ClickHouse and the rated topic hold each at its last stored amount until it rates.",
            ),
            consumer_lag: m.consumer_lag(),
            registry,
        }
    }

    /// Counts a usage update by what became of it, if no line bills it.
    pub fn count_unbilled(&self, recorded: Recorded) {
        if let Some(i) = unbilled_index(recorded) {
            self.unbilled[i].inc();
        }
    }
}

/// The `reason` label of usage no line bills; `None` for billed usage.
pub(super) fn unbilled_reason(recorded: Recorded) -> Option<&'static str> {
    unbilled_index(recorded).map(|i| UNBILLED_REASONS[i].1)
}

fn unbilled_index(recorded: Recorded) -> Option<usize> {
    UNBILLED_REASONS.iter().position(|(r, _)| *r == recorded)
}
