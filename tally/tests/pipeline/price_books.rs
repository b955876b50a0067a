//! Changed price books and meters, and replays: lines re-rated and retired as the book
//! says, settled months left as billed, a new customer billed its open month, and an
//! aggregator refusing a meter that would count its state otherwise.

use std::collections::BTreeMap;
use std::time::Duration;

use rust_decimal::Decimal;

use crate::harness::{self, Pipeline};
use crate::{
    common, customers, edited, line_for, log_field, partitions_settled, raise_prices, resolution,
    resolution_each, tokens_event,
};

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn lines_a_new_price_book_changes_are_kept_with_what_they_billed_before_and_explained() {
    let _servers = harness::shared();
    let p = Pipeline::new(
        "repricings",
        2_000,
        4,
        "[rater]\nmetrics_listen = \"127.0.0.1:0\"\nflush_interval = \"200ms\"\n",
    );
    p.produce(&p.lines());
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let before = p.expected();
    p.wait_for(&before, Duration::from_secs(120));
    let books = |p: &Pipeline| {
        p.query(&format!(
            "SELECT DISTINCT config_hash FROM {}.invoice_lines FORMAT TSV",
            p.database
        ))
    };
    let book_before = books(&p).trim().to_owned();
    p.stop("rater-a");

    // The starter resolution price and the pro platform fee go up, and the euro plan
    // gets a support fee.
    raise_prices(&p);
    let book = std::fs::read_to_string(&p.config).unwrap();
    let eu = "id = \"scale-eu\"\ncurrency = \"eur\"\nrounding = \"half_even\"\n";
    let support =
        "\n[[plans.prices]]\nid = \"support\"\nbilling_scheme = \"flat\"\nunit_amount = \"20\"\n";
    std::fs::write(&p.config, edited(&book, eu, &format!("{eu}{support}"))).unwrap();
    p.start("rater", "rater-b");
    let after = p.expected();
    p.wait_for(&after, Duration::from_secs(120));
    let book_after = books(&p).trim().to_owned();
    assert_ne!(book_before, book_after);

    // Every line whose amount changed, and every line added, has its row: before
    // (0 when added), after, both books.
    let amounts = |lines: &[harness::Line]| -> BTreeMap<(String, String), (String, String)> {
        (lines.iter())
            .map(|l| ((l.0.clone(), l.1.clone()), (l.3.clone(), l.4.clone())))
            .collect()
    };
    let was = amounts(&before);
    let mut changed: Vec<String> = (amounts(&after).into_iter())
        .filter_map(|((customer, price), (amount, currency))| {
            let zero = if currency == "jpy" { "0" } else { "0.00" };
            let before = was.get(&(customer.clone(), price.clone()));
            let before = before
                .map_or(zero, |(amount, _)| amount.as_str())
                .to_owned();
            (before != amount).then(|| {
                format!("{customer}\t{price}\t{before}\t{amount}\t{book_before}\t{book_after}\n")
            })
        })
        .collect();
    changed.sort();
    assert!(
        changed
            .iter()
            .any(|row| row.contains("\tsupport\t0.00\t20.00\t")),
        "{changed:?}"
    );
    let kept = p.query(&format!(
        "SELECT customer, price, amount_before, amount_after, book_before, book_after \
         FROM {}.line_repricings FINAL ORDER BY customer, price FORMAT TSV",
        p.database
    ));
    assert_eq!(kept, changed.concat());

    // Support sees it under the customer's month.
    let ((customer, price), (amount_after, _)) = (amounts(&after).into_iter())
        .find(|(key, (amount, currency))| {
            currency == "usd" && was.get(key).is_some_and(|(before, _)| before != amount)
        })
        .unwrap();
    let amount_before = &was[&(customer.clone(), price.clone())].0;
    let output = p.tally(
        &[
            "explain",
            "--pipeline",
            "--period",
            p.period,
            "--customer",
            &customer,
        ],
        &[],
    );
    let shown = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{shown}");
    assert!(
        shown.contains(&format!(
            "lines of {} a new price book changed after they were stored, or added from 0",
            p.period
        )),
        "{shown}"
    );
    assert!(
        shown.contains(&format!(
            "  {price}  {amount_before} usd -> {amount_after} usd  price book {book_before} -> {book_after}\n"
        )),
        "{shown}"
    );
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_rater_restarted_with_a_changed_price_book_rerates_open_lines_and_retires_the_rest() {
    let _servers = harness::shared();
    let rater_port = common::free_port();
    let p = Pipeline::new(
        "reprice",
        20_000,
        40,
        &format!(
            "[rater]\nmetrics_listen = \"127.0.0.1:{rater_port}\"\nflush_interval = \"200ms\"\n"
        ),
    );
    p.produce(&p.lines());
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let before = p.expected();
    p.wait_for(&before, Duration::from_secs(180));
    p.stop("rater-a");

    // What finance changes: the starter plan's resolution price goes up, its gpt-x
    // token price gets a new id, a customer leaves and one joins.
    let book = std::fs::read_to_string(&p.config).unwrap();
    let book = edited(&book, r#"unit_amount = "0.99""#, r#"unit_amount = "1.09""#);
    let book = edited(
        &book,
        r#"id = "gpt-x-tokens""#,
        r#"id = "gpt-x-tokens-2027""#,
    );
    // ...and its claude-y token price now selects a model nobody uses.
    let book = edited(
        &book,
        r#"filter = { model = "claude-y" }"#,
        r#"filter = { model = "claude-y2" }"#,
    );
    let book = edited(
        &book,
        "[[customers]]\nid = \"cust_00002\"\nplan = \"scale-eu\"\n",
        "",
    );
    // ...a starter customer moves to pro from October, and a pro customer's last
    // month was September.
    let moved = "[[customers]]\nid = \"cust_00004\"\nplan = \"starter\"\n";
    let change = "\n[[customers.plan_changes]]\nfrom = \"2026-10\"\nplan = \"pro\"\n";
    let book = edited(&book, moved, &format!("{moved}{change}"));
    let left = "[[customers]]\nid = \"cust_00005\"\nplan = \"pro\"\n";
    let book = edited(&book, left, &format!("{left}through = \"2026-09\"\n"));
    std::fs::write(
        &p.config,
        book + "\n[[customers]]\nid = \"cust_new\"\nplan = \"pro\"\n",
    )
    .unwrap();
    let after = p.expected();
    // Each change shows in what `tally rate` makes of the same month.
    let starter = |lines| line_for(lines, "cust_00000", "resolutions").3.clone();
    assert_ne!(starter(&before), starter(&after));
    line_for(&before, "cust_00000", "gpt-x-tokens");
    line_for(&after, "cust_00000", "gpt-x-tokens-2027");
    assert!(after.iter().all(|l| l.1 != "gpt-x-tokens"));
    let claude = |lines| line_for(lines, "cust_00000", "claude-y-tokens").2.clone();
    assert_ne!(claude(&before), "0");
    assert_eq!(claude(&after), "0");
    line_for(&before, "cust_00002", "resolutions");
    assert!(after.iter().all(|l| l.0 != "cust_00002"));
    assert_eq!(line_for(&after, "cust_new", "resolutions").3, "49.00");
    line_for(&before, "cust_00004", "gpt-x-tokens");
    line_for(&after, "cust_00004", "tokens");
    assert_eq!(
        after.iter().filter(|l| l.0 == "cust_00004").count(),
        2,
        "pro's two prices"
    );
    line_for(&before, "cust_00005", "resolutions");
    assert!(after.iter().all(|l| l.0 != "cust_00005"));

    p.start("rater", "rater-b");
    p.wait_for(&after, Duration::from_secs(120));
    p.wait_for_rated(&after, Duration::from_secs(60));
    // A consumer of the rated topic sees how much each line moved: from the amount the
    // earlier book billed, or, for a line never used, from nothing.
    let records = p.rated_topic_records();
    let current = |customer: &str, price: &str| {
        let mut found =
            (records.iter()).filter(|r| r["customer"] == customer && r["price"] == price);
        let record = found.next().unwrap_or_else(|| panic!("{customer} {price}"));
        assert!(found.next().is_none(), "one line of {customer} {price}");
        let decimal = |field: &str| record[field].as_str().unwrap().parse::<Decimal>().unwrap();
        (
            record["revision"].as_u64().unwrap(),
            decimal("delta"),
            decimal("amount"),
        )
    };
    let amount = |lines, customer, price| {
        line_for(lines, customer, price)
            .3
            .parse::<Decimal>()
            .unwrap()
    };
    let moved =
        |customer, price| amount(&after, customer, price) - amount(&before, customer, price);
    let (_, delta, _) = current("cust_00000", "resolutions");
    assert_eq!(delta, moved("cust_00000", "resolutions"));
    assert!(delta > Decimal::ZERO);
    let (revision, delta, _) = current("cust_00000", "claude-y-tokens");
    assert_eq!(
        (revision, delta),
        (0, moved("cust_00000", "claude-y-tokens"))
    );
    assert!(delta < Decimal::ZERO);
    // Moved from starter to pro: pro's resolutions line replaces starter's.
    assert_eq!(
        current("cust_00004", "resolutions").1,
        moved("cust_00004", "resolutions")
    );
    assert_eq!(
        current("cust_new", "resolutions"),
        (0, Decimal::from(49), Decimal::from(49))
    );
    p.assert_logged("rater-b", "lines an earlier price book rated");
    // Every line the new book no longer makes was retired, once: by its customer's
    // partition.
    let gone = before
        .iter()
        .filter(|b| !after.iter().any(|a| (&a.0, &a.1) == (&b.0, &b.1)))
        .count();
    assert!(gone > 10, "{gone}");
    let retired = harness::metric(rater_port, "tally_rater_lines_retired_total").unwrap();
    assert_eq!(retired, gone as f64, "{retired} retired, {gone} gone");

    // The same book again: nothing is stale, nothing changes.
    p.stop("rater-b");
    p.start("rater", "rater-c");
    harness::eventually(
        "rater-c has rebuilt its partitions",
        Duration::from_secs(60),
        || p.log("rater-c").matches("ledger rebuilt").count() == harness::PARTITIONS as usize,
    );
    p.wait_for(&after, Duration::from_secs(30));
    assert!(!p.log("rater-c").contains("earlier price book"));
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_repricing_the_rated_topic_refuses_is_stored_and_delivered_after_a_restart() {
    let _servers = harness::shared();
    let p = Pipeline::new("reprice_refused", 5_000, 20, "");
    p.produce(&p.lines());
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let before = p.expected();
    p.wait_for(&before, Duration::from_secs(120));
    p.wait_for_rated(&before, Duration::from_secs(60));
    p.stop("rater-a");

    let book = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        edited(&book, r#"unit_amount = "0.99""#, r#"unit_amount = "1.09""#),
    )
    .unwrap();
    let after = p.expected();
    assert_ne!(before, after);
    // The re-rated lines are larger than this: Kafka refuses them for good.
    p.set_topic_config("rated", "max.message.bytes", "200");
    p.start("rater", "rater-b");
    let (status, log) = p.wait_exit("rater-b", Duration::from_secs(120));
    assert!(!status.success(), "the rater stopped with an error:\n{log}");
    assert!(log.contains("lines an earlier price book rated"), "{log}");
    // Nothing the rated topic did not take was stored: the restarted rater still finds
    // the earlier book's lines, and re-rates them again.
    assert_eq!(p.invoice_lines(), before);

    p.set_topic_config("rated", "max.message.bytes", "1048588");
    p.start("rater", "rater-c");
    p.wait_for(&after, Duration::from_secs(120));
    p.wait_for_rated(&after, Duration::from_secs(60));
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_price_book_check_leaves_a_month_settled_in_the_customers_partition_as_billed() {
    let _servers = harness::shared();
    let p = Pipeline::new(
        "reprice_settled",
        3_000,
        10,
        "[aggregator]\nmetrics_listen = \"127.0.0.1:0\"\ncommit_interval = \"100ms\"\ndedupe_horizon = \"5d\"\n\
         [rater]\nmetrics_listen = \"127.0.0.1:0\"\nflush_interval = \"200ms\"\nprice_book_check_interval = \"1s\"\n",
    );
    // A pro customer without usage: its lines are zero-usage lines, one the platform fee.
    let book = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        book + "\n[[customers]]\nid = \"cust_idle\"\nplan = \"pro\"\n",
    )
    .unwrap();
    let idle_partition = harness::partition_of("cust_idle");
    assert!(
        customers()
            .iter()
            .any(|c| harness::partition_of(c) == idle_partition),
        "cust_idle's partition must get traffic for October to settle there"
    );
    let quiet = customers()
        .iter()
        .map(|c| harness::partition_of(c))
        .find(|&partition| partition != idle_partition)
        .unwrap();
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    p.produce(&p.lines());
    let billed = p.expected();
    assert_eq!(line_for(&billed, "cust_idle", "resolutions").3, "49.00");
    p.wait_for(&billed, Duration::from_secs(120));

    // Resolutions on November 7 in every partition but one: October settles (5-day
    // horizon) everywhere except in that quiet partition.
    let november: Vec<Vec<u8>> = customers()
        .iter()
        .filter(|c| harness::partition_of(c) != quiet)
        .map(|c| resolution(&format!("07-{c}"), c, "2026-11-07T00:00:00Z"))
        .collect();
    p.produce(&november);
    harness::eventually(
        "October settled in every partition but the quiet one",
        Duration::from_secs(120),
        || partitions_settled(&p, "2026-10") == harness::PARTITIONS as usize - 1,
    );
    p.stop("rater-a");

    raise_prices(&p);
    let repriced = p.expected();
    assert_eq!(line_for(&repriced, "cust_idle", "resolutions").3, "59.00");
    p.start("rater", "rater-b");

    // October is open in the quiet partition only: its customers' lines are re-rated,
    // every other customer's October, cust_idle's platform fee included, stays billed.
    let mut expected: Vec<harness::Line> = (repriced.iter())
        .filter(|l| harness::partition_of(&l.0) == quiet)
        .chain(
            billed
                .iter()
                .filter(|l| harness::partition_of(&l.0) != quiet),
        )
        .cloned()
        .collect();
    expected.sort();
    assert_ne!(
        expected, billed,
        "the quiet partition's customers are repriced"
    );
    // cust_idle's November fee is re-rated by its own partition, where November is open.
    let idle_november_fee = format!(
        "SELECT amount FROM {}.invoice_lines WHERE period_start = '2026-11-01 00:00:00' \
         AND customer = 'cust_idle' AND price = 'resolutions' FORMAT TSV",
        p.database
    );
    harness::eventually(
        "cust_idle's November platform fee at the new price",
        Duration::from_secs(120),
        || p.query(&idle_november_fee) == "59.00\n",
    );
    p.wait_for(&expected, Duration::from_secs(60));
    // The stale lines left (settled October's, in the customers' own partitions) are
    // no partition's to re-rate: the checks every second find nothing to do.
    let rerates = || {
        p.log("rater-b")
            .matches("lines an earlier price book rated")
            .count()
    };
    let settled_down = rerates();
    let port = harness::metrics_port(&p.log("rater-b"), "rater metrics");
    let checks = || harness::metric(port, "tally_rater_price_book_checks_total").unwrap_or(0.0);
    let checked = checks();
    // Two more rounds of checks of every partition, at least.
    harness::eventually(
        "two more checks of every partition",
        Duration::from_secs(60),
        || checks() >= checked + 2.0 * f64::from(harness::PARTITIONS),
    );
    assert_eq!(rerates(), settled_down, "{}", p.log("rater-b"));
}

/// The partitions `rater` says it rebuilt, from its log.
fn rebuilt_partitions(p: &Pipeline, rater: &str) -> std::collections::BTreeSet<i32> {
    p.log(rater)
        .lines()
        .filter(|line| line.contains("ledger rebuilt"))
        .map(|line| log_field(line, "partition") as i32)
        .collect()
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn raters_on_two_price_books_converge_on_the_new_one_once_the_old_one_stops() {
    let _servers = harness::shared();
    // The scheduled check (price_book_check_interval) comes only after 10 minutes.
    let p = Pipeline::new("rolling_book", 3_000, 10, "");
    // A pro customer without usage in every partition: whichever partitions a rater
    // holds, some customers of theirs have zero-usage lines only (the platform fee).
    let idle: std::collections::BTreeSet<String> = (0..harness::PARTITIONS as i32)
        .map(|partition| {
            (0..)
                .map(|i| format!("cust_idle_{i}"))
                .find(|c| harness::partition_of(c) == partition)
                .unwrap()
        })
        .collect();
    let mut book = std::fs::read_to_string(&p.config).unwrap();
    for customer in &idle {
        book.push_str(&format!(
            "\n[[customers]]\nid = \"{customer}\"\nplan = \"pro\"\n"
        ));
    }
    std::fs::write(&p.config, book).unwrap();
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-old");
    p.produce(&p.lines());
    let before = p.expected();
    p.wait_for(&before, Duration::from_secs(120));

    // A rolling restart: a rater with a new book (the starter resolution price and the
    // pro platform fee up) joins and takes some partitions; the old one holds the rest.
    raise_prices(&p);
    p.start("rater", "rater-new");
    harness::eventually(
        "the new rater checked the partitions it took",
        Duration::from_secs(120),
        || {
            p.log("rater-new")
                .contains("lines an earlier price book rated")
        },
    );
    let taken = rebuilt_partitions(&p, "rater-new");
    assert!(
        !taken.is_empty() && taken.len() < harness::PARTITIONS as usize,
        "{taken:?}"
    );
    // November opens in the old rater's partitions only: it writes every customer's
    // zero-usage lines of November with the old book, those of the new rater's
    // partitions' customers included.
    let november: Vec<Vec<u8>> = customers()
        .iter()
        .filter(|c| !taken.contains(&harness::partition_of(c)))
        .map(|c| resolution(&format!("nov-{c}"), c, "2026-11-02T00:00:00Z"))
        .collect();
    p.produce(&november);
    let idle_november_fees = format!(
        "SELECT customer, amount FROM {}.invoice_lines WHERE period_start = '2026-11-01 00:00:00' \
         AND customer LIKE 'cust_idle_%' AND price = 'resolutions' ORDER BY customer FORMAT TSV",
        p.database
    );
    let fees =
        |amount: &str| -> String { idle.iter().map(|c| format!("{c}\t{amount}\n")).collect() };
    let written = |amount: &str| p.query(&idle_november_fees).matches(amount).count();
    harness::eventually(
        "the old rater wrote November's platform fees",
        Duration::from_secs(60),
        || written("\t49.00") + written("\t59.00") == idle.len(),
    );

    // Once the old rater stops, every line is the new book's: October's, and the
    // November fees of customers whose partitions stayed with the new rater (not
    // assigned again, and not due for a scheduled check: re-rated by the check of the
    // partitions it takes over, whose answer names them).
    p.stop("rater-old");
    let after = p.expected();
    assert_ne!(before, after);
    p.wait_for(&after, Duration::from_secs(120));
    harness::eventually(
        "every November platform fee at the new price",
        Duration::from_secs(60),
        || p.query(&idle_november_fees) == fees("59.00"),
    );
}

/// An aggregator ran a book whose token meter names a mistyped event type: it counted
/// the month's token events as unmetered. With the book fixed, a replay of the events
/// topic bills them, and the events it did count stay counted once.
#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn events_read_while_their_meter_was_missing_are_billed_by_a_replay() {
    let _servers = harness::shared();
    let p = Pipeline::new("missing_meter", 3_000, 10, "");
    let book = std::fs::read_to_string(&p.config).unwrap();
    let typo = edited(
        &book,
        r#"event_type = "llm.tokens""#,
        r#"event_type = "llm.token""#,
    );
    std::fs::write(&p.config, typo).unwrap();
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    p.produce(&p.lines());
    p.wait_caught_up("aggregator", Duration::from_secs(120));
    let port = harness::metrics_port(&p.log("agg-a"), "aggregator metrics");
    let unmetered = "tally_aggregator_events_total{outcome=\"unmetered\"}";
    assert!(
        harness::metric(port, unmetered).is_some_and(|n| n > 1000.0),
        "the token events went unmetered"
    );
    p.assert_logged("agg-a", "no meter of this price book reads");

    // The README's way out: stop the pipeline, fix the book, start the raters, replay
    // the events topic into the aggregators.
    p.stop("agg-a");
    p.stop("rater-a");
    std::fs::write(&p.config, book).unwrap();
    p.reset_group_to_earliest("aggregator");
    p.start("rater", "rater-b");
    p.start("aggregator", "agg-b");
    p.wait_for(&p.expected(), Duration::from_secs(180));
}

/// A pipeline (5-day dedupe horizon) that billed October's generated month and then
/// read a resolution of November 7 in every partition, so October settled everywhere
/// and November is open; its rater caught up. Returns it and October's lines.
fn october_settled_everywhere(name: &str) -> (Pipeline, Vec<harness::Line>) {
    let p = Pipeline::new(
        name,
        3_000,
        10,
        "[aggregator]\nmetrics_listen = \"127.0.0.1:0\"\ncommit_interval = \"100ms\"\ndedupe_horizon = \"5d\"\n\
         [rater]\nmetrics_listen = \"127.0.0.1:0\"\nflush_interval = \"200ms\"\n",
    );
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    p.produce(&p.lines());
    let october = p.expected();
    p.wait_for(&october, Duration::from_secs(120));
    p.produce(&resolution_each("07", "2026-11-07T00:00:00Z"));
    harness::eventually(
        "October settled in every partition",
        Duration::from_secs(120),
        || partitions_settled(&p, "2026-10") == harness::PARTITIONS as usize,
    );
    p.wait_caught_up("rater", Duration::from_secs(60));
    (p, october)
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_replay_from_the_earliest_offset_after_a_price_change_leaves_settled_months_as_billed() {
    let _servers = harness::shared();
    let (p, october) = october_settled_everywhere("replay_settled");
    let fee = |p: &Pipeline| {
        let lines = p.invoice_lines_of("2026-11");
        line_for(&lines, "cust_00001", "resolutions").3.clone()
    };
    assert_eq!(fee(&p), "49.00");
    p.stop("rater-a");

    // New prices, and the rater's group replays the windows topic from its start (an
    // operator's reset, or offsets expired while no rater ran).
    raise_prices(&p);
    p.reset_group_to_earliest("rater");
    p.start("rater", "rater-b");
    // November is still open: re-rated at the new prices (a pro customer's platform
    // fee from 49.00 to 59.00).
    harness::eventually(
        "November re-rated at the new prices",
        Duration::from_secs(120),
        || fee(&p) == "59.00",
    );
    // Settled October stays as it was billed: the replay neither re-prices it nor
    // takes it back.
    assert_ne!(
        p.expected(),
        october,
        "the new book prices October differently"
    );
    assert_eq!(p.invoice_lines(), october);
    p.assert_logged("rater-b", "a replay; those months stay as billed");
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_replay_from_the_earliest_offset_stores_the_open_months_lost_lines_again() {
    let _servers = harness::shared();
    // November's usage comes before the records that settle October.
    let (p, october) = october_settled_everywhere("replay_lost_open");
    // What November billed before the loss: a resolution each (the harness's `tally
    // rate` runs at a clock before November 7).
    let expected_november = p.invoice_lines_of("2026-11");
    let resolutions = (expected_november.iter()).filter(|l| l.1 == "resolutions" && l.2 == "1");
    assert_eq!(
        resolutions.count(),
        customers().len(),
        "{expected_november:?}"
    );
    p.stop("rater-a");

    // November's rows are lost (its partition dropped, a backup restored), and the
    // operator replays the windows topic from its start, as the README says.
    p.query(&format!(
        "ALTER TABLE {}.rated_lines DROP PARTITION 202611",
        p.database
    ));
    assert_eq!(p.invoice_lines_of("2026-11"), []);
    p.reset_group_to_earliest("rater");
    p.start("rater", "rater-b");
    harness::eventually(
        "November's lines stored again",
        Duration::from_secs(120),
        || p.invoice_lines_of("2026-11") == expected_november,
    );
    // Settled October stays as billed.
    assert_eq!(p.invoice_lines(), october);
    p.assert_logged(
        "rater-b",
        "the lines of the partition's open months are stored again",
    );
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_customer_added_to_the_price_book_is_billed_its_usage_of_the_open_month() {
    let _servers = harness::shared();
    // A book of one customer: the other partitions hold no customer of it, so none of
    // their stored lines is stale once the book changes.
    let p = Pipeline::new("added_customer", 10, 1, "");
    let known = "cust_00000";
    let added = (0..)
        .map(|i| format!("cust_added_{i}"))
        .find(|c| harness::partition_of(c) != harness::partition_of(known))
        .unwrap();
    let events: Vec<Vec<u8>> = [known, added.as_str()]
        .iter()
        .flat_map(|c| {
            (0..3).map(move |i| resolution(&format!("{c}-{i}"), c, "2026-10-05T10:00:00Z"))
        })
        .collect();
    p.start("aggregator", "agg");
    p.start("rater", "rater-old");
    p.produce(&events);
    let before = p.expected_for(&events, p.period);
    assert!(before.iter().all(|line| line.0 == known), "{before:?}");
    p.wait_for(&before, Duration::from_secs(120));
    // Its usage read, left unbilled (a customer the book does not know), committed.
    p.wait_caught_up("rater", Duration::from_secs(60));
    p.stop("rater-old");

    // Finance adds the customer, whose October usage is in the pipeline already, and
    // one without usage whose partition has read nothing of October: its platform fee
    // is billed all the same.
    let quiet = (0..)
        .map(|i| format!("cust_quiet_{i}"))
        .find(|c| {
            ![harness::partition_of(known), harness::partition_of(&added)]
                .contains(&harness::partition_of(c))
        })
        .unwrap();
    let mut book = std::fs::read_to_string(&p.config).unwrap();
    for customer in [&added, &quiet] {
        book.push_str(&format!(
            "\n[[customers]]\nid = \"{customer}\"\nplan = \"pro\"\n"
        ));
    }
    std::fs::write(&p.config, book).unwrap();
    p.start("rater", "rater-new");
    let after = p.expected_for(&events, p.period);
    assert!(
        after
            .iter()
            .any(|line| line.0 == added && line.1 == "resolutions"),
        "{after:?}"
    );
    assert!(
        after.iter().any(|line| line.0 == quiet && line.3 != "0.00"),
        "{after:?}"
    );
    p.wait_for(&after, Duration::from_secs(120));
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_changed_book_rerates_a_row_stored_past_the_committed_offset() {
    let _servers = harness::shared();
    // No scheduled check within the test: only the check after assignment re-rates.
    let p = Pipeline::new(
        "rows_ahead",
        3_000,
        10,
        "[rater]\nmetrics_listen = \"127.0.0.1:0\"\nflush_interval = \"200ms\"\nprice_book_check_interval = \"1h\"\n",
    );
    p.start("aggregator", "agg");
    p.start("rater", "rater-old");
    let lines = p.lines();
    p.produce(&lines);
    let before = p.expected();
    p.wait_for(&before, Duration::from_secs(120));
    p.wait_caught_up("rater", Duration::from_secs(60));
    p.stop("rater-old");

    raise_prices(&p);
    // A line the new book changes, of a customer with a neighbour in its partition.
    let changed = p
        .expected()
        .into_iter()
        .filter(|line| !before.contains(line));
    let (line, neighbour) = changed
        .filter_map(|line| {
            let neighbour = (customers().into_iter()).find(|c| {
                *c != line.0 && harness::partition_of(c) == harness::partition_of(&line.0)
            })?;
            Some((line, neighbour))
        })
        .next()
        .expect("a changed line with a neighbour");
    // What a rater leaves that stored its batch and died before committing: a row
    // (here, the old book's row again) at a version past the committed offset.
    let partition = harness::partition_of(&line.0);
    let committed = p.committed("rater")[&partition];
    let columns = "id, version, config_hash, customer, plan, price, meter, period_start, \
                   period_end, quantity, subtotal, discount, amount, amount_minor, currency, \
                   tiers, adjusts_period, superseded";
    p.query(&format!(
        "INSERT INTO {db}.rated_lines ({columns}) SELECT {} FROM (SELECT * FROM \
         {db}.rated_lines FINAL WHERE customer = '{}' AND price = '{}' AND \
         period_start = toDateTime('2026-10-01 00:00:00', 'UTC')) WHERE superseded = 0",
        columns.replacen("version", &format!("toUInt64({})", committed + 1), 1),
        line.0,
        line.1,
        db = p.database,
    ));
    p.start("rater", "rater-new");
    harness::eventually(
        "the new rater checked its partitions",
        Duration::from_secs(60),
        || {
            let log = p.log("rater-new");
            log.contains("lines an earlier price book rated")
                || log.contains("stored lines newer than the partition's position")
        },
    );
    // The neighbour's usage moves the partition past that version.
    let event = resolution("neighbour-1", &neighbour, "2026-10-20T00:00:00Z");
    p.produce(std::slice::from_ref(&event));
    let mut all = lines;
    all.push(event);
    let after = p.expected_for(&all, p.period);
    assert!(after.contains(&line), "{line:?}");
    p.wait_for(&after, Duration::from_secs(90));
    assert!(p
        .log("rater-new")
        .contains("stored lines newer than the partition's position"));
}

/// A pipeline of 3,000 events whose aggregator `agg-a` counted the first half of its
/// month and was stopped (rater `rater-a` runs on); the rest of the events, still to
/// send.
fn half_of_the_month_counted_and_the_aggregator_stopped(name: &str) -> (Pipeline, Vec<Vec<u8>>) {
    let p = Pipeline::new(name, 3_000, 20, "");
    let mut first = p.lines();
    let rest = first.split_off(first.len() / 2);
    p.start("rater", "rater-a");
    p.start("aggregator", "agg-a");
    p.produce(&first);
    p.wait_caught_up("aggregator", Duration::from_secs(120));
    p.stop("agg-a");
    (p, rest)
}

/// `book` with its tokens meter reading `$.usage.tokens`, not `$.tokens`.
fn tokens_read_from_usage(book: &str) -> String {
    edited(
        book,
        r#"value_property = "$.tokens""#,
        r#"value_property = "$.usage.tokens""#,
    )
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn an_aggregator_restarted_with_a_meter_that_reads_otherwise_stops_and_the_book_before_goes_on() {
    let _servers = harness::shared();
    let (p, rest) = half_of_the_month_counted_and_the_aggregator_stopped("redefined");
    let definitions: Vec<String> = (p.read_topic("aggregator-changelog").into_iter())
        .filter_map(|(_, headers)| headers.get("tally.meters").cloned())
        .collect();
    assert!(
        definitions.iter().any(|d| d.contains(
            r#""tokens":{"event_type":"llm.tokens","aggregation":"sum","value_property":"$.tokens""#
        )),
        "{definitions:?}"
    );

    // The month's tokens so far were read from `$.tokens`: the rest would be read from
    // another field and added to them.
    let book = std::fs::read_to_string(&p.config).unwrap();
    let moved = tokens_read_from_usage(&book);
    std::fs::write(&p.config, moved).unwrap();
    p.start("aggregator", "agg-b");
    let (status, log) = p.wait_exit("agg-b", Duration::from_secs(120));
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("holds usage read with value_property = ")
            && log.contains("$.usage.tokens")
            && log.contains("new meter (another slug)"),
        "{log}"
    );

    std::fs::write(&p.config, book).unwrap();
    p.start("aggregator", "agg-c");
    p.produce(&rest);
    p.wait_for(&p.expected(), Duration::from_secs(180));
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_meter_listed_as_accepted_keeps_its_usage_as_counted_and_reads_events_the_new_way() {
    let _servers = harness::shared();
    let (p, rest) = half_of_the_month_counted_and_the_aggregator_stopped("redefined_accepted");

    // The senders move tokens into `usage`, and the book follows; the month's tokens
    // so far stay as they were read from `$.tokens`.
    // Each tokens event of the rest reads as many tokens from `$.usage.tokens` as the
    // book before read from `$.tokens`: the month bills what the whole file bills with
    // that book.
    let expected = p.expected();
    let book = std::fs::read_to_string(&p.config).unwrap();
    let moved = tokens_read_from_usage(&book);
    let accepting = edited(
        &moved,
        "[aggregator]\n",
        "[aggregator]\naccept_redefined_meters = [\"tokens\"]\n",
    );
    std::fs::write(&p.config, accepting).unwrap();
    p.start("aggregator", "agg-b");
    let rest: Vec<Vec<u8>> = rest
        .iter()
        .map(|line| tokens_moved_into_usage(line))
        .collect();
    p.produce(&rest);
    p.wait_for(&expected, Duration::from_secs(180));
    let log = p.log("agg-b");
    assert!(
        log.contains("kept as counted as [aggregator] accept_redefined_meters lists the meter"),
        "{log}"
    );
}

/// An event line with `data.tokens` moved to `data.usage.tokens`; other lines (and
/// lines that are not JSON) as they are.
fn tokens_moved_into_usage(line: &[u8]) -> Vec<u8> {
    let Ok(mut event) = serde_json::from_slice::<serde_json::Value>(line) else {
        return line.to_vec();
    };
    let Some(data) = event.get_mut("data").and_then(|d| d.as_object_mut()) else {
        return line.to_vec();
    };
    match data.remove("tokens") {
        Some(tokens) => {
            data.insert("usage".into(), serde_json::json!({ "tokens": tokens }));
            serde_json::to_vec(&event).unwrap()
        }
        None => line.to_vec(),
    }
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn an_aggregator_joining_with_a_meter_defined_otherwise_stops_though_its_partitions_hold_none_of_it(
) {
    let _servers = harness::shared();
    let p = Pipeline::new("redefined_elsewhere", 1_000, 10, "");
    // Tokens in one partition only: a member on another book given only the others
    // would restore nothing of that meter's usage.
    let home = harness::partition_of("cust_00000");
    let mut events = resolution_each("r", "2026-10-10T10:00:00Z");
    events.extend(
        (customers().iter())
            .filter(|c| harness::partition_of(c) == home)
            .map(|c| tokens_event(&format!("t-{c}"), c, "gpt-x", 1000, "2026-10-10T11:00:00Z")),
    );
    p.start("rater", "rater-a");
    p.start("aggregator", "agg-a");
    p.produce(&events);
    p.wait_caught_up("aggregator", Duration::from_secs(120));

    // A rolling restart's first new instance, on a book that reads tokens otherwise.
    let book = std::fs::read_to_string(&p.config).unwrap();
    let moved = tokens_read_from_usage(&book);
    std::fs::write(&p.config, moved).unwrap();
    p.start("aggregator", "agg-b");
    let (status, log) = p.wait_exit("agg-b", Duration::from_secs(120));
    assert!(!status.success(), "{log}");
    // Refused by the group's check, or by its own restore where the rebalance gave
    // it the partition holding the tokens (the assignor's choice).
    assert!(
        log.contains("meter \\\"tokens\\\"")
            && (log.contains("counted under a definition this price book does not have")
                || log.contains("holds usage read with value_property = ")),
        "{log}"
    );

    // The first goes on with every partition, as the book it read them with bills them.
    std::fs::write(&p.config, book).unwrap();
    let more = resolution_each("r2", "2026-10-11T10:00:00Z");
    p.produce(&more);
    events.extend(more);
    p.wait_for(
        &p.expected_for(&events, "2026-10"),
        Duration::from_secs(180),
    );
}
