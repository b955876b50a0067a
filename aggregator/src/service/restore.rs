//! A partition's state when it is assigned (or recovered): rebuilt from its changelog
//! before any of its events is read.
//!
//! In: the changelog partition, read up to its end (at least to the committed offset
//! of the events it accounts for). Out: the partition's [`PartitionState`], and the
//! events offset to read from; events the topic deleted before they were counted are
//! reported, and a state that cannot be rebuilt (its changelog records lost, and the
//! events that would count them again deleted) is refused unless the operator accepts
//! the loss.

use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::Offset;
use tally_runtime::kafka::{
    client_config, committed_offsets, failed_to, held_partitions, offset_of,
};
use tally_runtime::threads::on_threads;

use crate::aggregator::Aggregator;

use super::changelog::Restored;
use super::{
    check_held_meters, AggregatorError, GroupConsumer, PartitionCount, PartitionState, Worker,
    RESTORE_BEHIND_PATIENCE, RESTORE_TIMEOUT,
};

impl Worker {
    pub(super) fn assign_restored(
        &mut self,
        consumer: &GroupConsumer,
        partitions: &mut TopicPartitionList,
    ) -> Result<(), AggregatorError> {
        // Restoring can take a while: the open transaction must not time out meanwhile.
        self.commit_or_recover(consumer, &[])?;
        self.readiness.not_ready("restoring partitions");
        let committed = committed_offsets(consumer, partitions).map_err(failed_to(
            "read the committed offsets of the assigned partitions",
        ))?;
        self.check_committed_partition_count(&committed)?;
        let pipeline = i32::try_from(self.partition_count.get()).unwrap_or(i32::MAX);
        let (wanted, beyond): (Vec<_>, Vec<_>) = (partitions.elements().iter())
            .map(|e| {
                let partition = e.partition();
                (
                    partition,
                    offset_of(&committed, &self.topics.events, partition),
                )
            })
            .partition(|(partition, _)| *partition < pipeline);
        let loaded = self.load_all(consumer, wanted)?;
        // After the restores, which name the setting where this member's own
        // partitions hold the meter's usage: this finds it held by any partition.
        check_held_meters(
            consumer,
            &self.topics,
            self.partition_count,
            &self.meters,
            true,
        )?;
        for (partition, state) in loaded {
            let start = match state.next_offset {
                0 => Offset::Beginning,
                o => Offset::Offset(o),
            };
            partitions
                .set_partition_offset(&self.topics.events, partition, start)
                .map_err(failed_to(format!(
                    "start {}[{partition}]",
                    self.topics.events
                )))?;
            self.partitions.insert(partition, state);
        }
        consumer
            .incremental_assign(partitions)
            .map_err(failed_to("take the assigned partitions"))?;
        if !beyond.is_empty() {
            // Partitions added to the events topic after the pipeline was made: their
            // events' customers live in other partitions, so they are held unread
            // (paused) rather than counted here.
            let mut unread = TopicPartitionList::new();
            for (partition, _) in &beyond {
                unread.add_partition(&self.topics.events, *partition);
            }
            consumer
                .pause(&unread)
                .map_err(failed_to("hold the partitions past the pipeline's"))?;
            let beyond: Vec<i32> = beyond.iter().map(|(partition, _)| *partition).collect();
            tracing::error!(partitions = ?beyond, pipeline_partitions = pipeline, "assigned partitions of the events topic past the pipeline's; they are left unread, and events written to them are not billed (README, \"Changing the partition count\")");
        }
        self.record_held_state();
        self.readiness.ready_holding(held_partitions(consumer));
        Ok(())
    }

