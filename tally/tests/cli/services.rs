//! `tally serve` without Kafka: probes while Kafka is awaited, ingest answering 503
//! meanwhile, logs that cannot be written, startup errors and signals. The services
//! with Kafka are tested in tests/pipeline.

use super::*;

/// `tally serve aggregator` with brokers that refuse every connection (nothing
/// listens on port 1), its endpoint on the port returned, its log to `log`.
fn aggregator_without_kafka(
    log: impl Into<std::process::Stdio>,
) -> (Fixture, std::process::Child, u16) {
    let port = common::free_port();
    let f = Fixture::new(&format!(
        "{PRO}\n[kafka]\nbrokers = \"127.0.0.1:1\"\n[aggregator]\nmetrics_listen = \"127.0.0.1:{port}\"\n"
    ));
    let child = f
        .tally()
        .args(["serve", "aggregator", "--config", "tally.toml"])
        .stderr(log)
        .spawn()
        .unwrap();
    (f, child, port)
}

#[test]
fn an_aggregator_waiting_for_kafka_answers_probes_and_says_why_it_is_not_ready() {
    let (_f, mut child, port) = aggregator_without_kafka(std::process::Stdio::piped());
    let get = |path: &str| common::get(port, path);
    let deadline = Instant::now() + Duration::from_secs(30);
    let readyz = loop {
        match get("/readyz") {
            Some((503, body)) if body.contains("waiting for Kafka") => break body,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("/readyz did not say it waits for Kafka: {other:?}"),
        }
    };
    assert!(readyz.contains("BrokerTransportFailure"), "{readyz}");
    assert_eq!(get("/healthz").map(|(status, _)| status), Some(200));
    // The counters alerts watch are exported at 0 already.
    let (_, metrics) = get("/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "tally_aggregator_events_lost_to_retention_total 0"),
        "{metrics}"
    );
    // A stop asked for is no error, waiting or not.
    assert!(terminate(&mut child).success());
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("stopped before Kafka answered"), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
}

/// A resolution of cust_acme posted to ingest on `port` with `key`; `None` while
/// nothing answers there.
fn post_resolution(port: u16, key: &str) -> Option<ureq::http::Response<ureq::Body>> {
    ureq::post(&format!("http://127.0.0.1:{port}/v1/events"))
        .header("Authorization", &format!("Bearer {key}"))
        .header("Content-Type", "application/cloudevents+json")
        .config()
        .http_status_as_error(false)
        .build()
        .send(event(
            "r-1",
            "ai.resolution",
            "cust_acme",
            "2026-11-02T10:00:00Z",
            None,
        ))
        .ok()
}

#[test]
fn serve_all_takes_events_with_503_and_retry_after_while_kafka_is_awaited() {
    let free_port = common::free_port;
    let (ingest, aggregator, rater) = (free_port(), free_port(), free_port());
    let f = Fixture::new(&format!(
        "{PRO}\n[kafka]\nbrokers = \"127.0.0.1:1\"\n\
         [ingest]\nlisten = \"127.0.0.1:{ingest}\"\n\
         [[ingest.api_keys]]\nkey = \"cli-test-key-0123456789\"\ntenant = \"t\"\nsources = [\"*\"]\n\
         [aggregator]\nmetrics_listen = \"127.0.0.1:{aggregator}\"\n\
         [rater]\nmetrics_listen = \"127.0.0.1:{rater}\"\n"
    ));
    let mut child = f
        .tally()
        .args(["serve", "all", "--config", "tally.toml"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let send = || post_resolution(ingest, "cli-test-key-0123456789");
    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        match send() {
            Some(response) if response.status() == 503 => break response,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("ingest did not answer 503: {:?}", other.map(|r| r.status())),
        }
    };
    assert!(refused.headers().contains_key("retry-after"), "{refused:?}");
    // The aggregator says why it is not ready once its first attempt to reach Kafka
    // has failed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = common::get(aggregator, "/readyz").unwrap();
        assert_eq!(status, 503);
        if body.contains("waiting for Kafka") {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(common::get(ingest, "/healthz").map(|(s, _)| s), Some(200));
    assert!(terminate(&mut child).success());
}

#[test]
fn serve_all_whose_ingest_cannot_listen_while_kafka_is_awaited_exits_with_why() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ingest = taken.local_addr().unwrap().port();
    let (aggregator, rater) = (common::free_port(), common::free_port());
    let f = Fixture::new(&format!(
        "{PRO}\n[kafka]\nbrokers = \"127.0.0.1:1\"\n\
         [ingest]\nlisten = \"127.0.0.1:{ingest}\"\n\
         [[ingest.api_keys]]\nkey = \"cli-test-key-0123456789\"\ntenant = \"t\"\nsources = [\"*\"]\n\
         [aggregator]\nmetrics_listen = \"127.0.0.1:{aggregator}\"\n\
         [rater]\nmetrics_listen = \"127.0.0.1:{rater}\"\n"
    ));
    let run = Run::from(
        f.tally()
            .args(["serve", "all", "--config", "tally.toml"])
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_shows(&run.stderr, &[&format!("127.0.0.1:{ingest}")]);
    drop(taken);
}

/// Sends SIGTERM and waits up to 15 s for the process to end.
fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not stop it");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_service_whose_log_cannot_be_written_goes_on_serving() {
    // Kafka refuses every connection, so the aggregator logs while it waits; its log
    // goes to a full disk (every write fails with ENOSPC).
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (_f, mut child, port) = aggregator_without_kafka(full);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match common::get(port, "/readyz") {
            Some((503, body)) if body.contains("waiting for Kafka") => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("/readyz did not say it waits for Kafka: {other:?}"),
        }
    }
    // Its start and the failed connections were logged (and lost) by now.
    assert!(child.try_wait().unwrap().is_none(), "it stopped");
    assert!(terminate(&mut child).success());
}

