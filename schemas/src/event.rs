//! Usage events: one CloudEvents 1.0 JSON object per line, decoded for the meters.
//!
//! In: the bytes of one line and the validated configuration. Out: a [`DecodedEvent`]
//! (its `(source, id)` key, a payload fingerprint, UTC event time, customer, and one
//! [`Reading`] per meter that reads its `type`), or an [`EventError`] naming the field
//! and the reason. Numbers are read from their JSON text as exact decimals: `5.001`
//! never passes through f64. Strings are borrowed from the line where they need no
//! unescaping, so decoding allocates little. [`identity`] reads an event's `source`
//! and `id` as text, which the decoder keeps only as a fingerprint.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, Datelike, Utc};
use rust_decimal::Decimal;
use smallvec::SmallVec;

use crate::config::{Aggregation, Config, JsonPath, MeterId};
use crate::ids::{EventKey, Fingerprinter, PayloadFingerprint, SeriesFingerprint};
use crate::{decimal, json};

/// An event that passed validation, with what each meter reads from it.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEvent<'a> {
    /// Identity for dedupe: fingerprint of `(source, id)`.
    pub key: EventKey,
    /// Fingerprint of type, subject, time and data, to tell a conflicting retry.
    pub payload: PayloadFingerprint,
    /// Event time, normalised to UTC.
    pub time: DateTime<Utc>,
    /// The customer (CloudEvents `subject`).
    pub subject: Cow<'a, str>,
    /// Whether the subject is a customer of the configuration (usage of others is
    /// reported, not billed). Decided here, on the decoding threads, once per event.
    pub subscribed: bool,
    /// CloudEvents `type`.
    pub event_type: Cow<'a, str>,
    /// One per meter of this type; empty when no meter reads the type.
    pub readings: Readings<'a>,
}

impl DecodedEvent<'_> {
    /// Detaches the event from the line it was read from.
    pub fn into_owned(self) -> DecodedEvent<'static> {
        DecodedEvent {
            key: self.key,
            payload: self.payload,
            time: self.time,
            subject: Cow::Owned(self.subject.into_owned()),
            subscribed: self.subscribed,
            event_type: Cow::Owned(self.event_type.into_owned()),
            readings: self.readings.into_iter().map(Reading::into_owned).collect(),
        }
    }
}

/// An event's readings, inline for the usual single meter: decoding millions of events
/// should not allocate for each, and a small event is cheap to hand on.
pub type Readings<'a> = SmallVec<[Reading<'a>; 1]>;

/// A reading's group_by values, inline for the usual single dimension.
pub type GroupValues<'a> = SmallVec<[Cow<'a, str>; 1]>;

/// What one meter reads from one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading<'a> {
    pub meter: MeterId,
    /// The series this reading counts towards (customer, meter, group values).
    pub series: SeriesFingerprint,
    /// Values of the meter's group_by dimensions, in the meter's order; a missing or
    /// null value is the empty string.
    pub group: GroupValues<'a>,
    pub value: ReadingValue,
}

impl Reading<'_> {
    fn into_owned(self) -> Reading<'static> {
        Reading {
            meter: self.meter,
            series: self.series,
            group: self
                .group
                .into_iter()
                .map(|g| Cow::Owned(g.into_owned()))
                .collect(),
            value: self.value,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadingValue {
    /// A count meter: the event itself is the unit.
    Event,
    /// An exact number, for sum, max and latest; negative only for a sum meter that
    /// allows corrections.
    Number(Decimal),
    /// A fingerprint of a distinct value, for unique_count.
    Distinct(u64),
}

/// Why an event line was rejected: the field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct EventError {
    /// `time`, `data.tokens`, ... or `event` when the line as a whole is wrong.
    pub field: String,
    pub problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    InvalidUtf8 {
        valid_up_to: usize,
    },
    InvalidJson(String),
    NotAnObject,
    DuplicateField,
    Missing,
    /// Missing, and the event has a member of its name in other case (`"Subject"`).
    MissingButCased(String),
    WrongType {
        expected: &'static str,
        found: &'static str,
    },
    Empty,
    /// A character the CloudEvents spec forbids in an attribute, refused in a group
    /// value too.
    ForbiddenCharacter(char),
    /// A group value longer than [`MAX_GROUP_VALUE_CHARS`].
    TooLong {
        chars: usize,
    },
    /// A subject longer than [`MAX_SUBJECT_CHARS`].
    SubjectTooLong {
        chars: usize,
    },
    /// A meter reads `data`, and the event has `data_base64` in its place.
    Base64Data,
    UnsupportedSpecVersion(String),
    InvalidTime(String),
    InFuture {
        skew: std::time::Duration,
    },
    NotANumber,
    Negative,
    TooLarge,
    TooPrecise,
    NotAScalar,
    /// Before [`crate::time::FIRST_YEAR`].
    BeforeFirstYear,
    /// Valid, but refused by the aggregator (its sum could not be held exactly, say):
    /// the aggregator's reason.
    Refused(String),
    /// Valid, but its `(source, id)` was already counted with other content: dropped
    /// (the aggregator's verdict, kept where rejects are so it can be traced).
    Conflict,
    /// Larger than one Kafka message may be (ingest's check, not the decoder's).
    TooLargeForKafka {
        bytes: usize,
        limit: usize,
    },
}

