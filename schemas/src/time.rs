//! Event time: billing periods (calendar months in UTC) and tumbling windows.
//!
//! In: UTC timestamps. Out: the period and window each instant falls in. Windows are
//! aligned to the Unix epoch and divide a day, so every window lies inside one period.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// The first year with billing periods: events before it are refused (an unset
/// timestamp, such as Go's zero time 0001-01-01, is the usual cause), so every period
/// that holds usage can be written and read back.
pub const FIRST_YEAR: i32 = 1970;

/// A billing period: one calendar month in UTC, `[first day 00:00, first day of next month 00:00)`.
/// Serialised as `"YYYY-MM"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Period {
    year: i32,
    month: u32,
}

impl Period {
    pub fn containing(t: DateTime<Utc>) -> Self {
        Period {
            year: t.year(),
            month: t.month(),
        }
    }

    pub fn start(&self) -> DateTime<Utc> {
        month_start(self.year, self.month)
    }

    pub fn end(&self) -> DateTime<Utc> {
        self.next().start()
    }

    /// The latest period that had ended by `t`: the one before the period `t` is in.
    pub fn latest_ended_by(t: DateTime<Utc>) -> Self {
        let Period { year, month } = Period::containing(t);
        if month == 1 {
            Period {
                year: year - 1,
                month: 12,
            }
        } else {
            Period {
                year,
                month: month - 1,
            }
        }
    }

    pub fn next(&self) -> Self {
        if self.month == 12 {
            Period {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Period {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        // Comparing year and month is cheaper than building the two bounds, and checked
        // once per event.
        Period::containing(t) == *self
    }
}

fn month_start(year: i32, month: u32) -> DateTime<Utc> {
    let date = NaiveDate::from_ymd_opt(year, month, 1).unwrap_or(NaiveDate::MIN);
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).unwrap_or_default())
}

impl Serialize for Period {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// Why a period could not be read.
#[derive(Debug, thiserror::Error)]
#[error("period {input:?} is not a month written as YYYY-MM (for example 2026-11){hint}")]
pub struct PeriodParseError {
    input: String,
    hint: &'static str,
}

impl FromStr for Period {
    type Err = PeriodParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // A day where a month belongs is likely a mid-month change that was meant.
        let names_a_day = s.len() == 10 && s.as_bytes()[7] == b'-';
        let err = || {
            PeriodParseError {
            input: s.to_owned(),
            hint: match names_a_day {
                true => "; billing periods are calendar months, so plan changes, `from` and `through` take effect at a month's start (Tally does not prorate within a month)",
                false => "",
            },
        }
        };
        let (y, m) = s.split_once('-').ok_or_else(err)?;
        let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
        if y.len() != 4 || m.len() != 2 || !digits(y) || !digits(m) {
            return Err(err());
        }
        let year: i32 = y.parse().map_err(|_| err())?;
        let month: u32 = m.parse().map_err(|_| err())?;
        if !(1..=12).contains(&month) || !(FIRST_YEAR..=2200).contains(&year) {
            return Err(err());
        }
        Ok(Period { year, month })
    }
}

/// The length of a tumbling window: a whole number of seconds that divides a day, so
/// windows never straddle a period boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WindowSize {
    seconds: u32,
}

impl WindowSize {
    const DAY: u32 = 86_400;
    pub const HOUR: WindowSize = WindowSize { seconds: 3600 };

    /// `None` when `d` is not a whole number of seconds dividing 24 hours.
    pub fn new(d: Duration) -> Option<Self> {
        let seconds = u32::try_from(d.as_secs()).ok()?;
        (d.subsec_nanos() == 0 && seconds > 0 && Self::DAY % seconds == 0)
            .then_some(WindowSize { seconds })
    }

    pub fn seconds(&self) -> u32 {
        self.seconds
    }

    /// Start of the window containing `t`, in Unix seconds.
    pub fn start_of(&self, unix_seconds: i64) -> i64 {
        unix_seconds - unix_seconds.rem_euclid(i64::from(self.seconds))
    }
}

/// Renders a UTC instant the way every Tally record does: RFC 3339 with `Z`.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    match whole_second_text(t) {
        Some(text) => String::from_utf8_lossy(&text).into_owned(),
        None => t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
    }
}

