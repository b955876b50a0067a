//! The aggregator service: the aggregator core on Kafka, exactly once.
//!
//! In: CloudEvents from `<prefix>.events` (any producer: the ingest service or a
//! product service writing straight to Kafka), as a member of consumer group
//! `<prefix>-aggregator`, and control records among them (a period close that
//! [`close_period`] writes). Out, per transaction: a usage update per changed series and
//! period (its period-to-date value and changed windows) to `<prefix>.windows`, and a
//! control record there when a month has settled (see [`SETTLED_HEADER`]),
//! refused events (original bytes, cut to fit a record; reason in headers) to
//! `<prefix>.rejected`, events
//! read on another partition than Kafka's Java partitioner gives their subject back to
//! `<prefix>.events`, on that partition (see [`FORWARDED_FROM_HEADER`]), the
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

mod changelog;
mod metrics;

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::Offset;
use tally_runtime::kafka::{
    client_config, committed_offsets, flush, group_consumer, header_value,
    idempotent_producer_config, leave_group, offset_of, partition_count, partition_for_key,
    poll_group, positions_ahead, send, tunable, ConsumerHealth, DeliveryReports, GroupContext,
    KafkaProducer, PartitionOwner, MAX_RECORD_BYTES,
};
use tally_runtime::metrics::observe_age;
use tally_runtime::ops::Readiness;
use tally_runtime::threads::{lock, on_threads};
use tally_runtime::throttle::LogThrottle;
use tally_runtime::Shutdown;
use tally_schemas::config::{Config, KafkaSettings, ServiceSettings, Topic};
use tally_schemas::event::{EventDecoder, EventError, Problem};
use tally_schemas::records::{
    settled_record, CLOSE_PERIOD_HEADER, FORWARDED_FROM_HEADER, FORWARDED_TIMESTAMP_HEADER,
    SETTLED_HEADER,
};
use tally_schemas::time::Period;

pub use metrics::{AggregatorMetrics, EventOutcome};

use metrics::OutcomeCounts;

use crate::aggregator::{Aggregator, Outcome, Snapshot};
use changelog::{
    delta_key, keys_key, keyset_key, snapshot_key, ChangelogRecord, KeyBacklog, Restored,
    SNAPSHOT_PART_ENTRIES,
};

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
/// A producer fenced again this soon after the last time was fenced by another live
/// process with its transactional id, not by a transaction the broker timed out.
const FENCED_AGAIN_WITHIN: Duration = Duration::from_secs(600);

/// Where the aggregator service failed.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error("cannot {what}: {source}")]
    Kafka { what: String, source: KafkaError },
    #[error("cannot restore a partition's state: {0}")]
    Restore(#[from] tally_runtime::kafka::ReadError),
    #[error("fenced twice within {} minutes: another process initialised transactions as {transactional_id}, so another aggregator runs with TALLY_INSTANCE_ID {instance_id} (a newer run of this instance, or a second one configured alike). This one stops, so the two do not abort each other's transactions in turn; if both should run, give each its own TALLY_INSTANCE_ID (the default, the host name, differs per host).", FENCED_AGAIN_WITHIN.as_secs() / 60)]
    Fenced {
        transactional_id: String,
        instance_id: String,
    },
    #[error("Kafka refused a record the aggregator must write, and would refuse it again after every recovery: {source}. Give the aggregator's principal Write on the events, windows, rejected and changelog topics (forwarding misplaced events writes to the events topic), make their max.message.bytes at least 1048576 (the windows and changelog topics {MAX_RECORD_BYTES}), and leave the rejected topic uncompacted (a compacted topic refuses its records without a key); the aggregator stops rather than retry in a loop")]
    Unwritable { source: KafkaError },
    #[error("changelog {topic}[{partition}] at offset {offset} cannot be read: {problem}. The state of that partition cannot be rebuilt; was a meter removed or its aggregation changed? Restore with the price book the state was built with, or start over with a new topic prefix and a new ClickHouse database.")]
    CorruptChangelog {
        topic: String,
        partition: i32,
        offset: i64,
        problem: String,
    },
}

/// Maps a Kafka error to the service's, saying what was being done.
fn kafka_error(what: impl Into<String>) -> impl FnOnce(KafkaError) -> AggregatorError {
    let what = what.into();
    move |source| AggregatorError::Kafka { what, source }
}

/// Why an event goes to the rejected topic.
#[derive(Debug)]
struct Rejection {
    code: &'static str,
    /// The field at fault, or `event` for the message as a whole.
    field: String,
    reason: String,
}

/// Topic names, resolved once.
#[derive(Debug, Clone)]
struct Topics {
    events: String,
    windows: String,
    rejected: String,
    changelog: String,
}

/// One owned partition of the events topic.
#[derive(Debug)]
struct PartitionState {
    aggregator: Aggregator,
    /// Next offset to read; what the open transaction will commit.
    next_offset: i64,
    /// Read something since the last commit.
    touched: bool,
    /// Changelog deltas since the last snapshot, to tombstone after the next one.
    deltas: Vec<String>,
    /// Changelog records of dedupe keys, with the newest event day of their keys: each
    /// is tombstoned once the aggregator has forgotten that day.
    key_records: Vec<(String, u16)>,
    /// The per-transaction records of keys among them, gathered into parts now and
    /// then so a partition does not collect one record per transaction for the whole
    /// dedupe horizon.
    backlog: KeyBacklog,
    /// Bytes of the deltas since the last snapshot (key records not included: a
    /// snapshot does not rewrite keys).
    delta_bytes: usize,
    /// Parts of the partition's last snapshot in the changelog, and their size.
    snapshot_parts: usize,
    snapshot_bytes: usize,
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

/// What processing one partition's share of a batch produced, for the worker to add up.
#[derive(Debug, Default)]
struct Processed<'m> {
    events: usize,
    /// Kafka timestamp (ms) of the oldest event processed.
    oldest_event_ms: Option<i64>,
    outcomes: OutcomeCounts,
    rejections: Vec<(&'m BorrowedMessage<'m>, Rejection)>,
    /// Events read on another partition than their subject's, with that partition and
    /// the "now" they were judged by here.
    forwards: Vec<(&'m BorrowedMessage<'m>, i32, i64)>,
}

