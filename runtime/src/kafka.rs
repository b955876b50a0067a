//! Kafka clients as every service configures them, and the topic layout.
//!
//! In: [`KafkaSettings`]. Out: client configurations (brokers plus the pass-through
//! librdkafka properties, so TLS and SASL work everywhere alike); on start, the topics
//! created if missing; group membership for a service that owns partitions
//! ([`PartitionOwner`], [`group_consumer`]); producing that waits out a full queue and
//! keeps delivery failures ([`send`], [`flush`], [`DeliveryReports`]); and reading a
//! partition to its end ([`read_partition`]), for restores and rebuilds.
//!
//! `events`, `windows` and `aggregator-changelog` must have the same number of
//! partitions: the aggregator writes partition p's windows and state changes to
//! partition p, so a customer's usage stays in one partition end to end.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::IntGaugeVec;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::Client;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tally_schemas::config::{KafkaSettings, Topic};

use crate::threads::lock;
use crate::throttle::LogThrottle;

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

/// Brokers and pass-through properties; each client adds its own settings: those Tally
/// needs for correctness with `set` (validation refuses them in `[kafka] properties`),
/// tunables with [`tunable`], which leaves an operator's value in place.
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (name, value) in &settings.properties {
        config.set(name, value);
    }
    config.set("bootstrap.servers", &settings.brokers);
    // Tally creates its topics with the partitions and retention they need
    // (`ensure_topics`); a producer must not have the broker make one with its defaults
    // (librdkafka lets producers do so unless told otherwise).
    config.set("allow.auto.create.topics", "false");
    config
}

/// librdkafka's other names for the tunables: set under either, a value is the
/// operator's.
const TUNABLE_ALIASES: &[(&str, &str)] = &[
    ("linger.ms", "queue.buffering.max.ms"),
    ("compression.type", "compression.codec"),
    ("max.partition.fetch.bytes", "fetch.message.max.bytes"),
];

/// Sets Tally's default for a tunable, unless `[kafka] properties` set it (under
/// either of its names).
pub fn tunable<'c>(
    config: &'c mut ClientConfig,
    name: &str,
    default: &str,
) -> &'c mut ClientConfig {
    let alias = (TUNABLE_ALIASES.iter()).find_map(|&(n, alias)| (n == name).then_some(alias));
    if config.get(name).is_none() && alias.and_then(|a| config.get(a)).is_none() {
        config.set(name, default);
    }
    config
}

/// librdkafka's error callback, logged without flooding: while the brokers are out of
/// reach it reports "all brokers down" many times a second, for every client, and the
/// services' readiness already says so (after 30 s). Each kind of error (its code) is
/// logged at most once a minute in the whole process ([`LogThrottle`]), with how many
/// like it were left out since; a lost connection as a warning, as librdkafka retries
/// it and a broker restart is ridden out.
fn log_client_error(error: &KafkaError, reason: &str) {
    static LOGGED: LazyLock<LogThrottle<Option<RDKafkaErrorCode>>> =
        LazyLock::new(LogThrottle::default);
    let code = error.rdkafka_error_code();
    let Some(left_out) = LOGGED.due(code, Instant::now()) else {
        return;
    };
    let message = "librdkafka error (each kind at most once a minute; left_out: as many since)";
    match code {
        Some(
            RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::Resolve,
        ) => tracing::warn!(%error, reason, left_out, "{message}"),
        _ => tracing::error!(%error, reason, left_out, "{message}"),
    }
}

/// The context of clients with nothing else to handle (an admin client, ingest's
/// producer): their errors, logged as above.
#[derive(Debug, Default)]
pub struct ClientErrors;

impl ClientContext for ClientErrors {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(&error, reason);
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }
}

