//! `tally explain`: one customer's invoice of a month, worked through so that finance
//! and support can redo every figure by hand.
//!
//! In: the lines `tally rate` makes of an events file, the customer's events by what
//! became of them, its usage windows and its unbilled usage. Out: text, per line where
//! the quantity comes from (the meter, the series it adds up, the usage per day), each
//! tier's arithmetic, the rounding, the discount and the amount; then the invoice's
//! total. Every figure shown is the line's own, so it is `tally rate`'s to the cent.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::Arc;

use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::Serialize;
use tally_schemas::config::{Aggregation, Config, Customer, Meter};
use tally_schemas::price::{Discount, Price, Rate, TiersMode};
use tally_schemas::records::{InvoiceLine, SeriesKey, WindowUsage};
use tally_schemas::time::Period;

use crate::report::{tier_text, Totals};
use crate::summary::{CustomerEvents, UnbilledUsage};

/// Days listed on one row of a line's usage by day.
const DAYS_PER_ROW: usize = 5;

/// Everything one customer's explanation is made of.
#[derive(Debug)]
pub struct Explanation<'a> {
    pub config: &'a Config,
    pub period: Period,
    pub customer: &'a Customer,
    /// Where the events came from, as the user named it.
    pub source: &'a str,
    pub events: &'a CustomerEvents,
    /// The customer's lines to explain (all of them, or the one price asked for).
    pub lines: Vec<&'a InvoiceLine>,
    pub usage: &'a [(Arc<SeriesKey>, Vec<WindowUsage>)],
    /// The customer's usage of the period that no line bills.
    pub unbilled: Vec<&'a UnbilledUsage>,
}

pub fn write_explanation(out: &mut impl Write, e: &Explanation<'_>) -> io::Result<()> {
    let customer = &e.customer.id;
    let period = e.period;
    writeln!(
        out,
        "{customer}, {period} ({} to {} UTC)",
        period.start().format("%Y-%m-%d %H:%M"),
        period.end().format("%Y-%m-%d %H:%M")
    )?;
    if e.customer.bills(period) {
        let plan = e.config.plan(e.customer.subscription(period).plan);
        writeln!(
            out,
            "  plan {}, {}; each line rounded {} to {} decimals",
            plan.id,
            e.lines.first().map_or("", |l| l.currency.as_str()),
            snake_case(plan.rounding),
            plan.currency.minor_units()
        )?;
    } else {
        writeln!(
            out,
            "  not billed in {period} (its `from` or `through` in the price book): it has no lines, and its usage of the month is unbilled"
        )?;
    }
    writeln!(out, "  price book {}", e.config.hash)?;
    write_events(out, e)?;
    for line in &e.lines {
        writeln!(out)?;
        write_line(out, e, line)?;
    }
    if !e.unbilled.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "usage no line bills (no price of the plan selects it):"
        )?;
        for usage in &e.unbilled {
            writeln!(
                out,
                "  meter {}{}: {}",
                usage.meter,
                group_text(e.config, &usage.meter, &usage.group),
                usage.quantity
            )?;
        }
    }
    // A customer's lines of a month are in its plan's one currency.
    let lines: Vec<InvoiceLine> = e.lines.iter().map(|l| (*l).clone()).collect();
    let amounts: Vec<String> = lines.iter().map(|l| l.amount.to_string()).collect();
    for ((currency, _, _), total) in Totals::of(&lines)?.per_customer {
        writeln!(out)?;
        writeln!(out, "total {total} {currency} ({})", amounts.join(" + "))?;
    }
    Ok(())
}

