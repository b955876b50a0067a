//! `tally demo` and `tally generate`.
//!
//! `demo` writes a configuration and a realistic month of AI usage into a folder, runs
//! it through the embedded pipeline (the same stages as the Kafka services), checks the
//! result against `tally rate` on the same file, and shows finance what came out and
//! where it is.

pub(crate) mod generate;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context};
use chrono::{DateTime, Utc};
use clap::Args;
use rust_decimal::Decimal;
use tally_schemas::config::{Config, Customer};
use tally_schemas::event::Problem;
use tally_schemas::records::InvoiceLine;
use tally_schemas::time::Period;

use crate::batch::{rate_events, BatchOptions, BatchResult};
use crate::embedded::{self, store::Store, PipelineRun};
use crate::explain::{write_explanation, Explanation};
use crate::report::{counted, write_csv, Totals};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder for the demo's files; created if missing.
    #[arg(long, default_value = "tally-demo")]
    dir: PathBuf,
    /// Events to generate.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Customers in the configuration.
    #[arg(long, default_value_t = 400)]
    customers: u32,
    /// The month to simulate; default: last month.
    #[arg(long)]
    period: Option<Period>,
    #[arg(long, default_value_t = 2026)]
    seed: u64,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Where to write the events (JSON lines).
    #[arg(long)]
    out: PathBuf,
    /// Where to write the configuration that prices them.
    #[arg(long)]
    config_out: PathBuf,
    /// How many events to write (retries, conflicts and late events included).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// How many customers, spread over four plans in usd, eur and jpy.
    #[arg(long, default_value_t = 400)]
    customers: u32,
    /// The month the events fall in, as YYYY-MM (a few late ones arrive after it).
    #[arg(long, value_name = "YYYY-MM")]
    period: Period,
    /// The same seed writes the same events.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// Malformed lines to mix in.
    #[arg(long, default_value_t = 0)]
    malformed: u64,
}

pub fn generate_command(args: GenerateArgs) -> anyhow::Result<()> {
    let spec = generate::Spec {
        period: args.period,
        events: args.events,
        customers: args.customers,
        seed: args.seed,
        malformed: args.malformed,
    };
    let made = write_month(spec, &args.config_out, &args.out, |_| {})?;
    eprintln!("wrote {} to {}", made.describe(), args.out.display());
    Ok(())
}

/// Writes the configuration and the generated events for `spec`.
fn write_month(
    spec: generate::Spec,
    config_path: &Path,
    events_path: &Path,
    progress: impl FnMut(u64),
) -> anyhow::Result<generate::Generated> {
    std::fs::write(config_path, generate::config_toml(spec.customers))
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, create(events_path)?);
    let made = generate::generate(spec, &mut out, progress)?;
    out.flush()
        .with_context(|| format!("cannot write {}", events_path.display()))?;
    Ok(made)
}

fn create(path: &Path) -> anyhow::Result<File> {
    File::create(path).with_context(|| format!("cannot create {}", path.display()))
}

