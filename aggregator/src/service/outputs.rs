//! The records that carry an event on: a refused event's copy to `<prefix>.rejected`
//! (its original bytes, cut to fit a record, and why in headers), and an event read on
//! another partition than its subject's, forwarded to that one.
//!
//! Both are written in the open transaction, so they commit or abort with the offsets
//! of the events they carry.

use std::time::Instant;

use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use tally_runtime::kafka::{
    fitted, send, with_refusal, MAX_EVENT_RECORD_BYTES, REJECTION_HEADERS_BYTES,
};
use tally_schemas::records::{
    FORWARDED_FROM_HEADER, FORWARDED_TIMESTAMP_HEADER, REJECTED_CODE_HEADER, REJECTED_FIELD_HEADER,
    REJECTED_REASON_HEADER, REJECTED_SOURCE_BYTES_HEADER, REJECTED_SOURCE_HEADERS_BYTES_HEADER,
    REJECTED_SOURCE_OFFSET_HEADER, REJECTED_SOURCE_PARTITION_HEADER, REJECTED_SOURCE_TOPIC_HEADER,
};

use super::route::Rejection;
use super::Worker;

/// The bytes of `message` forwarded: key, payload, headers and the forward's own, with
/// a few bytes of framing apiece.
pub(super) fn forwarded_bytes(message: &BorrowedMessage<'_>) -> usize {
    let key = message.key().map_or(0, <[u8]>::len);
    let forward = FORWARDED_FROM_HEADER.len() + FORWARDED_TIMESTAMP_HEADER.len() + 2 * (20 + 10);
    message.payload().map_or(0, <[u8]>::len) + key + headers_bytes(message) + forward
}

/// The bytes of `message`'s headers, with a few bytes of framing apiece.
fn headers_bytes(message: &BorrowedMessage<'_>) -> usize {
    (message.headers().into_iter())
        .flat_map(|h| h.iter())
        .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + 10)
        .sum()
}

/// `message`'s headers but those named `replaced`, which the copy sets itself.
fn headers_but(message: &BorrowedMessage<'_>, replaced: &[&str]) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    for header in message.headers().into_iter().flat_map(|h| h.iter()) {
        if !replaced.contains(&header.key) {
            headers = headers.insert(header);
        }
    }
    headers
}

/// Whether a rejected copy carries the event's own headers (`headers` bytes, with a
/// key of `key` bytes): only when they fit a record beside the reasons, or a copy of an
/// event whose headers fill a record would be refused by Kafka, stopping the
/// aggregator at that event after every restart.
fn copies_headers(headers: usize, key: usize) -> bool {
    headers + key + REJECTION_HEADERS_BYTES <= MAX_EVENT_RECORD_BYTES
}

