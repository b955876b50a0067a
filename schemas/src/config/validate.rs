//! From [`ConfigFile`] to [`Config`]: every rule a price book must satisfy, checked once.
//! All problems are collected, so one run of `tally validate` shows them all.

use std::collections::{BTreeMap, HashSet};

use hashbrown::HashMap;

use rust_decimal::Decimal;

use super::defaults::{DEFAULT_DEDUPE_HORIZON, DEFAULT_MAX_FUTURE_SKEW};
use super::{
    Aggregation, AggregationKind, BillingScheme, Config, ConfigFile, ConfigHash, ConfigIssue,
    Customer, CustomerSpec, DiscountSpec, Meter, MeterId, MeterSpec, PlanId, PlanSpec, PriceSpec,
    ReplacementSpec, Settings, Subscription, TierSpec,
};
use crate::decimal::{exact_add, parse_exact};
use crate::event::MAX_SUBJECT_CHARS;
use crate::money::Currency;
use crate::price::{Discount, Package, Plan, Price, Rate, Tier, Tiers, TiersMode, UpTo, Usage};
use crate::time::{Period, WindowSize};

/// Collects issues under a path prefix.
struct Issues(Vec<ConfigIssue>);

impl Issues {
    fn add(&mut self, at: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigIssue {
            at: at.into(),
            message: message.into(),
        });
    }
}

impl ConfigFile {
    /// Checks every rule and builds the validated configuration, or returns every issue.
    pub fn validate(self) -> Result<Config, Vec<ConfigIssue>> {
        let mut issues = Issues(Vec::new());
        let settings = validate_settings(&self, &mut issues);
        let meters = validate_meters(&self.meters, &mut issues);
        let plans = validate_plans(&self.plans, &meters, &mut issues);
        let mut warnings = Issues(Vec::new());
        check_filter_values(&self.plans, &mut warnings);
        check_overlapping_prices(&plans, &meters, &mut warnings);
        check_stripe_can_take(&plans, &mut warnings);
        check_flat_fees_billable(&plans, &mut warnings);
        check_percentages_written_as_fractions(&self.customers, &mut warnings);
        let replacements = validate_replacements(&self.plans, &plans, &mut issues, &mut warnings);
        let customers = validate_customers(
            &self.customers,
            (&self.plans, &plans),
            &replacements,
            &mut issues,
            &mut warnings,
        );
        if !issues.0.is_empty() {
            return Err(issues.0);
        }
        let mut meters_by_event_type: HashMap<String, Vec<MeterId>> = HashMap::new();
        for (i, m) in meters.iter().enumerate() {
            meters_by_event_type
                .entry(m.event_type.clone())
                .or_default()
                .push(MeterId(i as u32));
        }
        Ok(Config {
            hash: ConfigHash::of(&self),
            service_specs: super::ServiceSpecsOwned {
                kafka: self.kafka,
                clickhouse: self.clickhouse,
                ingest: self.ingest,
                aggregator: self.aggregator,
                rater: self.rater,
            },
            customer_ids: customers.keys().cloned().collect(),
            warnings: warnings.0,
            meters,
            plans,
            customers,
            settings,
            meters_by_event_type,
        })
    }
}

impl ConfigFile {
    /// The services' sections' issues in this environment, for a file whose price book
    /// has issues of its own: `tally validate` lists both at once, where fixing the book
    /// would only then show the sections' problems. The meters as written stand in for
    /// the book's (`[aggregator] accept_redefined_meters` names them).
    pub fn service_issues(&self, env: &dyn Fn(&str) -> Option<String>) -> Vec<ConfigIssue> {
        let meters = validate_meters(&self.meters, &mut Issues(Vec::new()));
        let mut found = Vec::new();
        super::services::validate(
            super::services::ServiceSpecs {
                kafka: &self.kafka,
                clickhouse: &self.clickhouse,
                ingest: &self.ingest,
                aggregator: &self.aggregator,
                rater: &self.rater,
                meters: &meters,
            },
            env,
            &mut found,
        );
        super::config_issues(found)
    }
}

fn validate_settings(file: &ConfigFile, issues: &mut Issues) -> Settings {
    let mut settings = Settings::default();
    if let Some(window) = file.aggregator.window {
        match WindowSize::new(window.0) {
            Some(w) => settings.window = w,
            None => issues.add(
                "aggregator.window",
                format!(
                    "{} does not divide a day into whole windows; use e.g. \"1m\", \"15m\", \"1h\" or \"1d\"",
                    humantime::format_duration(window.0)
                ),
            ),
        }
    }
    let horizon = file
        .aggregator
        .dedupe_horizon
        .map_or(DEFAULT_DEDUPE_HORIZON, |d| d.0);
    if horizon < std::time::Duration::from_secs(86_400) {
        issues.add(
            "aggregator.dedupe_horizon",
            "must be at least one day: retries arrive late",
        );
    }
    settings.dedupe_horizon = horizon;
    settings.max_future_skew = file
        .events
        .max_future_skew
        .map_or(DEFAULT_MAX_FUTURE_SKEW, |d| d.0);
    settings
}

/// What an item's id is called and what is said when it is missing or taken twice.
struct IdRule {
    field: &'static str,
    empty: &'static str,
    duplicate: &'static str,
}

const METER_SLUG: IdRule = IdRule {
    field: "slug",
    empty: "must not be empty",
    duplicate: "duplicate meter slug; slugs must be unique",
};
const PLAN_ID: IdRule = IdRule {
    field: "id",
    empty: "must not be empty",
    duplicate: "duplicate plan id; ids must be unique",
};
const PRICE_ID: IdRule = IdRule {
    field: "id",
    empty: "must not be empty",
    duplicate: "duplicate price id within the plan",
};
const CUSTOMER_ID: IdRule = IdRule {
    field: "id",
    empty: "must not be empty: it is the events' subject",
    duplicate: "duplicate customer id; ids must be unique",
};

