//! What the stages hand each other.
//!
//! aggregator -> rater: [`UsageUpdate`], one series' period-to-date value with the
//! windows of the period that changed. rater -> store and people: [`InvoiceLine`], one per
//! (customer, price, period), with its tier-by-tier breakdown so every cent can be
//! explained. Decimals serialise as strings, instants as RFC 3339 UTC.
//!
//! operator -> aggregator: a control record in the events topic, told from events by
//! the header [`CLOSE_PERIOD_HEADER`]. aggregator -> rater: a control record in the
//! windows topic, told from usage updates by the header [`SETTLED_HEADER`].

use std::cmp::Ordering;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::decimal::ExactAmount;
use crate::ids::EventKey;
use crate::money::Currency;
use crate::time::Period;

/// Kafka header of a control record in the events topic: its value, a period like
/// `2026-10`, closes that period and every earlier one for the partition the record is
/// in, at that point of the partition's order. `tally close-period` writes one to
/// every partition. Usage of a closed period read afterwards becomes an adjustment.
pub const CLOSE_PERIOD_HEADER: &str = "tally-close-period";

/// Kafka header of an event the aggregator forwarded from another partition than Kafka's
/// Java partitioner (murmur2) gives its subject: where it was read, as
/// `<partition>@<offset>`.
pub const FORWARDED_FROM_HEADER: &str = "tally-forwarded-from";

/// Kafka header of a forwarded event: the timestamp (ms) of the record it was
/// forwarded from, its "now" where it is counted, so the event is judged as when it
/// first reached Kafka (and a replay that forwards it again, alike).
pub const FORWARDED_TIMESTAMP_HEADER: &str = "tally-forwarded-timestamp";

/// Kafka header of a control record in the windows topic: its value, a period like
/// `2026-10`, says that period and every earlier one have settled in the partition the
/// record is in: the watermark is the dedupe horizon past their end, so no event can
/// change their usage or their adjustments any more, and no update of them follows.
/// The aggregator writes one ([`settled_record`]) each time a month settles.
pub const SETTLED_HEADER: &str = "tally-settled";

/// Kafka headers of a refused event's copy in the rejected topic: why it was refused
/// (a stable code, the field at fault or `event`, and a reason for people) and where
/// the event is: its topic, partition and offset when the aggregator refused it, its
/// index in its request ([`REJECTED_REQUEST_INDEX_HEADER`]) and its sender's tenant
/// (`tally.tenant`) when ingest did; the copy is cut to fit a record when
/// [`REJECTED_SOURCE_BYTES_HEADER`] gives the event's full size.
pub const REJECTED_CODE_HEADER: &str = "tally.error.code";
/// See [`REJECTED_CODE_HEADER`].
pub const REJECTED_FIELD_HEADER: &str = "tally.error.field";
/// See [`REJECTED_CODE_HEADER`].
pub const REJECTED_REASON_HEADER: &str = "tally.error.reason";
/// See [`REJECTED_CODE_HEADER`].
pub const REJECTED_SOURCE_TOPIC_HEADER: &str = "tally.source.topic";
/// See [`REJECTED_CODE_HEADER`].
pub const REJECTED_SOURCE_PARTITION_HEADER: &str = "tally.source.partition";
/// See [`REJECTED_CODE_HEADER`].
pub const REJECTED_SOURCE_OFFSET_HEADER: &str = "tally.source.offset";
/// On a copy ingest wrote: the event's index in its request, which ingest refused
/// (the event is in no other topic).
pub const REJECTED_REQUEST_INDEX_HEADER: &str = "tally.source.request_index";
/// On a cut copy only: the event's size in bytes.
pub const REJECTED_SOURCE_BYTES_HEADER: &str = "tally.source.bytes";
/// On a copy without the event's own headers only (they would not fit a record with
/// the reasons): their size in bytes.
pub const REJECTED_SOURCE_HEADERS_BYTES_HEADER: &str = "tally.source.headers_bytes";

