//! Kafka clients as every service configures them, and the topic layout.
//!
//! In: [`KafkaSettings`]. Out: client configurations (brokers plus the pass-through
//! librdkafka properties, so TLS and SASL work everywhere alike) and, on start, the
//! topics created if missing. `events`, `windows` and `aggregator-changelog` must have
//! the same number of partitions: the aggregator writes partition p's windows and state
//! changes to partition p, so a customer's usage stays in one partition end to end.

use std::time::Duration;

use prometheus::IntGaugeVec;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset};
use tally_schemas::config::{KafkaSettings, Topic};

/// What went wrong talking to Kafka, and where.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("cannot {what} on Kafka at {brokers}: {source}")]
    Kafka {
        what: String,
        brokers: String,
        source: KafkaError,
    },
    #[error("topic {topic} has {found} partitions but {expected} has {expected_count}: the aggregator needs them equal; add partitions to the smaller one")]
    PartitionMismatch {
        topic: String,
        found: usize,
        expected: String,
        expected_count: usize,
    },
}

/// Brokers and pass-through properties; each client adds its own settings.
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    for (name, value) in &settings.properties {
        config.set(name, value);
    }
    config
}

/// Creates Tally's topics if they do not exist, then checks that the co-partitioned
/// ones agree. Safe to run from every instance at every start.
pub async fn ensure_topics(settings: &KafkaSettings) -> Result<(), KafkaSetupError> {
    let fail = |what: &str, source| KafkaSetupError::Kafka {
        what: what.to_owned(),
        brokers: settings.brokers.clone(),
        source,
    };
    let admin: AdminClient<DefaultClientContext> = client_config(settings)
        .create()
        .map_err(|e| fail("create an admin client", e))?;
    let names: Vec<(String, Topic)> = [
        Topic::Events,
        Topic::Windows,
        Topic::Rejected,
        Topic::Rated,
        Topic::AggregatorChangelog,
    ]
    .into_iter()
    .map(|t| (settings.topic(t), t))
    .collect();
    let replicas = i32::from(settings.replication_factor);
    let partitions = i32::try_from(settings.partitions).unwrap_or(i32::MAX);
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|(name, topic)| {
            let topic_config: &[(&str, &str)] = match topic {
                // Windows and state changes are read back in full on restore: compaction
                // keeps the latest record per key. Snapshots of large partitions are big.
                Topic::Windows => &[("cleanup.policy", "compact")],
                Topic::AggregatorChangelog => &[
                    ("cleanup.policy", "compact"),
                    ("max.message.bytes", "67108864"),
                ],
                _ => &[],
            };
            topic_config.iter().fold(
                NewTopic::new(name, partitions, TopicReplication::Fixed(replicas)),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&topics, &options)
        .await
        .map_err(|e| fail("create topics", e))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(fail(
                    &format!("create topic {topic}"),
                    KafkaError::AdminOp(code),
                ))
            }
        }
    }
    let count = |topic: &str| -> Result<usize, KafkaSetupError> {
        let metadata = admin
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| fail(&format!("read the metadata of {topic}"), e))?;
        Ok(metadata.topics().first().map_or(0, |t| t.partitions().len()))
    };
    let events = settings.topic(Topic::Events);
    let expected_count = count(&events)?;
    for topic in [Topic::Windows, Topic::AggregatorChangelog] {
        let name = settings.topic(topic);
        let found = count(&name)?;
        if found != expected_count {
            return Err(KafkaSetupError::PartitionMismatch {
                topic: name,
                found,
                expected: events.clone(),
                expected_count,
            });
        }
    }
    Ok(())
}

/// Sets `lag{topic, partition}` to how far each assigned partition's position is
/// behind its high watermark. Cheap enough to call every few seconds.
pub fn record_lag<C: ConsumerContext>(consumer: &BaseConsumer<C>, lag: &IntGaugeVec) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let Ok(positions) = consumer.position() else {
        return;
    };
    lag.reset();
    for elem in assignment.elements() {
        let Ok((_, high)) =
            consumer.fetch_watermarks(elem.topic(), elem.partition(), Duration::from_secs(1))
        else {
            continue;
        };
        let position = positions
            .find_partition(elem.topic(), elem.partition())
            .and_then(|p| match p.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        if let Some(position) = position {
            lag.with_label_values(&[elem.topic(), &elem.partition().to_string()])
                .set((high - position).max(0));
        }
    }
}
