//! Tally's shared vocabulary, used by every stage of the pipeline and free of I/O (but
//! for reading the configuration's file, [`config::Config::load`]).
//!
//! Layout:
//! - [`event`]: decoding one CloudEvents JSON line into the readings meters take from it,
//!   or a reject that says which field is wrong and why.
//! - [`config`]: tally.toml, parsed strictly; the price book validated once into a
//!   [`config::Config`], a service's sections when it asks for them.
//! - [`price`]: validated price books (per_unit, tiered graduated|volume, packages,
//!   discounts) in Stripe's vocabulary.
//! - [`decimal`]: exact decimals from text, never rounded.
//! - [`money`]: currencies with their ISO 4217 minor units, and rounding.
//! - [`records`]: what stages hand each other: window usage and invoice lines.
//! - [`time`]: billing periods (UTC calendar months) and tumbling windows.
//! - [`ids`]: deterministic fingerprints, so replays reproduce the same records.

pub mod config;
pub mod decimal;
pub mod event;
pub mod ids;
mod json;
pub mod money;
pub mod price;
pub mod records;
pub mod time;
