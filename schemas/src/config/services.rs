//! The services' part of tally.toml: `[kafka]`, `[clickhouse]`, `[ingest]`, `[rater]`
//! and the streaming settings of `[aggregator]`.
//!
//! In: those sections as written, and an environment lookup for overrides and secrets.
//! Out: [`ServiceSettings`], every default applied (each is in `defaults.rs`) and every
//! value checked, or issues with where they are. None of this counts towards the price
//! book's hash: moving a broker does not change what anyone is billed.
//!
//! Environment overrides, applied before validation (secrets belong here, not in the
//! file): `TALLY_KAFKA_BROKERS`, `TALLY_KAFKA_TOPIC_PREFIX`, `TALLY_CLICKHOUSE_URL`,
//! `TALLY_CLICKHOUSE_DATABASE`, `TALLY_CLICKHOUSE_USER`, `TALLY_CLICKHOUSE_PASSWORD`,
//! `TALLY_CLICKHOUSE_CA_FILE`,
//! `TALLY_INGEST_LISTEN`, `TALLY_AGGREGATOR_METRICS_LISTEN`, `TALLY_RATER_METRICS_LISTEN`,
//! `TALLY_INSTANCE_ID`, and for the librdkafka secrets `TALLY_KAFKA_SASL_USERNAME`,
//! `TALLY_KAFKA_SASL_PASSWORD` and `TALLY_KAFKA_SSL_KEY_PASSWORD` (they set
//! `sasl.username`, `sasl.password` and `ssl.key.password`). An API key's secret is read
//! from the variable its `key_env` names.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::defaults as d;
use super::values::HumanDuration;
use super::{AggregatorSpec, Meter};

/// The shortest `[aggregator] close_idle_after`.
const MIN_CLOSE_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Every `TALLY_` variable Tally reads, besides those API keys' `key_env` name: the
/// overrides above, `TALLY_LOG_FORMAT` (`tally serve --log-format`) and `TALLY_COMMIT`
/// (the commit a build without `.git` names, read when it is built).
pub(super) const VARIABLES: [&str; 16] = [
    "TALLY_KAFKA_BROKERS",
    "TALLY_KAFKA_TOPIC_PREFIX",
    "TALLY_KAFKA_SASL_USERNAME",
    "TALLY_KAFKA_SASL_PASSWORD",
    "TALLY_KAFKA_SSL_KEY_PASSWORD",
    "TALLY_CLICKHOUSE_URL",
    "TALLY_CLICKHOUSE_DATABASE",
    "TALLY_CLICKHOUSE_USER",
    "TALLY_CLICKHOUSE_PASSWORD",
    "TALLY_CLICKHOUSE_CA_FILE",
    "TALLY_INGEST_LISTEN",
    "TALLY_AGGREGATOR_METRICS_LISTEN",
    "TALLY_RATER_METRICS_LISTEN",
    "TALLY_INSTANCE_ID",
    "TALLY_LOG_FORMAT",
    "TALLY_COMMIT",
];

/// `TALLY_` variables this repository's scripts and tests read
/// (`scripts/services/lib.sh`, the pipeline tests' harness), which a developer's
/// shell, and so every `tally` it starts, may hold: not slips.
pub(super) const DEVELOPERS_VARIABLES: [&str; 4] = [
    "TALLY_SERVICES_DIR",
    "TALLY_START_TIMEOUT",
    "TALLY_STOP_TIMEOUT",
    "TALLY_TEST_KEEP_LOGS",
];

/// Whether `name` is one of the variables Kubernetes sets in every pod for each
/// service of its namespace (`<SERVICE>_SERVICE_HOST`, `_SERVICE_PORT`,
/// `_SERVICE_PORT_<NAME>`, `_PORT`, `_PORT_<port>_<protocol>` and its `_PROTO`,
/// `_PORT`, `_ADDR`): a service called `tally` or `tally-ingest` makes `TALLY_` ones.
/// Only where the environment (`names`) has that service's `_SERVICE_HOST`, so a
/// guessed `TALLY_KAFKA_PORT` is still a slip.
pub(super) fn is_service_link(name: &str, names: &[&str]) -> bool {
    let mut services = (names.iter()).filter_map(|n| n.strip_suffix("_SERVICE_HOST"));
    services.any(|service| {
        let Some(rest) = name.strip_prefix(service) else {
            return false;
        };
        if matches!(rest, "_SERVICE_HOST" | "_SERVICE_PORT" | "_PORT")
            || rest.starts_with("_SERVICE_PORT_")
        {
            return true;
        }
        let mut parts = rest.strip_prefix("_PORT_").unwrap_or_default().split('_');
        let (port, protocol) = (parts.next().unwrap_or_default(), parts.next());
        !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && matches!(protocol, Some("TCP" | "UDP" | "SCTP"))
            && matches!(parts.next(), None | Some("PROTO" | "PORT" | "ADDR"))
            && parts.next().is_none()
    })
}

