//! Exact decimals from text: the one parser for event values and config amounts.
//!
//! In: a number as text, plain or with an exponent (`12`, `-0.5`, `1.25e3`). Out: the
//! [`Decimal`] with exactly that value, or an error: the digits before the exponent
//! must fit a Decimal's 28 significant digits (trailing fractional zeros aside), and
//! the value its range. rust_decimal's `from_scientific` rounds a mantissa longer than
//! 28 digits; this never rounds. Also the sums and package counts totals use: exact
//! whenever the result fits a decimal (rust_decimal's `checked_add` and `checked_div`
//! round silently), a usage total that does not rounded half to even at its last
//! digit, said so, rather than an event refused ([`add_fitting`],
//! [`ExactSum::fitted_total`]); and [`ExactAmount`], a charge exact at any number of
//! digits until its line rounds it once to the currency.

use std::cmp::Ordering;
use std::fmt;

use num_bigint::{BigInt, Sign};
use rust_decimal::Decimal;

use crate::money::RoundingMode;
use crate::price::PackageRounding;

/// The most fractional digits a [`Decimal`] holds.
const MAX_SCALE: i64 = 28;

/// Why text is not an exact decimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    #[error("is not a decimal number")]
    Syntax,
    #[error("needs more digits than an exact decimal holds (28 significant digits, at most 28 after the decimal point)")]
    TooPrecise,
    #[error("is beyond the largest exact decimal (about 7.9e28)")]
    TooLarge,
}

/// `a + b` exactly, or `None` when the sum is beyond the largest decimal or needs more
/// than 28 significant digits (rust_decimal would round it).
pub fn exact_add(a: Decimal, b: Decimal) -> Option<Decimal> {
    let sum = a.checked_add(b)?;
    // A sum whose digits fit keeps the larger scale of the two.
    if sum.scale() >= a.scale().max(b.scale()) {
        return Some(sum);
    }
    // rust_decimal dropped digits to fit: the sum is exact only if they were zeros
    // (31.666…667 + 63.333…333 is 95). Redo it in whole numbers: with both parts'
    // trailing zeros gone, a part that cannot be scaled up in an i128 has more digits
    // than any decimal holds, and its sum's last digit is the other part's, not zero.
    let (a, b) = (a.normalize(), b.normalize());
    let mut scale = a.scale().max(b.scale());
    let aligned = |d: Decimal| {
        d.mantissa()
            .checked_mul(10i128.checked_pow(scale - d.scale())?)
    };
    let mut mantissa = aligned(a)?.checked_add(aligned(b)?)?;
    while scale > 0 && mantissa % 10 == 0 {
        mantissa /= 10;
        scale -= 1;
    }
    Decimal::try_from_i128_with_scale(mantissa, scale).ok()
}

/// `a + b`: exact when its digits fit a decimal, else rounded half to even at the last
/// of the 28 or so significant digits a decimal holds (5000 +
/// 0.1234567890123456789012345678 is 5000.1234567890123456789012346), a difference far
/// below any price's precision. `None` only past the largest decimal (about 7.9e28).
/// Rounding a running total depends on the order it is added in: Tally's are added in
/// a partition's order, which every replay keeps.
pub fn add_fitting(a: Decimal, b: Decimal) -> Option<Decimal> {
    exact_add(a, b).or_else(|| a.checked_add(b))
}

/// A sum of many decimals, exact whatever their order: the whole parts and the
/// fractions (in units of 1e-28) are added apart in 128-bit integers, so 66.666…667 +
/// 66.666…667 + 66.666…666 (27 decimals each) gives 200 although no Decimal holds the
/// running sum 133.333…334. Only the final total must fit a Decimal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExactSum {
    whole: i128,
    /// Always in `0..10^28` after an addition.
    fraction: i128,
    /// The largest scale added: the total keeps it, as a Decimal sum would (1.50 +
    /// 2.50 is 4.00).
    scale: u32,
    /// Past what 128 bits hold (billions of the largest amounts); the total is `None`.
    overflowed: bool,
}

const FRACTION_UNIT: i128 = 10i128.pow(MAX_SCALE as u32);

