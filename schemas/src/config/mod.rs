//! tally.toml: the meters, plans and customers that turn events into invoice lines.
//!
//! In: TOML text. Out: a [`Config`] that has passed every check in `validate.rs`, or a
//! [`ConfigError`] listing every problem with where it is (`plans[pro].prices[1].tiers[2]`)
//! and what to do. The `*Spec` structs mirror the file one to one and refuse unknown
//! fields, so a typo is an error rather than a silently ignored setting. Every default is
//! in `defaults.rs`.

mod changes;
pub(crate) mod defaults;
mod likely;
mod services;
mod validate;
mod values;

use std::collections::BTreeMap;

// Looked up once or twice per event: a fast hasher matters, and keys come from the
// configuration, not from senders.
use hashbrown::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use changes::{book_changes, BookChange, Effect};
pub use defaults::{Settings, DEFAULT_CLICKHOUSE_REQUEST_TIMEOUT};
pub use likely::likely_meant;
pub use services::{
    AggregatorServiceSettings, ApiKey, ApiKeySpec, ClickHouseCredentials, ClickHouseFlags,
    ClickHouseSettings, ClickHouseSpec, Group, IngestSettings, IngestSpec, KafkaSettings,
    KafkaSpec, RaterSettings, RaterSpec, ServiceSettings, Topic,
};
pub use values::{ExactDecimal, HumanDuration, JsonPath, UpToInput};

use crate::ids::Fingerprinter;
use crate::money::RoundingMode;
use crate::price::{PackageRounding, Plan, TiersMode};
use crate::time::Period;

/// The whole file as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// What to measure: each meter turns events of one type into a quantity.
    #[serde(default)]
    pub meters: Vec<MeterSpec>,
    /// What to charge: each plan prices meters in one currency.
    #[serde(default)]
    pub plans: Vec<PlanSpec>,
    /// Who is billed: each customer (the CloudEvents `subject`) is on one plan per
    /// period.
    #[serde(default)]
    pub customers: Vec<CustomerSpec>,
    /// Windowing and dedupe settings; see `defaults.rs`.
    #[serde(default)]
    pub aggregator: AggregatorSpec,
    /// Event acceptance settings; see `defaults.rs`.
    #[serde(default)]
    pub events: EventsSpec,
    /// The Kafka cluster the services use.
    #[serde(default)]
    pub kafka: KafkaSpec,
    /// Where the rater writes rated usage.
    #[serde(default)]
    pub clickhouse: ClickHouseSpec,
    /// The HTTP ingest service.
    #[serde(default)]
    pub ingest: IngestSpec,
    /// The streaming rater.
    #[serde(default)]
    pub rater: RaterSpec,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeterSpec {
    /// Unique name that prices refer to, e.g. `tokens`.
    pub slug: String,
    /// The CloudEvents `type` this meter reads, e.g. `llm.tokens`.
    pub event_type: String,
    /// How events become a quantity: `count`, `sum`, `max`, `unique_count` or `latest`.
    pub aggregation: AggregationKind,
    /// JSONPath into `data` of the value to aggregate; required except for `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_property: Option<JsonPath>,
    /// Dimensions: name -> JSONPath into `data`, e.g. `{ model = "$.model" }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub group_by: BTreeMap<String, JsonPath>,
    /// A sum meter only: negative values are accepted, as corrections of usage reported
    /// too high (sent under new ids). Default `false`: a negative value is rejected.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_negative_values: bool,
    /// Free text for people reading invoices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl MeterSpec {
    pub fn shape(&self) -> MeterShape<'_> {
        MeterShape {
            aggregation: self.aggregation,
            dimensions: self.group_by.keys().map(String::as_str).collect(),
        }
    }
}

/// What usage an aggregator holds of a meter is kept by: its aggregation, and its
/// dimensions' names (a series holds its group values by position, in name order).
/// `[aggregator] accept_redefined_meters` lets the rest of a meter (`event_type`,
/// `value_property`, `allow_negative_values`, the dimensions' paths) change under held
/// usage, never its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterShape<'a> {
    pub aggregation: AggregationKind,
    pub dimensions: Vec<&'a str>,
}

