//! The rater stage: usage in, priced invoice lines out, stored in ClickHouse.
//!
//! It takes period-to-date usage from the aggregator and applies the customer's plan.
//! The core (`rate`, `line`, `ledger`) is synchronous and free of I/O; `tally rate`,
//! the embedded pipeline and the Kafka rater run the same code. `clickhouse` writes the
//! lines where finance queries them; `service` is the thin Kafka stage around the core.
//!
//! Layout:
//! - [`rate`](mod@rate): one quantity priced by one rate (per_unit, package, graduated, volume),
//!   with its tier breakdown.
//! - [`line`](mod@line): rounding, discounts and deterministic ids: one invoice line.
//! - [`ledger`]: incremental rating of period-to-date usage into revised lines.
//! - [`clickhouse`]: the store: idempotent, versioned rows and the `invoice_lines` view.
//! - [`service`]: windows from Kafka, lines to ClickHouse and `<prefix>.rated`.

pub mod clickhouse;
pub mod ledger;
pub mod line;
pub mod rate;
pub mod service;

pub use ledger::{Ledger, RatedLine, Recorded};
pub use line::LineError;
pub use rate::{rate, Charge, RateError};