impl ExactSum {
    pub fn add(&mut self, d: Decimal) {
        let scale_up = 10i128.pow(MAX_SCALE as u32 - d.scale());
        let power = 10i128.pow(d.scale());
        let (whole, fraction) = (d.mantissa() / power, d.mantissa() % power * scale_up);
        let sum = (|| {
            let fraction = self.fraction.checked_add(fraction)?;
            let whole =
                (self.whole.checked_add(whole)?).checked_add(fraction.div_euclid(FRACTION_UNIT))?;
            Some((whole, fraction.rem_euclid(FRACTION_UNIT)))
        })();
        match sum {
            Some((whole, fraction)) => (self.whole, self.fraction) = (whole, fraction),
            None => self.overflowed = true,
        }
        self.scale = self.scale.max(d.scale());
    }

    /// The exact total, or `None` when it needs more than a Decimal's 28 significant
    /// digits or is past its range.
    pub fn total(&self) -> Option<Decimal> {
        if self.overflowed {
            return None;
        }
        let (mut fraction, mut fewest) = (self.fraction, MAX_SCALE as u32);
        while fewest > 0 && fraction % 10 == 0 {
            fraction /= 10;
            fewest -= 1;
        }
        let digits = (self.whole.checked_mul(10i128.pow(fewest))?).checked_add(fraction)?;
        // The largest scale up to the parts' that fits, as rust_decimal drops trailing
        // zeros only to fit.
        (fewest..=self.scale.max(fewest)).rev().find_map(|scale| {
            let mantissa = digits.checked_mul(10i128.pow(scale - fewest))?;
            Decimal::try_from_i128_with_scale(mantissa, scale).ok()
        })
    }
}

impl ExactSum {
    /// The total, exact when it fits a decimal ([`ExactSum::total`]), else rounded half
    /// to even to the digits a decimal holds; either way the same whatever the order of
    /// the parts. `None` only past the largest decimal (about 7.9e28).
    pub fn fitted_total(&self) -> Option<Decimal> {
        if self.overflowed {
            return None;
        }
        self.total().or_else(|| {
            // The most decimals that fit, the fraction rounded to them.
            (0..MAX_SCALE as u32).rev().find_map(|scale| {
                let dropped = 10i128.pow(MAX_SCALE as u32 - scale);
                let (kept, rest) = (self.fraction / dropped, self.fraction % dropped);
                let truncated = (self.whole.checked_mul(10i128.pow(scale))?).checked_add(kept)?;
                let half = dropped / 2;
                let up = rest > half || (rest == half && truncated % 2 != 0);
                let mantissa = truncated.checked_add(i128::from(up))?;
                Decimal::try_from_i128_with_scale(mantissa, scale).ok()
            })
        })
    }
}

impl FromIterator<Decimal> for ExactSum {
    fn from_iter<I: IntoIterator<Item = Decimal>>(items: I) -> Self {
        let mut sum = ExactSum::default();
        items.into_iter().for_each(|d| sum.add(d));
        sum
    }
}

/// An exact decimal of any number of digits: a charge before it is rounded to the
/// currency. A tier's quantity times its unit amount can need more than a Decimal's 28
/// fractional digits (0.00002777777777777778 GB-s, a float's text, at 0.0000166667
/// needs 30) although it is a fraction of a cent: held exactly, it is rounded once and
/// correctly, where rounding it to 28 digits first could move a tie. Equality is of
/// digits and scale, as written (1.50 is not 1.5): compare values through
/// [`ExactAmount::to_decimal`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExactAmount {
    /// The value times 10^scale.
    digits: BigInt,
    scale: u32,
}

impl From<Decimal> for ExactAmount {
    fn from(d: Decimal) -> Self {
        ExactAmount {
            digits: BigInt::from(d.mantissa()),
            scale: d.scale(),
        }
    }
}

impl ExactAmount {
    /// `a × b`, exactly.
    pub fn product(a: Decimal, b: Decimal) -> ExactAmount {
        ExactAmount {
            digits: BigInt::from(a.mantissa()) * BigInt::from(b.mantissa()),
            scale: a.scale() + b.scale(),
        }
    }

    /// `percent` % of `amount`, exactly.
    pub fn percent_of(amount: Decimal, percent: Decimal) -> ExactAmount {
        let mut share = ExactAmount::product(amount, percent);
        share.scale += 2;
        share
    }

    /// Adds `other`, exactly; the sum keeps the larger scale (1.50 + 2.5 is 4.00).
    pub fn add(&mut self, other: &ExactAmount) {
        let scale = self.scale.max(other.scale);
        self.digits = self.digits_at(scale) + other.digits_at(scale);
        self.scale = scale;
    }

