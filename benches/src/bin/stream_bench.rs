//! The streaming benchmark: events from a Kafka producer to invoice lines in
//! ClickHouse, through `tally serve aggregator` (exactly once) and `tally serve rater`,
//! on the local Kafka and ClickHouse. See benches/README.md, section 3, for the method
//! and the figures; `benches/run.sh stream` builds everything and runs this.
//!
//! Each run, in its own topics (a fresh topic prefix) and ClickHouse database:
//!
//! 1. preload: every event of the file into `<prefix>.events`, keyed by `subject`,
//!    before any service runs, so that what follows measures consumers, not this
//!    producer;
//! 2. ceiling: a plain rdkafka consumer in its own group reads the same events and
//!    only counts them;
//! 3. core bound: one thread per partition, each with its own consumer, reads, decodes,
//!    dedupes and windows every event with the aggregator's core, and writes nothing:
//!    the most any exactly-once aggregator built on that core could do here;
//! 4. throughput: the rater and the aggregator start; the aggregator group's committed
//!    offsets are polled until they reach the end of the events topic, then
//!    `invoice_lines` until it equals `tally rate`'s lines for the same file;
//! 5. latency: with both services still running, events are produced at half the rate
//!    of step 4, and every 100 ms a probe event for the customer `bench_probe`, whose
//!    resolutions line therefore counts the probes; `invoice_lines` is polled every
//!    50 ms and each probe's delay is from its send to the first poll whose quantity
//!    includes it.
//!
//! CPU time per process (Kafka, ClickHouse, each service, this driver) and the
//! machine's is read from /proc at each phase's edges.

#![allow(clippy::float_arithmetic)] // rates, shares and percentiles

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use memchr::memmem;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use tally_aggregator::{Aggregator, Outcome};
use tally_schemas::config::Config;
use tally_schemas::event::EventDecoder;

const PERIOD: &str = "2026-10";
const PERIOD_START: &str = "2026-10-01 00:00:00";
const PROBE_CUSTOMER: &str = "bench_probe";
const PROBE_PRICE: &str = "resolutions";
/// In the benchmark month, so the probes land in the same period as the load.
const PROBE_TIME: &str = "2026-10-15T12:00:00.000Z";
/// How often the core bound drains its aggregator's changes: about what the
/// aggregator's threads process per partition between two commits.
const CORE_BOUND_DRAIN_EVENTS: i64 = 20_000;
/// Clock ticks per second of /proc (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

#[derive(Debug, Parser)]
#[command(about = "Kafka to ClickHouse streaming benchmark (benches/README.md, section 3)")]
struct Args {
    /// The `tally` binary (release build).
    #[arg(long, default_value = "target/release/tally")]
    tally: PathBuf,
    /// Generated events (`tally generate`), all of period 2026-10.
    #[arg(long, default_value = "bench-data/events.jsonl")]
    events: PathBuf,
    /// The generated price book for them.
    #[arg(long, default_value = "bench-data/tally.toml")]
    config: PathBuf,
    /// Working directory: per-run configurations and service logs.
    #[arg(long, default_value = "bench-data/stream")]
    out: PathBuf,
    /// Where to write every figure as JSON.
    #[arg(long, default_value = "bench-data/stream.json")]
    results: PathBuf,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Use only the first N events of the file.
    #[arg(long)]
    limit: Option<usize>,
    /// Partitions of the topics.
    #[arg(long, default_value_t = 2)]
    partitions: u32,
    /// Aggregator processes (each its own TALLY_INSTANCE_ID).
    #[arg(long, default_value_t = 1)]
    aggregators: u32,
    /// Length of the latency phase; 0 skips it.
    #[arg(long, default_value_t = 40)]
    latency_seconds: u64,
    /// Events/s during the latency phase; default half the run's sustained rate.
    #[arg(long)]
    latency_rate: Option<u64>,
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long, default_value = "http://127.0.0.1:8123")]
    clickhouse: String,
    /// Keep each run's topics and database instead of deleting them.
    #[arg(long)]
    keep: bool,
    /// The rater's `min_insert_interval` (e.g. `500ms`) instead of its default: the
    /// trade between fresher lines and fewer inserts.
    #[arg(long)]
    rater_min_insert_interval: Option<String>,
    /// The aggregator's `commit_interval` (e.g. `1s`) instead of its default: the
    /// trade between fewer commits and fresher lines.
    #[arg(long)]
    aggregator_commit_interval: Option<String>,
    /// Run the rater with `store_windows = true`: the windows go to ClickHouse too.
    #[arg(long)]
    rater_store_windows: bool,
    /// The services' log filter (`RUST_LOG`), e.g. `info,tally_aggregator=debug` to
    /// log every transaction the aggregator commits.
    #[arg(long, default_value = "info")]
    service_log: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.tally.exists() {
        bail!(
            "{} not found: cargo build --release -p tally",
            args.tally.display()
        );
    }
    fs::create_dir_all(&args.out)?;
    let data = Data::load(&args.events, args.limit)?;
    eprintln!(
        "{} events ({:.1} MB) from {}",
        data.lines.len(),
        data.payload_bytes() as f64 / 1e6,
        args.events.display()
    );
    let clickhouse = ClickHouse::new(&args.clickhouse);
    clickhouse
        .query("SELECT 1")
        .context("ClickHouse is not answering: scripts/services/up.sh kafka clickhouse")?;
    let mut results = Vec::new();
    let mut expected: Option<Vec<Line>> = None;
    for index in 1..=args.runs {
        eprintln!("\n=== run {index} of {} ===", args.runs);
        let mut run = Run::new(&args, index)?;
        if expected.is_none() {
            expected = Some(run.expected(&args, &data)?);
        }
        let expected = expected.as_deref().unwrap_or_default();
        // Found again each run: a colleague's tests may restart the servers.
        let servers = Servers::find();
        let result = run.execute(&args, &data, expected, &clickhouse, &servers);
        run.cleanup(&args, &clickhouse);
        let result = result.with_context(|| format!("run {index}"))?;
        print_run(&result);
        results.push(result);
    }
    let summary = summarise(&results);
    let report = json!({
        "events": data.lines.len(),
        "partitions": args.partitions,
        "aggregators": args.aggregators,
        "runs": results,
        "median": summary,
    });
    fs::write(&args.results, serde_json::to_string_pretty(&report)?)?;
    print_summary(&results, &summary);
    eprintln!("figures written to {}", args.results.display());
    Ok(())
}

