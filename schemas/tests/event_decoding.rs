//! Decoding usage events through the public API: `EventDecoder` with a parsed `Config`.
//!
//! Every table row names the input and the exact outcome: the decimal read, the group_by
//! values, or the field and reason code of the reject.

// Helpers panic on unexpected input: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::borrow::Cow;
use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use tally_schemas::config::Config;
use tally_schemas::event::{DecodedEvent, EventDecoder, EventError, Problem, ReadingValue};
use tally_schemas::ids::EventKey;

const CONFIG: &str = r#"
[[meters]]
slug = "resolutions"
event_type = "ai.resolution"
aggregation = "count"

[[meters]]
slug = "tokens"
event_type = "llm.tokens"
aggregation = "sum"
value_property = "$.tokens"
group_by = { model = "$.model" }

[[meters]]
slug = "input_tokens"
event_type = "llm.usage"
aggregation = "sum"
value_property = "$.usage.input_tokens"

[[meters]]
slug = "active_users"
event_type = "app.active"
aggregation = "unique_count"
value_property = "$.user"

[[meters]]
slug = "seats"
event_type = "app.seats"
aggregation = "latest"
value_property = "$['seat-count']"

[[meters]]
slug = "peak"
event_type = "app.seats"
aggregation = "max"
value_property = "$['seat-count']"
"#;

/// The sample event of the issue.
const SAMPLE: &str = r#"{"specversion":"1.0","id":"evt-81","source":"fin-agent","type":"ai.resolution","subject":"cust_acme","time":"2026-11-24T10:15:00Z","data":{"conversation_id":"c-9"}}"#;

fn config() -> Config {
    Config::parse(CONFIG, "test.toml").expect("test config is valid")
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 15, 0, 0, 0).unwrap()
}

fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

fn decode_with(config: &Config, line: &[u8]) -> Result<DecodedEvent<'static>, EventError> {
    EventDecoder::new(config, now())
        .decode(line)
        .map(DecodedEvent::into_owned)
}

fn decode(line: &str) -> Result<DecodedEvent<'static>, EventError> {
    decode_with(&config(), line.as_bytes())
}

