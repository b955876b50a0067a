//! `tally explain`: one customer's invoice of a month, worked through so that finance
//! and support can redo every figure by hand.
//!
//! In: the customer's lines and usage windows, either as `tally rate` makes them of an
//! events file (with what became of the customer's events and its unbilled usage), or
//! as the streaming rater stored them in ClickHouse. Out: text, per line where the
//! quantity comes from (the meter, the series it adds up, the usage per day), each
//! tier's arithmetic, the rounding, the discount and the amount; then the invoice's
//! total. Every figure shown is the line's own, so it is the cent that was billed.
//!
//! Layout: this module gathers the inputs ([`Explanation`]); [`invoice`] writes the
//! invoice's heading, events, later billing and repricings around its lines; [`line`](mod@line)
//! works each line through.

mod invoice;
mod line;
#[cfg(test)]
mod tests;

pub use invoice::write_explanation;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use chrono::Utc;
use clap::Args;
use rust_decimal::Decimal;
use tally_rater::clickhouse::{ClickHouse, Repricing};
use tally_schemas::config::{Config, Customer};
use tally_schemas::price::Plan;
use tally_schemas::records::{InvoiceLine, SeriesWindows};
use tally_schemas::time::Period;

use crate::batch::{rate_events, read_input, BatchResult};
use crate::summary::{CustomerEvents, LineNotRated, UnbilledUsage};
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
