//! The rater service: window aggregates from Kafka in, rated invoice lines out to
//! ClickHouse and to `<prefix>.rated`.
//!
//! In: `<prefix>.windows`, read committed, as a member of group `<prefix>-rater`. Out:
//! every changed line, rated with the rater core from its period-to-date usage, to
//! `<prefix>.rated` for downstream consumers, then into `<database>.rated_lines` (see
//! [`crate::clickhouse`]) in batched inserts (with `[rater] store_windows`, also the
//! windows the updates changed, into `<database>.window_revisions`); then the offsets,
//! synchronously. Offsets are
//! committed only after Kafka confirmed and ClickHouse stored the rows they account
//! for, so a crash re-reads, never skips; rows are versioned by the windows offset they
//! account for, so re-reading writes the same rows again and nothing is counted twice.
//!
//! A line combines all of a customer's series its price selects, and a customer's
//! windows all live in one windows partition (the aggregator writes partition p's
//! windows to partition p). So each partition has its own [`Ledger`]. On assignment the
//! ledger is rebuilt by reading the partition up to the committed offset (the topic is
//! compacted: each series' latest period-to-date value of each period is kept), from
//! where the commit's metadata says the oldest open month's records begin
//! ([`rebuild_point`]; from the beginning for a commit without it). A settled record
//! ([`SETTLED_HEADER`](tally_schemas::records::SETTLED_HEADER)) says a month and those before it can no longer change: the
//! partition's lines of them are rated one last time and let go, so a ledger holds
//! open periods only (while rebuilt too, up to the committed offset), and later usage
//! of them (an aggregator replaying) is refused. A partition
//! whose stored lines of open periods another price book rated (checked once rebuilt,
//! and every `price_book_check_interval`), or whose last commit names another book, is
//! re-rated with the current one, and its stale lines that book no longer makes are
//! retired (`Worker::check_price_book`).
//! While ClickHouse is down the rater pauses its partitions, keeps the unwritten
//! lines, and retries with backoff. Before it reads anything it claims its database
//! for its topic prefix ([`ClickHouse::claim_for_pipeline`]), and stops where the
//! database is another pipeline's or batch runs'. Besides the lines, it logs usage that
//! bills nothing (once per customer, meter and reason) and a line whose series reach
//! each of [`CROWDED_LINE_SERIES`](crate::ledger::CROWDED_LINE_SERIES), naming the
//! customer, price and month.
//!
//! Layout: this module holds the worker, its consume loop and the rebalance callbacks;
//! [`records`] reads and writes the Kafka records, [`rebuild`] rebuilds an assigned
//! partition's ledger (from where [`rebuild_point`] says), [`price_book`] keeps stored
//! lines on the current book, [`store`] writes each batch to the rated topic and
//! ClickHouse before the offsets, [`unbilled`] says why usage bills nothing, and
//! [`metrics`] names what the rater exports.

mod metrics;
mod price_book;
mod rebuild;
mod rebuild_point;
mod records;
mod store;
mod unbilled;

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use rust_decimal::Decimal;
use tally_runtime::kafka::{
    committed_offsets, failed_to, force, group_consumer, held_partitions,
    idempotent_producer_config, leave_group, offset_of, poll_group, positions_ahead,
    ConsumerHealth, DeliveryReports, GroupContext, KafkaOpError, KafkaProducer, PartitionOwner,
};
use tally_runtime::ops::Readiness;
use tally_runtime::threads::{lock, on_threads};
use tally_runtime::Shutdown;
use tally_schemas::config::{Config, Group, KafkaSettings, ServiceSettings, Topic};
use tally_schemas::time::Period;

pub use metrics::RaterMetrics;