impl<'m> Processed<'m> {
    /// Counts an event's outcome, and keeps its rejection, if any, for the transaction
    /// to write to the rejected topic.
    fn count(
        &mut self,
        message: &'m BorrowedMessage<'m>,
        (outcome, rejection): (EventOutcome, Option<Rejection>),
    ) {
        self.outcomes.add(outcome);
        if let Some(rejection) = rejection {
            self.rejections.push((message, rejection));
        }
    }
}

/// The most a record carrying an event (forwarded, or copied to the rejected topic)
/// may hold, headers included: librdkafka's default `message.max.bytes`, below the
/// broker's default topic limit. A larger one could be refused by the broker at
/// commit, and again after every recovery.
const MAX_EVENT_RECORD_BYTES: usize = 1_000_000;

/// Room left in a rejected record for its headers: a payload past
/// [`MAX_EVENT_RECORD_BYTES`] less this and the key is cut to fit.
const REJECTION_HEADERS_BYTES: usize = 16 * 1024;

/// The bytes of `message` forwarded: key, payload, headers and the forward's own, with
/// a few bytes of framing apiece.
fn forwarded_bytes(message: &BorrowedMessage<'_>) -> usize {
    let headers: usize = (message.headers().into_iter())
        .flat_map(|h| h.iter())
        .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + 10)
        .sum();
    let key = message.key().map_or(0, <[u8]>::len);
    let forward = FORWARDED_FROM_HEADER.len() + FORWARDED_TIMESTAMP_HEADER.len() + 2 * (20 + 10);
    message.payload().map_or(0, <[u8]>::len) + key + headers + forward
}