/// Key and value of the windows-topic record saying `period` has settled (its header is
/// [`SETTLED_HEADER`]): one key per period, so compaction keeps every month's record.
pub fn settled_record(period: Period) -> (String, String) {
    (
        format!("tally-settled/{period}"),
        format!(r#"{{"settled_through":"{period}"}}"#),
    )
}

/// One customer's usage of one meter for one combination of group_by values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeriesKey {
    /// The customer (events' `subject`).
    pub customer: String,
    /// The meter's slug.
    pub meter: String,
    /// group_by values in the order of the meter's (sorted) dimension names.
    pub group: Vec<String>,
    /// Set on a series of late usage of a closed period, carried into a later period
    /// as an adjustment: the closed period it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adjusts: Option<Period>,
}

/// A [`SeriesKey`] read from a record without copying its strings (unless they hold
/// escapes). It hashes and compares like the owned key, so a map keyed by
/// `Arc<SeriesKey>` is searched with it and allocates only for a series it lacks: the
/// rater reads one per usage update.
#[derive(Debug, Clone, Hash, Deserialize)]
pub struct SeriesKeyRef<'a> {
    #[serde(borrow)]
    pub customer: Text<'a>,
    #[serde(borrow)]
    pub meter: Text<'a>,
    #[serde(borrow)]
    pub group: Vec<Text<'a>>,
    #[serde(default)]
    pub adjusts: Option<Period>,
}

impl SeriesKeyRef<'_> {
    /// The same key, holding its strings.
    pub fn into_owned(self) -> SeriesKeyRef<'static> {
        SeriesKeyRef {
            customer: self.customer.into_owned(),
            meter: self.meter.into_owned(),
            group: self.group.into_iter().map(Text::into_owned).collect(),
            adjusts: self.adjusts,
        }
    }

    pub fn to_owned(&self) -> SeriesKey {
        SeriesKey {
            customer: self.customer.to_string(),
            meter: self.meter.to_string(),
            group: self.group.iter().map(|g| g.to_string()).collect(),
            adjusts: self.adjusts,
        }
    }
}

impl<'a> From<&'a SeriesKey> for SeriesKeyRef<'a> {
    fn from(key: &'a SeriesKey) -> Self {
        SeriesKeyRef {
            customer: Text::from(key.customer.as_str()),
            meter: Text::from(key.meter.as_str()),
            group: key.group.iter().map(|g| Text::from(g.as_str())).collect(),
            adjusts: key.adjusts,
        }
    }
}

impl<'a> From<&'a Arc<SeriesKey>> for SeriesKeyRef<'a> {
    fn from(key: &'a Arc<SeriesKey>) -> Self {
        SeriesKeyRef::from(&**key)
    }
}

impl hashbrown::Equivalent<Arc<SeriesKey>> for SeriesKeyRef<'_> {
    fn equivalent(&self, key: &Arc<SeriesKey>) -> bool {
        *self.customer == key.customer
            && *self.meter == key.meter
            && self.adjusts == key.adjusts
            && self.group.len() == key.group.len()
            && self.group.iter().zip(&key.group).all(|(a, b)| **a == *b)
    }
}

/// A JSON string borrowed from the input, or owned when it held escapes. Hashes as
/// `str`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text<'a>(std::borrow::Cow<'a, str>);

impl Text<'_> {
    pub fn into_owned(self) -> Text<'static> {
        Text(std::borrow::Cow::Owned(self.0.into_owned()))
    }
}

impl<'a> From<&'a str> for Text<'a> {
    fn from(text: &'a str) -> Self {
        Text(std::borrow::Cow::Borrowed(text))
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Text<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::hash::Hash for Text<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        str::hash(&self.0, state);
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                text: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Text::from(text))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Text(std::borrow::Cow::Owned(text.to_owned())))
            }
        }
        deserializer.deserialize_str(Visit)
    }
}

/// Where an event stands in event time, for `latest`: later time wins, and equal times
/// are ordered by event key so the outcome never depends on arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EventOrder {
    #[serde(with = "crate::time::rfc3339_serde")]
    pub time: DateTime<Utc>,
    pub key: EventKey,
}

/// An aggregated value. `latest` is set for `latest` meters so the windows of a series
/// can be combined by event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterValue {
    pub value: Decimal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<EventOrder>,
}

impl MeterValue {
    pub const ZERO: MeterValue = MeterValue {
        value: Decimal::ZERO,
        latest: None,
    };

