//! Where every event went: the reconciliation finance reads after a run.
//!
//! In: each decoded event with what the aggregator made of it, each reject, and usage
//! no price bills. Out: counts per bucket (every line read is in exactly one), the
//! unbilled usage by customer and type, on stderr as text and as JSON. `tally rate` and
//! the embedded pipeline count the same way.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use tally_aggregator::{Aggregator, Outcome};
use tally_ingest::{Line, LineReject};
use tally_rater::{LineError, Recorded};
use tally_schemas::config::{Config, MeterId};
use tally_schemas::event::identity;
use tally_schemas::event::{DecodedEvent, EventError, Problem, ReadingValue};
use tally_schemas::ids::EventKey;
use tally_schemas::records::SeriesKey;
use tally_schemas::time::Period;

/// Unknown customers and unpriced series listed on stderr before "... and N more".
const LISTED: usize = 10;

/// Where every line read went. `events_read` is the sum of the other buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub period: String,
    /// The period had not ended at the run's clock (`--now`): its lines bill the usage
    /// so far, not the month.
    pub unfinished: bool,
    pub events_read: u64,
    /// Valid, new, in the period, metered, for a known customer: counted towards the
    /// customer's usage (usage no price of their plan selects is listed in
    /// `unpriced_usage`).
    pub accepted: u64,
    /// Identical retries of an event already counted.
    pub duplicates: u64,
    /// Same (source, id) as an event already counted but different content; dropped.
    pub conflicts: u64,
    /// Lines that failed validation, by reason code; kept in the rejects file.
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Valid events dated outside the period.
    pub outside_period: u64,
    /// The same by the month of their event time (`2026-10`): late usage of a month
    /// already billed shows as its month.
    pub outside_period_by_month: BTreeMap<String, u64>,
    /// Valid events in the period whose type no meter reads, by type.
    pub unknown_event_types: BTreeMap<String, u64>,
    /// Metered events in the period for customers not in the configuration, by customer.
    pub unknown_customers: BTreeMap<String, u64>,
    /// Events older than the dedupe horizon (streaming only; a batch run keeps every key).
    pub too_late: u64,
    /// Events refused because a total would pass the largest decimal.
    pub refused: u64,
    /// Usage of known customers that no price of their plan bills.
    pub unpriced_usage: Vec<UnbilledUsage>,
    /// Usage of known customers in a period they are not billed in (before their
    /// `from`, after their `through`).
    pub unsubscribed_usage: Vec<UnbilledUsage>,
    /// Lines that cannot be rated (their amount is more minor units than a line
    /// holds): their invoices lack them, so the run fails once the others are written.
    pub lines_not_rated: Vec<LineNotRated>,
    /// For unknown customers listed on stderr, the configured id each likely meant.
    #[serde(skip)]
    pub likely_meant: BTreeMap<String, String>,
    /// One customer's events again, when asked for (`tally explain`).
    #[serde(skip)]
    pub customer: Option<CustomerEvents>,
}

/// One customer's events by what became of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustomerEvents {
    pub customer: String,
    /// Lines that failed validation but name the customer as their subject, as
    /// (line, why): usage support may have to account for, though nothing else in
    /// such a line can be trusted.
    pub rejected: Vec<(u64, String)>,
    /// Counted towards the period's usage, by event type.
    pub counted: BTreeMap<String, u64>,
    /// The counted events themselves, in file order, when asked for: for support to
    /// name each resolution or request a line bills (`tally explain --list-events`).
    pub counted_events: Option<Vec<CountedEvent>>,
    /// The lines of the retries (the file's, from 1), each with the line of the event
    /// it repeats where that named this customer too.
    pub retries: Vec<(u64, Option<u64>)>,
    /// The lines of the conflicting resends, each with the line of the event that
    /// counts, alike: for support to look both up.
    pub conflicts: Vec<(u64, Option<u64>)>,
    /// The line each of the customer's events was first read on, by key.
    first_lines: HashMap<EventKey, u64>,
    /// The lines of its events dated in another month, each with that month.
    pub outside_period: Vec<(u64, Period)>,
    /// In the period, of a type no meter reads.
    pub unmetered: u64,
    /// Refused because a total would pass the largest decimal.
    pub refused: u64,
}

