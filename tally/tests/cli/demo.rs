//! `tally demo`: its files, and its store agreeing with its CSV.

use super::*;

#[test]
fn the_demo_writes_its_files_and_its_store_agrees_with_its_csv() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let run = |seed: &str| -> Run {
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["demo", "--events", "5000", "--customers", "12"])
            .args(["--period", "2026-10", "--seed", seed])
            .arg("--dir")
            .arg(&demo)
            .output()
            .unwrap()
            .into()
    };
    let first = run("1").succeeded();
    assert!(
        first
            .stdout
            .contains("4/4 check: `tally rate --period 2026-10` on the same file"),
        "{}",
        first.stdout
    );
    for file in [
        "tally.toml",
        "events.jsonl",
        "invoice_lines.csv",
        "rejects.jsonl",
        "summary.json",
        "tally.db",
    ] {
        assert!(demo.join(file).is_file(), "{file} missing");
    }
    // It works one invoice through as `tally explain` does on its files.
    let (_, rest) = first.stdout.split_once("  How ").unwrap();
    let (customer, _) = rest.split_once("'s invoice adds up").unwrap();
    let explained: Run = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["explain", "--period", "2026-10", "--customer", customer])
        .arg("--config")
        .arg(demo.join("tally.toml"))
        .arg("--events")
        .arg(demo.join("events.jsonl"))
        .output()
        .unwrap()
        .into();
    let indented: String = (explained.succeeded().stdout.lines())
        .map(|l| match l {
            "" => "\n".to_owned(),
            l => format!("    {l}\n"),
        })
        .collect();
    assert!(
        first.stdout.contains(&indented),
        "{indented}\nin:\n{}",
        first.stdout
    );
    // The CSV has a header line.
    let csv_lines = || {
        let csv = std::fs::read_to_string(demo.join("invoice_lines.csv")).unwrap();
        i64::try_from(csv.lines().count() - 1).unwrap()
    };
    let stored = || -> i64 {
        rusqlite::Connection::open(demo.join("tally.db"))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM invoice_lines", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(stored(), csv_lines());
    let rejected = std::fs::read_to_string(demo.join("rejects.jsonl")).unwrap();
    assert_eq!(
        rejected.lines().count(),
        24,
        "the demo mixes in 24 bad lines"
    );

    // Run again in the same folder: a fresh store, not one run on top of another.
    run("2").succeeded();
    assert_eq!(stored(), csv_lines());
    let runs: i64 = rusqlite::Connection::open(demo.join("tally.db"))
        .unwrap()
        .query_row("SELECT COUNT(*) FROM runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(runs, 1);
}
