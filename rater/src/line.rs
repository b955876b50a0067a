//! From a quantity to an invoice line: rate, round once, discount, id.
//!
//! In: a customer, one price of their plan, the period and the quantity. Out: an
//! [`InvoiceLine`]. The order is fixed so finance can redo it by hand: the exact charge
//! is rounded to the currency's minor unit with the plan's rounding mode (the subtotal);
//! the discount is computed on that rounded subtotal and rounded the same way; the
//! amount is their difference. An invoice total is the sum of its lines' amounts.

use rust_decimal::Decimal;
use tally_schemas::config::{Config, Customer};
use tally_schemas::ids::{Fingerprinter, Hex128};
use tally_schemas::price::{Discount, Price};
use tally_schemas::records::InvoiceLine;
use tally_schemas::time::Period;

use crate::rate::{rate, RateError};

/// The id of a customer's line for a price in a period. The plan and the price book's
/// version are left out on purpose: re-rating after a price change replaces the line.
pub fn line_id(customer: &str, price: &str, period: Period) -> String {
    let start = period.start().timestamp();
    Hex128(
        Fingerprinter::new(b"line")
            .part(customer.as_bytes())
            .part(price.as_bytes())
            .part(&start.to_le_bytes())
            .finish(),
    )
    .to_string()
}

/// Prices one line. `price_index` indexes the customer's plan's prices.
pub fn invoice_line(
    config: &Config,
    customer: &Customer,
    price_index: usize,
    period: Period,
    quantity: Decimal,
) -> Result<InvoiceLine, RateError> {
    let plan = config.plan(customer.plan);
    let price: &Price = &plan.prices[price_index];
    let charge = rate(&price.rate, quantity)?;
    let minor = plan.currency.minor_units();
    let subtotal = plan.currency.round(charge.amount, plan.rounding);
    let discount = match customer.discounts.get(&price_index) {
        None => Decimal::ZERO,
        Some(Discount::PercentOff(percent)) => {
            let off = subtotal
                .checked_mul(*percent)
                .ok_or(RateError::Overflow { quantity })?
                / Decimal::ONE_HUNDRED;
            plan.currency.round(off, plan.rounding)
        }
        Some(Discount::AmountOff(off)) => plan.currency.round(*off, plan.rounding).min(subtotal),
    };
    let with_minor = |mut d: Decimal| {
        d.rescale(minor);
        d
    };
    Ok(InvoiceLine {
        id: line_id(&customer.id, &price.id, period),
        config_hash: config.hash.to_string(),
        customer: customer.id.clone(),
        plan: plan.id.clone(),
        price: price.id.clone(),
        meter: config.meter(price.meter).slug.clone(),
        period_start: period.start(),
        period_end: period.end(),
        quantity: quantity.normalize(),
        subtotal: with_minor(subtotal),
        discount: with_minor(discount),
        amount: with_minor(subtotal - discount),
        currency: plan.currency.code().to_owned(),
        tiers: charge.tiers,
    })
}
