//! What Tally's services share, and nothing stage-specific: Kafka client settings and
//! the topic layout ([`kafka`]), Prometheus metrics ([`metrics`]) and the `/metrics`,
//! `/healthz` and `/readyz` endpoints ([`ops`]), orderly shutdown ([`shutdown`]), and work spread over
//! the cores ([`threads`]).

pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod shutdown;
pub mod threads;

pub use shutdown::Shutdown;