/// [`super::Config::unread_variables`], with the API keys whose `key_env` variables are read.
pub(super) fn unread_variables<'a>(
    names: impl IntoIterator<Item = &'a str>,
    api_keys: &[ApiKeySpec],
) -> Vec<super::ConfigIssue> {
    let names: Vec<&str> = names.into_iter().collect();
    let key_envs = (api_keys.iter()).filter_map(|key| key.key_env.as_deref());
    let read: Vec<&str> = (VARIABLES.iter().copied())
        .chain(DEVELOPERS_VARIABLES.iter().copied())
        .chain(key_envs)
        .collect();
    // In any case: `tally_kafka_brokers` is as much a slip as a misspelt name.
    let is_tallys =
        |name: &&str| (name.get(..6)).is_some_and(|start| start.eq_ignore_ascii_case("TALLY_"));
    (names.iter().copied())
        .filter(is_tallys)
        .filter(|name| !read.contains(name) && !is_service_link(name, &names))
        .map(|name| {
            let meant = super::likely_meant(name, read.iter().copied())
                .map_or_else(String::new, |meant| format!(" (did you mean {meant}?)"));
            super::ConfigIssue {
                at: name.to_owned(),
                message: format!(
                    "is set, but Tally reads no such variable{meant}: it changes nothing"
                ),
            }
        })
        .collect()
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSpec {
    /// Bootstrap servers, `host:port,host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// Topics are `<prefix>.events`, `.windows`, `.rejected`, `.rated` and
    /// `.aggregator-changelog`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_prefix: Option<String>,
    /// Partitions of topics Tally creates; the unit of scale-out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// Replicas of topics Tally creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<u16>,
    /// librdkafka properties passed through to every client, e.g. TLS and SASL:
    /// `"security.protocol" = "SASL_SSL"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseSpec {
    /// HTTP interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Better set with `TALLY_CLICKHOUSE_PASSWORD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// For an `https://` url: a PEM file of the certificate authorities to trust,
    /// instead of the system's (a private CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Longest one request may take, answer included; a request that takes longer
    /// fails (the rater retries it; a command reports it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<HumanDuration>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSpec {
    /// Address of the HTTP API (which also serves /metrics, /healthz, /readyz).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Largest request body accepted, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<usize>,
    /// Most events in one batch request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_events: Option<usize>,
    /// Sustained requests per second allowed per API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_second: Option<u32>,
    /// Requests a key may send at once above the sustained rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_burst: Option<u32>,
    /// Who may send events. With none, every request is refused with 401.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKeySpec>,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySpec {
    /// Name of the environment variable holding the key (preferred).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    /// The key itself, for local trials; exactly one of `key` and `key_env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Who the key belongs to; appears in logs instead of the key.
    pub tenant: String,
    /// CloudEvents `source`s this key may send; `"*"` allows any.
    pub sources: Vec<String>,
}

/// Never prints the key: a configuration logged or shown in an error stays safe.
impl fmt::Debug for ApiKeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeySpec")
            .field("key_env", &self.key_env)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("tenant", &self.tenant)
            .field("sources", &self.sources)
            .finish()
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RaterSpec {
    /// Address serving /metrics, /healthz and /readyz.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Longest a rated line waits before its batch is written to ClickHouse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_interval: Option<HumanDuration>,
    /// Least time between two inserts when the rater writes as soon as it has caught up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_insert_interval: Option<HumanDuration>,
    /// How often the stored lines of every held partition are checked against the
    /// price book again (each partition is also checked when assigned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_book_check_interval: Option<HumanDuration>,
    /// Whether the windows of each usage update are stored in ClickHouse too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_windows: Option<bool>,
}

/// Validated `[kafka]`.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic_prefix: String,
    pub partitions: u32,
    pub replication_factor: NonZeroU16,
    pub properties: BTreeMap<String, String>,
    /// Names this process among the aggregator instances: its transactional id is
    /// derived from it, so a restarted instance fences its previous incarnation.
    pub instance_id: String,
}

impl KafkaSettings {
    pub fn topic(&self, topic: Topic) -> String {
        format!("{}.{}", self.topic_prefix, topic.suffix())
    }

    /// A consumer group: `<prefix>-aggregator`, `<prefix>-rater`.
    pub fn group(&self, group: Group) -> String {
        format!("{}-{group}", self.topic_prefix)
    }
}

/// The services that read Kafka as members of a consumer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Reads the events topic.
    Aggregator,
    /// Reads the windows topic.
    Rater,
}

/// The service's name, as in its group and its members' client ids.
impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Group::Aggregator => "aggregator",
            Group::Rater => "rater",
        })
    }
}

/// Properties may hold credentials: shown by name only.
impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .field("instance_id", &self.instance_id)
            .finish()
    }
}

/// Tally's topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// CloudEvents as sent, keyed by `subject`.
    Events,
    /// Window aggregates with the period to date, from the aggregator.
    Windows,
    /// Events refused by the aggregator: original bytes, reason in headers.
    Rejected,
    /// Rated invoice lines, for downstream consumers.
    Rated,
    /// The aggregator's state changes, compacted, to restore a partition's state.
    AggregatorChangelog,
}

impl Topic {
    /// What follows the pipeline's prefix and a dot in the topic's name.
    pub fn suffix(self) -> &'static str {
        match self {
            Topic::Events => "events",
            Topic::Windows => "windows",
            Topic::Rejected => "rejected",
            Topic::Rated => "rated",
            Topic::AggregatorChangelog => "aggregator-changelog",
        }
    }
}

/// Validated `[clickhouse]`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClickHouseSettings {
    pub url: String,
    pub database: String,
    pub credentials: ClickHouseCredentials,
    pub request_timeout: Duration,
}

/// Who Tally is to ClickHouse (user and password; both `None`, ClickHouse's `default`
/// user), and, as a TLS client's credentials go, whom it trusts to be ClickHouse
/// (`ca_file`; `None`, the system's roots).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClickHouseCredentials {
    pub user: Option<String>,
    pub password: Option<String>,
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for ClickHouseCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseCredentials")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl ClickHouseSpec {
    /// The user, password and CA file: `TALLY_CLICKHOUSE_USER`,
    /// `TALLY_CLICKHOUSE_PASSWORD` and `TALLY_CLICKHOUSE_CA_FILE`, else the section's.
    fn credentials(&self, check: &Check<'_>) -> ClickHouseCredentials {
        ClickHouseCredentials {
            user: check
                .var("TALLY_CLICKHOUSE_USER")
                .or_else(|| self.user.clone()),
            password: (check.var("TALLY_CLICKHOUSE_PASSWORD")).or_else(|| self.password.clone()),
            ca_file: (check.var("TALLY_CLICKHOUSE_CA_FILE"))
                .or_else(|| self.ca_file.clone())
                .map(PathBuf::from),
        }
    }
}

