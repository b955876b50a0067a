use std::str::FromStr;

use tally_rater::line::{adjustment_line, invoice_line};
use tally_schemas::records::{MeterValue, SeriesKey, WindowUsage};

use super::invoice::{resent_lines, write_billed_later};
use super::*;

#[test]
fn resends_name_the_line_they_resent() {
    let of = |line: u64| format!("of line {line}");
    assert_eq!(resent_lines(&[], of), "");
    // Of one event: said once.
    assert_eq!(
        resent_lines(&[(3, Some(2)), (5, Some(2))], of),
        ": line 3, 5 (of line 2)"
    );
    // Of several, or of an event another customer's line holds: each its own.
    assert_eq!(
        resent_lines(&[(3, Some(2)), (9, Some(7)), (12, None)], of),
        ": line 3 (of line 2), 9 (of line 7), 12"
    );
}

/// cust_acme moves from starter to pro (12.5 % off its resolutions) in November;
/// cust_gone is billed until October.
const BOOK: &str = r#"
[[meters]]
slug = "resolutions"
event_type = "ai.resolution"
aggregation = "count"

[[plans]]
id = "starter"
currency = "usd"
rounding = "half_even"

[[plans.prices]]
id = "resolutions"
meter = "resolutions"
billing_scheme = "per_unit"
unit_amount = "0.99"

[[plans]]
id = "pro"
currency = "usd"

[[plans.prices]]
id = "resolutions"
meter = "resolutions"
billing_scheme = "tiered"
tiers_mode = "graduated"
tiers = [{ up_to = 100, flat_amount = "49" }, { up_to = "inf", unit_amount = "0.89" }]

[[customers]]
id = "cust_acme"
plan = "starter"

[[customers.plan_changes]]
from = "2026-11"
plan = "pro"
discounts = [{ price = "resolutions", percent_off = "12.5" }]

[[customers]]
id = "cust_gone"
plan = "starter"
through = "2026-10"

[[customers]]
id = "cust_pro"
plan = "pro"
discounts = [{ price = "resolutions", percent_off = "12.5" }]
"#;

fn config() -> Config {
    Config::parse(BOOK, "test.toml").unwrap()
}

fn month(text: &str) -> Period {
    Period::from_str(text).unwrap()
}

/// The customer's resolutions line of `period` for `quantity`, as the rater makes it.
fn line(config: &Config, customer: &str, period: &str, quantity: i64) -> InvoiceLine {
    let customer = &config.customers[customer];
    invoice_line(config, customer, 0, month(period), Decimal::from(quantity)).unwrap()
}

/// What late usage of October adds to its line, billed in November.
fn adjustment(config: &Config, customer: &str, before: i64, after: i64) -> InvoiceLine {
    let (before, after) = (
        line(config, customer, "2026-10", before),
        line(config, customer, "2026-10", after),
    );
    adjustment_line(&before, &after, month("2026-11"))
}

fn explained(
    config: &Config,
    customer: &str,
    lines: &[InvoiceLine],
    usage: &[SeriesWindows],
) -> String {
    explained_after(config, customer, lines, usage, BTreeMap::new())
}

