//! The files in examples/ rate to the figures the README shows, `tally explain` and
//! `tally reconcile` print what the README shows of them, and the alerting rules in
//! deploy/ pass their tests.

use std::path::Path;
use std::process::Command;

#[test]
fn the_example_invoice_is_explained_as_the_readme_shows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .current_dir(&root)
        .args([
            "explain",
            "--config",
            "examples/tally.toml",
            "--events",
            "examples/events.jsonl",
            "--period",
            "2026-11",
            "--customer",
            "cust_acme",
            "--now",
            "2026-12-15T00:00:00Z",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let explained = String::from_utf8(output.stdout).unwrap();
    // The worked figures of the rate test below: the 49 platform fee with 12.5 % off
    // (6.125 rounds half up), and 1751 started packages of gpt-x tokens.
    for figure in [
        "  discount  12.5 % of 49.00 = 6.125, rounded half_up = 6.13\n",
        "1750000.5 / 1000 = 1750.0005 -> 1751 packages\n",
        "  meter tokens model = llama-z: 9000\n",
        "total 46.37 usd (42.87 + 3.50)\n",
    ] {
        assert!(explained.contains(figure), "{figure:?} in:\n{explained}");
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("```text\n{explained}```")),
        "the README shows this output of `tally explain`:\n{explained}"
    );
}

#[test]
fn the_example_reconciliation_with_another_biller_is_as_the_readme_shows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let tally = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    // The README's commands, run from a copy of the repository's examples/.
    std::fs::create_dir(dir.path().join("examples")).unwrap();
    for file in ["tally.toml", "events.jsonl", "old-biller.csv"] {
        let example = Path::new("examples").join(file);
        std::fs::copy(root.join(&example), dir.path().join(&example)).unwrap();
    }
    let rated = tally(&[
        "rate",
        "--config",
        "examples/tally.toml",
        "--events",
        "examples/events.jsonl",
        "--period",
        "2026-11",
        "--now",
        "2026-12-15T00:00:00Z",
        "--format",
        "json",
        "--output",
        "lines.jsonl",
    ]);
    assert!(
        rated.status.success(),
        "{}",
        String::from_utf8_lossy(&rated.stderr)
    );
    let reconciled = tally(&[
        "reconcile",
        "--period",
        "2026-11",
        "examples/old-biller.csv",
        "lines.jsonl",
    ]);
    // The old biller rounded the discount's tie half to even: a cent apart.
    assert_eq!(reconciled.status.code(), Some(1));
    let report = String::from_utf8(reconciled.stdout).unwrap();
    assert!(
        report.contains("  cust_acme  resolutions  amount  2                  2                42.88 usd        42.87 usd      -0.01 usd\n"),
        "{report}"
    );
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("```text\n{report}```")),
        "the README shows this output of `tally reconcile`:\n{report}"
    );
}

#[test]
fn the_example_price_book_rates_the_example_events_as_the_readme_shows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .current_dir(dir.path())
        .args([
            "rate",
            "--period",
            "2026-11",
            "--now",
            "2026-12-15T00:00:00Z",
            "--config",
        ])
        .arg(root.join("examples/tally.toml"))
        .arg("--events")
        .arg(root.join("examples/events.jsonl"))
        .arg("--summary")
        .arg(&summary)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8(output.stdout).unwrap();
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|r: &Vec<&str>| {
            r.first()
                .is_some_and(|c| ["resolutions", "gpt-tokens", "total"].contains(c))
        })
        .collect();
    assert_eq!(
        rows,
        [
            // 2 resolutions: the 49 platform fee, 12.5 % off (6.125 rounds half up).
            vec![
                "resolutions",
                "resolutions",
                "2",
                "49.00",
                "6.13",
                "42.87",
                "usd"
            ],
            // 1,750,000.5 gpt-x tokens: 1751 started packages of 1000 at 0.002.
            vec![
                "gpt-tokens",
                "tokens",
                "1750000.5",
                "3.50",
                "0.00",
                "3.50",
                "usd"
            ],
            vec!["total", "46.37", "usd"],
        ]
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(summary).unwrap()).unwrap();
    let counts: Vec<u64> = [
        "events_read",
        "accepted",
        "duplicates",
        "conflicts",
        "rejected",
        "outside_period",
    ]
    .iter()
    .map(|k| summary[k].as_u64().unwrap())
    .collect();
    assert_eq!(counts, [10, 5, 1, 1, 1, 1]);
    assert_eq!(summary["unknown_customers"]["cust_trial"], 1);
    assert_eq!(summary["unpriced_usage"][0]["quantity"], "9000");
    let rejects = std::fs::read_to_string(dir.path().join("rejects.jsonl")).unwrap();
    let kept: Vec<&str> = rejects.lines().collect();
    assert_eq!(kept.len(), 2, "{rejects}");
    assert!(
        kept[0].starts_with(r#"{"line":4,"field":"id","code":"conflict""#),
        "{rejects}"
    );
    assert!(
        kept[1].starts_with(r#"{"line":8,"field":"data.tokens","code":"negative_value""#),
        "{rejects}"
    );
}

/// The alerting rules users get fire as their tests say. promtool comes with Debian's
/// prometheus package, which `scripts/services/up.sh prometheus` installs.
#[test]
#[ignore = "needs promtool: scripts/services/up.sh prometheus"]
fn the_alerting_rules_fire_as_their_tests_say() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let output = Command::new("promtool")
            .current_dir(&rules)
            .args(args)
            .output()
            .expect("promtool: scripts/services/up.sh prometheus installs it");
        assert!(
            output.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// docker-compose.yml's deployment cannot run here (no Docker engine), but its
/// tally.toml must pass the validation every service runs at start, with the
/// environment the compose file gives the services (its `x-tally` block, defaults
/// substituted as compose does when the variables are unset).
#[test]
fn the_compose_deployments_configuration_is_valid_with_the_environment_compose_sets() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let block = compose
        .split_once("  environment: &tally-env\n")
        .expect("docker-compose.yml has the x-tally environment block")
        .1;
    let environment: Vec<(&str, &str)> = block
        .lines()
        .take_while(|line| line.starts_with("    "))
        .map(|line| {
            let (name, value) = line.trim().split_once(": ").unwrap();
            // `${NAME:-default}` is its default when NAME is unset.
            let value = match value.strip_prefix("${") {
                Some(variable) => variable.split_once(":-").unwrap().1.trim_end_matches('}'),
                None => value,
            };
            (name, value)
        })
        .collect();
    assert!(
        environment.iter().any(|(name, _)| *name == "TALLY_API_KEY"),
        "{environment:?}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .current_dir(&root)
        .args(["validate", "--config", "deploy/compose/tally.toml"])
        .env_clear()
        .envs(environment)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        shown.contains("services: Kafka kafka:29092 (topics tally.*), ClickHouse http://clickhouse:8123 database tally, ingest on 0.0.0.0:9101 with 1 API key"),
        "{shown}"
    );
    assert!(!shown.contains("warning"), "{shown}");
}