    /// The value times 10^scale, for a scale of at least its own.
    fn digits_at(&self, scale: u32) -> BigInt {
        &self.digits * BigInt::from(10u32).pow(scale - self.scale)
    }

    /// The value rounded to `places` fractional digits, ties as `mode` says; `None`
    /// when that is beyond the largest decimal.
    pub fn round(&self, places: u32, mode: RoundingMode) -> Option<Decimal> {
        let mantissa = match self.scale.checked_sub(places) {
            None | Some(0) => self.digits_at(places),
            Some(dropped) => {
                let divisor = BigInt::from(10u32).pow(dropped);
                let (quotient, remainder) = (&self.digits / &divisor, &self.digits % &divisor);
                let away = match (remainder.magnitude() * 2u32).cmp(divisor.magnitude()) {
                    Ordering::Less => false,
                    Ordering::Greater => true,
                    Ordering::Equal => match mode {
                        RoundingMode::HalfUp => true,
                        RoundingMode::HalfEven => quotient.magnitude().bit(0),
                    },
                };
                match (away, self.digits.sign()) {
                    (false, _) => quotient,
                    (true, Sign::Minus) => quotient - 1,
                    (true, _) => quotient + 1,
                }
            }
        };
        Decimal::try_from_i128_with_scale(i128::try_from(&mantissa).ok()?, places).ok()
    }

    /// The value as a decimal, exactly: at its own scale, or with as few of its
    /// trailing zeros dropped as make it fit. `None` when no decimal holds it.
    pub fn to_decimal(&self) -> Option<Decimal> {
        let (mut digits, mut scale) = (self.digits.clone(), self.scale);
        loop {
            let fits = (scale <= MAX_SCALE as u32)
                .then(|| i128::try_from(&digits).ok())
                .flatten()
                .and_then(|m| Decimal::try_from_i128_with_scale(m, scale).ok());
            if fits.is_some() {
                return fits;
            }
            let ten = BigInt::from(10u32);
            if scale == 0 || (&digits % &ten).sign() != Sign::NoSign {
                return None;
            }
            digits /= ten;
            scale -= 1;
        }
    }

    /// The value itself when a decimal holds it, else the nearest decimal with as many
    /// fractional digits as fit (ties to even): what a breakdown can show of an amount
    /// finer than 28 decimals. `None` past the largest decimal.
    pub fn nearest_decimal(&self) -> Option<Decimal> {
        self.to_decimal().or_else(|| {
            (0..=self.scale.min(MAX_SCALE as u32))
                .rev()
                .find_map(|places| self.round(places, RoundingMode::HalfEven))
        })
    }
}

/// The exact value, every digit, without trailing fractional zeros (`0.004999…9`,
/// `12.5`): what an explanation shows of an unrounded amount.
impl fmt::Display for ExactAmount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scale = self.scale as usize;
        let digits = self.digits.magnitude().to_string();
        let digits = format!("{digits:0>width$}", width = scale + 1);
        let (whole, fraction) = digits.split_at(digits.len() - scale);
        let fraction = fraction.trim_end_matches('0');
        let sign = if self.digits.sign() == Sign::Minus {
            "-"
        } else {
            ""
        };
        match fraction {
            "" => write!(f, "{sign}{whole}"),
            fraction => write!(f, "{sign}{whole}.{fraction}"),
        }
    }
}

/// How many whole packages of `size` hold `quantity` (both positive), rounded as
/// `round` says, without the rounding of a 28-digit quotient: the whole packages come from
/// exact remainder arithmetic, so a quantity a hair over a package boundary still
/// needs one more. `None` past the largest decimal, or for a quantity of about 29
/// digits, whose remainder cannot be taken off exactly.
pub fn whole_packages(quantity: Decimal, size: Decimal, round: PackageRounding) -> Option<Decimal> {
    let remainder = quantity.checked_rem(size)?;
    // Exactly a multiple of `size`, so the quotient is a whole number; a subtraction
    // that would round (a quantity of about 29 digits) is refused instead.
    let whole = exact_add(quantity, -remainder)?.checked_div(size)?.trunc();
    match round == PackageRounding::Up && !remainder.is_zero() {
        true => whole.checked_add(Decimal::ONE),
        false => Some(whole),
    }
}

