//! Keeping stored lines on the current price book: a partition whose open months' lines
//! another book rated is re-rated with this one, and lines this book no longer makes
//! are retired.
//!
//! In: ClickHouse's lines of open months rated with another book (checked when a
//! partition is assigned and every `price_book_check_interval`). Out: the partition's
//! lines re-rated, its zero-usage (opening) lines queued, stale lines retired, all in
//! the next batch. A line's partition is the one its customer's usage lives in; a
//! customer without usage is judged by the partition its id hashes to.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prometheus::IntCounter;
use rust_decimal::Decimal;
use tally_runtime::kafka::partition_for_key;
use tally_schemas::config::Config;
use tally_schemas::records::InvoiceLine;
use tally_schemas::time::Period;

use crate::clickhouse::{ClickHouseError, Repricing, StoredLine};
use crate::ledger::{line_open, RatedLine};

use super::store::PartitionRows;
use super::{PartitionState, Worker, MAX_CHECK_DEFERRAL};

/// Where a partition's stored lines stand against this rater's price book: what
/// [`Worker::check_price_book`] checks and re-rates, and what the lines of the next
/// batch owe to a re-rating.
#[derive(Debug)]
pub(super) struct BookCheck {
    /// Every customer with usage in the partition's unsettled months when it was
    /// assigned (known to the price book or not): the partition replaces their stale
    /// lines with usage (only open months' lines are checked). Lines
    /// with usage written since are this rater's, rated with its book.
    pub(super) customers_with_usage: HashSet<String>,
    /// From assignment, or a scheduled check, until the partition's stored lines were
    /// checked against the price book ([`Worker::check_price_book`]).
    pub(super) unchecked: bool,
    /// Its committed lines were stored with another price book (or by a build that did
    /// not say which): the check re-rates all of them, and writes its customers'
    /// opening lines, also where no stale row shows it. A line the old book never
    /// stored (a customer the new book adds, whose usage the old one left unbilled)
    /// has no row to be found stale.
    pub(super) stored_with_another_book: bool,
    /// Since when the check has waited for the partition's position to pass a stored
    /// row of it ([`MAX_CHECK_DEFERRAL`]).
    pub(super) check_deferred: Option<Instant>,
    /// Lines with usage another price book rated, by id, as stored: their next
    /// revision's delta moves from its amount (the rebuilt ledger holds this book's).
    pub(super) restated: HashMap<String, StoredLine>,
    /// Lines of ended months the last price-book check re-priced, told with the batch.
    pub(super) ended_months_repriced: EndedMonthsRepriced,
    /// The last check re-rated the partition for a book its commit did not name: a
    /// line with usage the next batch rates that is not `restated` is new.
    pub(super) lines_new_unless_restated: bool,
    /// The price book of the newest stored line that check found stale: the book the
    /// lines it adds were added to, as their repricing rows say.
    pub(super) stale_book: Option<String>,
}

impl BookCheck {
    /// A partition just assigned: unchecked, with the customers that had usage in its
    /// unsettled months, and whether its last commit names another book.
    pub(super) fn on_assignment(
        customers_with_usage: HashSet<String>,
        stored_with_another_book: bool,
    ) -> Self {
        BookCheck {
            customers_with_usage,
            unchecked: true,
            stored_with_another_book,
            check_deferred: None,
            restated: HashMap::new(),
            ended_months_repriced: EndedMonthsRepriced::default(),
            lines_new_unless_restated: false,
            stale_book: None,
        }
    }
}

/// Which partition judges a customer's zero-usage lines: the one Kafka's partitioner
/// sends its events to, so they are judged by that partition's open periods and
/// written once.
#[derive(Debug, Clone, Copy)]
struct ZeroUsageJudge {
    pub(super) partition: i32,
    pub(super) partition_count: NonZeroUsize,
}

impl ZeroUsageJudge {
    fn owns(&self, customer: &str) -> bool {
        partition_for_key(customer.as_bytes(), self.partition_count) == self.partition
    }
}

