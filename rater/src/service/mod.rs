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
//! ([`SETTLED_HEADER`]) says a month and those before it can no longer change: the
//! partition's lines of them are rated one last time and let go, so a ledger holds
//! open periods only (while rebuilt too, up to the committed offset), and later usage
//! of them (an aggregator replaying) is refused. A partition
//! whose stored lines of open periods another price book rated (checked once rebuilt,
//! and every `price_book_check_interval`), or whose last commit names another book, is
//! re-rated with the current one, and its stale lines that book no longer makes are
//! retired (`Worker::check_price_book`).
//! While ClickHouse is down the rater pauses its partitions, keeps the unwritten
//! lines, and retries with backoff.

mod metrics;
mod rebuild_point;
mod unbilled;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use rust_decimal::Decimal;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use tally_runtime::kafka::{
    client_config, committed_offsets, flush, group_consumer, header_value,
    idempotent_producer_config, leave_group, offset_of, partition_for_key, poll_group,
    positions_ahead, read_partition, send_until, tunable, ConsumerHealth, DeliveryReports,
    GroupContext, KafkaProducer, PartitionOwner,
};
use tally_runtime::metrics::observe_age;
use tally_runtime::ops::Readiness;
use tally_runtime::threads::{lock, on_threads};
use tally_runtime::Shutdown;
use tally_schemas::config::{Config, KafkaSettings, RaterSettings, ServiceSettings, Topic};
use tally_schemas::records::{InvoiceLine, SeriesKey, UsageRecord, WindowUsage, SETTLED_HEADER};
use tally_schemas::time::Period;

pub use metrics::RaterMetrics;

use crate::clickhouse::{ClickHouse, ClickHouseError, StoredLine, StoredWindow};
use crate::ledger::{line_open, Ledger, RatedLine, Recorded};
use rebuild_point::{FirstOffsets, RebuildPoint};
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

/// Where the rater service failed.
#[derive(Debug, thiserror::Error)]
pub enum RaterError {
    #[error("cannot {what}: {source}")]
    Kafka { what: String, source: KafkaError },
    #[error(transparent)]
    ClickHouse(#[from] ClickHouseError),
    #[error("cannot rebuild a partition's ledger: {0}")]
    Rebuild(#[from] tally_runtime::kafka::ReadError),
    #[error("Kafka refused a rated line for {topic} ({source}); the offsets of its batch were not committed, so the rater stops and a restart writes the batch again. Check that {topic} exists, that the rater may write to it and that its max.message.bytes allows the lines")]
    Undelivered { topic: String, source: KafkaError },
    #[error("ClickHouse's tables are gone ({0}): the rater stops, as the lines they held are lost; started again it makes the tables and rates again every partition whose stored lines are missing")]
    TablesGone(ClickHouseError),
}

/// A rated line as written to `<prefix>.rated`: the line, its revision (0 for an
/// opening line, at zero usage) and how much it moved since the line's previous record,
/// and the version its ClickHouse row has. Consumers keep the highest
/// version per line id, and drop a line whose highest is a [`RetiredRecord`].
#[derive(Debug, Serialize)]
struct RatedRecord<'a> {
    #[serde(flatten)]
    line: &'a InvoiceLine,
    revision: u64,
    delta: Decimal,
    version: u64,
    superseded: bool,
}

/// A line retired, as written to `<prefix>.rated`: the price book no longer makes it,
/// so from this version on it is not billed.
#[derive(Debug, Serialize)]
struct RetiredRecord<'a> {
    id: &'a str,
    customer: &'a str,
    price: &'a str,
    #[serde(with = "tally_schemas::time::rfc3339_serde")]
    period_start: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    adjusts_period: Option<Period>,
    version: u64,
    superseded: bool,
}

/// A record read from the windows topic, where it was.
#[derive(Debug)]
struct WindowsRecord<'a> {
    offset: i64,
    /// When it was appended to Kafka, for the latency metric.
    appended_ms: Option<i64>,
    change: Change<'a>,
}

/// What a windows record says, with its changed windows read as `W` (skipped with
/// [`IgnoredAny`]).
#[derive(Debug)]
enum Change<'a, W = Vec<WindowUsage>> {
    /// A series' period-to-date usage.
    Usage(UsageRecord<'a, W>),
    /// The period and every earlier one have settled: no update of them follows.
    Settled(Period),
}

impl<W> Change<'_, W> {
    fn into_owned(self) -> Change<'static, W> {
        match self {
            Change::Usage(update) => Change::Usage(update.into_owned()),
            Change::Settled(period) => Change::Settled(period),
        }
    }

    /// The customer whose usage the record carries.
    fn customer(&self) -> Option<&str> {
        match self {
            Change::Usage(update) => Some(&update.series.customer),
            Change::Settled(_) => None,
        }
    }
}