/// Where an item of a list is, for messages: by its id, or by its index while the id
/// is blank.
fn item_at(list: &str, index: usize, id: &str) -> String {
    match id.trim().is_empty() {
        true => format!("{list}[{index}]"),
        false => format!("{list}[{id}]"),
    }
}

/// Checks that an item's id is set and not taken by an earlier item; false when it is
/// not usable.
fn check_id<'a>(
    id: &'a str,
    at: &str,
    rule: &IdRule,
    seen: &mut HashSet<&'a str>,
    issues: &mut Issues,
) -> bool {
    let problem = if id.trim().is_empty() {
        rule.empty
    } else if !seen.insert(id) {
        rule.duplicate
    } else {
        return true;
    };
    issues.add(format!("{at}.{}", rule.field), problem);
    false
}

fn validate_meters(specs: &[MeterSpec], issues: &mut Issues) -> Vec<Meter> {
    let mut seen = HashSet::new();
    let mut meters = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let at = item_at("meters", i, &spec.slug);
        check_id(&spec.slug, &at, &METER_SLUG, &mut seen, issues);
        if spec.event_type.trim().is_empty() {
            issues.add(format!("{at}.event_type"), "must not be empty");
        }
        let aggregation = match (spec.aggregation, spec.value_property.clone()) {
            (AggregationKind::Count, None) => Aggregation::Count,
            (AggregationKind::Count, Some(_)) => {
                issues.add(
                    format!("{at}.value_property"),
                    "a count meter counts events and reads no value; remove value_property",
                );
                Aggregation::Count
            }
            (kind, None) => {
                issues.add(
                    format!("{at}.value_property"),
                    format!(
                        "required for aggregation = \"{}\" (for example value_property = \"$.tokens\")",
                        kind.as_str()
                    ),
                );
                Aggregation::Count
            }
            (AggregationKind::Sum, Some(p)) => Aggregation::Sum {
                value: p,
                negative_allowed: spec.allow_negative_values,
            },
            (AggregationKind::Max, Some(p)) => Aggregation::Max(p),
            (AggregationKind::UniqueCount, Some(p)) => Aggregation::UniqueCount(p),
            (AggregationKind::Latest, Some(p)) => Aggregation::Latest(p),
        };
        if spec.allow_negative_values && spec.aggregation != AggregationKind::Sum {
            issues.add(
                format!("{at}.allow_negative_values"),
                format!(
                    "only a sum meter takes negative values (corrections add up with the usage they correct); a {} cannot be corrected that way: remove it",
                    spec.aggregation.as_str()
                ),
            );
        }
        // Every meter of a type reads each of its events: a correction would be
        // counted as an event, taken as a maximum or a latest value, or rejected.
        // (Another sum meter that takes corrections reads its own value of them.)
        let sharing = (specs.iter().enumerate())
            .filter(|&(j, other)| j != i && other.event_type == spec.event_type)
            .filter(|(_, other)| {
                !(other.allow_negative_values && other.aggregation == AggregationKind::Sum)
            })
            .map(|(_, other)| other.slug.as_str());
        if let (true, Some(other)) = (spec.allow_negative_values, sharing.min()) {
            issues.add(
                format!("{at}.allow_negative_values"),
                format!(
                    "meter {other:?} reads {:?} events too, and would take each correction as an event of its own (a count, a maximum, a latest or distinct value) or reject it: give the corrected meter an event type of its own",
                    spec.event_type
                ),
            );
        }
        for key in spec.group_by.keys() {
            if key.trim().is_empty() {
                issues.add(
                    format!("{at}.group_by"),
                    "dimension names must not be empty",
                );
            }
        }
        meters.push(Meter {
            slug: spec.slug.clone(),
            event_type: spec.event_type.clone(),
            aggregation,
            group_by: spec
                .group_by
                .iter()
                .map(|(k, p)| (k.clone(), p.clone()))
                .collect(),
        });
    }
    meters
}

fn validate_plans(specs: &[PlanSpec], meters: &[Meter], issues: &mut Issues) -> Vec<Plan> {
    let mut seen = HashSet::new();
    let mut plans = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let at = item_at("plans", i, &spec.id);
        check_id(&spec.id, &at, &PLAN_ID, &mut seen, issues);
        let currency = match Currency::from_code(&spec.currency) {
            Some(c) => c,
            None => {
                let hint = match Currency::from_code(&spec.currency.to_ascii_lowercase()) {
                    Some(c) => format!("write it in lower case: \"{c}\""),
                    None => {
                        "expected a lower-case ISO 4217 code such as \"usd\", \"eur\" or \"jpy\""
                            .into()
                    }
                };
                issues.add(
                    format!("{at}.currency"),
                    format!("unknown currency {:?}; {hint}", spec.currency),
                );
                Currency::from_code("usd").expect("usd is in the table")
            }
        };
        if spec.prices.is_empty() {
            issues.add(format!("{at}.prices"), "a plan needs at least one price");
        }
        let mut price_ids = HashSet::new();
        let prices = spec
            .prices
            .iter()
            .enumerate()
            .filter_map(|(j, p)| {
                let at = item_at(&format!("{at}.prices"), j, &p.id);
                check_id(&p.id, &at, &PRICE_ID, &mut price_ids, issues);
                validate_price(p, &at, meters, issues)
            })
            .collect();
        for price in &prices {
            check_flat_amounts_storable(price, currency, &at, issues);
        }
        plans.push(Plan {
            id: spec.id.clone(),
            currency,
            rounding: spec.rounding,
            prices,
        });
    }
    plans
}

