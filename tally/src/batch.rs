//! `tally rate`: a file of events in, one period's invoice lines out.
//!
//! The same stages as the pipeline, run to completion in one process: ingest decodes
//! lines on worker threads, the aggregator core dedupes and windows them on this
//! thread as they arrive, and the rater core prices each series' period total. Every
//! line read ends in exactly one bucket of the [`Summary`], so the counts reconcile.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use tally_aggregator::{Aggregator, Outcome};
use tally_ingest::{decode_lines, Line, LineReject};
use tally_rater::{Ledger, Recorded};
use tally_schemas::config::Config;
use tally_schemas::event::{DecodedEvent, EventDecoder};
use tally_schemas::records::{InvoiceLine, SeriesKey};
use tally_schemas::time::Period;

/// Unknown customers and unpriced series listed on stderr before "... and N more".
const LISTED: usize = 10;

#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    pub period: Period,
    /// The clock events may not be ahead of (by more than `max_future_skew`).
    pub now: DateTime<Utc>,
    /// Decoding threads.
    pub workers: usize,
    /// Stop at the first bad line instead of rejecting it.
    pub strict: bool,
}

/// Where every line read went. `events_read` is the sum of the other buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub period: String,
    pub events_read: u64,
    /// Valid, new, in the period, metered, for a known customer: billed.
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
    /// Valid events in the period whose type no meter reads, by type.
    pub unknown_event_types: BTreeMap<String, u64>,
    /// Metered events in the period for customers not in the configuration, by customer.
    pub unknown_customers: BTreeMap<String, u64>,
    /// Events older than the dedupe horizon (streaming only; a batch run keeps every key).
    pub too_late: u64,
    /// Events refused because a total would stop being exact.
    pub refused: u64,
    /// Usage of known customers that no price of their plan bills.
    pub unpriced_usage: Vec<UnpricedUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnpricedUsage {
    pub customer: String,
    pub meter: String,
    pub group: Vec<String>,
    pub quantity: String,
}

impl UnpricedUsage {
    pub fn new(series: &SeriesKey, quantity: Decimal) -> Self {
        UnpricedUsage {
            customer: series.customer.clone(),
            meter: series.meter.clone(),
            group: series.group.clone(),
            quantity: quantity.to_string(),
        }
    }
}

impl Summary {
    /// Puts one decoded event in its bucket, given what the aggregator made of it.
    pub fn record(&mut self, outcome: Outcome, event: &DecodedEvent<'_>, period: Period) {
        match outcome {
            Outcome::Retry => self.duplicates += 1,
            Outcome::Conflict => self.conflicts += 1,
            Outcome::Refused(_) => self.refused += 1,
            Outcome::TooLate => self.too_late += 1,
            _ if !period.contains(event.time) => self.outside_period += 1,
            Outcome::Unmetered => {
                *self
                    .unknown_event_types
                    .entry(event.event_type.to_string())
                    .or_default() += 1;
            }
            Outcome::Accepted if event.subscribed => {
                self.accepted += 1;
            }
            Outcome::Accepted => {
                *self
                    .unknown_customers
                    .entry(event.subject.to_string())
                    .or_default() += 1;
            }
        }
    }

    /// Counts a line that failed validation.
    pub fn record_reject(&mut self, reject: &LineReject) {
        self.rejected += 1;
        *self
            .rejected_by_reason
            .entry(reject.error.problem.code().to_owned())
            .or_default() += 1;
    }

    pub fn unknown_customer_events(&self) -> u64 {
        self.unknown_customers.values().sum()
    }

    pub fn unknown_type_events(&self) -> u64 {
        self.unknown_event_types.values().sum()
    }

