//! Usage no line bills, named in the log: `tally_rater_unbilled_usage_total` says how
//! much, and whoever answers the alert needs to know whose. In: what became of each
//! usage update ([`Recorded`]) and its series. Out: a warning the first time this
//! process sees a (reason, customer, meter), up to [`MOST_LOGGED`] of them, so a
//! customer sending usage all day is one line, and a flood of unknown ones cannot fill
//! the log or the memory.

use std::borrow::Cow;

use hashbrown::HashSet;
use tally_schemas::records::SeriesKeyRef;
use tally_schemas::time::Period;

use super::metrics::unbilled_reason;
use crate::Recorded;

/// Distinct (reason, customer, meter) logged per process; later ones are only counted.
const MOST_LOGGED: usize = 1000;

#[derive(Debug, Default)]
pub(super) struct UnbilledLog {
    /// (reason, customer, meter) logged.
    logged: HashSet<(&'static str, String, String)>,
    /// Whether the log said it stops naming them.
    full: bool,
}

/// A `logged` key by reference, so usage named already allocates nothing: hashes and
/// compares as the owned `(reason, customer, meter)`.
#[derive(Hash)]
struct Logged<'a>(&'static str, &'a str, &'a str);

impl hashbrown::Equivalent<(&'static str, String, String)> for Logged<'_> {
    fn equivalent(&self, (reason, customer, meter): &(&'static str, String, String)) -> bool {
        self.0 == *reason && self.1 == customer && self.2 == meter
    }
}

impl From<&Logged<'_>> for (&'static str, String, String) {
    fn from(key: &Logged<'_>) -> Self {
        (key.0, key.1.to_owned(), key.2.to_owned())
    }
}

impl UnbilledLog {
    /// Logs `series`' usage of `period` if no line bills it and it is new here; true
    /// when it was logged.
    pub(super) fn note(
        &mut self,
        recorded: Recorded,
        series: &SeriesKeyRef<'_>,
        period: Period,
    ) -> bool {
        let Some(reason) = unbilled_reason(recorded) else {
            return false;
        };
        let key = Logged(reason, &series.customer, &series.meter);
        if self.logged.contains(&key) {
            return false;
        }
        if self.logged.len() >= MOST_LOGGED {
            if !std::mem::replace(&mut self.full, true) {
                tracing::warn!(
                    "{MOST_LOGGED} customers' and meters' unbilled usage logged; more is counted in tally_rater_unbilled_usage_total, not logged"
                );
            }
            return false;
        }
        // Written out only for what is logged: a late adjustment's names its months.
        let Some(why) = why_unbilled(recorded, series.adjusts, period) else {
            return false;
        };
        self.logged.insert((&key).into());
        tracing::warn!(
            reason,
            customer = &*series.customer,
            meter = %series.meter,
            dimensions = ?series.group.iter().map(|g| &**g).collect::<Vec<&str>>(),
            %period,
            adjusts = series.adjusts.map(|p| p.to_string()),
            "usage no invoice line bills: {why} (logged once per customer, meter and reason while this rater runs)"
        );
        true
    }
}

/// Why no line bills usage `recorded` so, for the log; `None` for usage that is billed
/// or was billed already (a settled month's usage an aggregator replays).
fn why_unbilled(
    recorded: Recorded,
    adjusts: Option<Period>,
    period: Period,
) -> Option<Cow<'static, str>> {
    Some(match (recorded, adjusts) {
        (Recorded::UnknownCustomer, _) => {
            "the customer is not in the price book; add the customer to bill it".into()
        }
        (Recorded::NotPriced, _) => {
            "the customer's plan has no price for this meter and these dimensions; add the price to bill it".into()
        }
        // A late adjustment is judged by the month it belongs to, not the one it is
        // carried into: a customer billed from that one was not yet billed then.
        (Recorded::NotSubscribed, Some(belongs_to)) => format!(
            "it is late usage of {belongs_to}, carried into {period} as an adjustment, and {belongs_to} is outside the customer's from and through; move them to bill it"
        )
        .into(),
        (Recorded::NotSubscribed, None) => {
            "the month is outside the customer's from and through; move them to bill it".into()
        }
        (Recorded::SettledPeriod | Recorded::Billed(_), _) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series<'a>(customer: &'a str, meter: &'a str) -> SeriesKeyRef<'a> {
        SeriesKeyRef {
            customer: customer.into(),
            meter: meter.into(),
            group: vec!["gpt-x".into()],
            adjusts: None,
        }
    }

    #[test]
    fn each_customer_meter_and_reason_is_logged_once_up_to_a_bound() {
        let november = "2026-11".parse().unwrap();
        let mut log = UnbilledLog::default();
        let trial = series("trial_1", "tokens");
        assert!(log.note(Recorded::UnknownCustomer, &trial, november));
        assert!(!log.note(Recorded::UnknownCustomer, &trial, november));
        assert!(log.note(Recorded::NotPriced, &trial, november));
        assert!(log.note(
            Recorded::UnknownCustomer,
            &series("trial_1", "calls"),
            november
        ));
        // Billed usage, and a settled month's replay, are not unbilled usage to report.
        assert!(!log.note(Recorded::Billed(1), &series("acme", "tokens"), november));
        assert!(!log.note(Recorded::SettledPeriod, &series("acme", "tokens"), november));
        for i in 0..MOST_LOGGED * 2 {
            log.note(
                Recorded::UnknownCustomer,
                &series(&format!("c{i}"), "tokens"),
                november,
            );
        }
        assert_eq!(log.logged.len(), MOST_LOGGED);
        assert!(log.full);
    }

    #[test]
    fn late_usage_outside_the_customers_months_names_the_month_it_belongs_to() {
        let (october, november) = ("2026-10".parse().unwrap(), "2026-11".parse().unwrap());
        let why = why_unbilled(Recorded::NotSubscribed, Some(october), november);
        assert_eq!(
            why.as_deref(),
            Some("it is late usage of 2026-10, carried into 2026-11 as an adjustment, and 2026-10 is outside the customer's from and through; move them to bill it")
        );
        let why = why_unbilled(Recorded::NotSubscribed, None, november);
        assert_eq!(
            why.as_deref(),
            Some("the month is outside the customer's from and through; move them to bill it")
        );
        assert_eq!(
            why_unbilled(Recorded::Billed(1), Some(october), november),
            None
        );
    }
}
