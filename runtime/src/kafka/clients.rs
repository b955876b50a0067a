//! Client configuration every Tally client shares. In: [`KafkaSettings`]; out: a
//! librdkafka configuration with the brokers, the operator's `[kafka] properties` (TLS,
//! SASL, tunables) and what Tally sets itself, the producer and fetch tuning, and
//! librdkafka's errors and logs routed to tracing.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};
use tally_schemas::config::KafkaSettings;

use crate::throttle::LogThrottle;

use super::MAX_RECORD_BYTES;

/// Brokers and pass-through properties; each client adds its own settings: those Tally
/// needs for correctness with `set` or [`force`], which replace an operator's value
/// (validation refuses in `[kafka] properties` the ones every client needs; one
/// client's own, such as the state reader's fetch settings or the transactional
/// producer's record size, apply to that client only and leave the others to the
/// operator's), tunables with [`tunable`], which leaves an operator's value in place.
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (name, value) in &settings.properties {
        config.set(name, value);
    }
    config.set("bootstrap.servers", &settings.brokers);
    // Tally creates its topics with the partitions and retention they need
    // (`ensure_topics`); a producer must not have the broker make one with its defaults
    // (librdkafka lets producers do so unless told otherwise).
    config.set("allow.auto.create.topics", "false");
    config
}

/// librdkafka's other names for the properties Tally sets or reads: given under
/// either, a value is the operator's. (When both names are set, librdkafka keeps the
/// one set last, and rust-rdkafka sets them in hash-map order: which one applies would
/// differ from one start to the next.)
const ALIASES: &[(&str, &str)] = &[
    ("linger.ms", "queue.buffering.max.ms"),
    ("compression.type", "compression.codec"),
    ("max.partition.fetch.bytes", "fetch.message.max.bytes"),
    ("message.timeout.ms", "delivery.timeout.ms"),
];

/// librdkafka's other name for `name`, whichever of the two it is.
fn alias_of(name: &str) -> Option<&'static str> {
    ALIASES.iter().find_map(|&(one, other)| {
        if name == one {
            Some(other)
        } else if name == other {
            Some(one)
        } else {
            None
        }
    })
}

/// The value `[kafka] properties` gives `name`, under either of its names.
pub fn configured<'s>(settings: &'s KafkaSettings, name: &str) -> Option<&'s str> {
    let alias = alias_of(name);
    (settings.properties.get(name))
        .or_else(|| alias.and_then(|a| settings.properties.get(a)))
        .map(String::as_str)
}

/// Sets Tally's default for a tunable, unless `[kafka] properties` set it (under
/// either of its names).
pub fn tunable<'c>(
    config: &'c mut ClientConfig,
    name: &str,
    default: &str,
) -> &'c mut ClientConfig {
    let alias = alias_of(name);
    if config.get(name).is_none() && alias.and_then(|a| config.get(a)).is_none() {
        config.set(name, default);
    }
    config
}

/// Sets a property a client depends on whatever `[kafka] properties` gives it, under
/// either of its names: the operator's value under the other name is removed, or it
/// could be the one librdkafka keeps.
pub fn force<'c>(config: &'c mut ClientConfig, name: &str, value: &str) -> &'c mut ClientConfig {
    if let Some(alias) = alias_of(name) {
        config.remove(alias);
    }
    config.set(name, value)
}

/// librdkafka's error callback, logged without flooding: while the brokers are out of
/// reach it reports "all brokers down" many times a second, for every client, and the
/// services' readiness already says so (after 30 s). Each kind of error (its code) is
/// logged at most once a minute in the whole process ([`LogThrottle`]), with how many
/// like it were left out since; a lost connection as a warning, as librdkafka retries
/// it and a broker restart is ridden out.
pub(super) fn log_client_error(error: &KafkaError, reason: &str) {
    static LOGGED: LazyLock<LogThrottle<Option<RDKafkaErrorCode>>> =
        LazyLock::new(LogThrottle::default);
    let code = error.rdkafka_error_code();
    let Some(left_out) = LOGGED.due(code, Instant::now()) else {
        return;
    };
    let message = "librdkafka error (each kind at most once a minute; left_out: as many since)";
    match code {
        Some(
            RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::Resolve,
        ) => tracing::warn!(%error, reason, left_out, "{message}"),
        _ => tracing::error!(%error, reason, left_out, "{message}"),
    }
}

/// The context of clients with nothing else to handle (an admin client, ingest's
/// producer): their errors, logged as above.
#[derive(Debug, Default)]
pub struct ClientErrors;

impl ClientContext for ClientErrors {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(&error, reason);
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }
}

