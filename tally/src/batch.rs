//! `tally rate`: a file of events in, one period's invoice lines out.
//!
//! The same stages as the pipeline, run to completion in one process: ingest decodes
//! lines on worker threads, the aggregator core dedupes and windows them on this
//! thread as they arrive, and the rater core prices each series' period total. Every
//! line read ends in exactly one bucket of the [`Summary`], so the counts reconcile.
//! The input is the events file mapped into memory, or stdin read whole.

use std::ops::ControlFlow;
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};
use tally_aggregator::Aggregator;
use tally_ingest::{decode_lines, LineReject};

use crate::summary::{BadLine, CustomerEvents, Summary};
use tally_rater::Ledger;
use tally_schemas::config::Config;
use tally_schemas::event::EventDecoder;
use tally_schemas::records::{InvoiceLine, SeriesWindows};
use tally_schemas::time::Period;

#[derive(Debug, Clone)]
pub struct BatchOptions {
    pub period: Period,
    /// The clock events may not be ahead of (by more than `max_future_skew`).
    pub now: DateTime<Utc>,
    /// Decoding threads.
    pub workers: usize,
    /// Stop at the first bad line instead of rejecting it.
    pub strict: bool,
    /// Also count this customer's events (`summary.customer`) and keep its windows
    /// (`explained_usage`): for `tally explain`.
    pub explained_customer: Option<String>,
}

pub struct BatchResult {
    pub lines: Vec<InvoiceLine>,
    pub summary: Summary,
    /// The explained customer's series of the period with their windows.
    pub explained_usage: Vec<SeriesWindows>,
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
        customer: options.explained_customer.clone().map(CustomerEvents::new),
        ..Summary::default()
    };
    let flow = decode_lines(input, decoder, options.workers, |lines| {
        for line in &lines {
            let Some(bad) = summary.count_line(&mut aggregator, line, period) else {
                continue;
            };
            if options.strict {
                return ControlFlow::Break(Err(anyhow::anyhow!(
                    "{bad} (--strict stops at the first bad line)"
                )));
            }
            let kept = match bad {
                BadLine::Rejected(reject) => on_reject(reject),
                BadLine::Refused { .. } => {
                    eprintln!("{bad}");
                    Ok(())
                }
            };
            if let Err(e) = kept {
                return ControlFlow::Break(Err(e));
            }
        }
        ControlFlow::Continue(())
    });
    if let ControlFlow::Break(result) = flow {
        result?;
    }

    let mut ledger = Ledger::new(Arc::clone(config));
    for (series, value) in aggregator.period_usage(period) {
        let recorded = ledger.record(&series, period, value);
        summary.note_unbilled(recorded, &series, value.value);
    }
    let lines = ledger
        .close(period)
        .context("rating failed")?
        .into_iter()
        .map(|rated| rated.line)
        .collect();
    let explained_usage = (options.explained_customer.as_deref())
        .map(|customer| aggregator.windows_of(customer, period))
        .unwrap_or_default();
    Ok(BatchResult {
        lines,
        summary,
        explained_usage,
    })
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
