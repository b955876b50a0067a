//! Months and late usage: revisions while a month is open, adjustments once it closed
//! (by its grace, by command or by idle partitions), corrections, settled months let
//! go, and event times judged by the broker's clock.

use std::time::Duration;

use rust_decimal::Decimal;

use crate::harness::{self, Pipeline};
use crate::{
    common, customers, edited, line_for, log_field, rejection_code, resolution, resolution_each,
    tokens_event,
};

/// Waits for October's adjustment lines billed in November: one `resolutions` line of
/// `quantity` for each customer `expected_october` bills resolutions to.
fn assert_resolution_adjustments(p: &Pipeline, expected_october: &[harness::Line], quantity: u32) {
    let billed: Vec<&String> = expected_october
        .iter()
        .filter(|l| l.1 == "resolutions")
        .map(|l| &l.0)
        .collect();
    let sql = format!(
        "SELECT customer, price, quantity, adjusts_period FROM {}.invoice_lines \
         WHERE period_start = '2026-11-01 00:00:00' AND adjusts_period != '' \
         ORDER BY customer FORMAT TSV",
        p.database
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let adjustments = loop {
        let rows = p.query(&sql);
        if rows.lines().count() == billed.len() {
            break rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {} adjustment lines, found:\n{rows}",
            billed.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    for (row, customer) in adjustments.lines().zip(&billed) {
        assert_eq!(row, format!("{customer}\tresolutions\t{quantity}\t2026-10"));
    }
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn late_events_revise_an_open_period_and_become_adjustments_once_it_closed() {
    let _servers = harness::shared();
    let rater_port = common::free_port();
    let mut p = Pipeline::new(
        "late",
        5_000,
        10,
        &format!("[aggregator]\nmetrics_listen = \"127.0.0.1:0\"\ncommit_interval = \"100ms\"\nperiod_close_grace = \"1h\"\ndedupe_horizon = \"35d\"\n[rater]\nmetrics_listen = \"127.0.0.1:{rater_port}\"\nflush_interval = \"200ms\""),
    );
    // cust_00000 moves from starter to pro in November; cust_00001 leaves after
    // October.
    let book = std::fs::read_to_string(&p.config).unwrap();
    let moved = "[[customers]]\nid = \"cust_00000\"\nplan = \"starter\"\n";
    let change = "\n[[customers.plan_changes]]\nfrom = \"2026-11\"\nplan = \"pro\"\n";
    let book = edited(&book, moved, &format!("{moved}{change}"));
    let leaving = "[[customers]]\nid = \"cust_00001\"\nplan = \"pro\"\n";
    let book = edited(&book, leaving, &format!("{leaving}through = \"2026-10\"\n"));
    std::fs::write(&p.config, book).unwrap();
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let mut october = p.lines();
    p.produce(&october);
    // November 00:30: October's grace (1 h) has not passed, so late October usage
    // still lands in October.
    p.produce(&resolution_each("nov", "2026-11-01T00:30:00Z"));
    let in_grace = resolution_each("grace", "2026-10-31T22:00:00Z");
    p.produce(&in_grace);
    october.extend(in_grace);
    // November 02:00 everywhere: October is closed in every partition.
    p.produce(&resolution_each("close", "2026-11-01T02:00:00Z"));
    // Two late October resolutions per customer after the close: adjustments.
    let mut after_close = resolution_each("late1", "2026-10-31T23:00:00Z");
    after_close.extend(resolution_each("late2", "2026-10-15T08:00:00Z"));
    p.produce(&after_close);
    // Older than the 35-day dedupe horizon: refused, with that reason.
    let too_old = resolution("ancient", "cust_00001", "2026-09-01T00:00:00Z");
    p.produce(std::slice::from_ref(&too_old));

    let expected_october = p.expected_for(&october, "2026-10");
    // October is rated on starter (a price pro does not have).
    line_for(&expected_october, "cust_00000", "gpt-x-tokens");
    assert_resolution_adjustments(&p, &expected_october, 2);
    // The customer who moved: November's lines are pro's (its platform fee covers
    // both November resolutions), while the two late October resolutions are priced
    // as October's plan, starter, would have (0.99 each).
    let moved_lines = format!(
        "SELECT plan, price, quantity, amount, adjusts_period FROM {}.invoice_lines \
         WHERE customer = 'cust_00000' AND period_start = '2026-11-01 00:00:00' \
         ORDER BY adjusts_period, price FORMAT TSV",
        p.database
    );
    let expected_moved = "pro\tresolutions\t2\t49.00\t\npro\ttokens\t0\t0.00\t\nstarter\tresolutions\t2\t1.98\t2026-10\n";
    // The customer who left: no November lines (no platform fee), its November
    // usage unbilled and counted, its late October usage billed.
    let left_lines = format!(
        "SELECT price, quantity, adjusts_period FROM {}.invoice_lines \
         WHERE customer = 'cust_00001' AND period_start = '2026-11-01 00:00:00' FORMAT TSV",
        p.database
    );
    let expected_left = "resolutions\t2\t2026-10\n";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (moved, left) = (p.query(&moved_lines), p.query(&left_lines));
        if (moved.as_str(), left.as_str()) == (expected_moved, expected_left) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cust_00000's November lines, expected:\n{expected_moved}found:\n{moved}\ncust_00001's, expected:\n{expected_left}found:\n{left}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let unsubscribed = harness::metric(
        rater_port,
        "tally_rater_unbilled_usage_total{reason=\"not_subscribed\"}",
    );
    assert!(unsubscribed.is_some_and(|n| n >= 1.0), "{unsubscribed:?}");
    // Windows are stored only when asked for (`[rater] store_windows`).
    let windows = p.query(&format!("SELECT count() FROM {}.window_usage", p.database));
    assert_eq!(windows.trim(), "0");
    // October itself is exactly what tally rate bills for the usage that arrived in
    // time, and stays so.
    p.period = "2026-10";
    p.wait_for(&expected_october, Duration::from_secs(60));
    assert_eq!(rejection_code(&p, &too_old), "too_late");
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn corrections_lower_lines_as_tally_rate_does_and_a_late_one_is_a_credit() {
    let _servers = harness::shared();
    let mut p = Pipeline::new(
        "corrections",
        5_000,
        10,
        "[aggregator]\nmetrics_listen = \"127.0.0.1:0\"\ncommit_interval = \"100ms\"\nperiod_close_grace = \"1h\"\ndedupe_horizon = \"35d\"",
    );
    let book = std::fs::read_to_string(&p.config).unwrap();
    let book = edited(
        &book,
        r#"value_property = "$.tokens""#,
        "value_property = \"$.tokens\"\nallow_negative_values = true",
    );
    std::fs::write(&p.config, book).unwrap();
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    // A gateway's over-reports corrected, on every plan; and cust_00004's llama-z
    // usage corrected by far more than it had: its line bills zero usage.
    let mut october = p.lines();
    for customer in ["cust_00000", "cust_00001", "cust_00002", "cust_00003"] {
        let fix = tokens_event(
            &format!("fix-{customer}"),
            customer,
            "gpt-x",
            -500,
            "2026-10-20T00:00:00Z",
        );
        october.push(fix);
    }
    october.push(tokens_event(
        "fix-big",
        "cust_00004",
        "llama-z",
        -100_000_000,
        "2026-10-21T00:00:00Z",
    ));
    p.produce(&october);
    let expected = p.expected_for(&october, "2026-10");
    assert_eq!(
        line_for(&expected, "cust_00004", "llama-z-tokens").2,
        "0",
        "the over-corrected line bills zero usage"
    );
    p.period = "2026-10";
    p.wait_for(&expected, Duration::from_secs(180));

    // October closes; then cust_00001 (pro: tokens by volume) corrects 200,000 more of
    // its October tokens: a credit in November, what October would have billed less.
    p.produce(&resolution_each("close", "2026-11-01T02:00:00Z"));
    let late = tokens_event(
        "late-fix",
        "cust_00001",
        "gpt-x",
        -200_000,
        "2026-10-15T08:00:00Z",
    );
    p.produce(std::slice::from_ref(&late));
    let mut with_late = october.clone();
    with_late.push(late);
    let rerated = p.expected_for(&with_late, "2026-10");
    let amount = |lines: &[harness::Line]| -> Decimal {
        line_for(lines, "cust_00001", "tokens").3.parse().unwrap()
    };
    let credit = amount(&rerated) - amount(&expected);
    assert!(credit < Decimal::ZERO, "{credit}");
    let query = format!(
        "SELECT quantity, amount FROM {}.invoice_lines WHERE customer = 'cust_00001' \
         AND price = 'tokens' AND period_start = '2026-11-01 00:00:00' \
         AND adjusts_period = '2026-10' FORMAT TSV",
        p.database
    );
    let wanted = format!("-200000\t{credit}\n");
    harness::eventually(
        "the late correction is a credit in November",
        Duration::from_secs(60),
        || p.query(&query) == wanted,
    );
    // October itself stays as billed.
    p.wait_for(&expected, Duration::from_secs(30));
}

/// Waits until November's lines with usage are two `resolutions` per customer (`first`
/// for the first customer) and the first customer's adjustment for one late October
/// resolution.
fn wait_for_november_resolutions(p: &Pipeline, first: u32) {
    let customers = customers();
    let sql = format!(
        "SELECT customer, price, quantity, adjusts_period FROM {}.invoice_lines \
         WHERE period_start = '2026-11-01 00:00:00' AND price = 'resolutions' \
         AND quantity != '0' ORDER BY customer, adjusts_period FORMAT TSV",
        p.database
    );
    let mut expected = format!("{}\tresolutions\t{first}\t\n", customers[0]);
    expected.push_str(&format!("{}\tresolutions\t1\t2026-10\n", customers[0]));
    for c in &customers[1..] {
        expected.push_str(&format!("{c}\tresolutions\t2\t\n"));
    }
    harness::eventually(
        &format!("November's lines with usage: {expected}"),
        Duration::from_secs(60),
        || p.query(&sql) == expected,
    );
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_settled_month_is_let_go_by_the_aggregator_and_the_rater_while_its_lines_stay() {
    let _servers = harness::shared();
    let (aggregator_port, rater_port) = (common::free_port(), common::free_port());
    // A 5-day horizon (the generated month has events up to 4 days late): October
    // settles in a partition once its events reach November 6, 01:00.
    let p = Pipeline::new(
        "settle",
        3_000,
        10,
        &format!(
            "[aggregator]\nmetrics_listen = \"127.0.0.1:{aggregator_port}\"\ncommit_interval = \"100ms\"\ndedupe_horizon = \"5d\"\n\
             [rater]\nmetrics_listen = \"127.0.0.1:{rater_port}\"\nflush_interval = \"200ms\"\n"
        ),
    );
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let october = p.lines();
    p.produce(&october);
    let expected_october = p.expected();
    p.wait_for(&expected_october, Duration::from_secs(120));
    let gauge = |port: u16, name: &str| harness::metric(port, name).unwrap_or(-1.0);
    let october_series = gauge(aggregator_port, "tally_aggregator_series");
    let october_lines = gauge(rater_port, "tally_rater_ledger_lines");
    let october_rater_series = gauge(rater_port, "tally_rater_ledger_series");
    assert!(
        october_series > 10.0 && october_lines > 10.0 && october_rater_series >= october_lines,
        "{october_series} series, {october_lines} lines, {october_rater_series} series in the rater"
    );

    // A resolution per customer on November 2 closes October everywhere (grace 1 h);
    // a late October one then becomes an adjustment billed in November.
    p.produce(&resolution_each("02", "2026-11-02T00:00:00Z"));
    p.produce(&[resolution("late-1", "cust_00000", "2026-10-31T23:00:00Z")]);
    // One on November 7, in every partition: October can no longer change anywhere,
    // nor can its adjustment. Each customer has one resolutions series and line left.
    p.produce(&resolution_each("07", "2026-11-07T00:00:00Z"));
    harness::eventually(
        "the aggregator and the rater hold November only",
        Duration::from_secs(120),
        || {
            gauge(aggregator_port, "tally_aggregator_series") == 10.0
                && gauge(rater_port, "tally_rater_ledger_lines") == 10.0
                && gauge(rater_port, "tally_rater_ledger_series") == 10.0
        },
    );
    // Each partition told the rater, after its last October update, that October has
    // settled; nothing was deleted from the windows topic.
    let settled: Vec<String> = p
        .read_records("windows")
        .into_iter()
        .filter_map(|(key, payload, headers)| {
            assert!(!payload.is_empty(), "a tombstone in the windows topic");
            let period = headers.get("tally-settled")?;
            assert_eq!(
                String::from_utf8(key).unwrap(),
                format!("tally-settled/{period}")
            );
            Some(period.clone())
        })
        .collect();
    assert_eq!(
        settled.iter().filter(|p| *p == "2026-10").count(),
        harness::PARTITIONS as usize,
        "{settled:?}"
    );
    // The stored lines stay: October's as tally rate bills it, November's with usage.
    p.wait_for(&expected_october, Duration::from_secs(30));
    wait_for_november_resolutions(&p, 2);
    let windows = p.read_topic("windows");
    let october_usage = (windows.iter())
        .filter_map(|(payload, _)| serde_json::from_slice::<serde_json::Value>(payload).ok())
        .filter(|r| r["period_start"] == "2026-10-01T00:00:00Z")
        .count();
    assert!(october_usage > 20, "{october_usage} October records");

    // A new rater rebuilds from the windows topic: the settled records let October
    // and its adjustment go there too, and November goes on. It starts with the
    // starter plan's resolutions repriced and a support fee added: November's lines
    // are re-rated, settled October's, and the adjustment of it billed in November,
    // stay as billed.
    p.stop("rater-a");
    let book = std::fs::read_to_string(&p.config).unwrap();
    let book = edited(&book, r#"unit_amount = "0.99""#, r#"unit_amount = "1.09""#);
    let book = edited(
        &book,
        "id = \"starter\"\ncurrency = \"usd\"\n",
        "id = \"starter\"\ncurrency = \"usd\"\n\n[[plans.prices]]\nid = \"support\"\nbilling_scheme = \"flat\"\nunit_amount = \"5\"\n",
    );
    std::fs::write(&p.config, book).unwrap();
    p.start("rater", "rater-b");
    harness::eventually(
        "the rebuilt ledger holds November only",
        Duration::from_secs(120),
        || {
            p.log("rater-b").matches("ledger rebuilt").count() == harness::PARTITIONS as usize
                && gauge(rater_port, "tally_rater_ledger_lines") == 10.0
        },
    );
    // ...reading each partition from its first November record, which the offsets
    // rater-a committed say, not from the beginning: October's records are not read.
    let rebuilds: Vec<(i64, usize)> = (p.log("rater-b").lines())
        .filter(|line| line.contains("ledger rebuilt"))
        .map(|line| (log_field(line, "from"), log_field(line, "records") as usize))
        .collect();
    assert_eq!(rebuilds.len(), harness::PARTITIONS as usize);
    assert!(rebuilds.iter().all(|(from, _)| *from > 0), "{rebuilds:?}");
    let read: usize = rebuilds.iter().map(|(_, records)| records).sum();
    assert!(read > 0);
    assert!(
        read + october_usage <= windows.len(),
        "{read} records read of {}, {october_usage} of them October's",
        windows.len()
    );
    let late_october = resolution("late-2", "cust_00001", "2026-10-31T23:00:00Z");
    p.produce(&[
        resolution("nov-again", "cust_00000", "2026-11-07T01:00:00Z"),
        late_october.clone(),
    ]);
    wait_for_november_resolutions(&p, 3);
    assert_eq!(rejection_code(&p, &late_october), "too_late");
    p.wait_for(&expected_october, Duration::from_secs(30));
    let first_customer = p.query(&format!(
        "SELECT plan, amount, adjusts_period FROM {}.invoice_lines \
         WHERE period_start = '2026-11-01 00:00:00' AND customer = 'cust_00000' \
         AND price = 'resolutions' ORDER BY adjusts_period FORMAT TSV",
        p.database
    ));
    assert_eq!(first_customer, "starter\t3.27\t\nstarter\t0.99\t2026-10\n");
    // The other starter customers had no usage since the restart: only the price-book
    // check re-rated their two November resolutions at the new price.
    let other_starters = p.query(&format!(
        "SELECT DISTINCT amount FROM {}.invoice_lines \
         WHERE period_start = '2026-11-01 00:00:00' AND plan = 'starter' \
         AND customer != 'cust_00000' AND price = 'resolutions' FORMAT TSV",
        p.database
    ));
    assert_eq!(other_starters, "2.18\n");
    // November has ended by the clock, so finance may have invoiced it: each line the
    // new book changed or added is counted, and the log names the month.
    let count = |price: &str, usage: &str| {
        let sql = format!(
            "SELECT count() FROM {}.invoice_lines WHERE period_start = '2026-11-01 00:00:00' \
             AND plan = 'starter' AND price = '{price}' AND adjusts_period = '' {usage} FORMAT TSV",
            p.database
        );
        p.query(&sql).trim().parse::<f64>().unwrap()
    };
    let (repriced, added) = (
        count("resolutions", "AND quantity != '0'"),
        count("support", ""),
    );
    assert!(added > 0.0);
    assert_eq!(
        harness::metric(rater_port, "tally_rater_ended_month_lines_repriced_total"),
        Some(repriced + added)
    );
    assert!(
        (p.log("rater-b").lines()).any(|line| line.contains("WARN")
            && line.contains("lines of months that have ended")
            && line.contains("months=2026-11")),
        "{}",
        p.log("rater-b")
    );
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn closing_a_month_by_command_turns_its_later_usage_into_adjustments_in_every_partition() {
    let _servers = harness::shared();
    let p = Pipeline::new(
        "close",
        3_000,
        10,
        "[aggregator]\nmetrics_listen = \"127.0.0.1:0\"\ncommit_interval = \"100ms\"\nperiod_close_grace = \"1h\"",
    );
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    // October only: no partition's watermark reaches November, so by event time
    // October stays open everywhere.
    let october = p.lines();
    p.produce(&october);

    let early = p.tally(&["close-period", "--period", "2099-01"], &[]);
    assert!(!early.status.success());
    assert!(String::from_utf8_lossy(&early.stderr).contains("2099-01 has not ended yet"));
    // A mistyped prefix fails rather than create a topic no aggregator reads.
    let prefix = format!("{}-typo", p.prefix);
    let astray = p.tally(
        &["close-period", "--period", "2026-10"],
        &[("TALLY_KAFKA_TOPIC_PREFIX", &prefix)],
    );
    assert!(!astray.status.success());
    assert!(
        String::from_utf8_lossy(&astray.stderr).contains(&format!("find topic {prefix}.windows"))
    );
    // With --wait it returns once October's lines hold every event before the close.
    let closed = p.tally(
        &["close-period", "--period", "2026-10", "--wait", "2m"],
        &[],
    );
    let said = String::from_utf8_lossy(&closed.stdout);
    assert!(closed.status.success(), "{closed:?}");
    assert!(
        said.contains(&format!("each of the {} partitions", harness::PARTITIONS)),
        "{said}"
    );
    assert!(
        said.contains("2026-10's invoice lines in ClickHouse"),
        "{said}"
    );
    let expected_october = p.expected_for(&october, "2026-10");
    assert_eq!(p.invoice_lines_of("2026-10"), expected_october);
    // Control records naming no period, or one that has not ended, are refused (a
    // close cannot be undone); their partitions go on.
    p.produce_header(1, "tally-close-period", "October");
    p.produce_header(2, "tally-close-period", "2099-01");
    // An event carrying the header (copied with others by a mirroring producer, say)
    // is neither a close nor counted: kept with its bytes.
    let copied = resolution("copied-header", "cust_00001", "2026-10-31T23:40:00Z");
    p.produce_with_headers("cust_00001", &copied, &[("tally-close-period", "2026-10")]);
    p.produce(&resolution_each("after-close", "2026-10-31T23:30:00Z"));

    assert_resolution_adjustments(&p, &expected_october, 1);
    // October is what arrived before the close, and stays so.
    p.wait_for(&expected_october, Duration::from_secs(60));
    let refused: Vec<_> = p
        .read_topic("rejected")
        .into_iter()
        .filter(|(_, headers)| headers["tally.error.code"] == "invalid_control")
        .collect();
    let reasons: Vec<&str> = refused
        .iter()
        .map(|(_, headers)| headers["tally.error.reason"].as_str())
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(refused.iter().any(|(payload, headers)| *payload == copied
        && headers["tally.error.reason"].contains("a control record has no payload")));
    assert!(reasons
        .iter()
        .any(|r| r.contains("\"October\" is not a period")));
    assert!(reasons.iter().any(|r| r.contains("2099-01 had not ended")));
    p.assert_logged("agg-a", "period closed by a control record");
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_month_closed_before_any_of_its_usage_arrived_bills_what_tally_rate_does() {
    let _servers = harness::shared();
    let p = Pipeline::new(
        "backfill",
        3_000,
        10,
        "[aggregator]\nmetrics_listen = \"127.0.0.1:0\"\ncommit_interval = \"100ms\"\n\
         [rater]\nmetrics_listen = \"127.0.0.1:0\"",
    );
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    // October is closed before any of its usage reaches the pipeline (a month
    // backfilled after the cut-over): every event of it is late, an adjustment.
    let closed = p.tally(
        &["close-period", "--period", "2026-10", "--wait", "2m"],
        &[],
    );
    assert!(closed.status.success(), "{closed:?}");
    let october = p.lines();
    p.produce(&october);
    // October's own lines, opened by its first adjustment (flat fees and the tiers'
    // flat amounts the adjustments are priced above), and the adjustments of it
    // billed in November add up to what tally rate bills for October.
    type Totals = std::collections::BTreeMap<(String, String), (Decimal, Decimal, String)>;
    let add = |totals: &mut Totals, line: (&str, &str, &str, &str, &str)| {
        let (customer, price, quantity, amount, currency) = line;
        let total = (totals.entry((customer.to_owned(), price.to_owned())))
            .or_insert_with(|| (Decimal::ZERO, Decimal::ZERO, currency.to_owned()));
        total.0 += quantity.parse::<Decimal>().unwrap();
        total.1 += amount.parse::<Decimal>().unwrap();
    };
    let mut expected = Totals::new();
    for (customer, price, quantity, amount, currency) in p.expected_for(&october, "2026-10") {
        add(
            &mut expected,
            (&customer, &price, &quantity, &amount, &currency),
        );
    }
    let sql = format!(
        "SELECT customer, price, quantity, amount, currency FROM {}.invoice_lines \
         WHERE (period_start = '2026-10-01 00:00:00' AND adjusts_period = '') \
         OR adjusts_period = '2026-10' FORMAT TSV",
        p.database
    );
    let mut billed = Totals::new();
    harness::eventually(
        "October's lines and adjustments add up to tally rate's",
        Duration::from_secs(120),
        || {
            billed = Totals::new();
            for row in p.query(&sql).lines() {
                let cells: Vec<&str> = row.split('\t').collect();
                add(
                    &mut billed,
                    (cells[0], cells[1], cells[2], cells[3], cells[4]),
                );
            }
            billed == expected
        },
    );
    let adjusted = p.query(&format!(
        "SELECT count() FROM {}.invoice_lines WHERE adjusts_period = '2026-10' FORMAT TSV",
        p.database
    ));
    assert!(adjusted.trim().parse::<u32>().unwrap() > 10, "{adjusted}");
    // Finance compares the month as tally rate bills it (expected.jsonl, written by
    // expected_for above): its lines apart from their adjustments differ, with them
    // they agree.
    let expected = p.dir.path().join("expected.jsonl");
    let reconcile = |with: &[&str]| {
        let mut args = vec![
            "reconcile",
            "--period",
            "2026-10",
            expected.to_str().unwrap(),
        ];
        args.extend(["clickhouse"].iter().chain(with));
        let output = p.tally(&args, &[]);
        let report = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.code(), report)
    };
    let (apart, report) = reconcile(&[]);
    assert_eq!(apart, Some(1), "{report}");
    // The report says why, and what would compare the month as tally rate bills it.
    assert!(
        report.contains("of this month billed in later ones (its late usage) not added: --with-later-adjustments adds them"),
        "{report}"
    );
    let (together, report) = reconcile(&["--with-later-adjustments"]);
    assert_eq!(together, Some(0), "{report}");
    assert!(
        report.contains("of this month billed in later ones (its late usage) added to its lines"),
        "{report}"
    );
    // October had ended by the clock too: finance hears that its flat fees and first
    // tiers were billed now.
    let port = harness::metrics_port(&p.log("rater-a"), "rater metrics");
    let counted = harness::metric(port, "tally_rater_ended_month_lines_opened_total");
    assert!(counted.is_some_and(|n| n > 0.0), "{counted:?}");
    p.assert_logged(
        "rater-a",
        "usage of a month that had ended, of which no line was stored, opened it",
    );
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn idle_partitions_close_the_months_that_ended_by_themselves() {
    let _servers = harness::shared();
    let p = Pipeline::new(
        "idle_close",
        3_000,
        10,
        "[aggregator]\nmetrics_listen = \"127.0.0.1:0\"\ncommit_interval = \"100ms\"\nclose_idle_after = \"3s\"",
    );
    // October's events, none past its grace: by event time October stays open. In the
    // topic before the aggregator starts, so no partition is idle before reading them.
    let october = p.lines();
    p.produce(&october);
    // The latest month ended an hour (the grace) ago, before the aggregator starts: it
    // closes this one, or a later one if a month ends meanwhile.
    let ended = tally_schemas::time::Period::latest_ended_by(
        chrono::Utc::now() - chrono::Duration::hours(1),
    );
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let expected_october = p.expected();
    p.wait_for(&expected_october, Duration::from_secs(120));

    // Once idle for 3 s, each partition writes itself the control record that closes
    // every month ended an hour (the grace) and 3 s ago: by the clock, October and
    // each month since up to the last one.
    let closes = |p: &Pipeline| {
        (p.read_topic("events").into_iter())
            .filter_map(|(_, headers)| headers.get("tally-close-period").cloned())
            .collect::<Vec<_>>()
    };
    harness::eventually(
        "every partition has a close record",
        Duration::from_secs(60),
        || closes(&p).len() >= harness::PARTITIONS as usize,
    );
    assert!(
        closes(&p).iter().all(|period| *period >= ended.to_string()),
        "{:?}",
        closes(&p)
    );
    harness::eventually("the aggregator read them", Duration::from_secs(30), || {
        p.log("agg-a")
            .matches("period closed by a control record")
            .count()
            >= harness::PARTITIONS as usize
    });
    // Late October usage is now an adjustment, billed in the month the clock is in;
    // October's lines stay as they were.
    p.produce(&resolution_each("after-idle", "2026-10-31T23:30:00Z"));
    let open = ended.next().start().format("%Y-%m-%d %H:%M:%S");
    let customers = (expected_october.iter())
        .filter(|l| l.1 == "resolutions")
        .count();
    let sql = format!(
        "SELECT count() FROM {}.invoice_lines WHERE period_start >= '{open}' \
         AND adjusts_period = '2026-10' AND price = 'resolutions' AND quantity = '1' FORMAT TSV",
        p.database
    );
    harness::eventually(
        "an adjustment per customer in the open month",
        Duration::from_secs(60),
        || p.query(&sql).trim() == customers.to_string(),
    );
    p.wait_for(&expected_october, Duration::from_secs(30));
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn an_event_its_producer_stamps_ahead_is_judged_by_the_brokers_clock() {
    let _servers = harness::shared();
    let p = Pipeline::new(
        "stamped",
        2_000,
        10,
        "[aggregator]\ncommit_interval = \"100ms\"\n",
    );
    // A sender whose clock is 50 minutes ahead stamps its records and its events alike
    // (Kafka 4 refuses records stamped more than an hour ahead; older brokers take any).
    // Judged by its own stamp such an event would be on time, and would move its
    // partition's watermark (and the month's close) ahead with it.
    let ahead = chrono::Utc::now() + chrono::Duration::minutes(50);
    let time = ahead.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let stamped: Vec<Vec<u8>> = (0..harness::PARTITIONS)
        .map(|partition| resolution(&format!("ahead-{partition}"), "cust_00000", &time))
        .collect();
    for (partition, event) in stamped.iter().enumerate() {
        p.produce_stamped(
            partition as i32,
            "cust_00000",
            event,
            ahead.timestamp_millis(),
        );
    }
    p.produce(&p.lines());
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    p.wait_for(&p.expected(), Duration::from_secs(120));
    for event in &stamped {
        assert_eq!(rejection_code(&p, event), "time_in_future");
    }
}
