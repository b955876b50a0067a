//! Incremental rating: period-to-date usage in, revised invoice lines out.
//!
//! In: each series' period-to-date value (from the aggregator's usage updates, in any
//! order, any number of times), and the periods that settled (can no longer change).
//! Out: on [`Ledger::flush_available`], one [`RatedLine`] per line whose usage changed, with a
//! revision and the change in amount, after which settled periods' lines are let go;
//! on [`Ledger::close`], every line of a period, including zero-usage lines for every
//! subscribed customer and price (revision 0, the opening line). Also the count of
//! series held ([`Ledger::series_held`]), and the lines whose series reached one of
//! [`CROWDED_LINE_SERIES`] since last asked ([`Ledger::take_crowded`]).
//!
//! A line's quantity combines the values of the series its price selects (meter and
//! filter): sums for count and sum meters, the largest for max, the sum of each
//! series' latest value for latest (one gauge per group: team a's 50 seats and team
//! b's 2 are 52), and for unique_count the one series validation lets a price select.
//! Because a line is always re-rated from its full period-to-date quantity, its final
//! amount equals rating the period's total at once, whatever order updates came in;
//! the deltas of successive revisions, from the opening line's amount (zero usage) for
//! a period's line or from nothing for an adjustment, add up to it.

use std::sync::Arc;

use hashbrown::{HashMap, HashSet};
use rust_decimal::Decimal;
use tally_schemas::config::{AggregationKind, Config, Customer, NoPlan};
use tally_schemas::decimal::ExactSum;
use tally_schemas::records::{InvoiceLine, MeterValue, SeriesKey, SeriesKeyRef};
use tally_schemas::time::Period;

use crate::line::{adjustment_line, invoice_line, line_id, LineError};
use crate::rate::RateError;

/// A line as the streaming rater emits it: the line's current state, its revision and
/// how much its amount moved since the previous revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatedLine {
    pub line: InvoiceLine,
    /// 0 for a period's line at zero usage (its opening line, flat fees only), then 1
    /// for its first revision with usage and counting; an adjustment line starts at 1.
    pub revision: u64,
    /// Change of `amount` since the previous revision. A period's line starts from its
    /// opening line's amount, an adjustment line from nothing, so the opening line's
    /// amount (for a period's line) and the deltas add up to the amount.
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
    /// The customer is not billed in the period (before its `from`, after its
    /// `through`): unbilled, to be reported.
    NotSubscribed,
    /// The period, or the closed period it adjusts, has settled: this repeats usage
    /// already billed (an aggregator replaying after it lost its state) and is left out.
    SettledPeriod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct LineKey {
    /// Into the prices of the customer's plan in the period the line rates
    /// ([`LineKey::rated_in`]).
    price_index: usize,
    /// The period the line is billed in.
    period: Period,
    /// For an adjustment line: the closed period whose late usage it bills.
    adjusts: Option<Period>,
}

impl LineKey {
    /// The period whose plan prices the line: the closed one for an adjustment.
    fn rated_in(&self) -> Period {
        self.adjusts.unwrap_or(self.period)
    }
}

/// A `lines` key by reference: hashes and compares as the owned `(String, LineKey)`.
#[derive(Hash)]
struct CustomerLine<'a>(&'a str, LineKey);

impl hashbrown::Equivalent<(String, LineKey)> for CustomerLine<'_> {
    fn equivalent(&self, (customer, line): &(String, LineKey)) -> bool {
        self.0 == customer && self.1 == *line
    }
}

impl From<&CustomerLine<'_>> for (String, LineKey) {
    fn from(key: &CustomerLine<'_>) -> Self {
        (key.0.to_owned(), key.1)
    }
}

/// Series counts of one line at which it is reported, once each as live records reach
/// them: a line's series are its `group_by` values' combinations, and this many are a
/// sender putting something of many values (a request id, a user) in a dimension, each
/// a series the aggregator and the rater hold for the month.
pub const CROWDED_LINE_SERIES: [usize; 4] = [1_000, 10_000, 100_000, 1_000_000];

/// A line that has just reached one of [`CROWDED_LINE_SERIES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrowdedLine {
    pub customer: String,
    pub price: String,
    /// The month the line bills.
    pub period: Period,
    /// For an adjustment line, the closed month its usage belongs to.
    pub adjusts: Option<Period>,
    /// The series it sums: the count it has just reached.
    pub series: usize,
    /// The meter of the series that reached it, and its group_by values: which
    /// dimension takes so many values shows in them.
    pub meter: String,
    pub example_group: Vec<String>,
}

#[derive(Debug, Default)]
struct LineState {
    /// Period-to-date value of each series the price selects.
    series: HashMap<Arc<SeriesKey>, MeterValue>,
    /// The line as last rated; `None` until the first flush.
    rated: Option<InvoiceLine>,
    revision: u64,
    dirty: bool,
    /// The offset of the last windows record seen to change the usage of one of its
    /// series from an earlier record's value ([`Ledger::record_at`]): a store of the
    /// line after it has a higher version.
    changed_at: Option<i64>,
}

/// Rated state for every customer's lines.
#[derive(Debug)]
pub struct Ledger {
    config: Arc<Config>,
    lines: HashMap<(String, LineKey), LineState>,
    dirty: Vec<(String, LineKey)>,
    /// Lines whose last rating failed: pending until they rate, or let go with their
    /// settled period.
    unrated: HashSet<(String, LineKey)>,
    /// The series the lines hold, a series once under each line: kept as they come
    /// and go, for a gauge read after every batch.
    series_held: usize,
    /// Lines that have just reached one of [`CROWDED_LINE_SERIES`], for the log
    /// ([`Ledger::take_crowded`]).
    crowded: Vec<CrowdedLine>,
    /// This period and earlier ones have settled: usage of them is refused.
    settled_through: Option<Period>,
    /// Lines of this period and earlier ones are let go at the next
    /// [`Ledger::flush_available`].
    let_go_through: Option<Period>,
}

impl Ledger {
    pub fn new(config: Arc<Config>) -> Self {
        Ledger {
            config,
            lines: HashMap::new(),
            dirty: Vec::new(),
            unrated: HashSet::new(),
            series_held: 0,
            crowded: Vec::new(),
            settled_through: None,
            let_go_through: None,
        }
    }

    /// Marks `period` and every earlier one settled: no usage of them can change any more
    /// (all their events are past the aggregator's dedupe horizon), late usage billed as
    /// adjustments included. Their lines, and adjustment lines for them (billed in a
    /// later period), are rated one last time and let go at the next
    /// [`Ledger::flush_available`], so a long-running ledger holds open periods only.
    /// Usage of them recorded afterwards is refused ([`Recorded::SettledPeriod`]): with
    /// the other series of its lines gone, it would re-bill them with part of their usage.
    pub fn settle_through(&mut self, period: Period) {
        self.settled_through = self.settled_through.max(Some(period));
        self.let_go_through = self.let_go_through.max(Some(period));
    }

    /// How many lines the ledger holds.
    pub fn lines_held(&self) -> usize {
        self.lines.len()
    }

    /// How many usage series the held lines hold, a series once under each line that
    /// selects it: what grows with a sender's distinct `group_by` values.
    pub fn series_held(&self) -> usize {
        self.series_held
    }

    /// The lines that reached a count of [`CROWDED_LINE_SERIES`] since the last call.
    pub fn take_crowded(&mut self) -> Vec<CrowdedLine> {
        std::mem::take(&mut self.crowded)
    }

    /// How many lines held could not be rated the last time they changed (their
    /// errors were returned then): each stays at its last stored amount meanwhile.
    pub fn lines_unrated(&self) -> usize {
        self.unrated.len()
    }

    /// The latest settled period, if any: later ones are open.
    pub fn settled_through(&self) -> Option<Period> {
        self.settled_through
    }

