//! The aggregator through crashes, rebalances, a frozen process, a broker restart,
//! a lost changelog and retention: totals stay exact, or it stops and says why.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{self, Pipeline};
use crate::{common, edited, resolution_each, with_duplicates, Restart};

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
