//! Property tests of `tally rate` as a whole: random files of good, duplicated,
//! conflicting, mutated and blank lines never crash a run, every line read is accounted
//! for exactly once, every reject points at its line, and the output does not depend on
//! the number of threads.

// Helpers panic on unexpected input: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use proptest::prelude::*;
use serde_json::Value;
use tempfile::TempDir;

const NOW: &str = "2026-12-15T00:00:00Z";

const CONFIG: &str = r#"
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
  { up_to = 10, flat_amount = "49" },
  { up_to = 20, unit_amount = "0.89" },
  { up_to = "inf", unit_amount = "0.69" },
]

[[plans.prices]]
id = "gpt-tokens"
meter = "tokens"
billing_scheme = "per_unit"
unit_amount = "0.002"
transform_quantity = { divide_by = 1000, round = "up" }
filter = { model = "gpt-x" }

[[plans]]
id = "jp"
currency = "jpy"
rounding = "half_even"

[[plans.prices]]
id = "tokens"
meter = "tokens"
billing_scheme = "tiered"
tiers_mode = "volume"
tiers = [
  { up_to = 1000, unit_amount = "0.5" },
  { up_to = "inf", unit_amount = "0.25", flat_amount = "100" },
]

[[customers]]
id = "cust_a"
plan = "pro"
discounts = [{ price = "resolutions", percent_off = "12.5" }]

[[customers]]
id = "cust_b"
plan = "pro"
discounts = [{ price = "gpt-tokens", amount_off = "50" }]

[[customers]]
id = "cust_jp"
plan = "jp"
"#;

/// Invoice lines every run prints: 2 + 2 + 1 prices.
const LINES: usize = 5;

const SUBJECTS: [&str; 4] = ["cust_a", "cust_b", "cust_jp", "cust_ghost"];
const TIMES: [&str; 6] = [
    "2026-11-01T00:00:00Z",
    "2026-11-15T12:00:00+02:00",
    "2026-12-01T00:30:00+01:00",
    "2026-12-01T00:00:00Z",
    "2026-10-31T23:59:59Z",
    "2099-01-01T00:00:00Z",
];
const MODELS: [&str; 3] = ["gpt-x", "claude-y", ""];

/// One event from small pools, so ids repeat (duplicates and conflicts) and times fall
/// in, before, after and far after the period.
fn good_line() -> impl Strategy<Value = String> {
    (0..40u32, 0..4usize, 0..6usize, 0..3usize, 0..3usize, 0..5000u32).prop_map(
        |(id, subject, time, kind, model, tokens)| {
            let (event_type, data) = match kind {
                0 => ("ai.resolution", String::new()),
                1 => (
                    "llm.tokens",
                    format!(r#","data":{{"tokens":{tokens},"model":"{}"}}"#, MODELS[model]),
                ),
                _ => ("ai.handoff", r#","data":{}"#.to_owned()),
            };
            format!(
                r#"{{"specversion":"1.0","id":"e{id}","source":"s","type":"{event_type}","subject":"{}","time":"{}"{data}}}"#,
                SUBJECTS[subject], TIMES[time]
            )
        },
    )
}

/// A good line damaged: truncated, a byte flipped, or a token spliced in.
fn damaged_line() -> impl Strategy<Value = Vec<u8>> {
    let tokens = prop::sample::select(vec![
        "{", "}", "\"", ",", ":", "null", "-1", "1e999", "\"x\"", "\\", "\u{e9}", "\r",
    ]);
    (
        good_line(),
        any::<prop::sample::Index>(),
        any::<u8>(),
        tokens,
        0..3u8,
    )
        .prop_map(|(line, at, byte, token, how)| {
            let mut bytes = line.into_bytes();
            let i = at.index(bytes.len());
            match how {
                0 => bytes.truncate(i),
                1 => bytes[i] = byte,
                _ => {
                    bytes.splice(i..i, token.bytes());
                }
            }
            bytes
        })
}

fn file() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        6 => good_line().prop_map(String::into_bytes),
        3 => damaged_line(),
        1 => prop::sample::select(vec!["", "   ", "\r", "\t"]).prop_map(|s| s.as_bytes().to_vec()),
    ];
    (prop::collection::vec(line, 0..120), any::<bool>()).prop_map(|(lines, crlf)| {
        let end: &[u8] = if crlf { b"\r\n" } else { b"\n" };
        lines.join(end)
    })
}

struct Outcome {
    stdout: Vec<u8>,
    summary: Value,
    rejects: Vec<Value>,
}

/// How a run ended: rated, refused because no line was a valid event, or refused
/// whole for its shape (JSON that is not JSON Lines).
enum Run {
    Rated(Outcome),
    NothingValid { rejects: usize },
    NotJsonLines,
}

