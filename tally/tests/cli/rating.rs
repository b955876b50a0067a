//! `tally rate`'s semantics with exact amounts worked out by hand: every billing scheme,
//! currencies and rounding, discounts, meters, the period's bounds and plan changes.

use super::*;

#[test]
fn version_names_the_commit_the_binary_was_built_from() {
    let version = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("--version")
        .output()
        .unwrap();
    // What the build was told, else the checkout's HEAD.
    let commit = std::env::var("TALLY_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .unwrap_or_else(|| {
            let head = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .unwrap();
            assert!(head.status.success(), "the tests run in a git checkout");
            String::from_utf8(head.stdout).unwrap()
        });
    assert_eq!(
        String::from_utf8(version.stdout).unwrap(),
        format!(
            "tally {} (commit {})\n",
            env!("CARGO_PKG_VERSION"),
            commit.trim()
        )
    );
}

#[test]
fn issue_example_250_resolutions_with_a_12_5_percent_discount() {
    let f = Fixture::new(PRO);
    let run = f.rate(&resolutions("r", "cust_acme", 250), &[]).succeeded();
    let lines = run.lines();
    let l = line(&lines, "cust_acme", "resolutions");
    // 100 in tier 1 for the flat 49, 150 x 0.89 = 133.50: 182.50.
    // 12.5 % of 182.50 = 22.8125 -> 22.81 (half_up); 182.50 - 22.81 = 159.69.
    assert_eq!(money(l), ["250", "182.50", "22.81", "159.69"]);
    assert_eq!(l["plan"], "pro");
    assert_eq!(l["meter"], "resolutions");
    assert_eq!(l["currency"], "usd");
    assert_eq!(l["period_start"], "2026-11-01T00:00:00Z");
    assert_eq!(l["period_end"], "2026-12-01T00:00:00Z");
    assert_eq!(
        l["tiers"],
        json!([
            {"tier": 1, "up_to": "100", "quantity": "100", "unit_amount": "0", "flat_amount": "49", "amount": "49"},
            {"tier": 2, "up_to": "1000", "quantity": "150", "unit_amount": "0.89", "flat_amount": "0", "amount": "133.5"},
        ])
    );
}

#[test]
fn every_json_line_has_the_documented_fields_with_decimals_as_strings() {
    let f = Fixture::new(PRO);
    let run = f.rate(&resolutions("r", "cust_acme", 3), &[]).succeeded();
    for l in run.lines() {
        let object = l.as_object().unwrap();
        for key in [
            "id",
            "config_hash",
            "customer",
            "plan",
            "price",
            "meter",
            "period_start",
            "period_end",
            "quantity",
            "subtotal",
            "discount",
            "amount",
            "currency",
            "tiers",
        ] {
            assert!(object.contains_key(key), "{key} missing from {l}");
        }
        for key in ["quantity", "subtotal", "discount", "amount"] {
            assert!(l[key].is_string(), "{key} is not a string in {l}");
        }
        for tier in l["tiers"].as_array().unwrap() {
            for key in ["quantity", "unit_amount", "flat_amount", "amount"] {
                assert!(tier[key].is_string(), "tiers.{key} is not a string in {l}");
            }
        }
    }
}

