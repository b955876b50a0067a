//! Accepted events into the events topic, and whether Kafka can take them.
//!
//! Each event is produced with its sender's bytes as the value and its `subject` as
//! the key, so one customer's events stay on one partition. The producer is
//! idempotent with `acks=all`: an acknowledged event is on every in-sync replica and a
//! retry inside the client cannot write it twice. A request is answered only once
//! every one of its events is acknowledged, or failed; after a failure nothing of it is
//! promised, and resending the whole request is safe because the aggregator dedupes on
//! `(source, id)`.
//!
//! Events a request refused are kept in the rejected topic, each with why and which
//! tenant sent it, in the background and through a producer of their own with a small
//! queue: the sender has the reasons in the answer, so the answer does not wait for
//! them, and a rejected topic that does not take them cannot fill the queue accepted
//! events need (copies that do not fit are dropped, and logged).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tally_runtime::kafka::{
    client_config, configured, fitted, force, partition_count, partition_for_key, tunable,
    with_refusal, ClientErrors, LINGER, MAX_EVENT_RECORD_BYTES,
};
use tally_runtime::ops::Readiness;
use tally_runtime::threads::lock;
use tally_runtime::Shutdown;
use tally_schemas::config::{KafkaSettings, Topic};
use tally_schemas::records::REJECTED_REQUEST_INDEX_HEADER;

use super::error::IngestError;

/// librdkafka's `message.timeout.ms` unless `[kafka] properties` sets it (or its alias
/// `delivery.timeout.ms`): the longest an event may wait for its acknowledgement
/// (retries included) before the request fails with 503. Short enough that a client
/// is not left hanging when Kafka is down.
const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Extra time on top of the acknowledgement timeout before the request gives up on its
/// own, in case a delivery report never comes.
const ACK_GRACE: Duration = Duration::from_secs(2);

/// librdkafka's `message.max.bytes` unless `[kafka] properties` sets it.
const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// What librdkafka adds to a record's key and value when it checks them against
/// `message.max.bytes` (its largest v2 record framing is 36 bytes), with room to spare.
const RECORD_FRAMING_BYTES: usize = 64;

/// The most refused events' copies waiting for Kafka: past it, copies are dropped.
const COPIES_QUEUE: &str = "10000";

/// How often readiness asks Kafka for the events topic's metadata.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// How often while the last probe failed.
const PROBE_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Failed probes in a row after which requests are refused at once: one probe can time
/// out behind a busy broker's produce requests while Kafka still acknowledges them.
const PROBES_TO_FAIL_FAST: u32 = 2;

/// How long one readiness probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The producer of the events topic.
#[derive(Clone)]
pub struct EventProducer {
    producer: FutureProducer<ClientErrors>,
    topic: String,
    brokers: String,
    /// The longest a request waits for all of its acknowledgements.
    ack_timeout: Duration,
    /// The most an event's key and value may hold together: librdkafka refuses a
    /// larger record at once, on every retry.
    max_record_bytes: usize,
    /// Why the readiness probe failed, once it failed [`PROBES_TO_FAIL_FAST`] times in
    /// a row, until one succeeds: requests are then answered 503 at once rather than
    /// after the acknowledgement timeout.
    unreachable: Arc<Mutex<Option<String>>>,
    /// Where events go, once a probe learned it.
    partitioning: Arc<Partitioning>,
    /// Held by the one request that asks for the count before any probe learned it:
    /// the others wait for its answer instead of asking Kafka too.
    first_probe: Arc<tokio::sync::Mutex<()>>,
    windows_topic: String,
    /// Where refused events are kept, and the producer that keeps them.
    rejected_topic: String,
    copies: FutureProducer<ClientErrors>,
}

/// The pipeline's partition count, its windows topic's when ingest first found it
/// (`0` until then): each event goes to `murmur2(subject) % count`, also after
/// partitions were added to the events topic (which no aggregator reads) or to every
/// topic (which the aggregators refuse). The topics' counts as last seen, so a change
/// is logged once.
#[derive(Debug, Default)]
struct Partitioning {
    pipeline: AtomicUsize,
    events_seen: AtomicUsize,
    windows_seen: AtomicUsize,
}