/// A config whose API key's variable nobody set, and `tally serve ingest` run on it
/// with `TALLY_LOG_FORMAT` set to `log_format`: it cannot start.
fn ingest_without_its_key(log_format: &str) -> (Fixture, Run) {
    let f = Fixture::new(&format!(
        "{PRO}\n[[ingest.api_keys]]\nkey_env = \"TALLY_TEST_KEY_NOBODY_SET\"\ntenant = \"t\"\nsources = [\"*\"]\n"
    ));
    let run = Run::from(
        f.tally()
            .args(["serve", "ingest", "--config", "tally.toml"])
            .env("TALLY_LOG_FORMAT", log_format)
            .env_remove("TALLY_TEST_KEY_NOBODY_SET")
            .output()
            .unwrap(),
    );
    (f, run)
}

#[test]
fn an_empty_log_format_variable_counts_as_unset() {
    let (_f, run) = ingest_without_its_key("");
    // The service's own refusal, in text logs, not an argument error.
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("API keys are missing"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.trim_start().starts_with('{'), "{}", run.stderr);
}

#[test]
fn a_service_that_cannot_start_says_why_in_its_log_format() {
    // In any case, as the variable may be written.
    let (f, run) = ingest_without_its_key("JSON");
    assert_eq!(run.code, 1);
    // Every line a JSON object, the error among them: a log shipper parses them all.
    let lines: Vec<Value> = (run.stderr.lines())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let errors: Vec<&Value> = lines.iter().filter(|l| l["level"] == "ERROR").collect();
    assert_eq!(errors.len(), 1, "the error logged once: {lines:#?}");
    let said = errors[0]["error"].as_str().unwrap();
    assert!(
        said.contains("API keys are missing") && said.contains("TALLY_TEST_KEY_NOBODY_SET"),
        "{said}"
    );
    // `tally validate --service` fails as the start does; without it, it warns.
    let validate = |service: &[&str]| {
        Run::from(
            f.tally()
                .args(["validate", "--config", "tally.toml"])
                .args(service)
                .env_remove("TALLY_TEST_KEY_NOBODY_SET")
                .output()
                .unwrap(),
        )
    };
    let warned = validate(&[]).succeeded();
    assert!(warned.stdout.contains("warning:"), "{}", warned.stdout);
    let refused = validate(&["--service", "ingest"]);
    assert_eq!(refused.code, 1);
    assert_shows(
        &refused.stderr,
        &["ingest's API keys are missing", "TALLY_TEST_KEY_NOBODY_SET"],
    );
    assert_eq!(validate(&["--service", "all"]).code, 1);
    validate(&["--service", "rater"]).succeeded();
}