/// librdkafka's own log lines, for every client's context. librdkafka logs each
/// failed connection (`FAIL`: refused, reset, timed out) as an error, for every client
/// and every reconnect attempt: a broker restart the services ride out made hundreds
/// of ERROR lines, paging whoever alerts on them. Here they are warnings, at most one
/// a minute in the whole process, with how many were left out since.
fn log_librdkafka(level: RDKafkaLogLevel, facility: &str, message: &str) {
    static CONNECTION_FAILURES: LazyLock<LogThrottle<()>> = LazyLock::new(LogThrottle::default);
    use RDKafkaLogLevel as Level;
    if facility == "FAIL" {
        if let Some(left_out) = CONNECTION_FAILURES.due((), Instant::now()) {
            tracing::warn!(target: "librdkafka", left_out, "librdkafka: {facility} {message} (connection failures at most once a minute; left_out: as many since)");
        }
        return;
    }
    match level {
        Level::Emerg | Level::Alert | Level::Critical | Level::Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        Level::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {facility} {message}"),
        Level::Notice | Level::Info => {
            tracing::info!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        Level::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}"),
    }
}

/// [`client_config`] for a producer that writes each record once, in order, to every
/// in-sync replica: what every Tally producer needs, as money rides on its records.
/// Records wait up to `linger` to travel in batches, lz4-compressed; `[kafka]
/// properties` may set either tunable.
pub fn idempotent_producer_config(settings: &KafkaSettings, linger: Duration) -> ClientConfig {
    let mut config = client_config(settings);
    config.set("enable.idempotence", "true").set("acks", "all");
    tunable(&mut config, "linger.ms", &linger.as_millis().to_string());
    tunable(&mut config, "compression.type", "lz4");
    config
}

/// A `[kafka] properties` entry librdkafka refuses.
#[derive(Debug, thiserror::Error)]
#[error("[kafka] properties.\"{name}\": {description} (its value is not shown: it may be a secret); fix or remove it")]
pub struct PropertyError {
    pub name: String,
    pub description: String,
}

/// Checks every `[kafka] properties` entry with librdkafka, without creating a client,
/// so a mistyped or unsupported property is refused at start. librdkafka's own error
/// would print the value, and a mistyped `sasl.password` holds the password.
pub fn check_properties(settings: &KafkaSettings) -> Result<(), PropertyError> {
    for (name, value) in &settings.properties {
        let mut one = ClientConfig::new();
        one.set(name, value);
        if let Err(e) = one.create_native_config() {
            let description = match e {
                KafkaError::ClientConfig(_, description, _, _) => description,
                other => other.to_string(),
            };
            let description = match value.is_empty() {
                true => description,
                false => description.replace(value.as_str(), "…"),
            };
            return Err(PropertyError {
                name: name.clone(),
                description,
            });
        }
    }
    Ok(())
}

type Admin = AdminClient<ClientErrors>;

/// Creates Tally's topics if they do not exist, then checks that the co-partitioned
/// ones agree and that the state topics keep what a restore needs. Returns their
/// partition count. Safe to run from every instance at every start.
pub async fn ensure_topics(settings: &KafkaSettings) -> Result<NonZeroUsize, Box<KafkaSetupError>> {
    let admin: Admin = client_config(settings)
        .create_with_context(ClientErrors)
        .map_err(setup_error(settings, "create an admin client"))?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    create_topics(&admin, settings, &options).await?;
    let events = settings.topic(Topic::Events);
    let expected_count = partitions_once_known(&admin, settings, &events).await?;
    check_topic(
        &admin,
        settings,
        &options,
        &events,
        &events_topic_settings(),
    )
    .await?;
    for topic in [Topic::Windows, Topic::AggregatorChangelog] {
        let name = settings.topic(topic);
        let found = partitions_once_known(&admin, settings, &name).await?;
        if found != expected_count {
            return Err(Box::new(KafkaSetupError::PartitionMismatch {
                topic: name,
                found: found.get(),
                expected: events,
                expected_count: expected_count.get(),
            }));
        }
        check_topic(&admin, settings, &options, &name, &state_topic_settings()).await?;
    }
    Ok(expected_count)
}