/// Says that usage opened `period`, a month that had ended and of which ClickHouse
/// held no line, in `partition`: `opening`'s lines with an amount (flat fees, first
/// tiers' flat amounts), every customer's, are billed now, in a month finance may have
/// invoiced or another biller billed. Returns how many.
pub(super) fn ended_month_opened(partition: i32, period: Period, opening: &[InvoiceLine]) -> u64 {
    let billed: Vec<&InvoiceLine> = (opening.iter())
        .filter(|line| !line.amount.is_zero())
        .collect();
    if let Some(line) = billed.first() {
        tracing::warn!(
            partition,
            %period,
            lines = billed.len(),
            example = format!("{:?} {:?}: {} {}", line.customer, line.price, line.amount, line.currency),
            "usage of a month that had ended, of which no line was stored, opened it (a month backfilled or sent late, or a pipeline started after it): its customers' flat fees and first tiers are billed now; if that month was invoiced, or billed by another biller, give the customers `from` (the first month Tally bills) and credit what was billed twice"
        );
    }
    billed.len() as u64
}

/// Lines of months that have ended (by the clock, `period_close_grace` ago: closed)
/// whose amount this price book changes, or that it adds: finance may have invoiced
/// those months as they were. Gathered while a partition is re-rated and told once per
/// batch, as a count and a warning naming the months and one line; not refused, as
/// correcting a month until it settles is what an edited book is for (README, "A new
/// price book"). A month still in its grace takes usage yet: a line of it that changed
/// is not put down to the book.
#[derive(Debug, Default)]
pub(super) struct EndedMonthsRepriced {
    lines: u64,
    months: BTreeSet<Period>,
    example: Option<String>,
}

impl EndedMonthsRepriced {
    /// A line (customer, price) billed in `period`, stored at `stored`, now `amount`;
    /// months that ended by `ended_by` count.
    pub(super) fn note(
        &mut self,
        (customer, price): (&str, &str),
        period: Period,
        (stored, amount): (Decimal, Decimal),
        ended_by: DateTime<Utc>,
    ) {
        if stored == amount || period.end() > ended_by {
            return;
        }
        self.lines += 1;
        self.months.insert(period);
        (self.example).get_or_insert_with(|| {
            format!("{customer:?} {price:?} of {period}: {stored} before, {amount} now")
        });
    }

    /// Counts and logs what was noted since the last report.
    pub(super) fn report(&mut self, partition: i32, repriced: &IntCounter) {
        let EndedMonthsRepriced {
            lines,
            months,
            example,
        } = std::mem::take(self);
        if lines == 0 {
            return;
        }
        repriced.inc_by(lines);
        let months: Vec<String> = months.iter().map(Period::to_string).collect();
        tracing::warn!(
            partition,
            lines,
            months = %months.join(", "),
            example = example.unwrap_or_default(),
            "the price book changed, added or retired lines of months that have ended, which may have been invoiced as they were: if that was not meant, run the raters with the book before (the lines go back); prices meant from a month on belong in a new plan with a plan change from that month"
        );
    }
}

/// What a partition's price-book check found to re-rate.
struct Rerate<'a> {
    /// The partition's own lines another book rated.
    pub(super) stale: Vec<&'a StoredLine>,
    /// Its last commit names another book.
    pub(super) stored_with_another_book: bool,
    /// Every partition's stale lines, by id.
    pub(super) all_stale_ids: &'a HashSet<&'a str>,
    pub(super) judge: ZeroUsageJudge,
    /// Months that ended by then count as ended ([`EndedMonthsRepriced`]).
    pub(super) ended_by: DateTime<Utc>,
    /// This rater's book, and the time of the check: what a repricing row says.
    pub(super) book: &'a str,
    pub(super) now: DateTime<Utc>,
}

/// What this price book bills for `stored`'s usage, `line` being what it bills for the
/// usage read by now: the book's change alone, not the usage that arrived meanwhile.
/// None for an adjustment whose usage changed (it is the difference of two ratings of
/// its closed month, which this does not redo) or a line that cannot be rated.
pub(super) fn repriced_amount(
    config: &Config,
    stored: &StoredLine,
    line: &InvoiceLine,
) -> Option<Decimal> {
    let quantity = stored.quantity?;
    if quantity == line.quantity {
        return Some(line.amount);
    }
    if line.adjusts_period.is_some() {
        return None;
    }
    let customer = config.customers.get(&line.customer)?;
    let period = Period::containing(line.period_start);
    let plan = config.plan(customer.subscription(period).plan);
    let price = plan.prices.iter().position(|p| p.id == line.price)?;
    let rated = crate::line::invoice_line(config, customer, price, period, quantity).ok()?;
    Some(rated.amount)
}