/// `sum by model, region`, `count without dimensions`.
impl fmt::Display for MeterShape<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dimensions.as_slice() {
            [] => write!(f, "{} without dimensions", self.aggregation.as_str()),
            names => write!(f, "{} by {}", self.aggregation.as_str(), names.join(", ")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregationKind {
    /// Number of events.
    Count,
    /// Sum of the values.
    Sum,
    /// Largest value.
    Max,
    /// Number of distinct values.
    UniqueCount,
    /// Value of the event with the latest event time.
    Latest,
}

impl AggregationKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            AggregationKind::Count => "count",
            AggregationKind::Sum => "sum",
            AggregationKind::Max => "max",
            AggregationKind::UniqueCount => "unique_count",
            AggregationKind::Latest => "latest",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// Unique name customers subscribe to.
    pub id: String,
    /// Lower-case ISO 4217 code, e.g. `usd`.
    pub currency: String,
    /// How each line is rounded to the currency's minor unit. Default `half_up`.
    #[serde(default)]
    pub rounding: RoundingMode,
    #[serde(default)]
    pub prices: Vec<PriceSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// From a period on, every customer on this plan is billed by another: a price
    /// change for everyone on the plan, without a plan change per customer.
    // Left out when not set, so a book without it hashes as before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<ReplacementSpec>,
}

/// The plan that bills a plan's customers from a period on ([`PlanSpec::replaced_by`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplacementSpec {
    /// Id of the plan billed from then on; in the same currency.
    pub plan: String,
    /// The first period it bills, like `"2027-01"`.
    pub from: Period,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSpec {
    /// Unique within the plan; names the invoice line.
    pub id: String,
    /// Slug of the meter whose usage this price bills; none for `billing_scheme =
    /// "flat"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter: Option<String>,
    pub billing_scheme: BillingScheme,
    /// Required with `billing_scheme = "tiered"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers_mode: Option<TiersMode>,
    /// Required with `billing_scheme = "tiered"`; the last `up_to` is `"inf"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers: Option<Vec<TierSpec>>,
    /// Price per unit in the currency's major unit, with `billing_scheme = "per_unit"`;
    /// with `"flat"`, the fee each billed month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_amount: Option<ExactDecimal>,
    /// Package pricing, with `billing_scheme = "per_unit"` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform_quantity: Option<TransformQuantitySpec>,
    /// group_by name -> value the usage must have for this price to apply.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub filter: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingScheme {
    PerUnit,
    Tiered,
    /// A fee each month the customer is billed, whatever its usage: `unit_amount` at
    /// quantity 1, as Stripe bills a flat-rate price. No meter.
    Flat,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    /// Inclusive upper bound in the meter's unit, or `"inf"` for the last tier.
    /// Required; optional here so that one left out is told as the tier table's rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_to: Option<UpToInput>,
    /// Price of each unit in the tier, in the currency's major unit; default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_amount: Option<ExactDecimal>,
    /// Fixed amount for reaching the tier, in the currency's major unit; default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat_amount: Option<ExactDecimal>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TransformQuantitySpec {
    /// Units per package; a positive number.
    pub divide_by: ExactDecimal,
    /// `up` bills a started package whole, `down` only complete ones.
    pub round: PackageRounding,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerSpec {
    /// The CloudEvents `subject` of this customer's events.
    pub id: String,
    /// Id of the plan the customer is subscribed to (until its first plan change).
    pub plan: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discounts: Vec<DiscountSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The first period billed, like `"2026-11"`; omitted, every period up to `through`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Period>,
    /// The last period billed; omitted, no end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through: Option<Period>,
    /// Later subscriptions, in order, each billing every period from its `from` on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan_changes: Vec<PlanChangeSpec>,
}

/// A customer's move to another plan (or the same plan with other discounts) at the
/// start of a period: a cohort migrated, a price change scheduled ahead.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlanChangeSpec {
    /// The first period billed on `plan`, like `"2026-12"`.
    pub from: Period,
    /// Id of the plan billed from then on; its currency must be the customer's.
    pub plan: String,
    /// The discounts from then on; those of earlier subscriptions do not carry over.
    /// Left out while earlier ones exist, validation warns (`[]` says they end).
    // Hashed as before this was optional: left out and `[]` alike are not written.
    #[serde(default, skip_serializing_if = "no_discounts")]
    pub discounts: Option<Vec<DiscountSpec>>,
}

fn no_discounts(discounts: &Option<Vec<DiscountSpec>>) -> bool {
    discounts.as_ref().is_none_or(Vec::is_empty)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiscountSpec {
    /// The price (line) discounted; omitted, every line of the customer's plan
    /// (`percent_off` only: an `amount_off` must name its price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<String>,
    /// Percentage off the line's rounded subtotal, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent_off: Option<ExactDecimal>,
    /// Fixed amount off the line, in the plan's currency's major unit (at most its
    /// minor-unit decimals), capped at the line's subtotal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_off: Option<ExactDecimal>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorSpec {
    /// Tumbling window length, dividing a day; default `"1h"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<HumanDuration>,
    /// How long, in event time, a `(source, id)` is remembered by the streaming
    /// aggregator, and the oldest an event may be; at least a day, default `"35d"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedupe_horizon: Option<HumanDuration>,
    /// How long after a period's end its usage may still change; default `"1h"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_close_grace: Option<HumanDuration>,
    /// Longest a Kafka transaction stays open; default `"200ms"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_interval: Option<HumanDuration>,
    /// Address serving /metrics, /healthz and /readyz; default `"127.0.0.1:9102"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Changelog bytes written since a partition's last snapshot that trigger the
    /// next one (or the last snapshot's size, if larger); default 4 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changelog_snapshot_bytes: Option<usize>,
    /// How long a partition must have read no event (wall clock) before it closes the
    /// periods that ended at least `period_close_grace` and this long ago; default: it
    /// does not (periods close by event time or `tally close-period`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_idle_after: Option<HumanDuration>,
    /// Meters of this book whose usage a partition's state may hold as read with an
    /// earlier definition: kept as counted, and events from then on read with this
    /// one's, where the aggregator would otherwise refuse the state; default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accept_redefined_meters: Vec<String>,
    /// Count on a partition whose changelog lost records and whose events to rebuild
    /// them from are deleted, from the oldest event held, lowering its open months'
    /// lines; default `false`: the aggregator stops and says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_lost_state: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSpec {
    /// How far an event's time may run ahead of the clock; default `"5m"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_future_skew: Option<HumanDuration>,
}

/// Index of a meter in [`Config::meters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MeterId(pub u32);

/// Index of a plan in [`Config::plans`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlanId(pub u32);

/// A validated meter.
#[derive(Debug, Clone)]
pub struct Meter {
    pub slug: String,
    pub event_type: String,
    pub aggregation: Aggregation,
    /// Dimension names, sorted, with where to read them; series carry values in this order.
    pub group_by: Vec<(String, JsonPath)>,
}

/// A validated aggregation: every kind but `Count` carries the value it reads, so a
/// meter without its value cannot exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Aggregation {
    Count,
    /// With whether negative values (corrections) are accepted.
    Sum {
        value: JsonPath,
        negative_allowed: bool,
    },
    Max(JsonPath),
    UniqueCount(JsonPath),
    Latest(JsonPath),
}

impl Aggregation {
    pub fn kind(&self) -> AggregationKind {
        match self {
            Aggregation::Count => AggregationKind::Count,
            Aggregation::Sum { .. } => AggregationKind::Sum,
            Aggregation::Max(_) => AggregationKind::Max,
            Aggregation::UniqueCount(_) => AggregationKind::UniqueCount,
            Aggregation::Latest(_) => AggregationKind::Latest,
        }
    }

