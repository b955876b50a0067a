//! The rater's ClickHouse store against a real server: finding the lines another price
//! book rated and retiring them; storing usage windows; reading a customer's lines and
//! windows back (`tally explain --pipeline`); answers of any size.
//!
//! Needs ClickHouse's HTTP interface at `TALLY_CLICKHOUSE_URL` (default
//! http://127.0.0.1:8123); `scripts/test.sh` starts one (`scripts/services/up.sh
//! clickhouse`). The test works in a database of its own.

#![allow(clippy::unwrap_used)] // a test: a failed call should fail it

use std::str::FromStr;

use rust_decimal::Decimal;
use std::sync::Arc;

use tally_rater::clickhouse::{ClickHouse, ClickHouseError, Repricing, StoredWindow};
use tally_rater::line::line_id;
use tally_schemas::config::ClickHouseCredentials;
use tally_schemas::records::{InvoiceLine, MeterValue, SeriesKey, WindowUsage};
use tally_schemas::time::Period;

fn url() -> String {
    std::env::var("TALLY_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

fn query(sql: &str) -> String {
    ureq::post(&format!("{}/", url()))
        .send(sql)
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// The line of `customer` for price `resolutions` in `period`, rated by book `hash`.
fn line(customer: &str, period: Period, adjusts: Option<Period>, hash: &str) -> InvoiceLine {
    InvoiceLine {
        id: line_id(customer, "resolutions", period, adjusts),
        config_hash: hash.into(),
        customer: customer.into(),
        plan: "pro".into(),
        price: "resolutions".into(),
        meter: "resolutions".into(),
        period_start: period.start(),
        period_end: period.end(),
        quantity: Decimal::from(3),
        subtotal: Decimal::new(300, 2),
        discount: Decimal::ZERO,
        amount: Decimal::new(300, 2),
        currency: "usd".into(),
        tiers: Vec::new(),
        adjusts_period: adjusts,
    }
}

/// The test ClickHouse's HTTPS url and the directory of its test CA, as
/// `scripts/services/clickhouse.sh` sets them up (`CLICKHOUSE_HTTPS_PORT`,
/// `TALLY_SERVICES_DIR`).
fn tls_server() -> (String, std::path::PathBuf) {
    let port = std::env::var("CLICKHOUSE_HTTPS_PORT").unwrap_or_else(|_| "8443".into());
    let services = std::env::var("TALLY_SERVICES_DIR").map_or_else(
        |_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.services"),
        std::path::PathBuf::from,
    );
    (
        format!("https://127.0.0.1:{port}"),
        services.join("clickhouse/tls"),
    )
}

/// A store in a new database of its own, named after `test`.
fn store(test: &str) -> (ClickHouse, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let database = format!("tally_test_{test}_{}_{nanos}", std::process::id());
    let store = ClickHouse::new(&url(), &database).unwrap();
    store.ensure_schema().unwrap();
    (store, database)
}

#[test]
#[ignore = "needs ClickHouse: scripts/services/up.sh clickhouse"]
fn stale_lines_are_found_by_book_and_period_and_retired_in_chunks() {
    let (store, database) = store("store");
    let (october, november) = (
        Period::from_str("2026-10").unwrap(),
        Period::from_str("2026-11").unwrap(),
    );
    // 2,500 November lines of the old book (more than one retirement statement holds),
    // an adjustment of October billed in November, October's line of the old book,
    // and one November line the current book rated.
    let mut lines: Vec<InvoiceLine> = (0..2500)
        .map(|i| line(&format!("cust_{i:05}"), november, None, "old"))
        .collect();
    lines.push(line("cust_00000", november, Some(october), "old"));
    lines.push(line("cust_00000", october, None, "old"));
    lines.push(line("cust_current", november, None, "current"));
    let rows: Vec<(u64, &InvoiceLine)> = lines.iter().map(|l| (7, l)).collect();
    store.insert_versioned(&rows).unwrap();

    let stale = store
        .lines_rated_with_another_book("current", Some(november))
        .unwrap();
    assert_eq!(stale.len(), 2501, "November's old-book lines only");
    let adjustment = stale.iter().find(|l| l.adjusts.is_some()).unwrap();
    assert_eq!(
        (adjustment.customer.as_str(), adjustment.price.as_str()),
        ("cust_00000", "resolutions")
    );
    assert_eq!(
        (adjustment.period, adjustment.adjusts, adjustment.version),
        (november, Some(october), 7)
    );
    assert_eq!(
        store
            .lines_rated_with_another_book("current", None)
            .unwrap()
            .len(),
        2502,
        "every period's"
    );

    // A version older than the rows retires nothing; the rows' own version does.
    store.retire(6, &stale).unwrap();
    let live = |period: &str| {
        query(&format!(
            "SELECT count() FROM {database}.invoice_lines WHERE period_start = '{period}-01 00:00:00'"
        ))
    };
    assert_eq!(live("2026-11").trim(), "2502");
    store.retire(7, &stale).unwrap();
    assert_eq!(live("2026-11").trim(), "1", "the current book's line stays");
    assert_eq!(live("2026-10").trim(), "1", "October's was not asked for");
    // The reader `tally explain` and `tally reconcile` use agrees with the view.
    let read = store.lines(november, None).unwrap();
    let customers: Vec<&str> = read.iter().map(|l| l.customer.as_str()).collect();
    assert_eq!(customers, ["cust_current"]);
    assert_eq!(store.lines(october, None).unwrap().len(), 1);
    assert!(store
        .lines_rated_with_another_book("current", Some(november))
        .unwrap()
        .is_empty());
    query(&format!("DROP DATABASE {database}"));
}

#[test]
#[ignore = "needs ClickHouse: scripts/services/up.sh clickhouse"]
fn repricings_read_back_by_customer_and_month_once_each_however_often_written() {
    let (store, database) = store("repricings");
    let (october, november) = (
        Period::from_str("2026-10").unwrap(),
        Period::from_str("2026-11").unwrap(),
    );
    let at = |time: &str| time.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    let repricing =
        |customer: &str, period, adjusts, (before, after): (&str, &str), when| Repricing {
            id: format!("{customer}-{period}"),
            customer: customer.to_owned(),
            price: "resolutions".to_owned(),
            period,
            adjusts,
            repriced_at: at(when),
            book_before: "old".to_owned(),
            book_after: "new".to_owned(),
            amount_before: before.parse().unwrap(),
            amount_after: after.parse().unwrap(),
        };
    let rows = [
        (
            9,
            repricing(
                "acme",
                november,
                None,
                ("495.00", "425.00"),
                "2026-12-07T10:00:00Z",
            ),
        ),
        (
            3,
            repricing(
                "acme",
                november,
                Some(october),
                ("1.98", "0"),
                "2026-12-07T09:00:00Z",
            ),
        ),
        (
            9,
            repricing(
                "acme",
                october,
                None,
                ("1.00", "2.00"),
                "2026-12-07T10:00:00Z",
            ),
        ),
        (
            9,
            repricing(
                "globex",
                november,
                None,
                ("1.00", "2.00"),
                "2026-12-07T10:00:00Z",
            ),
        ),
    ];
    // A batch written again (a retry after a failure) adds nothing.
    store.insert_repricings(&rows).unwrap();
    store.insert_repricings(&rows[..2]).unwrap();
    let read = store.repricings_of(november, "acme").unwrap();
    assert_eq!(read, [rows[1].1.clone(), rows[0].1.clone()], "oldest first");
    assert_eq!(
        store.repricings_of(october, "acme").unwrap(),
        [rows[2].1.clone()]
    );
    assert_eq!(store.repricings_of(november, "initech").unwrap(), []);
    query(&format!("DROP DATABASE {database}"));
}

#[test]
#[ignore = "needs ClickHouse: scripts/services/up.sh clickhouse"]
fn a_batch_larger_than_one_insert_is_stored_whole_and_once() {
    // A rater far behind stores millions of lines at once, sent in inserts of 50,000:
    // two full inserts and a row, with nothing lost or written twice at their edges.
    let (store, database) = store("chunks");
    // Each insert makes a part of its own (one month, one partition), which merges
    // would combine: stopped, the parts count the inserts.
    query(&format!("SYSTEM STOP MERGES {database}.rated_lines"));
    let november = Period::from_str("2026-11").unwrap();
    let lines: Vec<InvoiceLine> = (0..100_001)
        .map(|i| line(&format!("cust_{i:06}"), november, None, "book"))
        .collect();
    let rows: Vec<(u64, &InvoiceLine)> = lines.iter().map(|l| (1, l)).collect();
    store.insert_versioned(&rows).unwrap();
    let parts = query(&format!(
        "SELECT count() FROM system.parts WHERE database = '{database}' AND table = 'rated_lines' AND active"
    ));
    assert_eq!(parts.trim(), "3", "three inserts");
    let counted = query(&format!(
        "SELECT count(), uniqExact(customer), min(customer), max(customer) FROM {database}.rated_lines"
    ));
    assert_eq!(counted.trim(), "100001\t100001\tcust_000000\tcust_100000");
    query(&format!("DROP DATABASE {database}"));
}

#[test]
#[ignore = "needs ClickHouse: scripts/services/up.sh clickhouse"]
fn answers_of_more_than_ten_mebibytes_are_read_whole() {
    // ureq caps a body at 10 MiB unless told otherwise: a large book's stale lines,
    // read after every price-book change, are more than that.
    let (store, database) = store("large_answer");
    let november = Period::from_str("2026-11").unwrap();
    let padding = "x".repeat(400);
    let lines: Vec<InvoiceLine> = (0..30_000)
        .map(|i| line(&format!("cust_{i:05}_{padding}"), november, None, "old"))
        .collect();
    let rows: Vec<(u64, &InvoiceLine)> = lines.iter().map(|l| (1, l)).collect();
    store.insert_versioned(&rows).unwrap();
    let answer_bytes: usize = query(&format!(
        "SELECT sum(length(customer)) FROM {database}.rated_lines"
    ))
    .trim()
    .parse()
    .unwrap();
    assert!(
        answer_bytes > 10 << 20,
        "{answer_bytes} bytes of customer ids alone"
    );
    let stale = store.lines_rated_with_another_book("new", None).unwrap();
    assert_eq!(stale.len(), 30_000);
    assert_eq!(store.lines(november, None).unwrap().len(), 30_000);
    query(&format!("DROP DATABASE {database}"));
}

#[test]
#[ignore = "needs ClickHouse: scripts/services/up.sh clickhouse"]
fn each_window_shows_its_latest_value_and_late_usage_stays_apart() {
    let (store, database) = store("windows");
    let (october, november) = (
        Period::from_str("2026-10").unwrap(),
        Period::from_str("2026-11").unwrap(),
    );
    let tokens = Arc::new(SeriesKey {
        customer: "cust_acme".into(),
        meter: "tokens".into(),
        group: vec!["gpt-x".into()],
        adjusts: None,
    });
    let late = Arc::new(SeriesKey {
        adjusts: Some(october),
        ..SeriesKey::clone(&tokens)
    });
    let hour = |start: &str| -> (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) {
        let start = chrono::DateTime::parse_from_rfc3339(start)
            .unwrap()
            .to_utc();
        (start, start + chrono::Duration::hours(1))
    };
    let window =
        |series: &Arc<SeriesKey>, period: Period, start: &str, value: &str, revision, version| {
            let (window_start, window_end) = hour(start);
            StoredWindow {
                series: Arc::clone(series),
                period_start: period.start(),
                window: WindowUsage {
                    window_start,
                    window_end,
                    value: MeterValue {
                        value: Decimal::from_str(value).unwrap(),
                        latest: None,
                    },
                    revision,
                },
                version,
            }
        };
    let windows = [
        window(&tokens, october, "2026-10-31T23:00:00Z", "1200.5", 1, 10),
        window(&tokens, october, "2026-10-31T23:00:00Z", "1800.25", 2, 14),
        window(&tokens, november, "2026-11-01T00:00:00Z", "300", 1, 14),
        // October's usage arriving after it closed: billed in November as an
        // adjustment of October, windowed at November's start, a row of its own.
        window(&late, november, "2026-11-01T00:00:00Z", "40", 1, 20),
    ];
    store.insert_windows(&windows).unwrap();
    // A replay writes the same rows again, and a batch left from a revoked partition
    // its older state: nothing changes.
    store.insert_windows(&windows[1..]).unwrap();
    store.insert_windows(&windows[..1]).unwrap();
    let usage = |filter: &str| {
        query(&format!(
            "SELECT period_start, adjusts_period, window_start, window_end, value, revision \
             FROM {database}.window_usage WHERE customer = 'cust_acme' AND meter = 'tokens' \
             AND dimensions = '[\"gpt-x\"]' {filter} \
             ORDER BY period_start, adjusts_period, window_start FORMAT TSV"
        ))
    };
    assert_eq!(
        usage(""),
        "2026-10-01 00:00:00\t\t2026-10-31 23:00:00\t2026-11-01 00:00:00\t1800.25\t2\n\
         2026-11-01 00:00:00\t\t2026-11-01 00:00:00\t2026-11-01 01:00:00\t300\t1\n\
         2026-11-01 00:00:00\t2026-10\t2026-11-01 00:00:00\t2026-11-01 01:00:00\t40\t1\n"
    );
    // A filter on a column outside the sorting key sees the current rows only.
    assert_eq!(
        usage("AND revision = 1 AND period_start = '2026-10-01 00:00:00'"),
        ""
    );
    query(&format!("DROP DATABASE {database}"));
}

#[test]
#[ignore = "needs ClickHouse: scripts/services/up.sh clickhouse"]
fn current_lines_and_a_customers_windows_read_back_as_written() {
    let (store, database) = store("read_back");
    let (october, november) = (
        Period::from_str("2026-10").unwrap(),
        Period::from_str("2026-11").unwrap(),
    );
    // Quotes and backslashes in an id must not break (or escape) the query.
    let customer = r"o'brien\co";
    let mut first = line(customer, november, None, "book");
    first.tiers = vec![tally_schemas::records::TierCharge {
        tier: 1,
        up_to: "inf".into(),
        quantity: Decimal::from(3),
        package_size: None,
        unit_amount: Decimal::ONE,
        flat_amount: Decimal::ZERO,
        amount: Decimal::from(3),
    }];
    let mut revised = first.clone();
    revised.quantity = Decimal::from(4);
    revised.amount = Decimal::new(400, 2);
    let adjustment = line(customer, november, Some(october), "book");
    let other = line("cust_other", november, None, "book");
    let october_line = line(customer, october, None, "book");
    store
        .insert_versioned(&[
            (3, &first),
            (5, &revised),
            (5, &adjustment),
            (5, &other),
            (5, &october_line),
        ])
        .unwrap();
    let mut lines = store.lines(november, Some(customer)).unwrap();
    lines.sort_by_key(|l| l.adjusts_period);
    assert_eq!(lines, [revised.clone(), adjustment.clone()]);
    // Decimals compare by value: their scale ("4.00", not "4") is checked as text.
    let figures =
        |l: &InvoiceLine| [l.quantity, l.subtotal, l.discount, l.amount].map(|d| d.to_string());
    assert_eq!(figures(&lines[0]), ["4", "3.00", "0", "4.00"]);
    assert!(store.lines(november, Some("o'")).unwrap().is_empty());
    let mut every_customers = store.lines(november, None).unwrap();
    every_customers
        .sort_by(|a, b| (&a.customer, a.adjusts_period).cmp(&(&b.customer, b.adjusts_period)));
    assert_eq!(every_customers, [other, revised, adjustment]);

    let series_of = |customer: &str, group: &str, adjusts| {
        Arc::new(SeriesKey {
            customer: customer.into(),
            meter: "tokens".into(),
            group: vec![group.into()],
            adjusts,
        })
    };
    let series = |group: &str, adjusts| series_of(customer, group, adjusts);
    let window_in = |period: Period, series: &Arc<SeriesKey>, hour: u32, value: i64| {
        let window_start = period.start() + chrono::Duration::hours(i64::from(hour));
        StoredWindow {
            series: Arc::clone(series),
            period_start: period.start(),
            window: WindowUsage {
                window_start,
                window_end: window_start + chrono::Duration::hours(1),
                value: MeterValue {
                    value: Decimal::from(value),
                    latest: None,
                },
                revision: 1,
            },
            version: 5,
        }
    };
    let window =
        |series: &Arc<SeriesKey>, hour: u32, value: i64| window_in(november, series, hour, value);
    let (gpt, llama, late) = (
        series("gpt-x", None),
        series("llama-z", None),
        series("gpt-x", Some(october)),
    );
    let written = [
        window(&llama, 2, 7),
        window(&gpt, 5, 30),
        window(&gpt, 1, 10),
        window(&late, 0, 4),
        // Another customer's (whose id the customer's is a prefix of) and another
        // month's windows: not the customer's November.
        window(&series_of(&format!("{customer}x"), "gpt-x", None), 3, 99),
        window_in(october, &gpt, 3, 98),
    ];
    store.insert_windows(&written).unwrap();
    let read: Vec<(SeriesKey, Vec<(u32, String)>)> = store
        .windows(november, customer)
        .unwrap()
        .into_iter()
        .map(|(key, windows)| {
            let windows = (windows.iter())
                .map(|w| {
                    let hour = (w.window_start - november.start()).num_hours();
                    assert_eq!(w.window_end - w.window_start, chrono::Duration::hours(1));
                    (u32::try_from(hour).unwrap(), w.value.value.to_string())
                })
                .collect();
            (SeriesKey::clone(&key), windows)
        })
        .collect();
    assert_eq!(
        read,
        [
            (
                SeriesKey::clone(&gpt),
                vec![(1, "10".to_owned()), (5, "30".to_owned())]
            ),
            (SeriesKey::clone(&late), vec![(0, "4".to_owned())]),
            (SeriesKey::clone(&llama), vec![(2, "7".to_owned())]),
        ]
    );
    query(&format!("DROP DATABASE {database}"));
}

#[test]
#[ignore = "needs ClickHouse: scripts/services/up.sh clickhouse"]
fn tls_trusts_the_authorities_of_the_ca_file_and_says_what_is_wrong_with_one() {
    // scripts/services/clickhouse.sh serves HTTPS on 8443 with a certificate of its
    // own test CA (chDB serves no TLS; scripts/test.sh skips tests named tls there).
    let (https, tls) = tls_server();
    let trusting = |ca_file: &str| {
        ClickHouse::new(&https, "tally_test_tls")
            .unwrap()
            .with_credentials(&ClickHouseCredentials {
                ca_file: Some(tls.join(ca_file)),
                ..ClickHouseCredentials::default()
            })
    };
    let store = trusting("ca.pem").unwrap();
    store.ensure_schema().unwrap();
    let november = Period::from_str("2026-11").unwrap();
    let billed = line("cust_tls", november, None, "old");
    store.insert_versioned(&[(1, &billed)]).unwrap();
    let stale = store
        .lines_rated_with_another_book("current", Some(november))
        .unwrap();
    assert_eq!(stale.len(), 1);
    query("DROP DATABASE tally_test_tls");

    // The system's roots do not hold the test CA.
    let untrusted = ClickHouse::new(&https, "tally_test_tls").unwrap();
    let error = untrusted.ensure_schema().unwrap_err();
    assert!(
        matches!(error, ClickHouseError::Unreachable { .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("certificate verify failed"),
        "{error}"
    );
    assert!(error.to_string().contains("clickhouse.ca_file"), "{error}");
    // A key is no authority, a missing file no file.
    for (file, why) in [
        ("server.key", "holds no PEM certificate"),
        ("missing.pem", "No such file"),
    ] {
        let error = trusting(file).unwrap_err();
        assert!(matches!(error, ClickHouseError::CaFile { .. }), "{error}");
        assert!(error.to_string().contains(why), "{error}");
    }
    // A CA file says the url is meant to be https.
    let plain = ClickHouse::new(&url(), "tally_test_tls")
        .unwrap()
        .with_credentials(&ClickHouseCredentials {
            ca_file: Some(tls.join("ca.pem")),
            ..ClickHouseCredentials::default()
        });
    assert!(matches!(
        plain,
        Err(ClickHouseError::CaFileWithoutTls { .. })
    ));
}

#[test]
#[ignore = "needs ClickHouse: scripts/services/up.sh clickhouse"]
fn a_lines_look_up_gives_the_newest_version_usage_wrote_not_opening_rows() {
    let (store, database) = store("lookup");
    let november = Period::from_str("2026-11").unwrap();
    let (opened, used) = (
        line("cust_opened", november, None, "book"),
        line("cust_used", november, None, "book"),
    );
    // An opening (zero-usage) row is stored at version 0; usage writes its record's.
    store
        .insert_versioned(&[(0, &opened), (12, &used), (0, &used), (40, &used)])
        .unwrap();
    let ids = [opened.id.clone(), used.id.clone()];
    let stored = store.stored_versions_of(&ids, Some(november)).unwrap();
    assert_eq!(stored, [(used.id.clone(), 40)].into_iter().collect());
    assert!(store
        .stored_versions_of(&ids[..1], None)
        .unwrap()
        .is_empty());
    let december = Period::from_str("2026-12").unwrap();
    assert!(store
        .stored_versions_of(&ids, Some(december))
        .unwrap()
        .is_empty());
    query(&format!("DROP DATABASE {database}"));
}

#[test]
#[ignore = "needs ClickHouse: scripts/services/up.sh clickhouse"]
fn a_database_is_its_first_pipelines_and_refuses_another_or_batch_runs() {
    let (claimed, database) = store("claims");
    claimed.claim_for_pipeline("prod").unwrap();
    // The same pipeline again (a restart, a second rater): its own.
    claimed.claim_for_pipeline("prod").unwrap();
    let error = claimed.claim_for_pipeline("staging").unwrap_err();
    assert!(error.is_unusable_for_this_pipeline(), "{error}");
    assert!(
        error.to_string().contains(&format!(
            "ClickHouse database {database} at {} is claimed by the pipeline of topic prefix prod, and this rater is of topic prefix staging:",
            url()
        )),
        "{error}"
    );
    // A batch run may not write there either, lines or none yet: its versions would
    // outrank the pipeline's for good.
    let november = Period::from_str("2026-11").unwrap();
    let batch_lines = [line("acme", november, None, "book")];
    let error = claimed
        .replace_period(1_796_000_000_000, november, &batch_lines)
        .unwrap_err();
    assert!(
        matches!(error, ClickHouseError::PipelineDatabase { .. }),
        "{error}"
    );
    query(&format!("DROP DATABASE {database}"));

    // A database of `tally rate --clickhouse` runs, whose versions outrank every
    // windows offset, is no pipeline's to claim.
    let (batch, database) = store("batch_claim");
    batch
        .replace_period(1_796_000_000_000, november, &batch_lines)
        .unwrap();
    let error = batch.claim_for_pipeline("prod").unwrap_err();
    assert!(error.is_unusable_for_this_pipeline(), "{error}");
    assert!(
        error
            .to_string()
            .contains("holds lines of `tally rate --clickhouse` runs"),
        "{error}"
    );
    query(&format!("DROP DATABASE {database}"));
}

#[test]
#[ignore = "needs ClickHouse: scripts/services/up.sh clickhouse"]
fn two_pipelines_claiming_a_database_at_once_agree_on_one_owner() {
    // Claims made within the same second, each rater having found none: without
    // waiting for the other's claim, each could read itself as the first.
    for round in 0..3 {
        let (_, database) = store(&format!("claim_race_{round}"));
        let start = std::sync::Barrier::new(2);
        let owners: Vec<bool> = std::thread::scope(|scope| {
            let claims: Vec<_> = ["blue", "green"]
                .map(|prefix| {
                    let (start, database) = (&start, &database);
                    scope.spawn(move || {
                        let store = ClickHouse::new(&url(), database).unwrap();
                        start.wait();
                        match store.claim_for_pipeline(prefix) {
                            Ok(()) => true,
                            Err(ClickHouseError::ClaimedByAnotherPipeline { .. }) => false,
                            Err(e) => panic!("{e}"),
                        }
                    })
                })
                .into_iter()
                .collect();
            claims.into_iter().map(|c| c.join().unwrap()).collect()
        });
        assert_eq!(
            owners.iter().filter(|owns| **owns).count(),
            1,
            "round {round}: {owners:?}"
        );
        query(&format!("DROP DATABASE {database}"));
    }
}