    /// The lines finance reads on stderr.
    pub fn render(&self) -> String {
        let mut out = format!(
            "period {}: {} events read = {} billed + {} duplicates + {} conflicts + {} rejected + {} outside the period + {} of unknown types + {} of unknown customers + {} too late + {} refused\n",
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
            out.push_str(&format!(
                "  unbilled: {} for customer {customer:?}, who is not in the configuration\n",
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
            out.push_str(&format!(
                "  unbilled: {} of meter {} {:?} for {:?}: no price of their plan matches\n",
                u.quantity, u.meter, u.group, u.customer
            ));
        }
        if self.unpriced_usage.len() > LISTED {
            out.push_str(&format!(
                "  unbilled: ... and {} more unpriced series (all listed in the JSON summary)\n",
                self.unpriced_usage.len() - LISTED
            ));
        }
        out
    }
}

pub struct BatchResult {
    pub lines: Vec<InvoiceLine>,
    pub summary: Summary,
}

/// Rates one period of `input`. Rejected lines go to `on_reject` as they are found.
pub fn rate_events(
    config: &Arc<Config>,
    input: &[u8],
    options: &BatchOptions,
    mut on_reject: impl FnMut(&LineReject) -> anyhow::Result<()>,
) -> anyhow::Result<BatchResult> {
    let decoder = EventDecoder::new(config, options.now);
    // Event lines run to about 200 bytes; sizing dedupe for that avoids rehashing a
    // table of millions of keys while it fills.
    let mut aggregator = Aggregator::batch(config, input.len() / 200);
    let period = options.period;
    let mut summary = Summary {
        period: period.to_string(),
        ..Summary::default()
    };
    let flow = decode_lines(input, decoder, options.workers, |lines| {
        for line in &lines {
            summary.events_read += 1;
            match line {
                Line::Event { line, event } => {
                    let outcome = aggregator.apply(event);
                    if let Outcome::Refused(e) = outcome {
                        eprintln!("line {line}: refused: {e}");
                    }
                    summary.record(outcome, event, period);
                }
                Line::Rejected(reject) => {
                    if options.strict {
                        return ControlFlow::Break(Err(anyhow::anyhow!(
                            "line {}: {} (--strict stops at the first bad line)",
                            reject.line,
                            reject.error
                        )));
                    }
                    summary.record_reject(reject);
                    if let Err(e) = on_reject(reject) {
                        return ControlFlow::Break(Err(e));
                    }
                }
            }
        }
        ControlFlow::Continue(())
    });
    if let ControlFlow::Break(result) = flow {
        result?;
    }

    let mut ledger = Ledger::new(Arc::clone(config));
    for (series, value) in aggregator.period_usage(period) {
        if ledger.record(&series, period, value) == Recorded::NotPriced {
            summary
                .unpriced_usage
                .push(UnpricedUsage::new(&series, value.value));
        }
    }
    let lines = ledger
        .close(period)
        .context("rating failed")?
        .into_iter()
        .map(|rated| rated.line)
        .collect();
    Ok(BatchResult { lines, summary })
}

/// The bytes of an events input: a file mapped into memory, or what stdin gave.
pub enum Input {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl std::ops::Deref for Input {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Input::Mapped(map) => map,
            Input::Read(bytes) => bytes,
        }
    }
}

/// Opens the events argument: a path, or `-` for stdin.
///
/// A file is mapped rather than read: a month of events is hundreds of megabytes, and
/// copying it into fresh memory before decoding can start costs more than a third of a
/// second on its own; mapped, its pages are decoded straight from the page cache by the
/// decoding threads.
pub fn read_input(path: &str) -> anyhow::Result<Input> {
    if path == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf)
            .context("cannot read events from stdin")?;
        return Ok(Input::Read(buf));
    }
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open events file {path}"))?;
    let len = file
        .metadata()
        .with_context(|| format!("cannot read events file {path}"))?
        .len();
    if len == 0 {
        // An empty file cannot be mapped.
        return Ok(Input::Read(Vec::new()));
    }
    // SAFETY: the mapping is only read, and lives as long as the returned value. Were
    // another process to change the file while it is mapped, what a run sees could
    // change under it: the README asks not to write to an events file while it is
    // being rated (as with any tool reading a file).
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map events file {path}"))?;
    Ok(Input::Mapped(map))
}