#[test]
fn graduated_tiers_across_all_three_tiers() {
    let f = Fixture::new(PRO);
    let run = f
        .rate(&resolutions("r", "cust_idle", 1200), &[])
        .succeeded();
    // 49 + 900 x 0.89 (801) + 200 x 0.69 (138) = 988.
    let l = line(&run.lines(), "cust_idle", "resolutions").clone();
    assert_eq!(money(&l), ["1200", "988.00", "0.00", "988.00"]);
    let quantities: Vec<&str> = l["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["quantity"].as_str().unwrap())
        .collect();
    assert_eq!(quantities, ["100", "900", "200"]);
}

#[test]
fn graduated_flat_amounts_are_added_for_each_tier_reached() {
    let config = PRO.replace(
        r#"{ up_to = 1000, unit_amount = "0.89" }"#,
        r#"{ up_to = 1000, unit_amount = "0.89", flat_amount = "10" }"#,
    );
    let f = Fixture::new(&config);
    // 100 resolutions stay in tier 1 (up_to is inclusive): 49, tier 2 not reached.
    let at_bound = f
        .rate(&resolutions("r", "cust_idle", 100), &[])
        .succeeded()
        .lines();
    let l = line(&at_bound, "cust_idle", "resolutions");
    assert_eq!(money(l), ["100", "49.00", "0.00", "49.00"]);
    assert_eq!(l["tiers"].as_array().unwrap().len(), 1);
    // 101 reach tier 2: 49 + 1 x 0.89 + 10 = 59.89.
    let past = f
        .rate(&resolutions("r", "cust_idle", 101), &[])
        .succeeded()
        .lines();
    let l = line(&past, "cust_idle", "resolutions");
    assert_eq!(money(l), ["101", "59.89", "0.00", "59.89"]);
    assert_eq!(
        l["tiers"][1],
        json!({"tier": 2, "up_to": "1000", "quantity": "1", "unit_amount": "0.89", "flat_amount": "10", "amount": "10.89"})
    );
}

#[test]
fn every_customer_gets_a_line_for_every_price_even_without_usage() {
    let f = Fixture::new(PRO);
    let run = f.rate(&[], &[]).succeeded();
    let lines = run.lines();
    let keys: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["customer"].as_str().unwrap().to_owned(),
                l["price"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("cust_acme", "resolutions"),
        ("cust_acme", "gpt-tokens"),
        ("cust_acme", "claude-tokens"),
        ("cust_idle", "resolutions"),
        ("cust_idle", "gpt-tokens"),
        ("cust_idle", "claude-tokens"),
    ]
    .map(|(c, p)| (c.to_owned(), p.to_owned()));
    assert_eq!(keys, expected);
    // The first tier's flat amount is billed at zero usage: 49, less 12.5 % (6.125 ->
    // 6.13 half_up) for acme = 42.87.
    assert_eq!(
        money(line(&lines, "cust_idle", "resolutions")),
        ["0", "49.00", "0.00", "49.00"]
    );
    assert_eq!(
        money(line(&lines, "cust_acme", "resolutions")),
        ["0", "49.00", "6.13", "42.87"]
    );
    assert_eq!(
        line(&lines, "cust_idle", "resolutions")["tiers"],
        json!([{"tier": 1, "up_to": "100", "quantity": "0", "unit_amount": "0", "flat_amount": "49", "amount": "49"}])
    );
    for price in ["gpt-tokens", "claude-tokens"] {
        assert_eq!(
            money(line(&lines, "cust_idle", price)),
            ["0", "0.00", "0.00", "0.00"]
        );
    }
}

#[test]
fn token_packages_round_up_or_down_and_prices_filter_by_model() {
    let f = Fixture::new(PRO);
    let events = vec![
        tokens("t1", "cust_acme", "gpt-x", json!(700)),
        tokens("t2", "cust_acme", "gpt-x", json!(800)),
        tokens("t3", "cust_acme", "claude-y", json!(1999)),
        tokens("t4", "cust_idle", "gpt-x", json!(2000)),
        tokens("t5", "cust_idle", "claude-y", json!(2000)),
        tokens("t6", "cust_acme", "llama-z", json!(500)),
    ];
    let run = f.rate(&events, &[]).succeeded();
    let lines = run.lines();
    // gpt-x, round up: 1500 tokens are 2 packages x 0.02 = 0.04.
    let gpt = line(&lines, "cust_acme", "gpt-tokens");
    assert_eq!(money(gpt), ["1500", "0.04", "0.00", "0.04"]);
    assert_eq!(gpt["tiers"][0]["quantity"], "2");
    // claude-y, round down: 1999 tokens are 1 whole package x 0.03 = 0.03.
    let claude = line(&lines, "cust_acme", "claude-tokens");
    assert_eq!(money(claude), ["1999", "0.03", "0.00", "0.03"]);
    assert_eq!(claude["tiers"][0]["quantity"], "1");
    // An exact multiple is the same either way: 2 packages.
    assert_eq!(
        money(line(&lines, "cust_idle", "gpt-tokens")),
        ["2000", "0.04", "0.00", "0.04"]
    );
    assert_eq!(
        money(line(&lines, "cust_idle", "claude-tokens")),
        ["2000", "0.06", "0.00", "0.06"]
    );
    // llama-z has no price in the plan: reported, not billed.
    assert_eq!(
        f.summary()["unpriced_usage"],
        json!([{"customer": "cust_acme", "meter": "tokens", "group": ["llama-z"], "quantity": "500"}])
    );
    assert!(
        run.stderr
            .contains("unbilled: 500 of meter tokens [\"llama-z\"] for \"cust_acme\""),
        "{}",
        run.stderr
    );
}

#[test]
fn negative_corrections_lower_a_sum_meters_line_to_no_less_than_zero() {
    // Also a price of every model's tokens, whose line adds the models up.
    let all_tokens = r#"[[plans.prices]]
id = "all-tokens"
meter = "tokens"
billing_scheme = "per_unit"
unit_amount = "0.00001"

[[customers]]
id = "cust_acme""#;
    let f = Fixture::new(
        &PRO.replace(
            "value_property = \"$.tokens\"",
            "value_property = \"$.tokens\"\nallow_negative_values = true",
        )
        .replacen("[[customers]]\nid = \"cust_acme\"", all_tokens, 1),
    );
    let events = vec![
        tokens("t1", "cust_acme", "gpt-x", json!(4000)),
        // A gateway reported 1500 too many: the correction under a new id.
        tokens("t1-fix", "cust_acme", "gpt-x", json!("-1500")),
        // Corrections of claude-y usage reported in another month outweigh its usage.
        tokens("t2", "cust_acme", "claude-y", json!(1000)),
        tokens("t2-fix", "cust_acme", "claude-y", json!(-3000)),
    ];
    let run = f.rate(&events, &[]).succeeded();
    let lines = run.lines();
    // 2500 tokens: 3 packages (rounded up) x 0.02.
    assert_eq!(
        money(line(&lines, "cust_acme", "gpt-tokens")),
        ["2500", "0.06", "0.00", "0.06"]
    );
    // -2000 bills as zero usage, never as a credit through the tiers.
    assert_eq!(
        money(line(&lines, "cust_acme", "claude-tokens")),
        ["0", "0.00", "0.00", "0.00"]
    );
    assert_eq!(f.summary()["accepted"], 4, "{}", f.summary());
    let explained = f
        .explain("cust_acme", &["--price", "claude-tokens"])
        .succeeded();
    assert!(
        explained
            .stdout
            .contains("(negative values are corrections)")
            && explained.stdout.contains(
                "model = claude-y: -2000 in 1 window (corrections outweigh its usage: it counts as 0)"
            ),
        "{}",
        explained.stdout
    );
    // Each model on its own: claude-y's -2000 takes nothing off gpt-x's 2500, and the
    // days, which add both up, are said not to make the quantity.
    assert_eq!(
        money(line(&lines, "cust_acme", "all-tokens")),
        ["2500", "0.03", "0.00", "0.03"]
    );
    let all = f
        .explain("cust_acme", &["--price", "all-tokens"])
        .succeeded();
    assert!(
        all.stdout.contains(
            "            by day: Nov 10: 500\n            the days add up to 500; each group counted no less than zero (above), the month bills 2500\n"
        ),
        "{}",
        all.stdout
    );
}

const VOLUME: &str = r#"
[[meters]]
slug = "seats"
event_type = "seat.used"
aggregation = "count"

[[plans]]
id = "vol"
currency = "usd"

[[plans.prices]]
id = "seats"
meter = "seats"
billing_scheme = "tiered"
tiers_mode = "volume"
tiers = [
  { up_to = 10, unit_amount = "2", flat_amount = "5" },
  { up_to = "inf", unit_amount = "1", flat_amount = "20" },
]

[[customers]]
id = "none"
plan = "vol"

[[customers]]
id = "ten"
plan = "vol"

[[customers]]
id = "eleven"
plan = "vol"
"#;

#[test]
fn volume_tiers_price_every_unit_at_the_tier_the_total_reaches() {
    let f = Fixture::new(VOLUME);
    let seat = |who: &str, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                event(
                    &format!("{who}-{i}"),
                    "seat.used",
                    who,
                    "2026-11-15T12:00:00Z",
                    None,
                )
            })
            .collect()
    };
    let run = f
        .rate(&concat(&[seat("ten", 10), seat("eleven", 11)]), &[])
        .succeeded();
    let lines = run.lines();
    // 0 falls in the first tier: 0 x 2 + 5 = 5.
    assert_eq!(
        money(line(&lines, "none", "seats")),
        ["0", "5.00", "0.00", "5.00"]
    );
    // 10 is the first tier's inclusive bound: 10 x 2 + 5 = 25.
    assert_eq!(
        money(line(&lines, "ten", "seats")),
        ["10", "25.00", "0.00", "25.00"]
    );
    // 11 moves every unit to the second tier: 11 x 1 + 20 = 31.
    let eleven = line(&lines, "eleven", "seats");
    assert_eq!(money(eleven), ["11", "31.00", "0.00", "31.00"]);
    assert_eq!(
        eleven["tiers"],
        json!([{"tier": 2, "up_to": "inf", "quantity": "11", "unit_amount": "1", "flat_amount": "20", "amount": "31"}])
    );
}

