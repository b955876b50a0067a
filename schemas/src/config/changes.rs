//! What a new price book changes of the one the pipeline runs, and what each change
//! does to its months: `tally validate --deployed`.
//!
//! In: both books as written ([`ConfigFile`]) and the month now running. Out: one
//! [`BookChange`] per meter, plan, price or customer that differs, with its effect as
//! the streaming pipeline takes it: an aggregator refuses to restore usage of a meter
//! read otherwise, and a rater bills every month not yet settled as the new book says,
//! ended months included. Descriptions and names are for people and change nothing.
//! Pure.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{ConfigFile, MeterShape, MeterSpec, PlanChangeSpec};
use crate::time::Period;

/// One difference between the deployed book and the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookChange {
    /// `meter "tokens"`, `plan "pro" price "resolutions"`, `customer "cust_acme"`.
    pub item: String,
    /// `added`, `removed`, or each changed setting with both values.
    pub change: String,
    /// What the pipeline does about it, and what to do instead where that is wanted.
    pub effect: Effect,
}

/// What a change does to the pipeline's months.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Aggregators holding the meter's usage refuse to restore under the new book.
    MeterRefused,
    /// Redefined, and listed in the new book's `[aggregator] accept_redefined_meters`:
    /// usage held is kept as counted, events are read the new way.
    MeterAccepted,
    /// Events of a new meter are unmetered by aggregators still on the old book.
    MeterAdded,
    /// Every month not yet settled is billed anew, ended ones included.
    Repriced,
    /// A plan no customer of the deployed book is on.
    PlanAdded,
    /// Lines of months not yet settled are retired.
    Retired,
    /// A new customer without `from`, or from a month that has ended: billed in every
    /// month still open from then.
    BilledEveryOpenMonth,
    /// A new customer billed from the month now running.
    CustomerAdded,
    /// A plan change or replacement from the month now running: billed whole as the
    /// new book says.
    MonthBegun,
    /// From a month still to come: nothing billed so far changes.
    Scheduled,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::MeterRefused => "an aggregator holding usage of this meter refuses to start with this book (it names the setting); keep the meter as it is and put the new definition in a new meter (another slug) with prices from the month it starts (listed in [aggregator] accept_redefined_meters, a change of aggregation or of dimension names is refused still)",
            Effect::MeterAccepted => "aggregators keep the usage they hold of it as it was counted and read its events the new way from their restart, as [aggregator] accept_redefined_meters lists it: months open then are billed partly each way, which tally rate of them with either book does not reproduce",
            Effect::MeterAdded => "restart the aggregators and ingest with this book before senders send its events: one on the old book counts them as unmetered",
            Effect::Repriced => "every month not yet settled is billed anew, ended months that may have been invoiced included (TallyEndedMonthRepriced tells finance); to change prices from a month on, put them in a new plan and move customers by a plan change, or the plan's replaced_by, from that month",
            Effect::PlanAdded => "it bills only the customers this book puts on it, listed below",
            Effect::Retired => "its lines of every month not yet settled are retired (billed 0), ended months included",
            Effect::BilledEveryOpenMonth => "it is billed in every month still open from its `from` on (every one without it), flat fees included, ended months that may have been invoiced too: give it `from`, the month its billing starts",
            Effect::CustomerAdded => "billed from its `from` on, a month that has begun billed whole (Tally does not prorate: flat fees in full)",
            Effect::MonthBegun => "the month now running is billed whole as this book says, from its first day (Tally does not prorate); date such changes at the next month",
            Effect::Scheduled => "from a month still to come: nothing billed so far changes",
        })
    }
}

impl fmt::Display for BookChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.item, self.change, self.effect)
    }
}

