//! The batch: rated lines to `<prefix>.rated`, then to ClickHouse, then the offsets.
//!
//! In: the lines rated since the last store, per partition, with the offsets they
//! account for. Out, in this order: the lines to the rated topic (confirmed by Kafka),
//! the rows to ClickHouse (batched inserts, idempotent by id and version), then the
//! windows offsets, synchronously, so an offset never passes what is stored. A failed
//! step pauses the partitions and is retried with backoff, never written twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tally_runtime::kafka::{failed_to, flush, held_partitions, is_rebalancing, send_until};
use tally_runtime::metrics::observe_age;
use tally_schemas::config::RaterSettings;
use tally_schemas::records::{InvoiceLine, SeriesKey};

use crate::clickhouse::{ClickHouseError, Repricing, StoredLine, StoredWindow};
use crate::ledger::RatedLine;

use super::rebuild_point::RebuildPoint;
use super::records::{RatedRecord, RetiredRecord};
use super::{
    ClickHouseTrouble, GroupConsumer, RaterError, Worker, DELIVERY_WAIT, MAX_BATCH_UPDATES,
};

/// Lines rated but not yet stored, with the offsets they account for.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// By partition: the rows of a partition given up before they are stored leave
    /// with it ([`Pending::let_go`]).
    pub(super) rows: BTreeMap<i32, PartitionRows>,
    pub(super) offsets: BTreeMap<i32, (i64, RebuildPoint)>,
    /// Kafka timestamp (ms) of the oldest usage update in the batch.
    pub(super) oldest_update_ms: Option<i64>,
    pub(super) updates: usize,
    pub(super) started: Option<Instant>,
}

/// One partition's rows of a batch.
#[derive(Debug, Default)]
pub(super) struct PartitionRows {
    /// Zero-usage lines of newly seen periods, written (to `<prefix>.rated` and
    /// ClickHouse) at version 0.
    pub(super) opening: Vec<InvoiceLine>,
    /// The windows the batch's usage updates changed, each in its latest state
    /// (`[rater] store_windows`).
    pub(super) windows: HashMap<(Arc<SeriesKey>, chrono::DateTime<chrono::Utc>), StoredWindow>,
    pub(super) lines: Vec<(u64, RatedLine)>,
    /// Stored lines the price book no longer makes, to retire at these versions.
    pub(super) retired: Vec<(u64, StoredLine)>,
    /// What a new price book changed of stored lines, kept for support.
    pub(super) repricings: Vec<(u64, Repricing)>,
}

impl Pending {
    /// `partition`'s rows, to add to.
    pub(super) fn rows(&mut self, partition: i32) -> &mut PartitionRows {
        self.rows.entry(partition).or_default()
    }

    pub(super) fn opening(&self) -> impl Iterator<Item = &InvoiceLine> {
        self.rows.values().flat_map(|rows| &rows.opening)
    }

    pub(super) fn windows(&self) -> impl Iterator<Item = &StoredWindow> {
        self.rows.values().flat_map(|rows| rows.windows.values())
    }

    pub(super) fn lines(&self) -> impl Iterator<Item = &(u64, RatedLine)> {
        self.rows.values().flat_map(|rows| &rows.lines)
    }

    pub(super) fn retired(&self) -> impl Iterator<Item = &(u64, StoredLine)> {
        self.rows.values().flat_map(|rows| &rows.retired)
    }

    pub(super) fn repricings(&self) -> impl Iterator<Item = &(u64, Repricing)> {
        self.rows.values().flat_map(|rows| &rows.repricings)
    }

    /// Leaves out a partition given up before its rows were stored: its next owner
    /// rates them again, perhaps with another price book, at the same versions, and
    /// rows stored from here later would win over that owner's.
    pub(super) fn let_go(&mut self, partition: i32) {
        self.rows.remove(&partition);
        self.offsets.remove(&partition);
    }
}

