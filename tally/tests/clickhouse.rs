//! `tally rate --clickhouse`: rated lines in a real ClickHouse server.
//!
//! Needs ClickHouse's HTTP interface at `TALLY_CLICKHOUSE_URL` (default
//! http://127.0.0.1:8123); `scripts/test.sh` starts one (`scripts/services/up.sh
//! clickhouse`) and runs these tests. Each test works in a database of its own.

#![allow(clippy::unwrap_used)] // a test: a failed call should fail it

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn url() -> String {
    std::env::var("TALLY_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

/// A fresh database, dropped when the test ends.
struct Database(String);

impl Database {
    fn new(test: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Database(format!("tally_test_{test}_{}_{nanos}", std::process::id()))
    }

    /// Runs SQL and returns the JSONEachRow rows it printed.
    fn query(&self, sql: &str) -> Vec<Value> {
        let mut response = ureq::post(&format!("{}/", url()))
            .send(format!("{sql} FORMAT JSONEachRow"))
            .unwrap_or_else(|e| {
                panic!(
                    "ClickHouse at {} (start it with scripts/services/up.sh clickhouse): {e}",
                    url()
                )
            });
        let text = response.body_mut().read_to_string().unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ =
            ureq::post(&format!("{}/", url())).send(format!("DROP DATABASE IF EXISTS {}", self.0));
    }
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Rates the example events with `config` into `db`; returns tally's JSON lines.
fn rate_into(db: &Database, config: &Path) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .current_dir(dir.path())
        .args([
            "rate",
            "--period",
            "2026-11",
            "--now",
            "2026-12-15T00:00:00Z",
            "--format",
            "json",
        ])
        .arg("--config")
        .arg(config)
        .arg("--events")
        .arg(examples().join("events.jsonl"))
        .args(["--clickhouse", &url(), "--clickhouse-database", &db.0])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The query, as finance would run it.
const INVOICE_QUERY: &str =
    "SELECT customer, price, quantity, amount, currency FROM {db}.invoice_lines \
     WHERE period_start = '2026-11-01 00:00:00' ORDER BY customer, price";

fn invoice_rows(db: &Database) -> Vec<Value> {
    db.query(&INVOICE_QUERY.replace("{db}", &db.0))
}

fn expected_rows(lines: &[Value]) -> Vec<Value> {
    let mut rows: Vec<Value> = lines
        .iter()
        .map(|l| {
            serde_json::json!({
                "customer": l["customer"], "price": l["price"], "quantity": l["quantity"],
                "amount": l["amount"], "currency": l["currency"],
            })
        })
        .collect();
    rows.sort_by_key(|r| (r["customer"].to_string(), r["price"].to_string()));
    rows
}

#[test]
#[ignore = "needs ClickHouse: scripts/test.sh starts it and runs this"]
fn clickhouse_invoice_lines_equal_tally_rate_and_rerating_replaces_them() {
    let db = Database::new("rerate");
    let lines = rate_into(&db, &examples().join("tally.toml"));
    assert_eq!(lines.len(), 2);
    assert_eq!(invoice_rows(&db), expected_rows(&lines));

    // The same run again: still one row per line in the view.
    rate_into(&db, &examples().join("tally.toml"));
    assert_eq!(invoice_rows(&db), expected_rows(&lines));

    // Re-rated with a new discount: the view shows the new amounts, one row per line,
    // and the minor-unit column sums exactly.
    let dir = tempfile::tempdir().unwrap();
    let repriced = dir.path().join("tally.toml");
    let text = std::fs::read_to_string(examples().join("tally.toml")).unwrap();
    std::fs::write(
        &repriced,
        text.replace("percent_off = \"12.5\"", "percent_off = \"50\""),
    )
    .unwrap();
    let rerated = rate_into(&db, &repriced);
    assert_eq!(rerated[0]["amount"], "24.50");
    assert_eq!(invoice_rows(&db), expected_rows(&rerated));
    let sum = db.query(&format!(
        "SELECT toString(sum(amount_minor)) AS cents FROM {}.invoice_lines WHERE period_start = '2026-11-01 00:00:00'",
        db.0
    ));
    assert_eq!(sum[0]["cents"], "2800");
}