/// Reads `text` exactly: digits with an optional sign, fraction and exponent.
pub fn parse_exact(text: &str) -> Result<Decimal, DecimalError> {
    let (digits, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], Some(parse_exponent(&text[at + 1..])?)),
        None => (text, None),
    };
    // Digits no decimal holds are too many, unless the number is past the largest
    // decimal (about 7.9e28, 29 whole digits) anyway.
    let value = parse_plain(digits).map_err(|e| match e {
        DecimalError::TooPrecise
            if magnitude(digits).saturating_add(exponent.unwrap_or(0)) > 29 =>
        {
            DecimalError::TooLarge
        }
        other => other,
    })?;
    match exponent {
        Some(exponent) => with_exponent(value, exponent),
        None => Ok(value),
    }
}

/// How many whole digits `digits` has, leading zeros aside, or for a number below 1
/// minus the zeros after its point: 3 for 123.4, 0 for 0.5, -2 for 0.00123.
fn magnitude(digits: &str) -> i64 {
    let unsigned = digits.trim_start_matches(['-', '+']);
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let whole = whole.trim_start_matches('0');
    let count = |s: &str| i64::try_from(s.len()).unwrap_or(i64::MAX);
    match whole.is_empty() {
        false => count(whole),
        true => -(count(fraction) - count(fraction.trim_start_matches('0'))),
    }
}

/// `[+-]?digits(.digits)?`, read exactly. Trailing fractional zeros carry no value, so
/// they are dropped when the digits would not fit otherwise (5.0010 keeps its scale;
/// 1.000…0 with thirty zeros is 1).
fn parse_plain(text: &str) -> Result<Decimal, DecimalError> {
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, "0"));
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(fraction) {
        return Err(DecimalError::Syntax);
    }
    Decimal::from_str_exact(text)
        .or_else(|e| match text.contains('.') {
            true => Decimal::from_str_exact(text.trim_end_matches('0').trim_end_matches('.')),
            false => Err(e),
        })
        .map_err(|_| DecimalError::TooPrecise)
}

fn parse_exponent(text: &str) -> Result<i64, DecimalError> {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DecimalError::Syntax);
    }
    // Exponents past any Decimal's range are refused below, not here; saturating
    // keeps a 40-digit exponent an error of size, not of syntax.
    Ok(text.parse::<i64>().unwrap_or(if text.starts_with('-') {
        i64::MIN / 2
    } else {
        i64::MAX / 2
    }))
}