/// What `after` changes of `before`, `running` being the month now running: meters,
/// then plans and their prices, then customers, each in id order.
pub fn book_changes(before: &ConfigFile, after: &ConfigFile, running: Period) -> Vec<BookChange> {
    let mut changes = Vec::new();
    let meters = |book: &ConfigFile| keyed(&book.meters, |m| &m.slug, &["description"]);
    fn shape<'b>(book: &'b ConfigFile, slug: &str) -> Option<MeterShape<'b>> {
        (book.meters.iter())
            .find(|meter| meter.slug == slug)
            .map(MeterSpec::shape)
    }
    for (slug, change) in differences(&meters(before), &meters(after)) {
        let accepted = after.aggregator.accept_redefined_meters.contains(&slug)
            && shape(before, &slug) == shape(after, &slug);
        let effect = match change {
            Difference::Added => Effect::MeterAdded,
            Difference::Changed(_) if accepted => Effect::MeterAccepted,
            _ => Effect::MeterRefused,
        };
        changes.push(change.told(format!("meter {slug:?}"), effect));
    }
    let plans = |book: &ConfigFile| {
        keyed(
            &book.plans,
            |p| &p.id,
            &["description", "prices", "replaced_by"],
        )
    };
    for (id, change) in differences(&plans(before), &plans(after)) {
        let effect = match change {
            Difference::Added => Effect::PlanAdded,
            Difference::Removed => Effect::Retired,
            Difference::Changed(_) => Effect::Repriced,
        };
        changes.push(change.told(format!("plan {id:?}"), effect));
    }
    for plan in &after.plans {
        let Some(deployed) = before.plans.iter().find(|p| p.id == plan.id) else {
            continue;
        };
        let prices = |prices| keyed(prices, |p: &super::PriceSpec| &p.id, &["description"]);
        for (id, change) in differences(&prices(&deployed.prices), &prices(&plan.prices)) {
            let effect = match change {
                Difference::Removed => Effect::Retired,
                _ => Effect::Repriced,
            };
            changes.push(change.told(format!("plan {:?} price {id:?}", plan.id), effect));
        }
        let replaced =
            |spec: &super::PlanSpec| spec.replaced_by.as_ref().map(|r| (r.plan.clone(), r.from));
        if replaced(deployed) != replaced(plan) {
            let change = format!(
                "replaced_by {} -> {}",
                shown(&to_value(&deployed.replaced_by)),
                shown(&to_value(&plan.replaced_by))
            );
            let from = [&deployed.replaced_by, &plan.replaced_by]
                .into_iter()
                .flatten()
                .map(|r| r.from)
                .min();
            changes.push(BookChange {
                item: format!("plan {:?}", plan.id),
                change,
                effect: begun_or_scheduled(from, running),
            });
        }
    }
    let customers = |book: &ConfigFile| keyed(&book.customers, |c| &c.id, &["name"]);
    for (id, change) in differences(&customers(before), &customers(after)) {
        let customer = after.customers.iter().find(|c| c.id == id);
        let effect = match (&change, customer) {
            (Difference::Removed, _) => Effect::Retired,
            (Difference::Added, Some(c)) => match c.from {
                Some(from) if from > running => Effect::Scheduled,
                Some(from) if from == running => Effect::CustomerAdded,
                _ => Effect::BilledEveryOpenMonth,
            },
            (Difference::Changed(settings), Some(c)) if only(settings, "plan_changes") => {
                let deployed = before.customers.iter().find(|d| d.id == id);
                let deployed = deployed.map_or(&[][..], |d| &d.plan_changes[..]);
                begun_or_scheduled(first_changed(deployed, &c.plan_changes), running)
            }
            _ => Effect::Repriced,
        };
        changes.push(change.told(format!("customer {id:?}"), effect));
    }
    changes
}

/// What a change from `from` on does: nothing billed yet if it is still to come, the
/// month now running billed whole, or every month not yet settled from an ended one on
/// billed anew.
fn begun_or_scheduled(from: Option<Period>, running: Period) -> Effect {
    match from {
        Some(from) if from > running => Effect::Scheduled,
        Some(from) if from == running => Effect::MonthBegun,
        _ => Effect::Repriced,
    }
}

/// Whether `name` is the one setting `settings` (each `name before -> after`) holds.
fn only(settings: &[String], name: &str) -> bool {
    matches!(settings, [one] if one.starts_with(&format!("{name} ")))
}

/// The first month from which two customers' plan changes differ.
fn first_changed(before: &[PlanChangeSpec], after: &[PlanChangeSpec]) -> Option<Period> {
    let value = |change: &PlanChangeSpec| (change.from, to_value(change));
    let before: BTreeMap<Period, Value> = before.iter().map(value).collect();
    let after: BTreeMap<Period, Value> = after.iter().map(value).collect();
    let months = before.keys().chain(after.keys());
    months
        .filter(|month| before.get(month) != after.get(month))
        .min()
        .copied()
}

/// How an item differs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Difference {
    Added,
    Removed,
    /// The settings that differ, each `name before -> after`.
    Changed(Vec<String>),
}

impl Difference {
    fn told(self, item: String, effect: Effect) -> BookChange {
        let change = match self {
            Difference::Added => "added".to_owned(),
            Difference::Removed => "removed".to_owned(),
            Difference::Changed(settings) => settings.join(", "),
        };
        BookChange {
            item,
            change,
            effect,
        }
    }
}

