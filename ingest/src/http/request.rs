//! What a `POST /v1/events` body holds: the content type says one event or a batch,
//! and a batch is cut into the raw JSON text of each element, so every event is
//! validated, and produced, as the exact bytes its sender wrote. A request in the
//! CloudEvents HTTP binding's binary mode (attributes in `ce-` headers, the data as the
//! body, as the CloudEvents SDKs send by default) is turned into the one structured
//! event it stands for, which then goes the same way.
//!
//! Pure functions, no I/O: the handler calls them on the headers and body it has read.

use std::borrow::Cow;
use std::collections::BTreeMap;

use axum::http::HeaderMap;
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
    /// Binary mode: the attributes are `ce-` headers and the body is the event's data.
    Binary,
}

/// The media types accepted, for error messages.
pub const ACCEPTED_TYPES: &str =
    "application/cloudevents+json, application/cloudevents-batch+json or application/json";

/// The media types accepted for the data of a binary-mode request, for error messages.
pub const BINARY_DATA_TYPES: &str = "application/json or another +json type";

/// Whether a request is in binary mode, as the HTTP binding tells: a `ce-specversion`
/// header, and a `Content-Type` that is not one of CloudEvents' own
/// (`application/cloudevents...`, structured mode).
/// What a single event's rejection should add when the request looks like a mix-up of
/// modes: `ce-` headers beside a structured content type (not read: the body is the
/// whole event), or a JSON array sent as one event.
pub fn single_event_hint(kind: BodyKind, headers: &HeaderMap, body: &[u8]) -> Option<&'static str> {
    if kind != BodyKind::Single {
        return None;
    }
    if headers.contains_key("ce-specversion") {
        Some("the ce- headers were not read: with Content-Type application/cloudevents+json the body is the whole event; for binary mode send the data as application/json")
    } else if json_text(body).starts_with(b"[") {
        Some("the body is a JSON array: send a batch as application/cloudevents-batch+json (or application/json)")
    } else {
        None
    }
}

pub fn is_binary_mode(headers: &HeaderMap) -> bool {
    const STRUCTURED: &str = "application/cloudevents";
    let structured = (headers.get(axum::http::header::CONTENT_TYPE))
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.trim_start().get(..STRUCTURED.len()))
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(STRUCTURED));
    headers.contains_key("ce-specversion") && !structured
}

/// The kind of body a request's headers announce; `None` for a media type not
/// accepted, or a charset other than UTF-8 (JSON's only one; `utf8` and its subset
/// `us-ascii` are UTF-8 too). Other parameters are ignored; names and values are
/// case-insensitive. The CloudEvents content types mean structured mode whatever else
/// is sent; otherwise a `ce-specversion` header means binary mode, whose data Tally
/// reads as JSON: `application/json`, another `+json` type, or no `Content-Type` at all
/// (the CloudEvents SDKs send none for JSON data), and any type for no data (a body of
/// `Content-Length: 0`: Java's HTTP client sends a form type with an empty POST).
pub fn body_kind(headers: &HeaderMap) -> Option<BodyKind> {
    let binary = is_binary_mode(headers);
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .map(|v| v.to_str().ok());
    let no_data = (headers.get(axum::http::header::CONTENT_LENGTH))
        .is_some_and(|length| length.as_bytes() == b"0");
    match content_type {
        None if binary => Some(BodyKind::Binary),
        Some(_) if binary && no_data => Some(BodyKind::Binary),
        None | Some(None) => None,
        Some(Some(content_type)) => content_type_kind(content_type, binary),
    }
}

fn content_type_kind(content_type: &str, binary: bool) -> Option<BodyKind> {
    let mut parts = content_type.split(';');
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
    } else if binary {
        let json = essence.eq_ignore_ascii_case("application/json")
            || essence.len() > "+json".len()
                && essence[essence.len() - "+json".len()..].eq_ignore_ascii_case("+json");
        json.then_some(BodyKind::Binary)
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

/// Why a binary-mode request stands for no event; each is the whole request's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BinaryError {
    #[error("header {header} is sent more than once; send each attribute once")]
    RepeatedHeader { header: String },
    #[error("header {header} is not percent-encoded UTF-8: {why}")]
    UndecodableHeader { header: String, why: &'static str },
    #[error("header {header} is not an attribute of binary mode: {instead}")]
    NotAnAttribute {
        header: String,
        instead: &'static str,
    },
    #[error("the body is the event's data and must be JSON ({0}); nothing was stored")]
    DataNotJson(String),
}

impl BinaryError {
    /// The stable code of the answer's `error` field.
    pub fn code(&self) -> &'static str {
        match self {
            BinaryError::DataNotJson(_) => "invalid_data",
            _ => "invalid_header",
        }
    }
}

