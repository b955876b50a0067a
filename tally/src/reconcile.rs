//! `tally reconcile`: two sets of one month's invoice lines compared line by line, for
//! finance running two billing systems side by side while customers move over, or
//! checking the streaming pipeline against a batch run of the same events.
//!
//! In: two sources of lines, each a file (JSON lines as `tally rate --format json`
//! writes them, or CSV with a header row, as `--format csv` writes them or another
//! biller exports them) or a ClickHouse database's `invoice_lines`, the other biller's
//! customer and price ids translated by an optional map (`--map`), and optionally only
//! the customers one source bills (`--customers`: the cohort still on the other biller).
//! Lines are matched on (customer, price, the closed month an adjustment is for). Out: the lines whose
//! quantity, amount or currency differ, the lines only one source has, the invoices
//! (a customer's lines in one currency) and currencies whose totals differ; the exit
//! status says whether they agree.

use std::collections::{btree_map, BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use clap::Args;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;
use tally_schemas::decimal::{exact_add, parse_exact, ExactSum};
use tally_schemas::money::Currency;
use tally_schemas::records::InvoiceLine;
use tally_schemas::time::Period;

use crate::report::{csv_field, CSV_HEADER};
use crate::ConfiguredClickHouse;

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

/// The name `--column` gives a header to leave its column out unchecked (a cohort's
/// month, say, that is not the line's).
const IGNORED_COLUMN: &str = "ignore";

/// How a CSV file's headers are read: each one `--column` names as Tally's column.
#[derive(Debug, Default)]
struct ColumnNames(Vec<(String, String)>);

impl ColumnNames {
    /// The column a header (lower case, trimmed) is read as.
    fn name_of(&self, header: String) -> String {
        (self.0.iter())
            .find(|(_, their)| *their == header)
            .map_or(header, |(name, _)| name.clone())
    }
}

/// `NAME=HEADER` of `--column`: NAME one of Tally's columns, HEADER kept lower case.
fn column_name(text: &str) -> Result<(String, String), String> {
    let (name, header) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=HEADER"))?;
    let name = name.trim().to_ascii_lowercase();
    if !reads_column(&name) && name != IGNORED_COLUMN {
        return Err(format!(
            "{name:?} is not a column Tally reads; it reads {} and {} (or `{IGNORED_COLUMN}` to leave a column out)",
            REQUIRED_COLUMNS.join(", "),
            OPTIONAL_COLUMNS.join(", ")
        ));
    }
    let header = header.trim().to_ascii_lowercase();
    if header.is_empty() {
        return Err(format!("{text:?} names no header"));
    }
    Ok((name, header))
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
    let mut expected = read_source(&args.expected, args.period, &args.config, &columns)?;
    let mut actual = read_source(&args.actual, args.period, &args.config, &columns)?;
    ensure_something_to_compare(args.period, [&expected, &actual])?;
    match args.map_applies_to {
        Side::Expected => expected = expected.renamed(&map)?,
        Side::Actual => actual = actual.renamed(&map)?,
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

/// What identifies a line across billers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct LineKey {
    customer: String,
    price: String,
    /// The closed month an adjustment line bills late usage of.
    adjusts: Option<Period>,
}

/// What must agree, and where the line was read (for the report).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Figures {
    quantity: Decimal,
    amount: Decimal,
    /// Lowercase ISO 4217, so `USD` and `usd` agree.
    currency: String,
    /// The amount's parts, where the source gives them (Tally's lines do): not compared,
    /// but they tell an amount that differs by its discount alone.
    parts: Option<AmountParts>,
    at: String,
}

/// A line's subtotal and the discount taken off it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AmountParts {
    subtotal: Decimal,
    discount: Decimal,
}

impl Figures {
    fn is_zero(&self, compared: Compared) -> bool {
        (self.quantity.is_zero() || compared == Compared::Amounts) && self.amount.is_zero()
    }

    fn agrees_with(&self, other: &Figures, compared: Compared) -> bool {
        // Decimal equality is by value: 12.5 and 12.50 agree.
        (self.quantity == other.quantity || compared == Compared::Amounts)
            && self.amount == other.amount
            && self.currency == other.currency
    }
}

/// One source's lines of the month.
#[derive(Debug, Default)]
struct Lines {
    /// How the report names the source.
    name: String,
    by_key: BTreeMap<LineKey, Figures>,
    /// Lines of other months, left out.
    other_periods: usize,
    /// Lines the map renamed, and how many of them were added to another.
    mapped: usize,
    /// Lines of prices the map leaves out.
    left_out_by_map: usize,
    added_together: usize,
    /// Lines added to another invoice's line of the same key (a credit note, say).
    netted: usize,
    /// The invoices each key's lines were read from (`None`: a line naming none).
    invoices: BTreeMap<LineKey, BTreeSet<Option<String>>>,
    /// Lines of customers `--customers` leaves out, and those customers.
    other_customers_lines: usize,
    other_customers: BTreeSet<String>,
    /// How a CSV file was read, when not as Tally writes it.
    dialect: Option<Dialect>,
    /// A CSV file's columns that are neither read nor Tally's own.
    ignored_columns: Vec<String>,
    /// Rows naming neither customer nor price (a total row), left out.
    unnamed_rows: usize,
    /// Map entries (`kind id`) that renamed none of the source's lines.
    unused_map_entries: BTreeSet<String>,
}

impl Lines {
    fn named(name: String) -> Self {
        Lines {
            name,
            ..Lines::default()
        }
    }

    /// Adds a line read from `invoice` (when the source names invoices). Lines of one
    /// key from different invoices (a credit note, a second invoice) are added
    /// together: what the month billed is their sum.
    fn add(&mut self, key: LineKey, figures: Figures, invoice: Option<&str>) -> anyhow::Result<()> {
        let invoices = self.invoices.entry(key.clone()).or_default();
        let new_invoice = invoices.insert(invoice.map(str::to_owned));
        let another_invoice = new_invoice && !invoices.contains(&None);
        match self.by_key.entry(key) {
            btree_map::Entry::Vacant(entry) => {
                entry.insert(figures);
            }
            btree_map::Entry::Occupied(entry) if another_invoice => {
                let key = entry.key().clone();
                add_to(entry.into_mut(), figures, &key, "another invoice's line of")?;
                self.netted += 1;
            }
            btree_map::Entry::Occupied(entry) => bail!(
                "{}: a second line for {} (the first is {}); a source has one line per customer and price of the month, or one per invoice when an `invoice` column tells them apart (a credit note, say)",
                figures.at,
                place(entry.key()),
                entry.get().at
            ),
        }
        Ok(())
    }

    /// The lines with their customers and prices as `map` renames them. Lines it
    /// gives one key are added together (another biller's two lines of one Tally
    /// price, say): a source's own keys are unique, so only the map brings lines
    /// together.
    fn renamed(mut self, map: &IdMap) -> anyhow::Result<Lines> {
        let mut used = BTreeSet::new();
        for (mut key, figures) in std::mem::take(&mut self.by_key) {
            // Its customer is renamed all the same, so the entry counts as used.
            let renamed = map.rename(&mut key, &mut used);
            if map.left_out_prices.contains(&key.price) {
                used.insert(format!("price {}", key.price));
                self.left_out_by_map += 1;
                continue;
            }
            self.mapped += usize::from(renamed);
            match self.by_key.entry(key) {
                btree_map::Entry::Vacant(entry) => {
                    entry.insert(figures);
                }
                btree_map::Entry::Occupied(entry) => {
                    let key = entry.key().clone();
                    add_to(
                        entry.into_mut(),
                        figures,
                        &key,
                        "the map makes it a line of",
                    )?;
                    self.added_together += 1;
                }
            }
        }
        self.unused_map_entries = map.entries().filter(|e| !used.contains(e)).collect();
        Ok(self)
    }

    fn add_invoice_line(&mut self, line: InvoiceLine, at: String) -> anyhow::Result<()> {
        let key = LineKey {
            customer: line.customer,
            price: line.price,
            adjusts: line.adjusts_period,
        };
        let figures = Figures {
            quantity: line.quantity,
            amount: line.amount,
            currency: line.currency.to_ascii_lowercase(),
            parts: Some(AmountParts {
                subtotal: line.subtotal,
                discount: line.discount,
            }),
            at,
        };
        self.add(key, figures, None)
    }

    /// How the source was read, and what of it was left out or changed on the way, for
    /// the report.
    fn notes(&self) -> Vec<String> {
        let mut notes: Vec<String> = self.dialect.iter().map(Dialect::describe).collect();
        if self.mapped > 0 {
            let added = match self.added_together {
                0 => String::new(),
                n => format!(", {n} of them added to another line"),
            };
            notes.push(format!(
                "{} renamed by the map{added}",
                count(self.mapped, "line")
            ));
        }
        if self.left_out_by_map > 0 {
            notes.push(format!(
                "{} of prices the map leaves out",
                count(self.left_out_by_map, "line")
            ));
        }
        if self.netted > 0 {
            notes.push(format!(
                "{} added to another invoice's line of the same customer and price",
                count(self.netted, "line")
            ));
        }
        if self.other_periods > 0 {
            notes.push(format!(
                "{} of other months left out",
                count(self.other_periods, "line")
            ));
        }
        if self.unnamed_rows > 0 {
            notes.push(format!(
                "{} naming neither customer nor price (totals) left out",
                count(self.unnamed_rows, "row")
            ));
        }
        if !self.ignored_columns.is_empty() {
            notes.push(format!(
                "columns not read: {}",
                self.ignored_columns.join(", ")
            ));
        }
        if !self.unused_map_entries.is_empty() {
            notes.push(format!(
                "map entries matching none of its lines ({}): {}",
                self.unused_map_entries.len(),
                listed(&self.unused_map_entries)
            ));
        }
        if self.other_customers_lines > 0 {
            notes.push(format!(
                "{} of {} not compared (--customers) left out: {}",
                count(self.other_customers_lines, "line"),
                count(self.other_customers.len(), "customer"),
                listed(&self.other_customers)
            ));
        }
        notes
    }

    fn customers(&self) -> BTreeSet<String> {
        self.by_key.keys().map(|key| key.customer.clone()).collect()
    }