/// The events file in memory, one entry per non-empty line.
struct Data {
    bytes: Vec<u8>,
    lines: Vec<LineRef>,
}

#[derive(Debug, Clone, Copy)]
struct LineRef {
    start: usize,
    end: usize,
    /// The `subject`'s bytes: the record key.
    key: Option<(usize, usize)>,
    /// Where the `id` value starts, to make new events from old ones.
    id_at: Option<usize>,
}

impl Data {
    fn load(path: &Path, limit: Option<usize>) -> Result<Data> {
        let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let subject = memmem::Finder::new(br#""subject":""#);
        let id = memmem::Finder::new(br#""id":""#);
        let mut lines = Vec::new();
        let mut start = 0;
        while start < bytes.len() && limit.is_none_or(|l| lines.len() < l) {
            let end = memchr::memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |i| start + i);
            let line = &bytes[start..end];
            if !line.iter().all(u8::is_ascii_whitespace) {
                let key = subject.find(line).and_then(|at| {
                    let from = at + subject.needle().len();
                    memchr::memchr(b'"', &line[from..])
                        .map(|len| (start + from, start + from + len))
                });
                let id_at = id.find(line).map(|at| start + at + id.needle().len());
                lines.push(LineRef {
                    start,
                    end,
                    key,
                    id_at,
                });
            }
            start = end + 1;
        }
        if lines.is_empty() {
            bail!("{} holds no events", path.display());
        }
        Ok(Data { bytes, lines })
    }

    fn payload(&self, line: &LineRef) -> &[u8] {
        &self.bytes[line.start..line.end]
    }

    fn key(&self, line: &LineRef) -> Option<&[u8]> {
        line.key.map(|(s, e)| &self.bytes[s..e])
    }

    fn payload_bytes(&self) -> usize {
        self.lines.iter().map(|l| l.end - l.start).sum()
    }

    /// The line as a new event: its id (and those of its retries) prefixed.
    fn renamed(&self, line: &LineRef, prefix: &str) -> Vec<u8> {
        let Some(at) = line.id_at else {
            return self.payload(line).to_vec();
        };
        let mut out = Vec::with_capacity(line.end - line.start + prefix.len());
        out.extend_from_slice(&self.bytes[line.start..at]);
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(&self.bytes[at..line.end]);
        out
    }
}

/// `(customer, price, quantity, amount, currency)` of an invoice line.
type Line = (String, String, String, String, String);

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

#[derive(Clone)]
struct ClickHouse {
    agent: ureq::Agent,
    url: String,
}

impl ClickHouse {
    fn new(url: &str) -> ClickHouse {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        ClickHouse {
            agent,
            url: format!("{}/", url.trim_end_matches('/')),
        }
    }

    fn query(&self, sql: &str) -> Result<String> {
        let mut response = self.agent.post(&self.url).send(sql)?;
        let body = response.body_mut().read_to_string()?;
        if response.status() != 200 {
            bail!("ClickHouse: {}: {}", response.status(), body.trim());
        }
        Ok(body)
    }

    /// The issue's query, as finance runs it; empty while the database does not exist.
    fn invoice_lines(&self, database: &str) -> Vec<Line> {
        let sql = format!(
            "SELECT customer, price, quantity, amount, currency FROM {database}.invoice_lines \
             WHERE period_start = '{PERIOD_START}' FORMAT JSONEachRow"
        );
        let Ok(body) = self.query(&sql) else {
            return Vec::new();
        };
        let mut lines: Vec<Line> = body
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| line_of(&v))
            .collect();
        lines.sort();
        lines
    }

    /// The probe customer's resolutions quantity: the number of probes billed.
    fn probe_quantity(&self, database: &str) -> Option<u64> {
        let sql = format!(
            "SELECT quantity FROM {database}.invoice_lines WHERE customer = '{PROBE_CUSTOMER}' \
             AND price = '{PROBE_PRICE}' AND period_start = '{PERIOD_START}' FORMAT TabSeparated"
        );
        let body = self.query(&sql).ok()?;
        let text = body.lines().next().unwrap_or("0").trim();
        text.parse::<u64>()
            .ok()
            .or_else(|| text.parse::<f64>().ok().map(|q| q as u64))
    }
}

/// Kafka and ClickHouse's processes, for their CPU time.
struct Servers {
    kafka: Option<u32>,
    clickhouse: Option<u32>,
}

impl Servers {
    fn find() -> Servers {
        let mut servers = Servers {
            kafka: None,
            clickhouse: None,
        };
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("kafka.Kafka") {
                servers.kafka = Some(pid);
            } else if cmdline.contains("clickhouse-server") {
                servers.clickhouse = Some(pid);
            }
        }
        if servers.kafka.is_none() || servers.clickhouse.is_none() {
            eprintln!(
                "warning: Kafka's or ClickHouse's process not found; their CPU is counted as other"
            );
        }
        servers
    }
}

/// CPU ticks of the machine and of the tracked processes at one moment.
#[derive(Debug, Clone)]
struct CpuSample {
    at: Instant,
    busy: u64,
    steal: u64,
    procs: BTreeMap<String, u64>,
    /// Per thread of the first aggregator, `name/tid`.
    threads: BTreeMap<String, u64>,
}

fn proc_ticks(path: &Path) -> Option<(String, u64)> {
    let text = fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text[open + 1..close].to_owned();
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

fn sample(tracked: &[(String, u32)], threads_of: Option<u32>) -> CpuSample {
    let (mut busy, mut steal) = (0, 0);
    if let Some(line) = fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
    {
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let get = |i: usize| v.get(i).copied().unwrap_or(0);
        busy = get(0) + get(1) + get(2) + get(5) + get(6);
        steal = get(7);
    }
    let procs = tracked
        .iter()
        .map(|(name, pid)| {
            let ticks = proc_ticks(&PathBuf::from(format!("/proc/{pid}/stat"))).map_or(0, |t| t.1);
            (name.clone(), ticks)
        })
        .collect();
    let mut threads = BTreeMap::new();
    if let Some(pid) = threads_of {
        for entry in fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some((name, ticks)) = proc_ticks(&entry.path().join("stat")) {
                threads.insert(
                    format!("{name}/{}", entry.file_name().to_string_lossy()),
                    ticks,
                );
            }
        }
    }
    CpuSample {
        at: Instant::now(),
        busy,
        steal,
        procs,
        threads,
    }
}