/// What became of the customer's events in the file.
fn write_events(out: &mut impl Write, e: &Explanation<'_>) -> io::Result<()> {
    let events = e.events;
    writeln!(out, "  events in {}:", e.source)?;
    let counted: u64 = events.counted.values().sum();
    let by_type: Vec<String> = (events.counted.iter())
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    if by_type.is_empty() {
        writeln!(out, "    {:<20} 0", "counted")?;
    } else {
        writeln!(
            out,
            "    {:<20} {counted} ({})",
            "counted",
            by_type.join(", ")
        )?;
    }
    for (n, what, why) in [
        (
            events.duplicates,
            "retries",
            "same (source, id) and content as a counted event",
        ),
        (
            events.conflicts,
            "conflicting resends",
            "same (source, id) as a counted event, other content: the first one counts",
        ),
        (events.outside_period, "outside the month", "by event time"),
        (events.unmetered, "unmetered", "of a type no meter reads"),
        (events.refused, "refused", "a total would stop being exact"),
    ] {
        if n > 0 {
            writeln!(out, "    {what:<20} {n} ({why}; not counted)")?;
        }
    }
    writeln!(
        out,
        "    lines that fail validation name no customer: `tally rate` lists them in its rejects file"
    )
}

fn write_line(out: &mut impl Write, e: &Explanation<'_>, line: &InvoiceLine) -> io::Result<()> {
    let plan = e.config.plan(e.customer.subscription(e.period).plan);
    let Some((index, price)) = (plan.prices.iter().enumerate()).find(|(_, p)| p.id == line.price)
    else {
        return writeln!(out, "{}: not a price of plan {}", line.price, plan.id);
    };
    let meter = e.config.meter(price.meter);
    writeln!(
        out,
        "{}: {} {}   (line {})",
        line.price, line.amount, line.currency, line.id
    )?;
    writeln!(
        out,
        "  quantity  {}: {}{}",
        line.quantity,
        meter_text(meter),
        filter_text(meter, price)
    )?;
    write_usage(out, e, meter, price)?;
    write_charge(out, price, line)?;
    let charge: Decimal = line
        .tiers
        .iter()
        .map(|t| t.amount)
        .sum::<Decimal>()
        .normalize();
    writeln!(
        out,
        "  subtotal  {charge} rounded {} to {} decimals = {}",
        snake_case(plan.rounding),
        plan.currency.minor_units(),
        line.subtotal
    )?;
    let discount = match e.customer.subscription(e.period).discounts.get(&index) {
        None => "none".to_owned(),
        Some(Discount::PercentOff(percent)) => format!(
            "{percent} % of {} = {}, rounded {} = {}",
            line.subtotal,
            (line.subtotal * percent / Decimal::ONE_HUNDRED).normalize(),
            snake_case(plan.rounding),
            line.discount
        ),
        Some(Discount::AmountOff(off)) => {
            format!("{off} off, at most the subtotal = {}", line.discount)
        }
    };
    writeln!(out, "  discount  {discount}")?;
    writeln!(
        out,
        "  amount    {} - {} = {} {}",
        line.subtotal, line.discount, line.amount, line.currency
    )
}

/// The series the line adds up, and for meters whose days add up (or whose largest day
/// is the month's), the usage per UTC day.
fn write_usage(
    out: &mut impl Write,
    e: &Explanation<'_>,
    meter: &Meter,
    price: &Price,
) -> io::Result<()> {
    let series: Vec<&(Arc<SeriesKey>, Vec<WindowUsage>)> = (e.usage.iter())
        .filter(|(key, _)| key.meter == meter.slug && price.matches(&key.group))
        .collect();
    if series.is_empty() {
        return writeln!(out, "            no usage in the month");
    }
    // Meters whose days add up, or whose largest day is the month's.
    let combine: Option<fn(Decimal, Decimal) -> Decimal> = match meter.aggregation {
        Aggregation::Count | Aggregation::Sum(_) => Some(|a, b| a + b),
        Aggregation::Max(_) => Some(Decimal::max),
        Aggregation::UniqueCount(_) | Aggregation::Latest(_) => None,
    };
    let values = |windows: &[&WindowUsage]| {
        let combine = combine?;
        (windows.iter().map(|w| w.value.value)).reduce(combine)
    };
    if !meter.group_by.is_empty() {
        for (key, windows) in &series {
            let group = group_text(e.config, &key.meter, &key.group);
            let windows: Vec<&WindowUsage> = windows.iter().collect();
            match values(&windows) {
                Some(value) => writeln!(
                    out,
                    "            {}: {value} in {} windows",
                    group.trim_start(),
                    windows.len()
                )?,
                None => writeln!(
                    out,
                    "            {}: {} windows",
                    group.trim_start(),
                    windows.len()
                )?,
            }
        }
    }
    if combine.is_none() {
        return writeln!(
            out,
            "            (a month's {} is not made of its days', so none are listed)",
            meter.aggregation.kind().as_str()
        );
    }
    let mut by_day: BTreeMap<NaiveDate, Vec<&WindowUsage>> = BTreeMap::new();
    for window in series.iter().flat_map(|(_, windows)| windows) {
        (by_day.entry(window.window_start.date_naive()).or_default()).push(window);
    }
    let days: Vec<String> = (by_day.iter())
        .filter_map(|(day, windows)| Some(format!("{} {}", day.format("%b %d:"), values(windows)?)))
        .collect();
    for (row, chunk) in days.chunks(DAYS_PER_ROW).enumerate() {
        let label = if row == 0 { "by day:" } else { "" };
        writeln!(out, "            {label:<8}{}", chunk.join(", "))?;
    }
    Ok(())
}

