//! A streaming pipeline under test: real `tally serve` processes on the real Kafka and
//! ClickHouse that `scripts/services/up.sh` starts, each test in its own topics
//! (a topic prefix), consumer groups and ClickHouse database.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;
use tally_schemas::config::Config;

pub const BROKERS: &str = "127.0.0.1:9092";
pub const PARTITIONS: u32 = 4;

/// The partition of a pipeline's topics that holds `customer`'s events and lines.
pub fn partition_of(customer: &str) -> i32 {
    let partitions = std::num::NonZeroUsize::new(PARTITIONS as usize).unwrap();
    tally_runtime::kafka::partition_for_key(customer.as_bytes(), partitions)
}

pub fn clickhouse_url() -> String {
    std::env::var("TALLY_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

/// Tests that run side by side at most, whatever the test harness's thread count (the
/// machine's cores): the servers share the machine with them, and the tests' waits are
/// sized for this many.
const SIDE_BY_SIDE: usize = 2;

/// Who holds the servers the tests share. Each test bills in topics and a database of
/// its own, so most run side by side ([`shared`]); one that stops or restarts a
/// server, or whose timing a busy machine would change, runs alone ([`alone`]), and
/// is let in before any more shared ones.
#[derive(Debug)]
struct Servers {
    shared: usize,
    alone: bool,
    waiting_alone: usize,
}

static SERVERS: Mutex<Servers> = Mutex::new(Servers {
    shared: 0,
    alone: false,
    waiting_alone: 0,
});
static SERVERS_CHANGED: Condvar = Condvar::new();

/// A test's hold on the servers, let go when it ends (or fails).
#[must_use]
#[derive(Debug)]
pub struct ServersHeld {
    alone: bool,
}

impl Drop for ServersHeld {
    fn drop(&mut self) {
        let mut servers = servers();
        match self.alone {
            true => servers.alone = false,
            false => servers.shared -= 1,
        }
        SERVERS_CHANGED.notify_all();
    }
}

fn servers() -> MutexGuard<'static, Servers> {
    SERVERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until `ready` holds of the servers, then takes them as `take` says.
fn hold(ready: fn(&Servers) -> bool, take: fn(&mut Servers)) {
    let mut servers = servers();
    while !ready(&servers) {
        servers = (SERVERS_CHANGED.wait(servers)).unwrap_or_else(|e| e.into_inner());
    }
    take(&mut servers);
}

/// Held by a test that leaves the servers running and others' runs alone.
pub fn shared() -> ServersHeld {
    hold(
        |s| !s.alone && s.waiting_alone == 0 && s.shared < SIDE_BY_SIDE,
        |s| s.shared += 1,
    );
    ServersHeld { alone: false }
}

/// Held by a test that stops or restarts a server, loads the machine on its own (a
/// long run of its own), or waits out Kafka's timeouts of a frozen process: no other
/// test runs meanwhile.
pub fn alone() -> ServersHeld {
    servers().waiting_alone += 1;
    hold(
        |s| !s.alone && s.shared == 0,
        |s| {
            s.waiting_alone -= 1;
            s.alone = true;
        },
    );
    ServersHeld { alone: true }
}

/// A Kafka record: key, payload, headers.
pub type Record = (Vec<u8>, Vec<u8>, BTreeMap<String, String>);

/// One line of `invoice_lines`, as finance reads it.
pub type Line = (String, String, String, String, String);

pub struct Pipeline {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub database: String,
    pub config: PathBuf,
    pub events: PathBuf,
    pub period: &'static str,
    /// The started services by name; behind a lock so a test can start and kill them
    /// while another thread produces.
    children: Mutex<BTreeMap<String, Child>>,
    producer: BaseProducer,
}

impl Pipeline {
    /// A generated month (October 2026) of `events` events of `customers` customers,
    /// priced by the generated price book plus `extra` TOML, with the topics created.
    pub fn new(name: &str, events: u64, customers: u32, extra: &str) -> Pipeline {
        let dir = tempfile::tempdir().unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let unique = format!("{name}_{}_{nanos}", std::process::id());
        let prefix = format!("test.{unique}");
        let database = format!("tally_test_{unique}");
        let events_path = dir.path().join("events.jsonl");
        let config = dir.path().join("tally.toml");
        let status = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["generate", "--period", "2026-10", "--seed", "7"])
            .args(["--events", &events.to_string()])
            .args(["--customers", &customers.to_string()])
            .arg("--out")
            .arg(&events_path)
            .arg("--config-out")
            .arg(&config)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tally generate failed");
        let mut file = fs::OpenOptions::new().append(true).open(&config).unwrap();
        write!(
            file,
            r#"
[kafka]
brokers = "{BROKERS}"
topic_prefix = "{prefix}"
partitions = {PARTITIONS}

[clickhouse]
url = "{url}"
database = "{database}"
{extra}
"#,
            url = clickhouse_url(),
        )
        .unwrap();
        if !extra.contains("[rater]") {
            writeln!(
                file,
                "\n[rater]\nmetrics_listen = \"127.0.0.1:0\"\nflush_interval = \"200ms\""
            )
            .unwrap();
        }
        if !extra.contains("[aggregator]") {
            writeln!(
                file,
                "\n[aggregator]\nmetrics_listen = \"127.0.0.1:0\"\ncommit_interval = \"100ms\""
            )
            .unwrap();
        }
        drop(file);
        let parsed = Config::load(&config).unwrap();
        let settings = parsed.services("test", &|_| None).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(tally_runtime::kafka::ensure_topics(&settings.kafka))
            .unwrap();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", BROKERS)
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        Pipeline {
            dir,
            prefix,
            database,
            config,
            events: events_path,
            period: "2026-10",
            children: Mutex::new(BTreeMap::new()),
            producer,
        }
    }

    pub fn topic(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    /// Grows topic `suffix` to `partitions` partitions, as an operator's
    /// `kafka-topics.sh --alter --partitions` would.
    pub fn add_partitions(&self, suffix: &str, partitions: usize) {
        let (admin, runtime) = admin();
        let topic = self.topic(suffix);
        let grown = runtime
            .block_on(admin.create_partitions(
                &[NewPartitions::new(&topic, partitions)],
                &AdminOptions::new(),
            ))
            .unwrap();
        for result in grown {
            result.unwrap();
        }
    }

    /// Deletes topic `suffix`, as an operator's `kafka-topics.sh --delete` would (or a
    /// broker losing its log), and waits until the brokers no longer list it.
    pub fn delete_topic(&self, suffix: &str) {
        let (admin, runtime) = admin();
        let topic = self.topic(suffix);
        let deleted = runtime
            .block_on(admin.delete_topics(&[&topic], &AdminOptions::new()))
            .unwrap();
        for result in deleted {
            result.unwrap();
        }
        eventually(&format!("{topic} deleted"), Duration::from_secs(60), || {
            let metadata = (admin.inner())
                .fetch_metadata(None, Duration::from_secs(10))
                .unwrap();
            !metadata.topics().iter().any(|t| t.name() == topic)
        });
    }

    /// Starts `tally serve <service>` as instance `name`, logging to `<name>.log`.
    pub fn start(&self, service: &str, name: &str) {
        self.start_with(service, name, &[]);
    }

    pub fn start_with(&self, service: &str, name: &str, env: &[(&str, &str)]) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["serve", service, "--config"])
            .arg(&self.config)
            .env("TALLY_INSTANCE_ID", name)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.processes().insert(name.to_owned(), child);
    }

    /// SIGKILL: no chance to commit, flush or leave the group.
    pub fn kill(&self, name: &str) {
        let removed = self.processes().remove(name);
        if let Some(mut child) = removed {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&self, name: &str) {
        let removed = self.processes().remove(name);
        if let Some(mut child) = removed {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(
                        status.success(),
                        "{name} exited with {status}:\n{}",
                        self.log(name)
                    );
                    return;
                }
                assert!(Instant::now() < deadline, "{name} did not stop within 60 s");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to a started process: `STOP` freezes it as
    /// a long pause or a partition from the network would, without it knowing.
    pub fn signal(&self, name: &str, signal: &str) {
        let pid = self.processes()[name].id();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {name}");
    }

    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Fails, showing the service's log, unless it logged `text`.
    pub fn assert_logged(&self, name: &str, text: &str) {
        let log = self.log(name);
        assert!(log.contains(text), "{log}");
    }

    /// Waits for `name` to exit on its own and returns how it ended and its log.
    pub fn wait_exit(&self, name: &str, timeout: Duration) -> (std::process::ExitStatus, String) {
        let (_, status, log) = self.wait_first_exit(&[name], timeout);
        (status, log)
    }

    /// Waits for the first of `names` to exit on its own; returns its name, how it
    /// ended and its log. The others keep running.
    pub fn wait_first_exit(
        &self,
        names: &[&str],
        timeout: Duration,
    ) -> (String, std::process::ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = names.iter().find_map(|name| {
                let mut processes = self.processes();
                let status = processes.get_mut(*name)?.try_wait().unwrap()?;
                processes.remove(*name);
                Some((name.to_string(), status))
            });
            if let Some((name, status)) = exited {
                let log = self.log(&name);
                return (name, status, log);
            }
            assert!(
                Instant::now() < deadline,
                "none of {names:?} exited within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sets a topic's configuration (replacing its dynamic settings), as an operator
    /// would with `kafka-configs`.
    pub fn set_topic_config(&self, suffix: &str, name: &str, value: &str) {
        use rdkafka::admin::{AlterConfig, ResourceSpecifier};
        let (admin, runtime) = admin();
        let topic = self.topic(suffix);
        let results = runtime
            .block_on(admin.alter_configs(
                &[AlterConfig::new(ResourceSpecifier::Topic(&topic)).set(name, value)],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            ))
            .unwrap();
        for result in results {
            result.unwrap();
        }
    }

    /// The offsets the service's group has committed, by partition.
    pub fn committed(&self, service: &str) -> BTreeMap<i32, i64> {
        let (topic, client) = self.group_client(service);
        committed_on(&client, &topic).unwrap()
    }

    /// The offsets the service's group has committed, summed over the partitions,
    /// once the broker answers (it may be restarting), within 60 s.
    pub fn committed_total(&self, service: &str) -> i64 {
        let (topic, client) = self.group_client(service);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match committed_on(&client, &topic) {
                Ok(committed) => return committed.values().sum(),
                Err(e) => assert!(Instant::now() < deadline, "committed offsets: {e}"),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The topic the service's group reads, and a client of that group to ask about it.
    fn group_client(&self, service: &str) -> (String, BaseConsumer) {
        let topic = self.topic(if service == "aggregator" {
            "events"
        } else {
            "windows"
        });
        let client = ClientConfig::new()
            .set("bootstrap.servers", BROKERS)
            .set("group.id", format!("{}-{service}", self.prefix))
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        (topic, client)
    }

    /// Panics with its log if a started process has exited.
    pub fn assert_running(&self) {
        let exited = (self.processes().iter_mut())
            .find_map(|(name, child)| Some((name.clone(), child.try_wait().unwrap()?)));
        if let Some((name, status)) = exited {
            panic!("{name} exited with {status}:\n{}", self.log(&name));
        }
    }

    fn processes(&self) -> MutexGuard<'_, BTreeMap<String, Child>> {
        // A test that failed while holding the lock poisoned it: the processes are
        // still to be killed.
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The events file's lines.
    pub fn lines(&self) -> Vec<Vec<u8>> {
        fs::read(&self.events)
            .unwrap()
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    }

    /// Produces raw messages to the events topic keyed by their `subject` (unkeyed when
    /// there is none), as a product service writing straight to Kafka would.
    pub fn produce(&self, lines: &[Vec<u8>]) {
        send_keyed(&self.producer, &self.topic("events"), lines);
        self.producer.flush(Duration::from_secs(60)).unwrap();
    }

    /// [`Pipeline::produce`] in one Kafka transaction, committed or aborted, as a
    /// product service with a transactional producer would.
    pub fn produce_in_transaction(&self, lines: &[Vec<u8>], commit: bool) {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", BROKERS)
            .set("transactional.id", format!("{}-product", self.prefix))
            .set("partitioner", "murmur2_random")
            .create()
            .unwrap();
        let timeout = Duration::from_secs(30);
        producer.init_transactions(timeout).unwrap();
        producer.begin_transaction().unwrap();
        send_keyed(&producer, &self.topic("events"), lines);
        match commit {
            true => producer.commit_transaction(timeout).unwrap(),
            false => {
                producer.flush(timeout).unwrap();
                producer.abort_transaction(timeout).unwrap();
            }
        }
    }

    /// [`Pipeline::produce`] in chunks of `chunk` lines, each followed by the pause
    /// `pause_after` gives (none: the next at once): a steady stream for a test to act
    /// during.
    pub fn produce_paced(
        &self,
        lines: &[Vec<u8>],
        chunk: usize,
        mut pause_after: impl FnMut() -> Option<Duration>,
    ) {
        for chunk in lines.chunks(chunk) {
            self.produce(chunk);
            if let Some(pause) = pause_after() {
                std::thread::sleep(pause);
            }
        }
    }

    /// Produces `payload` keyed by `key` to `partition` of the events topic, whatever a
    /// partitioner would choose: a producer that partitions its own way.
    pub fn produce_to(&self, partition: i32, key: &str, payload: &[u8]) {
        let topic = self.topic("events");
        let record = BaseRecord::<str, [u8]>::to(&topic)
            .partition(partition)
            .key(key)
            .payload(payload);
        self.producer.send(record).map_err(|(e, _)| e).unwrap();
        self.producer.flush(Duration::from_secs(60)).unwrap();
    }

    /// Produces `payload` keyed by `key` with `headers`, as a CloudEvents SDK in Kafka
    /// binary mode would (the attributes in `ce_` headers, the data as the value).
    pub fn produce_with_headers(&self, key: &str, payload: &[u8], headers: &[(&str, &str)]) {
        let topic = self.topic("events");
        let headers = (headers.iter()).fold(OwnedHeaders::new(), |all, (key, value)| {
            all.insert(Header {
                key,
                value: Some(*value),
            })
        });
        let record = BaseRecord::<str, [u8]>::to(&topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        self.producer.send(record).map_err(|(e, _)| e).unwrap();
        self.producer.flush(Duration::from_secs(60)).unwrap();
    }

    /// Produces `payload` keyed by `key` to `partition` of the events topic with the
    /// record timestamp `timestamp_ms`, as a producer with a wrong clock would stamp it.
    pub fn produce_stamped(&self, partition: i32, key: &str, payload: &[u8], timestamp_ms: i64) {
        let topic = self.topic("events");
        let record = BaseRecord::<str, [u8]>::to(&topic)
            .partition(partition)
            .key(key)
            .payload(payload)
            .timestamp(timestamp_ms);
        self.producer.send(record).map_err(|(e, _)| e).unwrap();
        self.producer.flush(Duration::from_secs(60)).unwrap();
    }

    /// Deletes the events topic's records of `partition` before `offset`, as its
    /// retention would; returns the offset the partition now starts at.
    pub fn delete_events_before(&self, partition: i32, offset: i64) -> i64 {
        let (admin, runtime) = admin();
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&self.topic("events"), partition, Offset::Offset(offset))
            .unwrap();
        let deleted = runtime
            .block_on(admin.delete_records(&offsets, &rdkafka::admin::AdminOptions::new()))
            .unwrap();
        let elements = deleted.elements();
        elements[0].error().unwrap();
        elements[0].offset().to_raw().unwrap()
    }

    /// The events topic's `(oldest, next)` offsets of `partition`.
    pub fn event_offsets(&self, partition: i32) -> (i64, i64) {
        self.producer
            .client()
            .fetch_watermarks(&self.topic("events"), partition, Duration::from_secs(10))
            .unwrap()
    }

    /// Produces a message with one header and no payload to `partition` of the events
    /// topic: a control record, as `tally close-period` writes them.
    pub fn produce_header(&self, partition: i32, name: &str, value: &str) {
        let topic = self.topic("events");
        let record = BaseRecord::<str, [u8]>::to(&topic)
            .partition(partition)
            .key("tally-control")
            .headers(OwnedHeaders::new().insert(Header {
                key: name,
                value: Some(value),
            }));
        self.producer.send(record).map_err(|(e, _)| e).unwrap();
        self.producer.flush(Duration::from_secs(60)).unwrap();
    }

    /// Runs `tally <args> --config <this pipeline's configuration>` with `env` set, as
    /// an operator would.
    pub fn tally(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }

    /// `tally reconcile` of the lines `tally rate` last wrote for the period (by
    /// [`Pipeline::expected`]) against the pipeline's `invoice_lines`, as finance runs
    /// it: the exit status and the report.
    pub fn reconcile_with_expected(&self) -> (Option<i32>, String) {
        let expected = self.dir.path().join("expected.jsonl");
        let expected = expected.to_str().unwrap();
        let period = self.period;
        let output = self.tally(
            &["reconcile", "--period", period, expected, "clickhouse"],
            &[],
        );
        let report =
            String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
        (output.status.code(), report.into_owned())
    }

    /// `tally rate`'s lines for the period: what ClickHouse must end up with.
    pub fn expected(&self) -> Vec<Line> {
        self.rate(&self.config, &self.events, self.period)
    }

    /// `tally rate`'s lines of the month of these events priced by another price book.
    pub fn expected_with(&self, config: &Path, lines: &[Vec<u8>]) -> Vec<Line> {
        self.rate(config, &self.events_file(lines), self.period)
    }

    /// `tally rate`'s lines for `period` of these events.
    pub fn expected_for(&self, lines: &[Vec<u8>], period: &str) -> Vec<Line> {
        self.rate(&self.config, &self.events_file(lines), period)
    }

    fn events_file(&self, lines: &[Vec<u8>]) -> PathBuf {
        let path = self.dir.path().join("expected-events.jsonl");
        fs::write(&path, lines.join(&b'\n')).unwrap();
        path
    }

    fn rate(&self, config: &Path, events: &Path, period: &str) -> Vec<Line> {
        let out = self.dir.path().join("expected.jsonl");
        let status = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["rate", "--format", "json", "--period", period])
            .args(["--now", "2026-11-01T00:00:00Z"])
            .arg("--config")
            .arg(config)
            .arg("--events")
            .arg(events)
            .arg("--output")
            .arg(&out)
            .arg("--rejects")
            .arg(self.dir.path().join("rejects.jsonl"))
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tally rate failed");
        let mut lines: Vec<Line> = fs::read_to_string(out)
            .unwrap()
            .lines()
            .map(|l| line_of(&serde_json::from_str(l).unwrap()))
            .collect();
        lines.sort();
        lines
    }

    /// The issue's query, as finance runs it.
    pub fn invoice_lines(&self) -> Vec<Line> {
        self.invoice_lines_of(self.period)
    }

    /// The issue's query for `period` (`YYYY-MM`); fails the test if ClickHouse does
    /// not answer it.
    pub fn invoice_lines_of(&self, period: &str) -> Vec<Line> {
        self.query_invoice_lines(period)
            .unwrap_or_else(|e| panic!("invoice_lines of {period}: {e}"))
    }

    /// The issue's query for `period`, or why ClickHouse did not answer it (while it is
    /// stopped, say).
    fn query_invoice_lines(&self, period: &str) -> Result<Vec<Line>, String> {
        let sql = format!(
            "SELECT customer, price, quantity, amount, currency FROM {}.invoice_lines \
             WHERE period_start = '{period}-01 00:00:00' ORDER BY customer, price FORMAT JSONEachRow",
            self.database
        );
        let mut response = ureq::post(&format!("{}/", clickhouse_url()))
            .send(sql)
            .map_err(|e| e.to_string())?;
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        let mut lines: Vec<Line> = (body.lines())
            .map(|l| line_of(&serde_json::from_str(l).unwrap()))
            .collect();
        lines.sort();
        Ok(lines)
    }

    /// The records of the period's lines as a consumer of `<prefix>.rated` keeps them:
    /// the highest version of each line id, unless that record retired the line.
    pub fn rated_topic_records(&self) -> Vec<Value> {
        let period_start = format!("{}-01T00:00:00Z", self.period);
        let mut latest: BTreeMap<String, (u64, Value)> = BTreeMap::new();
        for (payload, _) in self.read_topic("rated") {
            let record: Value = serde_json::from_slice(&payload).unwrap();
            if record["period_start"] != period_start.as_str() {
                continue;
            }
            let id = record["id"].as_str().unwrap().to_owned();
            let version = record["version"].as_u64().unwrap();
            // A line's records share a partition (keyed by id): at equal versions the
            // later one is current, as in ClickHouse.
            if latest.get(&id).is_none_or(|(v, _)| *v <= version) {
                latest.insert(id, (version, record));
            }
        }
        (latest.into_values())
            .map(|(_, record)| record)
            .filter(|record| record["superseded"] == false)
            .collect()
    }

    /// The lines of [`Pipeline::rated_topic_records`].
    pub fn rated_topic_lines(&self) -> Vec<Line> {
        let mut lines: Vec<Line> = self.rated_topic_records().iter().map(line_of).collect();
        lines.sort();
        lines
    }

    /// Waits until the current lines of `<prefix>.rated` are `expected`, zero-usage
    /// lines included, as in ClickHouse.
    pub fn wait_for_rated(&self, expected: &[Line], timeout: Duration) {
        assert!(
            !expected.is_empty(),
            "nothing expected: a vacuous comparison"
        );
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.rated_topic_lines();
            if got == expected {
                return;
            }
            if Instant::now() > deadline {
                let (missing, extra) = difference(expected, &got);
                panic!(
                    "the rated topic did not converge in {timeout:?}: {} lines expected, {} found; missing {missing:?}, extra {extra:?}",
                    expected.len(),
                    got.len()
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Waits until ClickHouse holds exactly `expected`, and stays so briefly (a late
    /// double count would show), or fails with the difference.
    pub fn wait_for(&self, expected: &[Line], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            // ClickHouse may be stopped on purpose: not answering is not converged yet.
            let (got, unanswered) = match self.query_invoice_lines(self.period) {
                Ok(lines) => (lines, None),
                Err(e) => (Vec::new(), Some(e)),
            };
            if got == expected {
                assert!(
                    !expected.is_empty(),
                    "nothing expected: a vacuous comparison"
                );
                std::thread::sleep(Duration::from_secs(3));
                assert_eq!(
                    self.invoice_lines(),
                    expected,
                    "lines changed after matching"
                );
                return;
            }
            if Instant::now() > deadline {
                let (missing, extra) = difference(expected, &got);
                let unanswered = unanswered.map_or_else(String::new, |e| {
                    format!(" (the last query was not answered: {e})")
                });
                panic!(
                    "ClickHouse did not converge in {timeout:?}{unanswered}: {} lines expected, {} found\nmissing (first 5): {:#?}\nunexpected (first 5): {:#?}\naggregator log tail:\n{}",
                    expected.len(),
                    got.len(),
                    &missing[..missing.len().min(5)],
                    &extra[..extra.len().min(5)],
                    tail(&self.log("agg-a"), 30),
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Every record of a topic (all partitions), read committed, with its headers.
    pub fn read_topic(&self, suffix: &str) -> Vec<(Vec<u8>, BTreeMap<String, String>)> {
        self.read_records(suffix)
            .into_iter()
            .map(|(_, payload, headers)| (payload, headers))
            .collect()
    }

    /// Every record of a topic as (key, payload, headers); a tombstone has no payload.
    pub fn read_records(&self, suffix: &str) -> Vec<Record> {
        self.read_records_in(suffix, "read_committed")
    }

    /// [`Pipeline::read_records`] at an isolation level: `read_uncommitted` includes
    /// what aborted transactions wrote.
    pub fn read_records_in(&self, suffix: &str, isolation: &str) -> Vec<Record> {
        let topic = self.topic(suffix);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", BROKERS)
            .set("group.id", format!("{}-reader", self.prefix))
            .set("isolation.level", isolation)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut ends = BTreeMap::new();
        let mut assignment = TopicPartitionList::new();
        for p in 0..PARTITIONS as i32 {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .unwrap();
            if high > low {
                ends.insert(p, high);
                assignment
                    .add_partition_offset(&topic, p, Offset::Beginning)
                    .unwrap();
            }
        }
        let mut records = Vec::new();
        if ends.is_empty() {
            return records;
        }
        consumer.assign(&assignment).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut done = std::collections::BTreeSet::new();
        let mut last_read = Instant::now();
        while done.len() < ends.len() {
            assert!(
                Instant::now() < deadline,
                "reading {topic}: {} of {} partitions not read to their end within 60 s",
                ends.len() - done.len(),
                ends.len()
            );
            let Some(message) = consumer.poll(Duration::from_millis(500)) else {
                // Transaction markers are never delivered: a partition whose position
                // stays one short of its end, with nothing read for 2 s, ends in one.
                let quiet = last_read.elapsed() >= Duration::from_secs(2);
                let positions = consumer.position().unwrap();
                for (p, end) in &ends {
                    if let Offset::Offset(o) = positions
                        .find_partition(&topic, *p)
                        .map_or(Offset::Invalid, |e| e.offset())
                    {
                        if o >= *end || (quiet && o == *end - 1) {
                            done.insert(*p);
                        }
                    }
                }
                continue;
            };
            // An error of the read (a partition's start just deleted, a broker just
            // started) is the consumer's to recover from; the deadline above holds.
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    eprintln!("reading {topic}: {error}; reading on");
                    continue;
                }
            };
            last_read = Instant::now();
            let mut headers = BTreeMap::new();
            if let Some(h) = message.headers() {
                for header in h.iter() {
                    headers.insert(
                        header.key.to_owned(),
                        String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            records.push((
                message.key().unwrap_or_default().to_vec(),
                message.payload().unwrap_or_default().to_vec(),
                headers,
            ));
            if message.offset() + 1 >= ends[&message.partition()] {
                done.insert(message.partition());
            }
        }
        records
    }

    /// Sets the service's group's offsets to the oldest its topic holds, as an operator
    /// replaying would with Kafka's `kafka-consumer-groups.sh --reset-offsets
    /// --to-earliest` (which commits no metadata); the group must have no members.
    pub fn reset_group_to_earliest(&self, service: &str) {
        self.reset_group(service, |(oldest, _)| oldest);
    }

    /// As [`Self::reset_group_to_earliest`], to the next offset (`--to-latest`).
    pub fn reset_group_to_latest(&self, service: &str) {
        self.reset_group(service, |(_, next)| next);
    }

    fn reset_group(&self, service: &str, to: fn((i64, i64)) -> i64) {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", BROKERS)
            .set("group.id", format!("{}-{service}", self.prefix))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut offsets = TopicPartitionList::new();
        let topic = self.topic(if service == "aggregator" {
            "events"
        } else {
            "windows"
        });
        for p in 0..PARTITIONS as i32 {
            let watermarks = consumer
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .unwrap();
            offsets
                .add_partition_offset(&topic, p, Offset::Offset(to(watermarks)))
                .unwrap();
        }
        consumer
            .commit(&offsets, rdkafka::consumer::CommitMode::Sync)
            .unwrap();
    }

    pub fn query(&self, sql: &str) -> String {
        let mut response = ureq::post(&format!("{}/", clickhouse_url()))
            .send(sql.to_owned())
            .unwrap();
        response.body_mut().read_to_string().unwrap()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let names: Vec<String> = self.processes().keys().cloned().collect();
        for name in names {
            self.kill(&name);
        }
        if std::thread::panicking() || std::env::var_os("TALLY_TEST_KEEP_LOGS").is_some() {
            // Keep the logs of a failed test (or of every test, when asked).
            let kept = std::env::temp_dir().join(format!("{}-logs", self.prefix));
            let _ = fs::create_dir_all(&kept);
            for entry in fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    let _ = fs::copy(entry.path(), kept.join(entry.file_name()));
                }
            }
            eprintln!("service logs kept in {}", kept.display());
        }
        let _ = ureq::post(&format!("{}/", clickhouse_url()))
            .send(format!("DROP DATABASE IF EXISTS {}", self.database));
    }
}

/// The lines of `expected` not in `got`, and those of `got` not in `expected`.
fn difference<'a>(expected: &'a [Line], got: &'a [Line]) -> (Vec<&'a Line>, Vec<&'a Line>) {
    let missing = expected.iter().filter(|l| !got.contains(l)).collect();
    let extra = got.iter().filter(|l| !expected.contains(l)).collect();
    (missing, extra)
}

fn line_of(v: &Value) -> Line {
    let text = |k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    (
        text("customer"),
        text("price"),
        text("quantity"),
        text("amount"),
        text("currency"),
    )
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// An admin client of the test brokers, and a runtime to wait for its answers on.
fn admin() -> (AdminClient<DefaultClientContext>, tokio::runtime::Runtime) {
    let admin = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (admin, runtime)
}

/// Runs `scripts/services/<name>.sh <action>` (stop, start, restart) and waits for it.
pub fn service(name: &str, action: &str) {
    service_with(name, &[action]);
}

pub fn service_with(name: &str, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/services")
        .join(format!("{name}.sh"));
    let status = Command::new(&script).args(args).status().unwrap();
    assert!(status.success(), "{} {args:?} failed", script.display());
}

impl Pipeline {
    /// Waits until the service's group has committed every partition to its end.
    pub fn wait_caught_up(&self, service: &str, timeout: Duration) {
        let (topic, client) = self.group_client(service);
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            // Right after a broker restart the group coordinator may still be loading:
            // an error is "not yet", like being behind.
            let behind = committed_on(&client, &topic)
                .map(|committed| {
                    (0..PARTITIONS as i32).any(|p| {
                        let at = committed.get(&p).copied().unwrap_or(0);
                        client
                            .fetch_watermarks(&topic, p, Duration::from_secs(10))
                            .map_or(true, |(_, high)| at < high)
                    })
                })
                .unwrap_or(true);
            if !behind {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{service} did not catch up in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Queues each line to `topic` keyed by its `subject` (unkeyed when there is none).
fn send_keyed(producer: &BaseProducer, topic: &str, lines: &[Vec<u8>]) {
    for line in lines {
        let subject = serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|v| v.get("subject")?.as_str().map(str::to_owned));
        loop {
            let mut record = BaseRecord::<str, [u8]>::to(topic).payload(line);
            if let Some(subject) = &subject {
                record = record.key(subject);
            }
            match producer.send(record) {
                Ok(()) => break,
                Err(_) => {
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
}

/// What `client`'s group has committed on `topic`, by partition.
fn committed_on(
    client: &BaseConsumer,
    topic: &str,
) -> rdkafka::error::KafkaResult<BTreeMap<i32, i64>> {
    let mut list = TopicPartitionList::new();
    for p in 0..PARTITIONS as i32 {
        list.add_partition(topic, p);
    }
    Ok(client
        .committed_offsets(list, Duration::from_secs(10))?
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

pub const API_KEY: &str = "pipeline-test-key-0123456789";

/// `[ingest]` listening on `port`, with one key allowed any source and limits out of
/// the way.
pub fn ingest_section(port: u16) -> String {
    format!(
        "[ingest]\nlisten = \"127.0.0.1:{port}\"\nrate_limit_per_second = 100000\nrate_limit_burst = 100000\n\
         [[ingest.api_keys]]\nkey = \"{API_KEY}\"\ntenant = \"pipeline-test\"\nsources = [\"*\"]\n"
    )
}

/// Sends events to ingest in batches, as a product service would; returns how many
/// it accepted. Retries while ingest starts.
pub fn post_events(port: u16, lines: &[Vec<u8>], batch: usize) -> u64 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let mut accepted = 0;
    for chunk in lines.chunks(batch) {
        let mut body = b"[".to_vec();
        body.extend(chunk.join(&b','));
        body.push(b']');
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sent = agent
                .post(&url)
                .header("Authorization", &format!("Bearer {API_KEY}"))
                .header("Content-Type", "application/cloudevents-batch+json")
                .send(&body[..]);
            match sent {
                Ok(mut response) if response.status() == 202 => {
                    let reply: Value =
                        serde_json::from_str(&response.body_mut().read_to_string().unwrap())
                            .unwrap();
                    accepted += reply["accepted"].as_u64().unwrap();
                    break;
                }
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "ingest did not accept a batch: {:?}",
                        other.map(|mut r| (
                            r.status(),
                            r.body_mut().read_to_string().unwrap_or_default()
                        ))
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    accepted
}

/// Whether an aggregator's log shows a partition restored with at least one changelog
/// record (not just an empty changelog).
pub fn restored_some_state(log: &str) -> bool {
    log.lines()
        .any(|l| l.contains("partition state restored") && !l.contains("records=0 "))
}

/// The port a service's log says it serves `what` on (`listening local=...
/// what="aggregator metrics"`), for a service given port 0: its latest start's.
pub fn metrics_port(log: &str, what: &str) -> u16 {
    let line = (log.lines())
        .rev()
        .find(|l| l.contains("listening") && l.contains(&format!("what=\"{what}\"")))
        .unwrap_or_else(|| panic!("no {what} in:\n{log}"));
    let address = line
        .split("local=")
        .nth(1)
        .and_then(|rest| rest.split(' ').next());
    (address.and_then(|a| a.rsplit(':').next()?.parse().ok()))
        .unwrap_or_else(|| panic!("no port in {line}"))
}

/// A metric's value as a service serves it on `/metrics` (summed over its label sets),
/// if the service answers and has it.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    let mut response = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .ok()?;
    let text = response.body_mut().read_to_string().ok()?;
    let values: Vec<f64> = text
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Waits until `check` holds, or fails saying what did not happen.
pub fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}
