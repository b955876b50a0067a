//! `tally explain`: a customer's lines worked through from their events to their
//! amounts, and what it says about what it cannot find.

use super::*;

/// One line as `tally explain` shows it: (price, amount, currency, line id, quantity,
/// the sum of its usage by day).
type ExplainedLine = (
    String,
    String,
    String,
    String,
    String,
    Option<rust_decimal::Decimal>,
);

/// The lines and the total of an explanation.
fn explained_lines(text: &str) -> (Vec<ExplainedLine>, String) {
    let mut lines: Vec<ExplainedLine> = Vec::new();
    let mut total = String::new();
    let mut in_days = false;
    for row in text.lines() {
        if let Some((head, id)) = row.split_once("   (line ") {
            let (price, amount) = head.split_once(": ").unwrap();
            let (amount, currency) = amount.split_once(' ').unwrap();
            let id = id.trim_end_matches(')').to_owned();
            let (price, amount, currency) =
                (price.to_owned(), amount.to_owned(), currency.to_owned());
            lines.push((price, amount, currency, id, String::new(), None));
        } else if let Some(rest) = row.strip_prefix("  quantity  ") {
            lines.last_mut().unwrap().4 = rest.split_once(':').unwrap().0.to_owned();
        } else if let Some(rest) = row.strip_prefix("total ") {
            total = rest.split(" (").next().unwrap().to_owned();
        }
        let days = row.trim_start().strip_prefix("by day:");
        in_days = days.is_some() || (in_days && row.starts_with("                    "));
        if in_days {
            let days = days.unwrap_or(row);
            let line = lines.last_mut().unwrap();
            for day in days.split(", ") {
                let value: rust_decimal::Decimal = day.rsplit(' ').next().unwrap().parse().unwrap();
                *line.5.get_or_insert_default() += value;
            }
        }
    }
    (lines, total)
}

#[test]
fn explain_shows_each_customers_lines_as_rate_makes_them_with_usage_adding_up() {
    let f = Fixture::generated(12);
    let events = std::fs::read(f.path("events.jsonl")).unwrap();
    let rated = f.rate_bytes(&events, &[]).succeeded().lines();
    let mut customers: Vec<&str> = rated
        .iter()
        .map(|l| l["customer"].as_str().unwrap())
        .collect();
    customers.dedup();
    assert_eq!(customers.len(), 12);
    for customer in customers {
        let run = f.explain(customer, &[]).succeeded();
        let (explained, total) = explained_lines(&run.stdout);
        let expected: Vec<&Value> = rated.iter().filter(|l| l["customer"] == customer).collect();
        assert_eq!(explained.len(), expected.len(), "{}", run.stdout);
        let mut sum = rust_decimal::Decimal::ZERO;
        for (line, rate) in explained.iter().zip(&expected) {
            let field = |name: &str| rate[name].as_str().unwrap().to_owned();
            let (price, amount, currency, id, quantity, by_day) = line;
            assert_eq!(
                (price, amount, currency, id, quantity),
                (
                    &field("price"),
                    &field("amount"),
                    &field("currency"),
                    &field("id"),
                    &field("quantity")
                ),
                "{}",
                run.stdout
            );
            // Count and sum meters: the days add up to the month.
            let quantity: rust_decimal::Decimal = quantity.parse().unwrap();
            assert_eq!(
                by_day.unwrap_or_default(),
                quantity,
                "{price}:\n{}",
                run.stdout
            );
            sum += amount.parse::<rust_decimal::Decimal>().unwrap();
        }
        assert_eq!(total, format!("{sum} {}", explained[0].2), "{}", run.stdout);
    }
}

#[test]
fn output_cut_short_by_its_reader_ends_quietly_with_sigpipes_status() {
    let f = Fixture::new(PRO);
    f.write(
        "events.jsonl",
        (resolutions("r", "cust_acme", 3).join("\n") + "\n").as_bytes(),
    );
    let mut explain = month_args("explain");
    explain.extend(["--customer", "cust_acme"]);
    let validate = vec!["validate", "--config", "tally.toml"];
    for args in [explain, validate] {
        let mut child = f
            .tally()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before anything is written, as `| head` does after its
        // lines.
        drop(child.stdout.take());
        let run = Run::from(child.wait_with_output().unwrap());
        assert_eq!((run.code, run.stderr.as_str()), (141, ""), "{args:?}");
    }
}

