//! What a `POST /v1/events` body holds: the content type says one event or a batch,
//! and a batch is cut into the raw JSON text of each element, so every event is
//! validated, and produced, as the exact bytes its sender wrote.
//!
//! Pure functions, no I/O: the handler calls them on the body it has read.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// What the `Content-Type` header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/cloudevents+json`: one event in structured mode.
    Single,
    /// `application/cloudevents-batch+json`: a JSON array of events.
    Batch,
    /// `application/json`: a batch when the body is an array, else one event.
    Either,
}

/// The media types accepted, for error messages.
pub const ACCEPTED_TYPES: &str =
    "application/cloudevents+json, application/cloudevents-batch+json or application/json";

/// The kind of body a `Content-Type` announces; `None` for any other media type (or
/// none), or a charset other than UTF-8 (JSON's only one; `utf8` and its subset
/// `us-ascii` are UTF-8 too). Other parameters are ignored; names and values are
/// case-insensitive.
pub fn body_kind(content_type: Option<&str>) -> Option<BodyKind> {
    let mut parts = content_type?.split(';');
    let essence = parts.next()?.trim();
    let other_charset = parts
        .filter_map(|p| p.split_once('='))
        .any(|(name, value)| {
            let value = value.trim().trim_matches('"');
            name.trim().eq_ignore_ascii_case("charset")
                && !["utf-8", "utf8", "us-ascii"]
                    .iter()
                    .any(|utf8| value.eq_ignore_ascii_case(utf8))
        });
    if other_charset {
        None
    } else if essence.eq_ignore_ascii_case("application/cloudevents+json") {
        Some(BodyKind::Single)
    } else if essence.eq_ignore_ascii_case("application/cloudevents-batch+json") {
        Some(BodyKind::Batch)
    } else if essence.eq_ignore_ascii_case("application/json") {
        Some(BodyKind::Either)
    } else {
        None
    }
}

/// The events of one request, each as the bytes its sender wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Events<'a> {
    /// One event: the body without surrounding whitespace.
    Single(&'a [u8]),
    /// The elements of a batch, in order, each without surrounding whitespace.
    Batch(Vec<&'a [u8]>),
}

impl<'a> Events<'a> {
    pub fn as_slice(&self) -> &[&'a [u8]] {
        match self {
            Events::Single(event) => std::slice::from_ref(event),
            Events::Batch(events) => events,
        }
    }

    pub fn is_single(&self) -> bool {
        matches!(self, Events::Single(_))
    }
}

/// Why a body holds no events to validate; each is the whole request's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is empty; send one CloudEvent or a JSON array of them")]
    Empty,
    #[error("the batch is an empty array; send at least one event")]
    EmptyBatch,
    #[error("a batch (application/cloudevents-batch+json) must be a JSON array of events")]
    NotAnArray,
    #[error("the batch is not valid JSON ({0}); no event of it was read")]
    InvalidBatch(String),
    #[error(
        "the batch holds {count} events, more than the {max} allowed in one request; split it"
    )]
    TooManyEvents { count: usize, max: usize },
}

/// Cuts `body` into events as `kind` says, allowing at most `max_events`.
///
/// A batch must be valid JSON as a whole (otherwise where one element ends is a
/// guess); each element is then validated on its own by the event decoder, so one bad
/// event does not spoil the others. A single event is not parsed here at all: the
/// decoder reports everything wrong with it, field by field.
pub fn split_events(
    kind: BodyKind,
    body: &[u8],
    max_events: usize,
) -> Result<Events<'_>, BodyError> {
    let body = body.trim_ascii();
    let first = *body.first().ok_or(BodyError::Empty)?;
    let batch = match kind {
        BodyKind::Single => false,
        BodyKind::Batch if first != b'[' => return Err(BodyError::NotAnArray),
        BodyKind::Batch => true,
        BodyKind::Either => first == b'[',
    };
    if !batch {
        return Ok(Events::Single(body));
    }
    let elements: Vec<&RawValue> =
        serde_json::from_slice(body).map_err(|e| BodyError::InvalidBatch(e.to_string()))?;
    if elements.is_empty() {
        return Err(BodyError::EmptyBatch);
    }
    if elements.len() > max_events {
        return Err(BodyError::TooManyEvents {
            count: elements.len(),
            max: max_events,
        });
    }
    Ok(Events::Batch(
        elements.into_iter().map(|e| e.get().as_bytes()).collect(),
    ))
}

/// An event's `source` and `id` as strings, when it has them: what the source check
/// and the per-event results need, read apart from the decoder (which keeps only a
/// fingerprint of the pair).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity<'a> {
    pub source: Option<Cow<'a, str>>,
    pub id: Option<Cow<'a, str>>,
}

