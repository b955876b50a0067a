//! The aggregator stage: usage events in, deduplicated window aggregates out.
//!
//! It sits between ingest (which validates and decodes events) and the rater (which
//! prices period-to-date usage). The core is synchronous and free of I/O, so the Kafka
//! service and the embedded pipeline run the same code and its state can be
//! snapshotted and restored; [`service`] is the thin Kafka stage around it.
//!
//! Layout:
//! - [`dedupe`]: the `(source, id)` set, at most 40 bytes per key held.
//! - [`state`]: count, sum, max, unique_count and latest as order-independent states.
//! - [`aggregator`]: dedupe, lateness and tumbling windows per (customer, meter, group).
//! - [`meter`]: what a meter reads from events, stored beside the usage it read.
//! - [`service`]: the core on Kafka with transactions and a changelog.

pub mod aggregator;
pub mod dedupe;
pub mod meter;
pub mod service;
pub mod state;

pub use aggregator::{Aggregator, Outcome, RestoreError, Snapshot};
