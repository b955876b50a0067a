//! Reading a file of invoice lines. In: the text of JSON lines as `tally rate --format
//! json` writes them, or of CSV as `--format csv` writes it or another biller or a
//! spreadsheet exports it (another separator, decimal commas, grouped digits, renamed
//! columns), and the month compared; out: that month's [`Lines`], or an error naming the
//! file, its line and what is wrong.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::str::FromStr;

use anyhow::{bail, Context};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;
use tally_schemas::decimal::parse_exact;
use tally_schemas::money::Currency;
use tally_schemas::time::Period;

use super::lines::{AmountParts, Figures, LineKey, Lines};
use crate::report::CSV_HEADER;

/// The name `--column` gives a header to leave its column out unchecked (a cohort's
/// month, say, that is not the line's).
const IGNORED_COLUMN: &str = "ignore";

/// How a CSV file's headers are read: each one `--column` names as Tally's column.
#[derive(Debug, Default)]
pub(super) struct ColumnNames(pub(super) Vec<(String, String)>);

impl ColumnNames {
    /// The column a header (lower case, trimmed) is read as.
    fn name_of(&self, header: String) -> String {
        (self.0.iter())
            .find(|(_, their)| *their == header)
            .map_or(header, |(name, _)| name.clone())
    }
}

/// `NAME=HEADER` of `--column`: NAME one of Tally's columns, HEADER kept lower case.
pub(super) fn column_name(text: &str) -> Result<(String, String), String> {
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

pub(super) fn read_file(
    path: &str,
    period: Period,
    columns: &ColumnNames,
) -> anyhow::Result<Lines> {
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
pub(super) enum FileFormat {
    JsonLines,
    Csv,
}

impl FileFormat {
    /// Told by the content, not the name: JSON lines start with an object, a CSV file
    /// with its header row (an empty file has no lines either way).
    pub(super) fn of(text: &str) -> FileFormat {
        match text.trim_start().chars().next() {
            Some('{') | None => FileFormat::JsonLines,
            Some(_) => FileFormat::Csv,
        }
    }
}

/// A file's lines of `period`, named `name` in the report and in errors.
pub(super) fn lines_of_text(
    name: &str,
    text: &str,
    format: FileFormat,
    period: Period,
    columns: &ColumnNames,
) -> anyhow::Result<Lines> {
    let mut lines = Lines::named(name.to_owned());
    let (rows, dialect) = match format {
        FileFormat::Csv => {
            let csv = csv_rows(name, text, period, columns)?;
            lines.ignored_columns = csv.ignored;
            lines.csv_headers = csv.headers;
            (csv.rows, Some(csv.dialect))
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
        if row.adds_up_others() {
            lines.unnamed_rows += 1;
            continue;
        }
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

impl Row {
    /// A total row, not a line: it names no price, and no customer or a word such as
    /// "Total" where the customer or the month would be (a spreadsheet's sum row).
    fn adds_up_others(&self) -> bool {
        let total_word = |cell: &str| {
            let word = cell
                .trim()
                .trim_end_matches(':')
                .trim_end()
                .to_ascii_lowercase();
            ["total", "totals", "subtotal", "grand total", "sum"].contains(&word.as_str())
        };
        self.price.trim().is_empty()
            && (self.customer.trim().is_empty()
                || total_word(&self.customer)
                || given(&self.period_start).is_some_and(total_word))
    }
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
pub(super) struct Dialect {
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

    pub(super) fn describe(&self) -> String {
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

/// A CSV file's lines as read.
struct CsvRows {
    rows: Vec<NumberedRow>,
    dialect: Dialect,
    /// The columns not read, but for those of Tally's own CSV.
    ignored: Vec<String>,
    /// The header row as written, lower case.
    headers: Vec<String>,
}

/// A header row naming at least customer, price, quantity, amount and currency (in any
/// order and case; other columns are ignored), then one row per line. The separator
/// is the first of `,`, `;` and tab that splits the header row into those columns; a
/// file separated otherwise than by `,` has decimal commas if any of its figures has a
/// comma.
fn csv_rows(
    name: &str,
    text: &str,
    period: Period,
    columns: &ColumnNames,
) -> anyhow::Result<CsvRows> {
    // The header row as written (lower case, trimmed), and as read.
    let header_row = |separator: u8| -> anyhow::Result<(Vec<String>, csv::StringRecord)> {
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(separator)
            .from_reader(text.as_bytes());
        let headers =
            (reader.headers()).with_context(|| format!("{name}: cannot read the header row"))?;
        let written: Vec<String> = (headers.iter())
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        let read = written.iter().map(|h| columns.name_of(h.clone())).collect();
        Ok((written, read))
    };
    let has_columns = |headers: &csv::StringRecord| {
        REQUIRED_COLUMNS
            .iter()
            .all(|column| headers.iter().any(|h| h == *column))
    };
    let mut separator = Dialect::TALLYS.separator;
    let (mut written, mut headers) = header_row(separator)?;
    for other in &Dialect::SEPARATORS[1..] {
        if has_columns(&headers) {
            break;
        }
        let tried = header_row(*other)?;
        if has_columns(&tried.1) {
            (separator, (written, headers)) = (*other, tried);
        }
    }
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(separator)
        .from_reader(text.as_bytes());
    let missing: Vec<&str> = (REQUIRED_COLUMNS.iter().copied())
        .filter(|column| !headers.iter().any(|h| h == *column))
        .collect();
    // A `--column` that was to give one of them, under a header this file lacks.
    let slips: Vec<String> = (columns.0.iter())
        .filter(|(column, header)| missing.contains(&column.as_str()) && !written.contains(header))
        .map(|(column, header)| format!("--column {column}={header} names no header of it; "))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{name}: the header row has no column {}; {}it needs {} (other columns are ignored), and has {}",
        missing.join(", "),
        slips.concat(),
        REQUIRED_COLUMNS.join(", "),
        written.join(", ")
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
                return Ok(CsvRows {
                    rows,
                    dialect,
                    ignored,
                    headers: written,
                });
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
pub(super) struct LineNumbers<'t> {
    text: &'t [u8],
    /// Where the last record started, and its line.
    byte: usize,
    line: usize,
}

impl<'t> LineNumbers<'t> {
    pub(super) fn of(text: &'t str) -> Self {
        LineNumbers {
            text: text.as_bytes(),
            byte: 0,
            line: 1,
        }
    }

    pub(super) fn at(&mut self, position: Option<&csv::Position>) -> usize {
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
pub(super) fn csv_error(error: &csv::Error, headers: &csv::StringRecord) -> String {
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