use crate::clickhouse::{ClickHouse, ClickHouseError, StoredWindow};
use crate::ledger::{line_open, Ledger, Recorded};
use price_book::BookCheck;
use rebuild::{StoredSample, Taken};
use rebuild_point::{FirstOffsets, RebuildPoint};
use records::{decode_with_windows, record, Change, WindowsRecord};
use store::{InFlight, Pending};
use unbilled::UnbilledLog;

/// Most usage updates read before their lines are written.
const MAX_BATCH_UPDATES: usize = 200_000;
/// Longest a partition's ledger rebuild may read the windows topic.
const REBUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a partition's price-book check waits for its position to pass a stored row
/// of it (see [`Worker::check_price_book`]); then it goes ahead, leaving such rows to
/// the next scheduled check.
const MAX_CHECK_DEFERRAL: Duration = Duration::from_secs(30);
/// Longest the loop waits for Kafka to confirm rated lines before it pauses and polls
/// again: shorter than the group session, so a broker restart does not block it long.
const DELIVERY_WAIT: Duration = Duration::from_secs(5);
/// How long a poll waits for the next update with nothing pending.
const IDLE_POLL_WAIT: Duration = Duration::from_millis(100);
/// How long a poll waits for more with lines pending. Nothing this soon means the rater
/// has read what its consumer had fetched: usually all an aggregator's commit made
/// visible, the next being `commit_interval` away (under load the fetch queue may also
/// run dry between two fetches of one commit's records).
const CATCH_UP_POLL_WAIT: Duration = Duration::from_millis(10);

/// Stored lines a new owner looks up in ClickHouse to tell they are there.
const LOST_LINES_SAMPLE: usize = 100;
/// How long a rated line waits to be sent with others to `tally.rated`: lines come a
/// batch at a time, and a downstream consumer does not need them to the millisecond.
const RATED_LINES_LINGER: Duration = Duration::from_millis(20);

