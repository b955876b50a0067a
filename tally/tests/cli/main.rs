//! Black-box tests of the `tally` binary: small files in a temporary directory, the real
//! command, exact amounts.
//!
//! Every run passes `--now 2026-12-15T00:00:00Z` and uses event times in 2026-11 or
//! earlier, so nothing depends on today's date. Expected amounts are worked out by hand
//! in the comments.
//!
//! Fixtures shared by the modules are here; each module tests one command or concern.

// Helpers panic on unexpected input: that is how a test fails.
#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;
mod demo;
mod errors;
mod explain;
mod input;
mod rating;
mod reconcile;
mod services;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

const NOW: &str = "2026-12-15T00:00:00Z";

/// The issue's price book: a platform fee covering 100 resolutions, then graduated;
/// tokens per thousand per model.
const PRO: &str = r#"
[[meters]]
slug = "resolutions"
event_type = "ai.resolution"
aggregation = "count"

[[meters]]
slug = "tokens"
event_type = "llm.tokens"
aggregation = "sum"
value_property = "$.tokens"
group_by = { model = "$.model" }

[[plans]]
id = "pro"
currency = "usd"

[[plans.prices]]
id = "resolutions"
meter = "resolutions"
billing_scheme = "tiered"
tiers_mode = "graduated"
tiers = [
  { up_to = 100, flat_amount = "49" },
  { up_to = 1000, unit_amount = "0.89" },
  { up_to = "inf", unit_amount = "0.69" },
]

[[plans.prices]]
id = "gpt-tokens"
meter = "tokens"
billing_scheme = "per_unit"
unit_amount = "0.02"
transform_quantity = { divide_by = 1000, round = "up" }
filter = { model = "gpt-x" }

[[plans.prices]]
id = "claude-tokens"
meter = "tokens"
billing_scheme = "per_unit"
unit_amount = "0.03"
transform_quantity = { divide_by = 1000, round = "down" }
filter = { model = "claude-y" }

[[customers]]
id = "cust_acme"
plan = "pro"
discounts = [{ price = "resolutions", percent_off = "12.5" }]

[[customers]]
id = "cust_idle"
plan = "pro"
"#;

/// One customer, one price of `unit_amount` per event, in `currency` with `rounding`,
/// and an optional discount line.
fn per_event_config(currency: &str, rounding: &str, unit_amount: &str, discount: &str) -> String {
    format!(
        r#"
[[meters]]
slug = "calls"
event_type = "api.call"
aggregation = "count"

[[plans]]
id = "p"
currency = "{currency}"
rounding = "{rounding}"

[[plans.prices]]
id = "calls"
meter = "calls"
billing_scheme = "per_unit"
unit_amount = "{unit_amount}"

[[customers]]
id = "c"
plan = "p"
{discount}
"#
    )
}

/// A CloudEvents line.
fn event(id: &str, event_type: &str, subject: &str, time: &str, data: Option<Value>) -> String {
    let mut e = json!({
        "specversion": "1.0",
        "id": id,
        "source": "test",
        "type": event_type,
        "subject": subject,
        "time": time,
    });
    if let Some(data) = data {
        e["data"] = data;
    }
    e.to_string()
}

/// `n` resolutions of a customer in mid-November, ids `{prefix}-0..n`.
fn resolutions(prefix: &str, subject: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            event(
                &format!("{prefix}-{i}"),
                "ai.resolution",
                subject,
                "2026-11-24T10:15:00Z",
                Some(json!({"conversation_id": format!("c-{i}")})),
            )
        })
        .collect()
}

fn tokens(id: &str, subject: &str, model: &str, n: Value) -> String {
    event(
        id,
        "llm.tokens",
        subject,
        "2026-11-10T08:00:00Z",
        Some(json!({"tokens": n, "model": model})),
    )
}

/// The same JSON with whitespace between every token (pretty-printed on one line).
fn respaced(line: &str) -> String {
    let value: Value = serde_json::from_str(line).unwrap();
    serde_json::to_string_pretty(&value)
        .unwrap()
        .replace('\n', " ")
}

fn calls(subject: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            event(
                &format!("call-{i}"),
                "api.call",
                subject,
                "2026-11-02T00:00:00Z",
                None,
            )
        })
        .collect()
}

/// `command` (rate, explain) over events.jsonl for 2026-11 by tally.toml, with the
/// fixed clock.
fn month_args(command: &str) -> Vec<&str> {
    month_args_at(command, NOW)
}

/// [`month_args`] with another clock.
fn month_args_at<'a>(command: &'a str, now: &'a str) -> Vec<&'a str> {
    vec![
        command,
        "--config",
        "tally.toml",
        "--events",
        "events.jsonl",
        "--period",
        "2026-11",
        "--now",
        now,
    ]
}