    /// The later of two `latest` values.
    pub fn later(self, other: MeterValue) -> MeterValue {
        match self.latest.cmp(&other.latest) {
            Ordering::Less => other,
            _ => self,
        }
    }
}

/// One series' usage in one billing period, as the aggregator emits it after a change:
/// the period-to-date value the rater prices, and the windows of the period that
/// changed since the series' last update. One record of `<prefix>.windows`: a series
/// touched by many events in a transaction costs one record, not one per window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageUpdate {
    pub series: Arc<SeriesKey>,
    /// Start of the billing period (calendar month).
    #[serde(with = "crate::time::rfc3339_serde")]
    pub period_start: DateTime<Utc>,
    /// The series' aggregate over the period so far: what the rater prices.
    pub period_to_date: MeterValue,
    /// The period's windows that changed, by start.
    pub windows: Vec<WindowUsage>,
}

/// One event-time window of a series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowUsage {
    #[serde(with = "crate::time::rfc3339_serde")]
    pub window_start: DateTime<Utc>,
    #[serde(with = "crate::time::rfc3339_serde")]
    pub window_end: DateTime<Utc>,
    /// The window's own aggregate.
    pub value: MeterValue,
    /// Counts the window's emissions, from 1; a consumer keeps the highest.
    pub revision: u64,
}

/// A series and windows of it, in time order.
pub type SeriesWindows = (Arc<SeriesKey>, Vec<WindowUsage>);

impl UsageUpdate {
    /// The Kafka record key of this update in `tally.windows`: one key per series and
    /// period, so compaction keeps each series' latest period-to-date value of every
    /// period. Each field is prefixed with its length, so values containing any
    /// character cannot make two series share a key.
    pub fn record_key(&self) -> String {
        let mut key = String::with_capacity(64);
        let mut field = |value: &str| {
            key.push_str(&value.len().to_string());
            key.push(':');
            key.push_str(value);
        };
        field(&self.series.customer);
        field(&self.series.meter);
        for g in &self.series.group {
            field(g);
        }
        if let Some(adjusts) = self.series.adjusts {
            field(&format!("adjusts {adjusts}"));
        }
        key.push('@');
        key.push_str(&self.period_start.timestamp().to_string());
        key
    }
}

/// What the rater reads of a [`UsageUpdate`] record: its series' period-to-date
/// value, which it prices, read without copying strings, and the changed windows as
/// `W`: `Vec<WindowUsage>` to store them, `serde::de::IgnoredAny` to skip them.
#[derive(Debug, Clone, Deserialize)]
pub struct UsageRecord<'a, W = Vec<WindowUsage>> {
    #[serde(borrow)]
    pub series: SeriesKeyRef<'a>,
    #[serde(with = "crate::time::rfc3339_serde")]
    pub period_start: DateTime<Utc>,
    pub period_to_date: MeterValue,
    #[serde(default)]
    pub windows: W,
}

impl<W> UsageRecord<'_, W> {
    /// The periods whose lines the update bills or is priced against: its own, and for
    /// an adjustment the closed period it adjusts.
    pub fn periods(&self) -> impl Iterator<Item = Period> {
        std::iter::once(Period::containing(self.period_start)).chain(self.series.adjusts)
    }

    /// The same, holding its strings: to keep past the record it was read from.
    pub fn into_owned(self) -> UsageRecord<'static, W> {
        UsageRecord {
            series: self.series.into_owned(),
            period_start: self.period_start,
            period_to_date: self.period_to_date,
            windows: self.windows,
        }
    }
}

/// One tier's share of a line, so finance can see how the subtotal was reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierCharge {
    /// 1-based position in the price's tier table (1 for a per_unit price).
    pub tier: usize,
    /// The tier's inclusive upper bound, or `inf`.
    pub up_to: String,
    /// Units billed in this tier (packages, for a package price).
    pub quantity: Decimal,
    /// For a package price (`transform_quantity`): units per package; `quantity` is
    /// then the usage divided by this and rounded to whole packages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_size: Option<Decimal>,
    pub unit_amount: Decimal,
    pub flat_amount: Decimal,
    /// `quantity * unit_amount + flat_amount`, exact (unrounded); one that needs more
    /// than 28 decimals is the nearest decimal with as many as fit (the line's subtotal
    /// is rounded from the exact charge, not from these).
    pub amount: Decimal,
}