    /// Leaves out, and counts, the lines of customers not in `compared`.
    fn keep_customers(&mut self, compared: &BTreeSet<String>) {
        let (kept, left_out) = std::mem::take(&mut self.by_key)
            .into_iter()
            .partition(|(key, _)| compared.contains(&key.customer));
        self.by_key = kept;
        let left_out: BTreeMap<LineKey, Figures> = left_out;
        self.other_customers_lines += left_out.len();
        (self.other_customers).extend(left_out.into_keys().map(|key| key.customer));
    }
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
                count(customers.len(), "customer"),
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

/// Another biller's customer and price ids, as Tally's.
#[derive(Debug, Default)]
struct IdMap {
    customers: HashMap<String, String>,
    prices: HashMap<String, String>,
    /// The other biller's prices Tally does not bill (tax, a rounding line): their
    /// lines are left out.
    left_out_prices: BTreeSet<String>,
}

impl IdMap {
    fn read(path: &Path) -> anyhow::Result<IdMap> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the map {}", path.display()))?;
        IdMap::parse(&path.display().to_string(), &text)
    }

    /// A CSV file with the header `kind,from,to`; `kind` is `customer` or `price`, and
    /// a price with no `to` is left out.
    fn parse(name: &str, text: &str) -> anyhow::Result<IdMap> {
        #[derive(Deserialize)]
        struct Entry {
            kind: String,
            from: String,
            to: String,
        }
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let headers = (reader.headers())
            .with_context(|| format!("{name}: cannot read the header row"))?
            .clone();
        anyhow::ensure!(
            ["kind", "from", "to"]
                .iter()
                .all(|c| headers.iter().any(|h| h == *c)),
            "{name}: the header row must name kind, from and to (it has {})",
            headers.iter().collect::<Vec<_>>().join(", ")
        );
        let mut map = IdMap::default();
        // Where each id was mapped, for naming a contradiction.
        let mut first_at: HashMap<(String, String), String> = HashMap::new();
        let mut lines = LineNumbers::of(text);
        for record in reader.records() {
            let record = record.with_context(|| format!("{name}: unreadable row"))?;
            let at = format!("{name} line {}", lines.at(record.position()));
            let entry: Entry = (record.deserialize(Some(&headers)))
                .map_err(|e| anyhow::anyhow!("{at}: {}", csv_error(&e, &headers)))?;
            let (kind, from, to) = (entry.kind.trim(), entry.from.trim(), entry.to.trim());
            anyhow::ensure!(
                matches!(kind, "customer" | "price"),
                "{at}: kind {kind:?} is neither customer nor price"
            );
            anyhow::ensure!(!from.is_empty(), "{at}: from must be given");
            let is_price = kind == "price";
            if to.is_empty() {
                anyhow::ensure!(
                    is_price,
                    "{at}: to must be given for a customer; only a price may be left out (no to), as one Tally does not bill"
                );
                anyhow::ensure!(
                    !map.prices.contains_key(from),
                    "{at}: price {from:?} is both mapped and left out"
                );
                map.left_out_prices.insert(from.to_owned());
                continue;
            }
            anyhow::ensure!(
                !(is_price && map.left_out_prices.contains(from)),
                "{at}: price {from:?} is both mapped and left out"
            );
            let ids = match is_price {
                true => &mut map.prices,
                false => &mut map.customers,
            };
            match ids.get(from) {
                Some(earlier) if earlier != to => bail!(
                    "{at}: {kind} {from:?} is mapped to {to:?} here and to {earlier:?} at {}",
                    first_at[&(kind.to_owned(), from.to_owned())]
                ),
                _ => {
                    ids.insert(from.to_owned(), to.to_owned());
                    first_at.insert((kind.to_owned(), from.to_owned()), at);
                }
            }
        }
        Ok(map)
    }

    /// Renames the key's customer and price where the map says; whether it did. The
    /// entries it followed go into `used`, as [`IdMap::entries`] names them.
    fn rename(&self, key: &mut LineKey, used: &mut BTreeSet<String>) -> bool {
        let mut renamed = false;
        for (kind, id, ids) in [
            ("customer", &mut key.customer, &self.customers),
            ("price", &mut key.price, &self.prices),
        ] {
            if let Some(to) = ids.get(id.as_str()) {
                used.insert(format!("{kind} {id}"));
                renamed |= to != id;
                id.clone_from(to);
            }
        }
        renamed
    }

    /// Every entry, as `customer ID` or `price ID` (its `from`).
    fn entries(&self) -> impl Iterator<Item = String> + '_ {
        let named = |kind: &'static str| move |id: &String| format!("{kind} {id}");
        (self.customers.keys().map(named("customer")))
            .chain(self.prices.keys().map(named("price")))
            .chain(self.left_out_prices.iter().map(named("price")))
    }
}

/// Adds `figures` to `first`, a line of the same `key`; `how` says why they share it
/// ("the map makes it a line of").
fn add_to(first: &mut Figures, figures: Figures, key: &LineKey, how: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        figures.currency == first.currency,
        "{}: {how} {} with {} (in {}), but it is in {} and that one in {}; lines in two currencies cannot be added",
        figures.at,
        place(key),
        first.at,
        first.currency,
        figures.currency,
        first.currency
    );
    let sum = |a: Decimal, b: Decimal, what: &str| {
        exact_add(a, b).with_context(|| {
            format!(
                "{}: adding its {what} to {}'s cannot be done exactly (past 28 significant digits or the largest decimal)",
                figures.at, first.at
            )
        })
    };
    first.quantity = sum(first.quantity, figures.quantity, "quantity")?;
    first.amount = sum(first.amount, figures.amount, "amount")?;
    first.parts = match (first.parts, figures.parts) {
        (Some(a), Some(b)) => Some(AmountParts {
            subtotal: sum(a.subtotal, b.subtotal, "subtotal")?,
            discount: sum(a.discount, b.discount, "discount")?,
        }),
        _ => None,
    };
    first.at = format!("{} + {}", first.at, figures.at);
    Ok(())
}

/// How errors name a line's key.
fn place(key: &LineKey) -> String {
    format!(
        "customer {:?}, price {:?}{}",
        key.customer,
        key.price,
        adjusts_text(key.adjusts)
    )
}

fn adjusts_text(adjusts: Option<Period>) -> String {
    adjusts.map_or_else(String::new, |p| format!(", adjusting {p}"))
}

fn read_source(
    source: &str,
    period: Period,
    config: &Path,
    columns: &ColumnNames,
) -> anyhow::Result<Lines> {
    match source.strip_prefix("clickhouse") {
        Some(rest) if rest.is_empty() || rest.starts_with(':') => {
            read_clickhouse(rest.strip_prefix(':'), period, config)
        }
        _ => read_file(source, period, columns),
    }
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
                count(lines.other_periods, "line")
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
/// database or `database` on the same server.
fn read_clickhouse(database: Option<&str>, period: Period, config: &Path) -> anyhow::Result<Lines> {
    let store = ConfiguredClickHouse::of(&crate::load_config(config)?, config, database)?;
    let place = format!("{}.invoice_lines at {}", store.database, store.url);
    let mut lines = Lines::named(format!("ClickHouse {place}"));
    for line in store.client.lines(period, None)? {
        let at = format!("{place}, line {}", line.id);
        lines.add_invoice_line(line, at)?;
    }
    Ok(lines)
}

fn read_file(path: &str, period: Period, columns: &ColumnNames) -> anyhow::Result<Lines> {
    let mut text = String::new();
    if path == "-" {
        io::stdin()
            .read_to_string(&mut text)
            .context("cannot read lines from stdin")?;
    } else {
        text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    }
    let name = if path == "-" { "stdin" } else { path };
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    lines_of_text(name, text, FileFormat::of(text), period, columns)
}

#[derive(Debug, Clone, Copy)]
enum FileFormat {
    JsonLines,
    Csv,
}

impl FileFormat {
    /// Told by the content, not the name: JSON lines start with an object, a CSV file
    /// with its header row (an empty file has no lines either way).
    fn of(text: &str) -> FileFormat {
        match text.trim_start().chars().next() {
            Some('{') | None => FileFormat::JsonLines,
            Some(_) => FileFormat::Csv,
        }
    }
}

/// A file's lines of `period`, named `name` in the report and in errors.
fn lines_of_text(
    name: &str,
    text: &str,
    format: FileFormat,
    period: Period,
    columns: &ColumnNames,
) -> anyhow::Result<Lines> {
    let mut lines = Lines::named(name.to_owned());
    let (rows, dialect) = match format {
        FileFormat::Csv => {
            let (rows, dialect, ignored) = csv_rows(name, text, period, columns)?;
            lines.ignored_columns = ignored;
            (rows, Some(dialect))
        }
        FileFormat::JsonLines => (json_rows(name, text)?, None),
    };
    lines.dialect = dialect.filter(|d| *d != Dialect::TALLYS);
    let figure = |text: &str| {
        match dialect {
        Some(dialect) => match dialect.plain_figure(text) {
            Some(plain) => decimal(&plain),
            None => bail!(
                "{text:?} is not a number as this file writes them (decimal {}, whole digits grouped by three if at all)",
                if dialect.decimal_comma { "commas" } else { "points" }
            ),
        },
        None => decimal(text),
    }
    };
    for (at, row) in rows {
        let in_period = match given(&row.period_start) {
            None => true,
            Some(start) => {
                let start =
                    period_of(start).with_context(|| format!("{at}: period_start {start:?}"))?;
                start == period
            }
        };
        if !in_period {
            lines.other_periods += 1;
            continue;
        }
        let (customer, price) = (row.customer.trim(), row.price.trim());
        if customer.is_empty() && price.is_empty() {
            lines.unnamed_rows += 1;
            continue;
        }
        for (column, id) in [("customer", customer), ("price", price)] {
            anyhow::ensure!(
                !id.is_empty(),
                "{at}: no {column}; each line names the customer and the price it bills"
            );
        }
        let currency = row.currency.trim().to_ascii_lowercase();
        anyhow::ensure!(
            Currency::from_code(&currency).is_some(),
            "{at}: currency {:?} is not an ISO 4217 code (such as SEK, EUR or USD); write the code of the currency the line is billed in",
            row.currency.trim()
        );
        let key = LineKey {
            customer: customer.to_owned(),
            price: price.to_owned(),
            adjusts: match given(&row.adjusts_period) {
                None => None,
                Some(p) => Some(
                    Period::from_str(p).with_context(|| format!("{at}: adjusts_period {p:?}"))?,
                ),
            },
        };
        // Read when both are figures; otherwise (a percentage, a coupon code) left out,
        // as they are not compared.
        let part = |cell: &Option<String>| given(cell).and_then(|text| figure(text).ok());
        let parts = match (part(&row.subtotal), part(&row.discount)) {
            (Some(subtotal), Some(discount)) => Some(AmountParts { subtotal, discount }),
            _ => None,
        };
        let figures = Figures {
            quantity: figure(&row.quantity).with_context(|| format!("{at}: quantity"))?,
            amount: figure(&row.amount).with_context(|| format!("{at}: amount"))?,
            currency,
            parts,
            at,
        };
        lines.add(key, figures, given(&row.invoice))?;
    }
    Ok(lines)
}

/// A line as a file gives it, its figures still text.
#[derive(Debug, Deserialize)]
struct Row {
    customer: String,
    price: String,
    quantity: String,
    amount: String,
    currency: String,
    /// The month the line is billed in: RFC 3339, `2026-11-01 00:00:00` or `2026-11`.
    period_start: Option<String>,
    adjusts_period: Option<String>,
    /// The invoice (or credit note) the line is on, where the source names it.
    invoice: Option<String>,
    /// The amount before its discount, and the discount, where the source gives them.
    subtotal: Option<String>,
    discount: Option<String>,
}

/// The columns a CSV file must have.
const REQUIRED_COLUMNS: [&str; 5] = ["customer", "price", "quantity", "amount", "currency"];

/// The columns a CSV file may have besides those: the rest are not read.
const OPTIONAL_COLUMNS: [&str; 5] = [
    "period_start",
    "adjusts_period",
    "invoice",
    "subtotal",
    "discount",
];

/// Whether `column` is one of the columns a CSV file's lines are read from.
fn reads_column(column: &str) -> bool {
    (REQUIRED_COLUMNS.iter().chain(&OPTIONAL_COLUMNS)).any(|c| *c == column)
}

/// A row and where it was read.
type NumberedRow = (String, Row);

/// How a CSV file writes its rows: the separator between its cells, and whether its
/// figures have a decimal comma. Tally writes `,` and decimal points; a spreadsheet's
/// export in much of Europe has `;` and `1.234,56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dialect {
    separator: u8,
    decimal_comma: bool,
}