/// Asks the brokers whether they answer, before the topic requests, which wait out
/// their own timeouts (30 s and more) before failing, and then say "timed out" where
/// the brokers refused the connection. One client for every attempt, so that a slow
/// first connection (TLS, a SASL token to fetch) goes on between them.
pub struct BrokerProbe {
    admin: Admin,
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
        let admin = client_config(settings)
            .create_with_context(ClientErrors)
            .map_err(setup_error(settings, "create an admin client"))?;
        Ok(BrokerProbe {
            admin,
            settings: settings.clone(),
        })
    }

    /// Whether the brokers answer a metadata request (of the events topic) within
    /// `timeout`. Blocking.
    pub fn answers(&self, timeout: Duration) -> Result<(), Box<KafkaSetupError>> {
        let events = self.settings.topic(Topic::Events);
        (self.admin.inner().fetch_metadata(Some(&events), timeout))
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

/// Creates every topic of the pipeline that does not exist yet, the state topics with
/// the settings they need.
async fn create_topics(
    admin: &Admin,
    settings: &KafkaSettings,
    options: &AdminOptions,
) -> Result<(), Box<KafkaSetupError>> {
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
    let replicas = i32::from(settings.replication_factor);
    // With three or more replicas a write (acks=all, a transaction's commit) needs two
    // of them, so losing the leader cannot lose what it acknowledged; with fewer, one
    // (Kafka's default), or every write would stop while one replica is down.
    let min_insync = if replicas >= 3 { "2" } else { "1" };
    let partitions = i32::try_from(settings.partitions).unwrap_or(i32::MAX);
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
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(setup_error(settings, &format!("create topic {topic}"))(
                    KafkaError::AdminOp(code),
                ))
            }
        }
    }
    Ok(())
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

/// How often a service calls [`record_lag`]: a scrape interval's worth, so dashboards
/// see each step and the watermark requests stay few.
pub const LAG_RECORD_INTERVAL: Duration = Duration::from_secs(5);

/// Sets `lag{topic, partition}` (a service's `*_consumer_lag_messages`) to how far
/// each assigned partition's position is behind its high watermark, and removes the
/// series of partitions no longer assigned. A partition read nothing from since it
/// was assigned (idle since a restart) has no position yet: `next_offset` gives where
/// its owner starts it (the service chose that offset at assignment), so every held
/// partition has a series. A partition whose watermark cannot be read this time keeps
/// its last value: a scrape never sees a held partition vanish and come back, which
/// would restart a lag alert's `for`. Cheap enough to call every few seconds.
pub fn record_lag<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    lag: &IntGaugeVec,
    next_offset: impl Fn(i32) -> Option<i64>,
) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let Ok(positions) = consumer.position() else {
        return;
    };
    let held: HashSet<(String, String)> = (assignment.elements().iter())
        .map(|elem| (elem.topic().to_owned(), elem.partition().to_string()))
        .collect();
    let mut exported = Vec::new();
    for family in Collector::collect(lag) {
        for metric in family.get_metric() {
            let label = |name: &str| {
                (metric.get_label().iter())
                    .find(|pair| pair.name() == name)
                    .map_or_else(String::new, |pair| pair.value().to_owned())
            };
            exported.push((label("topic"), label("partition")));
        }
    }
    for gone in exported.iter().filter(|series| !held.contains(series)) {
        // Cannot fail: the labels are the series' own.
        let _ = lag.remove_label_values(&[&gone.0, &gone.1]);
    }
    for elem in assignment.elements() {
        let Ok((_, high)) =
            consumer.fetch_watermarks(elem.topic(), elem.partition(), Duration::from_secs(1))
        else {
            continue;
        };
        let (topic, partition) = (elem.topic(), elem.partition());
        let position = offset_of(&positions, topic, partition).or_else(|| next_offset(partition));
        if let Some(position) = position {
            lag.with_label_values(&[elem.topic(), &elem.partition().to_string()])
                .set((high - position).max(0));
        }
    }
}

/// A consumer-group member that owns partitions: told of each assignment and
/// revocation, inside the consumer's `poll`, on the polling thread. Implementations
/// restore state on assignment (and may choose where each partition starts, by setting
/// its offset in the list) and finish their work on revocation.
pub trait PartitionOwner: Send + Sized + 'static {
    type Error: Send + 'static;

    /// Called with the newly assigned partitions; must end by taking them with
    /// `consumer.incremental_assign(partitions)`.
    fn assign(
        &mut self,
        consumer: &BaseConsumer<GroupContext<Self>>,
        partitions: &mut TopicPartitionList,
    ) -> Result<(), Self::Error>;

    /// Called with the partitions being taken away; must end by releasing them with
    /// `consumer.incremental_unassign(partitions)` (on an error the context releases
    /// them).
    fn revoke(
        &mut self,
        consumer: &BaseConsumer<GroupContext<Self>>,
        partitions: &TopicPartitionList,
    ) -> Result<(), Self::Error>;
}