/// `text`'s first `bytes` bytes at most, cut at a character's boundary.
fn at_most(text: &str, bytes: usize) -> &str {
    let mut end = text.len().min(bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Whether Kafka refused a write in a way no retry mends: the principal may not write
/// the topic, or the record is larger than the topic takes. (Not a fatal producer
/// error as such: a fenced producer's is one, and a single fence is recovered from.)
fn refused_for_good(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as Code;
    matches!(
        error.rdkafka_error_code(),
        Some(
            Code::TopicAuthorizationFailed
                | Code::ClusterAuthorizationFailed
                | Code::TransactionalIdAuthorizationFailed
                | Code::MessageSizeTooLarge
                | Code::MessageBatchTooLarge
                | Code::InvalidRecord
        )
    )
}

/// An outcome that sends the message to the rejected topic, saying why.
fn rejection(
    outcome: EventOutcome,
    code: &'static str,
    field: impl Into<String>,
    reason: String,
) -> (EventOutcome, Option<Rejection>) {
    (
        outcome,
        Some(Rejection {
            code,
            field: field.into(),
            reason,
        }),
    )
}

/// How an event the core has applied is counted, and why it goes to the rejected
/// topic if it does. `time` is the event's, for the too-late reason.
fn verdict(outcome: Outcome, time: chrono::DateTime<Utc>) -> (EventOutcome, Option<Rejection>) {
    match outcome {
        Outcome::Accepted | Outcome::Late | Outcome::Adjusted => (EventOutcome::Accepted, None),
        Outcome::Unmetered => (EventOutcome::Unmetered, None),
        Outcome::Retry => (EventOutcome::Duplicate, None),
        Outcome::Conflict => rejection(
            EventOutcome::Conflict,
            Problem::Conflict.code(),
            "id",
            Problem::Conflict.to_string(),
        ),
        Outcome::TooLate => rejection(
            EventOutcome::TooLate,
            "too_late",
            "time",
            format!("the event's time {} is older than the dedupe horizon allows behind the newest event seen; it can no longer be deduplicated safely", time.to_rfc3339()),
        ),
        Outcome::Refused(e) => {
            let EventError { field, problem } = e.as_event_error();
            rejection(EventOutcome::Refused, problem.code(), field, problem.to_string())
        }
    }
}

impl PartitionState {
    /// Dedupes and aggregates one event of this partition.
    fn process<'m>(
        &mut self,
        config: &Config,
        partition_count: NonZeroUsize,
        message: &'m BorrowedMessage<'m>,
        processed: &mut Processed<'m>,
    ) {
        if message.offset() < self.next_offset {
            return; // already counted before a recovery rewound the consumer
        }
        self.next_offset = message.offset() + 1;
        self.touched = true;
        processed.events += 1;
        let timestamp = message.timestamp().to_millis();
        processed.oldest_event_ms = processed.oldest_event_ms.into_iter().chain(timestamp).min();
        // The event's "now" is when it reached Kafka, so a replay judges its time exactly
        // as the first reading did. A forwarded event's is when it first reached Kafka,
        // never later than this record's, so a forged header cannot move the clock on.
        let forwarded_ms = header_value(message, FORWARDED_TIMESTAMP_HEADER)
            .and_then(|value| std::str::from_utf8(value).ok()?.parse::<i64>().ok());
        let received_ms = match (forwarded_ms, timestamp) {
            (Some(first), Some(this)) => Some(first.min(this)),
            (first, this) => this.or(first),
        };
        let at = |ms: Option<i64>| {
            ms.and_then(chrono::DateTime::from_timestamp_millis)
                .unwrap_or_else(Utc::now)
        };
        let now = at(received_ms);
        if let Some(value) = header_value(message, CLOSE_PERIOD_HEADER) {
            // A control record is judged by its own record's time alone.
            let rejection = self.close_period(message, value, at(timestamp));
            processed.outcomes.add(match rejection {
                Some(_) => EventOutcome::Invalid,
                None => EventOutcome::Control,
            });
            processed.rejections.extend(rejection.map(|r| (message, r)));
            return;
        }
        let (outcome, rejection) = match EventDecoder::new(config, now)
            .decode(message.payload().unwrap_or_default())
        {
            Err(e) => {
                // A CloudEvents SDK's Kafka binary mode puts the attributes in headers.
                let binary = header_value(message, "ce_specversion").is_some();
                let hint = if binary {
                    "; the record has ce_ headers (CloudEvents binary mode), which Tally does not read: produce each event as structured JSON, the whole event as the record's value (the SDKs' to_structured)"
                } else {
                    ""
                };
                rejection(
                    EventOutcome::Invalid,
                    e.problem.code(),
                    e.field.clone(),
                    format!("{e}{hint}"),
                )
            }
            Ok(event) if message.key() != Some(event.subject.as_bytes()) => {
                let keyed = message.key().map_or_else(
                    || "not keyed".to_owned(),
                    |key| format!("keyed {:?}", String::from_utf8_lossy(key)),
                );
                rejection(
                    EventOutcome::Invalid,
                    "wrong_key",
                    "subject",
                    format!(
                        "the Kafka message is {keyed}, not by the event's subject {:?}: key every event by its subject so a customer's events share a partition (and its dedupe)",
                        event.subject
                    ),
                )
            }
            Ok(event) => {
                // A customer's line is its partition's total, and the rater finds its
                // zero-usage lines by the partitioner's choice: an event of another
                // partition (a producer partitioning otherwise) is counted there.
                let home = partition_for_key(event.subject.as_bytes(), partition_count);
                if home != message.partition() {
                    // A build before forwarding counted misplaced events where they were
                    // read: a retry of one is a retry here, not an event to forward.
                    if let Some(outcome) = self.aggregator.counted_before(&event) {
                        return processed.count(message, verdict(outcome, event.time));
                    }
                    let bytes = forwarded_bytes(message);
                    if bytes > MAX_EVENT_RECORD_BYTES {
                        return processed.count(message, rejection(
                            EventOutcome::Invalid,
                            "wrong_partition",
                            "subject",
                            format!("the event is on partition {} but Kafka's Java partitioner (murmur2) gives its subject partition {home}, and at {bytes} bytes it is too large to forward there: produce with partitioner=murmur2_random", message.partition()),
                        ));
                    }
                    let received_ms = received_ms.unwrap_or_else(|| now.timestamp_millis());
                    processed.forwards.push((message, home, received_ms));
                    processed.outcomes.add(EventOutcome::Forwarded);
                    return;
                }
                let outcome = self.aggregator.apply(&event);
                match outcome {
                    Outcome::Late => processed.outcomes.late_revised += 1,
                    Outcome::Adjusted => processed.outcomes.late_adjusted += 1,
                    _ => {}
                }
                verdict(outcome, event.time)
            }
        };
        processed.count(message, (outcome, rejection));
    }

    /// Closes the period a control record names, or tells why it cannot. A close cannot
    /// be undone, so one naming a period that had not ended when it was written (`now`)
    /// is refused, the same on a replay.
    fn close_period(
        &mut self,
        message: &BorrowedMessage<'_>,
        value: &[u8],
        now: chrono::DateTime<Utc>,
    ) -> Option<Rejection> {
        let refuse = |reason: String| {
            Some(Rejection {
                code: "invalid_control",
                field: format!("header {CLOSE_PERIOD_HEADER}"),
                reason,
            })
        };
        match std::str::from_utf8(value).map(str::parse::<Period>) {
            Ok(Ok(period)) if period.end() > now => refuse(format!(
                "{period} had not ended when the control record was written ({}); only a period that has ended can be closed",
                now.to_rfc3339()
            )),
            Ok(Ok(period)) => {
                self.aggregator.close_through(period);
                tracing::info!(
                    partition = message.partition(),
                    offset = message.offset(),
                    %period,
                    "period closed by a control record; its later usage becomes adjustments"
                );
                None
            }
            _ => refuse(format!(
                "{:?} is not a period like 2026-10; the control record closes nothing",
                String::from_utf8_lossy(value)
            )),
        }
    }

    /// By how many bytes the changelog deltas since the last snapshot are past the size
    /// that calls for a new one, if they are: past the setting, and past the last
    /// snapshot's own size, so a large state is not rewritten more often than its
    /// changes would fill it again, and a restore still reads at most about two
    /// snapshots' worth.
    fn snapshot_overdue(&self, snapshot_after_bytes: usize) -> Option<usize> {
        self.delta_bytes
            .checked_sub(snapshot_after_bytes.max(self.snapshot_bytes))
            .filter(|&over| over > 0)
    }

    /// Writes what changed since the last commit to the open transaction: a usage
    /// update per changed series and period, then a settled record when a month has
    /// settled (so the rater lets its lines go), the changelog delta behind them, the new
    /// dedupe keys (gathered with earlier ones once `gather_after_keys` are waiting),
    /// tombstones for expired key records and, if `with_snapshot`, a usage snapshot.
    /// Returns the number of windows the updates carry.
    fn publish(
        &mut self,
        partition: i32,
        producer: &KafkaProducer,
        topics: &Topics,
        with_snapshot: bool,
        gather_after_keys: usize,
    ) -> Result<usize, KafkaError> {
        let (updates, mut changes) = self.aggregator.drain();
        let keys = changes.split_off_dedupe();
        let mut value = Vec::with_capacity(512);
        let mut windows = 0;
        for update in &updates {
            windows += update.windows.len();
            let key = update.record_key();
            value.clear();
            // Plain data with string keys: a failure is a bug, and an empty record
            // committed in its place would leave the usage unbilled.
            serde_json::to_writer(&mut value, update).expect("a usage update serialises");
            send(
                producer,
                BaseRecord::to(&topics.windows)
                    .partition(partition)
                    .key(key.as_bytes())
                    .payload(&value),
            )?;
        }
        if let Some(period) = self.aggregator.take_settled() {
            let (key, value) = settled_record(period);
            send(
                producer,
                BaseRecord::to(&topics.windows)
                    .partition(partition)
                    .key(&key)
                    .payload(&value)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: SETTLED_HEADER,
                        value: Some(&period.to_string()),
                    })),
            )?;
        }
        if let Some(newest_day) = keys.newest_dedupe_day() {
            self.backlog.keys.push(keys);
            if self.backlog.full(gather_after_keys) {
                self.gather_keys(producer, &topics.changelog, partition)?;
            } else {
                let key = keys_key(self.next_offset, self.generation);
                if let Some(keys) = self.backlog.keys.last() {
                    self.write_changelog(producer, &topics.changelog, partition, &key, keys)?;
                }
                self.key_records.push((key.clone(), newest_day));
                self.backlog.records.push(key);
            }
        }
        let expired: Vec<String> = self
            .key_records
            .extract_if(.., |(_, day)| self.aggregator.has_forgotten_day(*day))
            .map(|(key, _)| key)
            .collect();
        for key in expired {
            tombstone(producer, &topics.changelog, partition, &key)?;
        }
        let key = delta_key(self.next_offset, self.generation);
        self.delta_bytes +=
            self.write_changelog(producer, &topics.changelog, partition, &key, &changes)?;
        self.deltas.push(key);
        if with_snapshot {
            write_snapshot(producer, &topics.changelog, partition, self)?;
        }
        Ok(windows)
    }

    /// Writes the keys of the backlog's small records as parts of up to
    /// [`SNAPSHOT_PART_ENTRIES`] keys and tombstones those records, in the open
    /// transaction. Each key is so written twice at most, not once per snapshot.
    fn gather_keys(
        &mut self,
        producer: &KafkaProducer,
        topic: &str,
        partition: i32,
    ) -> Result<(), KafkaError> {
        let backlog = std::mem::take(&mut self.backlog);
        let gathered = Snapshot::gather_dedupe(backlog.keys);
        for (i, part) in gathered
            .split(SNAPSHOT_PART_ENTRIES)
            .into_iter()
            .enumerate()
        {
            let Some(newest_day) = part.newest_dedupe_day() else {
                continue;
            };
            let key = keyset_key(self.next_offset, self.generation, i);
            self.write_changelog(producer, topic, partition, &key, &part)?;
            self.key_records.push((key, newest_day));
        }
        let small: BTreeSet<&String> = backlog.records.iter().collect();
        self.key_records.retain(|(key, _)| !small.contains(key));
        for key in &backlog.records {
            tombstone(producer, topic, partition, key)?;
        }
        Ok(())
    }

    /// Writes one changelog record for the partition's next offset; returns its size.
    fn write_changelog(
        &self,
        producer: &KafkaProducer,
        topic: &str,
        partition: i32,
        key: &str,
        changes: &Snapshot,
    ) -> Result<usize, KafkaError> {
        let record = ChangelogRecord {
            next_offset: self.next_offset,
            changes,
        }
        .encode();
        send(
            producer,
            BaseRecord::to(topic)
                .partition(partition)
                .key(key.as_bytes())
                .payload(&record),
        )?;
        Ok(record.len())
    }
}

