//! One invoice line worked through: where its quantity comes from (the meter, the
//! series, the usage by day or the events counted), each tier's arithmetic, the
//! rounding, the discount and the amount, or an adjustment's two versions.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};

use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::Serialize;
use tally_rater::ledger::{billed_value, combine};
use tally_rater::line::invoice_line;
use tally_schemas::config::{Aggregation, Meter};
use tally_schemas::decimal::ExactAmount;
use tally_schemas::event::ReadingValue;
use tally_schemas::price::{Discount, Plan, Price, Rate, Tier, TiersMode, Usage};
use tally_schemas::records::{InvoiceLine, MeterValue, SeriesWindows, WindowUsage};
use tally_schemas::time::Period;

use crate::report::{packages, tier_arithmetic, tier_text};
use crate::summary::{CountedEvent, CustomerEvents};

use super::{Explanation, Source};

/// Days listed on one row of a line's usage by day.
const DAYS_PER_ROW: usize = 5;

pub(super) fn write_line(
    out: &mut impl Write,
    e: &Explanation<'_>,
    line: &InvoiceLine,
) -> io::Result<()> {
    let amount = format!("{} {}   (line {})", line.amount, line.currency, line.id);
    let rules = Rules::of(e, line);
    // The price's description, where this book is the one that rated the line.
    let price = match rules.as_ref().and_then(|r| r.price.description.as_ref()) {
        Some(description) => format!("{} ({description})", line.price),
        None => line.price.clone(),
    };
    match line.adjusts_period {
        None => writeln!(out, "{price}: {amount}")?,
        Some(closed) => writeln!(out, "{price}, late usage of {closed}: {amount}")?,
    }
    match rules {
        Some(rules) => write_worked_line(out, e, line, &rules),
        None => write_stored_line(out, e, line),
    }
}

/// This configuration's rules for a line, when they make the line's figures: then
/// each step can be shown with them.
struct Rules<'c> {
    plan: &'c Plan,
    /// The price's index among the plan's prices.
    index: usize,
    price: &'c Price,
    discount: Option<&'c Discount>,
}

impl<'c> Rules<'c> {
    fn of(e: &Explanation<'c>, line: &InvoiceLine) -> Option<Self> {
        // An adjustment is priced as its closed period's line was.
        let priced_in = line.adjusts_period.unwrap_or(e.period);
        let subscription = e.customer.subscription(priced_in);
        let plan = e.config.plan(subscription.plan);
        let (index, price) = (plan.prices.iter().enumerate())
            .find(|(_, p)| p.id == line.price)
            .filter(|_| plan.id == line.plan)?;
        let current = e.config.hash.to_string() == line.config_hash;
        let same_figures = || {
            let rated = invoice_line(e.config, e.customer, index, priced_in, line.quantity).ok()?;
            let figures = |l: &InvoiceLine| (l.subtotal, l.discount, l.amount, l.tiers.clone());
            (figures(&rated) == figures(line)).then_some(())
        };
        // An adjustment's figures are differences, which its quantity alone does not
        // make: only the book that rated it explains it.
        match (current, line.adjusts_period) {
            (true, _) => Some(()),
            (false, None) => same_figures(),
            (false, Some(_)) => None,
        }?;
        Some(Rules {
            plan,
            index,
            price,
            discount: subscription.discounts.get(&index),
        })
    }
}

/// A line worked through with the rules that made it.
fn write_worked_line(
    out: &mut impl Write,
    e: &Explanation<'_>,
    line: &InvoiceLine,
    rules: &Rules<'_>,
) -> io::Result<()> {
    let Rules {
        plan,
        price,
        discount,
        ..
    } = rules;
    if line.config_hash != e.config.hash.to_string() {
        writeln!(
            out,
            "  rated with price book {}, which rates this line as this configuration does",
            line.config_hash
        )?;
    }
    match &price.usage {
        Some(usage) => {
            let meter = e.config.meter(usage.meter);
            writeln!(
                out,
                "  quantity  {}: {}{}",
                line.quantity,
                meter_text(meter),
                filter_text(meter, usage)
            )?;
            write_usage(out, e, meter, usage, line)?;
            if let (true, Source::Events { events, .. }) = (e.list_events, &e.source) {
                write_counted_events(out, meter, events, usage)?;
            }
        }
        None => writeln!(
            out,
            "  quantity  {}: a flat fee, one in each month the customer is billed, whatever its usage",
            line.quantity
        )?,
    }
    write_charge(out, price, line)?;
    if let Some(closed) = line.adjusts_period {
        return write_adjustment_amount(out, e, line, closed, Some(rules));
    }
    let mut charge = ExactAmount::default();
    for tier in &line.tiers {
        charge.add(&tier.exact_amount());
    }
    writeln!(
        out,
        "  subtotal  {charge} rounded {} to {} decimals = {}{}",
        plan.rounding,
        plan.currency.decimals(),
        line.subtotal,
        plan.currency.coarser_billing_note()
    )?;
    writeln!(
        out,
        "  discount  {}",
        discount_text(*discount, plan, line.subtotal, line.discount)
    )?;
    write_amount(out, line)
}