/// A partition's ledger as of its committed offset, and the updates after it.
#[derive(Debug)]
struct Rebuilt {
    ledger: Ledger,
    opened: BTreeSet<Period>,
    after_committed: Vec<WindowsRecord<'static>>,
    /// Every customer with usage in the partition's open periods, known to the price
    /// book or not.
    customers: HashSet<String>,
    first_offsets: FirstOffsets,
    /// Where the partition is read from after the rebuild: the committed offset, or
    /// past the months a replay found already billed.
    resume_at: i64,
}

impl Rebuilt {
    /// Adds a record whose lines are stored already to the ledger.
    fn stored<W>(&mut self, change: Change<'_, W>, offset: i64) {
        match change {
            Change::Usage(update) => {
                self.opened.insert(Period::containing(update.period_start));
                self.first_offsets.note(&update, offset);
                record(&mut self.ledger, &update);
            }
            Change::Settled(period) => {
                // Rated and let go now: a rebuild holds open periods only. Its lines
                // were stored already, so only a failure to rate one is news.
                self.ledger.settle_through(period);
                let (_, failures) = self.ledger.flush_available();
                for error in failures {
                    tracing::warn!(%error, settled = %period, "a settled line could not be rated again while rebuilding; its stored version stands");
                }
                self.first_offsets.settle_through(period);
            }
        }
    }
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
    /// Every customer with usage in the partition's unsettled months when it was
    /// assigned (known to the price book or not): the partition replaces their stale
    /// lines with usage (only open months' lines are checked). Lines
    /// with usage written since are this rater's, rated with its book.
    customers_with_usage: HashSet<String>,
    /// From assignment, or a scheduled check, until the partition's stored lines were
    /// checked against the price book ([`Worker::check_price_book`]).
    unchecked: bool,
    /// Its committed lines were stored with another price book (or by a build that did
    /// not say which): the check re-rates all of them, and writes its customers'
    /// opening lines, also where no stale row shows it. A line the old book never
    /// stored (a customer the new book adds, whose usage the old one left unbilled)
    /// has no row to be found stale.
    stored_with_another_book: bool,
    /// Since when the check has waited for the partition's position to pass a stored
    /// row of it ([`MAX_CHECK_DEFERRAL`]).
    check_deferred: Option<Instant>,
    /// Lines with usage another price book rated, by id, with the amount stored: their
    /// next revision's delta moves from it (the rebuilt ledger holds this book's).
    restated: HashMap<String, Decimal>,
    /// Where the records of the open periods begin: committed with the offsets.
    first_offsets: FirstOffsets,
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
        let book = (!self.stored_with_another_book).then(|| book.to_owned());
        (self.first_offsets).point(settled, self.next_offset, book)
    }

    /// This partition's lines among `stale`: another's would have it re-rate everything
    /// at every check without fixing them (one settled in its own partition, say).
    fn own_stale_lines<'a>(
        &self,
        stale: &'a [StoredLine],
        judge: ZeroUsageJudge,
    ) -> Vec<&'a StoredLine> {
        let settled = self.ledger.settled_through();
        (stale.iter())
            .filter(|line| line_open(settled, line.period, line.adjusts))
            .filter(|line| {
                if line.version == 0 {
                    judge.owns(&line.customer)
                } else {
                    self.customers_with_usage.contains(&line.customer)
                }
            })
            .collect()
    }

    /// Whether the price-book check waits: a stale row newer than the partition's
    /// position was stored by a rater before this one that stopped before committing
    /// (its versions count the transaction markers it had stepped over). Rated now,
    /// this book's rows would be older and lose to it, so the check waits for the
    /// position to pass, for [`MAX_CHECK_DEFERRAL`] at most.
    fn check_waits_for_position(&mut self, partition: i32, stale: &[&StoredLine]) -> bool {
        let version = self.row_version();
        if !stale.iter().any(|line| line.version > version) {
            return false;
        }
        if self.check_deferred.is_none() {
            tracing::info!(partition, position = version, "stored lines newer than the partition's position (a rater before this one stored them and stopped before committing): checking the price book once it has read that far");
        }
        let since = *self.check_deferred.get_or_insert_with(Instant::now);
        since.elapsed() < MAX_CHECK_DEFERRAL
    }

    /// Re-rates the partition's open periods with this rater's book
    /// ([`Worker::check_price_book`]): every line it holds, the opening lines of the
    /// periods concerned, and each stale line without usage here replaced by its
    /// zero-usage line or retired, all into `rows`.
    fn rerate_for_book(&mut self, rerate: Rerate<'_>, rows: &mut PartitionRows) {
        let settled = self.ledger.settled_through();
        let version = self.row_version();
        self.ledger.rerate_all();
        self.uncommitted = true;
        let with_usage: HashSet<String> = self.ledger.line_ids().collect();
        let mut periods: BTreeSet<Period> = rerate.stale.iter().map(|line| line.period).collect();
        if rerate.stored_with_another_book {
            let open = (self.opened.iter()).filter(|&&p| line_open(settled, p, None));
            periods.extend(open);
        }
        let zero_usage = self.queue_opening_lines(&periods, &with_usage, &rerate, rows);
        let before = rows.retired.len();
        let stale_lines = rerate.stale.len();
        // Those with usage the ledger re-rates; the others are replaced or retired.
        let (restated, without_usage): (Vec<&StoredLine>, Vec<&StoredLine>) = (rerate.stale)
            .into_iter()
            .partition(|line| with_usage.contains(&line.id));
        (self.restated).extend(restated.iter().map(|line| (line.id.clone(), line.amount)));
        for line in without_usage {
            let at = if line.version == 0 {
                0
            } else if line.version <= version {
                version
            } else {
                // A row newer than this partition's offsets: not its to replace.
                continue;
            };
            match zero_usage.get(&line.id) {
                // Replaced by the opening line queued above.
                Some(_) if at == 0 => {}
                // Usage the book no longer prices on this line (its filter or
                // meter changed): the line is now its opening line, at zero usage.
                Some(zero) => rows.lines.push((
                    at,
                    RatedLine {
                        line: zero.clone(),
                        revision: 0,
                        delta: zero.amount - line.amount,
                    },
                )),
                None => rows.retired.push((at, (*line).clone())),
            }
        }
        tracing::info!(
            partition = rerate.judge.partition,
            stale = stale_lines,
            stored_with_another_book = rerate.stored_with_another_book,
            rerated = self.ledger.lines_held(),
            retired = rows.retired.len() - before,
            "lines an earlier price book rated: re-rating the partition's open periods"
        );
    }

    /// Queues the opening (zero-usage) lines of `periods` that are this partition's to
    /// write, and returns every opening line of them by id.
    fn queue_opening_lines(
        &self,
        periods: &BTreeSet<Period>,
        with_usage: &HashSet<String>,
        rerate: &Rerate<'_>,
        rows: &mut PartitionRows,
    ) -> HashMap<String, InvoiceLine> {
        let mut zero_usage = HashMap::new();
        for &period in periods {
            match self.ledger.opening_lines(period) {
                Ok(lines) => {
                    // The partition's own customers', and any customer's that no book
                    // has stored yet: one the book added may belong to a partition that
                    // has read nothing of the period. A stored line of another
                    // partition's customer is that partition's to judge (it may be
                    // settled there); a line with usage here is re-rated above version
                    // 0 instead.
                    let opening = lines.iter().filter(|l| {
                        !with_usage.contains(&l.id)
                            && (rerate.judge.owns(&l.customer)
                                || !rerate.all_stale_ids.contains(l.id.as_str()))
                    });
                    rows.opening.extend(opening.cloned());
                    zero_usage.extend(lines.into_iter().map(|line| (line.id.clone(), line)));
                }
                Err(e) => {
                    tracing::error!(error = %e, %period, "cannot rate a period's opening lines")
                }
            }
        }
        zero_usage
    }
}

