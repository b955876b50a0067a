//! Black-box tests of the `tally` binary: small files in a temporary directory, the real
//! command, exact amounts.
//!
//! Every run passes `--now 2026-12-15T00:00:00Z` and uses event times in 2026-11 or
//! earlier, so nothing depends on today's date. Expected amounts are worked out by hand
//! in the comments.

// Helpers panic on unexpected input: that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

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

// ---------------------------------------------------------------------------------------
// Rating: the issue's semantics, exact amounts
// ---------------------------------------------------------------------------------------

#[test]
fn version_names_the_commit_the_binary_was_built_from() {
    let version = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("--version")
        .output()
        .unwrap();
    // What the build was told, else the checkout's HEAD.
    let commit = std::env::var("TALLY_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .unwrap_or_else(|| {
            let head = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .unwrap();
            assert!(head.status.success(), "the tests run in a git checkout");
            String::from_utf8(head.stdout).unwrap()
        });
    assert_eq!(
        String::from_utf8(version.stdout).unwrap(),
        format!(
            "tally {} (commit {})\n",
            env!("CARGO_PKG_VERSION"),
            commit.trim()
        )
    );
}

#[test]
fn issue_example_250_resolutions_with_a_12_5_percent_discount() {
    let f = Fixture::new(PRO);
    let run = f.rate(&resolutions("r", "cust_acme", 250), &[]).succeeded();
    let lines = run.lines();
    let l = line(&lines, "cust_acme", "resolutions");
    // 100 in tier 1 for the flat 49, 150 x 0.89 = 133.50: 182.50.
    // 12.5 % of 182.50 = 22.8125 -> 22.81 (half_up); 182.50 - 22.81 = 159.69.
    assert_eq!(money(l), ["250", "182.50", "22.81", "159.69"]);
    assert_eq!(l["plan"], "pro");
    assert_eq!(l["meter"], "resolutions");
    assert_eq!(l["currency"], "usd");
    assert_eq!(l["period_start"], "2026-11-01T00:00:00Z");
    assert_eq!(l["period_end"], "2026-12-01T00:00:00Z");
    assert_eq!(
        l["tiers"],
        json!([
            {"tier": 1, "up_to": "100", "quantity": "100", "unit_amount": "0", "flat_amount": "49", "amount": "49"},
            {"tier": 2, "up_to": "1000", "quantity": "150", "unit_amount": "0.89", "flat_amount": "0", "amount": "133.5"},
        ])
    );
}

#[test]
fn every_json_line_has_the_documented_fields_with_decimals_as_strings() {
    let f = Fixture::new(PRO);
    let run = f.rate(&resolutions("r", "cust_acme", 3), &[]).succeeded();
    for l in run.lines() {
        let object = l.as_object().unwrap();
        for key in [
            "id",
            "config_hash",
            "customer",
            "plan",
            "price",
            "meter",
            "period_start",
            "period_end",
            "quantity",
            "subtotal",
            "discount",
            "amount",
            "currency",
            "tiers",
        ] {
            assert!(object.contains_key(key), "{key} missing from {l}");
        }
        for key in ["quantity", "subtotal", "discount", "amount"] {
            assert!(l[key].is_string(), "{key} is not a string in {l}");
        }
        for tier in l["tiers"].as_array().unwrap() {
            for key in ["quantity", "unit_amount", "flat_amount", "amount"] {
                assert!(tier[key].is_string(), "tiers.{key} is not a string in {l}");
            }
        }
    }
}

#[test]
fn graduated_tiers_across_all_three_tiers() {
    let f = Fixture::new(PRO);
    let run = f
        .rate(&resolutions("r", "cust_idle", 1200), &[])
        .succeeded();
    // 49 + 900 x 0.89 (801) + 200 x 0.69 (138) = 988.
    let l = line(&run.lines(), "cust_idle", "resolutions").clone();
    assert_eq!(money(&l), ["1200", "988.00", "0.00", "988.00"]);
    let quantities: Vec<&str> = l["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["quantity"].as_str().unwrap())
        .collect();
    assert_eq!(quantities, ["100", "900", "200"]);
}

#[test]
fn graduated_flat_amounts_are_added_for_each_tier_reached() {
    let config = PRO.replace(
        r#"{ up_to = 1000, unit_amount = "0.89" }"#,
        r#"{ up_to = 1000, unit_amount = "0.89", flat_amount = "10" }"#,
    );
    let f = Fixture::new(&config);
    // 100 resolutions stay in tier 1 (up_to is inclusive): 49, tier 2 not reached.
    let at_bound = f
        .rate(&resolutions("r", "cust_idle", 100), &[])
        .succeeded()
        .lines();
    let l = line(&at_bound, "cust_idle", "resolutions");
    assert_eq!(money(l), ["100", "49.00", "0.00", "49.00"]);
    assert_eq!(l["tiers"].as_array().unwrap().len(), 1);
    // 101 reach tier 2: 49 + 1 x 0.89 + 10 = 59.89.
    let past = f
        .rate(&resolutions("r", "cust_idle", 101), &[])
        .succeeded()
        .lines();
    let l = line(&past, "cust_idle", "resolutions");
    assert_eq!(money(l), ["101", "59.89", "0.00", "59.89"]);
    assert_eq!(
        l["tiers"][1],
        json!({"tier": 2, "up_to": "1000", "quantity": "1", "unit_amount": "0.89", "flat_amount": "10", "amount": "10.89"})
    );
}

#[test]
fn every_customer_gets_a_line_for_every_price_even_without_usage() {
    let f = Fixture::new(PRO);
    let run = f.rate(&[], &[]).succeeded();
    let lines = run.lines();
    let keys: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["customer"].as_str().unwrap().to_owned(),
                l["price"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("cust_acme", "resolutions"),
        ("cust_acme", "gpt-tokens"),
        ("cust_acme", "claude-tokens"),
        ("cust_idle", "resolutions"),
        ("cust_idle", "gpt-tokens"),
        ("cust_idle", "claude-tokens"),
    ]
    .map(|(c, p)| (c.to_owned(), p.to_owned()));
    assert_eq!(keys, expected);
    // The first tier's flat amount is billed at zero usage: 49, less 12.5 % (6.125 ->
    // 6.13 half_up) for acme = 42.87.
    assert_eq!(
        money(line(&lines, "cust_idle", "resolutions")),
        ["0", "49.00", "0.00", "49.00"]
    );
    assert_eq!(
        money(line(&lines, "cust_acme", "resolutions")),
        ["0", "49.00", "6.13", "42.87"]
    );
    assert_eq!(
        line(&lines, "cust_idle", "resolutions")["tiers"],
        json!([{"tier": 1, "up_to": "100", "quantity": "0", "unit_amount": "0", "flat_amount": "49", "amount": "49"}])
    );
    for price in ["gpt-tokens", "claude-tokens"] {
        assert_eq!(
            money(line(&lines, "cust_idle", price)),
            ["0", "0.00", "0.00", "0.00"]
        );
    }
}

#[test]
fn token_packages_round_up_or_down_and_prices_filter_by_model() {
    let f = Fixture::new(PRO);
    let events = vec![
        tokens("t1", "cust_acme", "gpt-x", json!(700)),
        tokens("t2", "cust_acme", "gpt-x", json!(800)),
        tokens("t3", "cust_acme", "claude-y", json!(1999)),
        tokens("t4", "cust_idle", "gpt-x", json!(2000)),
        tokens("t5", "cust_idle", "claude-y", json!(2000)),
        tokens("t6", "cust_acme", "llama-z", json!(500)),
    ];
    let run = f.rate(&events, &[]).succeeded();
    let lines = run.lines();
    // gpt-x, round up: 1500 tokens are 2 packages x 0.02 = 0.04.
    let gpt = line(&lines, "cust_acme", "gpt-tokens");
    assert_eq!(money(gpt), ["1500", "0.04", "0.00", "0.04"]);
    assert_eq!(gpt["tiers"][0]["quantity"], "2");
    // claude-y, round down: 1999 tokens are 1 whole package x 0.03 = 0.03.
    let claude = line(&lines, "cust_acme", "claude-tokens");
    assert_eq!(money(claude), ["1999", "0.03", "0.00", "0.03"]);
    assert_eq!(claude["tiers"][0]["quantity"], "1");
    // An exact multiple is the same either way: 2 packages.
    assert_eq!(
        money(line(&lines, "cust_idle", "gpt-tokens")),
        ["2000", "0.04", "0.00", "0.04"]
    );
    assert_eq!(
        money(line(&lines, "cust_idle", "claude-tokens")),
        ["2000", "0.06", "0.00", "0.06"]
    );
    // llama-z has no price in the plan: reported, not billed.
    assert_eq!(
        f.summary()["unpriced_usage"],
        json!([{"customer": "cust_acme", "meter": "tokens", "group": ["llama-z"], "quantity": "500"}])
    );
    assert!(
        run.stderr
            .contains("unbilled: 500 of meter tokens [\"llama-z\"] for \"cust_acme\""),
        "{}",
        run.stderr
    );
}

#[test]
fn negative_corrections_lower_a_sum_meters_line_to_no_less_than_zero() {
    // Also a price of every model's tokens, whose line adds the models up.
    let all_tokens = r#"[[plans.prices]]
id = "all-tokens"
meter = "tokens"
billing_scheme = "per_unit"
unit_amount = "0.00001"

[[customers]]
id = "cust_acme""#;
    let f = Fixture::new(
        &PRO.replace(
            "value_property = \"$.tokens\"",
            "value_property = \"$.tokens\"\nallow_negative_values = true",
        )
        .replacen("[[customers]]\nid = \"cust_acme\"", all_tokens, 1),
    );
    let events = vec![
        tokens("t1", "cust_acme", "gpt-x", json!(4000)),
        // A gateway reported 1500 too many: the correction under a new id.
        tokens("t1-fix", "cust_acme", "gpt-x", json!("-1500")),
        // Corrections of claude-y usage reported in another month outweigh its usage.
        tokens("t2", "cust_acme", "claude-y", json!(1000)),
        tokens("t2-fix", "cust_acme", "claude-y", json!(-3000)),
    ];
    let run = f.rate(&events, &[]).succeeded();
    let lines = run.lines();
    // 2500 tokens: 3 packages (rounded up) x 0.02.
    assert_eq!(
        money(line(&lines, "cust_acme", "gpt-tokens")),
        ["2500", "0.06", "0.00", "0.06"]
    );
    // -2000 bills as zero usage, never as a credit through the tiers.
    assert_eq!(
        money(line(&lines, "cust_acme", "claude-tokens")),
        ["0", "0.00", "0.00", "0.00"]
    );
    assert_eq!(f.summary()["accepted"], 4, "{}", f.summary());
    let explained = f
        .explain("cust_acme", &["--price", "claude-tokens"])
        .succeeded();
    assert!(
        explained
            .stdout
            .contains("(negative values are corrections)")
            && explained.stdout.contains(
                "model = claude-y: -2000 in 1 windows (corrections outweigh its usage: it counts as 0)"
            ),
        "{}",
        explained.stdout
    );
    // Each model on its own: claude-y's -2000 takes nothing off gpt-x's 2500, and the
    // days, which add both up, are said not to make the quantity.
    assert_eq!(
        money(line(&lines, "cust_acme", "all-tokens")),
        ["2500", "0.03", "0.00", "0.03"]
    );
    let all = f
        .explain("cust_acme", &["--price", "all-tokens"])
        .succeeded();
    assert!(
        all.stdout.contains(
            "            by day: Nov 10: 500\n            the days add up to 500; each group counted no less than zero (above), the month bills 2500\n"
        ),
        "{}",
        all.stdout
    );
}

const VOLUME: &str = r#"
[[meters]]
slug = "seats"
event_type = "seat.used"
aggregation = "count"

[[plans]]
id = "vol"
currency = "usd"

[[plans.prices]]
id = "seats"
meter = "seats"
billing_scheme = "tiered"
tiers_mode = "volume"
tiers = [
  { up_to = 10, unit_amount = "2", flat_amount = "5" },
  { up_to = "inf", unit_amount = "1", flat_amount = "20" },
]

[[customers]]
id = "none"
plan = "vol"

[[customers]]
id = "ten"
plan = "vol"

[[customers]]
id = "eleven"
plan = "vol"
"#;

#[test]
fn volume_tiers_price_every_unit_at_the_tier_the_total_reaches() {
    let f = Fixture::new(VOLUME);
    let seat = |who: &str, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                event(
                    &format!("{who}-{i}"),
                    "seat.used",
                    who,
                    "2026-11-15T12:00:00Z",
                    None,
                )
            })
            .collect()
    };
    let run = f
        .rate(&concat(&[seat("ten", 10), seat("eleven", 11)]), &[])
        .succeeded();
    let lines = run.lines();
    // 0 falls in the first tier: 0 x 2 + 5 = 5.
    assert_eq!(
        money(line(&lines, "none", "seats")),
        ["0", "5.00", "0.00", "5.00"]
    );
    // 10 is the first tier's inclusive bound: 10 x 2 + 5 = 25.
    assert_eq!(
        money(line(&lines, "ten", "seats")),
        ["10", "25.00", "0.00", "25.00"]
    );
    // 11 moves every unit to the second tier: 11 x 1 + 20 = 31.
    let eleven = line(&lines, "eleven", "seats");
    assert_eq!(money(eleven), ["11", "31.00", "0.00", "31.00"]);
    assert_eq!(
        eleven["tiers"],
        json!([{"tier": 2, "up_to": "inf", "quantity": "11", "unit_amount": "1", "flat_amount": "20", "amount": "31"}])
    );
}

#[test]
fn yen_has_no_minor_unit_and_rounds_per_the_plan() {
    // One call at 102.5 jpy: half_up 103, half_even 102 (2 is even).
    let up = Fixture::new(&per_event_config("jpy", "half_up", "102.5", ""));
    let l = up.rate(&calls("c", 1), &[]).succeeded().lines();
    assert_eq!(money(&l[0]), ["1", "103", "0", "103"]);
    assert_eq!(l[0]["currency"], "jpy");
    let even = Fixture::new(&per_event_config("jpy", "half_even", "102.5", ""));
    assert_eq!(
        money(&even.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "102", "0", "102"]
    );
    // 3 calls: 307.5 -> 308 either way (8 is even).
    assert_eq!(
        money(&even.rate(&calls("c", 3), &[]).succeeded().lines()[0]),
        ["3", "308", "0", "308"]
    );
}

#[test]
fn icelandic_krona_is_billed_in_whole_kronur_as_card_payments_allow() {
    // 40.10 isk a call: billed 40, written in Stripe's hundredths (`amount_minor`
    // 4000); 3 calls, 120.30, are billed 120.
    let isk = Fixture::new(&per_event_config("isk", "half_up", "40.10", ""));
    let l = isk.rate(&calls("c", 1), &[]).succeeded().lines();
    assert_eq!(money(&l[0]), ["1", "40.00", "0.00", "40.00"]);
    let l = isk.rate(&calls("c", 3), &[]).succeeded().lines();
    assert_eq!(money(&l[0]), ["3", "120.00", "0.00", "120.00"]);
}

