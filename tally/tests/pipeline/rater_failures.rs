//! The rater through ClickHouse outages, lost or stale databases, a column dropped by
//! hand, a rated topic refusing lines, lines too large to rate and a group moved by
//! Kafka's own tool: what is stored stays exact, and nothing passes what is stored.

use std::time::Duration;

use crate::harness::{self, Pipeline};
use crate::{assert_windows_add_up_to_lines, common, half_of_the_month_stored, Restart};

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn clickhouse_down_for_30_seconds_delays_but_does_not_change_totals() {
    let _servers = harness::alone();
    let p = Pipeline::new("clickhouse_down", 50_000, 60, "");
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let lines = p.lines();
    let (first, rest) = lines.split_at(lines.len() / 3);
    p.produce(first);
    std::thread::sleep(Duration::from_secs(2));
    let _clickhouse_back = Restart("clickhouse");
    harness::service("clickhouse", "stop");
    let stopped = std::time::Instant::now();
    p.produce(rest);
    std::thread::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed()));
    p.assert_running();
    harness::service("clickhouse", "start");
    let expected = p.expected();
    p.wait_for(&expected, Duration::from_secs(180));
    // The rater saw the outage.
    p.assert_logged("rater-a", "cannot store the lines in ClickHouse");
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_column_dropped_by_hand_holds_the_rater_with_an_error_until_it_is_back() {
    let _servers = harness::shared();
    let (p, rest) = half_of_the_month_stored("column_dropped");

    let table = format!("{}.rated_lines", p.database);
    p.query(&format!("ALTER TABLE {table} DROP COLUMN tiers"));
    p.produce(&rest);
    harness::eventually(
        "the rater to say no retry stores its rows",
        Duration::from_secs(60),
        || {
            p.log("rater-a")
                .contains("will refuse it again however often it is retried")
        },
    );
    p.assert_running();
    p.query(&format!("ALTER TABLE {table} ADD COLUMN tiers String"));
    p.wait_for(&p.expected(), Duration::from_secs(120));
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_rater_stopped_while_clickhouse_is_down_stops_cleanly_and_its_successor_stores_all() {
    let _servers = harness::alone();
    let (p, rest) = half_of_the_month_stored("stop_during_outage");
    let _clickhouse_back = Restart("clickhouse");
    harness::service("clickhouse", "stop");
    p.produce(&rest);
    harness::eventually(
        "the rater to hold lines ClickHouse does not take",
        Duration::from_secs(60),
        || {
            p.log("rater-a")
                .contains("cannot store the lines in ClickHouse; pausing and retrying")
        },
    );
    // A stop asked for ends with exit code 0, without trying again what is failing.
    p.stop("rater-a");
    p.assert_logged("rater-a", "rater stopping without storing what was read");
    harness::service("clickhouse", "start");
    p.start("rater", "rater-b");
    p.wait_for(&p.expected(), Duration::from_secs(180));
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn raters_killed_and_rebalanced_during_a_clickhouse_outage_lose_nothing() {
    let _servers = harness::alone();
    // With windows stored: they are written, like the lines, by whichever rater holds
    // the partition, after a rebuild, and again after a failed insert.
    let p = Pipeline::new(
        "rater_faults",
        60_000,
        80,
        "[rater]\nmetrics_listen = \"127.0.0.1:0\"\nstore_windows = true",
    );
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let lines = p.lines();
    let (first, rest) = lines.split_at(lines.len() / 2);
    p.produce(first);
    // Killed once it has stored and committed some of it.
    harness::eventually("rater-a commits", Duration::from_secs(60), || {
        !p.committed("rater").is_empty()
    });
    let rebuilds = |name: &str| {
        (p.log(name))
            .matches("ledger rebuilt from the windows topic")
            .count()
    };
    // rater-a killed, restarted; rater-b joins; both rebuild what they hold.
    let rebuilt_before = rebuilds("rater-a");
    let listening = |log: &str| log.matches("what=\"rater metrics\"").count();
    let started_before = listening(&p.log("rater-a"));
    p.kill("rater-a");
    p.start("rater", "rater-a");
    // Not ready until the group has assigned it its partitions, which waits out the
    // killed member's session: a rolling restart waiting for /readyz waits for that.
    harness::eventually(
        "the restarted rater-a says it is joining its group",
        Duration::from_secs(30),
        || {
            let log = p.log("rater-a");
            listening(&log) > started_before
                && common::get(harness::metrics_port(&log, "rater metrics"), "/readyz").is_some_and(
                    |(status, body)| status == 503 && body.contains("joining consumer group"),
                )
        },
    );
    p.start("rater", "rater-b");
    harness::eventually(
        "both raters hold partitions",
        Duration::from_secs(60),
        || rebuilds("rater-a") > rebuilt_before && rebuilds("rater-b") > 0,
    );
    // ClickHouse goes down while both hold lines they cannot store.
    let _clickhouse_back = Restart("clickhouse");
    harness::service("clickhouse", "stop");
    p.produce(rest);
    let refused = "cannot store the lines in ClickHouse; pausing and retrying";
    harness::eventually(
        "both raters hold lines ClickHouse refused",
        Duration::from_secs(60),
        || p.log("rater-a").contains(refused) && p.log("rater-b").contains(refused),
    );
    // rater-a dies with unwritten lines: rater-b takes its partitions during the
    // outage, rebuilds them from the windows topic, and waits paused as well.
    let rebuilt_before = rebuilds("rater-b");
    p.kill("rater-a");
    harness::eventually(
        "rater-b takes rater-a's partitions",
        Duration::from_secs(60),
        || rebuilds("rater-b") > rebuilt_before,
    );
    harness::service("clickhouse", "start");
    p.wait_caught_up("aggregator", Duration::from_secs(300));
    let expected = p.expected();
    p.wait_for(&expected, Duration::from_secs(240));
    p.wait_for_rated(&expected, Duration::from_secs(60));
    assert_windows_add_up_to_lines(&p, &expected);
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_rated_topic_refusing_lines_stops_the_rater_until_a_restart_delivers_them() {
    let _servers = harness::shared();
    let p = Pipeline::new("rated_refused", 5_000, 20, "");
    // Every rated line is larger than this: Kafka refuses them for good.
    p.set_topic_config("rated", "max.message.bytes", "200");
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    p.produce(&p.lines());
    let (status, log) = p.wait_exit("rater-a", Duration::from_secs(120));
    assert!(!status.success(), "the rater stopped with an error");
    let topic = p.topic("rated");
    assert!(
        log.contains(&format!("Kafka refused a rated line for {topic}")),
        "the rater says why it stopped:\n{log}"
    );
    assert!(
        p.committed("rater").is_empty(),
        "no offset was committed past the refused lines"
    );
    p.set_topic_config("rated", "max.message.bytes", "1048588");
    p.start("rater", "rater-a");
    p.wait_caught_up("aggregator", Duration::from_secs(120));
    let expected = p.expected();
    p.wait_for(&expected, Duration::from_secs(120));
    p.wait_for_rated(&expected, Duration::from_secs(60));
}

/// ClickHouse's database is lost while the group's offsets stay (dropped by mistake,
/// restored from an older backup): the rater stops at its next write, and started
/// again rates every partition whose stored lines are missing, so `invoice_lines`
/// holds every line again, not only those of customers with later usage.
#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_rater_restarted_after_its_database_was_lost_stores_every_line_again() {
    let _servers = harness::shared();
    let p = Pipeline::new(
        "lostdb",
        10_000,
        20,
        "[rater]\nflush_interval = \"200ms\"\n",
    );
    let mut lines = p.lines();
    p.produce(&lines);
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    p.wait_for(&p.expected(), Duration::from_secs(180));

    p.query(&format!("DROP DATABASE {}", p.database));
    // Later usage of a few customers: the rater's next write finds no table.
    let later: Vec<Vec<u8>> = (lines.iter().take(5))
        .map(|line| {
            let text = String::from_utf8(line.clone()).unwrap();
            text.replacen("\"id\":\"", "\"id\":\"later-", 1)
                .into_bytes()
        })
        .collect();
    p.produce(&later);
    let (status, log) = p.wait_exit("rater-a", Duration::from_secs(120));
    assert!(!status.success(), "{log}");
    assert!(log.contains("ClickHouse's tables are gone"), "{log}");

    p.start("rater", "rater-b");
    lines.extend(later);
    p.wait_for(&p.expected_for(&lines, p.period), Duration::from_secs(180));
    p.assert_logged("rater-b", "rating the partition again from its beginning");
    // October ended before the loss and was billed then: rated again, it is no month
    // that usage opened late, of which finance must hear.
    let port = harness::metrics_port(&p.log("rater-b"), "rater metrics");
    assert_eq!(
        harness::metric(port, "tally_rater_ended_month_lines_opened_total"),
        Some(0.0),
        "{}",
        p.log("rater-b")
    );
}

/// A rater takes partitions while ClickHouse does not answer, so it cannot look their
/// stored lines up, which are lost (a restore from an empty backup, say): it looks them
/// up again before it stores anything, and finding them lost stops; restarted, it rates
/// the partitions again from the beginning.
#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn lines_lost_while_clickhouse_did_not_answer_are_found_before_anything_is_stored() {
    let _servers = harness::alone();
    let p = Pipeline::new("lookup_later", 3_000, 10, "");
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    p.start("rater", "rater-b");
    p.produce(&p.lines());
    let expected = p.expected();
    p.wait_for(&expected, Duration::from_secs(120));
    let rebuilds = |name: &str| (p.log(name)).matches("ledger rebuilt from").count();
    harness::eventually(
        "both raters hold partitions",
        Duration::from_secs(60),
        || rebuilds("rater-a") > 0 && rebuilds("rater-b") > 0,
    );
    p.query(&format!("TRUNCATE TABLE {}.rated_lines", p.database));
    let _clickhouse_back = Restart("clickhouse");
    harness::service("clickhouse", "stop");
    // rater-b takes rater-a's partitions while ClickHouse is away.
    p.kill("rater-a");
    harness::eventually(
        "rater-b could not look the stored lines up",
        Duration::from_secs(60),
        || {
            p.log("rater-b")
                .contains("cannot look the partition's stored lines up in ClickHouse")
        },
    );
    harness::service("clickhouse", "start");
    let (status, log) = p.wait_exit("rater-b", Duration::from_secs(120));
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("none of the stored lines of partition"),
        "{log}"
    );
    p.start("rater", "rater-c");
    p.wait_for(&expected, Duration::from_secs(180));
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_rater_group_moved_by_kafkas_own_tool_re_rates_without_reporting_repricings() {
    let _servers = harness::shared();
    let p = Pipeline::new("moved_rater_group", 2_000, 20, "");
    p.produce(&p.lines());
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let billed = p.expected();
    p.wait_for(&billed, Duration::from_secs(120));
    p.stop("rater-a");

    // Kafka's kafka-consumer-groups.sh commits offsets without the metadata that names
    // the book the lines were rated with: the rater re-rates the open month, stores its
    // lines again, and finds them what they were. October has ended, so a line taken
    // for one the book added would be reported to finance as a re-priced ended month.
    p.reset_group_to_latest("rater");
    p.start("rater", "rater-b");
    harness::eventually("rater-b serving metrics", Duration::from_secs(30), || {
        p.log("rater-b").contains("what=\"rater metrics\"")
    });
    let port = harness::metrics_port(&p.log("rater-b"), "rater metrics");
    harness::eventually("the lines stored again", Duration::from_secs(60), || {
        harness::metric(port, "tally_clickhouse_inserted_rows_total")
            .is_some_and(|rows| rows >= billed.len() as f64)
    });
    assert_eq!(p.invoice_lines(), billed);
    assert_eq!(
        harness::metric(port, "tally_rater_ended_month_lines_repriced_total"),
        Some(0.0),
        "{}",
        p.log("rater-b")
    );
}

/// A price whose every line with usage is past what a line stores (1e19 yen a
/// resolution): added to the generated book's last plan, enterprise-jp's.
const UNRATEABLE_PRICE: &str = r#"
[[plans.prices]]
id = "unrateable"
meter = "resolutions"
billing_scheme = "per_unit"
unit_amount = "10000000000000000000"
"#;

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_line_too_large_to_rate_stays_in_the_unrated_gauge_while_the_others_are_billed() {
    let _servers = harness::shared();
    let p = Pipeline::new("unrateable", 2_000, 4, UNRATEABLE_PRICE);
    // Every other line as tally rate prices it without that price, and that price's
    // opening line (cust_00003 is enterprise-jp's), which ClickHouse holds meanwhile.
    let book = std::fs::read_to_string(&p.config).unwrap();
    let without = p.dir.path().join("without-unrateable.toml");
    std::fs::write(&without, book.replace(UNRATEABLE_PRICE, "")).unwrap();
    let expected = |lines: &[Vec<u8>]| {
        let mut expected = p.expected_with(&without, lines);
        let opening = ("cust_00003", "unrateable", "0", "0", "jpy");
        let (customer, price, quantity, amount, currency) = opening;
        expected.push((
            customer.into(),
            price.into(),
            quantity.into(),
            amount.into(),
            currency.into(),
        ));
        expected.sort();
        expected
    };
    let mut lines = p.lines();
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    p.produce(&lines);
    p.wait_for(&expected(&lines), Duration::from_secs(120));
    let port = harness::metrics_port(&p.log("rater-a"), "rater metrics");
    harness::eventually(
        "the line held in tally_rater_unrated_lines",
        Duration::from_secs(30),
        || harness::metric(port, "tally_rater_unrated_lines") == Some(1.0),
    );
    // Held while the line is, through the partition's later batches: an alert on the
    // failures counter alone would clear while the line shows 0.
    let more = br#"{"specversion":"1.0","id":"more-1","source":"test","type":"llm.tokens","subject":"cust_00003","time":"2026-10-30T10:00:00Z","data":{"model":"gpt-x","tokens":1000}}"#.to_vec();
    lines.push(more.clone());
    p.produce(&[more]);
    p.wait_for(&expected(&lines), Duration::from_secs(60));
    assert_eq!(
        harness::metric(port, "tally_rater_unrated_lines"),
        Some(1.0)
    );
    assert!(harness::metric(port, "tally_rater_rating_failures_total").is_some_and(|n| n >= 2.0));
    p.assert_logged("rater-a", "a line cannot be rated");
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_rater_back_on_its_database_after_writing_to_another_stores_the_stale_lines_again() {
    let _servers = harness::shared();
    let (p, rest) = half_of_the_month_stored("database_typo");
    // A rater started with a mistyped database stores the rest of the month there,
    // and commits the offsets.
    p.stop("rater-a");
    let typo = format!("{}_typo", p.database);
    p.start_with("rater", "rater-b", &[("TALLY_CLICKHOUSE_DATABASE", &typo)]);
    p.produce(&rest);
    // Every usage record written first, so none is left for the next rater to
    // correct the lines by.
    p.wait_caught_up("aggregator", Duration::from_secs(120));
    p.wait_caught_up("rater", Duration::from_secs(120));
    p.stop("rater-b");
    // Back on the right one, whose lines are half a month old.
    p.start("rater", "rater-c");
    p.wait_for(&p.expected(), Duration::from_secs(120));
    let port = harness::metrics_port(&p.log("rater-c"), "rater metrics");
    let restated = harness::metric(port, "tally_rater_stale_partitions_restated_total");
    assert!(restated.is_some_and(|n| n >= 1.0), "{restated:?}");
    p.assert_logged("rater-c", "ClickHouse holds older versions of lines than the partition's committed offset accounts for");
    // An ordinary handover finds the database current: nothing is stored again.
    p.stop("rater-c");
    p.start("rater", "rater-d");
    harness::eventually(
        "rater-d to take every partition",
        Duration::from_secs(60),
        || {
            p.log("rater-d")
                .matches("ledger rebuilt from the windows topic")
                .count()
                == harness::PARTITIONS as usize
        },
    );
    let port = harness::metrics_port(&p.log("rater-d"), "rater metrics");
    assert_eq!(
        harness::metric(port, "tally_rater_stale_partitions_restated_total"),
        Some(0.0)
    );
    p.wait_for(&p.expected(), Duration::from_secs(30));
    p.query(&format!("DROP DATABASE IF EXISTS {typo}"));
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_rater_clickhouse_refuses_at_start_counts_each_try_and_says_which_setting_to_fix() {
    let _servers = harness::shared();
    let p = Pipeline::new("wrong_login", 200, 2, "");
    p.start_with("rater", "rater-a", &[("TALLY_CLICKHOUSE_USER", "nobody")]);
    harness::eventually(
        "the rater to serve its metrics",
        Duration::from_secs(30),
        || p.log("rater-a").contains("what=\"rater metrics\""),
    );
    let port = harness::metrics_port(&p.log("rater-a"), "rater metrics");
    // A dashboard's failure panels and the ClickHouse alert see the refusals from the
    // first try, though no insert was attempted.
    harness::eventually(
        "the refused tries counted as failed queries",
        Duration::from_secs(30),
        || harness::metric(port, "tally_clickhouse_query_failures_total").is_some_and(|n| n >= 2.0),
    );
    let ready = common::get(port, "/readyz");
    assert!(
        ready
            .as_ref()
            .is_some_and(|(status, body)| *status == 503 && body.contains("[clickhouse] user")),
        "{ready:?}"
    );
}