/// As [`explained`], with what the closed months' lines had billed.
fn explained_after(
    config: &Config,
    customer: &str,
    lines: &[InvoiceLine],
    usage: &[SeriesWindows],
    billed_before: BTreeMap<(Period, String), Billed>,
) -> String {
    let explanation = Explanation {
        config,
        period: month("2026-11"),
        customer: &config.customers[customer],
        source: Source::Pipeline {
            url: "http://clickhouse:8123",
            database: "tally",
            billed_later: &[],
            repricings: &[],
        },
        lines: lines.iter().collect(),
        price: None,
        usage,
        unfinished: false,
        billed_before,
        list_events: false,
    };
    let mut out = Vec::new();
    write_explanation(&mut out, &explanation).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn an_invoice_with_an_adjustment_on_the_earlier_plan_has_one_total_of_every_line() {
    let config = config();
    let lines = [
        line(&config, "cust_acme", "2026-11", 2),
        adjustment(&config, "cust_acme", 10, 12),
    ];
    let shown = explained(&config, "cust_acme", &lines, &[]);
    assert!(
        shown.contains("resolutions, late usage of 2026-10: 1.98 usd"),
        "{shown}"
    );
    assert!(
        shown.contains("  discount  12.5 % of 49.00 = 6.125, rounded half_up = 6.13\n"),
        "{shown}"
    );
    assert!(
        shown.contains("\ntotal 44.85 usd (42.87 + 1.98)\n"),
        "{shown}"
    );
    assert!(
        shown.contains("  its discounts changed this month by a plan change: 12.5 % off resolutions (in 2026-10: none)\n"),
        "{shown}"
    );
    // The month's lines are rounded as pro rounds; the adjustment as starter does.
    assert!(
        shown.contains("  plan pro, usd; each line of the month rounded half_up to 2 decimals\n"),
        "{shown}"
    );
    assert!(
        shown.contains("less the line as billed, each rounded half_even to 2 decimals as plan starter rounds (subtotal 1.98, discount 0.00) = 1.98 usd\n"),
        "{shown}"
    );
    assert_eq!(shown.matches("\ntotal ").count(), 1, "{shown}");
}

#[test]
fn an_adjustment_shows_both_versions_of_the_closed_line_so_its_discount_can_be_redone() {
    // October closed at 150 resolutions; 900 more arrived late. 12.5 % of the
    // adjustment's subtotal (801.00) would round to 100.13: the discount billed is
    // the re-rated line's (111.81) less the one billed (11.69).
    let config = config();
    let closed = line(&config, "cust_pro", "2026-10", 150);
    let mut billed = Billed::default();
    billed.add(&closed);
    let late = adjustment(&config, "cust_pro", 150, 1050);
    let before = BTreeMap::from([((month("2026-10"), "resolutions".to_owned()), billed)]);
    let shown = explained_after(
        &config,
        "cust_pro",
        std::slice::from_ref(&late),
        &[],
        before,
    );
    for expected in [
        "  amount    what the late usage adds to 2026-10's line: that line rated again with it, less the line as billed, each rounded half_up to 2 decimals as plan pro rounds:\n",
        "            rated again  quantity 1050, subtotal 894.50, discount 12.5 % of 894.50 = 111.8125, rounded half_up = 111.81, amount 782.69\n",
        "            as billed    quantity 150, subtotal 93.50, discount 11.69, amount 81.81 (2026-10's line and any earlier adjustment of it)\n",
        "            difference   subtotal 894.50 - 93.50 = 801.00, discount 111.81 - 11.69 = 100.12: 801.00 - 100.12 = 700.88 usd\n",
    ] {
        assert!(shown.contains(expected), "{expected:?} in:\n{shown}");
    }
    assert!(!shown.contains("do not add up"), "{shown}");

    // October's stored line as another book rated it (a 10 % discount): the sums are
    // shown as stored, and no arithmetic is claimed that this book does not make.
    let mut other = Billed::default();
    other.add(&InvoiceLine {
        discount: Decimal::new(935, 2),
        amount: Decimal::new(8415, 2),
        ..closed
    });
    let before = BTreeMap::from([((month("2026-10"), "resolutions".to_owned()), other)]);
    let shown = explained_after(&config, "cust_pro", &[late], &[], before);
    for expected in [
        "            (the stored lines do not add up to 2026-10's line as this price book rates it with the late usage: one was rated with another book, or is missing from ClickHouse; the figures are the stored ones)\n",
        "            rated again  quantity 1050, subtotal 894.50, discount 109.47, amount 785.03\n",
    ] {
        assert!(shown.contains(expected), "{expected:?} in:\n{shown}");
    }
}

#[test]
fn a_closed_months_late_usage_billed_later_is_listed_and_its_absence_said() {
    let config = config();
    let shown = |later: &[InvoiceLine], unfinished: bool| {
        let mut out = Vec::new();
        write_billed_later(&mut out, month("2026-10"), later, unfinished).unwrap();
        String::from_utf8(out).unwrap()
    };
    assert_eq!(
        shown(&[], false),
        "\nno usage of 2026-10 has been billed in a later month (late usage arriving after its close would be, as an adjustment line)\n"
    );
    let late = adjustment(&config, "cust_acme", 10, 12);
    assert_eq!(
        shown(&[late], false),
        "\nusage of 2026-10 that arrived after its close, billed in later months as adjustment lines (`tally explain --period` of that month works each through):\n  2026-11  resolutions  quantity 2  amount 1.98 usd\n"
    );
    // An open month's late usage is its own lines'.
    assert_eq!(shown(&[], true), "");
}

#[test]
fn a_customer_no_longer_billed_shows_the_late_usage_it_is_still_billed_for() {
    let config = config();
    let lines = [adjustment(&config, "cust_gone", 3, 4)];
    let shown = explained(&config, "cust_gone", &lines, &[]);
    assert!(
        shown.contains("  not billed in 2026-11 (its `from` or `through` in the price book): its usage of the month is unbilled; the lines below bill late usage of months it was billed in\n"),
        "{shown}"
    );
    assert!(shown.contains("\ntotal 0.99 usd (0.99)\n"), "{shown}");
    let gone = &config.customers["cust_gone"];
    check_price(&config, gone, month("2026-11"), "resolutions", true).unwrap();
    let refused = check_price(&config, gone, month("2026-11"), "resolutions", false);
    assert!(refused.is_err());
    let unknown = check_price(&config, gone, month("2026-11"), "seats", true).unwrap_err();
    assert_eq!(
        unknown.to_string(),
        "customer \"cust_gone\" has no price \"seats\" in 2026-11; its prices are those of plan \"starter\": resolutions"
    );
}

#[test]
fn a_customer_not_billed_in_the_month_is_not_said_to_wait_for_lines_or_late_usage() {
    let config = config();
    let shown = explained(&config, "cust_gone", &[], &[]);
    assert!(
        shown.contains("  not billed in 2026-11 (its `from` or `through` in the price book): it has no lines, and its usage of the month is unbilled\n"),
        "{shown}"
    );
    // Neither a rater that has not rated it yet, nor late usage billed later: neither
    // can come of a month the customer is not billed in.
    assert!(shown.contains("\n  no lines\n"), "{shown}");
    assert!(!shown.contains("has not rated"), "{shown}");
    assert!(!shown.contains("billed in a later month"), "{shown}");
    // A billed customer without lines is told both.
    let waiting = explained(&config, "cust_pro", &[], &[]);
    assert!(
        waiting.contains("the streaming rater has not rated this customer's month yet"),
        "{waiting}"
    );
    assert!(
        waiting.contains("no usage of 2026-11 has been billed in a later month"),
        "{waiting}"
    );
}

#[test]
fn a_line_of_an_earlier_book_is_worked_through_only_where_this_book_rates_it_the_same() {
    let config = config();
    let mut same = line(&config, "cust_acme", "2026-11", 2);
    same.config_hash = "0123456789abcdef".to_owned();
    let shown = explained(&config, "cust_acme", &[same.clone()], &[]);
    assert!(
        shown.contains("  rated with price book 0123456789abcdef, which rates this line as this configuration does\n"),
        "{shown}"
    );
    assert!(shown.contains("  discount  12.5 % of 49.00"), "{shown}");

    // The earlier book gave 10 % off: its figures are shown, not this book's rules.
    let mut other = same;
    (other.discount, other.amount) = (Decimal::new(490, 2), Decimal::new(4410, 2));
    let shown = explained(&config, "cust_acme", &[other], &[]);
    for expected in [
        "  rated with price book 0123456789abcdef, which rates it otherwise than this configuration",
        "  quantity  2: meter resolutions\n",
        "  discount  4.90\n",
        "  amount    49.00 - 4.90 = 44.10 usd\n",
    ] {
        assert!(shown.contains(expected), "{expected:?} in:\n{shown}");
    }
    assert!(!shown.contains("  discount  12.5 %"), "{shown}");
}

#[test]
fn stored_windows_that_do_not_make_the_quantity_are_pointed_out() {
    let config = config();
    let lines = [line(&config, "cust_acme", "2026-11", 3)];
    let series = Arc::new(SeriesKey {
        customer: "cust_acme".to_owned(),
        meter: "resolutions".to_owned(),
        group: Vec::new(),
        adjusts: None,
    });
    let start = month("2026-11").start() + chrono::Duration::hours(30);
    let window = WindowUsage {
        window_start: start,
        window_end: start + chrono::Duration::hours(1),
        value: MeterValue {
            value: Decimal::TWO,
            latest: None,
        },
        revision: 1,
    };
    let shown = explained(&config, "cust_acme", &lines, &[(series, vec![window])]);
    assert!(shown.contains("            by day: Nov 02: 2\n"), "{shown}");
    assert!(
        shown.contains("            the stored windows make 2, not the line's 3: windows are stored from when `store_windows` is set, and while the month is open they can be a batch ahead of its line\n"),
        "{shown}"
    );
}

#[test]
fn a_latest_meters_stored_windows_show_each_groups_last_value() {
    let config = Config::parse(
        r#"
[[meters]]
slug = "seats"
event_type = "seats.snapshot"
aggregation = "latest"
value_property = "$.seats"
group_by = { team = "$.team" }

[[plans]]
id = "seats"
currency = "usd"

[[plans.prices]]
id = "seats"
meter = "seats"
billing_scheme = "per_unit"
unit_amount = "25"

[[customers]]
id = "cust_acme"
plan = "seats"
"#,
        "test.toml",
    )
    .unwrap();
    let lines = [line(&config, "cust_acme", "2026-11", 13)];
    let start = month("2026-11").start();
    // As the pipeline stores them: in time order, without the events' order.
    let team = |name: &str, values: &[(i64, i64)]| {
        let key = Arc::new(SeriesKey {
            customer: "cust_acme".to_owned(),
            meter: "seats".to_owned(),
            group: vec![name.to_owned()],
            adjusts: None,
        });
        let windows = (values.iter())
            .map(|&(hour, seats)| WindowUsage {
                window_start: start + chrono::Duration::hours(hour),
                window_end: start + chrono::Duration::hours(hour + 1),
                value: MeterValue {
                    value: Decimal::from(seats),
                    latest: None,
                },
                revision: 1,
            })
            .collect();
        (key, windows)
    };
    let usage = [
        team("a", &[(3, 5), (50, 8), (400, 7)]),
        team("b", &[(10, 3), (90, 6)]),
    ];
    let shown = explained(&config, "cust_acme", &lines, &usage);
    assert!(shown.contains("            team = a: 7\n"), "{shown}");
    assert!(shown.contains("            team = b: 6\n"), "{shown}");
}
