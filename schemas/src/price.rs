//! Validated price books: what a plan charges for each meter.
//!
//! The vocabulary is Stripe Billing's (per_unit, tiered graduated|volume, package via
//! transform_quantity, flat and unit amounts per tier, flat-rate fees, line-item
//! discounts). These types
//! only hold tables that passed validation: tiers are non-empty and strictly increasing,
//! only the last is open-ended, amounts are non-negative, a package divisor is positive.
//! The arithmetic lives in the rater.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::config::MeterId;
use crate::money::{Currency, RoundingMode};

/// A plan: a currency, a rounding mode and the prices every subscriber is billed.
#[derive(Debug, Clone)]
pub struct Plan {
    pub id: String,
    pub currency: Currency,
    pub rounding: RoundingMode,
    pub prices: Vec<Price>,
}

/// One priced item of a plan; each subscribed customer gets one invoice line per price
/// per period, zero usage included.
#[derive(Debug, Clone)]
pub struct Price {
    pub id: String,
    /// For people: shown where a line of the price is explained.
    pub description: Option<String>,
    /// The usage the price bills; `None` for a flat fee, billed once in each month the
    /// customer is billed, whatever its usage (Stripe's flat-rate price: quantity 1).
    pub usage: Option<Usage>,
    pub rate: Rate,
}

/// The usage a price bills: its meter's, matching its filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub meter: MeterId,
    /// `(group_by index, value)` pairs the usage must match; empty matches all usage.
    pub filter: Vec<(usize, String)>,
}

impl Usage {
    /// Whether usage with these group_by values (in the meter's group_by order) counts
    /// towards the price.
    pub fn matches<S: AsRef<str>>(&self, group: &[S]) -> bool {
        self.filter
            .iter()
            .all(|(i, v)| group.get(*i).is_some_and(|g| g.as_ref() == v))
    }
}

impl Price {
    /// Whether usage of `meter` with these group_by values counts towards this price.
    pub fn bills<S: AsRef<str>>(&self, meter: MeterId, group: &[S]) -> bool {
        (self.usage.as_ref()).is_some_and(|u| u.meter == meter && u.matches(group))
    }

    /// The quantity a line of this price bills for `usage` (its meter's, combined):
    /// a flat fee bills one, whatever the usage.
    pub fn quantity(&self, usage: Decimal) -> Decimal {
        match self.usage {
            Some(_) => usage,
            None => Decimal::ONE,
        }
    }
}

/// How a quantity turns into an amount.
#[derive(Debug, Clone, PartialEq)]
pub enum Rate {
    /// `quantity * unit_amount`, or with a package, `round(quantity / divide_by) * unit_amount`.
    PerUnit {
        unit_amount: Decimal,
        package: Option<Package>,
    },
    /// A tier table in graduated or volume mode.
    Tiered { mode: TiersMode, tiers: Tiers },
}

/// Stripe's `transform_quantity`: bill whole packages of `divide_by` units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Package {
    /// Units per package; always positive.
    pub divide_by: Decimal,
    pub round: PackageRounding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackageRounding {
    /// A started package is billed whole (8 units in packages of 5 bill 2 packages).
    Up,
    /// Only complete packages are billed (8 units in packages of 5 bill 1 package).
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TiersMode {
    /// Each unit is priced at the tier it falls in; every tier reached adds its flat amount.
    Graduated,
    /// All units are priced at the tier the total falls in, plus that tier's flat amount.
    Volume,
}

/// A tier table that can be rated: at least one tier, finite bounds positive and
/// strictly increasing, only the last tier open-ended, no negative amount. Only
/// [`Tiers::new`] makes one, so an impossible table cannot reach the rater.
#[derive(Debug, Clone, PartialEq)]
pub struct Tiers(Vec<Tier>);

/// A rule a tier table breaks: the tier (`None`: the table) and its field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierProblem {
    pub tier: Option<usize>,
    pub field: &'static str,
    pub message: String,
}

