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
        let text = self.execute(&format!("{sql} FORMAT JSONEachRow"));
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Runs a statement; returns what ClickHouse answered.
    fn execute(&self, sql: &str) -> String {
        let mut response = ureq::post(&format!("{}/", url()))
            .send(sql)
            .unwrap_or_else(|e| {
                panic!(
                    "ClickHouse at {} (start it with scripts/services/up.sh clickhouse): {e}",
                    url()
                )
            });
        response.body_mut().read_to_string().unwrap()
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

/// Runs `tally rate` for November on the example events with `config` into `db`, with
/// `env` set.
fn run_rate(db: &Database, config: &Path, env: &[(&str, &str)]) -> std::process::Output {
    run_rate_for(db, config, "2026-11", env)
}

fn run_rate_for(
    db: &Database,
    config: &Path,
    period: &str,
    env: &[(&str, &str)],
) -> std::process::Output {
    run_rate_at(&url(), db, config, period, env)
}

/// `tally rate --clickhouse clickhouse`, as [`run_rate_for`].
fn run_rate_at(
    clickhouse: &str,
    db: &Database,
    config: &Path,
    period: &str,
    env: &[(&str, &str)],
) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .current_dir(dir.path())
        .args([
            "rate",
            "--period",
            period,
            "--now",
            "2026-12-15T00:00:00Z",
            "--format",
            "json",
        ])
        .arg("--config")
        .arg(config)
        .arg("--events")
        .arg(examples().join("events.jsonl"))
        .args(["--clickhouse", clickhouse, "--clickhouse-database", &db.0])
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Rates the example events with `config` into `db`; returns tally's JSON lines.
fn rate_into(db: &Database, config: &Path) -> Vec<Value> {
    let output = run_rate(db, config, &[]);
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

/// The example config with `old` replaced by `new`, in `dir`.
fn example_config_with(dir: &Path, old: &str, new: &str) -> PathBuf {
    let text = std::fs::read_to_string(examples().join("tally.toml")).unwrap();
    assert!(text.contains(old), "examples/tally.toml has no {old:?}");
    let path = dir.join("tally.toml");
    std::fs::write(&path, text.replace(old, new)).unwrap();
    path
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
    let repriced =
        example_config_with(dir.path(), "percent_off = \"12.5\"", "percent_off = \"50\"");
    let rerated = rate_into(&db, &repriced);
    assert_eq!(rerated[0]["amount"], "24.50");
    assert_eq!(invoice_rows(&db), expected_rows(&rerated));
    let sum = db.query(&format!(
        "SELECT toString(sum(amount_minor)) AS cents FROM {}.invoice_lines WHERE period_start = '2026-11-01 00:00:00'",
        db.0
    ));
    assert_eq!(sum[0]["cents"], "2800");
}

#[test]
#[ignore = "needs ClickHouse: scripts/test.sh starts it and runs this"]
fn a_rerun_retires_lines_in_a_table_a_dba_added_a_column_to() {
    let db = Database::new("retire_extra_column");
    let lines = rate_into(&db, &examples().join("tally.toml"));
    db.execute(&format!(
        "ALTER TABLE {}.rated_lines ADD COLUMN inserted_at DateTime DEFAULT now()",
        db.0
    ));
    let dir = tempfile::tempdir().unwrap();
    let renamed = example_config_with(dir.path(), "id = \"gpt-tokens\"", "id = \"gpt-x-tokens\"");
    let rerated = rate_into(&db, &renamed);
    assert_ne!(expected_rows(&lines), expected_rows(&rerated));
    assert_eq!(invoice_rows(&db), expected_rows(&rerated));
}

#[test]
#[ignore = "needs ClickHouse: scripts/test.sh starts it and runs this"]
fn a_run_is_not_stored_in_a_streaming_pipelines_database() {
    let db = Database::new("pipeline_database");
    let lines = rate_into(&db, &examples().join("tally.toml"));
    // A row as the streaming rater writes it: versioned by a windows offset.
    db.execute(&format!(
        "INSERT INTO {}.rated_lines (id, version, customer, price, period_start, period_end, amount, currency, superseded) \
         VALUES ('streamed', 42, 'cust_acme', 'resolutions', toDateTime('2026-11-01 00:00:00', 'UTC'), toDateTime('2026-12-01 00:00:00', 'UTC'), '1.00', 'usd', 0)",
        db.0
    ));
    let before = db.query(&format!("SELECT count() AS n FROM {}.rated_lines", db.0));
    let refused = run_rate(&db, &examples().join("tally.toml"), &[]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("is a streaming pipeline's (it holds its rater's lines"),
        "{stderr}"
    );
    let after = db.query(&format!("SELECT count() AS n FROM {}.rated_lines", db.0));
    assert_eq!(before, after, "nothing written");
    assert!(!lines.is_empty());
}

#[test]
#[ignore = "needs ClickHouse: scripts/test.sh starts it and runs this"]
fn a_rerun_retires_the_lines_it_no_longer_makes() {
    let db = Database::new("retire");
    // October first: its lines (no usage, the flat fee) are another period's, which a
    // run for November leaves alone.
    let october = run_rate_for(&db, &examples().join("tally.toml"), "2026-10", &[]);
    assert!(october.status.success());
    let lines = rate_into(&db, &examples().join("tally.toml"));
    assert_eq!(invoice_rows(&db), expected_rows(&lines));

    // The price renamed: its old line is no longer billed, the new one is.
    let dir = tempfile::tempdir().unwrap();
    let renamed = example_config_with(dir.path(), "id = \"gpt-tokens\"", "id = \"gpt-x-tokens\"");
    let rerated = rate_into(&db, &renamed);
    let prices: Vec<&Value> = rerated.iter().map(|l| &l["price"]).collect();
    assert_eq!(prices, ["resolutions", "gpt-x-tokens"]);
    assert_eq!(invoice_rows(&db), expected_rows(&rerated));
    // The old line is kept, superseded, for the record.
    let retired = db.query(&format!(
        "SELECT price, superseded FROM {}.rated_lines FINAL \
         WHERE price = 'gpt-tokens' AND period_start = '2026-11-01 00:00:00'",
        db.0
    ));
    assert_eq!(
        retired,
        [serde_json::json!({"price": "gpt-tokens", "superseded": 1})]
    );

    // Back to the first price book: the first line is current again, the renamed one retired.
    rate_into(&db, &examples().join("tally.toml"));
    assert_eq!(invoice_rows(&db), expected_rows(&lines));
    let october_prices = db.query(&format!(
        "SELECT price FROM {}.invoice_lines WHERE period_start = '2026-10-01 00:00:00' ORDER BY price",
        db.0
    ));
    assert_eq!(
        october_prices,
        [
            serde_json::json!({"price": "gpt-tokens"}),
            serde_json::json!({"price": "resolutions"})
        ]
    );
}

#[test]
#[ignore = "needs ClickHouse: scripts/test.sh starts it and runs this"]
fn a_run_with_a_line_it_cannot_rate_leaves_the_stored_month_as_it_was() {
    let db = Database::new("not_rated");
    let lines = rate_into(&db, &examples().join("tally.toml"));
    // A price whose line is more minor units than a line can store: the run writes
    // the other line to stdout, but storing that one alone would hide the stored
    // gpt-tokens line.
    let dir = tempfile::tempdir().unwrap();
    let too_dear = example_config_with(
        dir.path(),
        "unit_amount = \"0.002\"",
        "unit_amount = \"1000000000000000000\"",
    );
    let output = run_rate(&db, &too_dear, &[]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "not stored in ClickHouse database {}: 1 of the month's lines could not be rated",
            db.0
        )),
        "{stderr}"
    );
    assert_eq!(invoice_rows(&db), expected_rows(&lines));
}