/// What `book` made of `stored` at `at`: a repricing, unless the amount is the same.
pub(super) fn repricing(
    stored: &StoredLine,
    amount_after: Decimal,
    book: &str,
    at: DateTime<Utc>,
) -> Option<Repricing> {
    (stored.amount != amount_after).then(|| Repricing {
        id: stored.id.clone(),
        customer: stored.customer.clone(),
        price: stored.price.clone(),
        period: stored.period,
        adjusts: stored.adjusts,
        repriced_at: at,
        book_before: stored.config_hash.clone(),
        book_after: book.to_owned(),
        amount_before: stored.amount,
        amount_after,
    })
}

/// What `book` added at `at` to the lines book `before` had stored: a repricing from
/// nothing, unless the line bills nothing.
pub(super) fn addition(
    line: &InvoiceLine,
    before: &str,
    book: &str,
    at: DateTime<Utc>,
) -> Option<Repricing> {
    let nothing = StoredLine {
        id: line.id.clone(),
        customer: line.customer.clone(),
        price: line.price.clone(),
        version: 0,
        amount: Decimal::new(0, line.amount.scale()),
        config_hash: before.to_owned(),
        quantity: None,
        period: Period::containing(line.period_start),
        adjusts: line.adjusts_period,
    };
    repricing(&nothing, line.amount, book, at)
}

