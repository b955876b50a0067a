//! Fuzzing on stable Rust with proptest: the event decoder and the configuration parser
//! must turn any input into a value or an error, never a panic, and whatever they accept
//! must satisfy the invariants the rest of the pipeline relies on.

// Helpers panic on unexpected input: that is how a test fails.
#![allow(clippy::unwrap_used)]

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use tally_schemas::config::{Config, ConfigError};
use tally_schemas::event::{EventDecoder, ReadingValue};
use tally_schemas::price::{Rate, UpTo};
use tally_schemas::time::Period;

const CASES: u32 = 2000;

const METERS: &str = r#"
[[meters]]
slug = "resolutions"
event_type = "ai.resolution"
aggregation = "count"

[[meters]]
slug = "tokens"
event_type = "llm.tokens"
aggregation = "sum"
value_property = "$.tokens"
group_by = { model = "$.model", region = "$.meta.region" }

[[meters]]
slug = "input"
event_type = "llm.tokens"
aggregation = "max"
value_property = "$.usage.input_tokens"

[[meters]]
slug = "users"
event_type = "app.active"
aggregation = "unique_count"
value_property = "$.user"

[[meters]]
slug = "seats"
event_type = "app.seats"
aggregation = "latest"
value_property = "$['seat-count']"
"#;

/// A configuration using every feature, for mutation.
const FULL_CONFIG: &str = r#"[[meters]]
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
slug = "users"
event_type = "app.active"
aggregation = "unique_count"
value_property = "$.user"

[[plans]]
id = "pro"
currency = "usd"
rounding = "half_even"

[[plans.prices]]
id = "resolutions"
meter = "resolutions"
billing_scheme = "tiered"
tiers_mode = "graduated"
tiers = [
  { up_to = 100, flat_amount = "49" },
  { up_to = 1000, unit_amount = "0.89" },
  { up_to = "inf", unit_amount = "0.69" },
]

[[plans.prices]]
id = "gpt-tokens"
meter = "tokens"
billing_scheme = "per_unit"
unit_amount = "0.002"
transform_quantity = { divide_by = 1000, round = "up" }
filter = { model = "gpt-x" }

[[plans.prices]]
id = "users"
meter = "users"
billing_scheme = "tiered"
tiers_mode = "volume"
tiers = [
  { up_to = 10, unit_amount = "2", flat_amount = "5" },
  { up_to = "inf", unit_amount = "1", flat_amount = "20" },
]

[[plans]]
id = "kw"
currency = "kwd"

[[plans.prices]]
id = "resolutions"
meter = "resolutions"
billing_scheme = "per_unit"
unit_amount = "0.0125"

[[customers]]
id = "cust_acme"
plan = "pro"
discounts = [{ price = "resolutions", percent_off = "12.5" }]

[[customers]]
id = "cust_kw"
plan = "kw"
discounts = [{ price = "resolutions", amount_off = 1 }]

[aggregator]
window = "1h"
dedupe_horizon = "35d"

[events]
max_future_skew = "5m"
"#;

/// Valid lines of every shape the meters read.
const VALID_LINES: [&str; 5] = [
    r#"{"specversion":"1.0","id":"evt-81","source":"fin-agent","type":"ai.resolution","subject":"cust_acme","time":"2026-11-24T10:15:00Z","data":{"conversation_id":"c-9"}}"#,
    r#"{"specversion":"1.0","id":"t-1","source":"llm","type":"llm.tokens","subject":"cust_acme","time":"2026-11-24T10:15:00+01:00","data":{"tokens":5.001,"model":"gpt-x","meta":{"region":"eu"},"usage":{"input_tokens":"12"}}}"#,
    r#"{"specversion":"1.0","id":"u-1","source":"app","type":"app.active","subject":"cust_b","time":"2026-11-30T23:59:59Z","data":{"user":"u\"1"}}"#,
    r#"{"specversion":"1.0","id":"s-1","source":"app","type":"app.seats","subject":"cust_b","time":"2026-11-01T00:00:00Z","data":{"seat-count":1e3},"traceparent":"00-1"}"#,
    r#"{"specversion":"1.0","id":"x-1","source":"x","type":"unmetered","subject":"c","time":"2026-11-01T00:00:00Z","data":[1,{"a":null}]}"#,
];