/// Where the rater service failed.
#[derive(Debug, thiserror::Error)]
pub enum RaterError {
    #[error(transparent)]
    Kafka(#[from] KafkaOpError),
    #[error(transparent)]
    ClickHouse(#[from] ClickHouseError),
    #[error("cannot rebuild a partition's ledger: {0}")]
    Rebuild(#[from] tally_runtime::kafka::ReadError),
    #[error("Kafka refused a rated line for {topic} ({source}); the offsets of its batch were not committed, so the rater stops and a restart writes the batch again. Check that {topic} exists, that the rater may write to it and that its max.message.bytes allows the lines")]
    Undelivered { topic: String, source: KafkaError },
    #[error("ClickHouse's tables are gone ({0}): the rater stops, as the lines they held are lost; started again it makes the tables and rates again every partition whose stored lines are missing")]
    TablesGone(ClickHouseError),
    #[error("none of the stored lines of partition {partition} is in ClickHouse, found after the rater had taken it (ClickHouse did not answer then): the rater stops, and started again it rates the partition again from its beginning")]
    StoredLinesLost { partition: i32 },
}

#[derive(Debug)]
struct PartitionState {
    ledger: Ledger,
    /// Periods whose opening (zero-usage) lines this partition has stored.
    opened: BTreeSet<Period>,
    /// Next offset to read.
    next_offset: i64,
    /// Read past the last commit: `next_offset` is to be committed once the lines it
    /// accounts for are stored.
    uncommitted: bool,
    /// ClickHouse did not answer when the partition's stored lines were looked up at
    /// its assignment: this sample of them is looked up before anything of it is
    /// stored ([`Worker::verify_stored_lines`]).
    lines_unverified: Option<StoredSample>,
    /// Where its stored lines stand against this rater's price book.
    book_check: BookCheck,
    /// Where the records of the open periods begin: committed with the offsets.
    first_offsets: FirstOffsets,
    /// Records before this offset were rated and stored before, into a database since
    /// lost, which the partition is rated again into: a month they open is no news.
    stored_before_loss: i64,
}

impl PartitionState {
    /// The version of the rows the partition stores next: the windows offset they
    /// account for, so a later state of a line always has a higher version, and
    /// re-reading writes the same version with the same content.
    fn row_version(&self) -> u64 {
        u64::try_from(self.next_offset).unwrap_or_default()
    }

    /// Where the partition's next owner rebuilds its ledger from, as of `next_offset`,
    /// its lines stored with this rater's price book `book`: unless lines another book
    /// stored await re-rating (the check deferred, say). Then the point names no book,
    /// so a next owner re-rates them all whatever its book, as this one would have.
    fn rebuild_point(&self, book: &str) -> RebuildPoint {
        let settled = self.ledger.settled_through();
        let book = (!self.book_check.stored_with_another_book).then(|| book.to_owned());
        (self.first_offsets).point(settled, self.next_offset, book)
    }
}

struct Worker {
    config: Arc<Config>,
    /// The price book's hash as rows and commits name it (`config_hash`, a rebuild
    /// point's `book`).
    book: String,
    topic: String,
    rated_topic: String,
    kafka: KafkaSettings,
    clickhouse: ClickHouse,
    producer: KafkaProducer,
    partitions: BTreeMap<i32, PartitionState>,
    /// The windows topic's partition count (the events topic's): with Kafka's
    /// partitioner it names the partition a customer's events go to.
    partition_count: NonZeroUsize,
    pending: Pending,
    /// A batch taken from `pending` and handed to the producer for `<prefix>.rated`,
    /// until its offsets are committed. Meanwhile new updates gather in `pending`.
    in_flight: Option<InFlight>,
    metrics: RaterMetrics,
    /// Names the customers and meters whose usage no line bills.
    unbilled: UnbilledLog,
    readiness: Readiness,
    /// While set, a step of storing failed (Kafka's confirmation, ClickHouse's insert,
    /// the offset commit): partitions are paused and the step is retried at this time.
    retry_at: Option<(Instant, Duration)>,
    /// While reads or writes of ClickHouse fail (cleared once lines are stored again).
    clickhouse_trouble: Option<ClickHouseTrouble>,
    /// Set when the rater stops while ClickHouse fails: what is not stored is left for
    /// the partitions' next owner without another try, each of which could wait out
    /// `request_timeout` on a ClickHouse that does not answer.
    stopping_unstored: bool,
    last_insert: Option<Instant>,
    /// When every held partition was last scheduled for a price-book check.
    check_scheduled: Instant,
    /// `[rater] store_windows`: the updates' windows go to ClickHouse too.
    store_windows: bool,
    /// `[aggregator] period_close_grace`: a month that ended this long ago is closed.
    close_grace: chrono::Duration,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("partitions", &self.partitions.keys().collect::<Vec<_>>())
            .field("pending", &self.pending.lines().count())
            .finish_non_exhaustive()
    }
}

type GroupConsumer = BaseConsumer<GroupContext<Worker>>;

impl PartitionOwner for Worker {
    type Error = RaterError;

    /// Rebuilds each new partition's ledger up to its committed offset, the partitions
    /// side by side.
    fn assign(
        &mut self,
        consumer: &GroupConsumer,
        partitions: &mut TopicPartitionList,
    ) -> Result<(), RaterError> {
        // Held after a failed write (ClickHouse down, say), the rater stays not ready
        // for that reason through the rebuild and after it.
        let held = self.retry_at.is_some();
        if !held {
            self.readiness.not_ready("rebuilding partitions");
        }
        let committed = committed_offsets(consumer, partitions).map_err(failed_to(
            "read the committed offsets of the assigned partitions",
        ))?;
        let wanted: Vec<(i32, i64, Option<RebuildPoint>)> = (partitions.elements().iter())
            .map(|e| {
                let partition = e.partition();
                let offset = offset_of(&committed, &self.topic, partition);
                let metadata = (committed.find_partition(&self.topic, partition))
                    .map(|e| e.metadata().to_owned())
                    .unwrap_or_default();
                let point = match RebuildPoint::from_metadata(&metadata) {
                    Ok(point) => point.filter(|_| offset.is_some()),
                    Err(error) => {
                        tracing::warn!(partition, metadata, %error, "the committed offset's rebuild point cannot be read; rebuilding the ledger from the partition's beginning");
                        None
                    }
                };
                (partition, offset.unwrap_or(0), point)
            })
            .collect();
        let taken_all = on_threads(wanted, |(partition, committed, point)| {
            self.take(partition, committed, point)
        });
        for taken in taken_all {
            let Taken {
                partition,
                committed,
                stored_with_another_book,
                lines_unverified,
                stored_before_loss,
                rebuilt,
            } = taken?;
            let mut state = PartitionState {
                ledger: rebuilt.ledger,
                opened: rebuilt.opened,
                next_offset: rebuilt.resume_at,
                uncommitted: false,
                lines_unverified,
                book_check: BookCheck::on_assignment(rebuilt.customers, stored_with_another_book),
                first_offsets: rebuilt.first_offsets,
                stored_before_loss,
            };
            if rebuilt.restate_open_months {
                state.restate_open_months(partition, self.pending.rows(partition));
            }
            self.partitions.insert(partition, state);
            // A store is due soon: it checks the price book first.
            self.pending.started.get_or_insert_with(Instant::now);
            for update in rebuilt.after_committed {
                self.apply(partition, update);
            }
            let start = self
                .partitions
                .get(&partition)
                .map_or(committed, |s| s.next_offset);
            partitions
                .set_partition_offset(&self.topic, partition, Offset::Offset(start))
                .map_err(failed_to(format!("start {}[{partition}]", self.topic)))?;
        }
        self.set_line_gauges();
        consumer
            .incremental_assign(partitions)
            .map_err(failed_to("take the assigned partitions"))?;
        // Pausing outlives an assignment in librdkafka: a partition paused for a retry
        // and then lost comes back paused unless it is resumed here.
        if self.retry_at.is_some() {
            consumer
                .pause(partitions)
                .map_err(failed_to("pause the assigned partitions"))?;
        } else {
            consumer
                .resume(partitions)
                .map_err(failed_to("resume the assigned partitions"))?;
        }
        if !held {
            self.readiness.ready_holding(held_partitions(consumer));
        }
        Ok(())
    }

    /// Stores what was read of the revoked partitions if ClickHouse allows, then lets
    /// them go; what could not be stored is re-read by their next owner. Partitions
    /// lost (this member's session expired, say during a broker outage) may have a new
    /// owner already, and their offsets can no longer be committed: they are let go
    /// without storing.
    fn revoke(
        &mut self,
        consumer: &GroupConsumer,
        partitions: &TopicPartitionList,
    ) -> Result<(), RaterError> {
        if consumer.assignment_lost() {
            tracing::warn!(
                partitions = partitions.count(),
                "partitions lost to the group; their next owner re-reads what was not stored"
            );
        } else if self.stopping_unstored {
            // Said when the stop began.
        } else if let Err(e) = self.store(consumer) {
            tracing::warn!(error = %e, "cannot store before giving partitions up; their next owner re-reads them");
        }
        // Rows not stored yet of the partitions leaving are for their new owners to
        // store (those in flight are with the producer already, and a repeat on the
        // topic is harmless): stored from here, they could overwrite rows a new owner
        // with another price book wrote at the same versions.
        for e in partitions.elements() {
            self.partitions.remove(&e.partition());
            self.pending.let_go(e.partition());
            if let Some(in_flight) = &mut self.in_flight {
                in_flight.batch.let_go(e.partition());
            }
        }
        if (self.in_flight.as_ref()).is_some_and(|f| !f.stored && f.batch.offsets.is_empty()) {
            self.in_flight = None;
        }
        self.set_line_gauges();
        consumer
            .incremental_unassign(partitions)
            .map_err(failed_to("release the revoked partitions"))?;
        self.readiness.held_changed(held_partitions(consumer));
        Ok(())
    }
}

/// Runs the rater until `shutdown`, then stores what it has read and leaves the group.
/// Blocking: run it on its own thread. The topics must exist, with `partition_count`
/// partitions ([`tally_runtime::kafka::ensure_topics`] says how many).
pub fn run(
    config: Arc<Config>,
    settings: &ServiceSettings,
    partition_count: NonZeroUsize,
    metrics: RaterMetrics,
    readiness: Readiness,
    shutdown: Shutdown,
) -> Result<(), RaterError> {
    let kafka_settings = &settings.kafka;
    let clickhouse = ClickHouse::configured(&settings.clickhouse)?;
    // ClickHouse may be starting too: wait for it rather than fail the service. A
    // database another pipeline claimed is this one's configuration to fix.
    let mut wait = Duration::from_millis(200);
    let prefix = &kafka_settings.topic_prefix;
    while let Err(e) =
        (clickhouse.ensure_schema()).and_then(|()| clickhouse.claim_for_pipeline(prefix))
    {
        if e.is_unusable_for_this_pipeline() {
            return Err(e.into());
        }
        readiness.not_ready(format!("ClickHouse: {e}"));
        metrics.query_failures.inc();
        tracing::warn!(error = %e, "cannot prepare the ClickHouse database yet (its schema, this pipeline's claim); retrying");
        if shutdown.sleep(wait) {
            return Ok(());
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
    let mut producer_config = idempotent_producer_config(kafka_settings, RATED_LINES_LINGER);
    // Queued lines are sent until delivered, however long Kafka is away: one given up on
    // would be missing downstream once its offset was committed.
    let producer: KafkaProducer = force(&mut producer_config, "message.timeout.ms", "0")
        .create_with_context(DeliveryReports::default())
        .map_err(failed_to("create the rated-lines producer"))?;
    let topic = kafka_settings.topic(Topic::Windows);
    let worker = Arc::new(Mutex::new(Worker {
        book: config.hash.to_string(),
        config,
        topic: topic.clone(),
        rated_topic: kafka_settings.topic(Topic::Rated),
        kafka: kafka_settings.clone(),
        clickhouse,
        producer,
        partitions: BTreeMap::new(),
        partition_count,
        pending: Pending::default(),
        in_flight: None,
        metrics,
        unbilled: UnbilledLog::default(),
        readiness: readiness.clone(),
        retry_at: None,
        clickhouse_trouble: None,
        stopping_unstored: false,
        last_insert: None,
        check_scheduled: Instant::now(),
        store_windows: settings.rater.store_windows,
        close_grace: chrono::Duration::from_std(settings.aggregator.period_close_grace)
            .unwrap_or(chrono::Duration::MAX),
    }));
    let consumer: GroupConsumer =
        group_consumer(kafka_settings, Group::Rater, &topic, Arc::clone(&worker)).map_err(
            failed_to(format!(
                "join group {} on {topic}",
                kafka_settings.group(Group::Rater)
            )),
        )?;
    // Ready once the group's first assignment to it is rebuilt (after a crash, Kafka
    // waits out the dead member's session first), or once it is a standby.
    readiness.not_ready(format!(
        "joining consumer group {}: no partitions assigned yet",
        kafka_settings.group(Group::Rater)
    ));
    tracing::info!(%topic, group = %kafka_settings.group(Group::Rater), clickhouse = %settings.clickhouse.url, database = %settings.clickhouse.database, "rater started");
    let mut health = ConsumerHealth::new(
        readiness,
        kafka_settings.group(Group::Rater),
        partition_count.get(),
    );
    let mut last_lag = Instant::now();
    let mut poll_wait = IDLE_POLL_WAIT;
    while !shutdown.is_requested() {
        let polled = poll_group(
            &consumer,
            poll_wait,
            &mut health,
            failed_to(format!("consume {topic}")),
        )?;
        let caught_up = polled.is_none();
        let mut worker = lock(&worker);
        match polled {
            Some(message) => worker.process(&message),
            None => worker.step_over_markers(&consumer),
        }
        worker.schedule_price_book_check(settings.rater.price_book_check_interval);
        if worker.store_due(&settings.rater, caught_up) {
            // Any other failure paused the partitions (`hold` logged it) and is retried
            // at its backoff; the loop keeps polling so the group does not consider
            // this member dead.
            if let Err(
                stop @ (RaterError::Undelivered { .. }
                | RaterError::TablesGone(_)
                | RaterError::StoredLinesLost { .. }),
            ) = worker.store(&consumer)
            {
                return Err(stop);
            }
        }
        if let Some(refused) = worker.undelivered() {
            return Err(refused);
        }
        // Paused for a retry, nothing arrives: no reason to poll more often.
        poll_wait = match (worker.pending.started, worker.retry_at) {
            (Some(_), None) => CATCH_UP_POLL_WAIT,
            _ => IDLE_POLL_WAIT,
        };
        if last_lag.elapsed() >= tally_runtime::kafka::LAG_RECORD_INTERVAL {
            last_lag = Instant::now();
            tally_runtime::kafka::record_lag(&consumer, &worker.metrics.consumer_lag, |p| {
                worker.partitions.get(&p).map(|state| state.next_offset)
            });
        }
    }
    let mut worker = lock(&worker);
    if worker.clickhouse_trouble.is_some() {
        worker.stopping_unstored = true;
        tracing::warn!("rater stopping without storing what was read: ClickHouse fails (logged above); the partitions' next owner reads it again");
    } else {
        tracing::info!("rater stopping: storing what was read");
        // Stores what is pending and waits for its rated lines: nothing is left in
        // flight.
        worker.store(&consumer)?;
    }
    drop(worker);
    leave_group(&consumer);
    Ok(())
}

/// How ClickHouse fails, while it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClickHouseTrouble {
    /// Down, slow, or refusing for a reason that passes.
    Failing,
    /// Refusing what no retry changes, which was said as an error.
    RefusedForGood,
}

impl Worker {
    fn process(&mut self, message: &BorrowedMessage<'_>) {
        let Some(change) = decode_with_windows(message, self.store_windows) else {
            if let Some(state) = self.partitions.get_mut(&message.partition()) {
                state.next_offset = state.next_offset.max(message.offset() + 1);
                state.uncommitted = true;
            }
            return;
        };
        self.apply(
            message.partition(),
            WindowsRecord {
                offset: message.offset(),
                appended_ms: message.timestamp().to_millis(),
                change,
            },
        );
    }

    /// Moves each partition's next offset up to the consumer's position where that is
    /// ahead ([`positions_ahead`]): every record delivered is processed at once.
    fn step_over_markers(&mut self, consumer: &GroupConsumer) {
        let next_offsets = (self.partitions.iter()).map(|(&p, state)| (p, state.next_offset));
        for (partition, position) in positions_ahead(consumer, &self.topic, next_offsets) {
            if let Some(state) = self.partitions.get_mut(&partition) {
                state.next_offset = position;
                state.uncommitted = true;
                self.pending.started.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Records one usage update, or a settled period, in its partition's ledger.
    fn apply(
        &mut self,
        partition: i32,
        WindowsRecord {
            offset,
            appended_ms,
            change,
        }: WindowsRecord<'_>,
    ) {
        let ended_by = self.months_ended_by(chrono::Utc::now());
        let Some(state) = self.partitions.get_mut(&partition) else {
            return;
        };
        if offset < state.next_offset {
            return;
        }
        state.next_offset = offset + 1;
        state.uncommitted = true;
        let pending = &mut self.pending;
        pending.updates += 1;
        pending.started.get_or_insert_with(Instant::now);
        pending.oldest_update_ms = pending
            .oldest_update_ms
            .into_iter()
            .chain(appended_ms)
            .min();
        let mut update = match change {
            Change::Usage(update) => update,
            Change::Settled(period) => {
                state.ledger.settle_through(period);
                state.first_offsets.settle_through(period);
                return;
            }
        };
        self.metrics.usage_updates.inc();
        state.first_offsets.note(&update, offset);
        // A settled period's usage read again is refused below; its lines stay as billed.
        // A closed period first seen through an adjustment (the partition read nothing
        // of it before it closed: a month backfilled late) is opened too: the
        // adjustment is priced against its zero-usage lines, tiers' flat amounts and
        // flat fees included, which must then be billed.
        for period in update.periods() {
            let open = line_open(state.ledger.settled_through(), period, None);
            if open && state.opened.insert(period) {
                match state.ledger.opening_lines(period) {
                    Ok(lines) => {
                        // Where another partition stored the month's lines already,
                        // nothing is billed anew: they are every customer's.
                        let stored = || match self.clickhouse.has_lines(period) {
                            Ok(stored) => stored,
                            Err(e) => {
                                tracing::warn!(error = %e, %period, "cannot tell whether lines of an ended month were stored before; counting its opening lines as new");
                                false
                            }
                        };
                        let rated_before = offset < state.stored_before_loss;
                        if period.end() <= ended_by && !rated_before && !stored() {
                            let billed = price_book::ended_month_opened(partition, period, &lines);
                            self.metrics.ended_month_lines_opened.inc_by(billed);
                        }
                        self.pending.rows(partition).opening.extend(lines);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, %period, "cannot rate a period's opening lines")
                    }
                }
            }
        }
        let version = state.row_version();
        let windows = std::mem::take(&mut update.windows);
        let series = (!windows.is_empty()).then(|| Arc::new(update.series.to_owned()));
        let period_start = update.period_start;
        let recorded = record(&mut state.ledger, &update, offset);
        self.unbilled
            .note(recorded, &update.series, Period::containing(period_start));
        // Usage of a settled month is an aggregator replaying what it had billed:
        // left out of the lines, and of the windows too.
        if let Some(series) = series.filter(|_| recorded != Recorded::SettledPeriod) {
            for window in windows {
                // A later record's state of a window replaces an earlier one's.
                let key = (Arc::clone(&series), window.window_start);
                let stored = StoredWindow {
                    series: Arc::clone(&series),
                    period_start,
                    window,
                    version,
                };
                self.pending.rows(partition).windows.insert(key, stored);
            }
        }
        self.metrics.count_unbilled(recorded);
    }

    /// Months that ended by `now` less the close grace have closed, unless the
    /// aggregators lag ([`price_book::EndedMonthsRepriced`]).
    fn months_ended_by(&self, now: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
        now.checked_sub_signed(self.close_grace).unwrap_or(now)
    }

    /// Moves each partition's changed lines, rated, into the pending batch, with the
    /// offset they account for, and what a new price book changed of stored ones.
    fn collect_changed_lines(&mut self) {
        let now = chrono::Utc::now();
        let ended_by = self.months_ended_by(now);
        for (&partition, state) in &mut self.partitions {
            if !state.uncommitted {
                continue;
            }
            let version = state.row_version();
            let held = state.ledger.lines_held();
            let (lines, failures) = state.ledger.flush_available();
            if state.ledger.lines_held() < held {
                tracing::info!(
                    partition,
                    let_go = held - state.ledger.lines_held(),
                    held = state.ledger.lines_held(),
                    "lines of settled periods rated one last time and let go"
                );
            }
            for crowded in state.ledger.take_crowded() {
                tracing::warn!(
                    partition,
                    customer = crowded.customer,
                    price = crowded.price,
                    period = %crowded.period,
                    adjusts = crowded.adjusts.map(|p| p.to_string()),
                    series = crowded.series,
                    meter = crowded.meter,
                    example_group = ?crowded.example_group,
                    logged_at = ?crate::ledger::CROWDED_LINE_SERIES,
                    "an invoice line sums this many usage series, one per combination of its meter's group_by values (example_group: the latest series' values, in the order of the meter's dimension names): a dimension of many values (a request id, a user id) is a series per value that the aggregator and the rater hold for the month; take such a key out of the meter's group_by, or, to bill how many distinct ids there are, count them with a unique_count meter (logged as a line reaches each of logged_at)"
                );
            }
            for e in failures {
                self.metrics.rating_failures.inc();
                tracing::error!(error = %e, partition, "a line cannot be rated; it stays pending, the partition's other lines go on");
            }
            let (restated, repriced) = (
                &mut state.book_check.restated,
                &mut state.book_check.ended_months_repriced,
            );
            let new_unless_restated =
                std::mem::take(&mut state.book_check.lines_new_unless_restated);
            let stale_book = std::mem::take(&mut state.book_check.stale_book);
            let rows = self.pending.rows(partition);
            for mut rated in lines {
                let stored = restated.remove(&rated.line.id);
                let line = &rated.line;
                let repricing = match &stored {
                    Some(stored) => {
                        rated.delta = line.amount - stored.amount;
                        price_book::repriced_amount(&self.config, stored, line).and_then(|amount| {
                            price_book::repricing(stored, amount, &self.book, now)
                        })
                    }
                    None if new_unless_restated => stale_book
                        .as_deref()
                        .and_then(|before| price_book::addition(line, before, &self.book, now)),
                    None => None,
                };
                rows.repricings.extend(repricing.map(|r| (version, r)));
                if stored.is_some() || new_unless_restated {
                    let period = Period::containing(line.period_start);
                    let before = stored.as_ref().map_or(Decimal::ZERO, |s| s.amount);
                    let amounts = (before, line.amount);
                    repriced.note((&line.customer, &line.price), period, amounts, ended_by);
                }
                rows.lines.push((version, rated));
            }
            repriced.report(partition, &self.metrics.ended_month_lines_repriced);
            let point = state.rebuild_point(&self.book);
            (self.pending.offsets).insert(partition, (state.next_offset, point));
            state.uncommitted = false;
        }
        self.set_line_gauges();
    }

    /// Sets the gauges of the lines the held partitions' ledgers hold, and of those
    /// not rated.
    fn set_line_gauges(&self) {
        let count = |lines: fn(&Ledger) -> usize| -> i64 {
            let held: usize = self.partitions.values().map(|p| lines(&p.ledger)).sum();
            held as i64
        };
        self.metrics.ledger_lines.set(count(Ledger::lines_held));
        (self.metrics.ledger_series).set(count(Ledger::series_held));
        (self.metrics.unrated_lines).set(count(Ledger::lines_unrated));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_names_the_book_only_once_lines_of_another_are_re_rated() {
        let config =
            Arc::new(Config::parse(include_str!("../../../examples/tally.toml"), "test").unwrap());
        let mut state = PartitionState {
            ledger: Ledger::new(config),
            opened: BTreeSet::new(),
            next_offset: 40,
            uncommitted: true,
            lines_unverified: None,
            book_check: BookCheck {
                check_deferred: Some(Instant::now()),
                ..BookCheck::on_assignment(Default::default(), true)
            },
            first_offsets: FirstOffsets::default(),
            stored_before_loss: 0,
        };
        // Its check deferred, the partition still holds the old book's lines: a next
        // owner with the new book must re-rate them all, as this one would have.
        assert_eq!(state.rebuild_point("new").book, None);
        state.book_check.stored_with_another_book = false;
        assert_eq!(state.rebuild_point("new").book.as_deref(), Some("new"));
    }
}