impl ClickHouseSettings {
    pub const DATABASE_NAME_RULE: &str = "use letters, digits and _, not starting with a digit";

    /// Whether `name` can be written into SQL unquoted as a database name
    /// ([`Self::DATABASE_NAME_RULE`]).
    pub fn is_database_name(name: &str) -> bool {
        name.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    }
}

impl fmt::Debug for ClickHouseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseSettings")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("credentials", &self.credentials)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// A validated API key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub secret: String,
    pub tenant: String,
    /// `None`: any source.
    pub sources: Option<Vec<String>>,
}

impl ApiKey {
    pub fn may_send(&self, source: &str) -> bool {
        self.sources
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|s| s == source))
    }
}

/// Never prints the secret.
impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("tenant", &self.tenant)
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

/// Validated `[ingest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: NonZeroUsize,
    pub max_batch_events: NonZeroUsize,
    pub rate_limit_per_second: NonZeroU32,
    pub rate_limit_burst: NonZeroU32,
    pub api_keys: Vec<ApiKey>,
    /// Keys whose `key_env` variable is not set, as `(at, message)`: only the ingest
    /// service needs them, so only it refuses to start over them.
    pub unresolved_keys: Vec<(String, String)>,
}

/// Validated streaming settings of `[aggregator]` (its `window` and `dedupe_horizon`
/// are the price book's: they change what is billed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregatorServiceSettings {
    pub period_close_grace: Duration,
    pub commit_interval: Duration,
    pub metrics_listen: SocketAddr,
    pub changelog_snapshot_bytes: usize,
    /// Close ended periods in partitions idle this long (`None`: never by the clock).
    pub close_idle_after: Option<Duration>,
    /// Slugs of meters of the book whose held usage may have been read otherwise.
    pub accept_redefined_meters: BTreeSet<String>,
    /// Count on from the oldest event held where a partition's state is lost for good.
    pub accept_lost_state: bool,
}

/// Validated `[rater]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaterSettings {
    pub flush_interval: Duration,
    pub min_insert_interval: Duration,
    pub price_book_check_interval: Duration,
    pub store_windows: bool,
    pub metrics_listen: SocketAddr,
}

/// Everything the services need besides the price book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSettings {
    pub kafka: KafkaSettings,
    pub clickhouse: ClickHouseSettings,
    pub ingest: IngestSettings,
    pub aggregator: AggregatorServiceSettings,
    pub rater: RaterSettings,
}

/// The sections as written, borrowed from the file.
#[derive(Debug, Clone, Copy)]
pub(super) struct ServiceSpecs<'a> {
    pub kafka: &'a KafkaSpec,
    pub clickhouse: &'a ClickHouseSpec,
    pub ingest: &'a IngestSpec,
    pub aggregator: &'a AggregatorSpec,
    pub rater: &'a RaterSpec,
    /// The book's meters, which `[aggregator] accept_redefined_meters` names.
    pub meters: &'a [Meter],
}

/// A command's flags naming ClickHouse's URL or database, each as `(flag, value)`, in
/// place of `[clickhouse]`'s and the environment's.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClickHouseFlags<'a> {
    pub url: Option<(&'a str, &'a str)>,
    pub database: Option<(&'a str, &'a str)>,
}

/// `[clickhouse]` alone, with the environment's overrides and a command's `flags`.
pub(super) fn validate_clickhouse(
    spec: &ClickHouseSpec,
    flags: ClickHouseFlags<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    issues: &mut Vec<(String, String)>,
) -> ClickHouseSettings {
    clickhouse(&mut Check { env, issues }, spec, flags)
}

/// Applies the environment overrides and checks every value; issues are `(at, message)`.
pub(super) fn validate(
    specs: ServiceSpecs<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    issues: &mut Vec<(String, String)>,
) -> ServiceSettings {
    let mut check = Check { env, issues };
    ServiceSettings {
        kafka: kafka(&mut check, specs.kafka),
        clickhouse: clickhouse(&mut check, specs.clickhouse, ClickHouseFlags::default()),
        ingest: ingest(&mut check, specs.ingest),
        aggregator: aggregator(&mut check, specs.aggregator, specs.meters),
        rater: rater(&mut check, specs.rater),
    }
}

/// One validation's environment and the issues it found so far.
struct Check<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    issues: &'a mut Vec<(String, String)>,
}