/// Which partition judges a customer's zero-usage lines: the one Kafka's partitioner
/// sends its events to, so they are judged by that partition's open periods and
/// written once.
#[derive(Debug, Clone, Copy)]
struct ZeroUsageJudge {
    partition: i32,
    partition_count: NonZeroUsize,
}

impl ZeroUsageJudge {
    fn owns(&self, customer: &str) -> bool {
        partition_for_key(customer.as_bytes(), self.partition_count) == self.partition
    }
}

/// What a partition's price-book check found to re-rate.
struct Rerate<'a> {
    /// The partition's own lines another book rated.
    stale: Vec<&'a StoredLine>,
    /// Its last commit names another book.
    stored_with_another_book: bool,
    /// Every partition's stale lines, by id.
    all_stale_ids: &'a HashSet<&'a str>,
    judge: ZeroUsageJudge,
}

/// Lines rated but not yet stored, with the offsets they account for.
#[derive(Debug, Default)]
struct Pending {
    /// By partition: the rows of a partition given up before they are stored leave
    /// with it ([`Pending::let_go`]).
    rows: BTreeMap<i32, PartitionRows>,
    offsets: BTreeMap<i32, (i64, RebuildPoint)>,
    /// Kafka timestamp (ms) of the oldest usage update in the batch.
    oldest_update_ms: Option<i64>,
    updates: usize,
    started: Option<Instant>,
}

/// One partition's rows of a batch.
#[derive(Debug, Default)]
struct PartitionRows {
    /// Zero-usage lines of newly seen periods, written (to `<prefix>.rated` and
    /// ClickHouse) at version 0.
    opening: Vec<InvoiceLine>,
    /// The windows the batch's usage updates changed, each in its latest state
    /// (`[rater] store_windows`).
    windows: HashMap<(Arc<SeriesKey>, chrono::DateTime<chrono::Utc>), StoredWindow>,
    lines: Vec<(u64, RatedLine)>,
    /// Stored lines the price book no longer makes, to retire at these versions.
    retired: Vec<(u64, StoredLine)>,
}