/// How the quantity becomes the charge, tier by tier.
fn write_charge(out: &mut impl Write, price: &Price, line: &InvoiceLine) -> io::Result<()> {
    let how = match &price.rate {
        Rate::PerUnit { package: None, .. } => "per unit".to_owned(),
        Rate::PerUnit {
            package: Some(package),
            ..
        } => {
            let packages = line.tiers.first().map_or(Decimal::ZERO, |t| t.quantity);
            format!(
                "in packages of {}, rounded {}: {} / {} = {} -> {packages} packages",
                package.divide_by,
                snake_case(package.round),
                line.quantity,
                package.divide_by,
                (line.quantity / package.divide_by).normalize()
            )
        }
        Rate::Tiered {
            mode: TiersMode::Graduated,
            ..
        } => "graduated: each unit at the price of the tier it falls in, plus the flat fee of every tier reached".to_owned(),
        Rate::Tiered {
            mode: TiersMode::Volume,
            ..
        } => "volume: every unit at the price of the tier the whole quantity falls in, plus that tier's flat fee".to_owned(),
    };
    writeln!(out, "  charge    {how}")?;
    for tier in &line.tiers {
        writeln!(out, "            {}", tier_text(tier))?;
    }
    Ok(())
}

/// `counts ai.resolution events`, `sums $.tokens of llm.tokens events`.
fn meter_text(meter: &Meter) -> String {
    let events = &meter.event_type;
    let slug = &meter.slug;
    match &meter.aggregation {
        Aggregation::Count => format!("meter {slug} counts {events} events"),
        Aggregation::Sum(path) => format!("meter {slug} sums {} of {events} events", path.as_str()),
        Aggregation::Max(path) => format!(
            "meter {slug} takes the largest {} of {events} events",
            path.as_str()
        ),
        Aggregation::UniqueCount(path) => format!(
            "meter {slug} counts the distinct values of {} of {events} events",
            path.as_str()
        ),
        Aggregation::Latest(path) => format!(
            "meter {slug} takes {} of the latest {events} event",
            path.as_str()
        ),
    }
}

/// `, where model = gpt-x`, or nothing for a price without a filter.
fn filter_text(meter: &Meter, price: &Price) -> String {
    let conditions: Vec<String> = (price.filter.iter())
        .map(|(dimension, value)| format!("{} = {value}", meter.group_by[*dimension].0))
        .collect();
    if conditions.is_empty() {
        String::new()
    } else {
        format!(", where {}", conditions.join(" and "))
    }
}

/// ` model = gpt-x` for a series' group values, or nothing for a meter without
/// dimensions.
fn group_text(config: &Config, meter: &str, group: &[String]) -> String {
    let Some(meter) = config.meters.iter().find(|m| m.slug == meter) else {
        return String::new();
    };
    (meter.group_by.iter().zip(group))
        .map(|((name, _), value)| format!(" {name} = {value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A config enum as tally.toml spells it (`half_up`, `up`, `unique_count`).
fn snake_case(value: impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => String::new(),
    }
}