impl std::fmt::Debug for EventProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventProducer")
            .field("topic", &self.topic)
            .field("brokers", &self.brokers)
            .field("ack_timeout", &self.ack_timeout)
            .field("max_record_bytes", &self.max_record_bytes)
            .finish_non_exhaustive()
    }
}

/// Why a request's events are not known to be stored.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("Kafka refused to queue an event: {0}")]
    Enqueue(KafkaError),
    #[error("Kafka did not store an event: {0}")]
    Delivery(KafkaError),
    #[error("the producer dropped an event without a delivery report")]
    Cancelled,
    #[error("Kafka did not acknowledge every event within {0:?}")]
    TimedOut(Duration),
    /// Not tried: the last readiness probe failed (`/readyz` says the same).
    #[error("not sent, as Kafka cannot be used: {0}")]
    Unreachable(String),
}

/// One event to produce: its key (the subject) and its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    /// The tenant of the API key that sent it, for audit: written as the record's
    /// [`TENANT_HEADER`].
    pub tenant: &'a str,
}

/// An event a request refused, to keep in the rejected topic with why.
#[derive(Debug, Clone, Copy)]
pub struct Refused<'a> {
    /// The event as its sender wrote it.
    pub value: &'a [u8],
    pub tenant: &'a str,
    /// Its index in the request.
    pub index: usize,
    pub code: &'a str,
    pub field: &'a str,
    pub reason: &'a str,
}

/// The header naming the tenant whose API key sent an event (the aggregator ignores
/// it; a billing dispute or a key's misuse can be traced by it).
pub const TENANT_HEADER: &str = "tally.tenant";