/// A valid event of `event_type` with `data` written as raw JSON (or no data for `None`).
fn event(event_type: &str, data: Option<&str>) -> String {
    let data = data.map(|d| format!(r#","data":{d}"#)).unwrap_or_default();
    format!(
        r#"{{"specversion":"1.0","id":"e-1","source":"src","type":"{event_type}","subject":"cust_acme","time":"2026-11-24T10:15:00Z"{data}}}"#
    )
}

/// The `(field, code)` a line is rejected with.
fn reject(line: &str) -> (String, &'static str) {
    reject_bytes(line.as_bytes())
}

fn reject_bytes(line: &[u8]) -> (String, &'static str) {
    match decode_with(&config(), line) {
        Ok(e) => panic!(
            "expected a reject for {:?}, decoded {e:?}",
            String::from_utf8_lossy(line)
        ),
        Err(e) => (e.field.clone(), e.problem.code()),
    }
}

/// The values the readings of one event carry, as decimals.
fn numbers(line: &str) -> Vec<Decimal> {
    decode(line)
        .unwrap_or_else(|e| panic!("{line}: {e}"))
        .readings
        .iter()
        .map(|r| match r.value {
            ReadingValue::Number(n) => n,
            other => panic!("expected a number, got {other:?}"),
        })
        .collect()
}

fn tokens(raw: &str) -> String {
    event(
        "llm.tokens",
        Some(&format!(r#"{{"tokens":{raw},"model":"gpt-x"}}"#)),
    )
}

fn distinct(raw_user: &str) -> u64 {
    let line = event("app.active", Some(&format!(r#"{{"user":{raw_user}}}"#)));
    match decode(&line)
        .unwrap_or_else(|e| panic!("{line}: {e}"))
        .readings[0]
        .value
    {
        ReadingValue::Distinct(d) => d,
        other => panic!("expected a distinct value, got {other:?}"),
    }
}

fn group(raw_model: Option<&str>) -> Vec<String> {
    let data = match raw_model {
        Some(m) => format!(r#"{{"tokens":1,"model":{m}}}"#),
        None => r#"{"tokens":1}"#.to_owned(),
    };
    let e = decode(&event("llm.tokens", Some(&data))).unwrap();
    e.readings[0].group.iter().map(|g| g.to_string()).collect()
}

#[test]
fn group_values_refuse_control_characters_and_more_than_256_characters() {
    // A terminal escape or a newline would reach explain's text, CSV cells and logs.
    let with = |model: &str| {
        event(
            "llm.tokens",
            Some(&format!(r#"{{"tokens":1,"model":"{model}"}}"#)),
        )
    };
    assert_eq!(
        reject(&with(r"x\u001b[2J\nfake line")),
        ("data.model".to_owned(), "forbidden_character")
    );
    assert_eq!(
        reject(&with(r"gpt-x\u0000")),
        ("data.model".to_owned(), "forbidden_character")
    );
    // Nor a line separator, nor an override that shows what follows it reversed.
    for c in [r"\u2028", r"\u202e", r"\u2066"] {
        assert_eq!(
            reject(&with(&format!("gpt{c}x"))),
            ("data.model".to_owned(), "forbidden_character"),
            "{c}"
        );
    }
    assert_eq!(group(Some(r#""gpt-x \u00e9\u200e""#)), ["gpt-x é\u{200e}"]);
    // Counted in characters: 256 two-byte ones are a value, 257 plain ones are not.
    assert_eq!(
        group(Some(&format!("\"{}\"", "é".repeat(256)))),
        ["é".repeat(256)]
    );
    let error = decode(&with(&"m".repeat(257))).unwrap_err();
    assert_eq!(
        (error.field.as_str(), error.problem.code()),
        ("data.model", "too_long")
    );
    assert!(
        error
            .to_string()
            .contains("is 257 characters long; a group_by value is at most 256"),
        "{error}"
    );
}

#[test]
fn a_subject_of_more_than_256_characters_is_refused_as_too_long() {
    let with = |subject: &str| SAMPLE.replace("\"cust_acme\"", &format!("{subject:?}"));
    // Counted in characters, as group values are.
    assert_eq!(
        decode(&with(&"é".repeat(256))).unwrap().subject,
        "é".repeat(256)
    );
    let error = decode(&with(&"c".repeat(257))).unwrap_err();
    assert_eq!(
        (error.field.as_str(), error.problem.code()),
        ("subject", "too_long")
    );
    assert!(
        error
            .to_string()
            .contains("is 257 characters long; a subject is at most 256"),
        "{error}"
    );
}

#[test]
fn the_issue_sample_event_decodes_to_its_customer_time_and_key() {
    let e = decode(SAMPLE).unwrap();
    assert_eq!(e.subject, "cust_acme");
    assert_eq!(e.event_type, "ai.resolution");
    assert_eq!(e.time, utc("2026-11-24T10:15:00Z"));
    assert_eq!(e.key, EventKey::new("fin-agent", "evt-81"));
    assert_eq!(e.readings.len(), 1);
    assert_eq!(e.readings[0].value, ReadingValue::Event);
    assert!(e.readings[0].group.is_empty());
    let config = config();
    assert_eq!(config.meter(e.readings[0].meter).slug, "resolutions");
}

#[test]
fn time_offsets_are_normalised_to_utc() {
    let cases = [
        ("2026-12-01T00:30:00+01:00", "2026-11-30T23:30:00Z"),
        ("2026-11-30T19:00:00-05:00", "2026-12-01T00:00:00Z"),
        ("2026-11-24T10:15:00.250Z", "2026-11-24T10:15:00.250Z"),
        ("2026-11-24T15:45:00+05:30", "2026-11-24T10:15:00Z"),
        ("2026-11-24T10:15:00+00:00", "2026-11-24T10:15:00Z"),
    ];
    for (written, expected) in cases {
        let line = SAMPLE.replace("2026-11-24T10:15:00Z", written);
        assert_eq!(decode(&line).unwrap().time, utc(expected), "{written}");
    }
}

#[test]
fn numbers_are_read_as_exact_decimals() {
    // (JSON text of data.tokens, exact decimal, its rendering: the scale is kept)
    let cases = [
        ("5.001", "5.001"),
        ("5.0010", "5.0010"),
        ("0.1", "0.1"),
        ("42", "42"),
        ("0", "0"),
        ("1e3", "1000"),
        ("1E3", "1000"),
        ("2.5e-3", "0.0025"),
        (
            "123456789012345678.9012345678",
            "123456789012345678.9012345678",
        ),
        (
            "0.0000000000000000000000000001",
            "0.0000000000000000000000000001",
        ),
        (r#""12""#, "12"),
        (r#""5.001""#, "5.001"),
        (r#"" 7.5 ""#, "7.5"),
        (r#""1e3""#, "1000"),
    ];
    for (raw, expected) in cases {
        let got = numbers(&tokens(raw));
        assert_eq!(got, [dec(expected)], "tokens = {raw}");
        if !raw.contains(['e', 'E']) {
            assert_eq!(got[0].to_string(), expected, "scale of {raw}");
        }
    }
}

#[test]
fn a_json_exponent_with_an_explicit_plus_sign_is_a_number() {
    // JSON allows `1e+3` and `1E+3`; they are 1000.
    assert_eq!(numbers(&tokens("1e+3")), [dec("1000")]);
    assert_eq!(numbers(&tokens("1E+3")), [dec("1000")]);
}

#[test]
fn negative_zero_is_zero_not_negative() {
    assert_eq!(numbers(&tokens("-0")), [Decimal::ZERO]);
    assert_eq!(numbers(&tokens("-0.0")), [Decimal::ZERO]);
}

#[test]
fn a_sum_meter_allowing_negative_values_takes_corrections_and_the_others_refuse_them() {
    let config = Config::parse(
        &CONFIG.replace(
            "value_property = \"$.tokens\"",
            "value_property = \"$.tokens\"\nallow_negative_values = true",
        ),
        "test",
    )
    .unwrap();
    let correction = decode_with(&config, tokens(r#""-1500.5""#).as_bytes()).unwrap();
    assert_eq!(
        correction.readings[0].value,
        ReadingValue::Number(dec("-1500.5"))
    );
    // Bounded below as above: a correction past -10^18 is a unit error too.
    let too_large = decode_with(&config, tokens("-1e18").as_bytes()).unwrap_err();
    assert_eq!(too_large.problem, Problem::TooLarge);
    // The other meters of the type-sharing pair (latest and max) still refuse them.
    let seats = event("app.seats", Some(r#"{"seat-count":-2}"#));
    assert_eq!(
        decode_with(&config, seats.as_bytes()).unwrap_err().problem,
        Problem::Negative
    );
}

#[test]
fn non_numeric_values_are_rejected_naming_the_field() {
    for raw in [
        r#""abc""#,
        r#""""#,
        r#""  ""#,
        r#""NaN""#,
        r#""Infinity""#,
        r#""1,000""#,
        r#""12 tokens""#,
        "true",
        "false",
        "{}",
        r#"{"n":1}"#,
        "[1]",
    ] {
        assert_eq!(
            reject(&tokens(raw)),
            ("data.tokens".to_owned(), "not_a_number"),
            "tokens = {raw}"
        );
    }
}

#[test]
fn negative_values_are_rejected() {
    for raw in ["-1", "-0.001", "-1e3", r#""-2.5""#] {
        assert_eq!(
            reject(&tokens(raw)),
            ("data.tokens".to_owned(), "negative_value"),
            "tokens = {raw}"
        );
    }
}

#[test]
fn numbers_that_cannot_stay_exact_are_rejected_as_too_precise() {
    // 31 significant digits: more than a 96-bit decimal keeps.
    for raw in [
        "0.1234567890123456789012345678901",
        // The same in exponent form, which must not be rounded to fit either.
        "1.00000000000000000000000000001e2",
        "1.234567890123456789012345678901e5",
    ] {
        assert_eq!(
            reject(&tokens(raw)),
            ("data.tokens".to_owned(), "too_precise"),
            "tokens = {raw}"
        );
    }
}

#[test]
fn numbers_past_the_largest_decimal_are_too_large_like_any_value_past_the_bound() {
    for raw in ["1e20", "1e29", "1e400", "1234567890123456789012345678901"] {
        assert_eq!(
            reject(&tokens(raw)),
            ("data.tokens".to_owned(), "too_large"),
            "tokens = {raw}"
        );
    }
}

#[test]
fn a_missing_or_null_value_is_a_missing_field() {
    let cases = [
        (event("llm.tokens", None), "data.tokens"),
        (event("llm.tokens", Some("null")), "data.tokens"),
        (
            event("llm.tokens", Some(r#"{"model":"gpt-x"}"#)),
            "data.tokens",
        ),
        (tokens("null"), "data.tokens"),
        (event("llm.usage", Some("{}")), "data.usage.input_tokens"),
        (
            event("llm.usage", Some(r#"{"usage":null}"#)),
            "data.usage.input_tokens",
        ),
        (
            event("llm.usage", Some(r#"{"usage":{}}"#)),
            "data.usage.input_tokens",
        ),
    ];
    for (line, field) in cases {
        assert_eq!(reject(&line), (field.to_owned(), "missing_field"), "{line}");
    }
}

#[test]
fn data_that_is_not_an_object_is_a_wrong_type_when_a_meter_reads_it() {
    for data in ["[1,2]", "5", r#""tokens""#, "true"] {
        let line = event("llm.tokens", Some(data));
        assert_eq!(
            reject(&line),
            ("data".to_owned(), "wrong_type"),
            "data = {data}"
        );
    }
}

#[test]
fn nested_paths_walk_through_objects() {
    let line = event(
        "llm.usage",
        Some(r#"{"usage":{"input_tokens":42,"output_tokens":7}}"#),
    );
    assert_eq!(numbers(&line), [dec("42")]);
    let deeper = event(
        "llm.usage",
        Some(r#"{"model":"x","usage":{"cached":{"a":1},"input_tokens":"0.5"}}"#),
    );
    assert_eq!(numbers(&deeper), [dec("0.5")]);
    // An intermediate that is not an object is named by its own path.
    let scalar = event("llm.usage", Some(r#"{"usage":5}"#));
    assert_eq!(reject(&scalar), ("data.usage".to_owned(), "wrong_type"));
}

#[test]
fn bracket_paths_read_keys_with_dashes_and_several_meters_read_one_event() {
    let line = event("app.seats", Some(r#"{"seat-count":12}"#));
    assert_eq!(numbers(&line), [dec("12"), dec("12")]);
    let e = decode(&line).unwrap();
    let config = config();
    let slugs: Vec<&str> = e
        .readings
        .iter()
        .map(|r| config.meter(r.meter).slug.as_str())
        .collect();
    assert_eq!(slugs, ["seats", "peak"]);
}

#[test]
fn group_by_values_are_text_whatever_their_json_type() {
    let cases: [(Option<&str>, &str); 10] = [
        (Some(r#""gpt-x""#), "gpt-x"),
        (Some(r#""gpt\u002dx""#), "gpt-x"),
        (Some(r#""a \"quoted\" model""#), r#"a "quoted" model"#),
        (Some("4"), "4"),
        (Some("4.50"), "4.5"),
        (Some("1e2"), "100"),
        (Some("true"), "true"),
        (Some("false"), "false"),
        (Some("null"), ""),
        (None, ""),
    ];
    for (raw, expected) in cases {
        assert_eq!(group(raw), [expected], "model = {raw:?}");
    }
}

#[test]
fn group_by_values_that_are_not_scalars_are_rejected() {
    for raw in ["{}", r#"{"name":"gpt-x"}"#, r#"["gpt-x"]"#] {
        let line = event(
            "llm.tokens",
            Some(&format!(r#"{{"tokens":1,"model":{raw}}}"#)),
        );
        assert_eq!(
            reject(&line),
            ("data.model".to_owned(), "not_a_scalar"),
            "model = {raw}"
        );
    }
}

#[test]
fn unique_count_values_are_normalised_numbers_and_exact_strings() {
    assert_eq!(distinct(r#""u1""#), distinct(r#""u1""#));
    assert_ne!(distinct(r#""u1""#), distinct(r#""u2""#));
    assert_ne!(distinct(r#""u1""#), distinct(r#""U1""#));
    // Numbers are normalised, and equal the string of their normal form.
    assert_eq!(distinct("1"), distinct("1.0"));
    assert_eq!(distinct("1"), distinct("1e0"));
    assert_eq!(distinct("1"), distinct(r#""1""#));
    assert_ne!(distinct("1"), distinct("2"));
    // Strings are compared as written.
    assert_ne!(distinct(r#""1.0""#), distinct(r#""1""#));
    // An escape is the character it stands for.
    assert_eq!(distinct(r#""\u0075\u0031""#), distinct(r#""u1""#));
    for raw in ["true", "{}", "[1]"] {
        let line = event("app.active", Some(&format!(r#"{{"user":{raw}}}"#)));
        assert_eq!(
            reject(&line),
            ("data.user".to_owned(), "wrong_type"),
            "user = {raw}"
        );
    }
}

#[test]
fn every_kind_of_bad_envelope_is_rejected_with_its_field_and_code() {
    let s = SAMPLE;
    let cases: Vec<(String, &str, &str)> = vec![
        ("not json".into(), "event", "invalid_json"),
        ("{".into(), "event", "invalid_json"),
        (format!("{s} trailing"), "event", "invalid_json"),
        (s[..s.len() - 1].to_owned(), "event", "invalid_json"),
        ("[1,2]".into(), "event", "not_an_object"),
        (r#""a string""#.into(), "event", "not_an_object"),
        ("42".into(), "event", "not_an_object"),
        ("{}".into(), "specversion", "missing_field"),
        (
            s.replace(r#""specversion":"1.0","#, ""),
            "specversion",
            "missing_field",
        ),
        (
            s.replace(r#""1.0""#, r#""0.3""#),
            "specversion",
            "unsupported_specversion",
        ),
        (s.replace(r#""1.0""#, "1.0"), "specversion", "wrong_type"),
        (s.replace(r#""id":"evt-81","#, ""), "id", "missing_field"),
        (s.replace(r#""evt-81""#, "81"), "id", "wrong_type"),
        (
            s.replace(r#""evt-81""#, r#"["evt-81"]"#),
            "id",
            "wrong_type",
        ),
        (s.replace(r#""evt-81""#, r#""""#), "id", "empty_field"),
        (
            s.replace(r#""source":"fin-agent","#, ""),
            "source",
            "missing_field",
        ),
        (s.replace(r#""fin-agent""#, "{}"), "source", "wrong_type"),
        (
            s.replace(r#""type":"ai.resolution","#, ""),
            "type",
            "missing_field",
        ),
        (
            s.replace(r#""ai.resolution""#, "true"),
            "type",
            "wrong_type",
        ),
        (
            s.replace(r#""subject":"cust_acme","#, ""),
            "subject",
            "missing_field",
        ),
        (
            s.replace(r#""cust_acme""#, "null"),
            "subject",
            "missing_field",
        ),
        (
            s.replace(r#""cust_acme""#, r#""   ""#),
            "subject",
            "empty_field",
        ),
        (s.replace(r#""cust_acme""#, "7"), "subject", "wrong_type"),
        (
            s.replace(r#","time":"2026-11-24T10:15:00Z""#, ""),
            "time",
            "missing_field",
        ),
        (
            s.replace("2026-11-24T10:15:00Z", "yesterday"),
            "time",
            "invalid_time",
        ),
        (
            s.replace("2026-11-24T10:15:00Z", "2026-11-24 10:15"),
            "time",
            "invalid_time",
        ),
        (
            s.replace("2026-11-24T10:15:00Z", "2026-11-24T10:15:00"),
            "time",
            "invalid_time",
        ),
        (
            s.replace("2026-11-24T10:15:00Z", "2026-13-24T10:15:00Z"),
            "time",
            "invalid_time",
        ),
        (
            s.replace(r#""2026-11-24T10:15:00Z""#, "1795000000"),
            "time",
            "wrong_type",
        ),
        (
            s.replace("2026-11-24T10:15:00Z", "2099-01-01T00:00:00Z"),
            "time",
            "time_in_future",
        ),
        (
            s.replace(
                r#""subject":"cust_acme","#,
                r#""subject":"cust_acme","subject":"cust_b","#,
            ),
            "subject",
            "duplicate_field",
        ),
        (
            s.replace(r#""id":"evt-81","#, r#""id":"evt-81","id":"evt-81","#),
            "id",
            "duplicate_field",
        ),
        (
            s.replace(r#""data":"#, r#""data":{},"data":"#),
            "data",
            "duplicate_field",
        ),
        (
            tokens("5").replace(r#""gpt-x""#, r#""gpt-x","model":"gpt-y""#),
            "data.model",
            "duplicate_field",
        ),
        // Characters CloudEvents forbids in attributes: a newline would forge a log
        // line, a NUL ends a C string.
        (
            s.replace("cust_acme", r"cust_acme\nERROR forged"),
            "subject",
            "forbidden_character",
        ),
        (
            s.replace("evt-81", r"evt\u0000"),
            "id",
            "forbidden_character",
        ),
        (
            s.replace("fin-agent", "fin\u{7f}"),
            "source",
            "forbidden_character",
        ),
        (
            s.replace("ai.resolution", "ai\u{85}"),
            "type",
            "forbidden_character",
        ),
        (
            s.replace("cust_acme", "cust\u{fffe}"),
            "subject",
            "forbidden_character",
        ),
        (
            s.replace("cust_acme", "cust\u{10ffff}"),
            "subject",
            "forbidden_character",
        ),
    ];
    for (line, field, code) in cases {
        assert_eq!(reject(&line), (field.to_owned(), code), "{line}");
    }
}

#[test]
fn attributes_take_any_other_character() {
    for subject in ["kund_åäö", "客户-7", "cust 🚀", "a\u{a0}b", "cust\u{fffd}"] {
        let line = SAMPLE.replace("cust_acme", subject);
        let event =
            decode_with(&config(), line.as_bytes()).unwrap_or_else(|e| panic!("{subject:?}: {e}"));
        assert_eq!(event.subject, subject);
    }
}

#[test]
fn data_is_read_only_when_a_meter_reads_a_value_or_a_group_from_it() {
    // Only a count meter without groups reads ai.resolution: any data, or none but
    // data_base64, counts the event.
    for data in [
        r#""data":"hello""#,
        r#""data":[1,2]"#,
        r#""data":{"a":1,"a":2}"#,
    ] {
        let line = SAMPLE.replace(r#""data":{"conversation_id":"c-9"}"#, data);
        decode_with(&config(), line.as_bytes()).unwrap_or_else(|e| panic!("{data}: {e}"));
    }
    let base64 = r#""data_base64":"eyJ0b2tlbnMiOjV9""#;
    let counted = SAMPLE.replace(r#""data":{"conversation_id":"c-9"}"#, base64);
    assert!(decode_with(&config(), counted.as_bytes()).is_ok());
    // A meter reading a value says why it finds none.
    let unread = tokens("5").replace(r#""data":{"tokens":5,"model":"gpt-x"}"#, base64);
    assert_eq!(reject(&unread), ("data_base64".to_owned(), "base64_data"));
}

#[test]
fn a_key_repeated_among_many_members_of_data_is_found() {
    // Past a few members the check hashes instead of comparing pairs; both must
    // find the first key given twice, and only that.
    // The event's own two members and the two repeated ones with these: 7, 16 (the
    // most compared pairwise), 17 and 5004 members.
    for members in [3, 12, 13, 5000] {
        let distinct: Vec<String> = (0..members).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let with = |extra: &str| {
            tokens("5").replace(
                r#""gpt-x""#,
                &format!(r#""gpt-x",{}{extra}"#, distinct.join(",")),
            )
        };
        decode_with(&config(), with("").as_bytes())
            .unwrap_or_else(|e| panic!("{members} distinct members: {e}"));
        assert_eq!(
            reject(&with(r#","k1":0,"k0":0"#)),
            ("data.k1".to_owned(), "duplicate_field"),
            "{members} members"
        );
    }
}

#[test]
fn invalid_utf8_is_rejected_with_the_offset_of_the_first_bad_byte() {
    let mut line = SAMPLE.as_bytes().to_vec();
    let at = SAMPLE.find("cust_acme").unwrap() + 4;
    line[at] = 0xff;
    let err = decode_with(&config(), &line).unwrap_err();
    assert_eq!(err.field, "event");
    assert_eq!(err.problem, Problem::InvalidUtf8 { valid_up_to: at });
    assert_eq!(err.problem.code(), "invalid_utf8");
    assert_eq!(
        reject_bytes(b"\xc3\x28"),
        ("event".to_owned(), "invalid_utf8")
    );
}

#[test]
fn a_time_without_a_zone_is_told_so() {
    for local in ["2026-11-24T10:15:00", "2026-11-24 10:15:00.5"] {
        let err = decode(&SAMPLE.replace("2026-11-24T10:15:00Z", local)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "time: not an RFC 3339 timestamp such as 2026-11-24T10:15:00Z (it has no time zone: end it with Z for UTC or an offset such as +01:00)",
            "{local}"
        );
    }
    // Other mistakes, each in words, not the parser's.
    for (written, told) in [
        ("yesterday", "it does not start with a date, YYYY-MM-DD"),
        (
            "2026-11-24",
            "it is a date without a time: write e.g. 2026-11-24T00:00:00Z",
        ),
        (
            "2026-02-30",
            "it is a date without a time: write e.g. 2026-11-24T00:00:00Z",
        ),
        (
            "2026-11-31T10:15:00Z",
            "a part of it is out of range, such as a month 13 or a 31 November",
        ),
        ("2026-11-24T10:15", "it ends before the timestamp does"),
        ("2026-11-24T10:15:00Zulu", "something follows the timestamp"),
        (
            "2026-11-24T10h15:00Z",
            "a character is not where RFC 3339 puts one",
        ),
    ] {
        let err = decode(&SAMPLE.replace("2026-11-24T10:15:00Z", written)).unwrap_err();
        assert!(
            err.to_string().ends_with(&format!("({told})")),
            "{written}: {err}"
        );
    }
    let err =
        decode(&SAMPLE.replace("2026-11-24T10:15:00Z", "2026-11-24T11:15:00+0100")).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("(its offset has no colon: RFC 3339 writes +01:00, not +0100)"),
        "{err}"
    );
}

#[test]
fn data_sent_as_json_text_in_a_string_is_told_so() {
    let encoded = tokens("5").replace(r#""data":{"#, r#""data":"{\"tokens\":5}","x":{"#);
    let err = decode(&encoded).unwrap_err();
    assert_eq!(
        err.to_string(),
        "data: expected an object (send it as a JSON object, not as JSON text in a string), found a string"
    );
}

#[test]
fn errors_read_as_field_then_reason() {
    let err = decode(&tokens(r#""many""#)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "data.tokens: expected a number (or a numeric string)"
    );
    let err = decode(&tokens("-3")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "data.tokens: usage must not be negative (only a sum meter with allow_negative_values = true takes corrections)"
    );
    let err = decode(&SAMPLE.replace(r#""1.0""#, r#""0.3""#)).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"specversion: specversion "0.3" is not supported; send "1.0""#
    );
    let err = decode(&SAMPLE.replace("2026-11-24T10:15:00Z", "2099-01-01T00:00:00Z")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "time: event time is more than 5m ahead of the clock; fix the sender's clock"
    );
}

#[test]
fn events_up_to_the_allowed_skew_ahead_of_the_clock_are_accepted() {
    // The clock is 2026-12-15T00:00:00Z and the default skew 5 minutes.
    let at = |t: &str| SAMPLE.replace("2026-11-24T10:15:00Z", t);
    assert!(decode(&at("2026-12-15T00:05:00Z")).is_ok());
    assert_eq!(
        reject(&at("2026-12-15T00:05:01Z")),
        ("time".to_owned(), "time_in_future")
    );
    // The same instant written with an offset.
    assert!(decode(&at("2026-12-15T01:05:00+01:00")).is_ok());
    let wide = Config::parse(
        &format!("{CONFIG}\n[events]\nmax_future_skew = \"1h\"\n"),
        "t",
    )
    .unwrap();
    assert!(decode_with(&wide, at("2026-12-15T01:00:00Z").as_bytes()).is_ok());
    assert!(decode_with(&wide, at("2026-12-15T01:00:01Z").as_bytes()).is_err());
}

#[test]
fn extension_attributes_are_ignored() {
    let with_extensions = SAMPLE.replace(
        r#""time":"#,
        r#""datacontenttype":"application/json","dataschema":"https://x/s","traceparent":"00-ab-cd-01","ext":{"nested":[1,{"id":2}]},"extnum":5,"time":"#,
    );
    let plain = decode(SAMPLE).unwrap();
    let extended = decode(&with_extensions).unwrap();
    assert_eq!(extended, plain);
}

#[test]
fn escapes_in_attributes_are_decoded() {
    let line = SAMPLE
        .replace(r#""cust_acme""#, r#""cust\u005facme""#)
        .replace(r#""ai.resolution""#, r#""ai\u002eresolution""#)
        .replace(r#""specversion""#, r#""spec\u0076ersion""#);
    let e = decode(&line).unwrap();
    assert_eq!(e.subject, "cust_acme");
    assert_eq!(e.event_type, "ai.resolution");
    assert_eq!(e.readings.len(), 1);
    assert_eq!(e.payload, decode(SAMPLE).unwrap().payload);
    // Unescaped strings are borrowed from the line; escaped ones are owned.
    let config = config();
    let decoder = EventDecoder::new(&config, now());
    let borrowed = decoder.decode(SAMPLE.as_bytes()).unwrap();
    assert!(matches!(borrowed.subject, Cow::Borrowed("cust_acme")));
    let owned = decoder.decode(line.as_bytes()).unwrap();
    assert!(matches!(owned.subject, Cow::Owned(ref s) if s == "cust_acme"));
}

#[test]
fn an_event_type_no_meter_reads_decodes_without_readings_whatever_its_data() {
    for data in [
        None,
        Some("null"),
        Some(r#""text""#),
        Some("[1,2]"),
        Some(r#"{"tokens":-5}"#),
    ] {
        let e = decode(&event("other.type", data)).unwrap();
        assert!(e.readings.is_empty(), "{data:?}");
        assert_eq!(e.event_type, "other.type");
    }
}

#[test]
fn duplicate_keys_inside_data_are_rejected() {
    // Which of the two values counts would be a guess. The reject names `data` or the
    // duplicated member, as a duplicate field or as invalid JSON.
    for data in [
        r#"{"tokens":1,"tokens":2,"model":"gpt-x"}"#,
        r#"{"tokens":1,"model":"gpt-x","model":"gpt-y"}"#,
    ] {
        let (field, code) = reject(&event("llm.tokens", Some(data)));
        assert!(field.starts_with("data"), "{data}: {field}");
        assert!(
            ["duplicate_field", "invalid_json"].contains(&code),
            "{data}: {code}"
        );
    }
    let nested = event(
        "llm.usage",
        Some(r#"{"usage":{"input_tokens":1,"input_tokens":1}}"#),
    );
    let (field, _) = reject(&nested);
    assert!(field.starts_with("data"), "{field}");
}

fn payload(line: &str) -> tally_schemas::ids::PayloadFingerprint {
    decode(line)
        .unwrap_or_else(|e| panic!("{line}: {e}"))
        .payload
}

#[test]
fn payload_fingerprint_ignores_whitespace_between_tokens_only() {
    let compact = tokens("5");
    let spaced = event(
        "llm.tokens",
        Some("{ \"tokens\" : 5 ,\n\t\"model\" :\r \"gpt-x\" }"),
    );
    assert_eq!(payload(&compact), payload(&spaced));
    // Whitespace inside strings is content.
    let a = event("llm.tokens", Some(r#"{"tokens":5,"model":"gpt x"}"#));
    let b = event("llm.tokens", Some(r#"{"tokens":5,"model":"gptx"}"#));
    assert_ne!(payload(&a), payload(&b));
    // An escaped quote does not end the string: the space after it is still content.
    let c = event("llm.tokens", Some(r#"{"tokens":5,"model":"g\" x"}"#));
    let d = event("llm.tokens", Some(r#"{"tokens":5,"model":"g\"x"}"#));
    assert_ne!(payload(&c), payload(&d));
    // Whitespace around the envelope does not count either.
    let outer = format!("  {}  ", compact.replace(",\"data\":", " , \"data\" : "));
    assert_eq!(payload(&outer), payload(&compact));
}

#[test]
fn payload_fingerprint_changes_with_what_the_event_says() {
    let base = payload(&tokens("5"));
    assert_ne!(base, payload(&tokens("6")));
    assert_ne!(base, payload(&tokens("5.0")));
    assert_ne!(base, payload(&tokens(r#""5""#)));
    assert_ne!(base, payload(&tokens("5").replace("cust_acme", "cust_b")));
    assert_ne!(
        base,
        payload(&tokens("5").replace("10:15:00Z", "10:15:01Z"))
    );
    assert_ne!(
        base,
        payload(&event(
            "llm.tokens",
            Some(r#"{"tokens":5,"model":"gpt-y"}"#)
        ))
    );
    assert_ne!(
        base,
        payload(&event(
            "llm.tokens",
            Some(r#"{"tokens":5,"model":"gpt-x","extra":1}"#)
        ))
    );
    // The same instant in another offset is the same event time.
    assert_eq!(
        base,
        payload(&tokens("5").replace("2026-11-24T10:15:00Z", "2026-11-24T11:15:00+01:00"))
    );
    // Source and id are the key, not the payload.
    let other_id = tokens("5").replace(r#""e-1""#, r#""e-2""#);
    assert_eq!(base, payload(&other_id));
    assert_ne!(
        decode(&other_id).unwrap().key,
        decode(&tokens("5")).unwrap().key
    );
}

#[test]
fn event_keys_depend_on_source_and_id_only() {
    let a = decode(SAMPLE).unwrap();
    let b = decode(
        &SAMPLE
            .replace("cust_acme", "cust_b")
            .replace("10:15", "11:15"),
    )
    .unwrap();
    assert_eq!(a.key, b.key);
    assert_ne!(a.payload, b.payload);
    let other_source = decode(&SAMPLE.replace("fin-agent", "fin-agent-2")).unwrap();
    assert_ne!(a.key, other_source.key);
}

#[test]
fn numeric_strings_with_underscores_are_not_numbers() {
    for raw in [r#""1_000""#, r#""5_""#] {
        assert_eq!(
            reject(&tokens(raw)),
            ("data.tokens".to_owned(), "not_a_number"),
            "tokens = {raw}"
        );
    }
}

/// Texts that are not JSON, to splice in as the value of `data`.
const NOT_JSON: &[&str] = &[
    r#"{"tokens":01}"#,
    r#"{"tokens":1.}"#,
    r#"{"tokens":.5}"#,
    r#"{"tokens":+1}"#,
    r#"{"tokens":-}"#,
    r#"{"tokens":1e}"#,
    r#"{"tokens":1e+}"#,
    r#"{"tokens":0x10}"#,
    r#"{"tokens":NaN}"#,
    r#"{"tokens":Infinity}"#,
    r#"{"tokens":tru}"#,
    r#"{"tokens":nul}"#,
    r#"{"tokens":1,}"#,
    r#"{,"tokens":1}"#,
    r#"{"tokens":1 "model":"x"}"#,
    r#"{"tokens"1}"#,
    r#"{'tokens':1}"#,
    r#"{tokens:1}"#,
    r#"{"tokens":1}}"#,
    r#"{"tokens":[1,]}"#,
    r#"{"tokens":[1 2]}"#,
    r#"{"tokens":"\x"}"#,
    r#"{"tokens":"\u12"}"#,
    r#"{"tokens":"\u12G4"}"#,
    "{\"tokens\":\"a\tb\"}",
    "{\"tokens\":\"a\u{1}b\"}",
    r#"{"tokens":1 /* comment */}"#,
    r#"{"tokens":"unterminated}"#,
];

#[test]
fn text_that_is_not_json_is_rejected_wherever_it_is() {
    for data in NOT_JSON {
        for event_type in ["llm.tokens", "ai.resolution", "not.metered"] {
            let line = event(event_type, Some(data));
            let (field, code) = reject(&line);
            assert_eq!(code, "invalid_json", "{line}");
            assert!(
                field == "event" || field.starts_with("data"),
                "{line}: {field}"
            );
            // serde_json agrees that it is not JSON.
            assert!(
                serde_json::from_str::<serde_json::Value>(&line).is_err(),
                "{line}"
            );
        }
    }
}

#[test]
fn text_that_is_not_json_is_rejected_in_the_envelope_too() {
    let s = SAMPLE;
    for line in [
        s.replacen('{', "{,", 1),
        s.replacen("}}", "},}", 1),
        s.replacen(r#""specversion""#, "specversion", 1),
        s.replacen(r#""1.0""#, r#""1.0"#, 1),
        s.replacen(r#""fin-agent""#, r#""fin\qagent""#, 1),
        s.replacen(r#""cust_acme""#, "\"cust\u{0}acme\"", 1),
        format!("{s}{s}"),
        format!("{s},"),
        format!("\u{feff}{s}"),
    ] {
        assert_eq!(
            reject(&line),
            ("event".to_owned(), "invalid_json"),
            "{line}"
        );
    }
}

#[test]
fn whitespace_allowed_by_json_is_accepted_around_every_token() {
    let spaced = " { \"specversion\" : \"1.0\" ,\t\"id\":\"evt-81\",\r\"source\":\"fin-agent\" , \"type\" : \"ai.resolution\", \"subject\" : \"cust_acme\" , \"time\" : \"2026-11-24T10:15:00Z\" , \"data\" : { \"conversation_id\" : \"c-9\" } } ";
    let e = decode(spaced).unwrap();
    let plain = decode(SAMPLE).unwrap();
    assert_eq!(e.key, plain.key);
    assert_eq!(e.payload, plain.payload);
}

#[test]
fn valid_json_edge_cases_are_accepted() {
    for data in [
        r#"{"tokens":0.5E+2,"model":"\u00e9\ud83d\ude00"}"#,
        // Control characters escaped in a field no meter reads (a group value
        // refuses them).
        r#"{"tokens":-0e0,"model":"\"\\\/","note":"\b\f\n\r\t"}"#,
        r#"{"tokens":1,"model":"x","extra":[[],{},[{"a":[null,true,false,1.5e-3]}]]}"#,
        r#"{"":1,"tokens":2,"model":""}"#,
    ] {
        let line = event("llm.tokens", Some(data));
        assert!(
            serde_json::from_str::<serde_json::Value>(&line).is_ok(),
            "{line}"
        );
        assert!(decode(&line).is_ok(), "{line}: {:?}", decode(&line));
    }
    assert_eq!(numbers(&tokens("0.5E+2")), [dec("50")]);
    assert_eq!(group(Some(r#""\u00e9\ud83d\ude00""#)), ["é😀"]);
}

#[test]
fn lone_surrogates_in_read_strings_are_rejected_as_invalid_json() {
    // "\ud800" has no UTF-8 form. The field is named, and the reason says what is wrong.
    let cases = [
        (
            SAMPLE.replace(r#""cust_acme""#, r#""cust\ud800""#),
            "subject",
        ),
        (
            event("llm.tokens", Some(r#"{"tokens":1,"model":"\ud800"}"#)),
            "data.model",
        ),
        (
            event("app.active", Some(r#"{"user":"\udc00"}"#)),
            "data.user",
        ),
    ];
    for (line, field) in cases {
        assert_eq!(reject(&line), (field.to_owned(), "invalid_json"), "{line}");
    }
}

#[test]
fn rfc_3339_variants_are_accepted_and_leap_seconds_stay_in_their_minute() {
    let at = |t: &str| decode(&SAMPLE.replace("2026-11-24T10:15:00Z", t)).map(|e| e.time);
    // RFC 3339 allows lower-case t and z, and -00:00 for UTC.
    assert_eq!(
        at("2026-11-24t10:15:00z").unwrap(),
        utc("2026-11-24T10:15:00Z")
    );
    assert_eq!(
        at("2026-11-24T10:15:00-00:00").unwrap(),
        utc("2026-11-24T10:15:00Z")
    );
    // A leap second at the end of November is still in November.
    let leap = at("2026-11-30T23:59:60Z").unwrap();
    assert!(
        leap < utc("2026-12-01T00:00:00Z") && leap > utc("2026-11-30T23:59:59Z"),
        "{leap}"
    );
    // Minutes without seconds, and out-of-range offsets, are not RFC 3339.
    assert!(at("2026-11-24T10:15Z").is_err());
    assert!(at("2026-11-24T10:15:00+24:00").is_err());
}

#[test]
fn events_before_1970_are_refused_as_an_unset_time() {
    // Go's zero time.Time, and an instant offset back across the year.
    let at = |t: &str| SAMPLE.replace("2026-11-24T10:15:00Z", t);
    for time in [
        "0001-01-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
        "1970-01-01T00:30:00+01:00",
    ] {
        assert_eq!(
            reject(&at(time)),
            ("time".to_owned(), "time_before_1970"),
            "{time}"
        );
    }
    assert_eq!(
        decode(&at("0001-01-01T00:00:00Z")).unwrap_err().to_string(),
        "time: event time is before 1970-01-01T00:00:00Z; is the sender's timestamp unset (a zero time such as 0001-01-01)?"
    );
    assert!(decode(&at("1970-01-01T00:00:00Z")).is_ok());
}
