//! `tally reconcile`: two sets of one month's invoice lines compared line by line, for
//! finance running two billing systems side by side while customers move over, or
//! checking the streaming pipeline against a batch run of the same events.
//!
//! In: two sources of lines, each a file (JSON lines as `tally rate --format json`
//! writes them, or CSV with a header row, as `--format csv` writes them or another
//! biller exports them) or a ClickHouse database's `invoice_lines`, the other biller's
//! customer and price ids translated by an optional map (`--map`), and optionally only
//! the customers one source bills (`--customers`: the cohort still on the other biller).
//! Lines are matched on (customer, price, the closed month an adjustment is for). Out:
//! the lines whose quantity, amount or currency differ, the lines only one source has,
//! the invoices (a customer's lines in one currency) and currencies whose totals
//! differ; the exit status says whether they agree.
//!
//! A source is read by [`files`] (or from ClickHouse here) into [`lines::Lines`],
//! renamed by [`map`], and the two are compared and reported by [`report`].

mod files;
mod lines;
mod map;
mod report;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use tally_schemas::time::Period;

use crate::report::counted;
use crate::ConfiguredClickHouse;
use files::{column_name, read_file, ColumnNames};
use lines::Lines;
use map::IdMap;
use report::Reconciliation;

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The month whose lines to compare, e.g. 2026-11. Lines of other months in a file
    /// (by its `period_start`) are left out and counted.
    #[arg(long)]
    period: Period,
    /// The reference lines (the biller customers were invoiced by, say): a file (JSON
    /// lines when it starts with `{`, otherwise CSV; `-` reads stdin), `clickhouse` (the
    /// `invoice_lines` of the configuration's `[clickhouse]` database) or
    /// `clickhouse:DATABASE` (another database on that server, e.g. `tally_batch`).
    expected: String,
    /// The lines to check against them, in the same forms.
    actual: String,
    /// The configuration whose `[clickhouse]` section (with its environment overrides)
    /// a `clickhouse` source reads; only read for one.
    #[arg(long, default_value = "tally.toml")]
    config: PathBuf,
    /// Also write every line that does not agree to this CSV file.
    #[arg(long, value_name = "PATH")]
    differences: Option<PathBuf>,
    /// The other biller's customer and price ids as Tally's: a CSV file with the header
    /// `kind,from,to` (`kind` is `customer` or `price`), applied to the source
    /// `--map-applies-to` names. Lines the map gives one customer and price are added
    /// together.
    #[arg(long, value_name = "PATH")]
    map: Option<PathBuf>,
    /// The source whose ids `--map` translates: the other biller's. Only that one, so
    /// that a Tally id that happens to be one of the other biller's is left alone.
    #[arg(long, value_enum, default_value = "expected", requires = "map")]
    map_applies_to: Side,
    /// Which customers to compare: all, or only those with lines in `expected`, in
    /// `actual`, or in `both` (a cohort still on the other biller, say); the others'
    /// lines are left out and counted.
    #[arg(long, value_enum, default_value = "all")]
    customers: CustomerScope,
    /// Leave out adjustment lines (late usage of an earlier month, billed in this one)
    /// on both sides, and count them: to compare the streaming pipeline's month with
    /// `tally rate` of it, which bills late usage in its own month instead.
    #[arg(long)]
    without_adjustments: bool,
    /// The month as `tally rate` bills it, late usage included: leave out adjustment
    /// lines of earlier months on both sides, and add to a `clickhouse` source's lines
    /// of the month the adjustments of it the pipeline billed in later months (its
    /// usage that arrived after it closed).
    #[arg(long, conflicts_with = "without_adjustments")]
    with_later_adjustments: bool,
    /// Compare amounts and currencies only, not quantities: for a biller whose
    /// quantities count something else (a platform fee as 1, a discount as a line of
    /// its own). Quantities are still shown.
    #[arg(long)]
    amounts_only: bool,
    /// Read a CSV file's column HEADER as Tally's column NAME (customer, price,
    /// quantity, amount, currency, period_start, adjusts_period, invoice, subtotal or
    /// discount), or `ignore` to leave it out, e.g. `--column period_start=billing_month
    /// --column amount="Net Amount"`; repeat for each. Headers match whatever their
    /// case.
    #[arg(long = "column", value_name = "NAME=HEADER", value_parser = column_name)]
    columns: Vec<(String, String)>,
}