#[test]
fn explain_names_the_lines_of_the_conflicting_resends_it_dropped() {
    let f = Fixture::new(&per_event_config("usd", "half_up", "1", ""));
    // Line 1 counts; lines 2 to 13 resend its id with other content.
    let mut lines = calls("c", 1);
    for n in 0..12 {
        let data = json!({ "attempt": n });
        lines.push(event(
            "call-0",
            "api.call",
            "c",
            "2026-11-02T00:00:00Z",
            Some(data),
        ));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    f.write("events.jsonl", text.as_bytes());
    let explained = f.explain("c", &[]).succeeded();
    assert_shows(
        &explained.stdout,
        &["conflicting resends  12 (same (source, id) as a counted event, other content: the first one counts; not counted): line 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 2 more (line 1 counts)\n"],
    );
}

#[test]
fn explain_lists_the_customers_lines_that_failed_validation_and_an_unfinished_month() {
    let f = Fixture::new(PRO);
    let mut lines = resolutions("r", "cust_acme", 1);
    // A number with thousands separators, and a line that is not JSON at all.
    lines.push(tokens("t-1", "cust_acme", "gpt-4o", json!("1,500,000")));
    lines.push(tokens("t-2", "cust_idle", "gpt-4o", json!("1,000")));
    lines.push("{\"subject\": \"cust_acme\", oops".to_owned());
    f.write("events.jsonl", (lines.join("\n") + "\n").as_bytes());
    let explained = f.explain("cust_acme", &[]).succeeded();
    assert_shows(
        &explained.stdout,
        &[
            "rejected             1 (name this customer but fail validation; not counted):\n      line 2: data.tokens: ",
            "`tally rate` lists every line that fails validation in its rejects file (one whose subject cannot be read names no customer)",
        ],
    );
    assert!(!explained.stdout.contains("line 3"), "{}", explained.stdout);
    assert!(
        !explained.stdout.contains("has not ended"),
        "{}",
        explained.stdout
    );

    let mut args = month_args_at("explain", "2026-11-25T00:00:00Z");
    args.extend(["--customer", "cust_acme"]);
    let early = Run::from(f.tally().args(args).output().unwrap()).succeeded();
    assert_shows(
        &early.stdout,
        &["2026-11 has not ended: the lines bill its usage so far, not the month"],
    );
}

#[test]
fn an_unknown_customers_events_name_the_customer_they_likely_meant() {
    let f = Fixture::new(PRO);
    let run = f.rate(&resolutions("r", "cust-acme", 2), &[]).succeeded();
    assert_shows(
        &run.stderr,
        &["unbilled: 2 events for customer \"cust-acme\", who is not in the configuration (did you mean \"cust_acme\"?)"],
    );
}

#[test]
fn usage_without_a_dimension_its_prices_filter_on_is_named_as_missing() {
    let f = Fixture::new(PRO);
    let no_model = event(
        "t-1",
        "llm.tokens",
        "cust_acme",
        "2026-11-03T10:00:00Z",
        Some(json!({"tokens": 1000})),
    );
    let rated = f.rate(std::slice::from_ref(&no_model), &[]).succeeded();
    assert_shows(
        &rated.stderr,
        &["unbilled: 1000 of meter tokens [\"\"] for \"cust_acme\": no price of their plan matches (\"\": its events did not send that dimension, or sent null)"],
    );
    f.write("events.jsonl", format!("{no_model}\n").as_bytes());
    let explained = f.explain("cust_acme", &[]).succeeded();
    assert_shows(
        &explained.stdout,
        &["meter tokens model = (missing: the events have no $.model): 1000"],
    );
}

#[test]
fn explain_names_what_it_cannot_find() {
    let f = Fixture::new(PRO);
    f.write("events.jsonl", b"");
    let unknown = f.explain("cust_nobody", &[]);
    assert_eq!(unknown.code, 1);
    assert_shows(
        &unknown.stderr,
        &["customer \"cust_nobody\" is not among the 2 customers of tally.toml"],
    );
    assert!(
        !unknown.stderr.contains("did you mean"),
        "{}",
        unknown.stderr
    );
    let near = f.explain(" CUST_Acme", &[]);
    assert_shows(
        &near.stderr,
        &["customer \" CUST_Acme\" is not among the 2 customers of tally.toml; did you mean \"cust_acme\"?"],
    );
    for slip in ["cust-acme", "cust_acm", "cust_acne"] {
        let near = f.explain(slip, &[]);
        assert_shows(&near.stderr, &["; did you mean \"cust_acme\"?"]);
    }
    let price = f.explain("cust_acme", &["--price", "tokens"]);
    assert_eq!(price.code, 1);
    assert_shows(
        &price.stderr,
        &["customer \"cust_acme\" has no price \"tokens\" in 2026-11; its prices are those of plan \"pro\": resolutions, gpt-tokens, claude-tokens"],
    );
    // A customer without events: its flat fee, explained.
    let idle = f
        .explain("cust_idle", &["--price", "resolutions"])
        .succeeded();
    assert_shows(
        &idle.stdout,
        &[
            "    counted              0\n",
            "            no usage in the month\n",
            "            tier 1 (up to 100): 0 x 0 + 49 = 49\n",
        ],
    );
    assert!(
        idle.stdout
            .ends_with("total of price resolutions 49.00 usd (49.00)\n"),
        "{}",
        idle.stdout
    );
}

#[test]
fn explain_lists_days_only_for_meters_whose_days_make_the_month() {
    let f = Fixture::new(COMPUTE);
    let active = |id: &str, user: &str| {
        let data = Some(json!({ "user": user }));
        event(id, "app.active", "c", "2026-11-06T00:00:00Z", data)
    };
    let events = [
        gpu("g1", json!(7)),
        gpu("g2", json!(2.5)),
        event(
            "g3",
            "gpu.seconds",
            "c",
            "2026-11-06T10:00:00Z",
            Some(json!({ "seconds": 3 })),
        ),
        active("a1", "alice"),
        active("a2", "bob"),
        event(
            "s1",
            "app.seats",
            "c",
            "2026-11-20T00:00:00Z",
            Some(json!({ "seats": 12 })),
        ),
    ];
    // From stdin, as `tally rate --events -` reads it.
    let mut child = f
        .tally()
        .args(["explain", "--config", "tally.toml", "--events", "-"])
        .args(["--period", "2026-11", "--now", NOW, "--customer", "c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(events.join("\n").as_bytes())
        .unwrap();
    let run = Run::from(child.wait_with_output().unwrap()).succeeded();
    assert_shows(
        &run.stdout,
        &[
        "  events in stdin:\n    counted              6 (app.active 2, app.seats 1, gpu.seconds 3)\n",
        // Sums add up by day; the month's max is its largest day's.
        "seconds: 12.50 usd",
        "  quantity  12.5: meter seconds sums $.seconds of gpu.seconds events\n            by day: Nov 05: 9.5, Nov 06: 3\n",
        "  quantity  7: meter peak takes the largest $.seconds of gpu.seconds events\n            by day: Nov 05: 7, Nov 06: 3\n",
        // Distinct users are not made of days; the latest seat count names its event.
        "  quantity  2: meter users counts the distinct values of $.user of app.active events\n            (a month's unique_count is not made of its days', so none are listed)\n",
        "  quantity  12: meter seats takes $.seats of the latest app.seats event\n            latest: 12, set by the event of 2026-11-20T00:00:00+00:00\n",
        "total 75.50 usd (12.50 + 7.00 + 20.00 + 36.00)\n",
        ],
    );
}

#[test]
fn explain_shows_volume_tiers_amounts_off_and_customers_not_billed() {
    let f = Fixture::new(
        r#"
[[meters]]
slug = "calls"
event_type = "api.call"
aggregation = "count"

[[plans]]
id = "jp"
currency = "jpy"

[[plans.prices]]
id = "calls"
meter = "calls"
billing_scheme = "tiered"
tiers_mode = "volume"
tiers = [
  { up_to = 2, unit_amount = "100" },
  { up_to = "inf", unit_amount = "80", flat_amount = "500" },
]

[[customers]]
id = "c"
plan = "jp"
discounts = [{ price = "calls", amount_off = "50" }]

[[customers]]
id = "gone"
plan = "jp"
through = "2026-10"
"#,
    );
    let mut events = calls("c", 3);
    events.push(event(
        "gone-1",
        "api.call",
        "gone",
        "2026-11-02T00:00:00Z",
        None,
    ));
    f.rate(&events, &[]).succeeded();
    let c = f.explain("c", &[]).succeeded().stdout;
    assert_shows(
        &c,
        &[
        "  plan jp, jpy; each line of the month rounded half_up to 0 decimals\n",
        // All three calls at the tier the total falls in, plus its flat fee.
        "  charge    volume: every unit at the price of the tier the whole quantity falls in, plus that tier's flat fee\n            tier 2 (up to inf): 3 x 80 + 500 = 740\n",
        "  subtotal  740 rounded half_up to 0 decimals = 740\n",
        "  discount  50 off, at most the subtotal = 50\n",
        "  amount    740 - 50 = 690 jpy\n",
        "total 690 jpy (690)\n",
        ],
    );
    let gone = f.explain("gone", &[]).succeeded().stdout;
    assert_shows(
        &gone,
        &[
            "  not billed in 2026-11",
            "  no lines\n",
            "usage of the month, unbilled:\n  meter calls: 1\n",
        ],
    );
    assert!(!gone.contains("total"), "{gone}");
}

#[test]
fn a_flat_fee_bills_one_in_each_billed_month_with_its_discount_and_is_explained() {
    let flat = r#"
[[plans.prices]]
id = "platform"
billing_scheme = "flat"
unit_amount = "500"
description = "Platform fee, monthly"

[[customers]]
id = "cust_acme"
name = "Acme Inc""#;
    let f = Fixture::new(
        &PRO.replacen("\n[[customers]]\nid = \"cust_acme\"", flat, 1)
            .replace(
                "discounts = [{ price = \"resolutions\", percent_off = \"12.5\" }]",
                "discounts = [{ price = \"platform\", amount_off = \"50\" }]",
            ),
    );
    let run = f.rate(&[], &[]).succeeded();
    let lines = run.lines();
    // No usage at all: the fee all the same, less its coupon.
    assert_eq!(
        money(line(&lines, "cust_acme", "platform")),
        ["1", "500.00", "50.00", "450.00"]
    );
    assert_eq!(line(&lines, "cust_acme", "platform")["meter"], "");
    let shown = f.explain("cust_acme", &["--price", "platform"]).succeeded();
    assert_shows(
        &shown.stdout,
        &[
            // The customer's name and the price's description, for people.
            "cust_acme (Acme Inc), 2026-11 (",
            "platform (Platform fee, monthly): 450.00 usd   (line ",
            "  quantity  1: a flat fee, one in each month the customer is billed, whatever its usage\n",
            "  charge    flat fee\n            1 x 500 = 500\n",
            "  discount  50 off, at most the subtotal = 50.00\n",
            "  amount    500.00 - 50.00 = 450.00 usd\n",
        ],
    );
}

#[test]
fn explain_lists_the_events_each_line_counts_when_asked() {
    let f = Fixture::new(PRO);
    let events = vec![
        tokens("t1", "cust_acme", "gpt-x", json!(1200)),
        tokens("c1", "cust_acme", "claude-y", json!(700)),
        // A retry: counted once, under the line it first came on.
        tokens("t1", "cust_acme", "gpt-x", json!(1200)),
        tokens("t2", "cust_acme", "gpt-x", json!("300")),
        tokens("o1", "cust_idle", "gpt-x", json!(5)),
        // Another sender's event of the same id: another event, counted too, and
        // listed under its source so the two do not read as one billed twice.
        tokens("t1", "cust_acme", "gpt-x", json!(50))
            .replace(r#""source":"test""#, r#""source":"eu""#),
    ];
    f.rate(&events, &[]).succeeded();
    let listed = f
        .explain("cust_acme", &["--price", "gpt-tokens", "--list-events"])
        .succeeded();
    assert_shows(
        &listed.stdout,
        &["            events counted (3):\n              line 1  source test  id t1  2026-11-10T08:00:00Z  1200  (model = gpt-x)\n              line 4  source test  id t2  2026-11-10T08:00:00Z  300  (model = gpt-x)\n              line 6  source eu  id t1  2026-11-10T08:00:00Z  50  (model = gpt-x)\n"],
    );
    // Without the flag, no list.
    let plain = f
        .explain("cust_acme", &["--price", "gpt-tokens"])
        .succeeded();
    assert!(!plain.stdout.contains("events counted"), "{}", plain.stdout);
}

#[test]
fn explain_marks_a_distinct_value_listed_again_as_not_counted_again() {
    let f = Fixture::new(COMPUTE);
    let active = |id: &str, user: &str| {
        event(
            id,
            "app.active",
            "c",
            "2026-11-06T00:00:00Z",
            Some(json!({ "user": user })),
        )
    };
    let events = vec![
        active("a1", "alice"),
        active("a2", "alice"),
        active("a3", "bob"),
    ];
    f.rate(&events, &[]).succeeded();
    let listed = f
        .explain("c", &["--price", "users", "--list-events"])
        .succeeded();
    // Three events, two users: alice's second event adds nothing.
    assert_shows(
        &listed.stdout,
        &[
            "  quantity  2: ",
            "            events counted (3):\n              line 1  source test  id a1  2026-11-06T00:00:00Z  a new distinct value\n              line 2  source test  id a2  2026-11-06T00:00:00Z  line 1's value again, not counted again\n              line 3  source test  id a3  2026-11-06T00:00:00Z  a new distinct value\n",
        ],
    );
}

#[test]
fn explain_splits_a_customers_usage_into_utc_days() {
    let f = Fixture::new(&per_event_config(
        "usd",
        "half_up",
        "0.50",
        r#"discounts = [{ price = "calls", amount_off = "0.25" }]"#,
    ));
    let events = [
        event("a", "api.call", "c", "2026-11-02T23:59:59Z", None),
        // 23:30 UTC, written in another offset.
        event("b", "api.call", "c", "2026-11-03T00:30:00+01:00", None),
        event("c", "api.call", "c", "2026-11-03T00:00:00Z", None),
    ];
    f.rate(&events, &[]).succeeded();
    let shown = f.explain("c", &[]).succeeded().stdout;
    assert_shows(
        &shown,
        &[
            "            by day: Nov 02: 2, Nov 03: 1\n",
            "  subtotal  1.5 rounded half_up to 2 decimals = 1.50\n",
            "  discount  0.25 off, at most the subtotal = 0.25\n",
            "  amount    1.50 - 0.25 = 1.25 usd\n",
        ],
    );
}

#[test]
fn explain_pipeline_names_the_clickhouse_it_cannot_reach() {
    let config = per_event_config("usd", "half_up", "0.50", "")
        + "\n[clickhouse]\nurl = \"http://127.0.0.1:9\"\ndatabase = \"tally\"\n";
    let f = Fixture::new(&config);
    let run: Run = (f.tally())
        .args([
            "explain",
            "--pipeline",
            "--period",
            "2026-11",
            "--customer",
            "c",
        ])
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_shows(
        &run.stderr,
        &[
            "error: cannot reach ClickHouse at http://127.0.0.1:9",
            "is it running?",
        ],
    );
}
