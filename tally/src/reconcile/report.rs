//! The comparison itself. In: both sources' [`Lines`]; out: the lines that agree and
//! those that differ (and how), both sources' totals per invoice and per currency, the
//! printed report and the `--differences` CSV file.

use std::collections::BTreeMap;
use std::io::{self, Write};

use anyhow::Context;
use rust_decimal::Decimal;
use tally_schemas::decimal::{exact_add, ExactSum};
use tally_schemas::time::Period;

use super::lines::{Figures, LineKey, Lines};
use super::Compared;
use crate::report::{counted, csv_field, spreadsheet_text};

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

/// A line whose figures disagree, or that one source has and the other does not.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Difference<'l> {
    pub(super) key: &'l LineKey,
    expected: Option<&'l Figures>,
    actual: Option<&'l Figures>,
    compared: Compared,
}

/// What the two sources agree and disagree on.
#[derive(Debug)]
pub(super) struct Reconciliation<'l> {
    compared: Compared,
    pub(super) agreed: usize,
    /// Lines with zero quantity and amount that only one source has: a biller that
    /// leaves out zero lines agrees with one that writes them.
    pub(super) zero_on_one_side: usize,
    pub(super) differences: Vec<Difference<'l>>,
    /// Per currency: the expected and the actual total.
    pub(super) totals: BTreeMap<&'l str, (Decimal, Decimal)>,
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
    pub(super) fn add(
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
    pub(super) fn of(
        expected: &'l Lines,
        actual: &'l Lines,
        compared: Compared,
    ) -> anyhow::Result<Self> {
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

    pub(super) fn agrees(&self) -> bool {
        self.differences.is_empty()
    }

    pub(super) fn write_report(
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
            let read = counted(lines.by_key.len(), "line");
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
            counted(self.agreed + self.zero_on_one_side, "line"),
            counted(self.differences.len(), "line"),
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
                counted(self.differences.len(), "line")
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

    pub(super) fn write_differences(&self, out: &mut impl Write) -> io::Result<()> {
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
pub(super) fn difference(actual: Decimal, expected: Decimal) -> Option<Decimal> {
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
    pub(super) fn what(&self) -> &'static str {
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
    pub(super) fn csv_row(&self) -> [String; 13] {
        let (expected, actual) = (self.expected, self.actual);
        let cell = |f: Option<&Figures>, of: fn(&Figures) -> String| f.map_or_else(String::new, of);
        let quantity = |f: &Figures| f.quantity.to_string();
        let amount = |f: &Figures| f.amount.to_string();
        let currency = |f: &Figures| spreadsheet_text(&f.currency);
        let at = |f: &Figures| spreadsheet_text(&f.at);
        [
            spreadsheet_text(&self.key.customer),
            spreadsheet_text(&self.key.price),
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
