//! The pipeline bills what `tally rate` bills for the same events: sent to Kafka, over
//! HTTP, with poison mixed in, replayed from the earliest offset, in Kafka
//! transactions, and explained line by line as `tally explain` explains them.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::harness::{self, Pipeline};
use crate::{
    assert_windows_add_up_to_lines, common, customers, line_for, poison, rejection_code,
    resolution, resolution_each, NEEDS,
};

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
    let customer = "cust_00001";
    let home = harness::partition_of(customer);
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
        .find(|c| harness::partition_of(c) == elsewhere)
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
