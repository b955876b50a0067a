//! The aggregator service: the aggregator core on Kafka, exactly once.
//!
//! In: CloudEvents from `<prefix>.events` (any producer: the ingest service or a
//! product service writing straight to Kafka), as a member of consumer group
//! `<prefix>-aggregator`, and control records among them (a period close that
//! [`close_period`] writes). Out, per transaction: a usage update per changed series and
//! period (its period-to-date value and changed windows) to `<prefix>.windows`, and a
//! control record there when a month has settled (see [`SETTLED_HEADER`](tally_schemas::records::SETTLED_HEADER)),
//! refused events (original bytes, cut to fit a record; reason in headers) to
//! `<prefix>.rejected`, events
//! read on another partition than Kafka's Java partitioner gives their subject back to
//! `<prefix>.events`, on that partition (see [`FORWARDED_FROM_HEADER`](tally_schemas::records::FORWARDED_FROM_HEADER)), the
//! state changes to `<prefix>.aggregator-changelog`, and the offsets of the events
//! they account for.
//! The topics and the offsets commit or abort together, so downstream
//! `read_committed` consumers see every event's effect exactly once.
//!
//! Each partition has its own [`Aggregator`]; the windows and state changes of events
//! partition p go to partition p of `<prefix>.windows` and of the changelog (rejected
//! copies are keyed like the event and partitioned by Kafka). On assignment a partition's
//! state is rebuilt from its changelog before any of its events is read, and reading
//! starts where that state ends; on revocation the open transaction is committed
//! first. After any failed commit the transaction is aborted, the producer recreated
//! (which fences a zombie of the same instance) and every owned partition's state
//! rebuilt from its changelog, so memory never runs ahead of what Kafka holds. Fenced
//! twice within ten minutes, the service stops: another live process has
//! its instance id, and recovering would only fence that one in turn.
//!
//! Layout: this module holds the worker, its consume loop and the rebalance callbacks;
//! [`route`] decides what becomes of each record, [`outputs`] writes rejected copies
//! and forwards, [`transaction`] publishes a batch's changes and commits or recovers,
//! [`restore`] rebuilds an assigned partition from [`changelog`], and [`close`] closes
//! billing periods by control record.

mod changelog;
mod close;
mod metrics;
mod outputs;
mod restore;
mod route;
mod transaction;

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use prometheus::IntGauge;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::TopicPartitionList;
use tally_runtime::kafka::{
    failed_to, group_consumer, held_partitions, leave_group, partition_count, partitions_beyond,
    poll_group, ConsumerHealth, GroupContext, KafkaOpError, KafkaProducer, PartitionOwner,
    MAX_EVENT_RECORD_BYTES, MAX_RECORD_BYTES,
};
use tally_runtime::ops::Readiness;
use tally_runtime::threads::{lock, on_threads};
use tally_runtime::throttle::LogThrottle;
use tally_runtime::Shutdown;
use tally_schemas::config::{Config, Group, KafkaSettings, ServiceSettings, Topic};
use tally_schemas::time::Period;

pub use close::close_period;
pub use metrics::{AggregatorMetrics, EventOutcome};

use crate::aggregator::Aggregator;
use crate::meter::ConfiguredMeters;
use changelog::ChangelogState;
use route::Processed;
use transaction::{new_producer, transactional_id};

/// Most events in one transaction; with `commit_interval`, bounds its size.
const MAX_TRANSACTION_EVENTS: usize = 100_000;
/// Most events read before they are processed, spread over the partitions' threads.
const MAX_BATCH_EVENTS: usize = 20_000;
/// How long a batch keeps gathering after its first event: a trickle of events is
/// processed in batches of some hundreds, not a thread handover per event.
const BATCH_LINGER: Duration = Duration::from_millis(10);
/// Timeout of each transactional call; a commit slower than this is aborted.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the consume loop waits for Kafka to take an idle partition's close record:
/// it holds the loop (and after a failure, the next attempt waits [`IDLE_CLOSE_BACKOFF`]).
const IDLE_CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How long after a failed attempt the next one waits.
const IDLE_CLOSE_BACKOFF: Duration = Duration::from_secs(60);
/// Longest a partition's restore may read its changelog; inside the consumer's
/// default `max.poll.interval.ms` (15 min), as restores run in the rebalance callback
/// (several of them one after another on a thread, which may add up to more).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a restore that ends before the committed offset is read again, waiting
/// for the last transaction's markers.
const RESTORE_BEHIND_PATIENCE: Duration = Duration::from_secs(5);
/// How often the consume loop asks Kafka whether partitions were added to the events
/// topic (a metadata request, which holds the loop while Kafka is slow to answer).
const PARTITION_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// A producer fenced again this soon after the last time was fenced by another live
/// process with its transactional id, not by a transaction the broker timed out.
const FENCED_AGAIN_WITHIN: Duration = Duration::from_secs(600);