impl Pending {
    /// `partition`'s rows, to add to.
    fn rows(&mut self, partition: i32) -> &mut PartitionRows {
        self.rows.entry(partition).or_default()
    }

    fn opening(&self) -> impl Iterator<Item = &InvoiceLine> {
        self.rows.values().flat_map(|rows| &rows.opening)
    }

    fn windows(&self) -> impl Iterator<Item = &StoredWindow> {
        self.rows.values().flat_map(|rows| rows.windows.values())
    }

    fn lines(&self) -> impl Iterator<Item = &(u64, RatedLine)> {
        self.rows.values().flat_map(|rows| &rows.lines)
    }

    fn retired(&self) -> impl Iterator<Item = &(u64, StoredLine)> {
        self.rows.values().flat_map(|rows| &rows.retired)
    }

    /// Leaves out a partition given up before its rows were stored: its next owner
    /// rates them again, perhaps with another price book, at the same versions, and
    /// rows stored from here later would win over that owner's.
    fn let_go(&mut self, partition: i32) {
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
struct InFlight {
    batch: Pending,
    /// ClickHouse holds the batch: only its offsets are left to commit.
    stored: bool,
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
    last_insert: Option<Instant>,
    /// When every held partition was last scheduled for a price-book check.
    check_scheduled: Instant,
    /// `[rater] store_windows`: the updates' windows go to ClickHouse too.
    store_windows: bool,
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
        self.readiness.not_ready("rebuilding partitions");
        let committed = committed_offsets(consumer, partitions).map_err(kafka(
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
        let rebuilt_all = on_threads(
            wanted,
            |(partition, committed, point)| -> Result<_, RaterError> {
                // Nothing committed, nothing stored: every line is new to this rater.
                let another_book = committed > 0
                    && point.as_ref().and_then(|p| p.book.as_deref()) != Some(self.book.as_str());
                let rebuilt = self.rebuild(partition, committed, point)?;
                // With another book, stored lines may have other ids: the check of the
                // price book sees to those.
                if committed > 0
                    && !another_book
                    && self.stored_lines_lost(partition, &rebuilt.ledger)?
                {
                    let replayed = self.rebuild(partition, 0, None)?;
                    return Ok((partition, 0, false, replayed));
                }
                Ok((partition, committed, another_book, rebuilt))
            },
        );
        for rebuilt in rebuilt_all {
            let (partition, committed, stored_with_another_book, rebuilt) = rebuilt?;
            self.partitions.insert(
                partition,
                PartitionState {
                    ledger: rebuilt.ledger,
                    opened: rebuilt.opened,
                    next_offset: rebuilt.resume_at,
                    uncommitted: false,
                    customers_with_usage: rebuilt.customers,
                    unchecked: true,
                    stored_with_another_book,
                    check_deferred: None,
                    restated: HashMap::new(),
                    first_offsets: rebuilt.first_offsets,
                },
            );
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
                .map_err(kafka("start an assigned partition"))?;
        }
        self.count_held_lines();
        consumer
            .incremental_assign(partitions)
            .map_err(kafka("take the assigned partitions"))?;
        // Pausing outlives an assignment in librdkafka: a partition paused for a retry
        // and then lost comes back paused unless it is resumed here.
        if self.retry_at.is_some() {
            consumer
                .pause(partitions)
                .map_err(kafka("pause the assigned partitions"))?;
        } else {
            consumer
                .resume(partitions)
                .map_err(kafka("resume the assigned partitions"))?;
        }
        self.readiness.ready();
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
        self.count_held_lines();
        consumer
            .incremental_unassign(partitions)
            .map_err(kafka("release the revoked partitions"))
    }
}

fn kafka(what: &'static str) -> impl Fn(KafkaError) -> RaterError {
    move |source| RaterError::Kafka {
        what: what.to_owned(),
        source,
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
    let clickhouse = ClickHouse::new(&settings.clickhouse.url, &settings.clickhouse.database)?
        .with_credentials(&settings.clickhouse.credentials)?
        .with_request_timeout(settings.clickhouse.request_timeout);
    // ClickHouse may be starting too: wait for it rather than fail the service.
    let mut wait = Duration::from_millis(200);
    while let Err(e) = clickhouse.ensure_schema() {
        if shutdown.is_requested() {
            return Ok(());
        }
        readiness.not_ready(format!("ClickHouse: {e}"));
        tracing::warn!(error = %e, "cannot create the ClickHouse schema yet; retrying");
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_secs(5));
    }
    let mut producer_config = idempotent_producer_config(kafka_settings);
    tunable(&mut producer_config, "linger.ms", "20");
    tunable(&mut producer_config, "compression.type", "lz4");
    let producer: KafkaProducer = producer_config
        // Queued lines are sent until delivered, however long Kafka is away: one given
        // up on would be missing downstream once its offset was committed.
        .set("message.timeout.ms", "0")
        .create_with_context(DeliveryReports::default())
        .map_err(kafka("create the rated-lines producer"))?;
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
        last_insert: None,
        check_scheduled: Instant::now(),
        store_windows: settings.rater.store_windows,
    }));
    let consumer: GroupConsumer =
        group_consumer(kafka_settings, "rater", &topic, Arc::clone(&worker))
            .map_err(kafka("join the rater group on the windows topic"))?;
    readiness.ready();
    tracing::info!(%topic, group = %kafka_settings.group("rater"), "rater started");
    let mut health = ConsumerHealth::new(readiness);
    let mut last_lag = Instant::now();
    let mut poll_wait = IDLE_POLL_WAIT;
    while !shutdown.is_requested() {
        let polled = poll_group(
            &consumer,
            poll_wait,
            &mut health,
            kafka("consume the windows topic"),
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
            if let Err(stop @ (RaterError::Undelivered { .. } | RaterError::TablesGone(_))) =
                worker.store(&consumer)
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
        if last_lag.elapsed() >= Duration::from_secs(5) {
            last_lag = Instant::now();
            tally_runtime::kafka::record_lag(&consumer, &worker.metrics.consumer_lag);
        }
    }
    tracing::info!("rater stopping: storing what was read");
    let mut worker = lock(&worker);
    // Stores what is pending and waits for its rated lines: nothing is left in flight.
    worker.store(&consumer)?;
    drop(worker);
    leave_group(&consumer);
    Ok(())
}

impl Worker {
    /// Reads a windows partition to its end, from the committed `point` if there is
    /// one (its settled periods settled in the ledger from the start), else from its
    /// beginning. Records before `committed` build the ledger the stored lines were
    /// rated from; the later ones are returned to be processed as new. (Reading past
    /// `committed` matters: compaction may have removed a record before it whose newer
    /// version lies after it.)
    fn rebuild(
        &self,
        partition: i32,
        committed: i64,
        point: Option<RebuildPoint>,
    ) -> Result<Rebuilt, RaterError> {
        let started = Instant::now();
        let mut rebuilt = Rebuilt {
            ledger: Ledger::new(Arc::clone(&self.config)),
            opened: BTreeSet::new(),
            after_committed: Vec::new(),
            customers: HashSet::new(),
            first_offsets: FirstOffsets::default(),
            resume_at: committed,
        };
        if let Some(settled) = point.as_ref().and_then(|point| point.settled_through) {
            rebuilt.ledger.settle_through(settled);
            rebuilt.first_offsets.settle_through(settled);
        }
        let from = point.map_or(0, |point| point.from.min(committed));
        let mut read = 0u64;
        read_partition(
            client_config(&self.kafka),
            &self.topic,
            partition,
            from,
            committed,
            REBUILD_TIMEOUT,
            |message| {
                // Counts a record read and notes whose usage it carries.
                let mut count_record = |customer: Option<&str>| {
                    read += 1;
                    if let Some(customer) = customer.filter(|c| !rebuilt.customers.contains(*c)) {
                        rebuilt.customers.insert(customer.to_owned());
                    }
                };
                if message.offset() >= committed {
                    // Not stored yet: its windows are, with its lines.
                    let Some(change) = decode_with_windows(message, self.store_windows) else {
                        return;
                    };
                    count_record(change.customer());
                    rebuilt.after_committed.push(WindowsRecord {
                        offset: message.offset(),
                        appended_ms: message.timestamp().to_millis(),
                        change: change.into_owned(),
                    });
                    return;
                }
                let Some(change) = decode::<IgnoredAny>(message) else {
                    return;
                };
                count_record(change.customer());
                rebuilt.stored(change, message.offset());
            },
        )?;
        if committed == 0 {
            self.skip_billed_months(partition, &mut rebuilt)?;
        }
        // Marks the lines as stored as of `committed` and lets settled periods go; one
        // that fails to rate stays pending and is retried with its next update.
        let (_, failures) = rebuilt.ledger.flush_available();
        if !failures.is_empty() {
            tracing::warn!(
                partition,
                lines = failures.len(),
                "lines could not be rated while rebuilding; they stay pending"
            );
        }
        tracing::info!(
            partition,
            from,
            records = read,
            lines = rebuilt.ledger.lines_held(),
            after_committed = rebuilt.after_committed.len(),
            seconds = started.elapsed().as_secs_f64(),
            "ledger rebuilt from the windows topic"
        );
        Ok(rebuilt)
    }