    pub fn value_property(&self) -> Option<&JsonPath> {
        match self {
            Aggregation::Count => None,
            Aggregation::Sum { value: p, .. }
            | Aggregation::Max(p)
            | Aggregation::UniqueCount(p)
            | Aggregation::Latest(p) => Some(p),
        }
    }
}

/// A validated customer: billed in the periods from `from` through `through`, on one
/// subscription per period.
#[derive(Debug, Clone)]
pub struct Customer {
    pub id: String,
    /// For people: shown where the customer's invoice is explained.
    pub name: Option<String>,
    /// The first period billed, if not every one.
    from: Option<Period>,
    /// The last period billed, if any.
    through: Option<Period>,
    /// Billed until the first change, or always.
    first: Subscription,
    /// Each later subscription with the first period it bills, in ascending order,
    /// after `from` and not after `through`.
    changes: Vec<(Period, Subscription)>,
}

/// A plan with the customer's discounts on it.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub plan: PlanId,
    /// Discount per price, by index into the plan's prices.
    pub discounts: BTreeMap<usize, crate::price::Discount>,
}

impl Customer {
    /// Whether the customer is billed in `period`: it has lines (flat fees included)
    /// and its usage is billed only then.
    pub fn bills(&self, period: Period) -> bool {
        self.from.is_none_or(|from| from <= period)
            && self.through.is_none_or(|through| period <= through)
    }

    /// The customer billed in every month, its `from` and `through` lifted.
    fn billed_every_month(&self) -> Customer {
        Customer {
            from: None,
            through: None,
            ..self.clone()
        }
    }

    /// Every subscription the customer has had up to `period`: the plans its lines of
    /// `period` can be on, adjustments of earlier months included.
    pub fn subscriptions_until(&self, period: Period) -> impl Iterator<Item = &Subscription> {
        let changes = self.changes.iter().filter(move |(from, _)| *from <= period);
        std::iter::once(&self.first).chain(changes.map(|(_, subscription)| subscription))
    }

