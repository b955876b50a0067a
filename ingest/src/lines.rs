//! JSON lines in, decoded events out, in file order, decoded on several threads.
//!
//! In: the bytes of a JSON-lines input (one CloudEvent per line; blank lines are
//! skipped; a trailing `\r` is ignored). Out: batches of [`Line`]s in file order, each
//! the decoded event or a [`LineReject`] that says which line, which field and why. The
//! input is cut into chunks at line ends; worker threads decode chunks while the
//! caller's thread consumes earlier ones, so aggregation overlaps decoding. A batch is
//! handed over whole, so the consumer reads events in place instead of moving each.

use std::ops::ControlFlow;
use std::sync::mpsc;

use serde::Serialize;
use tally_schemas::event::{DecodedEvent, EventDecoder, EventError};

/// Bytes per chunk handed to a worker: large enough to amortise hand-offs, small enough
/// that the consumer starts early and memory stays bounded.
const CHUNK_BYTES: usize = 2 << 20;

/// A line that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineReject {
    /// 1-based line number in the input.
    pub line: u64,
    pub error: EventError,
    /// The line as it was (lossily as UTF-8 when it was not).
    pub raw: String,
}

impl LineReject {
    /// The reject as one JSON object, as written to rejects files.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Row<'a> {
            line: u64,
            field: &'a str,
            code: &'a str,
            reason: String,
            raw: &'a str,
        }
        serde_json::to_string(&Row {
            line: self.line,
            field: &self.error.field,
            code: self.error.problem.code(),
            reason: self.error.problem.to_string(),
            raw: &self.raw,
        })
        .unwrap_or_default()
    }
}

/// One line's fate.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Line<'a> {
    Event {
        line: u64,
        event: DecodedEvent<'a>,
        /// The line as read, for a reject should a later stage refuse the event.
        raw: &'a [u8],
    },
    /// Boxed: rejects are rare, and events should not pay for their size.
    Rejected(Box<LineReject>),
}

struct DecodedChunk<'a> {
    /// Lines in the chunk, blank ones included, so later chunks can number theirs.
    line_count: u64,
    /// Numbered from 1 within the chunk until handed over.
    lines: Vec<Line<'a>>,
}

/// Decodes `input` with `workers` threads and feeds every non-blank line to `sink`, a
/// batch at a time, in file order. The sink may stop early with `ControlFlow::Break`.
pub fn decode_lines<'a, B>(
    input: &'a [u8],
    decoder: EventDecoder<'_>,
    workers: usize,
    sink: impl FnMut(Vec<Line<'a>>) -> ControlFlow<B>,
) -> ControlFlow<B> {
    // A byte-order mark (an export from a Windows tool) is not part of the first line.
    let input = input.strip_prefix(b"\xef\xbb\xbf").unwrap_or(input);
    decode_in_chunks(input, CHUNK_BYTES, decoder, workers, sink)
}

fn decode_in_chunks<'a, B>(
    input: &'a [u8],
    chunk_bytes: usize,
    decoder: EventDecoder<'_>,
    workers: usize,
    mut sink: impl FnMut(Vec<Line<'a>>) -> ControlFlow<B>,
) -> ControlFlow<B> {
    let chunks = split_chunks(input, chunk_bytes);
    let workers = workers.clamp(1, chunks.len().max(1));
    std::thread::scope(|scope| {
        // Worker w decodes chunks w, w + workers, ... and hands them over on its own
        // queue of two, so reading the queues in turn gives the chunks in file order, and
        // no worker runs more than two chunks ahead of the consumer.
        let queues: Vec<_> = (0..workers)
            .map(|worker| {
                let (tx, rx) = mpsc::sync_channel::<DecodedChunk<'a>>(2);
                let chunks = &chunks;
                scope.spawn(move || {
                    for index in (worker..chunks.len()).step_by(workers) {
                        if tx.send(decode_chunk(chunks[index], decoder)).is_err() {
                            return;
                        }
                    }
                });
                rx
            })
            .collect();
        let mut lines_before = 0u64;
        for index in 0..chunks.len() {
            let Ok(mut chunk) = queues[index % workers].recv() else {
                break;
            };
            for line in &mut chunk.lines {
                match line {
                    Line::Event { line, .. } => *line += lines_before,
                    Line::Rejected(reject) => reject.line += lines_before,
                }
            }
            lines_before += chunk.line_count;
            let flow = sink(chunk.lines);
            if flow.is_break() {
                // Dropping the receivers stops the workers at their next send.
                return flow;
            }
        }
        ControlFlow::Continue(())
    })
}