/// `value × 10^exponent`, exactly: `TooPrecise` when it needs more than 28 fractional
/// digits, `TooLarge` when it is past the largest Decimal.
fn with_exponent(value: Decimal, exponent: i64) -> Result<Decimal, DecimalError> {
    let mut mantissa = value.mantissa();
    let mut scale = i64::from(value.scale()) - exponent;
    // Trailing zeros of the digits can absorb a scale past the maximum.
    while scale > MAX_SCALE && mantissa != 0 && mantissa % 10 == 0 {
        mantissa /= 10;
        scale -= 1;
    }
    if mantissa == 0 {
        return Ok(Decimal::ZERO);
    }
    if scale > MAX_SCALE {
        return Err(DecimalError::TooPrecise);
    }
    if scale < 0 {
        // 10^29 exceeds any Decimal's 96-bit mantissa.
        let factor = u32::try_from(-scale)
            .ok()
            .filter(|&e| e <= 29)
            .and_then(|e| 10_i128.checked_pow(e))
            .ok_or(DecimalError::TooLarge)?;
        mantissa = mantissa.checked_mul(factor).ok_or(DecimalError::TooLarge)?;
        scale = 0;
    }
    let scale = u32::try_from(scale).map_err(|_| DecimalError::TooPrecise)?;
    Decimal::try_from_i128_with_scale(mantissa, scale).map_err(|_| DecimalError::TooLarge)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use proptest::prelude::*;

    use super::*;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn plain_and_exponent_forms_read_exactly() {
        for (text, value) in [
            ("12", "12"),
            ("-0.5", "-0.5"),
            ("+7", "7"),
            ("5.0010", "5.0010"),
            ("1.25e3", "1250"),
            ("1.25E+3", "1250"),
            ("125e-2", "1.25"),
            ("0e99999", "0"),
            ("1e28", "10000000000000000000000000000"),
            ("1e-28", "0.0000000000000000000000000001"),
            ("1000e-30", "0.000000000000000000000000001"),
            ("1.000000000000000000000000000000", "1"),
        ] {
            assert_eq!(parse_exact(text), Ok(dec(value)), "{text}");
        }
        assert_eq!(parse_exact("5.0010").unwrap().scale(), 4);
    }

    #[test]
    fn digits_a_decimal_cannot_hold_are_refused_never_rounded() {
        // from_scientific reads the first as 100 and the second with its last digit cut.
        for text in [
            "1.00000000000000000000000000001e2",
            "1.23456789012345678901234567891e0",
            "1.5e-30",
            "1e-99999999999999999999999",
            "1234567890123456789012345678.91",
            // Many digits, but a small number: too precise, not too large.
            "1234567890123456789012345678901e-30",
            "0.0000000000000000000000000000001234",
            "10000000000000000000000000000.5",
        ] {
            assert_eq!(parse_exact(text), Err(DecimalError::TooPrecise), "{text}");
        }
        for text in [
            "1e29",
            "8e28",
            "-8e28",
            "1e99999999999999999999999",
            "123456789012345678901234567890",
            "1234567890123456789012345678901.5",
            "1.234567890123456789012345678901e40",
        ] {
            assert_eq!(parse_exact(text), Err(DecimalError::TooLarge), "{text}");
        }
    }

    #[test]
    fn what_is_not_a_number_is_a_syntax_error() {
        for text in [
            "", "-", "1.", ".5", "1..2", "1e", "1e+", "e5", "1_000", "0x10", " 1", "1.5.e2", "inf",
            "NaN",
        ] {
            assert_eq!(parse_exact(text), Err(DecimalError::Syntax), "{text:?}");
        }
    }

    #[test]
    fn sums_that_would_round_are_refused() {
        assert_eq!(exact_add(dec("1.5"), dec("2.25")), Some(dec("3.75")));
        assert_eq!(exact_add(dec("1.5"), dec("2.25")).unwrap().scale(), 2);
        // 29 and 30 significant digits: rust_decimal would drop the small parts.
        assert_eq!(
            exact_add(dec("800000000000000000"), dec("0.000000000001")),
            None
        );
        assert_eq!(
            exact_add(dec("500000000000000000000"), dec("0.000000001")),
            None
        );
        assert_eq!(exact_add(Decimal::MAX, Decimal::ONE), None);
        // Digits rust_decimal drops to fit that are all zeros: the sum is exact.
        assert_eq!(
            exact_add(
                dec("31.666666666666666666666666667"),
                dec("63.333333333333333333333333333")
            ),
            Some(dec("95"))
        );
        assert_eq!(
            exact_add(
                dec("500000000000000000000"),
                dec("0.0000000000000000000000000001")
            ),
            None
        );
        assert_eq!(
            exact_add(dec("800000000000000000"), dec("0.0000000001")),
            Some(dec("800000000000000000.0000000001"))
        );
    }

    #[test]
    fn exact_amounts_hold_every_digit_until_rounded_once() {
        let product = |a: &str, b: &str| ExactAmount::product(dec(a), dec(b));
        assert_eq!(product("1.5", "-2.25").to_decimal(), Some(dec("-3.375")));
        assert_eq!(product("0", "123.45").to_decimal(), Some(dec("0")));
        // A scale past 28 whose extra digits are zeros fits.
        let fifth = product("0.20000000000000000000000000", "0.5000");
        assert_eq!(fifth.to_decimal(), Some(dec("0.1")));
        // 33 significant digits: rust_decimal's product ends ...185059 where it is
        // ...1850593.
        let long = product("1234567.891234567891234567891", "0.0123");
        assert_eq!(long.to_decimal(), None);
        assert_eq!(
            long.nearest_decimal(),
            Some(dec("15185.185062185185062185185059"))
        );
        // 1e-15 × 1e-15 needs 30 fractional digits; the nearest that fit is zero.
        let tiny = product("0.000000000000001", "0.000000000000001");
        assert_eq!(tiny.to_decimal(), None);
        assert_eq!(tiny.nearest_decimal(), Some(dec("0")));
        assert_eq!(tiny.round(2, RoundingMode::HalfUp), Some(dec("0")));
        assert_eq!(
            product("79228162514264337593543950335", "2").to_decimal(),
            None
        );
        assert_eq!(
            product("79228162514264337593543950335", "2").nearest_decimal(),
            None
        );
        assert_eq!(
            product("79228162514264337593543950335", "1.0").to_decimal(),
            Some(Decimal::MAX)
        );
    }

    #[test]
    fn exact_amounts_round_ties_by_the_mode_on_either_side_of_zero() {
        let amount = |a: &str| ExactAmount::from(dec(a));
        for (value, half_up, half_even) in [
            ("0.125", "0.13", "0.12"),
            ("0.135", "0.14", "0.14"),
            ("-0.125", "-0.13", "-0.12"),
            ("0.1250000000000000000000000001", "0.13", "0.13"),
            ("0.1249999999999999999999999999", "0.12", "0.12"),
            ("7", "7", "7"),
        ] {
            assert_eq!(
                amount(value).round(2, RoundingMode::HalfUp),
                Some(dec(half_up)),
                "{value}"
            );
            assert_eq!(
                amount(value).round(2, RoundingMode::HalfEven),
                Some(dec(half_even)),
                "{value}"
            );
        }
        // Past 28 decimals: 0.004999…9 (30 decimals) is under the tie, 0.0050…01 over it.
        let under = ExactAmount::product(dec("0.4999999999999999999999999999"), dec("0.01"));
        assert_eq!(under.round(2, RoundingMode::HalfUp), Some(dec("0")));
        let mut over = ExactAmount::from(dec("0.005"));
        over.add(&ExactAmount::product(
            dec("0.000000000000001"),
            dec("0.000000000000001"),
        ));
        assert_eq!(over.round(2, RoundingMode::HalfEven), Some(dec("0.01")));
        assert_eq!(over.to_decimal(), None);
        // A percentage is exact too: 33.333 % of 15.25.
        let share = ExactAmount::percent_of(dec("15.25"), dec("33.333"));
        assert_eq!(share.to_decimal(), Some(dec("5.08328250")));
        assert_eq!(share.to_string(), "5.0832825");
        // Shown with every digit, where a decimal would round it to a tie.
        let under = ExactAmount::percent_of(dec("0.01"), dec("49.99999999999999999999999999"));
        assert_eq!(under.to_string(), "0.004999999999999999999999999999");
        assert_eq!(ExactAmount::from(dec("-12.50")).to_string(), "-12.5");
        assert_eq!(ExactAmount::from(dec("0.0")).to_string(), "0");
        assert_eq!(
            ExactAmount::from(Decimal::MAX).round(2, RoundingMode::HalfUp),
            None
        );
    }

    #[test]
    fn sums_of_many_are_exact_whatever_the_order() {
        let (up, down) = (
            dec("66.666666666666666666666666667"),
            dec("66.666666666666666666666666666"),
        );
        // No Decimal holds the running sum 133.333…334 (30 digits); the total is exact.
        assert_eq!(exact_add(up, up), None);
        let sum: ExactSum = [up, up, down].into_iter().collect();
        assert_eq!(sum.total(), Some(dec("200")));
        let sum: ExactSum = [down, up, up].into_iter().collect();
        assert_eq!(sum.total(), Some(dec("200")));
        let sum: ExactSum = [
            dec("-1.5"),
            dec("0.25"),
            dec("-0.0000000000000000000000000001"),
        ]
        .into_iter()
        .collect();
        assert_eq!(sum.total(), Some(dec("-1.2500000000000000000000000001")));
        assert_eq!(ExactSum::default().total(), Some(Decimal::ZERO));
        let sum: ExactSum = [dec("1.50"), dec("2.50")].into_iter().collect();
        assert_eq!(sum.total().unwrap().to_string(), "4.00");
        // A total that needs 38 digits has no exact Decimal.
        let sum: ExactSum = [dec("5000000000"), dec("0.0000000000000000000000000001")]
            .into_iter()
            .collect();
        assert_eq!(sum.total(), None);
        let sum: ExactSum = [Decimal::MAX, Decimal::MAX, -Decimal::MAX]
            .into_iter()
            .collect();
        assert_eq!(sum.total(), Some(Decimal::MAX));
        let sum: ExactSum = [Decimal::MAX, Decimal::ONE].into_iter().collect();
        assert_eq!(sum.total(), None);
    }

    #[test]
    fn a_total_past_28_digits_keeps_its_most_significant_rounded_half_to_even() {
        let fitted = |parts: &[&str]| {
            let sum: ExactSum = parts.iter().map(|p| dec(p)).collect();
            sum.fitted_total()
        };
        let (small, large) = ("0.1234567890123456789012345678", "5000");
        let expected = Some(dec("5000.1234567890123456789012346"));
        assert_eq!(fitted(&[small, large]), expected);
        assert_eq!(fitted(&[large, small]), expected);
        assert_eq!(add_fitting(dec(small), dec(large)), expected);
        // Exact whenever it fits, trailing zeros kept as a sum keeps them.
        assert_eq!(fitted(&["1.50", "2.50"]).unwrap().to_string(), "4.00");
        // Ties go to the even digit, up or down.
        let tie_down = ["50000000000000000000000000000", "0.2", "0.3"];
        assert_eq!(
            fitted(&tie_down),
            Some(dec("50000000000000000000000000000"))
        );
        let tie_up = ["50000000000000000000000000001", "0.5"];
        assert_eq!(fitted(&tie_up), Some(dec("50000000000000000000000000002")));
        let above = ["50000000000000000000000000000", "0.5", "0.0000000001"];
        assert_eq!(fitted(&above), Some(dec("50000000000000000000000000001")));
        let negative = ["-50000000000000000000000000000", "-0.6"];
        assert_eq!(
            fitted(&negative),
            Some(dec("-50000000000000000000000000001"))
        );
        // Only past the largest decimal is there no total.
        assert_eq!(fitted(&["79228162514264337593543950335", "1"]), None);
        assert_eq!(add_fitting(Decimal::MAX, Decimal::ONE), None);
    }

    #[test]
    fn packages_are_counted_exactly_at_any_size() {
        let up =
            |q: &str, size: &str| whole_packages(dec(q), dec(size), PackageRounding::Up).unwrap();
        let down =
            |q: &str, size: &str| whole_packages(dec(q), dec(size), PackageRounding::Down).unwrap();
        assert_eq!(up("1001", "1000"), dec("2"));
        assert_eq!(down("1001", "1000"), dec("1"));
        assert_eq!(up("1000", "1000"), dec("1"));
        assert_eq!(up("0", "1000"), dec("0"));
        assert_eq!(up("2.5", "0.5"), dec("5"));
        // The quotient 100000000000000000000.0000000033... rounds to a whole number
        // at 28 digits; the package it starts is still counted.
        assert_eq!(
            up("300000000000000000000.00000001", "3"),
            dec("100000000000000000001")
        );
        assert_eq!(
            down("300000000000000000000.00000001", "3"),
            dec("100000000000000000000")
        );
        // Where taking the remainder off would round, there is no exact count.
        assert_eq!(
            whole_packages(
                dec("10000000000000000000000000001"),
                dec("0.3"),
                PackageRounding::Up
            ),
            None
        );
    }

    proptest! {
        /// An exact sum minus either part gives the other; none is ever rounded.
        #[test]
        fn exact_sums_give_back_their_parts(a in (any::<i64>(), any::<u32>()), sa in 0u32..=28, b in (any::<i64>(), any::<u32>()), sb in 0u32..=28) {
            // Mantissas of up to 95 bits, so sums often need more than 28 digits.
            let wide = |(high, low): (i64, u32)| (i128::from(high) << 32) | i128::from(low);
            let a = Decimal::from_i128_with_scale(wide(a), sa);
            let b = Decimal::from_i128_with_scale(wide(b), sb);
            match exact_add(a, b) {
                Some(sum) => {
                    prop_assert_eq!(sum - b, a);
                    prop_assert_eq!(sum - a, b);
                }
                // Refused only when rust_decimal could not add them exactly either.
                None => prop_assert!(a.checked_add(b).is_none_or(|rounded| rounded - b != a || rounded - a != b)),
            }
        }

        /// A product is exact, and is a Decimal exactly when one holds it: checked
        /// against i128 arithmetic on mantissas of up to 63 bits. Rounded, it agrees with
        /// the same rounding done on the whole numbers.
        #[test]
        fn exact_products_match_whole_number_arithmetic(a in any::<i64>(), sa in 0u32..=28, b in any::<i64>(), sb in 0u32..=28, places in 0u32..=4, half_even in any::<bool>()) {
            let whole = i128::from(a) * i128::from(b);
            let expected = {
                let (mut mantissa, mut scale) = (whole, sa + sb);
                while scale > 0 && mantissa % 10 == 0 {
                    mantissa /= 10;
                    scale -= 1;
                }
                Decimal::try_from_i128_with_scale(mantissa, scale).ok()
            };
            let product = ExactAmount::product(Decimal::new(a, sa), Decimal::new(b, sb));
            prop_assert_eq!(product.to_decimal(), expected);
            let mode = if half_even { RoundingMode::HalfEven } else { RoundingMode::HalfUp };
            let rounded = match (sa + sb).checked_sub(places) {
                None => whole.checked_mul(10i128.pow(places - sa - sb)),
                // |whole| < 2^126 < 10^38 / 2: nothing but zero rounds from it.
                Some(dropped) if dropped > 38 => Some(0),
                Some(dropped) => {
                    let divisor = 10i128.pow(dropped);
                    let (quotient, remainder) = (whole / divisor, (whole % divisor).abs());
                    let away = match (remainder * 2).cmp(&divisor) {
                        Ordering::Less => false,
                        Ordering::Greater => true,
                        Ordering::Equal => !half_even || quotient % 2 != 0,
                    };
                    Some(quotient + if away { whole.signum() } else { 0 })
                }
            };
            let rounded = rounded.and_then(|m| Decimal::try_from_i128_with_scale(m, places).ok());
            prop_assert_eq!(product.round(places, mode), rounded);
        }

        /// Exact amounts add as exact decimal sums do, where those hold.
        #[test]
        fn exact_amounts_add_as_decimals_do(a in any::<i64>(), sa in 0u32..=28, b in any::<i64>(), sb in 0u32..=28) {
            let (a, b) = (Decimal::new(a, sa), Decimal::new(b, sb));
            let mut sum = ExactAmount::from(a);
            sum.add(&b.into());
            if let Some(expected) = exact_add(a, b) {
                prop_assert_eq!(sum.to_decimal(), Some(expected));
            }
            let mut back = sum.clone();
            back.add(&(-b).into());
            prop_assert_eq!(back.to_decimal(), Some(a));
        }

        /// A sum in any order is the sum of exact pairwise additions, where those hold.
        #[test]
        fn exact_sums_of_many_match_pairwise_sums(parts in proptest::collection::vec((any::<i64>(), 0u32..=28), 0..12), rotate in 0usize..12) {
            let mut parts: Vec<Decimal> = parts.into_iter().map(|(m, s)| Decimal::new(m, s)).collect();
            let pairwise = parts.iter().try_fold(Decimal::ZERO, |a, &b| exact_add(a, b));
            let forward: ExactSum = parts.iter().copied().collect();
            if !parts.is_empty() {
                let by = rotate % parts.len();
                parts.rotate_left(by);
            }
            let rotated: ExactSum = parts.iter().copied().collect();
            prop_assert_eq!(forward.total(), rotated.total());
            if let Some(pairwise) = pairwise {
                prop_assert_eq!(forward.total(), Some(pairwise));
            }
        }

        /// Whole packages hold the quantity (rounded up) or fit in it (rounded down),
        /// with less than one package to spare.
        #[test]
        fn whole_packages_bracket_the_quantity(q in 0i64..=i64::MAX, sq in 0u32..=12, size in 1i64..=1_000_000, ss in 0u32..=6) {
            let (q, size) = (Decimal::new(q, sq), Decimal::new(size, ss));
            let up = whole_packages(q, size, PackageRounding::Up).unwrap();
            let down = whole_packages(q, size, PackageRounding::Down).unwrap();
            prop_assert!(up * size >= q && (up - Decimal::ONE) * size < q || q.is_zero());
            prop_assert!(down * size <= q && (down + Decimal::ONE) * size > q);
            prop_assert_eq!(up.scale(), 0);
        }
    }

    proptest! {
        /// Any Decimal, written with any exponent that keeps its digits in range, reads
        /// back as the same value.
        #[test]
        fn exponent_forms_round_trip(mantissa in any::<i64>(), scale in 0u32..=18, shift in -10i64..=10) {
            let value = Decimal::new(mantissa, scale);
            // value = digits × 10^(shift - scale'), written as (value × 10^-shift) e shift.
            let mut written = value;
            let target = i64::from(scale) + shift;
            prop_assume!((0..=28).contains(&target));
            written.set_scale(u32::try_from(target).unwrap()).unwrap();
            let text = format!("{written}e{shift}");
            prop_assert_eq!(parse_exact(&text), Ok(value), "{}", text);
        }
    }
}
