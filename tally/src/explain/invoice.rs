//! The invoice around its lines: whose month it is, the plan and discounts, what became
//! of the customer's events, late usage billed in later months and what new price
//! books changed; each line is worked through by [`super::line`].

use std::collections::BTreeMap;
use std::io::{self, Write};

use rust_decimal::Decimal;
use tally_rater::clickhouse::Repricing;
use tally_schemas::decimal::exact_add;
use tally_schemas::price::{Discount, Plan};
use tally_schemas::records::InvoiceLine;
use tally_schemas::time::Period;

use crate::report::total_too_large;
use crate::summary::CustomerEvents;

use super::line::{group_text, write_line};
use super::{Explanation, Source};

/// Whose month it is, whether it has ended, and the plan (or why none bills it).
fn write_heading(out: &mut impl Write, e: &Explanation<'_>) -> io::Result<()> {
    let customer = match &e.customer.name {
        Some(name) => format!("{} ({name})", e.customer.id),
        None => e.customer.id.clone(),
    };
    let period = e.period;
    writeln!(
        out,
        "{customer}, {period} ({} to {} UTC)",
        period.start().format("%Y-%m-%d %H:%M"),
        period.end().format("%Y-%m-%d %H:%M")
    )?;
    if e.unfinished {
        writeln!(
            out,
            "  {period} has not ended: the lines bill its usage so far, not the month"
        )?;
    }
    if e.customer.bills(period) {
        let subscription = e.customer.subscription(period);
        let plan = e.config.plan(subscription.plan);
        writeln!(
            out,
            "  plan {}, {}; each line of the month rounded {} to {} decimals{}",
            plan.id,
            plan.currency.code(),
            plan.rounding,
            plan.currency.decimals(),
            plan.currency.coarser_billing_note()
        )?;
        // Why this month's invoice may look unlike the last one's.
        let before = Period::latest_ended_by(period.start());
        if e.customer.bills(before) {
            let earlier = e.customer.subscription(before);
            let earlier_plan = e.config.plan(earlier.plan);
            let discounts_before = discounts_text(earlier_plan, &earlier.discounts);
            let discounts_now = discounts_text(plan, &subscription.discounts);
            if earlier.plan != subscription.plan {
                writeln!(
                    out,
                    "  moved to plan {} this month; {before} was billed on plan {} (a plan takes effect at a month's start and Tally does not prorate, so all of the month is billed on {})",
                    plan.id, earlier_plan.id, plan.id
                )?;
            }
            // Told by what they are, not by index: another plan's indices differ.
            if discounts_before != discounts_now {
                writeln!(
                    out,
                    "  its discounts changed this month by a plan change: {discounts_now} (in {before}: {discounts_before})"
                )?;
            }
        }
    } else if e.lines.is_empty() {
        writeln!(
            out,
            "  not billed in {period} (its `from` or `through` in the price book): it has no lines, and its usage of the month is unbilled"
        )?;
    } else {
        writeln!(
            out,
            "  not billed in {period} (its `from` or `through` in the price book): its usage of the month is unbilled; the lines below bill late usage of months it was billed in"
        )?;
    }
    Ok(())
}

/// A subscription's discounts in words: `12.5 % off resolutions, 50 off platform`, or
/// `none`.
fn discounts_text(plan: &Plan, discounts: &BTreeMap<usize, Discount>) -> String {
    let each: Vec<String> = (discounts.iter())
        .map(|(&index, discount)| {
            let price = &plan.prices[index].id;
            match discount {
                Discount::PercentOff(percent) => format!("{percent} % off {price}"),
                Discount::AmountOff(off) => format!("{off} off {price}"),
            }
        })
        .collect();
    if each.is_empty() {
        "none".to_owned()
    } else {
        each.join(", ")
    }
}

