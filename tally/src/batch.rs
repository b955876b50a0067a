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
    /// Also keep each event of the explained customer that counts (`tally explain
    /// --list-events`): a big customer's month is many of them.
    pub keep_counted_events: bool,
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
        unfinished: period.end() > options.now,
        customer: (options.explained_customer.clone())
            .map(|c| CustomerEvents::new(c, options.keep_counted_events)),
        ..Summary::default()
    };
    let mut first_bad = None;
    let flow = decode_lines(input, decoder, options.workers, |lines| {
        for line in &lines {
            let Some(bad) = summary.count_line(&mut aggregator, line, period) else {
                continue;
            };
            first_bad.get_or_insert_with(|| bad.to_string());
            if options.strict {
                return ControlFlow::Break(Err(anyhow::anyhow!(
                    "{bad} (--strict stops at the first bad line)"
                )));
            }
            if let BadLine::Refused(_) = bad {
                // Rare, and unlike a rejected line it is valid: say so as it happens.
                eprintln!("{bad}");
            }
            if let Err(e) = on_reject(bad.reject()) {
                return ControlFlow::Break(Err(e));
            }
        }
        ControlFlow::Continue(())
    });
    if let ControlFlow::Break(result) = flow {
        result?;
    }
    if summary.events_read > 0 && summary.rejected == summary.events_read {
        // A wrong file (an export, another tool's output) would otherwise bill every
        // customer its flat fees alone, and look like a quiet month.
        let reasons: Vec<String> = (summary.rejected_by_reason.iter())
            .map(|(reason, n)| format!("{n} {reason}"))
            .collect();
        anyhow::bail!(
            "none of the {} lines read is a valid usage event ({}), so nothing would be billed but flat fees; the first: {}. Is it the events file (CloudEvents, one JSON object a line)?",
            summary.events_read,
            reasons.join(", "),
            first_bad.unwrap_or_default()
        );
    }

    summary.suggest_customers(config);
    let mut ledger = Ledger::new(Arc::clone(config));
    for (series, value) in aggregator.period_usage(period) {
        let recorded = ledger.record(&series, period, value);
        summary.note_unbilled(recorded, &series, value.value);
    }
    let (rated, unrated) = ledger.close(period);
    summary.note_not_rated(&unrated);
    let lines = rated.into_iter().map(|rated| rated.line).collect();
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
/// A regular file is mapped rather than read: a month of events is hundreds of
/// megabytes, and copying it into fresh memory before decoding can start costs more
/// than a third of a second on its own; mapped, its pages are decoded straight from the
/// page cache by the decoding threads. A pipe (`<(zcat events.jsonl.gz)`,
/// `/dev/stdin`) has no length to map and is read to its end. Compressed or UTF-16
/// input is refused with what to do, rather than rejected line by line.
pub fn read_input(path: &str) -> anyhow::Result<Input> {
    let input = if path == "-" {
        read_stream(std::io::stdin().lock(), "stdin")?
    } else {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open events file {path}"))?;
        let metadata = file
            .metadata()
            .with_context(|| format!("cannot read events file {path}"))?;
        if metadata.is_dir() {
            anyhow::bail!("events file {path} is a directory; give a file of JSON lines");
        }
        if !metadata.is_file() {
            read_stream(file, path)?
        } else if metadata.len() == 0 {
            // An empty file cannot be mapped.
            Input::Read(Vec::new())
        } else {
            // SAFETY: the mapping is only read, and lives as long as the returned
            // value. Were another process to change the file while it is mapped, what
            // a run sees could change under it: the README asks not to write to an
            // events file while it is being rated, and `tally rate` refuses to write
            // its own outputs over it.
            #[allow(unsafe_code)]
            let map = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("cannot map events file {path}"))?;
            Input::Mapped(map)
        }
    };
    if let Some(problem) = not_json_lines(&input) {
        anyhow::bail!("events file {path} {problem}");
    }
    Ok(input)
}

fn read_stream(mut stream: impl std::io::Read, name: &str) -> anyhow::Result<Input> {
    let mut buf = Vec::new();
    stream
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read events from {name}"))?;
    Ok(Input::Read(buf))
}

/// What makes `input` plainly not UTF-8 JSON lines, by its first bytes and line.
fn not_json_lines(input: &[u8]) -> Option<&'static str> {
    const COMPRESSED: [(&[u8], &str); 4] = [
        (b"\x1f\x8b", "is gzip-compressed: decompress it first, e.g. --events <(zcat FILE) or zcat FILE | tally rate --events -"),
        (b"\x28\xb5\x2f\xfd", "is zstd-compressed: decompress it first, e.g. --events <(zstdcat FILE)"),
        (b"\xfd7zXZ\x00", "is xz-compressed: decompress it first, e.g. --events <(xzcat FILE)"),
        (b"BZh", "is bzip2-compressed: decompress it first, e.g. --events <(bzcat FILE)"),
    ];
    if input.starts_with(b"\xff\xfe") || input.starts_with(b"\xfe\xff") {
        return Some("is UTF-16; events must be UTF-8 JSON lines (iconv -f UTF-16 -t UTF-8 FILE)");
    }
    if let Some((_, problem)) = COMPRESSED
        .iter()
        .find(|(magic, _)| input.starts_with(magic))
    {
        return Some(problem);
    }
    // JSON in another shape: every event would be rejected, and the month billed empty.
    let text = input.strip_prefix(b"\xef\xbb\xbf").unwrap_or(input);
    let first_line = text.trim_ascii_start().split(|&b| b == b'\n').next()?;
    if first_line.starts_with(b"[") {
        Some("is a JSON array (an HTTP batch's body); tally rate reads JSON Lines, one event per line: jq -c '.[]' FILE writes it so")
    } else if first_line.trim_ascii() == b"{" {
        Some("is pretty-printed JSON (its first line is a lone {); tally rate reads JSON Lines, one event per line: jq -c . FILE writes it so")
    } else {
        None
    }
}
