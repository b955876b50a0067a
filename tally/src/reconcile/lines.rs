//! One source's lines of the month, keyed the way two billers' lines are matched. In:
//! lines read from a file or from ClickHouse, then renamed by `--map` and narrowed by
//! `--customers`; out: one set of figures per (customer, price, adjusted month), lines of
//! one key on several invoices added together, and notes on what was left out.

use std::collections::{btree_map, BTreeMap, BTreeSet};

use anyhow::{bail, Context};
use rust_decimal::Decimal;
use tally_schemas::decimal::exact_add;
use tally_schemas::records::InvoiceLine;
use tally_schemas::time::Period;

use super::files::Dialect;
use super::map::IdMap;
use super::{listed, Compared};
use crate::report::counted;

/// What identifies a line across billers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct LineKey {
    pub(super) customer: String,
    pub(super) price: String,
    /// The closed month an adjustment line bills late usage of.
    pub(super) adjusts: Option<Period>,
}

/// What must agree, and where the line was read (for the report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Figures {
    pub(super) quantity: Decimal,
    pub(super) amount: Decimal,
    /// Lowercase ISO 4217, so `USD` and `usd` agree.
    pub(super) currency: String,
    /// The amount's parts, where the source gives them (Tally's lines do): not compared,
    /// but they tell an amount that differs by its discount alone.
    pub(super) parts: Option<AmountParts>,
    pub(super) at: String,
}

/// A line's subtotal and the discount taken off it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AmountParts {
    pub(super) subtotal: Decimal,
    pub(super) discount: Decimal,
}

impl Figures {
    pub(super) fn is_zero(&self, compared: Compared) -> bool {
        (self.quantity.is_zero() || compared == Compared::Amounts) && self.amount.is_zero()
    }

    pub(super) fn agrees_with(&self, other: &Figures, compared: Compared) -> bool {
        // Decimal equality is by value: 12.5 and 12.50 agree.
        (self.quantity == other.quantity || compared == Compared::Amounts)
            && self.amount == other.amount
            && self.currency == other.currency
    }
}

/// One source's lines of the month.
#[derive(Debug, Default)]
pub(super) struct Lines {
    /// How the report names the source.
    pub(super) name: String,
    pub(super) by_key: BTreeMap<LineKey, Figures>,
    /// Lines of other months, left out.
    pub(super) other_periods: usize,
    /// Lines the map renamed, and how many of them were added to another.
    mapped: usize,
    /// Lines of prices the map leaves out.
    left_out_by_map: usize,
    added_together: usize,
    /// Lines added to another invoice's line of the same key (a credit note, say).
    pub(super) netted: usize,
    /// The invoices each key's lines were read from (`None`: a line naming none).
    invoices: BTreeMap<LineKey, BTreeSet<Option<String>>>,
    /// Lines of customers `--customers` leaves out, and those customers.
    other_customers_lines: usize,
    /// Adjustment lines `--without-adjustments` leaves out.
    adjustments_left_out: usize,
    /// Adjustment lines of the month billed in later ones, added to its own lines
    /// (`--with-later-adjustments`).
    later_adjustments_added: usize,
    /// Adjustment lines of the month billed in later ones, not added (a `clickhouse`
    /// source without `--with-later-adjustments`).
    pub(super) later_adjustments_not_added: usize,
    other_customers: BTreeSet<String>,
    /// How a CSV file was read, when not as Tally writes it.
    pub(super) dialect: Option<Dialect>,
    /// A CSV file's columns that are neither read nor Tally's own.
    pub(super) ignored_columns: Vec<String>,
    /// A CSV file's header row as written, lower case (none for other sources).
    pub(super) csv_headers: Vec<String>,
    /// Total rows ([`super::files`]), left out.
    pub(super) unnamed_rows: usize,
    /// Map entries (`kind id`) that renamed none of the source's lines.
    pub(super) unused_map_entries: BTreeSet<String>,
}

impl Lines {
    pub(super) fn named(name: String) -> Self {
        Lines {
            name,
            ..Lines::default()
        }
    }

    /// Adds a line read from `invoice` (when the source names invoices). Lines of one
    /// key from different invoices (a credit note, a second invoice) are added
    /// together: what the month billed is their sum.
    pub(super) fn add(
        &mut self,
        key: LineKey,
        figures: Figures,
        invoice: Option<&str>,
    ) -> anyhow::Result<()> {
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
    pub(super) fn renamed(mut self, map: &IdMap) -> anyhow::Result<Lines> {
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
            if self.insert_or_add(key, figures, "the map makes it a line of")? {
                self.added_together += 1;
            }
        }
        self.unused_map_entries = map.entries().filter(|e| !used.contains(e)).collect();
        Ok(self)
    }