impl TierCharge {
    /// `quantity * unit_amount + flat_amount`, every digit: `amount` itself wherever a
    /// decimal holds it.
    pub fn exact_amount(&self) -> ExactAmount {
        let mut amount = ExactAmount::product(self.quantity, self.unit_amount);
        amount.add(&ExactAmount::from(self.flat_amount));
        amount
    }
}

/// One invoice line: a customer's charge for one price in one period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceLine {
    /// Deterministic: the same customer, price, period and (for an adjustment) adjusted
    /// period always give the same id, so a re-rated line replaces its earlier version.
    pub id: String,
    /// Fingerprint of the price book the line was rated with.
    pub config_hash: String,
    pub customer: String,
    pub plan: String,
    pub price: String,
    pub meter: String,
    #[serde(with = "crate::time::rfc3339_serde")]
    pub period_start: DateTime<Utc>,
    #[serde(with = "crate::time::rfc3339_serde")]
    pub period_end: DateTime<Utc>,
    /// Usage of the meter in the period, matching the price's filter.
    pub quantity: Decimal,
    /// Sum of the tier amounts, rounded to the currency's minor unit.
    pub subtotal: Decimal,
    /// Line-item discount on the rounded subtotal, rounded the same way.
    pub discount: Decimal,
    /// `subtotal - discount`: what the customer pays for this line.
    pub amount: Decimal,
    pub currency: String,
    pub tiers: Vec<TierCharge>,
    /// Set on an adjustment line: usage of this closed period that arrived after it
    /// closed, billed in `period_start`'s period. Its amounts are what the late usage
    /// added to the closed period's line (tiers show the change per tier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adjusts_period: Option<Period>,
}

impl InvoiceLine {
    /// The amount as a whole number of the currency's minor unit (cents for usd, yen for
    /// jpy), for exact sums in SQL; `None` if it does not fit 64 bits.
    pub fn amount_minor(&self) -> Option<i64> {
        Currency::from_code(&self.currency)?.to_minor(self.amount)
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn a_usage_update_is_read_back_without_copies_and_finds_its_owned_series() {
        let series = Arc::new(SeriesKey {
            customer: "cust \"quoted\"".to_owned(),
            meter: "tokens".to_owned(),
            group: vec!["gpt-x".to_owned(), String::new()],
            adjusts: Some("2026-10".parse().unwrap()),
        });
        let start = DateTime::from_timestamp(1_793_491_200, 0).unwrap();
        let update = UsageUpdate {
            series: Arc::clone(&series),
            period_start: start,
            period_to_date: MeterValue {
                value: Decimal::new(255, 1),
                latest: None,
            },
            windows: vec![WindowUsage {
                window_start: start,
                window_end: start + chrono::Duration::hours(1),
                value: MeterValue {
                    value: Decimal::new(15, 1),
                    latest: None,
                },
                revision: 3,
            }],
        };
        let json = serde_json::to_vec(&update).unwrap();
        let read: UsageRecord<'_> = serde_json::from_slice(&json).unwrap();
        assert_eq!(read.period_start, update.period_start);
        assert_eq!(read.period_to_date, update.period_to_date);
        assert_eq!(read.windows, update.windows);
        let skipped: UsageRecord<'_, serde::de::IgnoredAny> =
            serde_json::from_slice(&json).unwrap();
        assert_eq!(skipped.period_to_date, update.period_to_date);
        assert_eq!(read.series.to_owned(), *series);
        assert!(matches!(read.series.meter.0, std::borrow::Cow::Borrowed(_)));
        let hasher = hashbrown::DefaultHashBuilder::default();
        assert_eq!(hasher.hash_one(&read.series), hasher.hash_one(&series));
        let mut map = hashbrown::HashMap::new();
        map.insert(Arc::clone(&series), 1);
        assert_eq!(map.get(&read.series), Some(&1));
        let other = SeriesKeyRef {
            adjusts: None,
            ..read.series.clone()
        };
        assert_eq!(map.get(&other), None);
    }
}
