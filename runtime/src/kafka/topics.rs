//! Tally's topics. In: [`KafkaSettings`]; out: the topics created if missing and checked
//! (co-partitioned, state topics compacted and kept), a probe that tells whether the
//! brokers answer, and the partition a key goes to (murmur2, as Kafka's Java clients).

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::Client;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tally_schemas::config::{likely_meant, KafkaSettings, Topic};

use super::clients::{client_config, ClientErrors};
use super::read::is_permanent;

/// What went wrong talking to Kafka, and where.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("cannot {what} on Kafka at {brokers}: {source}")]
    Kafka {
        what: String,
        brokers: String,
        source: KafkaError,
    },
    #[error("topic {topic} has {found} partitions but {expected} has {expected_count}: a pipeline's windows and changelog topics have its partition count, and its events topic at least as many. Partitions are never added to a running pipeline's topics (a customer's usage lives in the partition murmur2 gives its subject over that count): to have more, start a new pipeline (README, \"Changing the partition count\")")]
    PartitionMismatch {
        topic: String,
        found: usize,
        expected: String,
        expected_count: usize,
    },
    #[error("topic {topic} has {setting}={found}, but Tally needs {needed}: {why}. Change it with kafka-configs.sh --bootstrap-server {brokers} --alter --entity-type topics --entity-name {topic} --add-config {setting}={needed}")]
    TopicSetting {
        topic: String,
        setting: &'static str,
        found: String,
        needed: String,
        why: &'static str,
        brokers: String,
    },
}

impl KafkaSetupError {
    /// Whether waiting could mend it (Kafka still starting), rather than an operator.
    pub fn is_unavailable(&self) -> bool {
        match self {
            KafkaSetupError::Kafka { source, .. } => !is_permanent(source),
            _ => false,
        }
    }
}

/// The largest record Tally's producers write (a changelog snapshot part, a delta of a
/// large transaction); the topics they write to must accept it.
pub const MAX_RECORD_BYTES: u64 = 64 * 1024 * 1024;

/// How long Tally creates the rejected topic to keep its records: 90 days.
pub const REJECTED_RETENTION_MS: &str = "7776000000";

/// A topic setting the pipeline's correctness rests on: set when Tally creates the
/// topic, checked at every start (an operator may have created it beforehand).
struct NeededSetting {
    setting: &'static str,
    needed: String,
    why: &'static str,
    met_by: fn(&str) -> bool,
}

/// What the topics read back in full on restore need: the aggregator's state and the
/// rater's ledger are rebuilt from them.
fn state_topic_settings() -> [NeededSetting; 2] {
    [
        NeededSetting {
            setting: "cleanup.policy",
            needed: "compact".to_owned(),
            why: "partitions' state is rebuilt from this topic, and deleting old records by age would lose state still in use (dedupe keys, open periods), so events would be billed twice or not at all",
            met_by: |found| found == "compact",
        },
        NeededSetting {
            setting: "max.message.bytes",
            needed: MAX_RECORD_BYTES.to_string(),
            why: "the aggregator writes records up to this size, and a transaction with a larger one than the topic accepts fails again on every retry",
            met_by: |found| found.parse::<u64>().is_ok_and(|bytes| bytes >= MAX_RECORD_BYTES),
        },
    ]
}

/// What the events topic needs: an event's "now" is its record's timestamp (the same
/// on a replay), which the broker's clock must set, not the sender's.
fn events_topic_settings() -> [NeededSetting; 1] {
    [NeededSetting {
        setting: "message.timestamp.type",
        needed: "LogAppendTime".to_owned(),
        why: "the aggregator's clock is its events' record timestamps, and with CreateTime a sender whose clock runs ahead sets them: its partition's months would close early and on-time events be refused as too late",
        met_by: |found| found == "LogAppendTime",
    }]
}

type Admin = AdminClient<ClientErrors>;

