//! The runtime's Kafka helpers against the real broker that `scripts/services/up.sh`
//! starts: reading a partition while the broker is down (restores and rebuilds run
//! inside rebalances, and one that gave up during a broker restart stopped its whole
//! service), the topic setup every service runs at start, and the partition a key goes
//! to.

#![allow(clippy::unwrap_used)] // a test: a failed call should fail it

use std::num::NonZeroUsize;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use tally_runtime::kafka::{
    ensure_topics, group_consumer, partition_for_key, partitions_beyond, read_partition,
    record_lag, wait_until_caught_up, CatchUpError, GroupContext, KafkaSetupError, PartitionOwner,
    ReadError, MAX_RECORD_BYTES, REJECTED_RETENTION_MS,
};
use tally_schemas::config::{Group, KafkaSettings, Topic};

const BROKERS: &str = "127.0.0.1:9092";

fn kafka(action: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/services/kafka.sh");
    let status = Command::new(&script).arg(action).status().unwrap();
    assert!(status.success(), "{} {action} failed", script.display());
}

/// One test at a time: one of them stops the broker.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", BROKERS);
    config
}

/// A name no other test run uses.
fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("test.runtime_{name}_{}_{nanos}", std::process::id())
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

fn options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))
}

fn create_topic(admin: &AdminClient<DefaultClientContext>, topic: NewTopic<'_>) {
    for created in block_on(admin.create_topics(&[topic], &options())).unwrap() {
        created.unwrap();
    }
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_partition_read_started_while_the_broker_is_down_ends_once_it_is_back() {
    let _serial = serial();
    let topic = unique("read");
    let admin: AdminClient<DefaultClientContext> = config().create().unwrap();
    create_topic(&admin, NewTopic::new(&topic, 1, TopicReplication::Fixed(1)));
    drop(admin);
    let producer: BaseProducer = config().set("acks", "all").create().unwrap();
    for i in 0..1000 {
        let key = format!("k{i}");
        producer
            .send(BaseRecord::to(&topic).key(&key).payload("v"))
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    drop(producer);

    kafka("stop");
    let reader = {
        let topic = topic.clone();
        std::thread::spawn(move || {
            let mut keys = Vec::new();
            // As a rater rebuilding from its committed offset: the reader knows the
            // records reach offset 1000.
            let timeout = Duration::from_secs(120);
            let read = read_partition(config(), &topic, 0, 0, 1000, timeout, |m| {
                keys.push(rdkafka::Message::key(m).unwrap().to_vec());
            });
            (read, keys)
        })
    };
    // Long enough for the reader's first requests to fail; it is still waiting.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!reader.is_finished(), "the read ended with the broker down");
    kafka("start");
    let (read, keys) = reader.join().unwrap();
    read.unwrap();
    assert_eq!(keys.len(), 1000, "every record read once");
    assert_eq!(keys.first().unwrap(), b"k0");
    assert_eq!(keys.last().unwrap(), b"k999");

    // From an offset: the records from there on; from the end or past it, none.
    let read_from = |from: i64| {
        let mut offsets = Vec::new();
        read_partition(config(), &topic, 0, from, 0, Duration::from_secs(60), |m| {
            offsets.push(rdkafka::Message::offset(m));
        })
        .unwrap();
        offsets
    };
    assert_eq!(read_from(990), (990..1000).collect::<Vec<i64>>());
    assert!(read_from(1000).is_empty());
    assert!(read_from(5000).is_empty());
    assert_eq!(read_from(-3).len(), 1000);

    // Records known to be committed that the broker does not have (it lost them) are
    // an error naming both offsets, not a shorter read that looks complete.
    let mut read = 0;
    let short = read_partition(config(), &topic, 0, 0, 1500, Duration::from_secs(3), |_| {
        read += 1;
    });
    assert_eq!(
        read, 0,
        "nothing handed on from a partition that lost records"
    );
    let error = short.unwrap_err();
    assert!(
        matches!(
            error,
            ReadError::EndBehind {
                reported: 1000,
                known_end: 1500,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("--reset-offsets"), "{error}");
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn lag_is_kept_while_the_broker_is_away_and_dropped_for_partitions_let_go() {
    let _serial = serial();
    let topic = unique("lag");
    let admin: AdminClient<DefaultClientContext> = config().create().unwrap();
    create_topic(&admin, NewTopic::new(&topic, 1, TopicReplication::Fixed(1)));
    drop(admin);
    let producer: BaseProducer = config().create().unwrap();
    for _ in 0..10 {
        producer
            .send(BaseRecord::<(), _>::to(&topic).payload("v"))
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let consumer: rdkafka::consumer::BaseConsumer = config()
        .set("group.id", unique("lag-group"))
        .create()
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment
        .add_partition_offset(&topic, 0, rdkafka::Offset::Offset(0))
        .unwrap();
    rdkafka::consumer::Consumer::assign(&consumer, &assignment).unwrap();
    // Read 4 of the 10: the position is 4.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut read = 0;
    while read < 4 {
        assert!(std::time::Instant::now() < deadline, "read {read} of 4");
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            message.unwrap();
            read += 1;
        }
    }
    let registry = prometheus::Registry::new();
    let lag = tally_runtime::metrics::Metrics::new(registry.clone()).consumer_lag();
    // A partition this consumer held before: its series goes.
    lag.with_label_values(&["tally.windows", "3"]).set(7);
    let exported = || {
        let families = registry.gather();
        (families[0].get_metric().iter())
            .map(|m| {
                (
                    m.get_label()[1].value().to_owned(),
                    m.get_gauge().get_value(),
                )
            })
            .collect::<Vec<_>>()
    };
    record_lag(&consumer, &lag, |_| None);
    assert_eq!(exported(), [(topic.clone(), 6.0)]);

    // With the broker away, no watermark can be read: the last value stays.
    kafka("stop");
    record_lag(&consumer, &lag, |_| None);
    let kept = exported();
    kafka("start");
    assert_eq!(kept, [(topic.clone(), 6.0)]);
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn every_held_partition_has_a_lag_before_anything_is_read_from_it() {
    let _serial = serial();
    let topic = unique("lag-unread");
    let admin: AdminClient<DefaultClientContext> = config().create().unwrap();
    create_topic(&admin, NewTopic::new(&topic, 2, TopicReplication::Fixed(1)));
    drop(admin);
    let producer: BaseProducer = config().create().unwrap();
    for (partition, records) in [(0, 5), (1, 3)] {
        for _ in 0..records {
            (producer.send(
                BaseRecord::<(), _>::to(&topic)
                    .partition(partition)
                    .payload("v"),
            ))
            .unwrap();
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    // An owner that starts partition 0 at its end and partition 1 after one record
    // (as a service restoring its state would), and has not read a record of either
    // (it never polls): no position yet.
    let starts = std::collections::HashMap::from([(0, 5), (1, 1)]);
    let consumer: rdkafka::consumer::BaseConsumer = config()
        .set("group.id", unique("lag-unread-group"))
        .create()
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    for (&partition, &offset) in &starts {
        (assignment.add_partition_offset(&topic, partition, rdkafka::Offset::Offset(offset)))
            .unwrap();
    }
    rdkafka::consumer::Consumer::assign(&consumer, &assignment).unwrap();
    let registry = prometheus::Registry::new();
    let lag = tally_runtime::metrics::Metrics::new(registry.clone()).consumer_lag();
    record_lag(&consumer, &lag, |p| starts.get(&p).copied());
    let mut exported: Vec<(String, f64)> = (registry.gather()[0].get_metric().iter())
        .map(|m| {
            let partition = (m.get_label().iter()).find(|l| l.name() == "partition");
            (
                partition.unwrap().value().to_owned(),
                m.get_gauge().get_value(),
            )
        })
        .collect();
    exported.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(exported, [("0".to_owned(), 0.0), ("1".to_owned(), 2.0)]);
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_group_is_caught_up_once_it_committed_each_partitions_end() {
    let _serial = serial();
    let topic = unique("caught_up");
    let group = unique("caught-up-group");
    let admin: AdminClient<DefaultClientContext> = config().create().unwrap();
    // Partition 1 stays empty: nothing to read there.
    create_topic(&admin, NewTopic::new(&topic, 2, TopicReplication::Fixed(1)));
    drop(admin);
    let producer: BaseProducer = config().create().unwrap();
    for _ in 0..5 {
        producer
            .send(BaseRecord::<(), _>::to(&topic).partition(0).payload("v"))
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let settings = KafkaSettings {
        brokers: BROKERS.to_owned(),
        topic_prefix: unique("caught_up"),
        partitions: 2,
        replication_factor: std::num::NonZeroU16::MIN,
        properties: Default::default(),
        instance_id: "0".to_owned(),
    };
    let consumer: rdkafka::consumer::BaseConsumer =
        config().set("group.id", &group).create().unwrap();
    let commit = |offset: i64| {
        let mut offsets = rdkafka::TopicPartitionList::new();
        offsets
            .add_partition_offset(&topic, 0, rdkafka::Offset::Offset(offset))
            .unwrap();
        rdkafka::consumer::Consumer::commit(
            &consumer,
            &offsets,
            rdkafka::consumer::CommitMode::Sync,
        )
        .unwrap();
    };
    commit(3);
    let behind = wait_until_caught_up(&settings, &group, &topic, 2, Duration::from_secs(1));
    match behind {
        Err(CatchUpError::Behind { short, .. }) => assert_eq!(short, [(0, 2)]),
        other => panic!("{other:?}"),
    }
    let error = wait_until_caught_up(&settings, &group, &topic, 2, Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(error.contains("partition 0 is 2 records short"), "{error}");
    commit(5);
    wait_until_caught_up(&settings, &group, &topic, 2, Duration::from_secs(10)).unwrap();
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn records_compressed_with_every_codec_kafka_offers_are_read() {
    let _serial = serial();
    // A product service producing to the events topic directly chooses its codec;
    // Tally's consumers must decompress every one, or the partition stalls.
    let topic = unique("codecs");
    let admin: AdminClient<DefaultClientContext> = config().create().unwrap();
    create_topic(&admin, NewTopic::new(&topic, 1, TopicReplication::Fixed(1)));
    drop(admin);
    let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
    for codec in codecs {
        let producer: BaseProducer = config()
            .set("compression.codec", codec)
            .set("linger.ms", "50")
            .create()
            .unwrap();
        for i in 0..100 {
            let payload = format!("{codec} {i} {}", "usage ".repeat(20));
            producer
                .send(BaseRecord::<(), _>::to(&topic).payload(&payload))
                .unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }
    let mut read = Vec::new();
    read_partition(config(), &topic, 0, 0, 0, Duration::from_secs(60), |m| {
        let payload = rdkafka::Message::payload(m).unwrap();
        read.push(String::from_utf8(payload.to_vec()).unwrap());
    })
    .unwrap();
    assert_eq!(read.len(), codecs.len() * 100);
    for (i, codec) in codecs.iter().enumerate() {
        assert!(
            read[i * 100].starts_with(&format!("{codec} 0 ")),
            "{}",
            read[i * 100]
        );
    }
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn topics_an_operator_made_without_the_settings_tally_needs_are_refused() {
    let _serial = serial();
    let settings = KafkaSettings {
        brokers: BROKERS.to_owned(),
        topic_prefix: unique("setup"),
        partitions: 2,
        replication_factor: std::num::NonZeroU16::MIN,
        properties: Default::default(),
        instance_id: "0".to_owned(),
    };
    let (events, windows) = (
        settings.topic(Topic::Events),
        settings.topic(Topic::Windows),
    );
    let admin: AdminClient<DefaultClientContext> = config().create().unwrap();
    // Made by hand with the broker's defaults: timestamps the producer's clock sets,
    // deleted after a week, records up to 1 MB.
    for topic in [&events, &windows] {
        create_topic(&admin, NewTopic::new(topic, 2, TopicReplication::Fixed(1)));
    }
    let refusal =
        |topic: &str, setting: &str| match *block_on(ensure_topics(&settings)).unwrap_err() {
            KafkaSetupError::TopicSetting {
                topic: refused_topic,
                setting: refused,
                found,
                ..
            } => {
                assert_eq!((refused_topic.as_str(), refused), (topic, setting));
                found
            }
            other => panic!("expected {topic}'s {setting} refused, got {other}"),
        };
    let alter = |topic: &str, settings: &[(&str, &str)]| {
        let change = settings.iter().fold(
            AlterConfig::new(ResourceSpecifier::Topic(topic)),
            |c, (k, v)| c.set(k, v),
        );
        for altered in block_on(admin.alter_configs(&[change], &options())).unwrap() {
            altered.unwrap();
        }
        // The broker applies a change a moment after it acknowledged it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !settings.iter().all(|(name, value)| {
            let described =
                block_on(admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &options()))
                    .unwrap();
            let resource = described.into_iter().next().unwrap().unwrap();
            resource.get(name).and_then(|e| e.value.as_deref()) == Some(*value)
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "{settings:?} never applied"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(refusal(&events, "message.timestamp.type"), "CreateTime");
    alter(&events, &[("message.timestamp.type", "LogAppendTime")]);
    assert_eq!(refusal(&windows, "cleanup.policy"), "delete");
    alter(&windows, &[("cleanup.policy", "compact")]);
    assert_eq!(refusal(&windows, "max.message.bytes"), "1048588");
    alter(
        &windows,
        &[
            ("cleanup.policy", "compact"),
            ("max.message.bytes", &MAX_RECORD_BYTES.to_string()),
        ],
    );
    block_on(ensure_topics(&settings)).unwrap();

    // Topics Tally creates itself pass.
    let fresh = KafkaSettings {
        topic_prefix: unique("setup_fresh"),
        ..settings
    };
    block_on(ensure_topics(&fresh)).unwrap();
    block_on(ensure_topics(&fresh)).unwrap();
    // The rejected topic keeps refused events a quarter, not the broker's week.
    let rejected = fresh.topic(Topic::Rejected);
    let described =
        block_on(admin.describe_configs(&[ResourceSpecifier::Topic(&rejected)], &options()))
            .unwrap();
    let resource = described.into_iter().next().unwrap().unwrap();
    let retention = resource
        .get("retention.ms")
        .and_then(|e| e.value.as_deref());
    assert_eq!(retention, Some(REJECTED_RETENTION_MS));
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn partitions_added_to_the_events_topic_leave_the_pipelines_count_and_are_named() {
    let _serial = serial();
    let settings = KafkaSettings {
        brokers: BROKERS.to_owned(),
        topic_prefix: unique("grown"),
        partitions: 2,
        replication_factor: std::num::NonZeroU16::MIN,
        properties: Default::default(),
        instance_id: "0".to_owned(),
    };
    let two = NonZeroUsize::new(2).unwrap();
    assert_eq!(block_on(ensure_topics(&settings)).unwrap(), two);
    let admin: AdminClient<DefaultClientContext> = config().create().unwrap();
    let grow = |topic: &str| {
        for grown in
            block_on(admin.create_partitions(&[NewPartitions::new(topic, 3)], &options())).unwrap()
        {
            grown.unwrap();
        }
    };
    let events = settings.topic(Topic::Events);
    let client: BaseProducer = config().create().unwrap();
    assert_eq!(
        partitions_beyond(client.client(), &events, two).unwrap(),
        2..2
    );
    grow(&events);
    // The pipeline keeps its two partitions; the third is named, for the aggregators
    // to leave unread and to report.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while partitions_beyond(client.client(), &events, two).unwrap() != (2..3) {
        assert!(
            std::time::Instant::now() < deadline,
            "the third partition never showed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(block_on(ensure_topics(&settings)).unwrap(), two);
    // An events topic an operator made beforehand with more partitions than
    // `[kafka] partitions`: the pipeline takes its count, so all of it is read.
    let premade = KafkaSettings {
        topic_prefix: unique("premade"),
        ..settings.clone()
    };
    create_topic(
        &admin,
        NewTopic::new(&premade.topic(Topic::Events), 3, TopicReplication::Fixed(1))
            .set("message.timestamp.type", "LogAppendTime"),
    );
    let three = NonZeroUsize::new(3).unwrap();
    assert_eq!(block_on(ensure_topics(&premade)).unwrap(), three);
    // A changelog grown too no longer matches the pipeline's state: refused.
    let changelog = settings.topic(Topic::AggregatorChangelog);
    grow(&changelog);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match block_on(ensure_topics(&settings)).map_err(|e| *e) {
            Err(KafkaSetupError::PartitionMismatch {
                topic,
                found,
                expected_count,
                ..
            }) => {
                assert_eq!(
                    (topic.as_str(), found, expected_count),
                    (changelog.as_str(), 3, 2)
                );
                break;
            }
            other => assert!(std::time::Instant::now() < deadline, "{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn partition_for_key_names_the_partition_the_murmur2_partitioner_chose() {
    // Other tests stop the broker.
    let _serial = serial();
    let topic = unique("partitioner");
    let partitions = 7;
    let admin: AdminClient<DefaultClientContext> = config().create().unwrap();
    create_topic(
        &admin,
        NewTopic::new(&topic, partitions, TopicReplication::Fixed(1)),
    );
    let producer: FutureProducer = config()
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let keys: Vec<String> = (0..300)
        .map(|i| format!("cust_{i:05}"))
        .chain(["\u{e9}t\u{e9}".to_owned(), "a".repeat(1000)])
        .collect();
    let mut used = std::collections::BTreeSet::new();
    for key in &keys {
        let delivered = block_on(producer.send(
            FutureRecord::<str, str>::to(&topic).key(key).payload("x"),
            Duration::from_secs(30),
        ))
        .unwrap();
        assert_eq!(
            partition_for_key(key.as_bytes(), NonZeroUsize::new(7).unwrap()),
            delivered.partition,
            "{key}"
        );
        used.insert(delivered.partition);
    }
    assert_eq!(used.len(), 7, "the keys reach every partition");
    block_on(admin.delete_topics(&[&topic], &options())).unwrap();
}

/// Counts the revocations it is told of, and takes and releases partitions as told.
#[derive(Default)]
struct CountingOwner {
    revoked: usize,
}

impl PartitionOwner for CountingOwner {
    type Error = rdkafka::error::KafkaError;

    fn assign(
        &mut self,
        consumer: &rdkafka::consumer::BaseConsumer<GroupContext<Self>>,
        partitions: &mut rdkafka::TopicPartitionList,
    ) -> Result<(), Self::Error> {
        rdkafka::consumer::Consumer::incremental_assign(consumer, partitions)
    }

    fn revoke(
        &mut self,
        consumer: &rdkafka::consumer::BaseConsumer<GroupContext<Self>>,
        partitions: &rdkafka::TopicPartitionList,
    ) -> Result<(), Self::Error> {
        self.revoked += 1;
        rdkafka::consumer::Consumer::incremental_unassign(consumer, partitions)
    }
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_consumer_dropped_by_a_panic_releases_its_partitions_without_the_owner_committing() {
    let _serial = serial();
    let topic = unique("panic");
    let admin: AdminClient<DefaultClientContext> = config().create().unwrap();
    create_topic(&admin, NewTopic::new(&topic, 1, TopicReplication::Fixed(1)));
    drop(admin);
    // Each consumer joins its own group (its own prefix) and holds the partition; one
    // is dropped as usual, the other by a panic unwinding through it.
    let revocations = |panics: bool| {
        let settings = KafkaSettings {
            brokers: BROKERS.to_owned(),
            topic_prefix: unique("panic"),
            partitions: 1,
            replication_factor: std::num::NonZeroU16::MIN,
            properties: Default::default(),
            instance_id: "0".to_owned(),
        };
        let owner = std::sync::Arc::new(std::sync::Mutex::new(CountingOwner::default()));
        let consumer = group_consumer(&settings, Group::Aggregator, &topic, owner.clone()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while rdkafka::consumer::Consumer::assignment(&consumer)
            .unwrap()
            .count()
            == 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no partition assigned"
            );
            assert!(consumer.poll(Duration::from_millis(100)).is_none());
        }
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = consumer;
            assert!(!panics, "a bug in the middle of a batch");
        }));
        assert_eq!(dropped.is_err(), panics);
        let revoked = owner.lock().unwrap().revoked;
        revoked
    };
    assert_eq!(revocations(false), 1);
    assert_eq!(revocations(true), 0);
}