    /// The ids of the lines the ledger holds, which its flushes rate: after
    /// [`Ledger::rerate_all`], the lines that replace what an earlier price book made.
    pub fn line_ids(&self) -> impl Iterator<Item = String> + '_ {
        self.lines
            .keys()
            .map(|(customer, key)| self.id_of(customer, *key))
    }

    fn id_of(&self, customer: &str, key: LineKey) -> String {
        let plan = (self.config).plan_of(&self.config.customers[customer], key.rated_in());
        line_id(
            customer,
            &plan.prices[key.price_index].id,
            key.period,
            key.adjusts,
        )
    }

    /// The `most` lines a windows record was seen to change last ([`Ledger::record_at`]:
    /// a series' value changed from an earlier record's, not its first record), newest
    /// first, each with that record's offset; lines pending (changed since the last
    /// flush, or failing to rate) are left out, as they were not stored since.
    pub fn newest_changes(&self, most: usize) -> Vec<(String, i64)> {
        let mut changed: Vec<(i64, &(String, LineKey))> = (self.lines.iter())
            .filter(|(key, state)| !state.dirty && !self.unrated.contains(*key))
            .filter_map(|(key, state)| Some((state.changed_at?, key)))
            .collect();
        changed.sort_unstable_by_key(|&(offset, _)| std::cmp::Reverse(offset));
        (changed.into_iter().take(most))
            .map(|(offset, (customer, key))| (self.id_of(customer, *key), offset))
            .collect()
    }

    /// Marks every held line of an open period changed, so the next flush rates each
    /// one again: after the price book changed, its lines rated with the earlier book
    /// are replaced. Lines of settled periods not yet let go stay as billed.
    pub fn rerate_all(&mut self) {
        let settled = self.settled_through;
        for (key, state) in &mut self.lines {
            let (_, line) = key;
            if !line_open(settled, line.period, line.adjusts) {
                continue;
            }
            if !state.dirty {
                state.dirty = true;
                self.dirty.push(key.clone());
            }
        }
    }

    /// Records a series' period-to-date value (the latest one wins).
    pub fn record<'s>(
        &mut self,
        series: impl Into<SeriesKeyRef<'s>>,
        period: Period,
        value: MeterValue,
    ) -> Recorded {
        self.record_update(&series.into(), period, value, None)
    }

    /// [`Ledger::record`] of the windows record at `offset`, by a borrowed key, which
    /// the caller keeps (to report what became of it): the lines it changes remember
    /// the offset ([`Ledger::newest_changes`]).
    pub fn record_at(
        &mut self,
        series: &SeriesKeyRef<'_>,
        period: Period,
        value: MeterValue,
        offset: i64,
    ) -> Recorded {
        self.record_update(series, period, value, Some(offset))
    }

    fn record_update(
        &mut self,
        series: &SeriesKeyRef<'_>,
        period: Period,
        value: MeterValue,
        offset: Option<i64>,
    ) -> Recorded {
        if self.settled_through.is_some_and(|settled| {
            period <= settled || series.adjusts.is_some_and(|closed| closed <= settled)
        }) {
            return Recorded::SettledPeriod;
        }
        // An adjustment's usage is priced as the closed period's plan would have, and
        // billed if that period was, wherever the customer is now.
        let rated_in = series.adjusts.unwrap_or(period);
        let (customer, plan) = match self.config.billing(&series.customer, rated_in) {
            Ok(billing) => billing,
            Err(NoPlan::UnknownCustomer) => return Recorded::UnknownCustomer,
            Err(NoPlan::NotSubscribed) => return Recorded::NotSubscribed,
        };
        let mut billed = 0;
        let meter = self.config.meter_id(&series.meter);
        for (price_index, price) in plan.prices.iter().enumerate() {
            if !meter.is_some_and(|meter| price.bills(meter, &series.group)) {
                continue;
            }
            billed += 1;
            let line = LineKey {
                price_index,
                period,
                adjusts: series.adjusts,
            };
            // Looked up by reference: a usage update for a known line allocates nothing.
            let state = self
                .lines
                .entry_ref(&CustomerLine(&customer.id, line))
                .or_default();
            match state.series.get_mut(series) {
                Some(held) if *held == value => continue,
                Some(held) => {
                    *held = value;
                    // A change from a value a record of the same key showed: that
                    // record was not compacted away, so neither was any between (a
                    // topic is cleaned from its start), and this one changed the line
                    // when it was first read too. A series' first record may follow
                    // a compacted one of the same value, and then changed nothing.
                    state.changed_at = offset.or(state.changed_at);
                }
                None => {
                    state.series.insert(Arc::new(series.to_owned()), value);
                    self.series_held += 1;
                    if CROWDED_LINE_SERIES.contains(&state.series.len()) {
                        self.crowded.push(CrowdedLine {
                            customer: customer.id.clone(),
                            price: price.id.clone(),
                            period,
                            adjusts: series.adjusts,
                            series: state.series.len(),
                            meter: series.meter.to_string(),
                            example_group: series.group.iter().map(|g| g.to_string()).collect(),
                        });
                    }
                }
            }
            if !state.dirty {
                state.dirty = true;
                self.dirty.push((customer.id.clone(), line));
            }
        }
        if billed == 0 {
            Recorded::NotPriced
        } else {
            Recorded::Billed(billed)
        }
    }

    /// Re-rates every changed line that can be rated; a line that cannot (its amount
    /// overflows) stays pending, with its error returned, and does not hold up the
    /// others.
    ///
    /// Then the lines of settled periods are let go, a line that failed included: its
    /// usage no longer changes, so it would fail again (its error is among those
    /// returned).
    pub fn flush_available(&mut self) -> (Vec<RatedLine>, Vec<LineError>) {
        let flushed = self.flush_where(|_| true);
        if let Some(settled) = self.let_go_through.take() {
            let open = |key: &LineKey| line_open(Some(settled), key.period, key.adjusts);
            let mut let_go = 0;
            self.lines.retain(|(_, key), state| {
                let keep = open(key);
                if !keep {
                    let_go += state.series.len();
                }
                keep
            });
            self.series_held -= let_go;
            self.dirty.retain(|(_, key)| open(key));
            self.unrated.retain(|(_, key)| open(key));
        }
        flushed
    }

    /// Re-rates the changed lines whose key passes `select`; the others, and those that
    /// fail to rate, stay pending.
    fn flush_where(
        &mut self,
        select: impl Fn(&LineKey) -> bool,
    ) -> (Vec<RatedLine>, Vec<LineError>) {
        let (due, pending): (Vec<_>, Vec<_>) = std::mem::take(&mut self.dirty)
            .into_iter()
            .partition(|(_, key)| select(key));
        self.dirty = pending;
        let mut rated = Vec::with_capacity(due.len());
        let mut failures = Vec::new();
        for key in due {
            let priced = match key.1.adjusts {
                None => self.lines.get(&key).map(|state| {
                    price_line(&self.config, &self.config.customers[&key.0], key.1, state)
                }),
                Some(closed) => self.price_adjustment(&key.0, key.1, closed),
            };
            let Some(priced) = priced else {
                continue;
            };
            let priced = priced.and_then(|line| Ok((line, self.last_amount(&key)?)));
            let Some(state) = self.lines.get_mut(&key) else {
                continue;
            };
            let (line, previous) = match priced {
                Ok(priced) => priced,
                Err(e) => {
                    // Pending, so a later flush rates it again rather than serving its
                    // old version.
                    self.unrated.insert(key.clone());
                    self.dirty.push(key);
                    failures.push(e);
                    continue;
                }
            };
            self.unrated.remove(&key);
            state.dirty = false;
            state.revision += 1;
            let delta = line.amount - previous;
            state.rated = Some(line.clone());
            rated.push(RatedLine {
                line,
                revision: state.revision,
                delta,
            });
        }
        (rated, failures)
    }

    /// The amount a line's next revision moves from: its last revision's, or for a
    /// period's line not rated yet, its opening line's (at zero usage: flat fees).
    fn last_amount(&self, line: &(String, LineKey)) -> Result<Decimal, LineError> {
        let (customer, key) = line;
        let last = self.lines.get(line).and_then(|state| state.rated.as_ref());
        match (last, key.adjusts) {
            (Some(rated), _) => Ok(rated.amount),
            (None, Some(_)) => Ok(Decimal::ZERO),
            (None, None) => {
                let customer = &self.config.customers[customer];
                Ok(invoice_line(
                    &self.config,
                    customer,
                    key.price_index,
                    key.period,
                    Decimal::ZERO,
                )?
                .amount)
            }
        }
    }

    /// An adjustment line billed in `key.period` for late usage of `closed`: the closed
    /// line re-rated with the late usage of every adjustment up to this one, less the
    /// same with the adjustments before this one (each earlier one was billed already).
    fn price_adjustment(
        &self,
        customer_id: &str,
        key: LineKey,
        closed: Period,
    ) -> Option<Result<InvoiceLine, LineError>> {
        let customer = &self.config.customers[customer_id];
        let line = |period, adjusts| {
            self.lines.get(&(
                customer_id.to_owned(),
                LineKey {
                    period,
                    adjusts,
                    ..key
                },
            ))
        };
        let this = line(key.period, Some(closed))?;
        let mut billed: Vec<(&[String], MeterValue)> = Vec::new();
        let mut period = closed;
        loop {
            let state = if period == closed {
                line(closed, None)
            } else {
                line(period, Some(closed))
            };
            let values = state.into_iter().flat_map(|s| &s.series);
            billed.extend(values.map(|(series, value)| (series.group.as_slice(), *value)));
            period = period.next();
            if period >= key.period {
                break;
            }
        }
        let price = &self.config.plan_of(customer, closed).prices[key.price_index];
        // Only usage makes adjustments: a flat fee has none.
        let kind = self
            .config
            .meter(price.usage.as_ref()?.meter)
            .aggregation
            .kind();
        let rate_with = |values: &[(&[String], MeterValue)]| {
            let failed = |e| LineError::new(customer, price, closed, e);
            let grouped = group_values(values, kind).map_err(failed)?;
            rate_values(
                &self.config,
                customer,
                key.price_index,
                closed,
                grouped.into_iter(),
            )
        };
        let priced = rate_with(&billed).and_then(|before| {
            let late = this.series.iter();
            billed.extend(late.map(|(series, value)| (series.group.as_slice(), *value)));
            let after = rate_with(&billed)?;
            Ok(adjustment_line(&before, &after, key.period))
        });
        Some(priced.map_err(|e| e.adjustment_billed_in(key.period)))
    }

    /// Every subscribed customer's line of every price of their plan, at zero usage:
    /// what a period's lines are before any usage arrives. The streaming rater stores
    /// these at the lowest version when it first sees a period, so a customer without
    /// usage still has their lines (and flat fees) and one with usage has them replaced.
    pub fn opening_lines(&self, period: Period) -> Result<Vec<InvoiceLine>, LineError> {
        subscribed_prices(&self.config, period)
            .map(|(customer, price_index)| {
                invoice_line(&self.config, customer, price_index, period, Decimal::ZERO)
            })
            .collect()
    }

    /// Every line of the period in its current revision: one per subscribed customer and
    /// price of their plan, zero usage included, sorted by customer then by the price's
    /// place in the plan. The period's pending changes are flushed first (other periods'
    /// stay pending). A line that never had usage is its opening line, at revision 0
    /// with its whole amount as `delta`; for the others `delta` is the change since the
    /// previous flush (zero for lines that did not change).
    ///
    /// A line that cannot be rated (its amount is more minor units than a line holds)
    /// is left out, with its error among those returned: the others are the period's
    /// all the same.
    pub fn close(&mut self, period: Period) -> (Vec<RatedLine>, Vec<LineError>) {
        let (flushed, mut failures) = self.flush_where(|key| key.period == period);
        let failed: HashSet<(String, String)> = (failures.iter())
            .filter(|e| e.adjusts.is_none())
            .map(|e| (e.customer.clone(), e.price.clone()))
            .collect();
        let flushed: HashMap<String, Decimal> =
            flushed.into_iter().map(|r| (r.line.id, r.delta)).collect();
        let config = Arc::clone(&self.config);
        let mut lines = Vec::new();
        let mut unrated = Vec::new();
        for (customer, price_index) in subscribed_prices(&config, period) {
            let price = &config.plan_of(customer, period).prices[price_index];
            if !failed.is_empty() && failed.contains(&(customer.id.clone(), price.id.clone())) {
                continue;
            }
            let key = LineKey {
                price_index,
                period,
                adjusts: None,
            };
            let state = self.lines.entry((customer.id.clone(), key)).or_default();
            let (line, delta) = match &state.rated {
                Some(line) => (
                    line.clone(),
                    flushed.get(&line.id).copied().unwrap_or_default(),
                ),
                None => match price_line(&config, customer, key, state) {
                    Ok(line) => {
                        state.rated = Some(line.clone());
                        let delta = line.amount;
                        (line, delta)
                    }
                    Err(e) => {
                        unrated.push(e);
                        continue;
                    }
                },
            };
            lines.push(RatedLine {
                line,
                revision: state.revision,
                delta,
            });
        }
        failures.append(&mut unrated);
        (lines, failures)
    }
}

