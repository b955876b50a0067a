//! Reading one partition to its end, outside any group, for restores and rebuilds,
//! and waiting out what makes Kafka unavailable for a while (a broker restart) while
//! returning what will not change (a refused permission) at once.

use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use super::clients::{force, log_client_error, log_librdkafka};
use super::group::offset_of;
use super::topics::MAX_RECORD_BYTES;

/// The value of a message's header `key` (empty if the header has none), if the message
/// has that header: how Tally's control records are told from data.
pub fn header_value<'m, M: Message>(message: &'m M, key: &str) -> Option<&'m [u8]> {
    let header = message.headers()?.iter().find(|h| h.key == key)?;
    Some(header.value.unwrap_or_default())
}

/// How long [`read_partition`] keeps asking for a partition's end that Kafka reports
/// before its `known_end`, and how often. A broker that has just started does so for
/// moments; one that still does after this lost the records.
const KNOWN_END_PATIENCE: Duration = Duration::from_secs(30);
const KNOWN_END_RETRY: Duration = Duration::from_millis(500);

/// Why a partition could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {topic}[{partition}] on Kafka: {source}")]
    Kafka {
        topic: String,
        partition: i32,
        source: KafkaError,
    },
    #[error("reading {topic}[{partition}] took longer than {timeout:?}; it holds more than can be read in that time (compaction not keeping up?) or the broker is overloaded")]
    Timeout {
        topic: String,
        partition: i32,
        timeout: Duration,
    },
    #[error("Kafka still says {topic}[{partition}] ends at offset {reported} after {waited:?}, yet offsets up to {known_end} were committed: the brokers lost records (an unclean leader election, a data directory lost). What was built from the lost records cannot be rebuilt from Kafka; to start the partition again from what the topic holds, reset the group's offset of this partition (kafka-consumer-groups.sh --reset-offsets)")]
    EndBehind {
        topic: String,
        partition: i32,
        reported: i64,
        known_end: i64,
        waited: Duration,
    },
}

/// Reads one partition from offset `from` (its beginning, if that is earlier) to its
/// end as it is now, committed records only, handing each record to `on_record` in
/// offset order. This is how state kept in Kafka (a changelog, a compacted topic) is
/// rebuilt. `base` carries the brokers and pass-through properties; transient broker
/// errors are retried until `timeout`.
///
/// `known_end` is an offset the caller knows the partition's committed records reach
/// (a group's committed offset; 0 when it knows none). The read does not end before
/// it: a broker that has just started can report its end too early for a moment, and a
/// state rebuilt from part of its records would look complete.
pub fn read_partition(
    mut base: ClientConfig,
    topic: &str,
    partition: i32,
    from: i64,
    known_end: i64,
    timeout: Duration,
    mut on_record: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<(), ReadError> {
    let fail = |source| ReadError::Kafka {
        topic: topic.to_owned(),
        partition,
        source,
    };
    // A record of any size the writers allow is read, whatever `[kafka] properties`
    // gives the fetch size.
    force(
        &mut base,
        "max.partition.fetch.bytes",
        &MAX_RECORD_BYTES.to_string(),
    );
    let reader: BaseConsumer<EndIsNoError> = base
        .set("group.id", "tally-state-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        // The end is known to be reached only by a fetch that comes back empty, which
        // the broker otherwise holds for 500 ms in case records arrive.
        .set("fetch.wait.max.ms", "10")
        .set("fetch.max.bytes", "104857600")
        .create_with_context(EndIsNoError)
        .map_err(fail)?;
    // One deadline for the whole read, waiting for the broker included.
    let started = std::time::Instant::now();
    let deadline = started + timeout;
    let (low, high) = loop {
        let (low, high) =
            retry_while_unavailable("read the partition's watermarks", timeout, || {
                // The topic's metadata asked for again on every try: a client whose
                // first answer lacked the partition (a broker restarting while the
                // topic was made) otherwise keeps answering "unknown partition" from
                // its cache.
                reader.fetch_metadata(Some(topic), Duration::from_secs(10))?;
                reader.fetch_watermarks(topic, partition, Duration::from_secs(10))
            })
            .map_err(fail)?;
        if high >= known_end {
            break (low, high);
        }
        let give_up = (started + KNOWN_END_PATIENCE).min(deadline);
        if std::time::Instant::now() + KNOWN_END_RETRY > give_up {
            return Err(ReadError::EndBehind {
                topic: topic.to_owned(),
                partition,
                reported: high,
                known_end,
                waited: started.elapsed(),
            });
        }
        tracing::warn!(
            topic,
            partition,
            reported = high,
            known_end,
            "Kafka reports the partition ending before offsets known to be committed (a broker just started?); asking again"
        );
        std::thread::sleep(KNOWN_END_RETRY);
    };
    // Records are read until the end-of-partition event, which comes only for a fetch
    // within the partition (librdkafka resets an offset out of range).
    let from = from.max(low);
    if from >= high {
        return Ok(());
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Offset(from))
        .map_err(fail)?;
    reader.assign(&assignment).map_err(fail)?;
    loop {
        if std::time::Instant::now() > deadline {
            return Err(ReadError::Timeout {
                topic: topic.to_owned(),
                partition,
                timeout,
            });
        }
        match reader.poll(Duration::from_millis(500)) {
            None => {}
            Some(Ok(message)) => on_record(&message),
            Some(Err(KafkaError::PartitionEOF(_))) => {
                // A fetch's end is the broker's high watermark at that moment, which a
                // just-started broker can report too early: librdkafka reports the end
                // again once it has fetched past it. Before anything was delivered
                // the position is unset: the read is still where it started.
                let position = (reader.position().ok())
                    .and_then(|positions| offset_of(&positions, topic, partition))
                    .unwrap_or(from);
                if position >= known_end {
                    return Ok(());
                }
                tracing::warn!(
                    topic,
                    partition,
                    position,
                    known_end,
                    "the partition's end reported before offsets known to be committed; reading on"
                );
            }
            Some(Err(e)) if is_permanent(&e) => return Err(fail(e)),
            Some(Err(e)) => {
                tracing::warn!(topic, partition, error = %e, "reading to the end; retrying")
            }
        }
    }
}

/// The context of [`read_partition`]'s reader. Reaching the end of the partition is
/// what the reader is for, yet librdkafka also reports it to the client's error
/// callback, whose default logs an ERROR: one for every restore, alarming operators.
#[derive(Default)]
struct EndIsNoError;

impl ClientContext for EndIsNoError {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::debug!(reason, "state reader reached the end of the partition");
        } else {
            log_client_error(&error, reason);
        }
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }
}

