//! `tally explain`: one customer's invoice of a month, worked through so that finance
//! and support can redo every figure by hand.
//!
//! In: the customer's lines and usage windows, either as `tally rate` makes them of an
//! events file (with what became of the customer's events and its unbilled usage), or
//! as the streaming rater stored them in ClickHouse. Out: text, per line where the
//! quantity comes from (the meter, the series it adds up, the usage per day), each
//! tier's arithmetic, the rounding, the discount and the amount; then the invoice's
//! total. Every figure shown is the line's own, so it is the cent that was billed.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::sync::Arc;

use anyhow::Context;
use chrono::{NaiveDate, Utc};
use clap::Args;
use rust_decimal::Decimal;
use serde::Serialize;
use tally_rater::clickhouse::{ClickHouse, Repricing};
use tally_rater::ledger::{billed_value, combine};
use tally_rater::line::invoice_line;
use tally_schemas::config::{Aggregation, Config, Customer, Meter};
use tally_schemas::decimal::{exact_add, ExactAmount};
use tally_schemas::event::ReadingValue;
use tally_schemas::price::{Discount, Plan, Price, Rate, Tier, TiersMode, Usage};
use tally_schemas::records::{InvoiceLine, MeterValue, SeriesWindows, WindowUsage};
use tally_schemas::time::Period;

use crate::batch::{rate_events, read_input, BatchResult};
use crate::report::{packages, tier_arithmetic, tier_text, total_too_large};
use crate::summary::{CountedEvent, CustomerEvents, LineNotRated, UnbilledUsage};
use crate::{ConfiguredClickHouse, RatedMonth};

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
    /// Under each line, the events it counts: their line in the file, id, time and
    /// value (the resolutions or requests a customer may ask about).
    #[arg(long, conflicts_with = "pipeline")]
    list_events: bool,
    /// Explain the lines the streaming rater stored instead: read from the ClickHouse
    /// of the configuration's `[clickhouse]` section (`invoice_lines`, and the usage
    /// from `window_usage` when the rater stores windows).
    #[arg(long, conflicts_with_all = ["events", "now", "threads"])]
    pipeline: bool,
}