/// What a sender of a conflicting event (its `(source, id)` counted with other content)
/// can do, wherever the conflict is found.
pub const RESEND_ADVICE: &str = "the first one counts: a resend cannot change it (send the difference as a new event, with a new id; a negative difference needs a sum meter with allow_negative_values = true)";

impl Problem {
    /// A short stable name, for counting rejects by reason (a bounded metric label).
    pub fn code(&self) -> &'static str {
        match self {
            Problem::InvalidUtf8 { .. } => "invalid_utf8",
            Problem::InvalidJson(_) => "invalid_json",
            Problem::NotAnObject => "not_an_object",
            Problem::DuplicateField => "duplicate_field",
            Problem::Missing | Problem::MissingButCased(_) => "missing_field",
            Problem::WrongType { .. } => "wrong_type",
            Problem::Empty => "empty_field",
            Problem::ForbiddenCharacter(_) => "forbidden_character",
            Problem::TooLong { .. } | Problem::SubjectTooLong { .. } => "too_long",
            Problem::Base64Data => "base64_data",
            Problem::UnsupportedSpecVersion(_) => "unsupported_specversion",
            Problem::InvalidTime(_) => "invalid_time",
            Problem::InFuture { .. } => "time_in_future",
            Problem::NotANumber => "not_a_number",
            Problem::Negative => "negative_value",
            Problem::TooLarge => "too_large",
            Problem::TooPrecise => "too_precise",
            Problem::NotAScalar => "not_a_scalar",
            Problem::BeforeFirstYear => "time_before_1970",
            Problem::Refused(_) => "refused",
            Problem::Conflict => "conflict",
            Problem::TooLargeForKafka { .. } => "event_too_large",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::InvalidUtf8 { valid_up_to } => {
                write!(
                    f,
                    "line is not valid UTF-8 (first bad byte at offset {valid_up_to})"
                )
            }
            Problem::InvalidJson(e) => write!(f, "invalid JSON: {e}"),
            Problem::NotAnObject => f.write_str("expected a CloudEvent JSON object"),
            Problem::DuplicateField => {
                f.write_str("field appears twice; which one counts would be a guess")
            }
            Problem::Missing => f.write_str("required field is missing or null"),
            Problem::MissingButCased(found) => write!(
                f,
                "required field is missing or null; the event has {found:?}, and CloudEvents attribute names are lower case"
            ),
            Problem::WrongType { expected, found } => {
                write!(f, "expected {expected}, found {found}")
            }
            Problem::Empty => f.write_str("must not be empty or only whitespace"),
            Problem::Base64Data => f.write_str(
                "a meter reads data, which came as data_base64 and is not decoded: send the usage as JSON in data (the CloudEvents SDKs do so for an object, not for bytes)",
            ),
            Problem::ForbiddenCharacter(c) => write!(
                f,
                "contains U+{:04X}; CloudEvents attributes may not hold control characters or noncharacters, nor may group_by values, which also may not hold line separators or bidirectional overrides (they reach invoices, logs and terminals)",
                u32::from(*c)
            ),
            Problem::TooLong { chars } => write!(
                f,
                "is {chars} characters long; a group_by value is at most {MAX_GROUP_VALUE_CHARS} (a model, a region, an id: each distinct value is a series held for the month, and shown on invoice lines)"
            ),
            Problem::SubjectTooLong { chars } => write!(
                f,
                "is {chars} characters long; a subject is at most {MAX_SUBJECT_CHARS}: it is the customer's id, and each distinct subject is held, with its usage, for the month"
            ),
            Problem::UnsupportedSpecVersion(v) => {
                write!(f, "specversion {v:?} is not supported; send \"1.0\"")
            }
            Problem::InvalidTime(e) => {
                write!(
                    f,
                    "not an RFC 3339 timestamp such as 2026-11-24T10:15:00Z ({e})"
                )
            }
            Problem::InFuture { skew } => write!(
                f,
                "event time is more than {} ahead of the clock; fix the sender's clock",
                humantime::format_duration(*skew)
            ),
            Problem::NotANumber => f.write_str("expected a number (or a numeric string)"),
            Problem::Negative => f.write_str("usage must not be negative (only a sum meter with allow_negative_values = true takes corrections)"),
            Problem::TooLarge => write!(
                f,
                "usage values must be below 10^18 (a larger one is a unit error, and would put exact totals at risk)"
            ),
            Problem::TooPrecise => {
                f.write_str("number cannot be held exactly: a value has at most 28 significant digits (29 when they stay below about 7.9e28 read as an integer), and at most 28 of them after the decimal point")
            }
            Problem::NotAScalar => f.write_str("expected a string, number or boolean"),
            Problem::BeforeFirstYear => write!(
                f,
                "event time is before {}-01-01T00:00:00Z; is the sender's timestamp unset (a zero time such as 0001-01-01)?",
                crate::time::FIRST_YEAR
            ),
            Problem::Refused(reason) => f.write_str(reason),
            Problem::Conflict => write!(
                f,
                "an event with this source and id but different content was already counted; {RESEND_ADVICE}"
            ),
            Problem::TooLargeForKafka { bytes, limit } => write!(
                f,
                "the event is {bytes} bytes with its subject, and a Kafka message may hold at most {limit} (librdkafka's message.max.bytes less the record's framing); send less in data"
            ),
        }
    }
}