/// Each item as its settings, by id, without those that change nothing billed.
fn keyed<'a, T: Serialize>(
    items: &'a [T],
    id: impl Fn(&'a T) -> &'a String,
    ignored: &[&str],
) -> BTreeMap<String, Map<String, Value>> {
    (items.iter())
        .map(|item| {
            let Value::Object(mut settings) = to_value(item) else {
                unreachable!("a spec serialises as a table");
            };
            settings.retain(|name, _| !ignored.contains(&name.as_str()));
            (id(item).clone(), settings)
        })
        .collect()
}

/// The items added, removed or changed, by id; a change lists its settings, each
/// with both values.
fn differences(
    before: &BTreeMap<String, Map<String, Value>>,
    after: &BTreeMap<String, Map<String, Value>>,
) -> Vec<(String, Difference)> {
    let ids = before
        .keys()
        .chain(after.keys())
        .collect::<std::collections::BTreeSet<_>>();
    ids.into_iter()
        .filter_map(|id| {
            let difference = match (before.get(id), after.get(id)) {
                (None, Some(_)) => Difference::Added,
                (Some(_), None) => Difference::Removed,
                (Some(was), Some(now)) => {
                    let names = was
                        .keys()
                        .chain(now.keys())
                        .collect::<std::collections::BTreeSet<_>>();
                    let settings: Vec<String> = (names.into_iter())
                        .filter(|name| was.get(*name) != now.get(*name))
                        .map(|name| {
                            let value = |spec: &Map<String, Value>| {
                                spec.get(name).map_or("none".to_owned(), shown)
                            };
                            format!("{name} {} -> {}", value(was), value(now))
                        })
                        .collect();
                    if settings.is_empty() {
                        return None;
                    }
                    Difference::Changed(settings)
                }
                (None, None) => return None,
            };
            Some((id.clone(), difference))
        })
        .collect()
}

fn to_value(spec: &impl Serialize) -> Value {
    // Plain data: a failure is a bug.
    serde_json::to_value(spec).expect("a spec serialises")
}

