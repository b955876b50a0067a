//! `tally reconcile` on files: Tally's own formats and another biller's exports, id
//! maps, cohorts, and refusals to call nothing compared an agreement.

use super::*;

/// `tally reconcile` for November.
fn reconcile(f: &Fixture, sources: &[&str]) -> Run {
    let mut args = vec!["reconcile", "--period", "2026-11"];
    args.extend(sources);
    f.tally().args(args).output().unwrap().into()
}

/// `tally reconcile` of `expected` and `actual` writing `--differences`: the run, and
/// the differences file.
fn reconcile_differences(f: &Fixture, expected: &str, actual: &str) -> (Run, String) {
    let run = reconcile(f, &[expected, actual, "--differences", "differences.csv"]);
    (run, f.read("differences.csv"))
}

#[test]
fn reconcile_agrees_on_tally_rates_own_formats_and_lists_what_another_biller_bills_differently() {
    let f = Fixture::generated(9);
    // A customer without usage: its lines are zero, which the old biller leaves out.
    let config =
        f.read("tally.toml") + "\n[[customers]]\nid = \"cust_quiet\"\nplan = \"starter\"\n";
    f.write("tally.toml", config.as_bytes());
    let events = std::fs::read(f.path("events.jsonl")).unwrap();
    let rated = f.rate_bytes(&events, &[]);
    f.write("tally.jsonl", rated.succeeded().stdout.as_bytes());
    let csv = f.rate_bytes(&events, &["--format", "csv", "--output", "tally.csv"]);
    csv.succeeded();
    let lines: Vec<Value> = (f.read("tally.jsonl").lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let same = reconcile(&f, &["tally.jsonl", "tally.csv"]).succeeded();
    assert_shows(
        &same.stdout,
        &[
            &format!("  expected tally.jsonl: {} lines", lines.len()),
            &format!("  actual   tally.csv: {} lines", lines.len()),
            &format!("Agree: {} lines. Differ: 0 lines.", lines.len()),
            "The two agree on every line.",
        ],
    );

    // The old biller's export of the same month: its own column order, upper-case
    // currencies, amounts to four places, no zero lines; it billed one line a cent
    // more, missed one and billed a customer Tally does not know.
    let text = |line: &Value, field: &str| line[field].as_str().unwrap().to_owned();
    let zero = |line: &&Value| {
        let figure = |field| text(line, field).parse::<rust_decimal::Decimal>().unwrap();
        figure("quantity").is_zero() && figure("amount").is_zero()
    };
    let billed: Vec<&Value> = lines.iter().filter(|l| !zero(l)).collect();
    assert_eq!(
        lines.len() - billed.len(),
        4,
        "cust_quiet's four starter lines"
    );
    let (more, missed) = (billed[1], billed[3]);
    let mut export = String::from("currency,customer,price,amount,quantity,period_start\n");
    for line in &billed {
        let mut amount: rust_decimal::Decimal = text(line, "amount").parse().unwrap();
        if std::ptr::eq(*line, more) {
            amount += rust_decimal::Decimal::new(1, 2);
        }
        if std::ptr::eq(*line, missed) {
            continue;
        }
        amount.rescale(4);
        let currency = text(line, "currency").to_uppercase();
        let (customer, price, quantity) = (
            text(line, "customer"),
            text(line, "price"),
            text(line, "quantity"),
        );
        export.push_str(&format!(
            "{currency},{customer},{price},{amount},{quantity},2026-11\n"
        ));
    }
    export.push_str("USD,cust_unknown,resolutions,10.0000,10,2026-11\n");
    export.push_str("USD,cust_unknown,resolutions,99.0000,99,2026-10\n");
    f.write("old-biller.csv", export.as_bytes());

    let (run, differences) = reconcile_differences(&f, "old-biller.csv", "tally.jsonl");
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let agreeing = lines.len() - 2;
    let zero_lines = lines.len() - billed.len();
    assert_shows(
        &run.stdout,
        &[
            &format!("  expected old-biller.csv: {} lines; 1 line of other months left out", billed.len()),
            &format!("Agree: {agreeing} lines ({zero_lines} of them zero lines only one source has). Differ: 3 lines."),
            "They differ in 3 lines.",
        ],
    );
    let rows: Vec<Vec<&str>> = differences
        .lines()
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows[0].join(","), "customer,price,adjusts_period,what,expected_quantity,actual_quantity,expected_amount,expected_currency,actual_amount,actual_currency,amount_difference,expected_at,actual_at");
    let row_of = |line: &Value| {
        (rows.iter())
            .find(|r| r[0] == text(line, "customer") && r[1] == text(line, "price"))
            .unwrap_or_else(|| panic!("no row for {line}:\n{differences}"))
    };
    let more_row = row_of(more);
    assert_eq!(
        (more_row[3], more_row[9], more_row[10]),
        ("amount", text(more, "currency").as_str(), "-0.0100")
    );
    assert_eq!(more_row[8], text(more, "amount"));
    let missed_row = row_of(missed);
    assert_eq!(
        (missed_row[3], missed_row[10]),
        ("only_actual", text(missed, "amount").as_str())
    );
    assert_eq!(missed_row[11], "");
    let unknown = rows.iter().find(|r| r[0] == "cust_unknown").unwrap();
    assert_eq!(
        (unknown[3], unknown[6], unknown[7], unknown[10], unknown[11]),
        (
            "only_expected",
            "10.0000",
            "usd",
            "-10.0000",
            // The header, the billed lines but the missed one, then this.
            format!("old-biller.csv line {}", billed.len() + 1).as_str()
        )
    );
    assert_eq!(rows.len(), 4, "{differences}");

    // Trouble is 2, never mistaken for a difference.
    let missing = reconcile(&f, &["old-biller.csv", "nowhere.jsonl"]);
    assert_eq!(missing.code, 2);
    assert_shows(&missing.stderr, &["error: cannot read nowhere.jsonl"]);
}