/// Why a time is not RFC 3339, in words a sender can act on: chrono's own are a
/// parser's ("premature end of input" for a time without a zone, or for any word).
fn time_problem(text: &str, error: chrono::ParseError) -> String {
    let local = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .any(|format| chrono::NaiveDateTime::parse_from_str(text, format).is_ok());
    // `+0100`, as strftime's %z and Java's Z write it.
    let colonless = chrono::DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z").is_ok();
    if local {
        "it has no time zone: end it with Z for UTC or an offset such as +01:00".into()
    } else if colonless {
        "its offset has no colon: RFC 3339 writes +01:00, not +0100".into()
    } else {
        use chrono::format::ParseErrorKind as Kind;
        let starts_with_year = text.len() >= 5
            && text.as_bytes()[..4].iter().all(u8::is_ascii_digit)
            && text.as_bytes()[4] == b'-';
        match error.kind() {
            // By its shape: an impossible date (2026-02-30) is still a date alone.
            _ if text.len() == 10
                && (text.bytes().enumerate()).all(|(i, b)| {
                    if i == 4 || i == 7 {
                        b == b'-'
                    } else {
                        b.is_ascii_digit()
                    }
                }) =>
            {
                "it is a date without a time: write e.g. 2026-11-24T00:00:00Z".into()
            }
            _ if !starts_with_year => "it does not start with a date, YYYY-MM-DD".into(),
            Kind::TooShort => "it ends before the timestamp does".into(),
            Kind::OutOfRange | Kind::Impossible | Kind::NotEnough => {
                "a part of it is out of range, such as a month 13 or a 31 November".into()
            }
            Kind::TooLong => "something follows the timestamp".into(),
            _ => "a character is not where RFC 3339 puts one".into(),
        }
    }
}

fn error(field: impl Into<String>, problem: Problem) -> EventError {
    EventError {
        field: field.into(),
        problem,
    }
}

/// Decodes lines against one configuration and one notion of "now".
#[derive(Debug, Clone, Copy)]
pub struct EventDecoder<'c> {
    config: &'c Config,
    latest_allowed: DateTime<Utc>,
}