/// JSON fragments to splice into valid lines.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "null",
    "true",
    "false",
    "0",
    "-",
    "-0",
    "1e999",
    "1e-999",
    "99999999999999999999999999999999",
    "0.0000000000000000000000000000001",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"\u{10ffff}\"",
    "\"data\":",
    "\"time\":",
    "\"id\":1,",
    "{\"a\":",
    "\"\"",
    " ",
    "\n",
    "\t",
    "\u{0}",
    "NaN",
    "Infinity",
    "\u{feff}",
];

fn config() -> Config {
    Config::parse(METERS, "fuzz.toml").expect("fuzz meters are valid")
}

/// Decodes, and checks what an accepted event must satisfy.
fn check_decode(config: &Config, line: &[u8]) {
    let decoder = EventDecoder::new(config, Utc.with_ymd_and_hms(2026, 12, 15, 0, 0, 0).unwrap());
    match decoder.decode(line) {
        Ok(event) => {
            assert!(!event.subject.trim().is_empty());
            assert!(!event.event_type.trim().is_empty());
            assert!(event.time <= Utc.with_ymd_and_hms(2026, 12, 15, 0, 5, 0).unwrap());
            assert_eq!(
                event.readings.len(),
                config.meters_for(&event.event_type).len()
            );
            for reading in &event.readings {
                if let ReadingValue::Number(n) = reading.value {
                    assert!(!n.is_sign_negative() || n.is_zero(), "negative reading {n}");
                }
                let meter = config.meter(reading.meter);
                assert_eq!(reading.group.len(), meter.group_by.len());
            }
        }
        Err(e) => {
            assert!(!e.field.is_empty());
            assert!(!e.problem.code().is_empty());
            assert!(!e.to_string().is_empty());
        }
    }
    agrees_with_serde_json(config, line);
}

/// Differential check: what the decoder accepts is a JSON object for serde_json, and
/// what it calls invalid JSON, serde_json cannot parse either.
fn agrees_with_serde_json(config: &Config, line: &[u8]) {
    let decoder = EventDecoder::new(config, Utc.with_ymd_and_hms(2026, 12, 15, 0, 0, 0).unwrap());
    let ours = decoder.decode(line);
    let theirs = serde_json::from_slice::<serde_json::Value>(line);
    match (&ours, &theirs) {
        (Ok(_), Ok(v)) => assert!(
            v.is_object(),
            "accepted a non-object: {}",
            String::from_utf8_lossy(line)
        ),
        // serde_json stops at 128 levels of nesting; the decoder's own limit may differ.
        (Ok(_), Err(e)) if e.to_string().contains("recursion limit") => {}
        // serde_json reads numbers as f64 and refuses ones beyond its range; JSON's
        // grammar has no range, and the decoder reads numbers as exact text.
        (Ok(_), Err(e)) if e.to_string().contains("number out of range") => {}
        // JSON's grammar allows lone surrogate escapes (RFC 8259, 8.2); serde_json
        // refuses them, the decoder accepts them where it does not read the string.
        (Ok(_), Err(_)) if has_surrogate_escape(line) => {}
        (Ok(_), Err(e)) => panic!(
            "accepted what serde_json refuses ({e}): {}",
            String::from_utf8_lossy(line)
        ),
        (Err(e), Ok(_)) if e.field == "event" => assert!(
            !matches!(
                e.problem.code(),
                "invalid_json" | "invalid_utf8" | "not_an_object"
            ) || !theirs.as_ref().is_ok_and(|v| v.is_object()),
            "called valid JSON {:?}: {}",
            e.problem,
            String::from_utf8_lossy(line)
        ),
        _ => {}
    }
}

