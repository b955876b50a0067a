//! Why a valid event would bill nothing as the price book stands, told to its sender.
//!
//! In: the price book, one decoded event and the clock. Out: nothing when some price
//! of the customer's plan bills its usage, else the reason: no meter reads its type,
//! it is older than the aggregator's dedupe horizon (which refuses it), its subject is
//! no customer (with the id it likely meant), the customer is not billed in its month,
//! or no price of the plan selects its usage (a misspelt dimension value, say). The event is accepted all the same: the book may change while its month is
//! open, and ingest does not judge usage by it. Pure.

use chrono::{DateTime, Utc};
use tally_schemas::config::{Config, HumanDuration, NoPlan};
use tally_schemas::event::DecodedEvent;
use tally_schemas::time::Period;

/// Why an accepted event bills nothing as things stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unbilled {
    /// No meter reads its `type`.
    UnmeteredType { event_type: String },
    /// Its `time` is more than the dedupe horizon before now: the aggregator refuses
    /// events that far behind the newest of their partition (`too_late`), and a
    /// partition's newest event is rarely older than the clock.
    TooLate {
        time: DateTime<Utc>,
        horizon: HumanDuration,
    },
    /// Its `subject` is no customer of the price book.
    UnknownCustomer {
        subject: String,
        likely_meant: Option<String>,
    },
    /// The customer is not billed in the event's month (its `from` or `through`).
    NotSubscribed { customer: String, period: Period },
    /// No price of the customer's plan selects the event's usage.
    NotPriced {
        customer: String,
        plan: String,
        usage: String,
    },
}

impl Unbilled {
    /// Why `event` would bill nothing under `config` at `now`, if it would.
    pub fn of(config: &Config, event: &DecodedEvent<'_>, now: DateTime<Utc>) -> Option<Unbilled> {
        if event.readings.is_empty() {
            let event_type = event.event_type.clone().into_owned();
            return Some(Unbilled::UnmeteredType { event_type });
        }
        let horizon = config.settings.dedupe_horizon;
        if (now - event.time).to_std().is_ok_and(|age| age > horizon) {
            let horizon = HumanDuration(horizon);
            return Some(Unbilled::TooLate {
                time: event.time,
                horizon,
            });
        }
        let period = Period::containing(event.time);
        let (customer, plan) = match config.billing(&event.subject, period) {
            Ok(billing) => billing,
            Err(NoPlan::UnknownCustomer) => {
                return Some(Unbilled::UnknownCustomer {
                    subject: event.subject.clone().into_owned(),
                    likely_meant: None,
                })
            }
            Err(NoPlan::NotSubscribed) => {
                let customer = event.subject.clone().into_owned();
                return Some(Unbilled::NotSubscribed { customer, period });
            }
        };
        let priced = (event.readings.iter())
            .any(|reading| (plan.prices.iter()).any(|p| p.bills(reading.meter, &reading.group)));
        if priced {
            return None;
        }
        let usage: Vec<String> = (event.readings.iter())
            .map(|reading| {
                let meter = config.meter(reading.meter);
                let dimensions = (meter.group_by.iter().zip(&reading.group))
                    .map(|((name, _), value)| format!(" {name} = {value:?}"));
                format!("meter {}{}", meter.slug, dimensions.collect::<String>())
            })
            .collect();
        Some(Unbilled::NotPriced {
            customer: customer.id.clone(),
            plan: plan.id.clone(),
            usage: usage.join(", "),
        })
    }

    /// Names the customer an unknown subject likely meant, looked up for the first
    /// unknown subject of a request only (`looked_up` holds it): a lookup compares the
    /// subject with every customer, too slow to repeat for each event of a batch of
    /// strangers in a large book, and one suggestion shows the sender the mistake.
    pub fn suggest(
        mut self,
        config: &Config,
        looked_up: &mut Option<(String, Option<String>)>,
    ) -> Self {
        if let Unbilled::UnknownCustomer {
            subject,
            likely_meant,
        } = &mut self
        {
            let (asked, meant) = looked_up.get_or_insert_with(|| {
                let meant = config.likely_customer(subject).map(str::to_owned);
                (subject.clone(), meant)
            });
            if asked == subject {
                likely_meant.clone_from(meant);
            }
        }
        self
    }

    /// Every [`Unbilled::code`].
    pub const CODES: [&'static str; 5] = [
        "unmetered_type",
        "too_late",
        "unknown_customer",
        "not_subscribed",
        "not_priced",
    ];