/// One event a line may count: where it is, its source, id and time, and what each
/// meter read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountedEvent {
    /// Its line in the events file, from 1.
    pub line: u64,
    /// Its CloudEvents `source` and `id` as sent (empty when the line cannot be read
    /// again): together they name it, as dedupe does.
    pub source: String,
    pub id: String,
    pub time: DateTime<Utc>,
    pub readings: Vec<(MeterId, Vec<String>, ReadingValue)>,
}

impl CountedEvent {
    fn of(event: &DecodedEvent<'_>, line: u64, raw: &[u8]) -> Self {
        // The line decoded already: only its source and id are read again.
        let identity = identity(raw);
        CountedEvent {
            line,
            source: identity.source.unwrap_or_default().into_owned(),
            id: identity.id.unwrap_or_default().into_owned(),
            time: event.time,
            readings: (event.readings.iter())
                .map(|r| {
                    (
                        r.meter,
                        r.group.iter().map(|g| g.to_string()).collect(),
                        r.value,
                    )
                })
                .collect(),
        }
    }
}

impl CustomerEvents {
    /// `keep_counted`: keep each counted event too.
    pub fn new(customer: String, keep_counted: bool) -> Self {
        CustomerEvents {
            customer,
            counted_events: keep_counted.then(Vec::new),
            ..CustomerEvents::default()
        }
    }

    fn record(&mut self, bucket: Bucket, event: &DecodedEvent<'_>, line: u64, raw: &[u8]) {
        let first = self.first_lines.get(&event.key).copied();
        match bucket {
            Bucket::Duplicate => self.retries.push((line, first)),
            Bucket::Conflict => self.conflicts.push((line, first)),
            // Not a resend: the line its resends point to.
            _ if first.is_none() => {
                self.first_lines.insert(event.key, line);
            }
            _ => {}
        }
        match bucket {
            Bucket::Duplicate | Bucket::Conflict => {}
            Bucket::Refused => self.refused += 1,
            Bucket::OutsidePeriod => {
                (self.outside_period).push((line, Period::containing(event.time)))
            }
            Bucket::Unmetered => self.unmetered += 1,
            Bucket::Counted => {
                *self
                    .counted
                    .entry(event.event_type.to_string())
                    .or_default() += 1;
                if let Some(kept) = &mut self.counted_events {
                    kept.push(CountedEvent::of(event, line, raw));
                }
            }
            // A batch run keeps every key, and the customer is one the book knows.
            Bucket::TooLate | Bucket::UnknownCustomer => {}
        }
    }
}

/// What became of a valid event: the summary's buckets.
#[derive(Debug, Clone, Copy)]
enum Bucket {
    Duplicate,
    Conflict,
    Refused,
    TooLate,
    OutsidePeriod,
    Unmetered,
    Counted,
    UnknownCustomer,
}

impl Bucket {
    fn of(outcome: &Outcome, event: &DecodedEvent<'_>, period: Period) -> Bucket {
        match outcome {
            Outcome::Retry => Bucket::Duplicate,
            Outcome::Conflict => Bucket::Conflict,
            Outcome::Refused(_) => Bucket::Refused,
            Outcome::TooLate => Bucket::TooLate,
            _ if !period.contains(event.time) => Bucket::OutsidePeriod,
            Outcome::Unmetered => Bucket::Unmetered,
            // Batch runs close no periods and emit no windows early: every counted
            // event is Accepted; the other two arms only keep the match honest.
            Outcome::Accepted | Outcome::Late | Outcome::Adjusted if event.subscribed => {
                Bucket::Counted
            }
            Outcome::Accepted | Outcome::Late | Outcome::Adjusted => Bucket::UnknownCustomer,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnbilledUsage {
    pub customer: String,
    pub meter: String,
    pub group: Vec<String>,
    pub quantity: String,
}

/// A line the rater could not rate, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineNotRated {
    pub customer: String,
    pub price: String,
    pub reason: String,
}

impl UnbilledUsage {
    pub fn new(series: &SeriesKey, quantity: Decimal) -> Self {
        UnbilledUsage {
            customer: series.customer.clone(),
            meter: series.meter.clone(),
            group: series.group.clone(),
            quantity: quantity.to_string(),
        }
    }
}

/// A line that counted as bad: rejected by validation, refused by the aggregator (as a
/// reject with code `refused`, field `data`), or a conflicting resend of a counted
/// event (code `conflict`, field `id`), as the streaming aggregator sends them to the
/// rejected topic. Each goes to the rejects file.
#[derive(Debug)]
pub enum BadLine<'l> {
    Rejected(&'l LineReject),
    Refused(LineReject),
    Conflict(LineReject),
}

impl BadLine<'_> {
    pub fn reject(&self) -> &LineReject {
        match self {
            BadLine::Rejected(reject) => reject,
            BadLine::Refused(reject) | BadLine::Conflict(reject) => reject,
        }
    }
}

impl fmt::Display for BadLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadLine::Rejected(reject) => write!(f, "line {}: {}", reject.line, reject.error),
            BadLine::Refused(reject) | BadLine::Conflict(reject) => {
                let code = reject.error.problem.code();
                write!(f, "line {}: {code}: {}", reject.line, reject.error.problem)
            }
        }
    }
}