/// Warns of two prices of a plan on one meter whose filters can both select the same
/// usage (none pins a dimension to another value than the other does): that usage is
/// billed twice, which a surcharge means but a forgotten filter does not.
fn check_overlapping_prices(plans: &[Plan], meters: &[Meter], warnings: &mut Issues) {
    for (i, plan) in plans.iter().enumerate() {
        let at = format!("{}.prices", item_at("plans", i, &plan.id));
        for (j, first) in plan.prices.iter().enumerate() {
            // A flat fee bills no usage, so none twice.
            let Some(first_usage) = &first.usage else {
                continue;
            };
            for second in &plan.prices[j + 1..] {
                let Some(second_usage) = &second.usage else {
                    continue;
                };
                let disjoint = (first_usage.filter.iter()).any(|(dimension, value)| {
                    (second_usage.filter.iter()).any(|(d, v)| d == dimension && v != value)
                });
                if first_usage.meter != second_usage.meter || disjoint {
                    continue;
                }
                let meter = &meters[first_usage.meter.0 as usize].slug;
                warnings.add(
                    item_at(&at, j, &first.id),
                    format!(
                        "prices {:?} and {:?} both bill usage of meter {meter} that their filters both select, so it is billed twice (a surcharge?); pin a dimension to different values in their filters if each should bill its own",
                        first.id, second.id
                    ),
                );
            }
        }
    }
}

/// Warns of a flat fee written finer than its currency is billed in (a usd fee of
/// 1.005, a kwd one of 1.005 where kwd lines are billed in tens of fils): its line is
/// rounded, every month, to other than what the book says.
fn check_flat_fees_billable(plans: &[Plan], warnings: &mut Issues) {
    for (i, plan) in plans.iter().enumerate() {
        let at = format!("{}.prices", item_at("plans", i, &plan.id));
        let currency = plan.currency;
        for (j, price) in plan.prices.iter().enumerate() {
            let Rate::PerUnit {
                unit_amount: amount,
                ..
            } = price.rate
            else {
                continue;
            };
            if price.usage.is_some() || amount.normalize().scale() <= currency.decimals() {
                continue;
            }
            let billed = currency.round(amount, plan.rounding);
            warnings.add(
                format!("{}.unit_amount", item_at(&at, j, &price.id)),
                format!(
                    "{amount} {currency} is billed as {billed} each month: lines are rounded {} to {} decimals{}",
                    plan.rounding,
                    currency.decimals(),
                    currency.coarser_billing_note()
                ),
            );
        }
    }
}

/// A `percent_off` above 0 and below 1 is a percentage all the same (`"0.125"` takes
/// 0.125 % off), but far more likely a fraction meant as one: 12.5 % written as a
/// share. Valid, as small discounts exist, so warned about.
fn check_percentages_written_as_fractions(customers: &[CustomerSpec], warnings: &mut Issues) {
    for (i, customer) in customers.iter().enumerate() {
        let at = item_at("customers", i, &customer.id);
        let changes = customer.plan_changes.iter().enumerate();
        let discounts = (customer.discounts.iter().enumerate())
            .map(|(k, d)| (format!("{at}.discounts[{k}]"), d))
            .chain(changes.flat_map(|(c, change)| {
                let at = &at;
                (change.discounts.iter().flatten().enumerate())
                    .map(move |(k, d)| (format!("{at}.plan_changes[{c}].discounts[{k}]"), d))
            }));
        for (at, discount) in discounts {
            let Some(percent) = discount.percent_off.map(|p| p.0) else {
                continue;
            };
            if percent > Decimal::ZERO && percent < Decimal::ONE {
                let meant = (percent * Decimal::ONE_HUNDRED).normalize();
                warnings.add(
                    format!("{at}.percent_off"),
                    format!("{percent} takes {percent} % off, not {meant} %: percent_off is a percentage (\"12.5\" takes 12.5 % off); write \"{meant}\" if {meant} % is meant"),
                );
            }
        }
    }
}

/// Stripe's smallest `unit_amount_decimal`: 12 decimals of the currency's minor unit.
const STRIPE_UNIT_AMOUNT_MINOR_DECIMALS: u32 = 12;