/// Creates Tally's topics if they do not exist, then checks that the co-partitioned
/// ones agree and that the state topics keep what a restore needs. Returns the
/// pipeline's partition count: its windows topic's. Safe to run from every instance at
/// every start.
///
/// An events topic with more partitions than that (someone added some) is accepted and
/// said loudly: ingest writes to the pipeline's partitions only and the aggregators
/// leave the others unread ([`partitions_beyond`]), so a grown topic bills what it
/// billed before instead of splitting customers' usage.
pub async fn ensure_topics(settings: &KafkaSettings) -> Result<NonZeroUsize, Box<KafkaSetupError>> {
    let admin: Admin = client_config(settings)
        .create_with_context(ClientErrors)
        .map_err(setup_error(settings, "create an admin client"))?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let made = create_topics(&admin, settings, &options).await?;
    let windows = settings.topic(Topic::Windows);
    let pipeline_count = partitions_once_known(&admin, settings, &windows).await?;
    if made {
        // A new pipeline beside running ones is as likely a mistyped prefix of theirs,
        // which would bill nothing of what they hold with every probe healthy.
        let others = other_pipelines(&admin, settings);
        match likely_meant(&settings.topic_prefix, others.iter().map(String::as_str)) {
            Some(likely_meant) => tracing::warn!(
                topic_prefix = %settings.topic_prefix,
                partitions = pipeline_count.get(),
                likely_meant,
                "made a new pipeline's topics beside other pipelines on these brokers, one of which has a topic prefix this one's is likely a slip of: if this service was meant to join that one, its [kafka] topic_prefix is wrong; stop it, and delete the new topics"
            ),
            None => tracing::info!(
                topic_prefix = %settings.topic_prefix,
                partitions = pipeline_count.get(),
                other_pipelines = others.len(),
                "made the pipeline's topics"
            ),
        }
    } else if usize::try_from(settings.partitions).is_ok_and(|n| n > pipeline_count.get()) {
        tracing::warn!(
            configured = settings.partitions,
            partitions = pipeline_count.get(),
            "[kafka] partitions applies when a pipeline is made: this one has {pipeline_count} for good, and instances beyond that many hold none (README, \"Changing the partition count\")"
        );
    }
    let mismatch = |topic: String, found: NonZeroUsize| {
        Box::new(KafkaSetupError::PartitionMismatch {
            topic,
            found: found.get(),
            expected: windows.clone(),
            expected_count: pipeline_count.get(),
        })
    };
    let changelog = settings.topic(Topic::AggregatorChangelog);
    let found = partitions_once_known(&admin, settings, &changelog).await?;
    if found != pipeline_count {
        return Err(mismatch(changelog, found));
    }
    let events = settings.topic(Topic::Events);
    let found = partitions_once_known(&admin, settings, &events).await?;
    if found < pipeline_count {
        return Err(mismatch(events, found));
    }
    if found > pipeline_count {
        tracing::error!(
            topic = %events,
            partitions = found.get(),
            pipeline_partitions = pipeline_count.get(),
            "the events topic has more partitions than the pipeline: ingest writes to the first {pipeline_count} only and the aggregators leave the others unread, so events another producer writes there are not billed (README, \"Changing the partition count\")"
        );
    }
    check_topic(
        &admin,
        settings,
        &options,
        &events,
        &events_topic_settings(),
    )
    .await?;
    for name in [windows, changelog] {
        check_topic(&admin, settings, &options, &name, &state_topic_settings()).await?;
    }
    Ok(pipeline_count)
}

/// The partitions of the events topic at and past `pipeline_count` (added to it after
/// the pipeline was made): no aggregator reads them. Kafka's error when it does not
/// answer, so a caller keeps what it knew rather than report none.
pub fn partitions_beyond<C: ClientContext>(
    client: &Client<C>,
    events_topic: &str,
    pipeline_count: NonZeroUsize,
) -> Result<std::ops::Range<i32>, KafkaError> {
    let pipeline = i32::try_from(pipeline_count.get()).unwrap_or(i32::MAX);
    let found = partition_count(client, events_topic)?;
    Ok(pipeline..i32::try_from(found).unwrap_or(i32::MAX).max(pipeline))
}

