//! The transaction each batch ends in, and recovery when one fails.
//!
//! In: what the partitions changed since the last commit. Out, in one Kafka
//! transaction: usage updates (and settled records) to `<prefix>.windows`, changelog
//! records, and the consumer offsets, so all of them commit or abort together. After a
//! failed commit the transaction is aborted, the producer recreated (fencing a zombie
//! of this instance) and every owned partition rebuilt from its changelog; a refusal no
//! retry mends stops the service, and so does a second fence within
//! [`FENCED_AGAIN_WITHIN`].

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::Offset;
use tally_runtime::kafka::{
    failed_to, flush, held_partitions, positions_ahead, send, transactional_producer_config,
    DeliveryReports, KafkaProducer,
};
use tally_runtime::metrics::observe_age;
use tally_runtime::threads::on_threads;
use tally_schemas::config::KafkaSettings;
use tally_schemas::records::{settled_record, SETTLED_HEADER};

use super::changelog::{delta_key, keys_key, tombstone, write_snapshot};
use super::{
    AggregatorError, GroupConsumer, HeldMeters, PartitionCount, PartitionState, Topics, Worker,
    FENCED_AGAIN_WITHIN, TRANSACTION_TIMEOUT,
};

/// How long a failed transaction waits for the delivery report of the record that
/// broke it: Kafka answers a refusal in milliseconds.
const REPORTS_WAIT: Duration = Duration::from_secs(5);

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

pub(super) fn transactional_id(kafka: &KafkaSettings) -> String {
    format!("{}-aggregator-{}", kafka.topic_prefix, kafka.instance_id)
}

pub(super) fn new_producer(kafka: &KafkaSettings) -> Result<KafkaProducer, AggregatorError> {
    let transactional_id = transactional_id(kafka);
    let producer: KafkaProducer = transactional_producer_config(kafka, &transactional_id)
        .create_with_context(DeliveryReports::default())
        .map_err(failed_to("create the transactional producer"))?;
    // Fences any earlier producer with this id (a previous run of this instance) and
    // aborts its open transaction.
    producer
        .init_transactions(TRANSACTION_TIMEOUT)
        .map_err(failed_to(format!(
            "initialise transactions as {transactional_id}"
        )))?;
    Ok(producer)
}

impl PartitionState {
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
            self.changelog.backlog.keys.push(keys);
            if self.changelog.backlog.full(gather_after_keys) {
                self.gather_keys(producer, &topics.changelog, partition)?;
            } else {
                let key = keys_key(self.next_offset, self.generation);
                if let Some(keys) = self.changelog.backlog.keys.last() {
                    self.write_changelog(producer, &topics.changelog, partition, &key, keys)?;
                }
                self.changelog.key_records.push((key.clone(), newest_day));
                self.changelog.backlog.records.push(key);
            }
        }
        let expired: Vec<String> = self
            .changelog
            .key_records
            .extract_if(.., |(_, day)| self.aggregator.has_forgotten_day(*day))
            .map(|(key, _)| key)
            .collect();
        for key in expired {
            tombstone(producer, &topics.changelog, partition, &key)?;
        }
        let key = delta_key(self.next_offset, self.generation);
        self.changelog.delta_bytes +=
            self.write_changelog(producer, &topics.changelog, partition, &key, &changes)?;
        self.changelog.deltas.push(key);
        if with_snapshot {
            write_snapshot(producer, &topics.changelog, partition, self)?;
        }
        Ok(windows)
    }
}

impl Worker {
    pub(super) fn begin(&mut self) -> Result<(), KafkaError> {
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
    pub(super) fn step_over_markers(&mut self, consumer: &GroupConsumer) {
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
    pub(super) fn commit_or_recover(
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
                // A send that failed on a transaction another record's refusal broke
                // (librdkafka's "erroneous state") can come before that record's
                // report: wait for the report, within a bound.
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::State) {
                    self.await_a_refusal();
                }
                let delivery = self.producer.context().refusal().cloned();
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

    /// Waits until a record's refusal has been reported, or [`REPORTS_WAIT`] has
    /// passed. Not until nothing is in flight: librdkafka counts a record out
    /// before the producer's thread has handed its report over.
    fn await_a_refusal(&self) {
        let deadline = Instant::now() + REPORTS_WAIT;
        while self.producer.context().refusal().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
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

    pub(super) fn commit(&mut self, consumer: &GroupConsumer) -> Result<(), KafkaError> {
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
            let mut committing = offsets.add_partition(&self.topics.events, partition);
            committing.set_offset(Offset::Offset(next_offset))?;
            // The partition count the state is of, and the meters it holds usage of,
            // for the group to check.
            let held = self
                .partitions
                .get(&partition)
                .map(|state| state.aggregator.held_fingerprints());
            let count = PartitionCount(self.partition_count);
            committing.set_metadata(HeldMeters::metadata(count, &held.unwrap_or_default()));
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
    pub(super) fn recover(&mut self, consumer: &GroupConsumer) -> Result<(), AggregatorError> {
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
        for (partition, state) in self.load_all(consumer, wanted)? {
            rewind
                .add_partition_offset(
                    &self.topics.events,
                    partition,
                    Offset::Offset(state.next_offset),
                )
                .map_err(failed_to("rewind the consumer"))?;
            self.partitions.insert(partition, state);
        }
        if rewind.count() > 0 {
            let sought = consumer
                .seek_partitions(rewind, Duration::from_secs(10))
                .map_err(failed_to("rewind the consumer"))?;
            // A partition left where it was would go on past the events its rebuilt
            // state has not counted, and they would never be billed: stop instead, and
            // the restarted service resumes from the committed offsets.
            for element in sought.elements() {
                element.error().map_err(failed_to(format!(
                    "rewind {}[{}] to {:?}; the aggregator stops, and restarted it resumes from the committed offsets",
                    element.topic(),
                    element.partition(),
                    element.offset()
                )))?;
            }
        }
        self.readiness.ready_holding(held_partitions(consumer));
        Ok(())
    }
}