    /// Whether ClickHouse has none of the lines `ledger` holds as stored (a sample of
    /// them): its database was dropped or emptied while the group's offsets stayed, so
    /// those lines would never be written again. The tables gone altogether stop the
    /// rater ([`RaterError::TablesGone`]): its restart makes them and checks again.
    fn stored_lines_lost(&self, partition: i32, ledger: &Ledger) -> Result<bool, RaterError> {
        let sample: Vec<String> = ledger.line_ids().take(LOST_LINES_SAMPLE).collect();
        if sample.is_empty() {
            return Ok(false);
        }
        let oldest_open = ledger.settled_through().map(|settled| settled.next());
        match self.clickhouse.lines_stored_of(&sample, oldest_open) {
            Ok(0) => {
                self.metrics.lost_line_replays.inc();
                tracing::error!(
                    partition,
                    sampled = sample.len(),
                    "none of the lines the partition's committed offset accounts for is in ClickHouse (its database was dropped or emptied): rating the partition again from its beginning with this rater's price book (settled months too, where ClickHouse has no lines of them)"
                );
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(error) if error.is_missing_table() => Err(RaterError::TablesGone(error)),
            Err(error) => {
                tracing::warn!(partition, %error, "cannot check that the partition's stored lines are in ClickHouse; going on as if they were");
                Ok(false)
            }
        }
    }

    /// A partition with nothing committed (a new group, offsets expired, or reset to
    /// the earliest) whose records settle months ClickHouse already bills: a replay.
    /// Those months stay as they were billed, whatever book this rater has, so the
    /// records through the last settled month's count as stored, as a rebuild counts
    /// them. Into an empty database every record is rated, settled months included.
    fn skip_billed_months(&self, partition: i32, rebuilt: &mut Rebuilt) -> Result<(), RaterError> {
        let settled_at = |(i, record): (usize, &WindowsRecord<'_>)| match record.change {
            Change::Settled(period) => Some((i, period)),
            Change::Usage(_) => None,
        };
        let records = rebuilt.after_committed.iter().enumerate();
        let last_settled = records.rev().find_map(settled_at);
        let Some((last_settled, period)) = last_settled else {
            return Ok(());
        };
        if !self.clickhouse.has_lines(period)? {
            return Ok(());
        }
        let replayed: Vec<WindowsRecord<'static>> =
            rebuilt.after_committed.drain(..=last_settled).collect();
        rebuilt.resume_at = replayed.last().map_or(0, |record| record.offset + 1);
        tracing::info!(
            partition,
            settled_through = %period,
            records = replayed.len(),
            "nothing committed, and ClickHouse bills the months this partition settled: a replay; those months stay as billed"
        );
        for record in replayed {
            rebuilt.stored(record.change, record.offset);
        }
        Ok(())
    }

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
        let period = Period::containing(update.period_start);
        // A settled period's usage read again is refused below; its lines stay as billed.
        let open = line_open(state.ledger.settled_through(), period, None);
        if open && state.opened.insert(period) {
            match state.ledger.opening_lines(period) {
                Ok(lines) => self.pending.rows(partition).opening.extend(lines),
                Err(e) => {
                    tracing::error!(error = %e, %period, "cannot rate a period's opening lines")
                }
            }
        }
        let version = state.row_version();
        let windows = std::mem::take(&mut update.windows);
        let series = (!windows.is_empty()).then(|| Arc::new(update.series.to_owned()));
        let period_start = update.period_start;
        let recorded = record(&mut state.ledger, &update);
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

    /// Schedules every held partition for a price-book check once `interval` has
    /// passed since the last time, and a store to run it: lines another rater wrote
    /// with another book meanwhile (a rolling restart, say) are then re-rated, even in
    /// partitions that stayed here.
    fn schedule_price_book_check(&mut self, interval: Duration) {
        if self.check_scheduled.elapsed() < interval || self.partitions.is_empty() {
            return;
        }
        self.check_scheduled = Instant::now();
        for state in self.partitions.values_mut() {
            state.unchecked = true;
        }
        self.pending.started.get_or_insert_with(Instant::now);
    }

    /// Whether to store the pending batch now: when it is full, when its oldest line
    /// has waited `flush_interval`, or when a poll found nothing more to read
    /// (`caught_up`) and the last insert is `min_insert_interval` ago. Lines then reach
    /// ClickHouse soon after the commit that made them visible, and inserts stay at
    /// most one per `min_insert_interval` however many aggregators commit.
    fn store_due(&self, settings: &RaterSettings, caught_up: bool) -> bool {
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
    fn store(&mut self, consumer: &GroupConsumer) -> Result<(), RaterError> {
        self.finish(consumer)?;
        if let Err(e) = self.check_price_book() {
            self.metrics.query_failures.inc();
            if e.is_missing_table() {
                return Err(RaterError::TablesGone(e));
            }
            self.hold(
                consumer,
                "cannot check the stored lines against the price book",
                e.to_string(),
            );
            return Err(e.into());
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
            return Err(RaterError::Kafka {
                what: "deliver rated lines to the rated topic".to_owned(),
                source: e,
            });
        }
        if !in_flight.stored {
            if let Err(e) = self.write_batch(&in_flight.batch) {
                self.metrics.insert_failures.inc();
                if e.is_missing_table() {
                    return Err(RaterError::TablesGone(e));
                }
                self.hold(consumer, "ClickHouse refused the write", e.to_string());
                return Err(e.into());
            }
            in_flight.stored = true;
        }
        let mut offsets = TopicPartitionList::new();
        for (&partition, (offset, point)) in &in_flight.batch.offsets {
            let mut committing = offsets.add_partition(&self.topic, partition);
            (committing.set_offset(Offset::Offset(*offset)))
                .map_err(kafka("list the offsets to commit"))?;
            committing.set_metadata(point.to_metadata());
        }
        // The partitions may have been revoked meanwhile (nothing to commit then):
        // their next owner re-reads them.
        if offsets.count() > 0 {
            if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
                // Kept in flight: a partition with no later updates would otherwise
                // stay behind its stored lines until the rater restarts.
                self.hold(consumer, "Kafka refused the windows offsets", e.to_string());
                return Err(kafka("commit the windows offsets")(e));
            }
        }
        self.resume(consumer);
        Ok(())
    }

    /// Checks the stored lines of partitions newly assigned, or scheduled for a check,
    /// against the price book. A stale line (rated by another book, in an open period)
    /// is its customer's partition's: if it never had usage (version 0), the one Kafka's
    /// partitioner names; else the one that saw the customer's usage. A partition with
    /// stale lines of its own is re-rated: every line it holds, and the zero-usage lines
    /// of those periods of its partitioner-named customers (version 0, as when a period
    /// opens), go with the next batch. Each of its other stale lines is replaced, at
    /// version 0 or the batch's version, with its zero-usage line if the book still
    /// makes it (its usage no longer priced there), or else retired (a customer removed,
    /// a price renamed). Lines of periods settled in their partition stay as billed.
    /// A partition whose last commit names another book is re-rated as well. One with
    /// a stale row past its position waits (up to [`MAX_CHECK_DEFERRAL`]) until it has
    /// read that far, so its rows are not older than the row they replace.
    fn check_price_book(&mut self) -> Result<(), ClickHouseError> {
        let checking: Vec<i32> = (self.partitions.iter())
            .filter(|(_, state)| state.unchecked)
            .map(|(&partition, _)| partition)
            .collect();
        let Some(oldest_open) = (checking.iter())
            .map(|p| {
                self.partitions[p]
                    .ledger
                    .settled_through()
                    .map(|s| s.next())
            })
            .min()
        else {
            return Ok(());
        };
        let stale = (self.clickhouse).lines_rated_with_another_book(&self.book, oldest_open)?;
        let stale_ids: HashSet<&str> = stale.iter().map(|line| line.id.as_str()).collect();
        let mut deferred = false;
        for partition in checking {
            let state = self.partitions.get_mut(&partition).expect("listed above");
            let judge = ZeroUsageJudge {
                partition,
                partition_count: self.partition_count,
            };
            let own_stale = state.own_stale_lines(&stale, judge);
            if state.check_waits_for_position(partition, &own_stale) {
                deferred = true;
                continue;
            }
            state.check_deferred = None;
            state.unchecked = false;
            let another_book = std::mem::take(&mut state.stored_with_another_book);
            if own_stale.is_empty() && !another_book {
                continue;
            }
            let rerate = Rerate {
                stale: own_stale,
                stored_with_another_book: another_book,
                all_stale_ids: &stale_ids,
                judge,
            };
            state.rerate_for_book(rerate, self.pending.rows(partition));
        }
        if deferred {
            // Checked again at the next store, which this makes due.
            self.pending.started.get_or_insert_with(Instant::now);
        }
        Ok(())
    }

    /// Moves each partition's changed lines, rated, into the pending batch, with the
    /// offset they account for.
    fn collect_changed_lines(&mut self) {
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
            for e in failures {
                self.metrics.rating_failures.inc();
                tracing::error!(error = %e, partition, "a line cannot be rated; it stays pending, the partition's other lines go on");
            }
            let restated = &mut state.restated;
            self.pending
                .rows(partition)
                .lines
                .extend(lines.into_iter().map(|mut rated| {
                    if let Some(stored) = restated.remove(&rated.line.id) {
                        rated.delta = rated.line.amount - stored;
                    }
                    (version, rated)
                }));
            let point = state.rebuild_point(&self.book);
            (self.pending.offsets).insert(partition, (state.next_offset, point));
            state.uncommitted = false;
        }
        self.count_held_lines();
    }