/// A temporary directory holding tally.toml.
struct Fixture {
    dir: TempDir,
}

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Stdout as JSON lines.
    fn lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    fn succeeded(self) -> Self {
        assert_eq!(self.code, 0, "stderr:\n{}", self.stderr);
        self
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().expect("exited"),
            stdout: String::from_utf8(o.stdout).expect("utf-8 stdout"),
            stderr: String::from_utf8(o.stderr).expect("utf-8 stderr"),
        }
    }
}

impl Fixture {
    fn new(config: &str) -> Self {
        let f = Fixture {
            dir: TempDir::new().unwrap(),
        };
        f.write("tally.toml", config.as_bytes());
        f
    }

    /// `tally generate`'s November of 20,000 events (three of them malformed) for
    /// `customers` customers, in events.jsonl with its tally.toml.
    fn generated(customers: usize) -> Self {
        let f = Fixture::new("");
        let customers = customers.to_string();
        let generated = f
            .tally()
            .args([
                "generate",
                "--out",
                "events.jsonl",
                "--config-out",
                "tally.toml",
            ])
            .args([
                "--period",
                "2026-11",
                "--events",
                "20000",
                "--customers",
                &customers,
            ])
            .args(["--malformed", "3"])
            .output()
            .unwrap();
        Run::from(generated).succeeded();
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path(name), bytes).unwrap();
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn tally(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
        c.current_dir(self.dir.path());
        c
    }

    /// `tally rate` on `events` (written to events.jsonl) for 2026-11 in JSON, with the
    /// fixed clock, rejects in rejects.jsonl and the summary in summary.json.
    fn rate_bytes(&self, events: &[u8], extra: &[&str]) -> Run {
        self.write("events.jsonl", events);
        let mut args = month_args("rate");
        args.extend(["--rejects", "rejects.jsonl", "--summary", "summary.json"]);
        if !extra.contains(&"--format") {
            args.extend(["--format", "json"]);
        }
        args.extend(extra);
        self.tally().args(&args).output().unwrap().into()
    }

    /// `tally explain` of `customer` in events.jsonl for 2026-11, with the fixed clock.
    fn explain(&self, customer: &str, extra: &[&str]) -> Run {
        let mut args = month_args("explain");
        args.extend(["--customer", customer]);
        args.extend(extra);
        self.tally().args(&args).output().unwrap().into()
    }

    fn rate(&self, events: &[String], extra: &[&str]) -> Run {
        let mut text = events.join("\n");
        text.push('\n');
        self.rate_bytes(text.as_bytes(), extra)
    }

    fn summary(&self) -> Value {
        serde_json::from_str(&self.read("summary.json")).unwrap()
    }

    fn rejects(&self) -> Vec<Value> {
        self.read("rejects.jsonl")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn validate(&self) -> Run {
        self.tally()
            .args(["validate", "--config", "tally.toml"])
            .env("TALLY_INSTANCE_ID", "agg-1")
            .output()
            .unwrap()
            .into()
    }
}

/// The line of `customer` for `price`.
fn line<'a>(lines: &'a [Value], customer: &str, price: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["customer"] == customer && l["price"] == price)
        .unwrap_or_else(|| panic!("no line for {customer}/{price} in {lines:#?}"))
}

/// `[quantity, subtotal, discount, amount]` of a line, as printed.
fn money(line: &Value) -> [&str; 4] {
    ["quantity", "subtotal", "discount", "amount"].map(|k| {
        line[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k} is not a string in {line}"))
    })
}

fn concat(parts: &[Vec<String>]) -> Vec<String> {
    parts.concat()
}

/// Fails unless `text` contains each of `shown`.
fn assert_shows(text: &str, shown: &[&str]) {
    for part in shown {
        assert!(text.contains(part), "{part:?} in:\n{text}");
    }
}

const COMPUTE: &str = r#"
[[meters]]
slug = "seconds"
event_type = "gpu.seconds"
aggregation = "sum"
value_property = "$.seconds"

[[meters]]
slug = "peak"
event_type = "gpu.seconds"
aggregation = "max"
value_property = "$.seconds"

[[meters]]
slug = "users"
event_type = "app.active"
aggregation = "unique_count"
value_property = "$.user"

[[meters]]
slug = "seats"
event_type = "app.seats"
aggregation = "latest"
value_property = "$.seats"

[[plans]]
id = "metered"
currency = "usd"

[[plans.prices]]
id = "seconds"
meter = "seconds"
billing_scheme = "per_unit"
unit_amount = "1"

[[plans.prices]]
id = "peak"
meter = "peak"
billing_scheme = "per_unit"
unit_amount = "1"

[[plans.prices]]
id = "users"
meter = "users"
billing_scheme = "per_unit"
unit_amount = "10"

[[plans.prices]]
id = "seats"
meter = "seats"
billing_scheme = "per_unit"
unit_amount = "3"

[[customers]]
id = "c"
plan = "metered"
"#;

fn gpu(id: &str, seconds: Value) -> String {
    event(
        id,
        "gpu.seconds",
        "c",
        "2026-11-05T00:00:00Z",
        Some(json!({ "seconds": seconds })),
    )
}