impl PartitionState {
    /// This partition's lines among `stale`: another's would have it re-rate everything
    /// at every check without fixing them (one settled in its own partition, say).
    fn own_stale_lines<'a>(
        &self,
        stale: &'a [StoredLine],
        judge: ZeroUsageJudge,
    ) -> Vec<&'a StoredLine> {
        let settled = self.ledger.settled_through();
        (stale.iter())
            .filter(|line| line_open(settled, line.period, line.adjusts))
            .filter(|line| {
                if line.version == 0 {
                    judge.owns(&line.customer)
                } else {
                    self.book_check
                        .customers_with_usage
                        .contains(&line.customer)
                }
            })
            .collect()
    }

    /// Whether the price-book check waits: a stale row newer than the partition's
    /// position was stored by a rater before this one that stopped before committing
    /// (its versions count the transaction markers it had stepped over). Rated now,
    /// this book's rows would be older and lose to it, so the check waits for the
    /// position to pass, for [`MAX_CHECK_DEFERRAL`] at most.
    fn check_waits_for_position(&mut self, partition: i32, stale: &[&StoredLine]) -> bool {
        let version = self.row_version();
        if !stale.iter().any(|line| line.version > version) {
            return false;
        }
        if self.book_check.check_deferred.is_none() {
            tracing::info!(partition, position = version, "stored lines newer than the partition's position (a rater before this one stored them and stopped before committing): checking the price book once it has read that far");
        }
        let since = *self
            .book_check
            .check_deferred
            .get_or_insert_with(Instant::now);
        since.elapsed() < MAX_CHECK_DEFERRAL
    }

    /// Re-rates the partition's open periods with this rater's book
    /// ([`Worker::check_price_book`]): every line it holds, the opening lines of the
    /// periods concerned, and each stale line without usage here replaced by its
    /// zero-usage line or retired, all into `rows`.
    fn rerate_for_book(&mut self, rerate: Rerate<'_>, rows: &mut PartitionRows) {
        let version = self.row_version();
        let with_usage = self.rerate_held();
        let mut periods: BTreeSet<Period> = rerate.stale.iter().map(|line| line.period).collect();
        if rerate.stored_with_another_book {
            periods.extend(self.open_periods());
        }
        let opening_before = rows.opening.len();
        // The partition's own customers', and any customer's that no book has stored
        // yet: one the book added may belong to a partition that has read nothing of
        // the period. A stored line of another partition's customer is that
        // partition's to judge (it may be settled there); a line with usage here is
        // re-rated above version 0 instead.
        let zero_usage = self.queue_opening_lines(&periods, rows, |l| {
            !with_usage.contains(&l.id)
                && (rerate.judge.owns(&l.customer) || !rerate.all_stale_ids.contains(l.id.as_str()))
        });
        if rerate.stored_with_another_book {
            // Every line the partition stored was another book's, so one whose id no
            // stale row has is new: a price or a customer this book adds to a month.
            // Unless no stored row is another book's: the commit named no book because
            // its metadata is gone (the offsets set by Kafka's own tool), and the lines
            // stored are this book's, none of them added.
            let stale_book = (rerate.stale.iter())
                .max_by_key(|line| line.version)
                .map(|line| line.config_hash.clone());
            if let Some(before) = &stale_book {
                let added = (rows.opening[opening_before..].iter()).filter(|line| {
                    rerate.judge.owns(&line.customer)
                        && !rerate.all_stale_ids.contains(line.id.as_str())
                });
                for line in added {
                    let added = addition(line, before, rerate.book, rerate.now);
                    rows.repricings.extend(added.map(|r| (version, r)));
                    let period = Period::containing(line.period_start);
                    let amounts = (Decimal::ZERO, line.amount);
                    (self.book_check.ended_months_repriced).note(
                        (&line.customer, &line.price),
                        period,
                        amounts,
                        rerate.ended_by,
                    );
                }
                self.book_check.lines_new_unless_restated = true;
            }
            self.book_check.stale_book = stale_book;
        }
        let before = rows.retired.len();
        let stale_lines = rerate.stale.len();
        // Those with usage the ledger re-rates; the others are replaced or retired.
        let (restated, without_usage): (Vec<&StoredLine>, Vec<&StoredLine>) = (rerate.stale)
            .into_iter()
            .partition(|line| with_usage.contains(&line.id));
        (self.book_check.restated).extend(
            restated
                .iter()
                .map(|line| (line.id.clone(), (*line).clone())),
        );
        for line in without_usage {
            let at = if line.version == 0 {
                0
            } else if line.version <= version {
                version
            } else {
                // A row newer than this partition's offsets: not its to replace.
                continue;
            };
            let zero = zero_usage.get(&line.id);
            // A retired line bills nothing, written in its currency's decimals.
            let amount = zero.map_or(Decimal::new(0, line.amount.scale()), |zero| zero.amount);
            if let Some(repriced) = repricing(line, amount, rerate.book, rerate.now) {
                rows.repricings.push((at, repriced));
            }
            (self.book_check.ended_months_repriced).note(
                (&line.customer, &line.price),
                line.period,
                (line.amount, amount),
                rerate.ended_by,
            );
            match zero {
                // Replaced by the opening line queued above.
                Some(_) if at == 0 => {}
                // Usage the book no longer prices on this line (its filter or
                // meter changed): the line is now its opening line, at zero usage.
                Some(zero) => rows.lines.push((
                    at,
                    RatedLine {
                        line: zero.clone(),
                        revision: 0,
                        delta: zero.amount - line.amount,
                    },
                )),
                None => rows.retired.push((at, (*line).clone())),
            }
        }
        tracing::info!(
            partition = rerate.judge.partition,
            stale = stale_lines,
            stored_with_another_book = rerate.stored_with_another_book,
            rerated = self.ledger.lines_held(),
            retired = rows.retired.len() - before,
            "lines an earlier price book rated: re-rating the partition's open periods"
        );
    }

    /// Marks every line it holds of an open period to be rated again with the next
    /// batch, and returns their ids (the lines with usage here).
    fn rerate_held(&mut self) -> HashSet<String> {
        self.ledger.rerate_all();
        self.uncommitted = true;
        self.ledger.line_ids().collect()
    }

    /// The periods it opened that have not settled.
    fn open_periods(&self) -> impl Iterator<Item = Period> + '_ {
        let settled = self.ledger.settled_through();
        (self.opened.iter())
            .copied()
            .filter(move |&period| line_open(settled, period, None))
    }

    /// Stores again every line of its open months, and every customer's zero-usage
    /// lines of those months, with the next batch (`rows`): a replay that found its
    /// months billed counted their records as stored, but the rows of the months still
    /// open may be what was lost (a month's partition dropped, a backup restored), and
    /// a partition whose stored lines ClickHouse holds in older versions has them
    /// stale; nothing else would write them before their usage changes. The zero-usage
    /// lines are every customer's, as when a partition first opens a month, because a
    /// partition whose replayed records opened no month writes none for its own
    /// customers; written at version 0, they replace no row that usage wrote.
    pub(super) fn restate_open_months(&mut self, partition: i32, rows: &mut PartitionRows) {
        let with_usage = self.rerate_held();
        let open: BTreeSet<Period> = self.open_periods().collect();
        self.queue_opening_lines(&open, rows, |l| !with_usage.contains(&l.id));
        tracing::info!(
            partition,
            lines = self.ledger.lines_held(),
            "the lines of the partition's open months are stored again"
        );
    }

    /// Queues the opening (zero-usage) lines of `periods` that `queued` picks, and
    /// returns every opening line of them by id.
    fn queue_opening_lines(
        &self,
        periods: &BTreeSet<Period>,
        rows: &mut PartitionRows,
        queued: impl Fn(&InvoiceLine) -> bool,
    ) -> HashMap<String, InvoiceLine> {
        let mut zero_usage = HashMap::new();
        for &period in periods {
            match self.ledger.opening_lines(period) {
                Ok(lines) => {
                    rows.opening
                        .extend(lines.iter().filter(|l| queued(l)).cloned());
                    zero_usage.extend(lines.into_iter().map(|line| (line.id.clone(), line)));
                }
                Err(e) => {
                    tracing::error!(error = %e, %period, "cannot rate a period's opening lines")
                }
            }
        }
        zero_usage
    }
}

