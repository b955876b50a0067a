//! One record of an owned events partition, and what becomes of it.
//!
//! In: a message read from `<prefix>.events`. Out, into [`Processed`]: its outcome
//! (accepted, duplicate, conflict, too late, refused, unmetered), counted; a
//! [`Rejection`] with code, field and reason for one the rejected topic keeps; an event
//! of another partition's subject, to forward there; or a control record's effect
//! (a period closed). The aggregator core does the deduping and windowing; this decides
//! how each message meets it.

use std::num::NonZeroUsize;
use std::sync::LazyLock;
use std::time::Instant;

use chrono::{DateTime, Utc};
use rdkafka::message::{BorrowedMessage, Message};
use tally_runtime::kafka::{header_value, partition_for_key};
use tally_runtime::throttle::LogThrottle;
use tally_schemas::config::Config;
use tally_schemas::event::{EventDecoder, EventError, Problem};
use tally_schemas::records::{CLOSE_PERIOD_HEADER, FORWARDED_TIMESTAMP_HEADER};
use tally_schemas::time::Period;

use crate::aggregator::Outcome;

use super::metrics::{EventOutcome, OutcomeCounts};
use super::outputs::forwarded_bytes;
use super::PartitionState;
use tally_runtime::kafka::MAX_EVENT_RECORD_BYTES;

/// Why an event goes to the rejected topic.
#[derive(Debug)]
pub(super) struct Rejection {
    pub(super) code: &'static str,
    /// The field at fault, or `event` for the message as a whole.
    pub(super) field: String,
    pub(super) reason: String,
}

/// What processing one partition's share of a batch produced, for the worker to add up.
#[derive(Debug, Default)]
pub(super) struct Processed<'m> {
    pub(super) events: usize,
    /// Kafka timestamp (ms) of the oldest event processed.
    pub(super) oldest_event_ms: Option<i64>,
    pub(super) outcomes: OutcomeCounts,
    pub(super) rejections: Vec<(&'m BorrowedMessage<'m>, Rejection)>,
    /// Events read on another partition than their subject's, with that partition and
    /// the "now" they were judged by here.
    pub(super) forwards: Vec<(&'m BorrowedMessage<'m>, i32, i64)>,
}

impl<'m> Processed<'m> {
    /// Counts an event's outcome, and keeps its rejection, if any, for the transaction
    /// to write to the rejected topic.
    pub(super) fn count(
        &mut self,
        message: &'m BorrowedMessage<'m>,
        (outcome, rejection): (EventOutcome, Option<Rejection>),
    ) {
        self.outcomes.add(outcome);
        if let Some(rejection) = rejection {
            self.rejections.push((message, rejection));
        }
    }
}

/// An outcome that sends the message to the rejected topic, saying why.
pub(super) fn rejection(
    outcome: EventOutcome,
    code: &'static str,
    field: impl Into<String>,
    reason: String,
) -> (EventOutcome, Option<Rejection>) {
    (
        outcome,
        Some(Rejection {
            code,
            field: field.into(),
            reason,
        }),
    )
}

/// How an event the core has applied is counted, and why it goes to the rejected
/// topic if it does. For the too-late reason: the event's `time`, and how far back
/// dedupe reached then (the oldest time accepted, the partition's newest event time).
fn verdict(
    outcome: Outcome,
    time: DateTime<Utc>,
    reach: Option<(DateTime<Utc>, DateTime<Utc>)>,
) -> (EventOutcome, Option<Rejection>) {
    match outcome {
        Outcome::Accepted | Outcome::Late | Outcome::Adjusted => (EventOutcome::Accepted, None),
        Outcome::Unmetered => (EventOutcome::Unmetered, None),
        Outcome::Retry => (EventOutcome::Duplicate, None),
        Outcome::Conflict => rejection(
            EventOutcome::Conflict,
            Problem::Conflict.code(),
            "id",
            Problem::Conflict.to_string(),
        ),
        Outcome::TooLate => rejection(
            EventOutcome::TooLate,
            "too_late",
            "time",
            too_late_reason(time, reach),
        ),
        Outcome::Refused(e) => {
            let EventError { field, problem } = e.as_event_error();
            rejection(
                EventOutcome::Refused,
                problem.code(),
                field,
                problem.to_string(),
            )
        }
    }
}