impl Summary {
    /// Lists a series' usage the ledger did not bill (`recorded`), where finance looks
    /// for it; unknown customers' events are counted as they are read.
    pub fn note_unbilled(&mut self, recorded: Recorded, series: &SeriesKey, quantity: Decimal) {
        let list = match recorded {
            Recorded::NotPriced => &mut self.unpriced_usage,
            Recorded::NotSubscribed => &mut self.unsubscribed_usage,
            Recorded::Billed(_) | Recorded::UnknownCustomer | Recorded::SettledPeriod => return,
        };
        list.push(UnbilledUsage::new(series, quantity));
    }

    /// Applies one decoded line to `aggregator` (an event) and puts it in its bucket;
    /// returns it when it was bad, for the caller to keep or stop at.
    pub fn count_line<'l>(
        &mut self,
        aggregator: &mut Aggregator,
        line: &'l Line<'_>,
        period: Period,
    ) -> Option<BadLine<'l>> {
        self.events_read += 1;
        match line {
            Line::Event { line, event, raw } => {
                let outcome = aggregator.apply(event);
                let kept = |error| LineReject {
                    line: *line,
                    error,
                    raw: String::from_utf8_lossy(raw).into_owned(),
                };
                let bad = match outcome {
                    Outcome::Refused(error) => Some(BadLine::Refused(kept(error.as_event_error()))),
                    Outcome::Conflict => Some(BadLine::Conflict(kept(EventError {
                        field: "id".to_owned(),
                        problem: Problem::Conflict,
                    }))),
                    _ => None,
                };
                self.record(outcome, event, period, *line, raw);
                bad
            }
            Line::Rejected(reject) => {
                self.record_reject(reject);
                Some(BadLine::Rejected(reject))
            }
        }
    }

    /// Puts one decoded event in its bucket, given what the aggregator made of it.
    fn record(
        &mut self,
        outcome: Outcome,
        event: &DecodedEvent<'_>,
        period: Period,
        line: u64,
        raw: &[u8],
    ) {
        let bucket = Bucket::of(&outcome, event, period);
        match bucket {
            Bucket::Duplicate => self.duplicates += 1,
            Bucket::Conflict => self.conflicts += 1,
            Bucket::Refused => self.refused += 1,
            Bucket::TooLate => self.too_late += 1,
            Bucket::OutsidePeriod => {
                self.outside_period += 1;
                let month = Period::containing(event.time).to_string();
                *self.outside_period_by_month.entry(month).or_default() += 1;
            }
            Bucket::Unmetered => {
                *self
                    .unknown_event_types
                    .entry(event.event_type.to_string())
                    .or_default() += 1;
            }
            Bucket::Counted => self.accepted += 1,
            Bucket::UnknownCustomer => {
                *self
                    .unknown_customers
                    .entry(event.subject.to_string())
                    .or_default() += 1;
            }
        }
        if let Some(customer) = &mut self.customer {
            if customer.customer == event.subject {
                customer.record(bucket, event, line, raw);
            }
        }
    }

    /// Counts a line that failed validation.
    fn record_reject(&mut self, reject: &LineReject) {
        self.rejected += 1;
        *self
            .rejected_by_reason
            .entry(reject.error.problem.code().to_owned())
            .or_default() += 1;
        if let Some(customer) = &mut self.customer {
            if subject_of(&reject.raw).is_some_and(|subject| subject == customer.customer) {
                (customer.rejected).push((reject.line, reject.error.to_string()));
            }
        }
    }

    /// Notes which customer of `config` each listed unknown one likely meant.
    pub fn suggest_customers(&mut self, config: &Config) {
        for unknown in self.unknown_customers.keys().take(LISTED) {
            if let Some(id) = config.likely_customer(unknown) {
                (self.likely_meant).insert(unknown.clone(), id.to_owned());
            }
        }
    }

    pub fn unknown_customer_events(&self) -> u64 {
        self.unknown_customers.values().sum()
    }

    pub fn unknown_type_events(&self) -> u64 {
        self.unknown_event_types.values().sum()
    }

    /// Lists the lines the rater could not rate.
    pub fn note_not_rated(&mut self, errors: &[LineError]) {
        self.lines_not_rated
            .extend(errors.iter().map(|e| LineNotRated {
                customer: e.customer.clone(),
                price: e.price.clone(),
                reason: e.source.to_string(),
            }));
    }

    /// The lines finance reads on stderr.
    pub fn render(&self) -> String {
        let mut out = format!(
            "period {}: {} events read = {} counted + {} duplicates + {} conflicts + {} rejected + {} outside the period + {} of unknown types + {} of unknown customers + {} too late + {} refused\n",
            self.period,
            self.events_read,
            self.accepted,
            self.duplicates,
            self.conflicts,
            self.rejected,
            self.outside_period,
            self.unknown_type_events(),
            self.unknown_customer_events(),
            self.too_late,
            self.refused,
        );
        if !self.outside_period_by_month.is_empty() {
            let months: Vec<String> = (self.outside_period_by_month.iter())
                .map(|(month, n)| format!("{month}: {n}"))
                .collect();
            // Months sort as text; an earlier one may have been billed without these.
            let earlier = (self.outside_period_by_month.keys()).any(|month| *month < self.period);
            let hint = match earlier {
                true => " (an earlier month's events may be late usage that the run which billed it lacked: if so, rate it again and compare the two with `tally reconcile`)",
                false => "",
            };
            out.push_str(&format!(
                "  outside the period, by month: {}{hint}\n",
                months.join(", ")
            ));
        }
        if self.unfinished {
            out.push_str(&format!(
                "  warning: {} has not ended: these lines bill its usage so far, not the month (to bill last month, give its --period)\n",
                self.period
            ));
        }
        if self.rejected > self.events_read / 10 {
            out.push_str(&format!(
                "  warning: {} of the {} lines read were rejected (reasons below): is the file the one that should be billed?\n",
                self.rejected, self.events_read
            ));
        }
        if self.accepted == 0 && self.outside_period > 0 {
            // Likely a mistyped --period: the run still bills every flat fee.
            out.push_str(&format!(
                "  warning: no event of {} was counted ({} outside the period); is {} the month to bill?\n",
                self.period, self.outside_period, self.period
            ));
        } else if self.accepted == 0 && self.events_read > 0 {
            out.push_str(&format!(
                "  warning: no event of {} was counted: the lines below say where each went\n",
                self.period
            ));
        }
        for (reason, n) in &self.rejected_by_reason {
            out.push_str(&format!("  rejected {reason}: {n}\n"));
        }
        let events = |n: u64| {
            if n == 1 {
                "1 event".to_owned()
            } else {
                format!("{n} events")
            }
        };
        for (event_type, n) in &self.unknown_event_types {
            out.push_str(&format!(
                "  unbilled: {} of type {event_type:?}, which no meter reads\n",
                events(*n)
            ));
        }
        for (customer, n) in self.unknown_customers.iter().take(LISTED) {
            let meant = match self.likely_meant.get(customer) {
                Some(id) => format!(" (did you mean {id:?}?)"),
                None => String::new(),
            };
            out.push_str(&format!(
                "  unbilled: {} for customer {customer:?}, who is not in the configuration{meant}\n",
                events(*n)
            ));
        }
        if self.unknown_customers.len() > LISTED {
            out.push_str(&format!(
                "  unbilled: ... and {} more unknown customers (all listed in the JSON summary)\n",
                self.unknown_customers.len() - LISTED
            ));
        }
        for u in self.unpriced_usage.iter().take(LISTED) {
            let missing = match u.group.iter().any(String::is_empty) {
                true => " (\"\": its events did not send that dimension, or sent null)",
                false => "",
            };
            out.push_str(&format!(
                "  unbilled: {} of meter {} {:?} for {:?}: no price of their plan matches{missing}\n",
                u.quantity, u.meter, u.group, u.customer
            ));
        }
        if self.unpriced_usage.len() > LISTED {
            out.push_str(&format!(
                "  unbilled: ... and {} more unpriced series (all listed in the JSON summary)\n",
                self.unpriced_usage.len() - LISTED
            ));
        }
        for u in self.unsubscribed_usage.iter().take(LISTED) {
            out.push_str(&format!(
                "  unbilled: {} of meter {} {:?} for {:?}: not billed in {} (before its from or after its through)\n",
                u.quantity, u.meter, u.group, u.customer, self.period
            ));
        }
        if self.unsubscribed_usage.len() > LISTED {
            out.push_str(&format!(
                "  unbilled: ... and {} more series of customers not billed in {} (all listed in the JSON summary)\n",
                self.unsubscribed_usage.len() - LISTED,
                self.period
            ));
        }
        for line in &self.lines_not_rated {
            out.push_str(&format!(
                "  not rated: customer {:?}'s line for price {:?}, which its invoice lacks: {}\n",
                line.customer, line.price, line.reason
            ));
        }
        out
    }
}

