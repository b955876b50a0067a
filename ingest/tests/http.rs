//! The HTTP ingest service end to end: real HTTP requests to a service started on port
//! 0, real Kafka behind it, and what landed read back from the events topic.
//!
//! Needs Kafka at `TALLY_KAFKA_BROKERS` (default 127.0.0.1:9092): `scripts/services/up.sh
//! kafka` starts one. Each test uses topics of its own (a unique prefix), created at
//! the start and deleted at the end. The tests that need no Kafka (an unreachable
//! broker, a taken port) run everywhere.

#![allow(clippy::unwrap_used)] // a test: a failed call should fail it

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};
use tally_ingest::http::{start, Running, ROUTES};
use tally_ingest::IngestError;
use tally_runtime::Shutdown;
use tally_schemas::config::{Config, ServiceSettings, Topic};

const NEEDS_KAFKA: &str = "needs Kafka: scripts/services/up.sh kafka";

/// May send any source.
const KEY: &str = "test-key-any-source-0001";
/// May send source `agent` only.
const AGENT_KEY: &str = "test-key-agent-only-0002";
/// A key whose tenant has a long name, which every record it sends carries.
const LONG_TENANT_KEY: &str = "test-key-long-tenant-0003";
const LONG_TENANT: &str = "analytics-platform-of-the-support-product";

const PRICE_BOOK: &str = r#"
[[meters]]
slug = "tokens"
event_type = "llm.tokens"
aggregation = "sum"
value_property = "$.tokens"

[[meters]]
slug = "resolutions"
event_type = "ai.resolution"
aggregation = "count"

[[plans]]
id = "pro"
currency = "usd"

[[plans.prices]]
id = "tokens"
meter = "tokens"
billing_scheme = "per_unit"
unit_amount = "0.001"

[[plans.prices]]
id = "resolutions"
meter = "resolutions"
billing_scheme = "per_unit"
unit_amount = "0.99"

[[customers]]
id = "cust_a"
plan = "pro"

[[customers]]
id = "cust_b"
plan = "pro"

[[customers]]
id = "cust_c"
plan = "pro"

[[customers]]
id = "cust_acme"
plan = "pro"
"#;

fn brokers() -> String {
    std::env::var("TALLY_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// What a test changes from the defaults.
#[derive(Default)]
struct Setup<'a> {
    /// Extra lines of `[ingest]`.
    ingest: &'a str,
    /// Extra lines of `[kafka]`.
    kafka: &'a str,
    /// `[kafka] brokers`; the test Kafka when `None`.
    brokers: Option<&'a str>,
}

fn settings(name: &str, setup: &Setup<'_>) -> (Arc<Config>, ServiceSettings) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("test-ingest-{name}-{}-{nanos}", std::process::id());
    let brokers = setup.brokers.map_or_else(brokers, str::to_owned);
    let text = format!(
        r#"{PRICE_BOOK}
[kafka]
brokers = "{brokers}"
topic_prefix = "{prefix}"
partitions = 2
{kafka}

[ingest]
listen = "127.0.0.1:0"
{ingest}

[[ingest.api_keys]]
key = "{KEY}"
tenant = "platform"
sources = ["*"]

[[ingest.api_keys]]
key = "{AGENT_KEY}"
tenant = "agent-team"
sources = ["agent"]

[[ingest.api_keys]]
key = "{LONG_TENANT_KEY}"
tenant = "{LONG_TENANT}"
sources = ["*"]
"#,
        kafka = setup.kafka,
        ingest = setup.ingest,
    );
    let config = Config::parse(&text, "test.toml").unwrap();
    let services = config.services("test.toml", &|_| None).unwrap();
    (Arc::new(config), services)
}

/// An answer: status, headers (lower-case names) and body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A record read back from the events topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Stored {
    key: String,
    value: String,
}

/// A record read back from any topic, with its headers.
#[derive(Debug)]
struct Record {
    key: Option<String>,
    value: String,
    headers: BTreeMap<String, String>,
}

/// The service under test, on its own runtime; stopped (and its topics deleted) on drop.
struct Service {
    runtime: tokio::runtime::Runtime,
    running: Option<Running>,
    shutdown: Shutdown,
    settings: ServiceSettings,
    agent: ureq::Agent,
    /// Where the service listens (kept after it stopped).
    addr: SocketAddr,
    base: String,
    /// Whether this test created topics to delete.
    topics_created: bool,
}