fn last_month() -> Period {
    Period::containing(Period::containing(Utc::now()).start() - chrono::Duration::days(1))
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let period = args.period.unwrap_or_else(last_month);
    ensure!(
        args.events >= 1000,
        "--events must be at least 1000 for a meaningful month"
    );
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let path = |name: &str| args.dir.join(name);
    let started = Instant::now();

    println!("Tally demo: one month ({period}) of usage for an AI support product\n");
    let config_path = path("tally.toml");
    let events_path = path("events.jsonl");
    let spec = generate::Spec {
        period,
        events: args.events,
        customers: args.customers,
        seed: args.seed,
        malformed: 24,
    };
    let made = write_month(spec, &config_path, &events_path, |n| {
        eprint!("\r    generating events: {n} / {}", args.events);
    })?;
    eprint!("\r");
    let config = Arc::new(Config::load(&config_path)?);
    println!(
        "1/4 configuration: {}, {} in usd, eur and jpy, {} -> {}",
        counted(config.meters.len(), "meter"),
        counted(config.plans.len(), "plan"),
        counted(config.customers.len(), "customer"),
        config_path.display()
    );
    println!(
        "2/4 events: {} -> {}",
        made.describe(),
        events_path.display()
    );

    let input = std::fs::read(&events_path)?;
    let db_path = path("tally.db");
    for stale in ["tally.db", "tally.db-wal", "tally.db-shm"] {
        let _ = std::fs::remove_file(path(stale));
    }
    let mut store = Store::open(&db_path)?;
    let now = Utc::now();
    let pipeline_started = Instant::now();
    let total = made.lines;
    let run = embedded::run(&config, &input, period, now, &mut store, |n| {
        if n % 100_000 < 4096 {
            eprint!("\r    pipeline: {n} / {total} events through ingest -> aggregator -> rater");
        }
    })?;
    eprint!("\r{:80}\r", "");
    let elapsed = pipeline_started.elapsed();
    println!(
        "3/4 pipeline: {} events in {:.1?} ({} window updates, {} line revisions) -> {}",
        run.summary.events_read,
        elapsed,
        run.window_updates,
        run.line_revisions,
        db_path.display()
    );
    print!("{}", indent(&run.summary.render()));

    let lines: Vec<InvoiceLine> = run.lines.iter().map(|r| r.line.clone()).collect();
    write_results(&args.dir, &lines, &run)?;
    let totals = Totals::of(&lines)?;
    let largest = largest_invoices(&totals);
    // Worked through below: the largest invoice in usd, or in any currency.
    let walkthrough = (largest.get("usd").or_else(|| largest.values().next()))
        .and_then(|(customer, _, _)| config.customers.get(*customer));

    let batch = check_against_batch(&config, &input, period, now, walkthrough, &lines)?;
    println!(
        "4/4 check: `tally rate --period {period}` on the same file gives the same {} lines, to the cent\n",
        lines.len()
    );

    show_invoices(&totals, &largest, config.customers.len());
    if let Some(customer) = walkthrough {
        show_walkthrough(&config, period, customer, &events_path, &batch)?;
    }
    show_rejects(&run.rejects, &path(REJECTS));
    show_where_the_data_is(&args.dir, period);
    println!("\nDone in {:.1?}.", started.elapsed());
    Ok(())
}

/// Rates the same events with `tally rate`'s batch path, which must give the lines the
/// streaming stages gave, to the cent; `explained` is the customer whose events the
/// result keeps for an explanation.
fn check_against_batch(
    config: &Arc<Config>,
    input: &[u8],
    period: Period,
    now: DateTime<Utc>,
    explained: Option<&Customer>,
    lines: &[InvoiceLine],
) -> anyhow::Result<BatchResult> {
    let batch = rate_events(
        config,
        input,
        &BatchOptions {
            period,
            now,
            workers: crate::default_threads(),
            strict: false,
            explained_customer: explained.map(|customer| customer.id.clone()),
            keep_counted_events: false,
        },
        |_| Ok(()),
    )?;
    ensure!(
        batch.lines == lines,
        "the embedded pipeline and `tally rate` disagree; this is a bug, please report it"
    );
    Ok(batch)
}

/// Prints how `customer`'s invoice adds up, as `tally explain` would.
fn show_walkthrough(
    config: &Config,
    period: Period,
    customer: &Customer,
    events_path: &Path,
    batch: &BatchResult,
) -> anyhow::Result<()> {
    let name = events_path.display().to_string();
    let explanation = Explanation::of_batch(config, period, customer, &name, batch, None)?;
    let mut text = Vec::new();
    write_explanation(&mut text, &explanation)?;
    println!("  How {}'s invoice adds up (`tally explain`):", customer.id);
    print!("{}", indent(&String::from_utf8_lossy(&text)));
    println!();
    Ok(())
}

/// The files the demo leaves in its folder, besides tally.toml, events.jsonl and
/// tally.db.
const LINES_CSV: &str = "invoice_lines.csv";
const REJECTS: &str = "rejects.jsonl";
const SUMMARY: &str = "summary.json";

fn write_results(dir: &Path, lines: &[InvoiceLine], run: &PipelineRun) -> anyhow::Result<()> {
    let mut csv = BufWriter::new(create(&dir.join(LINES_CSV))?);
    write_csv(lines, &mut csv)?;
    csv.flush()?;
    std::fs::write(
        dir.join(SUMMARY),
        serde_json::to_string_pretty(&run.summary)?,
    )?;
    let mut rejects = BufWriter::new(create(&dir.join(REJECTS))?);
    for r in &run.rejects {
        writeln!(rejects, "{}", r.to_json())?;
    }
    rejects.flush()?;
    Ok(())
}