#[test]
fn yen_has_no_minor_unit_and_rounds_per_the_plan() {
    // One call at 102.5 jpy: half_up 103, half_even 102 (2 is even).
    let up = Fixture::new(&per_event_config("jpy", "half_up", "102.5", ""));
    let l = up.rate(&calls("c", 1), &[]).succeeded().lines();
    assert_eq!(money(&l[0]), ["1", "103", "0", "103"]);
    assert_eq!(l[0]["currency"], "jpy");
    let even = Fixture::new(&per_event_config("jpy", "half_even", "102.5", ""));
    assert_eq!(
        money(&even.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "102", "0", "102"]
    );
    // 3 calls: 307.5 -> 308 either way (8 is even).
    assert_eq!(
        money(&even.rate(&calls("c", 3), &[]).succeeded().lines()[0]),
        ["3", "308", "0", "308"]
    );
}

#[test]
fn icelandic_krona_is_billed_in_whole_kronur_as_card_payments_allow() {
    // 40.10 isk a call: billed 40, written in Stripe's hundredths (`amount_minor`
    // 4000); 3 calls, 120.30, are billed 120.
    let isk = Fixture::new(&per_event_config("isk", "half_up", "40.10", ""));
    let l = isk.rate(&calls("c", 1), &[]).succeeded().lines();
    assert_eq!(money(&l[0]), ["1", "40.00", "0.00", "40.00"]);
    let l = isk.rate(&calls("c", 3), &[]).succeeded().lines();
    assert_eq!(money(&l[0]), ["3", "120.00", "0.00", "120.00"]);
}

