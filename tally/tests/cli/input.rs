//! What `tally rate` reads and writes: duplicates and conflicts, the summary, bad lines
//! and where they go, input from files, pipes and stdin, output formats, and output
//! that is the same on every run.

use super::*;

#[test]
fn duplicates_and_conflicts_are_counted_and_the_first_event_wins() {
    let f = Fixture::new(PRO);
    let first = tokens("t1", "cust_acme", "gpt-x", json!(1000));
    let events = vec![
        first.clone(),
        // An identical resend.
        first.clone(),
        // The same event re-serialised with spaces and newlines turned into spaces:
        // still a duplicate.
        respaced(&first),
        // Same (source, id), different payload: a conflict, dropped.
        tokens("t1", "cust_acme", "gpt-x", json!(9000)),
        // Same (source, id), different customer: a conflict too.
        tokens("t1", "cust_idle", "gpt-x", json!(1000)),
        // Same id from another source: a different event.
        first.replace(r#""source":"test""#, r#""source":"other""#),
        // Same time written with another offset: a duplicate.
        first.replace("2026-11-10T08:00:00Z", "2026-11-10T09:00:00+01:00"),
    ];
    let run = f.rate(&events, &[]).succeeded();
    let lines = run.lines();
    // t1 from "test" and t1 from "other": 2000 tokens, 2 packages x 0.02.
    assert_eq!(
        money(line(&lines, "cust_acme", "gpt-tokens")),
        ["2000", "0.04", "0.00", "0.04"]
    );
    assert_eq!(money(line(&lines, "cust_idle", "gpt-tokens"))[0], "0");
    let s = f.summary();
    assert_eq!(s["events_read"], 7);
    assert_eq!(s["accepted"], 2);
    assert_eq!(s["duplicates"], 3);
    assert_eq!(s["conflicts"], 2);
    assert!(
        run.stderr.contains("3 duplicates + 2 conflicts"),
        "{}",
        run.stderr
    );
    // The conflicting resends are kept where rejects are, so support can tell which
    // event was dropped; identical resends are not.
    let rejects = f.rejects();
    let kept: Vec<(&Value, &Value, &Value)> = (rejects.iter())
        .map(|r| (&r["line"], &r["field"], &r["code"]))
        .collect();
    assert_eq!(
        kept,
        [
            (&json!(4), &json!("id"), &json!("conflict")),
            (&json!(5), &json!("id"), &json!("conflict"))
        ]
    );
    assert_eq!(rejects[0]["raw"], json!(events[3]));
    assert!(
        run.stderr.contains(
            "2 rejected lines in rejects.jsonl (2 of them conflicting resends of counted events)"
        ),
        "{}",
        run.stderr
    );
}

/// The book with `cust_later`, billed from December on, beside its customers.
fn with_a_customer_billed_from_december() -> Fixture {
    Fixture::new(&format!(
        "{PRO}\n[[customers]]\nid = \"cust_later\"\nplan = \"pro\"\nfrom = \"2026-12\"\n"
    ))
}

#[test]
fn the_summary_reconciles_every_line_read() {
    let f = with_a_customer_billed_from_december();
    let events = vec![
        event(
            "e1",
            "ai.resolution",
            "cust_acme",
            "2026-11-02T00:00:00Z",
            None,
        ),
        event(
            "e1",
            "ai.resolution",
            "cust_acme",
            "2026-11-02T00:00:00Z",
            None,
        ),
        event(
            "e1",
            "ai.resolution",
            "cust_acme",
            "2026-11-03T00:00:00Z",
            None,
        ),
        "{not json".to_owned(),
        event(
            "e2",
            "ai.resolution",
            "cust_acme",
            "2026-10-02T00:00:00Z",
            None,
        ),
        event(
            "e3",
            "ai.handoff",
            "cust_acme",
            "2026-11-02T00:00:00Z",
            None,
        ),
        event(
            "e4",
            "ai.resolution",
            "cust_ghost",
            "2026-11-02T00:00:00Z",
            None,
        ),
        event(
            "e5",
            "ai.resolution",
            "cust_ghost",
            "2026-11-03T00:00:00Z",
            None,
        ),
        tokens("e6", "cust_acme", "llama-z", json!(10)),
        event(
            "e7",
            "ai.resolution",
            "cust_later",
            "2026-11-03T00:00:00Z",
            None,
        ),
    ];
    let run = f.rate(&events, &[]).succeeded();
    assert_eq!(
        f.summary(),
        json!({
            "period": "2026-11",
            "unfinished": false,
            "events_read": 10,
            "accepted": 3,
            "duplicates": 1,
            "conflicts": 1,
            "rejected": 1,
            "rejected_by_reason": {"invalid_json": 1},
            "outside_period": 1,
            "outside_period_by_month": {"2026-10": 1},
            "unknown_event_types": {"ai.handoff": 1},
            "unknown_customers": {"cust_ghost": 2},
            "too_late": 0,
            "refused": 0,
            "unpriced_usage": [{"customer": "cust_acme", "meter": "tokens", "group": ["llama-z"], "quantity": "10"}],
            "unsubscribed_usage": [{"customer": "cust_later", "meter": "resolutions", "group": [], "quantity": "1"}],
            "lines_not_rated": [],
        })
    );
    assert!(
        run.stderr.contains(
            "period 2026-11: 10 events read = 3 counted + 1 duplicates + 1 conflicts + 1 rejected + 1 outside the period + 1 of unknown types + 2 of unknown customers"
        ),
        "{}",
        run.stderr
    );
    // October's event arrived after October was billed: finance is told where it is.
    assert!(
        run.stderr.contains(
            "outside the period, by month: 2026-10: 1 (an earlier month's events may be late usage that the run which billed it lacked: if so, rate it again and compare the two with `tally reconcile`)"
        ),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains(r#"unbilled: 1 event of type "ai.handoff", which no meter reads"#),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(
            r#"unbilled: 2 events for customer "cust_ghost", who is not in the configuration"#
        ),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(
            r#"unbilled: 1 of meter resolutions [] for "cust_later": not billed in 2026-11 (before its from or after its through)"#
        ),
        "{}",
        run.stderr
    );
    // Unknown customers, and customers not billed in the period, get no lines.
    let lines = run.lines();
    assert!(lines.iter().all(|l| l["customer"] != "cust_ghost"));
    assert!(lines.iter().all(|l| l["customer"] != "cust_later"));
}

#[test]
fn a_shadow_run_rates_a_customer_before_its_from_for_comparing_with_another_biller() {
    // cust_later is still the old biller's in November.
    let f = with_a_customer_billed_from_december();
    let events = concat(&[
        resolutions("acme", "cust_acme", 1),
        resolutions("later", "cust_later", 2),
    ]);
    let billed = f.rate(&events, &[]).succeeded();
    let shadow = f.rate(&events, &["--shadow"]).succeeded();
    let later = |run: &Run| -> Vec<(String, String)> {
        (run.lines().iter())
            .filter(|l| l["customer"] == "cust_later")
            .map(|l| (l["price"].to_string(), l["quantity"].to_string()))
            .collect()
    };
    assert_eq!(later(&billed), []);
    assert!(
        later(&shadow).contains(&(r#""resolutions""#.to_owned(), r#""2""#.to_owned())),
        "{:?}",
        later(&shadow)
    );
    // The billed customers' lines are the same either way.
    let acme = |run: &Run| -> Vec<Value> {
        (run.lines().into_iter())
            .filter(|l| l["customer"] == "cust_acme")
            .collect()
    };
    assert_eq!(acme(&shadow), acme(&billed));
    assert!(
        shadow
            .stderr
            .contains("shadow run (--shadow): every customer rated as if billed in 2026-11"),
        "{}",
        shadow.stderr
    );
    // Not for invoicing: never stored.
    let stored = f.rate(&events, &["--shadow", "--clickhouse", "http://127.0.0.1:1"]);
    assert_eq!(stored.code, 2, "{}", stored.stderr);
    assert!(
        stored.stderr.contains("cannot be used with"),
        "{}",
        stored.stderr
    );
}

// ---------------------------------------------------------------------------------------
// Bad lines
// ---------------------------------------------------------------------------------------

/// Every kind of bad line, one per line, with the field and code it is rejected with
/// (`None` for the two good lines and the blank one).
fn bad_lines() -> (Vec<u8>, Vec<(u64, &'static str, &'static str)>) {
    let good = |id: &str| {
        event(
            id,
            "llm.tokens",
            "cust_acme",
            "2026-11-10T08:00:00Z",
            Some(json!({"tokens": 1000, "model": "gpt-x"})),
        )
    };
    // A good line under id `bad-{n}` with one piece of text replaced.
    let spoil = |n: u64, from: &str, to: &str| {
        let line = good(&format!("bad-{n}"));
        assert!(line.contains(from), "{line} has no {from}");
        line.replacen(from, to, 1).into_bytes()
    };
    let mut not_utf8 = good("bad-3").into_bytes();
    let underscore = not_utf8.windows(9).position(|w| w == b"cust_acme").unwrap() + 4;
    not_utf8[underscore] = 0xff;
    type Row = (Vec<u8>, Option<(&'static str, &'static str)>);
    let rows: Vec<Row> = vec![
        (good("good-1").into_bytes(), None),
        (
            b"{\"specversion\":\"1.0\", this is not json".to_vec(),
            Some(("event", "invalid_json")),
        ),
        (not_utf8, Some(("event", "invalid_utf8"))),
        (
            spoil(4, r#""subject":"cust_acme","#, ""),
            Some(("subject", "missing_field")),
        ),
        (
            spoil(5, r#""id":"bad-5""#, r#""id":81"#),
            Some(("id", "wrong_type")),
        ),
        (
            spoil(6, "1000", r#""lots""#),
            Some(("data.tokens", "not_a_number")),
        ),
        (
            spoil(7, "1000", "-5"),
            Some(("data.tokens", "negative_value")),
        ),
        (
            spoil(8, "2026-11-10T08:00:00Z", "2099-01-01T00:00:00Z"),
            Some(("time", "time_in_future")),
        ),
        (
            spoil(9, r#""specversion":"1.0""#, r#""specversion":"0.3""#),
            Some(("specversion", "unsupported_specversion")),
        ),
        (
            spoil(
                10,
                r#""subject":"cust_acme""#,
                r#""subject":"cust_acme","subject":"cust_idle""#,
            ),
            Some(("subject", "duplicate_field")),
        ),
        (Vec::new(), None),
        (
            spoil(12, "2026-11-10T08:00:00Z", "10 Nov 2026"),
            Some(("time", "invalid_time")),
        ),
        (b"[]".to_vec(), Some(("event", "not_an_object"))),
        (good("good-14").into_bytes(), None),
    ];
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for (number, (line, reject)) in (1u64..).zip(rows) {
        bytes.extend(line);
        bytes.push(b'\n');
        if let Some((field, code)) = reject {
            expected.push((number, field, code));
        }
    }
    (bytes, expected)
}

#[test]
fn every_kind_of_bad_line_is_rejected_with_line_field_and_code_and_the_run_continues() {
    let f = Fixture::new(PRO);
    let (input, expected) = bad_lines();
    let run = f.rate_bytes(&input, &[]).succeeded();
    let rejects = f.rejects();
    let got: Vec<(u64, String, String)> = rejects
        .iter()
        .map(|r| {
            (
                r["line"].as_u64().unwrap(),
                r["field"].as_str().unwrap().to_owned(),
                r["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(u64, String, String)> = expected
        .iter()
        .map(|(l, f, c)| (*l, f.to_string(), c.to_string()))
        .collect();
    assert_eq!(got, expected);
    for r in &rejects {
        assert!(!r["reason"].as_str().unwrap().is_empty(), "{r}");
        assert!(r["raw"].is_string(), "{r}");
    }
    assert_eq!(
        rejects[0]["raw"],
        "{\"specversion\":\"1.0\", this is not json"
    );
    assert_eq!(
        rejects[5]["reason"],
        "usage must not be negative (only a sum meter with allow_negative_values = true takes corrections)"
    );
    // The raw line is kept, lossily; the reason gives the offset of the bad byte.
    let raw = rejects[1]["raw"].as_str().unwrap();
    assert!(raw.contains("\"subject\":\"cust\u{fffd}acme\""), "{raw}");
    let offset = raw.find('\u{fffd}').unwrap();
    assert_eq!(
        rejects[1]["reason"],
        format!("line is not valid UTF-8 (first bad byte at offset {offset})")
    );
    // The two good lines (1 and 14) are billed: 2000 tokens, 2 packages x 0.02.
    assert_eq!(
        money(line(&run.lines(), "cust_acme", "gpt-tokens")),
        ["2000", "0.04", "0.00", "0.04"]
    );
    let s = f.summary();
    assert_eq!(s["events_read"], 13, "the blank line is not an event");
    assert_eq!(s["accepted"], 2);
    assert_eq!(s["rejected"], 11);
    assert_eq!(
        s["rejected_by_reason"],
        json!({
            "duplicate_field": 1, "invalid_json": 1, "invalid_time": 1, "invalid_utf8": 1,
            "missing_field": 1, "negative_value": 1, "not_a_number": 1, "not_an_object": 1,
            "time_in_future": 1, "unsupported_specversion": 1, "wrong_type": 1,
        })
    );
    assert!(
        run.stderr.contains("11 rejected lines in rejects.jsonl"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("rejected invalid_utf8: 1"),
        "{}",
        run.stderr
    );
}

#[test]
fn strict_mode_stops_at_the_first_bad_line_naming_it() {
    let f = Fixture::new(PRO);
    let (input, _) = bad_lines();
    let run = f.rate_bytes(&input, &["--strict"]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "", "no invoice lines on failure");
    assert!(
        run.stderr.contains("error: line 2: event: invalid JSON"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("--strict"), "{}", run.stderr);

    let missing = event(
        "x",
        "ai.resolution",
        "cust_acme",
        "2026-11-10T08:00:00Z",
        None,
    )
    .replace(r#""subject":"cust_acme","#, "");
    let input = format!(
        "{}\n\n{missing}\n",
        event(
            "ok",
            "ai.resolution",
            "cust_acme",
            "2026-11-10T08:00:00Z",
            None
        )
    );
    let run = f.rate_bytes(input.as_bytes(), &["--strict"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("line 3: subject: required field is missing or null"),
        "{}",
        run.stderr
    );

    // Sent under another case, it is named.
    let cased = event(
        "x",
        "ai.resolution",
        "cust_acme",
        "2026-11-10T08:00:00Z",
        None,
    )
    .replace(r#""time":"#, r#""Time":"#)
    .replace(r#""subject":"#, r#""Subject":"#);
    let run = f.rate_bytes(format!("{cased}\n").as_bytes(), &["--strict"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains(r#"line 1: subject: required field is missing or null; the event has "Subject", and CloudEvents attribute names are lower case"#),
        "{}",
        run.stderr
    );
}

#[test]
fn strict_mode_on_clean_input_rates_normally() {
    let f = Fixture::new(PRO);
    let events = resolutions("r", "cust_acme", 250);
    let strict = f.rate(&events, &["--strict"]).succeeded().stdout;
    let lax = f.rate(&events, &[]).succeeded().stdout;
    assert_eq!(strict, lax);
}

#[test]
fn line_numbers_count_blank_lines_and_crlf_endings() {
    let f = Fixture::new(PRO);
    let good = event(
        "g",
        "ai.resolution",
        "cust_acme",
        "2026-11-10T08:00:00Z",
        None,
    );
    let input = format!(
        "{good}\r\n\r\n\n   \nnope\r\n{}\r\n",
        good.replace(r#""g""#, r#""h""#)
    );
    let run = f.rate_bytes(input.as_bytes(), &[]).succeeded();
    let rejects = f.rejects();
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0]["line"], 5);
    assert_eq!(rejects[0]["raw"], "nope");
    assert_eq!(
        line(&run.lines(), "cust_acme", "resolutions")["quantity"],
        "2"
    );
}

#[test]
fn events_ahead_of_the_clock_by_more_than_the_skew_are_rejected() {
    let f = Fixture::new(PRO);
    let at = |id: &str, time: &str| event(id, "ai.resolution", "cust_acme", time, None);
    // The clock is 2026-12-15T00:00:00Z; the default skew 5 minutes.
    let events = vec![
        at("a", "2026-12-15T00:04:59Z"),
        at("b", "2026-12-15T00:05:00Z"),
        at("c", "2026-12-15T00:05:01Z"),
    ];
    f.rate(&events, &[]).succeeded();
    let rejects = f.rejects();
    assert_eq!(rejects.len(), 1);
    assert_eq!(
        (rejects[0]["line"].clone(), rejects[0]["code"].clone()),
        (json!(3), json!("time_in_future"))
    );
    assert_eq!(f.summary()["outside_period"], 2);

    let wide = Fixture::new(&format!("{PRO}\n[events]\nmax_future_skew = \"1h\"\n"));
    let events = vec![
        at("a", "2026-12-15T00:59:00Z"),
        at("b", "2026-12-15T01:00:01Z"),
    ];
    wide.rate(&events, &[]).succeeded();
    let rejects = wide.rejects();
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0]["line"], 2);
    assert_eq!(
        rejects[0]["reason"],
        "event time is more than 1h ahead of the clock; fix the sender's clock"
    );
}

#[test]
fn rejects_go_to_rejects_jsonl_in_the_working_directory_by_default() {
    let f = Fixture::new(PRO);
    let mut events = resolutions("r", "cust_acme", 1);
    events.push("garbage".to_owned());
    f.write("events.jsonl", events.join("\n").as_bytes());
    let run: Run = f
        .tally()
        .args([
            "rate",
            "--config",
            "tally.toml",
            "--events",
            "events.jsonl",
            "--period",
            "2026-11",
            "--now",
            NOW,
        ])
        .output()
        .unwrap()
        .into();
    run.succeeded();
    let rejects = f.rejects();
    assert_eq!(rejects.len(), 1);
    let r = &rejects[0];
    let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["code", "field", "line", "raw", "reason"]);
    assert_eq!(
        (&r["line"], &r["field"], &r["code"], &r["raw"]),
        (
            &json!(2),
            &json!("event"),
            &json!("invalid_json"),
            &json!("garbage")
        )
    );
    // The parser's own words follow; only the prefix is Tally's.
    assert!(
        r["reason"].as_str().unwrap().starts_with("invalid JSON: "),
        "{r}"
    );
}

// ---------------------------------------------------------------------------------------
// Input, output, formats
// ---------------------------------------------------------------------------------------

#[test]
fn a_month_with_none_of_the_files_events_is_rated_with_a_warning() {
    let f = Fixture::new(PRO);
    let october = event(
        "oct-1",
        "ai.resolution",
        "cust_acme",
        "2026-10-24T10:15:00Z",
        Some(json!({"conversation_id": "c-1"})),
    );
    let run = f.rate(&[october], &[]).succeeded();
    assert!(
        run.stderr.contains(
            "warning: no event of 2026-11 was counted (1 outside the period); is 2026-11 the month to bill?"
        ),
        "{}",
        run.stderr
    );
    // A month with its events says nothing of the kind.
    let run = f.rate(&resolutions("nov", "cust_acme", 2), &[]).succeeded();
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
}

#[test]
fn a_file_of_which_no_line_is_an_event_bills_nothing_and_says_so() {
    let f = Fixture::new(PRO);
    // The old biller's export given as the events file.
    let export = "customer,price,quantity,amount\ncust_acme,resolutions,250,250.00\n";
    let run = f.rate_bytes(export.as_bytes(), &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_shows(
        &run.stderr,
        &["error: none of the 2 lines read is a valid usage event (2 invalid_json), so nothing would be billed but flat fees; the first: line 1: event: invalid JSON"],
    );
    assert_eq!(run.stdout, "", "no invoice lines");
    assert_eq!(f.rejects().len(), 2, "each line is kept with its reason");

    // A file with events among bad lines is rated, with a warning once many are bad.
    let mut mixed = resolutions("r", "cust_acme", 2);
    mixed.push("not an event".to_owned());
    let run = f.rate(&mixed, &[]).succeeded();
    assert_shows(
        &run.stderr,
        &["warning: 1 of the 3 lines read were rejected (reasons below)"],
    );
    // Nothing counted, though not every line was bad: said so, with where they went.
    let mut uncounted = resolutions("u", "cust_nobody", 1);
    uncounted.extend((0..9).map(|i| format!("garbage {i}")));
    let run = f.rate(&uncounted, &[]).succeeded();
    assert_shows(
        &run.stderr,
        &[
            "warning: 9 of the 10 lines read were rejected (reasons below)",
            "warning: no event of 2026-11 was counted: the lines below say where each went",
            "unbilled: 1 event for customer \"cust_nobody\"",
        ],
    );
    // An empty file is a month without usage, not a mistake.
    let run = f.rate_bytes(b"", &[]).succeeded();
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
}

#[test]
fn rating_a_month_that_has_not_ended_warns_that_it_bills_the_usage_so_far() {
    let f = Fixture::new(PRO);
    let events = resolutions("r", "cust_acme", 3).join("\n");
    f.write("events.jsonl", events.as_bytes());
    let rate = |now: &str| -> Run {
        let mut args = month_args_at("rate", now);
        args.extend(["--summary", "summary.json", "--rejects", "rejects.jsonl"]);
        f.tally().args(args).output().unwrap().into()
    };
    let run = rate("2026-11-25T00:00:00Z").succeeded();
    assert_shows(
        &run.stderr,
        &["warning: 2026-11 has not ended: these lines bill its usage so far, not the month"],
    );
    assert_eq!(f.summary()["unfinished"], true);
    let run = rate("2026-12-01T00:00:00Z").succeeded();
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
    assert_eq!(f.summary()["unfinished"], false);
}

#[test]
fn events_can_come_from_stdin() {
    let f = Fixture::new(PRO);
    let events = resolutions("r", "cust_acme", 250).join("\n");
    let mut child = f
        .tally()
        .args([
            "rate",
            "--config",
            "tally.toml",
            "--events",
            "-",
            "--period",
            "2026-11",
        ])
        .args(["--format", "json", "--now", NOW])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(events.as_bytes())
        .unwrap();
    let run: Run = child.wait_with_output().unwrap().into();
    let from_stdin = run.succeeded().stdout;
    assert_eq!(
        money(line(
            &Run {
                code: 0,
                stdout: from_stdin.clone(),
                stderr: String::new()
            }
            .lines(),
            "cust_acme",
            "resolutions"
        )),
        ["250", "182.50", "22.81", "159.69"]
    );
    let from_file = f
        .rate(&resolutions("r", "cust_acme", 250), &[])
        .succeeded()
        .stdout;
    assert_eq!(from_stdin, from_file);
}

#[test]
fn output_can_go_to_a_file() {
    let f = Fixture::new(PRO);
    let to_stdout = f
        .rate(&resolutions("r", "cust_acme", 5), &[])
        .succeeded()
        .stdout;
    let out = f.path("lines.jsonl");
    let run = f
        .rate(
            &resolutions("r", "cust_acme", 5),
            &["--output", out.to_str().unwrap()],
        )
        .succeeded();
    assert_eq!(run.stdout, "");
    assert_eq!(f.read("lines.jsonl"), to_stdout);
}

#[test]
fn csv_has_a_header_and_one_row_per_line() {
    let f = Fixture::new(PRO);
    let run = f
        .rate(&resolutions("r", "cust_acme", 250), &["--format", "csv"])
        .succeeded();
    let json = f
        .rate(&resolutions("r", "cust_acme", 250), &[])
        .succeeded()
        .lines();
    let rows: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(rows.len(), 7);
    assert_eq!(
        rows[0],
        "id,config_hash,customer,plan,price,meter,period_start,period_end,quantity,subtotal,discount,amount,currency,tiers"
    );
    let acme = &json[0];
    assert_eq!(
        rows[1],
        format!(
            "{},{},cust_acme,pro,resolutions,resolutions,2026-11-01T00:00:00Z,2026-12-01T00:00:00Z,250,182.50,22.81,159.69,usd,tier 1 (up to 100): 100 x 0 + 49 = 49; tier 2 (up to 1000): 150 x 0.89 = 133.5",
            acme["id"].as_str().unwrap(),
            acme["config_hash"].as_str().unwrap()
        )
    );
    assert!(rows[4].contains(",cust_idle,pro,resolutions,resolutions,2026-11-01T00:00:00Z,2026-12-01T00:00:00Z,0,49.00,0.00,49.00,usd,tier 1 (up to 100): 0 x 0 + 49 = 49"), "{}", rows[4]);
}

#[test]
fn csv_quotes_fields_that_contain_commas() {
    let config = PRO.replace(r#"id = "cust_idle""#, r#"id = "idle, inc""#);
    let f = Fixture::new(&config);
    let run = f.rate(&[], &["--format", "csv"]).succeeded();
    let row = run.stdout.lines().find(|r| r.contains("idle")).unwrap();
    assert!(row.contains(",\"idle, inc\",pro,"), "{row}");
}

#[test]
fn table_shows_lines_with_a_total_per_customer_and_a_grand_total() {
    let f = Fixture::new(PRO);
    let events = concat(&[
        resolutions("r", "cust_acme", 250),
        vec![
            tokens("t1", "cust_acme", "gpt-x", json!(1500)),
            tokens("t2", "cust_acme", "claude-y", json!(1999)),
        ],
    ]);
    let run = f.rate(&events, &["--format", "table"]).succeeded();
    let rows: Vec<Vec<&str>> = run
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["cust_acme", "plan", "pro", "2026-11-01", "to", "2026-12-01"]
    );
    assert_eq!(
        rows[1],
        ["price", "meter", "quantity", "subtotal", "discount", "amount"]
    );
    assert_eq!(
        rows[2],
        [
            "resolutions",
            "resolutions",
            "250",
            "182.50",
            "22.81",
            "159.69",
            "usd"
        ]
    );
    assert_eq!(
        rows[3],
        [
            "gpt-tokens",
            "tokens",
            "1500",
            "0.04",
            "0.00",
            "0.04",
            "usd"
        ]
    );
    assert_eq!(
        rows[4],
        [
            "claude-tokens",
            "tokens",
            "1999",
            "0.03",
            "0.00",
            "0.03",
            "usd"
        ]
    );
    // 159.69 + 0.04 + 0.03 = 159.76.
    assert_eq!(rows[5], ["total", "159.76", "usd"]);
    assert_eq!(rows[6], Vec::<&str>::new());
    assert_eq!(
        rows[7],
        ["cust_idle", "plan", "pro", "2026-11-01", "to", "2026-12-01"]
    );
    assert_eq!(
        rows[9],
        [
            "resolutions",
            "resolutions",
            "0",
            "49.00",
            "0.00",
            "49.00",
            "usd"
        ]
    );
    assert_eq!(rows[12], ["total", "49.00", "usd"]);
    // 159.76 + 49.00 = 208.76 over two customers.
    assert_eq!(
        run.stdout.lines().last().unwrap(),
        "all customers billed in usd (2): 208.76 usd"
    );
}

#[test]
fn table_totals_are_per_currency() {
    let config = format!(
        "{PRO}\n[[plans]]\nid = \"jp\"\ncurrency = \"jpy\"\n\n[[plans.prices]]\nid = \"resolutions\"\nmeter = \"resolutions\"\nbilling_scheme = \"per_unit\"\nunit_amount = \"120\"\n\n[[customers]]\nid = \"cust_tokyo\"\nplan = \"jp\"\n"
    );
    let f = Fixture::new(&config);
    let run = f
        .rate(&resolutions("r", "cust_tokyo", 3), &["--format", "table"])
        .succeeded();
    let tail: Vec<&str> = run.stdout.lines().rev().take(2).collect();
    // 3 x 120 = 360 jpy; usd: 49 - 6.13 (acme) + 49 (idle) = 91.87.
    assert_eq!(
        tail,
        [
            "all customers billed in usd (2): 91.87 usd",
            "all customers billed in jpy (1): 360 jpy"
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Determinism
// ---------------------------------------------------------------------------------------

#[test]
fn two_runs_give_byte_identical_output_whatever_the_threads() {
    let f = Fixture::new(PRO);
    // About 7 MB, so several 2 MiB decoding chunks go to several threads, with
    // retries and conflicting resends of the first chunk's events in the last one.
    let tokens_of = |prefix: &str, n: i64| -> Vec<String> {
        (0..n)
            .map(|i| {
                tokens(
                    &format!("{prefix}{i}"),
                    if i % 3 == 0 { "cust_idle" } else { "cust_acme" },
                    if i % 2 == 0 { "gpt-x" } else { "claude-y" },
                    json!(i),
                )
            })
            .collect()
    };
    let events = concat(&[
        resolutions("r", "cust_acme", 300),
        resolutions("s", "cust_idle", 20),
        tokens_of("t", 40_000),
        tokens_of("t", 200),
        (0..100)
            .map(|i| tokens(&format!("t{i}"), "cust_acme", "gpt-x", json!(i + 1)))
            .collect(),
    ]);
    assert!(events.iter().map(String::len).sum::<usize>() > 4 << 20);
    let a = f.rate(&events, &["--threads", "1"]).succeeded().stdout;
    let summary = f.summary();
    assert_eq!(
        (&summary["duplicates"], &summary["conflicts"]),
        (&json!(200), &json!(100))
    );
    let b = f.rate(&events, &["--threads", "8"]).succeeded().stdout;
    let c = f.rate(&events, &[]).succeeded().stdout;
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(f.summary(), summary);
    for format in ["csv", "table"] {
        let x = f.rate(&events, &["--format", format]).succeeded().stdout;
        let y = f
            .rate(&events, &["--format", format, "--threads", "3"])
            .succeeded()
            .stdout;
        assert_eq!(x, y, "{format}");
    }
}

#[test]
fn a_large_file_is_read_in_chunks_with_exact_line_numbers_and_totals() {
    // About 4 MB: several decoding chunks, so several threads are really used.
    let f = Fixture::new(PRO);
    let mut events = resolutions("r", "cust_acme", 25_000);
    for bad in [1, 7_777, 12_500, 24_999] {
        events[bad - 1] = format!("broken line {bad}");
    }
    let run = f.rate(&events, &["--threads", "4"]).succeeded();
    let numbers: Vec<u64> = f
        .rejects()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 7_777, 12_500, 24_999]);
    // 24 996 resolutions: 49 + 900 x 0.89 + 23 996 x 0.69 = 49 + 801 + 16 557.24
    // = 17 407.24; 12.5 % = 2 175.905 -> 2 175.91; amount 15 231.33.
    let lines = run.lines();
    assert_eq!(
        money(line(&lines, "cust_acme", "resolutions")),
        ["24996", "17407.24", "2175.91", "15231.33"]
    );
    let single = f.rate(&events, &["--threads", "1"]).succeeded();
    assert_eq!(single.stdout, run.stdout);
}

#[test]
fn the_order_of_events_does_not_change_the_invoice() {
    let f = Fixture::new(PRO);
    let events = concat(&[
        resolutions("r", "cust_acme", 120),
        (0..50)
            .map(|i| tokens(&format!("t{i}"), "cust_idle", "gpt-x", json!(i * 7)))
            .collect(),
    ]);
    let forward = f.rate(&events, &[]).succeeded().stdout;
    let mut reversed = events.clone();
    reversed.reverse();
    assert_eq!(f.rate(&reversed, &[]).succeeded().stdout, forward);
}

#[test]
fn line_ids_are_per_customer_price_and_period_and_carry_the_config_hash() {
    let f = Fixture::new(PRO);
    let lines = f
        .rate(&resolutions("r", "cust_acme", 10), &[])
        .succeeded()
        .lines();
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    for id in &ids {
        assert_eq!(id.len(), 32, "{id}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{id}"
        );
    }
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids are distinct");

    // The hash printed by validate is the one on every line.
    let validate = f.validate().succeeded();
    let hash = lines[0]["config_hash"].as_str().unwrap();
    assert_eq!(hash.len(), 16);
    assert!(
        validate
            .stdout
            .contains(&format!("price book hash {hash}\n")),
        "{}",
        validate.stdout
    );
    assert!(lines.iter().all(|l| l["config_hash"] == hash));

    // Different usage: same ids. A changed price: same ids (the line is replaced), new hash.
    let more = f
        .rate(&resolutions("r", "cust_acme", 400), &[])
        .succeeded()
        .lines();
    assert_eq!(
        more.iter().map(|l| l["id"].clone()).collect::<Vec<_>>(),
        lines.iter().map(|l| l["id"].clone()).collect::<Vec<_>>()
    );
    let repriced = Fixture::new(&PRO.replace(r#""0.89""#, r#""0.79""#));
    let again = repriced
        .rate(&resolutions("r", "cust_acme", 10), &[])
        .succeeded()
        .lines();
    assert_eq!(again[0]["id"], lines[0]["id"]);
    assert_ne!(again[0]["config_hash"], lines[0]["config_hash"]);
    // Another period: other ids.
    repriced.write("events.jsonl", b"");
    let december: Run = repriced
        .tally()
        .args([
            "rate",
            "--config",
            "tally.toml",
            "--events",
            "events.jsonl",
            "--period",
            "2026-12",
        ])
        .args(["--format", "json", "--now", NOW])
        .output()
        .unwrap()
        .into();
    let december = december.succeeded().lines();
    assert_ne!(december[0]["id"], lines[0]["id"]);
}

#[test]
fn rate_reads_pipes_skips_a_bom_and_refuses_inputs_it_would_misread_or_destroy() {
    let f = Fixture::new(PRO);
    let events = resolutions("r", "cust_acme", 3).join("\n") + "\n";
    let from_file = f.rate_bytes(events.as_bytes(), &[]).succeeded().stdout;

    // Through a pipe (`<(zcat ...)`, /dev/stdin): the same lines as from the file.
    let mut args = month_args("rate");
    args[4] = "/dev/stdin";
    args.extend(["--format", "json"]);
    let mut child = f
        .tally()
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(events.as_bytes())
        .unwrap();
    let piped = Run::from(child.wait_with_output().unwrap()).succeeded();
    assert_eq!(piped.stdout, from_file);

    // A byte-order mark is not part of the first event.
    let with_bom = [b"\xef\xbb\xbf".as_slice(), events.as_bytes()].concat();
    let bom = f.rate_bytes(&with_bom, &[]).succeeded();
    assert_eq!(bom.stdout, from_file);
    assert_eq!(f.read("rejects.jsonl"), "");

    // Compressed input is refused with what to do, not rejected line by line.
    let gzipped = [b"\x1f\x8b\x08\x00".as_slice(), &[0u8; 16]].concat();
    let refused = f.rate_bytes(&gzipped, &[]);
    assert_eq!(refused.code, 1);
    assert_shows(
        &refused.stderr,
        &["error: events file events.jsonl is gzip-compressed: decompress it first"],
    );

    // JSON of another shape too: an array (an HTTP batch's body), or pretty-printed.
    let first: Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    for (text, shape) in [
        (
            format!("[{}]\n", events.lines().collect::<Vec<_>>().join(",")),
            "is a JSON array",
        ),
        (
            serde_json::to_string_pretty(&first).unwrap(),
            "is pretty-printed JSON",
        ),
    ] {
        let refused = f.rate_bytes(text.as_bytes(), &[]);
        assert_eq!(refused.code, 1);
        assert_shows(
            &refused.stderr,
            &[&format!("error: events file events.jsonl {shape}")],
        );
    }

    // An output naming the events file would wipe it while it is read.
    f.write("events.jsonl", events.as_bytes());
    let mut args = month_args("rate");
    args.extend(["--rejects", "events.jsonl"]);
    let overwrite = Run::from(f.tally().args(&args).output().unwrap());
    assert_eq!(overwrite.code, 1);
    assert_shows(
        &overwrite.stderr,
        &["error: --rejects events.jsonl is the events file, which would be overwritten while it is read"],
    );
    assert_eq!(f.read("events.jsonl"), events);
    // By another name, too.
    std::fs::hard_link(f.path("events.jsonl"), f.path("linked.jsonl")).unwrap();
    let mut args = month_args("rate");
    args.extend(["--rejects", "linked.jsonl"]);
    let linked = Run::from(f.tally().args(&args).output().unwrap());
    assert_eq!(linked.code, 1, "{}", linked.stderr);
    assert_eq!(f.read("events.jsonl"), events);
    // A device is no file to destroy: /dev/null may be both.
    let mut args = month_args("rate");
    args[4] = "/dev/null";
    args.extend(["--rejects", "/dev/null"]);
    Run::from(f.tally().args(&args).output().unwrap()).succeeded();

    let mut args = month_args("rate");
    args[4] = ".";
    let directory = Run::from(f.tally().args(&args).output().unwrap());
    assert_shows(
        &directory.stderr,
        &["error: events file . is a directory; give a file of JSON lines"],
    );
}
