//! Closing billing periods: `tally close-period`'s control records, and closes of
//! partitions that have been idle past a period's grace (`close_idle_after`).
//!
//! In: a period to close. Out: a control record ([`CLOSE_PERIOD_HEADER`]) in each
//! partition of `<prefix>.events`, which each partition's aggregator applies where it
//! reads it, so a replay closes the period at the same place.

use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use tally_runtime::kafka::{
    failed_to, flush, idempotent_producer_config, partition_count, send, DeliveryReports,
    KafkaProducer, LINGER,
};
use tally_schemas::config::{KafkaSettings, Topic};
use tally_schemas::records::CLOSE_PERIOD_HEADER;
use tally_schemas::time::Period;

use super::{AggregatorError, Worker, IDLE_CLOSE_BACKOFF, IDLE_CLOSE_WAIT, TRANSACTION_TIMEOUT};

/// Closes `period` and every earlier one in every partition of the pipeline: writes a
/// control record ([`CLOSE_PERIOD_HEADER`]) to each partition of the events topic the
/// aggregators read (as many as the windows topic has) and waits until Kafka has them
/// all. Each partition's aggregator closes the period where it reads the record, so
/// the close has one place in the partition's order and a replay closes it at the same
/// place. Returns how many partitions were written to.
pub fn close_period(kafka: &KafkaSettings, period: Period) -> Result<usize, AggregatorError> {
    let topic = kafka.topic(Topic::Events);
    let windows = kafka.topic(Topic::Windows);
    let producer = control_producer(kafka)?;
    let partitions = partition_count(producer.client(), &windows).map_err(failed_to(format!(
        "find topic {windows} (is the topic prefix the pipeline's?)"
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
    let producer = idempotent_producer_config(kafka, LINGER)
        .create_with_context(DeliveryReports::default())
        .map_err(failed_to("create a producer for the control records"))?;
    Ok(producer)
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
        .map_err(failed_to(format!("write a control record to {topic}")))?;
    }
    flush(producer, wait).map_err(failed_to(format!("deliver the control records to {topic}")))?;
    match producer.context().failure() {
        Some(refused) => {
            Err(failed_to(format!("write the control records to {topic}"))(refused.clone()).into())
        }
        None => Ok(()),
    }
}

impl Worker {
    /// Closes, in each held partition that has read nothing for `close_idle_after`, the
    /// periods that ended at least the grace and that long before `now`, by writing
    /// `tally close-period`'s control record to it. A busy partition closes a month
    /// once its events pass the grace; a quiet one would keep it open, its late usage
    /// still changing a month finance has invoiced. The close is a record in the
    /// partition, as a busy one's is an event, so a replay closes at the same place.
    /// A failure is logged and tried again at the next call.
    pub(super) fn close_idle_partitions(&mut self, now: chrono::DateTime<Utc>) {
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
}