/// How a line's `discount` comes from its rounded `subtotal`.
fn discount_text(
    discount: Option<&Discount>,
    plan: &Plan,
    subtotal: Decimal,
    discounted: Decimal,
) -> String {
    match discount {
        None => "none".to_owned(),
        Some(Discount::PercentOff(percent)) => format!(
            "{percent} % of {subtotal} = {}, rounded {} = {discounted}",
            ExactAmount::percent_of(subtotal, *percent),
            plan.rounding,
        ),
        Some(Discount::AmountOff(off)) => {
            format!("{off} off, at most the subtotal = {discounted}")
        }
    }
}

/// A line this configuration would not rate as it was rated (another price book's
/// prices, discounts or plans): its own stored figures, without rules it was not
/// rated by.
fn write_stored_line(
    out: &mut impl Write,
    e: &Explanation<'_>,
    line: &InvoiceLine,
) -> io::Result<()> {
    writeln!(
        out,
        "  rated with price book {}, which rates it otherwise than this configuration ({}): the line's own figures follow",
        line.config_hash, e.config.hash
    )?;
    writeln!(out, "  quantity  {}: meter {}", line.quantity, line.meter)?;
    writeln!(
        out,
        "  charge    by the tiers of plan {}, price {}:",
        line.plan, line.price
    )?;
    for tier in &line.tiers {
        writeln!(out, "            {}", tier_text(tier))?;
    }
    if let Some(closed) = line.adjusts_period {
        return write_adjustment_amount(out, e, line, closed, None);
    }
    writeln!(
        out,
        "  subtotal  {} ({} rounded)",
        line.subtotal, line.currency
    )?;
    writeln!(out, "  discount  {}", line.discount)?;
    write_amount(out, line)
}

fn write_amount(out: &mut impl Write, line: &InvoiceLine) -> io::Result<()> {
    writeln!(
        out,
        "  amount    {} - {} = {} {}",
        line.subtotal, line.discount, line.amount, line.currency
    )
}

/// An adjustment's amount; `rules` (the adjusted month's plan and the line's discount,
/// when this configuration rated the line) say how the closed line's figures were
/// rounded, which may differ from the month's own plan in the heading. With what the
/// closed line had billed, both of its versions are shown, so the differences can be
/// redone: a discount is rounded on each version's subtotal, not on the difference.
fn write_adjustment_amount(
    out: &mut impl Write,
    e: &Explanation<'_>,
    line: &InvoiceLine,
    closed: Period,
    rules: Option<&Rules<'_>>,
) -> io::Result<()> {
    let rounded = rules.map_or_else(String::new, |Rules { plan, .. }| {
        format!(
            ", each rounded {} to {} decimals as plan {} rounds",
            plan.rounding,
            plan.currency.decimals(),
            plan.id
        )
    });
    let Some(before) = e.billed_before.get(&(closed, line.price.clone())) else {
        return writeln!(
            out,
            "  amount    what the late usage adds to {closed}'s line: that line rated again with it, less the line as billed{rounded} (subtotal {}, discount {}) = {} {}",
            line.subtotal, line.discount, line.amount, line.currency
        );
    };
    let after = before.adjusted_by(line);
    writeln!(
        out,
        "  amount    what the late usage adds to {closed}'s line: that line rated again with it, less the line as billed{rounded}:"
    )?;
    // The closed line rated again here, with this book: its discount can be worked
    // through only if the stored lines add up to it (all rated with this book, none
    // missing); else the stored sums are shown as they are.
    let adds_up = rules.map(|rules| {
        let rated = invoice_line(e.config, e.customer, rules.index, closed, after.quantity);
        rated.is_ok_and(|r| (r.subtotal, r.discount) == (after.subtotal, after.discount))
    });
    let discount = match (rules, adds_up) {
        (Some(rules), Some(true)) => {
            discount_text(rules.discount, rules.plan, after.subtotal, after.discount)
        }
        _ => after.discount.to_string(),
    };
    if adds_up == Some(false) {
        writeln!(
            out,
            "            (the stored lines do not add up to {closed}'s line as this price book rates it with the late usage: one was rated with another book, or is missing from ClickHouse; the figures are the stored ones)"
        )?;
    }
    writeln!(
        out,
        "            rated again  quantity {}, subtotal {}, discount {discount}, amount {}",
        after.quantity.normalize(),
        after.subtotal,
        after.amount
    )?;
    writeln!(
        out,
        "            as billed    quantity {}, subtotal {}, discount {}, amount {} ({closed}'s line and any earlier adjustment of it)",
        before.quantity.normalize(),
        before.subtotal,
        before.discount,
        before.amount
    )?;
    writeln!(
        out,
        "            difference   subtotal {} - {} = {}, discount {} - {} = {}: {} - {} = {} {}",
        after.subtotal,
        before.subtotal,
        line.subtotal,
        after.discount,
        before.discount,
        line.discount,
        line.subtotal,
        line.discount,
        line.amount,
        line.currency
    )
}

