//! From a quantity to an invoice line: rate, round once, discount, id.
//!
//! In: a customer, one price of their plan, the period and the quantity. Out: an
//! [`InvoiceLine`]. The order is fixed so finance can redo it by hand: the exact charge
//! is rounded to the currency's minor unit with the plan's rounding mode (the subtotal);
//! the discount is computed on that rounded subtotal and rounded the same way; the
//! amount is their difference. An invoice total is the sum of its lines' amounts.

use rust_decimal::Decimal;
use tally_schemas::config::{Config, Customer};
use tally_schemas::decimal::ExactAmount;
use tally_schemas::ids::{Fingerprinter, Hex128};
use tally_schemas::price::{Discount, Price};
use tally_schemas::records::{InvoiceLine, TierCharge};
use tally_schemas::time::Period;

use crate::rate::{rate, RateError};

/// A line that cannot be rated, and which line it is.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot rate customer {customer:?}'s line for price {price:?} in {period}{}: {source}",
    adjusting(.adjusts)
)]
pub struct LineError {
    pub customer: String,
    pub price: String,
    /// The period the line is billed in.
    pub period: Period,
    /// For an adjustment line, the closed period it adjusts.
    pub adjusts: Option<Period>,
    pub source: RateError,
}

impl LineError {
    pub(crate) fn new(
        customer: &Customer,
        price: &Price,
        period: Period,
        source: RateError,
    ) -> Self {
        LineError {
            customer: customer.id.clone(),
            price: price.id.clone(),
            period,
            adjusts: None,
            source,
        }
    }

    /// The error as the adjustment line's, billed in `period`: rating it prices the
    /// closed period the error names now.
    pub(crate) fn adjustment_billed_in(self, period: Period) -> Self {
        LineError {
            adjusts: Some(self.period),
            period,
            ..self
        }
    }
}

fn adjusting(adjusts: &Option<Period>) -> String {
    adjusts.map_or_else(String::new, |closed| format!(" (adjusting {closed})"))
}

/// The id of a customer's line for a price billed in `period`; `adjusts` names the
/// closed period whose late usage an adjustment line bills. The plan and the price
/// book's version are left out on purpose: re-rating after a price change replaces
/// the line.
pub fn line_id(customer: &str, price: &str, period: Period, adjusts: Option<Period>) -> String {
    let start = period.start().timestamp().to_le_bytes();
    let mut fingerprint = match adjusts {
        None => Fingerprinter::new(b"line"),
        Some(_) => Fingerprinter::new(b"adjustment line"),
    };
    fingerprint
        .part(customer.as_bytes())
        .part(price.as_bytes())
        .part(&start);
    if let Some(closed) = adjusts {
        fingerprint.part(&closed.start().timestamp().to_le_bytes());
    }
    Hex128(fingerprint.finish()).to_string()
}

/// Prices one line. `price_index` indexes the prices of the customer's plan in `period`;
/// `quantity` is the usage the price selects (a flat fee's line bills one of itself,
/// whatever it is, and names no meter).
pub fn invoice_line(
    config: &Config,
    customer: &Customer,
    price_index: usize,
    period: Period,
    quantity: Decimal,
) -> Result<InvoiceLine, LineError> {
    let subscription = customer.subscription(period);
    let plan = config.plan(subscription.plan);
    let price: &Price = &plan.prices[price_index];
    let failed = |source| LineError::new(customer, price, period, source);
    let quantity = price.quantity(quantity);
    let charge = rate(&price.rate, quantity).map_err(failed)?;
    let (billed, minor) = (plan.currency.decimals(), plan.currency.minor_units());
    // Rounded to the minor unit, an amount past about 7.9e26 (usd) has no decimal.
    let too_large = || {
        let amount = charge.amount.nearest_decimal().unwrap_or(Decimal::MAX);
        failed(RateError::AmountTooLarge { amount })
    };
    let subtotal = (charge.amount)
        .round(billed, plan.rounding)
        .ok_or_else(too_large)?;
    let discount = match subscription.discounts.get(&price_index) {
        None => Decimal::ZERO,
        Some(Discount::PercentOff(percent)) => ExactAmount::percent_of(subtotal, *percent)
            .round(billed, plan.rounding)
            .ok_or_else(too_large)?,
        Some(Discount::AmountOff(off)) => plan.currency.round(*off, plan.rounding).min(subtotal),
    };
    let with_minor = |mut d: Decimal| {
        d.rescale(minor);
        d
    };
    let line = InvoiceLine {
        id: line_id(&customer.id, &price.id, period, None),
        config_hash: config.hash.to_string(),
        customer: customer.id.clone(),
        plan: plan.id.clone(),
        price: price.id.clone(),
        meter: (price.usage.as_ref())
            .map_or_else(String::new, |u| config.meter(u.meter).slug.clone()),
        period_start: period.start(),
        period_end: period.end(),
        quantity: quantity.normalize(),
        subtotal: with_minor(subtotal),
        discount: with_minor(discount),
        amount: with_minor(subtotal - discount),
        currency: plan.currency.code().to_owned(),
        tiers: charge.tiers,
        adjusts_period: None,
    };
    // A line must be storable: its amount as a 64-bit count of minor units.
    if line.amount_minor().is_none() {
        return Err(failed(RateError::AmountTooLarge {
            amount: line.amount,
        }));
    }
    Ok(line)
}

