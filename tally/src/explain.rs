//! `tally explain`: one customer's invoice of a month, worked through so that finance
//! and support can redo every figure by hand.
//!
//! In: the customer's lines and usage windows, either as `tally rate` makes them of an
//! events file (with what became of the customer's events and its unbilled usage), or
//! as the streaming rater stored them in ClickHouse. Out: text, per line where the
//! quantity comes from (the meter, the series it adds up, the usage per day), each
//! tier's arithmetic, the rounding, the discount and the amount; then the invoice's
//! total. Every figure shown is the line's own, so it is the cent that was billed.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::Arc;

use anyhow::Context;
use chrono::{NaiveDate, Utc};
use clap::Args;
use rust_decimal::Decimal;
use serde::Serialize;
use tally_rater::clickhouse::ClickHouse;
use tally_rater::ledger::combine;
use tally_schemas::config::{Aggregation, Config, Customer, Meter};
use tally_schemas::price::{Discount, Price, Rate, TiersMode};
use tally_schemas::records::{InvoiceLine, SeriesWindows, WindowUsage};
use tally_schemas::time::Period;

use crate::batch::{rate_events, read_input, BatchResult};
use crate::report::{tier_text, Totals};
use crate::summary::{CustomerEvents, UnbilledUsage};
use crate::RatedMonth;

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    month: RatedMonth,
    /// The customer whose invoice to explain.
    #[arg(long)]
    customer: String,
    /// Only this price's line (and its adjustments).
    #[arg(long)]
    price: Option<String>,
    /// CloudEvents JSON lines, rated as `tally rate` rates them; `-` reads stdin.
    #[arg(long, required_unless_present = "pipeline")]
    events: Option<String>,
    /// Explain the lines the streaming rater stored instead: read from the ClickHouse
    /// of the configuration's `[clickhouse]` section (`invoice_lines`, and the usage
    /// from `window_usage` when the rater stores windows).
    #[arg(long, conflicts_with = "events")]
    pipeline: bool,
}

