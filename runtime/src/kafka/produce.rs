//! Producing. In: records; out: sends that wait out a full queue, flushes, and the
//! delivery failures kept for the caller (a [`DeliveryReports`] context).

use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use super::clients::{log_client_error, log_librdkafka};

/// The services' producer: its own thread serves delivery reports as they arrive.
/// Create it with `create_with_context(DeliveryReports::default())`.
pub type KafkaProducer = ThreadedProducer<DeliveryReports>;

/// A producer context that keeps the first record Kafka refused for good, so that a
/// caller who waited for the queue to empty can tell delivered from given up on, and
/// the first refused by Kafka itself, so that a failed transaction can tell why.
#[derive(Debug, Default)]
pub struct DeliveryReports {
    failure: std::sync::OnceLock<KafkaError>,
    refusal: std::sync::OnceLock<KafkaError>,
}

impl DeliveryReports {
    /// The first delivery failure, if a record was ever refused.
    pub fn failure(&self) -> Option<&KafkaError> {
        self.failure.get()
    }

    /// The first delivery failure that was Kafka's refusal of the record itself, not
    /// a consequence of a transaction another record broke or that was aborted: what
    /// tells why a transaction failed.
    pub fn refusal(&self) -> Option<&KafkaError> {
        self.refusal.get()
    }
}

impl ClientContext for DeliveryReports {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(&error, reason);
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }
}

impl ProducerContext for DeliveryReports {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        use RDKafkaErrorCode as Code;
        let Err((error, _)) = result else {
            return;
        };
        let _ = self.failure.set(error.clone());
        // Not refusals but their consequences: records failed because a transaction
        // was already broken (by a refusal, whose report may come after theirs) or
        // aborted.
        let consequence = matches!(
            error.rdkafka_error_code(),
            Some(Code::State | Code::PurgeQueue | Code::PurgeInflight)
        );
        if !consequence {
            let _ = self.refusal.set(error.clone());
        }
    }
}

/// Waits until every queued record is delivered or failed. Not rust-rdkafka's `flush`:
/// that polls in 100 ms steps that each run to their end while the producer's own
/// thread takes the reports, so every flush (and every transaction commit, which
/// flushes first) took at least 100 ms, half of the aggregator's commit interval.
pub fn flush(producer: &KafkaProducer, timeout: Duration) -> Result<(), KafkaError> {
    let deadline = std::time::Instant::now() + timeout;
    while producer.in_flight_count() > 0 {
        if std::time::Instant::now() >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Queues a record, waiting while the producer's queue is full.
pub fn send<K, P>(producer: &KafkaProducer, record: BaseRecord<'_, K, P>) -> Result<(), KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    send_until(producer, record, None)
}

/// Queues a record, waiting while the producer's queue is full, until `deadline` if
/// there is one: then it fails with `QueueFull` (Kafka has taken nothing for a while,
/// and waiting on would stop the caller from polling). Callers queueing many records
/// move the deadline on after each one queued, so it bounds a stall, not the batch.
pub fn send_until<K, P>(
    producer: &KafkaProducer,
    mut record: BaseRecord<'_, K, P>,
    deadline: Option<std::time::Instant>,
) -> Result<(), KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((e @ KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                if deadline.is_some_and(|deadline| std::time::Instant::now() >= deadline) {
                    return Err(e);
                }
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::ClientConfig;

    use super::*;

    #[test]
    fn a_full_queue_is_waited_on_until_the_deadline() {
        // No broker listens on port 1: nothing leaves the one-record queue.
        let producer: KafkaProducer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("queue.buffering.max.messages", "1")
            .create_with_context(DeliveryReports::default())
            .unwrap();
        let record = || BaseRecord::<str, str>::to("t").key("k").payload("v");
        send(&producer, record()).unwrap();
        let started = std::time::Instant::now();
        let deadline = started + Duration::from_millis(200);
        let full = send_until(&producer, record(), Some(deadline));
        assert_eq!(
            full,
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