/// Warns of what Tally bills as written but Stripe cannot take (fractional tier bounds
/// and package sizes, a flat amount finer than the minor unit, a unit amount finer
/// than Stripe's 12 decimals of it): a company migrating to or from Stripe, running
/// both side by side, cannot enter such a price there as it stands.
fn check_stripe_can_take(plans: &[Plan], warnings: &mut Issues) {
    let outside = "Tally bills it as written, but Stripe takes only";
    for (i, plan) in plans.iter().enumerate() {
        let at = format!("{}.prices", item_at("plans", i, &plan.id));
        let minor = plan.currency.minor_units();
        let unit_decimals = minor + STRIPE_UNIT_AMOUNT_MINOR_DECIMALS;
        let code = plan.currency.code();
        for (j, price) in plan.prices.iter().enumerate() {
            let at = item_at(&at, j, &price.id);
            let check_unit_amount = |warnings: &mut Issues, at: String, amount: Decimal| {
                if amount.normalize().scale() > unit_decimals {
                    warnings.add(at, format!("{amount} has more than {unit_decimals} decimals: {outside} 12 decimals of a {code} minor unit"));
                }
            };
            match &price.rate {
                Rate::PerUnit {
                    unit_amount: amount,
                    package,
                } => {
                    check_unit_amount(warnings, format!("{at}.unit_amount"), *amount);
                    if let Some(p) = package.filter(|p| !p.divide_by.fract().is_zero()) {
                        warnings.add(
                            format!("{at}.transform_quantity.divide_by"),
                            format!(
                                "{} is not a whole number: {outside} whole package sizes",
                                p.divide_by
                            ),
                        );
                    }
                }
                Rate::Tiered { tiers, .. } => {
                    for (k, tier) in tiers.iter().enumerate() {
                        let at = format!("{at}.tiers[{k}]");
                        check_unit_amount(warnings, format!("{at}.unit_amount"), tier.unit_amount);
                        if tier.flat_amount.normalize().scale() > minor {
                            warnings.add(
                                format!("{at}.flat_amount"),
                                format!("{} is finer than a {code} minor unit: {outside} whole minor units as a flat amount", tier.flat_amount),
                            );
                        }
                        if let UpTo::Finite(bound) = tier.up_to {
                            if !bound.fract().is_zero() {
                                warnings.add(
                                    format!("{at}.up_to"),
                                    format!("{bound} is not a whole number: {outside} whole-number tier bounds"),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Warns of filter values that no JSON number or boolean in an event matches: events'
/// numbers and booleans are compared as their normalised text (`1`, `true`), so a
/// filter written `"1.0"` or `"True"` matches only events sending that very string.
fn check_filter_values(plans: &[PlanSpec], warnings: &mut Issues) {
    for (i, plan) in plans.iter().enumerate() {
        let at = format!("{}.prices", item_at("plans", i, &plan.id));
        for (j, price) in plan.prices.iter().enumerate() {
            let at = item_at(&at, j, &price.id);
            for (key, value) in &price.filter {
                let (kind, reads_as) = if ["true", "false"]
                    .iter()
                    .any(|b| value.eq_ignore_ascii_case(b))
                {
                    ("boolean", value.to_ascii_lowercase())
                } else if let Ok(number) = parse_exact(value.trim()) {
                    ("number", number.normalize().to_string())
                } else {
                    continue;
                };
                if reads_as != *value {
                    warnings.add(
                        format!("{at}.filter.{key}"),
                        format!("{value:?} matches only events whose value is that string: a JSON {kind} in an event reads as {reads_as:?}; write {reads_as:?} to match it"),
                    );
                }
            }
        }
    }
}

fn validate_price(
    spec: &PriceSpec,
    at: &str,
    meters: &[Meter],
    issues: &mut Issues,
) -> Option<Price> {
    let usage = match (spec.billing_scheme, &spec.meter) {
        (BillingScheme::Flat, None) => {
            if !spec.filter.is_empty() {
                issues.add(
                    format!("{at}.filter"),
                    "a flat fee bills no usage, so it has no filter; leave filter out",
                );
            }
            None
        }
        (BillingScheme::Flat, Some(_)) => {
            issues.add(
                format!("{at}.meter"),
                "a flat fee bills no meter's usage; leave meter out (or bill the usage with per_unit or tiered)",
            );
            None
        }
        (_, None) => {
            issues.add(
                format!("{at}.meter"),
                "required: the slug of the meter whose usage this price bills (or billing_scheme = \"flat\" for a fee without usage)",
            );
            return None;
        }
        (_, Some(slug)) => {
            let Some(index) = meters.iter().position(|m| m.slug == *slug) else {
                let known: Vec<&str> = meters.iter().map(|m| m.slug.as_str()).collect();
                issues.add(
                    format!("{at}.meter"),
                    format!("unknown meter {slug:?}; known meters: {}", known.join(", ")),
                );
                return None;
            };
            Some(Usage {
                meter: MeterId(index as u32),
                filter: validate_filter(spec, at, &meters[index], issues),
            })
        }
    };
    let rate = validate_rate(spec, at, issues);
    Some(Price {
        id: spec.id.clone(),
        description: spec.description.clone(),
        usage,
        rate: rate?,
    })
}

/// The price's filter as (group_by index, value) pairs of its meter.
fn validate_filter(
    spec: &PriceSpec,
    at: &str,
    meter: &Meter,
    issues: &mut Issues,
) -> Vec<(usize, String)> {
    let mut filter = Vec::new();
    for (key, value) in &spec.filter {
        match meter.group_by.iter().position(|(k, _)| k == key) {
            Some(g) => filter.push((g, value.clone())),
            None => issues.add(
                format!("{at}.filter.{key}"),
                format!("meter {:?} has no group_by dimension {key:?}", meter.slug),
            ),
        }
    }
    if matches!(meter.aggregation, Aggregation::UniqueCount(_))
        && filter.len() < meter.group_by.len()
    {
        issues.add(
            format!("{at}.filter"),
            format!(
                "meter {:?} counts unique values per group_by combination, and distinct counts of \
                 different groups cannot be added; pin every dimension ({}) in the filter, or \
                 meter the value without group_by",
                meter.slug,
                meter
                    .group_by
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    filter
}

/// The price's billing scheme and amounts; `None` when its tiers are unusable.
fn validate_rate(spec: &PriceSpec, at: &str, issues: &mut Issues) -> Option<Rate> {
    let rate = match spec.billing_scheme {
        BillingScheme::Flat => {
            if spec.tiers.is_some()
                || spec.tiers_mode.is_some()
                || spec.transform_quantity.is_some()
            {
                issues.add(
                    at,
                    "a flat fee is unit_amount alone: tiers, tiers_mode and transform_quantity price usage, which it has none of",
                );
            }
            Rate::PerUnit {
                unit_amount: unit_amount(spec, at, "\"flat\": the fee each billed month", issues),
                package: None,
            }
        }
        BillingScheme::PerUnit => {
            if spec.tiers.is_some() || spec.tiers_mode.is_some() {
                issues.add(
                    at,
                    "tiers and tiers_mode belong to billing_scheme = \"tiered\", not \"per_unit\"",
                );
            }
            let unit_amount = unit_amount(spec, at, "\"per_unit\"", issues);
            let package = spec.transform_quantity.as_ref().map(|t| {
                if t.divide_by.0 <= Decimal::ZERO {
                    issues.add(
                        format!("{at}.transform_quantity.divide_by"),
                        "must be a positive number of units per package",
                    );
                }
                Package {
                    divide_by: t.divide_by.0,
                    round: t.round,
                }
            });
            Rate::PerUnit {
                unit_amount,
                package,
            }
        }
        BillingScheme::Tiered => {
            if spec.unit_amount.is_some() {
                issues.add(
                    format!("{at}.unit_amount"),
                    "a tiered price sets unit_amount per tier, not on the price",
                );
            }
            if spec.transform_quantity.is_some() {
                issues.add(
                    format!("{at}.transform_quantity"),
                    "transform_quantity does not combine with tiers (as in Stripe); use per_unit",
                );
            }
            let mode = spec.tiers_mode.unwrap_or_else(|| {
                issues.add(
                    format!("{at}.tiers_mode"),
                    "required with billing_scheme = \"tiered\": \"graduated\" or \"volume\"",
                );
                TiersMode::Graduated
            });
            let tiers = validate_tiers(spec.tiers.as_deref().unwrap_or_default(), at, issues)?;
            Rate::Tiered { mode, tiers }
        }
    };
    Some(rate)
}

/// A per-unit or flat price's `unit_amount`, which its `scheme` (as the message names
/// it) requires.
fn unit_amount(spec: &PriceSpec, at: &str, scheme: &str, issues: &mut Issues) -> Decimal {
    let at = format!("{at}.unit_amount");
    match spec.unit_amount {
        Some(a) => non_negative(a.0, &at, issues),
        None => {
            issues.add(at, format!("required with billing_scheme = {scheme}"));
            Decimal::ZERO
        }
    }
}

/// The tier table, its rules checked by [`Tiers::new`]; `None` when it breaks one
/// (each reported where it is).
fn validate_tiers(specs: &[TierSpec], at: &str, issues: &mut Issues) -> Option<Tiers> {
    let mut tiers = Vec::with_capacity(specs.len());
    let mut bounded = true;
    for (k, spec) in specs.iter().enumerate() {
        if spec.unit_amount.is_none() && spec.flat_amount.is_none() {
            issues.add(
                format!("{at}.tiers[{k}]"),
                "set unit_amount, flat_amount or both (use unit_amount = \"0\" for a free tier)",
            );
        }
        let Some(up_to) = spec.up_to else {
            let rule = match k + 1 == specs.len() {
                true => "the last tier takes up_to = \"inf\", so every quantity has a tier",
                false => "the tier's inclusive upper bound, e.g. up_to = 1000 (the last tier takes up_to = \"inf\")",
            };
            issues.add(
                format!("{at}.tiers[{k}].up_to"),
                format!("required: {rule}"),
            );
            bounded = false;
            continue;
        };
        tiers.push(Tier {
            up_to: up_to.0,
            unit_amount: spec.unit_amount.map_or(Decimal::ZERO, |a| a.0),
            flat_amount: spec.flat_amount.map_or(Decimal::ZERO, |a| a.0),
        });
    }
    if !bounded {
        return None;
    }
    match Tiers::new(tiers) {
        Ok(tiers) => Some(tiers),
        Err(problems) => {
            for p in problems {
                match p.tier {
                    Some(k) => issues.add(format!("{at}.tiers[{k}].{}", p.field), p.message),
                    None => issues.add(format!("{at}.{}", p.field), p.message),
                }
            }
            None
        }
    }
}

/// A price's flat fees (a tier's flat amounts, or a flat-rate fee), billed even without
/// usage, must fit a line: its amount is
/// stored as a 64-bit count of minor units. Found at rating time instead, one such
/// price would stop the period's opening lines for every customer.
fn check_flat_amounts_storable(price: &Price, currency: Currency, at: &str, issues: &mut Issues) {
    let (most, field) = match (&price.rate, &price.usage) {
        (Rate::Tiered { mode, tiers }, _) => {
            let mut flat = tiers.iter().map(|t| t.flat_amount);
            let most = match mode {
                TiersMode::Graduated => flat.try_fold(Decimal::ZERO, exact_add),
                TiersMode::Volume => flat.max(),
            };
            (most, "tiers")
        }
        // A flat fee: its unit amount, once.
        (Rate::PerUnit { unit_amount, .. }, None) => (Some(*unit_amount), "unit_amount"),
        (Rate::PerUnit { .. }, Some(_)) => return,
    };
    if most.and_then(|most| currency.to_minor(most)).is_none() {
        let storable = Decimal::new(i64::MAX, currency.minor_units());
        issues.add(
            format!("{at}.prices[{}].{field}", price.id),
            format!(
                "flat amounts of up to {} {currency} could not be stored on a line (at most {} {currency}, a 64-bit count of minor units); is a digit too many?",
                most.map_or_else(|| "more than".to_owned(), |m| m.to_string()),
                storable.trunc()
            ),
        );
    }
}

fn non_negative(amount: Decimal, at: &str, issues: &mut Issues) -> Decimal {
    if amount.is_sign_negative() && !amount.is_zero() {
        issues.add(at, format!("amounts must not be negative (found {amount})"));
    }
    amount
}

fn validate_customers(
    specs: &[CustomerSpec],
    (plan_specs, plans): (&[PlanSpec], &[Plan]),
    replacements: &HashMap<PlanId, (Period, PlanId)>,
    issues: &mut Issues,
    warnings: &mut Issues,
) -> BTreeMap<String, Customer> {
    let mut customers = BTreeMap::new();
    let mut seen = HashSet::new();
    for (i, spec) in specs.iter().enumerate() {
        let at = item_at("customers", i, &spec.id);
        if !check_id(&spec.id, &at, &CUSTOMER_ID, &mut seen, issues) {
            continue;
        }
        let chars = spec.id.chars().count();
        if chars > MAX_SUBJECT_CHARS {
            issues.add(
                format!("{at}.id"),
                format!("is {chars} characters long, and an event's subject is at most {MAX_SUBJECT_CHARS}: no event could name this customer"),
            );
        }
        let subscribe = |plan: &str, discounts: &[DiscountSpec], at: &str, issues: &mut Issues| {
            validate_subscription(plan, discounts, at, plan_specs, plans, issues)
        };
        let first = subscribe(&spec.plan, &spec.discounts, &at, issues);
        if let (Some(from), Some(through)) = (spec.from, spec.through) {
            if through < from {
                issues.add(
                    format!("{at}.through"),
                    format!("{through} is before from ({from}): through is the last period billed and from the first; set through to {from} or later, or leave it out"),
                );
            }
        }
        let mut changes = Vec::with_capacity(spec.plan_changes.len());
        let mut discount_specs = vec![(at.clone(), spec.discounts.as_slice())];
        for (k, change) in spec.plan_changes.iter().enumerate() {
            let at = format!("{at}.plan_changes[{k}]");
            let misplaced = misplaced_plan_change(spec, k);
            if let Some(message) = &misplaced {
                issues.add(format!("{at}.from"), message);
            }
            warn_if_discounts_end(spec, k, &at, warnings);
            // Checked wherever it falls, so one run shows every problem.
            let discounts = change.discounts.as_deref().unwrap_or_default();
            let Some(subscription) = subscribe(&change.plan, discounts, &at, issues) else {
                continue;
            };
            // One currency per customer: an invoice has one, and usage of a closed
            // period arriving late is billed on a later period's invoice.
            let currency = |s: &Subscription| plans[s.plan.0 as usize].currency;
            if let Some(first) = first
                .as_ref()
                .filter(|f| currency(f) != currency(&subscription))
            {
                issues.add(
                    format!("{at}.plan"),
                    format!(
                        "plan {:?} bills in {}, but the customer is billed in {} (plan {:?}); a customer keeps one currency, so move it to a plan in {}",
                        change.plan,
                        currency(&subscription),
                        currency(first),
                        spec.plan,
                        currency(first),
                    ),
                );
                continue;
            }
            let before = changes.last().map(|(_, s)| s).or(first.as_ref());
            if let Some(before) = before {
                // Between the plans that bill the month before and the month of the
                // change, as replacements (replaced_by) have them by then.
                let old = billing_in_place(before.plan, replacements, |f| f < change.from);
                let new = billing_in_place(subscription.plan, replacements, |f| f <= change.from);
                if old != new {
                    let (old, new) = (&plans[old.0 as usize], &plans[new.0 as usize]);
                    warn_if_usage_unpriced(old, new, change.from, &at, warnings);
                }
            }
            if misplaced.is_none() {
                changes.push((change.from, subscription));
                discount_specs.push((at, discounts));
            }
        }
        if let Some(first) = first {
            let subscriptions = Subscriptions {
                first,
                changes,
                discount_specs,
            };
            let (first, changes) =
                subscriptions.replaced(spec, replacements, (plan_specs, plans), warnings);
            customers.insert(
                spec.id.clone(),
                Customer {
                    id: spec.id.clone(),
                    name: spec.name.clone(),
                    from: spec.from,
                    through: spec.through,
                    first,
                    changes,
                },
            );
        }
    }
    customers
}

/// Each replaced plan's successor and the first period it bills (`replaced_by`), once
/// every one names a plan in the same currency and no plan comes back to itself.
fn validate_replacements(
    plan_specs: &[PlanSpec],
    plans: &[Plan],
    issues: &mut Issues,
    warnings: &mut Issues,
) -> HashMap<PlanId, (Period, PlanId)> {
    let mut replacements = HashMap::new();
    for (i, spec) in plan_specs.iter().enumerate() {
        let Some(ReplacementSpec { plan, from }) = &spec.replaced_by else {
            continue;
        };
        let at = format!("{}.replaced_by", item_at("plans", i, &spec.id));
        let Some(j) = plans.iter().position(|p| &p.id == plan) else {
            issues.add(
                format!("{at}.plan"),
                format!("unknown plan {plan:?}: name the plan that bills this plan's customers from {from} on"),
            );
            continue;
        };
        let (old, new) = (&plans[i], &plans[j]);
        if old.currency != new.currency {
            issues.add(
                format!("{at}.plan"),
                format!(
                    "plan {plan:?} bills in {}, but this plan's customers are billed in {}: a customer keeps one currency, so name a plan in {}",
                    new.currency, old.currency, old.currency
                ),
            );
            continue;
        }
        warn_if_usage_unpriced(old, new, *from, &at, warnings);
        replacements.insert(PlanId(i as u32), (*from, PlanId(j as u32)));
    }
    // A loop would replace a plan forever; it is refused, naming the plans on it, and
    // no replacement is expanded.
    let mut looped: Vec<PlanId> = (replacements.keys().copied())
        .filter(|&start| {
            let mut plan = start;
            // A plan has one successor at most: a walk longer than the map has looped.
            for _ in 0..replacements.len() {
                match replacements.get(&plan) {
                    Some(&(_, next)) if next == start => return true,
                    Some(&(_, next)) => plan = next,
                    None => return false,
                }
            }
            false
        })
        .collect();
    looped.sort_unstable();
    for plan in &looped {
        let id = &plans[plan.0 as usize].id;
        issues.add(
            format!("{}.replaced_by", item_at("plans", plan.0 as usize, id)),
            format!("plan {id:?} is replaced by a chain of plans that comes back to it: end the chain of replaced_by"),
        );
    }
    if !looped.is_empty() {
        replacements.clear();
    }
    replacements
}

/// The plan that bills in place of `plan`: its successor (replaced_by) if that has
/// `started`, that one's if it has too, and so on.
fn billing_in_place(
    mut plan: PlanId,
    replacements: &HashMap<PlanId, (Period, PlanId)>,
    started: impl Fn(Period) -> bool,
) -> PlanId {
    // Loops were refused, so a walk ends within as many steps as there are successors.
    for _ in 0..replacements.len() {
        match replacements.get(&plan) {
            Some(&(from, successor)) if started(from) => plan = successor,
            _ => break,
        }
    }
    plan
}

/// A customer's subscriptions as its own entry gives them, each with where it was
/// written and the discounts it was written with (to carry them to a plan that
/// replaces its plan).
struct Subscriptions<'s> {
    first: Subscription,
    changes: Vec<(Period, Subscription)>,
    discount_specs: Vec<(String, &'s [DiscountSpec])>,
}

impl Subscriptions<'_> {
    /// The subscriptions with the plans' replacements in: a subscription to a replaced
    /// plan bills its successor from the successor's first period, with its discounts
    /// on the successor's prices (a discount on a price the successor has not ends
    /// then, with a warning). Replacements after the customer's `through` never bill.
    fn replaced(
        self,
        customer: &CustomerSpec,
        replacements: &HashMap<PlanId, (Period, PlanId)>,
        plans: (&[PlanSpec], &[Plan]),
        warnings: &mut Issues,
    ) -> (Subscription, Vec<(Period, Subscription)>) {
        // Each subscription bills until the next one starts; the last, with no end.
        let ends: Vec<Option<Period>> = (self.changes.iter().map(|(from, _)| Some(*from)))
            .chain([None])
            .collect();
        let mut discounts = self.discount_specs.into_iter();
        let mut replace = |start, subscription, end| {
            let (at, discounts) = discounts.next().unwrap_or_default();
            let segment = Segment {
                start,
                end,
                discounts,
            };
            segment.replaced(
                subscription,
                customer,
                replacements,
                plans,
                (&at, &mut *warnings),
            )
        };
        let (first, mut changes) = replace(customer.from, self.first, ends[0]);
        for ((from, subscription), &end) in self.changes.into_iter().zip(&ends[1..]) {
            let (at_start, later) = replace(Some(from), subscription, end);
            changes.push((from, at_start));
            changes.extend(later);
        }
        (first, changes)
    }
}

/// The periods one subscription of a customer bills, `start` (none: from the first)
/// until `end` (none: no end), and the discounts it was written with.
struct Segment<'s> {
    start: Option<Period>,
    end: Option<Period>,
    discounts: &'s [DiscountSpec],
}

impl Segment<'_> {
    /// What bills the segment's first period (`subscription`'s plan, or its successor
    /// that starts by then), and each successor that starts later in the segment, with
    /// its first period.
    fn replaced(
        &self,
        subscription: Subscription,
        customer: &CustomerSpec,
        replacements: &HashMap<PlanId, (Period, PlanId)>,
        (plan_specs, plans): (&[PlanSpec], &[Plan]),
        (at, warnings): (&str, &mut Issues),
    ) -> (Subscription, Vec<(Period, Subscription)>) {
        /// One plan billing from `start`, and the discounts it was handed: it keeps
        /// those on prices it has (and those on every price).
        struct Billed {
            start: Option<Period>,
            plan: PlanId,
            handed: Vec<DiscountSpec>,
        }
        let priced = |plan: PlanId, discount: &DiscountSpec| {
            let prices = &plans[plan.0 as usize].prices;
            (discount.price.as_ref()).is_none_or(|id| prices.iter().any(|p| &p.id == id))
        };
        let kept = |billed: &Billed| -> Vec<DiscountSpec> {
            (billed.handed.iter())
                .filter(|d| priced(billed.plan, d))
                .cloned()
                .collect()
        };
        let mut timeline = vec![Billed {
            start: self.start,
            plan: subscription.plan,
            handed: self.discounts.to_vec(),
        }];
        while let Some(last) = timeline.last() {
            let Some(&(from, successor)) = replacements.get(&last.plan) else {
                break;
            };
            let billed = self.end.is_none_or(|end| from < end)
                && customer.through.is_none_or(|through| from <= through);
            if !billed {
                break;
            }
            // A successor that starts by the time its predecessor does bills in its
            // place, handed what its predecessor was.
            let next = if last.start.is_some_and(|start| from <= start) {
                let Some(last) = timeline.pop() else { break };
                Billed {
                    plan: successor,
                    ..last
                }
            } else {
                Billed {
                    start: Some(from),
                    plan: successor,
                    handed: kept(last),
                }
            };
            timeline.push(next);
        }
        // Said once the plans that bill are known: a discount a replacement ends.
        let mut before = subscription.plan;
        for billed in &timeline {
            let (old, new) = (&plans[before.0 as usize], &plans[billed.plan.0 as usize]);
            let ended = (billed.handed.iter()).filter(|d| !priced(billed.plan, d));
            for price in ended.filter_map(|d| d.price.as_ref()) {
                let from = billed
                    .start
                    .map_or_else(|| "its first period".to_owned(), |p| p.to_string());
                warnings.add(
                    format!("{at}.discounts"),
                    format!(
                        "the discount on price {price:?} ends in {from}, when plan {:?} replaces {:?} (replaced_by) and has no price {price:?}",
                        new.id, old.id
                    ),
                );
            }
            before = billed.plan;
        }
        // Its problems are the original's, reported with it.
        let subscribe = |billed: &Billed| {
            validate_subscription(
                &plans[billed.plan.0 as usize].id,
                &kept(billed),
                at,
                plan_specs,
                plans,
                &mut Issues(Vec::new()),
            )
        };
        let mut timeline = timeline.into_iter();
        let first = timeline
            .next()
            .filter(|b| b.plan != subscription.plan)
            .and_then(|b| subscribe(&b))
            .unwrap_or(subscription);
        let later = timeline
            .filter_map(|b| Some((b.start?, subscribe(&b)?)))
            .collect();
        (first, later)
    }
}

/// Why the customer's plan change `k` cannot take effect where it is, if it cannot: at
/// or before the customer's first period, after its last, or not after the change
/// before it.
fn misplaced_plan_change(spec: &CustomerSpec, k: usize) -> Option<String> {
    let change = &spec.plan_changes[k];
    let previous = k.checked_sub(1).map(|p| spec.plan_changes[p].from);
    if let Some(from) = spec.from.filter(|&from| change.from <= from) {
        Some(format!(
            "{} is not after the customer's first period ({from}): bill the first period's plan as the customer's plan",
            change.from
        ))
    } else if let Some(through) = spec.through.filter(|&through| change.from > through) {
        Some(format!(
            "{} is after the customer's last period ({through}): the change would never bill; remove it or move through",
            change.from
        ))
    } else {
        previous.filter(|&previous| change.from <= previous).map(|previous| {
            format!(
                "{} is not after the change before it ({previous}): list plan changes in the order they take effect, one per period",
                change.from
            )
        })
    }
}

/// Warns when plan change `k` (at `at`) says nothing of discounts while the plan
/// before it had some: they end with it, which a reader of the book may not expect.
fn warn_if_discounts_end(spec: &CustomerSpec, k: usize, at: &str, warnings: &mut Issues) {
    let before = match k {
        0 => spec.discounts.as_slice(),
        _ => spec.plan_changes[k - 1]
            .discounts
            .as_deref()
            .unwrap_or_default(),
    };
    if spec.plan_changes[k].discounts.is_none() && !before.is_empty() {
        let prices: Vec<&str> = (before.iter())
            .map(|d| d.price.as_deref().unwrap_or("every price"))
            .collect();
        warnings.add(
            format!("{at}.discounts"),
            format!(
                "the discounts before this change ({}) end with it, as discounts do not carry over to a new plan; list them here again to keep them, or write discounts = [] to end them and silence this",
                prices.join(", ")
            ),
        );
    }
}

/// Warns of usage the plan before a change bills and the plan after it does not: from
/// the change on it is reported as unbilled, never billed, which a new plan rarely
/// means (a price forgotten when the plan was copied).
fn warn_if_usage_unpriced(old: &Plan, new: &Plan, from: Period, at: &str, warnings: &mut Issues) {
    // A price selects at least what `usage` selects when it reads the same meter and
    // pins no dimension `usage` leaves open or pins otherwise.
    let covers = |price: &Price, usage: &Usage| {
        (price.usage.as_ref()).is_some_and(|p| {
            p.meter == usage.meter && p.filter.iter().all(|pin| usage.filter.contains(pin))
        })
    };
    let dropped: Vec<&str> = (old.prices.iter())
        .filter(|price| {
            (price.usage.as_ref()).is_some_and(|usage| !new.prices.iter().any(|p| covers(p, usage)))
        })
        .map(|price| price.id.as_str())
        .collect();
    if !dropped.is_empty() {
        warnings.add(
            format!("{at}.plan"),
            format!(
                "plan {:?} bills usage that no price of plan {:?} bills ({:?}'s prices {}): from {from} it is reported as unbilled, never billed; add such a price to {:?} if the usage should still be billed",
                old.id,
                new.id,
                old.id,
                dropped.join(", "),
                new.id
            ),
        );
    }
}

/// A customer's `plan` and its `discounts` (at `at`), as one subscription.
fn validate_subscription(
    plan_id: &str,
    discount_specs: &[DiscountSpec],
    at: &str,
    plan_specs: &[PlanSpec],
    plans: &[Plan],
    issues: &mut Issues,
) -> Option<Subscription> {
    let Some(plan_index) = plans.iter().position(|p| p.id == plan_id) else {
        let known: Vec<&str> = plans.iter().map(|p| p.id.as_str()).collect();
        issues.add(
            format!("{at}.plan"),
            format!(
                "unknown plan {plan_id:?}; known plans: {}",
                known.join(", ")
            ),
        );
        return None;
    };
    let plan = &plans[plan_index];
    let mut discounts = BTreeMap::new();
    for (k, d) in discount_specs.iter().enumerate() {
        let at = format!("{at}.discounts[{k}]");
        let Some(discount) = validate_discount(d, &at, issues) else {
            continue;
        };
        if let Discount::AmountOff(off) = discount {
            let mut usable = true;
            let decimals = plan.currency.decimals();
            if off.normalize().scale() > decimals {
                issues.add(
                    format!("{at}.amount_off"),
                    format!(
                        "{off} has more decimals than {} is billed in ({decimals}); amounts are in the currency's major unit, so round it to {decimals} decimals",
                        plan.currency,
                    ),
                );
                usable = false;
            }
            // Discounts apply line by line; an amount off every line would take
            // the amount once per price, not once per invoice as finance reads it.
            if d.price.is_none() {
                issues.add(
                    format!("{at}.price"),
                    "an amount_off needs the price it applies to: discounts are per invoice line, so one without a price would be taken off every line; name the price (percent_off may omit it)",
                );
                usable = false;
            }
            if !usable {
                continue;
            }
        }
        let targets: Vec<usize> = match &d.price {
            Some(price) => match plan.prices.iter().position(|p| &p.id == price) {
                Some(j) => vec![j],
                None => {
                    // A price that is in the file but failed validation has its
                    // own issue already; only a price that is not there is news.
                    let declared = plan_specs[plan_index].prices.iter().any(|p| &p.id == price);
                    if !declared {
                        let ids = || plan.prices.iter().map(|p| p.id.as_str());
                        let meant = (super::likely_meant(price, ids()))
                            .map_or_else(String::new, |id| format!(" (did you mean {id:?}?)"));
                        let prices = ids().collect::<Vec<_>>().join(", ");
                        issues.add(
                            format!("{at}.price"),
                            format!(
                                "plan {:?} has no price {price:?}{meant}; its prices: {prices}",
                                plan.id
                            ),
                        );
                    }
                    continue;
                }
            },
            None => (0..plan.prices.len()).collect(),
        };
        for j in targets {
            if discounts.insert(j, discount).is_some() {
                issues.add(
                    &at,
                    format!(
                        "price {:?} already has a discount; one discount per line keeps invoices predictable",
                        plan.prices[j].id
                    ),
                );
            }
        }
    }
    Some(Subscription {
        plan: PlanId(plan_index as u32),
        discounts,
    })
}

fn validate_discount(spec: &DiscountSpec, at: &str, issues: &mut Issues) -> Option<Discount> {
    match (spec.percent_off, spec.amount_off) {
        (Some(p), None) => {
            if p.0 < Decimal::ZERO || p.0 > Decimal::ONE_HUNDRED {
                issues.add(
                    format!("{at}.percent_off"),
                    format!("must be between 0 and 100 (found {})", p.0),
                );
                return None;
            }
            Some(Discount::PercentOff(p.0))
        }
        (None, Some(a)) => {
            if a.0 < Decimal::ZERO {
                issues.add(format!("{at}.amount_off"), "must not be negative");
                return None;
            }
            Some(Discount::AmountOff(a.0))
        }
        _ => {
            issues.add(at, "set exactly one of percent_off or amount_off");
            None
        }
    }
}