fn show_where_the_data_is(dir: &Path, period: Period) {
    let shown = |name: &str| dir.join(name).display().to_string();
    let db = shown("tally.db");
    println!("Where the data is:");
    println!(
        "  {}  invoice lines (one per customer and price), with tier breakdowns",
        shown(LINES_CSV)
    );
    println!(
        "  {}  rejected lines with line number, field and reason",
        shown(REJECTS)
    );
    println!(
        "  {db}  SQLite: tables window_usage, rated_lines (every revision), runs; view invoice_lines (the latest finished run's)"
    );
    println!(
        "  {}  where every event went, unbilled usage included",
        shown(SUMMARY)
    );
    let start = tally_schemas::time::rfc3339(period.start());
    println!("\nQuery it, for example (amount_minor is the amount in cents, or yen):");
    println!(
        "  sqlite3 {db} \"SELECT currency, SUM(amount_minor) FROM invoice_lines WHERE period_start = '{start}' GROUP BY currency\""
    );
    println!(
        "  python3 -c \"import sqlite3; print(sqlite3.connect('{db}').execute('SELECT customer, price, quantity, amount, currency FROM invoice_lines WHERE period_start = ? LIMIT 5', ['{start}']).fetchall())\""
    );
    let tally = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("tally"));
    println!(
        "  {} rate --config {} --events {} --period {period} --format table",
        tally.display(),
        shown("tally.toml"),
        shown("events.jsonl")
    );
    println!(
        "  {} explain --config {} --events {} --period {period} --customer <id>",
        tally.display(),
        shown("tally.toml"),
        shown("events.jsonl")
    );
    println!(
        "  {} reconcile --period {period} <another biller's export.csv> {}",
        tally.display(),
        shown(LINES_CSV)
    );
}

fn indent(text: &str) -> String {
    (text.lines())
        .map(|l| match l {
            "" => "\n".to_owned(),
            l => format!("    {l}\n"),
        })
        .collect()
}

/// Each currency's largest invoice: customer, plan and total (the first customer of
/// equal ones).
fn largest_invoices<'a>(totals: &Totals<'a>) -> BTreeMap<&'a str, (&'a str, &'a str, Decimal)> {
    let mut largest: BTreeMap<&str, (&str, &str, Decimal)> = BTreeMap::new();
    for (&(currency, customer, plan), &total) in &totals.per_customer {
        let entry = largest.entry(currency).or_insert((customer, plan, total));
        if total > entry.2 {
            *entry = (customer, plan, total);
        }
    }
    largest
}

fn show_invoices(
    totals: &Totals<'_>,
    largest: &BTreeMap<&str, (&str, &str, Decimal)>,
    customers: usize,
) {
    println!("Invoices ({customers} customers):");
    println!("  {:<10} {:>18} {:>10}", "currency", "total", "customers");
    for (currency, (total, customers)) in &totals.per_currency {
        println!("  {currency:<10} {:>18} {customers:>10}", total.to_string());
    }
    println!("\n  Largest invoice per currency:");
    println!("  {:<12} {:<14} {:>16}", "customer", "plan", "total");
    for (currency, (customer, plan, total)) in largest {
        println!(
            "  {customer:<12} {plan:<14} {:>12} {currency}",
            total.to_string()
        );
    }
    println!();
}

fn show_rejects(rejects: &[tally_ingest::LineReject], path: &Path) {
    // The summary counts conflicting resends apart from the rejected; the file has both.
    let conflicts = (rejects.iter())
        .filter(|r| r.error.problem == Problem::Conflict)
        .count();
    println!(
        "Rejected lines ({} and {}, all kept in {}):",
        counted(rejects.len() - conflicts, "rejected line"),
        counted(conflicts, "conflicting resend"),
        path.display()
    );
    for r in rejects.iter().take(8) {
        println!("  line {}: {}", r.line, r.error);
    }
    if rejects.len() > 8 {
        println!("  ... {} more", rejects.len() - 8);
    }
    println!();
}