/// The structured event a binary-mode request stands for: a JSON object of its `ce-`
/// attributes (the header name without `ce-`, the value percent-decoded, every one a
/// string) in name order, then `datacontenttype` (the `Content-Type`) and `data` (the
/// body, as sent) when there is a body. Equal requests give equal bytes, and the
/// decoder reads the data as it would read the same event sent structured, so a
/// resend in the other mode is a duplicate, not a conflict. The attributes are
/// checked by the decoder afterwards, as any event's.
pub fn binary_event(headers: &HeaderMap, body: &[u8]) -> Result<Vec<u8>, BinaryError> {
    let mut attributes = BTreeMap::new();
    for name in headers.keys() {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let header = || name.as_str().to_owned();
        let instead = match attribute {
            "" => Some("an attribute header is ce- followed by the attribute's name"),
            "data" | "data_base64" => Some("send the data as the request body"),
            "datacontenttype" => Some("in binary mode the Content-Type header says it"),
            name if !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) =>
            {
                Some("CloudEvents attribute names are letters a to z and digits only")
            }
            _ => None,
        };
        if let Some(instead) = instead {
            return Err(BinaryError::NotAnAttribute {
                header: header(),
                instead,
            });
        }
        let mut values = headers.get_all(name).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(BinaryError::RepeatedHeader { header: header() });
        };
        let value =
            percent_decoded(value.as_bytes()).map_err(|why| BinaryError::UndecodableHeader {
                header: header(),
                why,
            })?;
        attributes.insert(attribute, value);
    }
    let data = json_text(body);
    let mut members: Vec<(&str, Cow<'_, str>)> = attributes
        .into_iter()
        .map(|(name, value)| (name, Cow::Owned(value)))
        .collect();
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if !data.is_empty() {
        serde_json::from_slice::<&RawValue>(data)
            .map_err(|e| BinaryError::DataNotJson(e.to_string()))?;
        if let Some(content_type) = content_type {
            members.push(("datacontenttype", Cow::Borrowed(content_type.trim())));
        }
    }
    let mut event = Vec::with_capacity(data.len() + 64 * (members.len() + 1));
    event.push(b'{');
    for (name, value) in &members {
        if event.len() > 1 {
            event.push(b',');
        }
        push_json_string(&mut event, name);
        event.push(b':');
        push_json_string(&mut event, value);
    }
    if !data.is_empty() {
        if event.len() > 1 {
            event.push(b',');
        }
        event.extend_from_slice(b"\"data\":");
        event.extend_from_slice(data);
    }
    event.push(b'}');
    Ok(event)
}

