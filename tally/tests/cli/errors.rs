//! `tally validate`, and how every command refuses a bad configuration, a missing file
//! or a malformed argument: where, what, why, and the exit status.

use super::*;

#[test]
fn validate_accepts_a_good_config_and_summarises_it() {
    let f = Fixture::new(PRO);
    let run = f.validate().succeeded();
    let first = run.stdout.lines().next().unwrap();
    let hash = first.rsplit(' ').next().unwrap().to_owned();
    assert_eq!(
        run.stdout,
        format!(
            "tally.toml is valid: 2 meters, 1 plan with 3 prices, 2 customers; price book hash {hash}\n\
             services: Kafka 127.0.0.1:9092 (topics tally.*), ClickHouse http://127.0.0.1:8123 database tally, \
             ingest on 127.0.0.1:9101 with 0 API keys, instance id agg-1\n\
             aggregator: windows of 1h, dedupe horizon 35d, events at most 5m ahead, months closed 1h after they end, \
             commits every 200ms, metrics on 127.0.0.1:9102\n\
             rater: lines written every 500ms (at least 200ms apart once caught up), \
             stored lines checked against the book every 10m, windows not stored, metrics on 127.0.0.1:9103\n"
        )
    );
    // Settings that change what the services do are shown as they will run.
    let f = Fixture::new(&format!(
        "{PRO}\n[aggregator]\nclose_idle_after = \"2h\"\naccept_lost_state = true\n\n[rater]\nstore_windows = true\nflush_interval = \"2s\"\n"
    ));
    let shown = f.validate().succeeded().stdout;
    for expected in [
        "months closed 1h after they end (or once their partition is idle for 2h), commits every 200ms, metrics on 127.0.0.1:9102, accepting lost state\n",
        "rater: lines written every 2s (at least 200ms apart once caught up), stored lines checked against the book every 10m, windows stored,",
    ] {
        assert!(shown.contains(expected), "{expected:?} not in {shown}");
    }
}