    fn count_held_lines(&self) {
        let held: usize = self
            .partitions
            .values()
            .map(|p| p.ledger.lines_held())
            .sum();
        self.metrics.ledger_lines.set(held as i64);
    }

    /// Inserts the batch's lines into ClickHouse, retires the stale ones, then inserts
    /// the batch's windows.
    fn write_batch(&mut self, batch: &Pending) -> Result<(), ClickHouseError> {
        let rows: Vec<(u64, &InvoiceLine)> = (batch.opening().map(|line| (0, line)))
            .chain(batch.lines().map(|(v, l)| (*v, &l.line)))
            .collect();
        let retiring = batch.retired().count();
        let windows = batch.windows().count();
        if rows.is_empty() && retiring == 0 && windows == 0 {
            // Records that changed nothing stored (a settled record, usage of unknown
            // customers without its windows): their offsets move on without an insert.
            return Ok(());
        }
        let started = Instant::now();
        self.last_insert = Some(started);
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
                    return Err(kafka("queue rated lines: the producer's queue stayed full")(full))
                }
                Err(refused) => return Err(self.refused_line(refused)),
            }
        }
        Ok(())
    }

    /// Set for good once Kafka refused a rated line (not just delayed it): the rater
    /// must stop before any later offset of that line's partition is committed.
    fn undelivered(&self) -> Option<RaterError> {
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

    /// Pauses the partitions until a retry, later each time, after a write failed.
    fn hold(&mut self, consumer: &GroupConsumer, what: &str, error: String) {
        let backoff = self.retry_at.map_or(Duration::from_millis(500), |(_, b)| {
            (b * 2).min(Duration::from_secs(10))
        });
        if self.retry_at.is_none() {
            tracing::warn!(%error, "{what}; pausing and retrying");
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
    fn resume(&mut self, consumer: &GroupConsumer) {
        if self.retry_at.is_none() {
            return;
        }
        match consumer.assignment().and_then(|a| consumer.resume(&a)) {
            Ok(()) => {
                tracing::info!("lines stored again; resuming");
                self.retry_at = None;
                self.readiness.ready();
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

/// A record as `apply` takes it: with its windows if they are stored, without
/// reading them if not. Windows that cannot be read are logged and left out; the
/// usage is rated all the same.
fn decode_with_windows<'m>(message: &'m BorrowedMessage<'_>, windows: bool) -> Option<Change<'m>> {
    let mut windows_error = None;
    if windows && header_value(message, SETTLED_HEADER).is_none() {
        match serde_json::from_slice(message.payload().unwrap_or_default()) {
            Ok(update) => return Some(Change::Usage(update)),
            Err(error) => windows_error = Some(error),
        }
    }
    // Logs a record that cannot be read at all.
    let change = decode::<IgnoredAny>(message)?;
    if let Some(error) = windows_error {
        tracing::error!(
            partition = message.partition(),
            offset = message.offset(),
            %error,
            "a windows record's windows cannot be read; its usage is rated without them"
        );
    }
    Some(match change {
        Change::Usage(update) => Change::Usage(UsageRecord {
            series: update.series,
            period_start: update.period_start,
            period_to_date: update.period_to_date,
            windows: Vec::new(),
        }),
        Change::Settled(period) => Change::Settled(period),
    })
}

fn decode<'m, W: Deserialize<'m> + Default>(
    message: &'m BorrowedMessage<'_>,
) -> Option<Change<'m, W>> {
    let decoded = match header_value(message, SETTLED_HEADER) {
        Some(value) => std::str::from_utf8(value)
            .map_err(|e| e.to_string())
            .and_then(|value| value.parse::<Period>().map_err(|e| e.to_string()))
            .map(Change::Settled),
        None => serde_json::from_slice(message.payload().unwrap_or_default())
            .map(Change::Usage)
            .map_err(|e| e.to_string()),
    };
    match decoded {
        Ok(change) => Some(change),
        Err(error) => {
            tracing::error!(
                partition = message.partition(),
                offset = message.offset(),
                %error,
                "skipping a windows record that is neither a usage update nor a settled record"
            );
            None
        }
    }
}

fn record<W>(ledger: &mut Ledger, update: &UsageRecord<'_, W>) -> Recorded {
    ledger.record_ref(
        &update.series,
        Period::containing(update.period_start),
        update.period_to_date,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(book: &str, period: Period) -> Vec<InvoiceLine> {
        let config = Arc::new(Config::parse(book, "test").unwrap());
        Ledger::new(config).opening_lines(period).unwrap()
    }

    #[test]
    fn a_commit_names_the_book_only_once_lines_of_another_are_re_rated() {
        let config =
            Arc::new(Config::parse(include_str!("../../../examples/tally.toml"), "test").unwrap());
        let mut state = PartitionState {
            ledger: Ledger::new(config),
            opened: BTreeSet::new(),
            next_offset: 40,
            uncommitted: true,
            customers_with_usage: HashSet::new(),
            unchecked: true,
            stored_with_another_book: true,
            check_deferred: Some(Instant::now()),
            restated: HashMap::new(),
            first_offsets: FirstOffsets::default(),
        };
        // Its check deferred, the partition still holds the old book's lines: a next
        // owner with the new book must re-rate them all, as this one would have.
        assert_eq!(state.rebuild_point("new").book, None);
        state.stored_with_another_book = false;
        assert_eq!(state.rebuild_point("new").book.as_deref(), Some("new"));
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