impl Service {
    /// Creates the test's topics, then starts the service.
    fn with_kafka(name: &str, setup: Setup<'_>) -> Service {
        let (config, settings) = settings(name, &setup);
        let runtime = runtime();
        // Freshly created topics can show no partitions in metadata for a moment, which
        // ensure_topics reports as a mismatch: it is idempotent, so ask again.
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = runtime.block_on(tally_runtime::kafka::ensure_topics(&settings.kafka)) {
            assert!(Instant::now() < deadline, "{e} ({NEEDS_KAFKA})");
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut service = Service::start_on(runtime, config, settings);
        service.topics_created = true;
        service
    }

    /// Starts the service without touching Kafka (for an unreachable broker).
    fn without_kafka(name: &str, setup: Setup<'_>) -> Service {
        let (config, settings) = settings(name, &setup);
        Service::start_on(runtime(), config, settings)
    }

    fn start_on(
        runtime: tokio::runtime::Runtime,
        config: Arc<Config>,
        settings: ServiceSettings,
    ) -> Service {
        let shutdown = Shutdown::new();
        let running = runtime
            .block_on(start(config, settings.clone(), shutdown.clone()))
            .unwrap();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Service {
            addr: running.local_addr,
            base: format!("http://{}", running.local_addr),
            runtime,
            running: Some(running),
            shutdown,
            settings,
            agent,
            topics_created: false,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn topic(&self) -> String {
        self.settings.kafka.topic(Topic::Events)
    }

    /// `POST /v1/events` with `Authorization: Bearer <key>` when a key is given.
    fn post(&self, content_type: Option<&str>, key: Option<&str>, body: &str) -> Reply {
        let mut headers = Vec::new();
        if let Some(ct) = content_type {
            headers.push(("content-type", ct.to_owned()));
        }
        if let Some(key) = key {
            headers.push(("authorization", format!("Bearer {key}")));
        }
        self.post_with(&headers, body)
    }

    fn post_with(&self, headers: &[(&str, String)], body: &str) -> Reply {
        let mut request = self.agent.post(&format!("{}/v1/events", self.base));
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        reply(request.send(body).unwrap())
    }

    fn delete(&self, path: &str) -> Reply {
        reply(
            self.agent
                .delete(&format!("{}{path}", self.base))
                .call()
                .unwrap(),
        )
    }

    fn get(&self, path: &str) -> Reply {
        reply(
            self.agent
                .get(&format!("{}{path}", self.base))
                .call()
                .unwrap(),
        )
    }

    /// Everything in the events topic, read from the beginning up to the high
    /// watermarks as they are now (every acknowledged event is below them).
    fn stored(&self) -> Vec<Stored> {
        self.stored_with_tenants()
            .into_iter()
            .map(|(stored, _)| stored)
            .collect()
    }

    /// The records with their `tally.tenant` headers.
    fn stored_with_tenants(&self) -> Vec<(Stored, Option<String>)> {
        (self.records(Topic::Events).into_iter())
            .map(|mut record| {
                let tenant = record.headers.remove("tally.tenant");
                let key = record.key.expect("events are keyed by subject");
                (
                    Stored {
                        key,
                        value: record.value,
                    },
                    tenant,
                )
            })
            .collect()
    }

    /// Everything in one of the pipeline's topics, read from the beginning up to the
    /// high watermarks as they are now.
    fn records(&self, topic: Topic) -> Vec<Record> {
        let topic = self.settings.kafka.topic(topic);
        let consumer: BaseConsumer = tally_runtime::kafka::client_config(&self.settings.kafka)
            .set("group.id", format!("{topic}-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap();
        let partitions: Vec<i32> = metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| p.id())
            .collect();
        assert_eq!(partitions.len(), 2, "{topic}");
        let mut assignment = TopicPartitionList::new();
        let mut remaining = 0;
        for &p in &partitions {
            // A partition nothing was written to may still be electing its leader.
            let deadline = Instant::now() + Duration::from_secs(30);
            let (low, high) = loop {
                match consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)) {
                    Ok(marks) => break marks,
                    Err(e) => assert!(Instant::now() < deadline, "{topic}[{p}]: {e}"),
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            remaining += high - low;
            assignment
                .add_partition_offset(&topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while records.len() < remaining as usize {
            assert!(
                Instant::now() < deadline,
                "read {} of {remaining} records of {topic}",
                records.len()
            );
            if let Some(message) = consumer.poll(Duration::from_millis(200)) {
                let message = message.unwrap();
                let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
                let headers = (message.headers().into_iter())
                    .flat_map(|headers| headers.iter())
                    .map(|h| (h.key.to_owned(), text(h.value.unwrap_or_default())))
                    .collect();
                records.push(Record {
                    key: message.key().map(text),
                    value: text(message.payload().unwrap_or_default()),
                    headers,
                });
            }
        }
        records
    }

    /// Requests shutdown and waits for the service to stop.
    fn stop(&mut self) -> Result<(), IngestError> {
        self.shutdown.request();
        match self.running.take() {
            Some(running) => self.runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), running.wait())
                    .await
                    .expect("the service did not stop within 30 s")
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let stopped = self.stop();
        if self.topics_created {
            let kafka = &self.settings.kafka;
            let names: Vec<String> = [
                Topic::Events,
                Topic::Windows,
                Topic::Rejected,
                Topic::Rated,
                Topic::AggregatorChangelog,
            ]
            .into_iter()
            .map(|t| kafka.topic(t))
            .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            if let Ok(admin) = tally_runtime::kafka::client_config(kafka)
                .create::<AdminClient<DefaultClientContext>>()
            {
                let _ = self
                    .runtime
                    .block_on(admin.delete_topics(&names, &AdminOptions::new()));
            }
        }
        if !std::thread::panicking() {
            stopped.unwrap();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn reply(mut response: ureq::http::Response<ureq::Body>) -> Reply {
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect();
    Reply {
        status: response.status().as_u16(),
        headers,
        body: response.body_mut().read_to_string().unwrap(),
    }
}

/// A valid event an hour old.
fn event(id: &str, source: &str, subject: &str, tokens: u32) -> String {
    let time = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"{source}","type":"llm.tokens","subject":"{subject}","time":"{time}","data":{{"tokens":{tokens},"model":"gpt-x"}}}}"#
    )
}

fn batch(events: &[&str]) -> String {
    format!("[{}]", events.join(","))
}

const SINGLE: Option<&str> = Some("application/cloudevents+json");
const BATCH: Option<&str> = Some("application/cloudevents-batch+json");
const JSON: Option<&str> = Some("application/json");

fn stored(key: &str, value: &str) -> Stored {
    Stored {
        key: key.to_owned(),
        value: value.to_owned(),
    }
}

fn sorted(mut v: Vec<Stored>) -> Vec<Stored> {
    v.sort();
    v
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_single_event_is_stored_as_sent_keyed_by_its_subject() {
    let service = Service::with_kafka("single", Setup::default());
    // Spaced out and with a trailing newline, as curl -d @file sends it.
    let sent = event("evt-1", "agent", "cust_acme", 1200).replace(",\"", ", \"");
    let reply = service.post(SINGLE, Some(KEY), &format!("{sent}\n"));
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(
        reply.json(),
        json!({"accepted": 1, "rejected": 0, "duplicates": 0,
               "results": [{"index": 0, "id": "evt-1", "status": "accepted"}]})
    );
    // With the tenant of the key that sent it, for audit.
    assert_eq!(
        service.stored_with_tenants(),
        vec![(stored("cust_acme", &sent), Some("platform".to_owned()))]
    );
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn events_keep_to_the_pipelines_partitions_after_some_were_added_to_the_topic() {
    // The client's metadata is refreshed every second, so it sees the added partition
    // at once (by default within five minutes).
    let setup = Setup {
        kafka: "properties = { \"topic.metadata.refresh.interval.ms\" = \"1000\" }",
        ..Setup::default()
    };
    let service = Service::with_kafka("grown", setup);
    let deadline = Instant::now() + Duration::from_secs(30);
    while service.get("/readyz").status != 200 {
        assert!(Instant::now() < deadline, "ingest never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Someone adds a partition to the events topic; the pipeline (its windows and
    // changelog topics, its aggregators' state) still has two.
    let topic = service.topic();
    let admin: AdminClient<DefaultClientContext> =
        tally_runtime::kafka::client_config(&service.settings.kafka)
            .create()
            .unwrap();
    for created in service
        .runtime
        .block_on(admin.create_partitions(&[NewPartitions::new(&topic, 3)], &AdminOptions::new()))
        .unwrap()
    {
        created.unwrap();
    }
    // Past the producer's next metadata refresh (every second here), after which
    // librdkafka's own partitioner would use the third partition.
    std::thread::sleep(Duration::from_secs(3));
    let subjects: Vec<String> = (0..60).map(|n| format!("cust_{n:03}")).collect();
    let events: Vec<String> = (subjects.iter().enumerate())
        .map(|(n, subject)| event(&format!("grown-{n}"), "agent", subject, 1))
        .collect();
    let events: Vec<&str> = events.iter().map(String::as_str).collect();
    let reply = service.post(BATCH, Some(KEY), &batch(&events));
    assert_eq!(reply.status, 202, "{reply:?}");
    // Each on its subject's partition among the pipeline's two, none on the third.
    let consumer: BaseConsumer = tally_runtime::kafka::client_config(&service.settings.kafka)
        .set("group.id", format!("{topic}-reader"))
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..3 {
        assignment
            .add_partition_offset(&topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut placed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while placed.len() < subjects.len() {
        assert!(Instant::now() < deadline, "read {} records", placed.len());
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.unwrap();
            let key = String::from_utf8(message.key().unwrap().to_vec()).unwrap();
            placed.push((key, message.partition()));
        }
    }
    let two = std::num::NonZeroUsize::new(2).unwrap();
    for (subject, partition) in placed {
        let home = tally_runtime::kafka::partition_for_key(subject.as_bytes(), two);
        assert_eq!(partition, home, "{subject}");
    }
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn batches_of_either_content_type_are_stored_event_by_event() {
    let service = Service::with_kafka("batch", Setup::default());
    let first = [
        event("b-1", "agent", "cust_a", 1),
        event("b-2", "agent", "cust_b", 2),
        event("b-3", "billing", "cust_a", 3),
    ];
    let body = format!("[\n  {},\n  {} ,{}\n]", first[0], first[1], first[2]);
    let reply = service.post(BATCH, Some(KEY), &body);
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(
        reply.json(),
        json!({"accepted": 3, "rejected": 0, "duplicates": 0, "results": [
            {"index": 0, "id": "b-1", "status": "accepted"},
            {"index": 1, "id": "b-2", "status": "accepted"},
            {"index": 2, "id": "b-3", "status": "accepted"},
        ]})
    );
    // application/json with an array body is a batch too.
    let second = [
        event("j-1", "agent", "cust_c", 4),
        event("j-2", "agent", "cust_a", 5),
    ];
    let reply = service.post(JSON, Some(KEY), &batch(&[&second[0], &second[1]]));
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(reply.json()["accepted"], 2);
    // And application/json with an object body is one event.
    let third = event("j-3", "agent", "cust_b", 6);
    let reply = service.post(JSON, Some(KEY), &third);
    assert_eq!(reply.status, 202, "{reply:?}");

    assert_eq!(
        sorted(service.stored()),
        sorted(vec![
            stored("cust_a", &first[0]),
            stored("cust_b", &first[1]),
            stored("cust_a", &first[2]),
            stored("cust_c", &second[0]),
            stored("cust_a", &second[1]),
            stored("cust_b", &third),
        ])
    );
}

/// The headers of a binary-mode request for `llm.tokens` of `cust_acme`, sent with
/// [`AGENT_KEY`], as the CloudEvents SDKs send an event by default.
fn binary_headers(id: &str, source: &str, time: &str) -> Vec<(&'static str, String)> {
    vec![
        ("authorization", format!("Bearer {AGENT_KEY}")),
        ("ce-specversion", "1.0".to_owned()),
        ("ce-id", id.to_owned()),
        ("ce-source", source.to_owned()),
        ("ce-type", "llm.tokens".to_owned()),
        ("ce-subject", "cust_acme".to_owned()),
        ("ce-time", time.to_owned()),
        ("content-type", "application/json".to_owned()),
    ]
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_single_event_sent_in_the_wrong_mode_is_told_how_to_send_it() {
    let service = Service::with_kafka("modes", Setup::default());
    let reason = |reply: &Reply| {
        assert_eq!(reply.status, 422, "{reply:?}");
        reply.json()["results"][0]["reason"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // Binary-mode headers with the structured content type: the body is the event.
    let headers = [
        ("content-type", "application/cloudevents+json".to_owned()),
        ("authorization", format!("Bearer {KEY}")),
        ("ce-specversion", "1.0".to_owned()),
        ("ce-id", "w-1".to_owned()),
    ];
    let reply = service.post_with(&headers, r#"{"tokens":5,"model":"gpt-x"}"#);
    assert!(
        reason(&reply).ends_with("; the ce- headers were not read: with Content-Type application/cloudevents+json the body is the whole event; for binary mode send the data as application/json"),
        "{reply:?}"
    );
    // A batch sent as one event.
    let body = batch(&[&event("w-2", "agent", "cust_a", 1)]);
    let reply = service.post(SINGLE, Some(KEY), &body);
    assert_eq!(
        reason(&reply),
        "expected a CloudEvent JSON object; the body is a JSON array: send a batch as application/cloudevents-batch+json (or application/json)"
    );
    assert!(service.stored().is_empty());
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn an_event_in_binary_mode_is_checked_and_stored_structured() {
    let service = Service::with_kafka("binary", Setup::default());
    let time = "2026-11-24T10:15:00Z";
    let reply = service.post_with(
        &binary_headers("bin-1", "agent", time),
        "{\"tokens\": 1200}",
    );
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(
        reply.json(),
        json!({"accepted": 1, "rejected": 0, "duplicates": 0,
               "results": [{"index": 0, "id": "bin-1", "status": "accepted"}]})
    );
    // The attributes are checked as a structured event's are, by the same names.
    let reply = service.post_with(
        &binary_headers("bin-2", "agent", "yesterday"),
        "{\"tokens\": 1}",
    );
    assert_eq!(reply.status, 422, "{reply:?}");
    assert_eq!(reply.json()["results"][0]["id"], "bin-2");
    assert_eq!(reply.json()["results"][0]["field"], "time");
    let reply = service.post_with(&binary_headers("bin-3", "agent", time), "{\"tokens\": -1}");
    assert_eq!(reply.status, 422, "{reply:?}");
    assert_eq!(reply.json()["results"][0]["code"], "negative_value");
    // The key's sources hold for ce-source too.
    let reply = service.post_with(&binary_headers("bin-4", "billing", time), "{\"tokens\": 1}");
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(reply.json()["error"], "forbidden_source");
    // A body that is not JSON, or data of another type, stores nothing.
    let reply = service.post_with(&binary_headers("bin-5", "agent", time), "tokens=1");
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.json()["error"], "invalid_data");
    let mut text = binary_headers("bin-6", "agent", time);
    text.pop();
    text.push(("content-type", "text/plain".to_owned()));
    let reply = service.post_with(&text, "1200");
    assert_eq!(reply.status, 415, "{reply:?}");
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("binary-mode"),
        "{reply:?}"
    );
    let mut twice = binary_headers("bin-7", "agent", time);
    twice.push(("ce-id", "bin-8".to_owned()));
    let reply = service.post_with(&twice, "{\"tokens\": 1}");
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.json()["error"], "invalid_header");

    assert_eq!(
        service.stored(),
        vec![stored(
            "cust_acme",
            r#"{"id":"bin-1","source":"agent","specversion":"1.0","subject":"cust_acme","time":"2026-11-24T10:15:00Z","type":"llm.tokens","datacontenttype":"application/json","data":{"tokens": 1200}}"#
        )]
    );
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_mixed_batch_stores_its_good_events_and_names_each_bad_field() {
    let service = Service::with_kafka("mixed", Setup::default());
    let good_1 = event("m-1", "agent", "cust_a", 10);
    let no_time = r#"{"specversion":"1.0","id":"m-2","source":"agent","type":"llm.tokens","subject":"cust_a","data":{"tokens":1}}"#;
    let negative = event("m-3", "agent", "cust_a", 1).replace("\"tokens\":1", "\"tokens\":-4");
    let good_2 = event("m-5", "agent", "cust_b", 20);
    // Valid, but of a type no meter reads: stored, with a warning.
    let misspelt = event("m-6", "agent", "cust_b", 1).replace("llm.tokens", "llm.token");
    // Valid, but for no customer of the price book: stored, with a warning.
    let stranger = event("m-7", "agent", "cust-b", 1);
    // Valid, but further back than the dedupe horizon: stored, with a warning.
    let ancient = r#"{"specversion":"1.0","id":"m-8","source":"agent","type":"llm.tokens","subject":"cust_a","time":"2020-01-01T00:00:00Z","data":{"tokens":3,"model":"gpt-x"}}"#;
    let body = batch(&[
        &good_1, no_time, &negative, "7", &good_2, &misspelt, &stranger, ancient,
    ]);
    let reply = service.post(BATCH, Some(KEY), &body);
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(
        reply.json(),
        json!({"accepted": 5, "rejected": 3, "duplicates": 0, "results": [
            {"index": 0, "id": "m-1", "status": "accepted"},
            {"index": 1, "id": "m-2", "status": "rejected", "field": "time",
             "code": "missing_field", "reason": "required field is missing or null"},
            {"index": 2, "id": "m-3", "status": "rejected", "field": "data.tokens",
             "code": "negative_value", "reason": "usage must not be negative (only a sum meter with allow_negative_values = true takes corrections)"},
            {"index": 3, "status": "rejected", "field": "event",
             "code": "not_an_object", "reason": "expected a CloudEvent JSON object"},
            {"index": 4, "id": "m-5", "status": "accepted"},
            {"index": 5, "id": "m-6", "status": "accepted", "warning": "unmetered_type",
             "reason": "no meter reads type \"llm.token\": the event is stored, but bills nothing unless such a meter is added and the events are read again (a misspelt type?)"},
            {"index": 6, "id": "m-7", "status": "accepted", "warning": "unknown_customer",
             "reason": "subject \"cust-b\" is no customer of the price book (did you mean \"cust_b\"?): the event is stored, and billed only if the customer is added while its month is open"},
            {"index": 7, "id": "m-8", "status": "accepted", "warning": "too_late",
             "reason": "time 2020-01-01T00:00:00Z is more than the dedupe horizon (35d) ago: the event is stored, and billed only if the aggregator reads it within the dedupe horizon of the newest event of its partition: once live usage has reached that partition it refuses it as too_late and bills nothing (a backfill of old months sent before live usage, or alone, is billed; else bill such usage with tally rate, or send usage sooner)"},
        ]})
    );
    assert_eq!(
        sorted(service.stored()),
        sorted(vec![
            stored("cust_a", &good_1),
            stored("cust_b", &good_2),
            stored("cust_b", &misspelt),
            stored("cust-b", &stranger),
            stored("cust_a", ancient)
        ])
    );
    // The refused events are kept in the rejected topic as sent, with the answer's
    // reasons, their index in the request and the tenant that sent them.
    let kept = |service: &Service| -> Vec<[String; 5]> {
        let mut kept: Vec<[String; 5]> = (service.records(Topic::Rejected).into_iter())
            .map(|r| {
                let header = |name: &str| r.headers.get(name).cloned().unwrap_or_default();
                [
                    header("tally.source.request_index"),
                    r.value.clone(),
                    header("tally.error.code"),
                    header("tally.error.field"),
                    header("tally.tenant"),
                ]
            })
            .collect();
        kept.sort();
        kept
    };
    let copy = |index: &str, value: &str, code: &str, field: &str| {
        [index, value, code, field, "platform"].map(str::to_owned)
    };
    eventually("the refused events are in the rejected topic", || {
        kept(&service).len() == 3
    });
    assert_eq!(
        kept(&service),
        [
            copy("1", no_time, "missing_field", "time"),
            copy("2", &negative, "negative_value", "data.tokens"),
            copy("3", "7", "not_an_object", "event"),
        ]
    );
    let reasons: Vec<String> = (service.records(Topic::Rejected).into_iter())
        .map(|r| r.headers["tally.error.reason"].clone())
        .collect();
    assert!(
        reasons.contains(&"required field is missing or null".to_owned()),
        "{reasons:?}"
    );
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_repeated_source_and_id_in_one_batch_is_stored_once_and_other_content_refused() {
    let service = Service::with_kafka("duplicates", Setup::default());
    let original = event("d-1", "agent", "cust_a", 1);
    let other = event("d-2", "agent", "cust_a", 2);
    let resent = original.clone();
    let conflicting = event("d-1", "agent", "cust_a", 99);
    let same_id_other_source = event("d-1", "billing", "cust_a", 1);
    let body = batch(&[
        &original,
        &other,
        &resent,
        &conflicting,
        &same_id_other_source,
    ]);
    let reply = service.post(JSON, Some(KEY), &body);
    assert_eq!(reply.status, 202, "{reply:?}");
    // The resend with other content is a conflict: the first counts, as the aggregator
    // would have it, and the sender is told.
    assert_eq!(
        reply.json(),
        json!({"accepted": 3, "rejected": 1, "duplicates": 1, "results": [
            {"index": 0, "id": "d-1", "status": "accepted"},
            {"index": 1, "id": "d-2", "status": "accepted"},
            {"index": 2, "id": "d-1", "status": "duplicate_in_batch", "duplicate_of": 0},
            {"index": 3, "id": "d-1", "status": "rejected", "field": "id", "code": "conflict",
             "reason": "event 0 of this request has this source and id and other content; the first one counts: a resend cannot change it (send the difference as a new event, with a new id; a negative difference needs a sum meter with allow_negative_values = true)"},
            {"index": 4, "id": "d-1", "status": "accepted"},
        ]})
    );
    assert_eq!(
        sorted(service.stored()),
        sorted(vec![
            stored("cust_a", &original),
            stored("cust_a", &other),
            stored("cust_a", &same_id_other_source),
        ])
    );
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_single_invalid_event_is_refused_with_422_and_its_reason() {
    let service = Service::with_kafka("invalid", Setup::default());
    let future = r#"{"specversion":"1.0","id":"f-1","source":"agent","type":"llm.tokens","subject":"cust_a","time":"2999-01-01T00:00:00Z","data":{"tokens":1}}"#;
    let reply = service.post(SINGLE, Some(KEY), future);
    assert_eq!(reply.status, 422, "{reply:?}");
    let body = reply.json();
    assert_eq!(
        (body["accepted"].clone(), body["rejected"].clone()),
        (json!(0), json!(1))
    );
    let result = &body["results"][0];
    assert_eq!(result["id"], "f-1");
    assert_eq!(result["status"], "rejected");
    assert_eq!(result["field"], "time");
    assert_eq!(result["code"], "time_in_future");
    let reply = service.post(JSON, Some(KEY), "{\"id\":");
    assert_eq!(reply.status, 422, "{reply:?}");
    assert_eq!(reply.json()["results"][0]["code"], "invalid_json");
    assert_eq!(service.stored(), vec![]);
    // Kept, to be found where the sender did not keep its answers.
    eventually("the two refused events are in the rejected topic", || {
        service.records(Topic::Rejected).len() == 2
    });
    let mut kept: Vec<(String, String)> = (service.records(Topic::Rejected).into_iter())
        .map(|r| (r.value, r.headers["tally.error.code"].clone()))
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        [
            ("{\"id\":".to_owned(), "invalid_json".to_owned()),
            (future.to_owned(), "time_in_future".to_owned()),
        ]
    );
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn requests_without_a_valid_key_get_401_and_a_bearer_challenge() {
    let service = Service::with_kafka("unauthorized", Setup::default());
    let body = event("u-1", "agent", "cust_a", 1);
    let refused = [
        service.post(SINGLE, None, &body),
        service.post(SINGLE, Some("test-key-any-source-0009"), &body),
        service.post(SINGLE, Some(&KEY[..KEY.len() - 1]), &body),
        service.post_with(
            &[
                ("content-type", "application/cloudevents+json".to_owned()),
                ("authorization", format!("Basic {KEY}")),
            ],
            &body,
        ),
    ];
    // Each says what was wrong, never with the key.
    let why = [
        "no API key was sent",
        "the API key sent is not one of the configured keys (rotated, or mistyped?)",
        "the API key sent is not one of the configured keys (rotated, or mistyped?)",
        "the Authorization header is not `Bearer <key>` (is the `Bearer ` before the key missing?)",
    ];
    for (reply, why) in refused.iter().zip(why) {
        assert_eq!(reply.status, 401, "{reply:?}");
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Bearer realm=\"tally\"")
        );
        assert_eq!(reply.json()["error"], "unauthorized");
        let message = reply.json()["message"].as_str().unwrap().to_owned();
        assert!(message.starts_with(why), "{message}");
        assert!(!reply.body.contains(KEY));
    }
    // The same key in X-Api-Key is accepted.
    let reply = service.post_with(
        &[
            ("content-type", "application/cloudevents+json".to_owned()),
            ("x-api-key", KEY.to_owned()),
        ],
        &body,
    );
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(service.stored(), vec![stored("cust_a", &body)]);
}

/// A refusal answered before the body is read must still leave the connection usable:
/// clients pool connections, and one closed under them loses their next request. Half
/// of each refused body is sent before the rest, so a server that answers without
/// reading it closes the connection with the body unfinished.
#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_connection_stays_usable_after_requests_refused_before_their_body() {
    let service = Service::with_kafka("keep-alive", Setup::default());
    let addr = service.addr();
    let body = event("k-1", "agent", "cust_a", 1);
    let request = |content_type: &str, key: &str, close: bool| {
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )
    };
    let (first_half, second_half) = body.as_bytes().split_at(body.len() / 2);
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    for refused in [
        request("application/cloudevents+json", "not-a-key", false),
        request("text/plain", KEY, false),
    ] {
        // Writes fail once the server has closed the connection; the answers say so.
        let _ = stream
            .write_all(refused.as_bytes())
            .and_then(|()| stream.write_all(first_half));
        std::thread::sleep(Duration::from_millis(200));
        let _ = stream.write_all(second_half);
    }
    let _ = stream
        .write_all(request("application/cloudevents+json", KEY, true).as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()));
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    // Answers follow one another with no line break after a body.
    let statuses: Vec<&str> = answer
        .split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|answer| answer.lines().next())
        .collect();
    assert_eq!(
        statuses,
        [
            "401 Unauthorized",
            "415 Unsupported Media Type",
            "202 Accepted"
        ],
        "{answer}"
    );
    assert_eq!(service.stored(), vec![stored("cust_a", &body)]);
}

/// A refused request whose body is held back for `100 Continue`, or does not come,
/// is answered anyway (at once, or after a short wait), closing the connection.
#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_refused_request_whose_body_does_not_come_is_answered_and_its_connection_closed() {
    let service = Service::with_kafka("held-back", Setup::default());
    let addr = service.addr();
    let head = |extra: &str| {
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/cloudevents+json\r\nAuthorization: Bearer not-a-key\r\nContent-Length: 100\r\n{extra}\r\n"
        )
    };
    for (extra, part_of_body) in [("Expect: 100-continue\r\n", ""), ("", "{\"specversion\"")] {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let sent = Instant::now();
        stream.write_all(head(extra).as_bytes()).unwrap();
        stream.write_all(part_of_body.as_bytes()).unwrap();
        // Ends only once the server closes the connection.
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        if part_of_body.is_empty() {
            // Not waited for: the server's wait for a body is 5 s.
            assert!(
                sent.elapsed() < Duration::from_secs(5),
                "{:?}",
                sent.elapsed()
            );
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
    }
}

/// Clients that hold a connection without sending (nothing, headers a little at a
/// time, a keep-alive connection left idle, a keyed request's body that stops) are cut
/// off: 10 s for headers, 10 s for an admitted body.
#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn idle_and_trickling_clients_are_cut_off_after_the_servers_wait() {
    let service = Service::with_kafka("idle", Setup::default());
    let addr = service.addr();
    let event = event("i-1", "agent", "cust_a", 1);
    let keyed_head = |length: usize| {
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/cloudevents+json\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    // Each client in a thread of its own, so the waits overlap; each returns what it
    // read until the server closed the connection, and when that was.
    let client = |script: Box<dyn FnOnce(&mut TcpStream) + Send>| {
        std::thread::spawn(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(40)))
                .unwrap();
            let opened = Instant::now();
            script(&mut stream);
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).unwrap();
            (
                String::from_utf8_lossy(&answer).into_owned(),
                opened.elapsed(),
            )
        })
    };
    let silent = client(Box::new(|_| {}));
    let trickling = client(Box::new(|stream| {
        for part in ["POST /v1/", "events HTTP/1.1\r\n", "Host: x\r\n"] {
            stream.write_all(part.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_secs(2));
        }
    }));
    let head = keyed_head(event.len());
    let request = format!("{head}{event}");
    let kept_alive = client(Box::new(move |stream| {
        stream.write_all(request.as_bytes()).unwrap();
    }));
    let head = keyed_head(event.len());
    let half = event[..event.len() / 2].to_owned();
    let stalled_body = client(Box::new(move |stream| {
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(half.as_bytes()).unwrap();
    }));

    for (name, client) in [("silent", silent), ("trickling", trickling)] {
        let (answer, after) = client.join().unwrap();
        assert_eq!(answer, "", "{name}");
        assert!(
            (Duration::from_secs(9)..Duration::from_secs(30)).contains(&after),
            "{name}: closed after {after:?}"
        );
    }
    // Answered, then closed once idle for the header wait.
    let (answer, after) = kept_alive.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(20)).contains(&after),
        "closed after {after:?}"
    );
    let (answer, _) = stalled_body.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\":\"body_too_slow\""), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert_eq!(service.stored(), [stored("cust_a", &event)]);
}

/// What the services of this test binary log, as a text log writes it. One global
/// subscriber for all: the services log from their runtimes' threads, and the tests
/// run side by side, so a test finds its own lines by what only it sent.
fn text_log() -> String {
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static CAPTURED: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    let captured = CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        captured
    });
    String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned()
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn refusals_are_logged_with_the_senders_text_quoted_and_403s_once_a_minute_for_each_key() {
    text_log();
    let service = Service::with_kafka("refusals-logged", Setup::default());
    let json = || ("content-type", "application/json".to_owned());
    // A sender's text that would pass for fields of their own, unquoted.
    let agent = "probe-7f3a\" tenant=\"evil";
    let refused = service.post_with(
        &[
            json(),
            (
                "authorization",
                "Bearer not-a-key-of-this-service".to_owned(),
            ),
            ("user-agent", agent.to_owned()),
        ],
        &event("l-1", "agent", "cust_a", 1),
    );
    assert_eq!(refused.status, 401, "{refused:?}");
    let source = "elsewhere-7f3a";
    for i in 0..3 {
        let forbidden = service.post_with(
            &[json(), ("authorization", format!("Bearer {AGENT_KEY}"))],
            &event(&format!("l-{i}"), source, "cust_a", 1),
        );
        assert_eq!(forbidden.status, 403, "{forbidden:?}");
    }
    let log = text_log();
    let lines =
        |needle: &str| -> Vec<&str> { log.lines().filter(|line| line.contains(needle)).collect() };
    let unauthorized = lines("probe-7f3a");
    assert_eq!(unauthorized.len(), 1, "{log}");
    assert!(
        unauthorized[0].contains(r#"user_agent="probe-7f3a\" tenant=\"evil""#),
        "{}",
        unauthorized[0]
    );
    let forbidden = lines(source);
    assert_eq!(forbidden.len(), 1, "logged once a minute: {log}");
    assert!(
        forbidden[0].contains(&format!("source=\"{source}\""))
            && forbidden[0].contains("left_out=0"),
        "{}",
        forbidden[0]
    );
    assert_eq!(service.stored(), vec![]);
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_header_that_decides_who_sends_or_how_the_body_reads_is_refused_when_repeated() {
    let service = Service::with_kafka("repeated", Setup::default());
    let body = event("r-1", "agent", "cust_a", 1);
    let json = || ("content-type", "application/json".to_owned());
    let bearer = |key: &str| ("authorization", format!("Bearer {key}"));
    for (repeated, headers) in [
        (
            "Authorization",
            vec![json(), bearer(KEY), bearer(AGENT_KEY)],
        ),
        (
            "X-Api-Key",
            vec![
                json(),
                ("x-api-key", KEY.to_owned()),
                ("x-api-key", KEY.to_owned()),
            ],
        ),
        (
            "Content-Type",
            vec![
                json(),
                ("content-type", "text/plain".to_owned()),
                bearer(KEY),
            ],
        ),
        (
            "Content-Encoding",
            vec![
                json(),
                ("content-encoding", "identity".to_owned()),
                ("content-encoding", "gzip".to_owned()),
                bearer(KEY),
            ],
        ),
    ] {
        let reply = service.post_with(&headers, &body);
        assert_eq!(reply.status, 400, "{repeated}: {reply:?}");
        assert_eq!(reply.json()["error"], "invalid_header", "{reply:?}");
        let message = reply.json()["message"].as_str().unwrap().to_owned();
        assert!(
            message.starts_with(&format!("header {repeated} is sent more than once")),
            "{message}"
        );
    }
    assert_eq!(service.stored(), vec![]);
    let once = service.post_with(&[json(), bearer(KEY)], &body);
    assert_eq!(once.status, 202, "{once:?}");
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_client_that_stops_reading_its_answers_is_cut_off_after_the_servers_wait() {
    let service = Service::with_kafka("unread", Setup::default());
    let addr = service.addr();
    // Pipelined requests for /metrics, whose answers are far larger than the requests:
    // they fill both sides' socket buffers long before all are answered.
    let requests = 2_000;
    let mut stream = TcpStream::connect(addr).unwrap();
    let mut sender = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        // Blocks once the server, its answers stuck, stops reading requests.
        for _ in 0..requests {
            if sender
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .is_err()
            {
                break;
            }
        }
    });
    // Past ingest's 10 s write timeout, without reading a byte.
    std::thread::sleep(Duration::from_secs(15));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answers = Vec::new();
    // Ends at the server's close: the end of the stream, or a reset.
    let _ = stream.read_to_end(&mut answers);
    let answered = (answers.windows(12))
        .filter(|w| w == b"HTTP/1.1 200")
        .count();
    assert!(
        (1..requests).contains(&answered),
        "{answered} of {requests} answered: the connection was not cut off"
    );
    // Others are served all along.
    drop(served_connection(addr));
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_source_the_key_may_not_use_refuses_the_whole_request_and_stores_nothing() {
    let service = Service::with_kafka("forbidden", Setup::default());
    let allowed = event("s-1", "agent", "cust_a", 1);
    let forbidden = event("s-2", "billing", "cust_a", 1);
    let reply = service.post(BATCH, Some(AGENT_KEY), &batch(&[&allowed, &forbidden]));
    assert_eq!(reply.status, 403, "{reply:?}");
    let body = reply.json();
    assert_eq!(body["error"], "forbidden_source");
    assert_eq!(body["index"], 1);
    assert!(
        body["message"].as_str().unwrap().contains("\"billing\""),
        "{body}"
    );
    let reply = service.post(SINGLE, Some(AGENT_KEY), &forbidden);
    assert_eq!(reply.status, 403, "{reply:?}");
    // A later allowed request lands alone: nothing of the refused ones reached Kafka.
    let reply = service.post(SINGLE, Some(AGENT_KEY), &allowed);
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(service.stored(), vec![stored("cust_a", &allowed)]);
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn bodies_over_the_byte_or_event_limit_get_413_and_store_nothing() {
    let service = Service::with_kafka(
        "too-large",
        Setup {
            ingest: "max_body_bytes = 2048\nmax_batch_events = 3",
            ..Setup::default()
        },
    );
    let e = |i: u32| event(&format!("l-{i}"), "agent", "cust_a", i);
    // Announced by Content-Length.
    let big = batch(
        &(0..20)
            .map(e)
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(big.len() > 2048);
    let reply = service.post(BATCH, Some(KEY), &big);
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(reply.json()["error"], "payload_too_large");
    // The body is left unread, so the connection ends with the answer.
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(reply.json()["message"]
        .as_str()
        .unwrap()
        .contains("2048 bytes"));

    // A client that sends its whole body before it reads the answer (Python's urllib)
    // gets the 413 too, rather than a connection reset under it, which it would retry.
    let bigger = format!("[{}]", vec![e(1); 60_000].join(","));
    assert!(bigger.len() > 8 << 20);
    let reply = post_whole_then_read(service.addr(), KEY, bigger.as_bytes());
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");

    // Streamed in chunks with no Content-Length: cut off once past the limit.
    let reply = post_chunked(service.addr(), KEY, big.as_bytes());
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("payload_too_large"), "{reply}");

    // Small enough, but more events than a batch may hold.
    let four = [e(1), e(2), e(3), e(4)];
    let body = batch(&four.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(body.len() < 2048);
    let reply = service.post(BATCH, Some(KEY), &body);
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(
        reply.json(),
        json!({"error": "too_many_events",
               "message": "the batch holds 4 events, more than the 3 allowed in one request; split it"})
    );
    assert_eq!(service.stored(), vec![]);
}

/// Sends `body` with its `Content-Length` on a raw connection, all of it before reading
/// anything; returns the whole answer as text, or what went wrong.
fn post_whole_then_read(addr: SocketAddr, key: &str, body: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/cloudevents-batch+json\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    if let Err(e) = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
    {
        return format!("sending failed: {e}");
    }
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => String::from_utf8_lossy(&answer).into_owned(),
        Err(e) => format!(
            "reading failed: {e}; read {:?}",
            String::from_utf8_lossy(&answer)
        ),
    }
}

/// Sends `body` with `Transfer-Encoding: chunked` on a raw connection; returns the
/// whole answer as text.
fn post_chunked(addr: SocketAddr, key: &str, body: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    for chunk in body.chunks(500) {
        // The server may answer and close before the whole body is sent.
        if stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .and_then(|()| stream.write_all(chunk))
            .and_then(|()| stream.write_all(b"\r\n"))
            .is_err()
        {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn other_content_types_get_415() {
    let service = Service::with_kafka("media-type", Setup::default());
    let body = event("c-1", "agent", "cust_a", 1);
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-ndjson"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let reply = service.post(content_type, Some(KEY), &body);
        assert_eq!(reply.status, 415, "{content_type:?}: {reply:?}");
        assert_eq!(reply.json()["error"], "unsupported_media_type");
    }
    // JSON is UTF-8, and a compressed body is not read as JSON.
    let key = ("authorization", format!("Bearer {KEY}"));
    let utf16 = service.post_with(
        &[
            (
                "content-type",
                "application/json; charset=utf-16".to_owned(),
            ),
            key.clone(),
        ],
        &body,
    );
    assert_eq!(utf16.status, 415, "{utf16:?}");
    let gzip = service.post_with(
        &[
            ("content-type", "application/json".to_owned()),
            ("content-encoding", "gzip".to_owned()),
            key.clone(),
        ],
        &body,
    );
    assert_eq!(gzip.status, 415, "{gzip:?}");
    assert_eq!(gzip.header("accept-encoding"), Some("identity"));
    assert!(
        gzip.json()["message"]
            .as_str()
            .unwrap()
            .contains("Content-Encoding \"gzip\""),
        "{gzip:?}"
    );
    assert_eq!(service.stored(), vec![]);
    // Identity is no coding at all.
    let identity = service.post_with(
        &[
            ("content-type", "application/json".to_owned()),
            ("content-encoding", "identity".to_owned()),
            key,
        ],
        &body,
    );
    assert_eq!(identity.status, 202, "{identity:?}");
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn an_event_larger_than_a_kafka_message_is_rejected_as_such_not_retried() {
    let service = Service::with_kafka("huge-event", Setup::default());
    // Within the 1 MiB body limit, past librdkafka's 1,000,000-byte message limit.
    let huge = event("h-1", "agent", "cust_a", 1).replacen(
        '{',
        &format!("{{\"note\":\"{}\",", "x".repeat(1_000_000)),
        1,
    );
    let small = event("h-2", "agent", "cust_a", 2);
    let reply = service.post(SINGLE, Some(KEY), &huge);
    assert_eq!(reply.status, 422, "{}", reply.body);
    let reply = service.post(BATCH, Some(KEY), &batch(&[&huge, &small]));
    assert_eq!(reply.status, 202, "{}", reply.body);
    let body = reply.json();
    assert_eq!(
        (body["accepted"].clone(), body["rejected"].clone()),
        (json!(1), json!(1))
    );
    let rejected = &body["results"][0];
    assert_eq!(rejected["code"], "event_too_large", "{rejected}");
    assert!(
        rejected["reason"]
            .as_str()
            .unwrap()
            .contains("message.max.bytes"),
        "{rejected}"
    );
    assert_eq!(service.stored(), vec![stored("cust_a", &small)]);

    // At the limit, the tenant header counts: an event Kafka could not take with the
    // header of a long tenant name is rejected as too large (not answered 503 on every
    // retry), and one just within it is stored.
    let sized = |id: &str, bytes: usize| {
        let plain = event(id, "agent", "cust_b", 1);
        let filler = bytes - plain.len() - "cust_b".len() - "\"note\":\"\",".len();
        plain.replacen('{', &format!("{{\"note\":\"{}\",", "x".repeat(filler)), 1)
    };
    // librdkafka's limit, less the framing ingest allows for (64) and the header.
    let limit = 1_000_000 - 64 - ("tally.tenant".len() + LONG_TENANT.len() + 15);
    let over = sized("h-3", limit + 1);
    let reply = service.post(SINGLE, Some(LONG_TENANT_KEY), &over);
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert_eq!(reply.json()["results"][0]["code"], "event_too_large");
    let within = sized("h-4", limit);
    let reply = service.post(SINGLE, Some(LONG_TENANT_KEY), &within);
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(
        sorted(service.stored()),
        sorted(vec![stored("cust_a", &small), stored("cust_b", &within)])
    );
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn bodies_that_hold_no_events_get_400() {
    let service = Service::with_kafka("bad-request", Setup::default());
    for (content_type, body, error) in [
        (BATCH, "[]", "empty_batch"),
        (JSON, " [ ] ", "empty_batch"),
        (JSON, "", "empty_body"),
        (SINGLE, "  \n", "empty_body"),
        (BATCH, "{}", "not_an_array"),
        (BATCH, "[{\"id\":1},", "invalid_batch"),
    ] {
        let reply = service.post(content_type, Some(KEY), body);
        assert_eq!(reply.status, 400, "{body:?}: {reply:?}");
        assert_eq!(reply.json()["error"], error, "{body:?}");
    }
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_key_over_its_rate_limit_gets_429_with_retry_after() {
    let service = Service::with_kafka(
        "rate-limit",
        Setup {
            ingest: "rate_limit_per_second = 1\nrate_limit_burst = 2",
            ..Setup::default()
        },
    );
    // Any request counts, whatever its answer: these are refused as empty, quickly.
    for _ in 0..2 {
        assert_eq!(service.post(BATCH, Some(KEY), "[]").status, 400);
    }
    let reply = service.post(BATCH, Some(KEY), "[]");
    assert_eq!(reply.status, 429, "{reply:?}");
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.json()["error"], "rate_limited");
    // Another key has its own bucket.
    assert_eq!(service.post(BATCH, Some(AGENT_KEY), "[]").status, 400);
    // Waiting as long as Retry-After said is enough to be admitted again.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(service.post(BATCH, Some(KEY), "[]").status, 400);
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn health_and_readiness_answer_200_with_kafka_up() {
    let service = Service::with_kafka("health", Setup::default());
    let health = service.get("/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    eventually("ready", || {
        let ready = service.get("/readyz");
        ready.status == 200 && ready.body == "ready\n"
    });
}

#[test]
fn wrong_paths_and_methods_are_answered_in_json_with_what_to_do() {
    let service = Service::without_kafka("wrong_route", Setup::default());
    let missing = service.get("/v1/event");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("content-type"), Some("application/json"));
    assert_eq!(missing.json()["error"], "not_found");
    assert!(missing.json()["message"]
        .as_str()
        .unwrap()
        .contains("POST /v1/events"));

    let wrong = service.get("/v1/events");
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.header("allow"), Some("POST"));
    assert_eq!(wrong.json()["error"], "method_not_allowed");
    let wrong = service.delete("/healthz");
    assert_eq!(
        (wrong.status, wrong.header("allow")),
        (405, Some("GET,HEAD"))
    );
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn metrics_count_requests_events_and_acks_with_bounded_labels() {
    let service = Service::with_kafka("metrics", Setup::default());
    let good = event("x-1", "agent", "cust_secret_customer", 1);
    let no_time = r#"{"specversion":"1.0","id":"x-2","source":"agent","type":"llm.tokens","subject":"cust_a","data":{"tokens":1}}"#;
    let body = batch(&[&good, no_time, &good, &event("x-3", "agent", "cust_a", 2)]);
    assert_eq!(service.post(BATCH, Some(KEY), &body).status, 202);
    assert_eq!(service.post(BATCH, None, &body).status, 401);
    assert_eq!(service.get("/healthz").status, 200);
    assert_eq!(service.get("/v1/event").status, 404);

    let metrics = service.get("/metrics");
    assert_eq!(metrics.status, 200);
    let text = metrics.body;
    for line in [
        r#"tally_http_requests_total{route="/v1/events",status="202"} 1"#,
        r#"tally_http_requests_total{route="/v1/events",status="401"} 1"#,
        r#"tally_http_requests_total{route="/healthz",status="200"} 1"#,
        // A wrong path, counted without it.
        r#"tally_http_requests_total{route="unmatched",status="404"} 1"#,
        // Refusals not answered yet are there at zero, so a sender's first ones count
        // in increase().
        r#"tally_http_requests_total{route="/v1/events",status="403"} 0"#,
        r#"tally_http_requests_total{route="/v1/events",status="405"} 0"#,
        r#"tally_http_request_duration_seconds_count{route="/v1/events"} 2"#,
        r#"tally_ingest_events_total{outcome="accepted"} 2"#,
        r#"tally_ingest_events_total{outcome="duplicate_in_batch"} 1"#,
        r#"tally_ingest_events_total{outcome="rejected"} 1"#,
        r#"tally_ingest_rejected_events_total{reason="missing_field"} 1"#,
        // cust_secret_customer is no customer of the price book; its repeat is not
        // counted twice.
        r#"tally_ingest_unbilled_events_total{reason="unknown_customer"} 1"#,
        r#"tally_ingest_unbilled_events_total{reason="not_priced"} 0"#,
        "tally_ingest_kafka_produce_duration_seconds_count 1",
        "tally_ingest_rejected_copies_lost_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    for secret in [
        KEY,
        "platform",
        "cust_secret_customer",
        "x-1",
        "/v1/event\"",
    ] {
        assert!(!text.contains(secret), "{secret} appears in the metrics");
    }
}

#[test]
fn every_route_of_the_openapi_document_is_served() {
    let document: Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    // Kafka need not be up: an unreachable broker still serves every route.
    let service = Service::without_kafka(
        "openapi",
        Setup {
            brokers: Some("127.0.0.1:1"),
            ..Setup::default()
        },
    );
    let paths = document["paths"].as_object().unwrap();
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    documented.sort_unstable();
    let mut served = ROUTES.to_vec();
    served.sort_unstable();
    assert_eq!(documented, served);
    // What each route answers with Kafka away and no API key, and that the document
    // lists that answer.
    let expected = |path: &str| match path {
        "/healthz" | "/metrics" => 200,
        "/readyz" => 503,
        "/v1/events" => 401,
        other => panic!("no expected status for {other}"),
    };
    for (path, operations) in paths {
        for (method, operation) in operations.as_object().unwrap() {
            let reply = match method.as_str() {
                "get" => service.get(path),
                "post" => service.post(SINGLE, None, "{}"),
                other => panic!("{path}: unexpected method {other}"),
            };
            assert_eq!(reply.status, expected(path), "{method} {path}: {reply:?}");
            let status = reply.status.to_string();
            assert!(
                operation["responses"].get(&status).is_some(),
                "{method} {path} answered {status}, which its responses do not list"
            );
        }
    }
}

#[test]
fn kafka_not_acknowledging_gets_503_with_retry_after_and_not_ready() {
    let mut service = Service::without_kafka(
        "unavailable",
        Setup {
            brokers: Some("127.0.0.1:1"),
            kafka: r#"properties = { "message.timeout.ms" = "1000" }"#,
            ..Setup::default()
        },
    );
    let started = Instant::now();
    let reply = service.post(SINGLE, Some(KEY), &event("k-1", "agent", "cust_a", 1));
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(reply.header("retry-after"), Some("5"));
    let body = reply.json();
    assert_eq!(body["error"], "kafka_unavailable");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("Nothing from this request is guaranteed to be stored"),
        "{message}"
    );
    let ready = service.get("/readyz");
    assert_eq!(ready.status, 503, "{ready:?}");
    // Once readiness has found Kafka away (twice in a row), requests are not made to
    // wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let reply = loop {
        let started = Instant::now();
        let reply = service.post(SINGLE, Some(KEY), &event("k-2", "agent", "cust_a", 1));
        assert_eq!(reply.status, 503, "{reply:?}");
        if started.elapsed() < Duration::from_millis(500) {
            break reply;
        }
        assert!(Instant::now() < deadline, "every 503 waited for Kafka");
    };
    assert_eq!(reply.header("retry-after"), Some("5"));
    let message = reply.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message
            .starts_with("not sent, as Kafka cannot be used: Kafka at 127.0.0.1:1 does not answer"),
        "{message}"
    );
    // An invalid event is still answered, and its copy, which Kafka cannot keep in
    // the rejected topic, counted as lost.
    let invalid = service.post(SINGLE, Some(KEY), r#"{"specversion":"1.0"}"#);
    assert_eq!(invalid.status, 422, "{invalid:?}");
    let metrics = service.get("/metrics").body;
    assert!(
        metrics
            .lines()
            .any(|l| l == "tally_ingest_rejected_copies_lost_total 1"),
        "{metrics}"
    );
    // Shutdown flushes what is left and returns.
    service.stop().unwrap();
    assert!(TcpStream::connect(service.addr()).is_err());
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn with_the_events_topic_missing_ingest_is_not_ready_refuses_with_503_and_creates_nothing() {
    // Kafka answers, but nobody made Tally's topics.
    let service = Service::without_kafka("no_topic", Setup::default());
    let topic = service.topic();
    let missing = format!(
        "topic {topic} does not exist on {}: start the aggregator or the rater once (they create Tally's topics), or create them as the README says",
        brokers()
    );
    eventually("readiness names the missing topic", || {
        let ready = service.get("/readyz");
        ready.status == 503 && ready.body.contains(&missing)
    });
    // Once readiness has found it missing twice in a row, requests are refused with
    // that reason, nothing sent.
    eventually("requests are refused with the probe's reason", || {
        let reply = service.post(SINGLE, Some(KEY), &event("t-1", "agent", "cust_a", 1));
        assert_eq!(reply.status, 503, "{reply:?}");
        reply.json()["message"].as_str().is_some_and(|m| {
            m.starts_with(&format!("not sent, as Kafka cannot be used: {missing}"))
        })
    });
    // Neither the probes nor the requests made the topic.
    let consumer: BaseConsumer = tally_runtime::kafka::client_config(&service.settings.kafka)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .unwrap();
    assert!(
        (metadata.topics().iter()).all(|t| t.name() != topic || t.partitions().is_empty()),
        "{topic} was created"
    );
}

/// A connection to `addr` on which the service has answered a `GET /healthz`: one it
/// has accepted and serves, kept alive for the next request.
fn served_connection(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0; 256];
    while !answer.ends_with(b"ok\n") {
        let read = stream.read(&mut buffer).unwrap();
        assert!(read > 0, "closed: {:?}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buffer[..read]);
    }
    stream
}

/// Waits up to 30 s until `check` holds, or fails saying what did not happen.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_batch_the_producers_queue_cannot_hold_gets_503_and_later_requests_are_stored() {
    // A queue of 5 events: a batch of 20 cannot all be handed to the producer.
    let service = Service::with_kafka(
        "full-queue",
        Setup {
            kafka: r#"properties = { "queue.buffering.max.messages" = "5" }"#,
            ..Setup::default()
        },
    );
    let events: Vec<String> = (0..20)
        .map(|i| event(&format!("q-{i}"), "agent", "cust_a", i))
        .collect();
    let all: Vec<&str> = events.iter().map(String::as_str).collect();
    let reply = service.post(BATCH, Some(KEY), &batch(&all));
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.header("retry-after"), Some("5"));
    let body = reply.json();
    assert_eq!(body["error"], "kafka_unavailable");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("Kafka refused to queue an event"),
        "{message}"
    );
    assert!(message.contains("Queue full"), "{message}");
    assert!(
        message.contains("retry the whole request later"),
        "{message}"
    );
    // Once the events queued before the refusal are delivered, a request the queue
    // holds is stored; a client retrying after Retry-After gets there.
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let reply = service.post(BATCH, Some(KEY), &batch(&all[15..]));
        if reply.status != 503 || Instant::now() > deadline {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(reply.json()["accepted"], 5);
    let in_topic = service.stored();
    for sent in &events[15..] {
        assert!(in_topic.contains(&stored("cust_a", sent)), "{sent} stored");
    }
}

#[test]
fn a_taken_port_fails_at_start_and_says_which() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let (config, mut settings) = settings("taken", &Setup::default());
    settings.ingest.listen = listen.parse().unwrap();
    let error = runtime()
        .block_on(start(config, settings, Shutdown::new()))
        .unwrap_err();
    assert!(matches!(error, IngestError::Bind(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&listen), "{message}");
    assert!(message.contains("the ingest API"), "{message}");
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn a_client_that_stalls_mid_request_does_not_hold_up_shutdown() {
    // Requests get the 1 s acknowledgement timeout, its 2 s grace and 10 s for a body.
    let mut service = Service::with_kafka(
        "stalled",
        Setup {
            kafka: r#"properties = { "message.timeout.ms" = "1000" }"#,
            ..Setup::default()
        },
    );
    let sent = event("s-1", "agent", "cust_a", 1);
    // The topic was just created: its partition may take longer than this test's 1 s
    // timeout to take a first write (503), which is not what is tested here.
    eventually("a first write stored", || {
        let status = service.post(SINGLE, Some(KEY), &sent).status;
        assert!(status == 202 || status == 503, "{status}");
        status == 202
    });
    // Headers begun, never finished; and a keyed request whose body stops halfway; each
    // on a connection the service has served a request on, so it holds it.
    let mut half_headers = served_connection(service.addr());
    half_headers
        .write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut half_body = served_connection(service.addr());
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 500\r\n\r\n{{\"specversion\""
    );
    half_body.write_all(head.as_bytes()).unwrap();
    // Time for the service to read what was written, on connections it is serving.
    std::thread::sleep(Duration::from_millis(300));
    // `stop` fails the test if the service is not down within 30 s.
    let started = Instant::now();
    service.stop().unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "the open requests were not given their 8 s: {:?}",
        started.elapsed()
    );
    assert!(TcpStream::connect(service.addr()).is_err());
    // A send answered 503 may have been stored all the same: the same record again.
    let kept = service.stored();
    assert!(
        !kept.is_empty() && kept.iter().all(|k| *k == stored("cust_a", &sent)),
        "{kept:?}"
    );
}

#[test]
#[ignore = "needs Kafka: scripts/services/up.sh kafka"]
fn shutdown_answers_what_was_sent_then_stops_listening() {
    let mut service = Service::with_kafka("shutdown", Setup::default());
    let sent = event("z-1", "agent", "cust_a", 1);
    assert_eq!(service.post(SINGLE, Some(KEY), &sent).status, 202);
    let addr = service.addr();
    service.stop().unwrap();
    assert!(
        TcpStream::connect(addr).is_err(),
        "still listening on {addr}"
    );
    assert_eq!(service.stored(), vec![stored("cust_a", &sent)]);
}