/// The series the line adds up, and for meters whose days add up (or whose largest day
/// is the month's), the usage per UTC day.
fn write_usage(
    out: &mut impl Write,
    e: &Explanation<'_>,
    meter: &Meter,
    usage: &Usage,
    line: &InvoiceLine,
) -> io::Result<()> {
    let series: Vec<&SeriesWindows> = (e.usage.iter())
        .filter(|(key, _)| key.meter == meter.slug && usage.matches(&key.group))
        .filter(|(key, _)| key.adjusts == line.adjusts_period)
        .collect();
    if series.is_empty() {
        return if line.quantity.is_zero() {
            writeln!(out, "            no usage in the month")
        } else {
            writeln!(
                out,
                "            no windows stored for this usage (the streaming rater stores them from when `[rater] store_windows = true` is set)"
            )
        };
    }
    if let Aggregation::Latest(_) = meter.aggregation {
        return write_latest_values(out, meter, &series);
    }
    let windows_counted = |n: usize| format!("{n} window{}", if n == 1 { "" } else { "s" });
    // Meters whose windows add up to their days and month, as the rater combines them.
    let kind = meter.aggregation.kind();
    let additive = matches!(
        meter.aggregation,
        Aggregation::Count | Aggregation::Sum { .. } | Aggregation::Max(_)
    );
    let combined = |windows: &mut dyn Iterator<Item = &WindowUsage>| {
        let combined = combine(kind, windows.map(|w| w.value)).ok()?;
        // Normalised: stored windows are written without trailing zeros.
        Some(combined.value.normalize())
    };
    // What the rater bills of a series' month (a sum meter's outweighed by its
    // corrections counts as none).
    let billed_of = |value: Decimal| {
        billed_value(
            kind,
            MeterValue {
                value,
                latest: None,
            },
        )
        .value
    };
    // A late group's negative value is a credit, not usage outweighed.
    let outweighed =
        |value: Decimal| match line.adjusts_period.is_none() && billed_of(value) != value {
            true => " (corrections outweigh its usage: it counts as 0)",
            false => "",
        };
    if !meter.group_by.is_empty() {
        for (key, windows) in &series {
            let group = group_text(meter, &key.group);
            match combined(&mut windows.iter()).filter(|_| additive) {
                Some(value) => writeln!(
                    out,
                    "            {}: {value} in {}{}",
                    group.trim_start(),
                    windows_counted(windows.len()),
                    outweighed(value)
                )?,
                None => writeln!(
                    out,
                    "            {}: {}",
                    group.trim_start(),
                    windows_counted(windows.len())
                )?,
            }
        }
    }
    if !additive {
        return writeln!(
            out,
            "            (a month's {} is not made of its days', so none are listed)",
            kind.as_str()
        );
    }
    let all = || series.iter().flat_map(|(_, windows)| windows);
    let month = combined(&mut all());
    if let Some(closed) = line.adjusts_period {
        // Late usage is kept in one window at the start of the month it is billed in,
        // not on the days it happened.
        let total = month.map_or_else(String::new, |m| m.to_string());
        let note = match meter.aggregation {
            Aggregation::Max(_) => {
                format!("; the quantity is how much it raised {closed}'s billed maximum")
            }
            Aggregation::Sum { .. } if month.is_some_and(|m| m != line.quantity.normalize()) => {
                format!("; a group of {closed} counts no less than zero usage, so the quantity is how much it changed {closed}'s billed usage")
            }
            _ => String::new(),
        };
        return writeln!(
            out,
            "            late usage of {closed}, read after it closed: {total} (its days are not kept){note}"
        );
    }
    let mut by_day: BTreeMap<NaiveDate, Vec<&WindowUsage>> = BTreeMap::new();
    for window in all() {
        (by_day.entry(window.window_start.date_naive()).or_default()).push(window);
    }
    let days: Vec<String> = (by_day.iter())
        .filter_map(|(day, windows)| {
            let value = combined(&mut windows.iter().copied())?;
            Some(format!("{} {value}", day.format("%b %d:")))
        })
        .collect();
    for (row, chunk) in days.chunks(DAYS_PER_ROW).enumerate() {
        let label = if row == 0 { "by day:" } else { "" };
        writeln!(out, "            {label:<8}{}", chunk.join(", "))?;
    }
    // What the rater makes of the windows: each series floored at zero where
    // corrections outweigh its usage.
    let billed = match meter.aggregation {
        Aggregation::Sum { .. } => (series.iter())
            .map(|(_, windows)| combined(&mut windows.iter()).map(billed_of))
            .sum::<Option<Decimal>>()
            .map(|billed| billed.normalize()),
        _ => month,
    };
    if meter.group_by.is_empty() {
        if let Some(note) = month.map(outweighed).filter(|note| !note.is_empty()) {
            writeln!(
                out,
                "            the month's total is {}{note}",
                month.unwrap_or_default()
            )?;
        }
    } else if let Some((month, billed)) = month.zip(billed).filter(|(m, b)| m != b) {
        writeln!(
            out,
            "            the days add up to {month}; each group counted no less than zero (above), the month bills {billed}"
        )?;
    }
    if billed.is_some_and(|b| b != line.quantity.normalize()) {
        writeln!(
            out,
            "            the stored windows make {}, not the line's {}: windows are stored from when `store_windows` is set, and while the month is open they can be a batch ahead of its line",
            billed.unwrap_or_default(),
            line.quantity
        )?;
    }
    Ok(())
}