#[test]
fn yen_discounts_round_to_whole_yen() {
    // 103 jpy, 50 % off: 51.5 -> 52 (half_up); 103 - 52 = 51.
    let f = Fixture::new(&per_event_config(
        "jpy",
        "half_up",
        "103",
        r#"discounts = [{ percent_off = "50" }]"#,
    ));
    assert_eq!(
        money(&f.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "103", "52", "51"]
    );
    // half_even: 51.5 -> 52 as well (2 is even); 101 x 50 % = 50.5 -> 50.
    let g = Fixture::new(&per_event_config(
        "jpy",
        "half_even",
        "101",
        r#"discounts = [{ percent_off = "50" }]"#,
    ));
    assert_eq!(
        money(&g.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "101", "50", "51"]
    );
}

#[test]
fn a_charge_past_28_decimals_is_rounded_once_not_refused() {
    // A price per GB-second and a float's text as usage: customer a's charge,
    // 0.000000000462963888888888925926, needs 30 decimals.
    let f = Fixture::new(
        r#"
[[meters]]
slug = "gbs"
event_type = "fn.run"
aggregation = "sum"
value_property = "$.gb_seconds"

[[plans]]
id = "p"
currency = "usd"

[[plans.prices]]
id = "compute"
meter = "gbs"
billing_scheme = "per_unit"
unit_amount = "0.0000166667"

[[customers]]
id = "a"
plan = "p"

[[customers]]
id = "b"
plan = "p"
"#,
    );
    let time = "2026-11-10T10:00:00Z";
    let runs = [
        event(
            "r1",
            "fn.run",
            "a",
            time,
            Some(json!({"gb_seconds": 2.777777777777778e-05})),
        ),
        event(
            "r2",
            "fn.run",
            "b",
            time,
            Some(json!({"gb_seconds": 360000})),
        ),
    ];
    let lines = f.rate(&runs, &[]).succeeded().lines();
    assert_eq!(
        money(line(&lines, "a", "compute")),
        ["0.00002777777777777778", "0.00", "0.00", "0.00"]
    );
    assert_eq!(
        money(line(&lines, "b", "compute")),
        ["360000", "6.00", "0.00", "6.00"]
    );
    // The breakdown shows a's tier amount to the 28 decimals a line's figures hold.
    assert_eq!(
        line(&lines, "a", "compute")["tiers"][0]["amount"],
        "0.0000000004629638888888889259"
    );
}