/// Closes `period` and every earlier one in every partition of the events topic: writes
/// a control record ([`CLOSE_PERIOD_HEADER`]) to each partition and waits until Kafka
/// has them all. Each partition's aggregator closes the period where it reads the
/// record, so the close has one place in the partition's order and a replay closes it
/// at the same place. Returns how many partitions were written to.
pub fn close_period(kafka: &KafkaSettings, period: Period) -> Result<usize, AggregatorError> {
    let topic = kafka.topic(Topic::Events);
    let producer = control_producer(kafka)?;
    let partitions = partition_count(producer.client(), &topic).map_err(kafka_error(format!(
        "find topic {topic} (is the topic prefix the pipeline's?)"
    )))?;
    let all = 0..i32::try_from(partitions).unwrap_or(i32::MAX);
    write_close_records(&producer, &topic, period, all, TRANSACTION_TIMEOUT)?;
    Ok(partitions)
}

/// A producer for control records, outside any transaction: they are input, as an
/// event is.
fn control_producer(kafka: &KafkaSettings) -> Result<KafkaProducer, AggregatorError> {
    // A mistyped prefix fails rather than create a topic no aggregator reads: no
    // Tally client may create topics.
    idempotent_producer_config(kafka)
        .create_with_context(DeliveryReports::default())
        .map_err(kafka_error("create a producer for the control records"))
}

/// Writes the control record that closes `period` to each of `partitions` of the events
/// `topic`, and waits up to `wait` until Kafka has them all.
fn write_close_records(
    producer: &KafkaProducer,
    topic: &str,
    period: Period,
    partitions: impl IntoIterator<Item = i32>,
    wait: Duration,
) -> Result<(), AggregatorError> {
    let value = period.to_string();
    for partition in partitions {
        send(
            producer,
            BaseRecord::<str, [u8]>::to(topic)
                .partition(partition)
                .key("tally-control")
                .headers(OwnedHeaders::new().insert(Header {
                    key: CLOSE_PERIOD_HEADER,
                    value: Some(&value),
                })),
        )
        .map_err(kafka_error(format!("write a control record to {topic}")))?;
    }
    flush(producer, wait).map_err(kafka_error(format!(
        "deliver the control records to {topic}"
    )))?;
    match producer.context().failure() {
        Some(refused) => {
            Err(kafka_error(format!("write the control records to {topic}"))(refused.clone()))
        }
        None => Ok(()),
    }
}

/// Deletes a changelog record (compaction drops it), in the open transaction.
fn tombstone(
    producer: &KafkaProducer,
    topic: &str,
    partition: i32,
    key: &str,
) -> Result<(), KafkaError> {
    send(
        producer,
        BaseRecord::<[u8], [u8]>::to(topic)
            .partition(partition)
            .key(key.as_bytes()),
    )
}