/// The events a line of `usage` counts, one a row: line, source, id, time and value
/// (an id alone may name two events of different sources).
fn write_counted_events(
    out: &mut impl Write,
    meter: &Meter,
    events: &CustomerEvents,
    usage: &Usage,
) -> io::Result<()> {
    let kept = events.counted_events.as_deref().unwrap_or_default();
    let counted: Vec<(&CountedEvent, &[String], &ReadingValue)> = (kept.iter())
        .filter_map(|event| {
            let (_, group, value) = (event.readings.iter())
                .find(|(meter, group, _)| *meter == usage.meter && usage.matches(group))?;
            Some((event, group.as_slice(), value))
        })
        .collect();
    writeln!(out, "            events counted ({}):", counted.len())?;
    // A unique_count meter counts a value once per group: the first event with it,
    // in the file's order, as the aggregator read them.
    let mut first_with: HashMap<(&[String], u64), u64> = HashMap::new();
    for (event, group, value) in counted {
        let value = match value {
            ReadingValue::Event => "1 event".to_owned(),
            ReadingValue::Number(n) => n.normalize().to_string(),
            ReadingValue::Distinct(fingerprint) => match first_with.entry((group, *fingerprint)) {
                Entry::Vacant(first) => {
                    first.insert(event.line);
                    "a new distinct value".to_owned()
                }
                Entry::Occupied(first) => {
                    format!("line {}'s value again, not counted again", first.get())
                }
            },
        };
        // Which group it counted in, where the meter has dimensions.
        let group = match group_text(meter, group) {
            text if text.is_empty() => text,
            text => format!("  ({})", text.trim_start()),
        };
        writeln!(
            out,
            "              line {}  source {}  id {}  {}  {value}{group}",
            event.line,
            event.source,
            event.id,
            tally_schemas::time::rfc3339(event.time)
        )?;
    }
    Ok(())
}

/// `text` when a tier of `tiers` has a flat fee, else nothing: a table without any need
/// not be read around.
fn flat_fees<'t>(tiers: &[Tier], text: &'t str) -> &'t str {
    match tiers.iter().any(|t| !t.flat_amount.is_zero()) {
        true => text,
        false => "",
    }
}