impl Dialect {
    const TALLYS: Dialect = Dialect {
        separator: b',',
        decimal_comma: false,
    };

    /// The separators a header row is tried with, in this order.
    const SEPARATORS: [u8; 3] = [b',', b';', b'\t'];

    fn describe(&self) -> String {
        let separator = match self.separator {
            b'\t' => "tabs".to_owned(),
            other => format!("'{}'", char::from(other)),
        };
        let mark = if self.decimal_comma {
            "commas"
        } else {
            "points"
        };
        format!("read as CSV separated by {separator}, with decimal {mark}")
    }

    /// A figure as a spreadsheet writes it, as plain decimal text: its decimal mark
    /// made a point, and the grouping of its whole digits dropped (spaces,
    /// apostrophes, or the mark that is not the decimal one, between groups of three:
    /// `1.234,56`, `1 234,56`, `1,234.56`). `None` for digits grouped any other way
    /// (`2.5` where the decimal mark is a comma), refused rather than guessed at.
    fn plain_figure(&self, text: &str) -> Option<String> {
        let text = text.trim();
        let (decimal, grouping) = match self.decimal_comma {
            true => (',', '.'),
            false => ('.', ','),
        };
        let (whole, fraction) = match text.rfind(decimal) {
            Some(at) => (&text[..at], Some(&text[at + 1..])),
            None => (text, None),
        };
        let (sign, digits) = whole.split_at(usize::from(whole.starts_with(['-', '+'])));
        let groups: Vec<&str> = digits
            .split(|c: char| c == grouping || c == '\'' || c.is_whitespace())
            .collect();
        let grouped =
            (1..=3).contains(&groups[0].len()) && groups[1..].iter().all(|g| g.len() == 3);
        if groups.len() > 1 && !grouped {
            return None;
        }
        let mut plain = format!("{sign}{}", groups.concat());
        if let Some(fraction) = fraction {
            plain.push('.');
            plain.push_str(fraction);
        }
        Some(plain)
    }
}

/// A header row naming at least customer, price, quantity, amount and currency (in any
/// order and case; other columns are ignored), then one row per line. The separator
/// is the first of `,`, `;` and tab that splits the header row into those columns; a
/// file separated otherwise than by `,` has decimal commas if any of its figures has a
/// comma. Also returns the columns not read, but for those of Tally's own CSV.
fn csv_rows(
    name: &str,
    text: &str,
    period: Period,
    columns: &ColumnNames,
) -> anyhow::Result<(Vec<NumberedRow>, Dialect, Vec<String>)> {
    let header_row = |separator: u8| -> anyhow::Result<csv::StringRecord> {
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(separator)
            .from_reader(text.as_bytes());
        let headers =
            (reader.headers()).with_context(|| format!("{name}: cannot read the header row"))?;
        Ok(headers
            .iter()
            .map(|h| columns.name_of(h.trim().to_ascii_lowercase()))
            .collect())
    };
    let has_columns = |headers: &csv::StringRecord| {
        REQUIRED_COLUMNS
            .iter()
            .all(|column| headers.iter().any(|h| h == *column))
    };
    let mut separator = Dialect::TALLYS.separator;
    let mut headers = header_row(separator)?;
    for other in &Dialect::SEPARATORS[1..] {
        if has_columns(&headers) {
            break;
        }
        let tried = header_row(*other)?;
        if has_columns(&tried) {
            (separator, headers) = (*other, tried);
        }
    }
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(separator)
        .from_reader(text.as_bytes());
    let missing: Vec<&str> = (REQUIRED_COLUMNS.iter().copied())
        .filter(|column| !headers.iter().any(|h| h == *column))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{name}: the header row has no column {}; it needs {} (other columns are ignored), and has {}",
        missing.join(", "),
        REQUIRED_COLUMNS.join(", "),
        headers.iter().collect::<Vec<_>>().join(", ")
    );
    let mut rows: Vec<NumberedRow> = Vec::new();
    let mut record = csv::StringRecord::new();
    let mut lines = LineNumbers::of(text);
    // A month under another name (even Tally's period_end) would let other months'
    // lines in: a column named like a month whose values all are months is watched.
    let has_month = headers.iter().any(|c| c == "period_start");
    let named_like_month = |column: &str| column.contains("period") || column.contains("month");
    // (column, whether every value is a month, months other than `period` in it)
    let mut month_like: Vec<(usize, bool, BTreeSet<String>)> = (headers.iter().enumerate())
        .filter(|(_, column)| {
            // An end (Tally's period_end) is the next month's start.
            let an_end = column
                .split(|c: char| !c.is_ascii_alphanumeric())
                .any(|w| w == "end");
            !has_month && !reads_column(column) && named_like_month(column) && !an_end
        })
        .map(|(index, _)| (index, true, BTreeSet::new()))
        .collect();
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => {
                let decimal_comma = separator != b','
                    && (rows.iter())
                        .any(|(_, r)| r.quantity.contains(',') || r.amount.contains(','));
                let dialect = Dialect {
                    separator,
                    decimal_comma,
                };
                let other_months = (month_like.iter())
                    .find(|(_, all_months, others)| *all_months && !others.is_empty());
                if let Some((index, _, others)) = other_months {
                    let column = &headers[*index];
                    let others: Vec<&str> = others.iter().map(String::as_str).collect();
                    bail!(
                        "{name}: its column {column} gives each line a month, some of them not {period} ({}), and no period_start column says which month a line is of, so lines of other months would be compared as {period}'s: give --column period_start={column} if it is the line's month, or --column ignore={column} if it is not",
                        others.join(", ")
                    );
                }
                // Columns left out by --column ignore= are not news to the user.
                let ignored = (headers.iter())
                    .filter(|column| !reads_column(column) && *column != IGNORED_COLUMN)
                    .filter_map(|column| {
                        if !has_month && named_like_month(column) {
                            return Some(format!(
                                "{column} (if it is the month, give --column period_start={column})"
                            ));
                        }
                        let tallys = CSV_HEADER.split(',').any(|c| c == column);
                        (!tallys).then(|| column.to_owned())
                    })
                    .collect();
                return Ok((rows, dialect, ignored));
            }
            Ok(true) => {
                for (index, all_months, others) in &mut month_like {
                    let value = record.get(*index).map_or("", str::trim);
                    match period_of(value) {
                        _ if value.is_empty() => {}
                        Ok(month) if month == period => {}
                        Ok(_) if others.len() < 3 => {
                            others.insert(value.to_owned());
                        }
                        Ok(_) => {}
                        Err(_) => *all_months = false,
                    }
                }
                let at = format!("{name} line {}", lines.at(record.position()));
                match record.deserialize::<Row>(Some(&headers)) {
                    Ok(row) => rows.push((at, row)),
                    Err(e) => bail!("{at}: {}", csv_error(&e, &headers)),
                }
            }
            Err(e) => {
                let line = lines.at(e.position());
                match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => bail!(
                        "{name} line {line}: {len} fields where the header row has {expected_len}"
                    ),
                    _ => bail!("{name} line {line}: {e}"),
                }
            }
        }
    }
}

/// The lines CSV records start on, counted from 1, for records read in order: each is
/// counted on from the last, so a file is scanned once. Not the reader's own count:
/// after a `\r\n` (a Windows export's line ending) the reader places the next record
/// at its `\n`, a line early.
struct LineNumbers<'t> {
    text: &'t [u8],
    /// Where the last record started, and its line.
    byte: usize,
    line: usize,
}

impl<'t> LineNumbers<'t> {
    fn of(text: &'t str) -> Self {
        LineNumbers {
            text: text.as_bytes(),
            byte: 0,
            line: 1,
        }
    }

    fn at(&mut self, position: Option<&csv::Position>) -> usize {
        let bytes = self.text;
        let mut start = position.map_or(0, |p| usize::try_from(p.byte()).unwrap_or(usize::MAX));
        start = start.clamp(self.byte, bytes.len());
        while bytes.get(start).is_some_and(|b| matches!(b, b'\r' | b'\n')) {
            start += 1;
        }
        self.line += bytes[self.byte..start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.byte = start;
        self.line
    }
}

/// The error with the column it is in named by its header.
fn csv_error(error: &csv::Error, headers: &csv::StringRecord) -> String {
    match error.kind() {
        csv::ErrorKind::Deserialize { err, .. } => {
            match err
                .field()
                .and_then(|f| headers.get(usize::try_from(f).ok()?))
            {
                Some(column) => format!("column {column}: {}", err.kind()),
                None => err.kind().to_string(),
            }
        }
        _ => error.to_string(),
    }
}

/// One JSON object per line; figures as decimal strings or JSON numbers, read exactly.
fn json_rows(name: &str, text: &str) -> anyhow::Result<Vec<NumberedRow>> {
    #[derive(Deserialize)]
    struct JsonRow<'a> {
        customer: String,
        price: String,
        #[serde(borrow)]
        quantity: &'a RawValue,
        #[serde(borrow)]
        amount: &'a RawValue,
        currency: String,
        period_start: Option<String>,
        adjusts_period: Option<String>,
        /// A string or a number: billers number their invoices.
        #[serde(borrow)]
        invoice: Option<&'a RawValue>,
        #[serde(borrow)]
        subtotal: Option<&'a RawValue>,
        #[serde(borrow)]
        discount: Option<&'a RawValue>,
    }
    // A JSON string's contents, or a number's own digits: never through f64.
    let figure = |raw: &RawValue| -> String {
        serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_owned())
    };
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            let at = format!("{name} line {}", index + 1);
            let row: JsonRow = serde_json::from_str(line).with_context(|| at.clone())?;
            let row = Row {
                customer: row.customer,
                price: row.price,
                quantity: figure(row.quantity),
                amount: figure(row.amount),
                currency: row.currency,
                period_start: row.period_start,
                adjusts_period: row.adjusts_period,
                invoice: row.invoice.map(figure),
                subtotal: row.subtotal.map(figure),
                discount: row.discount.map(figure),
            };
            Ok((at, row))
        })
        .collect()
}