/// What two lines of one customer and price must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compared {
    QuantitiesAndAmounts,
    Amounts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Side {
    Expected,
    Actual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CustomerScope {
    All,
    Expected,
    Actual,
    Both,
}

/// Compares the two sources and prints the report; `Ok(false)` when they differ.
pub fn run(args: &ReconcileArgs) -> anyhow::Result<bool> {
    let map = match &args.map {
        Some(path) => IdMap::read(path)?,
        None => IdMap::default(),
    };
    let columns = ColumnNames(args.columns.clone());
    let read = |source| read_source(source, args, &columns);
    let (mut expected, mut actual) = (read(&args.expected)?, read(&args.actual)?);
    ensure_columns_found(&args.columns, [&expected, &actual])?;
    ensure_something_to_compare(args.period, [&expected, &actual])?;
    match args.map_applies_to {
        Side::Expected => expected = expected.renamed(&map)?,
        Side::Actual => actual = actual.renamed(&map)?,
    }
    if args.without_adjustments {
        expected.leave_out_adjustments();
        actual.leave_out_adjustments();
    }
    keep_customers(args.customers, &mut expected, &mut actual)?;
    let compared = match args.amounts_only {
        true => Compared::Amounts,
        false => Compared::QuantitiesAndAmounts,
    };
    let reconciliation = Reconciliation::of(&expected, &actual, compared)?;
    let mut out = io::stdout().lock();
    reconciliation.write_report(&mut out, args.period, &expected, &actual)?;
    out.flush()?;
    if let Some(path) = &args.differences {
        let mut file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        reconciliation
            .write_differences(&mut file)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(reconciliation.agrees())
}

/// Narrows both sources to the customers `scope` names; none is an error, as
/// nothing would be compared.
fn keep_customers(
    scope: CustomerScope,
    expected: &mut Lines,
    actual: &mut Lines,
) -> anyhow::Result<()> {
    let compared = match scope {
        CustomerScope::All => return Ok(()),
        CustomerScope::Expected => expected.customers(),
        CustomerScope::Actual => actual.customers(),
        CustomerScope::Both => (expected.customers())
            .intersection(&actual.customers())
            .cloned()
            .collect(),
    };
    if compared.is_empty() {
        let some = |lines: &Lines| {
            let customers = lines.customers();
            format!(
                "{} has {} ({})",
                lines.name,
                counted(customers.len(), "customer"),
                listed(&customers)
            )
        };
        bail!(
            "no customer has lines in both sources, so nothing would be compared: {}, {}. Do the two name customers differently? --map translates the other biller's ids",
            some(expected),
            some(actual)
        );
    }
    expected.keep_customers(&compared);
    actual.keep_customers(&compared);
    Ok(())
}

/// Up to five of `names`, then how many more.
fn listed(names: &BTreeSet<String>) -> String {
    const SHOWN: usize = 5;
    let shown: Vec<&str> = names.iter().take(SHOWN).map(String::as_str).collect();
    match names.len().saturating_sub(SHOWN) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

fn read_source(source: &str, args: &ReconcileArgs, columns: &ColumnNames) -> anyhow::Result<Lines> {
    let mut lines = match source.strip_prefix("clickhouse") {
        Some(rest) if rest.is_empty() || rest.starts_with(':') => {
            read_clickhouse(rest.strip_prefix(':'), args)?
        }
        _ => read_file(source, args.period, columns)?,
    };
    if args.with_later_adjustments {
        lines.leave_out_adjustments();
    }
    Ok(lines)
}

/// Refuses a `--column` whose header no CSV source has: a mistyped header would
/// leave the column it names read from the file's own column of that name, or not at
/// all (a month, say), without a word.
fn ensure_columns_found(columns: &[(String, String)], sources: [&Lines; 2]) -> anyhow::Result<()> {
    let csv: Vec<&Lines> = (sources.into_iter())
        .filter(|lines| !lines.csv_headers.is_empty())
        .collect();
    for (name, header) in columns {
        if csv.iter().any(|lines| lines.csv_headers.contains(header)) {
            continue;
        }
        let headers: Vec<String> = (csv.iter())
            .map(|lines| format!("{} has {}", lines.name, lines.csv_headers.join(", ")))
            .collect();
        bail!(
            "--column {name}={header}: no CSV source has a column {header:?} ({}); check the header's spelling",
            match headers.is_empty() {
                true => "neither source is a CSV file".to_owned(),
                false => headers.join("; "),
            }
        );
    }
    Ok(())
}

/// Refuses to compare nothing, which would "agree": a source with lines of other
/// months only (a mistyped `--period`), or two sources without a line of the month.
/// One empty source is fine: a biller that leaves out zero lines may bill nothing.
fn ensure_something_to_compare(period: Period, sources: [&Lines; 2]) -> anyhow::Result<()> {
    for lines in sources {
        if lines.by_key.is_empty() && lines.other_periods > 0 {
            bail!(
                "{} has no line of {period} (only {} of other months): is --period right?",
                lines.name,
                counted(lines.other_periods, "line")
            );
        }
    }
    if sources.iter().all(|lines| lines.by_key.is_empty()) {
        bail!(
            "neither {} nor {} has a line of {period}, so nothing would be compared: is --period right, and are these the sources you meant?",
            sources[0].name,
            sources[1].name
        );
    }
    Ok(())
}

/// The current lines billed in `period` of `invoice_lines`, in the configuration's
/// database or `database` on the same server; with `--with-later-adjustments`, the
/// period's adjustments billed in later months added to them.
fn read_clickhouse(database: Option<&str>, args: &ReconcileArgs) -> anyhow::Result<Lines> {
    let (config, period) = (&args.config, args.period);
    let store = ConfiguredClickHouse::of(&crate::load_config(config)?, config, database)?;
    let place = format!("{}.invoice_lines at {}", store.database, store.url);
    let mut lines = Lines::named(format!("ClickHouse {place}"));
    for line in store.client.lines(period, None)? {
        let at = format!("{place}, line {}", line.id);
        lines.add_invoice_line(line, at)?;
    }
    let later = store.client.adjustments_of(period, None)?;
    if !args.with_later_adjustments {
        // Said, as a line of the month that differs from `tally rate`'s by its late
        // usage reads like a difference in pricing.
        lines.later_adjustments_not_added = later.len();
        return Ok(lines);
    }
    for line in later {
        let at = format!(
            "{place}, line {} of {}",
            line.id,
            line.period_start.format("%Y-%m")
        );
        lines.add_later_adjustment(line, at)?;
    }
    Ok(lines)
}
