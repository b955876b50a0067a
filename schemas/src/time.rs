//! Event time: billing periods (calendar months in UTC) and tumbling windows.
//!
//! In: UTC timestamps. Out: the period and window each instant falls in. Windows are
//! aligned to the Unix epoch and divide a day, so every window lies inside one period.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

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
#[error("period {input:?} is not a month written as YYYY-MM (for example 2026-11)")]
pub struct PeriodParseError {
    input: String,
}

impl FromStr for Period {
    type Err = PeriodParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PeriodParseError {
            input: s.to_owned(),
        };
        let (y, m) = s.split_once('-').ok_or_else(err)?;
        let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
        if y.len() != 4 || m.len() != 2 || !digits(y) || !digits(m) {
            return Err(err());
        }
        let year: i32 = y.parse().map_err(|_| err())?;
        let month: u32 = m.parse().map_err(|_| err())?;
        if !(1..=12).contains(&month) || !(1970..=2200).contains(&year) {
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

impl Default for WindowSize {
    fn default() -> Self {
        WindowSize { seconds: 3600 }
    }
}

/// Renders a UTC instant the way every Tally record does: RFC 3339 with `Z`.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
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
    fn period_rejects_malformed_months() {
        for bad in [
            "2026-13", "2026-1", "26-11", "2026/11", "", "2026-00", "2026-+1", "+026-11",
        ] {
            assert!(bad.parse::<Period>().is_err(), "{bad}");
        }
    }

    #[test]
    fn window_size_must_divide_a_day() {
        assert!(WindowSize::new(Duration::from_secs(3600)).is_some());
        assert!(WindowSize::new(Duration::from_secs(86_400)).is_some());
        assert!(WindowSize::new(Duration::from_secs(7 * 3600)).is_none());
        assert!(WindowSize::new(Duration::from_millis(1500)).is_none());
        assert!(WindowSize::new(Duration::ZERO).is_none());
        let hour = WindowSize::default();
        assert_eq!(hour.start_of(7199), 3600);
        assert_eq!(hour.start_of(-1), -3600);
    }
}