/// The `subject` of a line that failed validation, if it is JSON with one.
fn subject_of(raw: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Subject {
        subject: String,
    }
    serde_json::from_str::<Subject>(raw).ok().map(|s| s.subject)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use chrono::{DateTime, Utc};
    use tally_schemas::config::Config;
    use tally_schemas::event::EventDecoder;

    use super::*;

    fn config(aggregation: &str) -> Config {
        let value = if aggregation == "sum" {
            "value_property = \"$.tokens\"\n"
        } else {
            ""
        };
        let text = format!(
            "[[meters]]\nslug = \"tokens\"\nevent_type = \"llm.tokens\"\naggregation = \"{aggregation}\"\n{value}"
        );
        Config::parse(&text, "tally.toml").unwrap()
    }

    #[test]
    fn an_event_the_aggregator_refuses_is_counted_and_returned_as_bad() {
        // Decoded for a sum meter, applied to a count meter's state: refused.
        let period = Period::from_str("2026-11").unwrap();
        let now = DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let (sum, count) = (config("sum"), config("count"));
        let raw = br#"{"specversion":"1.0","id":"e1","source":"app","type":"llm.tokens","subject":"c","time":"2026-11-02T00:00:00Z","data":{"tokens":5}}"#;
        let event = EventDecoder::new(&sum, now).decode(raw).unwrap();
        let line = Line::Event {
            line: 7,
            event,
            raw,
        };
        let mut aggregator = Aggregator::batch(&std::sync::Arc::new(count), 1);
        let mut summary = Summary::default();

        let bad = summary.count_line(&mut aggregator, &line, period);
        let Some(bad @ BadLine::Refused(_)) = bad else {
            panic!("expected a refusal, got {bad:?}");
        };
        assert!(
            bad.to_string().starts_with("line 7: refused: reading"),
            "{bad}"
        );
        // Kept as the streaming aggregator keeps it: the raw line, code `refused`.
        let row: serde_json::Value = serde_json::from_str(&bad.reject().to_json()).unwrap();
        assert_eq!(
            (
                row["line"].as_u64(),
                row["field"].as_str(),
                row["code"].as_str()
            ),
            (Some(7), Some("data"), Some("refused"))
        );
        assert_eq!(row["raw"].as_str().unwrap().as_bytes(), raw.as_slice());
        assert_eq!((summary.events_read, summary.refused), (1, 1));
    }
}