    /// Adds `figures` as `key`'s line, or to the line `key` has ([`add_to`], `how`
    /// saying why); whether it had one.
    fn insert_or_add(&mut self, key: LineKey, figures: Figures, how: &str) -> anyhow::Result<bool> {
        match self.by_key.entry(key) {
            btree_map::Entry::Vacant(entry) => {
                entry.insert(figures);
                Ok(false)
            }
            btree_map::Entry::Occupied(entry) => {
                let key = entry.key().clone();
                add_to(entry.into_mut(), figures, &key, how)?;
                Ok(true)
            }
        }
    }

    pub(super) fn add_invoice_line(&mut self, line: InvoiceLine, at: String) -> anyhow::Result<()> {
        let (key, figures) = key_and_figures(line, at);
        self.add(key, figures, None)
    }

    /// Adds `line`, an adjustment of this month billed in a later one (its usage that
    /// arrived after it closed), to the month's own line of its customer and price:
    /// an adjustment bills that line rated again less what it had billed, so the two
    /// add up to the month as `tally rate` bills it.
    pub(super) fn add_later_adjustment(
        &mut self,
        line: InvoiceLine,
        at: String,
    ) -> anyhow::Result<()> {
        let (mut key, figures) = key_and_figures(line, at);
        key.adjusts = None;
        self.insert_or_add(key, figures, "an adjustment billed later adds")?;
        self.later_adjustments_added += 1;
        Ok(())
    }

    /// How the source was read, and what of it was left out or changed on the way, for
    /// the report.
    pub(super) fn notes(&self) -> Vec<String> {
        let mut notes: Vec<String> = self.dialect.iter().map(Dialect::describe).collect();
        if self.mapped > 0 {
            let added = match self.added_together {
                0 => String::new(),
                n => format!(", {n} of them added to another line"),
            };
            notes.push(format!(
                "{} renamed by the map{added}",
                counted(self.mapped, "line")
            ));
        }
        if self.left_out_by_map > 0 {
            notes.push(format!(
                "{} of prices the map leaves out",
                counted(self.left_out_by_map, "line")
            ));
        }
        if self.netted > 0 {
            notes.push(format!(
                "{} added to another invoice's line of the same customer and price",
                counted(self.netted, "line")
            ));
        }
        if self.other_periods > 0 {
            notes.push(format!(
                "{} of other months left out",
                counted(self.other_periods, "line")
            ));
        }
        if self.unnamed_rows > 0 {
            notes.push(format!(
                "{} naming no price and no customer, or Total in its place (totals) left out",
                counted(self.unnamed_rows, "row")
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
        if self.adjustments_left_out > 0 {
            notes.push(format!(
                "{} of earlier months left out",
                counted(self.adjustments_left_out, "adjustment line")
            ));
        }
        if self.later_adjustments_not_added > 0 {
            notes.push(format!(
                "{} of this month billed in later ones (its late usage) not added: --with-later-adjustments adds them, as tally rate bills the month",
                counted(self.later_adjustments_not_added, "adjustment line")
            ));
        }
        if self.later_adjustments_added > 0 {
            notes.push(format!(
                "{} of this month billed in later ones (its late usage) added to its lines",
                counted(self.later_adjustments_added, "adjustment line")
            ));
        }
        if self.other_customers_lines > 0 {
            notes.push(format!(
                "{} of {} not compared (--customers) left out: {}",
                counted(self.other_customers_lines, "line"),
                counted(self.other_customers.len(), "customer"),
                listed(&self.other_customers)
            ));
        }
        notes
    }

    pub(super) fn customers(&self) -> BTreeSet<String> {
        self.by_key.keys().map(|key| key.customer.clone()).collect()
    }

    /// Leaves out, and counts, the adjustment lines.
    pub(super) fn leave_out_adjustments(&mut self) {
        let before = self.by_key.len();
        self.by_key.retain(|key, _| key.adjusts.is_none());
        self.adjustments_left_out += before - self.by_key.len();
    }

    /// Leaves out, and counts, the lines of customers not in `compared`.
    pub(super) fn keep_customers(&mut self, compared: &BTreeSet<String>) {
        let (kept, left_out) = std::mem::take(&mut self.by_key)
            .into_iter()
            .partition(|(key, _)| compared.contains(&key.customer));
        self.by_key = kept;
        let left_out: BTreeMap<LineKey, Figures> = left_out;
        self.other_customers_lines += left_out.len();
        (self.other_customers).extend(left_out.into_keys().map(|key| key.customer));
    }
}

/// A Tally line's key and what it bills; `at` says where it was read.
fn key_and_figures(line: InvoiceLine, at: String) -> (LineKey, Figures) {
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
    (key, figures)
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