impl<'c> EventDecoder<'c> {
    /// `now` is the caller's clock; events later than `now + max_future_skew` are rejected.
    pub fn new(config: &'c Config, now: DateTime<Utc>) -> Self {
        let skew = chrono::Duration::from_std(config.settings.max_future_skew)
            .unwrap_or(chrono::Duration::MAX);
        EventDecoder {
            config,
            latest_allowed: now
                .checked_add_signed(skew)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }

    /// Decodes one line (without its newline).
    pub fn decode<'a>(&self, line: &'a [u8]) -> Result<DecodedEvent<'a>, EventError> {
        self.decode_with_identity(line).map(|(event, _)| event)
    }

    /// [`Self::decode`], with the event's `source` and `id` as text, read once: ingest
    /// checks the source against the sender's key and answers with the id.
    pub fn decode_with_identity<'a>(
        &self,
        line: &'a [u8],
    ) -> Result<(DecodedEvent<'a>, Identity<'a>), EventError> {
        let text = std::str::from_utf8(line).map_err(|e| {
            error(
                "event",
                Problem::InvalidUtf8 {
                    valid_up_to: e.valid_up_to(),
                },
            )
        })?;
        let mut envelope = Envelope::default();
        match json::parse(text, |key, value| envelope.set(key, value)) {
            Ok(true) => {}
            Ok(false) => return Err(error("event", Problem::NotAnObject)),
            Err(e) => return Err(error("event", Problem::InvalidJson(e.to_string()))),
        }
        if let Some(problem) = envelope.problem {
            return Err(problem);
        }
        let required = |raw, field| required_string(raw, field).map_err(|e| envelope.hinted(e));
        let specversion = required(envelope.specversion, "specversion")?;
        if specversion != "1.0" {
            return Err(error(
                "specversion",
                Problem::UnsupportedSpecVersion(specversion.into_owned()),
            ));
        }
        let id = required(envelope.id, "id")?;
        let source = required(envelope.source, "source")?;
        let event_type = required(envelope.event_type, "type")?;
        let subject = required(envelope.subject, "subject")?;
        if let Some(chars) = chars_over(&subject, MAX_SUBJECT_CHARS) {
            return Err(error("subject", Problem::SubjectTooLong { chars }));
        }
        let time_text = required(envelope.time, "time")?;
        let time = match crate::time::parse_utc_fast(&time_text) {
            Some(time) => time,
            None => DateTime::parse_from_rfc3339(&time_text)
                .map_err(|e| error("time", Problem::InvalidTime(time_problem(&time_text, e))))?
                .with_timezone(&Utc),
        };
        if time.year() < crate::time::FIRST_YEAR {
            return Err(error("time", Problem::BeforeFirstYear));
        }
        if time > self.latest_allowed {
            return Err(error(
                "time",
                Problem::InFuture {
                    skew: self.config.settings.max_future_skew,
                },
            ));
        }
        let data = envelope.data.filter(|d| *d != "null");
        let readings = self.readings(&subject, &event_type, data, envelope.data_base64)?;
        let payload = payload_fingerprint(&event_type, &subject, time, data);
        let event = DecodedEvent {
            subscribed: self.config.is_customer(&subject),
            key: EventKey::new(&source, &id),
            payload,
            time,
            subject,
            event_type,
            readings,
        };
        let identity = Identity {
            source: Some(source),
            id: Some(id),
        };
        Ok((event, identity))
    }

    /// What the meters of `event_type` read of the event. `data` is read only when one
    /// of them reads a value or a group from it: a count meter's event may carry any
    /// data, or data_base64 (`base64`).
    fn readings<'a>(
        &self,
        subject: &str,
        event_type: &str,
        data: Option<&'a str>,
        base64: bool,
    ) -> Result<Readings<'a>, EventError> {
        let meters = self.config.meters_for(event_type);
        let mut readings = Readings::new();
        let reads_data = meters.iter().any(|&id| {
            let meter = self.config.meter(id);
            !meter.group_by.is_empty() || !matches!(meter.aggregation, Aggregation::Count)
        });
        let members = match data {
            Some(d) if reads_data => Some(object_members(d, || "data".to_owned())?),
            None if reads_data && base64 => return Err(error("data_base64", Problem::Base64Data)),
            _ => None,
        };
        for &meter_id in meters {
            let meter = self.config.meter(meter_id);
            let mut group = GroupValues::new();
            for (_, path) in &meter.group_by {
                group.push(match lookup(members.as_ref(), path)? {
                    Some(raw) => group_value(raw, path)?,
                    None => Cow::Borrowed(""),
                });
            }
            let required = |p: &JsonPath| {
                lookup(members.as_ref(), p)?.ok_or_else(|| error(p.field_name(), Problem::Missing))
            };
            let value = match &meter.aggregation {
                Aggregation::Count => ReadingValue::Event,
                Aggregation::Sum {
                    value: p,
                    negative_allowed,
                } => ReadingValue::Number(number(required(p)?, p, *negative_allowed)?),
                Aggregation::Max(p) | Aggregation::Latest(p) => {
                    ReadingValue::Number(number(required(p)?, p, false)?)
                }
                Aggregation::UniqueCount(p) => ReadingValue::Distinct(distinct(required(p)?, p)?),
            };
            readings.push(Reading {
                meter: meter_id,
                series: SeriesFingerprint::new(subject, &meter.slug, &group),
                group,
                value,
            });
        }
        Ok(readings)
    }
}