impl Worker {
    /// Writes a refused event to the rejected topic: its original bytes (their first
    /// ones, if all would not fit a record with the headers), the reason in headers.
    pub(super) fn reject(
        &self,
        message: &BorrowedMessage<'_>,
        rejection: Rejection,
    ) -> Result<(), KafkaError> {
        let Rejection {
            code,
            field,
            reason,
        } = rejection;
        self.metrics.rejected.with_label_values(&[code]).inc();
        if let Some(left_out) = self.refusals_logged.due(code, Instant::now()) {
            tracing::warn!(
                code,
                field,
                reason,
                partition = message.partition(),
                offset = message.offset(),
                left_out,
                "event refused, kept in the rejected topic (each code logged at most once a minute; left_out: as many since)"
            );
        }
        // The event's own headers come along (a CloudEvents binary-mode record's
        // attributes are there), so the copy can be read, and replayed, as it was.
        const OURS: [&str; 8] = [
            REJECTED_CODE_HEADER,
            REJECTED_FIELD_HEADER,
            REJECTED_REASON_HEADER,
            REJECTED_SOURCE_TOPIC_HEADER,
            REJECTED_SOURCE_PARTITION_HEADER,
            REJECTED_SOURCE_OFFSET_HEADER,
            REJECTED_SOURCE_BYTES_HEADER,
            REJECTED_SOURCE_HEADERS_BYTES_HEADER,
        ];
        let key_bytes = message.key().map_or(0, <[u8]>::len);
        let own_headers = headers_bytes(message);
        let (headers, own_headers) = match copies_headers(own_headers, key_bytes) {
            true => (headers_but(message, &OURS), own_headers),
            false => (
                OwnedHeaders::new().insert(Header {
                    key: REJECTED_SOURCE_HEADERS_BYTES_HEADER,
                    value: Some(&own_headers.to_string()),
                }),
                0,
            ),
        };
        let headers = with_refusal(headers, code, &field, &reason)
            .insert(Header {
                key: REJECTED_SOURCE_TOPIC_HEADER,
                value: Some(message.topic()),
            })
            .insert(Header {
                key: REJECTED_SOURCE_PARTITION_HEADER,
                value: Some(&message.partition().to_string()),
            })
            .insert(Header {
                key: REJECTED_SOURCE_OFFSET_HEADER,
                value: Some(&message.offset().to_string()),
            });
        // Cut to fit, the whole event staying at its offset in the events topic.
        let payload = message.payload().unwrap_or_default();
        let (payload, headers) = fitted(
            payload,
            headers,
            MAX_EVENT_RECORD_BYTES,
            own_headers + key_bytes,
        );
        let mut record = BaseRecord::<[u8], [u8]>::to(&self.topics.rejected)
            .payload(payload)
            .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        send(&self.producer, record)
    }

    /// Writes an event read on another partition than its subject's to that one, in
    /// the open transaction, with its key, payload and headers, and where and when it
    /// was read here; it is counted there, so a customer's events share one
    /// partition's dedupe and totals.
    pub(super) fn forward(
        &self,
        message: &BorrowedMessage<'_>,
        home: i32,
        received_ms: i64,
    ) -> Result<(), KafkaError> {
        if let Some(left_out) = self.forwards_logged.due((), Instant::now()) {
            let key = message.key().map_or_else(
                || "(none)".to_owned(),
                |key| tally_runtime::loggable(&String::from_utf8_lossy(key)),
            );
            tracing::warn!(
                partition = message.partition(),
                offset = message.offset(),
                key = key.as_str(),
                subjects_partition = home,
                left_out,
                "an event was read on another partition than its subject's and is forwarded there, an extra write: its producer should key events by subject and partition with murmur2 (README, \"Producing to Kafka directly\"); logged at most once a minute, left_out: as many since"
            );
        }
        let headers = headers_but(
            message,
            &[FORWARDED_FROM_HEADER, FORWARDED_TIMESTAMP_HEADER],
        )
        .insert(Header {
            key: FORWARDED_FROM_HEADER,
            value: Some(&format!("{}@{}", message.partition(), message.offset())),
        })
        .insert(Header {
            key: FORWARDED_TIMESTAMP_HEADER,
            value: Some(&received_ms.to_string()),
        });
        let mut record = BaseRecord::<[u8], [u8]>::to(&self.topics.events)
            .partition(home)
            .payload(message.payload().unwrap_or_default())
            .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        send(&self.producer, record)
    }
}

#[cfg(test)]
mod tests {
    use super::{copies_headers, MAX_EVENT_RECORD_BYTES, REJECTION_HEADERS_BYTES};

    #[test]
    fn a_rejected_copy_takes_the_events_headers_only_where_they_fit_beside_the_reasons() {
        let room = MAX_EVENT_RECORD_BYTES - REJECTION_HEADERS_BYTES;
        assert!(copies_headers(200, 9));
        assert!(copies_headers(room - 9, 9));
        assert!(!copies_headers(room - 8, 9));
        assert!(!copies_headers(1_048_300, 0));
    }
}
