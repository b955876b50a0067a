//! What the stages hand each other.
//!
//! aggregator -> rater: [`WindowUsage`], one window of one series with the series'
//! period-to-date value. rater -> store and people: [`InvoiceLine`], one per
//! (customer, price, period), with its tier-by-tier breakdown so every cent can be
//! explained. Decimals serialise as strings, instants as RFC 3339 UTC.

use std::cmp::Ordering;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::ids::EventKey;
use crate::money::Currency;
use crate::time::Period;

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

/// Where an event stands in event time, for `latest`: later time wins, and equal times
/// are ordered by event key so the outcome never depends on arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EventOrder {
    #[serde(with = "crate::time::rfc3339_serde")]
    pub time: DateTime<Utc>,
    pub key: EventKey,
}

/// An aggregated value. `latest` is set for `latest` meters so values of several series
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

/// One event-time window of one series, as the aggregator emits it after a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowUsage {
    pub series: Arc<SeriesKey>,
    #[serde(with = "crate::time::rfc3339_serde")]
    pub window_start: DateTime<Utc>,
    #[serde(with = "crate::time::rfc3339_serde")]
    pub window_end: DateTime<Utc>,
    /// The window's own aggregate.
    pub window_value: MeterValue,
    /// Start of the billing period (calendar month) the window lies in.
    #[serde(with = "crate::time::rfc3339_serde")]
    pub period_start: DateTime<Utc>,
    /// The series' aggregate over the period so far: what the rater prices.
    pub period_to_date: MeterValue,
    /// Counts the window's emissions, from 1; a consumer keeps the highest.
    pub revision: u64,
}

impl WindowUsage {
    /// The Kafka record key of this window in `tally.windows`: one key per series and
    /// window, so compaction keeps each window's latest revision (and with it every
    /// series' latest period-to-date value). Each field is prefixed with its length,
    /// so values containing any character cannot make two series share a key.
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
        key.push_str(&self.window_start.timestamp().to_string());
        key
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
    /// `quantity * unit_amount + flat_amount`, exact (unrounded).
    pub amount: Decimal,
}

/// One invoice line: a customer's charge for one price in one period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceLine {
    /// Deterministic: the same customer, price and period always give the same id, so a
    /// re-rated line replaces its earlier version.
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
        let minor = Currency::from_code(&self.currency)?.minor_units();
        let mut amount = self.amount;
        amount.rescale(minor);
        if amount.scale() != minor {
            return None;
        }
        i64::try_from(amount.mantissa()).ok()
    }
}