/// Checks the customer and price asked for, gets the lines (rating the whole file as
/// `tally rate` does, dedupe spanning customers, or reading the pipeline's), and works
/// through them.
pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let month = &args.month;
    let config = Arc::new(Config::load(&month.config)?);
    let customer = config.customers.get(&args.customer).with_context(|| {
        format!(
            "customer {:?} is not among the {} customers of {}",
            args.customer,
            config.customers.len(),
            month.config.display()
        )
    })?;
    if let Some(price) = &args.price {
        anyhow::ensure!(
            customer.bills(month.period),
            "customer {:?} is not billed in {}: it has no {price:?} line (leave out --price to see its events)",
            args.customer,
            month.period
        );
        let plan = config.plan(customer.subscription(month.period).plan);
        anyhow::ensure!(
            plan.prices.iter().any(|p| &p.id == price),
            "plan {:?} of customer {:?} has no price {price:?}; its prices are {}",
            plan.id,
            args.customer,
            (plan.prices.iter().map(|p| p.id.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let asked = |line: &&InvoiceLine| args.price.as_ref().is_none_or(|p| &line.price == p);
    let mut out = std::io::stdout().lock();
    match &args.events {
        Some(events) => {
            let input = read_input(events)?;
            let options = month.options(Utc::now(), false, Some(args.customer.clone()));
            let result = rate_events(&config, &input, &options, |_| Ok(()))?;
            let name = if events == "-" { "stdin" } else { events };
            let explanation = Explanation::of_batch(
                &config,
                month.period,
                customer,
                name,
                &result,
                args.price.as_deref(),
            )?;
            write_explanation(&mut out, &explanation)?;
        }
        None => {
            let settings = config.services(&month.config.display().to_string(), &|name| {
                std::env::var(name).ok()
            })?;
            let store = &settings.clickhouse;
            let clickhouse =
                ClickHouse::new(&store.url, &store.database)?.with_credentials(&store.credentials);
            let mut lines = clickhouse.lines(month.period, Some(&args.customer))?;
            // As `tally rate` lists them: the period's own, then adjustments, each in
            // its plan's price order.
            let position = |line: &InvoiceLine| {
                let plan = config.plans.iter().find(|p| p.id == line.plan);
                plan.and_then(|p| p.prices.iter().position(|price| price.id == line.price))
            };
            lines.sort_by_cached_key(|line| {
                (line.adjusts_period, position(line), line.price.clone())
            });
            let usage = clickhouse.windows_of(&args.customer, month.period)?;
            let explanation = Explanation {
                config: &config,
                period: month.period,
                customer,
                source: Source::Pipeline {
                    url: &store.url,
                    database: &store.database,
                },
                lines: lines.iter().filter(asked).collect(),
                usage: &usage,
            };
            write_explanation(&mut out, &explanation)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Days listed on one row of a line's usage by day.
const DAYS_PER_ROW: usize = 5;

/// Everything one customer's explanation is made of.
#[derive(Debug)]
pub struct Explanation<'a> {
    pub config: &'a Config,
    pub period: Period,
    pub customer: &'a Customer,
    pub source: Source<'a>,
    /// The customer's lines to explain (all of them, or the one price asked for), its
    /// own before adjustments of closed periods, each in its plan's price order.
    pub lines: Vec<&'a InvoiceLine>,
    pub usage: &'a [SeriesWindows],
}

impl<'a> Explanation<'a> {
    /// `customer`'s lines (of `price`, if given) of a batch run over the events file
    /// `name` that counted the customer's events (`explained_customer`).
    pub fn of_batch(
        config: &'a Config,
        period: Period,
        customer: &'a Customer,
        name: &'a str,
        result: &'a BatchResult,
        price: Option<&str>,
    ) -> anyhow::Result<Self> {
        let events = (result.summary.customer.as_ref())
            .filter(|events| events.customer == customer.id)
            .context("the batch run did not count the customer's events")?;
        Ok(Explanation {
            config,
            period,
            customer,
            source: Source::Events {
                name,
                events,
                unbilled: (result.summary.unpriced_usage.iter())
                    .chain(&result.summary.unsubscribed_usage)
                    .filter(|u| u.customer == customer.id && price.is_none())
                    .collect(),
            },
            lines: (result.lines.iter())
                .filter(|l| l.customer == customer.id)
                .filter(|l| price.is_none_or(|p| l.price == p))
                .collect(),
            usage: &result.explained_usage,
        })
    }
}

/// Where the lines come from.
#[derive(Debug)]
pub enum Source<'a> {
    /// Rated from an events file as `tally rate` rates it.
    Events {
        /// The file as the user named it.
        name: &'a str,
        /// What became of the customer's events in it.
        events: &'a CustomerEvents,
        /// The customer's usage of the period that no line bills.
        unbilled: Vec<&'a UnbilledUsage>,
    },
    /// Stored by the streaming rater: `invoice_lines` and `window_usage` of this
    /// ClickHouse database.
    Pipeline { url: &'a str, database: &'a str },
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
            plan.currency.code(),
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
    let unbilled = match &e.source {
        Source::Events {
            name,
            events,
            unbilled,
        } => {
            write_events(out, name, events)?;
            unbilled.as_slice()
        }
        Source::Pipeline { url, database } => {
            writeln!(
                out,
                "  lines as the streaming rater stored them: {database}.invoice_lines at {url}, usage from {database}.window_usage"
            )?;
            &[]
        }
    };
    if e.lines.is_empty() {
        writeln!(out, "  no lines")?;
    }
    for line in &e.lines {
        writeln!(out)?;
        write_line(out, e, line)?;
    }
    if !unbilled.is_empty() {
        writeln!(out)?;
        if e.customer.bills(period) {
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
    let amount = format!("{} {}   (line {})", line.amount, line.currency, line.id);
    match line.adjusts_period {
        None => writeln!(out, "{}: {amount}", line.price)?,
        Some(closed) => writeln!(out, "{}, late usage of {closed}: {amount}", line.price)?,
    }
    // An adjustment is priced as its closed period's line was.
    let priced_in = line.adjusts_period.unwrap_or(e.period);
    let subscription = e.customer.subscription(priced_in);
    let plan = e.config.plan(subscription.plan);
    let Some((index, price)) = (plan.prices.iter().enumerate())
        .find(|(_, p)| p.id == line.price)
        .filter(|_| plan.id == line.plan)
    else {
        return writeln!(
            out,
            "  plan {} (price {}) is not the customer's in this configuration for {priced_in}: rated by another price book ({})",
            line.plan, line.price, line.config_hash
        );
    };
    if line.config_hash != e.config.hash.to_string() {
        writeln!(
            out,
            "  rated with price book {}, not this configuration's: the figures are the line's, the rules named below this configuration's",
            line.config_hash
        )?;
    }
    let meter = e.config.meter(price.meter);
    writeln!(
        out,
        "  quantity  {}: {}{}",
        line.quantity,
        meter_text(meter),
        filter_text(meter, price)
    )?;
    write_usage(out, e, meter, price, line)?;
    write_charge(out, price, line)?;
    if let Some(closed) = line.adjusts_period {
        return writeln!(
            out,
            "  amount    what the late usage adds to {closed}'s line: that line rated again with it, less the line as billed (subtotal {}, discount {}) = {} {}",
            line.subtotal, line.discount, line.amount, line.currency
        );
    }
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
    let discount = match subscription.discounts.get(&index) {
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
    line: &InvoiceLine,
) -> io::Result<()> {
    let series: Vec<&SeriesWindows> = (e.usage.iter())
        .filter(|(key, _)| key.meter == meter.slug && price.matches(&key.group))
        .filter(|(key, _)| key.adjusts == line.adjusts_period)
        .collect();
    if series.is_empty() {
        return if line.quantity.is_zero() {
            writeln!(out, "            no usage in the month")
        } else {
            writeln!(
                out,
                "            no windows stored (the streaming rater stores them with `[rater] store_windows = true`)"
            )
        };
    }
    // Meters whose windows add up to their days and month, as the rater combines them.
    let additive = match meter.aggregation {
        Aggregation::Count | Aggregation::Sum(_) | Aggregation::Max(_) => true,
        Aggregation::UniqueCount(_) | Aggregation::Latest(_) => false,
    };
    let values = |windows: &[&WindowUsage]| {
        let kind = meter.aggregation.kind();
        let combined = combine(kind, windows.iter().map(|w| w.value)).ok()?;
        // Normalised: stored windows are written without trailing zeros.
        additive.then(|| combined.value.normalize())
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
    if !additive {
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