#[test]
#[ignore = "needs ClickHouse: scripts/test.sh starts it and runs this"]
fn tally_rate_sends_the_configured_clickhouse_credentials() {
    // scripts/services/clickhouse.sh creates user tally_test with this password.
    let db = Database::new("credentials");
    let config = examples().join("tally.toml");
    let user = ("TALLY_CLICKHOUSE_USER", "tally_test");
    let refused = run_rate(
        &db,
        &config,
        &[user, ("TALLY_CLICKHOUSE_PASSWORD", "wrong")],
    );
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    // 18.16 answers 401, current releases 403; both name the user.
    assert!(
        (stderr.contains("refused to read the schema: HTTP 401")
            || stderr.contains("refused to read the schema: HTTP 403"))
            && stderr.contains("tally_test"),
        "{stderr}"
    );
    let created = db.query(&format!(
        "SELECT count() AS n FROM system.databases WHERE name = '{}'",
        db.0
    ));
    assert_eq!(
        created[0]["n"], "0",
        "nothing is written without the password"
    );

    let accepted = run_rate(
        &db,
        &config,
        &[user, ("TALLY_CLICKHOUSE_PASSWORD", "tally-test-password")],
    );
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(accepted.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(invoice_rows(&db), expected_rows(&lines));
}

#[test]
#[ignore = "needs ClickHouse: scripts/test.sh starts it and runs this"]
fn tally_rate_takes_clickhouse_credentials_from_the_config_file() {
    let db = Database::new("credentials_file");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tally.toml");
    let text = std::fs::read_to_string(examples().join("tally.toml")).unwrap();
    let section = "\n[clickhouse]\nuser = \"tally_test\"\npassword = \"tally-test-password\"\n";
    std::fs::write(&config, format!("{text}{section}")).unwrap();
    // An unrelated streaming setting that is wrong does not stop a batch run.
    let output = run_rate(&db, &config, &[("TALLY_KAFKA_TOPIC_PREFIX", "bad prefix")]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let wrong = std::fs::read_to_string(&config)
        .unwrap()
        .replace("tally-test-password", "wrong");
    std::fs::write(&config, wrong).unwrap();
    let refused = run_rate(&db, &config, &[]);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "the file's password is the one sent"
    );
}

#[test]
#[ignore = "needs ClickHouse: scripts/test.sh starts it and runs this"]
fn tally_rate_stores_over_tls_trusting_the_configured_ca_file() {
    // scripts/services/clickhouse.sh serves HTTPS on 8443 with a certificate of its
    // own test CA. Not on chDB, which serves no TLS: the test's name says tls.
    // By name: the certificate is for localhost and 127.0.0.1.
    let port = std::env::var("CLICKHOUSE_HTTPS_PORT").unwrap_or_else(|_| "8443".into());
    let https = format!("https://localhost:{port}");
    let services = std::env::var("TALLY_SERVICES_DIR").map_or_else(
        |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.services"),
        PathBuf::from,
    );
    let ca = services.join("clickhouse/tls/ca.pem");
    let db = Database::new("tls");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tally.toml");
    let text = std::fs::read_to_string(examples().join("tally.toml")).unwrap();
    std::fs::write(
        &config,
        format!(
            "{text}\n[clickhouse]\nca_file = {:?}\n",
            ca.display().to_string()
        ),
    )
    .unwrap();
    let output = run_rate_at(&https, &db, &config, "2026-11", &[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(invoice_rows(&db), expected_rows(&lines));

    // Without the CA file, the system's roots do not know the test CA.
    let untrusted = run_rate_at(&https, &db, &examples().join("tally.toml"), "2026-11", &[]);
    assert_eq!(untrusted.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(
        stderr.contains("certificate verify failed") && stderr.contains("clickhouse.ca_file"),
        "{stderr}"
    );
    // The environment's CA file counts as the section's; over plain HTTP it is refused.
    let ca = ca.display().to_string();
    let from_env = run_rate_at(
        &https,
        &db,
        &examples().join("tally.toml"),
        "2026-11",
        &[("TALLY_CLICKHOUSE_CA_FILE", &ca)],
    );
    assert!(
        from_env.status.success(),
        "{}",
        String::from_utf8_lossy(&from_env.stderr)
    );
    let plain = run_rate(&db, &config, &[]);
    assert_eq!(plain.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(stderr.contains("is not an https:// url"), "{stderr}");
}

#[test]
#[ignore = "needs ClickHouse: scripts/test.sh starts it and runs this"]
fn a_database_made_before_superseded_existed_is_brought_up_to_date() {
    let db = Database::new("upgrade");
    // The schema of the builds before 2026-12-04: no `superseded`, a view of every column.
    for sql in [
        format!("CREATE DATABASE {}", db.0),
        format!(
            "CREATE TABLE {}.rated_lines (id String, version UInt64, config_hash String, \
             customer String, plan String, price String, meter String, \
             period_start DateTime('UTC'), period_end DateTime('UTC'), quantity String, \
             subtotal String, discount String, amount String, amount_minor Int64, \
             currency String, tiers String, adjusts_period String) \
             ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM(period_start) \
             ORDER BY (period_start, customer, price, id)",
            db.0
        ),
        format!(
            "CREATE VIEW {0}.invoice_lines AS SELECT * FROM {0}.rated_lines FINAL",
            db.0
        ),
    ] {
        db.query(&sql);
    }
    let lines = rate_into(&db, &examples().join("tally.toml"));
    assert_eq!(invoice_rows(&db), expected_rows(&lines));
    let dir = tempfile::tempdir().unwrap();
    let renamed = example_config_with(dir.path(), "id = \"gpt-tokens\"", "id = \"gpt-x-tokens\"");
    let rerated = rate_into(&db, &renamed);
    // The retired line is gone from the view: the old view would still show it.
    assert_eq!(invoice_rows(&db), expected_rows(&rerated));
}

/// `tally reconcile` of `expected` against `actual` for November, with the example
/// configuration's `[clickhouse]` pointed at the test server and `db`.
fn reconcile(db: &Database, dir: &Path, expected: &str, actual: &str) -> (i32, String) {
    let args = ["reconcile", "--period", "2026-11", expected, actual];
    tally_reading(db, dir, &args, &[])
}

/// `tally args` with the example config, reading ClickHouse's `db` with `env` set:
/// its exit code, and what it printed.
fn tally_reading(db: &Database, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .current_dir(dir)
        .args(args)
        .arg("--config")
        .arg(examples().join("tally.toml"))
        .env("TALLY_CLICKHOUSE_URL", url())
        .env("TALLY_CLICKHOUSE_DATABASE", &db.0)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    (output.status.code().unwrap(), format!("{stdout}{stderr}"))
}

#[test]
#[ignore = "needs ClickHouse: scripts/test.sh starts it and runs this"]
fn finance_reads_the_pipelines_lines_with_read_only_credentials() {
    // scripts/services/clickhouse.sh creates tally_reader with `readonly = 1`, the
    // usual profile of a finance login: it may not change any setting either.
    let db = Database::new("read_only");
    let dir = tempfile::tempdir().unwrap();
    let lines = rate_into(&db, &examples().join("tally.toml"));
    let as_rated: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.path().join("rated.jsonl"), as_rated).unwrap();
    // A finance laptop's host name would be no service's instance id: only
    // [clickhouse] matters to these commands.
    let reader = [
        ("TALLY_CLICKHOUSE_USER", "tally_reader"),
        ("HOSTNAME", "Jane's laptop"),
    ];

    let args = [
        "reconcile",
        "--period",
        "2026-11",
        "rated.jsonl",
        "clickhouse",
    ];
    let (code, shown) = tally_reading(&db, dir.path(), &args, &reader);
    assert_eq!(code, 0, "{shown}");
    assert!(
        shown.contains("Agree: 2 lines. Differ: 0 lines."),
        "{shown}"
    );

    let args = [
        "explain",
        "--period",
        "2026-11",
        "--customer",
        "cust_acme",
        "--pipeline",
    ];
    let (code, shown) = tally_reading(&db, dir.path(), &args, &reader);
    assert_eq!(code, 0, "{shown}");
    let total: rust_decimal::Decimal = (lines.iter())
        .map(|l| {
            l["amount"]
                .as_str()
                .unwrap()
                .parse::<rust_decimal::Decimal>()
                .unwrap()
        })
        .sum();
    assert!(shown.contains(&format!("total {total} usd")), "{shown}");
}

#[test]
#[ignore = "needs ClickHouse: scripts/test.sh starts it and runs this"]
fn reconcile_checks_a_file_of_lines_against_those_stored_in_clickhouse() {
    let db = Database::new("reconcile");
    let dir = tempfile::tempdir().unwrap();
    let lines = rate_into(&db, &examples().join("tally.toml"));
    let as_rated: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.path().join("rated.jsonl"), as_rated).unwrap();

    // The configuration's database, and the same named outright.
    let place = format!("ClickHouse {}.invoice_lines at {}", db.0, url());
    for source in ["clickhouse".to_owned(), format!("clickhouse:{}", db.0)] {
        let (code, shown) = reconcile(&db, dir.path(), "rated.jsonl", &source);
        assert_eq!(code, 0, "{shown}");
        assert!(
            shown.contains(&format!("actual   {place}: 2 lines")),
            "{shown}"
        );
        assert!(
            shown.contains("Agree: 2 lines. Differ: 0 lines."),
            "{shown}"
        );
    }

    // Re-rated with a larger discount: the stored resolutions line no longer agrees, by
    // its discount alone.
    let repriced =
        example_config_with(dir.path(), "percent_off = \"12.5\"", "percent_off = \"50\"");
    let rerated = rate_into(&db, &repriced);
    let (was, now) = (&lines[0]["amount"], &rerated[0]["amount"]);
    assert_eq!((was.as_str(), now.as_str()), (Some("42.87"), Some("24.50")));
    let (code, shown) = reconcile(&db, dir.path(), "rated.jsonl", "clickhouse");
    assert_eq!(code, 1, "{shown}");
    assert!(shown.contains("Agree: 1 line. Differ: 1 line."), "{shown}");
    assert!(
        shown.contains(concat!(
            "  customer   price        what      expected quantity  actual quantity  expected amount  actual amount  amount difference\n",
            "  cust_acme  resolutions  discount  2                  2                42.87 usd        24.50 usd      -18.37 usd\n",
        )),
        "{shown}"
    );
    assert!(shown.ends_with("They differ in 1 line.\n"), "{shown}");

    // A database that does not exist is an error (2), not a difference.
    let (code, shown) = reconcile(&db, dir.path(), "rated.jsonl", "clickhouse:tally_nowhere");
    assert_eq!(code, 2, "{shown}");
    assert!(shown.starts_with("error: "), "{shown}");
}

#[test]
#[ignore = "needs ClickHouse: scripts/test.sh starts it and runs this"]
fn tally_rate_judges_the_clickhouse_its_flags_name_not_the_sections_it_replaces() {
    let db = Database::new("flags");
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(examples().join("tally.toml")).unwrap();
    let config = dir.path().join("tally.toml");
    // The services' database: not a usable name, but the flag names another.
    std::fs::write(
        &config,
        format!("{text}\n[clickhouse]\ndatabase = \"1bad\"\n"),
    )
    .unwrap();
    let stored = run_rate(&db, &config, &[]);
    assert!(stored.status.success(), "{stored:?}");
    assert_eq!(invoice_rows(&db).len(), 2);
    // A URL without its scheme is said to be the flag's.
    let refused = run_rate_at("127.0.0.1:8123", &db, &config, "2026-11", &[]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        said.contains("--clickhouse: \"127.0.0.1:8123\" is not ClickHouse's HTTP interface"),
        "{said}"
    );
}