/// Whether a line billed in `period`, adjusting `adjusts` if it is an adjustment, is
/// still open once every period up to `settled` has settled: neither period has.
pub fn line_open(settled: Option<Period>, period: Period, adjusts: Option<Period>) -> bool {
    let open = |period: Period| settled.is_none_or(|settled| period > settled);
    open(period) && adjusts.is_none_or(open)
}

/// Every customer billed in `period` with the index of each price of their plan then,
/// in plan order: one invoice line each.
fn subscribed_prices(config: &Config, period: Period) -> impl Iterator<Item = (&Customer, usize)> {
    let billed = config.customers.values().filter(move |c| c.bills(period));
    billed.flat_map(move |customer| {
        (0..config.plan_of(customer, period).prices.len())
            .map(move |price_index| (customer, price_index))
    })
}

fn price_line(
    config: &Config,
    customer: &Customer,
    key: LineKey,
    state: &LineState,
) -> Result<InvoiceLine, LineError> {
    rate_values(
        config,
        customer,
        key.price_index,
        key.period,
        state.series.values().copied(),
    )
}

/// What a line bills of one series' (or, for a closed month, one group's) value: a
/// sum meter's series whose corrections outweigh its usage counts as none, so a
/// correction of one model's tokens never takes another's off a line that bills both.
pub fn billed_value(kind: AggregationKind, value: MeterValue) -> MeterValue {
    match kind {
        AggregationKind::Sum => MeterValue {
            value: value.value.max(Decimal::ZERO),
            ..value
        },
        _ => value,
    }
}

/// The customer's line of one price for `period`, its meter's `values` (one per
/// series) taken together as the quantity, each as [`billed_value`] counts it.
fn rate_values(
    config: &Config,
    customer: &Customer,
    price_index: usize,
    period: Period,
    values: impl Iterator<Item = MeterValue>,
) -> Result<InvoiceLine, LineError> {
    let price = &config.plan_of(customer, period).prices[price_index];
    let Some(usage) = &price.usage else {
        // A flat fee: no usage to add up.
        return invoice_line(config, customer, price_index, period, Decimal::ZERO);
    };
    let kind = config.meter(usage.meter).aggregation.kind();
    let values = values.map(|value| billed_value(kind, value));
    let quantity = combine(kind, values)
        .map_err(|e| LineError::new(customer, price, period, e))?
        .value;
    invoice_line(config, customer, price_index, period, quantity)
}

/// The values a line of a closed month is rated from, one per group: of a latest
/// meter the later reading, so late usage of a group replaces its month's value
/// instead of adding to it; of a sum meter the month's and the late usage added up, so
/// a late correction is weighed against its group's usage as a whole; of the others,
/// each series'.
fn group_values(
    values: &[(&[String], MeterValue)],
    kind: AggregationKind,
) -> Result<Vec<MeterValue>, RateError> {
    match kind {
        AggregationKind::Latest => {
            let mut by_group: HashMap<&[String], MeterValue> = HashMap::new();
            for &(group, value) in values {
                let held = by_group.entry(group).or_insert(value);
                *held = held.later(value);
            }
            Ok(by_group.into_values().collect())
        }
        AggregationKind::Sum => {
            let mut by_group: HashMap<&[String], ExactSum> = HashMap::new();
            for &(group, value) in values {
                by_group.entry(group).or_default().add(value.value);
            }
            (by_group.into_values())
                .map(|sum| {
                    let value = sum.fitted_total().ok_or(RateError::TotalTooLarge)?;
                    Ok(MeterValue {
                        value,
                        latest: None,
                    })
                })
                .collect()
        }
        AggregationKind::Count | AggregationKind::Max | AggregationKind::UniqueCount => {
            Ok(values.iter().map(|(_, value)| *value).collect())
        }
    }
}

