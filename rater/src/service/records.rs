//! The records the rater reads and writes on Kafka: a usage update or a settled
//! record of `<prefix>.windows` in, a rated or retired line to `<prefix>.rated` out.
//!
//! In: a windows record's bytes and headers. Out: a [`Change`] for the ledger (its
//! windows read only when they are stored), or `None` for a record that cannot be read
//! (logged with where it is).

use rdkafka::message::{BorrowedMessage, Message};
use rust_decimal::Decimal;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use tally_runtime::kafka::header_value;
use tally_schemas::records::{InvoiceLine, UsageRecord, WindowUsage, SETTLED_HEADER};
use tally_schemas::time::Period;

use crate::ledger::{Ledger, Recorded};

/// A rated line as written to `<prefix>.rated`: the line, its revision (0 for an
/// opening line, at zero usage) and how much it moved since the line's previous record,
/// and the version its ClickHouse row has. Consumers keep the highest
/// version per line id, and drop a line whose highest is a [`RetiredRecord`].
#[derive(Debug, Serialize)]
pub(super) struct RatedRecord<'a> {
    #[serde(flatten)]
    pub(super) line: &'a InvoiceLine,
    pub(super) revision: u64,
    pub(super) delta: Decimal,
    pub(super) version: u64,
    pub(super) superseded: bool,
}

/// A line retired, as written to `<prefix>.rated`: the price book no longer makes it,
/// so from this version on it is not billed.
#[derive(Debug, Serialize)]
pub(super) struct RetiredRecord<'a> {
    pub(super) id: &'a str,
    pub(super) customer: &'a str,
    pub(super) price: &'a str,
    #[serde(with = "tally_schemas::time::rfc3339_serde")]
    pub(super) period_start: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) adjusts_period: Option<Period>,
    pub(super) version: u64,
    pub(super) superseded: bool,
}

/// A record read from the windows topic, where it was.
#[derive(Debug)]
pub(super) struct WindowsRecord<'a> {
    pub(super) offset: i64,
    /// When it was appended to Kafka, for the latency metric.
    pub(super) appended_ms: Option<i64>,
    pub(super) change: Change<'a>,
}

/// What a windows record says, with its changed windows read as `W` (skipped with
/// [`IgnoredAny`]).
#[derive(Debug)]
pub(super) enum Change<'a, W = Vec<WindowUsage>> {
    /// A series' period-to-date usage.
    Usage(UsageRecord<'a, W>),
    /// The period and every earlier one have settled: no update of them follows.
    Settled(Period),
}

impl<W> Change<'_, W> {
    pub(super) fn into_owned(self) -> Change<'static, W> {
        match self {
            Change::Usage(update) => Change::Usage(update.into_owned()),
            Change::Settled(period) => Change::Settled(period),
        }
    }

    /// The customer whose usage the record carries.
    pub(super) fn customer(&self) -> Option<&str> {
        match self {
            Change::Usage(update) => Some(&update.series.customer),
            Change::Settled(_) => None,
        }
    }
}

/// A record as `apply` takes it: with its windows if they are stored, without
/// reading them if not. Windows that cannot be read are logged and left out; the
/// usage is rated all the same.
pub(super) fn decode_with_windows<'m>(
    message: &'m BorrowedMessage<'_>,
    windows: bool,
) -> Option<Change<'m>> {
    let mut windows_error = None;
    if windows && header_value(message, SETTLED_HEADER).is_none() {
        match serde_json::from_slice(message.payload().unwrap_or_default()) {
            Ok(update) => return Some(Change::Usage(update)),
            Err(error) => windows_error = Some(error),
        }
    }
    // Logs a record that cannot be read at all.
    let change = decode::<IgnoredAny>(message)?;
    if let Some(error) = windows_error {
        tracing::error!(
            partition = message.partition(),
            offset = message.offset(),
            %error,
            "a windows record's windows cannot be read; its usage is rated without them"
        );
    }
    Some(match change {
        Change::Usage(update) => Change::Usage(UsageRecord {
            series: update.series,
            period_start: update.period_start,
            period_to_date: update.period_to_date,
            windows: Vec::new(),
        }),
        Change::Settled(period) => Change::Settled(period),
    })
}

pub(super) fn decode<'m, W: Deserialize<'m> + Default>(
    message: &'m BorrowedMessage<'_>,
) -> Option<Change<'m, W>> {
    let decoded = match header_value(message, SETTLED_HEADER) {
        Some(value) => std::str::from_utf8(value)
            .map_err(|e| e.to_string())
            .and_then(|value| value.parse::<Period>().map_err(|e| e.to_string()))
            .map(Change::Settled),
        None => serde_json::from_slice(message.payload().unwrap_or_default())
            .map(Change::Usage)
            .map_err(|e| e.to_string()),
    };
    match decoded {
        Ok(change) => Some(change),
        Err(error) => {
            tracing::error!(
                partition = message.partition(),
                offset = message.offset(),
                %error,
                "skipping a windows record that is neither a usage update nor a settled record"
            );
            None
        }
    }
}

/// Records the usage update read at `offset` in the partition's ledger.
pub(super) fn record<W>(ledger: &mut Ledger, update: &UsageRecord<'_, W>, offset: i64) -> Recorded {
    ledger.record_at(
        &update.series,
        Period::containing(update.period_start),
        update.period_to_date,
        offset,
    )
}