#[test]
fn validate_against_the_deployed_book_lists_what_the_new_one_changes_and_what_that_does() {
    let f = Fixture::new(PRO);
    f.write("deployed.toml", PRO.as_bytes());
    let against = |book: &str| {
        f.write("tally.toml", book.as_bytes());
        let run: Run = (f.tally())
            .args([
                "validate",
                "--config",
                "tally.toml",
                "--deployed",
                "deployed.toml",
            ])
            .output()
            .unwrap()
            .into();
        run.succeeded().stdout
    };
    let same = against(PRO);
    assert!(
        same.ends_with("  no change to meters, plans or customers\n"),
        "{same}"
    );
    let new = PRO
        .replacen(
            r#"value_property = "$.tokens""#,
            r#"value_property = "$.usage""#,
            1,
        )
        .replacen(r#"unit_amount = "0.02""#, r#"unit_amount = "0.025""#, 1);
    let shown = against(&new);
    let hash = |book: &str| {
        f.write("other.toml", book.as_bytes());
        let run: Run = (f.tally())
            .args(["validate", "--config", "other.toml"])
            .output()
            .unwrap()
            .into();
        let first = run.succeeded().stdout.lines().next().unwrap().to_owned();
        first.rsplit(' ').next().unwrap().to_owned()
    };
    assert_shows(
        &shown,
        &[
            &format!(
                "against deployed.toml (price book hash {} -> {}):\n",
                hash(PRO),
                hash(&new)
            ),
            "  meter \"tokens\": value_property \"$.tokens\" -> \"$.usage\": an aggregator holding usage of this meter refuses to start with this book",
            "  plan \"pro\" price \"gpt-tokens\": unit_amount \"0.02\" -> \"0.025\": every month not yet settled is billed anew, ended months that may have been invoiced included",
        ],
    );
    // A deployed book that cannot be read fails before the new one is said valid.
    let missing: Run = (f.tally())
        .args([
            "validate",
            "--config",
            "tally.toml",
            "--deployed",
            "gone.toml",
        ])
        .output()
        .unwrap()
        .into();
    assert_eq!((missing.code, missing.stdout.as_str()), (1, ""));
    assert!(missing.stderr.contains("gone.toml"), "{}", missing.stderr);
}

#[test]
fn validate_names_a_misspelt_variable_and_a_key_whose_secret_is_not_set() {
    let book = format!(
        "{PRO}\n[[ingest.api_keys]]\nkey_env = \"TALLY_SUPPORT_KEY\"\ntenant = \"support\"\nsources = [\"*\"]\n"
    );
    let f = Fixture::new(&book);
    let validate = |secret: Option<&str>| {
        let mut command = f.tally();
        command
            .args(["validate", "--config", "tally.toml"])
            .env("TALLY_KAFKA_TOPIC_PREFX", "billing");
        match secret {
            Some(secret) => command.env("TALLY_SUPPORT_KEY", secret),
            None => command.env_remove("TALLY_SUPPORT_KEY"),
        };
        Run::from(command.output().unwrap()).succeeded().stdout
    };
    let misspelt = "warning: TALLY_KAFKA_TOPIC_PREFX: is set, but Tally reads no such variable (did you mean TALLY_KAFKA_TOPIC_PREFIX?): it changes nothing\n";
    let unset = validate(None);
    for expected in [
        "(topics tally.*)",
        "with 1 API key (1 without its secret set, below)",
        "warning: ingest.api_keys[0].key_env: ",
        misspelt,
    ] {
        assert!(unset.contains(expected), "{expected:?} not in {unset}");
    }
    // The variable a key_env names is read: only the misspelt one is warned about.
    let set = validate(Some("s3cret-support-key"));
    assert!(set.contains("with 1 API key, instance id"), "{set}");
    assert_eq!(set.matches("warning: ").count(), 1, "{set}");
    assert!(set.ends_with(misspelt), "{set}");
    // Said with a book's problems too, as the slip may be one of their causes.
    f.write(
        "tally.toml",
        book.replace("plan = \"pro\"", "plan = \"pr\"").as_bytes(),
    );
    let invalid = Run::from(
        (f.tally())
            .args(["validate", "--config", "tally.toml"])
            .env("TALLY_KAFKA_TOPIC_PREFX", "billing")
            .output()
            .unwrap(),
    );
    assert_eq!(invalid.code, 1, "{}", invalid.stderr);
    assert!(invalid.stderr.starts_with(misspelt), "{}", invalid.stderr);
}

#[test]
fn the_instance_id_defaults_to_the_host_name_even_where_hostname_is_not_exported() {
    // systemd exports no HOSTNAME: every host would share the id `0`, and so one
    // transactional id, fencing each other's aggregators.
    let f = Fixture::new(PRO);
    let run: Run = (f.tally())
        .args(["validate", "--config", "tally.toml"])
        .env_remove("TALLY_INSTANCE_ID")
        .env_remove("HOSTNAME")
        .output()
        .unwrap()
        .into();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let shown = run.succeeded().stdout;
    assert!(
        shown.contains(&format!("instance id {}\n", host.trim())),
        "{shown}"
    );
    let run: Run = (f.tally())
        .args(["validate", "--config", "tally.toml"])
        .env_remove("TALLY_INSTANCE_ID")
        .env("HOSTNAME", "exported-host")
        .output()
        .unwrap()
        .into();
    assert!(run
        .succeeded()
        .stdout
        .contains("instance id exported-host\n"));
}

#[test]
fn validate_names_the_place_of_every_problem_and_exits_1() {
    let bad = PRO
        .replace("up_to = 1000,", "up_to = 100,")
        .replace(r#"up_to = "inf""#, "up_to = 5000")
        .replacen(r#"meter = "tokens""#, r#"meter = "tokenz""#, 1)
        .replace(r#"percent_off = "12.5""#, r#"percent_off = "112.5""#)
        .replace(r#"currency = "usd""#, r#"currency = "dollars""#);
    let f = Fixture::new(&bad);
    let run = f.validate();
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "");
    for expected in [
        "tally.toml has 5 problem(s):",
        r#"  - plans[pro].currency: unknown currency "dollars""#,
        "  - plans[pro].prices[resolutions].tiers[1].up_to: tiers must strictly increase: 100 follows 100",
        r#"  - plans[pro].prices[resolutions].tiers[2].up_to: the last tier must have up_to = "inf" (found 5000)"#,
        r#"  - plans[pro].prices[gpt-tokens].meter: unknown meter "tokenz"; known meters: resolutions, tokens"#,
        "  - customers[cust_acme].discounts[0].percent_off: must be between 0 and 100 (found 112.5)",
    ] {
        assert!(run.stderr.contains(expected), "{expected:?} not in:\n{}", run.stderr);
    }
}

#[test]
fn validate_lists_the_services_problems_with_the_price_books() {
    let bad = PRO.replace(r#"currency = "usd""#, r#"currency = "dollars""#)
        + "\n[ingest]\nlisten = \"nowhere\"\n";
    let run = Fixture::new(&bad).validate();
    assert_eq!(run.code, 1);
    for expected in [
        "tally.toml has 2 problem(s):",
        r#"  - plans[pro].currency: unknown currency "dollars""#,
        r#"  - ingest.listen: "nowhere" is not an address to listen on"#,
    ] {
        assert!(
            run.stderr.contains(expected),
            "{expected:?} not in:\n{}",
            run.stderr
        );
    }
}

#[test]
fn validate_refuses_floats_unknown_fields_and_missing_value_properties() {
    let cases = [
        (
            PRO.replace(r#"unit_amount = "0.89""#, "unit_amount = 0.89"),
            "write decimal amounts as strings",
        ),
        (
            PRO.replace(
                r#"currency = "usd""#,
                "currency = \"usd\"\ncolour = \"red\"",
            ),
            "unknown field `colour`",
        ),
        (
            PRO.replace("value_property = \"$.tokens\"\n", ""),
            r#"meters[tokens].value_property: required for aggregation = "sum""#,
        ),
        (
            PRO.replace(r#"price = "resolutions""#, r#"price = "resolution""#),
            r#"customers[cust_acme].discounts[0].price: plan "pro" has no price "resolution""#,
        ),
        (
            format!("{PRO}\n[[customers]]\nid = \"cust_idle\"\nplan = \"pro\"\n"),
            "customers[cust_idle].id: duplicate customer id; ids must be unique",
        ),
        (
            PRO.replace(r#"flat_amount = "49""#, r#"flat_amount = "-49""#),
            "plans[pro].prices[resolutions].tiers[0].flat_amount: amounts must not be negative",
        ),
    ];
    for (config, expected) in cases {
        let run = Fixture::new(&config).validate();
        assert_eq!(run.code, 1, "{expected}");
        assert!(
            run.stderr.contains(expected),
            "{expected:?} not in:\n{}",
            run.stderr
        );
    }
}

#[test]
fn validate_reports_a_missing_file() {
    let f = Fixture::new(PRO);
    let run: Run = f
        .tally()
        .args(["validate", "--config", "nope.toml"])
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("cannot read configuration nope.toml"),
        "{}",
        run.stderr
    );
}

#[test]
fn rate_validates_the_config_first() {
    let f = Fixture::new(&PRO.replace("up_to = 1000,", "up_to = 100,"));
    let run = f.rate(&resolutions("r", "cust_acme", 1), &[]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.contains(
            "plans[pro].prices[resolutions].tiers[1].up_to: tiers must strictly increase"
        ),
        "{}",
        run.stderr
    );
    assert!(!f.path("summary.json").exists());
}

#[test]
fn rate_fails_with_exit_1_on_a_missing_events_file() {
    let f = Fixture::new(PRO);
    let run: Run = f
        .tally()
        .args([
            "rate",
            "--config",
            "tally.toml",
            "--events",
            "missing.jsonl",
            "--period",
            "2026-11",
            "--now",
            NOW,
        ])
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("events file missing.jsonl: No such file"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_malformed_period_or_clock_is_a_usage_error_with_exit_2() {
    let f = Fixture::new(PRO);
    f.write("events.jsonl", b"");
    for (period, now) in [("2026-13", NOW), ("2026-11", "yesterday")] {
        let run: Run = f
            .tally()
            .args([
                "rate",
                "--config",
                "tally.toml",
                "--events",
                "events.jsonl",
                "--period",
                period,
                "--now",
                now,
            ])
            .output()
            .unwrap()
            .into();
        // Like other command-line tools, tally exits 2 when its arguments are wrong and
        // 1 when a run fails.
        assert_eq!(run.code, 2, "--period {period} --now {now}: {}", run.stderr);
    }
}

#[test]
fn rate_fails_with_exit_1_when_the_rejects_file_cannot_be_created() {
    let f = Fixture::new(PRO);
    f.write("events.jsonl", b"");
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
        .args(["--rejects", "no/such/dir/rejects.jsonl"])
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("cannot create rejects file no/such/dir/rejects.jsonl"),
        "{}",
        run.stderr
    );
}

#[test]
fn validate_refuses_a_kafka_property_librdkafka_refuses_without_showing_its_value() {
    for (property, shown) in [
        (
            r#""sasl.pasword" = "hunter2-secret""#,
            r#"[kafka] properties."sasl.pasword": No such configuration property: "sasl.pasword""#,
        ),
        (
            r#""socket.timeout.ms" = "hunter2-secret""#,
            r#"[kafka] properties."socket.timeout.ms": Invalid value for configuration property "socket.timeout.ms""#,
        ),
    ] {
        let f = Fixture::new(&format!("{PRO}\n[kafka]\nproperties = {{ {property} }}\n"));
        let run = Run::from(
            f.tally()
                .args(["validate", "--config", "tally.toml"])
                .output()
                .unwrap(),
        );
        assert_eq!(run.code, 1, "{}", run.stdout);
        assert_shows(
            &run.stderr,
            &["tally.toml is not valid: ", shown, "its value is not shown"],
        );
        assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);
    }
}

#[test]
fn validate_refuses_kafka_properties_librdkafka_refuses_only_when_a_client_is_made() {
    let f = Fixture::new(&format!(
        "{PRO}\n[kafka]\nproperties = {{ \"message.timeout.ms\" = \"1\" }}\n"
    ));
    let run = Run::from(
        f.tally()
            .args(["validate", "--config", "tally.toml"])
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_shows(
        &run.stderr,
        &[
            "[kafka] properties: ",
            "linger.ms",
            "change the properties it names",
        ],
    );
}

#[test]
fn validate_for_the_rater_reads_its_clickhouse_ca_file_as_its_start_would() {
    let f = Fixture::new(&format!(
        "{PRO}\n[clickhouse]\nurl = \"https://127.0.0.1:8443\"\nca_file = \"missing-ca.pem\"\n"
    ));
    let validate = |service: &str| {
        Run::from(
            f.tally()
                .args(["validate", "--config", "tally.toml", "--service", service])
                .output()
                .unwrap(),
        )
    };
    for service in ["rater", "all"] {
        let run = validate(service);
        assert_eq!(run.code, 1, "{service}: {}", run.stdout);
        assert_shows(
            &run.stderr,
            &[
                "the rater cannot start",
                "cannot use missing-ca.pem as clickhouse.ca_file",
            ],
        );
    }
    // Only the rater reads the file: another service's host need not have it.
    validate("ingest").succeeded();
    f.write("missing-ca.pem", b"not a certificate\n");
    let run = validate("rater");
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_shows(&run.stderr, &["missing-ca.pem"]);
    // A CA file with a plain http url: the rater's start refuses it, no other's.
    f.write(
        "tally.toml",
        format!(
            "{PRO}\n[clickhouse]\nurl = \"http://127.0.0.1:8123\"\nca_file = \"missing-ca.pem\"\n"
        )
        .as_bytes(),
    );
    let run = validate("rater");
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_shows(&run.stderr, &["is not an https:// url"]);
    validate("ingest").succeeded();
}
