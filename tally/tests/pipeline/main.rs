//! The streaming pipeline end to end: `tally serve aggregator` and `tally serve rater`
//! as real processes on the real Kafka and ClickHouse that `scripts/services/up.sh`
//! starts, checked against `tally rate` on the same events, to the minor unit.
//! Each test has its own topics, groups and database, so two run side by side; one
//! that stops a shared server runs alone ([`harness::shared`], [`harness::alone`]).
//!
//! The tests are grouped by what they put the pipeline through: [`equivalence`] with
//! `tally rate`, [`aggregator_failures`], [`rater_failures`], [`late_usage`],
//! [`price_books`] (and meters, and replays) and [`operations`]. The helpers here
//! are the events and edits several of them share.

#![allow(clippy::unwrap_used)] // a test: a failed call should fail it

#[path = "../common/mod.rs"]
mod common;
mod harness;

mod aggregator_failures;
mod equivalence;
mod late_usage;
mod operations;
mod price_books;
mod rater_failures;

use std::time::Duration;

use harness::Pipeline;

const NEEDS: &str = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse";

/// Messages no event can be read from, with the code and field each is rejected with.
fn poison() -> Vec<(Vec<u8>, &'static str, &'static str)> {
    vec![
        (b"not json at all".to_vec(), "invalid_json", "event"),
        (vec![0xff, 0xfe, 0x00, 0x01], "invalid_utf8", "event"),
        (
            br#"{"specversion":"1.0","id":"x","source":"s","type":"llm.tokens"}"#.to_vec(),
            "missing_field",
            "subject",
        ),
        (
            br#"{"specversion":"1.0","id":"p-1","source":"llm-gateway","type":"llm.tokens","subject":"cust_00001","time":"2026-10-05T10:00:00Z","data":{"model":"gpt-x","tokens":"lots"}}"#.to_vec(),
            "not_a_number",
            "data.tokens",
        ),
        (Vec::new(), "invalid_json", "event"),
    ]
}

/// Each customer's hourly `resolutions` windows in ClickHouse's `window_usage` add up
/// to the quantity of its `resolutions` line: finance can see when a line's usage
/// happened.
fn assert_windows_add_up_to_lines(p: &Pipeline, expected: &[harness::Line]) {
    let billed: String = (expected.iter())
        .filter(|l| l.1 == "resolutions" && l.2 != "0")
        .map(|l| format!("{}\t{}\n", l.0, l.2))
        .collect();
    let windows = p.query(&format!(
        "SELECT customer, sum(toUInt64(value)) FROM {}.window_usage \
         WHERE meter = 'resolutions' AND period_start = '2026-10-01 00:00:00' \
         AND adjusts_period = '' AND customer LIKE 'cust_0%' \
         GROUP BY customer ORDER BY customer FORMAT TSV",
        p.database
    ));
    assert_eq!(windows, billed);
    let hours = p.query(&format!(
        "SELECT count(), countIf(window_end - window_start = 3600), uniqExact(window_start) \
         FROM {}.window_usage WHERE meter = 'resolutions' FORMAT TSV",
        p.database
    ));
    let counts: Vec<u64> = hours
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(counts[0], counts[1], "hourly windows: {hours}");
    assert!(counts[2] > 24 * 20, "a month of hours: {hours}");
}

/// The events file with about 10 % of its lines sent again later: producer retries
/// on top of the generator's own client retries.
fn with_duplicates(mut lines: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let originals = lines.len();
    for i in (0..originals).step_by(10) {
        let copy = lines[i].clone();
        let at = (i + 7919 * (i % 13) + 1).min(lines.len());
        lines.insert(at, copy);
    }
    lines
}

/// Starts a service again when dropped, so a test that fails while it is stopped does
/// not leave it down for the next.
struct Restart(&'static str);

impl Drop for Restart {
    fn drop(&mut self) {
        if std::thread::panicking() {
            harness::service(self.0, "start");
        }
    }
}

/// A pipeline of 2,000 events whose aggregator `agg-a` and rater `rater-a` have stored
/// the lines of the first half of its month; the rest of the events, still to send.
fn half_of_the_month_stored(name: &str) -> (Pipeline, Vec<Vec<u8>>) {
    let p = Pipeline::new(name, 2_000, 10, "");
    let mut first = p.lines();
    let rest = first.split_off(first.len() / 2);
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    p.produce(&first);
    p.wait_for(&p.expected_for(&first, "2026-10"), Duration::from_secs(120));
    (p, rest)
}

/// A resolution event `id` of `customer` at `time`, from source `late-test`.
fn resolution(id: &str, customer: &str, time: &str) -> Vec<u8> {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"late-test","type":"ai.resolution","subject":"{customer}","time":"{time}","data":{{"conversation_id":"{id}"}}}}"#
    )
    .into_bytes()
}

/// The customers of a pipeline made with 10 customers.
fn customers() -> Vec<String> {
    (0..10).map(|i| format!("cust_{i:05}")).collect()
}

/// One resolution for each of [`customers`] at `time`, with ids `<prefix>-<customer>`.
fn resolution_each(prefix: &str, time: &str) -> Vec<Vec<u8>> {
    customers()
        .iter()
        .map(|c| resolution(&format!("{prefix}-{c}"), c, time))
        .collect()
}

/// The reason code the rejected topic gives `payload`.
fn rejection_code(p: &Pipeline, payload: &[u8]) -> String {
    let rejected = p.read_topic("rejected");
    let (_, headers) = rejected
        .iter()
        .find(|(rejected, _)| rejected == payload)
        .expect("the event is in the rejected topic");
    headers["tally.error.code"].clone()
}

/// A tokens event of `tokens` (negative: a correction) for `customer`'s `model`.
fn tokens_event(id: &str, customer: &str, model: &str, tokens: i64, time: &str) -> Vec<u8> {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"corrections-test","type":"llm.tokens","subject":"{customer}","time":"{time}","data":{{"model":"{model}","tokens":{tokens}}}}}"#
    )
    .into_bytes()
}

/// `book` with `from` replaced by `to` once; `from` must be there.
fn edited(book: &str, from: &str, to: &str) -> String {
    assert!(book.contains(from), "{from:?} not in the price book");
    book.replacen(from, to, 1)
}

/// Edits `p`'s price book: the starter resolution price and the pro platform fee go up.
fn raise_prices(p: &Pipeline) {
    let book = std::fs::read_to_string(&p.config).unwrap();
    let book = edited(&book, r#"unit_amount = "0.99""#, r#"unit_amount = "1.09""#);
    let book = edited(&book, r#"flat_amount = "49""#, r#"flat_amount = "59""#);
    std::fs::write(&p.config, book).unwrap();
}

/// The line of `customer` for `price` among `lines`.
fn line_for<'a>(lines: &'a [harness::Line], customer: &str, price: &str) -> &'a harness::Line {
    lines
        .iter()
        .find(|l| l.0 == customer && l.1 == price)
        .unwrap_or_else(|| panic!("no {price} line for {customer}"))
}

/// How many partitions of the windows topic carry the record settling `period`.
fn partitions_settled(p: &Pipeline, period: &str) -> usize {
    (p.read_records("windows").into_iter())
        .filter(|(_, _, headers)| headers.get("tally-settled").map(String::as_str) == Some(period))
        .count()
}

/// The number a service's log line gives `name` (`name=123`).
fn log_field(line: &str, name: &str) -> i64 {
    let (_, rest) =
        (line.split_once(&format!(" {name}="))).unwrap_or_else(|| panic!("no {name} in {line}"));
    rest.split(' ').next().unwrap().parse().unwrap()
}