/// The value of several series of one meter taken together (also several windows of
/// one series, for the meters whose windows add up to their period: count, sum, max).
pub fn combine(
    kind: AggregationKind,
    values: impl Iterator<Item = MeterValue>,
) -> Result<MeterValue, RateError> {
    match kind {
        // Exact whatever the order the series come in, rounded only past a decimal's
        // digits, so the same series always make the same quantity.
        // A latest meter's series are one gauge per group, each at its latest value.
        AggregationKind::Count
        | AggregationKind::Sum
        | AggregationKind::UniqueCount
        | AggregationKind::Latest => {
            let sum: ExactSum = values.map(|v| v.value).collect();
            let value = sum.fitted_total().ok_or(RateError::TotalTooLarge)?;
            Ok(MeterValue {
                value,
                latest: None,
            })
        }
        AggregationKind::Max => Ok(values.fold(MeterValue::ZERO, |acc, v| MeterValue {
            value: acc.value.max(v.value),
            latest: None,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    /// The changed lines rated, none of which may fail to rate.
    fn flushed(ledger: &mut Ledger) -> Vec<RatedLine> {
        let (lines, unrated) = ledger.flush_available();
        assert!(unrated.is_empty(), "{unrated:?}");
        lines
    }

    /// The period's lines, none of which may fail to rate.
    fn closed(ledger: &mut Ledger, period: Period) -> Vec<RatedLine> {
        let (lines, unrated) = ledger.close(period);
        assert!(unrated.is_empty(), "{unrated:?}");
        lines
    }

    const CONFIG: &str = r#"
        [[meters]]
        slug = "resolutions"
        event_type = "ai.resolution"
        aggregation = "count"

        [[meters]]
        slug = "tokens"
        event_type = "llm.tokens"
        aggregation = "sum"
        value_property = "$.tokens"
        group_by = { model = "$.model" }

        [[meters]]
        slug = "seats"
        event_type = "seats"
        aggregation = "max"
        value_property = "$.seats"
        group_by = { team = "$.team" }

        [[plans]]
        id = "pro"
        currency = "usd"

        [[plans.prices]]
        id = "resolutions"
        meter = "resolutions"
        billing_scheme = "tiered"
        tiers_mode = "graduated"
        tiers = [
          { up_to = 100, flat_amount = "49" },
          { up_to = 1000, unit_amount = "0.89" },
          { up_to = "inf", unit_amount = "0.69" },
        ]

        [[plans.prices]]
        id = "gpt-tokens"
        meter = "tokens"
        billing_scheme = "per_unit"
        unit_amount = "0.002"
        transform_quantity = { divide_by = 1000, round = "up" }
        filter = { model = "gpt-x" }

        [[plans.prices]]
        id = "all-tokens"
        meter = "tokens"
        billing_scheme = "tiered"
        tiers_mode = "volume"
        tiers = [
          { up_to = 5000, unit_amount = "0.0003" },
          { up_to = "inf", unit_amount = "0.0001", flat_amount = "0.5" },
        ]

        [[plans.prices]]
        id = "seats"
        meter = "seats"
        billing_scheme = "per_unit"
        unit_amount = "10"

        [[customers]]
        id = "acme"
        plan = "pro"
        discounts = [{ price = "resolutions", percent_off = "12.5" }]
    "#;

    fn config() -> Arc<Config> {
        Arc::new(Config::parse(CONFIG, "test").unwrap())
    }

    fn series(meter: &str, group: &[&str]) -> Arc<SeriesKey> {
        Arc::new(SeriesKey {
            customer: "acme".into(),
            meter: meter.into(),
            group: group.iter().map(|g| g.to_string()).collect(),
            adjusts: None,
        })
    }

    #[test]
    fn a_line_is_reported_as_it_reaches_each_crowded_count_of_series() {
        let mut ledger = Ledger::new(config());
        // A request id as the model: each event its own series, summed by all-tokens
        // (gpt-tokens selects gpt-x only).
        let record = |ledger: &mut Ledger, from: usize, to: usize| {
            for i in from..to {
                ledger.record(
                    &series("tokens", &[&format!("req-{i}")]),
                    november(),
                    value(1),
                );
                // A series already held is no new one.
                ledger.record(&series("tokens", &["req-0"]), november(), value(2));
            }
        };
        record(&mut ledger, 0, 1_500);
        let crowded = |series: usize| CrowdedLine {
            customer: "acme".into(),
            price: "all-tokens".into(),
            period: november(),
            adjusts: None,
            series,
            meter: "tokens".into(),
            example_group: vec![format!("req-{}", series - 1)],
        };
        assert_eq!(ledger.take_crowded(), [crowded(1_000)]);
        assert_eq!(ledger.take_crowded(), []);
        record(&mut ledger, 1_500, 10_001);
        assert_eq!(ledger.take_crowded(), [crowded(10_000)]);
        assert_eq!(ledger.series_held(), 10_001);
    }

    #[test]
    fn a_plan_change_prices_each_period_and_late_usage_by_its_own_plan() {
        let december = Period::from_str("2026-12").unwrap();
        let config = Arc::new(
            Config::parse(
                &format!(
                    r#"{CONFIG}
        [[customers.plan_changes]]
        from = "2026-12"
        plan = "team"

        [[plans]]
        id = "team"
        currency = "usd"

        [[plans.prices]]
        id = "resolutions"
        meter = "resolutions"
        billing_scheme = "per_unit"
        unit_amount = "0.99"

        [[plans.prices]]
        id = "platform"
        meter = "seats"
        billing_scheme = "tiered"
        tiers_mode = "volume"
        tiers = [{{ up_to = "inf", flat_amount = "20" }}]
    "#
                ),
                "test",
            )
            .unwrap(),
        );
        let mut ledger = Ledger::new(config);
        let prices = |lines: Vec<InvoiceLine>| -> Vec<(String, String, String)> {
            (lines.into_iter())
                .map(|l| (l.plan, l.price, l.amount.to_string()))
                .collect()
        };
        let owned = |rows: &[(&str, &str, &str)]| -> Vec<(String, String, String)> {
            (rows.iter())
                .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
                .collect()
        };
        assert_eq!(
            prices(ledger.opening_lines(november()).unwrap()),
            owned(&[
                ("pro", "resolutions", "42.87"),
                ("pro", "gpt-tokens", "0.00"),
                ("pro", "all-tokens", "0.00"),
                ("pro", "seats", "0.00"),
            ])
        );
        assert_eq!(
            prices(ledger.opening_lines(december).unwrap()),
            owned(&[
                ("team", "resolutions", "0.00"),
                ("team", "platform", "20.00")
            ])
        );

        let resolutions = series("resolutions", &[]);
        assert_eq!(
            ledger.record(&resolutions, november(), value(90)),
            Recorded::Billed(1)
        );
        assert_eq!(
            ledger.record(&resolutions, december, value(10)),
            Recorded::Billed(1)
        );
        // Tokens are priced by pro, not by team.
        let tokens = series("tokens", &["gpt-x"]);
        assert_eq!(
            ledger.record(&tokens, november(), value(2000)),
            Recorded::Billed(2)
        );
        assert_eq!(
            ledger.record(&tokens, december, value(2000)),
            Recorded::NotPriced
        );
        // November's usage arriving after November closed, billed in December as
        // pro would have priced it: 90 -> 110, ten past pro's first tier at 0.89,
        // 12.5 % off (pro's discount; team has none).
        let late = Arc::new(SeriesKey {
            adjusts: Some(november()),
            ..SeriesKey::clone(&resolutions)
        });
        assert_eq!(
            ledger.record(&late, december, value(20)),
            Recorded::Billed(1)
        );
        let mut rated: Vec<InvoiceLine> =
            flushed(&mut ledger).into_iter().map(|r| r.line).collect();
        rated.sort_by_key(|l| (l.period_start, l.adjusts_period, l.price.clone()));
        let rows: Vec<_> = (rated.iter())
            .map(|l| {
                (
                    Period::containing(l.period_start).to_string(),
                    l.adjusts_period.map(|p| p.to_string()),
                    l.plan.as_str(),
                    l.price.as_str(),
                    l.subtotal.to_string(),
                    l.amount.to_string(),
                )
            })
            .collect();
        let row =
            |period: &str, adjusts: Option<&str>, plan, price, subtotal: &str, amount: &str| {
                (
                    period.to_owned(),
                    adjusts.map(str::to_owned),
                    plan,
                    price,
                    subtotal.to_owned(),
                    amount.to_owned(),
                )
            };
        assert_eq!(
            rows,
            [
                row("2026-11", None, "pro", "all-tokens", "0.60", "0.60"),
                row("2026-11", None, "pro", "gpt-tokens", "0.00", "0.00"),
                row("2026-11", None, "pro", "resolutions", "49.00", "42.87"),
                row("2026-12", None, "team", "resolutions", "9.90", "9.90"),
                row(
                    "2026-12",
                    Some("2026-11"),
                    "pro",
                    "resolutions",
                    "8.90",
                    "7.79"
                ),
            ]
        );
        // December's invoice: team's lines, the platform fee included.
        let december_lines: Vec<_> = (closed(&mut ledger, december).into_iter())
            .map(|r| (r.line.plan, r.line.price, r.line.amount.to_string()))
            .collect();
        assert_eq!(
            december_lines,
            owned(&[
                ("team", "resolutions", "9.90"),
                ("team", "platform", "20.00")
            ])
        );
    }

    #[test]
    fn a_flat_fee_is_one_line_at_quantity_one_in_each_billed_month_whatever_the_usage() {
        let book = r#"
        [[meters]]
        slug = "resolutions"
        event_type = "ai.resolution"
        aggregation = "count"

        [[plans]]
        id = "pro"
        currency = "usd"

        [[plans.prices]]
        id = "platform"
        billing_scheme = "flat"
        unit_amount = "500"

        [[plans.prices]]
        id = "resolutions"
        meter = "resolutions"
        billing_scheme = "per_unit"
        unit_amount = "0.99"

        [[customers]]
        id = "acme"
        plan = "pro"
        through = "2026-11"
        "#;
        let mut ledger = Ledger::new(Arc::new(Config::parse(book, "test").unwrap()));
        let opening = ledger.opening_lines(november()).unwrap();
        let fee = opening.iter().find(|l| l.price == "platform").unwrap();
        let shown = |l: &InvoiceLine| {
            (
                l.meter.clone(),
                l.quantity.to_string(),
                l.amount.to_string(),
            )
        };
        assert_eq!(shown(fee), (String::new(), "1".into(), "500.00".into()));
        // Usage bills the resolutions line alone; the fee stays as it opened.
        let resolutions = series("resolutions", &[]);
        assert_eq!(
            ledger.record(&resolutions, november(), value(3)),
            Recorded::Billed(1)
        );
        let rated: Vec<String> = (flushed(&mut ledger).into_iter())
            .map(|r| r.line.price)
            .collect();
        assert_eq!(rated, ["resolutions"]);
        // Not billed in December: no fee.
        assert!(ledger.opening_lines(november().next()).unwrap().is_empty());
    }

    #[test]
    fn a_customer_has_lines_and_billed_usage_only_from_its_first_period_through_its_last() {
        let period = |p: &str| Period::from_str(p).unwrap();
        let bounded = CONFIG.replacen(
            "plan = \"pro\"\n",
            "plan = \"pro\"\n        from = \"2026-11\"\n        through = \"2026-12\"\n",
            1,
        );
        let mut ledger = Ledger::new(Arc::new(Config::parse(&bounded, "test").unwrap()));
        let resolutions = series("resolutions", &[]);
        for (month, lines, recorded) in [
            ("2026-10", 0, Recorded::NotSubscribed),
            ("2026-11", 4, Recorded::Billed(1)),
            ("2026-12", 4, Recorded::Billed(1)),
            ("2027-01", 0, Recorded::NotSubscribed),
        ] {
            let opening = ledger.opening_lines(period(month)).unwrap();
            assert_eq!(opening.len(), lines, "{month}");
            assert_eq!(
                ledger.record(&resolutions, period(month), value(1)),
                recorded,
                "{month}"
            );
        }
        // December's usage arriving after it closed is billed in January, where the
        // customer has no lines of its own.
        let late = Arc::new(SeriesKey {
            adjusts: Some(period("2026-12")),
            ..SeriesKey::clone(&resolutions)
        });
        assert_eq!(
            ledger.record(&late, period("2027-01"), value(1)),
            Recorded::Billed(1)
        );
        let adjustments: Vec<_> = (flushed(&mut ledger).into_iter())
            .filter(|r| r.line.adjusts_period.is_some())
            .map(|r| (r.line.period_start, r.line.adjusts_period, r.line.quantity))
            .collect();
        assert_eq!(
            adjustments,
            [(
                period("2027-01").start(),
                Some(period("2026-12")),
                Decimal::ONE
            )]
        );
        assert!(closed(&mut ledger, period("2027-01")).is_empty());
        let october = Arc::new(SeriesKey {
            adjusts: Some(period("2026-10")),
            ..SeriesKey::clone(&resolutions)
        });
        assert_eq!(
            ledger.record(&october, period("2026-11"), value(1)),
            Recorded::NotSubscribed
        );
    }

    #[test]
    fn a_second_adjustment_of_a_period_is_priced_after_the_first() {
        let october = Period::from_str("2026-10").unwrap();
        let december = Period::from_str("2026-12").unwrap();
        let mut ledger = Ledger::new(config());
        ledger.record(&series("resolutions", &[]), october, value(90));
        flushed(&mut ledger);
        let late = Arc::new(SeriesKey {
            adjusts: Some(october),
            ..SeriesKey::clone(&series("resolutions", &[]))
        });
        // 20 late in November: 90 -> 110, ten of them past the first tier.
        ledger.record(&late, november(), value(20));
        let first = flushed(&mut ledger).remove(0).line;
        assert_eq!(first.subtotal.to_string(), "8.90");
        // 20 more in December: 110 -> 130, all twenty in the second tier.
        ledger.record(&late, december, value(20));
        let second = flushed(&mut ledger).remove(0).line;
        assert_eq!(second.period_start, december.start());
        assert_eq!(second.subtotal.to_string(), "17.80");
        assert_ne!(first.id, second.id);
    }

    #[test]
    fn a_late_latest_reading_replaces_its_groups_value_in_the_adjustment() {
        use tally_schemas::ids::EventKey;
        use tally_schemas::records::EventOrder;
        let config = Arc::new(
            Config::parse(
                r#"
                [[meters]]
                slug = "seats"
                event_type = "seats"
                aggregation = "latest"
                value_property = "$.seats"
                group_by = { team = "$.team" }

                [[plans]]
                id = "teams"
                currency = "usd"

                [[plans.prices]]
                id = "seats"
                meter = "seats"
                billing_scheme = "per_unit"
                unit_amount = "10"

                [[customers]]
                id = "acme"
                plan = "teams"
                "#,
                "test",
            )
            .unwrap(),
        );
        let october = Period::from_str("2026-10").unwrap();
        let reading = |day: &str, seats: i64| MeterValue {
            value: Decimal::from(seats),
            latest: Some(EventOrder {
                time: format!("2026-10-{day}T09:00:00Z").parse().unwrap(),
                key: EventKey::new("seats", day),
            }),
        };
        let mut ledger = Ledger::new(config);
        ledger.record(&series("seats", &["a"]), october, reading("10", 50));
        ledger.record(&series("seats", &["b"]), october, reading("12", 2));
        let closed = flushed(&mut ledger).remove(0).line;
        assert_eq!(closed.quantity, Decimal::from(52));
        // Team a's reading of the 25th arrives after October closed: 55 seats, not 105.
        let late = Arc::new(SeriesKey {
            adjusts: Some(october),
            ..SeriesKey::clone(&series("seats", &["a"]))
        });
        ledger.record(&late, november(), reading("25", 55));
        let adjustment = flushed(&mut ledger).remove(0).line;
        assert_eq!(adjustment.quantity, Decimal::from(5));
        assert_eq!(adjustment.subtotal.to_string(), "50.00");
    }

    #[test]
    fn an_adjustment_that_cannot_be_rated_is_named_by_both_its_periods() {
        let october = Period::from_str("2026-10").unwrap();
        let huge = MeterValue {
            value: Decimal::MAX,
            latest: None,
        };
        let mut ledger = Ledger::new(config());
        ledger.record(&series("resolutions", &[]), october, huge);
        let late = Arc::new(SeriesKey {
            adjusts: Some(october),
            ..SeriesKey::clone(&series("resolutions", &[]))
        });
        ledger.record(&late, november(), huge);
        let (_, failures) = ledger.flush_available();
        let adjustment = failures
            .iter()
            .find(|e| e.adjusts.is_some())
            .expect("the adjustment fails: October's usage and the late usage overflow");
        assert_eq!(
            (adjustment.period, adjustment.adjusts),
            (november(), Some(october))
        );
        assert!(
            adjustment.to_string().starts_with(
                "cannot rate customer \"acme\"'s line for price \"resolutions\" in 2026-11 (adjusting 2026-10): "
            ),
            "{adjustment}"
        );
    }

    #[test]
    fn the_newest_changes_name_the_record_seen_to_change_each_stored_line() {
        let mut ledger = Ledger::new(config());
        let (resolutions, seats) = (series("resolutions", &[]), series("seats", &["a"]));
        let (resolutions, seats) = (
            SeriesKeyRef::from(&*resolutions),
            SeriesKeyRef::from(&*seats),
        );
        let offset_of = |ledger: &Ledger, price: &str| {
            let id = line_id("acme", price, november(), None);
            let changes = ledger.newest_changes(10);
            changes
                .into_iter()
                .find(|(line, _)| *line == id)
                .map(|(_, at)| at)
        };
        // A series' first record may follow a compacted one of the same value, which
        // was the change (stored at a version below this offset): it names nothing.
        ledger.record_at(&resolutions, november(), value(5), 20);
        ledger.record_at(&seats, november(), value(2), 21);
        flushed(&mut ledger);
        assert!(ledger.newest_changes(10).is_empty());
        // A record that changes nothing (a window of a max meter below its month's
        // max, say) writes no row, so it names nothing either.
        ledger.record_at(&resolutions, november(), value(5), 22);
        ledger.record_at(&seats, november(), value(3), 23);
        // Pending lines were not stored since their change: none is named yet.
        assert!(ledger.newest_changes(10).is_empty());
        flushed(&mut ledger);
        assert_eq!(
            (
                offset_of(&ledger, "resolutions"),
                offset_of(&ledger, "seats")
            ),
            (None, Some(23))
        );
        ledger.record_at(&resolutions, november(), value(6), 24);
        flushed(&mut ledger);
        assert_eq!(offset_of(&ledger, "resolutions"), Some(24));
        assert_eq!(
            ledger.newest_changes(1),
            [(line_id("acme", "resolutions", november(), None), 24)]
        );
        // A line that fails to rate was not stored: it is left out.
        let huge = MeterValue {
            value: Decimal::MAX,
            latest: None,
        };
        ledger.record_at(&seats, november(), huge, 25);
        let (_, failures) = ledger.flush_available();
        assert_eq!(failures.len(), 1);
        assert_eq!(offset_of(&ledger, "seats"), None);
    }

    #[test]
    fn a_line_that_cannot_be_rated_does_not_hold_up_the_others() {
        let mut ledger = Ledger::new(config());
        ledger.record(&series("resolutions", &[]), november(), value(5));
        ledger.record(
            &series("seats", &["a"]),
            november(),
            MeterValue {
                value: Decimal::MAX,
                latest: None,
            },
        );
        let (rated, failures) = ledger.flush_available();
        assert_eq!(rated.len(), 1);
        assert_eq!(rated[0].line.price, "resolutions");
        assert_eq!(failures.len(), 1);
        assert_eq!(ledger.lines_unrated(), 1);
        // The failed line stays pending; the rated one does not come back.
        let (rated, failures) = ledger.flush_available();
        assert!(rated.is_empty());
        assert_eq!(failures.len(), 1);
        // Usage that makes it fit again rates it, and it is no longer unrated.
        ledger.record(&series("seats", &["a"]), november(), value(3));
        let (rated, failures) = ledger.flush_available();
        assert_eq!((rated.len(), failures.len()), (1, 0));
        assert_eq!(rated[0].line.price, "seats");
        assert_eq!(ledger.lines_unrated(), 0);
    }

    #[test]
    fn settled_periods_are_rated_one_last_time_then_let_go_with_their_adjustments() {
        let september = Period::from_str("2026-09").unwrap();
        let october = Period::from_str("2026-10").unwrap();
        let resolutions = series("resolutions", &[]);
        let late_october = Arc::new(SeriesKey {
            adjusts: Some(october),
            ..SeriesKey::clone(&resolutions)
        });
        let mut ledger = Ledger::new(config());
        ledger.record(&resolutions, september, value(2));
        ledger.record(&resolutions, october, value(10));
        ledger.record(&late_october, november(), value(1));
        ledger.record(&resolutions, november(), value(3));
        flushed(&mut ledger);
        // The same prices bill each period and the adjustment.
        let per_period = ledger.lines_held() / 4;
        assert!(per_period >= 1 && ledger.lines_held() == 4 * per_period);
        // Each line holds its one series.
        assert_eq!(ledger.series_held(), 4 * per_period);
        // October's last update and its settling come in one batch: the update is
        // still rated before the lines go.
        ledger.record(&resolutions, october, value(12));
        ledger.settle_through(october);
        let last = flushed(&mut ledger);
        assert_eq!(last.len(), per_period);
        for rated in &last {
            assert_eq!(rated.line.period_start, october.start());
            assert_eq!(rated.line.quantity, Decimal::from(12));
        }
        // September, October and October's adjustment in November are gone; November's
        // own lines go on where they were. October's usage repeated (an aggregator
        // replaying) bills nothing: its line would lack the other series' usage.
        assert_eq!(ledger.lines_held(), per_period);
        assert_eq!(ledger.series_held(), per_period);
        assert_eq!(
            ledger.record(&resolutions, october, value(7)),
            Recorded::SettledPeriod
        );
        assert_eq!(
            ledger.record(&late_october, november(), value(1)),
            Recorded::SettledPeriod
        );
        ledger.record(&resolutions, november(), value(5));
        let next = flushed(&mut ledger);
        assert_eq!(next.len(), per_period);
        for rated in &next {
            assert_eq!(rated.line.period_start, november().start());
            assert_eq!(rated.line.adjusts_period, None);
            assert_eq!(rated.line.quantity, Decimal::from(5));
            assert_eq!(rated.revision, 2);
        }
        assert_eq!(ledger.lines_held(), per_period);
    }

    #[test]
    fn an_adjustment_bills_what_late_usage_adds_to_the_closed_line() {
        let october = Period::from_str("2026-10").unwrap();
        let mut ledger = Ledger::new(config());
        // October closed at 150 resolutions: 49 + 50 * 0.89 = 93.50, less 12.5 %.
        ledger.record(&series("resolutions", &[]), october, value(150));
        let closed = flushed(&mut ledger);
        assert_eq!(closed[0].line.amount.to_string(), "81.81");
        // 900 late October resolutions arrive in November: 150 -> 1050 crosses into
        // the third tier: 850 more at 0.89 and 50 at 0.69 = 791.00.
        let late = Arc::new(SeriesKey {
            adjusts: Some(october),
            ..SeriesKey::clone(&series("resolutions", &[]))
        });
        ledger.record(&late, november(), value(900));
        let adjustment = flushed(&mut ledger).remove(0).line;
        assert_eq!(adjustment.adjusts_period, Some(october));
        assert_eq!(adjustment.period_start, november().start());
        assert_eq!(adjustment.quantity, Decimal::from(900));
        assert_eq!(adjustment.subtotal.to_string(), "791.00");
        // The closed period would have billed 773.94 instead of 81.81.
        assert_eq!(adjustment.amount.to_string(), "692.13");
        assert_ne!(adjustment.id, closed[0].line.id);
        let tiers: Vec<(usize, String, String)> = adjustment
            .tiers
            .iter()
            .map(|t| (t.tier, t.quantity.to_string(), t.amount.to_string()))
            .collect();
        assert_eq!(
            tiers,
            vec![
                (2, "850".into(), "756.5".into()),
                (3, "50".into(), "34.5".into())
            ]
        );
        // The closed line itself is untouched, and November's own line is separate.
        assert!(flushed(&mut ledger).is_empty());
    }

    #[test]
    fn a_volume_adjustment_takes_back_the_old_tier_and_bills_the_new_one() {
        let october = Period::from_str("2026-10").unwrap();
        let mut ledger = Ledger::new(config());
        // October closed at 4000 tokens, volume tier 1: 4000 * 0.0003 = 1.20.
        ledger.record(&series("tokens", &["llama"]), october, value(4000));
        flushed(&mut ledger);
        // 2000 late tokens put all 6000 in tier 2: 6000 * 0.0001 + 0.5 = 1.10.
        let late = Arc::new(SeriesKey {
            adjusts: Some(october),
            ..SeriesKey::clone(&series("tokens", &["llama"]))
        });
        ledger.record(&late, november(), value(2000));
        let lines = flushed(&mut ledger);
        let adjustment = &lines
            .iter()
            .find(|l| l.line.price == "all-tokens")
            .unwrap()
            .line;
        assert_eq!(adjustment.amount.to_string(), "-0.10");
        let tiers: Vec<(usize, String, String, String)> = (adjustment.tiers.iter())
            .map(|t| {
                let figure = |d: Decimal| d.normalize().to_string();
                (
                    t.tier,
                    figure(t.quantity),
                    figure(t.flat_amount),
                    figure(t.amount),
                )
            })
            .collect();
        assert_eq!(
            tiers,
            vec![
                (1, "-4000".into(), "0".into(), "-1.2".into()),
                (2, "6000".into(), "0.5".into(), "1.1".into())
            ]
        );
        // Each tier's change is its quantity times its unit price plus its flat change.
        for tier in &adjustment.tiers {
            assert_eq!(
                tier.quantity * tier.unit_amount + tier.flat_amount,
                tier.amount
            );
        }
    }

    #[test]
    fn corrections_lower_a_line_to_no_less_than_zero_usage_and_late_ones_are_credits() {
        let october = Period::from_str("2026-10").unwrap();
        let mut ledger = Ledger::new(config());
        // A sum meter taking corrections: 4000 llama tokens, and gpt-x usage whose
        // corrections outweigh it by 500.
        ledger.record(&series("tokens", &["llama"]), october, value(4000));
        ledger.record(&series("tokens", &["gpt-x"]), october, value(-500));
        let closed = flushed(&mut ledger);
        let line = |lines: &[RatedLine], price: &str| {
            let line = &lines.iter().find(|l| l.line.price == price).unwrap().line;
            (line.quantity.to_string(), line.amount.to_string())
        };
        // The gpt-x line bills zero usage, not a negative quantity through its tiers.
        assert_eq!(line(&closed, "gpt-tokens"), ("0".into(), "0.00".into()));
        // The line of all models bills llama's 4000 (4000 * 0.0003): gpt-x's
        // over-correction takes none of llama's usage off it.
        assert_eq!(line(&closed, "all-tokens"), ("4000".into(), "1.20".into()));
        // A correction of 2000 llama tokens read after October closed is a credit in
        // November: 2000 * 0.0003 = 0.60 where 1.20 was billed.
        let late = |group: &str| {
            Arc::new(SeriesKey {
                adjusts: Some(october),
                ..SeriesKey::clone(&series("tokens", &[group]))
            })
        };
        ledger.record(&late("llama"), november(), value(-2000));
        let adjustments = flushed(&mut ledger);
        assert_eq!(
            line(&adjustments, "all-tokens"),
            ("-2000".into(), "-0.60".into())
        );
        // The llama correction is not gpt-x usage: that line has nothing to adjust.
        assert_eq!(adjustments.len(), 1);
        // Late gpt-x usage of 300 leaves gpt-x at -200 in all: still none billed.
        ledger.record(&late("gpt-x"), november(), value(300));
        let unchanged = flushed(&mut ledger);
        assert_eq!(line(&unchanged, "gpt-tokens"), ("0".into(), "0.00".into()));
        assert_eq!(
            line(&unchanged, "all-tokens"),
            ("-2000".into(), "-0.60".into())
        );
        // A late llama correction larger than what is left: October's llama usage
        // counts as zero, so the credit is at most what October billed of it (2000).
        ledger.record(&late("llama"), november(), value(-5000));
        let floored = flushed(&mut ledger);
        assert_eq!(
            line(&floored, "all-tokens"),
            ("-4000".into(), "-1.20".into())
        );
    }

    fn value(v: i64) -> MeterValue {
        MeterValue {
            value: Decimal::from(v),
            latest: None,
        }
    }

    fn november() -> Period {
        Period::from_str("2026-11").unwrap()
    }

    #[test]
    fn a_latest_line_adds_up_each_series_latest_value() {
        use tally_schemas::ids::EventKey;
        use tally_schemas::records::EventOrder;
        let reading = |day: &str, seats: i64| MeterValue {
            value: Decimal::from(seats),
            latest: Some(EventOrder {
                time: format!("2026-11-{day}T09:00:00Z").parse().unwrap(),
                key: EventKey::new("seats", day),
            }),
        };
        // Team a's 50 seats of the 10th and team b's 2 of the 20th are 52 seats, not
        // the later reading's 2.
        let teams = [reading("10", 50), reading("20", 2)];
        let combined = combine(AggregationKind::Latest, teams.into_iter()).unwrap();
        assert_eq!(combined.value, Decimal::from(52));
    }

    #[test]
    fn a_line_too_large_to_store_is_left_out_of_the_close_and_the_others_kept() {
        let mut ledger = Ledger::new(config());
        ledger.record(&series("seats", &["a"]), november(), value(3));
        let huge = MeterValue {
            value: Decimal::from_str("10000000000000000000000").unwrap(),
            ..value(0)
        };
        ledger.record(&series("tokens", &["gpt-x"]), november(), huge);
        ledger.record(&series("tokens", &["llama"]), november(), value(4000));
        let (lines, unrated) = ledger.close(november());
        let failed: Vec<(&str, &str)> = (unrated.iter())
            .map(|e| (e.customer.as_str(), e.price.as_str()))
            .collect();
        // 10^22 tokens: gpt-tokens (10^19 packages at 0.002, 2 x 10^18 cents) fits in
        // a 64-bit count of minor units, all-tokens (10^22 at 0.0001: 10^20 cents)
        // does not.
        assert_eq!(failed, [("acme", "all-tokens")]);
        assert!(matches!(
            unrated[0].source,
            RateError::AmountTooLarge { .. }
        ));
        let prices: Vec<&str> = lines.iter().map(|l| l.line.price.as_str()).collect();
        assert_eq!(prices, ["resolutions", "gpt-tokens", "seats"]);
        assert_eq!(lines[2].line.amount.to_string(), "30.00");
    }

    #[test]
    fn a_line_combines_the_series_its_price_selects() {
        let mut ledger = Ledger::new(config());
        ledger.record(&series("tokens", &["gpt-x"]), november(), value(1500));
        ledger.record(&series("tokens", &["llama"]), november(), value(4000));
        ledger.record(&series("seats", &["a"]), november(), value(3));
        ledger.record(&series("seats", &["b"]), november(), value(5));
        let lines = closed(&mut ledger, november());
        let by_price = |id: &str| {
            lines
                .iter()
                .find(|l| l.line.price == id)
                .unwrap()
                .line
                .clone()
        };
        // Filtered to gpt-x: 1500 tokens, 2 packages of 1000.
        assert_eq!(by_price("gpt-tokens").quantity, Decimal::from(1500));
        assert_eq!(by_price("gpt-tokens").amount.to_string(), "0.00");
        // Unfiltered: 5500 tokens at volume tier 2: 0.55 + 0.5 = 1.05.
        assert_eq!(by_price("all-tokens").quantity, Decimal::from(5500));
        assert_eq!(by_price("all-tokens").amount.to_string(), "1.05");
        // Max across teams is 5, not 8.
        assert_eq!(by_price("seats").amount.to_string(), "50.00");
        // No resolutions: the first tier's flat fee, less 12.5 %: 49 - 6.13 = 42.87.
        let resolutions = by_price("resolutions");
        assert_eq!(resolutions.quantity, Decimal::ZERO);
        assert_eq!(
            (
                resolutions.subtotal.to_string(),
                resolutions.discount.to_string(),
                resolutions.amount.to_string()
            ),
            ("49.00".into(), "6.13".into(), "42.87".into())
        );
    }

    #[test]
    fn usage_of_unknown_customers_and_unpriced_meters_is_reported() {
        let mut ledger = Ledger::new(config());
        let stranger = Arc::new(SeriesKey {
            customer: "nobody".into(),
            meter: "tokens".into(),
            group: vec!["gpt-x".into()],
            adjusts: None,
        });
        assert_eq!(
            ledger.record(&stranger, november(), value(1)),
            Recorded::UnknownCustomer
        );
        assert_eq!(
            ledger.record(&series("tokens", &["gpt-x"]), november(), value(1)),
            Recorded::Billed(2)
        );
        assert_eq!(
            ledger.record(&series("unmetered", &[]), november(), value(1)),
            Recorded::NotPriced
        );
    }

    #[test]
    fn revisions_count_up_and_deltas_follow_the_amount() {
        let mut ledger = Ledger::new(config());
        let res = series("resolutions", &[]);
        ledger.record(&res, november(), value(150));
        let first = flushed(&mut ledger);
        assert_eq!(
            (first[0].revision, first[0].line.amount.to_string()),
            (1, "81.81".to_string())
        );
        // The first revision moves from the opening line: the flat fee of the first
        // tier, less the discount.
        let opening = ledger.opening_lines(november()).unwrap();
        let opening = opening.iter().find(|l| l.id == first[0].line.id).unwrap();
        assert_eq!(opening.amount.to_string(), "42.87");
        assert_eq!(first[0].delta.to_string(), "38.94");
        // The same value again changes nothing.
        ledger.record(&res, november(), value(150));
        assert!(flushed(&mut ledger).is_empty());
        ledger.record(&res, november(), value(151));
        let second = flushed(&mut ledger);
        assert_eq!(second[0].revision, 2);
        assert_eq!(second[0].delta.to_string(), "0.78");
    }

    #[test]
    fn rerating_all_flushes_every_held_line_once_with_the_ids_it_lists() {
        let october = Period::from_str("2026-10").unwrap();
        let mut ledger = Ledger::new(config());
        ledger.record(&series("resolutions", &[]), october, value(90));
        ledger.record(&series("tokens", &["gpt-x"]), november(), value(1500));
        let late = Arc::new(SeriesKey {
            adjusts: Some(october),
            ..SeriesKey::clone(&series("resolutions", &[]))
        });
        ledger.record(&late, november(), value(20));
        let first = flushed(&mut ledger);
        assert!(flushed(&mut ledger).is_empty());

        ledger.rerate_all();
        let again = flushed(&mut ledger);
        let ids = |lines: &[RatedLine]| {
            let mut ids: Vec<String> = lines.iter().map(|l| l.line.id.clone()).collect();
            ids.sort();
            ids
        };
        let mut listed: Vec<String> = ledger.line_ids().collect();
        listed.sort();
        // October's resolutions, the October adjustment billed in November, November's
        // gpt-x tokens under two prices.
        assert_eq!(listed.len(), 4);
        assert_eq!(ids(&again), listed);
        assert_eq!(ids(&first), listed);
        assert!(again.iter().all(|l| l.revision == 2 && l.delta.is_zero()));
        assert!(flushed(&mut ledger).is_empty(), "each line once");

        // October settles; until the next flush lets its lines go, they are held but
        // not re-rated: a settled month stays as billed.
        ledger.settle_through(october);
        ledger.rerate_all();
        let open_only = flushed(&mut ledger);
        assert_eq!(open_only.len(), 2, "November's two token lines");
        assert!(open_only
            .iter()
            .all(|l| l.line.period_start == november().start() && l.line.adjusts_period.is_none()));
    }

    #[test]
    fn a_line_that_fails_to_rate_is_rated_again_later() {
        let mut ledger = Ledger::new(config());
        let res = series("resolutions", &[]);
        ledger.record(&res, november(), value(100));
        flushed(&mut ledger);
        let huge = MeterValue {
            value: Decimal::MAX,
            latest: None,
        };
        ledger.record(&res, november(), huge);
        let (rated, unrated) = ledger.flush_available();
        assert!(rated.is_empty() && unrated.len() == 1, "{unrated:?}");
        ledger.record(&res, november(), value(200));
        let rated = flushed(&mut ledger);
        assert_eq!(rated.len(), 1);
        assert_eq!(rated[0].line.quantity, Decimal::from(200));
        // Two series whose sum overflows are an error, not a panic.
        let mut ledger = Ledger::new(config());
        ledger.record(&series("tokens", &["a"]), november(), huge);
        ledger.record(&series("tokens", &["b"]), november(), huge);
        let (_, mut unrated) = ledger.flush_available();
        let error = unrated.pop().expect("a line that cannot be rated");
        assert!(matches!(error.source, RateError::TotalTooLarge));
        assert_eq!(
            error.to_string(),
            format!(
                "cannot rate customer \"acme\"'s line for price \"all-tokens\" in 2026-11: {}",
                error.source
            )
        );
        // A sum of series that needs more digits than a decimal holds is rated,
        // rounded at its last digit, the same whichever series comes first.
        let exact = |value: &str| MeterValue {
            value: value.parse().unwrap(),
            latest: None,
        };
        let (large, precise) = (exact("5000"), exact("0.1234567890123456789012345678"));
        for (a, b) in [(large, precise), (precise, large)] {
            let mut ledger = Ledger::new(config());
            ledger.record(&series("tokens", &["a"]), november(), a);
            ledger.record(&series("tokens", &["b"]), november(), b);
            let rated = flushed(&mut ledger);
            assert_eq!(
                rated[0].line.quantity.to_string(),
                "5000.1234567890123456789012346"
            );
        }
    }

    proptest! {
        /// Window usage added to period-to-date totals, in any order and flushed at any
        /// points, ends at exactly the amount of rating the period total at once, and
        /// the opening line's amount and the deltas of the revisions add up to it.
        #[test]
        fn incremental_rating_equals_rating_the_total(
            windows in proptest::collection::vec((0usize..3, 0u32..5000), 1..40),
            flush_mask in any::<u64>(),
        ) {
            let config = config();
            let models = ["gpt-x", "claude", "llama"];
            let mut ledger = Ledger::new(Arc::clone(&config));
            let mut to_date = [Decimal::ZERO; 3];
            let mut resolutions = Decimal::ZERO;
            let mut deltas: HashMap<String, Decimal> = HashMap::new();
            for (i, &(model, n)) in windows.iter().enumerate() {
                to_date[model] += Decimal::from(n);
                resolutions += Decimal::from(n % 7);
                ledger.record(&series("tokens", &[models[model]]), november(), MeterValue { value: to_date[model], latest: None });
                ledger.record(&series("resolutions", &[]), november(), MeterValue { value: resolutions, latest: None });
                if flush_mask & (1 << (i % 64)) != 0 {
                    for r in flushed(&mut ledger) {
                        *deltas.entry(r.line.price.clone()).or_default() += r.delta;
                    }
                }
            }
            let closed = closed(&mut ledger, november());
            let customer = &config.customers["acme"];
            let totals = [
                ("resolutions", resolutions),
                ("gpt-tokens", to_date[0]),
                ("all-tokens", to_date.iter().copied().sum()),
                ("seats", Decimal::ZERO),
            ];
            for (price, quantity) in totals {
                let index = config.plan_of(customer, november()).prices.iter().position(|p| p.id == price).unwrap();
                let at_once = invoice_line(&config, customer, index, november(), quantity).unwrap();
                let rated = closed.iter().find(|r| r.line.price == price).unwrap();
                prop_assert_eq!(&rated.line, &at_once);
                let summed = deltas.get(price).copied().unwrap_or_default() + rated.delta;
                if rated.revision == 0 {
                    // Never used: the opening line, its whole amount the delta.
                    prop_assert!(!deltas.contains_key(price));
                    prop_assert_eq!(summed, at_once.amount);
                } else {
                    let opening = invoice_line(&config, customer, index, november(), Decimal::ZERO).unwrap();
                    prop_assert_eq!(opening.amount + summed, at_once.amount);
                }
            }
        }

        /// Each line is rounded once to the currency's minor unit (its subtotal is its
        /// exact charge rounded, not a sum of rounded tiers), its amount is its subtotal
        /// less a discount no larger than the subtotal.
        #[test]
        fn lines_are_rounded_once_and_add_up(
            quantities in proptest::collection::vec(0u32..100_000, 4),
            scale in 0u32..4,
        ) {
            let config = config();
            let customer = &config.customers["acme"];
            for (index, q) in quantities.iter().enumerate() {
                let quantity = Decimal::new(i64::from(*q), scale);
                let line = invoice_line(&config, customer, index, november(), quantity).unwrap();
                let plan = config.plan(customer.subscription(november()).plan);
                // Rounded once: the tier amounts (exact at these quantities) added up,
                // then rounded, never tier by tier.
                let exact: Decimal = line.tiers.iter().map(|t| t.amount).sum();
                prop_assert_eq!(line.subtotal, plan.currency.round(exact, plan.rounding));
                prop_assert_eq!(line.subtotal.scale(), 2);
                prop_assert_eq!(line.amount.scale(), 2);
                prop_assert!(line.discount >= Decimal::ZERO && line.discount <= line.subtotal);
                prop_assert_eq!(line.amount, line.subtotal - line.discount);
            }
        }
    }
}