    /// Refuses partitions whose offsets were committed with another partition count
    /// ([`PartitionCount`]): their state is of other customers than murmur2 now gives
    /// them, and resumed it would bill those customers' months in two pieces.
    fn check_committed_partition_count(
        &self,
        committed: &TopicPartitionList,
    ) -> Result<(), AggregatorError> {
        let ours = PartitionCount(self.partition_count);
        for element in committed.elements() {
            match PartitionCount::from_metadata(element.metadata()) {
                Some(theirs) if theirs != ours => {
                    return Err(AggregatorError::PartitionCountChanged {
                        partition: element.partition(),
                        committed: theirs.0.get(),
                        partitions: ours.0.get(),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Says, loudly, when the events a partition's state resumes at are gone: Kafka's
    /// retention deleted them while the aggregator was down or behind, and the consumer
    /// will start at the oldest it still holds. Nothing can bill them any more, but
    /// finance must hear of it (an error log, a counter and its alert), not find a
    /// quiet gap. Where they had been counted (`counted_to`: the committed offset,
    /// when the changelog lost the state since `next_offset`), going on would bill
    /// the open months from part of their usage: refused, unless
    /// `[aggregator] accept_lost_state` says to go on.
    fn check_retention(
        &self,
        consumer: &GroupConsumer,
        partition: i32,
        next_offset: i64,
        counted_to: Option<i64>,
    ) -> Result<(), AggregatorError> {
        let topic = &self.topics.events;
        let oldest = match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok((oldest, _)) => oldest,
            Err(e) => {
                tracing::warn!(
                    partition,
                    error = %e,
                    "cannot read the oldest offset {topic} holds; events deleted by retention would go unreported"
                );
                return Ok(());
            }
        };
        if oldest <= next_offset {
            return Ok(());
        }
        let lost = oldest - next_offset;
        if let Some(committed) = counted_to {
            if !self.accept_lost_state {
                return Err(AggregatorError::StateLost {
                    events: topic.clone(),
                    changelog: self.topics.changelog.clone(),
                    partition,
                    state_ends: next_offset,
                    committed,
                    oldest_held: oldest,
                });
            }
            self.metrics.lost_to_retention.inc_by(lost.unsigned_abs());
            tracing::error!(
                partition,
                state_ends = next_offset,
                committed,
                oldest_held = oldest,
                lost,
                "{lost} events of {topic}[{partition}], counted once, are in neither its changelog nor the topic any more: counting on from the oldest held, as [aggregator] accept_lost_state says, so the open months' lines of its customers go down by their usage. Take the setting out again"
            );
            return Ok(());
        }
        self.metrics.lost_to_retention.inc_by(lost.unsigned_abs());
        tracing::error!(
            partition,
            resumes_at = next_offset,
            oldest_held = oldest,
            lost,
            "{lost} events of {topic}[{partition}] were deleted by the topic's retention before they were counted: they will not be billed. Raise retention.ms of {topic} above the longest outage"
        );
        Ok(())
    }

    /// [`Worker::load`] for several partitions at once: a restore mostly waits on the
    /// broker, and a rebalance or recovery waits for all of them.
    pub(super) fn load_all(
        &self,
        consumer: &GroupConsumer,
        wanted: Vec<(i32, Option<i64>)>,
    ) -> Result<Vec<(i32, PartitionState)>, AggregatorError> {
        on_threads(wanted, |(partition, committed)| {
            self.load(consumer, partition, committed)
                .map(|state| (partition, state))
        })
        .into_iter()
        .collect()
    }

    /// Rebuilds a partition's state from its changelog and decides where to read from
    /// ([`Self::check_retention`] of that offset).
    fn load(
        &self,
        consumer: &GroupConsumer,
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
            changelog,
            records,
        } = loop {
            let restored = super::changelog::restore(
                || Aggregator::streaming(&self.config).with_period_close(self.period_close_grace),
                client_config(&self.kafka),
                &self.topics.changelog,
                partition,
                RESTORE_TIMEOUT,
                &self.meters.accepted,
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
        // records were lost: read from where the state ends rather than skip events,
        // if the topic still holds them.
        let mut counted_to = None;
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
                counted_to = Some(c);
                restored
            }
            _ => restored,
        };
        self.check_retention(consumer, partition, next_offset, counted_to)?;
        self.metrics
            .restore_duration
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            partition,
            records,
            next_offset,
            dedupe_keys = aggregator.dedupe_keys(),
            series = aggregator.series_count(),
            seconds = started.elapsed().as_secs_f64(),
            "partition state restored from the changelog"
        );
        Ok(PartitionState {
            aggregator,
            next_offset,
            touched: false,
            changelog,
            generation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            last_read: Instant::now(),
            close_requested: None,
        })
    }
}