/// Checks the customer and price asked for, gets the lines (rating the whole file as
/// `tally rate` does, dedupe spanning customers, or reading the pipeline's), and works
/// through them.
pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let month = &args.month;
    let config = Arc::new(crate::load_config(&month.config)?);
    let customer = config.customers.get(&args.customer).with_context(|| {
        let near = config.likely_customer(&args.customer);
        format!(
            "customer {:?} is not among the {} customers of {}{}",
            args.customer,
            config.customers.len(),
            month.config.display(),
            near.map(|id| format!("; did you mean {id:?}?"))
                .unwrap_or_default()
        )
    })?;
    if let Some(price) = &args.price {
        check_price(&config, customer, month.period, price, args.pipeline)?;
    }
    let asked = |line: &&InvoiceLine| args.price.as_ref().is_none_or(|p| &line.price == p);
    let mut out = std::io::stdout().lock();
    match &args.events {
        Some(events) => {
            let input = read_input(events)?;
            let mut options = month.options(Utc::now(), false, Some(args.customer.clone()));
            options.keep_counted_events = args.list_events;
            let result = rate_events(&config, &input, &options, |_| Ok(()))?;
            let name = if events == "-" { "stdin" } else { events };
            let mut explanation = Explanation::of_batch(
                &config,
                month.period,
                customer,
                name,
                &result,
                args.price.as_deref(),
            )?;
            explanation.list_events = args.list_events;
            write_explanation(&mut out, &explanation)?;
            out.flush()?;
            // The lines the explanation showed as not rated: the customer's, of the price
            // asked for.
            let not_rated = match &explanation.source {
                Source::Events { not_rated, .. } => not_rated.len(),
                Source::Pipeline { .. } => 0,
            };
            anyhow::ensure!(
                not_rated == 0,
                "{not_rated} of {}'s lines could not be rated (shown above), so the invoice is incomplete",
                args.customer
            );
        }
        None => {
            let store = ConfiguredClickHouse::of(&config, &month.config, None)?;
            let clickhouse = &store.client;
            let mut lines = clickhouse.lines(month.period, Some(&args.customer))?;
            // As `tally rate` lists them: the period's own, then adjustments, each in
            // its plan's price order (and later adjustments by the month billing them).
            let in_price_order = |lines: &mut Vec<InvoiceLine>| {
                let position = |line: &InvoiceLine| {
                    let plan = config.plans.iter().find(|p| p.id == line.plan);
                    plan.and_then(|p| p.prices.iter().position(|price| price.id == line.price))
                };
                lines.sort_by_cached_key(|line| {
                    let month = (line.period_start, line.adjusts_period);
                    (month, position(line), line.price.clone())
                });
            };
            in_price_order(&mut lines);
            let usage = clickhouse.windows(month.period, &args.customer)?;
            let mut later = clickhouse.adjustments_of(month.period, Some(&args.customer))?;
            later.retain(|line| asked(&line));
            in_price_order(&mut later);
            // A rater of a build before the table made none: no repricings kept.
            let mut repricings = match clickhouse.repricings_of(month.period, &args.customer) {
                Err(e) if e.is_missing_table() => Vec::new(),
                read => read?,
            };
            repricings.retain(|r| args.price.as_ref().is_none_or(|p| &r.price == p));
            let explanation = Explanation {
                config: &config,
                period: month.period,
                customer,
                source: Source::Pipeline {
                    url: &store.url,
                    database: &store.database,
                    billed_later: &later,
                    repricings: &repricings,
                },
                lines: lines.iter().filter(asked).collect(),
                price: args.price.as_deref(),
                usage: &usage,
                unfinished: month.period.end() > Utc::now(),
                billed_before: billed_before(clickhouse, &args.customer, month.period, &lines)?,
                list_events: false,
            };
            write_explanation(&mut out, &explanation)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Refuses a price the customer's lines of `period` cannot have. The pipeline's lines
/// include adjustments, priced on the plan of the month they adjust, and are stored
/// even for a month the customer is no longer billed in; a batch run has neither.
fn check_price(
    config: &Config,
    customer: &Customer,
    period: Period,
    price: &str,
    pipeline: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        pipeline || customer.bills(period),
        "customer {:?} is not billed in {period}: it has no {price:?} line (leave out --price to see its events)",
        customer.id
    );
    let plans: Vec<&Plan> = match pipeline {
        true => (customer.subscriptions_until(period))
            .map(|s| config.plan(s.plan))
            .collect(),
        false => vec![config.plan(customer.subscription(period).plan)],
    };
    if plans
        .iter()
        .any(|plan| plan.prices.iter().any(|p| p.id == price))
    {
        return Ok(());
    }
    let named: Vec<String> = (plans.iter())
        .map(|plan| {
            let prices: Vec<&str> = plan.prices.iter().map(|p| p.id.as_str()).collect();
            format!("plan {:?}: {}", plan.id, prices.join(", "))
        })
        .collect();
    anyhow::bail!(
        "customer {:?} has no price {price:?} in {period}; its prices are those of {}",
        customer.id,
        named.join("; ")
    )
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
    /// The one price asked for (`--price`): the total is that price's, not the invoice's.
    pub price: Option<&'a str>,
    pub usage: &'a [SeriesWindows],
    /// The period had not ended at the clock: the lines bill its usage so far.
    pub unfinished: bool,
    /// For each adjustment line, by the closed period and price it adjusts: what that
    /// period's line had billed before (only the pipeline's lines have adjustments).
    pub billed_before: BTreeMap<(Period, String), Billed>,
    /// List the events each line counts (a batch run's only: the pipeline keeps none).
    pub list_events: bool,
}

/// A closed period's line as billed so far: its own line and the adjustments of it
/// billed in the months before an adjustment's, added up. An adjustment bills that
/// line rated again with the late usage, less this.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Billed {
    pub quantity: Decimal,
    pub subtotal: Decimal,
    pub discount: Decimal,
    pub amount: Decimal,
}

impl Billed {
    fn add(&mut self, line: &InvoiceLine) {
        self.quantity += line.quantity;
        self.subtotal += line.subtotal;
        self.discount += line.discount;
        self.amount += line.amount;
    }

    /// What `adjustment` makes of it: the closed line rated again with the late usage.
    fn adjusted_by(&self, adjustment: &InvoiceLine) -> Billed {
        Billed {
            quantity: self.quantity + adjustment.quantity,
            subtotal: self.subtotal + adjustment.subtotal,
            discount: self.discount + adjustment.discount,
            amount: self.amount + adjustment.amount,
        }
    }
}