/// Reads `source` and `id` from one event's JSON; each is `None` when absent or not a
/// string, and both are `None` when the event is not a JSON object with at most one of
/// each (the decoder then rejects it, so it is never produced).
pub fn identity<'a>(event: &'a [u8]) -> Identity<'a> {
    #[derive(Deserialize)]
    struct Attributes<'a> {
        #[serde(borrow, default)]
        source: Option<&'a RawValue>,
        #[serde(borrow, default)]
        id: Option<&'a RawValue>,
    }
    let Ok(attributes) = serde_json::from_slice::<Attributes<'_>>(event) else {
        return Identity::default();
    };
    let text = |raw: Option<&'a RawValue>| -> Option<Cow<'a, str>> {
        let raw = raw?.get();
        raw.starts_with('"')
            .then(|| serde_json::from_str::<Cow<'a, str>>(raw).ok())
            .flatten()
    };
    Identity {
        source: text(attributes.source),
        id: text(attributes.id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_select_single_batch_or_either() {
        assert_eq!(
            body_kind(Some("application/cloudevents+json")),
            Some(BodyKind::Single)
        );
        assert_eq!(
            body_kind(Some("Application/CloudEvents-Batch+JSON; charset=utf-8")),
            Some(BodyKind::Batch)
        );
        assert_eq!(
            body_kind(Some(" application/json ;charset=UTF-8")),
            Some(BodyKind::Either)
        );
        for utf8 in [
            "application/json; charset=\"utf-8\"; profile=x",
            "application/json; charset=utf8",
            "application/json; charset=US-ASCII",
        ] {
            assert_eq!(body_kind(Some(utf8)), Some(BodyKind::Either), "{utf8}");
        }
        for other in [
            None,
            Some(""),
            Some("text/plain"),
            Some("application/x-ndjson"),
            Some("application/jsonl"),
            Some("multipart/form-data; boundary=x"),
            Some("application/json; charset=utf-16"),
            Some("application/cloudevents+json; charset=\"ISO-8859-1\""),
        ] {
            assert_eq!(body_kind(other), None, "{other:?}");
        }
    }

    #[test]
    fn a_batch_is_cut_into_each_elements_exact_text() {
        let body = br#" [ {"id":"a","n":1.50} ,
            {"id":"b", "data": {"x": [1, 2]}},"not an event", 7 ] "#;
        let events = split_events(BodyKind::Batch, body, 10).unwrap();
        assert_eq!(
            events.as_slice(),
            &[
                br#"{"id":"a","n":1.50}"#.as_slice(),
                br#"{"id":"b", "data": {"x": [1, 2]}}"#,
                br#""not an event""#,
                b"7",
            ]
        );
        assert!(!events.is_single());
    }

    #[test]
    fn application_json_is_a_batch_only_when_it_is_an_array() {
        let single = split_events(BodyKind::Either, b" {\"id\":\"a\"}\n", 10).unwrap();
        assert_eq!(single, Events::Single(b"{\"id\":\"a\"}"));
        let batch = split_events(BodyKind::Either, b"[{\"id\":\"a\"}]", 10).unwrap();
        assert_eq!(batch, Events::Batch(vec![b"{\"id\":\"a\"}".as_slice()]));
        // Not JSON at all: still one event, which the decoder will reject with a reason.
        let junk = split_events(BodyKind::Either, b"id=a", 10).unwrap();
        assert_eq!(junk, Events::Single(b"id=a"));
    }

    #[test]
    fn cloudevents_json_is_one_event_even_when_it_is_an_array() {
        let events = split_events(BodyKind::Single, b"[1]", 10).unwrap();
        assert_eq!(events, Events::Single(b"[1]"));
    }

    #[test]
    fn bodies_without_events_are_refused_with_the_reason() {
        assert_eq!(
            split_events(BodyKind::Either, b" \r\n", 10),
            Err(BodyError::Empty)
        );
        assert_eq!(
            split_events(BodyKind::Single, b"", 10),
            Err(BodyError::Empty)
        );
        assert_eq!(
            split_events(BodyKind::Batch, b"[ ]", 10),
            Err(BodyError::EmptyBatch)
        );
        assert_eq!(
            split_events(BodyKind::Batch, b"{\"id\":\"a\"}", 10),
            Err(BodyError::NotAnArray)
        );
        assert!(matches!(
            split_events(BodyKind::Batch, b"[{\"id\":\"a\"},", 10),
            Err(BodyError::InvalidBatch(_))
        ));
        assert!(matches!(
            split_events(BodyKind::Either, b"[{\"id\":\"a\"}] trailing", 10),
            Err(BodyError::InvalidBatch(_))
        ));
    }

    #[test]
    fn a_batch_over_the_limit_is_refused_with_its_size() {
        assert_eq!(
            split_events(BodyKind::Batch, b"[1,2,3]", 2),
            Err(BodyError::TooManyEvents { count: 3, max: 2 })
        );
        assert!(split_events(BodyKind::Batch, b"[1,2]", 2).is_ok());
    }

    #[test]
    fn identity_reads_source_and_id_strings_unescaped() {
        let event = br#"{"id":"evt-\u0031","data":{"source":"inner"},"source":"a\/b"}"#;
        let identity = identity(event);
        assert_eq!(identity.source.as_deref(), Some("a/b"));
        assert_eq!(identity.id.as_deref(), Some("evt-1"));
    }

    #[test]
    fn identity_is_partial_or_empty_for_events_the_decoder_will_reject() {
        let numeric_id = identity(br#"{"id":7,"source":"s"}"#);
        assert_eq!(numeric_id.source.as_deref(), Some("s"));
        assert_eq!(numeric_id.id, None);
        assert_eq!(identity(b"[1]"), Identity::default());
        assert_eq!(identity(b"not json"), Identity::default());
        assert_eq!(
            identity(br#"{"source":"a","source":"b"}"#),
            Identity::default()
        );
    }
}
