//! Unit tests of `tally reconcile`: files read, lines matched and the report written,
//! from the text of both sources to the report's text.

use std::collections::BTreeMap;
use std::str::FromStr;

use rust_decimal::Decimal;

use super::files::*;
use super::lines::*;
use super::map::*;
use super::report::*;
use super::*;

fn november() -> Period {
    Period::from_str("2026-11").unwrap()
}

fn json(text: &str) -> Lines {
    lines_of_text(
        "a.jsonl",
        text,
        FileFormat::JsonLines,
        november(),
        &ColumnNames::default(),
    )
    .unwrap()
}

fn csv(text: &str) -> Lines {
    lines_of_text(
        "b.csv",
        text,
        FileFormat::Csv,
        november(),
        &ColumnNames::default(),
    )
    .unwrap()
}

fn error(name: &str, text: &str, format: FileFormat) -> String {
    let error = lines_of_text(name, text, format, november(), &ColumnNames::default()).unwrap_err();
    format!("{error:#}")
}

fn report(expected: &Lines, actual: &Lines) -> String {
    let mut out = Vec::new();
    (Reconciliation::of(expected, actual, Compared::QuantitiesAndAmounts).unwrap())
        .write_report(&mut out, november(), expected, actual)
        .unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn a_zero_difference_is_never_written_negative() {
    let d = |text: &str| Decimal::from_str(text).unwrap();
    let shown =
        |actual: &str, expected: &str| difference(d(actual), d(expected)).unwrap().to_string();
    assert_eq!(shown("0.00", "0.00"), "0.00");
    assert_eq!(shown("0.00", "-0.00"), "0.00");
    assert_eq!(shown("-0.00", "0.00"), "0.00");
    assert_eq!(shown("1.50", "2.00"), "-0.50");
    // Two lines of 0.00 that differ in quantity only.
    let expected = json(
        r#"{"customer":"a","price":"tokens","quantity":"5","subtotal":"0.00","discount":"0.00","amount":"0.00","currency":"usd"}"#,
    );
    let actual = json(
        r#"{"customer":"a","price":"tokens","quantity":"7","subtotal":"0.00","discount":"0.00","amount":"0.00","currency":"usd"}"#,
    );
    let text = report(&expected, &actual);
    assert!(!text.contains("-0.00"), "{text}");
}

#[test]
fn amounts_only_leaves_quantities_that_count_something_else_alone() {
    // The other biller bills the platform fee as quantity 1 and leaves out a
    // line of no amount whose quantity Tally counts.
    let other = json(concat!(
        r#"{"customer":"a","price":"resolutions","quantity":"1","amount":"49.00","currency":"usd"}"#,
        "\n",
        r#"{"customer":"b","price":"resolutions","quantity":"1","amount":"49.00","currency":"usd"}"#,
    ));
    let tally = json(concat!(
        r#"{"customer":"a","price":"resolutions","quantity":"13","amount":"49.00","currency":"usd"}"#,
        "\n",
        r#"{"customer":"b","price":"resolutions","quantity":"70","amount":"61.50","currency":"usd"}"#,
        "\n",
        r#"{"customer":"b","price":"tokens","quantity":"900","amount":"0.00","currency":"usd"}"#,
    ));
    let all = Reconciliation::of(&other, &tally, Compared::QuantitiesAndAmounts).unwrap();
    let what: Vec<&str> = all.differences.iter().map(Difference::what).collect();
    // b's amount differs as well: a filter on amounts must not miss it.
    assert_eq!(what, ["quantity", "quantity and amount", "only actual"]);
    let amounts = Reconciliation::of(&other, &tally, Compared::Amounts).unwrap();
    let what: Vec<(&str, &str)> = (amounts.differences.iter())
        .map(|d| (d.key.customer.as_str(), d.what()))
        .collect();
    assert_eq!(what, [("b", "amount")]);
    assert_eq!((amounts.agreed, amounts.zero_on_one_side), (1, 1));
    let mut out = Vec::new();
    amounts
        .write_report(&mut out, november(), &other, &tally)
        .unwrap();
    let shown = String::from_utf8(out).unwrap();
    assert!(
        shown.contains("compared: amounts and currencies (--amounts-only)"),
        "{shown}"
    );
}

#[test]
fn figures_agree_by_value_whatever_their_form_and_zero_lines_one_side_leaves_out_agree() {
    let expected = json(concat!(
        r#"{"customer":"acme","price":"tokens","quantity":"1200","amount":"12.50","currency":"usd","tiers":[]}"#,
        "\n\n",
        r#"{"customer":"acme","price":"seats","quantity":0,"amount":"0","currency":"usd"}"#,
        "\n",
        r#"{"customer":"acme","price":"tokens","quantity":"7","amount":1.5,"currency":"usd","adjusts_period":"2026-10"}"#,
        "\n",
    ));
    let actual = csv(concat!(
        "amount,currency,customer,price,quantity,note,adjusts_period\n",
        "12.5,USD,acme,tokens,1200.000,\"from the old biller, rounded\",\n",
        "1.50,usd,acme,tokens,7,,2026-10\n",
    ));
    let reconciliation =
        Reconciliation::of(&expected, &actual, Compared::QuantitiesAndAmounts).unwrap();
    assert!(reconciliation.agrees());
    assert_eq!(
        (reconciliation.agreed, reconciliation.zero_on_one_side),
        (2, 1)
    );
    let shown = report(&expected, &actual);
    assert!(
        shown.contains(
            "Agree: 3 lines (1 of them zero lines only one source has). Differ: 0 lines."
        ),
        "{shown}"
    );
    assert!(
        shown.contains("usd  expected 14.00  actual 14.00  difference 0.00"),
        "{shown}"
    );
    assert!(shown.ends_with("The two agree on every line.\n"), "{shown}");
}

#[test]
fn each_kind_of_difference_is_listed_once_with_both_sides_and_the_amount_it_moves() {
    let line = |customer: &str, quantity: &str, amount: &str, currency: &str| {
        format!(
            r#"{{"customer":"{customer}","price":"tokens","quantity":"{quantity}","amount":"{amount}","currency":"{currency}"}}"#
        )
    };
    let expected = json(
        &[
            line("a_same", "1", "1.00", "usd"),
            line("b_amount", "10", "2.00", "usd"),
            line("c_quantity", "10", "2.00", "usd"),
            line("d_currency", "10", "200", "jpy"),
            line("e_gone", "5", "3.10", "usd"),
        ]
        .join("\n"),
    );
    let actual = json(
        &[
            line("a_same", "1", "1", "usd"),
            line("b_amount", "10", "2.01", "usd"),
            line("c_quantity", "11", "2.00", "usd"),
            line("d_currency", "10", "200", "eur"),
            line("f_new", "0", "4", "usd"),
        ]
        .join("\n"),
    );
    let reconciliation =
        Reconciliation::of(&expected, &actual, Compared::QuantitiesAndAmounts).unwrap();
    assert!(!reconciliation.agrees());
    let rows: Vec<[String; 13]> = (reconciliation.differences.iter())
        .map(Difference::csv_row)
        .collect();
    let expected_rows = [
        [
            "b_amount", "amount", "10", "10", "2.00", "usd", "2.01", "usd", "0.01",
        ],
        [
            "c_quantity",
            "quantity",
            "10",
            "11",
            "2.00",
            "usd",
            "2.00",
            "usd",
            "0.00",
        ],
        [
            "d_currency",
            "currency",
            "10",
            "10",
            "200",
            "jpy",
            "200",
            "eur",
            "",
        ],
        [
            "e_gone",
            "only_expected",
            "5",
            "",
            "3.10",
            "usd",
            "",
            "",
            "-3.10",
        ],
        ["f_new", "only_actual", "", "0", "", "", "4", "usd", "4"],
    ];
    assert_eq!(rows.len(), expected_rows.len());
    for (row, wanted) in rows.iter().zip(expected_rows) {
        let shown: Vec<&str> = [0, 3, 4, 5, 6, 7, 8, 9, 10]
            .iter()
            .map(|&i| row[i].as_str())
            .collect();
        assert_eq!(shown, wanted);
    }
    assert_eq!(rows[0][11], "a.jsonl line 2");
    assert_eq!(rows[4][12], "a.jsonl line 5");
    assert_eq!(
        reconciliation.totals,
        BTreeMap::from([
            ("eur", (Decimal::ZERO, Decimal::from(200))),
            ("jpy", (Decimal::from(200), Decimal::ZERO)),
            ("usd", (Decimal::new(810, 2), Decimal::new(901, 2))),
        ])
    );
    let shown = report(&expected, &actual);
    assert!(shown.contains("Agree: 1 line. Differ: 5 lines."), "{shown}");
    // c_quantity's line differs, its invoice does not; d_currency has two.
    assert!(
        shown.contains("Invoices (a customer's lines in one currency): 2 agree, 5 differ.\n"),
        "{shown}"
    );
    assert!(
        shown.contains("  d_currency  eur       0         200     200\n  d_currency  jpy       200       0       -200\n"),
        "{shown}"
    );
    assert!(
        shown.contains("  e_gone      tokens  only expected  5                  -                3.10 usd         -              -3.10 usd"),
        "{shown}"
    );
    assert!(shown.ends_with("They differ in 5 lines.\n"), "{shown}");
}

#[test]
fn an_adjustment_is_its_own_line_and_the_table_names_the_month_it_adjusts() {
    let expected = json(concat!(
        r#"{"customer":"acme","price":"tokens","quantity":"10","amount":"1.00","currency":"usd"}"#,
        "\n",
        r#"{"customer":"acme","price":"tokens","quantity":"2","amount":"0.20","currency":"usd","adjusts_period":"2026-10"}"#,
    ));
    let actual = json(
        r#"{"customer":"acme","price":"tokens","quantity":"10","amount":"1.00","currency":"usd","adjusts_period":null}"#,
    );
    let shown = report(&expected, &actual);
    assert!(
        shown.contains(concat!(
            "  customer  price   adjusts  what           expected quantity  actual quantity  expected amount  actual amount  amount difference\n",
            "  acme      tokens  2026-10  only expected  2                  -                0.20 usd         -              -0.20 usd\n",
        )),
        "{shown}"
    );
}

#[test]
fn adjustments_left_out_on_both_sides_are_counted_and_the_months_own_lines_compared() {
    let mut pipeline = json(concat!(
        r#"{"customer":"acme","price":"tokens","quantity":"10","amount":"1.00","currency":"usd"}"#,
        "\n",
        r#"{"customer":"acme","price":"tokens","quantity":"2","amount":"0.20","currency":"usd","adjusts_period":"2026-10"}"#,
    ));
    let mut batch = json(
        r#"{"customer":"acme","price":"tokens","quantity":"10","amount":"1.00","currency":"usd"}"#,
    );
    pipeline.leave_out_adjustments();
    batch.leave_out_adjustments();
    let shown = report(&batch, &pipeline);
    assert!(shown.contains("Agree: 1 line. Differ: 0 lines."), "{shown}");
    assert!(
        shown.contains("a.jsonl: 1 line; 1 adjustment line of earlier months left out"),
        "{shown}"
    );
}

#[test]
fn json_numbers_are_read_digit_for_digit() {
    let lines = json(
        r#"{"customer":"acme","price":"tokens","quantity":12345678901234567.891,"amount":0.1000000000000000000000000001,"currency":"usd"}"#,
    );
    let figures = lines.by_key.values().next().unwrap();
    assert_eq!(figures.quantity.to_string(), "12345678901234567.891");
    assert_eq!(figures.amount.to_string(), "0.1000000000000000000000000001");
}

#[test]
fn lines_of_other_months_are_left_out_and_counted_and_adjustments_kept_apart() {
    let lines = csv(concat!(
        "customer,price,quantity,amount,currency,period_start,adjusts_period\n",
        "acme,tokens,1,1,usd,2026-11-01T00:00:00Z,\n",
        "acme,tokens,2,2,usd,2026-11-01 00:00:00,2026-10\n",
        "acme,seats,3,3,usd,2026-11,\n",
        "acme,tokens,4,4,usd,2026-10-01T00:00:00Z,\n",
        "acme,tokens,5,5,usd,2026-12-01 00:00:00,\n",
        "acme,,6,6,usd,TOTAL,\n",
        "Total :,,21,21,usd,,\n",
    ));
    assert_eq!(lines.other_periods, 2);
    assert_eq!(lines.unnamed_rows, 2);
    let keys: Vec<(&str, Option<String>)> = (lines.by_key.keys())
        .map(|k| (k.price.as_str(), k.adjusts.map(|p| p.to_string())))
        .collect();
    assert_eq!(
        keys,
        [
            ("seats", None),
            ("tokens", None),
            ("tokens", Some("2026-10".to_owned()))
        ]
    );
}

#[test]
fn column_names_read_another_billers_headers_as_tallys() {
    let named = ColumnNames(vec![
        column_name("customer=Account").unwrap(),
        column_name("amount= Net Amount ").unwrap(),
        column_name("quantity=qty").unwrap(),
    ]);
    let export = "Account,Price,Qty,Net Amount,Currency\nacme,tokens,3,4.50,usd\n";
    let read = lines_of_text("old.csv", export, FileFormat::Csv, november(), &named).unwrap();
    let (key, figures) = read.by_key.iter().next().unwrap();
    assert_eq!(
        (
            key.customer.as_str(),
            figures.quantity.to_string(),
            figures.amount.to_string()
        ),
        ("acme", "3".to_owned(), "4.50".to_owned())
    );
    assert!(column_name("total=Sum")
        .unwrap_err()
        .contains("not a column Tally reads"));
    assert!(column_name("amount").unwrap_err().contains("NAME=HEADER"));
}

#[test]
fn what_a_file_holds_besides_lines_is_left_out_and_named_in_the_report() {
    let export = csv(concat!(
        "customer,price,quantity,amount,currency,period,notes,period_end\n",
        "acme,tokens,1,1.00,SEK,Nov,,\n",
        ",,,12.00,,,total,\n",
        "Total,,,13.00,SEK,,,\n",
        " grand TOTAL ,,,13.00,SEK,,,\n",
    ));
    assert_eq!(export.unnamed_rows, 3);
    let tallys = json(
        r#"{"customer":"acme","price":"tokens","quantity":"1","amount":"1.00","currency":"sek"}"#,
    );
    let shown = report(&export, &tallys);
    assert!(
        shown.contains("  expected b.csv: 1 line; 3 rows naming no price and no customer, or Total in its place (totals) left out; columns not read: period (if it is the month, give --column period_start=period), notes, period_end (if it is the month, give --column period_start=period_end)\n"),
        "{shown}"
    );
    // Even a column of Tally's own CSV, when it is the only month there is.
    let by_end = csv(
        "customer,price,quantity,amount,currency,period_end\nacme,tokens,1,1.00,sek,2026-12-01\n",
    );
    assert_eq!(
        by_end.ignored_columns,
        ["period_end (if it is the month, give --column period_start=period_end)"]
    );
    // A column like a month with other months in it is refused: their lines
    // would be compared as this one's. So is one of another month only.
    let months = "customer,price,quantity,amount,currency,billing_month\nacme,tokens,1,1.00,usd,2026-11\nacme,tokens,2,2.00,usd,2026-10\n";
    let refused = error("old.csv", months, FileFormat::Csv);
    assert!(
        refused.contains(
            "its column billing_month gives each line a month, some of them not 2026-11 (2026-10)"
        ) && refused.contains("--column period_start=billing_month"),
        "{refused}"
    );
    let october = "customer,price,quantity,amount,currency,billing_month\nacme,tokens,2,2.00,usd,2026-10-01\n";
    assert!(error("old.csv", october, FileFormat::Csv).contains("not 2026-11 (2026-10-01)"));
    // A column named so whose values are not months (a fee, a unit) is read as
    // before, named among the columns not read.
    let fee = csv("customer,price,quantity,amount,currency,monthly fee\nacme,tokens,1,1.00,usd,20\nacme,seats,1,1.00,usd,30\n");
    assert_eq!(fee.by_key.len(), 2);
    // A month that is not the line's (a cohort's) is left out when named so.
    let cohort =
        "customer,price,quantity,amount,currency,cohort_month\nacme,tokens,2,2.00,usd,2025-01\n";
    assert!(error("old.csv", cohort, FileFormat::Csv).contains("--column ignore=cohort_month"));
    let ignored = ColumnNames(vec![column_name("ignore=cohort_month").unwrap()]);
    let read = lines_of_text("old.csv", cohort, FileFormat::Csv, november(), &ignored).unwrap();
    assert_eq!(read.by_key.len(), 1);
    assert!(
        read.ignored_columns.is_empty(),
        "{:?}",
        read.ignored_columns
    );
    // "end" is a word of its own: a calendar month is watched.
    let calendar =
        "customer,price,quantity,amount,currency,calendar_month\nacme,tokens,2,2.00,usd,2026-10\n";
    assert!(error("old.csv", calendar, FileFormat::Csv)
        .contains("calendar_month gives each line a month"));
    // Named so, it is the month: October's line is left out.
    let named = ColumnNames(vec![("period_start".into(), "billing_month".into())]);
    let read = lines_of_text("old.csv", months, FileFormat::Csv, november(), &named).unwrap();
    assert_eq!((read.by_key.len(), read.other_periods), (1, 1));
    // A day is a month's start as well as its midnight is.
    let by_day = csv("customer,price,quantity,amount,currency,period_start\nacme,tokens,1,1,usd,2026-11-01\nacme,tokens,1,1,usd,2026-10-01\n");
    assert_eq!((by_day.by_key.len(), by_day.other_periods), (1, 1));
}

#[test]
fn bad_input_is_refused_saying_where_and_why() {
    let csv_error = |text: &str| error("old.csv", text, FileFormat::Csv);
    assert_eq!(
        csv_error("customer,price,qty,amount\nacme,tokens,1,1\n"),
        "old.csv: the header row has no column quantity, currency; it needs customer, price, quantity, amount, currency (other columns are ignored), and has customer, price, qty, amount"
    );
    assert_eq!(
        csv_error("customer,price,quantity,amount,currency\nacme,tokens,1,1,usd\nacme,seats,1,\"12,5\",usd\n"),
        "old.csv line 3: amount: \"12,5\" is not a number as this file writes them (decimal points, whole digits grouped by three if at all)"
    );
    assert_eq!(
        csv_error("customer,price,quantity,amount,currency\nacme,tokens,1,1,usd\nacme,tokens,2,2,usd\n"),
        "old.csv line 3: a second line for customer \"acme\", price \"tokens\" (the first is old.csv line 2); a source has one line per customer and price of the month, or one per invoice when an `invoice` column tells them apart (a credit note, say)"
    );
    assert_eq!(
        csv_error("customer,price,quantity,amount,currency,period_start\nacme,tokens,1,1,usd,2026-11-15 00:00:00\n"),
        "old.csv line 2: period_start \"2026-11-15 00:00:00\": is not the start of a month (UTC)"
    );
    assert_eq!(
        csv_error("customer,price,quantity,amount,currency\nacme,tokens,1,1\n"),
        "old.csv line 2: 4 fields where the header row has 5"
    );
    // Line numbers count a Windows export's \r\n as one line ending.
    assert_eq!(
        csv_error(
            "customer,price,quantity,amount,currency\r\nacme,tokens,1,1,usd\r\nacme,tokens,1\r\n"
        ),
        "old.csv line 3: 3 fields where the header row has 5"
    );
    assert_eq!(
        csv_error("customer,price,quantity,amount,currency\nacme,tokens,1,1,kr\n"),
        "old.csv line 2: currency \"kr\" is not an ISO 4217 code (such as SEK, EUR or USD); write the code of the currency the line is billed in"
    );
    assert_eq!(
        csv_error("customer,price,quantity,amount,currency\nacme,,1,1,usd\n"),
        "old.csv line 2: no price; each line names the customer and the price it bills"
    );
    let json_error = error(
        "new.jsonl",
        r#"{"customer":"acme","price":"tokens","quantity":"1","currency":"usd"}"#,
        FileFormat::JsonLines,
    );
    assert!(
        json_error.starts_with("new.jsonl line 1: missing field `amount`"),
        "{json_error}"
    );
    let huge = json(concat!(
        r#"{"customer":"a","price":"p","quantity":"1","amount":"70000000000000000000000000000","currency":"usd"}"#,
        "\n",
        r#"{"customer":"b","price":"p","quantity":"1","amount":"70000000000000000000000000000","currency":"usd"}"#,
    ));
    let refused = Reconciliation::of(&huge, &huge, Compared::QuantitiesAndAmounts).unwrap_err();
    assert_eq!(
        refused.to_string(),
        "the expected usd amounts add up to more than an exact decimal holds (28 significant digits, about 7.9e28 at most); check that source's amounts"
    );
    // 38 significant digits: rust_decimal would round the second amount away.
    let precise = json(concat!(
        r#"{"customer":"a","price":"p","quantity":"1","amount":"5000000000","currency":"usd"}"#,
        "\n",
        r#"{"customer":"b","price":"p","quantity":"1","amount":"0.0000000000000000000000000001","currency":"usd"}"#,
    ));
    let refused =
        Reconciliation::of(&precise, &precise, Compared::QuantitiesAndAmounts).unwrap_err();
    assert!(
        refused
            .to_string()
            .starts_with("the expected usd amounts add up to more than"),
        "{refused}"
    );
    // Amounts whose running sum no decimal holds, but whose total one does.
    let thirds = json(concat!(
        r#"{"customer":"a","price":"p","quantity":"1","amount":"66.666666666666666666666666667","currency":"usd"}"#,
        "\n",
        r#"{"customer":"b","price":"p","quantity":"1","amount":"66.666666666666666666666666667","currency":"usd"}"#,
        "\n",
        r#"{"customer":"c","price":"p","quantity":"1","amount":"66.666666666666666666666666666","currency":"usd"}"#,
    ));
    let agreed = Reconciliation::of(&thirds, &thirds, Compared::QuantitiesAndAmounts).unwrap();
    assert_eq!(
        agreed.totals["usd"],
        (Decimal::from(200), Decimal::from(200))
    );
}

const OLD_BILLER_MAP: &str = "kind,from,to\n\
    customer,ACCT-1001,cust_acme\n\
    price,AI resolutions (included),resolutions\n\
    price,AI resolutions (overage),resolutions\n\
    price,Tokens,gpt-tokens\n";

fn mapped_csv(text: &str, map: &str) -> anyhow::Result<Lines> {
    let map = IdMap::parse("map.csv", map)?;
    lines_of_text(
        "old.csv",
        text,
        FileFormat::Csv,
        november(),
        &ColumnNames::default(),
    )?
    .renamed(&map)
}

#[test]
fn the_map_renames_another_billers_ids_and_adds_up_the_lines_it_makes_one() {
    let old = mapped_csv(
        "customer,price,quantity,amount,currency\n\
         ACCT-1001,AI resolutions (included),100,49.00,USD\n\
         ACCT-1001,AI resolutions (overage),20,17.80,USD\n\
         ACCT-1001,Tokens,12,0.024,USD\n\
         cust_zed,resolutions,1,49.00,USD\n",
        OLD_BILLER_MAP,
    )
    .unwrap();
    let tally = json(concat!(
        r#"{"customer":"cust_acme","price":"resolutions","quantity":"120","amount":"66.80","currency":"usd"}"#,
        "\n",
        r#"{"customer":"cust_acme","price":"gpt-tokens","quantity":"12","amount":"0.024","currency":"usd"}"#,
        "\n",
        r#"{"customer":"cust_zed","price":"resolutions","quantity":"1","amount":"49.00","currency":"usd"}"#,
    ));
    let shown = report(&old, &tally);
    assert!(
        Reconciliation::of(&old, &tally, Compared::QuantitiesAndAmounts)
            .unwrap()
            .agrees(),
        "{shown}"
    );
    assert!(
        shown.contains("expected old.csv: 3 lines; 3 lines renamed by the map, 1 of them added to another line"),
        "{shown}"
    );
    // An entry no line used (a mistyped id, or a customer of another cohort).
    let map = format!("{OLD_BILLER_MAP}customer,ACCT-1O02,cust_beta\n");
    let unused = mapped_csv(
        "customer,price,quantity,amount,currency\ncust_zed,resolutions,1,49.00,usd\n",
        &map,
    )
    .unwrap();
    assert!(
        report(&unused, &tally).contains("map entries matching none of its lines (5): customer ACCT-1001, customer ACCT-1O02, price AI resolutions (included), price AI resolutions (overage), price Tokens\n"),
        "{}",
        report(&unused, &tally)
    );
    let resolutions = &old.by_key[&LineKey {
        customer: "cust_acme".into(),
        price: "resolutions".into(),
        adjusts: None,
    }];
    assert_eq!(resolutions.at, "old.csv line 2 + old.csv line 3");
    assert_eq!(resolutions.amount, Decimal::new(6680, 2));

    // Lines the map did not bring together are still one too many.
    let twice = "customer,price,quantity,amount,currency\ncust_zed,resolutions,1,1,usd\ncust_zed,resolutions,1,1,usd\n";
    let refused = mapped_csv(twice, OLD_BILLER_MAP).err().unwrap().to_string();
    assert!(
        refused.starts_with("old.csv line 3: a second line for"),
        "{refused}"
    );
}

#[test]
fn an_amount_that_differs_by_its_discount_alone_is_named_so() {
    let old = csv(
        "customer,price,quantity,subtotal,discount,amount,currency\n\
         acme,resolutions,250,250.00,31.25,218.75,usd\n\
         beta,resolutions,10,10.00,1.25,8.75,usd\n",
    );
    let tally = json(concat!(
        r#"{"customer":"acme","price":"resolutions","quantity":"250","subtotal":"250.00","discount":"31.26","amount":"218.74","currency":"usd"}"#,
        "\n",
        r#"{"customer":"beta","price":"resolutions","quantity":"10","subtotal":"10.01","discount":"1.25","amount":"8.76","currency":"usd"}"#,
    ));
    let reconciled = Reconciliation::of(&old, &tally, Compared::QuantitiesAndAmounts).unwrap();
    let what: Vec<(&str, &str)> = (reconciled.differences.iter())
        .map(|d| (d.key.customer.as_str(), d.what()))
        .collect();
    assert_eq!(what, [("acme", "discount"), ("beta", "amount")]);
    // Parts that are not figures are left out; an amount apart by more than the
    // discounts (tax in it) is an amount.
    let taxed = csv(
        "customer,price,quantity,subtotal,discount,amount,currency\n\
         acme,resolutions,250,250.00,31.25,273.44,usd\n\
         beta,resolutions,10,10.00,12.5%,8.75,usd\n",
    );
    assert_eq!(
        taxed.by_key.values().filter(|f| f.parts.is_none()).count(),
        1
    );
    let reconciled = Reconciliation::of(&taxed, &tally, Compared::QuantitiesAndAmounts).unwrap();
    assert_eq!(reconciled.differences[0].what(), "amount");
    // Without the parts on one side, an amount is all that can be said.
    let plain = csv("customer,price,quantity,amount,currency\nacme,resolutions,250,218.75,usd\n");
    let reconciled = Reconciliation::of(&plain, &tally, Compared::QuantitiesAndAmounts).unwrap();
    assert_eq!(reconciled.differences[0].what(), "amount");
}

#[test]
fn a_price_the_map_leaves_out_is_not_compared_and_counted() {
    let map = "kind,from,to\ncustomer,ACCT-1001,cust_acme\nprice,VAT 25%,\n";
    let old = mapped_csv(
        "customer,price,quantity,amount,currency\n\
         ACCT-1001,resolutions,2,42.87,SEK\n\
         ACCT-1001,VAT 25%,1,10.72,SEK\n",
        map,
    )
    .unwrap();
    let tally = json(
        r#"{"customer":"cust_acme","price":"resolutions","quantity":"2","amount":"42.87","currency":"sek"}"#,
    );
    let shown = report(&old, &tally);
    assert!(shown.contains("Differ: 0 lines."), "{shown}");
    assert!(
        shown.contains("expected old.csv: 1 line; 1 line renamed by the map; 1 line of prices the map leaves out"),
        "{shown}"
    );
    // A customer whose only line is left out was still mapped: not an unused entry.
    let only_tax = mapped_csv(
        "customer,price,quantity,amount,currency\nACCT-1001,VAT 25%,1,10.72,SEK\n",
        map,
    )
    .unwrap();
    assert!(
        only_tax.unused_map_entries.is_empty(),
        "{:?}",
        only_tax.unused_map_entries
    );
    let both = IdMap::parse("map.csv", "kind,from,to\nprice,VAT,\nprice,VAT,tax\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        both,
        "map.csv line 3: price \"VAT\" is both mapped and left out"
    );
    let customer = IdMap::parse("map.csv", "kind,from,to\ncustomer,ACCT-1,\n")
        .unwrap_err()
        .to_string();
    assert!(
        customer.starts_with("map.csv line 2: to must be given for a customer"),
        "{customer}"
    );
    let plan = IdMap::parse("map.csv", "kind,from,to\nplan,a,\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        plan,
        "map.csv line 2: kind \"plan\" is neither customer nor price"
    );
}

#[test]
fn a_map_that_cannot_be_followed_is_refused_saying_where() {
    let refused = |map: &str| IdMap::parse("map.csv", map).unwrap_err().to_string();
    assert_eq!(
        refused("kind,old,new\ncustomer,a,b\n"),
        "map.csv: the header row must name kind, from and to (it has kind, old, new)"
    );
    assert_eq!(
        refused("kind,from,to\nplan,a,b\n"),
        "map.csv line 2: kind \"plan\" is neither customer nor price"
    );
    assert_eq!(
        refused("kind,from,to\ncustomer,,b\n"),
        "map.csv line 2: from must be given"
    );
    assert_eq!(
        refused("kind,from,to\ncustomer,a,b\nprice,a,c\ncustomer,a,c\n"),
        "map.csv line 4: customer \"a\" is mapped to \"c\" here and to \"b\" at map.csv line 2"
    );
    let two_currencies = mapped_csv(
        "customer,price,quantity,amount,currency\n\
         ACCT-1001,AI resolutions (included),100,49.00,usd\n\
         ACCT-1001,AI resolutions (overage),20,17.80,eur\n",
        OLD_BILLER_MAP,
    );
    assert_eq!(
        two_currencies.err().unwrap().to_string(),
        "old.csv line 3: the map makes it a line of customer \"cust_acme\", price \"resolutions\" with old.csv line 2 (in usd), but it is in eur and that one in usd; lines in two currencies cannot be added"
    );
}

#[test]
fn only_the_customers_of_the_chosen_source_are_compared_and_the_rest_counted() {
    let line = |customer: &str| {
        format!(
            r#"{{"customer":"{customer}","price":"p","quantity":"1","amount":"1.00","currency":"usd"}}"#
        )
    };
    let sources = || {
        // The other biller still bills a and b; Tally rates everyone, and c wrongly.
        let old = json(&[line("a"), line("b")].join("\n"));
        let mut tally = json(&[line("a"), line("c"), line("d")].join("\n"));
        tally.name = "tally.jsonl".into();
        (old, tally)
    };
    let compared = |scope| {
        let (mut old, mut tally) = sources();
        keep_customers(scope, &mut old, &mut tally).unwrap();
        let differing: Vec<String> =
            (Reconciliation::of(&old, &tally, Compared::QuantitiesAndAmounts)
                .unwrap()
                .differences)
                .iter()
                .map(|d| d.key.customer.clone())
                .collect();
        (differing, report(&old, &tally))
    };
    assert_eq!(compared(CustomerScope::All).0, ["b", "c", "d"]);
    let (differing, shown) = compared(CustomerScope::Expected);
    assert_eq!(differing, ["b"]);
    assert!(
        shown.contains("actual   tally.jsonl: 1 line; 2 lines of 2 customers not compared (--customers) left out"),
        "{shown}"
    );
    assert_eq!(compared(CustomerScope::Actual).0, ["c", "d"]);
    let (differing, shown) = compared(CustomerScope::Both);
    assert!(differing.is_empty(), "{shown}");
    assert!(
        shown.contains("expected a.jsonl: 1 line; 1 line of 1 customer not compared (--customers) left out: b\n"),
        "{shown}"
    );
    assert!(
        shown.contains("actual   tally.jsonl: 1 line; 2 lines of 2 customers not compared (--customers) left out: c, d\n"),
        "{shown}"
    );

    // No customer in common: nothing would be compared, which is not agreement.
    let mut old = json(&line("ACCT-1"));
    let mut tally = json(&[line("a"), line("b")].join("\n"));
    tally.name = "tally.jsonl".into();
    let refused = keep_customers(CustomerScope::Both, &mut old, &mut tally).unwrap_err();
    assert_eq!(
        refused.to_string(),
        "no customer has lines in both sources, so nothing would be compared: a.jsonl has 1 customer (ACCT-1), tally.jsonl has 2 customers (a, b). Do the two name customers differently? --map translates the other biller's ids"
    );
    let many: BTreeSet<String> = (0..7).map(|n| format!("c{n}")).collect();
    assert_eq!(listed(&many), "c0, c1, c2, c3, c4 and 2 more");
}

#[test]
fn lines_of_one_key_on_different_invoices_are_added_together_and_others_refused() {
    let header = "invoice,customer,price,quantity,amount,currency\n";
    let netted = csv(&format!(
        "{header}INV-42,cust_acme,resolutions,2,42.88,USD\nCN-7,cust_acme,resolutions,0,-0.01,USD\nINV-42,cust_acme,seats,1,10,USD\n"
    ));
    let resolutions = &netted.by_key[&LineKey {
        customer: "cust_acme".into(),
        price: "resolutions".into(),
        adjusts: None,
    }];
    assert_eq!(
        (resolutions.quantity, resolutions.amount),
        (Decimal::from(2), Decimal::new(4287, 2))
    );
    assert_eq!(resolutions.at, "b.csv line 2 + b.csv line 3");
    assert_eq!((netted.by_key.len(), netted.netted), (2, 1));
    let shown = report(&netted, &netted);
    assert!(
        shown.contains("expected b.csv: 2 lines; 1 line added to another invoice's line of the same customer and price"),
        "{shown}"
    );

    let refused = |rows: &str| error("old.csv", &format!("{header}{rows}"), FileFormat::Csv);
    // One invoice, or a line naming none, cannot tell two lines apart.
    for rows in [
        "INV-1,a,p,1,1,usd\nINV-1,a,p,1,1,usd\n",
        "INV-1,a,p,1,1,usd\n,a,p,1,1,usd\n",
        ",a,p,1,1,usd\nINV-2,a,p,1,1,usd\n",
    ] {
        assert!(
            refused(rows).starts_with("old.csv line 3: a second line for customer \"a\""),
            "{rows}: {}",
            refused(rows)
        );
    }
    assert_eq!(
        refused("INV-1,a,p,1,1,usd\nCN-1,a,p,0,-1,eur\n"),
        "old.csv line 3: another invoice's line of customer \"a\", price \"p\" with old.csv line 2 (in usd), but it is in eur and that one in usd; lines in two currencies cannot be added"
    );
}

#[test]
fn a_numbered_invoice_is_read_and_only_comparing_nothing_is_refused() {
    let line = |invoice: &str, amount: &str| {
        format!(
            r#"{{"customer":"a","price":"p","quantity":"1","amount":"{amount}","currency":"usd","invoice":{invoice}}}"#
        )
    };
    let netted = json(&[line("1001", "10"), line("\"CN-7\"", "-1")].join("\n"));
    assert_eq!(
        netted.by_key.values().next().unwrap().amount,
        Decimal::from(9)
    );

    // A biller that billed nothing against Tally's zero lines: compared, and agreed.
    let nothing = csv("customer,price,quantity,amount,currency\n");
    let zero = json(r#"{"customer":"a","price":"p","quantity":"0","amount":"0","currency":"usd"}"#);
    ensure_something_to_compare(november(), [&nothing, &zero]).unwrap();
    assert!(
        Reconciliation::of(&nothing, &zero, Compared::QuantitiesAndAmounts)
            .unwrap()
            .agrees()
    );
    // Two empty sources, or one with lines of other months only: nothing to compare.
    let refused = ensure_something_to_compare(november(), [&nothing, &nothing]);
    assert!(refused
        .unwrap_err()
        .to_string()
        .starts_with("neither b.csv nor b.csv has a line of 2026-11"));
    let october =
        csv("customer,price,quantity,amount,currency,period_start\na,p,1,1,usd,2026-10\n");
    assert_eq!(
        ensure_something_to_compare(november(), [&october, &zero])
            .unwrap_err()
            .to_string(),
        "b.csv has no line of 2026-11 (only 1 line of other months): is --period right?"
    );
}

#[test]
fn a_spreadsheets_export_is_read_with_its_separator_decimal_comma_and_grouping() {
    let figures = |lines: &Lines| -> Vec<(String, String)> {
        (lines.by_key.values())
            .map(|f| (f.quantity.to_string(), f.amount.to_string()))
            .collect()
    };
    // Excel in much of Europe: `;`, decimal commas, points or spaces grouping
    // thousands, headers in any case.
    let semicolons = csv("Customer;Price;Quantity;Amount;Currency\n\
         cust_a;resolutions;1.234;1.234,56;EUR\n\
         cust_b;resolutions;2;\u{a0}1\u{a0}049,5 ;eur\n\
         cust_c;resolutions;0;-0,01;EUR\n");
    assert_eq!(
        figures(&semicolons),
        [
            ("1234".into(), "1234.56".into()),
            ("2".into(), "1049.5".into()),
            ("0".into(), "-0.01".into())
        ]
    );
    assert_eq!(
        semicolons.dialect.unwrap().describe(),
        "read as CSV separated by ';', with decimal commas"
    );
    let tabs = csv("customer\tprice\tquantity\tamount\tcurrency\ncust_a\tr\t3\t12.50\tusd\n");
    assert_eq!(figures(&tabs), [("3".into(), "12.50".into())]);
    assert_eq!(
        tabs.dialect.unwrap().describe(),
        "read as CSV separated by tabs, with decimal points"
    );
    // Tally's own form, and grouping with a decimal point.
    let commas =
        csv("customer,price,quantity,amount,currency\ncust_a,r,\"1,000\",\"1,234.50\",usd\n");
    assert_eq!(figures(&commas), [("1000".into(), "1234.50".into())]);
    assert!(commas.dialect.is_none());
    // Digits grouped otherwise are refused, never guessed at.
    for (text, figure) in [
        (
            "customer,price,quantity,amount,currency\na,r,1,\"12,5\",usd\n",
            "\"12,5\"",
        ),
        (
            "customer;price;quantity;amount;currency\na;r;1;1.2345,6;eur\n",
            "\"1.2345,6\"",
        ),
        (
            "customer;price;quantity;amount;currency\na;r;1;1,5;eur\nb;r;1;2.5;eur\n",
            "\"2.5\"",
        ),
    ] {
        let error = error("x.csv", text, FileFormat::Csv);
        assert!(
            error.contains(&format!(
                "{figure} is not a number as this file writes them"
            )),
            "{error}"
        );
    }
}

#[test]
fn a_files_format_is_told_by_its_content_and_ids_are_trimmed() {
    assert!(matches!(
        FileFormat::of("  {\"customer\":\"a\"}"),
        FileFormat::JsonLines
    ));
    assert!(matches!(FileFormat::of(""), FileFormat::JsonLines));
    assert!(matches!(
        FileFormat::of("customer,price\n"),
        FileFormat::Csv
    ));
    let lines =
        csv("customer,price,quantity,amount,currency\n cust_acme , resolutions,2,42.87,USD\n");
    let key = lines.by_key.keys().next().unwrap();
    assert_eq!(
        (key.customer.as_str(), key.price.as_str()),
        ("cust_acme", "resolutions")
    );
}
