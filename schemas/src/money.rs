//! Currencies and rounding: where an exact amount becomes a payable one.
//!
//! In: a lower-case ISO 4217 code and a rounding mode from the plan.
//! Out: amounts rounded to what the currency is billed in (cents for usd, none for jpy,
//! hundredths for kwd, whose card payments must end in a zero fils), written in its
//! minor unit as Stripe's API counts it (thousandths for kwd). Rounding happens once
//! per invoice line, never per event.

use std::fmt;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

/// An ISO 4217 currency Tally knows the minor unit of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: &'static str,
    minor_units: u32,
    decimals: u32,
}

impl Currency {
    /// Looks up a lower-case ISO 4217 code such as `usd`. Upper case is refused so
    /// that one currency has one spelling in every record.
    pub fn from_code(code: &str) -> Option<Self> {
        ISO_4217
            .iter()
            .find(|(c, _)| *c == code)
            .map(|&(code, minor_units)| Currency {
                code,
                minor_units,
                decimals: BILLED_DECIMALS
                    .iter()
                    .find(|(c, _)| *c == code)
                    .map_or(minor_units, |&(_, decimals)| decimals),
            })
    }

    /// The lower-case ISO 4217 code, e.g. `eur`.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// Digits after the decimal point in the currency's minor unit, as Stripe's API
    /// counts `amount` (usd 2, jpy 0, kwd 3, isk 2); amounts are written with as many.
    pub fn minor_units(&self) -> u32 {
        self.minor_units
    }

    /// Digits after the decimal point an amount is billed to (usd 2, jpy 0, kwd 2,
    /// isk 0): the minor unit's, except where card payments allow only coarser ones.
    pub fn decimals(&self) -> u32 {
        self.decimals
    }

    /// `amount` as a whole number of minor units (cents for usd, yen for jpy), as a line
    /// stores it; `None` if that does not fit 64 bits.
    pub fn to_minor(&self, mut amount: Decimal) -> Option<i64> {
        amount.rescale(self.minor_units);
        if amount.scale() != self.minor_units {
            return None;
        }
        i64::try_from(amount.mantissa()).ok()
    }

    /// Why an amount is billed coarser than the minor unit, for currencies that are
    /// (kwd to 2 decimals of its 3, isk to 0 of its 2); empty for the others.
    pub fn coarser_billing_note(&self) -> String {
        match self.decimals < self.minor_units {
            true => format!(
                " ({} is written with {} decimals, but card payments take no finer than {}, as Stripe requires)",
                self.code, self.minor_units, self.decimals
            ),
            false => String::new(),
        }
    }

    /// Rounds an exact amount to what this currency is billed in ([`Currency::decimals`]).
    pub fn round(&self, amount: Decimal, mode: RoundingMode) -> Decimal {
        amount.round_dp_with_strategy(self.decimals, mode.strategy())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

/// How a line's exact amount is rounded to the minor unit. `rust_decimal`'s own default
/// is banker's rounding, so the mode is always passed explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundingMode {
    /// 0.125 -> 0.13, 0.135 -> 0.14 (ties away from zero). The default, and what invoices
    /// are usually expected to do.
    HalfUp,
    /// 0.125 -> 0.12, 0.135 -> 0.14 (ties to even, "banker's rounding").
    HalfEven,
}

/// As `tally.toml` names it: `half_up`, `half_even`.
impl fmt::Display for RoundingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoundingMode::HalfUp => "half_up",
            RoundingMode::HalfEven => "half_even",
        })
    }
}

/// `plans.rounding` when a plan gives none.
impl Default for RoundingMode {
    fn default() -> Self {
        crate::config::defaults::DEFAULT_ROUNDING
    }
}

impl RoundingMode {
    fn strategy(self) -> RoundingStrategy {
        match self {
            RoundingMode::HalfUp => RoundingStrategy::MidpointAwayFromZero,
            RoundingMode::HalfEven => RoundingStrategy::MidpointNearestEven,
        }
    }
}