fn decode_chunk<'a>(chunk: &'a [u8], decoder: EventDecoder<'_>) -> DecodedChunk<'a> {
    let mut lines = Vec::with_capacity(chunk.len() / 160);
    let mut line_count = 0u64;
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', chunk).chain(std::iter::once(chunk.len())) {
        let raw = &chunk[start..end];
        start = end + 1;
        line_count += 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        lines.push(match decoder.decode(raw) {
            Ok(event) => Line::Event {
                line: line_count,
                event,
                raw,
            },
            Err(error) => Line::Rejected(Box::new(LineReject {
                line: line_count,
                error,
                raw: String::from_utf8_lossy(raw).into_owned(),
            })),
        });
    }
    // A chunk ends with a newline (except maybe the last), which split counts as an
    // extra empty line.
    if chunk.ends_with(b"\n") {
        line_count -= 1;
    }
    DecodedChunk { line_count, lines }
}

/// Cuts input into chunks of about `target` bytes, each ending just after a newline.
fn split_chunks(input: &[u8], target: usize) -> Vec<&[u8]> {
    let mut chunks = Vec::with_capacity(input.len() / target + 1);
    let mut rest = input;
    while !rest.is_empty() {
        if rest.len() <= target {
            chunks.push(rest);
            break;
        }
        let cut = memchr::memchr(b'\n', &rest[target..]).map_or(rest.len(), |i| target + i + 1);
        let (chunk, tail) = rest.split_at(cut);
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use tally_schemas::config::Config;

    const CONFIG: &str = r#"
        [[meters]]
        slug = "calls"
        event_type = "api.call"
        aggregation = "count"
    "#;

    fn event(id: u32) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"e{id}","source":"s","type":"api.call","subject":"c","time":"2026-10-01T00:00:00Z"}}"#
        )
    }

    #[test]
    fn line_numbers_survive_chunking_blank_lines_and_crlf() {
        let config = Config::parse(CONFIG, "test").unwrap();
        let decoder =
            EventDecoder::new(&config, Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap());
        let mut input = String::new();
        for i in 1..=5000 {
            match i % 1000 {
                7 => input.push_str("not json\n"),
                8 => input.push_str("\r\n"),
                9 => input.push_str(&format!("{}\r\n", event(i))),
                _ => input.push_str(&format!("{}\n", event(i))),
            }
        }
        for chunk_bytes in [64, 1000, 1 << 20] {
            let chunks = split_chunks(input.as_bytes(), chunk_bytes);
            assert_eq!(chunks.concat(), input.as_bytes());
        }
        for (chunk_bytes, workers) in [(1000, 3), (4096, 2), (1 << 20, 1)] {
            let mut seen = Vec::new();
            let flow: ControlFlow<()> =
                decode_in_chunks(input.as_bytes(), chunk_bytes, decoder, workers, |lines| {
                    seen.extend(lines.iter().map(|line| match line {
                        Line::Event { line, .. } => (*line, true),
                        Line::Rejected(r) => (r.line, false),
                    }));
                    ControlFlow::Continue(())
                });
            assert!(flow.is_continue());
            assert_eq!(seen.len(), 4995);
            let rejected: Vec<u64> = seen.iter().filter(|(_, ok)| !ok).map(|(l, _)| *l).collect();
            assert_eq!(rejected, [7, 1007, 2007, 3007, 4007]);
            assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
            assert_eq!(seen.last().unwrap().0, 5000);
        }
    }
}