/// Everything the consume loop and the rebalance callback share.
struct Worker {
    config: Arc<Config>,
    /// The events topic's partition count.
    partition_count: NonZeroUsize,
    period_close_grace: Duration,
    /// `[aggregator] close_idle_after`.
    close_idle_after: Option<Duration>,
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
    /// Counts recoveries: messages read before one are read again after it. Read by
    /// the consume loop without the lock, while a batch is processed.
    epoch: Arc<AtomicU64>,
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
            .map_err(kafka_error("release the revoked partitions"))
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
    let topics = Topics {
        events: kafka.topic(Topic::Events),
        windows: kafka.topic(Topic::Windows),
        rejected: kafka.topic(Topic::Rejected),
        changelog: kafka.topic(Topic::AggregatorChangelog),
    };
    let producer = new_producer(kafka)?;
    let worker = Arc::new(Mutex::new(Worker {
        config,
        partition_count,
        period_close_grace: settings.aggregator.period_close_grace,
        close_idle_after: settings.aggregator.close_idle_after,
        idle_close_not_before: None,
        snapshot_after_bytes: settings.aggregator.changelog_snapshot_bytes,
        kafka: kafka.clone(),
        topics: topics.clone(),
        producer,
        partitions: BTreeMap::new(),
        transaction_open: false,
        oldest_event_ms: None,
        transaction_events: 0,
        transaction_started: Instant::now(),
        metrics,
        readiness: readiness.clone(),
        broken: None,
        fenced_at: None,
        refusals_logged: LogThrottle::default(),
        epoch: Arc::new(AtomicU64::new(0)),
    }));
    let consumer: GroupConsumer =
        group_consumer(kafka, "aggregator", &topics.events, Arc::clone(&worker)).map_err(
            kafka_error(format!(
                "join group {} on {}",
                kafka.group("aggregator"),
                topics.events
            )),
        )?;
    readiness.ready();
    tracing::info!(topic = %topics.events, group = %kafka.group("aggregator"), transactional_id = %transactional_id(kafka), "aggregator started");
    let commit_interval = settings.aggregator.commit_interval;
    let epoch = Arc::clone(&lock(&worker).epoch);
    let mut health = ConsumerHealth::new(readiness);
    let mut last_lag = Instant::now();
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
            {
                let mut worker = lock(&worker);
                let due = worker.broken.is_some()
                    || worker.transaction_open
                        && (worker.transaction_events >= MAX_TRANSACTION_EVENTS
                            || worker.transaction_started.elapsed() >= commit_interval);
                if due {
                    worker.commit_or_recover(&consumer, &[])?;
                }
                if last_lag.elapsed() >= Duration::from_secs(5) {
                    last_lag = Instant::now();
                    tally_runtime::kafka::record_lag(&consumer, &worker.metrics.consumer_lag);
                    worker.close_idle_partitions(Utc::now());
                }
            }
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
            kafka_error("consume the events topic"),
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

fn transactional_id(kafka: &KafkaSettings) -> String {
    format!("{}-aggregator-{}", kafka.topic_prefix, kafka.instance_id)
}

fn new_producer(kafka: &KafkaSettings) -> Result<KafkaProducer, AggregatorError> {
    let transactional_id = transactional_id(kafka);
    let mut config = idempotent_producer_config(kafka);
    tunable(&mut config, "linger.ms", "5");
    tunable(&mut config, "compression.type", "lz4");
    let producer: KafkaProducer = config
        .set("transactional.id", &transactional_id)
        .set("message.max.bytes", MAX_RECORD_BYTES.to_string())
        .set("transaction.timeout.ms", "60000")
        .create_with_context(DeliveryReports::default())
        .map_err(kafka_error("create the transactional producer"))?;
    // Fences any earlier producer with this id (a previous run of this instance) and
    // aborts its open transaction.
    producer
        .init_transactions(TRANSACTION_TIMEOUT)
        .map_err(kafka_error(format!(
            "initialise transactions as {transactional_id}"
        )))?;
    Ok(producer)
}

impl Worker {
    fn assign_restored(
        &mut self,
        consumer: &GroupConsumer,
        partitions: &mut TopicPartitionList,
    ) -> Result<(), AggregatorError> {
        // Restoring can take a while: the open transaction must not time out meanwhile.
        self.commit_or_recover(consumer, &[])?;
        self.readiness.not_ready("restoring partitions");
        let committed = committed_offsets(consumer, partitions).map_err(kafka_error(
            "read the committed offsets of the assigned partitions",
        ))?;
        let wanted = partitions
            .elements()
            .iter()
            .map(|e| {
                let partition = e.partition();
                (
                    partition,
                    offset_of(&committed, &self.topics.events, partition),
                )
            })
            .collect();
        for (partition, state) in self.load_all(wanted)? {
            self.check_retention(consumer, partition, state.next_offset);
            let start = match state.next_offset {
                0 => Offset::Beginning,
                o => Offset::Offset(o),
            };
            partitions
                .set_partition_offset(&self.topics.events, partition, start)
                .map_err(kafka_error(format!(
                    "start {}[{partition}]",
                    self.topics.events
                )))?;
            self.partitions.insert(partition, state);
        }
        consumer
            .incremental_assign(partitions)
            .map_err(kafka_error("take the assigned partitions"))?;
        self.record_held_state();
        self.readiness.ready();
        Ok(())
    }

    /// Says, loudly, when the events a partition's state resumes at are gone: Kafka's
    /// retention deleted them while the aggregator was down or behind, and the consumer
    /// will start at the oldest it still holds. Nothing can bill them any more, but
    /// finance must hear of it (an error log, a counter and its alert), not find a
    /// quiet gap.
    fn check_retention(&self, consumer: &GroupConsumer, partition: i32, next_offset: i64) {
        let topic = &self.topics.events;
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok((oldest, _)) if oldest > next_offset => {
                let lost = oldest - next_offset;
                self.metrics.lost_to_retention.inc_by(lost.unsigned_abs());
                tracing::error!(
                    partition,
                    resumes_at = next_offset,
                    oldest_held = oldest,
                    lost,
                    "{lost} events of {topic}[{partition}] were deleted by the topic's retention before they were counted: they will not be billed. Raise retention.ms of {topic} above the longest outage"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                partition,
                error = %e,
                "cannot read the oldest offset {topic} holds; events deleted by retention would go unreported"
            ),
        }
    }

    /// [`Worker::load`] for several partitions at once: a restore mostly waits on the
    /// broker, and a rebalance or recovery waits for all of them.
    fn load_all(
        &self,
        wanted: Vec<(i32, Option<i64>)>,
    ) -> Result<Vec<(i32, PartitionState)>, AggregatorError> {
        on_threads(wanted, |(partition, committed)| {
            self.load(partition, committed)
                .map(|state| (partition, state))
        })
        .into_iter()
        .collect()
    }

