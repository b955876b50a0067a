//! Value types of tally.toml that serde alone would get wrong: exact decimals (never
//! through f64), tier bounds with `"inf"`, human durations and JSONPath selectors.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::decimal;
use crate::price::UpTo;

const FLOAT_HINT: &str =
    "write decimal amounts as strings (for example \"0.89\"): TOML floats are binary and inexact";

/// A decimal written as a TOML string (`"0.89"`) or integer (`100`). TOML floats are
/// refused: `0.1` in binary is not 0.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExactDecimal(pub Decimal);

impl Serialize for ExactDecimal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0.normalize())
    }
}

impl<'de> Deserialize<'de> for ExactDecimal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(DecimalVisitor { allow_inf: false })? {
            UpTo::Finite(v) => Ok(ExactDecimal(v)),
            UpTo::Inf => Err(de::Error::custom(
                "\"inf\" is only allowed as a tier's up_to",
            )),
        }
    }
}

/// Reads a TOML integer or decimal string exactly, refusing floats; `"inf"` (or TOML's
/// bare `inf`) too when `allow_inf` (a tier bound).
struct DecimalVisitor {
    allow_inf: bool,
}

impl Visitor<'_> for DecimalVisitor {
    type Value = UpTo;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.allow_inf {
            f.write_str("an integer, a decimal string, or \"inf\" for the last tier")
        } else {
            f.write_str("a decimal string such as \"0.89\" or an integer")
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<UpTo, E> {
        Ok(UpTo::Finite(Decimal::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<UpTo, E> {
        Ok(UpTo::Finite(Decimal::from(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<UpTo, E> {
        // TOML's bare `inf` is exact, and means what "inf" does.
        if self.allow_inf && v == f64::INFINITY {
            return Ok(UpTo::Inf);
        }
        Err(E::custom(FLOAT_HINT))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<UpTo, E> {
        if self.allow_inf && v == "inf" {
            return Ok(UpTo::Inf);
        }
        let hint = if self.allow_inf {
            "; use \"inf\" for an open-ended tier"
        } else {
            ""
        };
        parse_decimal(v)
            .map(UpTo::Finite)
            .map_err(|e| E::custom(format!("{e}{hint}")))
    }
}

fn parse_decimal(v: &str) -> Result<Decimal, String> {
    decimal::parse_exact(v.trim()).map_err(|e| format!("{v:?} {e}"))
}

/// A tier's `up_to`: an integer, a decimal string, or `"inf"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpToInput(pub UpTo);

impl Serialize for UpToInput {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            UpTo::Finite(d) => s.collect_str(&d.normalize()),
            UpTo::Inf => s.serialize_str("inf"),
        }
    }
}

impl<'de> Deserialize<'de> for UpToInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DecimalVisitor { allow_inf: true })
            .map(UpToInput)
    }
}

/// A duration written for people: `"1h"`, `"35d"`, `"5m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// In the largest unit that divides it, as people write it in `tally.toml` (`"35d"`,
/// `"90m"`, `"250ms"`), not split into humantime's 30.44-day months; finer than a
/// millisecond, as humantime writes it.
impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.0.subsec_nanos().is_multiple_of(1_000_000) {
            return humantime::format_duration(self.0).fmt(f);
        }
        let millis = self.0.as_millis();
        let unit = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
        ]
        .into_iter()
        .find(|(size, _)| millis != 0 && millis.is_multiple_of(*size));
        match unit {
            Some((size, name)) => write!(f, "{}{name}", millis / size),
            None => write!(f, "{millis}ms"),
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| {
                de::Error::custom(format!(
                    "{text:?} is not a duration like \"1h\" or \"35d\": {e}"
                ))
            })
    }
}

/// A JSONPath into an event's `data`, restricted to member access: `$.tokens`,
/// `$.usage.input_tokens`, `$['model-name']`. That covers what meters need while keeping
/// extraction a plain walk over object keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    segments: Vec<String>,
}

impl JsonPath {
    /// The keys to follow from `data`, outermost first.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The path as written, e.g. `$.tokens`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// How the path is named in errors about an event: `data.tokens`.
    pub fn field_name(&self) -> String {
        let mut name = String::from("data");
        for s in &self.segments {
            name.push('.');
            name.push_str(s);
        }
        name
    }
}

impl FromStr for JsonPath {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            format!("{text:?} is not a supported JSONPath ({why}); write $.key, $.a.b or $['key']")
        };
        let mut rest = text
            .strip_prefix('$')
            .ok_or_else(|| bad("it must start with $"))?;
        let mut segments = Vec::new();
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix("['") {
                let end = after.find("']").ok_or_else(|| bad("unclosed ['"))?;
                segments.push(after[..end].to_owned());
                rest = &after[end + 2..];
            } else if let Some(after) = rest.strip_prefix('.') {
                let end = after.find(['.', '[']).unwrap_or(after.len());
                let key = &after[..end];
                if key.is_empty() || key == "*" {
                    return Err(bad("empty or wildcard key"));
                }
                segments.push(key.to_owned());
                rest = &after[end..];
            } else {
                return Err(bad("expected . or ['"));
            }
        }
        if segments.is_empty() {
            return Err(bad("it selects no key"));
        }
        Ok(JsonPath {
            text: text.to_owned(),
            segments,
        })
    }
}

impl Serialize for JsonPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for JsonPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_path_accepts_member_access_only() {
        let p: JsonPath = "$.usage.input_tokens".parse().unwrap();
        assert_eq!(p.segments(), ["usage", "input_tokens"]);
        assert_eq!(p.field_name(), "data.usage.input_tokens");
        let q: JsonPath = "$['model-name'].x".parse().unwrap();
        assert_eq!(q.segments(), ["model-name", "x"]);
        for bad in ["tokens", "$", "$.", "$..a", "$.a[0]", "$.*", "$['a'"] {
            assert!(bad.parse::<JsonPath>().is_err(), "{bad}");
        }
    }

    #[derive(Debug, Deserialize)]
    struct Amount {
        v: ExactDecimal,
    }

    #[test]
    fn decimals_are_exact_and_floats_refused() {
        let a: Amount = toml::from_str("v = \"5.001\"").unwrap();
        assert_eq!(a.v.0.to_string(), "5.001");
        let b: Amount = toml::from_str("v = 49").unwrap();
        assert_eq!(b.v.0, Decimal::from(49));
        let err = toml::from_str::<Amount>("v = 0.1").unwrap_err().to_string();
        assert!(err.contains("write decimal amounts as strings"), "{err}");
    }

    #[test]
    fn durations_are_written_in_the_largest_unit_that_divides_them_and_read_back() {
        for (secs, millis, text) in [
            (35 * 86_400, 0, "35d"),
            (90 * 60, 0, "90m"),
            (3_600, 0, "1h"),
            (86_400 + 1, 0, "86401s"),
            (0, 250, "250ms"),
            (0, 0, "0ms"),
        ] {
            let duration = Duration::from_secs(secs) + Duration::from_millis(millis);
            assert_eq!(HumanDuration(duration).to_string(), text);
            assert_eq!(humantime::parse_duration(text).unwrap(), duration, "{text}");
        }
        let fine = Duration::from_micros(1_500);
        let text = HumanDuration(fine).to_string();
        assert_eq!(humantime::parse_duration(&text).unwrap(), fine, "{text}");
    }
}