pub fn write_explanation(out: &mut impl Write, e: &Explanation<'_>) -> io::Result<()> {
    write_heading(out, e)?;
    let period = e.period;
    writeln!(out, "  price book {}", e.config.hash)?;
    let (unbilled, not_rated) = match &e.source {
        Source::Events {
            name,
            events,
            unbilled,
            not_rated,
        } => {
            write_events(out, name, events)?;
            (unbilled.as_slice(), not_rated.as_slice())
        }
        Source::Pipeline { url, database, .. } => {
            writeln!(
                out,
                "  lines as the streaming rater stored them: {database}.invoice_lines at {url}, usage by window from {database}.window_usage where the rater stores windows (store_windows)"
            )?;
            (&[][..], &[][..])
        }
    };
    let billed = e.customer.bills(period);
    if e.lines.is_empty() && not_rated.is_empty() {
        match &e.source {
            Source::Events { .. } => writeln!(out, "  no lines")?,
            // A customer not billed in the month has no lines to wait for.
            Source::Pipeline { .. } if !billed => {
                writeln!(out, "  no lines")?
            }
            Source::Pipeline { database, .. } => writeln!(
                out,
                "  no lines of {period} in {database}.invoice_lines: the streaming rater has not rated this customer's month yet, or the configuration names another database"
            )?,
        }
    }
    for line in &e.lines {
        writeln!(out)?;
        write_line(out, e, line)?;
    }
    for line in not_rated {
        writeln!(out)?;
        writeln!(
            out,
            "{}: not rated, so the invoice lacks this line: {}",
            line.price, line.reason
        )?;
    }
    if !unbilled.is_empty() {
        writeln!(out)?;
        if billed {
            writeln!(
                out,
                "usage no line bills (no price of the plan selects it):"
            )?;
        } else {
            writeln!(out, "usage of the month, unbilled:")?;
        }
        for usage in unbilled {
            writeln!(
                out,
                "  meter {}{}: {}",
                usage.meter,
                (e.config.meter_id(&usage.meter)).map_or_else(String::new, |id| group_text(
                    e.config.meter(id),
                    &usage.group
                )),
                usage.quantity
            )?;
        }
    }
    // A customer keeps one currency across its plans, so this is one total; an
    // adjustment's plan (the adjusted month's) may differ from the month's.
    let mut totals: BTreeMap<&str, (Decimal, Vec<String>)> = BTreeMap::new();
    for line in &e.lines {
        let (total, amounts) = totals.entry(&line.currency).or_default();
        *total = exact_add(*total, line.amount).ok_or_else(total_too_large)?;
        amounts.push(line.amount.to_string());
    }
    let of = e
        .price
        .map(|p| format!(" of price {p}"))
        .unwrap_or_default();
    for (currency, (total, amounts)) in totals {
        writeln!(out)?;
        writeln!(
            out,
            "total{of} {total} {currency} ({})",
            amounts.join(" + ")
        )?;
    }
    if let Source::Pipeline {
        billed_later,
        repricings,
        ..
    } = &e.source
    {
        // Late usage of a month the customer is not billed in is not billed later
        // either: nothing to tell.
        if billed {
            write_billed_later(out, period, billed_later, e.unfinished)?;
        }
        let currency = e.lines.first().map(|l| l.currency.as_str());
        write_repricings(out, period, repricings, currency)?;
    }
    Ok(())
}

/// The period's late usage billed in later months, so support can tell a customer
/// where it went: nothing while the period is open, as its own lines take it.
pub(super) fn write_billed_later(
    out: &mut impl Write,
    period: Period,
    billed_later: &[InvoiceLine],
    unfinished: bool,
) -> io::Result<()> {
    if unfinished {
        return Ok(());
    }
    writeln!(out)?;
    if billed_later.is_empty() {
        return writeln!(
            out,
            "no usage of {period} has been billed in a later month (late usage arriving after its close would be, as an adjustment line)"
        );
    }
    writeln!(
        out,
        "usage of {period} that arrived after its close, billed in later months as adjustment lines (`tally explain --period` of that month works each through):"
    )?;
    for line in billed_later {
        writeln!(
            out,
            "  {}  {}  quantity {}  amount {} {}",
            Period::containing(line.period_start),
            line.price,
            line.quantity,
            line.amount,
            line.currency
        )?;
    }
    Ok(())
}