    /// Rebuilds a partition's state from its changelog and decides where to read from.
    fn load(
        &self,
        partition: i32,
        committed: Option<i64>,
    ) -> Result<PartitionState, AggregatorError> {
        let started = Instant::now();
        // A transaction's markers reach the changelog shortly after its commit returns:
        // a restore right after a handover can end just before them. Read again until
        // the state reaches the committed offset, for a few seconds: each read is of
        // the whole changelog, and all of them happen inside the rebalance.
        let Restored {
            aggregator,
            next_offset,
            deltas,
            key_records,
            backlog,
            delta_bytes,
            snapshot_parts,
            snapshot_bytes,
            records,
        } = loop {
            let restored = changelog::restore(
                || Aggregator::streaming(&self.config).with_period_close(self.period_close_grace),
                client_config(&self.kafka),
                &self.topics.changelog,
                partition,
                RESTORE_TIMEOUT,
            )?;
            let behind = committed.is_some_and(|c| c > restored.next_offset.unwrap_or(0));
            if !behind || started.elapsed() >= RESTORE_BEHIND_PATIENCE {
                break restored;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let restored = next_offset.unwrap_or(0);
        // The changelog and the offsets commit together, so they agree. An offset
        // behind the state is an operator's reset to replay: the state's keys turn the
        // replayed events into retries. An offset ahead of the state means changelog
        // records were lost: read from where the state ends rather than skip events.
        let next_offset = match committed {
            Some(c) if c < restored => {
                tracing::info!(
                    partition,
                    committed = c,
                    state = restored,
                    "offsets reset behind the state: replaying, duplicates will be dropped"
                );
                c
            }
            Some(c) if c > restored => {
                tracing::error!(
                    partition,
                    committed = c,
                    state = restored,
                    "changelog ends before the committed offset; reading from where the state ends"
                );
                restored
            }
            _ => restored,
        };
        self.metrics
            .restore_duration
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            partition,
            records,
            next_offset,
            dedupe_keys = aggregator.dedupe_keys(),
            seconds = started.elapsed().as_secs_f64(),
            "partition state restored from the changelog"
        );
        Ok(PartitionState {
            aggregator,
            next_offset,
            touched: false,
            deltas,
            key_records,
            backlog,
            delta_bytes,
            snapshot_parts,
            snapshot_bytes,
            generation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            last_read: Instant::now(),
            close_requested: None,
        })
    }

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

    /// Writes a refused event to the rejected topic: its original bytes (their first
    /// ones, if all would not fit a record with the headers), the reason in headers.
    fn reject(
        &self,
        message: &BorrowedMessage<'_>,
        rejection: Rejection,
    ) -> Result<(), KafkaError> {
        let Rejection {
            code,
            field,
            reason,
        } = rejection;
        self.metrics.rejected.with_label_values(&[code]).inc();
        if let Some(left_out) = self.refusals_logged.due(code, Instant::now()) {
            tracing::warn!(
                code,
                field,
                reason,
                partition = message.partition(),
                offset = message.offset(),
                left_out,
                "event refused, kept in the rejected topic (each code logged at most once a minute; left_out: as many since)"
            );
        }
        // A field names what the sender wrote (a data key), so its length is theirs:
        // field and reason are cut to keep the headers within their room.
        let (field, reason) = (at_most(&field, 1024), at_most(&reason, 4096));
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "tally.error.code",
                value: Some(code),
            })
            .insert(Header {
                key: "tally.error.field",
                value: Some(field),
            })
            .insert(Header {
                key: "tally.error.reason",
                value: Some(reason),
            })
            .insert(Header {
                key: "tally.source.topic",
                value: Some(message.topic()),
            })
            .insert(Header {
                key: "tally.source.partition",
                value: Some(&message.partition().to_string()),
            })
            .insert(Header {
                key: "tally.source.offset",
                value: Some(&message.offset().to_string()),
            });
        // Cut to fit, the whole event staying at its offset in the events topic.
        let payload = message.payload().unwrap_or_default();
        let key_bytes = message.key().map_or(0, <[u8]>::len);
        let room = MAX_EVENT_RECORD_BYTES.saturating_sub(REJECTION_HEADERS_BYTES + key_bytes);
        let kept = payload.len().min(room);
        let headers = match kept < payload.len() {
            true => headers.insert(Header {
                key: "tally.source.bytes",
                value: Some(&payload.len().to_string()),
            }),
            false => headers,
        };
        let mut record = BaseRecord::<[u8], [u8]>::to(&self.topics.rejected)
            .payload(&payload[..kept])
            .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        send(&self.producer, record)
    }

    /// Writes an event read on another partition than its subject's to that one, in
    /// the open transaction, with its key, payload and headers, and where and when it
    /// was read here; it is counted there, so a customer's events share one
    /// partition's dedupe and totals.
    fn forward(
        &self,
        message: &BorrowedMessage<'_>,
        home: i32,
        received_ms: i64,
    ) -> Result<(), KafkaError> {
        let mut headers = OwnedHeaders::new();
        for header in message.headers().into_iter().flat_map(|h| h.iter()) {
            if header.key != FORWARDED_FROM_HEADER && header.key != FORWARDED_TIMESTAMP_HEADER {
                headers = headers.insert(header);
            }
        }
        let headers = headers
            .insert(Header {
                key: FORWARDED_FROM_HEADER,
                value: Some(&format!("{}@{}", message.partition(), message.offset())),
            })
            .insert(Header {
                key: FORWARDED_TIMESTAMP_HEADER,
                value: Some(&received_ms.to_string()),
            });
        let mut record = BaseRecord::<[u8], [u8]>::to(&self.topics.events)
            .partition(home)
            .payload(message.payload().unwrap_or_default())
            .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        send(&self.producer, record)
    }

    fn begin(&mut self) -> Result<(), KafkaError> {
        if !self.transaction_open {
            self.producer.begin_transaction()?;
            self.transaction_open = true;
            self.transaction_started = Instant::now();
        }
        Ok(())
    }

    /// Moves each partition's next offset up to the consumer's position where that is
    /// ahead ([`positions_ahead`]; called once every event delivered is processed), so
    /// the offsets pass the markers of events a product service wrote in transactions.
    /// The partition is committed with the next transaction, its changelog delta
    /// carrying the new offset.
    fn step_over_markers(&mut self, consumer: &GroupConsumer) {
        let next_offsets = (self.partitions.iter()).map(|(&p, state)| (p, state.next_offset));
        let ahead = positions_ahead(consumer, &self.topics.events, next_offsets);
        for (partition, position) in &ahead {
            if let Some(state) = self.partitions.get_mut(partition) {
                state.next_offset = *position;
                state.touched = true;
            }
        }
        if !ahead.is_empty() {
            if let Err(e) = self.begin() {
                self.broken = Some(e);
            }
        }
    }