/// The consumer context of a [`PartitionOwner`] under the cooperative protocol.
#[allow(missing_debug_implementations)] // holds the owner's whole state
pub struct GroupContext<W: PartitionOwner> {
    owner: Arc<Mutex<W>>,
    /// A rebalance step that failed; the consume loop stops with it.
    failure: Mutex<Option<W::Error>>,
    /// Set by [`leave_group`]: partitions assigned while the consumer closes go to the
    /// group's next owner without being restored here.
    leaving: AtomicBool,
}

impl<W: PartitionOwner> GroupContext<W> {
    pub fn new(owner: Arc<Mutex<W>>) -> Self {
        GroupContext {
            owner,
            failure: Mutex::new(None),
            leaving: AtomicBool::new(false),
        }
    }

    /// The error of a failed assignment or revocation, once.
    pub fn take_failure(&self) -> Option<W::Error> {
        lock(&self.failure).take()
    }
}

impl<W: PartitionOwner> ClientContext for GroupContext<W> {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(&error, reason);
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }
}

impl<W: PartitionOwner> ConsumerContext for GroupContext<W> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let mut owner = lock(&self.owner);
        let result = match err {
            // Restoring would wait for committed offsets a leaving member cannot read.
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS
                if self.leaving.load(Ordering::SeqCst) =>
            {
                Ok(())
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                owner.assign(consumer, partitions)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked = owner.revoke(consumer, partitions);
                // The owner stops on its error, but the partitions must go all the
                // same: closing the consumer waits for them, and would wait forever.
                if revoked.is_err() {
                    if let Err(e) = consumer.incremental_unassign(partitions) {
                        tracing::debug!(error = %e, "releasing partitions after a failed revocation");
                    }
                }
                revoked
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed");
                Ok(())
            }
        };
        if let Err(e) = result {
            *lock(&self.failure) = Some(e);
        }
    }
}

/// Leaves the consumer group once the owner has finished its work: partitions still
/// held are revoked as the consumer closes, and any assigned meanwhile are left alone.
pub fn leave_group<W: PartitionOwner>(consumer: &BaseConsumer<GroupContext<W>>) {
    consumer.context().leaving.store(true, Ordering::SeqCst);
    consumer.unsubscribe();
}

/// The services' producer: its own thread serves delivery reports as they arrive.
/// Create it with `create_with_context(DeliveryReports::default())`.
pub type KafkaProducer = ThreadedProducer<DeliveryReports>;

/// A producer context that keeps the first record Kafka refused for good, so that a
/// caller who waited for the queue to empty can tell delivered from given up on.
#[derive(Debug, Default)]
pub struct DeliveryReports {
    failure: std::sync::OnceLock<KafkaError>,
}

