//! A refused event's copy for `<prefix>.rejected`, as ingest and the aggregator both
//! write one. In: the event's bytes, why it was refused (a stable code, the field at
//! fault, a reason for people) and the headers that say where it came from. Out: a
//! record's headers and the part of its bytes that fits a record beside them.

use rdkafka::message::{Header, OwnedHeaders};
use tally_schemas::records::{
    REJECTED_CODE_HEADER, REJECTED_FIELD_HEADER, REJECTED_REASON_HEADER,
    REJECTED_SOURCE_BYTES_HEADER,
};

/// The most a record carrying an event (forwarded, or copied to the rejected topic)
/// may hold, headers included: librdkafka's default `message.max.bytes`, below the
/// broker's default topic limit. A larger one could be refused by the broker, the
/// aggregator's at commit and again after every recovery.
pub const MAX_EVENT_RECORD_BYTES: usize = 1_000_000;

/// Room kept in a rejected record for the headers a copy adds (the reasons, where the
/// event came from): the event's bytes are cut to leave it.
pub const REJECTION_HEADERS_BYTES: usize = 16 * 1024;

/// The most of a refusal's field kept: a field names what the sender wrote (a data
/// key), so its length is theirs.
const MAX_FIELD_BYTES: usize = 1024;

/// The most of a refusal's reason kept; it may quote the sender's text.
const MAX_REASON_BYTES: usize = 4096;

// What the two may take leaves most of the room to the headers saying where from.
const _: () = assert!(MAX_FIELD_BYTES + MAX_REASON_BYTES <= REJECTION_HEADERS_BYTES / 2);

/// `headers` with why the event was refused: its code, field and reason, the last two
/// cut to their room.
pub fn with_refusal(headers: OwnedHeaders, code: &str, field: &str, reason: &str) -> OwnedHeaders {
    headers
        .insert(Header {
            key: REJECTED_CODE_HEADER,
            value: Some(code),
        })
        .insert(Header {
            key: REJECTED_FIELD_HEADER,
            value: Some(at_most(field, MAX_FIELD_BYTES)),
        })
        .insert(Header {
            key: REJECTED_REASON_HEADER,
            value: Some(at_most(reason, MAX_REASON_BYTES)),
        })
}

/// The first bytes of `payload` that fit a record of `max_record_bytes` beside
/// [`REJECTION_HEADERS_BYTES`] and `other_bytes` (the key, the event's own headers), and
/// `headers` with the payload's full size when it was cut: the copy must fit, or Kafka
/// would refuse it on every retry.
pub fn fitted(
    payload: &[u8],
    headers: OwnedHeaders,
    max_record_bytes: usize,
    other_bytes: usize,
) -> (&[u8], OwnedHeaders) {
    let room = max_record_bytes.saturating_sub(REJECTION_HEADERS_BYTES + other_bytes);
    if payload.len() <= room {
        return (payload, headers);
    }
    let headers = headers.insert(Header {
        key: REJECTED_SOURCE_BYTES_HEADER,
        value: Some(&payload.len().to_string()),
    });
    (&payload[..room], headers)
}

/// `text`'s first `bytes` bytes at most, cut at a character's boundary.
fn at_most(text: &str, bytes: usize) -> &str {
    let mut end = text.len().min(bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use rdkafka::message::Headers;

    use super::*;

    fn header(headers: &OwnedHeaders, key: &str) -> Option<String> {
        (headers.iter())
            .find(|h| h.key == key)
            .map(|h| String::from_utf8(h.value.unwrap_or_default().to_vec()).unwrap())
    }

    #[test]
    fn a_copy_keeps_what_fits_and_says_how_large_the_event_was() {
        let payload = vec![b'x'; 40_000];
        let (kept, headers) = fitted(&payload, OwnedHeaders::new(), 30_000, 100);
        assert_eq!(kept.len(), 30_000 - REJECTION_HEADERS_BYTES - 100);
        assert_eq!(
            header(&headers, REJECTED_SOURCE_BYTES_HEADER).as_deref(),
            Some("40000")
        );
        let (kept, headers) = fitted(&payload, OwnedHeaders::new(), 1_000_000, 100);
        assert_eq!(kept.len(), 40_000);
        assert_eq!(header(&headers, REJECTED_SOURCE_BYTES_HEADER), None);
    }

    #[test]
    fn a_long_field_or_reason_is_cut_at_a_character() {
        let field = "é".repeat(MAX_FIELD_BYTES);
        let headers = with_refusal(OwnedHeaders::new(), "negative_value", &field, "r");
        let kept = header(&headers, REJECTED_FIELD_HEADER).unwrap();
        assert_eq!(kept.len(), MAX_FIELD_BYTES);
        assert!(kept.chars().all(|c| c == 'é'));
        assert_eq!(
            header(&headers, REJECTED_CODE_HEADER).as_deref(),
            Some("negative_value")
        );
    }
}
