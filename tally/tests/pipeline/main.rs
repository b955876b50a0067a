//! The streaming pipeline end to end: `tally serve aggregator` and `tally serve rater`
//! as real processes on the real Kafka and ClickHouse that `scripts/services/up.sh`
//! starts, checked against `tally rate` on the same events, to the minor unit.
//! Each test has its own topics, groups and database, so two run side by side; one
//! that stops a shared server runs alone ([`harness::shared`], [`harness::alone`]).

#![allow(clippy::unwrap_used)] // a test: a failed call should fail it

#[path = "../common/mod.rs"]
mod common;
mod harness;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use harness::Pipeline;
use rust_decimal::Decimal;
use tally_runtime::kafka::partition_for_key;

const NEEDS: &str = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse";

/// Messages no producer should send, each refused for its own reason.
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

/// A plan of a flat fee alone, and a customer on it with an amount off it.
const FLAT_FEE_PLAN: &str = r#"
[[plans]]
id = "platform_only"
currency = "eur"

[[plans.prices]]
id = "platform"
billing_scheme = "flat"
unit_amount = "250"

[[customers]]
id = "cust_platform"
plan = "platform_only"
discounts = [{ price = "platform", amount_off = "20" }]
"#;

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn streamed_lines_equal_tally_rate_and_survive_poison_and_replay() {
    let _servers = harness::shared();
    let _ = NEEDS;
    let aggregator_port = common::free_port();
    let rater_port = common::free_port();
    let p = Pipeline::new(
        "equivalence",
        20_000,
        40,
        &format!(
            "[aggregator]\nmetrics_listen = \"127.0.0.1:{aggregator_port}\"\ncommit_interval = \"100ms\"\n\
             [rater]\nmetrics_listen = \"127.0.0.1:{rater_port}\"\nflush_interval = \"200ms\"\nstore_windows = true\n\
             {FLAT_FEE_PLAN}"
        ),
    );
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let mut lines = p.lines();
    let poison = poison();
    for (i, (bad, ..)) in poison.iter().enumerate() {
        lines.insert(i * 3000 + 17, bad.clone());
    }
    p.produce(&lines);
    let expected = p.expected();
    assert!(expected.len() > 40, "a real month has many lines");
    // The flat fee, less its coupon, at quantity 1 without any usage.
    let fee = line_for(&expected, "cust_platform", "platform");
    assert_eq!((&fee.2[..], &fee.3[..], &fee.4[..]), ("1", "230.00", "eur"));
    p.wait_for(&expected, Duration::from_secs(180));
    p.wait_for_rated(&expected, Duration::from_secs(60));
    assert_windows_add_up_to_lines(&p, &expected);
    // Finance's own check says the same.
    let (code, report) = p.reconcile_with_expected();
    assert_eq!(code, Some(0), "{report}");
    let agree = format!("Agree: {} lines. Differ: 0 lines.", expected.len());
    assert!(report.contains(&agree), "{report}");

    // An event a CloudEvents SDK wrote in Kafka binary mode (attributes in headers) is
    // rejected, saying why.
    let binary = br#"{"model":"gpt-x","tokens":5}"#;
    p.produce_with_headers(
        "cust_00001",
        binary,
        &[
            ("ce_specversion", "1.0"),
            ("ce_id", "b-1"),
            ("ce_type", "llm.tokens"),
        ],
    );
    // A forged forwarding timestamp does not move the clock on: an event of 2030 is
    // still ahead of it.
    let forged = resolution("forged-1", "cust_00001", "2030-01-01T00:00:00Z");
    let year_2030_ms = "1893456000000";
    p.produce_with_headers(
        "cust_00001",
        &forged,
        &[(
            tally_schemas::records::FORWARDED_TIMESTAMP_HEADER,
            year_2030_ms,
        )],
    );
    harness::eventually(
        "the binary-mode and forged events are rejected",
        Duration::from_secs(30),
        || {
            let rejected = p.read_topic("rejected");
            [&binary[..], &forged[..]]
                .iter()
                .all(|bad| rejected.iter().any(|(payload, _)| payload == bad))
        },
    );
    assert_eq!(rejection_code(&p, &forged), "time_in_future");

    // Every poison message is in the rejected topic, bytes intact, with its reason.
    let rejected = p.read_topic("rejected");
    let headers_of = |bad: &[u8]| {
        let (_, headers) = (rejected.iter())
            .find(|(payload, _)| payload == bad)
            .unwrap_or_else(|| {
                let bad = String::from_utf8_lossy(bad);
                panic!("{bad:?} not in the rejected topic")
            });
        headers
    };
    for (bad, code, field) in &poison {
        let headers = headers_of(bad);
        assert_eq!(
            (
                &*headers["tally.error.code"],
                &*headers["tally.error.field"]
            ),
            (*code, *field),
            "{headers:?}"
        );
        assert!(!headers["tally.error.reason"].is_empty(), "{headers:?}");
        assert_eq!(headers["tally.source.topic"], p.topic("events"));
    }
    let headers = headers_of(binary);
    assert_eq!(headers["tally.error.code"], "missing_field");
    let reason = &headers["tally.error.reason"];
    assert!(reason.contains("the record has ce_ headers"), "{reason}");
    // Its attributes, in headers, come along: the copy can be replayed as it was.
    assert_eq!(
        headers.get("ce_id").map(String::as_str),
        Some("b-1"),
        "{headers:?}"
    );
    // The log says so too, once per code: two invalid_json messages, one line.
    let log = p.log("agg-a");
    let refused = |code: &str| {
        (log.lines())
            .filter(|line| line.contains("event refused") && line.contains(code))
            .count()
    };
    assert_eq!(
        ["invalid_json", "invalid_utf8", "not_a_number"].map(refused),
        [1, 1, 1],
        "{log}"
    );

    // An event a producer put on another partition than Kafka's Java partitioner
    // would is forwarded to that one, and billed there with the customer's others.
    let forwarded = r#"tally_aggregator_events_total{outcome="forwarded"}"#;
    let partitions = std::num::NonZeroUsize::new(harness::PARTITIONS as usize).unwrap();
    let customer = "cust_00001";
    let home = partition_for_key(customer.as_bytes(), partitions);
    let elsewhere = (home + 1) % harness::PARTITIONS as i32;
    let misplaced = resolution("misplaced-1", customer, "2026-10-20T10:00:00Z");
    p.produce_to(elsewhere, customer, &misplaced);
    // Keyed by something else than the subject: billed all the same, where it was
    // read when that is the subject's partition, else forwarded there too.
    let keyed_otherwise = [
        (
            home,
            resolution("keyed-1", customer, "2026-10-20T10:00:00Z"),
        ),
        (
            elsewhere,
            resolution("keyed-2", customer, "2026-10-20T10:00:00Z"),
        ),
    ];
    for (partition, event) in &keyed_otherwise {
        p.produce_to(*partition, &format!("tenant-a:{customer}"), event);
    }
    // Dedupe is per partition, so two customers may use one (source, id): a misplaced
    // event is forwarded even where the other customer's was counted.
    let neighbour = (customers().into_iter())
        .find(|c| partition_for_key(c.as_bytes(), partitions) == elsewhere)
        .expect("a customer of the other partition");
    let theirs = resolution("shared-1", &neighbour, "2026-10-20T10:00:00Z");
    p.produce_to(elsewhere, &neighbour, &theirs);
    let ours = resolution("shared-1", customer, "2026-10-20T10:00:00Z");
    p.produce_to(elsewhere, customer, &ours);
    let mut with_misplaced = p.lines();
    with_misplaced.push(misplaced.clone());
    with_misplaced.extend(keyed_otherwise.iter().map(|(_, event)| event.clone()));
    // `tally rate`, one dedupe over the file, would call ours a conflict of theirs:
    // the pipeline bills what it bills for ours under an id of its own.
    let ours_apart = resolution("shared-1-apart", customer, "2026-10-20T10:00:00Z");
    with_misplaced.extend([theirs, ours_apart]);
    let expected = p.expected_for(&with_misplaced, p.period);
    p.wait_for(&expected, Duration::from_secs(30));
    assert_eq!(harness::metric(aggregator_port, forwarded), Some(3.0));
    let log = p.log("agg-a");
    let forwards_logged = (log.lines())
        .filter(|line| line.contains("is forwarded there"))
        .count();
    assert_eq!(forwards_logged, 1, "once a minute at most:\n{log}");
    let copies: Vec<BTreeMap<String, String>> = (p.read_records("events").into_iter())
        .filter(|(_, payload, _)| *payload == misplaced)
        .map(|(_, _, headers)| headers)
        .collect();
    assert_eq!(
        copies.len(),
        2,
        "the event and its forwarded copy: {copies:?}"
    );
    let headers = (copies.iter())
        .find(|headers| headers.contains_key(tally_schemas::records::FORWARDED_FROM_HEADER))
        .expect("a forwarded copy");
    let from = &headers[tally_schemas::records::FORWARDED_FROM_HEADER];
    assert!(from.starts_with(&format!("{elsewhere}@")), "{headers:?}");

    // Replaying the whole topic from the beginning changes nothing.
    p.stop("agg-a");
    p.reset_group_to_earliest("aggregator");
    p.start("aggregator", "agg-a");
    // The replay forwards the event again; once that copy is in the topic and read,
    // its partition has taken it for a retry, and the lines are as they were.
    let copies = || {
        (p.read_topic("events").iter())
            .filter(|(payload, _)| *payload == misplaced)
            .count()
    };
    harness::eventually(
        "the replay's forwarded copy",
        Duration::from_secs(180),
        || copies() == 3,
    );
    p.wait_caught_up("aggregator", Duration::from_secs(180));
    p.wait_caught_up("rater", Duration::from_secs(60));
    p.wait_for(&expected, Duration::from_secs(60));
    assert_eq!(harness::metric(aggregator_port, forwarded), Some(3.0));
    assert_windows_add_up_to_lines(&p, &expected);

    // So does the rater's: it reads every usage update again and writes the same rows.
    p.stop("rater-a");
    p.reset_group_to_earliest("rater");
    p.start("rater", "rater-a");
    p.wait_caught_up("rater", Duration::from_secs(180));
    p.wait_for(&expected, Duration::from_secs(60));
    let updates = (p.read_records("windows").iter())
        .filter(|(_, payload, headers)| {
            !payload.is_empty() && !headers.contains_key(tally_schemas::records::SETTLED_HEADER)
        })
        .count();
    assert_eq!(
        harness::metric(rater_port, "tally_rater_usage_updates_total"),
        Some(updates as f64),
        "the restarted rater read every usage update again"
    );
    assert_windows_add_up_to_lines(&p, &expected);
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

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn killing_the_aggregator_repeatedly_loses_and_doubles_nothing() {
    let _servers = harness::alone();
    // Small snapshots: restores go through snapshot parts, tombstones, deltas and
    // dedupe keys both in per-transaction records and gathered into key sets. Commits
    // a second apart: a kill mostly finds a transaction open, and always events unread.
    let p = Pipeline::new(
        "kill9",
        200_000,
        200,
        "[aggregator]\nmetrics_listen = \"127.0.0.1:0\"\ncommit_interval = \"1s\"\nchangelog_snapshot_bytes = 200000",
    );
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let mut lines = with_duplicates(p.lines());
    assert!(lines.len() >= 220_000);
    // A message no event can be read from in every 500: refused as it is read, so the
    // rejected topic is written to inside every transaction, and a kill that finds one
    // open leaves aborted records there.
    let poison: Vec<Vec<u8>> = (0..lines.len() / 500)
        .map(|i| format!("poison {i}").into_bytes())
        .collect();
    for (i, bad) in poison.iter().enumerate() {
        lines.insert(i * 501 + 250, bad.clone());
    }
    let committed = || p.committed_total("aggregator");
    let kills_done = AtomicBool::new(false);
    let (chunk, chunks_sent) = (500, AtomicUsize::new(0));
    std::thread::scope(|scope| {
        // A steady stream through every kill and restart (some 3,000 events a second
        // would last a minute), then the rest at once.
        scope.spawn(|| {
            p.produce_paced(&lines, chunk, || {
                chunks_sent.fetch_add(1, Ordering::SeqCst);
                (!kills_done.load(Ordering::SeqCst)).then_some(Duration::from_millis(150))
            })
        });
        let restores = || p.log("agg-a").matches("partition state restored").count();
        // The restores logged by earlier runs of agg-a.
        let mut restores_before = 0;
        for kill in 1..=3 {
            // Each run has restored its partitions and committed since, by itself.
            harness::eventually("agg-a restores", Duration::from_secs(120), || {
                restores() > restores_before
            });
            let before = committed();
            harness::eventually(
                "agg-a commits after restoring",
                Duration::from_secs(120),
                || committed() > before,
            );
            // Into the next second-long transaction, so the kill mostly finds one open
            // (not a race the test waits out: either way events are still in flight).
            std::thread::sleep(Duration::from_millis(700));
            assert!(
                chunks_sent.load(Ordering::SeqCst) < lines.len().div_ceil(chunk),
                "kill {kill} came after the last event: nothing was in flight"
            );
            restores_before = restores();
            p.kill("agg-a");
            p.start("aggregator", "agg-a");
        }
        kills_done.store(true, Ordering::SeqCst);
    });
    let expected = p.expected();
    p.wait_for(&expected, Duration::from_secs(300));
    assert!(
        harness::restored_some_state(&p.log("agg-a")),
        "the restarts restored state from the changelog"
    );
    // Kills found transactions open (their records are in the log, aborted), and each
    // refusal was committed once all the same.
    let refused = |isolation: &str| {
        let records = p.read_records_in("rejected", isolation);
        let count = |bad: &Vec<u8>| {
            records
                .iter()
                .filter(|(_, payload, _)| payload == bad)
                .count()
        };
        poison.iter().map(count).collect::<Vec<usize>>()
    };
    assert_eq!(refused("read_committed"), vec![1; poison.len()]);
    let written: usize = refused("read_uncommitted").iter().sum();
    assert!(
        written > poison.len(),
        "no kill found a transaction with records written: {written} refusals written for {} refused",
        poison.len()
    );
    let changelog = p.read_records("aggregator-changelog");
    for kind in ["snapshot/", "delta/", "keys/", "keyset/"] {
        assert!(
            changelog
                .iter()
                .any(|(key, ..)| key.starts_with(kind.as_bytes())),
            "the changelog has {kind} records"
        );
    }
}

/// A price book of one unique-count meter: active users a month, 2.50 each.
const ACTIVE_USERS_BOOK: &str = r#"
[[meters]]
slug = "active_users"
event_type = "app.active"
aggregation = "unique_count"
value_property = "$.user"

[[plans]]
id = "per_user"
currency = "usd"

[[plans.prices]]
id = "active-users"
meter = "active_users"
billing_scheme = "per_unit"
unit_amount = "2.5"
"#;

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

/// `user` of `customer` active on October `day` (at an hour of the user's).
fn active(id: &str, customer: &str, user: u32, day: u32) -> Vec<u8> {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"app","type":"app.active","subject":"{customer}","time":"2026-10-{day:02}T{:02}:00:00Z","data":{{"user":"user-{user}"}}}}"#,
        user % 24
    )
    .into_bytes()
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn unique_counts_restored_from_the_changelog_count_each_user_once() {
    let _servers = harness::shared();
    // Small snapshots: the big customer's set (60,000 users) is snapshotted in parts.
    let p = Pipeline::new(
        "unique",
        10,
        1,
        "[aggregator]\nmetrics_listen = \"127.0.0.1:0\"\ncommit_interval = \"100ms\"\nchangelog_snapshot_bytes = 300000",
    );
    let generated = std::fs::read_to_string(&p.config).unwrap();
    let services = &generated[generated.find("[kafka]").unwrap()..];
    let customers = [("cust_big", 60_000), ("cust_a", 500), ("cust_b", 500)];
    let book: String = customers
        .iter()
        .map(|(c, _)| format!("\n[[customers]]\nid = \"{c}\"\nplan = \"per_user\"\n"))
        .collect();
    std::fs::write(&p.config, format!("{ACTIVE_USERS_BOOK}{book}\n{services}")).unwrap();

    // October 5: each customer's users, every one active twice.
    let mut month: Vec<Vec<u8>> = Vec::new();
    for (customer, users) in customers {
        for round in 0..2 {
            month.extend(
                (0..users).map(|u| active(&format!("{customer}-{round}-{u}"), customer, u, 5)),
            );
        }
    }
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    p.produce(&month);
    p.wait_for(&p.expected_for(&month, p.period), Duration::from_secs(180));

    // Restarted from its changelog, the aggregator counts a user seen before once.
    p.kill("agg-a");
    p.start("aggregator", "agg-a");
    let mut later: Vec<Vec<u8>> = Vec::new();
    for (customer, users) in customers {
        let (seen, new) = (0..1000.min(users), users..users + 1000);
        later.extend(
            (seen.chain(new)).map(|u| active(&format!("{customer}-later-{u}"), customer, u, 6)),
        );
    }
    p.produce(&later);
    month.extend(later);
    let expected = p.expected_for(&month, p.period);
    assert!(
        expected.contains(&(
            "cust_big".into(),
            "active-users".into(),
            "61000".into(),
            "152500.00".into(),
            "usd".into()
        )),
        "{expected:?}"
    );
    p.wait_for(&expected, Duration::from_secs(180));
    assert!(harness::restored_some_state(&p.log("agg-a")));
    let changelog = p.read_records("aggregator-changelog");
    assert!(
        changelog
            .iter()
            .any(|(key, ..)| key.starts_with(b"snapshot/000002")),
        "a snapshot in three parts or more"
    );
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_second_aggregator_joining_and_the_first_leaving_keep_totals_exact() {
    let _servers = harness::shared();
    let p = Pipeline::new("rebalance", 100_000, 100, "");
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let lines = with_duplicates(p.lines());
    let (first, rest) = lines.split_at(lines.len() / 2);
    p.produce(first);
    // agg-a has committed state on every partition, so whichever agg-b takes comes
    // with some.
    harness::eventually(
        "agg-a commits on every partition",
        Duration::from_secs(120),
        || p.committed("aggregator").len() == harness::PARTITIONS as usize,
    );
    p.start("aggregator", "agg-b");
    p.produce(rest);
    // Both run: agg-a gave agg-b some partitions, which agg-b took with their state.
    harness::eventually("the rebalance", Duration::from_secs(60), || {
        p.log("agg-a")
            .contains("partitions revoked, the open transaction ended first")
            && harness::restored_some_state(&p.log("agg-b"))
    });
    p.stop("agg-a");
    p.wait_caught_up("aggregator", Duration::from_secs(300));
    let expected = p.expected();
    p.wait_for(&expected, Duration::from_secs(300));
    assert!(
        harness::restored_some_state(&p.log("agg-b")),
        "agg-b took over partitions with state"
    );
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn an_aggregator_frozen_past_its_session_is_fenced_when_it_wakes_and_totals_stay_exact() {
    let _servers = harness::alone();
    // Transactions held open for two seconds: the freeze all but surely catches one.
    let p = Pipeline::new(
        "zombie",
        100_000,
        100,
        "[aggregator]\nmetrics_listen = \"127.0.0.1:0\"\ncommit_interval = \"2s\"",
    );
    p.start("aggregator", "agg-a");
    p.start("aggregator", "agg-b");
    p.start("rater", "rater-a");
    harness::eventually(
        "both aggregators hold partitions",
        Duration::from_secs(60),
        || {
            ["agg-a", "agg-b"]
                .iter()
                .all(|name| p.log(name).contains("partition state restored"))
        },
    );
    let lines = with_duplicates(p.lines());
    std::thread::scope(|scope| {
        // Events keep coming, to both members' partitions, before, during and after.
        scope.spawn(|| p.produce_paced(&lines, 1_000, || Some(Duration::from_millis(100))));
        // Every partition, so agg-a's too: the state agg-b restores is in the changelog.
        harness::eventually("both commit events", Duration::from_secs(60), || {
            let committed = p.committed("aggregator");
            committed.len() == harness::PARTITIONS as usize && committed.values().all(|&o| o > 0)
        });
        // Frozen mid-transaction, agg-a misses its heartbeats: after the 10 s session
        // the group gives its partitions to agg-b, which restores them from the
        // changelog, without what agg-a's open transaction wrote.
        let port = harness::metrics_port(&p.log("agg-b"), "aggregator metrics");
        p.signal("agg-a", "STOP");
        harness::eventually(
            "agg-b holds every partition",
            Duration::from_secs(60),
            || {
                harness::metric(port, "tally_aggregator_assigned_partitions")
                    == Some(f64::from(harness::PARTITIONS))
            },
        );
        // Awake, agg-a either learns first that its partitions were lost and aborts,
        // or commits with a stale generation, which the broker refuses: either way
        // nothing it did while frozen counts.
        p.signal("agg-a", "CONT");
    });
    let expected = p.expected();
    p.wait_for(&expected, Duration::from_secs(300));
    let zombie = p.log("agg-a");
    assert!(
        zombie.contains("partitions lost to the group; aborting the open transaction")
            || zombie.contains("transaction failed; aborting"),
        "agg-a's transaction was aborted when it woke:\n{zombie}"
    );
    let successor = p.log("agg-b");
    assert!(
        harness::restored_some_state(&successor),
        "agg-b took over agg-a's partitions with their state"
    );
    // Reading a changelog to its end is how a restore ends, not an error.
    assert!(
        !successor.lines().any(|l| l.contains(" ERROR ")),
        "a member that only restored and aggregated logs no error:\n{successor}"
    );
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn of_two_aggregators_with_one_instance_id_one_stops_and_totals_stay_exact() {
    let _servers = harness::alone();
    let p = Pipeline::new(
        "same_id",
        100_000,
        100,
        "[aggregator]\nmetrics_listen = \"127.0.0.1:0\"\ncommit_interval = \"1s\"",
    );
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    harness::eventually("agg-a holds partitions", Duration::from_secs(60), || {
        p.log("agg-a").contains("partition state restored")
    });
    let lines = with_duplicates(p.lines());
    std::thread::scope(|scope| {
        // Some 25 s of events, on before the freeze and after the thaw.
        scope.spawn(|| p.produce_paced(&lines, 500, || Some(Duration::from_millis(100))));
        harness::eventually("agg-a commits events", Duration::from_secs(60), || {
            p.committed_total("aggregator") > 0
        });
        // Its host unreachable, agg-a is replaced by a new run of the same instance,
        // which fences it and, once its session expires, takes its partitions.
        p.signal("agg-a", "STOP");
        p.start_with("aggregator", "agg-b", &[("TALLY_INSTANCE_ID", "agg-a")]);
        harness::eventually(
            "agg-b takes agg-a's partitions",
            Duration::from_secs(60),
            || p.log("agg-b").contains("partition state restored"),
        );
        // Back, agg-a recovers, fencing agg-b, which recovers and fences it in turn:
        // one of them stops rather than go on aborting the other's transactions.
        p.signal("agg-a", "CONT");
    });
    // Which of the two stops depends on how their recoveries interleave (one recovery
    // can fence the other twice); either way one goes on alone.
    let (stopped, status, log) = p.wait_first_exit(&["agg-a", "agg-b"], Duration::from_secs(120));
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("fenced twice within 10 minutes")
            && log.contains("another aggregator runs with TALLY_INSTANCE_ID agg-a"),
        "{stopped}:\n{log}"
    );
    let expected = p.expected();
    p.wait_for(&expected, Duration::from_secs(300));
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_second_aggregator_with_a_live_ones_instance_id_does_not_start_and_the_first_goes_on() {
    let _servers = harness::shared();
    let p = Pipeline::new("dup_id", 3_000, 10, "");
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    harness::eventually("agg-a holds partitions", Duration::from_secs(60), || {
        p.log("agg-a").contains("partition state restored")
    });
    // Misconfigured: a second process with agg-a's id, while agg-a is alive. It would
    // fence agg-a by initialising transactions; it waits out agg-a's session instead,
    // finds it still there, and does not start.
    p.start_with("aggregator", "agg-b", &[("TALLY_INSTANCE_ID", "agg-a")]);
    let (status, log) = p.wait_exit("agg-b", Duration::from_secs(60));
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("another aggregator with TALLY_INSTANCE_ID agg-a is a live member of group"),
        "{log}"
    );
    p.produce(&p.lines());
    p.wait_for(&p.expected(), Duration::from_secs(120));
    assert!(!p.log("agg-a").contains("fenced"), "{}", p.log("agg-a"));
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn events_written_in_kafka_transactions_count_once_committed_and_offsets_reach_the_end() {
    let _servers = harness::shared();
    let p = Pipeline::new("transactional_events", 10_000, 20, "");
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let lines = p.lines();
    let (first, rest) = lines.split_at(lines.len() / 2);
    p.produce_in_transaction(first, true);
    // An aborted transaction's events were never sent, as far as billing goes.
    let aborted: Vec<Vec<u8>> = (0..200)
        .map(|i| {
            resolution(
                &format!("aborted-{i}"),
                &customers()[i % 10],
                "2026-10-15T12:00:00Z",
            )
        })
        .collect();
    p.produce_in_transaction(&aborted, false);
    p.produce_in_transaction(rest, true);
    let expected = p.expected();
    p.wait_for(&expected, Duration::from_secs(180));
    // Each transaction ends in a marker the aggregator never sees as a message: its
    // committed offsets still reach the end of every partition.
    p.wait_caught_up("aggregator", Duration::from_secs(60));
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_broker_restart_mid_run_neither_loses_nor_hangs() {
    let _servers = harness::alone();
    let p = Pipeline::new("broker_restart", 100_000, 100, "");
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let lines = with_duplicates(p.lines());
    let (first, rest) = lines.split_at(lines.len() / 3);
    let (second, third) = rest.split_at(rest.len() / 2);
    p.produce(first);
    // A quick restart while the services work.
    let committed = || p.committed_total("aggregator");
    harness::eventually("the aggregator commits", Duration::from_secs(60), || {
        committed() > 0
    });
    harness::service("kafka", "restart");
    let before = committed();
    p.produce(second);
    // Once they work again, an outage longer than the group session (10 s): both
    // services lose their partitions, rejoin and restore them once the broker is back.
    harness::eventually(
        "the aggregator commits after the restart",
        Duration::from_secs(120),
        || committed() > before,
    );
    let _kafka_back = Restart("kafka");
    harness::service("kafka", "stop");
    std::thread::sleep(Duration::from_secs(12));
    p.assert_running();
    harness::service("kafka", "start");
    p.produce(third);
    p.wait_caught_up("aggregator", Duration::from_secs(300));
    let expected = p.expected();
    p.wait_for(&expected, Duration::from_secs(300));
    // Downstream consumers of the rated topic miss nothing either.
    p.wait_for_rated(&expected, Duration::from_secs(60));
    // Connections lost to a broker restart they ride out are no errors to page anyone
    // with: warnings, at most one a minute per process. (A transaction the outage
    // failed is still an error, as is any other Kafka error.)
    for service in ["agg-a", "rater-a"] {
        let log = p.log(service);
        let errors: Vec<&str> = (log.lines())
            .filter(|l| {
                l.contains(" ERROR ")
                    && (l.contains("librdkafka: FAIL") || l.contains("BrokerTransportFailure"))
            })
            .collect();
        assert!(errors.is_empty(), "{service} logged errors: {errors:#?}");
        let connection_failures = log
            .matches("connection failures at most once a minute")
            .count();
        assert!(
            (1..=6).contains(&connection_failures),
            "{service}: {connection_failures} connection-failure warnings in a run of a few minutes"
        );
    }
}

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

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_rejected_topic_refusing_records_stops_the_aggregator_until_a_restart_writes_them() {
    let _servers = harness::shared();
    let p = Pipeline::new("rejected_refused", 2_000, 10, "");
    // An operator's rejected topic that takes less than a refused event: Kafka refuses
    // its copy for good, and every recovery would replay it into the same refusal.
    p.set_topic_config("rejected", "max.message.bytes", "200");
    let poison = format!("not json {}", "x".repeat(1000)).into_bytes();
    let mut lines = p.lines();
    lines.insert(700, poison.clone());
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    p.produce(&lines);
    let (status, log) = p.wait_exit("agg-a", Duration::from_secs(120));
    assert!(!status.success(), "the aggregator stopped with an error");
    assert!(
        log.contains("Kafka refused a record the aggregator must write")
            && log.contains("max.message.bytes"),
        "the aggregator says why it stopped and what to change:\n{log}"
    );
    assert_eq!(
        log.matches("rebuilding state from the changelog").count(),
        0,
        "no recovery loop before stopping:\n{log}"
    );
    p.set_topic_config("rejected", "max.message.bytes", "1048588");
    p.start("aggregator", "agg-a");
    p.wait_for(&p.expected(), Duration::from_secs(120));
    let rejected = p.read_topic("rejected");
    let copies = rejected.iter().filter(|(payload, _)| *payload == poison);
    assert_eq!(copies.count(), 1, "the refused event is kept once");

    // An event nearly as large as a record may be (librdkafka's 1,000,000 bytes): its
    // copy with the reason in headers would not fit, so the copy keeps its first bytes
    // and says how large it was.
    let huge = format!("not json {}", "y".repeat(999_850)).into_bytes();
    p.produce_to(0, "cust_00001", &huge);
    harness::eventually(
        "the huge event's cut copy is in the rejected topic",
        Duration::from_secs(60),
        || {
            (p.read_topic("rejected").iter()).any(|(payload, headers)| {
                huge.starts_with(payload)
                    && payload.len() < huge.len()
                    && headers.get("tally.source.bytes") == Some(&huge.len().to_string())
            })
        },
    );
    p.assert_running();
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn an_aggregator_whose_consumer_cannot_join_its_group_says_it_is_not_ready() {
    let _servers = harness::shared();
    // A session timeout below the broker's minimum (6 s): the consumer is refused
    // every time it tries to join, and counts nothing.
    let p = Pipeline::new(
        "cannot_join",
        200,
        5,
        "[kafka.properties]\n\"session.timeout.ms\" = \"3000\"",
    );
    p.start("aggregator", "agg-a");
    let mut port = None;
    harness::eventually(
        "the aggregator serves its metrics",
        Duration::from_secs(30),
        || {
            let log = p.log("agg-a");
            port = log
                .contains("what=\"aggregator metrics\"")
                .then(|| harness::metrics_port(&log, "aggregator metrics"));
            port.is_some()
        },
    );
    let port = port.expect("found above");
    let mut last = None;
    harness::eventually(
        "the aggregator says it is not ready once joining has failed for 30 s",
        Duration::from_secs(120),
        || {
            last = common::get(port, "/readyz");
            last.as_ref().is_some_and(|(status, body)| {
                *status == 503 && body.contains("the Kafka consumer failed for")
            })
        },
    );
    let (_, body) = last.expect("answered");
    assert!(body.contains("session timeout"), "/readyz says why: {body}");
    assert_eq!(harness::metric(port, "tally_service_ready"), Some(0.0));
    p.assert_running();
}

/// An explanation's lines and total: what `tally explain` shows alike whether it
/// rated an events file or read the pipeline's lines (the events and unbilled usage
/// only a file shows left out).
fn worked_lines(explanation: &str) -> String {
    let mut kept = String::new();
    let mut unbilled = false;
    // The pipeline's explanation ends with the month's usage billed later.
    let rows = explanation.lines().skip_while(|l| !l.contains("   (line "));
    for row in rows.take_while(|row| {
        !row.starts_with("no usage of") && !row.contains("arrived after its close")
    }) {
        unbilled = row.starts_with("usage no line bills") || (unbilled && !row.is_empty());
        if !unbilled {
            kept.push_str(row);
            kept.push('\n');
        }
    }
    // The blank line before that tail.
    format!("{}\n", kept.trim_end())
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn the_pipelines_lines_are_explained_as_tally_rate_explains_the_same_events() {
    let _servers = harness::shared();
    let p = Pipeline::new(
        "explain",
        5_000,
        8,
        "[rater]\nmetrics_listen = \"127.0.0.1:0\"\nflush_interval = \"200ms\"\nstore_windows = true",
    );
    p.produce(&p.lines());
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let expected = p.expected();
    p.wait_for(&expected, Duration::from_secs(120));
    let events = p.events.display().to_string();
    let explain_in = |period: &str, customer: &str, source: &[&str]| -> String {
        let mut args = vec!["explain", "--period", period, "--customer", customer];
        args.extend(source);
        let output = p.tally(&args, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        String::from_utf8(output.stdout).unwrap()
    };
    let explain = |customer: &str, source: &[&str]| explain_in(p.period, customer, source);
    // One customer of each of the generated book's four plans.
    for customer in customers().iter().take(4) {
        let rated = explain(
            customer,
            &["--events", &events, "--now", "2026-11-01T00:00:00Z"],
        );
        assert!(rated.contains("   (line "), "{rated}");
        assert!(rated.contains("by day:"), "{rated}");
        // Windows are stored just after their batch's lines.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let stored = loop {
            let stored = explain(customer, &["--pipeline"]);
            if worked_lines(&stored) == worked_lines(&rated) || std::time::Instant::now() > deadline
            {
                break stored;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        assert_eq!(worked_lines(&stored), worked_lines(&rated));
        let source = format!("{}.invoice_lines at", p.database);
        assert!(stored.contains(&source), "{stored}");
    }

    // October closed, then a late resolution and late gpt-x tokens of the starter
    // customer: adjustments billed in November, explained as what the late usage
    // added to October (not as usage of November's first day), with one total.
    p.produce(&resolution_each("close", "2026-11-01T02:00:00Z"));
    let late_tokens = r#"{"specversion":"1.0","id":"late-tokens","source":"late-test","type":"llm.tokens","subject":"cust_00000","time":"2026-10-20T08:00:00Z","data":{"tokens":600,"model":"gpt-x"}}"#;
    p.produce(&[
        resolution("late-1", "cust_00000", "2026-10-15T08:00:00Z"),
        late_tokens.as_bytes().to_vec(),
    ]);
    let count_lines = format!(
        "SELECT count() FROM {}.invoice_lines WHERE customer = 'cust_00000' \
         AND period_start = '2026-11-01 00:00:00'",
        p.database
    );
    let shown = [
        "resolutions, late usage of 2026-10: ",
        "gpt-x-tokens, late usage of 2026-10: ",
        "            late usage of 2026-10, read after it closed: 1 (its days are not kept)\n",
        "            late usage of 2026-10, read after it closed: 600 (its days are not kept)\n",
        "  charge    in packages of 1000, rounded up: the tiers below are the packages and amounts the late usage adds\n",
    ];
    // Windows are stored just after their batch's lines: wait for both.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let november = loop {
        let november = explain_in("2026-11", "cust_00000", &["--pipeline"]);
        let all = shown.iter().all(|text| november.contains(text));
        if all || std::time::Instant::now() > deadline {
            break november;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    for text in shown {
        assert!(november.contains(text), "{text:?} in:\n{november}");
    }
    // Both versions of October's resolutions line, so its figures can be redone: as
    // ClickHouse holds it, and with the late resolution.
    let october = p.query(&format!(
        "SELECT quantity, subtotal, discount, amount FROM {}.invoice_lines \
         WHERE customer = 'cust_00000' AND price = 'resolutions' \
         AND period_start = '2026-10-01 00:00:00' AND adjusts_period = ''",
        p.database
    ));
    let billed: Vec<&str> = october.trim().split('\t').collect();
    let [quantity, subtotal, discount, amount] = billed[..] else {
        panic!("october's resolutions line: {october:?}");
    };
    let as_billed = format!(
        "            as billed    quantity {quantity}, subtotal {subtotal}, discount {discount}, amount {amount} (2026-10's line and any earlier adjustment of it)\n"
    );
    assert!(
        november.contains(&as_billed),
        "{as_billed:?} in:\n{november}"
    );
    let one_more = quantity.parse::<u64>().unwrap() + 1;
    let rated_again = format!("            rated again  quantity {one_more}, subtotal ");
    assert!(
        november.contains(&rated_again),
        "{rated_again:?} in:\n{november}"
    );
    assert!(!november.contains("rated with price book"), "{november}");
    // October's explanation says where its late usage went.
    let october = explain_in(p.period, "cust_00000", &["--pipeline"]);
    for text in [
        "usage of 2026-10 that arrived after its close, billed in later months as adjustment lines",
        "  2026-11  resolutions  quantity 1  amount ",
        "  2026-11  gpt-x-tokens  quantity 600  amount ",
    ] {
        assert!(october.contains(text), "{text:?} in:\n{october}");
    }
    let totals: Vec<&str> = november
        .lines()
        .filter(|l| l.starts_with("total "))
        .collect();
    assert_eq!(totals.len(), 1, "{november}");
    let (total, parts) = totals[0]
        .strip_prefix("total ")
        .and_then(|t| t.split_once(" usd ("))
        .unwrap();
    let parts: Vec<rust_decimal::Decimal> = (parts.trim_end_matches(')').split(" + "))
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(parts.len().to_string(), p.query(&count_lines).trim());
    let sum: rust_decimal::Decimal = parts.iter().sum();
    assert_eq!(total, sum.to_string(), "{november}");
}

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

/// A tokens event of `tokens` (negative: a correction) for `customer`'s `model`.
fn tokens_event(id: &str, customer: &str, model: &str, tokens: i64, time: &str) -> Vec<u8> {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"corrections-test","type":"llm.tokens","subject":"{customer}","time":"{time}","data":{{"model":"{model}","tokens":{tokens}}}}}"#
    )
    .into_bytes()
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

/// A sender that puts a request id where the model belongs: each event a series of
/// its own, held for the month. The rater names the line as it crowds, and a restart
/// names it again, as memory that runs out runs out again at every restart.
#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_line_of_a_thousand_series_is_named_as_it_crowds_and_after_a_restart() {
    let _servers = harness::shared();
    let p = Pipeline::new("crowded", 100, 2, "");
    // cust_00001 is on pro, whose tokens price takes every model.
    let crowding: Vec<Vec<u8>> = (0..1_000)
        .map(|i| {
            format!(
                r#"{{"specversion":"1.0","id":"crowd-{i}","source":"llm-gateway","type":"llm.tokens","subject":"cust_00001","time":"2026-10-20T10:00:00Z","data":{{"model":"req-{i:04}","tokens":1}}}}"#
            )
            .into_bytes()
        })
        .collect();
    let mut lines = p.lines();
    lines.extend(crowding);
    p.produce(&lines);
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    p.wait_for(&p.expected_for(&lines, p.period), Duration::from_secs(120));
    let named = |log: &str, message: &str| {
        log.lines().any(|line| {
            line.contains(message)
                && line.contains("customer=\"cust_00001\"")
                && line.contains("price=\"tokens\"")
                && line.contains("meter=\"tokens\"")
                && line.contains("series=1000")
        })
    };
    let log = p.log("rater-a");
    assert!(
        named(&log, "an invoice line sums this many usage series"),
        "{log}"
    );
    assert!(log.contains("example_group=[\"req-"), "{log}");

    p.stop("rater-a");
    p.start("rater", "rater-b");
    harness::eventually(
        "rater-b sums up the crowded line",
        Duration::from_secs(60),
        || {
            named(
                &p.log("rater-b"),
                "the partition holds lines that sum at least this many usage series",
            )
        },
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

/// The line of `customer` for `price` among `lines`.
fn line_for<'a>(lines: &'a [harness::Line], customer: &str, price: &str) -> &'a harness::Line {
    lines
        .iter()
        .find(|l| l.0 == customer && l.1 == price)
        .unwrap_or_else(|| panic!("no {price} line for {customer}"))
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

/// How many partitions of the windows topic carry the record settling `period`.
fn partitions_settled(p: &Pipeline, period: &str) -> usize {
    (p.read_records("windows").into_iter())
        .filter(|(_, _, headers)| headers.get("tally-settled").map(String::as_str) == Some(period))
        .count()
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
    let partitions = std::num::NonZeroUsize::new(harness::PARTITIONS as usize).unwrap();
    let partition_of = |customer: &str| partition_for_key(customer.as_bytes(), partitions);
    let idle_partition = partition_of("cust_idle");
    assert!(
        customers()
            .iter()
            .any(|c| partition_of(c) == idle_partition),
        "cust_idle's partition must get traffic for October to settle there"
    );
    let quiet = customers()
        .iter()
        .map(|c| partition_of(c))
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
        .filter(|c| partition_of(c) != quiet)
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
        .filter(|l| partition_of(&l.0) == quiet)
        .chain(billed.iter().filter(|l| partition_of(&l.0) != quiet))
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

/// The number a service's log line gives `name` (`name=123`).
fn log_field(line: &str, name: &str) -> i64 {
    let (_, rest) =
        (line.split_once(&format!(" {name}="))).unwrap_or_else(|| panic!("no {name} in {line}"));
    rest.split(' ').next().unwrap().parse().unwrap()
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
    let partitions = std::num::NonZeroUsize::new(harness::PARTITIONS as usize).unwrap();
    let partition_of = |customer: &str| partition_for_key(customer.as_bytes(), partitions);
    let idle: std::collections::BTreeSet<String> = (0..harness::PARTITIONS as i32)
        .map(|partition| {
            (0..)
                .map(|i| format!("cust_idle_{i}"))
                .find(|c| partition_of(c) == partition)
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
        .filter(|c| !taken.contains(&partition_of(c)))
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

/// A rolling restart goes by /readyz: an aggregator joining a running group says ready
/// only once it holds restored partitions (not at the rebalance's first step, which
/// gives a joining member none), and one beyond the partition count once the group
/// has settled with it as a standby.
#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn an_aggregator_joining_its_group_is_ready_once_it_holds_partitions_or_stands_by() {
    let _servers = harness::shared();
    let p = Pipeline::new("joining", 3_000, 10, "");
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    p.produce(&p.lines());
    p.wait_caught_up("aggregator", Duration::from_secs(120));
    let port_of = |name: &str| {
        let mut port = None;
        harness::eventually("its metrics listener", Duration::from_secs(30), || {
            let log = p.log(name);
            port = log
                .contains("what=\"aggregator metrics\"")
                .then(|| harness::metrics_port(&log, "aggregator metrics"));
            port.is_some()
        });
        port.unwrap_or_default()
    };
    let ready = |port: u16| common::get(port, "/readyz").is_some_and(|(status, _)| status == 200);

    p.start("aggregator", "agg-b");
    let port = port_of("agg-b");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready(port) {
        assert!(Instant::now() < deadline, "agg-b never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let held = harness::metric(port, "tally_aggregator_assigned_partitions");
    assert!(
        held.is_some_and(|n| n > 0.0),
        "ready holding {held:?} partitions:\n{}",
        p.log("agg-b")
    );

    // More aggregators than partitions: the one left without any is ready too.
    let others = ["agg-c", "agg-d", "agg-e"];
    for name in others {
        p.start("aggregator", name);
    }
    let ports: Vec<u16> = others.iter().map(|name| port_of(name)).collect();
    harness::eventually(
        "every aggregator ready, one of five a standby",
        Duration::from_secs(90),
        || ports.iter().all(|&port| ready(port)),
    );
    let holding: Vec<Option<f64>> = (ports.iter())
        .map(|&port| harness::metric(port, "tally_aggregator_assigned_partitions"))
        .collect();
    assert!(holding.contains(&Some(0.0)), "no standby: {holding:?}");
    p.produce(&resolution_each("20", "2026-10-20T00:00:00Z"));
    p.wait_caught_up("aggregator", Duration::from_secs(120));
    let mut lines = p.lines();
    lines.extend(resolution_each("20", "2026-10-20T00:00:00Z"));
    p.wait_for(&p.expected_for(&lines, p.period), Duration::from_secs(120));
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

/// Deploy mistakes the operator is told of: an instance whose `[kafka] partitions` is
/// not its pipeline's (it cannot change it), one whose mistyped topic prefix makes
/// a new pipeline beside the running one (it would bill none of its events), and a
/// rater of that other pipeline on the running one's database (it would overwrite its
/// lines: the rater stops instead).
#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_deploy_with_another_partition_count_or_a_mistyped_prefix_is_told_so() {
    let _servers = harness::shared();
    let p = Pipeline::new("deploy_mistakes", 10, 1, "");
    let book = std::fs::read_to_string(&p.config).unwrap();
    let pipeline_partitions = format!("partitions = {}", harness::PARTITIONS);
    std::fs::write(
        &p.config,
        edited(&book, &pipeline_partitions, "partitions = 12"),
    )
    .unwrap();
    p.start("aggregator", "agg-a");
    harness::eventually(
        "agg-a says the partition count is the pipeline's",
        Duration::from_secs(60),
        || {
            p.log("agg-a")
                .contains("[kafka] partitions applies when a pipeline is made")
        },
    );
    std::fs::write(&p.config, &book).unwrap();

    let mistyped = format!("{}x", p.prefix);
    p.start_with(
        "aggregator",
        "agg-b",
        &[("TALLY_KAFKA_TOPIC_PREFIX", mistyped.as_str())],
    );
    harness::eventually(
        "agg-b says it made a pipeline beside the running one",
        Duration::from_secs(60),
        || {
            let log = p.log("agg-b");
            log.contains("made a new pipeline's topics beside other pipelines on these brokers, one of which")
                && log.contains(&format!("likely_meant=\"{}\"", p.prefix))
        },
    );
    assert!(!p.log("agg-a").contains("made a new pipeline"));

    p.start("rater", "rater-a");
    harness::eventually(
        "rater-a claims its database",
        Duration::from_secs(60),
        || {
            let made = format!(
                "SELECT count() FROM system.tables WHERE database = '{}' AND name = 'pipeline_claims'",
                p.database
            );
            p.query(&made).trim() == "1"
                && p.query(&format!(
                    "SELECT topic_prefix FROM {}.pipeline_claims",
                    p.database
                ))
                .trim()
                    == p.prefix
        },
    );
    p.start_with(
        "rater",
        "rater-b",
        &[("TALLY_KAFKA_TOPIC_PREFIX", mistyped.as_str())],
    );
    let (status, log) = p.wait_exit("rater-b", Duration::from_secs(120));
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "is claimed by the pipeline of topic prefix {}, and this rater is of topic prefix {mistyped}:",
            p.prefix
        )),
        "{log}"
    );
    p.assert_running();
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
    let partitions = std::num::NonZeroUsize::new(harness::PARTITIONS as usize).unwrap();
    let partition_of = |customer: &str| partition_for_key(customer.as_bytes(), partitions);
    let known = "cust_00000";
    let added = (0..)
        .map(|i| format!("cust_added_{i}"))
        .find(|c| partition_of(c) != partition_of(known))
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
        .find(|c| ![partition_of(known), partition_of(&added)].contains(&partition_of(c)))
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
    let partitions = std::num::NonZeroUsize::new(harness::PARTITIONS as usize).unwrap();
    let partition_of = |customer: &str| partition_for_key(customer.as_bytes(), partitions);
    let changed = p
        .expected()
        .into_iter()
        .filter(|line| !before.contains(line));
    let (line, neighbour) = changed
        .filter_map(|line| {
            let neighbour = (customers().into_iter())
                .find(|c| *c != line.0 && partition_of(c) == partition_of(&line.0))?;
            Some((line, neighbour))
        })
        .next()
        .expect("a changed line with a neighbour");
    // What a rater leaves that stored its batch and died before committing: a row
    // (here, the old book's row again) at a version past the committed offset.
    let partition = partition_of(&line.0);
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

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn events_sent_over_http_are_billed_exactly_as_tally_rate_bills_them() {
    let _servers = harness::shared();
    let port = common::free_port();
    let p = Pipeline::new("http", 20_000, 40, &harness::ingest_section(port));
    // JSON logs, with each request's outcome (debug), as a log pipeline would take them.
    p.start_with(
        "ingest",
        "ingest-a",
        &[
            ("TALLY_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,tally_ingest=debug"),
        ],
    );
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let lines = p.lines();
    let accepted = harness::post_events(port, &lines, 500);
    // Every line is valid; ingest drops only repeats within one batch, and refuses
    // conflicting resends of an earlier event of the batch.
    assert!(
        accepted > 19_000 && accepted <= lines.len() as u64,
        "{accepted}"
    );
    let guessed = "guessed-key-0123456789";
    let refused = ureq::post(&format!("http://127.0.0.1:{port}/v1/events"))
        .header("Authorization", &format!("Bearer {guessed}"))
        .header("Content-Type", "application/cloudevents+json")
        .header("X-Forwarded-For", "203.0.113.7")
        .send(&lines[0][..]);
    assert!(
        matches!(refused, Err(ureq::Error::StatusCode(401))),
        "{refused:?}"
    );
    let expected = p.expected();
    p.wait_for(&expected, Duration::from_secs(180));

    p.stop("ingest-a");
    let log = p.log("ingest-a");
    let records: Vec<serde_json::Value> = (log.lines())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
        })
        .collect();
    let unauthorized = "events refused: no valid API key";
    let says = |record: &serde_json::Value, message: &str| {
        record["message"]
            .as_str()
            .is_some_and(|m| m.starts_with(message))
    };
    for message in [
        "ingest API listening",
        "events ingested",
        unauthorized,
        "ingest API stopped",
    ] {
        let record = (records.iter())
            .find(|r| says(r, message))
            .unwrap_or_else(|| panic!("no {message:?} record in\n{log}"));
        assert!(
            record["timestamp"].is_string() && record["level"].is_string(),
            "{record}"
        );
    }
    assert!(
        (records.iter())
            .any(|r| r["message"] == "events ingested" && r["tenant"] == "pipeline-test"),
        "requests are logged by tenant:\n{log}"
    );
    // A refused key is a warning with why and who sent it, for the operator of a
    // sender whose events never arrive.
    assert!(
        records.iter().any(|r| says(r, unauthorized)
            && r["level"] == "WARN"
            && r["why"]
                == "the API key sent is not one of the configured keys (rotated, or mistyped?)"
            && r["client"]
                .as_str()
                .is_some_and(|client| client.starts_with("127.0.0.1:"))
            && r["forwarded_for"] == "203.0.113.7"
            && r["user_agent"]
                .as_str()
                .is_some_and(|agent| agent.starts_with("ureq"))),
        "{log}"
    );
    for key in [harness::API_KEY, guessed] {
        assert!(!log.contains(key), "an API key in the log:\n{log}");
    }
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_partition_added_to_the_events_topic_is_left_unread_and_reported_and_totals_stay_exact() {
    let _servers = harness::shared();
    let port = common::free_port();
    let p = Pipeline::new("grown", 10_000, 40, &harness::ingest_section(port));
    // Someone adds a partition to the events topic of a running pipeline, as one
    // scales out a stateless consumer. A customer's usage, dedupe keys and lines live
    // in the partition murmur2 gives its subject over the pipeline's four.
    let grown = harness::PARTITIONS as usize + 1;
    p.add_partitions("events", grown);
    p.start("ingest", "ingest-a");
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    // A producer writing straight to the new partition: nothing reads it, so it is not
    // billed, and that is said (below) rather than its events split from their
    // customers' state.
    let stray = resolution("stray-1", "cust_00000", "2026-10-20T10:00:00Z");
    p.produce_to(harness::PARTITIONS as i32, "cust_00000", &stray);
    let lines = p.lines();
    harness::post_events(port, &lines, 500);
    p.wait_for(&p.expected(), Duration::from_secs(180));

    let log = p.log("agg-a");
    let aggregator = harness::metrics_port(&log, "aggregator metrics");
    harness::eventually(
        "the unread partition counted",
        Duration::from_secs(30),
        || harness::metric(aggregator, "tally_aggregator_unread_partitions") == Some(1.0),
    );
    assert!(
        log.contains("partitions were added to the events topic"),
        "{log}"
    );
    // Closing a month waits for the pipeline's partitions, not the unread one.
    let closed = p.tally(
        &["close-period", "--period", "2026-10", "--wait", "2m"],
        &[],
    );
    assert!(closed.status.success(), "{closed:?}");
    p.wait_for(&p.expected(), Duration::from_secs(60));

    // As many aggregators as the grown topic has partitions: the one left with only
    // the unread partition holds it (paused), and is ready like the others.
    let others = ["agg-b", "agg-c", "agg-d", "agg-e"];
    for name in others {
        p.start("aggregator", name);
    }
    harness::eventually("every aggregator ready", Duration::from_secs(90), || {
        (std::iter::once("agg-a").chain(others)).all(|name| {
            let log = p.log(name);
            log.contains("what=\"aggregator metrics\"")
                && common::get(harness::metrics_port(&log, "aggregator metrics"), "/readyz")
                    .is_some_and(|(status, _)| status == 200)
        })
    });
    p.wait_for(&p.expected(), Duration::from_secs(60));
    p.assert_running();
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn an_aggregator_whose_state_is_of_fewer_partitions_than_its_topics_stops_saying_why() {
    let _servers = harness::shared();
    let p = Pipeline::new("regrown", 3_000, 40, "");
    p.start("aggregator", "agg-a");
    p.produce(&p.lines());
    p.wait_caught_up("aggregator", Duration::from_secs(120));
    p.stop("agg-a");
    // Every topic grown while the pipeline was stopped: the changelog's partitions hold
    // the customers murmur2 gave them over four, many of whom it now gives others; the
    // committed offsets say over how many partitions their state was made.
    for suffix in ["events", "windows", "aggregator-changelog"] {
        p.add_partitions(suffix, harness::PARTITIONS as usize + 2);
    }
    p.start("aggregator", "agg-b");
    let (status, log) = p.wait_exit("agg-b", Duration::from_secs(120));
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "state was committed by a pipeline of {} partitions, but the topics now have {}",
            harness::PARTITIONS,
            harness::PARTITIONS + 2
        )) && log.contains("Changing the partition count"),
        "{log}"
    );
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
    let partitions = std::num::NonZeroUsize::new(harness::PARTITIONS as usize).unwrap();
    let home = partition_for_key(b"cust_00000", partitions);
    let mut events = resolution_each("r", "2026-10-10T10:00:00Z");
    events.extend(
        (customers().iter())
            .filter(|c| partition_for_key(c.as_bytes(), partitions) == home)
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

/// Prometheus's answer to an instant query: `(labels, value)` per series.
fn prometheus(query: &str) -> Vec<(serde_json::Value, f64)> {
    let url = format!(
        "http://127.0.0.1:9090/api/v1/query?query={}",
        query
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' =>
                    (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    );
    let Ok(mut response) = ureq::get(&url).call() else {
        return Vec::new();
    };
    let body: serde_json::Value =
        serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            let value = r["value"][1].as_str().unwrap().parse().unwrap();
            (r["metric"].clone(), value)
        })
        .collect()
}

#[test]
#[ignore = "needs Kafka, ClickHouse and Prometheus: scripts/services/up.sh"]
fn prometheus_scrapes_every_service_of_serve_all() {
    let _servers = harness::alone();
    let (ingest, aggregator, rater) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let extra = format!(
        "{}\n[aggregator]\nmetrics_listen = \"127.0.0.1:{aggregator}\"\ncommit_interval = \"100ms\"\n\
         [rater]\nmetrics_listen = \"127.0.0.1:{rater}\"\nflush_interval = \"200ms\"\n",
        harness::ingest_section(ingest)
    );
    let p = Pipeline::new("prometheus", 3_000, 10, &extra);
    p.start("all", "all-a");
    harness::service_with(
        "prometheus",
        &[
            "targets",
            &format!("ingest=127.0.0.1:{ingest},aggregator=127.0.0.1:{aggregator},rater=127.0.0.1:{rater}"),
        ],
    );
    let mut lines = p.lines();
    // One event without an id among the posted ones (ingest refuses it, the rest of its
    // batch goes on), and a message that is not JSON straight into the topic (the
    // aggregator refuses it): the rejected counters the dashboard shows by reason.
    let mut no_id: serde_json::Value = serde_json::from_slice(&lines[0]).unwrap();
    no_id.as_object_mut().unwrap().remove("id");
    lines.insert(7, no_id.to_string().into_bytes());
    let accepted = harness::post_events(ingest, &lines, 250) as f64;
    p.produce(&[b"{not json".to_vec()]);
    let expected = p.expected();
    p.wait_for(&expected, Duration::from_secs(120));

    let total = |query: &str| prometheus(query).iter().map(|(_, v)| v).sum::<f64>();
    let lines_expected = expected.len() as f64;
    let version = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8(version.stdout).unwrap();
    let commit = version
        .split("(commit ")
        .nth(1)
        .unwrap()
        .trim_end()
        .trim_end_matches(')');
    let build_info: &'static str = Box::leak(
        format!(
            r#"tally_build_info{{job=~"ingest|aggregator|rater",version="{}",commit="{commit}"}}"#,
            env!("CARGO_PKG_VERSION")
        )
        .into_boxed_str(),
    );
    // The book every service runs: the hash `tally validate` prints.
    let validated = p.tally(&["validate"], &[]);
    let validated = String::from_utf8(validated.stdout).unwrap();
    let hash = (validated.split("price book hash ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no hash in {validated}"));
    let book_info: &'static str = Box::leak(
        format!(r#"tally_price_book_info{{job=~"ingest|aggregator|rater",hash="{hash}"}}"#)
            .into_boxed_str(),
    );
    type Check = (&'static str, Box<dyn Fn(f64) -> bool>);
    let checks: Vec<Check> = vec![
        (
            r#"up{job=~"ingest|aggregator|rater"}"#,
            Box::new(|v| v == 3.0),
        ),
        (
            r#"tally_service_ready{job=~"ingest|aggregator|rater"}"#,
            Box::new(|v| v == 3.0),
        ),
        // Each service says which build it is, as `tally --version` does.
        (build_info, Box::new(|v| v == 3.0)),
        // And which price book.
        (book_info, Box::new(|v| v == 3.0)),
        // And its process's metrics (any process holds a few MiB).
        (
            r#"process_resident_memory_bytes{job=~"ingest|aggregator|rater"}"#,
            Box::new(|v| v > 3.0 * 1024.0 * 1024.0),
        ),
        (
            r#"tally_ingest_events_total{job="ingest",outcome="accepted"}"#,
            Box::new(move |v| v == accepted),
        ),
        (
            r#"tally_http_requests_total{job="ingest",route="/v1/events",status="202"}"#,
            Box::new(|v| v >= 12.0),
        ),
        (
            r#"tally_http_request_duration_seconds_count{job="ingest"}"#,
            Box::new(|v| v >= 12.0),
        ),
        (
            r#"tally_ingest_rejected_events_total{job="ingest",reason="missing_field"}"#,
            Box::new(|v| v == 1.0),
        ),
        // The aggregator reads every event ingest stored, and the message produced
        // beside it, exactly once, whatever becomes of them.
        (
            r#"tally_aggregator_events_total{job="aggregator"}"#,
            Box::new(move |v| v == accepted + 1.0),
        ),
        (
            r#"tally_aggregator_rejected_events_total{job="aggregator",reason="invalid_json"}"#,
            Box::new(|v| v == 1.0),
        ),
        (
            r#"tally_aggregator_transactions_total{job="aggregator",result="committed"}"#,
            Box::new(|v| v >= 1.0),
        ),
        (
            r#"tally_aggregator_window_latency_seconds_count{job="aggregator"}"#,
            Box::new(|v| v >= 1.0),
        ),
        (
            r#"tally_aggregator_window_updates_total{job="aggregator"}"#,
            Box::new(|v| v >= 1.0),
        ),
        (
            r#"tally_kafka_consumer_lag_messages{job="aggregator"}"#,
            Box::new(|v| v >= 0.0),
        ),
        // Every partition's newest event time is in the generated month, October 2026.
        (
            r#"count(tally_aggregator_watermark_timestamp_seconds{job="aggregator"})"#,
            Box::new(|v| v == f64::from(harness::PARTITIONS)),
        ),
        (
            r#"min(tally_aggregator_watermark_timestamp_seconds{job="aggregator"}) >= 1790812800 and max(tally_aggregator_watermark_timestamp_seconds{job="aggregator"}) < 1793491200"#,
            Box::new(|v| v > 0.0),
        ),
        (
            r#"tally_aggregator_series{job="aggregator"}"#,
            Box::new(|v| v >= 10.0),
        ),
        (
            r#"tally_rater_usage_updates_total{job="rater"}"#,
            Box::new(|v| v >= 1.0),
        ),
        (
            r#"tally_rater_ledger_lines{job="rater"}"#,
            Box::new(|v| v >= 10.0),
        ),
        (
            r#"tally_rater_ledger_series{job="rater"}"#,
            Box::new(|v| v >= 10.0),
        ),
        (
            r#"tally_rater_lines_rated_total{job="rater"}"#,
            Box::new(|v| v >= 1.0),
        ),
        (
            r#"tally_clickhouse_inserted_rows_total{job="rater",table="rated_lines"}"#,
            Box::new(move |v| v >= lines_expected),
        ),
        (
            r#"tally_clickhouse_insert_duration_seconds_count{job="rater"}"#,
            Box::new(|v| v >= 1.0),
        ),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for (query, ok) in &checks {
        loop {
            let series = prometheus(query);
            let value = total(query);
            if !series.is_empty() && ok(value) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Prometheus: {query} = {value} ({} series)",
                series.len()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // No series is labelled with a customer, subject, key or event id.
    let mut labels = ureq::get("http://127.0.0.1:9090/api/v1/labels")
        .call()
        .unwrap();
    let labels = labels.body_mut().read_to_string().unwrap();
    for forbidden in [
        "\"customer\"",
        "\"subject\"",
        "\"event_id\"",
        "\"id\"",
        "\"api_key\"",
        "\"tenant\"",
    ] {
        assert!(!labels.contains(forbidden), "label {forbidden} in {labels}");
    }

    // The alerting rules users get (deploy/prometheus/alerts.yml, which the test
    // Prometheus loads) evaluate without error against the services' real series, and
    // every metric they name is one the services export.
    let get = |path: &str| -> serde_json::Value {
        let mut response = ureq::get(&format!("http://127.0.0.1:9090{path}"))
            .call()
            .unwrap();
        serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap()
    };
    let rules_file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml");
    let rules_text = std::fs::read_to_string(rules_file).unwrap();
    harness::eventually(
        "every alerting rule evaluated, without error",
        Duration::from_secs(30),
        || {
            let rules = get("/api/v1/rules");
            let rules: Vec<&serde_json::Value> = (rules["data"]["groups"].as_array())
                .into_iter()
                .flatten()
                .flat_map(|group| group["rules"].as_array().into_iter().flatten())
                .collect();
            rules.len() == rules_text.matches("- alert:").count()
                && rules.iter().all(|rule| {
                    rule["health"] == "ok" && rule["lastEvaluation"] != "0001-01-01T00:00:00Z"
                })
        },
    );
    let exported = get("/api/v1/label/__name__/values");
    let exported: Vec<&str> = (exported["data"].as_array().unwrap().iter())
        .filter_map(|name| name.as_str())
        .collect();
    let metric_names = |text: &str| -> std::collections::BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("tally_"))
            .map(str::to_owned)
            .collect()
    };
    // And the Grafana dashboard's panels query only series the services export.
    let dashboard_file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana/dashboards/tally-pipeline.json");
    let dashboard_text = std::fs::read_to_string(dashboard_file).unwrap();
    for (what, text, at_least) in [
        ("the rules", &rules_text, 8),
        ("the Grafana dashboard", &dashboard_text, 25),
    ] {
        let named = metric_names(text);
        assert!(named.len() >= at_least, "{what}: {named:?}");
        let missing: Vec<&String> = (named.iter())
            .filter(|name| !exported.contains(&name.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "{what} name series no service exports: {missing:?}"
        );
    }
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn events_deleted_by_retention_before_they_were_counted_are_reported_not_skipped_quietly() {
    let _servers = harness::shared();
    let aggregator_port = common::free_port();
    let p = Pipeline::new(
        "retention",
        3_000,
        10,
        &format!(
            "[aggregator]\nmetrics_listen = \"127.0.0.1:{aggregator_port}\"\ncommit_interval = \"100ms\"\n"
        ),
    );
    // The month reaches Kafka while no aggregator runs, and retention takes the first
    // half of partition 0 before one starts.
    p.produce(&p.lines());
    let (oldest, next) = p.event_offsets(0);
    assert!(next - oldest > 10, "partition 0 holds events");
    let cut = oldest + (next - oldest) / 2;
    assert_eq!(p.delete_events_before(0, cut), cut);
    let lost = (cut - oldest) as f64;

    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    // What is billed is what the topic still holds, and what it no longer holds is
    // counted and logged as never billed.
    let held: Vec<Vec<u8>> = p
        .read_topic("events")
        .into_iter()
        .map(|(payload, _)| payload)
        .collect();
    let expected = p.expected_for(&held, p.period);
    assert_ne!(expected, p.expected(), "the deleted events were billable");
    p.wait_for(&expected, Duration::from_secs(120));
    assert_eq!(
        harness::metric(
            aggregator_port,
            "tally_aggregator_events_lost_to_retention_total"
        ),
        Some(lost)
    );
    let log = p.log("agg-a");
    assert!(
        log.contains("were deleted by the topic's retention before they were counted"),
        "{log}"
    );
}

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn a_changelog_lost_with_events_retention_deleted_stops_the_aggregator_until_accepted() {
    let _servers = harness::shared();
    let aggregator_port = common::free_port();
    let p = Pipeline::new(
        "lost_state",
        3_000,
        10,
        &format!(
            "[aggregator]\nmetrics_listen = \"127.0.0.1:{aggregator_port}\"\ncommit_interval = \"100ms\"\n"
        ),
    );
    p.produce(&p.lines());
    p.start("aggregator", "agg-a");
    p.start("rater", "rater-a");
    let billed = p.expected();
    p.wait_for(&billed, Duration::from_secs(120));
    p.stop("agg-a");

    // The changelog goes (the topic deleted, a broker's log lost), and so does the
    // first half of partition 0's events, counted and billed (retention).
    p.delete_topic("aggregator-changelog");
    let (oldest, next) = p.event_offsets(0);
    let cut = oldest + (next - oldest) / 2;
    assert_eq!(p.delete_events_before(0, cut), cut);
    let held: Vec<Vec<u8>> = (p.read_topic("events").into_iter())
        .map(|(payload, _)| payload)
        .collect();
    let lowered = p.expected_for(&held, p.period);
    assert_ne!(lowered, billed, "the deleted events were billed");

    // Counted on, partition 0 would lower its customers' lines: the aggregator stops
    // instead, naming the way out, and the lines stay as billed.
    p.start("aggregator", "agg-b");
    let (status, log) = p.wait_exit("agg-b", Duration::from_secs(120));
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("the state of") && log.contains("[0] cannot be rebuilt"),
        "{log}"
    );
    assert!(log.contains("accept_lost_state = true"), "{log}");
    assert_eq!(p.invoice_lines(), billed);

    // Accepted by the operator: counted on from the oldest event held, the loss
    // counted for finance.
    let config = std::fs::read_to_string(&p.config).unwrap();
    let accepting = edited(
        &config,
        "commit_interval = \"100ms\"\n",
        "commit_interval = \"100ms\"\naccept_lost_state = true\n",
    );
    std::fs::write(&p.config, accepting).unwrap();
    p.start("aggregator", "agg-c");
    p.wait_for(&lowered, Duration::from_secs(120));
    assert_eq!(
        harness::metric(
            aggregator_port,
            "tally_aggregator_events_lost_to_retention_total"
        ),
        Some((cut - oldest) as f64)
    );
    p.assert_logged("agg-c", "as [aggregator] accept_lost_state says");
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

#[test]
#[ignore = "needs Kafka and ClickHouse: scripts/services/up.sh kafka clickhouse"]
fn serve_all_whose_rater_cannot_listen_stops_the_started_aggregator_and_exits_with_the_error() {
    let _servers = harness::shared();
    // The rater's metrics port is taken; the aggregator starts before the rater binds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let p = Pipeline::new(
        "taken_port",
        100,
        2,
        &format!(
            "[aggregator]\nmetrics_listen = \"127.0.0.1:0\"\n[rater]\nmetrics_listen = \"127.0.0.1:{port}\"\n"
        ),
    );
    p.start("all", "all-a");
    let (status, log) = p.wait_exit("all-a", Duration::from_secs(60));
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "cannot listen on 127.0.0.1:{port} for rater metrics"
        )),
        "{log}"
    );
    drop(taken);
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