/// How the quantity becomes the charge, tier by tier.
fn write_charge(out: &mut impl Write, price: &Price, line: &InvoiceLine) -> io::Result<()> {
    let how = match &price.rate {
        Rate::PerUnit { package: None, .. } if price.usage.is_none() => "flat fee".to_owned(),
        Rate::PerUnit { package: None, .. } => "per unit".to_owned(),
        Rate::PerUnit {
            package: Some(package),
            ..
        } if line.adjusts_period.is_some() => format!(
            "in packages of {}, rounded {}: the tiers below are the packages and amounts the late usage adds",
            package.divide_by,
            snake_case(package.round)
        ),
        Rate::PerUnit {
            package: Some(package),
            ..
        } => {
            let counted = line.tiers.first().map_or(Decimal::ZERO, |t| t.quantity);
            format!(
                "in packages of {}, rounded {}: {} / {} = {} -> {}",
                package.divide_by,
                snake_case(package.round),
                line.quantity,
                package.divide_by,
                (line.quantity / package.divide_by).normalize(),
                packages(counted)
            )
        }
        Rate::Tiered {
            mode: TiersMode::Graduated,
            tiers,
        } => format!(
            "graduated: each unit at the price of the tier it falls in{}",
            flat_fees(tiers, ", plus the flat fee of every tier reached")
        ),
        Rate::Tiered {
            mode: TiersMode::Volume,
            tiers,
        } => format!(
            "volume: every unit at the price of the tier the whole quantity falls in{}",
            flat_fees(tiers, ", plus that tier's flat fee")
        ),
    };
    writeln!(out, "  charge    {how}")?;
    // A per-unit price is one tier up to infinity: its tier number says nothing.
    let tiered = matches!(price.rate, Rate::Tiered { .. });
    for tier in &line.tiers {
        let text = match tiered {
            true => tier_text(tier),
            false => tier_arithmetic(tier),
        };
        writeln!(out, "            {text}")?;
    }
    Ok(())
}

/// `counts ai.resolution events`, `sums $.tokens of llm.tokens events`.
fn meter_text(meter: &Meter) -> String {
    let events = &meter.event_type;
    let slug = &meter.slug;
    match &meter.aggregation {
        Aggregation::Count => format!("meter {slug} counts {events} events"),
        Aggregation::Sum {
            value,
            negative_allowed,
        } => {
            let corrections = match negative_allowed {
                true => " (negative values are corrections)",
                false => "",
            };
            format!(
                "meter {slug} sums {} of {events} events{corrections}",
                value.as_str()
            )
        }
        Aggregation::Max(path) => format!(
            "meter {slug} takes the largest {} of {events} events",
            path.as_str()
        ),
        Aggregation::UniqueCount(path) => format!(
            "meter {slug} counts the distinct values of {} of {events} events",
            path.as_str()
        ),
        Aggregation::Latest(path) if meter.group_by.is_empty() => format!(
            "meter {slug} takes {} of the latest {events} event",
            path.as_str()
        ),
        Aggregation::Latest(path) => format!(
            "meter {slug} takes {} of the latest {events} event of each group, added up",
            path.as_str()
        ),
    }
}

/// `, where model = gpt-x`, or nothing for a price without a filter.
fn filter_text(meter: &Meter, usage: &Usage) -> String {
    let conditions: Vec<String> = (usage.filter.iter())
        .map(|(dimension, value)| format!("{} = {value}", meter.group_by[*dimension].0))
        .collect();
    if conditions.is_empty() {
        String::new()
    } else {
        format!(", where {}", conditions.join(" and "))
    }
}

/// Each series' latest value, and the event that set it: the line adds them up, one
/// gauge per group.
fn write_latest_values(
    out: &mut impl Write,
    meter: &Meter,
    series: &[&SeriesWindows],
) -> io::Result<()> {
    for (key, windows) in series {
        // Windows read from ClickHouse carry no event order; they come in time order,
        // so the last one's value is the series' latest.
        let latest = if windows.iter().all(|w| w.value.latest.is_none()) {
            windows.last().map_or(MeterValue::ZERO, |w| w.value)
        } else {
            (windows.iter()).fold(MeterValue::ZERO, |held, w| held.later(w.value))
        };
        let group = group_text(meter, &key.group);
        let group = match group.trim_start() {
            "" => "latest".to_owned(),
            group => group.to_owned(),
        };
        let when = (latest.latest).map_or_else(String::new, |order| {
            format!(", set by the event of {}", order.time.to_rfc3339())
        });
        writeln!(
            out,
            "            {group}: {}{when}",
            latest.value.normalize()
        )?;
    }
    if series.len() > 1 {
        writeln!(out, "            (each group's latest value, added up)")?;
    }
    Ok(())
}

/// ` model = gpt-x` for a series' group values, or nothing for a meter without
/// dimensions; a value the events did not send (or sent as null) is said so, as it is
/// the likeliest reason no price selects the usage.
pub(super) fn group_text(meter: &Meter, group: &[String]) -> String {
    (meter.group_by.iter().zip(group))
        .map(|((name, path), value)| match value.is_empty() {
            true => format!(" {name} = (missing: the events have no {})", path.as_str()),
            false => format!(" {name} = {value}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A config enum as tally.toml spells it (`half_up`, `up`, `unique_count`).
pub(super) fn snake_case(value: impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => String::new(),
    }
}