/// [`rfc3339`]'s text of a whole second in years 0 to 9999 (every window and period
/// boundary), written without `fmt`: the aggregator writes two per window it emits.
fn whole_second_text(t: DateTime<Utc>) -> Option<[u8; 20]> {
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    if t.nanosecond() != 0 {
        return None;
    }
    let mut text = *b"0000-00-00T00:00:00Z";
    let mut put = |at: usize, digits: usize, mut value: u32| {
        for i in (at..at + digits).rev() {
            text[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    Some(text)
}

/// Reads the common shape of an RFC 3339 UTC timestamp,
/// `YYYY-MM-DDTHH:MM:SS[.fraction of 1 to 9 digits]Z`, without chrono's general parser
/// (the aggregator reads one per event, the rater one per usage update). `None` for
/// any other text, valid or not: callers then ask chrono, so the two never disagree.
pub fn parse_utc_fast(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    let shaped = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[b.len() - 1] == b'Z';
    if !shaped {
        return None;
    }
    let number = |digits: &[u8]| {
        digits.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let nanosecond = match &b[19..b.len() - 1] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            number(fraction)? * 10u32.pow(9 - fraction.len() as u32)
        }
        _ => return None,
    };
    let second = number(&b[17..19])?;
    if second > 59 {
        return None; // a leap second: chrono's business
    }
    let date = NaiveDate::from_ymd_opt(
        i32::try_from(number(&b[0..4])?).ok()?,
        number(&b[5..7])?,
        number(&b[8..10])?,
    )?;
    let time =
        NaiveTime::from_hms_nano_opt(number(&b[11..13])?, number(&b[14..16])?, second, nanosecond)?;
    Some(date.and_time(time).and_utc())
}

/// Serde for the timestamps of Tally's records (`#[serde(with = ...)]`): the text of
/// [`rfc3339`], as chrono's own serde writes it, but written and read through the fast
/// paths above when it has their shape.
pub mod rfc3339_serde {
    use std::fmt;

    use chrono::{DateTime, Utc};
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        match super::whole_second_text(*t) {
            Some(text) => serializer.serialize_str(std::str::from_utf8(&text).unwrap_or_default()),
            None => serializer.serialize_str(&super::rfc3339(*t)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<DateTime<Utc>, D::Error> {
        struct Rfc3339;
        impl Visitor<'_> for Rfc3339 {
            type Value = DateTime<Utc>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                match super::parse_utc_fast(text) {
                    Some(t) => Ok(t),
                    None => text.parse().map_err(E::custom),
                }
            }
        }
        deserializer.deserialize_str(Rfc3339)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_spans_the_calendar_month_in_utc() {
        let p: Period = "2026-12".parse().unwrap();
        assert_eq!(rfc3339(p.start()), "2026-12-01T00:00:00Z");
        assert_eq!(rfc3339(p.end()), "2027-01-01T00:00:00Z");
        let feb: Period = "2028-02".parse().unwrap();
        assert_eq!(rfc3339(feb.end()), "2028-03-01T00:00:00Z");
        assert!(!p.contains(p.end()));
        assert!(p.contains(p.start()));
    }

    #[test]
    fn the_latest_period_ended_by_a_time_is_the_month_before_it() {
        let at = |t: &str| Period::latest_ended_by(t.parse().unwrap()).to_string();
        assert_eq!(at("2026-12-05T02:00:00Z"), "2026-11");
        assert_eq!(at("2026-12-01T00:00:00Z"), "2026-11");
        assert_eq!(at("2026-11-30T23:59:59Z"), "2026-10");
        assert_eq!(at("2027-01-01T00:00:00Z"), "2026-12");
    }

    #[test]
    fn period_rejects_malformed_months() {
        for bad in [
            "2026-13", "2026-1", "26-11", "2026/11", "", "2026-00", "2026-+1", "+026-11",
        ] {
            assert!(bad.parse::<Period>().is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn fast_text_is_chronos(secs in -62_000_000_000i64..300_000_000_000, nanos in proptest::prop_oneof![proptest::strategy::Just(0u32), 0u32..1_000_000_000]) {
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            let text = rfc3339(t);
            proptest::prop_assert_eq!(&text, &t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
            let json = serde_json::to_string(&Stamp(t)).unwrap();
            proptest::prop_assert_eq!(&json, &serde_json::to_string(&t).unwrap());
            proptest::prop_assert_eq!(serde_json::from_str::<Stamp>(&json).unwrap().0, t);
        }

        #[test]
        fn fast_parse_agrees_with_chrono(text in "[0-9]{2}[0-9]{2}-(0[0-9]|1[0-3])-([0-2][0-9]|3[0-2])T([01][0-9]|2[0-4]):[0-6][0-9]:[0-6][0-9](\\.[0-9]{0,11})?[Zz+]?") {
            let chrono = DateTime::parse_from_rfc3339(&text).ok().map(|t| t.with_timezone(&Utc));
            let fast = parse_utc_fast(&text);
            if fast.is_some() {
                proptest::prop_assert_eq!(fast, chrono);
            }
            // And every valid text of the common shape takes the fast path (a leap
            // second is chrono's to read).
            let fraction = text.strip_suffix('Z').and_then(|t| t.get(19..));
            let common = !text[17..].starts_with("60")
                && fraction.is_some_and(|f| f.is_empty() || (f.starts_with('.') && (2..=10).contains(&f.len())));
            if chrono.is_some() && common {
                proptest::prop_assert!(fast.is_some(), "{} left to chrono", text);
            }
        }
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Stamp(#[serde(with = "rfc3339_serde")] DateTime<Utc>);

    #[test]
    fn fast_parse_takes_the_common_shapes_and_leaves_the_rest_to_chrono() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        for common in [
            "2026-10-01T00:08:15.546Z",
            "2026-10-01T00:00:00Z",
            "2028-02-29T23:59:59.123456789Z",
        ] {
            assert_eq!(parse_utc_fast(common), Some(at(common)), "{common}");
        }
        for other in [
            "2026-10-01T02:00:00+02:00",
            "2026-10-01t00:00:00z",
            "2016-12-31T23:59:60Z",
            "2026-02-30T00:00:00Z",
            "2026-10-01T00:00:00.Z",
            "2026-10-01T00:00:00.1234567891Z",
            "2026-10-01 00:00:00Z",
        ] {
            assert_eq!(parse_utc_fast(other), None, "{other}");
        }
    }

    #[test]
    fn window_size_must_divide_a_day() {
        assert!(WindowSize::new(Duration::from_secs(3600)).is_some());
        assert!(WindowSize::new(Duration::from_secs(86_400)).is_some());
        assert!(WindowSize::new(Duration::from_secs(7 * 3600)).is_none());
        assert!(WindowSize::new(Duration::from_millis(1500)).is_none());
        assert!(WindowSize::new(Duration::ZERO).is_none());
        let hour = WindowSize::HOUR;
        assert_eq!(hour.start_of(7199), 3600);
        assert_eq!(hour.start_of(-1), -3600);
    }
}