#[test]
fn reconcile_maps_another_billers_ids_and_compares_only_the_cohort_it_still_bills() {
    let f = Fixture::generated(9);
    let events = std::fs::read(f.path("events.jsonl")).unwrap();
    f.write(
        "tally.jsonl",
        f.rate_bytes(&events, &[]).succeeded().stdout.as_bytes(),
    );
    let lines: Vec<Value> = (f.read("tally.jsonl").lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text = |line: &Value, field: &str| line[field].as_str().unwrap().to_owned();
    let mut customers: Vec<String> = lines.iter().map(|l| text(l, "customer")).collect();
    customers.sort();
    customers.dedup();
    let cohort = &customers[..3];
    assert!(
        customers.len() > cohort.len(),
        "customers outside the cohort"
    );

    // The old biller knows the cohort by its own account numbers and prices by product
    // names, and bills each price's usage as two lines: the first unit, and the rest.
    let mut map = String::from("kind,from,to\n");
    let mut prices: Vec<String> = lines.iter().map(|l| text(l, "price")).collect();
    prices.sort();
    prices.dedup();
    for price in &prices {
        map.push_str(&format!(
            "price,{price} (first unit),{price}\nprice,{price} (rest),{price}\n"
        ));
    }
    let mut export = String::from("customer,price,quantity,amount,currency\n");
    let mut compared = 0;
    for (n, customer) in cohort.iter().enumerate() {
        map.push_str(&format!("customer,ACCT-{n},{customer}\n"));
        for line in lines.iter().filter(|l| text(l, "customer") == *customer) {
            let figure = |field| text(line, field).parse::<rust_decimal::Decimal>().unwrap();
            let (quantity, amount) = (figure("quantity"), figure("amount"));
            let (first_amount, first_quantity) = (
                amount / rust_decimal::Decimal::from(3),
                quantity.min(1.into()),
            );
            let (price, currency) = (text(line, "price"), text(line, "currency"));
            export.push_str(&format!(
                "ACCT-{n},{price} (first unit),{first_quantity},{first_amount},{currency}\n"
            ));
            export.push_str(&format!(
                "ACCT-{n},{price} (rest),{},{},{currency}\n",
                quantity - first_quantity,
                amount - first_amount
            ));
            compared += 1;
        }
    }
    f.write("old-biller.csv", export.as_bytes());
    f.write("map.csv", map.as_bytes());

    let agreed = reconcile(
        &f,
        &[
            "old-biller.csv",
            "tally.jsonl",
            "--map",
            "map.csv",
            "--customers",
            "expected",
        ],
    )
    .succeeded();
    assert_shows(
        &agreed.stdout,
        &[
            &format!(
                "  expected old-biller.csv: {compared} lines; {} lines renamed by the map, {compared} of them added to another line",
                2 * compared
            ),
            &format!(
                "  actual   tally.jsonl: {compared} lines; {} lines of {} customers not compared (--customers) left out",
                lines.len() - compared,
                customers.len() - cohort.len()
            ),
            "The two agree on every line.",
        ],
    );
    // Every customer compared: Tally's lines of the others are only Tally's.
    let everyone = reconcile(&f, &["old-biller.csv", "tally.jsonl", "--map", "map.csv"]);
    assert_eq!(everyone.code, 1, "{}", everyone.stdout);
    assert_shows(&everyone.stdout, &["only actual"]);
    // Without the map no line of the old biller's matches one of Tally's.
    let unmapped = reconcile(&f, &["old-biller.csv", "tally.jsonl"]);
    assert_eq!(unmapped.code, 1, "{}{}", unmapped.stdout, unmapped.stderr);
    let no_map = reconcile(
        &f,
        &["old-biller.csv", "tally.jsonl", "--map", "nowhere.csv"],
    );
    assert_eq!(no_map.code, 2);
    assert_shows(&no_map.stderr, &["error: cannot read the map nowhere.csv"]);
}

#[test]
fn reconcile_maps_only_the_other_billers_ids_and_never_calls_nothing_compared_agreement() {
    let f = Fixture::new("");
    // The old biller's customer "b" is Tally's "a"; Tally also has a customer "b".
    f.write(
        "old.txt",
        b"\xef\xbb\xbfcustomer,price,quantity,amount,currency\nb,fee,1,10.00,USD\n",
    );
    f.write(
        "tally.jsonl",
        concat!(
            r#"{"customer":"a","price":"fee","quantity":"1","amount":"10.00","currency":"usd","period_start":"2026-11-01T00:00:00Z"}"#,
            "\n",
            r#"{"customer":"b","price":"fee","quantity":"1","amount":"5.00","currency":"usd","period_start":"2026-11-01T00:00:00Z"}"#,
            "\n",
        )
        .as_bytes(),
    );
    f.write("map.csv", b"kind,from,to\ncustomer,b,a\n");
    let cohort = reconcile(
        &f,
        &[
            "old.txt",
            "tally.jsonl",
            "--map",
            "map.csv",
            "--customers",
            "expected",
        ],
    )
    .succeeded();
    assert_shows(
        &cohort.stdout,
        &[
            "  expected old.txt: 1 line; 1 line renamed by the map",
            "  actual   tally.jsonl: 1 line; 1 line of 1 customer not compared (--customers) left out: b",
            "The two agree on every line.",
        ],
    );
    // The same with the sources the other way round.
    let swapped = reconcile(
        &f,
        &[
            "tally.jsonl",
            "old.txt",
            "--map",
            "map.csv",
            "--map-applies-to",
            "actual",
            "--customers",
            "actual",
        ],
    );
    swapped.succeeded();

    // A month neither source has, or no customer in common, is an error, not agreement.
    let december = Run::from(
        f.tally()
            .args(["reconcile", "--period", "2026-12", "tally.jsonl", "old.txt"])
            .output()
            .unwrap(),
    );
    assert_eq!(december.code, 2);
    assert_shows(
        &december.stderr,
        &["error: tally.jsonl has no line of 2026-12 (only 2 lines of other months): is --period right?"],
    );
    let unmapped = reconcile(&f, &["old.txt", "tally.jsonl", "--customers", "both"]);
    assert_eq!(unmapped.code, 1, "b's lines differ: {}", unmapped.stdout);
    f.write(
        "renumbered.csv",
        b"customer,price,quantity,amount,currency\nACCT-1,fee,1,10.00,usd\n",
    );
    let nothing_in_common = reconcile(
        &f,
        &["renumbered.csv", "tally.jsonl", "--customers", "both"],
    );
    assert_eq!(nothing_in_common.code, 2, "{}", nothing_in_common.stdout);
    assert_shows(
        &nothing_in_common.stderr,
        &["error: no customer has lines in both sources, so nothing would be compared"],
    );
}

#[test]
fn reconcile_reads_another_billers_headers_by_column_and_refuses_one_no_file_has() {
    let f = Fixture::new("");
    f.write(
        "old.csv",
        b"Account,Price,Qty,Net Amount,Currency,Billing Month\nacme,fee,1,10.00,USD,2026-11\n",
    );
    f.write(
        "tally.csv",
        b"customer,price,quantity,amount,currency\nacme,fee,1,10.00,usd\n",
    );
    let named = [
        "--column",
        "customer=Account",
        "--column",
        "quantity=qty",
        "--column",
        "amount=Net Amount",
        "--column",
        "period_start=billing month",
    ];
    let mut args = vec!["old.csv", "tally.csv"];
    args.extend(named);
    let read = reconcile(&f, &args).succeeded();
    assert_shows(&read.stdout, &["The two agree on every line."]);

    // A mistyped header would leave the month unread, or the amount read from another
    // column of that name: refused, naming each file's headers.
    // A required column's header misspelt: the file lacks that column, and the
    // mapping is named.
    let mut args = vec!["old.csv", "tally.csv"];
    args.extend(&named[2..]);
    args.extend(["--column", "customer=Acount"]);
    let refused = reconcile(&f, &args);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert_shows(
        &refused.stderr,
        &["old.csv: the header row has no column customer; --column customer=acount names no header of it; it needs customer, price, quantity, amount, currency (other columns are ignored), and has account, price, qty, net amount, currency, billing month"],
    );
    // The month alone misspelt would go unread without a word: its months are all
    // November here.
    for (slip, column) in [
        ("amount=Net Amunt", "amount=net amunt"),
        ("period_start=Billing_Month", "period_start=billing_month"),
    ] {
        let mut args = vec!["old.csv", "tally.csv"];
        args.extend(&named[..6]);
        args.extend(["--column", slip]);
        let refused = reconcile(&f, &args);
        assert_eq!(refused.code, 2, "{}", refused.stderr);
        assert_shows(
            &refused.stderr,
            &[&format!("--column {column}: no CSV source has a column \"{}\" (old.csv has account, price, qty, net amount, currency, billing month; tally.csv has customer, price, quantity, amount, currency); check the header's spelling", column.split_once('=').unwrap().1)],
        );
    }
}

#[test]
fn an_old_billers_ids_a_spreadsheet_would_run_are_written_as_text_in_the_differences() {
    let f = Fixture::generated(9);
    f.write(
        "old-biller.csv",
        b"currency,customer,price,amount,quantity,period_start\n\
          USD,\"=HYPERLINK(\"\"http://x/\"\",\"\"y\"\")\",-2+3,10.0000,10,2026-11\n",
    );
    f.write("tally.jsonl", b"");
    let (run, differences) = reconcile_differences(&f, "old-biller.csv", "tally.jsonl");
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let row = differences.lines().nth(1).unwrap_or_default();
    // Each id starts with ', which spreadsheets show as text; the figures stay numbers.
    assert!(
        row.starts_with("\"'=HYPERLINK(\"\"http://x/\"\",\"\"y\"\")\",'-2+3,,only_expected,10,,10.0000,usd,,,-10.0000,"),
        "{differences}"
    );
}
