//! What Tally's services share, and nothing stage-specific: Kafka client settings and
//! the topic layout ([`kafka`]), Prometheus metrics and the `/metrics`, `/healthz` and
//! `/readyz` endpoints ([`ops`]), and orderly shutdown ([`shutdown`]).

pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod shutdown;

pub use shutdown::Shutdown;