/// The CloudEvents attributes Tally reads, each kept as its JSON text until it is
/// checked, so a wrong type is reported with the field's name. Other attributes
/// (extensions, `datacontenttype`, ...) are accepted and ignored.
#[derive(Default)]
struct Envelope<'a> {
    specversion: Option<&'a str>,
    id: Option<&'a str>,
    source: Option<&'a str>,
    event_type: Option<&'a str>,
    subject: Option<&'a str>,
    time: Option<&'a str>,
    data: Option<&'a str>,
    /// Whether the event has `data_base64`, which is not read.
    data_base64: bool,
    /// Members named as an attribute but for case (`"Subject"`), with that attribute,
    /// for the hint when it is missing.
    miscased: Vec<(&'static str, String)>,
    /// The first problem met while collecting: a field given twice, or a key that
    /// cannot be unescaped.
    problem: Option<EventError>,
}

/// The attributes an event's members are matched to, by their exact names.
const ATTRIBUTES: [&str; 6] = ["specversion", "id", "source", "type", "subject", "time"];

impl<'a> Envelope<'a> {
    /// `error`, with the hint that a missing attribute is there in other case.
    fn hinted(&self, mut error: EventError) -> EventError {
        if error.problem == Problem::Missing {
            let found = self.miscased.iter().find(|(name, _)| error.field == *name);
            if let Some((_, found)) = found {
                error.problem = Problem::MissingButCased(found.clone());
            }
        }
        error
    }

    /// Takes one member of the event object (key text still quoted and escaped).
    fn set(&mut self, key_text: &'a str, value: &'a str) {
        let key = match json::string_contents(key_text) {
            Ok(key) => key.unwrap_or_default(),
            Err(e) => {
                self.problem
                    .get_or_insert_with(|| error("event", Problem::InvalidJson(e.what.to_owned())));
                return;
            }
        };
        let (slot, name) = match key.as_ref() {
            "specversion" => (&mut self.specversion, "specversion"),
            "id" => (&mut self.id, "id"),
            "source" => (&mut self.source, "source"),
            "type" => (&mut self.event_type, "type"),
            "subject" => (&mut self.subject, "subject"),
            "time" => (&mut self.time, "time"),
            "data" => (&mut self.data, "data"),
            "data_base64" => {
                self.data_base64 = true;
                return;
            }
            other => {
                let attribute = ATTRIBUTES
                    .iter()
                    .find(|name| name.eq_ignore_ascii_case(other));
                if let Some(attribute) = attribute {
                    self.miscased.push((attribute, other.to_owned()));
                }
                return;
            }
        };
        if slot.replace(value).is_some() {
            self.problem
                .get_or_insert_with(|| error(name, Problem::DuplicateField));
        }
    }
}

