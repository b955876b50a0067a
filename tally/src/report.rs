//! Invoice lines rendered for people and programs: JSON lines, CSV, or a table with
//! per-customer totals.

use std::collections::BTreeMap;
use std::io::{self, Write};

use clap::ValueEnum;
use rust_decimal::Decimal;
use tally_schemas::decimal::exact_add;
use tally_schemas::records::{InvoiceLine, TierCharge};
use tally_schemas::time::rfc3339;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per line, decimals as strings.
    Json,
    /// A header row, then one row per line; `tiers` as readable text.
    Csv,
    /// Aligned columns with a total per customer and per currency.
    Table,
}

pub fn write_lines(format: Format, lines: &[InvoiceLine], out: &mut impl Write) -> io::Result<()> {
    match format {
        Format::Json => {
            for line in lines {
                serde_json::to_writer(&mut *out, line)?;
                out.write_all(b"\n")?;
            }
            Ok(())
        }
        Format::Csv => write_csv(lines, out),
        Format::Table => write_table(lines, out),
    }
}

/// The columns of `--format csv`.
pub const CSV_HEADER: &str = "id,config_hash,customer,plan,price,meter,period_start,period_end,quantity,subtotal,discount,amount,currency,tiers";

pub fn write_csv(lines: &[InvoiceLine], out: &mut impl Write) -> io::Result<()> {
    writeln!(out, "{CSV_HEADER}")?;
    for l in lines {
        let fields = [
            l.id.clone(),
            l.config_hash.clone(),
            l.customer.clone(),
            l.plan.clone(),
            l.price.clone(),
            l.meter.clone(),
            rfc3339(l.period_start),
            rfc3339(l.period_end),
            l.quantity.to_string(),
            l.subtotal.to_string(),
            l.discount.to_string(),
            l.amount.to_string(),
            l.currency.clone(),
            tiers_text(&l.tiers),
        ];
        let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        writeln!(out, "{}", row.join(","))?;
    }
    Ok(())
}

/// What a cell a spreadsheet reads as a formula starts with (CSV injection).
const SPREADSHEET_FORMULA_STARTS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// Text another system wrote (an old biller's ids), as a CSV cell's text for a
/// spreadsheet: one that would be read as a formula (CSV injection) starts with `'`,
/// which spreadsheets show as text. A price book's ids are the operator's own, written
/// as they are (a customer id may be a phone number, `+4670...`).
pub fn spreadsheet_text(field: &str) -> String {
    if field.starts_with(SPREADSHEET_FORMULA_STARTS) {
        format!("'{field}")
    } else {
        field.to_owned()
    }
}

pub fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

/// `tier 1 (up to 100): 100 x 0 + 49 = 49; tier 2 (up to 1000): 150 x 0.89 = 133.5`,
/// or for a package price `tier 1 (up to inf): 654 packages of 1000 x 0.002 = 1.308`.
pub fn tiers_text(tiers: &[TierCharge]) -> String {
    tiers.iter().map(tier_text).collect::<Vec<_>>().join("; ")
}

/// One tier of [`tiers_text`].
pub fn tier_text(tier: &TierCharge) -> String {
    format!(
        "tier {} (up to {}): {}",
        tier.tier,
        tier.up_to,
        tier_arithmetic(tier)
    )
}

/// A tier's charge worked out: `654 packages of 1000 x 0.002 = 1.308`, `3 x 0 + 49 = 49`.
pub fn tier_arithmetic(tier: &TierCharge) -> String {
    let flat = if tier.flat_amount.is_zero() {
        String::new()
    } else {
        format!(" + {}", tier.flat_amount)
    };
    let units = match tier.package_size {
        Some(size) => format!("{} of {size}", packages(tier.quantity)),
        None => tier.quantity.to_string(),
    };
    // A charge finer than 28 decimals is stored as the nearest decimal: shown so, it
    // could round to another cent than the line does.
    let exact = tier.exact_amount();
    let amount = match exact.to_decimal() == Some(tier.amount) {
        true => tier.amount.to_string(),
        false => exact.to_string(),
    };
    format!("{units} x {}{flat} = {amount}", tier.unit_amount)
}