impl EventProducer {
    /// Creates the producer; it connects to the brokers in the background.
    pub fn new(settings: &KafkaSettings) -> Result<Self, IngestError> {
        let mut config = tally_runtime::kafka::idempotent_producer_config(settings, LINGER);
        // murmur2: the partitioner of Kafka's Java clients, so a customer's events land
        // on the same partition whether ingest or a Java/Go service produced them.
        config.set("partitioner", "murmur2_random");
        // How long a request waits for Kafka's acknowledgement.
        tunable(
            &mut config,
            "message.timeout.ms",
            &DEFAULT_ACK_TIMEOUT.as_millis().to_string(),
        );
        let ack_timeout = configured(settings, "message.timeout.ms")
            .and_then(|ms| ms.trim().parse::<u64>().ok())
            .map_or(DEFAULT_ACK_TIMEOUT, Duration::from_millis);
        let max_record_bytes = settings
            .properties
            .get("message.max.bytes")
            .and_then(|bytes| bytes.trim().parse::<usize>().ok())
            .unwrap_or(LIBRDKAFKA_MESSAGE_MAX_BYTES)
            .saturating_sub(RECORD_FRAMING_BYTES);
        let created = |config: &ClientConfig| {
            config
                .create_with_context(ClientErrors)
                .map_err(|source| IngestError::KafkaProducer {
                    brokers: settings.brokers.clone(),
                    source,
                })
        };
        let producer: FutureProducer<ClientErrors> = created(&config)?;
        let mut copies = client_config(settings);
        copies.set("acks", "all");
        tunable(&mut copies, "linger.ms", &LINGER.as_millis().to_string());
        tunable(&mut copies, "compression.type", "lz4");
        tunable(
            &mut copies,
            "message.timeout.ms",
            &DEFAULT_ACK_TIMEOUT.as_millis().to_string(),
        );
        force(&mut copies, "queue.buffering.max.messages", COPIES_QUEUE);
        let copies = created(&copies)?;
        Ok(EventProducer {
            producer,
            topic: settings.topic(Topic::Events),
            brokers: settings.brokers.clone(),
            ack_timeout,
            max_record_bytes,
            unreachable: Arc::new(Mutex::new(None)),
            partitioning: Arc::default(),
            first_probe: Arc::default(),
            windows_topic: settings.topic(Topic::Windows),
            rejected_topic: settings.topic(Topic::Rejected),
            copies,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The most an event and its key may hold together, sent by `tenant`: its
    /// [`TENANT_HEADER`] counts against the record's size too (a length each for its
    /// name and value, and the header count, up to 5 bytes apiece).
    pub fn max_record_bytes(&self, tenant: &str) -> usize {
        let header = TENANT_HEADER.len() + tenant.len() + 3 * 5;
        self.max_record_bytes.saturating_sub(header)
    }

    /// The longest a request waits for Kafka, the delivery report's grace included.
    pub fn request_timeout(&self) -> Duration {
        self.ack_timeout + ACK_GRACE
    }

    /// Produces every record, then waits until Kafka has acknowledged all of them.
    /// All are queued before any is awaited, so they travel together.
    pub async fn produce_all(&self, records: &[Record<'_>]) -> Result<(), ProduceError> {
        if let Some(reason) = lock(&self.unreachable).clone() {
            return Err(ProduceError::Unreachable(reason));
        }
        let pipeline = self.pipeline_partitions().await?;
        let mut deliveries = Vec::with_capacity(records.len());
        for record in records {
            let to = FutureRecord::to(&self.topic)
                .key(record.key)
                .payload(record.value)
                .headers(OwnedHeaders::new().insert(Header {
                    key: TENANT_HEADER,
                    value: Some(record.tenant),
                }))
                .partition(partition_for_key(record.key, pipeline));
            let delivery = self
                .producer
                .send_result(to)
                .map_err(|(e, _)| ProduceError::Enqueue(e))?;
            deliveries.push(delivery);
        }
        let limit = self.request_timeout();
        let all = async {
            for delivery in deliveries {
                match delivery.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => return Err(ProduceError::Delivery(e)),
                    Err(_) => return Err(ProduceError::Cancelled),
                }
            }
            Ok(())
        };
        tokio::time::timeout(limit, all)
            .await
            .map_err(|_| ProduceError::TimedOut(limit))?
    }

    /// Keeps `refused` in the rejected topic, in the background: the copies are
    /// queued now and a copy Kafka does not take is logged and counted in `lost`.
    /// Nothing is tried while the readiness probe finds Kafka unusable (counted too).
    pub fn keep_refused(&self, refused: &[Refused<'_>], lost_copies: &IntCounter) {
        if refused.is_empty() {
            return;
        }
        if lock(&self.unreachable).is_some() {
            lost_copies.inc_by(refused.len() as u64);
            return;
        }
        let mut deliveries = Vec::with_capacity(refused.len());
        let mut lost = 0;
        for copy in refused {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: TENANT_HEADER,
                    value: Some(copy.tenant),
                })
                .insert(Header {
                    key: REJECTED_REQUEST_INDEX_HEADER,
                    value: Some(&copy.index.to_string()),
                });
            let headers = with_refusal(headers, copy.code, copy.field, copy.reason);
            let (value, headers) = fitted(copy.value, headers, MAX_EVENT_RECORD_BYTES, 0);
            let record = FutureRecord::<(), [u8]>::to(&self.rejected_topic)
                .payload(value)
                .headers(headers);
            match self.copies.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err(_) => lost += 1,
            }
        }
        let topic = self.rejected_topic.clone();
        let lost_copies = lost_copies.clone();
        tokio::spawn(async move {
            for delivery in deliveries {
                if !matches!(delivery.await, Ok(Ok(_))) {
                    lost += 1;
                }
            }
            if lost > 0 {
                lost_copies.inc_by(lost);
                tracing::warn!(
                    topic,
                    lost,
                    "refused events not kept in the rejected topic: Kafka did not take their copies (their senders had the reasons in the answer)"
                );
            }
        });
    }

    /// The pipeline's partition count: known after a readiness probe, else asked for
    /// now (off the async threads), so the requests of a service that has just started
    /// do not wait for the next probe.
    async fn pipeline_partitions(&self) -> Result<NonZeroUsize, ProduceError> {
        let known = |producer: &EventProducer| {
            NonZeroUsize::new(producer.partitioning.pipeline.load(Ordering::Relaxed))
        };
        if let Some(pipeline) = known(self) {
            return Ok(pipeline);
        }
        let _asking = self.first_probe.lock().await;
        if let Some(pipeline) = known(self) {
            return Ok(pipeline);
        }
        match (self.probe_off_thread().await, known(self)) {
            (Ok(()), Some(pipeline)) => Ok(pipeline),
            (Err(reason), _) => Err(ProduceError::Unreachable(reason)),
            (Ok(()), None) => Err(ProduceError::Unreachable(format!(
                "{} shows no partitions",
                self.windows_topic
            ))),
        }
    }

    /// Waits (off the async threads) until every queued event is delivered or failed,
    /// at most [`Self::request_timeout`].
    pub async fn flush(&self) {
        let (producer, copies) = (self.producer.clone(), self.copies.clone());
        let timeout = self.request_timeout();
        let started = Instant::now();
        let flushed = tokio::task::spawn_blocking(move || {
            let events = producer.flush(timeout);
            if let Err(e) = copies.flush(timeout) {
                tracing::warn!(error = %e, "refused events' copies not all kept in the rejected topic on shutdown");
            }
            events
        })
        .await;
        match flushed {
            Ok(Ok(())) => {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "kafka producer flushed"
                )
            }
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                "kafka producer not flushed on shutdown; events of requests answered 503 may or may not be stored"
            ),
            Err(e) => tracing::warn!(error = %e, "kafka producer flush task failed"),
        }
    }

    /// Asks Kafka for the events topic (blocking): `Ok` with its partition count when
    /// it exists with partitions, else why not.
    fn probe(&self) -> Result<usize, String> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(Some(&self.topic), PROBE_TIMEOUT)
            .map_err(|e| format!("Kafka at {} does not answer: {e}", self.brokers))?;
        let topic = metadata.topics().iter().find(|t| t.name() == self.topic);
        let error = topic.and_then(|t| t.error()).map(RDKafkaErrorCode::from);
        match (topic, error) {
            (Some(t), None) if !t.partitions().is_empty() => Ok(t.partitions().len()),
            (Some(_), Some(error)) if error != RDKafkaErrorCode::UnknownTopicOrPartition => {
                Err(format!("topic {} is not usable: {error}", self.topic))
            }
            _ => Err(format!(
                "topic {} does not exist on {}: start the aggregator or the rater once (they create Tally's topics), or create them as the README says",
                self.topic, self.brokers
            )),
        }
    }

    /// Asks Kafka for the windows topic's partition count (blocking): the first one
    /// found is the pipeline's, which events are routed by from then on. Says loudly
    /// when the events topic, with `events` partitions, or the windows topic grows
    /// past it. Not ready while the windows topic cannot be described.
    fn learn_pipeline_partitions(&self, events: usize) -> Result<(), String> {
        let windows = partition_count(self.producer.client(), &self.windows_topic).map_err(|e| {
            format!(
                "topic {} cannot be described ({e}): ingest routes events by its partition count, so it needs Describe on it; start the aggregator or the rater once (they create Tally's topics)",
                self.windows_topic
            )
        })?;
        let seen = &self.partitioning;
        let pipeline =
            match seen
                .pipeline
                .compare_exchange(0, windows, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => windows,
                Err(known) => known,
            };
        let grew = |count: usize, last: &AtomicUsize| {
            let before = last.swap(count, Ordering::Relaxed);
            count > pipeline && count != before
        };
        if grew(events, &seen.events_seen) || grew(windows, &seen.windows_seen) {
            tracing::error!(
                events_partitions = events,
                windows_partitions = windows,
                pipeline_partitions = pipeline,
                "partitions were added to the pipeline's topics: ingest goes on writing each customer's events to its partition among the first {pipeline}, where the aggregators read them; events other producers write to the others are not billed (README, \"Changing the partition count\")"
            );
        }
        Ok(())
    }

    /// [`Self::probe`] and [`Self::learn_pipeline_partitions`], on a blocking thread.
    async fn probe_off_thread(&self) -> Result<(), String> {
        let probing = self.clone();
        tokio::task::spawn_blocking(move || {
            let events = probing.probe()?;
            probing.learn_pipeline_partitions(events)
        })
        .await
        .unwrap_or_else(|e| Err(format!("the Kafka probe failed: {e}")))
    }

    /// Keeps `readiness` up to date until shutdown: ready while Kafka answers, the
    /// events topic exists and the windows topic tells the pipeline's partition count.
    pub fn watch_readiness(
        &self,
        readiness: Readiness,
        shutdown: Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let producer = self.clone();
        tokio::spawn(async move {
            let mut was_ready = None;
            let mut failed_in_a_row = 0;
            loop {
                let result = producer.probe_off_thread().await;
                let ready = result.is_ok();
                failed_in_a_row = if ready { 0 } else { failed_in_a_row + 1 };
                *lock(&producer.unreachable) = match &result {
                    Err(reason) if failed_in_a_row >= PROBES_TO_FAIL_FAST => Some(reason.clone()),
                    _ => None,
                };
                match result {
                    Ok(_) => readiness.ready(),
                    Err(reason) => {
                        if was_ready != Some(false) {
                            tracing::warn!(%reason, "ingest not ready");
                        }
                        readiness.not_ready(reason);
                    }
                }
                if ready && was_ready != Some(true) {
                    tracing::info!(topic = %producer.topic, "ingest ready: kafka answers");
                }
                was_ready = Some(ready);
                let interval = if ready {
                    PROBE_INTERVAL
                } else {
                    PROBE_RETRY_INTERVAL
                };
                tokio::select! {
                    _ = shutdown.requested() => break,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(properties: &[(&str, &str)]) -> KafkaSettings {
        KafkaSettings {
            // Creating a producer connects in the background: no broker needed here.
            brokers: "127.0.0.1:1".to_owned(),
            topic_prefix: "tally".to_owned(),
            partitions: 1,
            replication_factor: std::num::NonZeroU16::MIN,
            properties: properties
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            instance_id: "0".to_owned(),
        }
    }

    #[test]
    fn the_ack_timeout_follows_either_name_of_the_setting_and_defaults_to_ten_seconds() {
        let ack_timeout = |properties: &[(&str, &str)]| {
            EventProducer::new(&settings(properties))
                .map(|p| p.ack_timeout)
                .map_err(|e| e.to_string())
        };
        assert_eq!(ack_timeout(&[]), Ok(DEFAULT_ACK_TIMEOUT));
        assert_eq!(
            ack_timeout(&[("message.timeout.ms", "2500")]),
            Ok(Duration::from_millis(2500))
        );
        assert_eq!(
            ack_timeout(&[("delivery.timeout.ms", "30000")]),
            Ok(Duration::from_secs(30))
        );
        // 0, librdkafka's "forever", is refused by validation (services.rs) first.
    }

    #[test]
    fn the_largest_record_follows_message_max_bytes_less_the_framing() {
        let largest = |properties: &[(&str, &str)]| {
            EventProducer::new(&settings(properties))
                .unwrap()
                .max_record_bytes("platform")
        };
        let tenant_header = "tally.tenant".len() + "platform".len() + 15;
        assert_eq!(
            largest(&[]),
            1_000_000 - RECORD_FRAMING_BYTES - tenant_header
        );
        assert_eq!(
            largest(&[("message.max.bytes", "2000000")]),
            2_000_000 - RECORD_FRAMING_BYTES - tenant_header
        );
    }
}