#[test]
fn yen_discounts_round_to_whole_yen() {
    // 103 jpy, 50 % off: 51.5 -> 52 (half_up); 103 - 52 = 51.
    let f = Fixture::new(&per_event_config(
        "jpy",
        "half_up",
        "103",
        r#"discounts = [{ percent_off = "50" }]"#,
    ));
    assert_eq!(
        money(&f.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "103", "52", "51"]
    );
    // half_even: 51.5 -> 52 as well (2 is even); 101 x 50 % = 50.5 -> 50.
    let g = Fixture::new(&per_event_config(
        "jpy",
        "half_even",
        "101",
        r#"discounts = [{ percent_off = "50" }]"#,
    ));
    assert_eq!(
        money(&g.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "101", "50", "51"]
    );
}

#[test]
fn a_charge_past_28_decimals_is_rounded_once_not_refused() {
    // A price per GB-second and a float's text as usage: customer a's charge,
    // 0.000000000462963888888888925926, needs 30 decimals.
    let f = Fixture::new(
        r#"
[[meters]]
slug = "gbs"
event_type = "fn.run"
aggregation = "sum"
value_property = "$.gb_seconds"

[[plans]]
id = "p"
currency = "usd"

[[plans.prices]]
id = "compute"
meter = "gbs"
billing_scheme = "per_unit"
unit_amount = "0.0000166667"

[[customers]]
id = "a"
plan = "p"

[[customers]]
id = "b"
plan = "p"
"#,
    );
    let time = "2026-11-10T10:00:00Z";
    let runs = [
        event(
            "r1",
            "fn.run",
            "a",
            time,
            Some(json!({"gb_seconds": 2.777777777777778e-05})),
        ),
        event(
            "r2",
            "fn.run",
            "b",
            time,
            Some(json!({"gb_seconds": 360000})),
        ),
    ];
    let lines = f.rate(&runs, &[]).succeeded().lines();
    assert_eq!(
        money(line(&lines, "a", "compute")),
        ["0.00002777777777777778", "0.00", "0.00", "0.00"]
    );
    assert_eq!(
        money(line(&lines, "b", "compute")),
        ["360000", "6.00", "0.00", "6.00"]
    );
    // The breakdown shows a's tier amount to the 28 decimals a line's figures hold.
    assert_eq!(
        line(&lines, "a", "compute")["tiers"][0]["amount"],
        "0.0000000004629638888888889259"
    );
}