/// What a record that could not be read as an event most likely is, added to its
/// rejection's reason for whoever produced it straight to Kafka: `value`, and whether
/// it has CloudEvents binary-mode headers.
fn record_hint(value: &[u8], binary: bool) -> &'static str {
    if binary {
        "; the record has ce_ headers (CloudEvents binary mode), which Tally does not read: produce each event as structured JSON, the whole event as the record's value (the SDKs' to_structured)"
    } else if value.is_empty() {
        "; the record has no value (a tombstone, or a producer that sent only a key): each record's value is one CloudEvent as JSON"
    } else if value.starts_with(&[0x1f, 0x8b]) {
        "; the value is gzip-compressed: produce the JSON itself, and let the producer compress its batches (compression.type)"
    } else if value.starts_with("\u{feff}".as_bytes()) {
        "; the value starts with a byte-order mark: produce the JSON without it"
    } else if value.trim_ascii_start().starts_with(b"[") {
        "; the value is a JSON array: produce one event per record (batches are for ingest's HTTP API)"
    } else {
        ""
    }
}

/// Why an event is too late, for whoever bills what it carried.
fn too_late_reason(time: DateTime<Utc>, reach: Option<(DateTime<Utc>, DateTime<Utc>)>) -> String {
    let how_far = match reach {
        Some((oldest, newest)) if time < oldest => format!(
            "is before {}, the dedupe horizon behind its partition's newest event ({})",
            oldest.to_rfc3339(),
            newest.to_rfc3339()
        ),
        _ => "is of a day whose dedupe keys were let go under a shorter dedupe horizon".to_owned(),
    };
    format!(
        "the event's time {} {how_far}: a retry of it can no longer be told from new usage, so it bills nothing. Bill new usage among such events by hand (tally rate prices them); senders this late need a longer [aggregator] dedupe_horizon",
        time.to_rfc3339()
    )
}

/// Says, at most once a minute in the process, that events of a type no meter reads
/// are read: the product may send such events on purpose, but an aggregator whose
/// price book lacks a meter the others have bills nothing of its type.
fn log_unmetered(event_type: &str, message: &BorrowedMessage<'_>) {
    static LOGGED: LazyLock<LogThrottle<()>> = LazyLock::new(LogThrottle::default);
    if let Some(left_out) = LOGGED.due((), Instant::now()) {
        tracing::warn!(
            event_type,
            partition = message.partition(),
            offset = message.offset(),
            left_out,
            "an event of a type no meter of this price book reads: not billed (logged at most once a minute; left_out: as many since). If it should be, see the README's \"A meter missing from the price book\""
        );
    }
}

