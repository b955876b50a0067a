//! The runtime's Kafka helpers against the real broker that `scripts/services/up.sh`
//! starts, including while it is down: restores and rebuilds run inside rebalances,
//! and one that gave up during a broker restart stopped its whole service.

#![allow(clippy::unwrap_used)] // a test: a failed call should fail it

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use tally_runtime::kafka::read_partition;

const BROKERS: &str = "127.0.0.1:9092";

fn kafka(action: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/services/kafka.sh");
    let status = Command::new(&script).arg(action).status().unwrap();
    assert!(status.success(), "{} {action} failed", script.display());
}

fn config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", BROKERS);
    config
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_partition_read_started_while_the_broker_is_down_ends_once_it_is_back() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let topic = format!("test.runtime_read_{}_{nanos}", std::process::id());
    let admin: AdminClient<DefaultClientContext> = config().create().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for created in runtime
        .block_on(admin.create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        ))
        .unwrap()
    {
        created.unwrap();
    }
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
            let read = read_partition(config(), &topic, 0, Duration::from_secs(120), |m| {
                keys.push(rdkafka::Message::key(m).unwrap().to_vec());
            });
            (read, keys)
        })
    };
    // Long enough for the reader's first requests to fail.
    std::thread::sleep(Duration::from_secs(3));
    kafka("start");
    let (read, keys) = reader.join().unwrap();
    read.unwrap();
    assert_eq!(keys.len(), 1000, "every record read once");
    assert_eq!(keys.first().unwrap(), b"k0");
    assert_eq!(keys.last().unwrap(), b"k999");
}