/// A cell's text, `None` when empty: CSV has no null.
fn given(cell: &Option<String>) -> Option<&str> {
    cell.as_deref().map(str::trim).filter(|c| !c.is_empty())
}

fn decimal(text: &str) -> anyhow::Result<Decimal> {
    parse_exact(text.trim()).map_err(|e| anyhow::anyhow!("{text:?} {e}"))
}

/// The month a `period_start` names.
fn period_of(text: &str) -> anyhow::Result<Period> {
    let text = text.trim();
    if let Ok(period) = Period::from_str(text) {
        return Ok(period);
    }
    let start = DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").map(|t| t.and_utc()))
        .or_else(|_| NaiveDate::parse_from_str(text, "%Y-%m-%d").map(|d| d.and_time(NaiveTime::MIN).and_utc()))
        .map_err(|_| {
            anyhow::anyhow!("is not a month (2026-11), a day (2026-11-01) or a time (RFC 3339 or 2026-11-01 00:00:00)")
        })?;
    let period = Period::containing(start);
    anyhow::ensure!(period.start() == start, "is not the start of a month (UTC)");
    Ok(period)
}

/// Aligned columns under `header`, each row indented by two spaces.
fn write_table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut write_row = |cells: &mut dyn Iterator<Item = &str>| -> io::Result<()> {
        let text: Vec<String> = (cells.zip(&widths))
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        writeln!(out, "  {}", text.join("  ").trim_end())
    };
    write_row(&mut header.iter().copied())?;
    for row in rows {
        write_row(&mut row.iter().map(String::as_str))?;
    }
    Ok(())
}

/// `1 line`, `2 lines`.
fn count(n: usize, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// A line whose figures disagree, or that one source has and the other does not.
#[derive(Debug, PartialEq, Eq)]
struct Difference<'l> {
    key: &'l LineKey,
    expected: Option<&'l Figures>,
    actual: Option<&'l Figures>,
    compared: Compared,
}

/// What the two sources agree and disagree on.
#[derive(Debug)]
struct Reconciliation<'l> {
    compared: Compared,
    agreed: usize,
    /// Lines with zero quantity and amount that only one source has: a biller that
    /// leaves out zero lines agrees with one that writes them.
    zero_on_one_side: usize,
    differences: Vec<Difference<'l>>,
    /// Per currency: the expected and the actual total.
    totals: BTreeMap<&'l str, (Decimal, Decimal)>,
    /// Per invoice (a customer's lines in one currency): both totals.
    invoices: BTreeMap<(&'l str, &'l str), (Decimal, Decimal)>,
}

/// Both sources' amounts added up per currency and per invoice, exact in any order.
#[derive(Default)]
struct Sums<'l> {
    per_currency: BTreeMap<&'l str, (ExactSum, ExactSum)>,
    per_invoice: BTreeMap<(&'l str, &'l str), (ExactSum, ExactSum)>,
}

impl<'l> Sums<'l> {
    /// Adds a line's amount to its side of its currency's and its invoice's sums.
    fn add(
        &mut self,
        key: &'l LineKey,
        figures: &'l Figures,
        side: fn(&mut (ExactSum, ExactSum)) -> &mut ExactSum,
    ) {
        let currency = figures.currency.as_str();
        side(self.per_currency.entry(currency).or_default()).add(figures.amount);
        let invoice = (key.customer.as_str(), currency);
        side(self.per_invoice.entry(invoice).or_default()).add(figures.amount);
    }
}

/// The sums' totals, or an error naming the first that no exact decimal holds.
fn totals<K: Ord + Copy>(
    sums: BTreeMap<K, (ExactSum, ExactSum)>,
    name: impl Fn(K) -> String,
) -> anyhow::Result<BTreeMap<K, (Decimal, Decimal)>> {
    let total = |sum: ExactSum, key: K, source: &str| {
        sum.total().with_context(|| {
            format!(
                "the {source} {} amounts add up to more than an exact decimal holds (28 significant digits, about 7.9e28 at most); check that source's amounts",
                name(key)
            )
        })
    };
    (sums.into_iter())
        .map(|(key, (expected, actual))| {
            Ok((
                key,
                (
                    total(expected, key, "expected")?,
                    total(actual, key, "actual")?,
                ),
            ))
        })
        .collect()
}

impl<'l> Reconciliation<'l> {
    fn of(expected: &'l Lines, actual: &'l Lines, compared: Compared) -> anyhow::Result<Self> {
        let mut reconciliation = Reconciliation {
            compared,
            agreed: 0,
            zero_on_one_side: 0,
            differences: Vec::new(),
            totals: BTreeMap::new(),
            invoices: BTreeMap::new(),
        };
        let mut sums = Sums::default();
        for (key, figures) in &expected.by_key {
            sums.add(key, figures, |sums| &mut sums.0);
            match actual.by_key.get(key) {
                Some(other) if figures.agrees_with(other, compared) => reconciliation.agreed += 1,
                None if figures.is_zero(compared) => reconciliation.zero_on_one_side += 1,
                other => reconciliation.differences.push(Difference {
                    key,
                    expected: Some(figures),
                    actual: other,
                    compared,
                }),
            }
        }
        for (key, figures) in &actual.by_key {
            sums.add(key, figures, |sums| &mut sums.1);
            if !expected.by_key.contains_key(key) {
                match figures.is_zero(compared) {
                    true => reconciliation.zero_on_one_side += 1,
                    false => reconciliation.differences.push(Difference {
                        key,
                        expected: None,
                        actual: Some(figures),
                        compared,
                    }),
                }
            }
        }
        reconciliation.differences.sort_by_key(|d| d.key);
        reconciliation.totals = totals(sums.per_currency, |currency| currency.to_string())?;
        reconciliation.invoices = totals(sums.per_invoice, |(customer, currency)| {
            format!("customer {customer}'s {currency}")
        })?;
        Ok(reconciliation)
    }

    fn agrees(&self) -> bool {
        self.differences.is_empty()
    }

    fn write_report(
        &self,
        out: &mut impl Write,
        period: Period,
        expected: &Lines,
        actual: &Lines,
    ) -> io::Result<()> {
        writeln!(out, "Reconciling {period}")?;
        for (role, lines) in [("expected", expected), ("actual", actual)] {
            let notes: String = (lines.notes().iter())
                .map(|note| format!("; {note}"))
                .collect();
            let read = count(lines.by_key.len(), "line");
            writeln!(out, "  {role:<8} {}: {read}{notes}", lines.name)?;
        }
        if self.compared == Compared::Amounts {
            writeln!(out, "  compared: amounts and currencies (--amounts-only)")?;
        }
        writeln!(out)?;
        let zero = match self.zero_on_one_side {
            0 => String::new(),
            n => format!(" ({n} of them zero lines only one source has)"),
        };
        writeln!(
            out,
            "Agree: {}{zero}. Differ: {}.",
            count(self.agreed + self.zero_on_one_side, "line"),
            count(self.differences.len(), "line"),
        )?;
        if !self.differences.is_empty() {
            writeln!(out)?;
            self.write_difference_table(out)?;
        }
        let differing: Vec<Vec<String>> = (self.invoices.iter())
            .filter(|(_, (expected, actual))| expected != actual)
            .map(|((customer, currency), (expected, actual))| {
                let difference = difference(*actual, *expected)
                    .map_or_else(|| "-".to_owned(), |d| d.to_string());
                vec![
                    customer.to_string(),
                    currency.to_string(),
                    expected.to_string(),
                    actual.to_string(),
                    difference,
                ]
            })
            .collect();
        writeln!(out)?;
        writeln!(
            out,
            "Invoices (a customer's lines in one currency): {} agree, {} differ.",
            self.invoices.len() - differing.len(),
            differing.len()
        )?;
        if !differing.is_empty() {
            let header = ["customer", "currency", "expected", "actual", "difference"];
            write_table(out, &header, &differing)?;
        }
        writeln!(out)?;
        writeln!(out, "Totals (actual - expected):")?;
        for (currency, (expected, actual)) in &self.totals {
            let difference = difference(*actual, *expected).map_or_else(
                || "more than an exact decimal holds".into(),
                |d| d.to_string(),
            );
            writeln!(
                out,
                "  {currency}  expected {expected}  actual {actual}  difference {difference}"
            )?;
        }
        writeln!(out)?;
        match self.agrees() {
            true => writeln!(out, "The two agree on every line."),
            false => writeln!(
                out,
                "They differ in {}.",
                count(self.differences.len(), "line")
            ),
        }
    }

    fn write_difference_table(&self, out: &mut impl Write) -> io::Result<()> {
        let mut header = vec![
            "customer",
            "price",
            "adjusts",
            "what",
            "expected quantity",
            "actual quantity",
            "expected amount",
            "actual amount",
            "amount difference",
        ];
        let mut rows: Vec<Vec<String>> = (self.differences.iter())
            .map(|d| d.table_row().to_vec())
            .collect();
        // The adjusted month's column only when a line adjusts one.
        const ADJUSTS: usize = 2;
        if rows.iter().all(|row| row[ADJUSTS].is_empty()) {
            header.remove(ADJUSTS);
            for row in &mut rows {
                row.remove(ADJUSTS);
            }
        }
        write_table(out, &header, &rows)
    }

    fn write_differences(&self, out: &mut impl Write) -> io::Result<()> {
        writeln!(out, "{DIFFERENCES_HEADER}")?;
        for difference in &self.differences {
            let row = difference.csv_row().map(|cell| csv_field(&cell));
            writeln!(out, "{}", row.join(","))?;
        }
        Ok(())
    }
}

/// `actual - expected`, exact (`None` past a decimal's digits); a zero difference is
/// written `0.00`, never `-0.00`, however the two zeros were signed.
fn difference(actual: Decimal, expected: Decimal) -> Option<Decimal> {
    let mut difference = exact_add(actual, -expected)?;
    if difference.is_zero() {
        difference.set_sign_positive(true);
    }
    Some(difference)
}

