//! Deploying and watching it: a wrong partition count or a mistyped prefix, a
//! partition added, state of fewer partitions, `serve all` failing to listen, a
//! crowded line named, and Prometheus scraping every service.

use std::time::Duration;

use crate::harness::{self, Pipeline};
use crate::{common, edited, resolution};

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