/// A batch on its way out: its lines go to `<prefix>.rated`, then to ClickHouse, then
/// the offsets they account for are committed. Kafka first: a line ClickHouse holds is
/// on the topic too, so a rater that dies in between leaves nothing the topic lacks
/// (the lines a price-book check re-rated would otherwise be missed there for good: a
/// restarted rater finds them current in ClickHouse and does not rate them again).
/// A step that fails is retried from that step.
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) batch: Pending,
    /// ClickHouse holds the batch: only its offsets are left to commit.
    pub(super) stored: bool,
}

impl Worker {
    /// Whether to store the pending batch now: when it is full, when its oldest line
    /// has waited `flush_interval`, or when a poll found nothing more to read
    /// (`caught_up`) and the last insert is `min_insert_interval` ago. Lines then reach
    /// ClickHouse soon after the commit that made them visible, and inserts stay at
    /// most one per `min_insert_interval` however many aggregators commit.
    pub(super) fn store_due(&self, settings: &RaterSettings, caught_up: bool) -> bool {
        if let Some((at, _)) = self.retry_at {
            return Instant::now() >= at;
        }
        let Some(started) = self.pending.started else {
            return false;
        };
        self.pending.updates >= MAX_BATCH_UPDATES
            || started.elapsed() >= settings.flush_interval
            || caught_up
                && self
                    .last_insert
                    .is_none_or(|at| at.elapsed() >= settings.min_insert_interval)
    }

    /// Rates the changed lines, writes them to `rated` and ClickHouse, then commits the
    /// offsets they account for. If Kafka does not confirm the rated lines in time, or
    /// ClickHouse refuses, the partitions are paused and the step that failed is retried
    /// later with backoff; nothing is written twice to `rated` by a retry.
    pub(super) fn store(&mut self, consumer: &GroupConsumer) -> Result<(), RaterError> {
        self.finish(consumer)?;
        let checked = match self.verify_stored_lines() {
            Ok(Some(partition)) => return Err(RaterError::StoredLinesLost { partition }),
            Ok(None) => (self.check_price_book())
                .map_err(|e| ("check the stored lines against the price book", e)),
            Err(e) => Err(("look the stored lines up", e)),
        };
        if let Err((what, e)) = checked {
            self.metrics.query_failures.inc();
            return Err(self.clickhouse_failed(consumer, &format!("cannot {what}"), e));
        }
        self.collect_changed_lines();
        if self.pending.offsets.is_empty() {
            // Nothing left to store (what was pending belonged to revoked partitions).
            self.pending = Pending::default();
            self.resume(consumer);
            return Ok(());
        }
        if let Err(e) = self.queue_rated_lines(&self.pending) {
            if !matches!(e, RaterError::Undelivered { .. }) {
                self.hold(
                    consumer,
                    "Kafka has not taken the rated lines",
                    e.to_string(),
                );
            }
            return Err(e);
        }
        self.in_flight = Some(InFlight {
            batch: std::mem::take(&mut self.pending),
            stored: false,
        });
        self.finish(consumer)
    }

    /// Takes the batch in flight, if any, through its remaining steps ([`InFlight`]);
    /// on a failure it stays in flight for the retry.
    fn finish(&mut self, consumer: &GroupConsumer) -> Result<(), RaterError> {
        let Some(mut in_flight) = self.in_flight.take() else {
            return Ok(());
        };
        let finished = self.deliver_store_commit(consumer, &mut in_flight);
        if finished.is_err() {
            self.in_flight = Some(in_flight);
        }
        finished
    }