/// The columns of `--differences`: the line, what differs (`only_expected`,
/// `only_actual`, `currency`, `quantity`, `quantity_and_amount`, `discount` or
/// `amount`), both sides' figures, actual minus
/// expected amount (empty when the currencies differ), and where each side was read.
const DIFFERENCES_HEADER: &str = "customer,price,adjusts_period,what,expected_quantity,actual_quantity,expected_amount,expected_currency,actual_amount,actual_currency,amount_difference,expected_at,actual_at";

impl Difference<'_> {
    /// What differs, in words.
    fn what(&self) -> &'static str {
        match (self.expected, self.actual) {
            (Some(_), None) => "only expected",
            (None, Some(_)) => "only actual",
            (Some(e), Some(a)) if e.currency != a.currency => "currency",
            (Some(e), Some(a))
                if e.quantity != a.quantity && self.compared == Compared::QuantitiesAndAmounts =>
            {
                match e.amount == a.amount {
                    true => "quantity",
                    false => "quantity and amount",
                }
            }
            // Where both give the amount's parts: the same subtotal, and amounts apart
            // by just what the discounts are.
            (Some(e), Some(a))
                if e.parts.zip(a.parts).is_some_and(|(ep, ap)| {
                    ep.subtotal == ap.subtotal
                        && ep.discount != ap.discount
                        && exact_add(a.amount, -e.amount) == exact_add(ep.discount, -ap.discount)
                }) =>
            {
                "discount"
            }
            _ => "amount",
        }
    }

    /// Actual minus expected amount (a missing line counting zero), in their one
    /// currency; `None` when the two are in different currencies (or the difference is
    /// more than an exact decimal holds).
    fn amount_difference(&self) -> Option<(Decimal, &str)> {
        match (self.expected, self.actual) {
            (Some(e), Some(a)) if e.currency != a.currency => None,
            (Some(e), Some(a)) => Some((difference(a.amount, e.amount)?, &a.currency)),
            (Some(e), None) => Some((difference(Decimal::ZERO, e.amount)?, &e.currency)),
            (None, Some(a)) => Some((a.amount, &a.currency)),
            (None, None) => None,
        }
    }

    /// The report's cells: customer, price, adjusted month, what differs, both
    /// quantities, both amounts and their difference, each with its currency.
    fn table_row(&self) -> [String; 9] {
        let missing = || "-".to_owned();
        let quantity = |f: Option<&Figures>| f.map_or_else(missing, |f| f.quantity.to_string());
        let amount = |f: Option<&Figures>| {
            f.map_or_else(missing, |f| format!("{} {}", f.amount, f.currency))
        };
        [
            self.key.customer.clone(),
            self.key.price.clone(),
            self.key.adjusts.map_or_else(String::new, |p| p.to_string()),
            self.what().to_owned(),
            quantity(self.expected),
            quantity(self.actual),
            amount(self.expected),
            amount(self.actual),
            (self.amount_difference())
                .map_or_else(missing, |(amount, currency)| format!("{amount} {currency}")),
        ]
    }

    /// The CSV file's cells, one value each (see [`DIFFERENCES_HEADER`]).
    fn csv_row(&self) -> [String; 13] {
        let (expected, actual) = (self.expected, self.actual);
        let cell = |f: Option<&Figures>, of: fn(&Figures) -> String| f.map_or_else(String::new, of);
        let quantity = |f: &Figures| f.quantity.to_string();
        let amount = |f: &Figures| f.amount.to_string();
        let currency = |f: &Figures| f.currency.clone();
        let at = |f: &Figures| f.at.clone();
        [
            self.key.customer.clone(),
            self.key.price.clone(),
            self.key.adjusts.map_or_else(String::new, |p| p.to_string()),
            self.what().replace(' ', "_"),
            cell(expected, quantity),
            cell(actual, quantity),
            cell(expected, amount),
            cell(expected, currency),
            cell(actual, amount),
            cell(actual, currency),
            (self.amount_difference()).map_or_else(String::new, |(amount, _)| amount.to_string()),
            cell(expected, at),
            cell(actual, at),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn november() -> Period {
        Period::from_str("2026-11").unwrap()
    }

    fn json(text: &str) -> Lines {
        lines_of_text(
            "a.jsonl",
            text,
            FileFormat::JsonLines,
            november(),
            &ColumnNames::default(),
        )
        .unwrap()
    }

    fn csv(text: &str) -> Lines {
        lines_of_text(
            "b.csv",
            text,
            FileFormat::Csv,
            november(),
            &ColumnNames::default(),
        )
        .unwrap()
    }

    fn error(name: &str, text: &str, format: FileFormat) -> String {
        let error =
            lines_of_text(name, text, format, november(), &ColumnNames::default()).unwrap_err();
        format!("{error:#}")
    }

    fn report(expected: &Lines, actual: &Lines) -> String {
        let mut out = Vec::new();
        (Reconciliation::of(expected, actual, Compared::QuantitiesAndAmounts).unwrap())
            .write_report(&mut out, november(), expected, actual)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_zero_difference_is_never_written_negative() {
        let d = |text: &str| Decimal::from_str(text).unwrap();
        let shown =
            |actual: &str, expected: &str| difference(d(actual), d(expected)).unwrap().to_string();
        assert_eq!(shown("0.00", "0.00"), "0.00");
        assert_eq!(shown("0.00", "-0.00"), "0.00");
        assert_eq!(shown("-0.00", "0.00"), "0.00");
        assert_eq!(shown("1.50", "2.00"), "-0.50");
        // Two lines of 0.00 that differ in quantity only.
        let expected = json(
            r#"{"customer":"a","price":"tokens","quantity":"5","subtotal":"0.00","discount":"0.00","amount":"0.00","currency":"usd"}"#,
        );
        let actual = json(
            r#"{"customer":"a","price":"tokens","quantity":"7","subtotal":"0.00","discount":"0.00","amount":"0.00","currency":"usd"}"#,
        );
        let text = report(&expected, &actual);
        assert!(!text.contains("-0.00"), "{text}");
    }

    #[test]
    fn amounts_only_leaves_quantities_that_count_something_else_alone() {
        // The other biller bills the platform fee as quantity 1 and leaves out a
        // line of no amount whose quantity Tally counts.
        let other = json(concat!(
            r#"{"customer":"a","price":"resolutions","quantity":"1","amount":"49.00","currency":"usd"}"#,
            "\n",
            r#"{"customer":"b","price":"resolutions","quantity":"1","amount":"49.00","currency":"usd"}"#,
        ));
        let tally = json(concat!(
            r#"{"customer":"a","price":"resolutions","quantity":"13","amount":"49.00","currency":"usd"}"#,
            "\n",
            r#"{"customer":"b","price":"resolutions","quantity":"70","amount":"61.50","currency":"usd"}"#,
            "\n",
            r#"{"customer":"b","price":"tokens","quantity":"900","amount":"0.00","currency":"usd"}"#,
        ));
        let all = Reconciliation::of(&other, &tally, Compared::QuantitiesAndAmounts).unwrap();
        let what: Vec<&str> = all.differences.iter().map(Difference::what).collect();
        // b's amount differs as well: a filter on amounts must not miss it.
        assert_eq!(what, ["quantity", "quantity and amount", "only actual"]);
        let amounts = Reconciliation::of(&other, &tally, Compared::Amounts).unwrap();
        let what: Vec<(&str, &str)> = (amounts.differences.iter())
            .map(|d| (d.key.customer.as_str(), d.what()))
            .collect();
        assert_eq!(what, [("b", "amount")]);
        assert_eq!((amounts.agreed, amounts.zero_on_one_side), (1, 1));
        let mut out = Vec::new();
        amounts
            .write_report(&mut out, november(), &other, &tally)
            .unwrap();
        let shown = String::from_utf8(out).unwrap();
        assert!(
            shown.contains("compared: amounts and currencies (--amounts-only)"),
            "{shown}"
        );
    }

    #[test]
    fn figures_agree_by_value_whatever_their_form_and_zero_lines_one_side_leaves_out_agree() {
        let expected = json(concat!(
            r#"{"customer":"acme","price":"tokens","quantity":"1200","amount":"12.50","currency":"usd","tiers":[]}"#,
            "\n\n",
            r#"{"customer":"acme","price":"seats","quantity":0,"amount":"0","currency":"usd"}"#,
            "\n",
            r#"{"customer":"acme","price":"tokens","quantity":"7","amount":1.5,"currency":"usd","adjusts_period":"2026-10"}"#,
            "\n",
        ));
        let actual = csv(concat!(
            "amount,currency,customer,price,quantity,note,adjusts_period\n",
            "12.5,USD,acme,tokens,1200.000,\"from the old biller, rounded\",\n",
            "1.50,usd,acme,tokens,7,,2026-10\n",
        ));
        let reconciliation =
            Reconciliation::of(&expected, &actual, Compared::QuantitiesAndAmounts).unwrap();
        assert!(reconciliation.agrees());
        assert_eq!(
            (reconciliation.agreed, reconciliation.zero_on_one_side),
            (2, 1)
        );
        let shown = report(&expected, &actual);
        assert!(
            shown.contains(
                "Agree: 3 lines (1 of them zero lines only one source has). Differ: 0 lines."
            ),
            "{shown}"
        );
        assert!(
            shown.contains("usd  expected 14.00  actual 14.00  difference 0.00"),
            "{shown}"
        );
        assert!(shown.ends_with("The two agree on every line.\n"), "{shown}");
    }

    #[test]
    fn each_kind_of_difference_is_listed_once_with_both_sides_and_the_amount_it_moves() {
        let line = |customer: &str, quantity: &str, amount: &str, currency: &str| {
            format!(
                r#"{{"customer":"{customer}","price":"tokens","quantity":"{quantity}","amount":"{amount}","currency":"{currency}"}}"#
            )
        };
        let expected = json(
            &[
                line("a_same", "1", "1.00", "usd"),
                line("b_amount", "10", "2.00", "usd"),
                line("c_quantity", "10", "2.00", "usd"),
                line("d_currency", "10", "200", "jpy"),
                line("e_gone", "5", "3.10", "usd"),
            ]
            .join("\n"),
        );
        let actual = json(
            &[
                line("a_same", "1", "1", "usd"),
                line("b_amount", "10", "2.01", "usd"),
                line("c_quantity", "11", "2.00", "usd"),
                line("d_currency", "10", "200", "eur"),
                line("f_new", "0", "4", "usd"),
            ]
            .join("\n"),
        );
        let reconciliation =
            Reconciliation::of(&expected, &actual, Compared::QuantitiesAndAmounts).unwrap();
        assert!(!reconciliation.agrees());
        let rows: Vec<[String; 13]> = (reconciliation.differences.iter())
            .map(Difference::csv_row)
            .collect();
        let expected_rows = [
            [
                "b_amount", "amount", "10", "10", "2.00", "usd", "2.01", "usd", "0.01",
            ],
            [
                "c_quantity",
                "quantity",
                "10",
                "11",
                "2.00",
                "usd",
                "2.00",
                "usd",
                "0.00",
            ],
            [
                "d_currency",
                "currency",
                "10",
                "10",
                "200",
                "jpy",
                "200",
                "eur",
                "",
            ],
            [
                "e_gone",
                "only_expected",
                "5",
                "",
                "3.10",
                "usd",
                "",
                "",
                "-3.10",
            ],
            ["f_new", "only_actual", "", "0", "", "", "4", "usd", "4"],
        ];
        assert_eq!(rows.len(), expected_rows.len());
        for (row, wanted) in rows.iter().zip(expected_rows) {
            let shown: Vec<&str> = [0, 3, 4, 5, 6, 7, 8, 9, 10]
                .iter()
                .map(|&i| row[i].as_str())
                .collect();
            assert_eq!(shown, wanted);
        }
        assert_eq!(rows[0][11], "a.jsonl line 2");
        assert_eq!(rows[4][12], "a.jsonl line 5");
        assert_eq!(
            reconciliation.totals,
            BTreeMap::from([
                ("eur", (Decimal::ZERO, Decimal::from(200))),
                ("jpy", (Decimal::from(200), Decimal::ZERO)),
                ("usd", (Decimal::new(810, 2), Decimal::new(901, 2))),
            ])
        );
        let shown = report(&expected, &actual);
        assert!(shown.contains("Agree: 1 line. Differ: 5 lines."), "{shown}");
        // c_quantity's line differs, its invoice does not; d_currency has two.
        assert!(
            shown.contains("Invoices (a customer's lines in one currency): 2 agree, 5 differ.\n"),
            "{shown}"
        );
        assert!(
            shown.contains("  d_currency  eur       0         200     200\n  d_currency  jpy       200       0       -200\n"),
            "{shown}"
        );
        assert!(
            shown.contains("  e_gone      tokens  only expected  5                  -                3.10 usd         -              -3.10 usd"),
            "{shown}"
        );
        assert!(shown.ends_with("They differ in 5 lines.\n"), "{shown}");
    }

    #[test]
    fn an_adjustment_is_its_own_line_and_the_table_names_the_month_it_adjusts() {
        let expected = json(concat!(
            r#"{"customer":"acme","price":"tokens","quantity":"10","amount":"1.00","currency":"usd"}"#,
            "\n",
            r#"{"customer":"acme","price":"tokens","quantity":"2","amount":"0.20","currency":"usd","adjusts_period":"2026-10"}"#,
        ));
        let actual = json(
            r#"{"customer":"acme","price":"tokens","quantity":"10","amount":"1.00","currency":"usd","adjusts_period":null}"#,
        );
        let shown = report(&expected, &actual);
        assert!(
            shown.contains(concat!(
                "  customer  price   adjusts  what           expected quantity  actual quantity  expected amount  actual amount  amount difference\n",
                "  acme      tokens  2026-10  only expected  2                  -                0.20 usd         -              -0.20 usd\n",
            )),
            "{shown}"
        );
    }

    #[test]
    fn json_numbers_are_read_digit_for_digit() {
        let lines = json(
            r#"{"customer":"acme","price":"tokens","quantity":12345678901234567.891,"amount":0.1000000000000000000000000001,"currency":"usd"}"#,
        );
        let figures = lines.by_key.values().next().unwrap();
        assert_eq!(figures.quantity.to_string(), "12345678901234567.891");
        assert_eq!(figures.amount.to_string(), "0.1000000000000000000000000001");
    }

    #[test]
    fn lines_of_other_months_are_left_out_and_counted_and_adjustments_kept_apart() {
        let lines = csv(concat!(
            "customer,price,quantity,amount,currency,period_start,adjusts_period\n",
            "acme,tokens,1,1,usd,2026-11-01T00:00:00Z,\n",
            "acme,tokens,2,2,usd,2026-11-01 00:00:00,2026-10\n",
            "acme,seats,3,3,usd,2026-11,\n",
            "acme,tokens,4,4,usd,2026-10-01T00:00:00Z,\n",
            "acme,tokens,5,5,usd,2026-12-01 00:00:00,\n",
        ));
        assert_eq!(lines.other_periods, 2);
        let keys: Vec<(&str, Option<String>)> = (lines.by_key.keys())
            .map(|k| (k.price.as_str(), k.adjusts.map(|p| p.to_string())))
            .collect();
        assert_eq!(
            keys,
            [
                ("seats", None),
                ("tokens", None),
                ("tokens", Some("2026-10".to_owned()))
            ]
        );
    }

    #[test]
    fn column_names_read_another_billers_headers_as_tallys() {
        let named = ColumnNames(vec![
            column_name("customer=Account").unwrap(),
            column_name("amount= Net Amount ").unwrap(),
            column_name("quantity=qty").unwrap(),
        ]);
        let export = "Account,Price,Qty,Net Amount,Currency\nacme,tokens,3,4.50,usd\n";
        let read = lines_of_text("old.csv", export, FileFormat::Csv, november(), &named).unwrap();
        let (key, figures) = read.by_key.iter().next().unwrap();
        assert_eq!(
            (
                key.customer.as_str(),
                figures.quantity.to_string(),
                figures.amount.to_string()
            ),
            ("acme", "3".to_owned(), "4.50".to_owned())
        );
        assert!(column_name("total=Sum")
            .unwrap_err()
            .contains("not a column Tally reads"));
        assert!(column_name("amount").unwrap_err().contains("NAME=HEADER"));
    }

    #[test]
    fn what_a_file_holds_besides_lines_is_left_out_and_named_in_the_report() {
        let export = csv(concat!(
            "customer,price,quantity,amount,currency,period,notes,period_end\n",
            "acme,tokens,1,1.00,SEK,Nov,,\n",
            ",,,12.00,,,total,\n",
        ));
        assert_eq!(export.unnamed_rows, 1);
        let tallys = json(
            r#"{"customer":"acme","price":"tokens","quantity":"1","amount":"1.00","currency":"sek"}"#,
        );
        let shown = report(&export, &tallys);
        assert!(
            shown.contains("  expected b.csv: 1 line; 1 row naming neither customer nor price (totals) left out; columns not read: period (if it is the month, give --column period_start=period), notes, period_end (if it is the month, give --column period_start=period_end)\n"),
            "{shown}"
        );
        // Even a column of Tally's own CSV, when it is the only month there is.
        let by_end = csv("customer,price,quantity,amount,currency,period_end\nacme,tokens,1,1.00,sek,2026-12-01\n");
        assert_eq!(
            by_end.ignored_columns,
            ["period_end (if it is the month, give --column period_start=period_end)"]
        );
        // A column like a month with other months in it is refused: their lines
        // would be compared as this one's. So is one of another month only.
        let months = "customer,price,quantity,amount,currency,billing_month\nacme,tokens,1,1.00,usd,2026-11\nacme,tokens,2,2.00,usd,2026-10\n";
        let refused = error("old.csv", months, FileFormat::Csv);
        assert!(
            refused.contains("its column billing_month gives each line a month, some of them not 2026-11 (2026-10)")
                && refused.contains("--column period_start=billing_month"),
            "{refused}"
        );
        let october = "customer,price,quantity,amount,currency,billing_month\nacme,tokens,2,2.00,usd,2026-10-01\n";
        assert!(error("old.csv", october, FileFormat::Csv).contains("not 2026-11 (2026-10-01)"));
        // A column named so whose values are not months (a fee, a unit) is read as
        // before, named among the columns not read.
        let fee = csv("customer,price,quantity,amount,currency,monthly fee\nacme,tokens,1,1.00,usd,20\nacme,seats,1,1.00,usd,30\n");
        assert_eq!(fee.by_key.len(), 2);
        // A month that is not the line's (a cohort's) is left out when named so.
        let cohort = "customer,price,quantity,amount,currency,cohort_month\nacme,tokens,2,2.00,usd,2025-01\n";
        assert!(error("old.csv", cohort, FileFormat::Csv).contains("--column ignore=cohort_month"));
        let ignored = ColumnNames(vec![column_name("ignore=cohort_month").unwrap()]);
        let read = lines_of_text("old.csv", cohort, FileFormat::Csv, november(), &ignored).unwrap();
        assert_eq!(read.by_key.len(), 1);
        assert!(
            read.ignored_columns.is_empty(),
            "{:?}",
            read.ignored_columns
        );
        // "end" is a word of its own: a calendar month is watched.
        let calendar = "customer,price,quantity,amount,currency,calendar_month\nacme,tokens,2,2.00,usd,2026-10\n";
        assert!(error("old.csv", calendar, FileFormat::Csv)
            .contains("calendar_month gives each line a month"));
        // Named so, it is the month: October's line is left out.
        let named = ColumnNames(vec![("period_start".into(), "billing_month".into())]);
        let read = lines_of_text("old.csv", months, FileFormat::Csv, november(), &named).unwrap();
        assert_eq!((read.by_key.len(), read.other_periods), (1, 1));
        // A day is a month's start as well as its midnight is.
        let by_day = csv("customer,price,quantity,amount,currency,period_start\nacme,tokens,1,1,usd,2026-11-01\nacme,tokens,1,1,usd,2026-10-01\n");
        assert_eq!((by_day.by_key.len(), by_day.other_periods), (1, 1));
    }

    #[test]
    fn bad_input_is_refused_saying_where_and_why() {
        let csv_error = |text: &str| error("old.csv", text, FileFormat::Csv);
        assert_eq!(
            csv_error("customer,price,qty,amount\nacme,tokens,1,1\n"),
            "old.csv: the header row has no column quantity, currency; it needs customer, price, quantity, amount, currency (other columns are ignored), and has customer, price, qty, amount"
        );
        assert_eq!(
            csv_error("customer,price,quantity,amount,currency\nacme,tokens,1,1,usd\nacme,seats,1,\"12,5\",usd\n"),
            "old.csv line 3: amount: \"12,5\" is not a number as this file writes them (decimal points, whole digits grouped by three if at all)"
        );
        assert_eq!(
            csv_error("customer,price,quantity,amount,currency\nacme,tokens,1,1,usd\nacme,tokens,2,2,usd\n"),
            "old.csv line 3: a second line for customer \"acme\", price \"tokens\" (the first is old.csv line 2); a source has one line per customer and price of the month, or one per invoice when an `invoice` column tells them apart (a credit note, say)"
        );
        assert_eq!(
            csv_error("customer,price,quantity,amount,currency,period_start\nacme,tokens,1,1,usd,2026-11-15 00:00:00\n"),
            "old.csv line 2: period_start \"2026-11-15 00:00:00\": is not the start of a month (UTC)"
        );
        assert_eq!(
            csv_error("customer,price,quantity,amount,currency\nacme,tokens,1,1\n"),
            "old.csv line 2: 4 fields where the header row has 5"
        );
        // Line numbers count a Windows export's \r\n as one line ending.
        assert_eq!(
            csv_error("customer,price,quantity,amount,currency\r\nacme,tokens,1,1,usd\r\nacme,tokens,1\r\n"),
            "old.csv line 3: 3 fields where the header row has 5"
        );
        assert_eq!(
            csv_error("customer,price,quantity,amount,currency\nacme,tokens,1,1,kr\n"),
            "old.csv line 2: currency \"kr\" is not an ISO 4217 code (such as SEK, EUR or USD); write the code of the currency the line is billed in"
        );
        assert_eq!(
            csv_error("customer,price,quantity,amount,currency\nacme,,1,1,usd\n"),
            "old.csv line 2: no price; each line names the customer and the price it bills"
        );
        let json_error = error(
            "new.jsonl",
            r#"{"customer":"acme","price":"tokens","quantity":"1","currency":"usd"}"#,
            FileFormat::JsonLines,
        );
        assert!(
            json_error.starts_with("new.jsonl line 1: missing field `amount`"),
            "{json_error}"
        );
        let huge = json(concat!(
            r#"{"customer":"a","price":"p","quantity":"1","amount":"70000000000000000000000000000","currency":"usd"}"#,
            "\n",
            r#"{"customer":"b","price":"p","quantity":"1","amount":"70000000000000000000000000000","currency":"usd"}"#,
        ));
        let refused = Reconciliation::of(&huge, &huge, Compared::QuantitiesAndAmounts).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "the expected usd amounts add up to more than an exact decimal holds (28 significant digits, about 7.9e28 at most); check that source's amounts"
        );
        // 38 significant digits: rust_decimal would round the second amount away.
        let precise = json(concat!(
            r#"{"customer":"a","price":"p","quantity":"1","amount":"5000000000","currency":"usd"}"#,
            "\n",
            r#"{"customer":"b","price":"p","quantity":"1","amount":"0.0000000000000000000000000001","currency":"usd"}"#,
        ));
        let refused =
            Reconciliation::of(&precise, &precise, Compared::QuantitiesAndAmounts).unwrap_err();
        assert!(
            refused
                .to_string()
                .starts_with("the expected usd amounts add up to more than"),
            "{refused}"
        );
        // Amounts whose running sum no decimal holds, but whose total one does.
        let thirds = json(concat!(
            r#"{"customer":"a","price":"p","quantity":"1","amount":"66.666666666666666666666666667","currency":"usd"}"#,
            "\n",
            r#"{"customer":"b","price":"p","quantity":"1","amount":"66.666666666666666666666666667","currency":"usd"}"#,
            "\n",
            r#"{"customer":"c","price":"p","quantity":"1","amount":"66.666666666666666666666666666","currency":"usd"}"#,
        ));
        let agreed = Reconciliation::of(&thirds, &thirds, Compared::QuantitiesAndAmounts).unwrap();
        assert_eq!(
            agreed.totals["usd"],
            (Decimal::from(200), Decimal::from(200))
        );
    }

    const OLD_BILLER_MAP: &str = "kind,from,to\n\
        customer,ACCT-1001,cust_acme\n\
        price,AI resolutions (included),resolutions\n\
        price,AI resolutions (overage),resolutions\n\
        price,Tokens,gpt-tokens\n";

    fn mapped_csv(text: &str, map: &str) -> anyhow::Result<Lines> {
        let map = IdMap::parse("map.csv", map)?;
        lines_of_text(
            "old.csv",
            text,
            FileFormat::Csv,
            november(),
            &ColumnNames::default(),
        )?
        .renamed(&map)
    }

    #[test]
    fn the_map_renames_another_billers_ids_and_adds_up_the_lines_it_makes_one() {
        let old = mapped_csv(
            "customer,price,quantity,amount,currency\n\
             ACCT-1001,AI resolutions (included),100,49.00,USD\n\
             ACCT-1001,AI resolutions (overage),20,17.80,USD\n\
             ACCT-1001,Tokens,12,0.024,USD\n\
             cust_zed,resolutions,1,49.00,USD\n",
            OLD_BILLER_MAP,
        )
        .unwrap();
        let tally = json(concat!(
            r#"{"customer":"cust_acme","price":"resolutions","quantity":"120","amount":"66.80","currency":"usd"}"#,
            "\n",
            r#"{"customer":"cust_acme","price":"gpt-tokens","quantity":"12","amount":"0.024","currency":"usd"}"#,
            "\n",
            r#"{"customer":"cust_zed","price":"resolutions","quantity":"1","amount":"49.00","currency":"usd"}"#,
        ));
        let shown = report(&old, &tally);
        assert!(
            Reconciliation::of(&old, &tally, Compared::QuantitiesAndAmounts)
                .unwrap()
                .agrees(),
            "{shown}"
        );
        assert!(
            shown.contains("expected old.csv: 3 lines; 3 lines renamed by the map, 1 of them added to another line"),
            "{shown}"
        );
        // An entry no line used (a mistyped id, or a customer of another cohort).
        let map = format!("{OLD_BILLER_MAP}customer,ACCT-1O02,cust_beta\n");
        let unused = mapped_csv(
            "customer,price,quantity,amount,currency\ncust_zed,resolutions,1,49.00,usd\n",
            &map,
        )
        .unwrap();
        assert!(
            report(&unused, &tally).contains("map entries matching none of its lines (5): customer ACCT-1001, customer ACCT-1O02, price AI resolutions (included), price AI resolutions (overage), price Tokens\n"),
            "{}",
            report(&unused, &tally)
        );
        let resolutions = &old.by_key[&LineKey {
            customer: "cust_acme".into(),
            price: "resolutions".into(),
            adjusts: None,
        }];
        assert_eq!(resolutions.at, "old.csv line 2 + old.csv line 3");
        assert_eq!(resolutions.amount, Decimal::new(6680, 2));

        // Lines the map did not bring together are still one too many.
        let twice = "customer,price,quantity,amount,currency\ncust_zed,resolutions,1,1,usd\ncust_zed,resolutions,1,1,usd\n";
        let refused = mapped_csv(twice, OLD_BILLER_MAP).err().unwrap().to_string();
        assert!(
            refused.starts_with("old.csv line 3: a second line for"),
            "{refused}"
        );
    }

    #[test]
    fn an_amount_that_differs_by_its_discount_alone_is_named_so() {
        let old = csv(
            "customer,price,quantity,subtotal,discount,amount,currency\n\
             acme,resolutions,250,250.00,31.25,218.75,usd\n\
             beta,resolutions,10,10.00,1.25,8.75,usd\n",
        );
        let tally = json(concat!(
            r#"{"customer":"acme","price":"resolutions","quantity":"250","subtotal":"250.00","discount":"31.26","amount":"218.74","currency":"usd"}"#,
            "\n",
            r#"{"customer":"beta","price":"resolutions","quantity":"10","subtotal":"10.01","discount":"1.25","amount":"8.76","currency":"usd"}"#,
        ));
        let reconciled = Reconciliation::of(&old, &tally, Compared::QuantitiesAndAmounts).unwrap();
        let what: Vec<(&str, &str)> = (reconciled.differences.iter())
            .map(|d| (d.key.customer.as_str(), d.what()))
            .collect();
        assert_eq!(what, [("acme", "discount"), ("beta", "amount")]);
        // Parts that are not figures are left out; an amount apart by more than the
        // discounts (tax in it) is an amount.
        let taxed = csv(
            "customer,price,quantity,subtotal,discount,amount,currency\n\
             acme,resolutions,250,250.00,31.25,273.44,usd\n\
             beta,resolutions,10,10.00,12.5%,8.75,usd\n",
        );
        assert_eq!(
            taxed.by_key.values().filter(|f| f.parts.is_none()).count(),
            1
        );
        let reconciled =
            Reconciliation::of(&taxed, &tally, Compared::QuantitiesAndAmounts).unwrap();
        assert_eq!(reconciled.differences[0].what(), "amount");
        // Without the parts on one side, an amount is all that can be said.
        let plain =
            csv("customer,price,quantity,amount,currency\nacme,resolutions,250,218.75,usd\n");
        let reconciled =
            Reconciliation::of(&plain, &tally, Compared::QuantitiesAndAmounts).unwrap();
        assert_eq!(reconciled.differences[0].what(), "amount");
    }

    #[test]
    fn a_price_the_map_leaves_out_is_not_compared_and_counted() {
        let map = "kind,from,to\ncustomer,ACCT-1001,cust_acme\nprice,VAT 25%,\n";
        let old = mapped_csv(
            "customer,price,quantity,amount,currency\n\
             ACCT-1001,resolutions,2,42.87,SEK\n\
             ACCT-1001,VAT 25%,1,10.72,SEK\n",
            map,
        )
        .unwrap();
        let tally = json(
            r#"{"customer":"cust_acme","price":"resolutions","quantity":"2","amount":"42.87","currency":"sek"}"#,
        );
        let shown = report(&old, &tally);
        assert!(shown.contains("Differ: 0 lines."), "{shown}");
        assert!(
            shown.contains("expected old.csv: 1 line; 1 line renamed by the map; 1 line of prices the map leaves out"),
            "{shown}"
        );
        // A customer whose only line is left out was still mapped: not an unused entry.
        let only_tax = mapped_csv(
            "customer,price,quantity,amount,currency\nACCT-1001,VAT 25%,1,10.72,SEK\n",
            map,
        )
        .unwrap();
        assert!(
            only_tax.unused_map_entries.is_empty(),
            "{:?}",
            only_tax.unused_map_entries
        );
        let both = IdMap::parse("map.csv", "kind,from,to\nprice,VAT,\nprice,VAT,tax\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            both,
            "map.csv line 3: price \"VAT\" is both mapped and left out"
        );
        let customer = IdMap::parse("map.csv", "kind,from,to\ncustomer,ACCT-1,\n")
            .unwrap_err()
            .to_string();
        assert!(
            customer.starts_with("map.csv line 2: to must be given for a customer"),
            "{customer}"
        );
        let plan = IdMap::parse("map.csv", "kind,from,to\nplan,a,\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            plan,
            "map.csv line 2: kind \"plan\" is neither customer nor price"
        );
    }

    #[test]
    fn a_map_that_cannot_be_followed_is_refused_saying_where() {
        let refused = |map: &str| IdMap::parse("map.csv", map).unwrap_err().to_string();
        assert_eq!(
            refused("kind,old,new\ncustomer,a,b\n"),
            "map.csv: the header row must name kind, from and to (it has kind, old, new)"
        );
        assert_eq!(
            refused("kind,from,to\nplan,a,b\n"),
            "map.csv line 2: kind \"plan\" is neither customer nor price"
        );
        assert_eq!(
            refused("kind,from,to\ncustomer,,b\n"),
            "map.csv line 2: from must be given"
        );
        assert_eq!(
            refused("kind,from,to\ncustomer,a,b\nprice,a,c\ncustomer,a,c\n"),
            "map.csv line 4: customer \"a\" is mapped to \"c\" here and to \"b\" at map.csv line 2"
        );
        let two_currencies = mapped_csv(
            "customer,price,quantity,amount,currency\n\
             ACCT-1001,AI resolutions (included),100,49.00,usd\n\
             ACCT-1001,AI resolutions (overage),20,17.80,eur\n",
            OLD_BILLER_MAP,
        );
        assert_eq!(
            two_currencies.err().unwrap().to_string(),
            "old.csv line 3: the map makes it a line of customer \"cust_acme\", price \"resolutions\" with old.csv line 2 (in usd), but it is in eur and that one in usd; lines in two currencies cannot be added"
        );
    }

    #[test]
    fn only_the_customers_of_the_chosen_source_are_compared_and_the_rest_counted() {
        let line = |customer: &str| {
            format!(
                r#"{{"customer":"{customer}","price":"p","quantity":"1","amount":"1.00","currency":"usd"}}"#
            )
        };
        let sources = || {
            // The other biller still bills a and b; Tally rates everyone, and c wrongly.
            let old = json(&[line("a"), line("b")].join("\n"));
            let mut tally = json(&[line("a"), line("c"), line("d")].join("\n"));
            tally.name = "tally.jsonl".into();
            (old, tally)
        };
        let compared = |scope| {
            let (mut old, mut tally) = sources();
            keep_customers(scope, &mut old, &mut tally).unwrap();
            let differing: Vec<String> =
                (Reconciliation::of(&old, &tally, Compared::QuantitiesAndAmounts)
                    .unwrap()
                    .differences)
                    .iter()
                    .map(|d| d.key.customer.clone())
                    .collect();
            (differing, report(&old, &tally))
        };
        assert_eq!(compared(CustomerScope::All).0, ["b", "c", "d"]);
        let (differing, shown) = compared(CustomerScope::Expected);
        assert_eq!(differing, ["b"]);
        assert!(
            shown.contains("actual   tally.jsonl: 1 line; 2 lines of 2 customers not compared (--customers) left out"),
            "{shown}"
        );
        assert_eq!(compared(CustomerScope::Actual).0, ["c", "d"]);
        let (differing, shown) = compared(CustomerScope::Both);
        assert!(differing.is_empty(), "{shown}");
        assert!(
            shown.contains("expected a.jsonl: 1 line; 1 line of 1 customer not compared (--customers) left out: b\n"),
            "{shown}"
        );
        assert!(
            shown.contains("actual   tally.jsonl: 1 line; 2 lines of 2 customers not compared (--customers) left out: c, d\n"),
            "{shown}"
        );

        // No customer in common: nothing would be compared, which is not agreement.
        let mut old = json(&line("ACCT-1"));
        let mut tally = json(&[line("a"), line("b")].join("\n"));
        tally.name = "tally.jsonl".into();
        let refused = keep_customers(CustomerScope::Both, &mut old, &mut tally).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "no customer has lines in both sources, so nothing would be compared: a.jsonl has 1 customer (ACCT-1), tally.jsonl has 2 customers (a, b). Do the two name customers differently? --map translates the other biller's ids"
        );
        let many: BTreeSet<String> = (0..7).map(|n| format!("c{n}")).collect();
        assert_eq!(listed(&many), "c0, c1, c2, c3, c4 and 2 more");
    }

    #[test]
    fn lines_of_one_key_on_different_invoices_are_added_together_and_others_refused() {
        let header = "invoice,customer,price,quantity,amount,currency\n";
        let netted = csv(&format!(
            "{header}INV-42,cust_acme,resolutions,2,42.88,USD\nCN-7,cust_acme,resolutions,0,-0.01,USD\nINV-42,cust_acme,seats,1,10,USD\n"
        ));
        let resolutions = &netted.by_key[&LineKey {
            customer: "cust_acme".into(),
            price: "resolutions".into(),
            adjusts: None,
        }];
        assert_eq!(
            (resolutions.quantity, resolutions.amount),
            (Decimal::from(2), Decimal::new(4287, 2))
        );
        assert_eq!(resolutions.at, "b.csv line 2 + b.csv line 3");
        assert_eq!((netted.by_key.len(), netted.netted), (2, 1));
        let shown = report(&netted, &netted);
        assert!(
            shown.contains("expected b.csv: 2 lines; 1 line added to another invoice's line of the same customer and price"),
            "{shown}"
        );

        let refused = |rows: &str| error("old.csv", &format!("{header}{rows}"), FileFormat::Csv);
        // One invoice, or a line naming none, cannot tell two lines apart.
        for rows in [
            "INV-1,a,p,1,1,usd\nINV-1,a,p,1,1,usd\n",
            "INV-1,a,p,1,1,usd\n,a,p,1,1,usd\n",
            ",a,p,1,1,usd\nINV-2,a,p,1,1,usd\n",
        ] {
            assert!(
                refused(rows).starts_with("old.csv line 3: a second line for customer \"a\""),
                "{rows}: {}",
                refused(rows)
            );
        }
        assert_eq!(
            refused("INV-1,a,p,1,1,usd\nCN-1,a,p,0,-1,eur\n"),
            "old.csv line 3: another invoice's line of customer \"a\", price \"p\" with old.csv line 2 (in usd), but it is in eur and that one in usd; lines in two currencies cannot be added"
        );
    }

    #[test]
    fn a_numbered_invoice_is_read_and_only_comparing_nothing_is_refused() {
        let line = |invoice: &str, amount: &str| {
            format!(
                r#"{{"customer":"a","price":"p","quantity":"1","amount":"{amount}","currency":"usd","invoice":{invoice}}}"#
            )
        };
        let netted = json(&[line("1001", "10"), line("\"CN-7\"", "-1")].join("\n"));
        assert_eq!(
            netted.by_key.values().next().unwrap().amount,
            Decimal::from(9)
        );

        // A biller that billed nothing against Tally's zero lines: compared, and agreed.
        let nothing = csv("customer,price,quantity,amount,currency\n");
        let zero =
            json(r#"{"customer":"a","price":"p","quantity":"0","amount":"0","currency":"usd"}"#);
        ensure_something_to_compare(november(), [&nothing, &zero]).unwrap();
        assert!(
            Reconciliation::of(&nothing, &zero, Compared::QuantitiesAndAmounts)
                .unwrap()
                .agrees()
        );
        // Two empty sources, or one with lines of other months only: nothing to compare.
        let refused = ensure_something_to_compare(november(), [&nothing, &nothing]);
        assert!(refused
            .unwrap_err()
            .to_string()
            .starts_with("neither b.csv nor b.csv has a line of 2026-11"));
        let october =
            csv("customer,price,quantity,amount,currency,period_start\na,p,1,1,usd,2026-10\n");
        assert_eq!(
            ensure_something_to_compare(november(), [&october, &zero])
                .unwrap_err()
                .to_string(),
            "b.csv has no line of 2026-11 (only 1 line of other months): is --period right?"
        );
    }

    #[test]
    fn a_spreadsheets_export_is_read_with_its_separator_decimal_comma_and_grouping() {
        let figures = |lines: &Lines| -> Vec<(String, String)> {
            (lines.by_key.values())
                .map(|f| (f.quantity.to_string(), f.amount.to_string()))
                .collect()
        };
        // Excel in much of Europe: `;`, decimal commas, points or spaces grouping
        // thousands, headers in any case.
        let semicolons = csv("Customer;Price;Quantity;Amount;Currency\n\
             cust_a;resolutions;1.234;1.234,56;EUR\n\
             cust_b;resolutions;2;\u{a0}1\u{a0}049,5 ;eur\n\
             cust_c;resolutions;0;-0,01;EUR\n");
        assert_eq!(
            figures(&semicolons),
            [
                ("1234".into(), "1234.56".into()),
                ("2".into(), "1049.5".into()),
                ("0".into(), "-0.01".into())
            ]
        );
        assert_eq!(
            semicolons.dialect.unwrap().describe(),
            "read as CSV separated by ';', with decimal commas"
        );
        let tabs = csv("customer\tprice\tquantity\tamount\tcurrency\ncust_a\tr\t3\t12.50\tusd\n");
        assert_eq!(figures(&tabs), [("3".into(), "12.50".into())]);
        assert_eq!(
            tabs.dialect.unwrap().describe(),
            "read as CSV separated by tabs, with decimal points"
        );
        // Tally's own form, and grouping with a decimal point.
        let commas =
            csv("customer,price,quantity,amount,currency\ncust_a,r,\"1,000\",\"1,234.50\",usd\n");
        assert_eq!(figures(&commas), [("1000".into(), "1234.50".into())]);
        assert!(commas.dialect.is_none());
        // Digits grouped otherwise are refused, never guessed at.
        for (text, figure) in [
            (
                "customer,price,quantity,amount,currency\na,r,1,\"12,5\",usd\n",
                "\"12,5\"",
            ),
            (
                "customer;price;quantity;amount;currency\na;r;1;1.2345,6;eur\n",
                "\"1.2345,6\"",
            ),
            (
                "customer;price;quantity;amount;currency\na;r;1;1,5;eur\nb;r;1;2.5;eur\n",
                "\"2.5\"",
            ),
        ] {
            let error = error("x.csv", text, FileFormat::Csv);
            assert!(
                error.contains(&format!(
                    "{figure} is not a number as this file writes them"
                )),
                "{error}"
            );
        }
    }

    #[test]
    fn a_files_format_is_told_by_its_content_and_ids_are_trimmed() {
        assert!(matches!(
            FileFormat::of("  {\"customer\":\"a\"}"),
            FileFormat::JsonLines
        ));
        assert!(matches!(FileFormat::of(""), FileFormat::JsonLines));
        assert!(matches!(
            FileFormat::of("customer,price\n"),
            FileFormat::Csv
        ));
        let lines =
            csv("customer,price,quantity,amount,currency\n cust_acme , resolutions,2,42.87,USD\n");
        let key = lines.by_key.keys().next().unwrap();
        assert_eq!(
            (key.customer.as_str(), key.price.as_str()),
            ("cust_acme", "resolutions")
        );
    }
}
