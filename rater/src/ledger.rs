//! Incremental rating: period-to-date usage in, revised invoice lines out.
//!
//! In: each series' period-to-date value (from the aggregator's window updates, in any
//! order, any number of times). Out: on [`Ledger::flush`], one [`RatedLine`] per line
//! whose usage changed, with a revision and the change in amount; on
//! [`Ledger::close`], every line of a period, including zero-usage lines for every
//! subscribed customer and price.
//!
//! A line's quantity combines the values of the series its price selects (meter and
//! filter): sums for count and sum meters, the largest for max, the latest by event
//! time for latest (unique_count prices select one series; validation sees to that).
//! Because a line is always re-rated from its full period-to-date quantity, its final
//! amount equals rating the period's total at once, whatever order updates came in;
//! the deltas of successive revisions add up to it.

use std::sync::Arc;

use hashbrown::HashMap;
use rust_decimal::Decimal;
use tally_schemas::config::{AggregationKind, Config, Customer};
use tally_schemas::records::{InvoiceLine, MeterValue, SeriesKey};
use tally_schemas::time::Period;

use crate::line::invoice_line;
use crate::rate::RateError;

/// A line as the streaming rater emits it: the line's current state, its revision and
/// how much its amount moved since the previous revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatedLine {
    pub line: InvoiceLine,
    /// 1 for a line's first version, then counting.
    pub revision: u64,
    /// Change of `amount` since the previous revision (the whole amount for the first).
    pub delta: Decimal,
}

/// What became of a series' usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Counted towards this many of the customer's lines.
    Billed(usize),
    /// The customer is not in the configuration: unbilled, to be reported.
    UnknownCustomer,
    /// The customer's plan has no price for this meter and these dimensions.
    NotPriced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct LineKey {
    price_index: usize,
    period: Period,
}

#[derive(Debug, Default)]
struct LineState {
    /// Period-to-date value of each series the price selects.
    series: HashMap<Arc<SeriesKey>, MeterValue>,
    /// The line as last rated; `None` until the first flush.
    rated: Option<InvoiceLine>,
    revision: u64,
    dirty: bool,
}

/// Rated state for every customer's lines.
#[derive(Debug)]
pub struct Ledger {
    config: Arc<Config>,
    lines: HashMap<(String, LineKey), LineState>,
    dirty: Vec<(String, LineKey)>,
}

impl Ledger {
    pub fn new(config: Arc<Config>) -> Self {
        Ledger {
            config,
            lines: HashMap::new(),
            dirty: Vec::new(),
        }
    }

    /// Records a series' period-to-date value (the latest one wins).
    pub fn record(&mut self, series: &Arc<SeriesKey>, period: Period, value: MeterValue) -> Recorded {
        let Some(customer) = self.config.customers.get(&series.customer) else {
            return Recorded::UnknownCustomer;
        };
        let plan = self.config.plan(customer.plan);
        let mut billed = 0;
        for (price_index, price) in plan.prices.iter().enumerate() {
            if self.config.meter(price.meter).slug != series.meter || !price.matches(&series.group) {
                continue;
            }
            billed += 1;
            let key = (customer.id.clone(), LineKey { price_index, period });
            let state = self.lines.entry(key.clone()).or_default();
            if state.series.get(series) != Some(&value) {
                state.series.insert(Arc::clone(series), value);
                if !state.dirty {
                    state.dirty = true;
                    self.dirty.push(key);
                }
            }
        }
        if billed == 0 {
            Recorded::NotPriced
        } else {
            Recorded::Billed(billed)
        }
    }

    /// Re-rates every line changed since the last flush.
    pub fn flush(&mut self) -> Result<Vec<RatedLine>, RateError> {
        let mut rated = Vec::with_capacity(self.dirty.len());
        for key in std::mem::take(&mut self.dirty) {
            let Some(state) = self.lines.get_mut(&key) else { continue };
            let customer = &self.config.customers[&key.0];
            let line = price_line(&self.config, customer, key.1, state)?;
            state.dirty = false;
            state.revision += 1;
            let previous = state.rated.as_ref().map_or(Decimal::ZERO, |l| l.amount);
            let delta = line.amount - previous;
            state.rated = Some(line.clone());
            rated.push(RatedLine {
                line,
                revision: state.revision,
                delta,
            });
        }
        Ok(rated)
    }

    /// Every line of the period in its current revision: one per subscribed customer and
    /// price of their plan, zero usage included, sorted by customer then by the price's
    /// place in the plan. Pending changes are flushed first; a line that never had usage
    /// gets its first revision here.
    pub fn close(&mut self, period: Period) -> Result<Vec<RatedLine>, RateError> {
        self.flush()?;
        let config = Arc::clone(&self.config);
        let mut lines = Vec::new();
        for customer in config.customers.values() {
            let plan = config.plan(customer.plan);
            for price_index in 0..plan.prices.len() {
                let key = LineKey { price_index, period };
                let state = self.lines.entry((customer.id.clone(), key)).or_default();
                let (line, delta) = match &state.rated {
                    Some(line) => (line.clone(), Decimal::ZERO),
                    None => {
                        let line = price_line(&config, customer, key, state)?;
                        state.revision = 1;
                        state.rated = Some(line.clone());
                        let delta = line.amount;
                        (line, delta)
                    }
                };
                lines.push(RatedLine {
                    line,
                    revision: state.revision,
                    delta,
                });
            }
        }
        Ok(lines)
    }
}

fn price_line(config: &Config, customer: &Customer, key: LineKey, state: &LineState) -> Result<InvoiceLine, RateError> {
    let plan = config.plan(customer.plan);
    let meter = config.meter(plan.prices[key.price_index].meter);
    let quantity = combine(meter.aggregation.kind(), state.series.values().copied()).value;
    invoice_line(config, customer, key.price_index, key.period, quantity)
}

/// The value of several series of one meter taken together.
fn combine(kind: AggregationKind, values: impl Iterator<Item = MeterValue>) -> MeterValue {
    values.fold(MeterValue::ZERO, |acc, v| match kind {
        AggregationKind::Count | AggregationKind::Sum | AggregationKind::UniqueCount => MeterValue {
            value: acc.value + v.value,
            latest: None,
        },
        AggregationKind::Max => MeterValue {
            value: acc.value.max(v.value),
            latest: None,
        },
        AggregationKind::Latest => acc.later(v),
    })
}