/// The customer's lines of `period` that a new price book changed after they were
/// stored: when, from what to what and by which books, so support can say why a line
/// is not what an earlier look (or an exported invoice) showed.
fn write_repricings(
    out: &mut impl Write,
    period: Period,
    repricings: &[Repricing],
    currency: Option<&str>,
) -> io::Result<()> {
    if repricings.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    writeln!(
        out,
        "lines of {period} a new price book changed after they were stored, or added from 0 (the lines above are as the latest book rates them):"
    )?;
    let currency = currency.map(|c| format!(" {c}")).unwrap_or_default();
    for r in repricings {
        let late = r
            .adjusts
            .map(|closed| format!(" (late usage of {closed})"))
            .unwrap_or_default();
        writeln!(
            out,
            "  {}  {}{late}  {}{currency} -> {}{currency}  price book {} -> {}",
            r.repriced_at.format("%Y-%m-%d %H:%M UTC"),
            r.price,
            r.amount_before,
            r.amount_after,
            r.book_before,
            r.book_after
        )?;
    }
    Ok(())
}

/// What became of the customer's events in the file.
fn write_events(out: &mut impl Write, name: &str, events: &CustomerEvents) -> io::Result<()> {
    writeln!(out, "  events in {name}:")?;
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
    // Which resends were dropped, by line, with the line each resent, so support can
    // show the customer both.
    let retry_lines = resent_lines(&events.retries, |of| format!("of line {of}"));
    let conflict_lines = resent_lines(&events.conflicts, |of| format!("line {of} counts"));
    let outside_lines = listed(&events.outside_period).map_or_else(String::new, |(shown, more)| {
        let lines: Vec<String> = (shown.iter())
            .map(|(line, month)| format!("{line} ({month})"))
            .collect();
        format!(": line {}{}", lines.join(", "), and_more(more))
    });
    for (n, what, why, lines) in [
        (
            events.retries.len() as u64,
            "retries",
            "same (source, id) and content as a counted event",
            retry_lines.as_str(),
        ),
        (
            events.conflicts.len() as u64,
            "conflicting resends",
            "same (source, id) as a counted event, other content: the first one counts",
            conflict_lines.as_str(),
        ),
        (
            events.outside_period.len() as u64,
            "outside the month",
            "by event time",
            outside_lines.as_str(),
        ),
        (
            events.unmetered,
            "unmetered",
            "of a type no meter reads",
            "",
        ),
        (
            events.refused,
            "refused",
            "a total would pass the largest decimal",
            "",
        ),
    ] {
        if n > 0 {
            writeln!(out, "    {what:<20} {n} ({why}; not counted){lines}")?;
        }
    }
    if let Some((shown, more)) = listed(&events.rejected) {
        writeln!(
            out,
            "    {:<20} {} (name this customer but fail validation; not counted):",
            "rejected",
            events.rejected.len()
        )?;
        for (line, why) in shown {
            writeln!(out, "      line {line}: {why}")?;
        }
        if more > 0 {
            writeln!(out, "      and {more} more")?;
        }
    }
    writeln!(
        out,
        "    `tally rate` lists every line that fails validation in its rejects file (one whose subject cannot be read names no customer)"
    )
}

/// `: line 3, 9 (of line 2)`: resends by line, each with the line it resent (`first`
/// says it), once at the end when all of them, shown or not, resent one (a client
/// retrying one event).
pub(super) fn resent_lines(resends: &[(u64, Option<u64>)], first: fn(u64) -> String) -> String {
    let Some((shown, more)) = listed(resends) else {
        return String::new();
    };
    let one_resent = (resends.iter().all(|(_, of)| *of == resends[0].1)).then_some(resends[0].1);
    let lines: Vec<String> = (shown.iter())
        .map(|&(line, of)| match of.filter(|_| one_resent.is_none()) {
            Some(of) => format!("{line} ({})", first(of)),
            None => line.to_string(),
        })
        .collect();
    let resent = match one_resent.flatten() {
        Some(of) => format!(" ({})", first(of)),
        None => String::new(),
    };
    format!(": line {}{}{resent}", lines.join(", "), and_more(more))
}

/// ` and 3 more` after a list cut short, or nothing.
fn and_more(more: usize) -> String {
    match more {
        0 => String::new(),
        more => format!(" and {more} more"),
    }
}

/// The first of `items` to show, and how many more there are; `None` when empty.
fn listed<T>(items: &[T]) -> Option<(&[T], usize)> {
    const SHOWN: usize = 10;
    let shown = items.get(..SHOWN).unwrap_or(items);
    (!items.is_empty()).then_some((shown, items.len() - shown.len()))
}