/// The members of an object-valued field, refusing a key given twice. `field` names it,
/// called only on failure: naming a nested field allocates.
fn object_members<'a>(
    raw: &'a str,
    field: impl Fn() -> String,
) -> Result<json::Members<'a>, EventError> {
    if !raw.starts_with('{') {
        // A serializer run twice writes an object as the JSON text of one.
        let encoded = raw
            .strip_prefix('"')
            .is_some_and(|s| s.trim_start().starts_with('{'));
        let expected = match encoded {
            true => "an object (send it as a JSON object, not as JSON text in a string)",
            false => "an object",
        };
        return Err(error(
            field(),
            Problem::WrongType {
                expected,
                found: json_kind(raw),
            },
        ));
    }
    let members =
        json::members(raw).map_err(|e| error(field(), Problem::InvalidJson(e.to_string())))?;
    if let Some(key) = first_repeated_key(&members) {
        return Err(error(format!("{}.{key}", field()), Problem::DuplicateField));
    }
    Ok(members)
}

/// The first key an earlier member has too. A sender chooses how many members an
/// object has, so past a few the check hashes instead of comparing each pair: an
/// object of 85,000 members took seconds of CPU per event in ingest, the aggregator
/// and `tally rate`.
fn first_repeated_key<'m>(members: &'m json::Members<'_>) -> Option<&'m str> {
    const COMPARED_PAIRWISE: usize = 16;
    let repeated = if members.len() <= COMPARED_PAIRWISE {
        let mut earlier = members.iter().enumerate();
        earlier
            .find(|(i, (key, _))| members[..*i].iter().any(|(k, _)| k == key))
            .map(|(_, member)| member)
    } else {
        let mut seen = std::collections::HashSet::with_capacity(members.len());
        members.iter().find(|(key, _)| !seen.insert(key))
    };
    repeated.map(|(key, _)| key.as_ref())
}

/// Follows a path through `data`; `Ok(None)` when a key is absent or null on the way.
fn lookup<'a>(
    data: Option<&json::Members<'a>>,
    path: &JsonPath,
) -> Result<Option<&'a str>, EventError> {
    let Some(data) = data else { return Ok(None) };
    let get = |members: &json::Members<'a>, key: &str| {
        members.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    };
    let segments = path.segments();
    let mut current = match get(data, &segments[0]) {
        Some(v) => v,
        None => return Ok(None),
    };
    for (depth, key) in segments.iter().enumerate().skip(1) {
        if current == "null" {
            return Ok(None);
        }
        let field = || format!("data.{}", segments[..depth].join("."));
        match get(&object_members(current, field)?, key) {
            Some(v) => current = v,
            None => return Ok(None),
        }
    }
    Ok((current != "null").then_some(current))
}

fn json_kind(raw: &str) -> &'static str {
    match raw.as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// A string value's contents; `Ok(None)` when the value is not a string. `field` is
/// called only on failure: naming a nested field allocates.
fn string_at<'a>(
    raw: &'a str,
    field: impl FnOnce() -> String,
) -> Result<Option<Cow<'a, str>>, EventError> {
    json::string_contents(raw).map_err(|e| error(field(), Problem::InvalidJson(e.what.to_owned())))
}

fn required_string<'a>(raw: Option<&'a str>, field: &str) -> Result<Cow<'a, str>, EventError> {
    let raw = raw
        .filter(|r| *r != "null")
        .ok_or_else(|| error(field, Problem::Missing))?;
    let s = string_at(raw, || field.to_owned())?.ok_or_else(|| {
        error(
            field,
            Problem::WrongType {
                expected: "a string",
                found: json_kind(raw),
            },
        )
    })?;
    if s.bytes().all(|b| b.is_ascii_whitespace()) {
        return Err(error(field, Problem::Empty));
    }
    if let Some(c) = forbidden_character(&s) {
        return Err(error(field, Problem::ForbiddenCharacter(c)));
    }
    Ok(s)
}

/// The first character of an attribute that the CloudEvents spec forbids in strings.
fn forbidden_character(s: &str) -> Option<char> {
    first_refused(s, forbidden_in_attribute)
}

/// Whether the CloudEvents spec forbids `c` in a string attribute: a control character
/// (U+0000 to U+001F, U+007F to U+009F), which would also end a log line or break a
/// header, or a noncharacter.
fn forbidden_in_attribute(c: char) -> bool {
    let code = u32::from(c);
    c.is_control() || (0xFDD0..=0xFDEF).contains(&code) || code & 0xFFFE == 0xFFFE
}