fn rate(dir: &TempDir, threads: &str) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .current_dir(dir.path())
        .args(["rate", "--config", "tally.toml", "--events", "events.jsonl"])
        .args(["--period", "2026-11", "--format", "json", "--now", NOW])
        .args([
            "--summary",
            "summary.json",
            "--rejects",
            "rejects.jsonl",
            "--threads",
            threads,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(1) && stderr.starts_with("error: events file events.jsonl is") {
        return Run::NotJsonLines;
    }
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    let rejects: Vec<Value> = read("rejects.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    if out.status.code() == Some(1) && stderr.contains("error: none of the") {
        assert!(out.stdout.is_empty(), "{stderr}");
        return Run::NothingValid {
            rejects: rejects.len(),
        };
    }
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    Run::Rated(Outcome {
        stdout: out.stdout,
        summary: serde_json::from_str(&read("summary.json")).unwrap(),
        rejects,
    })
}

fn count(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::Object(map) => map.values().map(count).sum(),
        other => panic!("not a count: {other}"),
    }
}

fn decimal(v: &Value) -> rust_decimal::Decimal {
    v.as_str().unwrap().parse().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_line_is_accounted_for_and_output_is_deterministic(input in file()) {
        let dir = TempDir::new().unwrap();
        std::fs::write(dir.path().join("tally.toml"), CONFIG).unwrap();
        std::fs::write(dir.path().join("events.jsonl"), &input).unwrap();
        // A second process (its hash maps seeded anew) gives the same output. These
        // files fit one decoding chunk: the threads are compared in cli/input.rs, on a file
        // of several chunks.
        // The lines the binary reads: split at \n, a trailing \r dropped, blank skipped.
        let lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
        let non_blank = lines.iter().filter(|l| !l.iter().all(u8::is_ascii_whitespace)).count() as u64;
        let (one, again) = match (rate(&dir, "1"), rate(&dir, "4")) {
            (Run::Rated(one), Run::Rated(again)) => (one, again),
            // A file of which no line is a valid event bills nothing, and keeps each line.
            (Run::NothingValid { rejects }, Run::NothingValid { .. }) => {
                prop_assert!(non_blank > 0);
                prop_assert_eq!(rejects as u64, non_blank);
                return Ok(());
            }
            // Its first line opens an array or a pretty-printed object.
            (Run::NotJsonLines, Run::NotJsonLines) => {
                let first = input.trim_ascii_start().split(|&b| b == b'\n').next().unwrap_or_default();
                let opens_json = first.starts_with(b"[") || first.trim_ascii() == b"{";
                prop_assert!(opens_json, "refused whole, but its first line is {:?}", String::from_utf8_lossy(first));
                return Ok(());
            }
            _ => panic!("the two runs ended differently"),
        };
        prop_assert_eq!(&one.stdout, &again.stdout);
        prop_assert_eq!(&one.summary, &again.summary);
        let s = &one.summary;
        prop_assert_eq!(count(&s["events_read"]), non_blank);
        let buckets = ["accepted", "duplicates", "conflicts", "rejected", "outside_period",
            "unknown_event_types", "unknown_customers", "too_late", "refused"];
        let sum: u64 = buckets.iter().map(|b| count(&s[*b])).sum();
        prop_assert_eq!(sum, non_blank, "summary does not reconcile: {}", s);
        // The rejects file keeps the rejected lines, the refused and the conflicting.
        let kept = count(&s["rejected"]) + count(&s["refused"]) + count(&s["conflicts"]);
        prop_assert_eq!(kept, one.rejects.len() as u64);
        prop_assert_eq!(count(&s["rejected_by_reason"]), count(&s["rejected"]));

        // Every reject names its line and keeps it.
        for r in &one.rejects {
            let number = r["line"].as_u64().unwrap() as usize;
            prop_assert!(number >= 1 && number <= lines.len(), "{}", r);
            let raw = lines[number - 1];
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let kept = String::from_utf8_lossy(raw);
            prop_assert_eq!(r["raw"].as_str().unwrap(), kept.as_ref());
        }

        // One line per customer and price, and amount = subtotal - discount >= 0.
        let invoice: Vec<Value> = String::from_utf8(one.stdout.clone()).unwrap()
            .lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        prop_assert_eq!(invoice.len(), LINES);
        for l in &invoice {
            let (subtotal, discount, amount) = (decimal(&l["subtotal"]), decimal(&l["discount"]), decimal(&l["amount"]));
            prop_assert_eq!(amount, subtotal - discount, "{}", l);
            prop_assert!(discount >= rust_decimal::Decimal::ZERO && amount >= rust_decimal::Decimal::ZERO, "{}", l);
            let minor = if l["currency"] == "jpy" { 0 } else { 2 };
            prop_assert_eq!(amount.scale(), minor, "{}", l);
        }
    }
}