/// For a producer that is never given a record (a probe of the brokers).
impl ProducerContext for ClientErrors {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// librdkafka's own log lines, for every client's context. librdkafka logs each
/// failed connection (`FAIL`: refused, reset, timed out) as an error, for every client
/// and every reconnect attempt: a broker restart the services ride out made hundreds
/// of ERROR lines, paging whoever alerts on them. Here they are warnings, at most one
/// a minute in the whole process, with how many were left out since.
pub(super) fn log_librdkafka(level: RDKafkaLogLevel, facility: &str, message: &str) {
    static CONNECTION_FAILURES: LazyLock<LogThrottle<&'static str>> =
        LazyLock::new(LogThrottle::default);
    use RDKafkaLogLevel as Level;
    // A broker away fails every connection and times out every request in flight,
    // many a second: each kind is logged at most once a minute.
    let connection_failure = match facility {
        "FAIL" => Some("FAIL"),
        "REQTMOUT" => Some("REQTMOUT"),
        _ => None,
    };
    if let Some(kind) = connection_failure {
        if let Some(left_out) = CONNECTION_FAILURES.due(kind, Instant::now()) {
            tracing::warn!(target: "librdkafka", left_out, "librdkafka: {facility} {message} (connection failures at most once a minute, and request timeouts; left_out: as many since of this kind)");
        }
        return;
    }
    match level {
        // An abortable transaction error (a rebalance's new generation fails the open
        // transaction's offsets, as every deploy does) is the aggregator's to judge,
        // and it logs what it does about it; a fatal one librdkafka logs as an alert.
        Level::Error if facility == "TXNERR" => {
            tracing::warn!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        Level::Emerg | Level::Alert | Level::Critical | Level::Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        Level::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {facility} {message}"),
        Level::Notice | Level::Info => {
            tracing::info!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        Level::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}"),
    }
}

/// How long a record of ingest's or the aggregator's waits to travel with others: a few
/// ms put a request's events, or a transaction's records, in few produce requests.
pub const LINGER: Duration = Duration::from_millis(5);

/// [`client_config`] for a producer that writes each record once, in order, to every
/// in-sync replica: what every Tally producer needs, as money rides on its records.
/// Records wait up to `linger` to travel in batches, lz4-compressed; `[kafka]
/// properties` may set either tunable.
pub fn idempotent_producer_config(settings: &KafkaSettings, linger: Duration) -> ClientConfig {
    let mut config = client_config(settings);
    config.set("enable.idempotence", "true").set("acks", "all");
    tunable(&mut config, "linger.ms", &linger.as_millis().to_string());
    tunable(&mut config, "compression.type", "lz4");
    config
}

/// [`idempotent_producer_config`] for the aggregator's transactional producer, `id` its
/// transactional id: records up to [`MAX_RECORD_BYTES`], and a transaction the broker
/// aborts after a minute open.
pub fn transactional_producer_config(settings: &KafkaSettings, id: &str) -> ClientConfig {
    let mut config = idempotent_producer_config(settings, LINGER);
    config
        .set("transactional.id", id)
        .set("message.max.bytes", MAX_RECORD_BYTES.to_string())
        .set("transaction.timeout.ms", "60000");
    config
}

/// A Kafka request that failed, and what Tally was doing: every service's Kafka
/// error, so each says what it was about in the same words.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what}: {source}")]
pub struct KafkaOpError {
    pub what: String,
    pub source: KafkaError,
}

/// Maps a Kafka error to a [`KafkaOpError`] saying what was being done (`what`, in
/// the infinitive: "commit the offsets"); `?` makes it the service's error.
pub fn failed_to(what: impl Into<String>) -> impl FnOnce(KafkaError) -> KafkaOpError {
    let what = what.into();
    move |source| KafkaOpError { what, source }
}

/// `[kafka] properties` librdkafka refuses.
#[derive(Debug, thiserror::Error)]
pub enum PropertyError {
    #[error("[kafka] properties.\"{name}\": {description} (its value is not shown: it may be a secret); fix or remove it")]
    Refused { name: String, description: String },
    /// Each is accepted, but not together with the others or with what Tally sets.
    #[error("[kafka] properties: {description}, with the settings Tally's clients add (linger.ms 5 and transaction.timeout.ms 60000 on its producers, unless the first is set); change the properties it names")]
    Combination { description: String },
}

/// Checks every `[kafka] properties` entry with librdkafka, without creating a client,
/// so a mistyped or unsupported property is refused at start. librdkafka's own error
/// would print the value, and a mistyped `sasl.password` holds the password.
pub fn check_properties(settings: &KafkaSettings) -> Result<(), PropertyError> {
    for (name, value) in &settings.properties {
        let mut one = ClientConfig::new();
        one.set(name, value);
        if let Err(e) = one.create_native_config() {
            let description = match e {
                KafkaError::ClientConfig(_, description, _, _) => description,
                other => other.to_string(),
            };
            let description = match value.is_empty() {
                true => description,
                false => description.replace(value.as_str(), "…"),
            };
            return Err(PropertyError::Refused {
                name: name.clone(),
                description,
            });
        }
    }
    // Some librdkafka checks only when a client is made (message.timeout.ms above
    // linger.ms and at most transaction.timeout.ms, say): make the clients the
    // services make, with no brokers to connect to. Without the TLS and SASL
    // properties, which make a client read files and load providers that only the
    // services' hosts have (`tally validate --service` checks those hosts' files).
    let mut producer = transactional_producer_config(settings, "tally-validate");
    let mut consumer = client_config(settings);
    consumer.set("group.id", "tally-validate");
    tune_fetching(&mut consumer);
    let security = |name: &str| {
        name.starts_with("ssl.") || name.starts_with("sasl.") || name == "security.protocol"
    };
    for config in [&mut producer, &mut consumer] {
        config.remove("bootstrap.servers");
        for name in settings.properties.keys().filter(|name| security(name)) {
            config.remove(name);
        }
        // No brokers to connect to is meant here, not worth librdkafka's notice.
        config.set("log_level", "3");
    }
    let made = (producer.create::<BaseProducer>().map(drop))
        .and_then(|()| consumer.create::<BaseConsumer>().map(drop));
    made.map_err(|e| PropertyError::Combination {
        description: match e {
            KafkaError::ClientCreation(description) => description,
            other => other.to_string(),
        },
    })
}

/// How the services' group consumers fetch: set on any consumer that should read a
/// topic as fast as they do (the streaming benchmark's plain consumer too).
pub fn tune_fetching(config: &mut ClientConfig) -> &mut ClientConfig {
    // Once its prefetch queue is full librdkafka waits this long before fetching again
    // (default 1 s); a loop that drains the queue sooner would sit idle.
    tunable(config, "fetch.queue.backoff.ms", "10");
    // Partitions follow each other in the fetched stream in runs of at most this many
    // bytes (default 1 MB, some 20,000 compressed events): smaller runs spread each
    // batch the aggregator reads over its partitions' threads.
    tunable(config, "max.partition.fetch.bytes", "262144")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings whose `[kafka] properties` are `properties`.
    fn with_properties(properties: &[(&str, &str)]) -> KafkaSettings {
        KafkaSettings {
            properties: (properties.iter())
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            brokers: "127.0.0.1:9092".to_owned(),
            topic_prefix: "tally".to_owned(),
            partitions: 1,
            replication_factor: std::num::NonZeroU16::MIN,
            instance_id: "0".to_owned(),
        }
    }

    #[test]
    fn properties_refused_only_together_or_with_tallys_settings_are_refused_before_a_start() {
        let refused =
            |properties: &[(&str, &str)]| match check_properties(&with_properties(properties)) {
                Err(PropertyError::Combination { description }) => description,
                other => panic!("{properties:?}: {other:?}"),
            };
        // Below Tally's linger of 5 ms, or above the transactions' timeout.
        assert!(refused(&[("message.timeout.ms", "1")]).contains("linger.ms"));
        assert!(refused(&[("message.timeout.ms", "1"), ("linger.ms", "50")]).contains("linger.ms"));
        assert!(refused(&[("message.timeout.ms", "120000")]).contains("transaction.timeout.ms"));
        let fine = [("message.timeout.ms", "30000"), ("linger.ms", "20")];
        assert!(check_properties(&with_properties(&fine)).is_ok());
        // Files and providers only a service's host has are not looked for here.
        let tls = [
            ("security.protocol", "SASL_SSL"),
            ("ssl.ca.location", "/nowhere/ca.pem"),
            ("sasl.mechanism", "GSSAPI"),
        ];
        assert!(check_properties(&with_properties(&tls)).is_ok());
        assert!(matches!(
            check_properties(&with_properties(&[("linger.ms", "soon")])),
            Err(PropertyError::Refused { name, .. }) if name == "linger.ms"
        ));
    }

    #[test]
    fn a_tunable_keeps_the_operators_value_and_tallys_own_settings_win() {
        let settings = with_properties(&[
            ("linger.ms", "50"),
            ("compression.codec", "zstd"),
            ("allow.auto.create.topics", "true"),
        ]);
        let mut config = client_config(&settings);
        tunable(&mut config, "linger.ms", "5");
        tunable(&mut config, "compression.type", "lz4");
        assert_eq!(config.get("linger.ms"), Some("50"));
        // Given under its other name, it is not set twice.
        assert_eq!(config.get("compression.type"), None);
        assert_eq!(config.get("compression.codec"), Some("zstd"));
        tunable(&mut config, "session.timeout.ms", "10000");
        assert_eq!(config.get("session.timeout.ms"), Some("10000"));
        assert_eq!(config.get("allow.auto.create.topics"), Some("false"));
    }

    #[test]
    fn a_forced_setting_wins_over_the_operators_value_under_either_name() {
        let settings = with_properties(&[("delivery.timeout.ms", "30000")]);
        assert_eq!(configured(&settings, "message.timeout.ms"), Some("30000"));
        assert_eq!(configured(&settings, "delivery.timeout.ms"), Some("30000"));
        let mut config = client_config(&settings);
        force(&mut config, "message.timeout.ms", "0");
        assert_eq!(config.get("delivery.timeout.ms"), None);
        // What librdkafka itself holds, whatever order the names were set in.
        let native = config.create_native_config().unwrap();
        assert_eq!(native.get("message.timeout.ms").unwrap(), "0");
        // Forced under the other name, the same.
        force(&mut config, "delivery.timeout.ms", "5000");
        assert_eq!(config.get("message.timeout.ms"), None);
    }
}