#[test]
fn kuwaiti_dinar_is_written_to_the_fils_and_billed_to_ten_fils() {
    // Card payments in kwd must end in a zero fils: one call at 0.025 kwd is billed
    // 0.030 half_up, 0.020 half_even (2 is even), written with three decimals.
    let up = Fixture::new(&per_event_config("kwd", "half_up", "0.025", ""));
    assert_eq!(
        money(&up.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "0.030", "0.000", "0.030"]
    );
    let even = Fixture::new(&per_event_config("kwd", "half_even", "0.025", ""));
    assert_eq!(
        money(&even.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "0.020", "0.000", "0.020"]
    );
    // 4 calls: 0.1 exactly.
    assert_eq!(
        money(&even.rate(&calls("c", 4), &[]).succeeded().lines()[0]),
        ["4", "0.100", "0.000", "0.100"]
    );
    // An amount off of one fils is finer than a card payment can take off.
    let refused = Fixture::new(&per_event_config(
        "kwd",
        "half_up",
        "1",
        r#"discounts = [{ price = "calls", amount_off = "0.005" }]"#,
    ));
    let run = refused.rate(&calls("c", 1), &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_shows(
        &run.stderr,
        &["0.005 has more decimals than kwd is billed in (2)"],
    );
}

#[test]
fn half_even_and_half_up_differ_only_on_a_tie() {
    let up = Fixture::new(&per_event_config("usd", "half_up", "0.125", ""));
    let even = Fixture::new(&per_event_config("usd", "half_even", "0.125", ""));
    // 1 x 0.125: a tie. half_up 0.13, half_even 0.12.
    assert_eq!(
        money(&up.rate(&calls("c", 1), &[]).succeeded().lines()[0])[1],
        "0.13"
    );
    assert_eq!(
        money(&even.rate(&calls("c", 1), &[]).succeeded().lines()[0])[1],
        "0.12"
    );
    // 3 x 0.125 = 0.375: a tie towards an even digit, 0.38 both ways.
    assert_eq!(
        money(&up.rate(&calls("c", 3), &[]).succeeded().lines()[0])[1],
        "0.38"
    );
    assert_eq!(
        money(&even.rate(&calls("c", 3), &[]).succeeded().lines()[0])[1],
        "0.38"
    );
    // 2 x 0.125 = 0.25: no rounding needed.
    assert_eq!(
        money(&up.rate(&calls("c", 2), &[]).succeeded().lines()[0])[1],
        "0.25"
    );
    assert_eq!(
        money(&even.rate(&calls("c", 2), &[]).succeeded().lines()[0])[1],
        "0.25"
    );
}

#[test]
fn the_discount_is_taken_from_the_rounded_subtotal() {
    // 0.125 rounds to a subtotal of 0.13; 50 % of 0.13 = 0.065 -> 0.07; amount 0.06.
    // (50 % of the unrounded 0.125 would give 0.0625 -> 0.06 and an amount of 0.07.)
    let f = Fixture::new(&per_event_config(
        "usd",
        "half_up",
        "0.125",
        r#"discounts = [{ percent_off = "50" }]"#,
    ));
    assert_eq!(
        money(&f.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "0.13", "0.07", "0.06"]
    );
    // half_even: subtotal 0.12; 50 % = 0.06 exactly; amount 0.06.
    let g = Fixture::new(&per_event_config(
        "usd",
        "half_even",
        "0.125",
        r#"discounts = [{ percent_off = "50" }]"#,
    ));
    assert_eq!(
        money(&g.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "0.12", "0.06", "0.06"]
    );
    // half_even on the discount itself: subtotal 0.25 (2 calls), 50 % = 0.125 -> 0.12.
    assert_eq!(
        money(&g.rate(&calls("c", 2), &[]).succeeded().lines()[0]),
        ["2", "0.25", "0.12", "0.13"]
    );
}

#[test]
fn a_full_percent_discount_leaves_nothing_to_pay() {
    let f = Fixture::new(&per_event_config(
        "usd",
        "half_up",
        "1.99",
        r#"discounts = [{ percent_off = "100" }]"#,
    ));
    assert_eq!(
        money(&f.rate(&calls("c", 3), &[]).succeeded().lines()[0]),
        ["3", "5.97", "5.97", "0.00"]
    );
}

#[test]
fn amount_off_is_capped_at_the_subtotal() {
    // 3 calls x 1.50 = 4.50, 2 off: 2.50.
    let f = Fixture::new(&per_event_config(
        "usd",
        "half_up",
        "1.50",
        r#"discounts = [{ price = "calls", amount_off = "2" }]"#,
    ));
    assert_eq!(
        money(&f.rate(&calls("c", 3), &[]).succeeded().lines()[0]),
        ["3", "4.50", "2.00", "2.50"]
    );
    // 1 call = 1.50: the discount is capped at 1.50 and the amount is 0, never negative.
    assert_eq!(
        money(&f.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "1.50", "1.50", "0.00"]
    );
    // No usage: nothing to discount.
    assert_eq!(
        money(&f.rate(&[], &[]).succeeded().lines()[0]),
        ["0", "0.00", "0.00", "0.00"]
    );
}

#[test]
fn an_amount_off_without_a_price_stops_rating_with_where_and_why() {
    let config = PRO.replace(
        r#"discounts = [{ price = "resolutions", percent_off = "12.5" }]"#,
        r#"discounts = [{ amount_off = "60" }]"#,
    );
    let f = Fixture::new(&config);
    let run = f.rate(&[], &[]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr
            .contains("customers[cust_acme].discounts[0].price")
            && run
                .stderr
                .contains("an amount_off needs the price it applies to"),
        "{}",
        run.stderr
    );
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

#[test]
fn decimal_usage_stays_exact() {
    let f = Fixture::new(COMPUTE);
    // 5.001 stays 5.001; 0.1 + 0.2 is 0.3, not 0.30000000000000004. A numeric string
    // and an exponent count too: 5.001 + 0.1 + 0.2 + 12 + 1000 = 1017.301.
    let raw = [
        r#"{"specversion":"1.0","id":"g1","source":"s","type":"gpu.seconds","subject":"c","time":"2026-11-05T00:00:00Z","data":{"seconds":5.001}}"#,
        r#"{"specversion":"1.0","id":"g2","source":"s","type":"gpu.seconds","subject":"c","time":"2026-11-05T00:00:00Z","data":{"seconds":0.1}}"#,
        r#"{"specversion":"1.0","id":"g3","source":"s","type":"gpu.seconds","subject":"c","time":"2026-11-05T00:00:00Z","data":{"seconds":0.2}}"#,
        r#"{"specversion":"1.0","id":"g4","source":"s","type":"gpu.seconds","subject":"c","time":"2026-11-05T00:00:00Z","data":{"seconds":"12"}}"#,
        r#"{"specversion":"1.0","id":"g5","source":"s","type":"gpu.seconds","subject":"c","time":"2026-11-05T00:00:00Z","data":{"seconds":1e3}}"#,
    ];
    let run = f.rate(&raw.map(String::from), &[]).succeeded();
    let lines = run.lines();
    assert_eq!(
        money(line(&lines, "c", "seconds")),
        ["1017.301", "1017.30", "0.00", "1017.30"]
    );
    assert_eq!(
        line(&lines, "c", "seconds")["tiers"][0]["amount"],
        "1017.301"
    );

    let one = f.rate(&[raw[0].to_owned()], &[]).succeeded();
    let lines = one.lines();
    assert_eq!(
        money(line(&lines, "c", "seconds")),
        ["5.001", "5.00", "0.00", "5.00"]
    );
    assert_eq!(
        money(line(&lines, "c", "peak")),
        ["5.001", "5.00", "0.00", "5.00"]
    );
}

#[test]
fn max_unique_count_and_latest_meters_through_the_binary() {
    let f = Fixture::new(COMPUTE);
    let active = |id: &str, user: Value| {
        event(
            id,
            "app.active",
            "c",
            "2026-11-06T00:00:00Z",
            Some(json!({ "user": user })),
        )
    };
    let seats = |id: &str, time: &str, n: u32| {
        event(id, "app.seats", "c", time, Some(json!({ "seats": n })))
    };
    let events = vec![
        gpu("g1", json!(7)),
        gpu("g2", json!(2.5)),
        active("a1", json!("alice")),
        active("a2", json!("bob")),
        active("a3", json!("alice")),
        active("a4", json!(1)),
        active("a5", json!("1")),
        // Latest by event time, not by position in the file: 12 seats on the 20th wins.
        seats("s1", "2026-11-20T00:00:00Z", 12),
        seats("s2", "2026-11-03T00:00:00Z", 40),
    ];
    let run = f.rate(&events, &[]).succeeded();
    let lines = run.lines();
    assert_eq!(
        money(line(&lines, "c", "peak")),
        ["7", "7.00", "0.00", "7.00"]
    );
    // alice, bob and 1 (the number 1 and the string "1" are one value): 3 x 10.
    assert_eq!(
        money(line(&lines, "c", "users")),
        ["3", "30.00", "0.00", "30.00"]
    );
    assert_eq!(
        money(line(&lines, "c", "seats")),
        ["12", "36.00", "0.00", "36.00"]
    );
    assert_eq!(
        money(line(&lines, "c", "seconds")),
        ["9.5", "9.50", "0.00", "9.50"]
    );
}

#[test]
fn a_latest_meter_by_group_bills_each_groups_latest_value_added_up() {
    let f = Fixture::new(
        r#"
[[meters]]
slug = "seats"
event_type = "app.seats"
aggregation = "latest"
value_property = "$.seats"
group_by = { team = "$.team" }

[[plans]]
id = "teams"
currency = "usd"

[[plans.prices]]
id = "seats"
meter = "seats"
billing_scheme = "per_unit"
unit_amount = "10"

[[customers]]
id = "c"
plan = "teams"
"#,
    );
    let seats = |id: &str, team: &str, day: &str, n: u32| {
        let time = format!("2026-11-{day}T09:00:00Z");
        let data = json!({ "team": team, "seats": n });
        event(id, "app.seats", "c", &time, Some(data))
    };
    // Team a has 50 seats (its 40 of the 3rd replaced on the 10th), team b 2: 52.
    let events = vec![
        seats("s1", "a", "03", 40),
        seats("s2", "a", "10", 50),
        seats("s3", "b", "20", 2),
    ];
    let lines = f.rate(&events, &[]).succeeded().lines();
    assert_eq!(money(&lines[0]), ["52", "520.00", "0.00", "520.00"]);
    // `rate` left the events in events.jsonl, which `explain` reads.
    let run = f.explain("c", &[]).succeeded();
    assert_shows(
        &run.stdout,
        &["  quantity  52: meter seats takes $.seats of the latest app.seats event of each group, added up\n            team = a: 50, set by the event of 2026-11-10T09:00:00+00:00\n            team = b: 2, set by the event of 2026-11-20T09:00:00+00:00\n            (each group's latest value, added up)\n"],
    );
}

// ---------------------------------------------------------------------------------------
// The period: UTC calendar month, offsets normalised
// ---------------------------------------------------------------------------------------

#[test]
fn event_times_are_normalised_to_utc_at_period_boundaries() {
    let f = Fixture::new(PRO);
    let at = |id: &str, time: &str| event(id, "ai.resolution", "cust_idle", time, None);
    let events = vec![
        at("in-1", "2026-11-01T00:00:00Z"), // first instant of the period
        at("in-2", "2026-12-01T00:30:00+01:00"), // 2026-11-30T23:30:00Z
        at("in-3", "2026-11-30T23:59:59.999999999Z"), // last instant
        at("in-4", "2026-11-30T18:59:59-05:00"), // 2026-11-30T23:59:59Z
        at("out-1", "2026-12-01T00:00:00Z"), // first instant of the next period
        at("out-2", "2026-11-01T00:30:00+01:00"), // 2026-10-31T23:30:00Z
        at("out-3", "2026-10-31T23:59:59.999Z"),
        at("out-4", "2026-11-30T19:00:00-05:00"), // 2026-12-01T00:00:00Z
        at("out-5", "2026-11-01T05:29:00+05:30"), // 2026-10-31T23:59:00Z
        at("out-6", "2026-12-10T09:00:00Z"),      // December, before the clock
    ];
    let run = f.rate(&events, &[]).succeeded();
    assert_eq!(
        money(line(&run.lines(), "cust_idle", "resolutions"))[0],
        "4"
    );
    let summary = f.summary();
    assert_eq!(summary["accepted"], 4);
    assert_eq!(summary["outside_period"], 6);
    assert_eq!(summary["events_read"], 10);
}

#[test]
fn other_periods_are_rated_with_their_own_bounds() {
    let f = Fixture::new(PRO);
    f.write(
        "events.jsonl",
        format!(
            "{}\n{}\n",
            event(
                "a",
                "ai.resolution",
                "cust_idle",
                "2026-10-31T23:30:00Z",
                None
            ),
            event(
                "b",
                "ai.resolution",
                "cust_idle",
                "2026-11-01T00:30:00+01:00",
                None
            )
        )
        .as_bytes(),
    );
    let run: Run = f
        .tally()
        .args([
            "rate",
            "--config",
            "tally.toml",
            "--events",
            "events.jsonl",
            "--period",
            "2026-10",
        ])
        .args(["--format", "json", "--now", NOW])
        .output()
        .unwrap()
        .into();
    let lines = run.succeeded().lines();
    let l = line(&lines, "cust_idle", "resolutions");
    assert_eq!(l["period_start"], "2026-10-01T00:00:00Z");
    assert_eq!(l["period_end"], "2026-11-01T00:00:00Z");
    assert_eq!(l["quantity"], "2");
}

#[test]
fn a_plan_change_rates_each_period_with_the_plan_of_that_period() {
    // From November cust_acme is on pro_2027, resolutions at 0.50 each without the
    // platform fee and without pro's discount; cust_idle stays on pro.
    let f = Fixture::new(&format!(
        r#"{PRO}
[[plans]]
id = "pro_2027"
currency = "usd"

[[plans.prices]]
id = "resolutions"
meter = "resolutions"
billing_scheme = "per_unit"
unit_amount = "0.50"

[[customers]]
id = "cust_moved"
plan = "pro"
discounts = [{{ price = "resolutions", percent_off = "12.5" }}]

[[customers.plan_changes]]
from = "2026-11"
plan = "pro_2027"
"#
    ));
    let events: Vec<String> = ["2026-10-20T10:00:00Z", "2026-11-03T10:00:00Z"]
        .iter()
        .enumerate()
        .flat_map(|(month, time)| {
            (0..3).map(move |i| {
                event(
                    &format!("{month}-{i}"),
                    "ai.resolution",
                    "cust_moved",
                    time,
                    None,
                )
            })
        })
        .collect();
    f.write(
        "events.jsonl",
        format!("{}\n", events.join("\n")).as_bytes(),
    );
    let rate = |period: &str| -> Vec<Value> {
        let run: Run = (f.tally())
            .args(["rate", "--config", "tally.toml", "--events", "events.jsonl"])
            .args(["--period", period, "--format", "json", "--now", NOW])
            .output()
            .unwrap()
            .into();
        run.succeeded().lines()
    };
    let prices = |lines: &[Value], customer: &str| -> Vec<(String, String)> {
        (lines.iter())
            .filter(|l| l["customer"] == customer)
            .map(|l| (l["plan"].to_string(), l["price"].to_string()))
            .collect()
    };
    let pro = [
        ("\"pro\"".to_owned(), "\"resolutions\"".to_owned()),
        ("\"pro\"".to_owned(), "\"gpt-tokens\"".to_owned()),
        ("\"pro\"".to_owned(), "\"claude-tokens\"".to_owned()),
    ];

    let october = rate("2026-10");
    assert_eq!(prices(&october, "cust_moved"), pro);
    let warned = Run::from(
        (f.tally())
            .args(["validate", "--config", "tally.toml"])
            .output()
            .unwrap(),
    )
    .succeeded();
    assert!(
        warned.stdout.contains(
            "warning: customers[cust_moved].plan_changes[0].discounts: the discounts before this change (resolutions) end with it"
        ),
        "{}",
        warned.stdout
    );
    // 3 resolutions within pro's platform fee of 49.00, 12.5 % off: 6.125 rounds to 6.13.
    assert_eq!(
        money(line(&october, "cust_moved", "resolutions")),
        ["3", "49.00", "6.13", "42.87"]
    );

    let november = rate("2026-11");
    let explained = f.explain("cust_moved", &[]).succeeded().stdout;
    assert!(
        explained.contains("  plan pro_2027, usd; each line of the month rounded half_up to 2 decimals\n  moved to plan pro_2027 this month by a plan change; 2026-10 was billed on plan pro\n"),
        "{explained}"
    );
    assert_eq!(
        prices(&november, "cust_moved"),
        [("\"pro_2027\"".to_owned(), "\"resolutions\"".to_owned())]
    );
    assert_eq!(
        money(line(&november, "cust_moved", "resolutions")),
        ["3", "1.50", "0.00", "1.50"]
    );
    assert_eq!(prices(&november, "cust_idle"), pro);
}

// ---------------------------------------------------------------------------------------
// Dedupe, summary, unknowns
// ---------------------------------------------------------------------------------------

#[test]
fn duplicates_and_conflicts_are_counted_and_the_first_event_wins() {
    let f = Fixture::new(PRO);
    let first = tokens("t1", "cust_acme", "gpt-x", json!(1000));
    let events = vec![
        first.clone(),
        // An identical resend.
        first.clone(),
        // The same event re-serialised with spaces and newlines turned into spaces:
        // still a duplicate.
        respaced(&first),
        // Same (source, id), different payload: a conflict, dropped.
        tokens("t1", "cust_acme", "gpt-x", json!(9000)),
        // Same (source, id), different customer: a conflict too.
        tokens("t1", "cust_idle", "gpt-x", json!(1000)),
        // Same id from another source: a different event.
        first.replace(r#""source":"test""#, r#""source":"other""#),
        // Same time written with another offset: a duplicate.
        first.replace("2026-11-10T08:00:00Z", "2026-11-10T09:00:00+01:00"),
    ];
    let run = f.rate(&events, &[]).succeeded();
    let lines = run.lines();
    // t1 from "test" and t1 from "other": 2000 tokens, 2 packages x 0.02.
    assert_eq!(
        money(line(&lines, "cust_acme", "gpt-tokens")),
        ["2000", "0.04", "0.00", "0.04"]
    );
    assert_eq!(money(line(&lines, "cust_idle", "gpt-tokens"))[0], "0");
    let s = f.summary();
    assert_eq!(s["events_read"], 7);
    assert_eq!(s["accepted"], 2);
    assert_eq!(s["duplicates"], 3);
    assert_eq!(s["conflicts"], 2);
    assert!(
        run.stderr.contains("3 duplicates + 2 conflicts"),
        "{}",
        run.stderr
    );
    // The conflicting resends are kept where rejects are, so support can tell which
    // event was dropped; identical resends are not.
    let rejects = f.rejects();
    let kept: Vec<(&Value, &Value, &Value)> = (rejects.iter())
        .map(|r| (&r["line"], &r["field"], &r["code"]))
        .collect();
    assert_eq!(
        kept,
        [
            (&json!(4), &json!("id"), &json!("conflict")),
            (&json!(5), &json!("id"), &json!("conflict"))
        ]
    );
    assert_eq!(rejects[0]["raw"], json!(events[3]));
    assert!(
        run.stderr.contains(
            "2 rejected lines in rejects.jsonl (2 of them conflicting resends of counted events)"
        ),
        "{}",
        run.stderr
    );
}

#[test]
fn the_summary_reconciles_every_line_read() {
    // cust_later is billed from December on.
    let f = Fixture::new(&format!(
        "{PRO}\n[[customers]]\nid = \"cust_later\"\nplan = \"pro\"\nfrom = \"2026-12\"\n"
    ));
    let events = vec![
        event(
            "e1",
            "ai.resolution",
            "cust_acme",
            "2026-11-02T00:00:00Z",
            None,
        ),
        event(
            "e1",
            "ai.resolution",
            "cust_acme",
            "2026-11-02T00:00:00Z",
            None,
        ),
        event(
            "e1",
            "ai.resolution",
            "cust_acme",
            "2026-11-03T00:00:00Z",
            None,
        ),
        "{not json".to_owned(),
        event(
            "e2",
            "ai.resolution",
            "cust_acme",
            "2026-10-02T00:00:00Z",
            None,
        ),
        event(
            "e3",
            "ai.handoff",
            "cust_acme",
            "2026-11-02T00:00:00Z",
            None,
        ),
        event(
            "e4",
            "ai.resolution",
            "cust_ghost",
            "2026-11-02T00:00:00Z",
            None,
        ),
        event(
            "e5",
            "ai.resolution",
            "cust_ghost",
            "2026-11-03T00:00:00Z",
            None,
        ),
        tokens("e6", "cust_acme", "llama-z", json!(10)),
        event(
            "e7",
            "ai.resolution",
            "cust_later",
            "2026-11-03T00:00:00Z",
            None,
        ),
    ];
    let run = f.rate(&events, &[]).succeeded();
    assert_eq!(
        f.summary(),
        json!({
            "period": "2026-11",
            "unfinished": false,
            "events_read": 10,
            "accepted": 3,
            "duplicates": 1,
            "conflicts": 1,
            "rejected": 1,
            "rejected_by_reason": {"invalid_json": 1},
            "outside_period": 1,
            "outside_period_by_month": {"2026-10": 1},
            "unknown_event_types": {"ai.handoff": 1},
            "unknown_customers": {"cust_ghost": 2},
            "too_late": 0,
            "refused": 0,
            "unpriced_usage": [{"customer": "cust_acme", "meter": "tokens", "group": ["llama-z"], "quantity": "10"}],
            "unsubscribed_usage": [{"customer": "cust_later", "meter": "resolutions", "group": [], "quantity": "1"}],
        })
    );
    assert!(
        run.stderr.contains(
            "period 2026-11: 10 events read = 3 counted + 1 duplicates + 1 conflicts + 1 rejected + 1 outside the period + 1 of unknown types + 2 of unknown customers"
        ),
        "{}",
        run.stderr
    );
    // October's event arrived after October was billed: finance is told where it is.
    assert!(
        run.stderr.contains(
            "outside the period, by month: 2026-10: 1 (an earlier month's events may be late usage that the run which billed it lacked: if so, rate it again and compare the two with `tally reconcile`)"
        ),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains(r#"unbilled: 1 event of type "ai.handoff", which no meter reads"#),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(
            r#"unbilled: 2 events for customer "cust_ghost", who is not in the configuration"#
        ),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(
            r#"unbilled: 1 of meter resolutions [] for "cust_later": not billed in 2026-11 (before its from or after its through)"#
        ),
        "{}",
        run.stderr
    );
    // Unknown customers, and customers not billed in the period, get no lines.
    let lines = run.lines();
    assert!(lines.iter().all(|l| l["customer"] != "cust_ghost"));
    assert!(lines.iter().all(|l| l["customer"] != "cust_later"));
}

// ---------------------------------------------------------------------------------------
// Bad lines
// ---------------------------------------------------------------------------------------

/// Every kind of bad line, one per line, with the field and code it is rejected with
/// (`None` for the two good lines and the blank one).
fn bad_lines() -> (Vec<u8>, Vec<(u64, &'static str, &'static str)>) {
    let good = |id: &str| {
        event(
            id,
            "llm.tokens",
            "cust_acme",
            "2026-11-10T08:00:00Z",
            Some(json!({"tokens": 1000, "model": "gpt-x"})),
        )
    };
    // A good line under id `bad-{n}` with one piece of text replaced.
    let spoil = |n: u64, from: &str, to: &str| {
        let line = good(&format!("bad-{n}"));
        assert!(line.contains(from), "{line} has no {from}");
        line.replacen(from, to, 1).into_bytes()
    };
    let mut not_utf8 = good("bad-3").into_bytes();
    let underscore = not_utf8.windows(9).position(|w| w == b"cust_acme").unwrap() + 4;
    not_utf8[underscore] = 0xff;
    type Row = (Vec<u8>, Option<(&'static str, &'static str)>);
    let rows: Vec<Row> = vec![
        (good("good-1").into_bytes(), None),
        (
            b"{\"specversion\":\"1.0\", this is not json".to_vec(),
            Some(("event", "invalid_json")),
        ),
        (not_utf8, Some(("event", "invalid_utf8"))),
        (
            spoil(4, r#""subject":"cust_acme","#, ""),
            Some(("subject", "missing_field")),
        ),
        (
            spoil(5, r#""id":"bad-5""#, r#""id":81"#),
            Some(("id", "wrong_type")),
        ),
        (
            spoil(6, "1000", r#""lots""#),
            Some(("data.tokens", "not_a_number")),
        ),
        (
            spoil(7, "1000", "-5"),
            Some(("data.tokens", "negative_value")),
        ),
        (
            spoil(8, "2026-11-10T08:00:00Z", "2099-01-01T00:00:00Z"),
            Some(("time", "time_in_future")),
        ),
        (
            spoil(9, r#""specversion":"1.0""#, r#""specversion":"0.3""#),
            Some(("specversion", "unsupported_specversion")),
        ),
        (
            spoil(
                10,
                r#""subject":"cust_acme""#,
                r#""subject":"cust_acme","subject":"cust_idle""#,
            ),
            Some(("subject", "duplicate_field")),
        ),
        (Vec::new(), None),
        (
            spoil(12, "2026-11-10T08:00:00Z", "10 Nov 2026"),
            Some(("time", "invalid_time")),
        ),
        (b"[]".to_vec(), Some(("event", "not_an_object"))),
        (good("good-14").into_bytes(), None),
    ];
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for (number, (line, reject)) in (1u64..).zip(rows) {
        bytes.extend(line);
        bytes.push(b'\n');
        if let Some((field, code)) = reject {
            expected.push((number, field, code));
        }
    }
    (bytes, expected)
}

#[test]
fn every_kind_of_bad_line_is_rejected_with_line_field_and_code_and_the_run_continues() {
    let f = Fixture::new(PRO);
    let (input, expected) = bad_lines();
    let run = f.rate_bytes(&input, &[]).succeeded();
    let rejects = f.rejects();
    let got: Vec<(u64, String, String)> = rejects
        .iter()
        .map(|r| {
            (
                r["line"].as_u64().unwrap(),
                r["field"].as_str().unwrap().to_owned(),
                r["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(u64, String, String)> = expected
        .iter()
        .map(|(l, f, c)| (*l, f.to_string(), c.to_string()))
        .collect();
    assert_eq!(got, expected);
    for r in &rejects {
        assert!(!r["reason"].as_str().unwrap().is_empty(), "{r}");
        assert!(r["raw"].is_string(), "{r}");
    }
    assert_eq!(
        rejects[0]["raw"],
        "{\"specversion\":\"1.0\", this is not json"
    );
    assert_eq!(
        rejects[5]["reason"],
        "usage must not be negative (only a sum meter with allow_negative_values = true takes corrections)"
    );
    // The raw line is kept, lossily; the reason gives the offset of the bad byte.
    let raw = rejects[1]["raw"].as_str().unwrap();
    assert!(raw.contains("\"subject\":\"cust\u{fffd}acme\""), "{raw}");
    let offset = raw.find('\u{fffd}').unwrap();
    assert_eq!(
        rejects[1]["reason"],
        format!("line is not valid UTF-8 (first bad byte at offset {offset})")
    );
    // The two good lines (1 and 14) are billed: 2000 tokens, 2 packages x 0.02.
    assert_eq!(
        money(line(&run.lines(), "cust_acme", "gpt-tokens")),
        ["2000", "0.04", "0.00", "0.04"]
    );
    let s = f.summary();
    assert_eq!(s["events_read"], 13, "the blank line is not an event");
    assert_eq!(s["accepted"], 2);
    assert_eq!(s["rejected"], 11);
    assert_eq!(
        s["rejected_by_reason"],
        json!({
            "duplicate_field": 1, "invalid_json": 1, "invalid_time": 1, "invalid_utf8": 1,
            "missing_field": 1, "negative_value": 1, "not_a_number": 1, "not_an_object": 1,
            "time_in_future": 1, "unsupported_specversion": 1, "wrong_type": 1,
        })
    );
    assert!(
        run.stderr.contains("11 rejected lines in rejects.jsonl"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("rejected invalid_utf8: 1"),
        "{}",
        run.stderr
    );
}

#[test]
fn strict_mode_stops_at_the_first_bad_line_naming_it() {
    let f = Fixture::new(PRO);
    let (input, _) = bad_lines();
    let run = f.rate_bytes(&input, &["--strict"]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "", "no invoice lines on failure");
    assert!(
        run.stderr.contains("error: line 2: event: invalid JSON"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("--strict"), "{}", run.stderr);

    let missing = event(
        "x",
        "ai.resolution",
        "cust_acme",
        "2026-11-10T08:00:00Z",
        None,
    )
    .replace(r#""subject":"cust_acme","#, "");
    let input = format!(
        "{}\n\n{missing}\n",
        event(
            "ok",
            "ai.resolution",
            "cust_acme",
            "2026-11-10T08:00:00Z",
            None
        )
    );
    let run = f.rate_bytes(input.as_bytes(), &["--strict"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("line 3: subject: required field is missing or null"),
        "{}",
        run.stderr
    );
}

#[test]
fn strict_mode_on_clean_input_rates_normally() {
    let f = Fixture::new(PRO);
    let events = resolutions("r", "cust_acme", 250);
    let strict = f.rate(&events, &["--strict"]).succeeded().stdout;
    let lax = f.rate(&events, &[]).succeeded().stdout;
    assert_eq!(strict, lax);
}

#[test]
fn line_numbers_count_blank_lines_and_crlf_endings() {
    let f = Fixture::new(PRO);
    let good = event(
        "g",
        "ai.resolution",
        "cust_acme",
        "2026-11-10T08:00:00Z",
        None,
    );
    let input = format!(
        "{good}\r\n\r\n\n   \nnope\r\n{}\r\n",
        good.replace(r#""g""#, r#""h""#)
    );
    let run = f.rate_bytes(input.as_bytes(), &[]).succeeded();
    let rejects = f.rejects();
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0]["line"], 5);
    assert_eq!(rejects[0]["raw"], "nope");
    assert_eq!(
        line(&run.lines(), "cust_acme", "resolutions")["quantity"],
        "2"
    );
}

#[test]
fn events_ahead_of_the_clock_by_more_than_the_skew_are_rejected() {
    let f = Fixture::new(PRO);
    let at = |id: &str, time: &str| event(id, "ai.resolution", "cust_acme", time, None);
    // The clock is 2026-12-15T00:00:00Z; the default skew 5 minutes.
    let events = vec![
        at("a", "2026-12-15T00:04:59Z"),
        at("b", "2026-12-15T00:05:00Z"),
        at("c", "2026-12-15T00:05:01Z"),
    ];
    f.rate(&events, &[]).succeeded();
    let rejects = f.rejects();
    assert_eq!(rejects.len(), 1);
    assert_eq!(
        (rejects[0]["line"].clone(), rejects[0]["code"].clone()),
        (json!(3), json!("time_in_future"))
    );
    assert_eq!(f.summary()["outside_period"], 2);

    let wide = Fixture::new(&format!("{PRO}\n[events]\nmax_future_skew = \"1h\"\n"));
    let events = vec![
        at("a", "2026-12-15T00:59:00Z"),
        at("b", "2026-12-15T01:00:01Z"),
    ];
    wide.rate(&events, &[]).succeeded();
    let rejects = wide.rejects();
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0]["line"], 2);
    assert_eq!(
        rejects[0]["reason"],
        "event time is more than 1h ahead of the clock; fix the sender's clock"
    );
}

#[test]
fn rejects_go_to_rejects_jsonl_in_the_working_directory_by_default() {
    let f = Fixture::new(PRO);
    let mut events = resolutions("r", "cust_acme", 1);
    events.push("garbage".to_owned());
    f.write("events.jsonl", events.join("\n").as_bytes());
    let run: Run = f
        .tally()
        .args([
            "rate",
            "--config",
            "tally.toml",
            "--events",
            "events.jsonl",
            "--period",
            "2026-11",
            "--now",
            NOW,
        ])
        .output()
        .unwrap()
        .into();
    run.succeeded();
    let rejects = f.rejects();
    assert_eq!(rejects.len(), 1);
    let r = &rejects[0];
    let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["code", "field", "line", "raw", "reason"]);
    assert_eq!(
        (&r["line"], &r["field"], &r["code"], &r["raw"]),
        (
            &json!(2),
            &json!("event"),
            &json!("invalid_json"),
            &json!("garbage")
        )
    );
    // The parser's own words follow; only the prefix is Tally's.
    assert!(
        r["reason"].as_str().unwrap().starts_with("invalid JSON: "),
        "{r}"
    );
}

// ---------------------------------------------------------------------------------------
// Input, output, formats
// ---------------------------------------------------------------------------------------

#[test]
fn a_month_with_none_of_the_files_events_is_rated_with_a_warning() {
    let f = Fixture::new(PRO);
    let october = event(
        "oct-1",
        "ai.resolution",
        "cust_acme",
        "2026-10-24T10:15:00Z",
        Some(json!({"conversation_id": "c-1"})),
    );
    let run = f.rate(&[october], &[]).succeeded();
    assert!(
        run.stderr.contains(
            "warning: no event of 2026-11 was counted (1 outside the period); is 2026-11 the month to bill?"
        ),
        "{}",
        run.stderr
    );
    // A month with its events says nothing of the kind.
    let run = f.rate(&resolutions("nov", "cust_acme", 2), &[]).succeeded();
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
}

#[test]
fn a_file_of_which_no_line_is_an_event_bills_nothing_and_says_so() {
    let f = Fixture::new(PRO);
    // The old biller's export given as the events file.
    let export = "customer,price,quantity,amount\ncust_acme,resolutions,250,250.00\n";
    let run = f.rate_bytes(export.as_bytes(), &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_shows(
        &run.stderr,
        &["error: none of the 2 lines read is a valid usage event (2 invalid_json), so nothing would be billed but flat fees; the first: line 1: event: invalid JSON"],
    );
    assert_eq!(run.stdout, "", "no invoice lines");
    assert_eq!(f.rejects().len(), 2, "each line is kept with its reason");

    // A file with events among bad lines is rated, with a warning once many are bad.
    let mut mixed = resolutions("r", "cust_acme", 2);
    mixed.push("not an event".to_owned());
    let run = f.rate(&mixed, &[]).succeeded();
    assert_shows(
        &run.stderr,
        &["warning: 1 of the 3 lines read were rejected (reasons below)"],
    );
    // Nothing counted, though not every line was bad: said so, with where they went.
    let mut uncounted = resolutions("u", "cust_nobody", 1);
    uncounted.extend((0..9).map(|i| format!("garbage {i}")));
    let run = f.rate(&uncounted, &[]).succeeded();
    assert_shows(
        &run.stderr,
        &[
            "warning: 9 of the 10 lines read were rejected (reasons below)",
            "warning: no event of 2026-11 was counted: the lines below say where each went",
            "unbilled: 1 event for customer \"cust_nobody\"",
        ],
    );
    // An empty file is a month without usage, not a mistake.
    let run = f.rate_bytes(b"", &[]).succeeded();
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
}

#[test]
fn rating_a_month_that_has_not_ended_warns_that_it_bills_the_usage_so_far() {
    let f = Fixture::new(PRO);
    let events = resolutions("r", "cust_acme", 3).join("\n");
    f.write("events.jsonl", events.as_bytes());
    let rate = |now: &str| -> Run {
        let mut args = month_args_at("rate", now);
        args.extend(["--summary", "summary.json", "--rejects", "rejects.jsonl"]);
        f.tally().args(args).output().unwrap().into()
    };
    let run = rate("2026-11-25T00:00:00Z").succeeded();
    assert_shows(
        &run.stderr,
        &["warning: 2026-11 has not ended: these lines bill its usage so far, not the month"],
    );
    assert_eq!(f.summary()["unfinished"], true);
    let run = rate("2026-12-01T00:00:00Z").succeeded();
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
    assert_eq!(f.summary()["unfinished"], false);
}

#[test]
fn events_can_come_from_stdin() {
    let f = Fixture::new(PRO);
    let events = resolutions("r", "cust_acme", 250).join("\n");
    let mut child = f
        .tally()
        .args([
            "rate",
            "--config",
            "tally.toml",
            "--events",
            "-",
            "--period",
            "2026-11",
        ])
        .args(["--format", "json", "--now", NOW])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(events.as_bytes())
        .unwrap();
    let run: Run = child.wait_with_output().unwrap().into();
    let from_stdin = run.succeeded().stdout;
    assert_eq!(
        money(line(
            &Run {
                code: 0,
                stdout: from_stdin.clone(),
                stderr: String::new()
            }
            .lines(),
            "cust_acme",
            "resolutions"
        )),
        ["250", "182.50", "22.81", "159.69"]
    );
    let from_file = f
        .rate(&resolutions("r", "cust_acme", 250), &[])
        .succeeded()
        .stdout;
    assert_eq!(from_stdin, from_file);
}

#[test]
fn output_can_go_to_a_file() {
    let f = Fixture::new(PRO);
    let to_stdout = f
        .rate(&resolutions("r", "cust_acme", 5), &[])
        .succeeded()
        .stdout;
    let out = f.path("lines.jsonl");
    let run = f
        .rate(
            &resolutions("r", "cust_acme", 5),
            &["--output", out.to_str().unwrap()],
        )
        .succeeded();
    assert_eq!(run.stdout, "");
    assert_eq!(f.read("lines.jsonl"), to_stdout);
}

#[test]
fn csv_has_a_header_and_one_row_per_line() {
    let f = Fixture::new(PRO);
    let run = f
        .rate(&resolutions("r", "cust_acme", 250), &["--format", "csv"])
        .succeeded();
    let json = f
        .rate(&resolutions("r", "cust_acme", 250), &[])
        .succeeded()
        .lines();
    let rows: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(rows.len(), 7);
    assert_eq!(
        rows[0],
        "id,config_hash,customer,plan,price,meter,period_start,period_end,quantity,subtotal,discount,amount,currency,tiers"
    );
    let acme = &json[0];
    assert_eq!(
        rows[1],
        format!(
            "{},{},cust_acme,pro,resolutions,resolutions,2026-11-01T00:00:00Z,2026-12-01T00:00:00Z,250,182.50,22.81,159.69,usd,tier 1 (up to 100): 100 x 0 + 49 = 49; tier 2 (up to 1000): 150 x 0.89 = 133.5",
            acme["id"].as_str().unwrap(),
            acme["config_hash"].as_str().unwrap()
        )
    );
    assert!(rows[4].contains(",cust_idle,pro,resolutions,resolutions,2026-11-01T00:00:00Z,2026-12-01T00:00:00Z,0,49.00,0.00,49.00,usd,tier 1 (up to 100): 0 x 0 + 49 = 49"), "{}", rows[4]);
}

#[test]
fn csv_quotes_fields_that_contain_commas() {
    let config = PRO.replace(r#"id = "cust_idle""#, r#"id = "idle, inc""#);
    let f = Fixture::new(&config);
    let run = f.rate(&[], &["--format", "csv"]).succeeded();
    let row = run.stdout.lines().find(|r| r.contains("idle")).unwrap();
    assert!(row.contains(",\"idle, inc\",pro,"), "{row}");
}

#[test]
fn table_shows_lines_with_a_total_per_customer_and_a_grand_total() {
    let f = Fixture::new(PRO);
    let events = concat(&[
        resolutions("r", "cust_acme", 250),
        vec![
            tokens("t1", "cust_acme", "gpt-x", json!(1500)),
            tokens("t2", "cust_acme", "claude-y", json!(1999)),
        ],
    ]);
    let run = f.rate(&events, &["--format", "table"]).succeeded();
    let rows: Vec<Vec<&str>> = run
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["cust_acme", "plan", "pro", "2026-11-01", "to", "2026-12-01"]
    );
    assert_eq!(
        rows[1],
        ["price", "meter", "quantity", "subtotal", "discount", "amount"]
    );
    assert_eq!(
        rows[2],
        [
            "resolutions",
            "resolutions",
            "250",
            "182.50",
            "22.81",
            "159.69",
            "usd"
        ]
    );
    assert_eq!(
        rows[3],
        [
            "gpt-tokens",
            "tokens",
            "1500",
            "0.04",
            "0.00",
            "0.04",
            "usd"
        ]
    );
    assert_eq!(
        rows[4],
        [
            "claude-tokens",
            "tokens",
            "1999",
            "0.03",
            "0.00",
            "0.03",
            "usd"
        ]
    );
    // 159.69 + 0.04 + 0.03 = 159.76.
    assert_eq!(rows[5], ["total", "159.76", "usd"]);
    assert_eq!(rows[6], Vec::<&str>::new());
    assert_eq!(
        rows[7],
        ["cust_idle", "plan", "pro", "2026-11-01", "to", "2026-12-01"]
    );
    assert_eq!(
        rows[9],
        [
            "resolutions",
            "resolutions",
            "0",
            "49.00",
            "0.00",
            "49.00",
            "usd"
        ]
    );
    assert_eq!(rows[12], ["total", "49.00", "usd"]);
    // 159.76 + 49.00 = 208.76 over two customers.
    assert_eq!(
        run.stdout.lines().last().unwrap(),
        "all customers billed in usd (2): 208.76 usd"
    );
}

#[test]
fn table_totals_are_per_currency() {
    let config = format!(
        "{PRO}\n[[plans]]\nid = \"jp\"\ncurrency = \"jpy\"\n\n[[plans.prices]]\nid = \"resolutions\"\nmeter = \"resolutions\"\nbilling_scheme = \"per_unit\"\nunit_amount = \"120\"\n\n[[customers]]\nid = \"cust_tokyo\"\nplan = \"jp\"\n"
    );
    let f = Fixture::new(&config);
    let run = f
        .rate(&resolutions("r", "cust_tokyo", 3), &["--format", "table"])
        .succeeded();
    let tail: Vec<&str> = run.stdout.lines().rev().take(2).collect();
    // 3 x 120 = 360 jpy; usd: 49 - 6.13 (acme) + 49 (idle) = 91.87.
    assert_eq!(
        tail,
        [
            "all customers billed in usd (2): 91.87 usd",
            "all customers billed in jpy (1): 360 jpy"
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Determinism
// ---------------------------------------------------------------------------------------

#[test]
fn two_runs_give_byte_identical_output_whatever_the_threads() {
    let f = Fixture::new(PRO);
    // About 7 MB, so several 2 MiB decoding chunks go to several threads, with
    // retries and conflicting resends of the first chunk's events in the last one.
    let tokens_of = |prefix: &str, n: i64| -> Vec<String> {
        (0..n)
            .map(|i| {
                tokens(
                    &format!("{prefix}{i}"),
                    if i % 3 == 0 { "cust_idle" } else { "cust_acme" },
                    if i % 2 == 0 { "gpt-x" } else { "claude-y" },
                    json!(i),
                )
            })
            .collect()
    };
    let events = concat(&[
        resolutions("r", "cust_acme", 300),
        resolutions("s", "cust_idle", 20),
        tokens_of("t", 40_000),
        tokens_of("t", 200),
        (0..100)
            .map(|i| tokens(&format!("t{i}"), "cust_acme", "gpt-x", json!(i + 1)))
            .collect(),
    ]);
    assert!(events.iter().map(String::len).sum::<usize>() > 4 << 20);
    let a = f.rate(&events, &["--threads", "1"]).succeeded().stdout;
    let summary = f.summary();
    assert_eq!(
        (&summary["duplicates"], &summary["conflicts"]),
        (&json!(200), &json!(100))
    );
    let b = f.rate(&events, &["--threads", "8"]).succeeded().stdout;
    let c = f.rate(&events, &[]).succeeded().stdout;
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(f.summary(), summary);
    for format in ["csv", "table"] {
        let x = f.rate(&events, &["--format", format]).succeeded().stdout;
        let y = f
            .rate(&events, &["--format", format, "--threads", "3"])
            .succeeded()
            .stdout;
        assert_eq!(x, y, "{format}");
    }
}

#[test]
fn a_large_file_is_read_in_chunks_with_exact_line_numbers_and_totals() {
    // About 4 MB: several decoding chunks, so several threads are really used.
    let f = Fixture::new(PRO);
    let mut events = resolutions("r", "cust_acme", 25_000);
    for bad in [1, 7_777, 12_500, 24_999] {
        events[bad - 1] = format!("broken line {bad}");
    }
    let run = f.rate(&events, &["--threads", "4"]).succeeded();
    let numbers: Vec<u64> = f
        .rejects()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 7_777, 12_500, 24_999]);
    // 24 996 resolutions: 49 + 900 x 0.89 + 23 996 x 0.69 = 49 + 801 + 16 557.24
    // = 17 407.24; 12.5 % = 2 175.905 -> 2 175.91; amount 15 231.33.
    let lines = run.lines();
    assert_eq!(
        money(line(&lines, "cust_acme", "resolutions")),
        ["24996", "17407.24", "2175.91", "15231.33"]
    );
    let single = f.rate(&events, &["--threads", "1"]).succeeded();
    assert_eq!(single.stdout, run.stdout);
}

#[test]
fn the_order_of_events_does_not_change_the_invoice() {
    let f = Fixture::new(PRO);
    let events = concat(&[
        resolutions("r", "cust_acme", 120),
        (0..50)
            .map(|i| tokens(&format!("t{i}"), "cust_idle", "gpt-x", json!(i * 7)))
            .collect(),
    ]);
    let forward = f.rate(&events, &[]).succeeded().stdout;
    let mut reversed = events.clone();
    reversed.reverse();
    assert_eq!(f.rate(&reversed, &[]).succeeded().stdout, forward);
}

#[test]
fn line_ids_are_per_customer_price_and_period_and_carry_the_config_hash() {
    let f = Fixture::new(PRO);
    let lines = f
        .rate(&resolutions("r", "cust_acme", 10), &[])
        .succeeded()
        .lines();
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    for id in &ids {
        assert_eq!(id.len(), 32, "{id}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{id}"
        );
    }
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids are distinct");

    // The hash printed by validate is the one on every line.
    let validate = f.validate().succeeded();
    let hash = lines[0]["config_hash"].as_str().unwrap();
    assert_eq!(hash.len(), 16);
    assert!(
        validate
            .stdout
            .contains(&format!("price book hash {hash}\n")),
        "{}",
        validate.stdout
    );
    assert!(lines.iter().all(|l| l["config_hash"] == hash));

    // Different usage: same ids. A changed price: same ids (the line is replaced), new hash.
    let more = f
        .rate(&resolutions("r", "cust_acme", 400), &[])
        .succeeded()
        .lines();
    assert_eq!(
        more.iter().map(|l| l["id"].clone()).collect::<Vec<_>>(),
        lines.iter().map(|l| l["id"].clone()).collect::<Vec<_>>()
    );
    let repriced = Fixture::new(&PRO.replace(r#""0.89""#, r#""0.79""#));
    let again = repriced
        .rate(&resolutions("r", "cust_acme", 10), &[])
        .succeeded()
        .lines();
    assert_eq!(again[0]["id"], lines[0]["id"]);
    assert_ne!(again[0]["config_hash"], lines[0]["config_hash"]);
    // Another period: other ids.
    repriced.write("events.jsonl", b"");
    let december: Run = repriced
        .tally()
        .args([
            "rate",
            "--config",
            "tally.toml",
            "--events",
            "events.jsonl",
            "--period",
            "2026-12",
        ])
        .args(["--format", "json", "--now", NOW])
        .output()
        .unwrap()
        .into();
    let december = december.succeeded().lines();
    assert_ne!(december[0]["id"], lines[0]["id"]);
}

// ---------------------------------------------------------------------------------------
// Configuration checks and errors
// ---------------------------------------------------------------------------------------

#[test]
fn validate_accepts_a_good_config_and_summarises_it() {
    let f = Fixture::new(PRO);
    let run = f.validate().succeeded();
    let first = run.stdout.lines().next().unwrap();
    let hash = first.rsplit(' ').next().unwrap().to_owned();
    assert_eq!(
        run.stdout,
        format!(
            "tally.toml is valid: 2 meters, 1 plans with 3 prices, 2 customers; price book hash {hash}\n\
             services: Kafka 127.0.0.1:9092 (topics tally.*), ClickHouse http://127.0.0.1:8123 database tally, \
             ingest on 127.0.0.1:9101 with 0 API key(s), instance id agg-1\n"
        )
    );
}

#[test]
fn the_instance_id_defaults_to_the_host_name_even_where_hostname_is_not_exported() {
    // systemd exports no HOSTNAME: every host would share the id `0`, and so one
    // transactional id, fencing each other's aggregators.
    let f = Fixture::new(PRO);
    let run: Run = (f.tally())
        .args(["validate", "--config", "tally.toml"])
        .env_remove("TALLY_INSTANCE_ID")
        .env_remove("HOSTNAME")
        .output()
        .unwrap()
        .into();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let shown = run.succeeded().stdout;
    assert!(
        shown.ends_with(&format!("instance id {}\n", host.trim())),
        "{shown}"
    );
    let run: Run = (f.tally())
        .args(["validate", "--config", "tally.toml"])
        .env_remove("TALLY_INSTANCE_ID")
        .env("HOSTNAME", "exported-host")
        .output()
        .unwrap()
        .into();
    assert!(run
        .succeeded()
        .stdout
        .ends_with("instance id exported-host\n"));
}

#[test]
fn validate_names_the_place_of_every_problem_and_exits_1() {
    let bad = PRO
        .replace("up_to = 1000,", "up_to = 100,")
        .replace(r#"up_to = "inf""#, "up_to = 5000")
        .replacen(r#"meter = "tokens""#, r#"meter = "tokenz""#, 1)
        .replace(r#"percent_off = "12.5""#, r#"percent_off = "112.5""#)
        .replace(r#"currency = "usd""#, r#"currency = "dollars""#);
    let f = Fixture::new(&bad);
    let run = f.validate();
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "");
    for expected in [
        "tally.toml has 5 problem(s):",
        r#"  - plans[pro].currency: unknown currency "dollars""#,
        "  - plans[pro].prices[resolutions].tiers[1].up_to: tiers must strictly increase: 100 follows 100",
        r#"  - plans[pro].prices[resolutions].tiers[2].up_to: the last tier must have up_to = "inf" (found 5000)"#,
        r#"  - plans[pro].prices[gpt-tokens].meter: unknown meter "tokenz"; known meters: resolutions, tokens"#,
        "  - customers[cust_acme].discounts[0].percent_off: must be between 0 and 100 (found 112.5)",
    ] {
        assert!(run.stderr.contains(expected), "{expected:?} not in:\n{}", run.stderr);
    }
}

#[test]
fn validate_refuses_floats_unknown_fields_and_missing_value_properties() {
    let cases = [
        (
            PRO.replace(r#"unit_amount = "0.89""#, "unit_amount = 0.89"),
            "write decimal amounts as strings",
        ),
        (
            PRO.replace(
                r#"currency = "usd""#,
                "currency = \"usd\"\ncolour = \"red\"",
            ),
            "unknown field `colour`",
        ),
        (
            PRO.replace("value_property = \"$.tokens\"\n", ""),
            r#"meters[tokens].value_property: required for aggregation = "sum""#,
        ),
        (
            PRO.replace(r#"price = "resolutions""#, r#"price = "resolution""#),
            r#"customers[cust_acme].discounts[0].price: plan "pro" has no price "resolution""#,
        ),
        (
            format!("{PRO}\n[[customers]]\nid = \"cust_idle\"\nplan = \"pro\"\n"),
            "customers[cust_idle].id: duplicate customer id; ids must be unique",
        ),
        (
            PRO.replace(r#"flat_amount = "49""#, r#"flat_amount = "-49""#),
            "plans[pro].prices[resolutions].tiers[0].flat_amount: amounts must not be negative",
        ),
    ];
    for (config, expected) in cases {
        let run = Fixture::new(&config).validate();
        assert_eq!(run.code, 1, "{expected}");
        assert!(
            run.stderr.contains(expected),
            "{expected:?} not in:\n{}",
            run.stderr
        );
    }
}

#[test]
fn validate_reports_a_missing_file() {
    let f = Fixture::new(PRO);
    let run: Run = f
        .tally()
        .args(["validate", "--config", "nope.toml"])
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("cannot read configuration nope.toml"),
        "{}",
        run.stderr
    );
}

#[test]
fn rate_validates_the_config_first() {
    let f = Fixture::new(&PRO.replace("up_to = 1000,", "up_to = 100,"));
    let run = f.rate(&resolutions("r", "cust_acme", 1), &[]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.contains(
            "plans[pro].prices[resolutions].tiers[1].up_to: tiers must strictly increase"
        ),
        "{}",
        run.stderr
    );
    assert!(!f.path("summary.json").exists());
}

#[test]
fn rate_fails_with_exit_1_on_a_missing_events_file() {
    let f = Fixture::new(PRO);
    let run: Run = f
        .tally()
        .args([
            "rate",
            "--config",
            "tally.toml",
            "--events",
            "missing.jsonl",
            "--period",
            "2026-11",
            "--now",
            NOW,
        ])
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("events file missing.jsonl: No such file"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_malformed_period_or_clock_is_a_usage_error_with_exit_2() {
    let f = Fixture::new(PRO);
    f.write("events.jsonl", b"");
    for (period, now) in [("2026-13", NOW), ("2026-11", "yesterday")] {
        let run: Run = f
            .tally()
            .args([
                "rate",
                "--config",
                "tally.toml",
                "--events",
                "events.jsonl",
                "--period",
                period,
                "--now",
                now,
            ])
            .output()
            .unwrap()
            .into();
        // Like other command-line tools, tally exits 2 when its arguments are wrong and
        // 1 when a run fails.
        assert_eq!(run.code, 2, "--period {period} --now {now}: {}", run.stderr);
    }
}

#[test]
fn rate_fails_with_exit_1_when_the_rejects_file_cannot_be_created() {
    let f = Fixture::new(PRO);
    f.write("events.jsonl", b"");
    let run: Run = f
        .tally()
        .args([
            "rate",
            "--config",
            "tally.toml",
            "--events",
            "events.jsonl",
            "--period",
            "2026-11",
            "--now",
            NOW,
        ])
        .args(["--rejects", "no/such/dir/rejects.jsonl"])
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("cannot create rejects file no/such/dir/rejects.jsonl"),
        "{}",
        run.stderr
    );
}

#[test]
fn the_demo_writes_its_files_and_its_store_agrees_with_its_csv() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let run = |seed: &str| -> Run {
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["demo", "--events", "5000", "--customers", "12"])
            .args(["--period", "2026-10", "--seed", seed])
            .arg("--dir")
            .arg(&demo)
            .output()
            .unwrap()
            .into()
    };
    let first = run("1").succeeded();
    assert!(
        first
            .stdout
            .contains("4/4 check: `tally rate --period 2026-10` on the same file"),
        "{}",
        first.stdout
    );
    for file in [
        "tally.toml",
        "events.jsonl",
        "invoice_lines.csv",
        "rejects.jsonl",
        "summary.json",
        "tally.db",
    ] {
        assert!(demo.join(file).is_file(), "{file} missing");
    }
    // It works one invoice through as `tally explain` does on its files.
    let (_, rest) = first.stdout.split_once("  How ").unwrap();
    let (customer, _) = rest.split_once("'s invoice adds up").unwrap();
    let explained: Run = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["explain", "--period", "2026-10", "--customer", customer])
        .arg("--config")
        .arg(demo.join("tally.toml"))
        .arg("--events")
        .arg(demo.join("events.jsonl"))
        .output()
        .unwrap()
        .into();
    let indented: String = (explained.succeeded().stdout.lines())
        .map(|l| match l {
            "" => "\n".to_owned(),
            l => format!("    {l}\n"),
        })
        .collect();
    assert!(
        first.stdout.contains(&indented),
        "{indented}\nin:\n{}",
        first.stdout
    );
    // The CSV has a header line.
    let csv_lines = || {
        let csv = std::fs::read_to_string(demo.join("invoice_lines.csv")).unwrap();
        i64::try_from(csv.lines().count() - 1).unwrap()
    };
    let stored = || -> i64 {
        rusqlite::Connection::open(demo.join("tally.db"))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM invoice_lines", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(stored(), csv_lines());
    let rejected = std::fs::read_to_string(demo.join("rejects.jsonl")).unwrap();
    assert_eq!(
        rejected.lines().count(),
        24,
        "the demo mixes in 24 bad lines"
    );

    // Run again in the same folder: a fresh store, not one run on top of another.
    run("2").succeeded();
    assert_eq!(stored(), csv_lines());
    let runs: i64 = rusqlite::Connection::open(demo.join("tally.db"))
        .unwrap()
        .query_row("SELECT COUNT(*) FROM runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(runs, 1);
}

/// One line as `tally explain` shows it: (price, amount, currency, line id, quantity,
/// the sum of its usage by day).
type ExplainedLine = (
    String,
    String,
    String,
    String,
    String,
    Option<rust_decimal::Decimal>,
);

/// The lines and the total of an explanation.
fn explained_lines(text: &str) -> (Vec<ExplainedLine>, String) {
    let mut lines: Vec<ExplainedLine> = Vec::new();
    let mut total = String::new();
    let mut in_days = false;
    for row in text.lines() {
        if let Some((head, id)) = row.split_once("   (line ") {
            let (price, amount) = head.split_once(": ").unwrap();
            let (amount, currency) = amount.split_once(' ').unwrap();
            let id = id.trim_end_matches(')').to_owned();
            let (price, amount, currency) =
                (price.to_owned(), amount.to_owned(), currency.to_owned());
            lines.push((price, amount, currency, id, String::new(), None));
        } else if let Some(rest) = row.strip_prefix("  quantity  ") {
            lines.last_mut().unwrap().4 = rest.split_once(':').unwrap().0.to_owned();
        } else if let Some(rest) = row.strip_prefix("total ") {
            total = rest.split(" (").next().unwrap().to_owned();
        }
        let days = row.trim_start().strip_prefix("by day:");
        in_days = days.is_some() || (in_days && row.starts_with("                    "));
        if in_days {
            let days = days.unwrap_or(row);
            let line = lines.last_mut().unwrap();
            for day in days.split(", ") {
                let value: rust_decimal::Decimal = day.rsplit(' ').next().unwrap().parse().unwrap();
                *line.5.get_or_insert_default() += value;
            }
        }
    }
    (lines, total)
}

#[test]
fn explain_shows_each_customers_lines_as_rate_makes_them_with_usage_adding_up() {
    let f = Fixture::generated(12);
    let events = std::fs::read(f.path("events.jsonl")).unwrap();
    let rated = f.rate_bytes(&events, &[]).succeeded().lines();
    let mut customers: Vec<&str> = rated
        .iter()
        .map(|l| l["customer"].as_str().unwrap())
        .collect();
    customers.dedup();
    assert_eq!(customers.len(), 12);
    for customer in customers {
        let run = f.explain(customer, &[]).succeeded();
        let (explained, total) = explained_lines(&run.stdout);
        let expected: Vec<&Value> = rated.iter().filter(|l| l["customer"] == customer).collect();
        assert_eq!(explained.len(), expected.len(), "{}", run.stdout);
        let mut sum = rust_decimal::Decimal::ZERO;
        for (line, rate) in explained.iter().zip(&expected) {
            let field = |name: &str| rate[name].as_str().unwrap().to_owned();
            let (price, amount, currency, id, quantity, by_day) = line;
            assert_eq!(
                (price, amount, currency, id, quantity),
                (
                    &field("price"),
                    &field("amount"),
                    &field("currency"),
                    &field("id"),
                    &field("quantity")
                ),
                "{}",
                run.stdout
            );
            // Count and sum meters: the days add up to the month.
            let quantity: rust_decimal::Decimal = quantity.parse().unwrap();
            assert_eq!(
                by_day.unwrap_or_default(),
                quantity,
                "{price}:\n{}",
                run.stdout
            );
            sum += amount.parse::<rust_decimal::Decimal>().unwrap();
        }
        assert_eq!(total, format!("{sum} {}", explained[0].2), "{}", run.stdout);
    }
}

#[test]
fn output_cut_short_by_its_reader_ends_quietly_with_sigpipes_status() {
    let f = Fixture::new(PRO);
    f.write(
        "events.jsonl",
        (resolutions("r", "cust_acme", 3).join("\n") + "\n").as_bytes(),
    );
    let mut explain = month_args("explain");
    explain.extend(["--customer", "cust_acme"]);
    let validate = vec!["validate", "--config", "tally.toml"];
    for args in [explain, validate] {
        let mut child = f
            .tally()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before anything is written, as `| head` does after its
        // lines.
        drop(child.stdout.take());
        let run = Run::from(child.wait_with_output().unwrap());
        assert_eq!((run.code, run.stderr.as_str()), (141, ""), "{args:?}");
    }
}

#[test]
fn explain_names_the_lines_of_the_conflicting_resends_it_dropped() {
    let f = Fixture::new(&per_event_config("usd", "half_up", "1", ""));
    // Line 1 counts; lines 2 to 13 resend its id with other content.
    let mut lines = calls("c", 1);
    for n in 0..12 {
        let data = json!({ "attempt": n });
        lines.push(event(
            "call-0",
            "api.call",
            "c",
            "2026-11-02T00:00:00Z",
            Some(data),
        ));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    f.write("events.jsonl", text.as_bytes());
    let explained = f.explain("c", &[]).succeeded();
    assert_shows(
        &explained.stdout,
        &["conflicting resends  12 (same (source, id) as a counted event, other content: the first one counts; not counted): line 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 2 more (line 1 counts)\n"],
    );
}

#[test]
fn explain_lists_the_customers_lines_that_failed_validation_and_an_unfinished_month() {
    let f = Fixture::new(PRO);
    let mut lines = resolutions("r", "cust_acme", 1);
    // A number with thousands separators, and a line that is not JSON at all.
    lines.push(tokens("t-1", "cust_acme", "gpt-4o", json!("1,500,000")));
    lines.push(tokens("t-2", "cust_idle", "gpt-4o", json!("1,000")));
    lines.push("{\"subject\": \"cust_acme\", oops".to_owned());
    f.write("events.jsonl", (lines.join("\n") + "\n").as_bytes());
    let explained = f.explain("cust_acme", &[]).succeeded();
    assert_shows(
        &explained.stdout,
        &[
            "rejected             1 (name this customer but fail validation; not counted):\n      line 2: data.tokens: ",
            "`tally rate` lists every line that fails validation in its rejects file (one whose subject cannot be read names no customer)",
        ],
    );
    assert!(!explained.stdout.contains("line 3"), "{}", explained.stdout);
    assert!(
        !explained.stdout.contains("has not ended"),
        "{}",
        explained.stdout
    );

    let mut args = month_args_at("explain", "2026-11-25T00:00:00Z");
    args.extend(["--customer", "cust_acme"]);
    let early = Run::from(f.tally().args(args).output().unwrap()).succeeded();
    assert_shows(
        &early.stdout,
        &["2026-11 has not ended: the lines bill its usage so far, not the month"],
    );
}

#[test]
fn an_unknown_customers_events_name_the_customer_they_likely_meant() {
    let f = Fixture::new(PRO);
    let run = f.rate(&resolutions("r", "cust-acme", 2), &[]).succeeded();
    assert_shows(
        &run.stderr,
        &["unbilled: 2 events for customer \"cust-acme\", who is not in the configuration (did you mean \"cust_acme\"?)"],
    );
}

#[test]
fn usage_without_a_dimension_its_prices_filter_on_is_named_as_missing() {
    let f = Fixture::new(PRO);
    let no_model = event(
        "t-1",
        "llm.tokens",
        "cust_acme",
        "2026-11-03T10:00:00Z",
        Some(json!({"tokens": 1000})),
    );
    let rated = f.rate(std::slice::from_ref(&no_model), &[]).succeeded();
    assert_shows(
        &rated.stderr,
        &["unbilled: 1000 of meter tokens [\"\"] for \"cust_acme\": no price of their plan matches (\"\": its events did not send that dimension, or sent null)"],
    );
    f.write("events.jsonl", format!("{no_model}\n").as_bytes());
    let explained = f.explain("cust_acme", &[]).succeeded();
    assert_shows(
        &explained.stdout,
        &["meter tokens model = (missing: the events have no $.model): 1000"],
    );
}

#[test]
fn explain_names_what_it_cannot_find() {
    let f = Fixture::new(PRO);
    f.write("events.jsonl", b"");
    let unknown = f.explain("cust_nobody", &[]);
    assert_eq!(unknown.code, 1);
    assert_shows(
        &unknown.stderr,
        &["customer \"cust_nobody\" is not among the 2 customers of tally.toml"],
    );
    assert!(
        !unknown.stderr.contains("did you mean"),
        "{}",
        unknown.stderr
    );
    let near = f.explain(" CUST_Acme", &[]);
    assert_shows(
        &near.stderr,
        &["customer \" CUST_Acme\" is not among the 2 customers of tally.toml; did you mean \"cust_acme\"?"],
    );
    for slip in ["cust-acme", "cust_acm", "cust_acne"] {
        let near = f.explain(slip, &[]);
        assert_shows(&near.stderr, &["; did you mean \"cust_acme\"?"]);
    }
    let price = f.explain("cust_acme", &["--price", "tokens"]);
    assert_eq!(price.code, 1);
    assert_shows(
        &price.stderr,
        &["customer \"cust_acme\" has no price \"tokens\" in 2026-11; its prices are those of plan \"pro\": resolutions, gpt-tokens, claude-tokens"],
    );
    // A customer without events: its flat fee, explained.
    let idle = f
        .explain("cust_idle", &["--price", "resolutions"])
        .succeeded();
    assert_shows(
        &idle.stdout,
        &[
            "    counted              0\n",
            "            no usage in the month\n",
            "            tier 1 (up to 100): 0 x 0 + 49 = 49\n",
        ],
    );
    assert!(
        idle.stdout.ends_with("total 49.00 usd (49.00)\n"),
        "{}",
        idle.stdout
    );
}

/// Fails unless `text` contains each of `shown`.
fn assert_shows(text: &str, shown: &[&str]) {
    for part in shown {
        assert!(text.contains(part), "{part:?} in:\n{text}");
    }
}

#[test]
fn explain_lists_days_only_for_meters_whose_days_make_the_month() {
    let f = Fixture::new(COMPUTE);
    let active = |id: &str, user: &str| {
        let data = Some(json!({ "user": user }));
        event(id, "app.active", "c", "2026-11-06T00:00:00Z", data)
    };
    let events = [
        gpu("g1", json!(7)),
        gpu("g2", json!(2.5)),
        event(
            "g3",
            "gpu.seconds",
            "c",
            "2026-11-06T10:00:00Z",
            Some(json!({ "seconds": 3 })),
        ),
        active("a1", "alice"),
        active("a2", "bob"),
        event(
            "s1",
            "app.seats",
            "c",
            "2026-11-20T00:00:00Z",
            Some(json!({ "seats": 12 })),
        ),
    ];
    // From stdin, as `tally rate --events -` reads it.
    let mut child = f
        .tally()
        .args(["explain", "--config", "tally.toml", "--events", "-"])
        .args(["--period", "2026-11", "--now", NOW, "--customer", "c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(events.join("\n").as_bytes())
        .unwrap();
    let run = Run::from(child.wait_with_output().unwrap()).succeeded();
    assert_shows(
        &run.stdout,
        &[
        "  events in stdin:\n    counted              6 (app.active 2, app.seats 1, gpu.seconds 3)\n",
        // Sums add up by day; the month's max is its largest day's.
        "seconds: 12.50 usd",
        "  quantity  12.5: meter seconds sums $.seconds of gpu.seconds events\n            by day: Nov 05: 9.5, Nov 06: 3\n",
        "  quantity  7: meter peak takes the largest $.seconds of gpu.seconds events\n            by day: Nov 05: 7, Nov 06: 3\n",
        // Distinct users are not made of days; the latest seat count names its event.
        "  quantity  2: meter users counts the distinct values of $.user of app.active events\n            (a month's unique_count is not made of its days', so none are listed)\n",
        "  quantity  12: meter seats takes $.seats of the latest app.seats event\n            latest: 12, set by the event of 2026-11-20T00:00:00+00:00\n",
        "total 75.50 usd (12.50 + 7.00 + 20.00 + 36.00)\n",
        ],
    );
}

#[test]
fn explain_shows_volume_tiers_amounts_off_and_customers_not_billed() {
    let f = Fixture::new(
        r#"
[[meters]]
slug = "calls"
event_type = "api.call"
aggregation = "count"

[[plans]]
id = "jp"
currency = "jpy"

[[plans.prices]]
id = "calls"
meter = "calls"
billing_scheme = "tiered"
tiers_mode = "volume"
tiers = [
  { up_to = 2, unit_amount = "100" },
  { up_to = "inf", unit_amount = "80", flat_amount = "500" },
]

[[customers]]
id = "c"
plan = "jp"
discounts = [{ price = "calls", amount_off = "50" }]

[[customers]]
id = "gone"
plan = "jp"
through = "2026-10"
"#,
    );
    let mut events = calls("c", 3);
    events.push(event(
        "gone-1",
        "api.call",
        "gone",
        "2026-11-02T00:00:00Z",
        None,
    ));
    f.rate(&events, &[]).succeeded();
    let c = f.explain("c", &[]).succeeded().stdout;
    assert_shows(
        &c,
        &[
        "  plan jp, jpy; each line of the month rounded half_up to 0 decimals\n",
        // All three calls at the tier the total falls in, plus its flat fee.
        "  charge    volume: every unit at the price of the tier the whole quantity falls in, plus that tier's flat fee\n            tier 2 (up to inf): 3 x 80 + 500 = 740\n",
        "  subtotal  740 rounded half_up to 0 decimals = 740\n",
        "  discount  50 off, at most the subtotal = 50\n",
        "  amount    740 - 50 = 690 jpy\n",
        "total 690 jpy (690)\n",
        ],
    );
    let gone = f.explain("gone", &[]).succeeded().stdout;
    assert_shows(
        &gone,
        &[
            "  not billed in 2026-11",
            "  no lines\n",
            "usage of the month, unbilled:\n  meter calls: 1\n",
        ],
    );
    assert!(!gone.contains("total"), "{gone}");
}

#[test]
fn a_flat_fee_bills_one_in_each_billed_month_with_its_discount_and_is_explained() {
    let flat = r#"
[[plans.prices]]
id = "platform"
billing_scheme = "flat"
unit_amount = "500"
description = "Platform fee, monthly"

[[customers]]
id = "cust_acme"
name = "Acme Inc""#;
    let f = Fixture::new(
        &PRO.replacen("\n[[customers]]\nid = \"cust_acme\"", flat, 1)
            .replace(
                "discounts = [{ price = \"resolutions\", percent_off = \"12.5\" }]",
                "discounts = [{ price = \"platform\", amount_off = \"50\" }]",
            ),
    );
    let run = f.rate(&[], &[]).succeeded();
    let lines = run.lines();
    // No usage at all: the fee all the same, less its coupon.
    assert_eq!(
        money(line(&lines, "cust_acme", "platform")),
        ["1", "500.00", "50.00", "450.00"]
    );
    assert_eq!(line(&lines, "cust_acme", "platform")["meter"], "");
    let shown = f.explain("cust_acme", &["--price", "platform"]).succeeded();
    assert_shows(
        &shown.stdout,
        &[
            // The customer's name and the price's description, for people.
            "cust_acme (Acme Inc), 2026-11 (",
            "platform (Platform fee, monthly): 450.00 usd   (line ",
            "  quantity  1: a flat fee, one in each month the customer is billed, whatever its usage\n",
            "  charge    flat fee\n            1 x 500 = 500\n",
            "  discount  50 off, at most the subtotal = 50.00\n",
            "  amount    500.00 - 50.00 = 450.00 usd\n",
        ],
    );
}

#[test]
fn explain_lists_the_events_each_line_counts_when_asked() {
    let f = Fixture::new(PRO);
    let events = vec![
        tokens("t1", "cust_acme", "gpt-x", json!(1200)),
        tokens("c1", "cust_acme", "claude-y", json!(700)),
        // A retry: counted once, under the line it first came on.
        tokens("t1", "cust_acme", "gpt-x", json!(1200)),
        tokens("t2", "cust_acme", "gpt-x", json!("300")),
        tokens("o1", "cust_idle", "gpt-x", json!(5)),
    ];
    f.rate(&events, &[]).succeeded();
    let listed = f
        .explain("cust_acme", &["--price", "gpt-tokens", "--list-events"])
        .succeeded();
    assert_shows(
        &listed.stdout,
        &["            events counted (2):\n              line 1  id t1  2026-11-10T08:00:00Z  1200\n              line 4  id t2  2026-11-10T08:00:00Z  300\n"],
    );
    // Without the flag, no list.
    let plain = f
        .explain("cust_acme", &["--price", "gpt-tokens"])
        .succeeded();
    assert!(!plain.stdout.contains("events counted"), "{}", plain.stdout);
}

#[test]
fn explain_splits_a_customers_usage_into_utc_days() {
    let f = Fixture::new(&per_event_config(
        "usd",
        "half_up",
        "0.50",
        r#"discounts = [{ price = "calls", amount_off = "0.25" }]"#,
    ));
    let events = [
        event("a", "api.call", "c", "2026-11-02T23:59:59Z", None),
        // 23:30 UTC, written in another offset.
        event("b", "api.call", "c", "2026-11-03T00:30:00+01:00", None),
        event("c", "api.call", "c", "2026-11-03T00:00:00Z", None),
    ];
    f.rate(&events, &[]).succeeded();
    let shown = f.explain("c", &[]).succeeded().stdout;
    assert_shows(
        &shown,
        &[
            "            by day: Nov 02: 2, Nov 03: 1\n",
            "  subtotal  1.5 rounded half_up to 2 decimals = 1.50\n",
            "  discount  0.25 off, at most the subtotal = 0.25\n",
            "  amount    1.50 - 0.25 = 1.25 usd\n",
        ],
    );
}

#[test]
fn explain_pipeline_names_the_clickhouse_it_cannot_reach() {
    let config = per_event_config("usd", "half_up", "0.50", "")
        + "\n[clickhouse]\nurl = \"http://127.0.0.1:9\"\ndatabase = \"tally\"\n";
    let f = Fixture::new(&config);
    let run: Run = (f.tally())
        .args([
            "explain",
            "--pipeline",
            "--period",
            "2026-11",
            "--customer",
            "c",
        ])
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_shows(
        &run.stderr,
        &[
            "error: cannot reach ClickHouse at http://127.0.0.1:9",
            "is it running?",
        ],
    );
}

/// `tally reconcile` for November.
fn reconcile(f: &Fixture, sources: &[&str]) -> Run {
    let mut args = vec!["reconcile", "--period", "2026-11"];
    args.extend(sources);
    f.tally().args(args).output().unwrap().into()
}

#[test]
fn reconcile_agrees_on_tally_rates_own_formats_and_lists_what_another_biller_bills_differently() {
    let f = Fixture::generated(9);
    // A customer without usage: its lines are zero, which the old biller leaves out.
    let config =
        f.read("tally.toml") + "\n[[customers]]\nid = \"cust_quiet\"\nplan = \"starter\"\n";
    f.write("tally.toml", config.as_bytes());
    let events = std::fs::read(f.path("events.jsonl")).unwrap();
    let rated = f.rate_bytes(&events, &[]);
    f.write("tally.jsonl", rated.succeeded().stdout.as_bytes());
    let csv = f.rate_bytes(&events, &["--format", "csv", "--output", "tally.csv"]);
    csv.succeeded();
    let lines: Vec<Value> = (f.read("tally.jsonl").lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let same = reconcile(&f, &["tally.jsonl", "tally.csv"]).succeeded();
    assert_shows(
        &same.stdout,
        &[
            &format!("  expected tally.jsonl: {} lines", lines.len()),
            &format!("  actual   tally.csv: {} lines", lines.len()),
            &format!("Agree: {} lines. Differ: 0 lines.", lines.len()),
            "The two agree on every line.",
        ],
    );

    // The old biller's export of the same month: its own column order, upper-case
    // currencies, amounts to four places, no zero lines; it billed one line a cent
    // more, missed one and billed a customer Tally does not know.
    let text = |line: &Value, field: &str| line[field].as_str().unwrap().to_owned();
    let zero = |line: &&Value| {
        let figure = |field| text(line, field).parse::<rust_decimal::Decimal>().unwrap();
        figure("quantity").is_zero() && figure("amount").is_zero()
    };
    let billed: Vec<&Value> = lines.iter().filter(|l| !zero(l)).collect();
    assert_eq!(
        lines.len() - billed.len(),
        4,
        "cust_quiet's four starter lines"
    );
    let (more, missed) = (billed[1], billed[3]);
    let mut export = String::from("currency,customer,price,amount,quantity,period_start\n");
    for line in &billed {
        let mut amount: rust_decimal::Decimal = text(line, "amount").parse().unwrap();
        if std::ptr::eq(*line, more) {
            amount += rust_decimal::Decimal::new(1, 2);
        }
        if std::ptr::eq(*line, missed) {
            continue;
        }
        amount.rescale(4);
        let currency = text(line, "currency").to_uppercase();
        let (customer, price, quantity) = (
            text(line, "customer"),
            text(line, "price"),
            text(line, "quantity"),
        );
        export.push_str(&format!(
            "{currency},{customer},{price},{amount},{quantity},2026-11\n"
        ));
    }
    export.push_str("USD,cust_unknown,resolutions,10.0000,10,2026-11\n");
    export.push_str("USD,cust_unknown,resolutions,99.0000,99,2026-10\n");
    f.write("old-biller.csv", export.as_bytes());

    let run = reconcile(
        &f,
        &[
            "old-biller.csv",
            "tally.jsonl",
            "--differences",
            "differences.csv",
        ],
    );
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let agreeing = lines.len() - 2;
    let zero_lines = lines.len() - billed.len();
    assert_shows(
        &run.stdout,
        &[
            &format!("  expected old-biller.csv: {} lines; 1 line of other months left out", billed.len()),
            &format!("Agree: {agreeing} lines ({zero_lines} of them zero lines only one source has). Differ: 3 lines."),
            "They differ in 3 lines.",
        ],
    );
    let differences = f.read("differences.csv");
    let rows: Vec<Vec<&str>> = differences
        .lines()
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows[0].join(","), "customer,price,adjusts_period,what,expected_quantity,actual_quantity,expected_amount,expected_currency,actual_amount,actual_currency,amount_difference,expected_at,actual_at");
    let row_of = |line: &Value| {
        (rows.iter())
            .find(|r| r[0] == text(line, "customer") && r[1] == text(line, "price"))
            .unwrap_or_else(|| panic!("no row for {line}:\n{differences}"))
    };
    let more_row = row_of(more);
    assert_eq!(
        (more_row[3], more_row[9], more_row[10]),
        ("amount", text(more, "currency").as_str(), "-0.0100")
    );
    assert_eq!(more_row[8], text(more, "amount"));
    let missed_row = row_of(missed);
    assert_eq!(
        (missed_row[3], missed_row[10]),
        ("only_actual", text(missed, "amount").as_str())
    );
    assert_eq!(missed_row[11], "");
    let unknown = rows.iter().find(|r| r[0] == "cust_unknown").unwrap();
    assert_eq!(
        (unknown[3], unknown[6], unknown[7], unknown[10], unknown[11]),
        (
            "only_expected",
            "10.0000",
            "usd",
            "-10.0000",
            // The header, the billed lines but the missed one, then this.
            format!("old-biller.csv line {}", billed.len() + 1).as_str()
        )
    );
    assert_eq!(rows.len(), 4, "{differences}");

    // Trouble is 2, never mistaken for a difference.
    let missing = reconcile(&f, &["old-biller.csv", "nowhere.jsonl"]);
    assert_eq!(missing.code, 2);
    assert_shows(&missing.stderr, &["error: cannot read nowhere.jsonl"]);
}

#[test]
fn reconcile_maps_another_billers_ids_and_compares_only_the_cohort_it_still_bills() {
    let f = Fixture::generated(9);
    let events = std::fs::read(f.path("events.jsonl")).unwrap();
    f.write(
        "tally.jsonl",
        f.rate_bytes(&events, &[]).succeeded().stdout.as_bytes(),
    );
    let lines: Vec<Value> = (f.read("tally.jsonl").lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text = |line: &Value, field: &str| line[field].as_str().unwrap().to_owned();
    let mut customers: Vec<String> = lines.iter().map(|l| text(l, "customer")).collect();
    customers.sort();
    customers.dedup();
    let cohort = &customers[..3];
    assert!(
        customers.len() > cohort.len(),
        "customers outside the cohort"
    );

    // The old biller knows the cohort by its own account numbers and prices by product
    // names, and bills each price's usage as two lines: the first unit, and the rest.
    let mut map = String::from("kind,from,to\n");
    let mut prices: Vec<String> = lines.iter().map(|l| text(l, "price")).collect();
    prices.sort();
    prices.dedup();
    for price in &prices {
        map.push_str(&format!(
            "price,{price} (first unit),{price}\nprice,{price} (rest),{price}\n"
        ));
    }
    let mut export = String::from("customer,price,quantity,amount,currency\n");
    let mut compared = 0;
    for (n, customer) in cohort.iter().enumerate() {
        map.push_str(&format!("customer,ACCT-{n},{customer}\n"));
        for line in lines.iter().filter(|l| text(l, "customer") == *customer) {
            let figure = |field| text(line, field).parse::<rust_decimal::Decimal>().unwrap();
            let (quantity, amount) = (figure("quantity"), figure("amount"));
            let (first_amount, first_quantity) = (
                amount / rust_decimal::Decimal::from(3),
                quantity.min(1.into()),
            );
            let (price, currency) = (text(line, "price"), text(line, "currency"));
            export.push_str(&format!(
                "ACCT-{n},{price} (first unit),{first_quantity},{first_amount},{currency}\n"
            ));
            export.push_str(&format!(
                "ACCT-{n},{price} (rest),{},{},{currency}\n",
                quantity - first_quantity,
                amount - first_amount
            ));
            compared += 1;
        }
    }
    f.write("old-biller.csv", export.as_bytes());
    f.write("map.csv", map.as_bytes());

    let agreed = reconcile(
        &f,
        &[
            "old-biller.csv",
            "tally.jsonl",
            "--map",
            "map.csv",
            "--customers",
            "expected",
        ],
    )
    .succeeded();
    assert_shows(
        &agreed.stdout,
        &[
            &format!(
                "  expected old-biller.csv: {compared} lines; {} lines renamed by the map, {compared} of them added to another line",
                2 * compared
            ),
            &format!(
                "  actual   tally.jsonl: {compared} lines; {} lines of {} customers not compared (--customers) left out",
                lines.len() - compared,
                customers.len() - cohort.len()
            ),
            "The two agree on every line.",
        ],
    );
    // Every customer compared: Tally's lines of the others are only Tally's.
    let everyone = reconcile(&f, &["old-biller.csv", "tally.jsonl", "--map", "map.csv"]);
    assert_eq!(everyone.code, 1, "{}", everyone.stdout);
    assert_shows(&everyone.stdout, &["only actual"]);
    // Without the map no line of the old biller's matches one of Tally's.
    let unmapped = reconcile(&f, &["old-biller.csv", "tally.jsonl"]);
    assert_eq!(unmapped.code, 1, "{}{}", unmapped.stdout, unmapped.stderr);
    let no_map = reconcile(
        &f,
        &["old-biller.csv", "tally.jsonl", "--map", "nowhere.csv"],
    );
    assert_eq!(no_map.code, 2);
    assert_shows(&no_map.stderr, &["error: cannot read the map nowhere.csv"]);
}

#[test]
fn reconcile_maps_only_the_other_billers_ids_and_never_calls_nothing_compared_agreement() {
    let f = Fixture::new("");
    // The old biller's customer "b" is Tally's "a"; Tally also has a customer "b".
    f.write(
        "old.txt",
        b"\xef\xbb\xbfcustomer,price,quantity,amount,currency\nb,fee,1,10.00,USD\n",
    );
    f.write(
        "tally.jsonl",
        concat!(
            r#"{"customer":"a","price":"fee","quantity":"1","amount":"10.00","currency":"usd","period_start":"2026-11-01T00:00:00Z"}"#,
            "\n",
            r#"{"customer":"b","price":"fee","quantity":"1","amount":"5.00","currency":"usd","period_start":"2026-11-01T00:00:00Z"}"#,
            "\n",
        )
        .as_bytes(),
    );
    f.write("map.csv", b"kind,from,to\ncustomer,b,a\n");
    let cohort = reconcile(
        &f,
        &[
            "old.txt",
            "tally.jsonl",
            "--map",
            "map.csv",
            "--customers",
            "expected",
        ],
    )
    .succeeded();
    assert_shows(
        &cohort.stdout,
        &[
            "  expected old.txt: 1 line; 1 line renamed by the map",
            "  actual   tally.jsonl: 1 line; 1 line of 1 customer not compared (--customers) left out: b",
            "The two agree on every line.",
        ],
    );
    // The same with the sources the other way round.
    let swapped = reconcile(
        &f,
        &[
            "tally.jsonl",
            "old.txt",
            "--map",
            "map.csv",
            "--map-applies-to",
            "actual",
            "--customers",
            "actual",
        ],
    );
    swapped.succeeded();

    // A month neither source has, or no customer in common, is an error, not agreement.
    let december = Run::from(
        f.tally()
            .args(["reconcile", "--period", "2026-12", "tally.jsonl", "old.txt"])
            .output()
            .unwrap(),
    );
    assert_eq!(december.code, 2);
    assert_shows(
        &december.stderr,
        &["error: tally.jsonl has no line of 2026-12 (only 2 lines of other months): is --period right?"],
    );
    let unmapped = reconcile(&f, &["old.txt", "tally.jsonl", "--customers", "both"]);
    assert_eq!(unmapped.code, 1, "b's lines differ: {}", unmapped.stdout);
    f.write(
        "renumbered.csv",
        b"customer,price,quantity,amount,currency\nACCT-1,fee,1,10.00,usd\n",
    );
    let nothing_in_common = reconcile(
        &f,
        &["renumbered.csv", "tally.jsonl", "--customers", "both"],
    );
    assert_eq!(nothing_in_common.code, 2, "{}", nothing_in_common.stdout);
    assert_shows(
        &nothing_in_common.stderr,
        &["error: no customer has lines in both sources, so nothing would be compared"],
    );
}

#[test]
fn rate_reads_pipes_skips_a_bom_and_refuses_inputs_it_would_misread_or_destroy() {
    let f = Fixture::new(PRO);
    let events = resolutions("r", "cust_acme", 3).join("\n") + "\n";
    let from_file = f.rate_bytes(events.as_bytes(), &[]).succeeded().stdout;

    // Through a pipe (`<(zcat ...)`, /dev/stdin): the same lines as from the file.
    let mut args = month_args("rate");
    args[4] = "/dev/stdin";
    args.extend(["--format", "json"]);
    let mut child = f
        .tally()
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(events.as_bytes())
        .unwrap();
    let piped = Run::from(child.wait_with_output().unwrap()).succeeded();
    assert_eq!(piped.stdout, from_file);

    // A byte-order mark is not part of the first event.
    let with_bom = [b"\xef\xbb\xbf".as_slice(), events.as_bytes()].concat();
    let bom = f.rate_bytes(&with_bom, &[]).succeeded();
    assert_eq!(bom.stdout, from_file);
    assert_eq!(f.read("rejects.jsonl"), "");

    // Compressed input is refused with what to do, not rejected line by line.
    let gzipped = [b"\x1f\x8b\x08\x00".as_slice(), &[0u8; 16]].concat();
    let refused = f.rate_bytes(&gzipped, &[]);
    assert_eq!(refused.code, 1);
    assert_shows(
        &refused.stderr,
        &["error: events file events.jsonl is gzip-compressed: decompress it first"],
    );

    // JSON of another shape too: an array (an HTTP batch's body), or pretty-printed.
    let first: Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    for (text, shape) in [
        (
            format!("[{}]\n", events.lines().collect::<Vec<_>>().join(",")),
            "is a JSON array",
        ),
        (
            serde_json::to_string_pretty(&first).unwrap(),
            "is pretty-printed JSON",
        ),
    ] {
        let refused = f.rate_bytes(text.as_bytes(), &[]);
        assert_eq!(refused.code, 1);
        assert_shows(
            &refused.stderr,
            &[&format!("error: events file events.jsonl {shape}")],
        );
    }

    // An output naming the events file would wipe it while it is read.
    f.write("events.jsonl", events.as_bytes());
    let mut args = month_args("rate");
    args.extend(["--rejects", "events.jsonl"]);
    let overwrite = Run::from(f.tally().args(&args).output().unwrap());
    assert_eq!(overwrite.code, 1);
    assert_shows(
        &overwrite.stderr,
        &["error: --rejects events.jsonl is the events file, which would be overwritten while it is read"],
    );
    assert_eq!(f.read("events.jsonl"), events);
    // By another name, too.
    std::fs::hard_link(f.path("events.jsonl"), f.path("linked.jsonl")).unwrap();
    let mut args = month_args("rate");
    args.extend(["--rejects", "linked.jsonl"]);
    let linked = Run::from(f.tally().args(&args).output().unwrap());
    assert_eq!(linked.code, 1, "{}", linked.stderr);
    assert_eq!(f.read("events.jsonl"), events);
    // A device is no file to destroy: /dev/null may be both.
    let mut args = month_args("rate");
    args[4] = "/dev/null";
    args.extend(["--rejects", "/dev/null"]);
    Run::from(f.tally().args(&args).output().unwrap()).succeeded();

    let mut args = month_args("rate");
    args[4] = ".";
    let directory = Run::from(f.tally().args(&args).output().unwrap());
    assert_shows(
        &directory.stderr,
        &["error: events file . is a directory; give a file of JSON lines"],
    );
}

#[test]
fn a_total_needing_more_digits_than_a_decimal_bills_every_event_rounded_at_its_last_digit() {
    let f = Fixture::new(PRO);
    // Together they need 46 significant digits: every event is counted, and the total
    // keeps the 28 a decimal holds, rounded half to even, in either order.
    let mut events = vec![
        tokens("t-1", "cust_acme", "gpt-x", json!("999999999999999999")),
        tokens(
            "t-2",
            "cust_acme",
            "gpt-x",
            json!("0.0000000000000000000000000001"),
        ),
        tokens("t-3", "cust_acme", "gpt-x", json!("0.00000000006")),
    ];
    for _ in 0..2 {
        let run = f.rate(&events, &[]).succeeded();
        assert_shows(&run.stderr, &["3 counted", "0 refused", "0 rejected lines"]);
        let quantities: Vec<Value> = (run.lines().iter())
            .filter(|line| line["customer"] == "cust_acme" && line["quantity"] != "0")
            .map(|line| line["quantity"].clone())
            .collect();
        assert_eq!(quantities, [json!("999999999999999999.0000000001")]);
        events.reverse();
    }
}

#[test]
fn validate_refuses_a_kafka_property_librdkafka_refuses_without_showing_its_value() {
    for (property, shown) in [
        (
            r#""sasl.pasword" = "hunter2-secret""#,
            r#"[kafka] properties."sasl.pasword": No such configuration property: "sasl.pasword""#,
        ),
        (
            r#""socket.timeout.ms" = "hunter2-secret""#,
            r#"[kafka] properties."socket.timeout.ms": Invalid value for configuration property "socket.timeout.ms""#,
        ),
    ] {
        let f = Fixture::new(&format!("{PRO}\n[kafka]\nproperties = {{ {property} }}\n"));
        let run = Run::from(
            f.tally()
                .args(["validate", "--config", "tally.toml"])
                .output()
                .unwrap(),
        );
        assert_eq!(run.code, 1, "{}", run.stdout);
        assert_shows(&run.stderr, &[shown, "its value is not shown"]);
        assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);
    }
}

/// `tally serve aggregator` with brokers that refuse every connection (nothing
/// listens on port 1), its endpoint on the port returned, its log to `log`.
fn aggregator_without_kafka(
    log: impl Into<std::process::Stdio>,
) -> (Fixture, std::process::Child, u16) {
    let port = common::free_port();
    let f = Fixture::new(&format!(
        "{PRO}\n[kafka]\nbrokers = \"127.0.0.1:1\"\n[aggregator]\nmetrics_listen = \"127.0.0.1:{port}\"\n"
    ));
    let child = f
        .tally()
        .args(["serve", "aggregator", "--config", "tally.toml"])
        .stderr(log)
        .spawn()
        .unwrap();
    (f, child, port)
}

#[test]
fn an_aggregator_waiting_for_kafka_answers_probes_and_says_why_it_is_not_ready() {
    let (_f, mut child, port) = aggregator_without_kafka(std::process::Stdio::piped());
    let get = |path: &str| common::get(port, path);
    let deadline = Instant::now() + Duration::from_secs(30);
    let readyz = loop {
        match get("/readyz") {
            Some((503, body)) if body.contains("waiting for Kafka") => break body,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("/readyz did not say it waits for Kafka: {other:?}"),
        }
    };
    assert!(readyz.contains("BrokerTransportFailure"), "{readyz}");
    assert_eq!(get("/healthz").map(|(status, _)| status), Some(200));
    // The counters alerts watch are exported at 0 already.
    let (_, metrics) = get("/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "tally_aggregator_events_lost_to_retention_total 0"),
        "{metrics}"
    );
    // A stop asked for is no error, waiting or not.
    assert!(terminate(&mut child).success());
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("stopped before Kafka answered"), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
}

#[test]
fn serve_all_takes_events_with_503_and_retry_after_while_kafka_is_awaited() {
    let free_port = common::free_port;
    let (ingest, aggregator, rater) = (free_port(), free_port(), free_port());
    let f = Fixture::new(&format!(
        "{PRO}\n[kafka]\nbrokers = \"127.0.0.1:1\"\n\
         [ingest]\nlisten = \"127.0.0.1:{ingest}\"\n\
         [[ingest.api_keys]]\nkey = \"cli-test-key-0123456789\"\ntenant = \"t\"\nsources = [\"*\"]\n\
         [aggregator]\nmetrics_listen = \"127.0.0.1:{aggregator}\"\n\
         [rater]\nmetrics_listen = \"127.0.0.1:{rater}\"\n"
    ));
    let mut child = f
        .tally()
        .args(["serve", "all", "--config", "tally.toml"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let send = || {
        ureq::post(&format!("http://127.0.0.1:{ingest}/v1/events"))
            .header("Authorization", "Bearer cli-test-key-0123456789")
            .header("Content-Type", "application/cloudevents+json")
            .config()
            .http_status_as_error(false)
            .build()
            .send(event(
                "r-1",
                "ai.resolution",
                "cust_acme",
                "2026-11-02T10:00:00Z",
                None,
            ))
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        match send() {
            Some(response) if response.status() == 503 => break response,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("ingest did not answer 503: {:?}", other.map(|r| r.status())),
        }
    };
    assert!(refused.headers().contains_key("retry-after"), "{refused:?}");
    let (status, body) = common::get(aggregator, "/readyz").unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("waiting for Kafka"), "{body}");
    assert_eq!(common::get(ingest, "/healthz").map(|(s, _)| s), Some(200));
    assert!(terminate(&mut child).success());
}

#[test]
fn serve_all_whose_ingest_cannot_listen_while_kafka_is_awaited_exits_with_why() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ingest = taken.local_addr().unwrap().port();
    let (aggregator, rater) = (common::free_port(), common::free_port());
    let f = Fixture::new(&format!(
        "{PRO}\n[kafka]\nbrokers = \"127.0.0.1:1\"\n\
         [ingest]\nlisten = \"127.0.0.1:{ingest}\"\n\
         [[ingest.api_keys]]\nkey = \"cli-test-key-0123456789\"\ntenant = \"t\"\nsources = [\"*\"]\n\
         [aggregator]\nmetrics_listen = \"127.0.0.1:{aggregator}\"\n\
         [rater]\nmetrics_listen = \"127.0.0.1:{rater}\"\n"
    ));
    let run = Run::from(
        f.tally()
            .args(["serve", "all", "--config", "tally.toml"])
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_shows(&run.stderr, &[&format!("127.0.0.1:{ingest}")]);
    drop(taken);
}

/// Sends SIGTERM and waits up to 15 s for the process to end.
fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not stop it");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_service_whose_log_cannot_be_written_goes_on_serving() {
    // Kafka refuses every connection, so the aggregator logs while it waits; its log
    // goes to a full disk (every write fails with ENOSPC).
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (_f, mut child, port) = aggregator_without_kafka(full);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match common::get(port, "/readyz") {
            Some((503, body)) if body.contains("waiting for Kafka") => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("/readyz did not say it waits for Kafka: {other:?}"),
        }
    }
    // Its start and the failed connections were logged (and lost) by now.
    assert!(child.try_wait().unwrap().is_none(), "it stopped");
    assert!(terminate(&mut child).success());
}

#[test]
fn a_service_that_cannot_start_says_why_in_its_log_format() {
    let f = Fixture::new(&format!(
        "{PRO}\n[[ingest.api_keys]]\nkey_env = \"TALLY_TEST_KEY_NOBODY_SET\"\ntenant = \"t\"\nsources = [\"*\"]\n"
    ));
    let run = Run::from(
        f.tally()
            .args(["serve", "ingest", "--config", "tally.toml"])
            .env("TALLY_LOG_FORMAT", "json")
            .env_remove("TALLY_TEST_KEY_NOBODY_SET")
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 1);
    // Every line a JSON object, the error among them: a log shipper parses them all.
    let lines: Vec<Value> = (run.stderr.lines())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let errors: Vec<&Value> = lines.iter().filter(|l| l["level"] == "ERROR").collect();
    assert_eq!(errors.len(), 1, "the error logged once: {lines:#?}");
    let said = errors[0]["error"].as_str().unwrap();
    assert!(
        said.contains("API keys are missing") && said.contains("TALLY_TEST_KEY_NOBODY_SET"),
        "{said}"
    );
    // `tally validate --service` fails as the start does; without it, it warns.
    let validate = |service: &[&str]| {
        Run::from(
            f.tally()
                .args(["validate", "--config", "tally.toml"])
                .args(service)
                .env_remove("TALLY_TEST_KEY_NOBODY_SET")
                .output()
                .unwrap(),
        )
    };
    let warned = validate(&[]).succeeded();
    assert!(warned.stdout.contains("warning:"), "{}", warned.stdout);
    let refused = validate(&["--service", "ingest"]);
    assert_eq!(refused.code, 1);
    assert_shows(
        &refused.stderr,
        &[
            "ingest cannot start: API keys are missing",
            "TALLY_TEST_KEY_NOBODY_SET",
        ],
    );
    assert_eq!(validate(&["--service", "all"]).code, 1);
    validate(&["--service", "rater"]).succeeded();
}

#[test]
fn a_second_signal_stops_a_service_that_is_still_finishing_its_work() {
    let port = common::free_port();
    // No Kafka is needed to listen: ingest connects in the background.
    let f = Fixture::new(&format!(
        "{PRO}\n[kafka]\nbrokers = \"127.0.0.1:1\"\n[ingest]\nlisten = \"127.0.0.1:{port}\"\n\
         [[ingest.api_keys]]\nkey = \"cli-test-key-0123456789\"\ntenant = \"t\"\nsources = [\"*\"]\n"
    ));
    let mut child = f
        .tally()
        .args(["serve", "ingest", "--config", "tally.toml"])
        // Empty counts as unset: logs at info, not a filter that logs nothing.
        .env("RUST_LOG", "")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stalled = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("ingest did not listen: {e}"),
        }
    };
    // A request answered first, so the connection is one ingest serves; then one begun
    // and never finished: the first SIGTERM waits for it.
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"ok\n") {
        let mut buffer = [0; 256];
        let read = std::io::Read::read(&mut stalled, &mut buffer).unwrap();
        assert!(read > 0, "closed: {:?}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buffer[..read]);
    }
    stalled
        .write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let signal = |child: &std::process::Child| {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    // Time for ingest to read what was written, on a connection it is serving.
    std::thread::sleep(Duration::from_millis(300));
    signal(&child);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        child.try_wait().unwrap().is_none(),
        "still finishing its work"
    );
    signal(&child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "a second signal did not stop it");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130));
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("second signal: stopping at once"), "{log}");
}