impl ConsumerContext for EndIsNoError {}

/// Runs a request to the brokers until it succeeds or `patience` runs out, waiting a
/// little longer after each failure. For what a restore or an assignment must read
/// before it can go on: while a broker restarts or a leader is elected these requests
/// fail for seconds (unknown partition, transport failure, timed out), and giving up
/// would stop the service over an outage it should ride out. An error no wait can
/// mend ([`is_permanent`]) is returned at once.
pub fn retry_while_unavailable<T>(
    what: &str,
    patience: Duration,
    mut request: impl FnMut() -> Result<T, KafkaError>,
) -> Result<T, KafkaError> {
    let deadline = std::time::Instant::now() + patience;
    let mut wait = Duration::from_millis(100);
    loop {
        match request() {
            Ok(value) => return Ok(value),
            Err(e) if !is_permanent(&e) && std::time::Instant::now() + wait < deadline => {
                tracing::warn!(error = %e, retry_in = ?wait, "cannot {what} yet; retrying");
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether Kafka refused a group's request (an offset commit, say) because the group is
/// rebalancing or has just done so: routine while members come and go, and the request
/// succeeds once the member has its new assignment. Not an unknown member: that one
/// was evicted (it missed its session or `max.poll.interval.ms`), which is worth a
/// warning.
pub fn is_rebalancing(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::IllegalGeneration | RDKafkaErrorCode::RebalanceInProgress)
    )
}

/// Whether `error` stays until someone changes the configuration, the credentials or
/// the cluster: retrying it would only delay the message that says so. Anything else
/// (unknown partitions and leaders during an election, lost connections, time-outs) can
/// pass by itself.
pub fn is_permanent(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as Code;
    let code = match error {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) | KafkaError::Nul(_) => {
            return true
        }
        KafkaError::AdminOp(code) => Some(*code),
        _ => error.rdkafka_error_code(),
    };
    matches!(
        code,
        Some(
            Code::Authentication
                | Code::SaslAuthenticationFailed
                | Code::TopicAuthorizationFailed
                | Code::GroupAuthorizationFailed
                | Code::ClusterAuthorizationFailed
                | Code::TransactionalIdAuthorizationFailed
                | Code::InvalidArgument
                | Code::InvalidConfig
                | Code::UnsupportedFeature
                | Code::UnsupportedVersion
                | Code::NotImplemented
                | Code::Fatal
        )
    )
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn calls_until_returned(errors: &[KafkaError]) -> (usize, Result<(), KafkaError>) {
        let calls = Cell::new(0);
        let result = retry_while_unavailable("test", Duration::from_secs(60), || {
            calls.set(calls.get() + 1);
            errors.get(calls.get() - 1).cloned().map_or(Ok(()), Err)
        });
        (calls.get(), result)
    }

    #[test]
    fn a_commit_refused_during_a_rebalance_is_told_from_a_refusal() {
        let commit = |code| KafkaError::ConsumerCommit(code);
        for routine in [
            RDKafkaErrorCode::IllegalGeneration,
            RDKafkaErrorCode::RebalanceInProgress,
        ] {
            assert!(is_rebalancing(&commit(routine)), "{routine:?}");
        }
        for refusal in [
            RDKafkaErrorCode::UnknownMemberId,
            RDKafkaErrorCode::GroupAuthorizationFailed,
            RDKafkaErrorCode::OffsetMetadataTooLarge,
        ] {
            assert!(!is_rebalancing(&commit(refusal)), "{refusal:?}");
        }
    }

    #[test]
    fn outages_are_waited_out_and_permanent_errors_returned_at_once() {
        let (calls, result) = calls_until_returned(&[
            KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownPartition),
            KafkaError::OffsetFetch(RDKafkaErrorCode::AllBrokersDown),
        ]);
        assert_eq!((calls, result), (3, Ok(())));

        let denied = KafkaError::OffsetFetch(RDKafkaErrorCode::GroupAuthorizationFailed);
        let (calls, result) = calls_until_returned(&[denied.clone(), denied.clone()]);
        assert_eq!((calls, result), (1, Err(denied)));
    }
}