impl PartitionState {
    /// Dedupes and aggregates one event of this partition.
    pub(super) fn process<'m>(
        &mut self,
        config: &Config,
        partition_count: NonZeroUsize,
        message: &'m BorrowedMessage<'m>,
        processed: &mut Processed<'m>,
    ) {
        if message.offset() < self.next_offset {
            return; // already counted before a recovery rewound the consumer
        }
        self.next_offset = message.offset() + 1;
        self.touched = true;
        processed.events += 1;
        let timestamp = message.timestamp().to_millis();
        processed.oldest_event_ms = processed.oldest_event_ms.into_iter().chain(timestamp).min();
        // The event's "now" is when it reached Kafka, so a replay judges its time exactly
        // as the first reading did. A forwarded event's is when it first reached Kafka,
        // never later than this record's, so a forged header cannot move the clock on.
        let forwarded_ms = header_value(message, FORWARDED_TIMESTAMP_HEADER)
            .and_then(|value| std::str::from_utf8(value).ok()?.parse::<i64>().ok());
        let received_ms = match (forwarded_ms, timestamp) {
            (Some(first), Some(this)) => Some(first.min(this)),
            (first, this) => this.or(first),
        };
        let at = |ms: Option<i64>| {
            ms.and_then(chrono::DateTime::from_timestamp_millis)
                .unwrap_or_else(Utc::now)
        };
        let now = at(received_ms);
        if let Some(value) = header_value(message, CLOSE_PERIOD_HEADER) {
            // A control record is judged by its own record's time alone.
            let rejection = self.apply_close_record(message, value, at(timestamp));
            processed.outcomes.add(match rejection {
                Some(_) => EventOutcome::Invalid,
                None => EventOutcome::Control,
            });
            processed.rejections.extend(rejection.map(|r| (message, r)));
            return;
        }
        let (outcome, rejection) = match EventDecoder::new(config, now)
            .decode(message.payload().unwrap_or_default())
        {
            Err(e) => {
                // A CloudEvents SDK's Kafka binary mode puts the attributes in headers.
                let binary = header_value(message, "ce_specversion").is_some();
                let hint = record_hint(message.payload().unwrap_or_default(), binary);
                rejection(
                    EventOutcome::Invalid,
                    e.problem.code(),
                    e.field.clone(),
                    format!("{e}{hint}"),
                )
            }
            Ok(event) => {
                // A customer's line is its partition's total, and the rater finds its
                // zero-usage lines by the partitioner's choice: an event of another
                // partition (a producer partitioning otherwise, or keying by something
                // else or nothing) is counted there. Its Kafka key plays no part.
                let home = partition_for_key(event.subject.as_bytes(), partition_count);
                if home != message.partition() {
                    // A build before forwarding counted misplaced events where they were
                    // read: a retry of one is a retry here, not an event to forward.
                    // Only a retry: another content under its key here is as likely
                    // another customer's event, dedupe being per partition.
                    if self.aggregator.counted_same(&event) {
                        return processed.count(message, verdict(Outcome::Retry, event.time, None));
                    }
                    let bytes = forwarded_bytes(message);
                    if bytes > MAX_EVENT_RECORD_BYTES {
                        return processed.count(message, rejection(
                            EventOutcome::Invalid,
                            "wrong_partition",
                            "subject",
                            format!("the event is on partition {} but Kafka's Java partitioner (murmur2) gives its subject partition {home}, and at {bytes} bytes it is too large to forward there: produce with partitioner=murmur2_random (or, if partitions were added to the events topic, to partition {home}: murmur2 over the pipeline's count)", message.partition()),
                        ));
                    }
                    let received_ms = received_ms.unwrap_or_else(|| now.timestamp_millis());
                    processed.forwards.push((message, home, received_ms));
                    processed.outcomes.add(EventOutcome::Forwarded);
                    return;
                }
                let outcome = self.aggregator.apply(&event);
                match outcome {
                    Outcome::Late => processed.outcomes.late_revised += 1,
                    Outcome::Adjusted => processed.outcomes.late_adjusted += 1,
                    Outcome::Unmetered => log_unmetered(&event.event_type, message),
                    _ => {}
                }
                let reach = (self.aggregator.oldest_acceptable()).zip(self.aggregator.watermark());
                verdict(outcome, event.time, reach)
            }
        };
        processed.count(message, (outcome, rejection));
    }

    /// Closes the period a control record names, or tells why it cannot. A close cannot
    /// be undone, so one naming a period that had not ended when it was written (`now`)
    /// is refused, the same on a replay.
    pub(super) fn apply_close_record(
        &mut self,
        message: &BorrowedMessage<'_>,
        value: &[u8],
        now: chrono::DateTime<Utc>,
    ) -> Option<Rejection> {
        let refuse = |reason: String| {
            Some(Rejection {
                code: "invalid_control",
                field: format!("header {CLOSE_PERIOD_HEADER}"),
                reason,
            })
        };
        // `tally close-period` writes none: an event a producer gave Tally's header
        // (copied with others, say) is kept in the rejected topic, not taken as a close.
        let payload = message.payload().map_or(0, <[u8]>::len);
        if payload > 0 {
            return refuse(format!(
                "a control record has no payload, and this one carries {payload} bytes: neither a close nor an event, it is kept here; send the event without the {CLOSE_PERIOD_HEADER} header"
            ));
        }
        match std::str::from_utf8(value).map(str::parse::<Period>) {
            Ok(Ok(period)) if period.end() > now => refuse(format!(
                "{period} had not ended when the control record was written ({}); only a period that has ended can be closed",
                now.to_rfc3339()
            )),
            Ok(Ok(period)) => {
                self.aggregator.close_through(period);
                tracing::info!(
                    partition = message.partition(),
                    offset = message.offset(),
                    %period,
                    "period closed by a control record; its later usage becomes adjustments"
                );
                None
            }
            _ => refuse(format!(
                "{:?} is not a period like 2026-10; the control record closes nothing",
                String::from_utf8_lossy(value)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_that_is_no_event_is_told_what_it_looks_like() {
        let hint = |value: &[u8], binary: bool| {
            let hint = record_hint(value, binary);
            hint.split(':').next().unwrap_or_default().to_owned()
        };
        assert_eq!(
            hint(b"{}", true),
            "; the record has ce_ headers (CloudEvents binary mode), which Tally does not read"
        );
        assert_eq!(
            hint(b"", false),
            "; the record has no value (a tombstone, or a producer that sent only a key)"
        );
        assert_eq!(
            hint(&[0x1f, 0x8b, 8, 0], false),
            "; the value is gzip-compressed"
        );
        assert_eq!(
            hint("\u{feff}{}".as_bytes(), false),
            "; the value starts with a byte-order mark"
        );
        assert_eq!(hint(b" [{}]", false), "; the value is a JSON array");
        assert_eq!(hint(b"{\"id\":", false), "");
    }
    use crate::state::StateError;

    #[test]
    fn each_core_outcome_maps_to_one_counted_outcome_and_refusals_to_a_rejection_reason() {
        let time = chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap_or_default();
        let table = [
            (Outcome::Accepted, EventOutcome::Accepted, None),
            (Outcome::Late, EventOutcome::Accepted, None),
            (Outcome::Adjusted, EventOutcome::Accepted, None),
            (Outcome::Unmetered, EventOutcome::Unmetered, None),
            (Outcome::Retry, EventOutcome::Duplicate, None),
            (
                Outcome::Conflict,
                EventOutcome::Conflict,
                Some(("conflict", "id")),
            ),
            (
                Outcome::TooLate,
                EventOutcome::TooLate,
                Some(("too_late", "time")),
            ),
            (
                Outcome::Refused(StateError::Overflow),
                EventOutcome::Refused,
                Some(("refused", "data")),
            ),
        ];
        for (outcome, counted, rejected) in table {
            let name = format!("{outcome:?}");
            let (got, rejection) = verdict(outcome, time, None);
            assert_eq!(got, counted, "{name}");
            assert_eq!(
                rejection.as_ref().map(|r| (r.code, r.field.as_str())),
                rejected,
                "{name}"
            );
        }
        let newest = time + chrono::Duration::days(40);
        let reach = Some((newest - chrono::Duration::days(35), newest));
        let (_, too_late) = verdict(Outcome::TooLate, time, reach);
        assert_eq!(
            too_late.unwrap().reason,
            format!(
                "the event's time {} is before {}, the dedupe horizon behind its partition's newest event ({}): a retry of it can no longer be told from new usage, so it bills nothing. Bill new usage among such events by hand (tally rate prices them); senders this late need a longer [aggregator] dedupe_horizon",
                time.to_rfc3339(),
                (newest - chrono::Duration::days(35)).to_rfc3339(),
                newest.to_rfc3339()
            )
        );
    }
}
