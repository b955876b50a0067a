//! Why the ingest service could not start or stopped: each says what failed, where,
//! and what to do. Failures of one request are HTTP answers, not these.

use std::net::SocketAddr;

use rdkafka::error::KafkaError;
use tally_runtime::ops::BindError;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// `[ingest] listen` is taken or not ours to bind.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// librdkafka refused the configuration (a bad `[kafka] properties` entry, say).
    #[error("cannot create the Kafka producer for {brokers}: {source}; check [kafka] brokers and properties in tally.toml")]
    KafkaProducer { brokers: String, source: KafkaError },
    /// The server task panicked or was cancelled.
    #[error("the ingest server task on {addr} ended abnormally: {source}; see the log above for the panic")]
    Task {
        addr: SocketAddr,
        source: tokio::task::JoinError,
    },
}
