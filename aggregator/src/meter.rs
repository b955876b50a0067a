//! What a meter reads from each event, as stored beside the usage it read.
//!
//! In: a validated [`Meter`]. Out: its [`MeterDefinition`], and the first setting in
//! which two definitions differ. The aggregator stores the definitions of the meters
//! whose usage a changelog record holds, so that a restore under a price book that
//! reads one of them differently is refused instead of billing the open month partly
//! one way and partly the other (which `tally rate` of that month could not
//! reproduce).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tally_schemas::config::{AggregationKind, Config, Meter, MeterShape};
use tally_schemas::ids::Fingerprinter;

/// Every setting of a meter that decides which events count and what each adds,
/// named as in `tally.toml`; a meter's `description` is not part of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterDefinition {
    pub event_type: String,
    pub aggregation: AggregationKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_property: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_negative_values: bool,
    /// Dimension name -> JSONPath.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub group_by: BTreeMap<String, String>,
}

/// A setting a meter's stored usage was read with and the configuration now sets
/// otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionChange {
    /// As in `tally.toml`: `event_type`, `group_by.model`.
    pub setting: String,
    /// What the usage was read with, and what is configured now; `none` when unset.
    pub stored: String,
    pub configured: String,
}

impl MeterDefinition {
    pub fn of(meter: &Meter) -> Self {
        let (value_property, allow_negative_values) = match &meter.aggregation {
            tally_schemas::config::Aggregation::Sum {
                value,
                negative_allowed,
            } => (Some(value), *negative_allowed),
            other => (other.value_property(), false),
        };
        MeterDefinition {
            event_type: meter.event_type.clone(),
            aggregation: meter.aggregation.kind(),
            value_property: value_property.map(|p| p.as_str().to_owned()),
            allow_negative_values,
            group_by: (meter.group_by.iter())
                .map(|(name, path)| (name.clone(), path.as_str().to_owned()))
                .collect(),
        }
    }

    pub fn shape(&self) -> MeterShape<'_> {
        MeterShape {
            aggregation: self.aggregation,
            dimensions: self.group_by.keys().map(String::as_str).collect(),
        }
    }

    /// A digest of the definition, where the whole does not fit (a commit's offset
    /// metadata): equal for equal definitions, in every build that writes them alike.
    pub fn fingerprint(&self) -> u64 {
        // Plain data with string keys: a failure is a bug.
        let written = serde_json::to_vec(self).expect("a meter definition serialises");
        Fingerprinter::new(b"meter").part(&written).finish_64()
    }

    /// The first setting in which `configured` reads events differently from `self`,
    /// in the order of `tally.toml`'s meter keys, dimensions by name.
    pub fn change_to(&self, configured: &MeterDefinition) -> Option<DefinitionChange> {
        let change = |setting: &str, stored: String, now: String| {
            (stored != now).then(|| DefinitionChange {
                setting: setting.to_owned(),
                stored,
                configured: now,
            })
        };
        let optional =
            |value: Option<&String>| value.map_or("none".to_owned(), |v| format!("{v:?}"));
        let dimensions = self.group_by.keys().chain(configured.group_by.keys());
        change(
            "event_type",
            format!("{:?}", self.event_type),
            format!("{:?}", configured.event_type),
        )
        .or_else(|| {
            change(
                "aggregation",
                self.aggregation.as_str().to_owned(),
                configured.aggregation.as_str().to_owned(),
            )
        })
        .or_else(|| {
            change(
                "value_property",
                optional(self.value_property.as_ref()),
                optional(configured.value_property.as_ref()),
            )
        })
        .or_else(|| {
            change(
                "allow_negative_values",
                self.allow_negative_values.to_string(),
                configured.allow_negative_values.to_string(),
            )
        })
        .or_else(|| {
            dimensions.into_iter().find_map(|name| {
                change(
                    &format!("group_by.{name}"),
                    optional(self.group_by.get(name)),
                    optional(configured.group_by.get(name)),
                )
            })
        })
    }
}

/// What the meters whose usage a state holds are checked against: the book's
/// definitions, and the meters whose usage may have been read otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredMeters {
    /// Each meter's [`MeterDefinition::fingerprint`], by slug.
    pub fingerprints: BTreeMap<String, u64>,
    /// `[aggregator] accept_redefined_meters`: usage of these, read with an earlier
    /// definition, is kept as counted.
    pub accepted: BTreeSet<String>,
}

impl ConfiguredMeters {
    pub fn new(config: &Config, accepted: BTreeSet<String>) -> Self {
        let fingerprints = (config.meters.iter())
            .map(|meter| (meter.slug.clone(), MeterDefinition::of(meter).fingerprint()))
            .collect();
        ConfiguredMeters {
            fingerprints,
            accepted,
        }
    }