/// Parses, and checks what a validated price book must satisfy.
fn check_parse(text: &str) {
    match Config::parse(text, "fuzz.toml") {
        Ok(config) => {
            for plan in &config.plans {
                assert!(!plan.prices.is_empty());
                for price in &plan.prices {
                    if let Some(usage) = &price.usage {
                        assert!((usage.meter.0 as usize) < config.meters.len());
                    }
                    match &price.rate {
                        Rate::PerUnit {
                            unit_amount,
                            package,
                        } => {
                            assert!(!unit_amount.is_sign_negative() || unit_amount.is_zero());
                            if let Some(p) = package {
                                assert!(p.divide_by > rust_decimal::Decimal::ZERO);
                            }
                        }
                        Rate::Tiered { tiers, .. } => {
                            assert_eq!(tiers.last().map(|t| t.up_to), Some(UpTo::Inf));
                            let bounds: Vec<_> = tiers
                                .iter()
                                .filter_map(|t| match t.up_to {
                                    UpTo::Finite(b) => Some(b),
                                    UpTo::Inf => None,
                                })
                                .collect();
                            assert_eq!(bounds.len() + 1, tiers.len(), "only the last tier is inf");
                            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
                            assert!(bounds.iter().all(|b| *b > rust_decimal::Decimal::ZERO));
                        }
                    }
                }
            }
            for customer in config.customers.values() {
                for period in ["1970-01", "2026-11", "2200-12"] {
                    let subscription = customer.subscription(period.parse().unwrap());
                    assert!((subscription.plan.0 as usize) < config.plans.len());
                }
            }
        }
        Err(ConfigError::Invalid { issues, .. }) => {
            assert!(!issues.is_empty());
            assert!(issues
                .iter()
                .all(|i| !i.at.is_empty() && !i.message.is_empty()));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

#[test]
fn the_valid_lines_decode() {
    let config = config();
    let decoder = EventDecoder::new(
        &config,
        Utc.with_ymd_and_hms(2026, 12, 15, 0, 0, 0).unwrap(),
    );
    for line in VALID_LINES {
        assert!(decoder.decode(line.as_bytes()).is_ok(), "{line}");
    }
    assert!(Config::parse(FULL_CONFIG, "full.toml").is_ok());
}

#[test]
fn decoder_survives_truncation_at_every_byte() {
    let config = config();
    for line in VALID_LINES {
        let bytes = line.as_bytes();
        for end in 0..=bytes.len() {
            check_decode(&config, &bytes[..end]);
            check_decode(&config, &bytes[end..]);
        }
    }
}

#[test]
fn decoder_survives_deep_nesting_in_data() {
    let config = config();
    for depth in [1usize, 10, 100, 127, 128, 129, 500, 5_000, 50_000] {
        for (open, close) in [("{\"tokens\":", "}"), ("[", "]"), ("{\"usage\":", "}")] {
            let data = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            for event_type in ["llm.tokens", "unmetered"] {
                let line = format!(
                    r#"{{"specversion":"1.0","id":"d","source":"s","type":"{event_type}","subject":"c","time":"2026-11-01T00:00:00Z","data":{data}}}"#
                );
                check_decode(&config, line.as_bytes());
                // And unclosed.
                check_decode(&config, &line.as_bytes()[..line.len() - depth / 2]);
            }
        }
    }
}

fn byte_flips() -> impl Strategy<Value = (usize, Vec<(usize, u8)>)> {
    (
        0..VALID_LINES.len(),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    )
}

fn insertions() -> impl Strategy<Value = (usize, Vec<(usize, usize)>)> {
    (
        0..VALID_LINES.len(),
        proptest::collection::vec((any::<usize>(), 0..TOKENS.len()), 1..6),
    )
}

/// A long number, possibly with sign, fraction and exponent.
fn long_number() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        "[0-9]{1,400}",
        proptest::option::of("[0-9]{0,400}"),
        proptest::option::of(("[eE]", "[+-]?", "[0-9]{1,30}")),
        any::<bool>(),
    )
        .prop_map(|(negative, int, frac, exp, quoted)| {
            let mut n = String::new();
            if negative {
                n.push('-');
            }
            n.push_str(&int);
            if let Some(f) = frac {
                n.push('.');
                n.push_str(&f);
            }
            if let Some((e, sign, digits)) = exp {
                n.push_str(&e);
                n.push_str(&sign);
                n.push_str(&digits);
            }
            if quoted {
                format!("\"{n}\"")
            } else {
                n
            }
        })
}

/// Whether the text has a `\uD800`-`\uDFFF` escape.
fn has_surrogate_escape(line: &[u8]) -> bool {
    line.windows(4).any(|w| {
        w[0] == b'\\'
            && w[1] == b'u'
            && w[2].eq_ignore_ascii_case(&b'd')
            && matches!(w[3].to_ascii_lowercase(), b'8'..=b'9' | b'a'..=b'f')
    })
}

/// Values that are mostly JSON: numbers of every shape (and near misses), strings
/// with escapes (including surrogates and bad escapes), literals, small containers.
fn json_ish_value() -> impl Strategy<Value = String> {
    let number = r"-?(0|[1-9][0-9]{0,30}|0[0-9]{1,3}|)(\.[0-9]{0,30})?([eE][+-]?[0-9]{0,4})?";
    let string = r#""([a-z ]|\\u[0-9a-fA-F]{4}|\\u[dD][89abAB][0-9a-f]{2}|\\u[dD][c-fC-F][0-9a-f]{2}|\\["\\/bfnrt]|\\[a-z0-9]|[\u{80}-\u{10ffff}]|[\x00-\x1f])*"?"#;
    let literal = "(true|false|null|tru|nulll|NaN|-Infinity)";
    let leaf = prop_oneof![number, string, literal];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-z]{0,3}", inner), 0..4).prop_map(|v| {
                let members: Vec<String> =
                    v.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        check_decode(&config(), &bytes);
    }

    #[test]
    fn decoder_never_panics_on_arbitrary_strings(text in any::<String>()) {
        check_decode(&config(), text.as_bytes());
    }

    #[test]
    fn decoder_never_panics_on_json_like_text(text in r#"[{}\[\]":,0-9a-z.eE+\- \\]{0,300}"#) {
        check_decode(&config(), text.as_bytes());
        let wrapped = format!(r#"{{"specversion":"1.0","id":"i","source":"s","type":"llm.tokens","subject":"c","time":"2026-11-01T00:00:00Z","data":{text}}}"#);
        check_decode(&config(), wrapped.as_bytes());
    }

    #[test]
    fn decoder_never_panics_on_byte_flips((which, flips) in byte_flips()) {
        let mut line = VALID_LINES[which].as_bytes().to_vec();
        for (at, byte) in flips {
            let at = at % line.len();
            line[at] = byte;
        }
        check_decode(&config(), &line);
    }

    #[test]
    fn decoder_never_panics_on_inserted_json_tokens((which, inserts) in insertions()) {
        let mut line = VALID_LINES[which].as_bytes().to_vec();
        for (at, token) in inserts {
            let at = at % (line.len() + 1);
            line.splice(at..at, TOKENS[token].bytes());
        }
        check_decode(&config(), &line);
    }

    #[test]
    fn decoder_never_panics_on_long_numbers(number in long_number(), field in 0usize..5) {
        let data = match field {
            0 => format!(r#"{{"tokens":{number},"model":"m"}}"#),
            1 => format!(r#"{{"tokens":1,"model":{number}}}"#),
            2 => format!(r#"{{"tokens":1,"usage":{{"input_tokens":{number}}}}}"#),
            3 => format!(r#"{{"tokens":1,"meta":{{"region":{number}}}}}"#),
            _ => format!(r#"{{"user":{number}}}"#),
        };
        let event_type = if field == 4 { "app.active" } else { "llm.tokens" };
        let line = format!(
            r#"{{"specversion":"1.0","id":"n","source":"s","type":"{event_type}","subject":"c","time":"2026-11-01T00:00:00Z","data":{data}}}"#
        );
        check_decode(&config(), line.as_bytes());
    }

    #[test]
    fn decoder_agrees_with_serde_json_on_generated_values(value in json_ish_value(), slot in 0usize..4) {
        let line = match slot {
            0 => format!(r#"{{"specversion":"1.0","id":"i","source":"s","type":"ai.resolution","subject":"c","time":"2026-11-01T00:00:00Z","ext":{value}}}"#),
            1 => format!(r#"{{"specversion":"1.0","id":"i","source":"s","type":"llm.tokens","subject":"c","time":"2026-11-01T00:00:00Z","data":{{"tokens":{value},"model":{value}}}}}"#),
            2 => format!(r#"{{"specversion":"1.0","id":"i","source":"s","type":"unmetered","subject":"c","time":"2026-11-01T00:00:00Z","data":[{value}]}}"#),
            _ => format!(r#"{{"specversion":"1.0","id":{value},"source":"s","type":"app.active","subject":"c","time":"2026-11-01T00:00:00Z","data":{{"user":{value}}}}}"#),
        };
        check_decode(&config(), line.as_bytes());
    }

    #[test]
    fn config_parse_never_panics_on_arbitrary_strings(text in any::<String>()) {
        check_parse(&text);
    }

    #[test]
    fn config_parse_never_panics_on_toml_like_text(text in r#"(\[\[?(meters|plans|plans\.prices|customers|events|aggregator)\]\]?\n|[a-z_]{1,12} = ("[a-z0-9.$\-]{0,8}"|-?[0-9]{1,5}|[0-9]\.[0-9]|\{ [a-z_]{1,8} = [0-9"a-z]{1,4} \}|\[\])\n){0,30}"#) {
        check_parse(&text);
        check_parse(&format!("{METERS}\n{text}"));
    }

    #[test]
    fn config_parse_never_panics_when_a_line_is_deleted_or_duplicated(at in any::<usize>(), duplicate in any::<bool>()) {
        let mut lines: Vec<&str> = FULL_CONFIG.lines().collect();
        let at = at % lines.len();
        if duplicate {
            lines.insert(at, lines[at]);
        } else {
            lines.remove(at);
        }
        check_parse(&lines.join("\n"));
    }

    #[test]
    fn config_parse_never_panics_when_a_number_changes(which in any::<usize>(), replacement in prop_oneof![
        Just("0".to_owned()), Just("-1".to_owned()), Just("1.5".to_owned()), Just("\"-0.5\"".to_owned()),
        Just("99999999999999999999999999999999".to_owned()), Just("\"1e-40\"".to_owned()),
        Just("\"inf\"".to_owned()), Just("nan".to_owned()), Just("-inf".to_owned()),
        "-?[0-9]{1,25}", "\"-?[0-9]{1,30}(\\.[0-9]{0,30})?\""
    ]) {
        let spans = number_spans(FULL_CONFIG);
        let (start, end) = spans[which % spans.len()];
        let text = format!("{}{}{}", &FULL_CONFIG[..start], replacement, &FULL_CONFIG[end..]);
        check_parse(&text);
    }

    #[test]
    fn config_parse_never_panics_when_values_are_swapped(a in any::<usize>(), b in any::<usize>()) {
        let mut lines: Vec<String> = FULL_CONFIG.lines().map(str::to_owned).collect();
        let assignments: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].contains(" = ")).collect();
        let (i, j) = (assignments[a % assignments.len()], assignments[b % assignments.len()]);
        let (key_i, value_i) = lines[i].split_once(" = ").map(|(k, v)| (k.to_owned(), v.to_owned())).unwrap();
        let (key_j, value_j) = lines[j].split_once(" = ").map(|(k, v)| (k.to_owned(), v.to_owned())).unwrap();
        lines[i] = format!("{key_i} = {value_j}");
        lines[j] = format!("{key_j} = {value_i}");
        check_parse(&lines.join("\n"));
    }
}

/// Byte ranges of the digit runs in `text` (numbers bare or inside strings).
fn number_spans(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                i += 1;
            }
            spans.push((start, i));
        } else {
            i += 1;
        }
    }
    spans
}

/// A month of 2026 (1 to 12), or of its neighbours (0 is 2025-12, 13 is 2027-01).
fn month(m: u32) -> Period {
    let (year, month) = match m {
        0 => (2025, 12),
        13 => (2027, 1),
        m => (2026, m),
    };
    format!("{year}-{month:02}").parse().unwrap()
}

/// A price book of plans p0 to p3 (p_i replaced, if `replaced[i]` says so, by a later
/// plan from a month) and one customer on `plan` from `from` through `through`, with
/// its plan changes.
fn replacement_book(
    replaced: &[Option<(usize, u32)>],
    (plan, from, through): (usize, Option<u32>, Option<u32>),
    changes: &[(u32, usize)],
) -> String {
    let mut toml = String::from(METERS);
    for (i, replacement) in replaced.iter().enumerate() {
        toml.push_str(&format!("\n[[plans]]\nid = \"p{i}\"\ncurrency = \"usd\"\n"));
        if let Some((successor, from)) = replacement {
            let from = month(*from);
            toml.push_str(&format!(
                "replaced_by = {{ plan = \"p{successor}\", from = \"{from}\" }}\n"
            ));
        }
        toml.push_str(&format!(
            "\n[[plans.prices]]\nid = \"resolutions\"\nmeter = \"resolutions\"\nbilling_scheme = \"per_unit\"\nunit_amount = \"0.{i}9\"\n"
        ));
    }
    toml.push_str(&format!(
        "\n[[customers]]\nid = \"cust\"\nplan = \"p{plan}\"\n"
    ));
    for (key, m) in [("from", from), ("through", through)] {
        if let Some(m) = m {
            toml.push_str(&format!("{key} = \"{}\"\n", month(m)));
        }
    }
    for (from, plan) in changes {
        let from = month(*from);
        toml.push_str(&format!(
            "\n[[customers.plan_changes]]\nfrom = \"{from}\"\nplan = \"p{plan}\"\ndiscounts = []\n"
        ));
    }
    toml
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Whatever the replacements, the plan changes and the customer's months, each
    /// month is billed by the plan its own entry names then, followed along the
    /// replacements that have started by that month.
    #[test]
    fn replaced_plans_bill_each_month_by_the_plan_the_chain_reaches_then(
        // p_i is replaced by a later plan (so no loop), from a month of 2026.
        replaced in proptest::collection::vec(proptest::option::of((1usize..4, 1u32..13)), 4),
        plan in 0usize..4,
        from in proptest::option::of(0u32..7),
        through in proptest::option::of(6u32..14),
        change_months in proptest::collection::btree_set(1u32..13, 0..4),
        change_plans in proptest::collection::vec(0usize..4, 4),
    ) {
        let replaced: Vec<Option<(usize, u32)>> = (replaced.iter().enumerate())
            .map(|(i, r)| r.filter(|&(successor, _)| successor > i))
            .collect();
        // Plan changes must come after `from` and not after `through`.
        let changes: Vec<(u32, usize)> = (change_months.iter().copied())
            .filter(|&m| from.is_none_or(|from| m > from) && through.is_none_or(|through| m <= through))
            .zip(change_plans.iter().copied())
            .collect();
        let config = Config::parse(&replacement_book(&replaced, (plan, from, through), &changes), "book.toml")
            .unwrap_or_else(|e| panic!("{e}"));
        let customer = &config.customers["cust"];
        for m in 0..14 {
            let period = month(m);
            if !customer.bills(period) {
                continue;
            }
            let own = (changes.iter().rev()).find(|&&(from, _)| from <= m).map_or(plan, |&(_, plan)| plan);
            let mut expected = own;
            while let Some((successor, _)) = replaced[expected].filter(|&(_, from)| from <= m) {
                expected = successor;
            }
            let billed = &config.plan(customer.subscription(period).plan).id;
            prop_assert_eq!(billed, &format!("p{expected}"), "{}", period);
        }
    }
}