/// What the closed periods that `lines` adjust had billed before `period`, read from
/// the pipeline's ClickHouse: each one's own line and its adjustments in the months
/// between.
fn billed_before(
    clickhouse: &ClickHouse,
    customer: &str,
    period: Period,
    lines: &[InvoiceLine],
) -> anyhow::Result<BTreeMap<(Period, String), Billed>> {
    let mut billed = BTreeMap::new();
    let closed_periods: std::collections::BTreeSet<Period> =
        lines.iter().filter_map(|l| l.adjusts_period).collect();
    for closed in closed_periods {
        let mut month = closed;
        while month < period {
            for line in clickhouse.lines(month, Some(customer))? {
                let own = month == closed && line.adjusts_period.is_none();
                if own || line.adjusts_period == Some(closed) {
                    let key = (closed, line.price.clone());
                    billed.entry(key).or_insert_with(Billed::default).add(&line);
                }
            }
            month = month.next();
        }
    }
    Ok(billed)
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
        price: Option<&'a str>,
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
                not_rated: (result.summary.lines_not_rated.iter())
                    .filter(|l| l.customer == customer.id)
                    .filter(|l| price.is_none_or(|p| l.price == p))
                    .collect(),
            },
            lines: (result.lines.iter())
                .filter(|l| l.customer == customer.id)
                .filter(|l| price.is_none_or(|p| l.price == p))
                .collect(),
            price,
            usage: &result.explained_usage,
            unfinished: result.summary.unfinished,
            billed_before: BTreeMap::new(),
            list_events: false,
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
        /// The customer's lines that could not be rated, so the invoice lacks them.
        not_rated: Vec<&'a LineNotRated>,
    },
    /// Stored by the streaming rater: `invoice_lines` and `window_usage` of this
    /// ClickHouse database.
    Pipeline {
        url: &'a str,
        database: &'a str,
        /// Adjustment lines of the period billed in later months (its late usage).
        billed_later: &'a [InvoiceLine],
        /// What new price books changed of the customer's lines of the period after
        /// they were stored, oldest first.
        repricings: &'a [Repricing],
    },
}

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
            "  plan {}, {}; each line of the month rounded {} to {} decimals",
            plan.id,
            plan.currency.code(),
            snake_case(plan.rounding),
            plan.currency.decimals()
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
                "  lines as the streaming rater stored them: {database}.invoice_lines at {url}, usage from {database}.window_usage"
            )?;
            (&[][..], &[][..])
        }
    };
    if e.lines.is_empty() && not_rated.is_empty() {
        match &e.source {
            Source::Events { .. } => writeln!(out, "  no lines")?,
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
        write_billed_later(out, period, billed_later, e.unfinished)?;
        let currency = e.lines.first().map(|l| l.currency.as_str());
        write_repricings(out, period, repricings, currency)?;
    }
    Ok(())
}