/// A setting's value as TOML would show it, close enough: strings quoted, tables and
/// arrays as JSON.
fn shown(value: &Value) -> String {
    match value {
        Value::Null => "none".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYED: &str = r#"
[[meters]]
slug = "tokens"
event_type = "llm.tokens"
aggregation = "sum"
value_property = "$.tokens"
group_by = { model = "$.model" }

[[plans]]
id = "pro"
currency = "usd"

[[plans.prices]]
id = "tokens"
meter = "tokens"
billing_scheme = "per_unit"
unit_amount = "0.002"

[[plans.prices]]
id = "platform"
billing_scheme = "flat"
unit_amount = "500"

[[plans]]
id = "pro-2027"
currency = "usd"

[[customers]]
id = "cust_acme"
plan = "pro"
"#;

    fn running() -> Period {
        "2026-12".parse().unwrap()
    }

    /// What `edited` (the deployed book with `from` replaced by `to`, each pair in
    /// turn) changes of the deployed book, as `item: change: effect` lines.
    fn changes(edits: &[(&str, &str)]) -> Vec<(String, String, Effect)> {
        let mut book = DEPLOYED.to_owned();
        for (from, to) in edits {
            assert!(book.contains(from), "{from:?}");
            book = book.replacen(from, to, 1);
        }
        let parse = |text: &str| ConfigFile::parse(text, "test").unwrap();
        (book_changes(&parse(DEPLOYED), &parse(&book), running()).into_iter())
            .map(|c| (c.item, c.change, c.effect))
            .collect()
    }

    fn one(item: &str, change: &str, effect: Effect) -> Vec<(String, String, Effect)> {
        vec![(item.to_owned(), change.to_owned(), effect)]
    }

    #[test]
    fn a_meter_read_otherwise_or_removed_is_refused_and_a_new_one_needs_a_restart() {
        assert_eq!(
            changes(&[(r#""$.tokens""#, r#""$.usage.tokens""#)]),
            one(
                "meter \"tokens\"",
                "value_property \"$.tokens\" -> \"$.usage.tokens\"",
                Effect::MeterRefused
            )
        );
        let added = "[[meters]]\nslug = \"seats\"\nevent_type = \"seats\"\naggregation = \"count\"\n\n[[plans]]";
        assert_eq!(
            changes(&[("[[plans]]", added)]),
            one("meter \"seats\"", "added", Effect::MeterAdded)
        );
    }

    #[test]
    fn a_meter_read_otherwise_and_accepted_by_the_new_book_is_told_so() {
        let accepted = "[aggregator]\naccept_redefined_meters = [\"tokens\"]\n\n[[plans]]";
        assert_eq!(
            changes(&[
                (r#""$.tokens""#, r#""$.usage.tokens""#),
                ("[[plans]]", accepted)
            ]),
            one(
                "meter \"tokens\"",
                "value_property \"$.tokens\" -> \"$.usage.tokens\"",
                Effect::MeterAccepted
            )
        );
        // Held usage keeps its aggregation and dimension names, listed or not.
        let changed = changes(&[(r#""sum""#, r#""max""#), ("[[plans]]", accepted)]);
        assert_eq!(changed[0].2, Effect::MeterRefused, "{changed:?}");
    }

    #[test]
    fn a_price_edited_added_or_removed_reprices_the_months_not_yet_settled() {
        assert_eq!(
            changes(&[(r#""0.002""#, r#""0.0025""#)]),
            one(
                "plan \"pro\" price \"tokens\"",
                "unit_amount \"0.002\" -> \"0.0025\"",
                Effect::Repriced
            )
        );
        let platform = "[[plans.prices]]\nid = \"platform\"\nbilling_scheme = \"flat\"\nunit_amount = \"500\"\n";
        assert_eq!(
            changes(&[(platform, "")]),
            one(
                "plan \"pro\" price \"platform\"",
                "removed",
                Effect::Retired
            )
        );
        let support = "id = \"pro-2027\"\ncurrency = \"usd\"\n\n[[plans.prices]]\nid = \"support\"\nbilling_scheme = \"flat\"\nunit_amount = \"20\"\n";
        assert_eq!(
            changes(&[("id = \"pro-2027\"\ncurrency = \"usd\"\n", support)]),
            one(
                "plan \"pro-2027\" price \"support\"",
                "added",
                Effect::Repriced
            )
        );
        assert_eq!(
            changes(&[("currency = \"usd\"", "currency = \"eur\"")]),
            one(
                "plan \"pro\"",
                "currency \"usd\" -> \"eur\"",
                Effect::Repriced
            )
        );
    }

    #[test]
    fn descriptions_and_names_change_nothing_billed() {
        assert_eq!(
            changes(&[
                (
                    "unit_amount = \"500\"",
                    "unit_amount = \"500\"\ndescription = \"Platform\""
                ),
                ("plan = \"pro\"", "plan = \"pro\"\nname = \"Acme\""),
                (
                    "value_property = \"$.tokens\"",
                    "value_property = \"$.tokens\"\ndescription = \"LLM\""
                ),
            ]),
            []
        );
    }

    #[test]
    fn a_plan_change_or_replacement_is_told_whether_its_month_has_begun() {
        let change = |from: &str| {
            format!("plan = \"pro\"\n\n[[customers.plan_changes]]\nfrom = \"{from}\"\nplan = \"pro-2027\"\n")
        };
        let effect = |from: &str| changes(&[("plan = \"pro\"\n", &change(from))])[0].2;
        assert_eq!(effect("2026-12"), Effect::MonthBegun);
        assert_eq!(effect("2026-11"), Effect::Repriced);
        assert_eq!(effect("2027-01"), Effect::Scheduled);
        let replaced = |from: &str| {
            let by = format!("id = \"pro\"\ncurrency = \"usd\"\nreplaced_by = {{ plan = \"pro-2027\", from = \"{from}\" }}");
            changes(&[("id = \"pro\"\ncurrency = \"usd\"", &by)])
        };
        assert_eq!(
            replaced("2027-01"),
            one(
                "plan \"pro\"",
                "replaced_by none -> {\"from\":\"2027-01\",\"plan\":\"pro-2027\"}",
                Effect::Scheduled
            )
        );
        assert_eq!(replaced("2026-12")[0].2, Effect::MonthBegun);
        // Its plan changed in place: every open month is billed on the other plan.
        assert_eq!(
            changes(&[("plan = \"pro\"\n", "plan = \"pro-2027\"\n")]),
            one(
                "customer \"cust_acme\"",
                "plan \"pro\" -> \"pro-2027\"",
                Effect::Repriced
            )
        );
    }

    #[test]
    fn a_new_customer_without_from_is_billed_in_every_open_month() {
        let new = |from: &str| {
            format!("[[customers]]\nid = \"cust_new\"\nplan = \"pro\"\n{from}\n[[customers]]")
        };
        let effect = |from: &str| changes(&[("[[customers]]", &new(from))])[0].2;
        assert_eq!(effect(""), Effect::BilledEveryOpenMonth);
        assert_eq!(effect("from = \"2027-01\""), Effect::Scheduled);
        assert_eq!(effect("from = \"2026-12\""), Effect::CustomerAdded);
        assert_eq!(effect("from = \"2026-10\""), Effect::BilledEveryOpenMonth);
        let removed = changes(&[("[[customers]]\nid = \"cust_acme\"\nplan = \"pro\"\n", "")]);
        assert_eq!(
            removed,
            one("customer \"cust_acme\"", "removed", Effect::Retired)
        );
    }
}