impl Tiers {
    /// The table, or every rule it breaks (validation reports them where they are).
    pub fn new(tiers: Vec<Tier>) -> Result<Self, Vec<TierProblem>> {
        let mut problems = Vec::new();
        let mut problem = |tier: Option<usize>, field, message: String| {
            problems.push(TierProblem {
                tier,
                field,
                message,
            })
        };
        if tiers.is_empty() {
            problem(
                None,
                "tiers",
                "a tiered price needs at least one tier, the last with up_to = \"inf\"".into(),
            );
        }
        let mut previous: Option<Decimal> = None;
        for (k, tier) in tiers.iter().enumerate() {
            let last = k + 1 == tiers.len();
            match (tier.up_to, last) {
                (UpTo::Inf, false) => problem(
                    Some(k),
                    "up_to",
                    "only the last tier may be \"inf\"".into(),
                ),
                (UpTo::Finite(bound), true) => problem(
                    Some(k),
                    "up_to",
                    format!("the last tier must have up_to = \"inf\" (found {bound}), so every quantity has a tier"),
                ),
                (UpTo::Finite(bound), false) => {
                    if bound <= Decimal::ZERO {
                        problem(Some(k), "up_to", "must be positive".into());
                    } else if let Some(prev) = previous.filter(|p| bound <= *p) {
                        problem(
                            Some(k),
                            "up_to",
                            format!("tiers must strictly increase: {bound} follows {prev}"),
                        );
                    }
                    previous = Some(bound);
                }
                (UpTo::Inf, true) => {}
            }
            for (field, amount) in [
                ("unit_amount", tier.unit_amount),
                ("flat_amount", tier.flat_amount),
            ] {
                if amount < Decimal::ZERO {
                    problem(
                        Some(k),
                        field,
                        format!("amounts must not be negative (found {amount})"),
                    );
                }
            }
        }
        match problems.is_empty() {
            true => Ok(Tiers(tiers)),
            false => Err(problems),
        }
    }

    /// The last tier, which covers every quantity above the others.
    pub fn last_tier(&self) -> (usize, &Tier) {
        let last = self.0.len() - 1;
        (last, &self.0[last])
    }
}

impl std::ops::Deref for Tiers {
    type Target = [Tier];

    fn deref(&self) -> &[Tier] {
        &self.0
    }
}

/// One row of a tier table. The tier covers quantities above the previous tier's
/// `up_to` (or 0) up to and including its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    pub up_to: UpTo,
    pub unit_amount: Decimal,
    pub flat_amount: Decimal,
}

/// Inclusive upper bound of a tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpTo {
    Finite(Decimal),
    Inf,
}

impl UpTo {
    /// Whether a quantity lies at or below this bound.
    pub fn covers(&self, quantity: Decimal) -> bool {
        match self {
            UpTo::Finite(bound) => quantity <= *bound,
            UpTo::Inf => true,
        }
    }
}

impl std::fmt::Display for UpTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpTo::Finite(d) => write!(f, "{d}"),
            UpTo::Inf => f.write_str("inf"),
        }
    }
}

/// A line-item discount, computed on the line's rounded subtotal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Discount {
    /// Between 0 and 100 inclusive.
    PercentOff(Decimal),
    /// In the plan's currency, capped at the subtotal.
    AmountOff(Decimal),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(up_to: Option<i64>, unit: i64) -> Tier {
        Tier {
            up_to: up_to.map_or(UpTo::Inf, |b| UpTo::Finite(Decimal::from(b))),
            unit_amount: Decimal::from(unit),
            flat_amount: Decimal::ZERO,
        }
    }

    #[test]
    fn only_rateable_tier_tables_can_be_made() {
        assert!(Tiers::new(vec![tier(Some(10), 1), tier(None, 1)]).is_ok());
        assert!(Tiers::new(vec![tier(None, 0)]).is_ok());
        assert!(Tiers::new(vec![]).is_err(), "empty");
        assert!(Tiers::new(vec![tier(Some(10), 1)]).is_err(), "last not inf");
        assert!(
            Tiers::new(vec![tier(None, 1), tier(None, 1)]).is_err(),
            "inf before last"
        );
        assert!(
            Tiers::new(vec![tier(Some(10), 1), tier(Some(10), 1), tier(None, 1)]).is_err(),
            "not increasing"
        );
        assert!(
            Tiers::new(vec![tier(Some(0), 1), tier(None, 1)]).is_err(),
            "bound not positive"
        );
        assert!(Tiers::new(vec![tier(None, -1)]).is_err(), "negative amount");
    }
}