fn push_json_string(out: &mut Vec<u8>, text: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// A header value as the HTTP binding writes attribute values: UTF-8 with `%XX` for
/// bytes outside printable ASCII, space, `"` and `%` itself.
fn percent_decoded(value: &[u8]) -> Result<String, &'static str> {
    let mut decoded = Vec::with_capacity(value.len());
    let mut bytes = value.iter();
    while let Some(&byte) = bytes.next() {
        if byte != b'%' {
            decoded.push(byte);
            continue;
        }
        let mut hex_digit = || bytes.next().and_then(|&b| char::from(b).to_digit(16));
        match (hex_digit(), hex_digit()) {
            (Some(high), Some(low)) => decoded.push((high * 16 + low) as u8),
            _ => return Err("a % is not followed by two hexadecimal digits"),
        }
    }
    String::from_utf8(decoded).map_err(|_| "its decoded bytes are not UTF-8")
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
    let body = json_text(body);
    let first = *body.first().ok_or(BodyError::Empty)?;
    let batch = match kind {
        BodyKind::Single | BodyKind::Binary => false,
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

/// A body's JSON text: without a leading byte order mark (RFC 8259 lets a parser
/// ignore one, and `tally rate` ignores it at the start of a file) and without JSON's
/// whitespace around it (not all ASCII whitespace: `tally rate` rejects a line ending
/// in a form feed as JSON does, and ingest must judge an event as it does).
fn json_text(body: &[u8]) -> &[u8] {
    let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    let json_whitespace = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let start = body
        .iter()
        .position(|b| !json_whitespace(b))
        .unwrap_or(body.len());
    let end = body
        .iter()
        .rposition(|b| !json_whitespace(b))
        .map_or(start, |i| i + 1);
    &body[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            let name = axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
            headers.append(name, value.parse().unwrap());
        }
        headers
    }

    fn kind(content_type: Option<&str>) -> Option<BodyKind> {
        let content_type: Vec<_> = content_type
            .map(|c| ("content-type", c))
            .into_iter()
            .collect();
        body_kind(&headers(&content_type))
    }

    fn binary_kind(content_type: Option<&str>) -> Option<BodyKind> {
        let mut pairs = vec![("ce-specversion", "1.0")];
        pairs.extend(content_type.map(|c| ("content-type", c)));
        body_kind(&headers(&pairs))
    }

    #[test]
    fn content_types_select_single_batch_or_either() {
        assert_eq!(
            kind(Some("application/cloudevents+json")),
            Some(BodyKind::Single)
        );
        assert_eq!(
            kind(Some("Application/CloudEvents-Batch+JSON; charset=utf-8")),
            Some(BodyKind::Batch)
        );
        assert_eq!(
            kind(Some(" application/json ;charset=UTF-8")),
            Some(BodyKind::Either)
        );
        for utf8 in [
            "application/json; charset=\"utf-8\"; profile=x",
            "application/json; charset=utf8",
            "application/json; charset=US-ASCII",
        ] {
            assert_eq!(kind(Some(utf8)), Some(BodyKind::Either), "{utf8}");
        }
        for other in [
            None,
            Some(""),
            Some("text/plain"),
            Some("application/x-ndjson"),
            Some("application/jsonl"),
            Some("application/vnd.api+json"),
            Some("multipart/form-data; boundary=x"),
            Some("application/json; charset=utf-16"),
            Some("application/cloudevents+json; charset=\"ISO-8859-1\""),
        ] {
            assert_eq!(kind(other), None, "{other:?}");
        }
    }

    #[test]
    fn a_ce_specversion_header_makes_a_json_or_empty_body_binary_mode() {
        for data_type in [
            None,
            Some("application/json"),
            Some("Application/JSON; charset=utf-8"),
            Some("application/vnd.usage+json"),
        ] {
            assert_eq!(
                binary_kind(data_type),
                Some(BodyKind::Binary),
                "{data_type:?}"
            );
        }
        // The CloudEvents media types are structured mode, headers or not; one Tally
        // does not read is refused as such, not as binary-mode data.
        assert_eq!(
            binary_kind(Some("application/cloudevents+json")),
            Some(BodyKind::Single)
        );
        assert_eq!(
            binary_kind(Some("application/cloudevents-batch+json")),
            Some(BodyKind::Batch)
        );
        let xml = headers(&[
            ("ce-specversion", "1.0"),
            ("content-type", "application/cloudevents+xml"),
        ]);
        assert!(!is_binary_mode(&xml));
        assert_eq!(body_kind(&xml), None);
        // Tally's meters read JSON data; other data, or other charsets, are refused.
        for other in [
            "text/plain",
            "application/octet-stream",
            "+json",
            "application/json; charset=utf-16",
        ] {
            assert_eq!(binary_kind(Some(other)), None, "{other}");
        }
        // Unless there is no data: its type says nothing then.
        let empty_form = headers(&[
            ("ce-specversion", "1.0"),
            ("content-type", "application/x-www-form-urlencoded"),
            ("content-length", "0"),
        ]);
        assert_eq!(body_kind(&empty_form), Some(BodyKind::Binary));
    }

    fn binary(pairs: &[(&'static str, &str)], body: &str) -> Result<String, BinaryError> {
        binary_event(&headers(pairs), body.as_bytes()).map(|e| String::from_utf8(e).unwrap())
    }

    const ATTRIBUTES: [(&str, &str); 7] = [
        ("ce-specversion", "1.0"),
        ("ce-type", "llm.tokens"),
        ("ce-source", "agent"),
        ("ce-id", "evt-1"),
        ("ce-subject", "cust_acme"),
        ("ce-time", "2026-11-24T10:15:00Z"),
        ("authorization", "Bearer k"),
    ];

    #[test]
    fn a_binary_mode_request_becomes_its_structured_event() {
        let mut pairs = ATTRIBUTES.to_vec();
        pairs.extend([
            ("content-type", "application/json; charset=utf-8 "),
            ("ce-traceparent", "00-0af7-b7ad-01"),
            ("CE-Region", "eu%20west %221%22 caf%C3%A9 100%25"),
        ]);
        let event = binary(&pairs, " {\"tokens\": 1200, \"model\": \"gpt-x\"}\n").unwrap();
        assert_eq!(
            event,
            r#"{"id":"evt-1","region":"eu west \"1\" café 100%","source":"agent","specversion":"1.0","subject":"cust_acme","time":"2026-11-24T10:15:00Z","traceparent":"00-0af7-b7ad-01","type":"llm.tokens","datacontenttype":"application/json; charset=utf-8","data":{"tokens": 1200, "model": "gpt-x"}}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&event).unwrap();
        assert_eq!(parsed["data"]["tokens"], 1200);
        // A request without a body is an event without data.
        let event = binary(&ATTRIBUTES[..6], "  ").unwrap();
        assert!(event.ends_with(r#""type":"llm.tokens"}"#), "{event}");
        assert!(!event.contains("data"), "{event}");
    }

    #[test]
    fn a_binary_mode_event_decodes_as_its_structured_resend() {
        let config = tally_schemas::config::Config::parse(
            "[[meters]]\nslug = \"tokens\"\nevent_type = \"llm.tokens\"\naggregation = \"sum\"\nvalue_property = \"$.tokens\"\ngroup_by = { model = \"$.model\" }\n",
            "test.toml",
        )
        .unwrap();
        let decoder = tally_schemas::event::EventDecoder::new(&config, chrono::Utc::now());
        let mut pairs = ATTRIBUTES.to_vec();
        pairs.push(("content-type", "application/json"));
        let from_headers = binary(&pairs, "{\"tokens\": 1200, \"model\": \"gpt-x\"}").unwrap();
        let structured = r#"{"specversion":"1.0","id":"evt-1","source":"agent","type":"llm.tokens","subject":"cust_acme","time":"2026-11-24T10:15:00Z","data":{"tokens":1200,"model":"gpt-x"}}"#;
        let from_headers = decoder.decode(from_headers.as_bytes()).unwrap();
        let structured = decoder.decode(structured.as_bytes()).unwrap();
        assert_eq!(from_headers, structured);
    }

    #[test]
    fn binary_mode_requests_that_stand_for_no_event_say_which_header_or_body() {
        let with = |extra: (&'static str, &'static str), body: &str| {
            let mut pairs = ATTRIBUTES.to_vec();
            pairs.push(extra);
            binary(&pairs, body).unwrap_err()
        };
        let error = with(("ce-id", "evt-2"), "");
        assert_eq!(
            error,
            BinaryError::RepeatedHeader {
                header: "ce-id".into()
            }
        );
        assert_eq!(error.code(), "invalid_header");
        for (value, why) in [
            ("50%", "a % is not followed by two hexadecimal digits"),
            ("%zz", "a % is not followed by two hexadecimal digits"),
            ("%C3", "its decoded bytes are not UTF-8"),
        ] {
            assert_eq!(
                with(("ce-region", value), ""),
                BinaryError::UndecodableHeader {
                    header: "ce-region".into(),
                    why
                },
                "{value}"
            );
        }
        for header in [
            "ce-data",
            "ce-data_base64",
            "ce-datacontenttype",
            "ce-",
            "ce-trace-id",
            "ce-trace_id",
        ] {
            assert!(
                matches!(
                    with((header, "x"), ""),
                    BinaryError::NotAnAttribute { header: h, .. } if h == header
                ),
                "{header}"
            );
        }
        let error = with(("content-type", "application/json"), "{\"tokens\": 12");
        assert!(matches!(error, BinaryError::DataNotJson(_)), "{error:?}");
        assert_eq!(error.code(), "invalid_data");
        assert!(
            error
                .to_string()
                .starts_with("the body is the event's data and must be JSON (EOF"),
            "{error}"
        );
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
    fn a_body_is_read_as_tally_rate_reads_a_file_a_byte_order_mark_and_json_whitespace_aside() {
        let marked = split_events(BodyKind::Either, b"\xef\xbb\xbf[{\"id\":\"a\"}]\r\n", 10);
        assert_eq!(
            marked.unwrap(),
            Events::Batch(vec![b"{\"id\":\"a\"}".as_slice()])
        );
        // A form feed is ASCII whitespace but not JSON's: kept, for the decoder to
        // reject, as it rejects a line of a file ending in one.
        let fed = split_events(BodyKind::Single, b"\t{\"id\":\"a\"}\x0c", 10);
        assert_eq!(fed.unwrap(), Events::Single(b"{\"id\":\"a\"}\x0c"));
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
}