impl Worker {
    /// Schedules every held partition for a price-book check once `interval` has
    /// passed since the last time, and a store to run it: lines another rater wrote
    /// with another book meanwhile (a rolling restart, say) are then re-rated, even in
    /// partitions that stayed here.
    pub(super) fn schedule_price_book_check(&mut self, interval: Duration) {
        if self.check_scheduled.elapsed() < interval || self.partitions.is_empty() {
            return;
        }
        self.check_scheduled = Instant::now();
        for state in self.partitions.values_mut() {
            state.book_check.unchecked = true;
        }
        self.pending.started.get_or_insert_with(Instant::now);
    }

    /// Checks the stored lines of partitions newly assigned, or scheduled for a check,
    /// against the price book. A stale line (rated by another book, in an open period)
    /// is its customer's partition's: if it never had usage (version 0), the one Kafka's
    /// partitioner names; else the one that saw the customer's usage. A partition with
    /// stale lines of its own is re-rated: every line it holds, and the zero-usage lines
    /// of those periods of its partitioner-named customers (version 0, as when a period
    /// opens), go with the next batch. Each of its other stale lines is replaced, at
    /// version 0 or the batch's version, with its zero-usage line if the book still
    /// makes it (its usage no longer priced there), or else retired (a customer removed,
    /// a price renamed). Lines of periods settled in their partition stay as billed.
    /// A partition whose last commit names another book is re-rated as well. One with
    /// a stale row past its position waits (up to [`MAX_CHECK_DEFERRAL`]) until it has
    /// read that far, so its rows are not older than the row they replace. A held
    /// partition not due for a check is checked along when the answer holds stale lines
    /// of its own (and so retried like a due one, if it waits).
    pub(super) fn check_price_book(&mut self) -> Result<(), ClickHouseError> {
        if !self
            .partitions
            .values()
            .any(|state| state.book_check.unchecked)
        {
            return Ok(());
        }
        // Asked from the oldest month open in any held partition, the answer names the
        // stale lines of partitions not due as well: those with lines of their own in it
        // are checked along (a rater on another book writes every customer's opening
        // lines, from whichever partition it held, and they outlive it).
        let oldest_open = (self.partitions.values())
            .map(|state| state.ledger.settled_through().map(|s| s.next()))
            .min()
            .flatten();
        let stale = (self.clickhouse).lines_rated_with_another_book(&self.book, oldest_open)?;
        let stale_ids: HashSet<&str> = stale.iter().map(|line| line.id.as_str()).collect();
        let partition_count = self.partition_count;
        let judge = |partition| ZeroUsageJudge {
            partition,
            partition_count,
        };
        for (&partition, state) in &mut self.partitions {
            if !state.book_check.unchecked
                && !state.own_stale_lines(&stale, judge(partition)).is_empty()
            {
                state.book_check.unchecked = true;
            }
        }
        let checking: Vec<i32> = (self.partitions.iter())
            .filter(|(_, state)| state.book_check.unchecked)
            .map(|(&partition, _)| partition)
            .collect();
        let now = Utc::now();
        let ended_by = self.months_ended_by(now);
        let mut deferred = false;
        for partition in checking {
            let state = self.partitions.get_mut(&partition).expect("listed above");
            let judge = judge(partition);
            let own_stale = state.own_stale_lines(&stale, judge);
            if state.check_waits_for_position(partition, &own_stale) {
                deferred = true;
                continue;
            }
            state.book_check.check_deferred = None;
            state.book_check.unchecked = false;
            self.metrics.price_book_checks.inc();
            let another_book = std::mem::take(&mut state.book_check.stored_with_another_book);
            if own_stale.is_empty() && !another_book {
                continue;
            }
            let rerate = Rerate {
                stale: own_stale,
                stored_with_another_book: another_book,
                all_stale_ids: &stale_ids,
                judge,
                ended_by,
                book: &self.book,
                now,
            };
            state.rerate_for_book(rerate, self.pending.rows(partition));
        }
        if deferred {
            // Checked again at the next store, which this makes due.
            self.pending.started.get_or_insert_with(Instant::now);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repricing_is_the_new_books_amount_for_the_stored_usage() {
        let config = Config::parse(include_str!("../../../examples/tally.toml"), "test").unwrap();
        let acme = &config.customers["cust_acme"];
        let november: Period = "2026-11".parse().unwrap();
        let rated = |quantity: u32| {
            crate::line::invoice_line(&config, acme, 0, november, quantity.into()).unwrap()
        };
        // Stored at 120 resolutions by another book; 150 read by now.
        let now = rated(150);
        let stored = StoredLine {
            id: now.id.clone(),
            customer: now.customer.clone(),
            price: now.price.clone(),
            version: 7,
            amount: "70.00".parse().unwrap(),
            config_hash: "old".into(),
            quantity: Some(120.into()),
            period: november,
            adjusts: None,
        };
        let at_120 = rated(120).amount;
        assert_ne!(at_120, now.amount);
        assert_eq!(repriced_amount(&config, &stored, &now), Some(at_120));
        let unchanged = StoredLine {
            quantity: Some(150.into()),
            ..stored.clone()
        };
        assert_eq!(repriced_amount(&config, &unchanged, &now), Some(now.amount));
        // An adjustment whose usage changed, or a row read without its quantity: the
        // book's share cannot be told.
        let adjustment = InvoiceLine {
            adjusts_period: Some("2026-10".parse().unwrap()),
            ..now.clone()
        };
        assert_eq!(repriced_amount(&config, &stored, &adjustment), None);
        let unread = StoredLine {
            quantity: None,
            ..stored.clone()
        };
        assert_eq!(repriced_amount(&config, &unread, &now), None);
        let told = repricing(
            &stored,
            at_120,
            "new",
            "2026-12-07T00:00:00Z".parse().unwrap(),
        );
        assert_eq!(
            told.map(|r| (r.amount_before, r.amount_after, r.book_before, r.book_after)),
            Some(("70.00".parse().unwrap(), at_120, "old".into(), "new".into()))
        );
    }

    #[test]
    fn only_changed_lines_of_ended_months_are_told() {
        let repriced = IntCounter::new("repriced", "test").unwrap();
        let ended: Period = "2026-10".parse().unwrap();
        let now: DateTime<Utc> = "2026-12-07T00:00:00Z".parse().unwrap();
        let open = Period::containing(now);
        let mut told = EndedMonthsRepriced::default();
        let line = ("cust_acme", "resolutions");
        let (cents_198, cents_218) = (Decimal::new(198, 2), Decimal::new(218, 2));
        told.note(line, ended, (cents_198, cents_218), now);
        told.note(line, ended, (Decimal::ONE, Decimal::ONE), now);
        told.note(line, open, (cents_198, cents_218), now);
        told.note(line, ended.next(), (Decimal::ZERO, Decimal::ONE), now);
        assert_eq!(told.lines, 2);
        assert_eq!(told.months, BTreeSet::from([ended, ended.next()]));
        assert_eq!(
            told.example.as_deref(),
            Some("\"cust_acme\" \"resolutions\" of 2026-10: 1.98 before, 2.18 now")
        );
        told.report(0, &repriced);
        assert_eq!(repriced.get(), 2);
        // Told once: the next batch reports only what it notes.
        told.report(0, &repriced);
        assert_eq!(repriced.get(), 2);
    }
}