    /// A stable code for programs.
    pub fn code(&self) -> &'static str {
        match self {
            Unbilled::UnmeteredType { .. } => "unmetered_type",
            Unbilled::TooLate { .. } => "too_late",
            Unbilled::UnknownCustomer { .. } => "unknown_customer",
            Unbilled::NotSubscribed { .. } => "not_subscribed",
            Unbilled::NotPriced { .. } => "not_priced",
        }
    }

    /// Why, for people.
    pub fn reason(&self) -> String {
        match self {
            Unbilled::UnmeteredType { event_type } => format!(
                "no meter reads type {event_type:?}: the event is stored, but bills nothing unless such a meter is added and the events are read again (a misspelt type?)"
            ),
            Unbilled::TooLate { time, horizon } => format!(
                "time {time} is more than the dedupe horizon ({horizon}) ago: the event is stored, and billed only if the aggregator reads it within the dedupe horizon of the newest event of its partition: once live usage has reached that partition it refuses it as too_late and bills nothing (a backfill of old months sent before live usage, or alone, is billed; else bill such usage with tally rate, or send usage sooner)",
                time = time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
            ),
            Unbilled::UnknownCustomer {
                subject,
                likely_meant,
            } => {
                let meant = likely_meant
                    .as_ref()
                    .map_or_else(String::new, |id| format!(" (did you mean {id:?}?)"));
                format!(
                    "subject {subject:?} is no customer of the price book{meant}: the event is stored, and billed only if the customer is added while its month is open"
                )
            }
            Unbilled::NotSubscribed { customer, period } => format!(
                "customer {customer:?} is not billed in {period} (its from or through): the event is stored, but bills nothing"
            ),
            Unbilled::NotPriced {
                customer,
                plan,
                usage,
            } => format!(
                "no price of customer {customer:?}'s plan {plan:?} bills this usage ({usage}): the event is stored, but bills nothing (a misspelt dimension value?)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use tally_schemas::event::EventDecoder;

    const CONFIG: &str = r#"
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
id = "gpt"
meter = "tokens"
billing_scheme = "per_unit"
unit_amount = "0.001"
filter = { model = "gpt-x" }

[[customers]]
id = "cust_acme"
plan = "pro"

[[customers]]
id = "cust_gone"
plan = "pro"
through = "2026-10"
"#;

    /// Why an event of 2026-11-02T10:00Z would bill nothing, told on 2026-11-03.
    fn unbilled(event_type: &str, subject: &str, model: &str) -> Option<String> {
        unbilled_at("2026-11-02T10:00:00Z", (event_type, subject, model))
    }

    fn unbilled_at(time: &str, (event_type, subject, model): (&str, &str, &str)) -> Option<String> {
        let config = Config::parse(CONFIG, "tally.toml").unwrap();
        let now = Utc.with_ymd_and_hms(2026, 11, 3, 0, 0, 0).unwrap();
        let raw = format!(
            r#"{{"specversion":"1.0","id":"e","source":"s","type":"{event_type}","subject":"{subject}","time":"{time}","data":{{"tokens":5,"model":"{model}"}}}}"#
        );
        let event = EventDecoder::new(&config, now)
            .decode(raw.as_bytes())
            .unwrap();
        Unbilled::of(&config, &event, now)
            .map(|u| u.suggest(&config, &mut None))
            .map(|u| format!("{}: {}", u.code(), u.reason()))
    }

    #[test]
    fn an_event_no_price_bills_is_told_why() {
        assert_eq!(unbilled("llm.tokens", "cust_acme", "gpt-x"), None);
        assert_eq!(
            unbilled("llm.token", "cust_acme", "gpt-x").unwrap(),
            "unmetered_type: no meter reads type \"llm.token\": the event is stored, but bills nothing unless such a meter is added and the events are read again (a misspelt type?)"
        );
        let billed = ("llm.tokens", "cust_acme", "gpt-x");
        assert_eq!(
            unbilled_at("2026-09-28T23:59:59Z", billed).unwrap(),
            "too_late: time 2026-09-28T23:59:59Z is more than the dedupe horizon (35d) ago: the event is stored, and billed only if the aggregator reads it within the dedupe horizon of the newest event of its partition: once live usage has reached that partition it refuses it as too_late and bills nothing (a backfill of old months sent before live usage, or alone, is billed; else bill such usage with tally rate, or send usage sooner)"
        );
        // The horizon (35 days) to the second is not too late, as in the aggregator.
        assert_eq!(unbilled_at("2026-09-29T00:00:00Z", billed), None);
        assert_eq!(
            unbilled("llm.tokens", "cust-acme", "gpt-x").unwrap(),
            "unknown_customer: subject \"cust-acme\" is no customer of the price book (did you mean \"cust_acme\"?): the event is stored, and billed only if the customer is added while its month is open"
        );
        assert_eq!(
            unbilled("llm.tokens", "cust_gone", "gpt-x").unwrap(),
            "not_subscribed: customer \"cust_gone\" is not billed in 2026-11 (its from or through): the event is stored, but bills nothing"
        );
        assert_eq!(
            unbilled("llm.tokens", "cust_acme", "GPT-X").unwrap(),
            "not_priced: no price of customer \"cust_acme\"'s plan \"pro\" bills this usage (meter tokens model = \"GPT-X\"): the event is stored, but bills nothing (a misspelt dimension value?)"
        );
    }

    #[test]
    fn every_code_is_listed_for_the_metric_to_export_at_zero() {
        let recent = "2026-11-02T10:00:00Z";
        let told = [
            (recent, ("llm.token", "cust_acme", "gpt-x")),
            ("2026-09-01T00:00:00Z", ("llm.tokens", "cust_acme", "gpt-x")),
            (recent, ("llm.tokens", "cust-acme", "gpt-x")),
            (recent, ("llm.tokens", "cust_gone", "gpt-x")),
            (recent, ("llm.tokens", "cust_acme", "GPT-X")),
        ]
        .map(|(time, event)| {
            let reason = unbilled_at(time, event).unwrap();
            reason.split(':').next().unwrap().to_owned()
        });
        assert_eq!(told, Unbilled::CODES);
    }
}