impl DeliveryReports {
    /// The first delivery failure, if a record was ever refused.
    pub fn failure(&self) -> Option<&KafkaError> {
        self.failure.get()
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
        if let Err((error, _)) = result {
            let _ = self.failure.set(error.clone());
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

/// The value of a message's header `key` (empty if the header has none), if the message
/// has that header: how Tally's control records are told from data.
pub fn header_value<'m, M: Message>(message: &'m M, key: &str) -> Option<&'m [u8]> {
    let header = message.headers()?.iter().find(|h| h.key == key)?;
    Some(header.value.unwrap_or_default())
}

/// The offset of `partition` of `topic` in `list`, if it is a real offset.
pub fn offset_of(list: &TopicPartitionList, topic: &str, partition: i32) -> Option<i64> {
    list.find_partition(topic, partition)
        .and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
}

/// For each `(partition, next_offset)` of `topic`, the consumer's position where it is
/// past `next_offset`. Called once every record the consumer delivered is processed,
/// the gap holds only what librdkafka steps over without delivering: transaction
/// markers and aborted records (a seek or a new assignment resets the position). A
/// consumer that commits its next offset rather than this position stays one short
/// of the end of a topic written in transactions, a lag monitors never see go.
pub fn positions_ahead<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    next_offsets: impl IntoIterator<Item = (i32, i64)>,
) -> Vec<(i32, i64)> {
    let Ok(positions) = consumer.position() else {
        return Vec::new();
    };
    (next_offsets.into_iter())
        .filter_map(|(partition, next)| {
            let position = offset_of(&positions, topic, partition)?;
            (position > next).then_some((partition, position))
        })
        .collect()
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
    let reader: BaseConsumer<EndIsNoError> = base
        .set("group.id", "tally-state-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        // The end is known to be reached only by a fetch that comes back empty, which
        // the broker otherwise holds for 500 ms in case records arrive.
        .set("fetch.wait.max.ms", "10")
        .set("fetch.max.bytes", "104857600")
        .set("max.partition.fetch.bytes", MAX_RECORD_BYTES.to_string())
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

/// The group's committed offsets of `partitions`, waiting out what makes them
/// unavailable for a while: a broker restart, or a previous owner's transaction still
/// open because it died mid-commit (it keeps the offsets unstable until it is aborted,
/// after at most `transaction.timeout.ms`).
pub fn committed_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: &TopicPartitionList,
) -> Result<TopicPartitionList, KafkaError> {
    retry_while_unavailable(
        "read the committed offsets",
        Duration::from_secs(120),
        || consumer.committed_offsets(partitions.clone(), Duration::from_secs(30)),
    )
}

/// `duration` to the nearest second, for people (what is left of a deadline has
/// nanoseconds).
fn whole_seconds(duration: Duration) -> Duration {
    Duration::from_secs(duration.as_secs() + u64::from(duration.subsec_millis() >= 500))
}

/// Why a consumer group was not found caught up with a topic.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error("cannot {what}: {source}")]
    Kafka { what: String, source: KafkaError },
    #[error(
        "group {group} has not read and committed all of {topic} within {}: {}; is it running?",
        humantime::format_duration(whole_seconds(*.patience)),
        short_partitions(.short)
    )]
    Behind {
        group: String,
        topic: String,
        patience: Duration,
        /// `(partition, records short)`.
        short: Vec<(i32, i64)>,
    },
}

fn short_partitions(short: &[(i32, i64)]) -> String {
    let named: Vec<String> = (short.iter())
        .map(|(partition, records)| format!("partition {partition} is {records} records short"))
        .collect();
    named.join(", ")
}