/// Asks the brokers whether they answer, before the topic requests, which wait out
/// their own timeouts (30 s and more) before failing, and then say "timed out" where
/// the brokers refused the connection. One client for every attempt, so that a slow
/// first connection (TLS, a SASL token to fetch) goes on between them.
pub struct BrokerProbe {
    /// A producer, which is never given a record: unlike an admin client's, its
    /// librdkafka log lines and errors are served when it is polled, and they say why
    /// a connection failed (a TLS or SASL setting, say) where the answer says only
    /// that the brokers were not reached.
    client: BaseProducer<ClientErrors>,
    settings: KafkaSettings,
}

impl std::fmt::Debug for BrokerProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerProbe")
            .field("brokers", &self.settings.brokers)
            .finish_non_exhaustive()
    }
}

impl BrokerProbe {
    pub fn new(settings: &KafkaSettings) -> Result<Self, Box<KafkaSetupError>> {
        let client = client_config(settings)
            .create_with_context(ClientErrors)
            .map_err(setup_error(settings, "create a client"))?;
        Ok(BrokerProbe {
            client,
            settings: settings.clone(),
        })
    }

    /// Whether the brokers answer a metadata request (of the events topic) within
    /// `timeout`. Blocking.
    pub fn answers(&self, timeout: Duration) -> Result<(), Box<KafkaSetupError>> {
        let events = self.settings.topic(Topic::Events);
        let answer = self.client.client().fetch_metadata(Some(&events), timeout);
        // Logs librdkafka's reasons for what failed meanwhile.
        self.client.poll(Duration::ZERO);
        answer
            .map(drop)
            .map_err(setup_error(&self.settings, "reach the brokers"))
    }
}

/// Maps a Kafka error to a setup error, saying what was being done.
fn setup_error<'s>(
    settings: &'s KafkaSettings,
    what: &str,
) -> impl FnOnce(KafkaError) -> Box<KafkaSetupError> + 's {
    let what = what.to_owned();
    move |source| {
        Box::new(KafkaSetupError::Kafka {
            what,
            brokers: settings.brokers.clone(),
            source,
        })
    }
}

/// `topic`'s partition count, `None` when it does not exist; other errors are Kafka's.
fn existing_partitions(
    admin: &Admin,
    settings: &KafkaSettings,
    topic: &str,
) -> Result<Option<i32>, Box<KafkaSetupError>> {
    match partition_count(admin.inner(), topic) {
        Ok(count) => Ok(i32::try_from(count).ok().filter(|n| *n > 0)),
        Err(KafkaError::MetadataFetch(
            RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition,
        )) => Ok(None),
        Err(e) => Err(setup_error(settings, &format!("describe topic {topic}"))(e)),
    }
}