    /// Commits the open transaction; if that fails, aborts it, recreates the producer
    /// and rebuilds every owned partition but those `leaving` (being revoked: their next
    /// owner restores them) from its changelog, then rewinds the consumer to match.
    /// Errors only if recovery itself fails.
    fn commit_or_recover(
        &mut self,
        consumer: &GroupConsumer,
        leaving: &[i32],
    ) -> Result<(), AggregatorError> {
        if !self.transaction_open && self.broken.is_none() {
            return Ok(());
        }
        let started = Instant::now();
        let (events, open_for) = (self.transaction_events, self.transaction_started.elapsed());
        match self.commit(consumer) {
            Ok(()) => {
                let took = started.elapsed();
                self.metrics.transactions_committed.inc();
                self.metrics
                    .transaction_duration
                    .observe(took.as_secs_f64());
                let oldest_age_ms = (self.oldest_event_ms.take())
                    .map(|ms| observe_age(&self.metrics.window_latency, ms));
                tracing::debug!(
                    events,
                    open_ms = open_for.as_millis() as u64,
                    commit_ms = took.as_millis() as u64,
                    oldest_event_age_ms = oldest_age_ms,
                    "transaction committed"
                );
                self.record_held_state();
                Ok(())
            }
            Err(e) => {
                self.metrics.transactions_aborted.inc();
                // A refusal no retry mends: the recovery would replay the same records
                // into the same refusal, for ever, every partition standing still.
                let delivery = self.producer.context().failure().cloned();
                if let Some(source) = [Some(e.clone()), delivery]
                    .into_iter()
                    .flatten()
                    .find(refused_for_good)
                {
                    self.abandon_transaction();
                    return Err(AggregatorError::Unwritable { source });
                }
                tracing::warn!(error = %e, "transaction failed; aborting and rebuilding state from the changelog");
                self.note_fencing(&e)?;
                for partition in leaving {
                    self.partitions.remove(partition);
                }
                self.recover(consumer)
            }
        }
    }

    /// After a transaction failed with `error`: if the producer was fenced, and was
    /// fenced before within [`FENCED_AGAIN_WITHIN`], another live process has this
    /// instance's transactional id. Recovering would fence that one in turn, and each
    /// would keep aborting the other's transactions: this one stops instead. A single
    /// fence (a newer run of this instance that then stopped, or a transaction the
    /// broker timed out during an outage) is recovered from.
    fn note_fencing(&mut self, error: &KafkaError) -> Result<(), AggregatorError> {
        let fenced = error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fenced)
            || (self.producer.client().fatal_error())
                .is_some_and(|(code, _)| code == RDKafkaErrorCode::Fenced);
        if !fenced {
            return Ok(());
        }
        if (self.fenced_at).is_some_and(|at| at.elapsed() < FENCED_AGAIN_WITHIN) {
            return Err(AggregatorError::Fenced {
                transactional_id: transactional_id(&self.kafka),
                instance_id: self.kafka.instance_id.clone(),
            });
        }
        self.fenced_at = Some(Instant::now());
        tracing::warn!(
            transactional_id = transactional_id(&self.kafka),
            "fenced: another producer initialised transactions with this instance's id; recovering, which fences it in turn (a second fence within {} minutes stops this process)",
            FENCED_AGAIN_WITHIN.as_secs() / 60
        );
        Ok(())
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

    fn commit(&mut self, consumer: &GroupConsumer) -> Result<(), KafkaError> {
        if let Some(e) = self.broken.take() {
            return Err(e);
        }
        let (producer, topics) = (&self.producer, &self.topics);
        let touched: Vec<_> = self
            .partitions
            .iter_mut()
            .filter(|(_, state)| state.touched)
            .collect();
        // One snapshot per transaction at most, the most overdue: partitions with
        // similar traffic come due together, and writing all their states in one
        // commit stalled it for their sum.
        let snapshot_partition = touched
            .iter()
            .filter_map(|(&p, state)| Some((state.snapshot_overdue(self.snapshot_after_bytes)?, p)))
            .max()
            .map(|(_, p)| p);
        // Keys travel as 16 bytes each: gather them once they would fill the setting.
        let gather_after_keys = (self.snapshot_after_bytes / 16).max(1);
        let published = on_threads(touched, |(&partition, state)| {
            state
                .publish(
                    partition,
                    producer,
                    topics,
                    snapshot_partition == Some(partition),
                    gather_after_keys,
                )
                .map(|updates| (partition, state.next_offset, updates))
        });
        let mut offsets = TopicPartitionList::new();
        for result in published {
            let (partition, next_offset, updates) = result?;
            self.metrics.window_updates.inc_by(updates as u64);
            offsets.add_partition_offset(
                &self.topics.events,
                partition,
                Offset::Offset(next_offset),
            )?;
        }
        let group = consumer
            .group_metadata()
            .ok_or(KafkaError::MessageProduction(RDKafkaErrorCode::State))?;
        if offsets.count() > 0 {
            self.producer
                .send_offsets_to_transaction(&offsets, &group, TRANSACTION_TIMEOUT)?;
        }
        flush(&self.producer, TRANSACTION_TIMEOUT)?;
        self.producer.commit_transaction(TRANSACTION_TIMEOUT)?;
        self.transaction_open = false;
        self.transaction_events = 0;
        for state in self.partitions.values_mut() {
            state.touched = false;
        }
        Ok(())
    }

    /// Closes, in each held partition that has read nothing for `close_idle_after`, the
    /// periods that ended at least the grace and that long before `now`, by writing
    /// `tally close-period`'s control record to it. A busy partition closes a month
    /// once its events pass the grace; a quiet one would keep it open, its late usage
    /// still changing a month finance has invoiced. The close is a record in the
    /// partition, as a busy one's is an event, so a replay closes at the same place.
    /// A failure is logged and tried again at the next call.
    fn close_idle_partitions(&mut self, now: chrono::DateTime<Utc>) {
        let Some(idle_after) = self.close_idle_after else {
            return;
        };
        if (self.idle_close_not_before).is_some_and(|at| Instant::now() < at) {
            return;
        }
        let wait = chrono::Duration::from_std(self.period_close_grace + idle_after)
            .unwrap_or(chrono::Duration::MAX);
        let Some(due) = now.checked_sub_signed(wait).map(Period::latest_ended_by) else {
            return;
        };
        let idle: Vec<i32> = (self.partitions.iter())
            .filter(|(_, state)| {
                state.last_read.elapsed() >= idle_after
                    && state
                        .close_requested
                        .is_none_or(|requested| requested < due)
                    && (state.aggregator.closed_before()).is_none_or(|closed| closed < due.end())
            })
            .map(|(&partition, _)| partition)
            .collect();
        if idle.is_empty() {
            return;
        }
        let topic = &self.topics.events;
        let written = control_producer(&self.kafka).and_then(|producer| {
            write_close_records(&producer, topic, due, idle.iter().copied(), IDLE_CLOSE_WAIT)
        });
        match written {
            Ok(()) => {
                tracing::info!(partitions = ?idle, period = %due, idle_seconds = idle_after.as_secs(), "idle partitions: closing the periods that ended by a control record");
                for partition in &idle {
                    if let Some(state) = self.partitions.get_mut(partition) {
                        state.close_requested = Some(due);
                    }
                }
            }
            Err(e) => {
                self.idle_close_not_before = Some(Instant::now() + IDLE_CLOSE_BACKOFF);
                tracing::warn!(error = %e, partitions = ?idle, period = %due, "cannot close the ended periods of idle partitions; trying again in a minute")
            }
        }
    }

