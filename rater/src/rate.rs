//! Pricing one quantity: `(rate, quantity) -> charge with its tier breakdown`.
//!
//! Stripe Billing's semantics, exactly, on what Stripe can take; Tally also takes
//! fractional bounds, package sizes and amounts finer than Stripe's (validation warns of
//! each), and rates them by the same rules:
//! - per_unit: `quantity * unit_amount`; with `transform_quantity`, the quantity is
//!   first divided by `divide_by` and rounded up or down to whole packages. A flat fee
//!   is a per-unit price whose line's quantity is 1 (`Price::quantity`).
//! - graduated: each unit is priced at the tier it falls in; every tier the quantity
//!   reaches adds its flat amount, and the first tier is always reached, so its flat
//!   amount is billed even at zero usage.
//! - volume: every unit is priced at the tier the total falls in (zero falls in the
//!   first), plus that tier's flat amount.
//!
//! `up_to` is inclusive and quantities may be fractional: with tiers up to 100 and up
//! to 1000, 100.5 units put 100 in the first tier and 0.5 in the second. The charge is
//! exact, at any number of digits (an [`ExactAmount`]); rounding to the currency happens
//! once per line (see `line.rs`). A tier's amount in the breakdown is exact too, unless
//! it has more than 28 decimals: it is then shown to 28, or as many as fit.

use rust_decimal::Decimal;
use tally_schemas::decimal::{whole_packages, ExactAmount};
use tally_schemas::price::{Package, Rate, Tier, Tiers, TiersMode, UpTo};
use tally_schemas::records::TierCharge;

/// An exact amount and how it was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// Sum of the tier amounts, exact and unrounded.
    pub amount: ExactAmount,
    pub tiers: Vec<TierCharge>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("quantity {quantity}: its package count or amount is beyond an exact decimal (28 significant digits, at most about 7.9e28); check the meter's values")]
    Overflow { quantity: Decimal },
    #[error("the line's series add up past the largest decimal (about 7.9e28); check the meter's values")]
    TotalTooLarge,
    #[error("amount {amount} is more minor units than a line can store (a 64-bit count: about 9.2e18 minor units); check the meter's values and the prices")]
    AmountTooLarge { amount: Decimal },
    #[error("quantity {0} is negative; usage quantities are never negative")]
    NegativeQuantity(Decimal),
}

/// Prices a quantity.
pub fn rate(rate: &Rate, quantity: Decimal) -> Result<Charge, RateError> {
    if quantity.is_sign_negative() && !quantity.is_zero() {
        return Err(RateError::NegativeQuantity(quantity));
    }
    match rate {
        Rate::PerUnit {
            unit_amount,
            package,
        } => per_unit(*unit_amount, package.as_ref(), quantity),
        Rate::Tiered {
            mode: TiersMode::Graduated,
            tiers,
        } => graduated(tiers, quantity),
        Rate::Tiered {
            mode: TiersMode::Volume,
            tiers,
        } => volume(tiers, quantity),
    }
}

/// A tier's charge, exact, and as the breakdown shows it.
fn tier_charge(
    position: usize,
    tier: &Tier,
    units: Decimal,
    flat_amount: Decimal,
    quantity: Decimal,
) -> Result<(ExactAmount, TierCharge), RateError> {
    let mut amount = ExactAmount::product(units, tier.unit_amount);
    amount.add(&flat_amount.into());
    let shown = amount
        .nearest_decimal()
        .ok_or(RateError::Overflow { quantity })?;
    let charge = TierCharge {
        tier: position + 1,
        up_to: tier.up_to.to_string(),
        quantity: units.normalize(),
        package_size: None,
        unit_amount: tier.unit_amount.normalize(),
        flat_amount: flat_amount.normalize(),
        amount: shown.normalize(),
    };
    Ok((amount, charge))
}

fn per_unit(
    unit_amount: Decimal,
    package: Option<&Package>,
    quantity: Decimal,
) -> Result<Charge, RateError> {
    let units = match package {
        None => quantity,
        Some(p) => whole_packages(quantity, p.divide_by, p.round)
            .ok_or(RateError::Overflow { quantity })?,
    };
    let tier = Tier {
        up_to: UpTo::Inf,
        unit_amount,
        flat_amount: Decimal::ZERO,
    };
    let (amount, mut charge) = tier_charge(0, &tier, units, Decimal::ZERO, quantity)?;
    charge.package_size = package.map(|p| p.divide_by.normalize());
    Ok(Charge {
        amount,
        tiers: vec![charge],
    })
}