/// Creates every topic of the pipeline that does not exist yet, the state topics with
/// the settings they need. They get `[kafka] partitions` partitions, or as many as an
/// events topic an operator made beforehand has, so the pipeline reads all of it.
/// Whether this call made the pipeline: its windows topic.
async fn create_topics(
    admin: &Admin,
    settings: &KafkaSettings,
    options: &AdminOptions,
) -> Result<bool, Box<KafkaSetupError>> {
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
    let (events_needs, state_needs) = (events_topic_settings(), state_topic_settings());
    let replicas = i32::from(settings.replication_factor.get());
    // With three or more replicas a write (acks=all, a transaction's commit) needs two
    // of them, so losing the leader cannot lose what it acknowledged; with fewer, one
    // (Kafka's default), or every write would stop while one replica is down.
    let min_insync = if replicas >= 3 { "2" } else { "1" };
    let configured = i32::try_from(settings.partitions).unwrap_or(i32::MAX);
    // A pipeline not made yet (no windows topic) whose events topic an operator made
    // beforehand takes that topic's count, so it reads all of it.
    let (events, windows) = (
        settings.topic(Topic::Events),
        settings.topic(Topic::Windows),
    );
    let existing = match existing_partitions(admin, settings, &windows)? {
        Some(_) => None,
        None => existing_partitions(admin, settings, &events)?,
    };
    if let Some(count) = existing.filter(|n| *n != configured) {
        let why = "the events topic exists and the windows topic does not: Tally's other topics are made with the events topic's partition count, not [kafka] partitions, which is the pipeline's for good";
        match count < configured {
            true => tracing::warn!(topic = %events, partitions = count, configured, "{why}"),
            false => tracing::info!(topic = %events, partitions = count, configured, "{why}"),
        }
    }
    let partitions = existing.unwrap_or(configured);
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|(name, topic)| {
            // Segments roll hourly so compaction (which never touches the active
            // segment) keeps up; the changelog is compacted eagerly, as it is rewritten
            // most. A windows record stays at least an hour, so a rater up to an hour
            // behind stores every record's windows (a later record of the series
            // carries only the windows its transaction changed).
            let tuning: &[(&str, &str)] = match topic {
                Topic::Windows => &[
                    ("segment.ms", "3600000"),
                    ("min.compaction.lag.ms", "3600000"),
                ],
                Topic::AggregatorChangelog => &[
                    ("segment.ms", "3600000"),
                    ("min.cleanable.dirty.ratio", "0.1"),
                ],
                // Refused events are the evidence for a sender's "I sent it", and
                // too-late usage waits there to be billed by hand: kept a quarter, not
                // the broker's default week.
                Topic::Rejected => &[("retention.ms", REJECTED_RETENTION_MS)],
                _ => &[],
            };
            let new = tuning.iter().fold(
                NewTopic::new(name, partitions, TopicReplication::Fixed(replicas))
                    .set("min.insync.replicas", min_insync),
                |t, (k, v)| t.set(k, v),
            );
            let needed: &[NeededSetting] = match topic {
                Topic::Events => &events_needs,
                Topic::Windows | Topic::AggregatorChangelog => &state_needs,
                _ => &[],
            };
            needed.iter().fold(new, |t, n| t.set(n.setting, &n.needed))
        })
        .collect();
    let results = admin
        .create_topics(&topics, options)
        .await
        .map_err(setup_error(settings, "create topics"))?;
    let mut made = false;
    for result in results {
        match result {
            Ok(topic) => made |= topic == windows,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(setup_error(settings, &format!("create topic {topic}"))(
                    KafkaError::AdminOp(code),
                ))
            }
        }
    }
    Ok(made)
}

/// The topic prefixes of the other Tally pipelines the brokers hold (those with a
/// windows and a changelog topic), as far as their metadata tells.
fn other_pipelines(admin: &Admin, settings: &KafkaSettings) -> Vec<String> {
    let Ok(metadata) = admin.inner().fetch_metadata(None, Duration::from_secs(10)) else {
        return Vec::new();
    };
    let names: HashSet<&str> = metadata.topics().iter().map(|t| t.name()).collect();
    let (windows, changelog) = (Topic::Windows.suffix(), Topic::AggregatorChangelog.suffix());
    (names.iter())
        .filter_map(|name| name.strip_suffix(windows)?.strip_suffix('.'))
        .filter(|prefix| *prefix != settings.topic_prefix)
        .filter(|prefix| names.contains(format!("{prefix}.{changelog}").as_str()))
        .map(str::to_owned)
        .collect()
}

