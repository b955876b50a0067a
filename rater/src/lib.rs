//! The rater stage's core: usage in, priced invoice lines out.
//!
//! It takes period-to-date usage from the aggregator and applies the customer's plan.
//! Everything here is synchronous and free of I/O; `tally rate`, the embedded pipeline
//! and the Kafka rater run the same code.
//!
//! Layout:
//! - [`rate`]: one quantity priced by one rate (per_unit, package, graduated, volume),
//!   with its tier breakdown.
//! - [`line`]: rounding, discounts and deterministic ids: one invoice line.
//! - [`ledger`]: incremental rating of period-to-date usage into revised lines.

pub mod ledger;
pub mod line;
pub mod rate;

pub use ledger::{Ledger, RatedLine, Recorded};
pub use rate::{rate, Charge, RateError};