/// Waits until consumer group `group` has committed, on every partition of `topic`,
/// the end the partition had when this was called (its high watermark): everything
/// written to the topic before then is read, and what the group makes of it stored
/// (Tally's services commit only what they stored). An empty partition counts as read.
/// The group is only asked, never joined. `Behind` after `patience`.
pub fn wait_until_caught_up(
    settings: &KafkaSettings,
    group: &str,
    topic: &str,
    patience: Duration,
) -> Result<(), CatchUpError> {
    let failed = |what: &str| {
        let what = what.to_owned();
        move |source| CatchUpError::Kafka { what, source }
    };
    let consumer: BaseConsumer = client_config(settings)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(failed("create a consumer to read committed offsets"))?;
    let partitions = partition_count(consumer.client(), topic)
        .map_err(failed(&format!("find topic {topic}")))?;
    let mut ends = Vec::new();
    let mut asked = TopicPartitionList::new();
    for partition in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
        let (low, high) = retry_while_unavailable("read a partition's end", patience, || {
            consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))
        })
        .map_err(failed(&format!(
            "read the end of {topic} partition {partition}"
        )))?;
        if high > low {
            ends.push((partition, high));
            asked.add_partition(topic, partition);
        }
    }
    let deadline = std::time::Instant::now() + patience;
    loop {
        let committed = committed_offsets(&consumer, &asked)
            .map_err(failed(&format!("read group {group}'s committed offsets")))?;
        let short: Vec<(i32, i64)> = (ends.iter())
            .filter_map(|&(partition, end)| {
                let at = offset_of(&committed, topic, partition).unwrap_or(0);
                (at < end).then_some((partition, end - at))
            })
            .collect();
        if short.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(CatchUpError::Behind {
                group: group.to_owned(),
                topic: topic.to_owned(),
                patience,
                short,
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One poll of a [`group_consumer`]. `Ok(Some)`: a message; `Ok(None)`: nothing within
/// `wait`, or a consumer error that passes (logged; librdkafka retries, and `health`
/// tells readiness once they have gone on too long). `Err`: what ends the consume
/// loop, a rebalance step the owner failed, or a fatal consumer error made the
/// owner's by `fatal`.
pub fn poll_group<'c, O: PartitionOwner>(
    consumer: &'c BaseConsumer<GroupContext<O>>,
    wait: Duration,
    health: &mut ConsumerHealth,
    fatal: impl FnOnce(KafkaError) -> O::Error,
) -> Result<Option<BorrowedMessage<'c>>, O::Error> {
    let polled = consumer.poll(wait);
    if let Some(failure) = consumer.context().take_failure() {
        return Err(failure);
    }
    match polled {
        Some(Ok(message)) => {
            health.succeeded();
            Ok(Some(message))
        }
        Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => Err(fatal(e)),
        Some(Err(e)) => {
            log_consumer_error(&e);
            health.failed(&e, Instant::now());
            Ok(None)
        }
        None => {
            health.quiet(Instant::now());
            Ok(None)
        }
    }
}

/// How long a group consumer's polls may keep failing before its service says it is
/// not ready: longer than a broker takes to restart, so routine restarts do not flap.
const CONSUMER_FAILING_AFTER: Duration = Duration::from_secs(30);

/// A run of consumer errors ends after this long without one, or at the next message.
/// librdkafka reports an error that repeats (a broker still refusing connections) once
/// every 30 s, so a run must outlast that to be seen as one.
const CONSUMER_QUIET_AFTER: Duration = Duration::from_secs(60);

/// Whether a group consumer keeps failing: a consumer that cannot join its group (a
/// session timeout the broker refuses, a missing ACL) or reach its brokers makes no
/// progress, and its service must not report ready while it bills nothing.
#[derive(Debug)]
pub struct ConsumerHealth {
    readiness: crate::ops::Readiness,
    /// The first and the latest error of the current run of them.
    failing: Option<(Instant, Instant)>,
}

impl ConsumerHealth {
    pub fn new(readiness: crate::ops::Readiness) -> Self {
        ConsumerHealth {
            readiness,
            failing: None,
        }
    }

    fn failed(&mut self, error: &KafkaError, now: Instant) {
        let since = self.failing.map_or(now, |(since, _)| since);
        self.failing = Some((since, now));
        let failing_for = now - since;
        if failing_for >= CONSUMER_FAILING_AFTER {
            self.readiness.consumer_failing(format!(
                "the Kafka consumer has failed for {} s, and consumes nothing: {error}",
                failing_for.as_secs()
            ));
        }
    }

    fn succeeded(&mut self) {
        if self.failing.take().is_some() {
            self.readiness.consumer_recovered();
        }
    }

    fn quiet(&mut self, now: Instant) {
        if (self.failing).is_some_and(|(_, last)| now - last >= CONSUMER_QUIET_AFTER) {
            self.succeeded();
        }
    }
}

/// Logs an error a consumer's `poll` returned, which librdkafka retries by itself.
/// Lost broker connections are left at debug: the client's error callback has logged
/// them already, and during an outage every poll returns them again.
fn log_consumer_error(error: &KafkaError) {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure) => {
            tracing::debug!(%error, "consumer error; retrying");
        }
        _ => tracing::warn!(%error, "consumer error; retrying"),
    }
}

/// How the services' group consumers fetch: set on any consumer that should read a
/// topic as fast as they do (the streaming benchmark's plain consumer too).
pub fn tune_fetching(config: &mut ClientConfig) -> &mut ClientConfig {
    // Once its prefetch queue is full librdkafka waits this long before fetching again
    // (default 1 s); a loop that drains the queue sooner would sit idle.
    tunable(config, "fetch.queue.backoff.ms", "10");
    // Partitions follow each other in the fetched stream in runs of at most this many
    // bytes (default 1 MB, some 20,000 compressed events): smaller runs spread each
    // batch the aggregator reads over its partitions' threads.
    tunable(config, "max.partition.fetch.bytes", "262144")
}