/// Whether `c` breaks a line or reorders what follows it where text is shown (U+2028
/// and U+2029, bidirectional overrides and isolates), which a terminal, a log viewer or
/// an invoice would do with a sender's text.
pub fn reorders_text(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// The first character of `s` that `refused` refuses, which printable ASCII never is:
/// most strings are checked by their bytes alone.
fn first_refused(s: &str, refused: impl Fn(char) -> bool) -> Option<char> {
    if s.bytes().all(|b| (b' '..b'\x7f').contains(&b)) {
        return None;
    }
    s.chars().find(|&c| refused(c))
}

/// An exact decimal from text in JSON number syntax; `None` when it is not a number.
fn parse_number(text: &str) -> Option<Result<Decimal, Problem>> {
    if !json::is_number(text) {
        return None;
    }
    // Valid JSON numbers fail only by not fitting: past the largest decimal (a usage
    // value far past its bound), or needing more digits than 28.
    Some(decimal::parse_exact(text).map_err(|e| match e {
        decimal::DecimalError::TooLarge => Problem::TooLarge,
        _ => Problem::TooPrecise,
    }))
}

/// Usage values stay below this, so totals of even billions of events stay far inside
/// the 28 digits an exact decimal holds.
const MAX_VALUE: Decimal = Decimal::from_parts(0xA764_0000, 0x0DE0_B6B3, 0, false, 0);

/// An exact number from a JSON number or a numeric string; negative only where
/// `negative_allowed`.
fn number(raw: &str, path: &JsonPath, negative_allowed: bool) -> Result<Decimal, EventError> {
    let field = || path.field_name();
    let text: Cow<str> = match string_at(raw, field)? {
        Some(Cow::Borrowed(s)) => Cow::Borrowed(s.trim()),
        Some(Cow::Owned(s)) => Cow::Owned(s.trim().to_owned()),
        None => Cow::Borrowed(raw),
    };
    let value = parse_number(&text)
        .ok_or_else(|| error(field(), Problem::NotANumber))?
        .map_err(|p| error(field(), p))?;
    if value.is_sign_negative() && !value.is_zero() && !negative_allowed {
        return Err(error(field(), Problem::Negative));
    }
    if value.abs() >= MAX_VALUE {
        return Err(error(field(), Problem::TooLarge));
    }
    Ok(value)
}

/// A fingerprint of a value counted by unique_count. Numbers are normalised (`1` and
/// `1.0` are one value, and equal to the string `"1"`); strings are compared exactly.
fn distinct(raw: &str, path: &JsonPath) -> Result<u64, EventError> {
    let fp = |tag: &[u8], bytes: &[u8]| {
        Fingerprinter::new(b"distinct")
            .part(tag)
            .part(bytes)
            .finish() as u64
    };
    if let Some(s) = string_at(raw, || path.field_name())? {
        return Ok(fp(b"s", s.as_bytes()));
    }
    match parse_number(raw) {
        Some(Ok(n)) => Ok(fp(b"s", n.normalize().to_string().as_bytes())),
        Some(Err(p)) => Err(error(path.field_name(), p)),
        None => Err(error(
            path.field_name(),
            Problem::WrongType {
                expected: "a string or number",
                found: json_kind(raw),
            },
        )),
    }
}

/// The longest group_by value, in characters: a sender's payload read as a dimension
/// would otherwise be held, as a series of its own, for the month.
pub const MAX_GROUP_VALUE_CHARS: usize = 256;

/// The longest subject, in characters, and so the longest customer id: as for group
/// values, a payload or a token sent as the subject would be held for the month (an
/// unknown customer's usage is kept, in case the customer is added while it is open).
pub const MAX_SUBJECT_CHARS: usize = 256;

/// How many characters `s` has, where that is more than `limit`.
fn chars_over(s: &str, limit: usize) -> Option<usize> {
    // Bytes bound characters: most texts are checked without counting.
    if s.len() <= limit {
        return None;
    }
    Some(s.chars().count()).filter(|chars| *chars > limit)
}

/// A group_by value as text: strings as they are (without control characters,
/// noncharacters, line separators or bidirectional overrides, at most
/// [`MAX_GROUP_VALUE_CHARS`] long), numbers normalised, booleans as `true`/`false`.
fn group_value<'a>(raw: &'a str, path: &JsonPath) -> Result<Cow<'a, str>, EventError> {
    if let Some(s) = string_at(raw, || path.field_name())? {
        // Shown on invoice lines: nor may it break a line or reorder what follows it.
        if let Some(c) = first_refused(&s, |c| forbidden_in_attribute(c) || reorders_text(c)) {
            return Err(error(path.field_name(), Problem::ForbiddenCharacter(c)));
        }
        if let Some(chars) = chars_over(&s, MAX_GROUP_VALUE_CHARS) {
            return Err(error(path.field_name(), Problem::TooLong { chars }));
        }
        return Ok(s);
    }
    match raw {
        "true" => Ok(Cow::Borrowed("true")),
        "false" => Ok(Cow::Borrowed("false")),
        text => match parse_number(text) {
            Some(Ok(n)) => Ok(Cow::Owned(n.normalize().to_string())),
            Some(Err(p)) => Err(error(path.field_name(), p)),
            None => Err(error(path.field_name(), Problem::NotAScalar)),
        },
    }
}

