//! Kafka clients as every service configures them, and the topic layout.
//!
//! In: [`KafkaSettings`](tally_schemas::config::KafkaSettings). Out: client
//! configurations (brokers plus the pass-through librdkafka properties, so TLS and
//! SASL work everywhere alike); on start, the topics
//! created if missing; group membership for a service that owns partitions
//! ([`PartitionOwner`], [`group_consumer`]); producing that waits out a full queue and
//! keeps delivery failures ([`send`], [`flush`], [`DeliveryReports`]); a refused
//! event's copy for the rejected topic ([`with_refusal`], [`fitted`]); and reading a
//! partition to its end ([`read_partition`]), for restores and rebuilds.
//!
//! `windows` and `aggregator-changelog` have the pipeline's partition count, and
//! `events` at least as many (partitions added to it later are read by no one): the
//! aggregator writes partition p's windows and state changes to partition p, so a
//! customer's usage stays in one partition end to end.
//!
//! `clients` configures every client, `topics` makes and checks the topics,
//! `group` runs a service's group membership, `produce` and `read` write and read,
//! `rejected` shapes refused events' copies.

mod clients;
mod group;
mod produce;
mod read;
mod rejected;
mod topics;

pub use clients::*;
pub use group::*;
pub use produce::*;
pub use read::*;
pub use rejected::*;
pub use topics::*;