/// The partitions of `topic`, asking again for up to 30 s while there are none: a topic
/// just created can be unknown or show no partitions for a moment.
async fn partitions_once_known(
    admin: &Admin,
    settings: &KafkaSettings,
    topic: &str,
) -> Result<NonZeroUsize, Box<KafkaSetupError>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let counted = partition_count(admin.inner(), topic).map(NonZeroUsize::new);
        if let Ok(Some(partitions)) = counted {
            return Ok(partitions);
        }
        if tokio::time::Instant::now() > deadline {
            // Still no partitions: as good as unknown.
            let error = counted.err().unwrap_or(KafkaError::MetadataFetch(
                RDKafkaErrorCode::UnknownTopicOrPartition,
            ));
            return Err(setup_error(
                settings,
                &format!("read the metadata of {topic}"),
            )(error));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Refuses a topic without the settings it `needs`, as an operator may have created it
/// beforehand with the broker's defaults.
async fn check_topic(
    admin: &Admin,
    settings: &KafkaSettings,
    options: &AdminOptions,
    name: &str,
    needs: &[NeededSetting],
) -> Result<(), Box<KafkaSetupError>> {
    let reading = format!("read the settings of {name}");
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(name)], options)
        .await
        .map_err(setup_error(settings, &reading))?;
    let resource = match described.into_iter().next() {
        Some(Ok(resource)) => resource,
        Some(Err(code)) => return Err(setup_error(settings, &reading)(KafkaError::AdminOp(code))),
        None => return Ok(()),
    };
    for n in needs {
        let found = resource
            .get(n.setting)
            .and_then(|entry| entry.value.clone())
            .unwrap_or_default();
        if !(n.met_by)(&found) {
            return Err(Box::new(KafkaSetupError::TopicSetting {
                topic: name.to_owned(),
                setting: n.setting,
                found,
                needed: n.needed.clone(),
                why: n.why,
                brokers: settings.brokers.clone(),
            }));
        }
    }
    Ok(())
}

/// The partition a key goes to under the partitioner of Kafka's Java clients (and
/// librdkafka's `murmur2_random`, which ingest uses): murmur2 of the key's bytes, made
/// positive, modulo the partition count. A customer's events are keyed by its id, so
/// this names the partition that holds them.
pub fn partition_for_key(key: &[u8], partitions: NonZeroUsize) -> i32 {
    let positive = usize::try_from(murmur2(key) & 0x7fff_ffff).expect("31 bits fit a usize");
    i32::try_from(positive % partitions).expect("below a partition count, an i32")
}

/// Kafka's variant of MurmurHash2 (32 bits, its own seed), as
/// `org.apache.kafka.common.utils.Utils.murmur2` computes it.
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Java hashes the length as an int; a key longer than that cannot be sent anyway.
    let mut h = SEED ^ u32::try_from(data.len()).unwrap_or(u32::MAX);
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        for (i, &byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// How many partitions `topic` has, by the brokers' metadata; an error if the topic
/// does not exist (a producer or admin client asking for it must not create it:
/// `allow.auto.create.topics` is false for those).
pub fn partition_count<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
) -> Result<usize, KafkaError> {
    let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let found = metadata
        .topics()
        .first()
        .ok_or(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopic))?;
    match found.error() {
        Some(error) => Err(KafkaError::MetadataFetch(error.into())),
        None => Ok(found.partitions().len()),
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;

    #[test]
    fn murmur2_agrees_with_kafkas_java_clients() {
        // Utils.murmur2 and Utils.toPositive(..) % n of kafka-clients 4.4.0, for keys of
        // every tail length, a non-ASCII one among them.
        let cases: [(&str, i32, i32, i32); 8] = [
            ("21", -973_932_308, 0, 3),
            ("foobar", -790_332_482, 2, 0),
            ("a-little-bit-long-string", -985_981_536, 0, 1),
            ("a-little-bit-longer-string", -1_486_304_829, 3, 0),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
                1,
                3,
            ),
            ("abc", 479_470_107, 3, 4),
            ("cust_new", -1_454_799_670, 2, 0),
            ("\u{e9}", 186_971_271, 3, 4),
        ];
        for (key, hash, of_four, of_seven) in cases {
            assert_eq!(murmur2(key.as_bytes()).cast_signed(), hash, "{key}");
            let partitions = |n| NonZeroUsize::new(n).unwrap();
            assert_eq!(
                partition_for_key(key.as_bytes(), partitions(4)),
                of_four,
                "{key}"
            );
            assert_eq!(
                partition_for_key(key.as_bytes(), partitions(7)),
                of_seven,
                "{key}"
            );
        }
    }
}
