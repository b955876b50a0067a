//! tally.toml through `Config::parse`: what a valid price book becomes, and for every
//! rule a bad one breaks, where the problem is reported (`at`) and what the message says.

// Helpers panic on unexpected input: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::str::FromStr;

use rust_decimal::Decimal;
use tally_schemas::config::{Aggregation, AggregationKind, Config, ConfigError};
use tally_schemas::money::RoundingMode;
use tally_schemas::price::{Discount, PackageRounding, Rate, TiersMode, UpTo};
use tally_schemas::time::Period;

/// A period the sample customer is billed in.
fn november() -> Period {
    "2026-11".parse().unwrap()
}

/// The issue's sample configuration.
const BASE: &str = include_str!("../../examples/tally.toml");

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

/// BASE with one exact piece of text replaced (which must be there).
fn with(old: &str, new: &str) -> String {
    assert!(BASE.contains(old), "BASE has no {old:?}");
    BASE.replacen(old, new, 1)
}

fn parse(text: &str) -> Config {
    Config::parse(text, "tally.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// The `(at, message)` of every issue found in a file that is valid TOML.
fn issues(text: &str) -> Vec<(String, String)> {
    match Config::parse(text, "tally.toml") {
        Ok(_) => panic!("expected validation issues in:\n{text}"),
        Err(ConfigError::Invalid { origin, issues }) => {
            assert_eq!(origin, "tally.toml");
            issues.into_iter().map(|i| (i.at, i.message)).collect()
        }
        Err(other) => panic!("expected validation issues, got: {other}"),
    }
}

/// Asserts the file has exactly one issue, at `at`, whose message contains `fragment`.
fn assert_only_issue(text: &str, at: &str, fragment: &str) {
    let found = issues(text);
    assert_eq!(
        found.len(),
        1,
        "expected one issue at {at}, found {found:#?}"
    );
    assert_eq!(found[0].0, at, "{found:#?}");
    assert!(
        found[0].1.contains(fragment),
        "{:?} lacks {fragment:?}",
        found[0].1
    );
}

/// Asserts one of the issues is at `at` and its message contains `fragment`.
fn assert_has_issue(text: &str, at: &str, fragment: &str) {
    let found = issues(text);
    assert!(
        found.iter().any(|(a, m)| a == at && m.contains(fragment)),
        "no issue at {at} containing {fragment:?} in {found:#?}"
    );
}

/// The message of a file that is not valid TOML for tally.
fn syntax_error(text: &str) -> String {
    match Config::parse(text, "tally.toml") {
        Err(e @ ConfigError::Syntax { .. }) => e.to_string(),
        Err(other) => panic!("expected a syntax error, got: {other}"),
        Ok(_) => panic!("expected a syntax error in:\n{text}"),
    }
}

#[test]
fn the_issue_sample_config_is_valid_and_means_what_it_says() {
    let config = parse(BASE);
    assert_eq!(config.meters.len(), 2);
    assert_eq!(config.meters[0].slug, "resolutions");
    assert_eq!(config.meters[0].aggregation.kind(), AggregationKind::Count);
    assert_eq!(config.meters[1].aggregation.kind(), AggregationKind::Sum);
    assert_eq!(
        config.meters[1]
            .aggregation
            .value_property()
            .unwrap()
            .as_str(),
        "$.tokens"
    );
    assert_eq!(config.meters[1].group_by.len(), 1);
    assert_eq!(config.meters[1].group_by[0].0, "model");

    let plan = &config.plans[0];
    assert_eq!(plan.id, "pro");
    assert_eq!(plan.currency.code(), "usd");
    assert_eq!(plan.currency.minor_units(), 2);
    assert_eq!(
        plan.rounding,
        RoundingMode::HalfUp,
        "half_up is the default"
    );
    assert_eq!(plan.prices.len(), 2);
    match &plan.prices[0].rate {
        Rate::Tiered { mode, tiers } => {
            assert_eq!(*mode, TiersMode::Graduated);
            let rows: Vec<(UpTo, Decimal, Decimal)> = tiers
                .iter()
                .map(|t| (t.up_to, t.unit_amount, t.flat_amount))
                .collect();
            assert_eq!(
                rows,
                [
                    (UpTo::Finite(dec("100")), dec("0"), dec("49")),
                    (UpTo::Finite(dec("1000")), dec("0.89"), dec("0")),
                    (UpTo::Inf, dec("0.69"), dec("0")),
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    match &plan.prices[1].rate {
        Rate::PerUnit {
            unit_amount,
            package: Some(p),
        } => {
            assert_eq!(*unit_amount, dec("0.002"));
            assert_eq!(p.divide_by, dec("1000"));
            assert_eq!(p.round, PackageRounding::Up);
        }
        other => panic!("{other:?}"),
    }
    let tokens = config.meters_for("llm.tokens")[0];
    let usage = plan.prices[1].usage.as_ref().unwrap();
    assert_eq!(
        (usage.meter, &usage.filter[..]),
        (tokens, &[(0, "gpt-x".to_owned())][..])
    );
    assert!(plan.prices[1].bills(tokens, &["gpt-x".to_owned()]));
    assert!(!plan.prices[1].bills(tokens, &["gpt-y".to_owned()]));

    let acme = config.customers["cust_acme"].subscription(november());
    assert_eq!(config.plan(acme.plan).id, "pro");
    assert_eq!(acme.discounts.len(), 1);
    assert_eq!(acme.discounts[&0], Discount::PercentOff(dec("12.5")));
    assert_eq!(config.meters_for("llm.tokens").len(), 1);
    assert!(config.meters_for("unknown").is_empty());
}

#[test]
fn currencies_carry_their_iso_4217_minor_units() {
    // xcg: the Caribbean guilder, in ISO 4217 since 2025.
    for (code, minor) in [("usd", 2), ("eur", 2), ("jpy", 0), ("kwd", 3), ("xcg", 2)] {
        let config = parse(&with(
            r#"currency = "usd""#,
            &format!("currency = \"{code}\""),
        ));
        assert_eq!(config.plans[0].currency.minor_units(), minor, "{code}");
    }
    let even = parse(&with(
        r#"currency = "usd""#,
        "currency = \"usd\"\nrounding = \"half_even\"",
    ));
    assert_eq!(even.plans[0].rounding, RoundingMode::HalfEven);
}

#[test]
fn amounts_may_be_integers_or_decimal_strings() {
    let config = parse(
        &with(r#"unit_amount = "0.002""#, "unit_amount = 2")
            .replace(r#"flat_amount = "49""#, "flat_amount = 49")
            .replace("up_to = 100,", r#"up_to = "100.5","#)
            .replace(r#"percent_off = "12.5""#, "percent_off = 10"),
    );
    let plan = &config.plans[0];
    match &plan.prices[1].rate {
        Rate::PerUnit { unit_amount, .. } => assert_eq!(*unit_amount, dec("2")),
        other => panic!("{other:?}"),
    }
    match &plan.prices[0].rate {
        Rate::Tiered { tiers, .. } => {
            assert_eq!(tiers[0].up_to, UpTo::Finite(dec("100.5")));
            assert_eq!(tiers[0].flat_amount, dec("49"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        config.customers["cust_acme"]
            .subscription(november())
            .discounts[&0],
        Discount::PercentOff(dec("10"))
    );
}

#[test]
fn plan_wide_percent_off_applies_to_every_line_and_amount_off_names_its_line() {
    let config = parse(&with(
        r#"discounts = [{ price = "resolutions", percent_off = "12.5" }]"#,
        r#"discounts = [{ percent_off = "10" }]"#,
    ));
    let acme = config.customers["cust_acme"].subscription(november());
    assert_eq!(
        acme.discounts.len(),
        2,
        "a percent_off without price applies to every line"
    );
    assert_eq!(acme.discounts[&0], Discount::PercentOff(dec("10")));
    assert_eq!(acme.discounts[&1], Discount::PercentOff(dec("10")));

    let config = parse(&with(
        r#"discounts = [{ price = "resolutions", percent_off = "12.5" }]"#,
        r#"discounts = [{ price = "resolutions", amount_off = "5" }]"#,
    ));
    let acme = config.customers["cust_acme"].subscription(november());
    assert_eq!(acme.discounts.len(), 1);
    assert_eq!(acme.discounts[&0], Discount::AmountOff(dec("5")));
}

#[test]
fn an_amount_off_without_a_price_is_refused_rather_than_taken_off_every_line() {
    assert_only_issue(
        &with(
            r#"discounts = [{ price = "resolutions", percent_off = "12.5" }]"#,
            r#"discounts = [{ amount_off = "5" }]"#,
        ),
        "customers[cust_acme].discounts[0].price",
        "an amount_off needs the price it applies to",
    );
}

#[test]
fn an_amount_off_with_two_problems_reports_both() {
    let found = issues(&with(
        r#"discounts = [{ price = "resolutions", percent_off = "12.5" }]"#,
        r#"discounts = [{ amount_off = "4.995" }]"#,
    ));
    let at: Vec<&str> = found.iter().map(|(at, _)| at.as_str()).collect();
    assert_eq!(
        at,
        [
            "customers[cust_acme].discounts[0].amount_off",
            "customers[cust_acme].discounts[0].price"
        ]
    );
}

#[test]
fn an_amount_off_finer_than_the_currency_is_refused_in_major_units() {
    assert_only_issue(
        &with(
            r#"discounts = [{ price = "resolutions", percent_off = "12.5" }]"#,
            r#"discounts = [{ price = "resolutions", amount_off = "4.995" }]"#,
        ),
        "customers[cust_acme].discounts[0].amount_off",
        "4.995 has more decimals than usd is billed in (2); amounts are in the currency's major unit, so round it to 2 decimals",
    );
}

#[test]
fn the_config_hash_ignores_layout_and_comments_but_not_prices() {
    let base = parse(BASE).hash;
    let commented = BASE.replace("[[plans]]", "# the plans\n\n[[plans]]   # pro\n");
    assert_eq!(parse(&commented).hash, base);
    assert_eq!(
        parse(&with(r#""0.89""#, r#""0.890""#)).hash,
        base,
        "0.89 and 0.890 are one price"
    );
    assert_ne!(parse(&with(r#""0.89""#, r#""0.88""#)).hash, base);
    assert_ne!(
        parse(&with(r#"percent_off = "12.5""#, r#"percent_off = "10""#)).hash,
        base
    );
    assert_eq!(format!("{}", parse(BASE).hash).len(), 16);
    // The sample book's hash as builds since 2026-12-07 give it. Lines carry it, and a
    // rater takes lines of another hash for lines of another book and re-rates them: a
    // change to how a book is read must leave it, and a change to the rating rules
    // (RATING_RULES) changes it here on purpose, with an upgrade note.
    assert_eq!(parse(BASE).hash.to_string(), "8965d10a8b3bc5d6");
}

#[test]
fn tiers_must_strictly_increase() {
    assert_only_issue(
        &with("up_to = 1000,", "up_to = 100,"),
        "plans[pro].prices[resolutions].tiers[1].up_to",
        "tiers must strictly increase: 100 follows 100",
    );
    assert_only_issue(
        &with("up_to = 1000,", "up_to = 50,"),
        "plans[pro].prices[resolutions].tiers[1].up_to",
        "tiers must strictly increase: 50 follows 100",
    );
}

#[test]
fn the_last_tier_must_be_inf_and_only_the_last() {
    assert_only_issue(
        &with(r#"up_to = "inf""#, "up_to = 5000"),
        "plans[pro].prices[resolutions].tiers[2].up_to",
        "the last tier must have up_to = \"inf\"",
    );
    assert_only_issue(
        &with("up_to = 1000,", r#"up_to = "inf","#),
        "plans[pro].prices[resolutions].tiers[1].up_to",
        "only the last tier may be \"inf\"",
    );
    // Left out, it is told as the same rule, not as a field the parser missed.
    assert_only_issue(
        &with(r#"up_to = "inf", "#, ""),
        "plans[pro].prices[resolutions].tiers[2].up_to",
        "required: the last tier takes up_to = \"inf\", so every quantity has a tier",
    );
    assert_only_issue(
        &with("up_to = 1000, ", ""),
        "plans[pro].prices[resolutions].tiers[1].up_to",
        "required: the tier's inclusive upper bound, e.g. up_to = 1000",
    );
    assert_only_issue(
        &with("up_to = 100,", "up_to = 0,"),
        "plans[pro].prices[resolutions].tiers[0].up_to",
        "must be positive",
    );
    assert_only_issue(
        &with(
            "tiers = [\n  { up_to = 100, flat_amount = \"49\" },\n  { up_to = 1000, unit_amount = \"0.89\" },\n  { up_to = \"inf\", unit_amount = \"0.69\" },\n]",
            "tiers = []",
        ),
        "plans[pro].prices[resolutions].tiers",
        "at least one tier",
    );
    let not_inf = syntax_error(&with(r#"up_to = "inf""#, r#"up_to = "infinity""#));
    assert!(
        not_inf.contains("use \"inf\" for an open-ended tier"),
        "{not_inf}"
    );
    // TOML's bare inf says the same as "inf", down to the price book's hash; -inf and
    // other floats are refused.
    let bare = parse(&with(r#"up_to = "inf""#, "up_to = inf"));
    assert_eq!(bare.hash, parse(BASE).hash);
    let negative = syntax_error(&with(r#"up_to = "inf""#, "up_to = -inf"));
    assert!(negative.contains("TOML floats"), "{negative}");
}

#[test]
fn a_tier_needs_an_amount() {
    assert_only_issue(
        &with(
            r#"{ up_to = 1000, unit_amount = "0.89" }"#,
            "{ up_to = 1000 }",
        ),
        "plans[pro].prices[resolutions].tiers[1]",
        "set unit_amount, flat_amount or both",
    );
}

#[test]
fn amounts_must_not_be_negative() {
    let cases = [
        (
            r#"unit_amount = "0.89""#,
            r#"unit_amount = "-0.89""#,
            "plans[pro].prices[resolutions].tiers[1].unit_amount",
        ),
        (
            r#"flat_amount = "49""#,
            r#"flat_amount = "-49""#,
            "plans[pro].prices[resolutions].tiers[0].flat_amount",
        ),
        (
            r#"unit_amount = "0.002""#,
            "unit_amount = -2",
            "plans[pro].prices[gpt-tokens].unit_amount",
        ),
    ];
    for (old, new, at) in cases {
        assert_only_issue(&with(old, new), at, "amounts must not be negative");
    }
    assert_only_issue(
        &with(r#"percent_off = "12.5""#, r#"amount_off = "-5""#),
        "customers[cust_acme].discounts[0].amount_off",
        "must not be negative",
    );
}

#[test]
fn the_package_divisor_must_be_positive() {
    for divisor in ["0", "-1000"] {
        assert_only_issue(
            &with("divide_by = 1000", &format!("divide_by = {divisor}")),
            "plans[pro].prices[gpt-tokens].transform_quantity.divide_by",
            "must be a positive number",
        );
    }
}

#[test]
fn transform_quantity_does_not_combine_with_tiers() {
    assert_only_issue(
        &with(
            r#"tiers_mode = "graduated""#,
            "tiers_mode = \"graduated\"\ntransform_quantity = { divide_by = 10, round = \"down\" }",
        ),
        "plans[pro].prices[resolutions].transform_quantity",
        "does not combine with tiers",
    );
}

#[test]
fn billing_schemes_need_their_own_fields() {
    assert_only_issue(
        &with("tiers_mode = \"graduated\"\n", ""),
        "plans[pro].prices[resolutions].tiers_mode",
        "required with billing_scheme = \"tiered\"",
    );
    assert_only_issue(
        &with("unit_amount = \"0.002\"\n", ""),
        "plans[pro].prices[gpt-tokens].unit_amount",
        "required with billing_scheme = \"per_unit\"",
    );
    assert_only_issue(
        &with(
            r#"tiers_mode = "graduated""#,
            "tiers_mode = \"graduated\"\nunit_amount = \"1\"",
        ),
        "plans[pro].prices[resolutions].unit_amount",
        "sets unit_amount per tier",
    );
    assert_only_issue(
        &with(
            r#"billing_scheme = "tiered""#,
            r#"billing_scheme = "per_unit""#,
        )
        .replacen(
            "tiers_mode = \"graduated\"",
            "unit_amount = \"1\"\ntiers_mode = \"graduated\"",
            1,
        ),
        "plans[pro].prices[resolutions]",
        "belong to billing_scheme = \"tiered\"",
    );
}

#[test]
fn prices_must_name_a_known_meter() {
    let found = issues(&with(r#"meter = "tokens""#, r#"meter = "tokenz""#));
    assert_eq!(found[0].0, "plans[pro].prices[gpt-tokens].meter");
    assert_eq!(
        found[0].1,
        r#"unknown meter "tokenz"; known meters: resolutions, tokens"#
    );
}

#[test]
fn filters_must_name_a_group_by_dimension_of_the_meter() {
    assert_only_issue(
        &with(
            r#"filter = { model = "gpt-x" }"#,
            r#"filter = { modle = "gpt-x" }"#,
        ),
        "plans[pro].prices[gpt-tokens].filter.modle",
        r#"meter "tokens" has no group_by dimension "modle""#,
    );
}

#[test]
fn filter_values_no_json_number_or_boolean_reads_as_are_warned_about() {
    let warnings = |value: &str| -> Vec<(String, String)> {
        let text = with(
            r#"filter = { model = "gpt-x" }"#,
            &format!("filter = {{ model = {value:?} }}"),
        );
        (parse(&text).warnings.into_iter())
            .map(|w| (w.at, w.message))
            .collect()
    };
    assert_eq!(
        warnings("1.0"),
        [(
            "plans[pro].prices[gpt-tokens].filter.model".to_owned(),
            r#""1.0" matches only events whose value is that string: a JSON number in an event reads as "1"; write "1" to match it"#.to_owned()
        )]
    );
    assert_eq!(
        warnings("True")[0].1,
        r#""True" matches only events whose value is that string: a JSON boolean in an event reads as "true"; write "true" to match it"#
    );
    assert_eq!(
        warnings("1e3")[0].1.split(';').nth(1),
        Some(r#" write "1000" to match it"#)
    );
    // What an event's number or boolean reads as, and plain strings, are fine.
    for value in ["1", "0.5", "true", "false", "gpt-x", "v1.0"] {
        assert!(warnings(value).is_empty(), "{value}");
    }
}

#[test]
fn a_customer_id_no_subject_could_name_is_refused() {
    let long = "c".repeat(257);
    assert_only_issue(
        &with(r#"id = "cust_acme""#, &format!("id = {long:?}")),
        &format!("customers[{long}].id"),
        "is 257 characters long, and an event's subject is at most 256: no event could name this customer",
    );
}

#[test]
fn a_percentage_written_as_a_fraction_is_warned_about() {
    let warnings = |percent: &str| -> Vec<(String, String)> {
        let text = with(
            r#"percent_off = "12.5""#,
            &format!("percent_off = {percent:?}"),
        );
        (parse(&text).warnings.into_iter())
            .map(|w| (w.at, w.message))
            .collect()
    };
    assert_eq!(
        warnings("0.125"),
        [(
            "customers[cust_acme].discounts[0].percent_off".to_owned(),
            r#"0.125 takes 0.125 % off, not 12.5 %: percent_off is a percentage ("12.5" takes 12.5 % off); write "12.5" if 12.5 % is meant"#.to_owned()
        )]
    );
    for percent in ["0", "1", "12.5", "100"] {
        assert!(warnings(percent).is_empty(), "{percent}");
    }
}

#[test]
fn two_prices_that_bill_the_same_usage_are_warned_about() {
    let warnings = |filter: &str| -> Vec<(String, String)> {
        // A second price on tokens beside gpt-tokens (filtered to gpt-x).
        let text = with(
            r#"filter = { model = "gpt-x" }"#,
            &format!(
                "filter = {{ model = \"gpt-x\" }}\n\n[[plans.prices]]\nid = \"more-tokens\"\nmeter = \"tokens\"\nbilling_scheme = \"per_unit\"\nunit_amount = \"0.001\"\n{filter}"
            ),
        );
        (parse(&text).warnings.into_iter())
            .map(|w| (w.at, w.message))
            .collect()
    };
    let twice = [(
        "plans[pro].prices[gpt-tokens]".to_owned(),
        r#"prices "gpt-tokens" and "more-tokens" both bill usage of meter tokens that their filters both select, so it is billed twice (a surcharge?); pin a dimension to different values in their filters if each should bill its own"#.to_owned(),
    )];
    // Unfiltered, or filtered alike: gpt-x usage is billed by both.
    assert_eq!(warnings(""), twice);
    assert_eq!(warnings(r#"filter = { model = "gpt-x" }"#), twice);
    // Another model: each bills its own.
    assert!(warnings(r#"filter = { model = "claude" }"#).is_empty());
}

#[test]
fn a_flat_fee_bills_one_of_itself_and_names_no_meter() {
    let flat = "[[plans.prices]]\nid = \"platform\"\nbilling_scheme = \"flat\"\nunit_amount = \"500\"\n\n[[customers]]";
    let config = parse(&with("[[customers]]", flat));
    let price = &config.plans[0].prices[2];
    assert_eq!(price.id, "platform");
    assert!(price.usage.is_none());
    assert_eq!(
        price.rate,
        Rate::PerUnit {
            unit_amount: dec("500"),
            package: None
        }
    );
    assert_eq!(price.quantity(dec("1234")), Decimal::ONE);
    let tokens = config.meters_for("llm.tokens")[0];
    assert!(!price.bills(tokens, &["gpt-x".to_owned()]));

    let at = "plans[pro].prices[platform]";
    let refused = |extra: &str, at: &str, fragment: &str| {
        let text = with(
            "[[customers]]",
            &flat.replace("unit_amount = \"500\"", extra),
        );
        assert_only_issue(&text, at, fragment);
    };
    refused(
        "unit_amount = \"500\"\nmeter = \"tokens\"",
        &format!("{at}.meter"),
        "a flat fee bills no meter's usage",
    );
    refused(
        "unit_amount = \"500\"\nfilter = { model = \"gpt-x\" }",
        &format!("{at}.filter"),
        "no filter",
    );
    refused(
        "unit_amount = \"500\"\ntransform_quantity = { divide_by = 2, round = \"up\" }",
        at,
        "a flat fee is unit_amount alone",
    );
    refused(
        "",
        &format!("{at}.unit_amount"),
        "the fee each billed month",
    );
    // A price of usage needs its meter.
    let text = with("meter = \"tokens\"\n", "");
    assert_has_issue(&text, "plans[pro].prices[gpt-tokens].meter", "required");
}

#[test]
fn prices_stripe_cannot_take_as_written_are_warned_about() {
    let warnings = |from: &str, to: &str| -> Vec<(String, String)> {
        (parse(&with(from, to)).warnings.into_iter())
            .map(|w| (w.at, w.message))
            .collect()
    };
    let tiers = "{ up_to = 100, flat_amount = \"49\" }";
    assert_eq!(
        warnings(tiers, "{ up_to = \"99.5\", flat_amount = \"49.005\" }"),
        [
            (
                "plans[pro].prices[resolutions].tiers[0].flat_amount".to_owned(),
                "49.005 is finer than a usd minor unit: Tally bills it as written, but Stripe takes only whole minor units as a flat amount".to_owned()
            ),
            (
                "plans[pro].prices[resolutions].tiers[0].up_to".to_owned(),
                "99.5 is not a whole number: Tally bills it as written, but Stripe takes only whole-number tier bounds".to_owned()
            ),
        ]
    );
    // 12 decimals of a cent are 14 of a dollar: the 15th is one too many.
    let per_unit = "unit_amount = \"0.002\"";
    assert!(warnings(per_unit, "unit_amount = \"0.00000000000001\"").is_empty());
    assert_eq!(
        warnings(per_unit, "unit_amount = \"0.000000000000001\""),
        [(
            "plans[pro].prices[gpt-tokens].unit_amount".to_owned(),
            "0.000000000000001 has more than 14 decimals: Tally bills it as written, but Stripe takes only 12 decimals of a usd minor unit".to_owned()
        )]
    );
    assert_eq!(
        warnings("divide_by = 1000", "divide_by = \"2.5\"")[0].0,
        "plans[pro].prices[gpt-tokens].transform_quantity.divide_by"
    );
    // The example book is Stripe's to the letter.
    assert!(parse(BASE).warnings.is_empty());
}

#[test]
fn a_flat_fee_finer_than_its_currency_is_billed_in_is_warned_about() {
    let fee = |currency: &str, amount: &str| -> Vec<(String, String)> {
        let text = with(
            "[[customers]]",
            &format!("[[plans.prices]]\nid = \"platform\"\nbilling_scheme = \"flat\"\nunit_amount = \"{amount}\"\n\n[[customers]]"),
        )
        .replace(r#"currency = "usd""#, &format!("currency = \"{currency}\""));
        (parse(&text).warnings.into_iter())
            .map(|w| (w.at, w.message))
            .collect()
    };
    let at = "plans[pro].prices[platform].unit_amount".to_owned();
    assert!(fee("usd", "1.01").is_empty());
    assert_eq!(
        fee("usd", "1.005"),
        [(
            at.clone(),
            "1.005 usd is billed as 1.01 each month: lines are rounded half_up to 2 decimals"
                .to_owned()
        )]
    );
    // A kwd amount of whole fils is billed in tens of them.
    assert!(fee("kwd", "1.01").is_empty());
    assert_eq!(
        fee("kwd", "1.005"),
        [(
            at,
            "1.005 kwd is billed as 1.01 each month: lines are rounded half_up to 2 decimals (kwd is written with 3 decimals, but card payments take no finer than 2, as Stripe requires)".to_owned()
        )]
    );
}

#[test]
fn unique_count_prices_must_pin_every_dimension() {
    let text = with(
        "[[plans]]",
        "[[meters]]\nslug = \"users\"\nevent_type = \"app.active\"\naggregation = \"unique_count\"\nvalue_property = \"$.user\"\ngroup_by = { region = \"$.region\" }\n\n[[plans]]",
    )
    .replace(
        "[[customers]]",
        "[[plans.prices]]\nid = \"users\"\nmeter = \"users\"\nbilling_scheme = \"per_unit\"\nunit_amount = \"1\"\n\n[[customers]]",
    );
    assert_only_issue(
        &text,
        "plans[pro].prices[users].filter",
        "pin every dimension (region)",
    );
    parse(&text.replace(
        "unit_amount = \"1\"\n\n",
        "unit_amount = \"1\"\nfilter = { region = \"eu\" }\n\n",
    ));
}

#[test]
fn value_property_is_required_except_for_count() {
    for aggregation in ["sum", "max", "unique_count", "latest"] {
        let text = with("value_property = \"$.tokens\"\n", "").replace(
            r#"aggregation = "sum""#,
            &format!("aggregation = \"{aggregation}\""),
        );
        let found = issues(&text);
        assert_eq!(found[0].0, "meters[tokens].value_property", "{aggregation}");
        assert!(
            found[0]
                .1
                .contains(&format!("required for aggregation = \"{aggregation}\"")),
            "{found:?}"
        );
    }
    assert_only_issue(
        &with(
            r#"aggregation = "count""#,
            "aggregation = \"count\"\nvalue_property = \"$.n\"",
        ),
        "meters[resolutions].value_property",
        "a count meter counts events",
    );
}

#[test]
fn only_a_sum_meter_may_allow_negative_values() {
    let sum = with(
        r#"value_property = "$.tokens""#,
        "value_property = \"$.tokens\"\nallow_negative_values = true",
    );
    let config = parse(&sum);
    assert!(matches!(
        config.meters[1].aggregation,
        Aggregation::Sum {
            negative_allowed: true,
            ..
        }
    ));
    // Left out, it stays off; set, it is part of the price book's hash.
    assert!(matches!(
        parse(BASE).meters[1].aggregation,
        Aggregation::Sum {
            negative_allowed: false,
            ..
        }
    ));
    assert_ne!(config.hash, parse(BASE).hash);
    assert_only_issue(
        &with(
            r#"aggregation = "count""#,
            "aggregation = \"count\"\nallow_negative_values = true",
        ),
        "meters[resolutions].allow_negative_values",
        "only a sum meter takes negative values",
    );
    // Another meter of the corrected meter's type would count each correction.
    let shared = format!(
        "{sum}\n[[meters]]\nslug = \"requests\"\nevent_type = \"llm.tokens\"\naggregation = \"count\"\n"
    );
    assert_only_issue(
        &shared,
        "meters[tokens].allow_negative_values",
        "meter \"requests\" reads \"llm.tokens\" events too",
    );
    // Another sum meter taking corrections reads its own value of them: both valid.
    let both = format!(
        "{sum}\n[[meters]]\nslug = \"input_tokens\"\nevent_type = \"llm.tokens\"\naggregation = \"sum\"\nvalue_property = \"$.input\"\nallow_negative_values = true\n"
    );
    parse(&both);
}

#[test]
fn value_property_must_be_a_supported_jsonpath() {
    for bad in ["tokens", "$", "$..tokens", "$.a[0]", "$.*"] {
        let err = syntax_error(&with(r#""$.tokens""#, &format!("{bad:?}")));
        assert!(err.contains("is not a supported JSONPath"), "{bad}: {err}");
    }
}

#[test]
fn percent_off_must_be_between_0_and_100() {
    for bad in ["100.01", "150", "-5"] {
        assert_only_issue(
            &with(
                r#"percent_off = "12.5""#,
                &format!("percent_off = \"{bad}\""),
            ),
            "customers[cust_acme].discounts[0].percent_off",
            "must be between 0 and 100",
        );
    }
    for good in ["0", "100"] {
        parse(&with(
            r#"percent_off = "12.5""#,
            &format!("percent_off = \"{good}\""),
        ));
    }
}

#[test]
fn a_discount_sets_exactly_one_of_percent_off_or_amount_off() {
    assert_only_issue(
        &with(
            r#"percent_off = "12.5""#,
            r#"percent_off = "12.5", amount_off = "5""#,
        ),
        "customers[cust_acme].discounts[0]",
        "set exactly one of percent_off or amount_off",
    );
    assert_only_issue(
        &with(r#", percent_off = "12.5""#, ""),
        "customers[cust_acme].discounts[0]",
        "set exactly one of percent_off or amount_off",
    );
}

#[test]
fn a_line_gets_at_most_one_discount() {
    assert_only_issue(
        &with(
            r#"discounts = [{ price = "resolutions", percent_off = "12.5" }]"#,
            r#"discounts = [{ price = "resolutions", percent_off = "12.5" }, { percent_off = "1" }]"#,
        ),
        "customers[cust_acme].discounts[1]",
        "already has a discount",
    );
}

#[test]
fn discounts_and_customers_must_name_known_prices_and_plans() {
    assert_only_issue(
        &with(r#"price = "resolutions""#, r#"price = "resolution""#),
        "customers[cust_acme].discounts[0].price",
        r#"plan "pro" has no price "resolution" (did you mean "resolutions"?); its prices: resolutions, gpt-tokens"#,
    );
    assert_only_issue(
        &with(r#"plan = "pro""#, r#"plan = "enterprise""#),
        "customers[cust_acme].plan",
        r#"unknown plan "enterprise"; known plans: pro"#,
    );
}

#[test]
fn ids_must_be_unique() {
    let meter = "[[meters]]\nslug = \"tokens\"\nevent_type = \"other\"\naggregation = \"count\"\n\n[[plans]]";
    assert_only_issue(
        &with("[[plans]]", meter),
        "meters[tokens].slug",
        "duplicate meter slug",
    );

    let plan = "[[plans]]\nid = \"pro\"\ncurrency = \"eur\"\n[[plans.prices]]\nid = \"r\"\nmeter = \"resolutions\"\nbilling_scheme = \"per_unit\"\nunit_amount = \"1\"\n\n[[customers]]";
    assert_only_issue(
        &with("[[customers]]", plan),
        "plans[pro].id",
        "duplicate plan id",
    );

    let price = "[[plans.prices]]\nid = \"resolutions\"\nmeter = \"resolutions\"\nbilling_scheme = \"per_unit\"\nunit_amount = \"1\"\n\n[[customers]]";
    assert_only_issue(
        &with("[[customers]]", price),
        "plans[pro].prices[resolutions].id",
        "duplicate price id within the plan",
    );

    let customer = format!("{BASE}\n[[customers]]\nid = \"cust_acme\"\nplan = \"pro\"\n");
    assert_only_issue(
        &customer,
        "customers[cust_acme].id",
        "duplicate customer id",
    );
}

#[test]
fn empty_names_are_reported_by_position() {
    assert_has_issue(
        &with(r#"slug = "tokens""#, r#"slug = """#),
        "meters[1].slug",
        "must not be empty",
    );
    assert_has_issue(
        &with(r#"id = "pro""#, r#"id = """#),
        "plans[0].id",
        "must not be empty",
    );
    assert_has_issue(
        &with(r#"id = "cust_acme""#, r#"id = """#),
        "customers[0].id",
        "must not be empty",
    );
    // A blank id is no name either: the position says which item it is.
    assert_has_issue(
        &with(r#"id = "cust_acme""#, r#"id = " ""#),
        "customers[0].id",
        "must not be empty",
    );
    assert_only_issue(
        &with(r#"event_type = "llm.tokens""#, r#"event_type = " ""#),
        "meters[tokens].event_type",
        "must not be empty",
    );
}

#[test]
fn a_plan_needs_at_least_one_price() {
    let text = "[[meters]]\nslug = \"m\"\nevent_type = \"t\"\naggregation = \"count\"\n\n[[plans]]\nid = \"empty\"\ncurrency = \"usd\"\n";
    assert_only_issue(text, "plans[empty].prices", "at least one price");
}

#[test]
fn currencies_must_be_known_lower_case_iso_4217_codes() {
    assert_only_issue(
        &with(r#"currency = "usd""#, r#"currency = "USD""#),
        "plans[pro].currency",
        r#"unknown currency "USD"; write it in lower case: "usd""#,
    );
    for bad in ["xyz", "dollar", ""] {
        assert_only_issue(
            &with(r#"currency = "usd""#, &format!("currency = \"{bad}\"")),
            "plans[pro].currency",
            "expected a lower-case ISO 4217 code",
        );
    }
}

#[test]
fn toml_floats_are_refused_for_amounts() {
    let cases = [
        (r#"unit_amount = "0.89""#, "unit_amount = 0.89"),
        (r#"flat_amount = "49""#, "flat_amount = 49.0"),
        ("up_to = 100,", "up_to = 100.0,"),
        (r#"percent_off = "12.5""#, "percent_off = 12.5"),
        ("divide_by = 1000", "divide_by = 1000.0"),
    ];
    for (old, new) in cases {
        let err = syntax_error(&with(old, new));
        assert!(
            err.contains("write decimal amounts as strings"),
            "{new}: {err}"
        );
    }
}

#[test]
fn non_numeric_amount_strings_are_refused() {
    let err = syntax_error(&with(r#"unit_amount = "0.89""#, r#"unit_amount = "cheap""#));
    assert!(err.contains(r#""cheap" is not a decimal number"#), "{err}");
}

#[test]
fn amounts_are_plain_decimals_with_digits_on_both_sides_of_the_point() {
    for text in [".5", "5.", "1_000"] {
        let err = syntax_error(&with(
            r#"unit_amount = "0.89""#,
            &format!("unit_amount = \"{text}\""),
        ));
        assert!(
            err.contains(&format!("{text:?} is not a decimal number")),
            "{text}: {err}"
        );
    }
}

#[test]
fn amounts_in_exponent_form_are_read_exactly_or_refused() {
    let config = parse(&with(r#"unit_amount = "0.89""#, r#"unit_amount = "89e-2""#));
    assert_eq!(config.hash, parse(BASE).hash, "89e-2 is 0.89 exactly");
    let too_long = r#"unit_amount = "8.90000000000000000000000000001e-1""#;
    let err = syntax_error(&with(r#"unit_amount = "0.89""#, too_long));
    assert!(
        err.contains("needs more digits than an exact decimal holds (28 significant digits, at most 28 after the decimal point)"),
        "{err}"
    );
}

#[test]
fn unknown_fields_are_refused_everywhere() {
    let cases = [
        (
            r#"aggregation = "count""#,
            "aggregation = \"count\"\ncolour = \"red\"",
            "colour",
        ),
        (
            r#"currency = "usd""#,
            "currency = \"usd\"\ntax = \"20\"",
            "tax",
        ),
        (
            r#"billing_scheme = "tiered""#,
            "billing_scheme = \"tiered\"\ntiers_mod = \"volume\"",
            "tiers_mod",
        ),
        (
            "{ up_to = 100, flat_amount",
            "{ up_to = 100, flat = \"1\", flat_amount",
            "flat",
        ),
        ("round = \"up\" }", "round = \"up\", step = 2 }", "step"),
        (
            r#"plan = "pro""#,
            "plan = \"pro\"\nemail = \"a@b\"",
            "email",
        ),
        (
            r#"percent_off = "12.5""#,
            r#"percent_off = "12.5", until = "2027""#,
            "until",
        ),
    ];
    for (old, new, field) in cases {
        let err = syntax_error(&with(old, new));
        assert!(
            err.contains(&format!("unknown field `{field}`")),
            "{field}: {err}"
        );
    }
    let top = syntax_error(&format!("{BASE}\n[pricing]\nx = 1\n"));
    assert!(top.contains("unknown field `pricing`"), "{top}");
    let section = syntax_error(&format!("{BASE}\n[events]\nmax_skew = \"5m\"\n"));
    assert!(section.contains("unknown field `max_skew`"), "{section}");
}

#[test]
fn a_misspelt_field_is_told_the_one_it_likely_meant() {
    let misspelt = syntax_error(&with(r#"percent_off = "12.5""#, r#"precent_off = "12.5""#));
    assert!(
        misspelt
            .contains("unknown field `precent_off` (did you mean `percent_off`?), expected one of"),
        "{misspelt}"
    );
    let section = syntax_error(&format!("{BASE}\n[agregator]\nwindow = \"1h\"\n"));
    assert!(
        section.contains("unknown field `agregator` (did you mean `aggregator`?)"),
        "{section}"
    );
    // Nothing near enough: no guess.
    let top = syntax_error(&format!("{BASE}\n[pricing]\nx = 1\n"));
    assert!(!top.contains("did you mean"), "{top}");
}

#[test]
fn enumerations_refuse_unknown_values() {
    let cases = [
        (r#"aggregation = "count""#, r#"aggregation = "avg""#, "avg"),
        (
            r#"billing_scheme = "tiered""#,
            r#"billing_scheme = "package""#,
            "package",
        ),
        (
            r#"tiers_mode = "graduated""#,
            r#"tiers_mode = "stairstep""#,
            "stairstep",
        ),
        (r#"round = "up""#, r#"round = "nearest""#, "nearest"),
        (
            r#"currency = "usd""#,
            "currency = \"usd\"\nrounding = \"half_down\"",
            "half_down",
        ),
    ];
    for (old, new, value) in cases {
        let err = syntax_error(&with(old, new));
        assert!(
            err.contains(&format!("unknown variant `{value}`")),
            "{value}: {err}"
        );
    }
}

#[test]
fn settings_are_checked() {
    assert_only_issue(
        &format!("{BASE}\n[aggregator]\nwindow = \"7h\"\n"),
        "aggregator.window",
        "does not divide a day into whole windows",
    );
    assert_only_issue(
        &format!("{BASE}\n[aggregator]\ndedupe_horizon = \"1h\"\n"),
        "aggregator.dedupe_horizon",
        "at least one day",
    );
    let err = syntax_error(&format!("{BASE}\n[events]\nmax_future_skew = \"soon\"\n"));
    assert!(err.contains("is not a duration"), "{err}");
    let config = parse(&format!("{BASE}\n[events]\nmax_future_skew = \"1h\"\n"));
    assert_eq!(
        config.settings.max_future_skew,
        std::time::Duration::from_secs(3600)
    );
    assert_eq!(
        parse(BASE).settings.max_future_skew,
        std::time::Duration::from_secs(300)
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = with(r#"currency = "usd""#, r#"currency = "usdollar""#)
        .replace("up_to = 1000,", "up_to = 10,")
        .replace(r#"percent_off = "12.5""#, r#"percent_off = "120""#)
        .replace(r#"meter = "tokens""#, r#"meter = "tokenz""#);
    let ats: Vec<String> = issues(&text).into_iter().map(|(at, _)| at).collect();
    assert_eq!(
        ats,
        [
            "plans[pro].currency",
            "plans[pro].prices[resolutions].tiers[1].up_to",
            "plans[pro].prices[gpt-tokens].meter",
            "customers[cust_acme].discounts[0].percent_off",
        ]
    );
}

#[test]
fn errors_render_with_origin_place_and_message() {
    let err =
        Config::parse(&with("up_to = 1000,", "up_to = 100,"), "billing/tally.toml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "billing/tally.toml has 1 problem(s):\n  - plans[pro].prices[resolutions].tiers[1].up_to: tiers must strictly increase: 100 follows 100"
    );
    let syntax = Config::parse("meters = 5", "x.toml")
        .unwrap_err()
        .to_string();
    assert!(
        syntax.starts_with("x.toml is not valid TOML for tally: "),
        "{syntax}"
    );
}

#[test]
fn an_empty_file_is_a_valid_empty_price_book() {
    let config = parse("");
    assert!(config.meters.is_empty() && config.plans.is_empty() && config.customers.is_empty());
}

#[test]
fn a_discount_on_a_price_with_an_unknown_meter_is_not_reported_as_an_unknown_price() {
    let text = with(r#"meter = "tokens""#, r#"meter = "tokenz""#)
        .replace(r#"price = "resolutions""#, r#"price = "gpt-tokens""#);
    assert_only_issue(
        &text,
        "plans[pro].prices[gpt-tokens].meter",
        r#"unknown meter "tokenz""#,
    );
}

/// BASE with two more plans, `pro_2027` (usd) and `euro` (eur), and `cust_acme` given
/// the plan changes in `changes` (TOML array-of-tables entries).
fn with_plan_changes(changes: &str) -> String {
    let plans = r#"
[[plans]]
id = "pro_2027"
currency = "usd"

[[plans.prices]]
id = "resolutions"
meter = "resolutions"
billing_scheme = "per_unit"
unit_amount = "0.99"

[[plans]]
id = "euro"
currency = "eur"

[[plans.prices]]
id = "resolutions"
meter = "resolutions"
billing_scheme = "per_unit"
unit_amount = "0.89"
"#;
    format!("{BASE}\n{changes}\n").replacen("[[customers]]", &format!("{plans}\n[[customers]]"), 1)
}

#[test]
fn a_plan_change_bills_its_plan_and_discounts_from_its_period_on() {
    let config = parse(&with_plan_changes(
        r#"
[[customers.plan_changes]]
from = "2026-12"
plan = "pro_2027"
discounts = [{ price = "resolutions", amount_off = "5" }]

[[customers.plan_changes]]
from = "2027-03"
plan = "pro"
"#,
    ));
    let acme = &config.customers["cust_acme"];
    let on = |period: &str| {
        let subscription = acme.subscription(period.parse().unwrap());
        (
            config.plan(subscription.plan).id.as_str(),
            subscription.discounts.values().copied().collect::<Vec<_>>(),
        )
    };
    let twelve_and_a_half = vec![Discount::PercentOff(dec("12.5"))];
    assert_eq!(on("2020-01"), ("pro", twelve_and_a_half));
    assert_eq!(
        on("2026-11"),
        ("pro", vec![Discount::PercentOff(dec("12.5"))])
    );
    assert_eq!(
        on("2026-12"),
        ("pro_2027", vec![Discount::AmountOff(dec("5"))])
    );
    assert_eq!(
        on("2027-02"),
        ("pro_2027", vec![Discount::AmountOff(dec("5"))])
    );
    // Discounts do not carry over: the change back lists none.
    assert_eq!(on("2027-03"), ("pro", vec![]));
    assert_eq!(on("2099-12"), ("pro", vec![]));

    // A scheduled change is part of the price book, so it changes the hash.
    assert_ne!(config.hash, parse(BASE).hash);
    let unchanged = parse(&with_plan_changes(""));
    assert_ne!(config.hash, unchanged.hash);
}

#[test]
fn a_plan_change_to_a_plan_that_bills_less_of_the_usage_is_warned_about() {
    let warned = |changes: &str| -> Vec<(String, String)> {
        (parse(&with_plan_changes(changes)).warnings.into_iter())
            .filter(|w| w.at.ends_with(".plan"))
            .map(|w| (w.at, w.message))
            .collect()
    };
    // pro bills gpt-x tokens; pro_2027 bills resolutions alone.
    let to_2027 =
        "[[customers.plan_changes]]\nfrom = \"2026-12\"\nplan = \"pro_2027\"\ndiscounts = []\n";
    assert_eq!(
        warned(to_2027),
        [(
            "customers[cust_acme].plan_changes[0].plan".to_owned(),
            "plan \"pro\" bills usage that no price of plan \"pro_2027\" bills (\"pro\"'s prices gpt-tokens): from 2026-12 it is reported as unbilled, never billed; add such a price to \"pro_2027\" if the usage should still be billed".to_owned()
        )]
    );
    // Back to pro: it bills all pro_2027 did, and more.
    let and_back =
        format!("{to_2027}\n[[customers.plan_changes]]\nfrom = \"2027-03\"\nplan = \"pro\"\n");
    assert_eq!(warned(&and_back).len(), 1, "{:?}", warned(&and_back));
}

#[test]
fn a_plan_change_that_ends_discounts_without_saying_so_is_warned_about() {
    // cust_acme has 12.5 % off resolutions on pro.
    let warnings = |changes: &str| -> Vec<(String, String)> {
        (parse(&with_plan_changes(changes)).warnings.into_iter())
            .filter(|w| w.at.ends_with(".discounts"))
            .map(|w| (w.at, w.message))
            .collect()
    };
    let silent = "[[customers.plan_changes]]\nfrom = \"2026-12\"\nplan = \"pro_2027\"\n";
    assert_eq!(
        warnings(silent),
        [(
            "customers[cust_acme].plan_changes[0].discounts".to_owned(),
            "the discounts before this change (resolutions) end with it, as discounts do not carry over to a new plan; list them here again to keep them, or write discounts = [] to end them and silence this".to_owned()
        )]
    );
    // Ended on purpose, or listed again: nothing to warn about.
    assert!(warnings(&format!("{silent}discounts = []\n")).is_empty());
    let kept =
        format!("{silent}discounts = [{{ price = \"resolutions\", percent_off = \"12.5\" }}]\n");
    assert!(warnings(&kept).is_empty());
    // A later change is judged against the one before it.
    let later = "[[customers.plan_changes]]\nfrom = \"2027-03\"\nplan = \"pro\"\n";
    let at: Vec<String> = warnings(&format!("{kept}\n{later}"))
        .into_iter()
        .map(|(at, _)| at)
        .collect();
    assert_eq!(at, ["customers[cust_acme].plan_changes[1].discounts"]);
    // Writing `[]` does not change the price book's hash: it says what leaving it out did.
    assert_eq!(
        parse(&with_plan_changes(&format!("{silent}discounts = []\n"))).hash,
        parse(&with_plan_changes(silent)).hash
    );
}

/// `with_plan_changes`, with `pro` replaced by `pro_2027` from `from`.
fn with_replacement(from: &str, changes: &str) -> String {
    let pro = "id = \"pro\"\ncurrency = \"usd\"\n";
    let replaced = format!("{pro}replaced_by = {{ plan = \"pro_2027\", from = \"{from}\" }}\n");
    let text = with_plan_changes(changes);
    assert!(text.contains(pro));
    text.replacen(pro, &replaced, 1)
}

/// The plan and discounts `config` bills `cust_acme` by in each of `periods`.
fn plans_of(config: &Config, periods: &[&str]) -> Vec<(String, Vec<Discount>)> {
    let acme = &config.customers["cust_acme"];
    (periods.iter())
        .map(|period| {
            let subscription = acme.subscription(period.parse().unwrap());
            let plan = config.plan(subscription.plan).id.clone();
            (plan, subscription.discounts.values().copied().collect())
        })
        .collect()
}

#[test]
fn a_replaced_plan_bills_its_customers_by_its_successor_from_its_period_on() {
    let off = || vec![Discount::PercentOff(dec("12.5"))];
    let on = |plan: &str, discounts: Vec<Discount>| (plan.to_owned(), discounts);
    // cust_acme, on pro with 12.5 % off resolutions: pro_2027 from 2027-01, its
    // discount carried to pro_2027's price of the same id.
    let config = parse(&with_replacement("2027-01", ""));
    assert_eq!(
        plans_of(&config, &["2026-12", "2027-01", "2099-12"]),
        [
            on("pro", off()),
            on("pro_2027", off()),
            on("pro_2027", off())
        ]
    );
    // The book's hash changes with it; a book without it hashes as before.
    assert_ne!(config.hash, parse(&with_plan_changes("")).hash);
    // Replaced from 2026-11: its own change to pro_2027 in 2026-12 ends the discount,
    // and its change back to pro in 2027-03 is to pro_2027, as pro is replaced then.
    let to_2027 =
        "[[customers.plan_changes]]\nfrom = \"2026-12\"\nplan = \"pro_2027\"\ndiscounts = []\n";
    let back = "[[customers.plan_changes]]\nfrom = \"2027-03\"\nplan = \"pro\"\ndiscounts = []\n";
    assert_eq!(
        plans_of(
            &parse(&with_replacement("2026-11", &format!("{to_2027}\n{back}"))),
            &["2026-10", "2026-11", "2026-12", "2027-03"]
        ),
        [
            on("pro", off()),
            on("pro_2027", off()),
            on("pro_2027", vec![]),
            on("pro_2027", vec![])
        ]
    );
    // A customer that starts after the replacement starts on the successor; one whose
    // last month is before it never moves.
    let starts_late = parse(&with_replacement("2027-01", "").replace(
        "plan = \"pro\"\ndiscounts",
        "plan = \"pro\"\nfrom = \"2027-02\"\ndiscounts",
    ));
    assert_eq!(
        plans_of(&starts_late, &["2027-02"]),
        [on("pro_2027", off())]
    );
    let subscriptions = |config: &Config| {
        let acme = &config.customers["cust_acme"];
        acme.subscriptions_until("2099-12".parse().unwrap()).count()
    };
    assert_eq!(subscriptions(&starts_late), 1);
    let ends_early = parse(&with_replacement("2027-01", "").replace(
        "plan = \"pro\"\ndiscounts",
        "plan = \"pro\"\nthrough = \"2026-12\"\ndiscounts",
    ));
    assert_eq!(plans_of(&ends_early, &["2026-12"]), [on("pro", off())]);
    assert_eq!(subscriptions(&ends_early), 1);
    // Its own change in the month of the replacement wins: to pro_2027 without the
    // discount.
    let same_month =
        "[[customers.plan_changes]]\nfrom = \"2027-01\"\nplan = \"pro_2027\"\ndiscounts = []\n";
    assert_eq!(
        plans_of(
            &parse(&with_replacement("2027-01", same_month)),
            &["2026-12", "2027-01"]
        ),
        [on("pro", off()), on("pro_2027", vec![])]
    );
}

#[test]
fn a_chain_of_replacements_bills_each_plan_in_turn_and_an_ended_discount_stays_ended() {
    // pro_2028 bills resolutions and gpt-x tokens again, from 2027-06.
    let pro_2028 = r#"
[[plans]]
id = "pro_2028"
currency = "usd"

[[plans.prices]]
id = "resolutions"
meter = "resolutions"
billing_scheme = "per_unit"
unit_amount = "0.49"

[[plans.prices]]
id = "gpt-tokens"
meter = "tokens"
billing_scheme = "per_unit"
unit_amount = "0.001"
filter = { model = "gpt-x" }
"#;
    let chained = |discounts: &str| {
        with_replacement("2027-01", "")
            .replacen(
                "id = \"pro_2027\"\ncurrency = \"usd\"\n",
                "id = \"pro_2027\"\ncurrency = \"usd\"\nreplaced_by = { plan = \"pro_2028\", from = \"2027-06\" }\n",
                1,
            )
            .replacen("[[customers]]", &format!("{pro_2028}\n[[customers]]"), 1)
            .replace(
                "discounts = [{ price = \"resolutions\", percent_off = \"12.5\" }]",
                discounts,
            )
    };
    let both = "discounts = [{ price = \"resolutions\", percent_off = \"12.5\" }, { price = \"gpt-tokens\", percent_off = \"10\" }]";
    let config = parse(&chained(both));
    let plans: Vec<(String, usize)> = plans_of(&config, &["2026-12", "2027-01", "2027-06"])
        .into_iter()
        .map(|(plan, discounts)| (plan, discounts.len()))
        .collect();
    // The gpt-x discount ends with pro_2027, which has no such price, and does not come
    // back with pro_2028, which has.
    assert_eq!(
        plans,
        [
            ("pro".to_owned(), 2),
            ("pro_2027".to_owned(), 1),
            ("pro_2028".to_owned(), 1)
        ]
    );
    let ended: Vec<String> = (config.warnings.iter())
        .filter(|w| w.message.contains("ends in"))
        .map(|w| format!("{}: {}", w.at, w.message))
        .collect();
    assert_eq!(
        ended,
        ["customers[cust_acme].discounts: the discount on price \"gpt-tokens\" ends in 2027-01, when plan \"pro_2027\" replaces \"pro\" (replaced_by) and has no price \"gpt-tokens\""]
    );
    // pro_2028 replacing pro_2027 before pro_2027 would bill: pro_2028 takes pro's
    // customers over in 2027-01, handed every discount, and none ends.
    let earlier = parse(&chained(both).replace(
        "plan = \"pro_2028\", from = \"2027-06\"",
        "plan = \"pro_2028\", from = \"2026-12\"",
    ));
    let plans: Vec<(String, usize)> = plans_of(&earlier, &["2026-12", "2027-01"])
        .into_iter()
        .map(|(plan, discounts)| (plan, discounts.len()))
        .collect();
    assert_eq!(plans, [("pro".to_owned(), 2), ("pro_2028".to_owned(), 2)]);
    assert!(!earlier
        .warnings
        .iter()
        .any(|w| w.message.contains("ends in")));
    // A discount a plan change wrote is warned of where that change is.
    let changed = format!(
        "{}\n[[customers.plan_changes]]\nfrom = \"2026-12\"\nplan = \"pro\"\n{both}\n",
        chained("discounts = []")
    );
    let at: Vec<String> = (parse(&changed).warnings.into_iter())
        .filter(|w| w.message.contains("ends in"))
        .map(|w| w.at)
        .collect();
    assert_eq!(at, ["customers[cust_acme].plan_changes[0].discounts"]);
}

#[test]
fn a_replacement_is_checked_and_says_what_it_drops() {
    let at = "plans[pro].replaced_by";
    let text = with_replacement("2027-01", "");
    assert_only_issue(
        &text.replace("plan = \"pro_2027\", from", "plan = \"pro_2028\", from"),
        &format!("{at}.plan"),
        r#"unknown plan "pro_2028": name the plan that bills this plan's customers from 2027-01 on"#,
    );
    assert_only_issue(
        &text.replace("plan = \"pro_2027\", from", "plan = \"euro\", from"),
        &format!("{at}.plan"),
        r#"plan "euro" bills in eur, but this plan's customers are billed in usd"#,
    );
    let looped = text.replacen(
        "id = \"pro_2027\"\ncurrency = \"usd\"\n",
        "id = \"pro_2027\"\ncurrency = \"usd\"\nreplaced_by = { plan = \"pro\", from = \"2028-01\" }\n",
        1,
    );
    let found = issues(&looped);
    let places: Vec<&str> = found.iter().map(|(at, _)| at.as_str()).collect();
    assert_eq!(places, [at, "plans[pro_2027].replaced_by"], "{found:?}");
    assert!(found[0].1.contains("comes back to it"), "{found:?}");
    // pro_2027 bills resolutions alone: pro's gpt-x tokens go unbilled from then on,
    // and a discount on a price it lacks ends.
    let gpt_off = with_replacement("2027-01", "").replace(
        "discounts = [{ price = \"resolutions\", percent_off = \"12.5\" }]",
        "discounts = [{ price = \"gpt-tokens\", percent_off = \"10\" }]",
    );
    let warnings: Vec<(String, String)> = (parse(&gpt_off).warnings.into_iter())
        .map(|w| (w.at, w.message))
        .collect();
    assert_eq!(
        warnings,
        [
            (
                format!("{at}.plan"),
                "plan \"pro\" bills usage that no price of plan \"pro_2027\" bills (\"pro\"'s prices gpt-tokens): from 2027-01 it is reported as unbilled, never billed; add such a price to \"pro_2027\" if the usage should still be billed".to_owned()
            ),
            (
                "customers[cust_acme].discounts".to_owned(),
                "the discount on price \"gpt-tokens\" ends in 2027-01, when plan \"pro_2027\" replaces \"pro\" (replaced_by) and has no price \"gpt-tokens\"".to_owned()
            ),
        ]
    );
}

#[test]
fn a_plan_change_after_a_replacement_is_warned_about_against_the_plan_that_bills() {
    let plan_warnings = |text: &str| -> Vec<(String, String)> {
        (parse(text).warnings.into_iter())
            .filter(|w| w.at.starts_with("customers[") && w.at.ends_with(".plan"))
            .map(|w| (w.at, w.message))
            .collect()
    };
    // pro is replaced by pro_2027 from 2027-01, which the replacement warns about; a
    // move to pro_2027 in 2027-03 changes nothing the customer is billed by.
    let to_2027 = "[[customers.plan_changes]]\nfrom = \"2027-03\"\nplan = \"pro_2027\"\n";
    let replaced = with_replacement("2027-01", to_2027);
    assert_eq!(plan_warnings(&replaced), []);
    assert!(
        (parse(&replaced).warnings.iter()).any(|w| w.at == "plans[pro].replaced_by.plan"),
        "{:?}",
        parse(&replaced).warnings
    );

    // The customer moves to pro_2027 in 2026-12 (which drops gpt-x tokens), pro_2027 is
    // replaced by pro (which bills them again) from 2027-01, and the customer moves to
    // basic (resolutions only) in 2027-03: that move, from pro, drops the tokens again.
    let basic = "[[plans]]\nid = \"basic\"\ncurrency = \"usd\"\n\n[[plans.prices]]\nid = \"resolutions\"\nmeter = \"resolutions\"\nbilling_scheme = \"per_unit\"\nunit_amount = \"1.10\"\n";
    let moves = "[[customers.plan_changes]]\nfrom = \"2026-12\"\nplan = \"pro_2027\"\ndiscounts = []\n\n[[customers.plan_changes]]\nfrom = \"2027-03\"\nplan = \"basic\"\n";
    let pro_2027 = "id = \"pro_2027\"\ncurrency = \"usd\"\n";
    let text = with_plan_changes(moves)
        .replacen(
            pro_2027,
            &format!("{pro_2027}replaced_by = {{ plan = \"pro\", from = \"2027-01\" }}\n"),
            1,
        )
        .replacen("[[customers]]", &format!("{basic}\n[[customers]]"), 1);
    let unpriced = |at: &str, old: &str, new: &str, from: &str| {
        (
            format!("customers[cust_acme].plan_changes[{at}].plan"),
            format!("plan \"{old}\" bills usage that no price of plan \"{new}\" bills (\"{old}\"'s prices gpt-tokens): from {from} it is reported as unbilled, never billed; add such a price to \"{new}\" if the usage should still be billed"),
        )
    };
    assert_eq!(
        plan_warnings(&text),
        [
            unpriced("0", "pro", "pro_2027", "2026-12"),
            unpriced("1", "pro", "basic", "2027-03"),
        ]
    );
}

#[test]
fn plan_changes_are_checked_like_the_plan_they_follow() {
    assert_only_issue(
        &with_plan_changes("[[customers.plan_changes]]\nfrom = \"2026-12\"\nplan = \"team\""),
        "customers[cust_acme].plan_changes[0].plan",
        r#"unknown plan "team"; known plans: pro, pro_2027, euro"#,
    );
    assert_only_issue(
        &with_plan_changes(
            "[[customers.plan_changes]]\nfrom = \"2026-12\"\nplan = \"pro_2027\"\ndiscounts = [{ price = \"gpt-tokens\", percent_off = \"10\" }]",
        ),
        "customers[cust_acme].plan_changes[0].discounts[0].price",
        r#"plan "pro_2027" has no price "gpt-tokens""#,
    );
    assert_only_issue(
        &with_plan_changes("[[customers.plan_changes]]\nfrom = \"2026-12\"\nplan = \"euro\""),
        "customers[cust_acme].plan_changes[0].plan",
        r#"plan "euro" bills in eur, but the customer is billed in usd (plan "pro"); a customer keeps one currency"#,
    );
    let twice = "[[customers.plan_changes]]\nfrom = \"2026-12\"\nplan = \"pro_2027\"\n\n[[customers.plan_changes]]\nfrom = \"FROM\"\nplan = \"pro\"";
    for (from, found) in [("2026-12", "2026-12"), ("2026-07", "2026-07")] {
        assert_only_issue(
            &with_plan_changes(&twice.replace("FROM", from)),
            "customers[cust_acme].plan_changes[1].from",
            &format!("{found} is not after the change before it (2026-12): list plan changes in the order they take effect"),
        );
    }
    let day = syntax_error(&with_plan_changes(
        "[[customers.plan_changes]]\nfrom = \"2026-12-15\"\nplan = \"pro_2027\"",
    ));
    assert!(
        day.contains(r#"period "2026-12-15" is not a month written as YYYY-MM (for example 2026-11); billing periods are calendar months, so plan changes, `from` and `through` take effect at a month's start (Tally does not prorate within a month)"#),
        "{day}"
    );
    let field = syntax_error(&with_plan_changes(
        "[[customers.plan_changes]]\nfrom = \"2026-12\"\nplan = \"pro_2027\"\nprorate = true",
    ));
    assert!(field.contains("unknown field `prorate`"), "{field}");
}

#[test]
fn a_customer_is_billed_from_its_first_period_through_its_last() {
    let bills = |config: &Config, period: &str| {
        config.customers["cust_acme"].bills(period.parse().unwrap())
    };
    let always = parse(BASE);
    assert!(bills(&always, "1970-01") && bills(&always, "2200-12"));

    let bounded = with(
        "plan = \"pro\"\n",
        "plan = \"pro\"\nfrom = \"2026-11\"\nthrough = \"2027-01\"\n",
    );
    let config = parse(&bounded);
    let billed: Vec<bool> = ["2026-10", "2026-11", "2026-12", "2027-01", "2027-02"]
        .iter()
        .map(|period| bills(&config, period))
        .collect();
    assert_eq!(billed, [false, true, true, true, false]);
    assert_ne!(config.hash, always.hash);
    let open_ended = parse(&with(
        "plan = \"pro\"\n",
        "plan = \"pro\"\nfrom = \"2026-11\"\n",
    ));
    assert!(!bills(&open_ended, "2026-10") && bills(&open_ended, "2200-12"));

    assert_only_issue(
        &with(
            "plan = \"pro\"\n",
            "plan = \"pro\"\nfrom = \"2026-11\"\nthrough = \"2026-10\"\n",
        ),
        "customers[cust_acme].through",
        "2026-10 is before from (2026-11)",
    );
    let bounded_changes = |changes: &str| {
        with_plan_changes(changes).replacen(
            "plan = \"pro\"\ndiscounts",
            "plan = \"pro\"\nfrom = \"2026-11\"\nthrough = \"2027-01\"\ndiscounts",
            1,
        )
    };
    assert_only_issue(
        &bounded_changes("[[customers.plan_changes]]\nfrom = \"2026-11\"\nplan = \"pro_2027\""),
        "customers[cust_acme].plan_changes[0].from",
        "2026-11 is not after the customer's first period (2026-11)",
    );
    assert_only_issue(
        &bounded_changes("[[customers.plan_changes]]\nfrom = \"2027-02\"\nplan = \"pro_2027\""),
        "customers[cust_acme].plan_changes[0].from",
        "2027-02 is after the customer's last period (2027-01): the change would never bill",
    );
    parse(&bounded_changes(
        "[[customers.plan_changes]]\nfrom = \"2027-01\"\nplan = \"pro_2027\"",
    ));
}

#[test]
fn a_flat_fee_a_line_could_not_store_is_refused_with_the_limit() {
    // A typo of a few zeros: 1e19 yen is more than a 64-bit count of minor units.
    let huge = with(r#"currency = "usd""#, r#"currency = "jpy""#).replacen(
        r#"flat_amount = "49""#,
        r#"flat_amount = "10000000000000000000""#,
        1,
    );
    assert_only_issue(
        &huge,
        "plans[pro].prices[resolutions].tiers",
        "flat amounts of up to 10000000000000000000 jpy could not be stored on a line (at most 9223372036854775807 jpy",
    );
    // In usd, cents count: the same limit is 100 times smaller.
    let cents = with(
        r#"flat_amount = "49""#,
        r#"flat_amount = "92233720368547759""#,
    );
    assert_has_issue(
        &cents,
        "plans[pro].prices[resolutions].tiers",
        "at most 92233720368547758 usd",
    );
    parse(&with(
        r#"flat_amount = "49""#,
        r#"flat_amount = "92233720368547758""#,
    ));
}