/// CPU use between two samples, in cores (1.0 = one core busy all the time).
fn cpu_between(a: &CpuSample, b: &CpuSample) -> Value {
    let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    let cores = |ticks: u64| ticks as f64 / TICKS / wall;
    let mut procs = serde_json::Map::new();
    let mut tracked = 0;
    for (name, &end) in &b.procs {
        let used = end.saturating_sub(a.procs.get(name).copied().unwrap_or(end));
        tracked += used;
        procs.insert(name.clone(), json!(round(cores(used), 3)));
    }
    let machine = b.busy.saturating_sub(a.busy);
    let mut threads: Vec<(String, u64)> = b
        .threads
        .iter()
        .map(|(name, &end)| {
            (
                name.clone(),
                end.saturating_sub(a.threads.get(name).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, used)| *used > 0)
        .collect();
    threads.sort_by_key(|t| std::cmp::Reverse(t.1));
    threads.truncate(6);
    json!({
        "wall_s": round(wall, 3),
        "machine_cores": round(cores(machine), 3),
        "steal_cores": round(cores(b.steal.saturating_sub(a.steal)), 3),
        "other_cores": round(cores(machine.saturating_sub(tracked)), 3),
        "processes": procs,
        "aggregator_threads": threads
            .into_iter()
            .map(|(n, t)| json!([n, round(cores(t), 3)]))
            .collect::<Vec<_>>(),
    })
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// Waits until nothing but the tracked processes used CPU for 2 s (at most 300 s), so
/// a colleague's build does not land in a run. Returns the seconds waited.
fn wait_idle(tracked: &[(String, u32)]) -> f64 {
    let started = Instant::now();
    loop {
        let a = sample(tracked, None);
        std::thread::sleep(Duration::from_secs(2));
        let b = sample(tracked, None);
        let other = cpu_between(&a, &b)["other_cores"].as_f64().unwrap_or(0.0);
        if other < 0.1 {
            return started.elapsed().as_secs_f64();
        }
        if started.elapsed() > Duration::from_secs(300) {
            eprintln!("warning: the machine is still busy ({other:.2} cores used by others); running anyway");
            return started.elapsed().as_secs_f64();
        }
    }
}

/// The `tally serve` processes of a run; killed if still running when dropped.
struct Services {
    children: Vec<(String, Child, u16)>,
}

impl Services {
    fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .map(|(name, child, _)| (name.clone(), child.id()))
            .collect()
    }

    fn assert_running(&mut self) -> Result<()> {
        for (name, child, _) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited early ({status}); see its log");
            }
        }
        Ok(())
    }

    /// `/metrics` of each service, the tally_* sample lines only.
    fn metrics(&self, agent: &ureq::Agent) -> Value {
        let mut out = serde_json::Map::new();
        for (name, _, port) in &self.children {
            let text = agent
                .get(&format!("http://127.0.0.1:{port}/metrics"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .unwrap_or_default();
            let mut samples = serde_json::Map::new();
            for line in text.lines() {
                let interesting = [
                    "tally_aggregator_events_total",
                    "tally_aggregator_transactions_total",
                    "tally_aggregator_window_updates_total",
                    "tally_rater_usage_updates_total",
                    "tally_rater_lines_rated_total",
                    "tally_clickhouse_inserted_rows_total",
                    "tally_clickhouse_insert_duration_seconds_sum",
                    "tally_clickhouse_insert_duration_seconds_count",
                    "tally_aggregator_transaction_duration_seconds_sum",
                    "tally_aggregator_transaction_duration_seconds_count",
                    "tally_aggregator_window_latency_seconds_sum",
                    "tally_aggregator_window_latency_seconds_count",
                    "tally_rater_rating_latency_seconds_sum",
                    "tally_rater_rating_latency_seconds_count",
                ];
                if interesting.iter().any(|m| line.starts_with(m)) {
                    if let Some((k, v)) = line.rsplit_once(' ') {
                        samples.insert(k.to_owned(), json!(v.parse::<f64>().unwrap_or(0.0)));
                    }
                }
            }
            out.insert(name.clone(), Value::Object(samples));
        }
        Value::Object(out)
    }

    /// SIGTERM to each, then waits up to 30 s before killing.
    fn stop(&mut self) {
        for (_, child, _) in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for (name, child, _) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        eprintln!("{name} did not stop in 30 s; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One run: its topics, database and configuration.
struct Run {
    index: usize,
    prefix: String,
    database: String,
    dir: PathBuf,
    config: PathBuf,
    events_topic: String,
}

impl Run {
    fn new(args: &Args, index: usize) -> Result<Run> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let unique = format!("{}_{nanos}_{index}", std::process::id());
        let prefix = format!("bench.{unique}");
        let database = format!("tally_bench_{unique}");
        let dir = args.out.join(format!("run-{index}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut text = fs::read_to_string(&args.config)
            .with_context(|| format!("cannot read {}", args.config.display()))?;
        // The default commit, flush and insert intervals (200 ms, 500 ms, 200 ms) are
        // kept unless asked otherwise: the figures are for the configuration a
        // deployment gets.
        write!(
            text,
            r#"

# Added by benches/src/bin/stream_bench.rs: the latency probe's customer.
[[customers]]
id = "{PROBE_CUSTOMER}"
plan = "pro"

[kafka]
brokers = "{brokers}"
topic_prefix = "{prefix}"
partitions = {partitions}

[clickhouse]
url = "{clickhouse}"
database = "{database}"

[aggregator]
metrics_listen = "127.0.0.1:0"
{commit_interval}
[rater]
metrics_listen = "127.0.0.1:0"
store_windows = {store_windows}
{min_insert_interval}"#,
            commit_interval = setting("commit_interval", &args.aggregator_commit_interval),
            min_insert_interval = setting("min_insert_interval", &args.rater_min_insert_interval),
            store_windows = args.rater_store_windows,
            brokers = args.brokers,
            partitions = args.partitions,
            clickhouse = args.clickhouse,
        )?;
        let config = dir.join("tally.toml");
        fs::write(&config, text)?;
        Ok(Run {
            index,
            events_topic: format!("{prefix}.events"),
            prefix,
            database,
            dir,
            config,
        })
    }

    fn topics(&self) -> Vec<String> {
        [
            "events",
            "windows",
            "rejected",
            "rated",
            "aggregator-changelog",
        ]
        .iter()
        .map(|s| format!("{}.{s}", self.prefix))
        .collect()
    }

    /// `tally rate`'s lines for the file: what ClickHouse must end up with.
    fn expected(&self, args: &Args, data: &Data) -> Result<Vec<Line>> {
        let events = if args.limit.is_some() {
            let path = args.out.join("events-limited.jsonl");
            let mut bytes = Vec::with_capacity(data.payload_bytes() + data.lines.len());
            for line in &data.lines {
                bytes.extend_from_slice(data.payload(line));
                bytes.push(b'\n');
            }
            fs::write(&path, bytes)?;
            path
        } else {
            args.events.clone()
        };
        let out = args.out.join("expected.jsonl");
        let status = Command::new(&args.tally)
            .args(["rate", "--format", "json", "--period", PERIOD])
            .args(["--now", "2026-11-01T00:00:00Z"])
            .arg("--config")
            .arg(&self.config)
            .arg("--events")
            .arg(&events)
            .arg("--output")
            .arg(&out)
            .arg("--rejects")
            .arg(args.out.join("expected-rejects.jsonl"))
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("tally rate failed");
        }
        let mut lines: Vec<Line> = fs::read_to_string(&out)?
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).map(|v| line_of(&v)))
            .collect::<Result<_, _>>()?;
        lines.sort();
        eprintln!("tally rate: {} invoice lines expected", lines.len());
        Ok(lines)
    }

    fn execute(
        &mut self,
        args: &Args,
        data: &Data,
        expected: &[Line],
        clickhouse: &ClickHouse,
        servers: &Servers,
    ) -> Result<Value> {
        let mut tracked: Vec<(String, u32)> = vec![("driver".to_owned(), std::process::id())];
        if let Some(pid) = servers.kafka {
            tracked.push(("kafka".to_owned(), pid));
        }
        if let Some(pid) = servers.clickhouse {
            tracked.push(("clickhouse".to_owned(), pid));
        }
        let waited = wait_idle(&tracked);
        let config = Config::load(&self.config)?;
        let settings = config
            .services("bench", &|_| None)
            .map_err(|e| anyhow!("{e}"))?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(tally_runtime::kafka::ensure_topics(&settings.kafka))
            .map_err(|e| anyhow!("{e}"))?;

        // 1. Preload.
        let a = sample(&tracked, None);
        let preload = self.preload(args, data)?;
        let b = sample(&tracked, None);
        eprintln!(
            "preload: {} events in {:.2} s, {:.0} events/s",
            data.lines.len(),
            preload,
            data.lines.len() as f64 / preload
        );
        let preload_cpu = cpu_between(&a, &b);

        // 2. Ceiling.
        let a = sample(&tracked, None);
        let (ceiling_total, ceiling_first) = self.ceiling(args, data.lines.len())?;
        let b = sample(&tracked, None);
        let ceiling_cpu = cpu_between(&a, &b);
        let n = data.lines.len() as f64;
        eprintln!(
            "ceiling: {:.2} s, {:.0} events/s ({:.0} events/s from the first message)",
            ceiling_total,
            n / ceiling_total,
            n / (ceiling_total - ceiling_first)
        );

        // 3. Core bound.
        let a = sample(&tracked, None);
        let core = self.core_bound(args, &config, settings.aggregator.period_close_grace)?;
        let b = sample(&tracked, None);
        let core_cpu = cpu_between(&a, &b);
        eprintln!(
            "core bound: {:.2} s, {:.0} events/s ({:.3} of the ceiling); {}",
            core.seconds,
            n / core.seconds,
            ceiling_total / core.seconds,
            core.outcomes
        );

        // 4. Throughput, exactly once.
        let mut services = Services {
            children: Vec::new(),
        };
        let rater_port = free_port()?;
        self.spawn(&mut services, args, "rater", "rater", rater_port)?;
        let mut tracked_run = tracked.clone();
        let started = Instant::now();
        for i in 0..args.aggregators {
            let port = free_port()?;
            self.spawn(
                &mut services,
                args,
                "aggregator",
                &format!("aggregator-{i}"),
                port,
            )?;
        }
        tracked_run.extend(services.pids());
        let agg_pid = services.pids().get(1).map(|p| p.1);
        let a = sample(&tracked_run, agg_pid);
        let poller = self.group_reader(args, "aggregator")?;
        let mut timeline: Vec<(f64, i64)> = Vec::new();
        let ends = watermarks(&poller, &self.events_topic, args.partitions)?;
        let total: i64 = ends.iter().sum();
        let mut first_commit = None;
        let agg_done = loop {
            services.assert_running()?;
            let at = started.elapsed().as_secs_f64();
            let committed = committed(&poller, &self.events_topic, args.partitions)?;
            let sum: i64 = committed.iter().sum();
            timeline.push((at, sum));
            if sum > 0 && first_commit.is_none() {
                first_commit = Some(at);
            }
            if committed.iter().zip(&ends).all(|(c, e)| c >= e) {
                break at;
            }
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the aggregator did not catch up in 600 s ({sum} of {total})");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let b = sample(&tracked_run, agg_pid);
        eprintln!(
            "aggregator: first commit after {:.2} s, all {} events committed after {:.2} s: {:.0} events/s",
            first_commit.unwrap_or(0.0),
            total,
            agg_done,
            n / agg_done
        );
        let lines_done = loop {
            services.assert_running()?;
            let got = clickhouse.invoice_lines(&self.database);
            let at = started.elapsed().as_secs_f64();
            if got == expected {
                break at;
            }
            if started.elapsed() > Duration::from_secs(900) {
                let missing = expected.iter().filter(|l| !got.contains(l)).count();
                bail!(
                    "invoice_lines did not converge: {} expected, {} found, {missing} missing",
                    expected.len(),
                    got.len()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let c = sample(&tracked_run, agg_pid);
        eprintln!(
            "invoice_lines equal tally rate's ({} lines) after {:.2} s: {:.0} events/s",
            expected.len(),
            lines_done,
            n / lines_done
        );
        std::thread::sleep(Duration::from_secs(1));
        let still_equal = clickhouse.invoice_lines(&self.database) == expected;
        let agent = clickhouse.agent.clone();
        let metrics_after_throughput = services.metrics(&agent);
        // The steady rate: between 10 % and 90 % of the events committed.
        let steady = steady_rate(&timeline, total);

        // 5. Latency at half the sustained rate.
        let rows_rate = n / lines_done;
        let latency = if args.latency_seconds > 0 {
            let rate = args.latency_rate.unwrap_or((rows_rate / 2.0) as u64).max(1);
            let a = sample(&tracked_run, agg_pid);
            let mut result = self.latency(args, data, clickhouse, &poller, &mut services, rate)?;
            let b = sample(&tracked_run, agg_pid);
            result["cpu"] = cpu_between(&a, &b);
            Some(result)
        } else {
            None
        };
        let metrics_end = services.metrics(&agent);
        services.stop();
        Ok(json!({
            "run": self.index,
            "prefix": self.prefix,
            "waited_for_idle_s": round(waited, 1),
            "events": data.lines.len(),
            "preload": {
                "seconds": round(preload, 3),
                "events_per_s": round(n / preload, 0),
                "cpu": preload_cpu,
            },
            "ceiling": {
                "seconds": round(ceiling_total, 3),
                "first_message_s": round(ceiling_first, 3),
                "events_per_s": round(n / ceiling_total, 0),
                "events_per_s_from_first_message": round(n / (ceiling_total - ceiling_first), 0),
                "cpu": ceiling_cpu,
            },
            "core_bound": {
                "seconds": round(core.seconds, 3),
                "events_per_s": round(n / core.seconds, 0),
                "ratio_to_ceiling": round(ceiling_total / core.seconds, 3),
                "outcomes": core.outcomes,
                "cpu": core_cpu,
            },
            "throughput": {
                "first_commit_s": first_commit.map(|s| round(s, 3)),
                "aggregator_done_s": round(agg_done, 3),
                "aggregator_events_per_s": round(n / agg_done, 0),
                "aggregator_steady_events_per_s": steady.map(|s| round(s, 0)),
                "lines_done_s": round(lines_done, 3),
                "rows_events_per_s": round(rows_rate, 0),
                "ratio_to_ceiling": round((n / agg_done) / (n / ceiling_total), 3),
                "rows_ratio_to_ceiling": round(rows_rate / (n / ceiling_total), 3),
                "lines": expected.len(),
                "lines_still_equal_after_1s": still_equal,
                "cpu_aggregating": cpu_between(&a, &b),
                "cpu_rating_tail": cpu_between(&b, &c),
                "metrics": metrics_after_throughput,
                "timeline": timeline
                    .iter()
                    .map(|(t, c)| json!([round(*t, 2), c]))
                    .collect::<Vec<_>>(),
            },
            "latency": latency,
            "metrics_end": metrics_end,
        }))
    }

    fn spawn(
        &self,
        services: &mut Services,
        args: &Args,
        service: &str,
        name: &str,
        port: u16,
    ) -> Result<()> {
        let log = fs::File::create(self.dir.join(format!("{name}.log")))?;
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(&args.tally)
            .args(["serve", service, "--config"])
            .arg(&self.config)
            .env("TALLY_INSTANCE_ID", name)
            .env("TALLY_AGGREGATOR_METRICS_LISTEN", &listen)
            .env("TALLY_RATER_METRICS_LISTEN", &listen)
            .env("RUST_LOG", &args.service_log)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", args.tally.display()))?;
        services.children.push((name.to_owned(), child, port));
        Ok(())
    }

    /// Produces every event, keyed by subject, as fast as Kafka takes them; returns
    /// the seconds until the last is acknowledged.
    fn preload(&self, args: &Args, data: &Data) -> Result<f64> {
        let producer = producer(&args.brokers, "20")?;
        let started = Instant::now();
        for line in &data.lines {
            send(
                &producer,
                &self.events_topic,
                data.key(line),
                data.payload(line),
            )?;
        }
        producer.flush(Duration::from_secs(300))?;
        let seconds = started.elapsed().as_secs_f64();
        let reader = self.group_reader(args, "preload-check")?;
        let stored: i64 = watermarks(&reader, &self.events_topic, args.partitions)?
            .iter()
            .sum();
        if stored != data.lines.len() as i64 {
            bail!(
                "the events topic holds {stored} records, {} were produced",
                data.lines.len()
            );
        }
        Ok(seconds)
    }

    /// A plain consumer in its own group reads the events topic and counts; returns
    /// the seconds from creating it to the last message, and to the first.
    fn ceiling(&self, args: &Args, n: usize) -> Result<(f64, f64)> {
        let started = Instant::now();
        // Fetching tuned as the aggregator's consumer is: with librdkafka's default
        // 1 s back-off once its prefetch queue is full, a fast reader sat idle for
        // most of some seconds and this ceiling moved between 0.45M and 1.5M events/s.
        let consumer: BaseConsumer = tally_runtime::kafka::tune_fetching(
            ClientConfig::new()
                .set("bootstrap.servers", &args.brokers)
                .set("group.id", format!("{}-ceiling", self.prefix))
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .set("isolation.level", "read_uncommitted")
                .set("partition.assignment.strategy", "cooperative-sticky")
                .set("session.timeout.ms", "10000")
                .set("heartbeat.interval.ms", "1000"),
        )
        .create()?;
        consumer.subscribe(&[&self.events_topic])?;
        let mut count = 0usize;
        let mut bytes = 0usize;
        let mut first = None;
        while count < n {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    if first.is_none() {
                        first = Some(started.elapsed().as_secs_f64());
                    }
                    count += 1;
                    bytes += message.payload_len();
                }
                Some(Err(e)) => eprintln!("ceiling consumer: {e}"),
                None => {}
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("the plain consumer read {count} of {n} in 300 s");
            }
        }
        let total = started.elapsed().as_secs_f64();
        if bytes == 0 {
            bail!("the plain consumer read empty messages");
        }
        consumer.unsubscribe();
        Ok((total, first.unwrap_or(0.0)))
    }

    /// Reads every event of the topic with the aggregator's core on one thread per
    /// partition, each with its own consumer (fetching tuned as the aggregator's), and
    /// writes nothing. Each thread decodes and applies every event and drains the
    /// changes every [`CORE_BOUND_DRAIN_EVENTS`] events as a commit would, without
    /// encoding or sending them: what is left out (transactions, the windows and
    /// changelog records, the rater) is work any exactly-once aggregator adds on top.
    fn core_bound(&self, args: &Args, config: &Config, grace: Duration) -> Result<CoreBound> {
        let started = Instant::now();
        let reader = self.group_reader(args, "core-bound")?;
        let ends = watermarks(&reader, &self.events_topic, args.partitions)?;
        let counted: Vec<BTreeMap<&'static str, u64>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..)
                .zip(&ends)
                .map(|(partition, &end)| {
                    scope.spawn(move || self.core_partition(args, config, grace, partition, end))
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<Result<_>>()
        })?;
        let seconds = started.elapsed().as_secs_f64();
        let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
        for (outcome, count) in counted.into_iter().flatten() {
            *outcomes.entry(outcome).or_default() += count;
        }
        let read: u64 = outcomes.values().sum();
        let stored: u64 = ends.iter().map(|&e| e.unsigned_abs()).sum();
        if read != stored {
            bail!("the core bound read {read} events of {stored}");
        }
        Ok(CoreBound {
            seconds,
            outcomes: json!(outcomes),
        })
    }

    /// One partition of [`Run::core_bound`], from its first offset to `end`; returns
    /// how many events had each outcome.
    fn core_partition(
        &self,
        args: &Args,
        config: &Config,
        grace: Duration,
        partition: i32,
        end: i64,
    ) -> Result<BTreeMap<&'static str, u64>> {
        let consumer: BaseConsumer = tally_runtime::kafka::tune_fetching(
            ClientConfig::new()
                .set("bootstrap.servers", &args.brokers)
                .set("group.id", format!("{}-core-bound", self.prefix))
                .set("enable.auto.commit", "false")
                .set("isolation.level", "read_uncommitted"),
        )
        .create()?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&self.events_topic, partition, Offset::Beginning)?;
        consumer.assign(&assignment)?;
        let mut aggregator = Aggregator::streaming(config).with_period_close(grace);
        let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut next = 0;
        let started = Instant::now();
        while next < end {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    next = message.offset() + 1;
                    let now = message
                        .timestamp()
                        .to_millis()
                        .and_then(chrono::DateTime::from_timestamp_millis)
                        .unwrap_or_else(chrono::Utc::now);
                    let outcome = match EventDecoder::new(config, now)
                        .decode(message.payload().unwrap_or_default())
                    {
                        Err(_) => "invalid",
                        Ok(event) => match aggregator.apply(&event) {
                            Outcome::Accepted | Outcome::Late | Outcome::Adjusted => "counted",
                            Outcome::Unmetered => "unmetered",
                            Outcome::Retry => "retry",
                            Outcome::Conflict => "conflict",
                            Outcome::TooLate => "too_late",
                            Outcome::Refused(_) => "refused",
                        },
                    };
                    *outcomes.entry(outcome).or_default() += 1;
                    if next % CORE_BOUND_DRAIN_EVENTS == 0 {
                        drop(aggregator.drain());
                    }
                    // No clock read per event: it cost about 5 % of this loop.
                    continue;
                }
                Some(Err(e)) => eprintln!("core bound consumer: {e}"),
                None => {}
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("the core bound read {next} of {end} in 300 s on partition {partition}");
            }
        }
        drop(aggregator.drain());
        Ok(outcomes)
    }

    /// A consumer with a group's id, to read its committed offsets (never subscribes).
    fn group_reader(&self, args: &Args, service: &str) -> Result<BaseConsumer> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &args.brokers)
            .set("group.id", format!("{}-{service}", self.prefix))
            .set("enable.auto.commit", "false")
            .create()?)
    }

    /// Paced load plus probes; see the module's documentation.
    fn latency(
        &self,
        args: &Args,
        data: &Data,
        clickhouse: &ClickHouse,
        poller: &BaseConsumer,
        services: &mut Services,
        rate: u64,
    ) -> Result<Value> {
        const PROBE_EVERY: Duration = Duration::from_millis(100);
        const POLL_EVERY: Duration = Duration::from_millis(50);
        let before = clickhouse.probe_quantity(&self.database).unwrap_or(0);
        if before != 0 {
            bail!("the probe customer already has {before} resolutions");
        }
        // Batching as the ingest service's producer does.
        let producer = producer(&args.brokers, "5")?;
        let metrics_before = services.metrics(&clickhouse.agent);
        let stop = Arc::new(AtomicBool::new(false));
        let polls = {
            let (clickhouse, database, stop) =
                (clickhouse.clone(), self.database.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut polls: Vec<(Instant, Instant, u64)> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let asked = Instant::now();
                    if let Some(q) = clickhouse.probe_quantity(&database) {
                        polls.push((asked, Instant::now(), q));
                    }
                    if let Some(rest) = POLL_EVERY.checked_sub(asked.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
                polls
            })
        };
        eprintln!(
            "latency: {rate} events/s for {} s, a probe every {} ms",
            args.latency_seconds,
            PROBE_EVERY.as_millis()
        );
        let duration = Duration::from_secs(args.latency_seconds);
        let started = Instant::now();
        let (mut sent, mut cursor, mut pass) = (0u64, 0usize, 0usize);
        let mut prefix = format!("lat{}-{pass}-", self.index);
        let mut probes: Vec<Instant> = Vec::new();
        let mut lag_max = 0i64;
        let mut last_lag = Instant::now();
        let ends_before: i64 = watermarks(poller, &self.events_topic, args.partitions)?
            .iter()
            .sum();
        loop {
            let elapsed = started.elapsed();
            if elapsed >= duration {
                break;
            }
            let due = (rate as f64 * elapsed.as_secs_f64()) as u64;
            while sent < due {
                let line = &data.lines[cursor];
                let payload = data.renamed(line, &prefix);
                send(&producer, &self.events_topic, data.key(line), &payload)?;
                sent += 1;
                cursor += 1;
                if cursor == data.lines.len() {
                    cursor = 0;
                    pass += 1;
                    prefix = format!("lat{}-{pass}-", self.index);
                }
            }
            let probes_due = (elapsed.as_millis() / PROBE_EVERY.as_millis()) as usize + 1;
            while probes.len() < probes_due {
                let k = probes.len() + 1;
                let probe = format!(
                    r#"{{"specversion":"1.0","id":"probe-{}-{k}","source":"bench-probe","type":"ai.resolution","subject":"{PROBE_CUSTOMER}","time":"{PROBE_TIME}","data":{{"conversation_id":"probe-{k}"}}}}"#,
                    self.index
                );
                probes.push(Instant::now());
                send(
                    &producer,
                    &self.events_topic,
                    Some(PROBE_CUSTOMER.as_bytes()),
                    probe.as_bytes(),
                )?;
            }
            producer.poll(Duration::ZERO);
            if last_lag.elapsed() >= Duration::from_secs(1) {
                last_lag = Instant::now();
                services.assert_running()?;
                let end: i64 = watermarks(poller, &self.events_topic, args.partitions)?
                    .iter()
                    .sum();
                let done: i64 = committed(poller, &self.events_topic, args.partitions)?
                    .iter()
                    .sum();
                lag_max = lag_max.max(end - done);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let load_seconds = started.elapsed().as_secs_f64();
        producer.flush(Duration::from_secs(60))?;
        // Wait for the last probe (or give up after 60 s).
        let want = probes.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = 0;
        while Instant::now() < deadline {
            last = clickhouse.probe_quantity(&self.database).unwrap_or(0);
            if last >= want {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // One more poll interval, so the poller's record covers the last probe.
        std::thread::sleep(POLL_EVERY * 2);
        stop.store(true, Ordering::Relaxed);
        let polls = polls
            .join()
            .map_err(|_| anyhow!("the ClickHouse poller panicked"))?;
        let end: i64 = watermarks(poller, &self.events_topic, args.partitions)?
            .iter()
            .sum();
        let metrics_after = services.metrics(&clickhouse.agent);
        let mean_of = |service: &str, metric: &str| -> Option<f64> {
            let delta = |suffix: &str| -> f64 {
                [&metrics_after, &metrics_before]
                    .map(|m| {
                        m[service][format!("{metric}_{suffix}")]
                            .as_f64()
                            .unwrap_or(0.0)
                    })
                    .into_iter()
                    .reduce(|after, before| after - before)
                    .unwrap_or(0.0)
            };
            let count = delta("count");
            (count > 0.0).then(|| round(delta("sum") / count * 1e3, 1))
        };
        let aggregator_name = services.pids().get(1).map(|p| p.0.clone());
        let stages = json!({
            "aggregator_commit_ms": aggregator_name.as_deref().and_then(|a| mean_of(a, "tally_aggregator_transaction_duration_seconds")),
            "aggregator_oldest_event_age_at_commit_ms": aggregator_name.as_deref().and_then(|a| mean_of(a, "tally_aggregator_window_latency_seconds")),
            "rater_oldest_update_age_at_store_ms": mean_of("rater", "tally_rater_rating_latency_seconds"),
            "clickhouse_insert_ms": mean_of("rater", "tally_clickhouse_insert_duration_seconds"),
        });
        let mut delays = Vec::new();
        let mut missing = 0;
        for (i, &sent_at) in probes.iter().enumerate() {
            let k = i as u64 + 1;
            match polls.iter().find(|(_, _, q)| *q >= k) {
                Some((_, answered, _)) => {
                    delays.push(answered.saturating_duration_since(sent_at).as_secs_f64())
                }
                None => missing += 1,
            }
        }
        delays.sort_by(f64::total_cmp);
        let query_ms: Vec<f64> = {
            let mut q: Vec<f64> = polls
                .iter()
                .map(|(a, b, _)| b.duration_since(*a).as_secs_f64() * 1e3)
                .collect();
            q.sort_by(f64::total_cmp);
            q
        };
        let pct = |v: &[f64], p: f64| -> Option<f64> {
            if v.is_empty() {
                return None;
            }
            let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
            Some(v[rank.min(v.len()) - 1])
        };
        let ms = |x: Option<f64>| x.map(|s| round(s * 1e3, 1));
        let result = json!({
            "target_events_per_s": rate,
            "events_sent": sent,
            "load_seconds": round(load_seconds, 3),
            "achieved_events_per_s": round(sent as f64 / load_seconds, 0),
            "events_topic_grew_by": end - ends_before,
            "probes": probes.len(),
            "probes_seen": delays.len(),
            "probes_missing": missing,
            "probe_quantity_final": last,
            "exactly_once_probes": last == want,
            "p50_ms": ms(pct(&delays, 50.0)),
            "p90_ms": ms(pct(&delays, 90.0)),
            "p99_ms": ms(pct(&delays, 99.0)),
            "max_ms": ms(delays.last().copied()),
            "min_ms": ms(delays.first().copied()),
            "polls": polls.len(),
            "poll_query_ms_p50": pct(&query_ms, 50.0).map(|x| round(x, 1)),
            "poll_query_ms_p99": pct(&query_ms, 99.0).map(|x| round(x, 1)),
            "aggregator_lag_max_events": lag_max,
            "stage_means": stages,
        });
        eprintln!(
            "latency: {} probes at {} events/s: p50 {} ms, p99 {} ms, max {} ms; aggregator lag at most {lag_max} events",
            probes.len(),
            result["achieved_events_per_s"],
            result["p50_ms"],
            result["p99_ms"],
            result["max_ms"]
        );
        Ok(result)
    }

    fn cleanup(&self, args: &Args, clickhouse: &ClickHouse) {
        if args.keep {
            eprintln!(
                "kept topics {}.* and database {}",
                self.prefix, self.database
            );
            return;
        }
        let _ = clickhouse.query(&format!("DROP DATABASE IF EXISTS {}", self.database));
        let deleted = (|| -> Result<()> {
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set("bootstrap.servers", &args.brokers)
                .create()?;
            let topics = self.topics();
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(admin.delete_topics(&names, &AdminOptions::new()))?;
            Ok(())
        })();
        if let Err(e) = deleted {
            eprintln!("warning: cannot delete the run's topics: {e:#}");
        }
    }
}

/// As the ingest service's producer: idempotent, acks from all replicas, lz4, and
/// Kafka's Java partitioner (murmur2) on the subject key.
fn producer(brokers: &str, linger_ms: &str) -> Result<BaseProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("compression.type", "lz4")
        .set("linger.ms", linger_ms)
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

fn send(producer: &BaseProducer, topic: &str, key: Option<&[u8]>, payload: &[u8]) -> Result<()> {
    loop {
        let mut record = BaseRecord::<[u8], [u8]>::to(topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// A `name = "value"` line for the run's configuration, or nothing for the default.
fn setting(name: &str, value: &Option<String>) -> String {
    value
        .as_ref()
        .map(|v| format!("{name} = \"{v}\"\n"))
        .unwrap_or_default()
}

/// What [`Run::core_bound`] measured.
struct CoreBound {
    seconds: f64,
    /// Events per outcome, over all partitions.
    outcomes: Value,
}

fn watermarks(consumer: &BaseConsumer, topic: &str, partitions: u32) -> Result<Vec<i64>> {
    (0..partitions as i32)
        .map(|p| {
            Ok(consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))?
                .1)
        })
        .collect()
}

fn committed(consumer: &BaseConsumer, topic: &str, partitions: u32) -> Result<Vec<i64>> {
    let mut list = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        list.add_partition(topic, p);
    }
    let got = consumer.committed_offsets(list, Duration::from_secs(10))?;
    Ok((0..partitions as i32)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        })
        .collect())
}

/// Events/s between the polls where 10 % and 90 % of the events were committed.
fn steady_rate(timeline: &[(f64, i64)], total: i64) -> Option<f64> {
    let at = |share: i64| timeline.iter().find(|(_, c)| *c * 100 >= total * share);
    let (t10, c10) = at(10)?;
    let (t90, c90) = at(90)?;
    (t90 > t10).then(|| (c90 - c10) as f64 / (t90 - t10))
}

fn get(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or(f64::NAN)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| !v.is_nan());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

const FIGURES: &[(&str, &[&str])] = &[
    ("preload events/s", &["preload", "events_per_s"]),
    ("ceiling events/s", &["ceiling", "events_per_s"]),
    (
        "ceiling events/s from first message",
        &["ceiling", "events_per_s_from_first_message"],
    ),
    ("core bound events/s", &["core_bound", "events_per_s"]),
    ("core bound / ceiling", &["core_bound", "ratio_to_ceiling"]),
    (
        "aggregator first commit s",
        &["throughput", "first_commit_s"],
    ),
    (
        "aggregator events/s",
        &["throughput", "aggregator_events_per_s"],
    ),
    (
        "aggregator steady events/s (10-90 %)",
        &["throughput", "aggregator_steady_events_per_s"],
    ),
    ("aggregator / ceiling", &["throughput", "ratio_to_ceiling"]),
    (
        "events/s to rows in ClickHouse",
        &["throughput", "rows_events_per_s"],
    ),
    ("rows / ceiling", &["throughput", "rows_ratio_to_ceiling"]),
    (
        "latency load events/s",
        &["latency", "achieved_events_per_s"],
    ),
    ("latency p50 ms", &["latency", "p50_ms"]),
    ("latency p99 ms", &["latency", "p99_ms"]),
    ("latency max ms", &["latency", "max_ms"]),
];

fn summarise(results: &[Value]) -> Value {
    let mut out = serde_json::Map::new();
    for (name, path) in FIGURES {
        let m = median(results.iter().map(|r| get(r, path)).collect());
        out.insert((*name).to_owned(), json!(m.is_finite().then_some(m)));
    }
    Value::Object(out)
}

fn print_run(result: &Value) {
    let cpu = |label: &str, v: &Value| {
        let procs = v["processes"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {}", v))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        eprintln!(
            "  cpu {label}: machine {} cores (steal {}, other {}): {procs}",
            v["machine_cores"], v["steal_cores"], v["other_cores"]
        );
    };
    cpu("preload", &result["preload"]["cpu"]);
    cpu("ceiling", &result["ceiling"]["cpu"]);
    cpu("core bound", &result["core_bound"]["cpu"]);
    cpu("aggregating", &result["throughput"]["cpu_aggregating"]);
    eprintln!(
        "    aggregator threads: {}",
        result["throughput"]["cpu_aggregating"]["aggregator_threads"]
    );
    cpu("rating tail", &result["throughput"]["cpu_rating_tail"]);
    if !result["latency"].is_null() {
        cpu("latency", &result["latency"]["cpu"]);
    }
}

fn print_summary(results: &[Value], summary: &Value) {
    println!();
    let mut header = format!("{:<40}", "figure");
    for r in results {
        let _ = write!(header, " {:>12}", format!("run {}", r["run"]));
    }
    let _ = write!(header, " {:>12}", "median");
    println!("{header}");
    for (name, path) in FIGURES {
        let mut row = format!("{name:<40}");
        for r in results {
            let _ = write!(row, " {:>12}", fmt(get(r, path)));
        }
        let _ = write!(
            row,
            " {:>12}",
            fmt(summary[*name].as_f64().unwrap_or(f64::NAN))
        );
        println!("{row}");
    }
}

fn fmt(x: f64) -> String {
    if x.is_nan() {
        "-".to_owned()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
    }
}