/// The period's late usage billed in later months, so support can tell a customer
/// where it went: nothing while the period is open, as its own lines take it.
fn write_billed_later(
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
        "lines of {period} a new price book changed after they were stored (the lines above are as the latest book rates them):"
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
            events.outside_period,
            "outside the month",
            "by event time",
            "",
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
fn resent_lines(resends: &[(u64, Option<u64>)], first: fn(u64) -> String) -> String {
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
    let more = match more {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    let resent = match one_resent.flatten() {
        Some(of) => format!(" ({})", first(of)),
        None => String::new(),
    };
    format!(": line {}{more}{resent}", lines.join(", "))
}

/// The first of `items` to show, and how many more there are; `None` when empty.
fn listed<T>(items: &[T]) -> Option<(&[T], usize)> {
    const SHOWN: usize = 10;
    let shown = items.get(..SHOWN).unwrap_or(items);
    (!items.is_empty()).then_some((shown, items.len() - shown.len()))
}

fn write_line(out: &mut impl Write, e: &Explanation<'_>, line: &InvoiceLine) -> io::Result<()> {
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
                write_counted_events(out, events, usage)?;
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
        charge.add(&ExactAmount::from(tier.amount));
    }
    writeln!(
        out,
        "  subtotal  {charge} rounded {} to {} decimals = {}",
        snake_case(plan.rounding),
        plan.currency.decimals(),
        line.subtotal
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
            snake_case(plan.rounding),
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
            snake_case(plan.rounding),
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
        return write_latest_values(out, e, &series);
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
            let group = group_text(e.config, &key.meter, &key.group);
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

/// The events a line of `usage` counts, one a row: line, id, time and value.
fn write_counted_events(
    out: &mut impl Write,
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
        writeln!(
            out,
            "              line {}  id {}  {}  {value}",
            event.line,
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
    e: &Explanation<'_>,
    series: &[&SeriesWindows],
) -> io::Result<()> {
    for (key, windows) in series {
        let latest = (windows.iter()).fold(MeterValue::ZERO, |held, w| held.later(w.value));
        let group = group_text(e.config, &key.meter, &key.group);
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
fn group_text(config: &Config, meter: &str, group: &[String]) -> String {
    let Some(meter) = config.meters.iter().find(|m| m.slug == meter) else {
        return String::new();
    };
    (meter.group_by.iter().zip(group))
        .map(|((name, path), value)| match value.is_empty() {
            true => format!(" {name} = (missing: the events have no {})", path.as_str()),
            false => format!(" {name} = {value}"),
        })
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

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    #[test]
    fn resends_name_the_line_they_resent() {
        let of = |line: u64| format!("of line {line}");
        assert_eq!(resent_lines(&[], of), "");
        // Of one event: said once.
        assert_eq!(
            resent_lines(&[(3, Some(2)), (5, Some(2))], of),
            ": line 3, 5 (of line 2)"
        );
        // Of several, or of an event another customer's line holds: each its own.
        assert_eq!(
            resent_lines(&[(3, Some(2)), (9, Some(7)), (12, None)], of),
            ": line 3 (of line 2), 9 (of line 7), 12"
        );
    }

    use tally_rater::line::adjustment_line;
    use tally_schemas::records::{MeterValue, SeriesKey};

    use super::*;

    /// cust_acme moves from starter to pro (12.5 % off its resolutions) in November;
    /// cust_gone is billed until October.
    const BOOK: &str = r#"
[[meters]]
slug = "resolutions"
event_type = "ai.resolution"
aggregation = "count"

[[plans]]
id = "starter"
currency = "usd"
rounding = "half_even"

[[plans.prices]]
id = "resolutions"
meter = "resolutions"
billing_scheme = "per_unit"
unit_amount = "0.99"

[[plans]]
id = "pro"
currency = "usd"

[[plans.prices]]
id = "resolutions"
meter = "resolutions"
billing_scheme = "tiered"
tiers_mode = "graduated"
tiers = [{ up_to = 100, flat_amount = "49" }, { up_to = "inf", unit_amount = "0.89" }]

[[customers]]
id = "cust_acme"
plan = "starter"

[[customers.plan_changes]]
from = "2026-11"
plan = "pro"
discounts = [{ price = "resolutions", percent_off = "12.5" }]

[[customers]]
id = "cust_gone"
plan = "starter"
through = "2026-10"

[[customers]]
id = "cust_pro"
plan = "pro"
discounts = [{ price = "resolutions", percent_off = "12.5" }]
"#;

    fn config() -> Config {
        Config::parse(BOOK, "test.toml").unwrap()
    }

    fn month(text: &str) -> Period {
        Period::from_str(text).unwrap()
    }

    /// The customer's resolutions line of `period` for `quantity`, as the rater makes it.
    fn line(config: &Config, customer: &str, period: &str, quantity: i64) -> InvoiceLine {
        let customer = &config.customers[customer];
        invoice_line(config, customer, 0, month(period), Decimal::from(quantity)).unwrap()
    }

    /// What late usage of October adds to its line, billed in November.
    fn adjustment(config: &Config, customer: &str, before: i64, after: i64) -> InvoiceLine {
        let (before, after) = (
            line(config, customer, "2026-10", before),
            line(config, customer, "2026-10", after),
        );
        adjustment_line(&before, &after, month("2026-11"))
    }

    fn explained(
        config: &Config,
        customer: &str,
        lines: &[InvoiceLine],
        usage: &[SeriesWindows],
    ) -> String {
        explained_after(config, customer, lines, usage, BTreeMap::new())
    }

    /// As [`explained`], with what the closed months' lines had billed.
    fn explained_after(
        config: &Config,
        customer: &str,
        lines: &[InvoiceLine],
        usage: &[SeriesWindows],
        billed_before: BTreeMap<(Period, String), Billed>,
    ) -> String {
        let explanation = Explanation {
            config,
            period: month("2026-11"),
            customer: &config.customers[customer],
            source: Source::Pipeline {
                url: "http://clickhouse:8123",
                database: "tally",
                billed_later: &[],
                repricings: &[],
            },
            lines: lines.iter().collect(),
            price: None,
            usage,
            unfinished: false,
            billed_before,
            list_events: false,
        };
        let mut out = Vec::new();
        write_explanation(&mut out, &explanation).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn an_invoice_with_an_adjustment_on_the_earlier_plan_has_one_total_of_every_line() {
        let config = config();
        let lines = [
            line(&config, "cust_acme", "2026-11", 2),
            adjustment(&config, "cust_acme", 10, 12),
        ];
        let shown = explained(&config, "cust_acme", &lines, &[]);
        assert!(
            shown.contains("resolutions, late usage of 2026-10: 1.98 usd"),
            "{shown}"
        );
        assert!(
            shown.contains("  discount  12.5 % of 49.00 = 6.125, rounded half_up = 6.13\n"),
            "{shown}"
        );
        assert!(
            shown.contains("\ntotal 44.85 usd (42.87 + 1.98)\n"),
            "{shown}"
        );
        assert!(
            shown.contains("  its discounts changed this month by a plan change: 12.5 % off resolutions (in 2026-10: none)\n"),
            "{shown}"
        );
        // The month's lines are rounded as pro rounds; the adjustment as starter does.
        assert!(
            shown.contains(
                "  plan pro, usd; each line of the month rounded half_up to 2 decimals\n"
            ),
            "{shown}"
        );
        assert!(
            shown.contains("less the line as billed, each rounded half_even to 2 decimals as plan starter rounds (subtotal 1.98, discount 0.00) = 1.98 usd\n"),
            "{shown}"
        );
        assert_eq!(shown.matches("\ntotal ").count(), 1, "{shown}");
    }

    #[test]
    fn an_adjustment_shows_both_versions_of_the_closed_line_so_its_discount_can_be_redone() {
        // October closed at 150 resolutions; 900 more arrived late. 12.5 % of the
        // adjustment's subtotal (801.00) would round to 100.13: the discount billed is
        // the re-rated line's (111.81) less the one billed (11.69).
        let config = config();
        let closed = line(&config, "cust_pro", "2026-10", 150);
        let mut billed = Billed::default();
        billed.add(&closed);
        let late = adjustment(&config, "cust_pro", 150, 1050);
        let before = BTreeMap::from([((month("2026-10"), "resolutions".to_owned()), billed)]);
        let shown = explained_after(
            &config,
            "cust_pro",
            std::slice::from_ref(&late),
            &[],
            before,
        );
        for expected in [
            "  amount    what the late usage adds to 2026-10's line: that line rated again with it, less the line as billed, each rounded half_up to 2 decimals as plan pro rounds:\n",
            "            rated again  quantity 1050, subtotal 894.50, discount 12.5 % of 894.50 = 111.8125, rounded half_up = 111.81, amount 782.69\n",
            "            as billed    quantity 150, subtotal 93.50, discount 11.69, amount 81.81 (2026-10's line and any earlier adjustment of it)\n",
            "            difference   subtotal 894.50 - 93.50 = 801.00, discount 111.81 - 11.69 = 100.12: 801.00 - 100.12 = 700.88 usd\n",
        ] {
            assert!(shown.contains(expected), "{expected:?} in:\n{shown}");
        }
        assert!(!shown.contains("do not add up"), "{shown}");

        // October's stored line as another book rated it (a 10 % discount): the sums are
        // shown as stored, and no arithmetic is claimed that this book does not make.
        let mut other = Billed::default();
        other.add(&InvoiceLine {
            discount: Decimal::new(935, 2),
            amount: Decimal::new(8415, 2),
            ..closed
        });
        let before = BTreeMap::from([((month("2026-10"), "resolutions".to_owned()), other)]);
        let shown = explained_after(&config, "cust_pro", &[late], &[], before);
        for expected in [
            "            (the stored lines do not add up to 2026-10's line as this price book rates it with the late usage: one was rated with another book, or is missing from ClickHouse; the figures are the stored ones)\n",
            "            rated again  quantity 1050, subtotal 894.50, discount 109.47, amount 785.03\n",
        ] {
            assert!(shown.contains(expected), "{expected:?} in:\n{shown}");
        }
    }

    #[test]
    fn a_closed_months_late_usage_billed_later_is_listed_and_its_absence_said() {
        let config = config();
        let shown = |later: &[InvoiceLine], unfinished: bool| {
            let mut out = Vec::new();
            write_billed_later(&mut out, month("2026-10"), later, unfinished).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            shown(&[], false),
            "\nno usage of 2026-10 has been billed in a later month (late usage arriving after its close would be, as an adjustment line)\n"
        );
        let late = adjustment(&config, "cust_acme", 10, 12);
        assert_eq!(
            shown(&[late], false),
            "\nusage of 2026-10 that arrived after its close, billed in later months as adjustment lines (`tally explain --period` of that month works each through):\n  2026-11  resolutions  quantity 2  amount 1.98 usd\n"
        );
        // An open month's late usage is its own lines'.
        assert_eq!(shown(&[], true), "");
    }

    #[test]
    fn a_customer_no_longer_billed_shows_the_late_usage_it_is_still_billed_for() {
        let config = config();
        let lines = [adjustment(&config, "cust_gone", 3, 4)];
        let shown = explained(&config, "cust_gone", &lines, &[]);
        assert!(
            shown.contains("  not billed in 2026-11 (its `from` or `through` in the price book): its usage of the month is unbilled; the lines below bill late usage of months it was billed in\n"),
            "{shown}"
        );
        assert!(shown.contains("\ntotal 0.99 usd (0.99)\n"), "{shown}");
        let gone = &config.customers["cust_gone"];
        check_price(&config, gone, month("2026-11"), "resolutions", true).unwrap();
        let refused = check_price(&config, gone, month("2026-11"), "resolutions", false);
        assert!(refused.is_err());
        let unknown = check_price(&config, gone, month("2026-11"), "seats", true).unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "customer \"cust_gone\" has no price \"seats\" in 2026-11; its prices are those of plan \"starter\": resolutions"
        );
    }

    #[test]
    fn a_line_of_an_earlier_book_is_worked_through_only_where_this_book_rates_it_the_same() {
        let config = config();
        let mut same = line(&config, "cust_acme", "2026-11", 2);
        same.config_hash = "0123456789abcdef".to_owned();
        let shown = explained(&config, "cust_acme", &[same.clone()], &[]);
        assert!(
            shown.contains("  rated with price book 0123456789abcdef, which rates this line as this configuration does\n"),
            "{shown}"
        );
        assert!(shown.contains("  discount  12.5 % of 49.00"), "{shown}");

        // The earlier book gave 10 % off: its figures are shown, not this book's rules.
        let mut other = same;
        (other.discount, other.amount) = (Decimal::new(490, 2), Decimal::new(4410, 2));
        let shown = explained(&config, "cust_acme", &[other], &[]);
        for expected in [
            "  rated with price book 0123456789abcdef, which rates it otherwise than this configuration",
            "  quantity  2: meter resolutions\n",
            "  discount  4.90\n",
            "  amount    49.00 - 4.90 = 44.10 usd\n",
        ] {
            assert!(shown.contains(expected), "{expected:?} in:\n{shown}");
        }
        assert!(!shown.contains("  discount  12.5 %"), "{shown}");
    }

    #[test]
    fn stored_windows_that_do_not_make_the_quantity_are_pointed_out() {
        let config = config();
        let lines = [line(&config, "cust_acme", "2026-11", 3)];
        let series = Arc::new(SeriesKey {
            customer: "cust_acme".to_owned(),
            meter: "resolutions".to_owned(),
            group: Vec::new(),
            adjusts: None,
        });
        let start = month("2026-11").start() + chrono::Duration::hours(30);
        let window = WindowUsage {
            window_start: start,
            window_end: start + chrono::Duration::hours(1),
            value: MeterValue {
                value: Decimal::TWO,
                latest: None,
            },
            revision: 1,
        };
        let shown = explained(&config, "cust_acme", &lines, &[(series, vec![window])]);
        assert!(shown.contains("            by day: Nov 02: 2\n"), "{shown}");
        assert!(
            shown.contains("            the stored windows make 2, not the line's 3: windows are stored from when `store_windows` is set, and while the month is open they can be a batch ahead of its line\n"),
            "{shown}"
        );
    }
}