/// `1 meter`, `3 meters`: `noun` (whose plural takes an `s`) counted.
pub fn counted(n: usize, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// `1 package`, `3 packages`.
pub fn packages(n: Decimal) -> String {
    match n == Decimal::ONE {
        true => "1 package".to_owned(),
        false => format!("{n} packages"),
    }
}

/// Invoice totals: per (currency, customer, plan), and per currency with the number of
/// customers invoiced in it. Amounts are exact; a total past the largest exact decimal is
/// an error rather than a wrong figure.
#[derive(Debug, Default)]
pub struct Totals<'a> {
    pub per_customer: BTreeMap<(&'a str, &'a str, &'a str), Decimal>,
    pub per_currency: BTreeMap<&'a str, (Decimal, usize)>,
}

/// The error of an invoice total no exact decimal holds, wherever totals are made.
pub fn total_too_large() -> io::Error {
    io::Error::other("an invoice total cannot be held exactly (more than 28 significant digits, or past about 7.9e28)")
}

impl<'a> Totals<'a> {
    pub fn of(lines: &'a [InvoiceLine]) -> io::Result<Self> {
        let mut totals = Totals::default();
        for l in lines {
            let t = totals
                .per_customer
                .entry((&l.currency, &l.customer, &l.plan))
                .or_default();
            *t = exact_add(*t, l.amount).ok_or_else(total_too_large)?;
        }
        for ((currency, _, _), total) in &totals.per_customer {
            let c = totals.per_currency.entry(currency).or_default();
            c.0 = exact_add(c.0, *total).ok_or_else(total_too_large)?;
            c.1 += 1;
        }
        Ok(totals)
    }
}

pub fn write_table(lines: &[InvoiceLine], out: &mut impl Write) -> io::Result<()> {
    let totals = Totals::of(lines)?;
    let mut by_customer: BTreeMap<&str, Vec<&InvoiceLine>> = BTreeMap::new();
    for l in lines {
        by_customer.entry(&l.customer).or_default().push(l);
    }
    for (customer, lines) in &by_customer {
        let first = lines[0];
        writeln!(
            out,
            "{customer}  plan {}  {} to {}",
            first.plan,
            first.period_start.format("%Y-%m-%d"),
            first.period_end.format("%Y-%m-%d")
        )?;
        writeln!(
            out,
            "  {:<20} {:<14} {:>16} {:>14} {:>12} {:>14}",
            "price", "meter", "quantity", "subtotal", "discount", "amount"
        )?;
        for l in lines {
            writeln!(
                out,
                "  {:<20} {:<14} {:>16} {:>14} {:>12} {:>14} {}",
                l.price, l.meter, l.quantity, l.subtotal, l.discount, l.amount, l.currency
            )?;
        }
        for ((currency, _, _), total) in totals
            .per_customer
            .iter()
            .filter(|((_, c, _), _)| c == customer)
        {
            writeln!(
                out,
                "  {:<20} {:>74} {currency}",
                "total",
                total.to_string()
            )?;
        }
        writeln!(out)?;
    }
    for (currency, (total, customers)) in &totals.per_currency {
        writeln!(
            out,
            "all customers billed in {currency} ({customers}): {total} {currency}"
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_what_needs_quoting() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn text_a_spreadsheet_would_run_as_a_formula_is_shown_as_text() {
        for formula in [
            "=HYPERLINK(\"x\")",
            "+cust",
            "-2+3",
            "@SUM(1)",
            "\tx",
            "\rx",
        ] {
            assert_eq!(spreadsheet_text(formula), format!("'{formula}"));
        }
        assert_eq!(spreadsheet_text("cust_acme"), "cust_acme");
        assert_eq!(spreadsheet_text("a=b"), "a=b");
    }

    #[test]
    fn a_tier_is_worked_out_in_words_that_agree_with_its_numbers() {
        let tier = |quantity: i64, package_size: Option<i64>, flat: i64| TierCharge {
            tier: 2,
            up_to: "inf".to_owned(),
            quantity: Decimal::from(quantity),
            package_size: package_size.map(Decimal::from),
            unit_amount: Decimal::new(2, 3),
            flat_amount: Decimal::from(flat),
            amount: Decimal::new(2, 3) * Decimal::from(quantity) + Decimal::from(flat),
        };
        assert_eq!(
            tier_text(&tier(1, Some(1000), 0)),
            "tier 2 (up to inf): 1 package of 1000 x 0.002 = 0.002"
        );
        assert_eq!(
            tier_arithmetic(&tier(3, Some(1000), 0)),
            "3 packages of 1000 x 0.002 = 0.006"
        );
        assert_eq!(
            tier_arithmetic(&tier(3, None, 49)),
            "3 x 0.002 + 49 = 49.006"
        );
    }

    #[test]
    fn a_tier_charge_no_decimal_holds_is_shown_with_every_digit() {
        let unit_amount: Decimal = "2.0009999999999999999999999999".parse().unwrap();
        let tier = TierCharge {
            tier: 1,
            up_to: "inf".to_owned(),
            quantity: Decimal::from(5),
            package_size: None,
            unit_amount,
            flat_amount: Decimal::ZERO,
            // What the line stores: the nearest decimal, which would round to 10.01.
            amount: "10.005".parse().unwrap(),
        };
        assert_eq!(
            tier_arithmetic(&tier),
            "5 x 2.0009999999999999999999999999 = 10.0049999999999999999999999995"
        );
    }
}