    /// What the customer is billed by in `period` (if [`Customer::bills`] it).
    pub fn subscription(&self, period: Period) -> &Subscription {
        (self.changes.iter().rev())
            .find(|(from, _)| *from <= period)
            .map_or(&self.first, |(_, subscription)| subscription)
    }
}

/// A configuration that passed validation. Cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct Config {
    pub meters: Vec<Meter>,
    pub plans: Vec<Plan>,
    pub customers: BTreeMap<String, Customer>,
    pub settings: Settings,
    /// Fingerprint of the price book (meters, plans, customers), printed on every line.
    pub hash: ConfigHash,
    /// What is valid but likely not meant (a plan change that ends discounts without
    /// saying so): shown by every command that loads the file.
    pub warnings: Vec<ConfigIssue>,
    meters_by_event_type: HashMap<String, Vec<MeterId>>,
    /// The customers' ids again, hashed: checked once per event.
    customer_ids: HashSet<String>,
    /// The services' sections as written: checked by [`Config::services`] when a
    /// service starts, with its environment.
    service_specs: ServiceSpecsOwned,
}

#[derive(Debug, Clone, Default)]
struct ServiceSpecsOwned {
    kafka: KafkaSpec,
    clickhouse: ClickHouseSpec,
    ingest: IngestSpec,
    aggregator: AggregatorSpec,
    rater: RaterSpec,
}

impl ConfigFile {
    /// Reads a file as written, its syntax checked and nothing else: what
    /// [`book_changes`] compares. [`Config::load`] validates it.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        ConfigFile::parse(&text, &path.display().to_string())
    }

    /// [`Config::unread_variables`], for a file that does not validate.
    pub fn unread_variables<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Vec<ConfigIssue> {
        services::unread_variables(names, &self.ingest.api_keys)
    }

    fn parse(text: &str, origin: &str) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_owned(),
            message: with_likely_field(e.to_string(), e.message()),
        })
    }
}

/// The parser's `message` with the field an unknown one likely meant, where `reason`
/// (the parser's reason alone) names an unknown field and the ones expected there:
/// "unknown field `topic_prefx` (did you mean `topic_prefix`?), expected one of ...".
fn with_likely_field(message: String, reason: &str) -> String {
    let Some(rest) = reason.strip_prefix("unknown field `") else {
        return message;
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message;
    };
    let known = expected.split('`').skip(1).step_by(2);
    match likely_meant(unknown, known) {
        Some(meant) => {
            let said = format!("unknown field `{unknown}`");
            message.replacen(&said, &format!("{said} (did you mean `{meant}`?)"), 1)
        }
        None => message,
    }
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::validated(ConfigFile::load(path)?, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::validated(ConfigFile::parse(text, origin)?, origin)
    }

    fn validated(file: ConfigFile, origin: &str) -> Result<Config, ConfigError> {
        file.validate().map_err(|issues| ConfigError::Invalid {
            origin: origin.to_owned(),
            issues,
        })
    }

    /// This book with every customer billed in every month, `from` and `through`
    /// lifted: what Tally would bill a cohort another biller still invoices, for a
    /// parallel run's comparison (`tally rate --shadow`, then `tally reconcile`). Not
    /// for invoicing. The hash is the book's: the prices are.
    pub fn shadow(&self) -> Config {
        let customers = (self.customers.iter())
            .map(|(id, customer)| (id.clone(), customer.billed_every_month()))
            .collect();
        Config {
            customers,
            ..self.clone()
        }
    }

    /// Meters that read events of this CloudEvents `type`.
    pub fn meters_for(&self, event_type: &str) -> &[MeterId] {
        self.meters_by_event_type
            .get(event_type)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Whether events with this subject belong to a configured customer.
    pub fn is_customer(&self, subject: &str) -> bool {
        self.customer_ids.contains(subject)
    }

    /// `[clickhouse]` with the environment's overrides and secrets, and a command's
    /// `flags` in place of its URL or database. The rest of the services' sections is
    /// not read: a command that only reads or writes ClickHouse needs nothing else valid.
    pub fn clickhouse(
        &self,
        origin: &str,
        flags: ClickHouseFlags<'_>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ClickHouseSettings, ConfigError> {
        let mut found = Vec::new();
        let settings =
            services::validate_clickhouse(&self.service_specs.clickhouse, flags, env, &mut found);
        found_nothing(origin, found).map(|()| settings)
    }

    /// The services' settings, with overrides and secrets from `env` (pass
    /// `|name| std::env::var(name).ok()`); every problem is reported at once.
    pub fn services(
        &self,
        origin: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ServiceSettings, ConfigError> {
        let specs = &self.service_specs;
        let mut found = Vec::new();
        let settings = services::validate(
            services::ServiceSpecs {
                kafka: &specs.kafka,
                clickhouse: &specs.clickhouse,
                ingest: &specs.ingest,
                aggregator: &specs.aggregator,
                meters: &self.meters,
                rater: &specs.rater,
            },
            env,
            &mut found,
        );
        found_nothing(origin, found).map(|()| settings)
    }

    /// A warning for each `TALLY_` variable of `names` (the environment's) that Tally
    /// does not read, with the one it likely meant: a misspelt override changes nothing,
    /// and a misspelt `TALLY_KAFKA_TOPIC_PREFIX` would join the default pipeline.
    pub fn unread_variables<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Vec<ConfigIssue> {
        services::unread_variables(names, &self.service_specs.ingest.api_keys)
    }

    /// The meter with this slug, if the book has one.
    pub fn meter_id(&self, slug: &str) -> Option<MeterId> {
        let index = self.meters.iter().position(|meter| meter.slug == slug)?;
        Some(MeterId(u32::try_from(index).ok()?))
    }

    pub fn meter(&self, id: MeterId) -> &Meter {
        &self.meters[id.0 as usize]
    }

    pub fn plan(&self, id: PlanId) -> &Plan {
        &self.plans[id.0 as usize]
    }

    /// The plan `customer` is on in `period`, whether or not it [`Customer::bills`] it.
    pub fn plan_of(&self, customer: &Customer, period: Period) -> &Plan {
        self.plan(customer.subscription(period).plan)
    }

    /// The customer `id` and the plan that bills its usage of `period`, or why no plan
    /// does: the one decision ingest warns senders by and the rater bills by.
    pub fn billing(&self, id: &str, period: Period) -> Result<(&Customer, &Plan), NoPlan> {
        let customer = self.customers.get(id).ok_or(NoPlan::UnknownCustomer)?;
        if !customer.bills(period) {
            return Err(NoPlan::NotSubscribed);
        }
        Ok((customer, self.plan_of(customer, period)))
    }
}

/// Why no plan bills a customer's usage of a month ([`Config::billing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPlan {
    /// The id is no customer of the price book.
    UnknownCustomer,
    /// The customer is not billed in that month (its `from` or `through`).
    NotSubscribed,
}

/// The issues `(at, message)` validating the services' sections found, as an error.
fn found_nothing(origin: &str, found: Vec<(String, String)>) -> Result<(), ConfigError> {
    if found.is_empty() {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        origin: origin.to_owned(),
        issues: config_issues(found),
    })
}