/// Fingerprint of what the event says. `data` is compared with insignificant
/// whitespace removed, so a re-serialised retry is not a conflict; a change of key order
/// is (it cannot be told from a change of content without parsing everything).
fn payload_fingerprint(
    event_type: &str,
    subject: &str,
    time: DateTime<Utc>,
    data: Option<&str>,
) -> PayloadFingerprint {
    let mut fp = Fingerprinter::new(b"payload");
    fp.part(event_type.as_bytes())
        .part(subject.as_bytes())
        .part(&time.timestamp_nanos_opt().unwrap_or(i64::MAX).to_le_bytes());
    if let Some(data) = data {
        let bytes = data.as_bytes();
        if !bytes.iter().any(u8::is_ascii_whitespace) {
            fp.raw(bytes);
        } else {
            let mut in_string = false;
            let mut escaped = false;
            let mut run_start = 0;
            for (i, &b) in bytes.iter().enumerate() {
                if in_string {
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        in_string = false;
                    }
                } else if b == b'"' {
                    in_string = true;
                } else if b.is_ascii_whitespace() {
                    fp.raw(&bytes[run_start..i]);
                    run_start = i + 1;
                }
            }
            fp.raw(&bytes[run_start..]);
        }
    }
    PayloadFingerprint(fp.finish_64() as u32)
}

/// An event's `source` and `id` as strings, when it has them: what ingest's source
/// check and per-event results and `tally explain`'s list of events need. The decoder
/// keeps only a fingerprint of the pair in the event; it gives them for a valid event
/// ([`EventDecoder::decode_with_identity`]), and [`identity`] reads them apart, of one
/// it refuses too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity<'a> {
    pub source: Option<Cow<'a, str>>,
    pub id: Option<Cow<'a, str>>,
}

/// Reads `source` and `id` from one event's JSON; each is `None` when absent or not a
/// string, and both are `None` when the event is not a JSON object with at most one of
/// each (the decoder then rejects it, so it is never produced).
pub fn identity<'a>(event: &'a [u8]) -> Identity<'a> {
    #[derive(serde::Deserialize)]
    struct Attributes<'a> {
        #[serde(borrow, default)]
        source: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow, default)]
        id: Option<&'a serde_json::value::RawValue>,
    }
    let Ok(attributes) = serde_json::from_slice::<Attributes<'_>>(event) else {
        return Identity::default();
    };
    let text = |raw: Option<&'a serde_json::value::RawValue>| -> Option<Cow<'a, str>> {
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
    fn the_value_bound_is_ten_to_the_eighteenth() {
        assert_eq!(MAX_VALUE, Decimal::from(1_000_000_000_000_000_000_u64));
        let path: JsonPath = "$.tokens".parse().unwrap();
        assert_eq!(
            number("999999999999999999.5", &path, false)
                .unwrap()
                .to_string(),
            "999999999999999999.5"
        );
        assert_eq!(
            number("1e18", &path, false).unwrap_err().problem,
            Problem::TooLarge
        );
        assert_eq!(number("\"7\"", &path, false).unwrap(), Decimal::from(7));
        // A correction's bound is the same, below zero.
        assert_eq!(number("-7.5", &path, true).unwrap().to_string(), "-7.5");
        assert_eq!(
            number("-1e18", &path, true).unwrap_err().problem,
            Problem::TooLarge
        );
        assert_eq!(
            number("-1", &path, false).unwrap_err().problem,
            Problem::Negative
        );
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