#[test]
fn a_second_signal_stops_a_service_that_is_still_finishing_its_work() {
    let port = common::free_port();
    // No Kafka is needed to listen: ingest connects in the background.
    let f = Fixture::new(&format!(
        "{PRO}\n[kafka]\nbrokers = \"127.0.0.1:1\"\n[ingest]\nlisten = \"127.0.0.1:{port}\"\n\
         [[ingest.api_keys]]\nkey = \"cli-test-key-0123456789\"\ntenant = \"t\"\nsources = [\"*\"]\n"
    ));
    let mut child = f
        .tally()
        .args(["serve", "ingest", "--config", "tally.toml"])
        // Empty counts as unset: logs at info, not a filter that logs nothing.
        .env("RUST_LOG", "")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stalled = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("ingest did not listen: {e}"),
        }
    };
    // A request answered first, so the connection is one ingest serves; then one begun
    // and never finished: the first SIGTERM waits for it.
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"ok\n") {
        let mut buffer = [0; 256];
        let read = std::io::Read::read(&mut stalled, &mut buffer).unwrap();
        assert!(read > 0, "closed: {:?}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buffer[..read]);
    }
    stalled
        .write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let signal = |child: &std::process::Child| {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    // Time for ingest to read what was written, on a connection it is serving.
    std::thread::sleep(Duration::from_millis(300));
    signal(&child);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        child.try_wait().unwrap().is_none(),
        "still finishing its work"
    );
    signal(&child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "a second signal did not stop it");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130));
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("second signal: stopping at once"), "{log}");
}

#[test]
fn ingest_reads_its_api_keys_again_on_sighup_without_a_restart() {
    let port = common::free_port();
    let section = |keys: &[&str]| {
        let keys: String = (keys.iter())
            .map(|key| {
                format!("[[ingest.api_keys]]\nkey = \"{key}\"\ntenant = \"t\"\nsources = [\"*\"]\n")
            })
            .collect();
        format!("{PRO}\n[kafka]\nbrokers = \"127.0.0.1:1\"\n[ingest]\nlisten = \"127.0.0.1:{port}\"\n{keys}")
    };
    let (old, new) = ("old-key-0123456789abcdef", "new-key-0123456789abcdef");
    let f = Fixture::new(&section(&[old]));
    let mut child = f
        .tally()
        .args(["serve", "ingest", "--config", "tally.toml"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kafka is away: a valid key gets 503, an unknown one 401.
    let status = |key: &str| post_resolution(port, key).map(|r| r.status().as_u16());
    let until = |what: &str, expected: [Option<u16>; 2]| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while [status(old), status(new)] != expected {
            assert!(
                Instant::now() < deadline,
                "{what}: {:?}",
                [status(old), status(new)]
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let hangup = |child: &std::process::Child| {
        let sent = std::process::Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    until("the old key only", [Some(503), Some(401)]);
    // Both keys for the rotation, then the old one revoked.
    f.write("tally.toml", section(&[old, new]).as_bytes());
    hangup(&child);
    until("both keys", [Some(503), Some(503)]);
    f.write("tally.toml", section(&[new]).as_bytes());
    hangup(&child);
    until("the new key only", [Some(401), Some(503)]);
    // A configuration that cannot be read changes nothing.
    f.write("tally.toml", b"[[ingest.api_keys]]\nkey = ");
    hangup(&child);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!([status(old), status(new)], [Some(401), Some(503)]);
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP stopped it");
    assert!(terminate(&mut child).success());
}

#[test]
fn an_aggregator_ignores_sighup_and_says_so() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let (_f, mut child, port) = aggregator_without_kafka(log.reopen().unwrap());
    // Its signal handlers are in place once it answers probes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::get(port, "/readyz").is_none() {
        assert!(Instant::now() < deadline, "no answer on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(log.path())
        .unwrap()
        .contains("SIGHUP ignored")
    {
        assert!(child.try_wait().unwrap().is_none(), "SIGHUP stopped it");
        assert!(Instant::now() < deadline, "no line about SIGHUP");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(terminate(&mut child).success());
}

#[test]
fn a_rust_log_that_cannot_be_read_is_said_and_the_services_log_at_info() {
    let f = Fixture::new(PRO);
    let run: Run = (f.tally())
        .args(["serve", "ingest", "--config", "gone.toml"])
        .env("RUST_LOG", "nonsense===")
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 1);
    assert_shows(
        &run.stderr,
        &[
            "RUST_LOG cannot be read, so the services log at info",
            "gone.toml",
        ],
    );
}