/// An adjustment line in `period` for usage of a closed period that arrived after it
/// closed: `before` is the closed period's line as billed, `after` the same line rated
/// with the late usage included. The adjustment bills the difference, field by field,
/// and its tiers show what changed in each tier, so finance can see that the late usage
/// was priced where it would have been had it arrived on time.
pub fn adjustment_line(before: &InvoiceLine, after: &InvoiceLine, period: Period) -> InvoiceLine {
    let closed = Period::containing(before.period_start);
    let mut tiers = Vec::new();
    // By tier, not by position: in volume mode the whole quantity moves to another
    // tier, and the change is the old tier's charge taken back and the new one's added.
    let tier_numbers: std::collections::BTreeSet<usize> = (before.tiers.iter().chain(&after.tiers))
        .map(|t| t.tier)
        .collect();
    for number in tier_numbers {
        let in_tier = |line: &InvoiceLine| -> Option<TierCharge> {
            line.tiers.iter().find(|t| t.tier == number).cloned()
        };
        let (b, a) = (in_tier(before), in_tier(after));
        let Some(template) = a.clone().or_else(|| b.clone()) else {
            continue;
        };
        let field = |f: fn(&TierCharge) -> Decimal| {
            a.as_ref().map_or(Decimal::ZERO, f) - b.as_ref().map_or(Decimal::ZERO, f)
        };
        let change = TierCharge {
            quantity: field(|t| t.quantity),
            flat_amount: field(|t| t.flat_amount),
            amount: field(|t| t.amount),
            ..template
        };
        if !change.quantity.is_zero() || !change.amount.is_zero() {
            tiers.push(change);
        }
    }
    InvoiceLine {
        id: line_id(&after.customer, &after.price, period, Some(closed)),
        period_start: period.start(),
        period_end: period.end(),
        quantity: (after.quantity - before.quantity).normalize(),
        subtotal: after.subtotal - before.subtotal,
        discount: after.discount - before.discount,
        amount: after.amount - before.amount,
        tiers,
        adjusts_period: Some(closed),
        ..after.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    const CONFIG: &str = r#"
        [[meters]]
        slug = "tokens"
        event_type = "llm.tokens"
        aggregation = "sum"
        value_property = "$.tokens"

        [[plans]]
        id = "usd"
        currency = "usd"
        [[plans.prices]]
        id = "tokens"
        meter = "tokens"
        billing_scheme = "tiered"
        tiers_mode = "graduated"
        tiers = [
          { up_to = 1, unit_amount = "0.0125" },
          { up_to = "inf", unit_amount = "0.0135" },
        ]

        [[plans]]
        id = "yen"
        currency = "jpy"
        [[plans.prices]]
        id = "tokens"
        meter = "tokens"
        billing_scheme = "per_unit"
        unit_amount = "1000"

        [[customers]]
        id = "acme"
        plan = "usd"
        discounts = [{ price = "tokens", percent_off = "50" }]

        [[customers]]
        id = "kobe"
        plan = "yen"
    "#;

    fn line(customer: &str, quantity: &str) -> Result<InvoiceLine, LineError> {
        let config = Config::parse(CONFIG, "test").unwrap();
        let period = Period::from_str("2026-11").unwrap();
        let quantity = Decimal::from_str(quantity).unwrap();
        invoice_line(&config, &config.customers[customer], 0, period, quantity)
    }

    #[test]
    fn a_line_is_rounded_once_not_tier_by_tier() {
        // 0.0125 + 0.0135 = 0.026, rounded half up: 0.03. Rounding each tier first
        // (0.01 + 0.01) would bill 0.02.
        let line = line("acme", "2").unwrap();
        assert_eq!(line.subtotal.to_string(), "0.03");
        // Half of the rounded subtotal, 0.015, rounded half up.
        assert_eq!(line.discount.to_string(), "0.02");
        assert_eq!(line.amount.to_string(), "0.01");
    }

    #[test]
    fn a_line_too_large_to_store_is_an_error() {
        // 10^16 units at 1000 yen: 10^19 yen, more than a 64-bit count of minor units.
        let error = line("kobe", "10000000000000000").unwrap_err();
        assert_eq!(
            error.source,
            RateError::AmountTooLarge {
                amount: Decimal::from_str("10000000000000000000").unwrap()
            }
        );
        assert!(
            error
                .to_string()
                .contains("more minor units than a line can store"),
            "{error}"
        );
        // 7 x 10^28 units at about a cent: 9.45e26 usd, which no decimal holds in
        // cents (9.45e28 of them); the error shows the nearest decimal.
        let error = line("acme", "70000000000000000000000000000").unwrap_err();
        assert_eq!(
            error.source,
            RateError::AmountTooLarge {
                amount: Decimal::from_str("945000000000000000000000000").unwrap()
            }
        );
        assert_eq!(
            line("kobe", "1000000000000000").unwrap().amount.to_string(),
            "1000000000000000000"
        );
    }
}
