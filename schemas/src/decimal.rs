//! Exact decimals from text: the one parser for event values and config amounts.
//!
//! In: a number as text, plain or with an exponent (`12`, `-0.5`, `1.25e3`). Out: the
//! [`Decimal`] with exactly that value, or an error: the digits before the exponent
//! must fit a Decimal's 28 significant digits (trailing fractional zeros aside), and
//! the value its range. rust_decimal's `from_scientific` rounds a mantissa longer than
//! 28 digits; this never rounds.

use rust_decimal::Decimal;

/// The most fractional digits a [`Decimal`] holds.
const MAX_SCALE: i64 = 28;

/// Why text is not an exact decimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    #[error("is not a decimal number")]
    Syntax,
    #[error("needs more than the 28 significant digits an exact decimal holds")]
    TooPrecise,
    #[error("is beyond the largest exact decimal (about 7.9e28)")]
    TooLarge,
}

/// Reads `text` exactly: digits with an optional sign, fraction and exponent.
pub fn parse_exact(text: &str) -> Result<Decimal, DecimalError> {
    match text.find(['e', 'E']) {
        Some(at) => with_exponent(parse_plain(&text[..at])?, parse_exponent(&text[at + 1..])?),
        None => parse_plain(text),
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
            "123456789012345678901234567890",
        ] {
            assert_eq!(parse_exact(text), Err(DecimalError::TooPrecise), "{text}");
        }
        for text in ["1e29", "8e28", "-8e28", "1e99999999999999999999999"] {
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