    /// Aborts the open transaction and drops every partition's state, returning the
    /// partitions held. The states hold the aborted transaction's changes: none of
    /// them may be committed, even if rebuilding fails and the service stops (closing
    /// the consumer revokes, and a revocation commits what the partitions hold).
    fn abandon_transaction(&mut self) -> Vec<i32> {
        if let Err(e) = self.producer.abort_transaction(TRANSACTION_TIMEOUT) {
            tracing::warn!(error = %e, "abort failed; a new producer's fencing or the broker's timeout ends it");
        }
        self.transaction_open = false;
        self.transaction_events = 0;
        self.oldest_event_ms = None;
        self.broken = None;
        self.epoch.fetch_add(1, Ordering::SeqCst);
        std::mem::take(&mut self.partitions).into_keys().collect()
    }

    /// Back to exactly what Kafka holds: abort, new producer, states rebuilt, consumer
    /// rewound to where each state ends.
    fn recover(&mut self, consumer: &GroupConsumer) -> Result<(), AggregatorError> {
        self.readiness
            .not_ready("recovering from a failed transaction");
        let owned = self.abandon_transaction();
        let mut attempt = 0u32;
        loop {
            match new_producer(&self.kafka) {
                Ok(producer) => {
                    self.producer = producer;
                    break;
                }
                Err(e) if attempt < 30 => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "cannot recreate the producer yet; retrying");
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
        let wanted = owned.into_iter().map(|p| (p, None)).collect();
        let mut rewind = TopicPartitionList::new();
        for (partition, state) in self.load_all(wanted)? {
            self.check_retention(consumer, partition, state.next_offset);
            rewind
                .add_partition_offset(
                    &self.topics.events,
                    partition,
                    Offset::Offset(state.next_offset),
                )
                .map_err(kafka_error("rewind the consumer"))?;
            self.partitions.insert(partition, state);
        }
        if rewind.count() > 0 {
            let sought = consumer
                .seek_partitions(rewind, Duration::from_secs(10))
                .map_err(kafka_error("rewind the consumer"))?;
            // A partition left where it was would go on past the events its rebuilt
            // state has not counted, and they would never be billed: stop instead, and
            // the restarted service resumes from the committed offsets.
            for element in sought.elements() {
                element.error().map_err(kafka_error(format!(
                    "rewind {}[{}] to {:?}; the aggregator stops, and restarted it resumes from the committed offsets",
                    element.topic(),
                    element.partition(),
                    element.offset()
                )))?;
            }
        }
        self.readiness.ready();
        Ok(())
    }
}

/// Writes the partition's usage state (no dedupe keys) as the changelog's snapshot, in parts, and
/// tombstones the deltas it covers and any parts of the previous snapshot beyond this
/// one's, in the open transaction.
fn write_snapshot(
    producer: &KafkaProducer,
    topic: &str,
    partition: i32,
    state: &mut PartitionState,
) -> Result<(), KafkaError> {
    let started = Instant::now();
    let parts = state
        .aggregator
        .usage_snapshot()
        .split(SNAPSHOT_PART_ENTRIES);
    let count = parts.len();
    let mut bytes = 0;
    for (i, changes) in parts.into_iter().enumerate() {
        bytes += state.write_changelog(producer, topic, partition, &snapshot_key(i), &changes)?;
    }
    let stale = (count..state.snapshot_parts).map(snapshot_key);
    for key in state.deltas.drain(..).chain(stale) {
        tombstone(producer, topic, partition, &key)?;
    }
    tracing::info!(
        partition,
        parts = count,
        bytes,
        seconds = started.elapsed().as_secs_f64(),
        "changelog snapshot written"
    );
    state.delta_bytes = 0;
    state.snapshot_parts = count;
    state.snapshot_bytes = bytes;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_from_what_a_sender_wrote_are_cut_at_a_character() {
        assert_eq!(at_most("data.tokens", 1024), "data.tokens");
        // "é" is two bytes: a cut inside it keeps the character before.
        assert_eq!(at_most("data.é", 6), "data.");
        assert_eq!(at_most("data.é", 7), "data.é");
        assert_eq!(at_most(&"k".repeat(20_000), 1024).len(), 1024);
    }
    use crate::state::StateError;

    #[test]
    fn each_core_outcome_maps_to_one_counted_outcome_and_refusals_to_a_rejection_reason() {
        let time = chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap_or_default();
        let table = [
            (Outcome::Accepted, EventOutcome::Accepted, None),
            (Outcome::Late, EventOutcome::Accepted, None),
            (Outcome::Adjusted, EventOutcome::Accepted, None),
            (Outcome::Unmetered, EventOutcome::Unmetered, None),
            (Outcome::Retry, EventOutcome::Duplicate, None),
            (
                Outcome::Conflict,
                EventOutcome::Conflict,
                Some(("conflict", "id")),
            ),
            (
                Outcome::TooLate,
                EventOutcome::TooLate,
                Some(("too_late", "time")),
            ),
            (
                Outcome::Refused(StateError::Overflow),
                EventOutcome::Refused,
                Some(("refused", "data")),
            ),
        ];
        for (outcome, counted, rejected) in table {
            let name = format!("{outcome:?}");
            let (got, rejection) = verdict(outcome, time);
            assert_eq!(got, counted, "{name}");
            assert_eq!(
                rejection.as_ref().map(|r| (r.code, r.field.as_str())),
                rejected,
                "{name}"
            );
        }
        let (_, too_late) = verdict(Outcome::TooLate, time);
        assert!(
            too_late.is_some_and(|r| r.reason.contains(&time.to_rfc3339())),
            "the too-late reason names the event's time"
        );
    }
}