    /// The first meter of `held` (fingerprints of the meters whose usage a state holds,
    /// by slug) that this book does not define alike: removed, or defined otherwise and
    /// not accepted.
    pub fn first_redefined<'h>(&self, held: &'h BTreeMap<String, u64>) -> Option<&'h str> {
        (held.iter())
            .find(|(slug, fingerprint)| match self.fingerprints.get(*slug) {
                None => true,
                Some(configured) => configured != *fingerprint && !self.accepted.contains(*slug),
            })
            .map(|(slug, _)| slug.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_schemas::config::Config;

    const BOOK: &str = r#"
        [[meters]]
        slug = "tokens"
        event_type = "llm.tokens"
        aggregation = "sum"
        value_property = "$.tokens"
        group_by = { model = "$.model" }

        [[meters]]
        slug = "resolutions"
        event_type = "ai.resolution"
        aggregation = "count"
    "#;

    fn definition(book: &str, slug: &str) -> MeterDefinition {
        let config = Config::parse(book, "test").unwrap();
        let meter = config.meters.iter().find(|m| m.slug == slug).unwrap();
        MeterDefinition::of(meter)
    }

    fn change(from: &str, to: &str) -> Option<DefinitionChange> {
        let edited = BOOK.replacen(from, to, 1);
        assert_ne!(edited, BOOK, "{from:?} not in the book");
        definition(BOOK, "tokens").change_to(&definition(&edited, "tokens"))
    }

    fn named(setting: &str, stored: &str, configured: &str) -> Option<DefinitionChange> {
        Some(DefinitionChange {
            setting: setting.into(),
            stored: stored.into(),
            configured: configured.into(),
        })
    }

    #[test]
    fn each_setting_that_changes_what_an_event_adds_is_named_with_both_values() {
        assert_eq!(
            change("\"llm.tokens\"", "\"llm.token\""),
            named("event_type", "\"llm.tokens\"", "\"llm.token\"")
        );
        assert_eq!(
            change("\"$.tokens\"", "\"$.usage.tokens\""),
            named("value_property", "\"$.tokens\"", "\"$.usage.tokens\"")
        );
        assert_eq!(
            change("\"sum\"", "\"max\""),
            named("aggregation", "sum", "max")
        );
        assert_eq!(
            change("\"$.tokens\"", "\"$.tokens\"\nallow_negative_values = true"),
            named("allow_negative_values", "false", "true")
        );
        assert_eq!(
            change("\"$.model\"", "\"$.engine\""),
            named("group_by.model", "\"$.model\"", "\"$.engine\"")
        );
        // A renamed dimension keeps the count the restore checks, but not the names.
        assert_eq!(
            change("model = ", "engine = "),
            named("group_by.model", "\"$.model\"", "none")
        );
    }

    #[test]
    fn a_description_or_another_meter_is_not_part_of_a_meters_definition() {
        assert_eq!(
            change(
                "\"$.model\" }",
                "\"$.model\" }\ndescription = \"LLM tokens\""
            ),
            None
        );
        let other = BOOK.replacen("\"ai.resolution\"", "\"ai.resolved\"", 1);
        assert_eq!(
            definition(BOOK, "tokens").change_to(&definition(&other, "tokens")),
            None
        );
        assert!(definition(BOOK, "resolutions")
            .change_to(&definition(&other, "resolutions"))
            .is_some());
    }

    #[test]
    fn usage_held_under_a_definition_the_configuration_lacks_is_named_unless_accepted() {
        let book = |text: &str, accepted: &[&str]| {
            let config = Config::parse(text, "test").unwrap();
            ConfiguredMeters::new(&config, accepted.iter().map(|&s| s.to_owned()).collect())
        };
        let configured = book(BOOK, &[]);
        let edited = BOOK.replacen("\"$.tokens\"", "\"$.usage\"", 1);
        let redefined = book(&edited, &[]);
        let fingerprints = &configured.fingerprints;
        assert_ne!(fingerprints["tokens"], redefined.fingerprints["tokens"]);
        assert_eq!(
            fingerprints["resolutions"],
            redefined.fingerprints["resolutions"]
        );
        let held = |slugs: &[&str]| -> BTreeMap<String, u64> {
            slugs
                .iter()
                .map(|s| ((*s).to_owned(), fingerprints[*s]))
                .collect()
        };
        let both = held(&["resolutions", "tokens"]);
        assert_eq!(configured.first_redefined(&both), None);
        assert_eq!(redefined.first_redefined(&both), Some("tokens"));
        assert_eq!(book(&edited, &["tokens"]).first_redefined(&both), None);
        assert_eq!(
            book(&edited, &["resolutions"]).first_redefined(&both),
            Some("tokens")
        );
        // A meter no usage is held of may change.
        assert_eq!(redefined.first_redefined(&held(&["resolutions"])), None);
        // A removed meter is named, listed or not.
        let mut removed = book(BOOK, &["resolutions"]);
        removed.fingerprints.remove("resolutions");
        assert_eq!(
            removed.first_redefined(&held(&["resolutions"])),
            Some("resolutions")
        );
    }

    #[test]
    fn a_definition_reads_back_from_its_stored_form() {
        let tokens = definition(BOOK, "tokens");
        let stored = serde_json::to_string(&tokens).unwrap();
        assert_eq!(
            stored,
            r#"{"event_type":"llm.tokens","aggregation":"sum","value_property":"$.tokens","group_by":{"model":"$.model"}}"#
        );
        assert_eq!(
            serde_json::from_str::<MeterDefinition>(&stored).unwrap(),
            tokens
        );
    }
}