#[test]
fn kuwaiti_dinar_is_written_to_the_fils_and_billed_to_ten_fils() {
    // Card payments in kwd must end in a zero fils: one call at 0.025 kwd is billed
    // 0.030 half_up, 0.020 half_even (2 is even), written with three decimals.
    let up = Fixture::new(&per_event_config("kwd", "half_up", "0.025", ""));
    assert_eq!(
        money(&up.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "0.030", "0.000", "0.030"]
    );
    let even = Fixture::new(&per_event_config("kwd", "half_even", "0.025", ""));
    assert_eq!(
        money(&even.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "0.020", "0.000", "0.020"]
    );
    // 4 calls: 0.1 exactly.
    assert_eq!(
        money(&even.rate(&calls("c", 4), &[]).succeeded().lines()[0]),
        ["4", "0.100", "0.000", "0.100"]
    );
    // An amount off of one fils is finer than a card payment can take off.
    let refused = Fixture::new(&per_event_config(
        "kwd",
        "half_up",
        "1",
        r#"discounts = [{ price = "calls", amount_off = "0.005" }]"#,
    ));
    let run = refused.rate(&calls("c", 1), &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_shows(
        &run.stderr,
        &["0.005 has more decimals than kwd is billed in (2)"],
    );
}

#[test]
fn half_even_and_half_up_differ_only_on_a_tie() {
    let up = Fixture::new(&per_event_config("usd", "half_up", "0.125", ""));
    let even = Fixture::new(&per_event_config("usd", "half_even", "0.125", ""));
    // 1 x 0.125: a tie. half_up 0.13, half_even 0.12.
    assert_eq!(
        money(&up.rate(&calls("c", 1), &[]).succeeded().lines()[0])[1],
        "0.13"
    );
    assert_eq!(
        money(&even.rate(&calls("c", 1), &[]).succeeded().lines()[0])[1],
        "0.12"
    );
    // 3 x 0.125 = 0.375: a tie towards an even digit, 0.38 both ways.
    assert_eq!(
        money(&up.rate(&calls("c", 3), &[]).succeeded().lines()[0])[1],
        "0.38"
    );
    assert_eq!(
        money(&even.rate(&calls("c", 3), &[]).succeeded().lines()[0])[1],
        "0.38"
    );
    // 2 x 0.125 = 0.25: no rounding needed.
    assert_eq!(
        money(&up.rate(&calls("c", 2), &[]).succeeded().lines()[0])[1],
        "0.25"
    );
    assert_eq!(
        money(&even.rate(&calls("c", 2), &[]).succeeded().lines()[0])[1],
        "0.25"
    );
}

#[test]
fn the_discount_is_taken_from_the_rounded_subtotal() {
    // 0.125 rounds to a subtotal of 0.13; 50 % of 0.13 = 0.065 -> 0.07; amount 0.06.
    // (50 % of the unrounded 0.125 would give 0.0625 -> 0.06 and an amount of 0.07.)
    let f = Fixture::new(&per_event_config(
        "usd",
        "half_up",
        "0.125",
        r#"discounts = [{ percent_off = "50" }]"#,
    ));
    assert_eq!(
        money(&f.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "0.13", "0.07", "0.06"]
    );
    // half_even: subtotal 0.12; 50 % = 0.06 exactly; amount 0.06.
    let g = Fixture::new(&per_event_config(
        "usd",
        "half_even",
        "0.125",
        r#"discounts = [{ percent_off = "50" }]"#,
    ));
    assert_eq!(
        money(&g.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "0.12", "0.06", "0.06"]
    );
    // half_even on the discount itself: subtotal 0.25 (2 calls), 50 % = 0.125 -> 0.12.
    assert_eq!(
        money(&g.rate(&calls("c", 2), &[]).succeeded().lines()[0]),
        ["2", "0.25", "0.12", "0.13"]
    );
}

#[test]
fn a_full_percent_discount_leaves_nothing_to_pay() {
    let f = Fixture::new(&per_event_config(
        "usd",
        "half_up",
        "1.99",
        r#"discounts = [{ percent_off = "100" }]"#,
    ));
    assert_eq!(
        money(&f.rate(&calls("c", 3), &[]).succeeded().lines()[0]),
        ["3", "5.97", "5.97", "0.00"]
    );
}

#[test]
fn amount_off_is_capped_at_the_subtotal() {
    // 3 calls x 1.50 = 4.50, 2 off: 2.50.
    let f = Fixture::new(&per_event_config(
        "usd",
        "half_up",
        "1.50",
        r#"discounts = [{ price = "calls", amount_off = "2" }]"#,
    ));
    assert_eq!(
        money(&f.rate(&calls("c", 3), &[]).succeeded().lines()[0]),
        ["3", "4.50", "2.00", "2.50"]
    );
    // 1 call = 1.50: the discount is capped at 1.50 and the amount is 0, never negative.
    assert_eq!(
        money(&f.rate(&calls("c", 1), &[]).succeeded().lines()[0]),
        ["1", "1.50", "1.50", "0.00"]
    );
    // No usage: nothing to discount.
    assert_eq!(
        money(&f.rate(&[], &[]).succeeded().lines()[0]),
        ["0", "0.00", "0.00", "0.00"]
    );
}

#[test]
fn an_amount_off_without_a_price_stops_rating_with_where_and_why() {
    let config = PRO.replace(
        r#"discounts = [{ price = "resolutions", percent_off = "12.5" }]"#,
        r#"discounts = [{ amount_off = "60" }]"#,
    );
    let f = Fixture::new(&config);
    let run = f.rate(&[], &[]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr
            .contains("customers[cust_acme].discounts[0].price")
            && run
                .stderr
                .contains("an amount_off needs the price it applies to"),
        "{}",
        run.stderr
    );
}

#[test]
fn decimal_usage_stays_exact() {
    let f = Fixture::new(COMPUTE);
    // 5.001 stays 5.001; 0.1 + 0.2 is 0.3, not 0.30000000000000004. A numeric string
    // and an exponent count too: 5.001 + 0.1 + 0.2 + 12 + 1000 = 1017.301.
    let raw = [
        r#"{"specversion":"1.0","id":"g1","source":"s","type":"gpu.seconds","subject":"c","time":"2026-11-05T00:00:00Z","data":{"seconds":5.001}}"#,
        r#"{"specversion":"1.0","id":"g2","source":"s","type":"gpu.seconds","subject":"c","time":"2026-11-05T00:00:00Z","data":{"seconds":0.1}}"#,
        r#"{"specversion":"1.0","id":"g3","source":"s","type":"gpu.seconds","subject":"c","time":"2026-11-05T00:00:00Z","data":{"seconds":0.2}}"#,
        r#"{"specversion":"1.0","id":"g4","source":"s","type":"gpu.seconds","subject":"c","time":"2026-11-05T00:00:00Z","data":{"seconds":"12"}}"#,
        r#"{"specversion":"1.0","id":"g5","source":"s","type":"gpu.seconds","subject":"c","time":"2026-11-05T00:00:00Z","data":{"seconds":1e3}}"#,
    ];
    let run = f.rate(&raw.map(String::from), &[]).succeeded();
    let lines = run.lines();
    assert_eq!(
        money(line(&lines, "c", "seconds")),
        ["1017.301", "1017.30", "0.00", "1017.30"]
    );
    assert_eq!(
        line(&lines, "c", "seconds")["tiers"][0]["amount"],
        "1017.301"
    );

    let one = f.rate(&[raw[0].to_owned()], &[]).succeeded();
    let lines = one.lines();
    assert_eq!(
        money(line(&lines, "c", "seconds")),
        ["5.001", "5.00", "0.00", "5.00"]
    );
    assert_eq!(
        money(line(&lines, "c", "peak")),
        ["5.001", "5.00", "0.00", "5.00"]
    );
}

#[test]
fn max_unique_count_and_latest_meters_through_the_binary() {
    let f = Fixture::new(COMPUTE);
    let active = |id: &str, user: Value| {
        event(
            id,
            "app.active",
            "c",
            "2026-11-06T00:00:00Z",
            Some(json!({ "user": user })),
        )
    };
    let seats = |id: &str, time: &str, n: u32| {
        event(id, "app.seats", "c", time, Some(json!({ "seats": n })))
    };
    let events = vec![
        gpu("g1", json!(7)),
        gpu("g2", json!(2.5)),
        active("a1", json!("alice")),
        active("a2", json!("bob")),
        active("a3", json!("alice")),
        active("a4", json!(1)),
        active("a5", json!("1")),
        // Latest by event time, not by position in the file: 12 seats on the 20th wins.
        seats("s1", "2026-11-20T00:00:00Z", 12),
        seats("s2", "2026-11-03T00:00:00Z", 40),
    ];
    let run = f.rate(&events, &[]).succeeded();
    let lines = run.lines();
    assert_eq!(
        money(line(&lines, "c", "peak")),
        ["7", "7.00", "0.00", "7.00"]
    );
    // alice, bob and 1 (the number 1 and the string "1" are one value): 3 x 10.
    assert_eq!(
        money(line(&lines, "c", "users")),
        ["3", "30.00", "0.00", "30.00"]
    );
    assert_eq!(
        money(line(&lines, "c", "seats")),
        ["12", "36.00", "0.00", "36.00"]
    );
    assert_eq!(
        money(line(&lines, "c", "seconds")),
        ["9.5", "9.50", "0.00", "9.50"]
    );
}

#[test]
fn a_latest_meter_by_group_bills_each_groups_latest_value_added_up() {
    let f = Fixture::new(
        r#"
[[meters]]
slug = "seats"
event_type = "app.seats"
aggregation = "latest"
value_property = "$.seats"
group_by = { team = "$.team" }

[[plans]]
id = "teams"
currency = "usd"

[[plans.prices]]
id = "seats"
meter = "seats"
billing_scheme = "per_unit"
unit_amount = "10"

[[customers]]
id = "c"
plan = "teams"
"#,
    );
    let seats = |id: &str, team: &str, day: &str, n: u32| {
        let time = format!("2026-11-{day}T09:00:00Z");
        let data = json!({ "team": team, "seats": n });
        event(id, "app.seats", "c", &time, Some(data))
    };
    // Team a has 50 seats (its 40 of the 3rd replaced on the 10th), team b 2: 52.
    let events = vec![
        seats("s1", "a", "03", 40),
        seats("s2", "a", "10", 50),
        seats("s3", "b", "20", 2),
    ];
    let lines = f.rate(&events, &[]).succeeded().lines();
    assert_eq!(money(&lines[0]), ["52", "520.00", "0.00", "520.00"]);
    // `rate` left the events in events.jsonl, which `explain` reads.
    let run = f.explain("c", &[]).succeeded();
    assert_shows(
        &run.stdout,
        &["  quantity  52: meter seats takes $.seats of the latest app.seats event of each group, added up\n            team = a: 50, set by the event of 2026-11-10T09:00:00+00:00\n            team = b: 2, set by the event of 2026-11-20T09:00:00+00:00\n            (each group's latest value, added up)\n"],
    );
}

// ---------------------------------------------------------------------------------------
// The period: UTC calendar month, offsets normalised
// ---------------------------------------------------------------------------------------

#[test]
fn event_times_are_normalised_to_utc_at_period_boundaries() {
    let f = Fixture::new(PRO);
    let at = |id: &str, time: &str| event(id, "ai.resolution", "cust_idle", time, None);
    let events = vec![
        at("in-1", "2026-11-01T00:00:00Z"), // first instant of the period
        at("in-2", "2026-12-01T00:30:00+01:00"), // 2026-11-30T23:30:00Z
        at("in-3", "2026-11-30T23:59:59.999999999Z"), // last instant
        at("in-4", "2026-11-30T18:59:59-05:00"), // 2026-11-30T23:59:59Z
        at("out-1", "2026-12-01T00:00:00Z"), // first instant of the next period
        at("out-2", "2026-11-01T00:30:00+01:00"), // 2026-10-31T23:30:00Z
        at("out-3", "2026-10-31T23:59:59.999Z"),
        at("out-4", "2026-11-30T19:00:00-05:00"), // 2026-12-01T00:00:00Z
        at("out-5", "2026-11-01T05:29:00+05:30"), // 2026-10-31T23:59:00Z
        at("out-6", "2026-12-10T09:00:00Z"),      // December, before the clock
    ];
    let run = f.rate(&events, &[]).succeeded();
    assert_eq!(
        money(line(&run.lines(), "cust_idle", "resolutions"))[0],
        "4"
    );
    let summary = f.summary();
    assert_eq!(summary["accepted"], 4);
    assert_eq!(summary["outside_period"], 6);
    assert_eq!(summary["events_read"], 10);
}

#[test]
fn other_periods_are_rated_with_their_own_bounds() {
    let f = Fixture::new(PRO);
    f.write(
        "events.jsonl",
        format!(
            "{}\n{}\n",
            event(
                "a",
                "ai.resolution",
                "cust_idle",
                "2026-10-31T23:30:00Z",
                None
            ),
            event(
                "b",
                "ai.resolution",
                "cust_idle",
                "2026-11-01T00:30:00+01:00",
                None
            )
        )
        .as_bytes(),
    );
    let run: Run = f
        .tally()
        .args([
            "rate",
            "--config",
            "tally.toml",
            "--events",
            "events.jsonl",
            "--period",
            "2026-10",
        ])
        .args(["--format", "json", "--now", NOW])
        .output()
        .unwrap()
        .into();
    let lines = run.succeeded().lines();
    let l = line(&lines, "cust_idle", "resolutions");
    assert_eq!(l["period_start"], "2026-10-01T00:00:00Z");
    assert_eq!(l["period_end"], "2026-11-01T00:00:00Z");
    assert_eq!(l["quantity"], "2");
}

/// A plan that bills resolutions at 0.50 each, nothing else: what `pro`'s customers
/// move to.
const PRO_2027: &str = r#"
[[plans]]
id = "pro_2027"
currency = "usd"

[[plans.prices]]
id = "resolutions"
meter = "resolutions"
billing_scheme = "per_unit"
unit_amount = "0.50"
"#;

/// `tally rate`'s JSON lines of `period` for `f`'s `events.jsonl`.
fn rated(f: &Fixture, period: &str) -> Vec<Value> {
    let run: Run = (f.tally())
        .args(["rate", "--config", "tally.toml", "--events", "events.jsonl"])
        .args(["--period", period, "--format", "json", "--now", NOW])
        .output()
        .unwrap()
        .into();
    run.succeeded().lines()
}

/// Writes `events.jsonl`: three resolutions of `customer` on 2026-10-20 and three on
/// 2026-11-03.
fn three_resolutions_a_month(f: &Fixture, customer: &str) {
    let events: Vec<String> = ["2026-10-20T10:00:00Z", "2026-11-03T10:00:00Z"]
        .iter()
        .enumerate()
        .flat_map(|(month, time)| {
            (0..3).map(move |i| {
                let id = format!("{month}-{i}");
                event(&id, "ai.resolution", customer, time, None)
            })
        })
        .collect();
    f.write(
        "events.jsonl",
        format!("{}\n", events.join("\n")).as_bytes(),
    );
}

#[test]
fn a_plan_change_rates_each_period_with_the_plan_of_that_period() {
    // From November cust_acme is on pro_2027, resolutions at 0.50 each without the
    // platform fee and without pro's discount; cust_idle stays on pro.
    let f = Fixture::new(&format!(
        r#"{PRO}
{PRO_2027}
[[customers]]
id = "cust_moved"
plan = "pro"
discounts = [{{ price = "resolutions", percent_off = "12.5" }}]

[[customers.plan_changes]]
from = "2026-11"
plan = "pro_2027"
"#
    ));
    three_resolutions_a_month(&f, "cust_moved");
    let rate = |period: &str| rated(&f, period);
    let prices = |lines: &[Value], customer: &str| -> Vec<(String, String)> {
        (lines.iter())
            .filter(|l| l["customer"] == customer)
            .map(|l| (l["plan"].to_string(), l["price"].to_string()))
            .collect()
    };
    let pro = [
        ("\"pro\"".to_owned(), "\"resolutions\"".to_owned()),
        ("\"pro\"".to_owned(), "\"gpt-tokens\"".to_owned()),
        ("\"pro\"".to_owned(), "\"claude-tokens\"".to_owned()),
    ];

    let october = rate("2026-10");
    assert_eq!(prices(&october, "cust_moved"), pro);
    let warned = Run::from(
        (f.tally())
            .args(["validate", "--config", "tally.toml"])
            .output()
            .unwrap(),
    )
    .succeeded();
    assert!(
        warned.stdout.contains(
            "warning: customers[cust_moved].plan_changes[0].discounts: the discounts before this change (resolutions) end with it"
        ),
        "{}",
        warned.stdout
    );
    // 3 resolutions within pro's platform fee of 49.00, 12.5 % off: 6.125 rounds to 6.13.
    assert_eq!(
        money(line(&october, "cust_moved", "resolutions")),
        ["3", "49.00", "6.13", "42.87"]
    );

    let november = rate("2026-11");
    let explained = f.explain("cust_moved", &[]).succeeded().stdout;
    assert!(
        explained.contains("  plan pro_2027, usd; each line of the month rounded half_up to 2 decimals\n  moved to plan pro_2027 this month; 2026-10 was billed on plan pro (a plan takes effect at a month's start and Tally does not prorate, so all of the month is billed on pro_2027)\n"),
        "{explained}"
    );
    assert_eq!(
        prices(&november, "cust_moved"),
        [("\"pro_2027\"".to_owned(), "\"resolutions\"".to_owned())]
    );
    assert_eq!(
        money(line(&november, "cust_moved", "resolutions")),
        ["3", "1.50", "0.00", "1.50"]
    );
    assert_eq!(prices(&november, "cust_idle"), pro);
}

#[test]
fn a_replaced_plan_rates_its_customers_on_its_successor_from_its_period_on() {
    // From November pro is replaced by pro_2027 (resolutions at 0.50 each, no platform
    // fee or token prices): every pro customer moves, with its discount on the price
    // of the same id.
    let pro = "id = \"pro\"\ncurrency = \"usd\"\n";
    assert!(PRO.contains(pro));
    let f = Fixture::new(&format!(
        r#"{}
{PRO_2027}"#,
        PRO.replacen(
            pro,
            &format!("{pro}replaced_by = {{ plan = \"pro_2027\", from = \"2026-11\" }}\n"),
            1
        )
    ));
    three_resolutions_a_month(&f, "cust_acme");
    let rate = |period: &str| -> Vec<(String, String, Vec<String>)> {
        (rated(&f, period).iter())
            .map(|l| {
                let (customer, plan) = (l["customer"].to_string(), l["plan"].to_string());
                (customer, plan, money(l).map(str::to_owned).to_vec())
            })
            .collect()
    };
    let october = rate("2026-10");
    assert!(
        october.iter().all(|(_, plan, _)| plan == "\"pro\""),
        "{october:?}"
    );
    // 3 resolutions within pro's platform fee of 49.00, 12.5 % off: 6.125 rounds to 6.13.
    assert!(october.contains(&(
        "\"cust_acme\"".to_owned(),
        "\"pro\"".to_owned(),
        ["3", "49.00", "6.13", "42.87"].map(str::to_owned).to_vec()
    )));
    // 3 at 0.50 = 1.50, 12.5 % off: 0.1875 rounds to 0.19; cust_idle has no discount.
    assert_eq!(
        rate("2026-11"),
        [
            (
                "\"cust_acme\"".to_owned(),
                "\"pro_2027\"".to_owned(),
                ["3", "1.50", "0.19", "1.31"].map(str::to_owned).to_vec()
            ),
            (
                "\"cust_idle\"".to_owned(),
                "\"pro_2027\"".to_owned(),
                ["0", "0.00", "0.00", "0.00"].map(str::to_owned).to_vec()
            ),
        ]
    );
}

#[test]
fn a_total_needing_more_digits_than_a_decimal_bills_every_event_rounded_at_its_last_digit() {
    let f = Fixture::new(PRO);
    // Together they need 46 significant digits: every event is counted, and the total
    // keeps the 28 a decimal holds, rounded half to even, in either order.
    let mut events = vec![
        tokens("t-1", "cust_acme", "gpt-x", json!("999999999999999999")),
        tokens(
            "t-2",
            "cust_acme",
            "gpt-x",
            json!("0.0000000000000000000000000001"),
        ),
        tokens("t-3", "cust_acme", "gpt-x", json!("0.00000000006")),
    ];
    for _ in 0..2 {
        let run = f.rate(&events, &[]).succeeded();
        assert_shows(&run.stderr, &["3 counted", "0 refused", "0 rejected lines"]);
        let quantities: Vec<Value> = (run.lines().iter())
            .filter(|line| line["customer"] == "cust_acme" && line["quantity"] != "0")
            .map(|line| line["quantity"].clone())
            .collect();
        assert_eq!(quantities, [json!("999999999999999999.0000000001")]);
        events.reverse();
    }
}

#[test]
fn a_line_too_large_to_store_is_listed_and_fails_the_run_once_the_others_are_written() {
    let f = Fixture::new(
        r#"
[[meters]]
slug = "tokens"
event_type = "llm.tokens"
aggregation = "sum"
value_property = "$.tokens"

[[plans]]
id = "p"
currency = "usd"

[[plans.prices]]
id = "tokens"
meter = "tokens"
billing_scheme = "per_unit"
unit_amount = "0.1"

[[customers]]
id = "cust_a"
plan = "p"

[[customers]]
id = "cust_b"
plan = "p"
"#,
    );
    // A valid value (under 10^18), but 10^17 usd is 10^19 cents: more than a line's
    // 64-bit count of minor units holds.
    let events = [
        tokens("a1", "cust_a", "m", json!(1000)),
        tokens("b1", "cust_b", "m", json!(999_999_999_999_999_999_u64)),
    ];
    let run = f.rate(&events, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let lines = run.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(money(line(&lines, "cust_a", "tokens"))[3], "100.00");
    let not_rated = &f.summary()["lines_not_rated"];
    assert_eq!(not_rated.as_array().map(Vec::len), Some(1), "{not_rated}");
    assert_eq!(
        (&not_rated[0]["customer"], &not_rated[0]["price"]),
        (&json!("cust_b"), &json!("tokens"))
    );
    let reason = "amount 99999999999999999.90 is more minor units than a line can store";
    assert!(
        not_rated[0]["reason"].as_str().unwrap().starts_with(reason),
        "{not_rated}"
    );
    assert_shows(
        &run.stderr,
        &[
            "not rated: customer \"cust_b\"'s line for price \"tokens\", which its invoice lacks",
            "error: 1 line(s) could not be rated",
            "the other lines were written",
        ],
    );
    let explained = f.explain("cust_b", &[]);
    assert_eq!(explained.code, 1, "{}", explained.stderr);
    assert_shows(
        &explained.stdout,
        &[
            "tokens: not rated, so the invoice lacks this line: ",
            reason,
        ],
    );
    f.explain("cust_a", &[]).succeeded();
}