    /// Waits for Kafka to confirm the batch's rated lines, stores the batch in
    /// ClickHouse, then commits its offsets. At least once downstream: delivered before
    /// stored, stored before the offsets move on. Not confirmed yet (a broker restart,
    /// say): librdkafka keeps the lines and keeps sending them, and the wait is retried
    /// later.
    fn deliver_store_commit(
        &mut self,
        consumer: &GroupConsumer,
        in_flight: &mut InFlight,
    ) -> Result<(), RaterError> {
        let flushed = flush(&self.producer, DELIVERY_WAIT);
        if let Some(refused) = self.undelivered() {
            return Err(refused);
        }
        if let Err(e) = flushed {
            self.hold(
                consumer,
                "Kafka has not confirmed the rated lines",
                e.to_string(),
            );
            return Err(failed_to("deliver rated lines to the rated topic")(e).into());
        }
        if !in_flight.stored {
            if let Err(e) = self.write_batch(&in_flight.batch) {
                self.metrics.insert_failures.inc();
                return Err(self.clickhouse_failed(
                    consumer,
                    "cannot store the lines in ClickHouse",
                    e,
                ));
            }
            in_flight.stored = true;
        }
        let mut offsets = TopicPartitionList::new();
        for (&partition, (offset, point)) in &in_flight.batch.offsets {
            let mut committing = offsets.add_partition(&self.topic, partition);
            (committing.set_offset(Offset::Offset(*offset)))
                .map_err(failed_to("list the offsets to commit"))?;
            committing.set_metadata(point.to_metadata());
        }
        // The partitions may have been revoked meanwhile (nothing to commit then):
        // their next owner re-reads them.
        if offsets.count() > 0 {
            if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
                // Kept in flight: a partition with no later updates would otherwise
                // stay behind its stored lines until the rater restarts.
                match is_rebalancing(&e) {
                    true => self.hold_while_rebalancing(consumer, e.to_string()),
                    false => {
                        self.hold(consumer, "Kafka refused the windows offsets", e.to_string())
                    }
                }
                return Err(
                    failed_to(format!("commit the offsets read of {}", self.topic))(e).into(),
                );
            }
        }
        self.resume(consumer);
        Ok(())
    }

    /// Inserts the batch's lines into ClickHouse, retires the stale ones, then inserts
    /// the batch's windows.
    fn write_batch(&mut self, batch: &Pending) -> Result<(), ClickHouseError> {
        let rows: Vec<(u64, &InvoiceLine)> = (batch.opening().map(|line| (0, line)))
            .chain(batch.lines().map(|(v, l)| (*v, &l.line)))
            .collect();
        let retiring = batch.retired().count();
        let windows = batch.windows().count();
        let repricings = batch.repricings().count();
        if rows.is_empty() && retiring == 0 && windows == 0 && repricings == 0 {
            // Records that changed nothing stored (a settled record, usage of unknown
            // customers without its windows): their offsets move on without an insert.
            return Ok(());
        }
        let started = Instant::now();
        self.last_insert = Some(started);
        // Before the lines they explain: a retry after a failure, or the partition's
        // next owner, makes the same rows again, which replace these.
        self.clickhouse.insert_repricings(batch.repricings())?;
        self.clickhouse.insert_versioned(&rows)?;
        // After the lines: a retry after a failure here writes both again, unchanged.
        let mut retired: BTreeMap<u64, Vec<&StoredLine>> = BTreeMap::new();
        for (version, line) in batch.retired() {
            retired.entry(*version).or_default().push(line);
        }
        for (version, lines) in retired {
            self.clickhouse.retire(version, lines)?;
        }
        // After the lines, so those are queryable without waiting for the windows
        // (the commit and the next batch still wait).
        self.clickhouse.insert_windows(batch.windows())?;
        self.metrics
            .insert_duration
            .observe(started.elapsed().as_secs_f64());
        let inserted = |table: &str, rows: usize| {
            (self.metrics.inserted_rows.with_label_values(&[table])).inc_by(rows as u64)
        };
        inserted("rated_lines", rows.len());
        inserted("window_revisions", windows);
        inserted("line_repricings", repricings);
        self.metrics.lines_retired.inc_by(retiring as u64);
        (self.metrics.lines_rated).inc_by(batch.lines().count() as u64);
        if let Some(ms) = batch.oldest_update_ms {
            observe_age(&self.metrics.rating_latency, ms);
        }
        Ok(())
    }

    /// Hands the batch's lines to the producer for `<prefix>.rated`. A line the
    /// producer will not take (too large, a fatal producer error) stops the rater
    /// before its batch's offsets are committed, as a line Kafka refuses does. If the
    /// producer's queue stays full for `DELIVERY_WAIT` (Kafka away during a batch
    /// larger than the queue), it fails so the loop can pause and poll; the retry
    /// queues the batch from its start, and consumers see those lines twice, at the
    /// same version.
    fn queue_rated_lines(&self, batch: &Pending) -> Result<(), RaterError> {
        let mut deadline = Instant::now() + DELIVERY_WAIT;
        // Stored at version 0, as they are in ClickHouse.
        let opening = batch.opening().map(|line| RatedRecord {
            line,
            revision: 0,
            delta: line.amount,
            version: 0,
            superseded: false,
        });
        let rated = batch.lines().map(|(version, rated)| RatedRecord {
            line: &rated.line,
            revision: rated.revision,
            delta: rated.delta,
            version: *version,
            superseded: false,
        });
        let rated =
            (opening.chain(rated)).map(|record| (&record.line.id, serde_json::to_vec(&record)));
        let retired = batch.retired().map(|(version, line)| {
            let record = RetiredRecord {
                id: &line.id,
                customer: &line.customer,
                price: &line.price,
                period_start: line.period.start(),
                adjusts_period: line.adjusts,
                version: *version,
                superseded: true,
            };
            (&line.id, serde_json::to_vec(&record))
        });
        for (id, value) in rated.chain(retired) {
            let value = value.expect("a rated line serialises");
            let record = BaseRecord::<str, [u8]>::to(&self.rated_topic)
                .key(id.as_str())
                .payload(&value);
            match send_until(&self.producer, record, Some(deadline)) {
                // The wait bounds a stall of the queue, not the whole batch.
                Ok(()) => deadline = Instant::now() + DELIVERY_WAIT,
                Err(full @ KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                    return Err(
                        failed_to("queue rated lines: the producer's queue stayed full")(full)
                            .into(),
                    )
                }
                Err(refused) => return Err(self.refused_line(refused)),
            }
        }
        Ok(())
    }

    /// Set for good once Kafka refused a rated line (not just delayed it): the rater
    /// must stop before any later offset of that line's partition is committed.
    pub(super) fn undelivered(&self) -> Option<RaterError> {
        let source = self.producer.context().failure()?.clone();
        Some(self.refused_line(source))
    }

    /// The error that stops the rater when Kafka, or the producer itself, refuses a
    /// rated line.
    fn refused_line(&self, source: KafkaError) -> RaterError {
        RaterError::Undelivered {
            topic: self.rated_topic.clone(),
            source,
        }
    }

    /// What a failed read or write of ClickHouse stops or holds. Tables dropped stop
    /// the rater (its restart makes them). Anything else holds the partitions and is
    /// retried, a refusal no retry changes included: its rows are billed money, and
    /// the offsets stay behind them until they are stored (said as an error, so it is
    /// fixed rather than waited out).
    fn clickhouse_failed(
        &mut self,
        consumer: &GroupConsumer,
        what: &str,
        e: ClickHouseError,
    ) -> RaterError {
        if e.is_missing_table() {
            return RaterError::TablesGone(e);
        }
        let told = self.clickhouse_trouble == Some(ClickHouseTrouble::RefusedForGood);
        let for_good = e.is_refused_for_good();
        self.clickhouse_trouble = Some(match for_good {
            true => ClickHouseTrouble::RefusedForGood,
            false => ClickHouseTrouble::Failing,
        });
        if for_good && !told {
            tracing::error!(error = %e, "{what}: ClickHouse refuses the request, and will refuse it again however often it is retried: the rows or the query do not fit the table (a column dropped or changed by hand?) or the login may not do it. The rater holds its partitions, losing nothing, and retries until the table or the login is fixed (compare SHOW CREATE TABLE with a database a rater of this build made)");
        }
        self.hold(consumer, what, e.to_string());
        e.into()
    }

    /// Pauses the partitions until a retry, later each time, after a write failed.
    pub(super) fn hold(&mut self, consumer: &GroupConsumer, what: &str, error: String) {
        if self.retry_at.is_none() {
            tracing::warn!(%error, "{what}; pausing and retrying");
        }
        self.pause_and_retry(consumer, what, error);
    }

    /// [`Self::hold`] for offsets refused because the group is rebalancing (a rater
    /// joined or left): routine, so said without a warning.
    fn hold_while_rebalancing(&mut self, consumer: &GroupConsumer, error: String) {
        let what = "the group is rebalancing; the windows offsets wait for it";
        if self.retry_at.is_none() {
            tracing::info!(%error, "{what}; pausing and retrying");
        }
        self.pause_and_retry(consumer, what, error);
    }

    fn pause_and_retry(&mut self, consumer: &GroupConsumer, what: &str, error: String) {
        let backoff = self.retry_at.map_or(Duration::from_millis(500), |(_, b)| {
            (b * 2).min(Duration::from_secs(10))
        });
        if self.retry_at.is_none() {
            // Unpaused, the rater goes on reading and holds what it reads until
            // ClickHouse is back: memory, not correctness, is at stake.
            if let Err(error) = consumer.assignment().and_then(|a| consumer.pause(&a)) {
                tracing::warn!(%error, "cannot pause the partitions; reading on while the writes are retried");
            }
        }
        self.readiness.not_ready(format!("{what}: {error}"));
        self.retry_at = Some((Instant::now() + backoff, backoff));
    }

    /// Ends a pause after a failed write, if there is one.
    pub(super) fn resume(&mut self, consumer: &GroupConsumer) {
        if self.retry_at.is_none() {
            return;
        }
        match consumer.assignment().and_then(|a| consumer.resume(&a)) {
            Ok(()) => {
                tracing::info!("lines stored again; resuming");
                self.retry_at = None;
                self.clickhouse_trouble = None;
                self.readiness.ready_holding(held_partitions(consumer));
            }
            // Still paused: tried again after the backoff.
            Err(error) => {
                let what = "lines stored again, but the partitions cannot be resumed";
                tracing::warn!(%error, "{what}; retrying");
                self.hold(consumer, what, error.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rust_decimal::Decimal;
    use tally_schemas::config::Config;
    use tally_schemas::time::Period;

    use super::*;
    use crate::clickhouse::StoredLine;
    use crate::ledger::{Ledger, RatedLine};
    use crate::service::rebuild_point::FirstOffsets;

    fn lines_of(book: &str, period: Period) -> Vec<InvoiceLine> {
        let config = Arc::new(Config::parse(book, "test").unwrap());
        Ledger::new(config).opening_lines(period).unwrap()
    }

    #[test]
    fn a_partition_let_go_takes_its_rows_and_offset_out_of_the_batch() {
        let book = include_str!("../../../examples/tally.toml");
        let period: Period = "2026-11".parse().unwrap();
        let mut batch = Pending::default();
        for (partition, version) in [(0, 10), (1, 20)] {
            let lines = lines_of(book, period);
            let rows = batch.rows(partition);
            rows.opening.extend(lines.clone());
            rows.lines.extend(lines.iter().map(|line| {
                let rated = RatedLine {
                    line: line.clone(),
                    revision: 1,
                    delta: Decimal::ONE,
                };
                (version, rated)
            }));
            rows.retired.extend(lines.iter().map(|line| {
                let stored = StoredLine {
                    id: line.id.clone(),
                    customer: line.customer.clone(),
                    price: line.price.clone(),
                    version,
                    amount: line.amount,
                    config_hash: line.config_hash.clone(),
                    quantity: Some(line.quantity),
                    period,
                    adjusts: None,
                };
                (version, stored)
            }));
            let point = FirstOffsets::default().point(None, version as i64, Some("b00c".into()));
            batch.offsets.insert(partition, (version as i64, point));
        }
        let per_partition = lines_of(book, period).len();
        assert_eq!(batch.lines().count(), 2 * per_partition);
        batch.let_go(1);
        assert_eq!(batch.opening().count(), per_partition);
        assert!(batch.lines().all(|(version, _)| *version == 10));
        assert!(batch.retired().all(|(version, _)| *version == 10));
        assert_eq!(batch.lines().count(), per_partition);
        assert_eq!(batch.offsets.keys().collect::<Vec<_>>(), [&0]);
    }
}