impl Check<'_> {
    fn issue(&mut self, at: &str, message: impl Into<String>) {
        self.issues.push((at.to_owned(), message.into()));
    }

    /// An environment override; set but empty counts as unset.
    fn var(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.is_empty())
    }

    /// The environment's value, else the file's, else the default.
    fn setting(&self, env_name: &str, written: Option<&str>, default: &str) -> String {
        self.var(env_name)
            .unwrap_or_else(|| written.unwrap_or(default).to_owned())
    }

    /// [`Self::setting`], with where it was given, to say it is wrong there: the
    /// variable's name when the environment set it, else `field`.
    fn setting_at<'n>(
        &self,
        env_name: &'n str,
        field: &'n str,
        written: Option<&str>,
        default: &str,
    ) -> (&'n str, String) {
        let at = match self.var(env_name) {
            Some(_) => env_name,
            None => field,
        };
        (at, self.setting(env_name, written, default))
    }

    fn listen_address(
        &mut self,
        at: &str,
        env_name: &str,
        written: Option<&str>,
        default: &str,
    ) -> SocketAddr {
        let (at, text) = self.setting_at(env_name, at, written, default);
        text.parse::<SocketAddr>().unwrap_or_else(|_| {
            self.issue(
                at,
                format!("{text:?} is not an address to listen on: write ip:port, e.g. \"127.0.0.1:8080\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    /// A count of at least one, as its type holds it; a zero is an issue (and the
    /// default stands in for it).
    fn at_least_one<N: Count>(&mut self, at: &str, written: Option<N::Raw>, default: N) -> N {
        match written.map(N::new) {
            None => default,
            Some(Some(value)) => value,
            Some(None) => {
                self.issue(at, "must be at least 1");
                default
            }
        }
    }

    fn above_zero(&mut self, at: &str, written: Option<Duration>, default: Duration) -> Duration {
        let value = written.unwrap_or(default);
        if value.is_zero() {
            self.issue(at, "must be above zero");
        }
        value
    }
}

/// The types settings counted from one are held in: zero is not among their values.
trait Count: Copy {
    type Raw;
    fn new(raw: Self::Raw) -> Option<Self>;
}

macro_rules! count {
    ($($count:ty: $raw:ty),*) => {$(
        impl Count for $count {
            type Raw = $raw;
            fn new(raw: $raw) -> Option<Self> {
                <$count>::new(raw)
            }
        }
    )*};
}

count!(NonZeroU16: u16, NonZeroU32: u32, NonZeroUsize: usize);

/// Kafka topic names (and so prefixes and the instance id in transactional ids) take
/// these characters only.
fn is_topic_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn kafka(check: &mut Check<'_>, spec: &KafkaSpec) -> KafkaSettings {
    let mut properties = spec.properties.clone();
    for name in ["sasl.username", "sasl.password", "ssl.key.password"] {
        let env_name = format!("TALLY_KAFKA_{}", name.replace('.', "_").to_uppercase());
        if let Some(value) = check.var(&env_name) {
            properties.insert(name.to_owned(), value);
        }
    }
    // What Tally sets itself because exactly-once or its topics depend on it.
    let reserved = [
        "bootstrap.servers",
        "metadata.broker.list",
        "group.id",
        "transactional.id",
        "enable.idempotence",
        "acks",
        "request.required.acks",
        "isolation.level",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "auto.offset.reset",
        "partition.assignment.strategy",
        "partitioner",
        "allow.auto.create.topics",
        "transaction.timeout.ms",
    ];
    for name in properties.keys().filter(|n| reserved.contains(&n.as_str())) {
        check.issue(
            &format!("kafka.properties.{name:?}"),
            "is set by Tally itself, as exactly-once or its topics depend on it (brokers come from kafka.brokers); remove it",
        );
    }
    for name in ["message.timeout.ms", "delivery.timeout.ms"] {
        // librdkafka reads 0 as "wait forever": ingest's requests would time out while
        // their events went on being retried, and its shutdown could not flush.
        if properties.get(name).is_some_and(|ms| ms.trim() == "0") {
            check.issue(
                &format!("kafka.properties.{name:?}"),
                "0 is librdkafka's \"wait forever\" for Kafka's acknowledgement, and an ingest request must get its answer; set a bound such as \"10000\"",
            );
        }
    }
    let brokers = check.setting(
        "TALLY_KAFKA_BROKERS",
        spec.brokers.as_deref(),
        d::DEFAULT_KAFKA_BROKERS,
    );
    let topic_prefix = check.setting(
        "TALLY_KAFKA_TOPIC_PREFIX",
        spec.topic_prefix.as_deref(),
        d::DEFAULT_TOPIC_PREFIX,
    );
    if !is_topic_name(&topic_prefix) {
        check.issue(
            "kafka.topic_prefix",
            format!("{topic_prefix:?} cannot start a Kafka topic name: use letters, digits, '.', '_' and '-'"),
        );
    }
    let instance_id = check
        .var("TALLY_INSTANCE_ID")
        .or_else(|| check.var("HOSTNAME"))
        .unwrap_or_else(|| d::DEFAULT_INSTANCE_ID.to_owned());
    if !is_topic_name(&instance_id) {
        check.issue(
            "TALLY_INSTANCE_ID",
            format!("{instance_id:?} (from TALLY_INSTANCE_ID or HOSTNAME): use letters, digits, '.', '_' and '-'"),
        );
    }
    KafkaSettings {
        brokers,
        topic_prefix,
        partitions: (check.at_least_one(
            "kafka.partitions",
            spec.partitions,
            d::DEFAULT_PARTITIONS,
        ))
        .get(),
        replication_factor: check.at_least_one(
            "kafka.replication_factor",
            spec.replication_factor,
            d::DEFAULT_REPLICATION_FACTOR,
        ),
        properties,
        instance_id,
    }
}

fn clickhouse(
    check: &mut Check<'_>,
    spec: &ClickHouseSpec,
    flags: ClickHouseFlags<'_>,
) -> ClickHouseSettings {
    // A flag's value, else the environment's, else the file's, else the default; said
    // to be wrong where it was given.
    let given = |flag: Option<(&str, &str)>, var: &str, field: &str, written, default| match flag {
        Some((at, value)) => (at.to_owned(), value.to_owned()),
        None => {
            let (at, value) = check.setting_at(var, field, written, default);
            (at.to_owned(), value)
        }
    };
    let (url_at, url) = given(
        flags.url,
        "TALLY_CLICKHOUSE_URL",
        "clickhouse.url",
        spec.url.as_deref(),
        d::DEFAULT_CLICKHOUSE_URL,
    );
    let (database_at, database) = given(
        flags.database,
        "TALLY_CLICKHOUSE_DATABASE",
        "clickhouse.database",
        spec.database.as_deref(),
        d::DEFAULT_CLICKHOUSE_DATABASE,
    );
    // The URL is shown in logs, readiness texts and `tally validate`: a login in it
    // would be too, so it is refused, and a URL holding one is not echoed.
    let authority = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let has_login =
        (authority.split(['/', '?', '#']).next()).is_some_and(|host| host.contains('@'));
    if has_login {
        check.issue(
            &url_at,
            "holds a login (user@ or user:password@ before the host), and the URL is shown in logs and readiness texts: write the URL without it, and the login in [clickhouse] user and TALLY_CLICKHOUSE_PASSWORD",
        );
    } else if !(url.starts_with("http://") || url.starts_with("https://")) {
        check.issue(
            &url_at,
            format!(
                "{url:?} is not ClickHouse's HTTP interface: write e.g. \"http://127.0.0.1:8123\""
            ),
        );
    }
    if !ClickHouseSettings::is_database_name(&database) {
        check.issue(
            &database_at,
            format!(
                "{database:?} is not a usable database name: {}",
                ClickHouseSettings::DATABASE_NAME_RULE
            ),
        );
    }
    let request_timeout = check.above_zero(
        "clickhouse.request_timeout",
        spec.request_timeout.map(|t| t.0),
        d::DEFAULT_CLICKHOUSE_REQUEST_TIMEOUT,
    );
    ClickHouseSettings {
        url,
        database,
        credentials: spec.credentials(check),
        request_timeout,
    }
}

fn ingest(check: &mut Check<'_>, spec: &IngestSpec) -> IngestSettings {
    let (api_keys, unresolved_keys) = api_keys(check, &spec.api_keys);
    IngestSettings {
        listen: check.listen_address(
            "ingest.listen",
            "TALLY_INGEST_LISTEN",
            spec.listen.as_deref(),
            d::DEFAULT_INGEST_LISTEN,
        ),
        max_body_bytes: check.at_least_one(
            "ingest.max_body_bytes",
            spec.max_body_bytes,
            d::DEFAULT_MAX_BODY_BYTES,
        ),
        max_batch_events: check.at_least_one(
            "ingest.max_batch_events",
            spec.max_batch_events,
            d::DEFAULT_MAX_BATCH_EVENTS,
        ),
        rate_limit_per_second: check.at_least_one(
            "ingest.rate_limit_per_second",
            spec.rate_limit_per_second,
            d::DEFAULT_RATE_LIMIT_PER_SECOND,
        ),
        rate_limit_burst: check.at_least_one(
            "ingest.rate_limit_burst",
            spec.rate_limit_burst,
            d::DEFAULT_RATE_LIMIT_BURST,
        ),
        api_keys,
        unresolved_keys,
    }
}

/// The keys that resolved, and those whose `key_env` variable is not set (`(at, message)`).
fn api_keys(check: &mut Check<'_>, specs: &[ApiKeySpec]) -> (Vec<ApiKey>, Vec<(String, String)>) {
    let mut api_keys: Vec<ApiKey> = Vec::new();
    let mut unresolved_keys = Vec::new();
    for (i, key) in specs.iter().enumerate() {
        let at = format!("ingest.api_keys[{i}]");
        // Surrounding whitespace (a secret file's newline) is never part of a key: a
        // request's header cannot carry it, so such a key could never match.
        let secret = match (&key.key, &key.key_env) {
            (Some(secret), None) => Some(secret.trim().to_owned()),
            (None, Some(name)) => {
                let secret = check.var(name).map(|s| s.trim().to_owned());
                if secret.is_none() {
                    unresolved_keys.push((
                        format!("{at}.key_env"),
                        format!("environment variable {name} is not set; export the key for tenant {:?} there", key.tenant),
                    ));
                }
                secret
            }
            _ => {
                check.issue(&at, "set exactly one of key and key_env");
                None
            }
        };
        if secret.as_ref().is_some_and(|s| s.len() < 16) {
            check.issue(
                &at,
                "the key is shorter than 16 characters; use a long random key",
            );
        }
        if key.sources.is_empty() {
            check.issue(
                &format!("{at}.sources"),
                "lists no source: name the CloudEvents sources this key may send, or \"*\"",
            );
        }
        // A sender's source is compared whole: a wildcard in a name would silently
        // match only a source spelled with the asterisk.
        for (i, source) in key.sources.iter().enumerate() {
            if source != "*" && source.contains('*') {
                check.issue(
                    &format!("{at}.sources[{i}]"),
                    format!("{source:?} is not a pattern: a source is matched whole, and only \"*\" alone allows every source; list the sources by name"),
                );
            }
        }
        if let Some(secret) = secret {
            if api_keys.iter().any(|k| k.secret == secret) {
                check.issue(&at, "the same key is configured twice");
            }
            api_keys.push(ApiKey {
                secret,
                tenant: key.tenant.clone(),
                sources: (!key.sources.iter().any(|s| s == "*")).then(|| key.sources.clone()),
            });
        }
    }
    (api_keys, unresolved_keys)
}

fn aggregator(
    check: &mut Check<'_>,
    spec: &AggregatorSpec,
    meters: &[Meter],
) -> AggregatorServiceSettings {
    let close_idle_after = spec
        .close_idle_after
        .map(|d| d.0)
        .or(d::DEFAULT_CLOSE_IDLE_AFTER);
    if close_idle_after.is_some_and(|idle| idle < MIN_CLOSE_IDLE_AFTER) {
        check.issue(
            "aggregator.close_idle_after",
            format!(
                "must be at least {}s: a partition is idle only once it has read nothing for a while (leave it out to close periods by event time only)",
                MIN_CLOSE_IDLE_AFTER.as_secs()
            ),
        );
    }
    for (i, slug) in spec.accept_redefined_meters.iter().enumerate() {
        if !meters.iter().any(|meter| meter.slug == *slug) {
            check.issue(
                &format!("aggregator.accept_redefined_meters[{i}]"),
                format!("{slug:?} is not a meter of this price book: a removed meter's usage has nothing left to bill it; list meters the book redefines, and restore a removed one with the book that has it"),
            );
        }
    }
    AggregatorServiceSettings {
        period_close_grace: (spec.period_close_grace)
            .map_or(d::DEFAULT_PERIOD_CLOSE_GRACE, |d| d.0),
        commit_interval: check.above_zero(
            "aggregator.commit_interval",
            spec.commit_interval.map(|d| d.0),
            d::DEFAULT_COMMIT_INTERVAL,
        ),
        metrics_listen: check.listen_address(
            "aggregator.metrics_listen",
            "TALLY_AGGREGATOR_METRICS_LISTEN",
            spec.metrics_listen.as_deref(),
            d::DEFAULT_AGGREGATOR_METRICS_LISTEN,
        ),
        changelog_snapshot_bytes: spec
            .changelog_snapshot_bytes
            .unwrap_or(d::DEFAULT_CHANGELOG_SNAPSHOT_BYTES),
        close_idle_after,
        // Unset is empty: none accepted (defaults.rs).
        accept_redefined_meters: spec.accept_redefined_meters.iter().cloned().collect(),
        accept_lost_state: spec
            .accept_lost_state
            .unwrap_or(d::DEFAULT_ACCEPT_LOST_STATE),
    }
}

fn rater(check: &mut Check<'_>, spec: &RaterSpec) -> RaterSettings {
    let flush_interval = check.above_zero(
        "rater.flush_interval",
        spec.flush_interval.map(|i| i.0),
        d::DEFAULT_RATER_FLUSH_INTERVAL,
    );
    // Unset, it follows a shorter flush_interval down.
    let min_insert_interval = spec.min_insert_interval.map_or(
        d::DEFAULT_RATER_MIN_INSERT_INTERVAL.min(flush_interval),
        |i| i.0,
    );
    if min_insert_interval > flush_interval {
        check.issue(
            "rater.min_insert_interval",
            format!(
                "must not exceed rater.flush_interval ({}), the longest a line may wait",
                humantime::format_duration(flush_interval)
            ),
        );
    }
    RaterSettings {
        flush_interval,
        min_insert_interval,
        price_book_check_interval: check.above_zero(
            "rater.price_book_check_interval",
            spec.price_book_check_interval.map(|i| i.0),
            d::DEFAULT_RATER_PRICE_BOOK_CHECK_INTERVAL,
        ),
        store_windows: spec.store_windows.unwrap_or(d::DEFAULT_RATER_STORE_WINDOWS),
        metrics_listen: check.listen_address(
            "rater.metrics_listen",
            "TALLY_RATER_METRICS_LISTEN",
            spec.metrics_listen.as_deref(),
            d::DEFAULT_RATER_METRICS_LISTEN,
        ),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    const PRICE_BOOK: &str = r#"
[[meters]]
slug = "calls"
event_type = "api.call"
aggregation = "count"
"#;

    fn services(extra: &str, env: &[(&str, &str)]) -> Result<super::ServiceSettings, Vec<String>> {
        let config = Config::parse(&format!("{PRICE_BOOK}\n{extra}"), "test.toml")
            .map_err(|e| vec![e.to_string()])?;
        let lookup = |name: &str| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        };
        config.services("test.toml", &lookup).map_err(|e| match e {
            ConfigError::Invalid { issues, .. } => issues.iter().map(|i| i.to_string()).collect(),
            other => vec![other.to_string()],
        })
    }

    #[test]
    fn every_variable_the_settings_read_is_one_tally_reads() {
        let config = Config::parse(
            &format!("{PRICE_BOOK}\n[[ingest.api_keys]]\nkey_env = \"TALLY_SUPPORT_KEY\"\ntenant = \"support\"\nsources = [\"*\"]\n"),
            "test.toml",
        )
        .unwrap();
        let asked = std::cell::RefCell::new(Vec::new());
        let lookup = |name: &str| {
            asked.borrow_mut().push(name.to_owned());
            None
        };
        config.services("test.toml", &lookup).unwrap();
        let asked = asked.into_inner();
        let unread = config.unread_variables(asked.iter().map(String::as_str));
        assert_eq!(unread, Vec::new(), "asked for {asked:?}");
        assert!(asked.iter().any(|name| name == "TALLY_KAFKA_SASL_PASSWORD"));
    }

    #[test]
    fn a_misspelt_variable_is_named_with_the_one_it_likely_meant() {
        let config = Config::parse(PRICE_BOOK, "test.toml").unwrap();
        let environment = [
            "PATH",
            "TALLY_KAFKA_TOPIC_PREFX",
            "TALLY_CLICKHOUSE_DATABSE",
            "TALLY_KAFKA_BROKERS",
            "TALLY_SOMETHING_ELSE",
            // Kubernetes's links to services called tally and tally-ingest.
            "TALLY_SERVICE_HOST",
            "TALLY_SERVICE_PORT",
            "TALLY_SERVICE_PORT_HTTP",
            "TALLY_PORT",
            "TALLY_INGEST_SERVICE_HOST",
            "TALLY_INGEST_PORT_9101_TCP",
            "TALLY_INGEST_PORT_9101_TCP_ADDR",
            "TALLY_INGEST_PORT_9101_TCP_PROTO",
            "TALLY_INGEST_PORT_9101_TCP_PORT",
            // Read by the repository's scripts.
            "TALLY_SERVICES_DIR",
            // A guess, with no service of that name, and a name in lower case.
            "TALLY_KAFKA_PORT",
            "tally_kafka_brokers",
        ];
        let unread: Vec<String> = (config.unread_variables(environment))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            unread,
            [
                "TALLY_KAFKA_TOPIC_PREFX: is set, but Tally reads no such variable (did you mean TALLY_KAFKA_TOPIC_PREFIX?): it changes nothing",
                "TALLY_CLICKHOUSE_DATABSE: is set, but Tally reads no such variable (did you mean TALLY_CLICKHOUSE_DATABASE?): it changes nothing",
                "TALLY_SOMETHING_ELSE: is set, but Tally reads no such variable: it changes nothing",
                "TALLY_KAFKA_PORT: is set, but Tally reads no such variable: it changes nothing",
                "tally_kafka_brokers: is set, but Tally reads no such variable (did you mean TALLY_KAFKA_BROKERS?): it changes nothing",
            ]
        );
    }

    #[test]
    fn every_default_applies_to_an_empty_file() {
        let s = services("", &[]).unwrap();
        assert_eq!(s.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(s.kafka.topic(super::Topic::Events), "tally.events");
        assert_eq!(s.kafka.group(super::Group::Aggregator), "tally-aggregator");
        assert_eq!(s.clickhouse.database, "tally");
        assert_eq!(s.clickhouse.request_timeout.as_secs(), 60);
        assert_eq!(s.ingest.max_body_bytes.get(), 1 << 20);
        assert_eq!(s.ingest.max_batch_events.get(), 1000);
        assert!(s.ingest.api_keys.is_empty());
        assert_eq!(s.aggregator.period_close_grace.as_secs(), 3600);
        assert_eq!(s.aggregator.close_idle_after, None);
        assert!(s.aggregator.accept_redefined_meters.is_empty());
        assert_eq!(s.rater.metrics_listen.port(), 9103);
        assert_eq!(s.rater.flush_interval.as_millis(), 500);
        assert_eq!(s.rater.min_insert_interval.as_millis(), 200);
        assert_eq!(s.rater.price_book_check_interval.as_secs(), 600);
        assert!(!s.rater.store_windows);
        let short = services("[rater]\nflush_interval = \"100ms\"\n", &[]).unwrap();
        assert_eq!(short.rater.min_insert_interval.as_millis(), 100);
        let patient = services("[clickhouse]\nrequest_timeout = \"5m\"\n", &[]).unwrap();
        assert_eq!(patient.clickhouse.request_timeout.as_secs(), 300);
        let idle = services("[aggregator]\nclose_idle_after = \"30m\"\n", &[]).unwrap();
        assert_eq!(
            idle.aggregator.close_idle_after.map(|d| d.as_secs()),
            Some(1800)
        );
    }

    #[test]
    fn a_wrong_listen_address_from_the_environment_is_said_to_be_the_variables() {
        let issues = services(
            "[ingest]\nlisten = \"127.0.0.1:9101\"\n",
            &[("TALLY_INGEST_LISTEN", "localhost:9101")],
        );
        assert_eq!(
            issues.unwrap_err(),
            ["TALLY_INGEST_LISTEN: \"localhost:9101\" is not an address to listen on: write ip:port, e.g. \"127.0.0.1:8080\""]
        );
    }

    #[test]
    fn a_login_in_the_clickhouse_url_is_refused_without_being_shown() {
        for (file, env) in [
            (
                "[clickhouse]\nurl = \"http://default:hunter2@ch:8123\"\n",
                vec![],
            ),
            (
                "",
                vec![("TALLY_CLICKHOUSE_URL", "https://default:hunter2@ch:8443/")],
            ),
            // Not an http URL either: still not echoed.
            (
                "[clickhouse]\nurl = \"clickhouse://default:hunter2@ch:9000\"\n",
                vec![],
            ),
            ("[clickhouse]\nurl = \"default:hunter2@ch:8123\"\n", vec![]),
        ] {
            let issues = services(file, &env).unwrap_err();
            assert_eq!(issues.len(), 1, "{issues:?}");
            assert!(
                issues[0].contains("holds a login") && !issues[0].contains("hunter2"),
                "{issues:?}"
            );
        }
        // An @ in the path or the query is not a login.
        assert!(services("[clickhouse]\nurl = \"http://ch:8123/a@b\"\n", &[]).is_ok());
        assert!(services("[clickhouse]\nurl = \"http://[::1]:8123?x=a@b\"\n", &[]).is_ok());
    }

    #[test]
    fn only_meters_of_the_book_can_be_accepted_as_redefined() {
        let accepted = services("[aggregator]\naccept_redefined_meters = [\"calls\"]\n", &[]);
        assert_eq!(
            accepted.unwrap().aggregator.accept_redefined_meters,
            ["calls".to_owned()].into()
        );
        let removed = services(
            "[aggregator]\naccept_redefined_meters = [\"calls\", \"tokens\"]\n",
            &[],
        );
        assert_eq!(
            removed.unwrap_err(),
            ["aggregator.accept_redefined_meters[1]: \"tokens\" is not a meter of this price book: a removed meter's usage has nothing left to bill it; list meters the book redefines, and restore a removed one with the book that has it"]
        );
    }

    #[test]
    fn kafka_properties_tally_sets_itself_are_refused_and_tunables_kept() {
        let issues = services(
            "[kafka]\nproperties = { acks = \"1\", \"auto.offset.reset\" = \"latest\", \"session.timeout.ms\" = \"45000\" }\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            issues,
            [
                "kafka.properties.\"acks\": is set by Tally itself, as exactly-once or its topics depend on it (brokers come from kafka.brokers); remove it",
                "kafka.properties.\"auto.offset.reset\": is set by Tally itself, as exactly-once or its topics depend on it (brokers come from kafka.brokers); remove it",
            ]
        );
        let tuned = services(
            "[kafka]\nproperties = { \"session.timeout.ms\" = \"45000\", \"linger.ms\" = \"50\" }\n",
            &[],
        )
        .unwrap();
        assert_eq!(tuned.kafka.properties["session.timeout.ms"], "45000");
    }

    #[test]
    fn environment_overrides_the_file_and_supplies_secrets() {
        let file = r#"
[kafka]
brokers = "kafka-a:9092"
properties = { "security.protocol" = "SASL_SSL", "sasl.mechanism" = "SCRAM-SHA-512" }
[clickhouse]
url = "http://ch:8123"
[[ingest.api_keys]]
key_env = "SUPPORT_KEY"
tenant = "support"
sources = ["agent"]
"#;
        let s = services(
            file,
            &[
                ("TALLY_KAFKA_BROKERS", "kafka-b:9093"),
                ("TALLY_KAFKA_SASL_PASSWORD", "hunter2"),
                ("TALLY_CLICKHOUSE_PASSWORD", "secret"),
                // As a secret mounted from a file gives it: with its newline.
                ("SUPPORT_KEY", "0123456789abcdef0123\n"),
            ],
        )
        .unwrap();
        assert_eq!(s.kafka.brokers, "kafka-b:9093");
        assert_eq!(s.kafka.properties["sasl.password"], "hunter2");
        assert_eq!(s.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(s.clickhouse.url, "http://ch:8123");
        assert_eq!(s.clickhouse.credentials.password.as_deref(), Some("secret"));
        let key = &s.ingest.api_keys[0];
        assert_eq!(key.secret, "0123456789abcdef0123");
        assert!(key.may_send("agent") && !key.may_send("other"));
        let shown = format!("{s:?}");
        for secret in ["hunter2", "secret\"", "0123456789abcdef0123"] {
            assert!(!shown.contains(secret), "{secret} leaked into {shown}");
        }
    }

    #[test]
    fn a_key_written_in_the_file_is_not_shown_by_the_configuration_or_its_settings() {
        let file = format!(
            "{PRICE_BOOK}\n[[ingest.api_keys]]\nkey = \"local-trial-key-0123456789\"\ntenant = \"support\"\nsources = [\"*\"]\n"
        );
        let config = Config::parse(&file, "test.toml").unwrap();
        let settings = config.services("test.toml", &|_| None).unwrap();
        for shown in [format!("{config:?}"), format!("{settings:?}")] {
            assert!(!shown.contains("local-trial-key"), "{shown}");
            assert!(
                shown.contains("support"),
                "the key's tenant is shown: {shown}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_with_where_it_is() {
        let file = r#"
[kafka]
topic_prefix = "bad prefix"
partitions = 0
properties = { "group.id" = "mine", "delivery.timeout.ms" = "0" }
[clickhouse]
url = "127.0.0.1:8123"
request_timeout = "0s"
[ingest]
listen = "localhost"
[[ingest.api_keys]]
key_env = "MISSING_KEY"
tenant = "a"
sources = ["x", "svc-*"]
[[ingest.api_keys]]
key = "short"
tenant = "b"
sources = []
[aggregator]
close_idle_after = "0s"
[rater]
flush_interval = "100ms"
min_insert_interval = "1s"
price_book_check_interval = "0s"
"#;
        let issues = services(file, &[("TALLY_CLICKHOUSE_DATABASE", "tally-prod")]).unwrap_err();
        for expected in [
            "TALLY_CLICKHOUSE_DATABASE: \"tally-prod\" is not a usable database name",
            "rater.min_insert_interval: must not exceed rater.flush_interval (100ms)",
            "rater.price_book_check_interval: must be above zero",
            "aggregator.close_idle_after: must be at least 1s",
            "kafka.topic_prefix",
            "kafka.partitions",
            "kafka.properties.\"group.id\"",
            "kafka.properties.\"delivery.timeout.ms\": 0 is librdkafka's \"wait forever\"",
            "clickhouse.url",
            "clickhouse.request_timeout: must be above zero",
            "ingest.listen",
            "ingest.api_keys[1]: the key is shorter",
            "ingest.api_keys[1].sources",
            "ingest.api_keys[0].sources[1]: \"svc-*\" is not a pattern",
        ] {
            assert!(
                issues.iter().any(|i| i.starts_with(expected)),
                "no issue {expected:?} in {issues:#?}"
            );
        }
    }

    #[test]
    fn a_database_name_sql_cannot_take_unquoted_is_refused_where_it_is_written() {
        let issues = services("[clickhouse]\ndatabase = \"1st; DROP\"\n", &[]).unwrap_err();
        assert_eq!(
            issues,
            ["clickhouse.database: \"1st; DROP\" is not a usable database name: use letters, digits and _, not starting with a digit"]
        );
        for good in ["tally", "_t", "tally_2026"] {
            assert!(super::ClickHouseSettings::is_database_name(good), "{good}");
        }
    }

    #[test]
    fn a_missing_key_variable_concerns_only_the_ingest_service() {
        let file =
            "[[ingest.api_keys]]\nkey_env = \"MISSING_KEY\"\ntenant = \"a\"\nsources = [\"*\"]\n";
        let s = services(file, &[]).unwrap();
        assert!(s.ingest.api_keys.is_empty());
        assert_eq!(s.ingest.unresolved_keys[0].0, "ingest.api_keys[0].key_env");
        assert!(s.ingest.unresolved_keys[0]
            .1
            .contains("MISSING_KEY is not set"));
    }

    #[test]
    fn unknown_service_settings_are_refused() {
        let err = services("[kafka]\nbroker = \"x\"\n", &[]).unwrap_err();
        assert!(err[0].contains("unknown field `broker`"), "{err:?}");
    }

    #[test]
    fn service_sections_do_not_change_the_price_book_hash() {
        let plain = Config::parse(PRICE_BOOK, "a").unwrap();
        let with_kafka =
            Config::parse(&format!("{PRICE_BOOK}\n[kafka]\nbrokers = \"x:1\"\n"), "b").unwrap();
        assert_eq!(plain.hash, with_kafka.hash);
    }
}