fn graduated(tiers: &[Tier], quantity: Decimal) -> Result<Charge, RateError> {
    let mut lower = Decimal::ZERO;
    let mut charges = Vec::new();
    let mut total = ExactAmount::default();
    for (i, tier) in tiers.iter().enumerate() {
        if i > 0 && quantity <= lower {
            break;
        }
        let upper = match tier.up_to {
            UpTo::Finite(bound) => bound.min(quantity),
            UpTo::Inf => quantity,
        };
        let units = (upper - lower).max(Decimal::ZERO);
        let (amount, charge) = tier_charge(i, tier, units, tier.flat_amount, quantity)?;
        total.add(&amount);
        charges.push(charge);
        match tier.up_to {
            UpTo::Finite(bound) => lower = bound,
            UpTo::Inf => break,
        }
    }
    Ok(Charge {
        amount: total,
        tiers: charges,
    })
}

fn volume(tiers: &Tiers, quantity: Decimal) -> Result<Charge, RateError> {
    let (i, tier) = tiers
        .iter()
        .enumerate()
        .find(|(_, t)| t.up_to.covers(quantity))
        .unwrap_or_else(|| tiers.last_tier());
    let (amount, charge) = tier_charge(i, tier, quantity, tier.flat_amount, quantity)?;
    Ok(Charge {
        amount,
        tiers: vec![charge],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;
    use tally_schemas::money::RoundingMode;
    use tally_schemas::price::PackageRounding;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn tiers(rows: &[(&str, &str, &str)]) -> Vec<Tier> {
        rows.iter()
            .map(|(up_to, unit, flat)| Tier {
                up_to: if *up_to == "inf" {
                    UpTo::Inf
                } else {
                    UpTo::Finite(d(up_to))
                },
                unit_amount: d(unit),
                flat_amount: d(flat),
            })
            .collect()
    }

    /// The exact charge of `quantity`, when a decimal holds it.
    fn charged(rate: &Rate, quantity: &str) -> Decimal {
        super::rate(rate, d(quantity))
            .unwrap()
            .amount
            .to_decimal()
            .unwrap()
    }

    fn unit_priced(unit_amount: &str) -> Rate {
        Rate::PerUnit {
            unit_amount: d(unit_amount),
            package: None,
        }
    }

    fn tiered(mode: TiersMode, rows: &[(&str, &str, &str)]) -> Rate {
        Rate::Tiered {
            mode,
            tiers: Tiers::new(tiers(rows)).unwrap(),
        }
    }

    /// Stripe's published tiered-pricing example (docs: "Set up tiered pricing"):
    /// 1-5 fonts at 7 USD, 6-10 at 6.50 USD, 11+ at 6 USD.
    fn stripe_fonts(mode: TiersMode) -> Rate {
        tiered(
            mode,
            &[("5", "7", "0"), ("10", "6.5", "0"), ("inf", "6", "0")],
        )
    }

    #[test]
    fn stripe_volume_example() {
        // The table Stripe publishes for volume-based pricing.
        let rate = stripe_fonts(TiersMode::Volume);
        for (quantity, total) in [
            ("1", "7"),
            ("5", "35"),
            ("6", "39"),
            ("20", "120"),
            ("25", "150"),
        ] {
            assert_eq!(charged(&rate, quantity), d(total), "{quantity} fonts");
        }
    }

    #[test]
    fn stripe_graduated_example() {
        // Same tiers, graduated: 6 fonts = 5 x 7 + 1 x 6.50 = 41.50; 25 = 35 + 32.50 + 90.
        let rate = stripe_fonts(TiersMode::Graduated);
        for (quantity, total) in [
            ("1", "7"),
            ("5", "35"),
            ("6", "41.5"),
            ("20", "127.5"),
            ("25", "157.5"),
        ] {
            assert_eq!(charged(&rate, quantity), d(total), "{quantity} fonts");
        }
    }

    #[test]
    fn graduated_flat_fees_add_per_tier_reached() {
        // Stripe's "flat fee and overages" shape: 200 flat covers the first 1000 units,
        // then 0.04 each; plus a flat 10 on reaching the third tier.
        let rate = tiered(
            TiersMode::Graduated,
            &[
                ("1000", "0", "200"),
                ("5000", "0.04", "0"),
                ("inf", "0.03", "10"),
            ],
        );
        let cases = [
            ("0", "200"),
            ("1000", "200"),
            ("1001", "200.04"),
            ("5000", "360"),
            ("5001", "370.03"),
        ];
        for (quantity, total) in cases {
            assert_eq!(charged(&rate, quantity), d(total), "{quantity}");
        }
        let breakdown = super::rate(&rate, d("5001")).unwrap().tiers;
        assert_eq!(breakdown.len(), 3);
        assert_eq!(breakdown[1].quantity, d("4000"));
        assert_eq!(breakdown[2].quantity, d("1"));
        assert_eq!(breakdown[2].amount, d("10.03"));
    }

    #[test]
    fn issue_example_resolutions_tiers() {
        // 49 covers the first 100 resolutions, 0.89 up to 1000, 0.69 beyond.
        let rate = tiered(
            TiersMode::Graduated,
            &[
                ("100", "0", "49"),
                ("1000", "0.89", "0"),
                ("inf", "0.69", "0"),
            ],
        );
        assert_eq!(charged(&rate, "0"), d("49"));
        assert_eq!(charged(&rate, "250"), d("182.5"));
        assert_eq!(charged(&rate, "1200"), d("988"));
        assert_eq!(charged(&rate, "100.5"), d("49.445"));
    }

    #[test]
    fn volume_prices_every_unit_at_the_reached_tier_with_its_flat_fee() {
        let rate = tiered(TiersMode::Volume, &[("10", "2", "5"), ("inf", "1", "20")]);
        assert_eq!(charged(&rate, "0"), d("5"));
        assert_eq!(charged(&rate, "10"), d("25"));
        assert_eq!(charged(&rate, "10.5"), d("30.5"));
        let breakdown = super::rate(&rate, d("11")).unwrap().tiers;
        assert_eq!(breakdown.len(), 1);
        assert_eq!(breakdown[0].tier, 2);
    }

    #[test]
    fn package_pricing_rounds_to_whole_packages() {
        // Stripe's package example: 5 USD per package of 5 units.
        let up = Rate::PerUnit {
            unit_amount: d("5"),
            package: Some(Package {
                divide_by: d("5"),
                round: PackageRounding::Up,
            }),
        };
        let down = Rate::PerUnit {
            unit_amount: d("5"),
            package: Some(Package {
                divide_by: d("5"),
                round: PackageRounding::Down,
            }),
        };
        assert_eq!(charged(&up, "8"), d("10"));
        assert_eq!(charged(&down, "8"), d("5"));
        assert_eq!(charged(&up, "10"), d("10"));
        assert_eq!(charged(&up, "0"), d("0"));
        // Tokens per thousand: 1500 tokens at 0.002 per 1000, rounded up, is 2 packages.
        let tokens = Rate::PerUnit {
            unit_amount: d("0.002"),
            package: Some(Package {
                divide_by: d("1000"),
                round: PackageRounding::Up,
            }),
        };
        let charge = super::rate(&tokens, d("1500")).unwrap();
        assert_eq!(charge.amount.to_decimal(), Some(d("0.004")));
        assert_eq!(charge.tiers[0].quantity, d("2"));
        assert_eq!(charge.tiers[0].package_size, Some(d("1000")));
        // A quantity a hair over a package boundary starts one more package, however
        // many digits the quotient would need.
        let thirds = Rate::PerUnit {
            unit_amount: d("1"),
            package: Some(Package {
                divide_by: d("3"),
                round: PackageRounding::Up,
            }),
        };
        let charge = super::rate(&thirds, d("300000000000000000000.00000001")).unwrap();
        assert_eq!(charge.tiers[0].quantity, d("100000000000000000001"));
    }

    #[test]
    fn per_unit_keeps_fractional_quantities_exact() {
        let rate = unit_priced("0.1");
        assert_eq!(charged(&rate, "5.001"), d("0.5001"));
    }

    #[test]
    fn negative_quantities_and_overflow_are_errors() {
        let rate = unit_priced("10");
        assert!(matches!(
            super::rate(&rate, d("-1")),
            Err(RateError::NegativeQuantity(_))
        ));
        assert!(matches!(
            super::rate(&rate, Decimal::MAX),
            Err(RateError::Overflow { .. })
        ));
    }

    #[test]
    fn a_charge_finer_than_28_decimals_is_kept_exact_and_rounded_once() {
        // 1234567.891234567891234567891 x 0.0123 needs 33 significant digits;
        // rust_decimal's product ends ...185059 where the exact one ends ...1850593.
        let rate = unit_priced("0.0123");
        let charge = super::rate(&rate, d("1234567.891234567891234567891")).unwrap();
        assert_eq!(charge.amount.to_decimal(), None);
        assert_eq!(
            charge.amount.round(2, RoundingMode::HalfUp),
            Some(d("15185.19"))
        );
        // The breakdown shows the nearest decimal that fits.
        assert_eq!(charge.tiers[0].amount, d("15185.185062185185062185185059"));
        // A float's text priced per GB-second: 30 decimals, a fraction of a cent.
        let lambda = unit_priced("0.0000166667");
        let charge = super::rate(&lambda, d("0.00002777777777777778")).unwrap();
        assert_eq!(charge.amount.round(2, RoundingMode::HalfUp), Some(d("0")));
        assert_eq!(charge.tiers[0].amount, d("0.0000000004629638888888889259"));
        // Rounded to 28 decimals first, 0.004999…9 (30 decimals) would become the tie
        // 0.005 and round up a cent; rounded once, it is 0.00.
        let cent = unit_priced("0.01");
        let charge = super::rate(&cent, d("0.4999999999999999999999999999")).unwrap();
        assert_eq!(charge.amount.round(2, RoundingMode::HalfUp), Some(d("0")));
        assert_eq!(charge.tiers[0].amount, d("0.0050000000000000000000000000"));
        // A graduated total whose exact sum no decimal holds.
        let tiers = tiered(
            TiersMode::Graduated,
            &[
                ("1", "5000000000", "0"),
                ("inf", "0.0000000000000000000000000001", "0"),
            ],
        );
        let charge = super::rate(&tiers, d("2")).unwrap();
        assert_eq!(charge.amount.to_decimal(), None);
        assert_eq!(
            charge.amount.round(2, RoundingMode::HalfEven),
            Some(d("5000000000"))
        );
        assert_eq!(charge.tiers[1].amount, d("0.0000000000000000000000000001"));
    }

    fn arb_tiers() -> impl Strategy<Value = Vec<Tier>> {
        proptest::collection::vec((1u32..500, 0u32..1000, 0u32..5000), 1..5).prop_map(|rows| {
            let mut bound = Decimal::ZERO;
            let mut tiers: Vec<Tier> = rows
                .iter()
                .map(|&(step, unit, flat)| {
                    bound += Decimal::from(step);
                    Tier {
                        up_to: UpTo::Finite(bound),
                        unit_amount: Decimal::new(i64::from(unit), 3),
                        flat_amount: Decimal::new(i64::from(flat), 2),
                    }
                })
                .collect();
            if let Some(last) = tiers.last_mut() {
                last.up_to = UpTo::Inf;
            }
            tiers
        })
    }

    proptest! {
        /// Graduated totals never decrease as quantity grows.
        #[test]
        fn graduated_is_monotonic(tiers in arb_tiers(), a in 0u32..3000, b in 0u32..3000, scale in 0u32..3) {
            let rate = Rate::Tiered { mode: TiersMode::Graduated, tiers: Tiers::new(tiers).unwrap() };
            let (lo, hi) = (a.min(b), a.max(b));
            let lo = Decimal::new(i64::from(lo), scale);
            let hi = Decimal::new(i64::from(hi), scale);
            prop_assert!(charged(&rate, &lo.to_string()) <= charged(&rate, &hi.to_string()));
        }

        /// The breakdown explains the charge: tier amounts add up to it, and graduated
        /// tier quantities add up to the quantity.
        #[test]
        fn breakdown_adds_up(tiers in arb_tiers(), q in 0u32..3000, graduated in any::<bool>()) {
            let mode = if graduated { TiersMode::Graduated } else { TiersMode::Volume };
            let charge = super::rate(&Rate::Tiered { mode, tiers: Tiers::new(tiers).unwrap() }, Decimal::from(q)).unwrap();
            let sum: Decimal = charge.tiers.iter().map(|t| t.amount).sum();
            prop_assert_eq!(Some(sum), charge.amount.to_decimal());
            let units: Decimal = charge.tiers.iter().map(|t| t.quantity).sum();
            prop_assert_eq!(units, Decimal::from(q));
        }
    }
}