/// A consumer-group member for a [`PartitionOwner`]: cooperative-sticky assignment,
/// read committed, offsets committed only by the owner (never automatically), reading
/// from the beginning when the group has no offsets, and subscribed to `topic`.
pub fn group_consumer<W: PartitionOwner>(
    settings: &KafkaSettings,
    service: &str,
    topic: &str,
    owner: Arc<Mutex<W>>,
) -> Result<BaseConsumer<GroupContext<W>>, KafkaError> {
    let mut config = client_config(settings);
    // Restores and rebuilds run in the rebalance callback, after `poll` returned its
    // event, so they count against this: allow them time before the group gives up on
    // the member. `[kafka] properties` may raise it for states that take longer.
    tunable(&mut config, "max.poll.interval.ms", "900000");
    // A member that died is noticed within 10 s, its partitions moved on.
    tunable(&mut config, "session.timeout.ms", "10000");
    tunable(&mut config, "heartbeat.interval.ms", "1000");
    let consumer: BaseConsumer<GroupContext<W>> = tune_fetching(
        config
            .set("group.id", settings.group(service))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky"),
    )
    .create_with_context(GroupContext::new(owner))?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_consumer_failing_for_long_makes_its_service_not_ready_until_it_recovers() {
        let readiness = crate::ops::Readiness::new("starting");
        readiness.ready();
        let mut health = super::ConsumerHealth::new(readiness.clone());
        let error = KafkaError::MessageConsumption(RDKafkaErrorCode::InvalidSessionTimeout);
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        // Errors every 2 s: ready for the first 30 s (a broker restart), then not.
        for seconds in (0..30).step_by(2) {
            health.failed(&error, at(seconds));
        }
        assert_eq!(readiness.reason(), None);
        health.failed(&error, at(30));
        let reason = readiness.reason().expect("not ready");
        assert!(
            reason.contains("failed for 30 s") && reason.contains("session timeout"),
            "{reason}"
        );
        // The service's own reasons do not clear it.
        readiness.ready();
        assert!(readiness.reason().is_some());
        // Quiet for less than a minute: still failing (librdkafka repeats an error
        // every 30 s); for a minute: recovered.
        health.quiet(at(89));
        assert!(readiness.reason().is_some());
        health.quiet(at(90));
        assert_eq!(readiness.reason(), None);
        // A new run of errors counts from its own start: errors 30 s apart are one.
        health.failed(&error, at(100));
        health.failed(&error, at(129));
        assert_eq!(readiness.reason(), None);
        health.failed(&error, at(130));
        assert!(readiness.reason().is_some());
        // A message ends it at once.
        health.succeeded();
        assert_eq!(readiness.reason(), None);
    }

    #[test]
    fn a_group_behind_is_told_in_whole_seconds() {
        let behind = super::CatchUpError::Behind {
            group: "g".to_owned(),
            topic: "t".to_owned(),
            patience: Duration::from_nanos(19_523_503_197),
            short: vec![(0, 3)],
        };
        assert!(
            behind
                .to_string()
                .starts_with("group g has not read and committed all of t within 20s: "),
            "{behind}"
        );
    }

    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_tunable_keeps_the_operators_value_and_tallys_own_settings_win() {
        let settings = KafkaSettings {
            properties: [
                ("linger.ms", "50"),
                ("compression.codec", "zstd"),
                ("allow.auto.create.topics", "true"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            brokers: "127.0.0.1:9092".to_owned(),
            topic_prefix: "tally".to_owned(),
            partitions: 1,
            replication_factor: 1,
            instance_id: "0".to_owned(),
        };
        let mut config = client_config(&settings);
        tunable(&mut config, "linger.ms", "5");
        tunable(&mut config, "compression.type", "lz4");
        assert_eq!(config.get("linger.ms"), Some("50"));
        // Given under its other name, it is not set twice.
        assert_eq!(config.get("compression.type"), None);
        assert_eq!(config.get("compression.codec"), Some("zstd"));
        tunable(&mut config, "session.timeout.ms", "10000");
        assert_eq!(config.get("session.timeout.ms"), Some("10000"));
        assert_eq!(config.get("allow.auto.create.topics"), Some("false"));
    }

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

    fn calls_until_returned(errors: &[KafkaError]) -> (usize, Result<(), KafkaError>) {
        let calls = Cell::new(0);
        let result = retry_while_unavailable("test", Duration::from_secs(60), || {
            calls.set(calls.get() + 1);
            errors.get(calls.get() - 1).cloned().map_or(Ok(()), Err)
        });
        (calls.get(), result)
    }

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