/// Where the aggregator service failed.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error(transparent)]
    Kafka(#[from] KafkaOpError),
    #[error("cannot restore a partition's state: {0}")]
    Restore(#[from] tally_runtime::kafka::ReadError),
    #[error(transparent)]
    InstanceInUse(#[from] Box<tally_runtime::kafka::InstanceInUse>),
    #[error("fenced twice within {} minutes: another process initialised transactions as {transactional_id}, so another aggregator runs with TALLY_INSTANCE_ID {instance_id} (a run of this instance started while this one was frozen or unreachable, a frozen one that woke, or a second one configured alike). This one stops, so the two do not abort each other's transactions in turn; if both should run, give each its own TALLY_INSTANCE_ID (the default, the host name, differs per host).", FENCED_AGAIN_WITHIN.as_secs() / 60)]
    Fenced {
        transactional_id: String,
        instance_id: String,
    },
    #[error("Kafka refused a record the aggregator must write, and would refuse it again after every recovery: {source}. Give the aggregator's principal Write on the events, windows, rejected and changelog topics (forwarding misplaced events writes to the events topic), make their max.message.bytes at least Kafka's default of 1048588, which takes a rejected copy or a forwarded event (at most {MAX_EVENT_RECORD_BYTES} bytes; the windows and changelog topics {MAX_RECORD_BYTES}), and leave the rejected topic uncompacted (a compacted topic refuses its records without a key); the aggregator stops rather than retry in a loop")]
    Unwritable { source: KafkaError },
    #[error("topic {topic} now has {found} partitions where the pipeline has {partitions}: partitions were added to it while the aggregator ran, and a state topic's partitions hold the customers murmur2 gives them over the pipeline's count. A pipeline's partition count cannot change; the aggregator stops rather than bill customers' months in two pieces: start a new pipeline for more partitions (README, \"Changing the partition count\")")]
    StateTopicGrew {
        topic: String,
        found: usize,
        partitions: usize,
    },
    #[error("partition {partition}'s state was committed by a pipeline of {committed} partitions, but the topics now have {partitions}: partitions were added to them, and the state holds the customers murmur2 gave that partition over {committed}. A pipeline's partition count cannot change: start a new pipeline for more partitions (README, \"Changing the partition count\")")]
    PartitionCountChanged {
        partition: i32,
        committed: usize,
        partitions: usize,
    },
    #[error("partition {partition}'s state in changelog {topic} cannot be restored with this price book: {source}")]
    MeterChanged {
        topic: String,
        partition: i32,
        source: crate::RestoreError,
    },
    #[error("partition {partition}'s state holds usage of meter {meter:?} counted under a definition this price book does not have (the meter removed, or its event_type, aggregation, value_property, allow_negative_values or group_by changed), as its last commit says: another aggregator of the group runs another book, or ran it last. This one stops rather than count that meter's events two ways at once. Run every aggregator with one book, the one that usage was counted with (stop them all, then start them all), and put a new definition in a new meter (another slug) with prices from the month it starts; `tally validate --deployed` lists what a book changes. Where no book restores every partition (the meter's first usage counted both ways), list it in [aggregator] accept_redefined_meters on every aggregator to keep what was counted (README, \"A new price book\")")]
    MeterRedefined { meter: String, partition: i32 },
    #[error("the state of {events}[{partition}] cannot be rebuilt: changelog {changelog} ends at events offset {state_ends}, before the committed offset {committed} (records of it were lost: the topic deleted, or a broker's log), and {events}'s retention deleted the events from {state_ends} up to {oldest_held}, of which those before the committed offset were counted and billed (unless the offset was moved ahead by hand). Counted on from what is left, the partition's open months would be billed from part of their usage, and lines already stored would go down. The aggregator stops. Restore {changelog} if there is a copy; else set [aggregator] accept_lost_state = true on the aggregators to count on from offset {oldest_held}, knowing those months' lines go down by the deleted events' usage (README, \"A lost changelog\"), and take it out again once the partition counts")]
    StateLost {
        events: String,
        changelog: String,
        partition: i32,
        state_ends: i64,
        committed: i64,
        oldest_held: i64,
    },
    #[error("changelog {topic}[{partition}] at offset {offset} cannot be read: {problem}. The state of that partition cannot be rebuilt; was a meter removed, or its aggregation or group_by changed? Restore with the price book the state was built with, or start over with a new topic prefix and a new ClickHouse database.")]
    CorruptChangelog {
        topic: String,
        partition: i32,
        offset: i64,
        problem: String,
    },
}

/// The pipeline's partition count, committed with each partition's offset: a state
/// is of the customers murmur2 gives a partition over that count, so a new owner with
/// another count (partitions added to every topic) must not resume it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PartitionCount(NonZeroUsize);

impl PartitionCount {
    const PREFIX: &'static str = "partitions=";

    fn to_metadata(self) -> String {
        format!("{}{}", Self::PREFIX, self.0)
    }

    /// `None` for offsets committed without it (by a build before it was written).
    fn from_metadata(metadata: &str) -> Option<Self> {
        let (count, _) = metadata.split_once(' ').unwrap_or((metadata, ""));
        let count = count.strip_prefix(Self::PREFIX)?.parse().ok()?;
        Some(PartitionCount(count))
    }
}

/// The meters whose usage a partition's state holds, as fingerprints of their
/// definitions by slug ([`MeterDefinition::fingerprint`]), committed with its offset
/// beside its [`PartitionCount`]: `partitions=4 meters={"tokens":"0f3a…"}`. Every
/// member of the group reads every partition's, so an aggregator whose book defines
/// such a meter otherwise stops before it counts anything, even where its own
/// partitions hold none of that meter's usage (a rolling restart with a meter changed).
///
/// [`MeterDefinition::fingerprint`]: crate::meter::MeterDefinition::fingerprint
struct HeldMeters;

impl HeldMeters {
    const SEPARATOR: &'static str = " meters=";
    /// Kafka refuses a commit whose metadata is longer than `offset.metadata.max.bytes`
    /// (4096 by default): past this, the meters are left out, and not checked, rather
    /// than the commit refused.
    const MOST_BYTES: usize = 3000;

    /// `count`'s metadata with the meters `held`.
    fn metadata(count: PartitionCount, held: &BTreeMap<String, u64>) -> String {
        let mut metadata = count.to_metadata();
        let fingerprints: BTreeMap<&str, String> = (held.iter())
            .map(|(slug, fingerprint)| (slug.as_str(), format!("{fingerprint:016x}")))
            .collect();
        // Plain data with string keys: a failure is a bug.
        let meters = serde_json::to_string(&fingerprints).expect("fingerprints serialise");
        if !held.is_empty()
            && metadata.len() + Self::SEPARATOR.len() + meters.len() <= Self::MOST_BYTES
        {
            metadata.push_str(Self::SEPARATOR);
            metadata.push_str(&meters);
        }
        metadata
    }

    /// `None` where the commit names none (no usage held, too many meters, or a build
    /// before they were committed).
    fn from_metadata(metadata: &str) -> Option<BTreeMap<String, u64>> {
        let (_, meters) = metadata.split_once(Self::SEPARATOR)?;
        let fingerprints: BTreeMap<String, String> = serde_json::from_str(meters).ok()?;
        (fingerprints.into_iter())
            .map(|(slug, hex)| Some((slug, u64::from_str_radix(&hex, 16).ok()?)))
            .collect()
    }
}

/// Reads every partition's committed offset and refuses to go on where one's state
/// holds usage of a meter this book removed or defines otherwise ([`HeldMeters`]).
/// `patient`: Kafka not answering is waited out (at an assignment, which cannot go on
/// without it), else tried once.
fn check_held_meters(
    consumer: &GroupConsumer,
    topics: &Topics,
    pipeline: NonZeroUsize,
    configured: &ConfiguredMeters,
    patient: bool,
) -> Result<(), AggregatorError> {
    let mut every = TopicPartitionList::new();
    for partition in 0..i32::try_from(pipeline.get()).unwrap_or(i32::MAX) {
        every.add_partition(&topics.events, partition);
    }
    let committed = match patient {
        true => tally_runtime::kafka::committed_offsets(consumer, &every),
        false => consumer.committed_offsets(every, Duration::from_secs(10)),
    };
    let committed = committed.map_err(failed_to("read every partition's committed offset"))?;
    for element in committed.elements() {
        let Some(held) = HeldMeters::from_metadata(element.metadata()) else {
            continue;
        };
        if let Some(meter) = configured.first_redefined(&held) {
            return Err(AggregatorError::MeterRedefined {
                meter: meter.to_owned(),
                partition: element.partition(),
            });
        }
    }
    Ok(())
}

/// Topic names, resolved once.
#[derive(Debug, Clone)]
struct Topics {
    events: String,
    windows: String,
    rejected: String,
    changelog: String,
}

impl Topics {
    fn of(kafka: &KafkaSettings) -> Topics {
        Topics {
            events: kafka.topic(Topic::Events),
            windows: kafka.topic(Topic::Windows),
            rejected: kafka.topic(Topic::Rejected),
            changelog: kafka.topic(Topic::AggregatorChangelog),
        }
    }
}

/// One owned partition of the events topic.
#[derive(Debug)]
struct PartitionState {
    aggregator: Aggregator,
    /// Next offset to read; what the open transaction will commit.
    next_offset: i64,
    /// Read something since the last commit.
    touched: bool,
    /// What the partition's changelog records written so far mean for the next ones.
    changelog: ChangelogState,
    /// Tells this ownership's delta keys from an earlier one's: after a replay the same
    /// offsets are committed again, and compaction must not let the new (empty) delta
    /// replace the original under the same key.
    generation: u64,
    /// When the partition last read a record (or was restored): it is idle from then.
    last_read: Instant,
    /// The period a control record was written to close, once the partition idled
    /// past it ([`Worker::close_idle_partitions`]).
    close_requested: Option<Period>,
}

/// Everything the consume loop and the rebalance callback share.
struct Worker {
    config: Arc<Config>,
    /// The pipeline's partition count (its windows topic's): events go to
    /// `murmur2(subject) % count`, and partitions of the events topic past it are
    /// left unread.
    partition_count: NonZeroUsize,
    period_close_grace: Duration,
    /// `[aggregator] accept_lost_state`.
    accept_lost_state: bool,
    /// `[aggregator] close_idle_after`.
    close_idle_after: Option<Duration>,
    /// The book's meters' definitions' fingerprints, by slug ([`HeldMeters`]).
    meters: Arc<ConfiguredMeters>,
    /// After a failed attempt to write idle partitions' close records, none before
    /// this: each attempt holds the consume loop up to [`IDLE_CLOSE_WAIT`].
    idle_close_not_before: Option<Instant>,
    /// A partition's changelog is due a snapshot once its deltas since the last one
    /// exceed this many bytes and the last snapshot's size
    /// ([`PartitionState::snapshot_overdue`]).
    snapshot_after_bytes: usize,
    kafka: KafkaSettings,
    topics: Topics,
    producer: KafkaProducer,
    partitions: BTreeMap<i32, PartitionState>,
    transaction_open: bool,
    /// Kafka timestamp (ms) of the oldest event in the open transaction.
    oldest_event_ms: Option<i64>,
    transaction_events: usize,
    transaction_started: Instant,
    metrics: AggregatorMetrics,
    readiness: Readiness,
    /// A record of the open transaction could not be queued: it must not commit.
    broken: Option<KafkaError>,
    /// When the producer was last fenced: another producer initialised transactions
    /// with its transactional id, or the broker timed a transaction out.
    fenced_at: Option<Instant>,
    /// Refused events are logged, each code at most once a minute: a sender's bug
    /// can refuse every event it sends.
    refusals_logged: LogThrottle<&'static str>,
    /// Forwarded events are logged at most once a minute: a producer partitioning
    /// otherwise misplaces most of its events.
    forwards_logged: LogThrottle<()>,
    /// Counts recoveries: messages read before one are read again after it. Read by
    /// the consume loop without the lock, while a batch is processed.
    epoch: Arc<AtomicU64>,
}

impl Worker {
    fn new(
        config: Arc<Config>,
        meters: Arc<ConfiguredMeters>,
        settings: &ServiceSettings,
        topics: Topics,
        partition_count: NonZeroUsize,
        metrics: AggregatorMetrics,
        readiness: Readiness,
    ) -> Result<Worker, AggregatorError> {
        Ok(Worker {
            meters,
            config,
            partition_count,
            period_close_grace: settings.aggregator.period_close_grace,
            accept_lost_state: settings.aggregator.accept_lost_state,
            close_idle_after: settings.aggregator.close_idle_after,
            idle_close_not_before: None,
            snapshot_after_bytes: settings.aggregator.changelog_snapshot_bytes,
            kafka: settings.kafka.clone(),
            topics,
            producer: new_producer(&settings.kafka)?,
            partitions: BTreeMap::new(),
            transaction_open: false,
            oldest_event_ms: None,
            transaction_events: 0,
            transaction_started: Instant::now(),
            metrics,
            readiness,
            broken: None,
            fenced_at: None,
            refusals_logged: LogThrottle::default(),
            forwards_logged: LogThrottle::default(),
            epoch: Arc::new(AtomicU64::new(0)),
        })
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("partitions", &self.partitions.keys().collect::<Vec<_>>())
            .field("transaction_open", &self.transaction_open)
            .finish_non_exhaustive()
    }
}

type GroupConsumer = BaseConsumer<GroupContext<Worker>>;

impl PartitionOwner for Worker {
    type Error = AggregatorError;

    /// Restores each newly assigned partition, then assigns it at the offset its state
    /// accounts for.
    fn assign(
        &mut self,
        consumer: &GroupConsumer,
        partitions: &mut TopicPartitionList,
    ) -> Result<(), AggregatorError> {
        self.assign_restored(consumer, partitions)
    }

    /// Commits the open transaction, then lets the revoked partitions go.
    fn revoke(
        &mut self,
        consumer: &GroupConsumer,
        partitions: &TopicPartitionList,
    ) -> Result<(), AggregatorError> {
        let revoked: Vec<i32> = partitions
            .elements()
            .iter()
            .map(|e| e.partition())
            .collect();
        if consumer.assignment_lost() && (self.transaction_open || self.broken.is_some()) {
            // The group gave the partitions away (this member missed its session):
            // their new owner may be reading them already. The open transaction is
            // aborted, not offered to the broker to refuse.
            tracing::warn!(partitions = ?revoked, "partitions lost to the group; aborting the open transaction");
            self.metrics.transactions_aborted.inc();
            for partition in &revoked {
                self.partitions.remove(partition);
            }
            self.recover(consumer)?;
        } else {
            self.commit_or_recover(consumer, &revoked)?;
            tracing::info!(partitions = ?revoked, "partitions revoked, the open transaction ended first (committed, or aborted and the state rebuilt)");
        }
        for partition in &revoked {
            self.partitions.remove(partition);
        }
        self.record_held_state();
        consumer
            .incremental_unassign(partitions)
            .map_err(failed_to("release the revoked partitions"))?;
        self.readiness.held_changed(held_partitions(consumer));
        Ok(())
    }
}

/// Runs the aggregator until `shutdown`, then commits what it has read and leaves the
/// group. Blocking: run it on its own thread. The topics must exist, with
/// `partition_count` partitions ([`tally_runtime::kafka::ensure_topics`] says how many).
pub fn run(
    config: Arc<Config>,
    settings: &ServiceSettings,
    partition_count: NonZeroUsize,
    metrics: AggregatorMetrics,
    readiness: Readiness,
    shutdown: Shutdown,
) -> Result<(), AggregatorError> {
    let kafka = &settings.kafka;
    let topics = Topics::of(kafka);
    // Before initialising transactions, which would fence a live instance of the same
    // id (a misconfigured second process) rather than a dead one.
    readiness.not_ready(format!(
        "starting: waiting for an earlier run of instance {} to leave group {} (a run that died leaves once its session expires)",
        kafka.instance_id,
        kafka.group(Group::Aggregator)
    ));
    tally_runtime::kafka::wait_until_instance_free(kafka, Group::Aggregator, &shutdown)?;
    let meters = Arc::new(ConfiguredMeters::new(
        &config,
        settings.aggregator.accept_redefined_meters.clone(),
    ));
    warn_of_accepted_meters(&meters);
    let mut chores = Chores {
        commit_interval: settings.aggregator.commit_interval,
        partition_count,
        unread: metrics.unread_partitions.clone(),
        meters: Arc::clone(&meters),
        last_lag: Instant::now(),
        last_partition_check: None,
    };
    let worker = Worker::new(
        config,
        meters,
        settings,
        topics.clone(),
        partition_count,
        metrics,
        readiness.clone(),
    )?;
    let worker = Arc::new(Mutex::new(worker));
    let consumer: GroupConsumer = group_consumer(
        kafka,
        Group::Aggregator,
        &topics.events,
        Arc::clone(&worker),
    )
    .map_err(failed_to(format!(
        "join group {} on {}",
        kafka.group(Group::Aggregator),
        topics.events
    )))?;
    // Ready once the group's first assignment to it is restored, or once it is a
    // standby.
    readiness.not_ready(format!(
        "joining consumer group {}: no partitions assigned yet",
        kafka.group(Group::Aggregator)
    ));
    tracing::info!(topic = %topics.events, group = %kafka.group(Group::Aggregator), transactional_id = %transactional_id(kafka), "aggregator started");
    let epoch = Arc::clone(&lock(&worker).epoch);
    let mut health = ConsumerHealth::new(
        readiness,
        kafka.group(Group::Aggregator),
        partition_count.get(),
    );
    // One batch is processed on its own thread while the next is read.
    std::thread::scope(|scope| -> Result<(), AggregatorError> {
        let mut batch: Vec<BorrowedMessage<'_>> = Vec::with_capacity(MAX_BATCH_EVENTS);
        let mut processing: Option<std::thread::ScopedJoinHandle<'_, Vec<BorrowedMessage<'_>>>> =
            None;
        while !shutdown.is_requested() {
            let read_in = read_batch(&consumer, &mut batch, &mut health, &epoch)?;
            let mut spare = match processing.take() {
                Some(handle) => handle
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p)),
                None => Vec::with_capacity(MAX_BATCH_EVENTS),
            };
            spare.clear();
            chores.run_due(&worker, &consumer, &topics)?;
            // A recovery since the batch was read rewound the consumer to before it.
            if epoch.load(Ordering::SeqCst) != read_in {
                batch.clear();
            }
            if batch.is_empty() {
                // Every record delivered so far is processed: any gap to the
                // consumer's position is transaction markers.
                lock(&worker).step_over_markers(&consumer);
            }
            let ready = std::mem::replace(&mut batch, spare);
            let worker = &worker;
            processing = Some(scope.spawn(move || {
                let mut worker = lock(worker);
                // The next read's rebalance callbacks can take the lock first. A
                // recovery there rebuilt the state and rewound the consumer to where
                // the state ends, before this batch: applied now, the batch would move
                // the offsets past the events between (they come again and would be
                // skipped as counted). The epoch moves only under this lock.
                if worker.epoch.load(Ordering::SeqCst) == read_in {
                    worker.process(&ready);
                }
                drop(worker);
                ready
            }));
        }
        if let Some(handle) = processing.take() {
            handle
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
        Ok(())
    })?;
    tracing::info!("aggregator stopping: committing what was read");
    lock(&worker).commit_or_recover(&consumer, &[])?;
    leave_group(&consumer);
    Ok(())
}

/// Says at start that `[aggregator] accept_redefined_meters` lists meters, so the entry
/// is not forgotten once the month it was added for has settled.
fn warn_of_accepted_meters(meters: &ConfiguredMeters) {
    if !meters.accepted.is_empty() {
        let listed: Vec<&str> = meters.accepted.iter().map(String::as_str).collect();
        tracing::warn!(meters = %listed.join(", "), "[aggregator] accept_redefined_meters lists meters whose usage held under another definition is kept as counted: while listed, a change of their event_type, value_property, allow_negative_values or dimension paths is not refused; remove the entry once the month it was added for has settled");
    }
}

/// What the consume loop does between batches, each when it is due: commit the open
/// transaction, record the consumer lag and close idle partitions, and ask Kafka about
/// the group's topics and meters.
struct Chores {
    commit_interval: Duration,
    partition_count: NonZeroUsize,
    /// `tally_aggregator_unread_partitions`, set by the partition check.
    unread: IntGauge,
    meters: Arc<ConfiguredMeters>,
    last_lag: Instant,
    last_partition_check: Option<Instant>,
}

impl Chores {
    fn run_due(
        &mut self,
        worker: &Mutex<Worker>,
        consumer: &GroupConsumer,
        topics: &Topics,
    ) -> Result<(), AggregatorError> {
        {
            let mut worker = lock(worker);
            let due = worker.broken.is_some()
                || worker.transaction_open
                    && (worker.transaction_events >= MAX_TRANSACTION_EVENTS
                        || worker.transaction_started.elapsed() >= self.commit_interval);
            if due {
                worker.commit_or_recover(consumer, &[])?;
            }
            if self.last_lag.elapsed() >= tally_runtime::kafka::LAG_RECORD_INTERVAL {
                self.last_lag = Instant::now();
                tally_runtime::kafka::record_lag(consumer, &worker.metrics.consumer_lag, |p| {
                    worker.partitions.get(&p).map(|state| state.next_offset)
                });
                worker.close_idle_partitions(Utc::now());
            }
        }
        // Outside the worker's lock: Kafka may be slow to answer.
        let partition_check_due =
            (self.last_partition_check).is_none_or(|at| at.elapsed() >= PARTITION_CHECK_INTERVAL);
        if partition_check_due {
            self.last_partition_check = Some(Instant::now());
            check_partitions(consumer, topics, self.partition_count, &self.unread)?;
            match check_held_meters(consumer, topics, self.partition_count, &self.meters, false) {
                Err(e @ AggregatorError::MeterRedefined { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check the meters the group's partitions hold; checked again in a minute")
                }
                Ok(()) => {}
            }
        }
        Ok(())
    }
}

/// Asks Kafka whether partitions were added to the pipeline's topics. Added to the
/// events topic, they are counted in `unread` and said loudly: ingest does not write
/// to them and no aggregator reads them. Added to the windows or the changelog topic
/// (every topic grown alike), the aggregator stops: its partitions' states would no
/// longer be of the customers murmur2 sends there. Kafka not answering changes nothing.
fn check_partitions(
    consumer: &GroupConsumer,
    topics: &Topics,
    pipeline: NonZeroUsize,
    unread: &IntGauge,
) -> Result<(), AggregatorError> {
    if let Ok(beyond) = partitions_beyond(consumer.client(), &topics.events, pipeline) {
        unread.set(i64::from(beyond.end - beyond.start));
        if !beyond.is_empty() {
            tracing::error!(
                topic = %topics.events,
                unread = ?beyond,
                pipeline_partitions = pipeline.get(),
                "partitions were added to the events topic: ingest does not write to them and no aggregator reads them, so events other producers write there are not billed; a pipeline's partition count cannot change (README, \"Changing the partition count\")"
            );
        }
    }
    for topic in [&topics.windows, &topics.changelog] {
        match partition_count(consumer.client(), topic) {
            Ok(found) if found != pipeline.get() => {
                return Err(AggregatorError::StateTopicGrew {
                    topic: topic.clone(),
                    found,
                    partitions: pipeline.get(),
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Reads events into `batch`: up to [`MAX_BATCH_EVENTS`], waiting up to 100 ms for the
/// first and then up to [`BATCH_LINGER`] for more. Returns the recovery epoch the batch was read in: a recovery
/// inside a poll (a revocation's commit failed) rebuilt the state and rewound the
/// consumer, so what was read before it is dropped (it comes again).
fn read_batch<'c>(
    consumer: &'c GroupConsumer,
    batch: &mut Vec<BorrowedMessage<'c>>,
    health: &mut ConsumerHealth,
    epoch: &AtomicU64,
) -> Result<u64, AggregatorError> {
    let mut read_in = epoch.load(Ordering::SeqCst);
    let mut wait = Duration::from_millis(100);
    let mut linger_until = None;
    while batch.len() < MAX_BATCH_EVENTS {
        let polled = poll_group(
            consumer,
            wait,
            health,
            failed_to("consume the events topic"),
        )?;
        let now = epoch.load(Ordering::SeqCst);
        if now != read_in {
            read_in = now;
            batch.clear();
        }
        match polled {
            Some(message) => {
                batch.push(message);
                wait = Duration::ZERO;
            }
            None if batch.is_empty() => break,
            None => {
                // Nothing ready: wait once, briefly, for more.
                let until = *linger_until.get_or_insert_with(|| Instant::now() + BATCH_LINGER);
                wait = until.saturating_duration_since(Instant::now());
                if wait.is_zero() {
                    break;
                }
            }
        }
    }
    Ok(read_in)
}

impl Worker {
    /// Dedupes and aggregates a batch of events, each partition's on its own thread
    /// (in offset order); refused ones are written to the rejected topic in the open
    /// transaction.
    fn process(&mut self, batch: &[BorrowedMessage<'_>]) {
        if batch.is_empty() || self.broken.is_some() {
            return; // after a failure, recovery rewinds to before this batch
        }
        if let Err(e) = self.begin() {
            self.broken = Some(e);
            return;
        }
        let mut by_partition: BTreeMap<i32, Vec<&BorrowedMessage<'_>>> = BTreeMap::new();
        for message in batch {
            by_partition
                .entry(message.partition())
                .or_default()
                .push(message);
        }
        // Messages of a partition revoked while they were in flight are dropped.
        let now = Instant::now();
        let work: Vec<_> = self
            .partitions
            .iter_mut()
            .filter_map(|(p, state)| {
                let messages = by_partition.remove(p)?;
                state.last_read = now;
                Some((state, messages))
            })
            .collect();
        let (config, partition_count) = (&*self.config, self.partition_count);
        let results = on_threads(work, |(state, messages)| {
            let mut processed = Processed::default();
            for message in messages {
                state.process(config, partition_count, message, &mut processed);
            }
            processed
        });
        for processed in results {
            self.transaction_events += processed.events;
            self.oldest_event_ms = (self.oldest_event_ms.into_iter())
                .chain(processed.oldest_event_ms)
                .min();
            self.metrics.count(&processed.outcomes);
            for (message, rejection) in processed.rejections {
                if let Err(e) = self.reject(message, rejection) {
                    self.broken = Some(e);
                }
            }
            for (message, home, received_ms) in processed.forwards {
                if let Err(e) = self.forward(message, home, received_ms) {
                    self.broken = Some(e);
                }
            }
        }
    }

    /// Sets the gauges of what the owned partitions hold: their number, dedupe keys and
    /// series, and each one's watermark and close boundary (partitions no longer owned
    /// drop out).
    fn record_held_state(&self) {
        let metrics = &self.metrics;
        let held = |count: fn(&Aggregator) -> usize| {
            self.partitions
                .values()
                .map(|p| count(&p.aggregator) as i64)
                .sum()
        };
        metrics
            .assigned_partitions
            .set(self.partitions.len() as i64);
        metrics.dedupe_keys.set(held(Aggregator::dedupe_keys));
        metrics.series.set(held(Aggregator::series_count));
        metrics.watermark.reset();
        metrics.closed_before.reset();
        for (partition, state) in &self.partitions {
            let label = [partition.to_string()];
            let gauges = [
                (&metrics.watermark, state.aggregator.watermark()),
                (&metrics.closed_before, state.aggregator.closed_before()),
            ];
            for (gauge, time) in gauges {
                if let Some(time) = time {
                    gauge.with_label_values(&label).set(time.timestamp());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_count_travels_as_commit_metadata() {
        let four = PartitionCount(NonZeroUsize::new(4).unwrap());
        assert_eq!(four.to_metadata(), "partitions=4");
        assert_eq!(PartitionCount::from_metadata("partitions=4"), Some(four));
        // Offsets committed without it (an earlier build), or by hand.
        assert_eq!(PartitionCount::from_metadata(""), None);
        assert_eq!(PartitionCount::from_metadata("partitions=0"), None);
        assert_eq!(PartitionCount::from_metadata("{\"from\":1}"), None);
    }

    #[test]
    fn the_meters_a_state_holds_travel_beside_the_partition_count() {
        let four = PartitionCount(NonZeroUsize::new(4).unwrap());
        let held: BTreeMap<String, u64> = [
            ("tokens".to_owned(), 0x0f3a),
            ("odd \"slug\" name".to_owned(), u64::MAX),
        ]
        .into();
        let metadata = HeldMeters::metadata(four, &held);
        assert_eq!(
            metadata,
            r#"partitions=4 meters={"odd \"slug\" name":"ffffffffffffffff","tokens":"0000000000000f3a"}"#
        );
        assert_eq!(PartitionCount::from_metadata(&metadata), Some(four));
        assert_eq!(HeldMeters::from_metadata(&metadata), Some(held));
        // Nothing held, or an earlier build's commit: no meters to check.
        assert_eq!(HeldMeters::metadata(four, &BTreeMap::new()), "partitions=4");
        assert_eq!(HeldMeters::from_metadata("partitions=4"), None);
        // Too many to fit Kafka's limit: left out rather than the commit refused.
        let many: BTreeMap<String, u64> = (0..200).map(|i| (format!("meter_{i:03}"), i)).collect();
        assert_eq!(HeldMeters::metadata(four, &many), "partitions=4");
    }
}