fn config_issues(found: Vec<(String, String)>) -> Vec<ConfigIssue> {
    (found.into_iter())
        .map(|(at, message)| ConfigIssue { at, message })
        .collect()
}

/// The version of the rating rules, how a price book turns usage into amounts: part of
/// every book's hash, so lines an earlier build stored count as rated by another book,
/// and the rater re-rates the open months by these rules. Change it with any change to
/// what a book bills (2026-12-07: latest meters add up their groups; isk and the
/// three-decimal currencies billed as card payments allow).
const RATING_RULES: &[u8] = b"2026-12-07";

/// Fingerprint of a price book's canonical form (comments and layout do not count) and
/// of the rating rules it is rated by (a version this build names, `RATING_RULES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConfigHash(pub u64);

impl ConfigHash {
    fn of(file: &ConfigFile) -> Self {
        #[derive(Serialize)]
        struct PriceBook<'a> {
            meters: &'a [MeterSpec],
            plans: &'a [PlanSpec],
            customers: &'a [CustomerSpec],
        }
        let canonical = serde_json::to_vec(&PriceBook {
            meters: &file.meters,
            plans: &file.plans,
            customers: &file.customers,
        })
        // Plain data with string keys: a failure is a bug, never every price book
        // hashing alike.
        .expect("a price book serialises");
        let digest = Fingerprinter::new(b"config")
            .part(RATING_RULES)
            .part(&canonical)
            .finish();
        ConfigHash(digest as u64)
    }
}

impl fmt::Display for ConfigHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Where: `meters[tokens].value_property`, `plans[pro].prices[gpt].tiers[2].up_to`.
    pub at: String,
    /// What is wrong and what would be right.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin} is not valid TOML for tally: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin} has {} problem(s):\n{}", issues.len(), render_issues(issues))]
    Invalid {
        origin: String,
        issues: Vec<ConfigIssue>,
    },
}

fn render_issues(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(|i| format!("  - {i}"))
        .collect::<Vec<_>>()
        .join("\n")
}