/// Active ISO 4217 codes with their minor units (the standard's "E" column), except
/// where Stripe's API counts amounts otherwise, as an `amount_minor` sent to Stripe
/// must mean the same: mga (ISO lists 2, but its subunit is a fifth, not a hundredth,
/// and Stripe bills whole ariary) and isk (ISO lists 0; Stripe's API keeps 2, an
/// amount of 100 being one króna).
#[rustfmt::skip]
const ISO_4217: &[(&str, u32)] = &[
    ("aed", 2), ("afn", 2), ("all", 2), ("amd", 2), ("ang", 2), ("aoa", 2), ("ars", 2),
    ("aud", 2), ("awg", 2), ("azn", 2), ("bam", 2), ("bbd", 2), ("bdt", 2), ("bgn", 2),
    ("bhd", 3), ("bif", 0), ("bmd", 2), ("bnd", 2), ("bob", 2), ("brl", 2), ("bsd", 2),
    ("btn", 2), ("bwp", 2), ("byn", 2), ("bzd", 2), ("cad", 2), ("cdf", 2), ("chf", 2),
    ("clf", 4), ("clp", 0), ("cny", 2), ("cop", 2), ("crc", 2), ("cup", 2), ("cve", 2),
    ("czk", 2), ("djf", 0), ("dkk", 2), ("dop", 2), ("dzd", 2), ("egp", 2), ("ern", 2),
    ("etb", 2), ("eur", 2), ("fjd", 2), ("fkp", 2), ("gbp", 2), ("gel", 2), ("ghs", 2),
    ("gip", 2), ("gmd", 2), ("gnf", 0), ("gtq", 2), ("gyd", 2), ("hkd", 2), ("hnl", 2),
    ("htg", 2), ("huf", 2), ("idr", 2), ("ils", 2), ("inr", 2), ("iqd", 3), ("irr", 2),
    ("isk", 2), ("jmd", 2), ("jod", 3), ("jpy", 0), ("kes", 2), ("kgs", 2), ("khr", 2),
    ("kmf", 0), ("kpw", 2), ("krw", 0), ("kwd", 3), ("kyd", 2), ("kzt", 2), ("lak", 2),
    ("lbp", 2), ("lkr", 2), ("lrd", 2), ("lsl", 2), ("lyd", 3), ("mad", 2), ("mdl", 2),
    ("mga", 0), ("mkd", 2), ("mmk", 2), ("mnt", 2), ("mop", 2), ("mru", 2), ("mur", 2),
    ("mvr", 2), ("mwk", 2), ("mxn", 2), ("myr", 2), ("mzn", 2), ("nad", 2), ("ngn", 2),
    ("nio", 2), ("nok", 2), ("npr", 2), ("nzd", 2), ("omr", 3), ("pab", 2), ("pen", 2),
    ("pgk", 2), ("php", 2), ("pkr", 2), ("pln", 2), ("pyg", 0), ("qar", 2), ("ron", 2),
    ("rsd", 2), ("rub", 2), ("rwf", 0), ("sar", 2), ("sbd", 2), ("scr", 2), ("sdg", 2),
    ("sek", 2), ("sgd", 2), ("shp", 2), ("sle", 2), ("sos", 2), ("srd", 2), ("ssp", 2),
    ("stn", 2), ("svc", 2), ("syp", 2), ("szl", 2), ("thb", 2), ("tjs", 2), ("tmt", 2),
    ("tnd", 3), ("top", 2), ("try", 2), ("ttd", 2), ("twd", 2), ("tzs", 2), ("uah", 2),
    ("ugx", 0), ("usd", 2), ("uyi", 0), ("uyu", 2), ("uyw", 4), ("uzs", 2), ("ves", 2),
    ("ved", 2), ("vnd", 0), ("vuv", 0), ("wst", 2), ("xaf", 0), ("xcd", 2), ("xcg", 2), ("xof", 0),
    ("xpf", 0), ("yer", 2), ("zar", 2), ("zmw", 2), ("zwg", 2),
];

/// Currencies billed to fewer decimals than their minor unit, as Stripe requires of card
/// payments: whole krónur (since April 2023), and the three-decimal dinars and rial
/// rounded to ten fils or baisa (their last digit zero).
const BILLED_DECIMALS: &[(&str, u32)] = &[
    ("isk", 0),
    ("bhd", 2),
    ("jod", 2),
    ("kwd", 2),
    ("omr", 2),
    ("tnd", 2),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn minor_units_follow_iso_4217_and_stripe() {
        assert_eq!(Currency::from_code("usd").unwrap().minor_units(), 2);
        assert_eq!(Currency::from_code("jpy").unwrap().minor_units(), 0);
        assert_eq!(Currency::from_code("kwd").unwrap().minor_units(), 3);
        // Not ISO's 2: whole ariary, as Stripe bills it.
        assert_eq!(Currency::from_code("mga").unwrap().minor_units(), 0);
        // Not ISO's 0: Stripe's API counts krónur in hundredths.
        assert_eq!(Currency::from_code("isk").unwrap().minor_units(), 2);
        assert!(Currency::from_code("USD").is_none());
        assert!(Currency::from_code("xyz").is_none());
    }

    #[test]
    fn card_rules_bill_isk_and_the_dinars_to_fewer_decimals_than_their_minor_unit() {
        let currency = |code| Currency::from_code(code).unwrap();
        let half_up = RoundingMode::HalfUp;
        // 5.124 kwd is billed 5.12, 5120 fils; 0.0125 kwd is 0.01.
        assert_eq!(currency("kwd").round(d("5.124"), half_up), d("5.12"));
        assert_eq!(
            currency("kwd").coarser_billing_note(),
            " (kwd is written with 3 decimals, but card payments take no finer than 2, as Stripe requires)"
        );
        assert_eq!(currency("usd").coarser_billing_note(), "");
        assert_eq!(currency("kwd").to_minor(d("5.12")), Some(5120));
        assert_eq!(currency("bhd").round(d("0.0125"), half_up), d("0.01"));
        // 40.10 isk is billed 40, written 4000 (Stripe's hundredths).
        assert_eq!(currency("isk").round(d("40.10"), half_up), d("40"));
        assert_eq!(currency("isk").to_minor(d("40")), Some(4000));
        // Elsewhere billed to the minor unit.
        assert_eq!(currency("iqd").round(d("1.2345"), half_up), d("1.235"));
        assert_eq!(currency("usd").decimals(), 2);
    }

    #[test]
    fn rounding_modes_differ_only_on_ties() {
        let usd = Currency::from_code("usd").unwrap();
        assert_eq!(usd.round(d("0.125"), RoundingMode::HalfUp), d("0.13"));
        assert_eq!(usd.round(d("0.125"), RoundingMode::HalfEven), d("0.12"));
        assert_eq!(usd.round(d("0.135"), RoundingMode::HalfEven), d("0.14"));
        assert_eq!(usd.round(d("0.1249"), RoundingMode::HalfUp), d("0.12"));
        let jpy = Currency::from_code("jpy").unwrap();
        assert_eq!(jpy.round(d("102.5"), RoundingMode::HalfUp), d("103"));
        assert_eq!(jpy.round(d("102.5"), RoundingMode::HalfEven), d("102"));
    }

    #[test]
    fn table_has_no_duplicate_codes() {
        let mut codes: Vec<_> = ISO_4217.iter().map(|(c, _)| *c).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ISO_4217.len());
    }
}
