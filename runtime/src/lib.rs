//! What Tally's services share, and nothing stage-specific: Kafka client settings and
//! the topic layout ([`kafka`]), Prometheus metrics ([`metrics`]) and the `/metrics`,
//! `/healthz` and `/readyz` endpoints ([`ops`]), orderly shutdown ([`shutdown`]), work spread over
//! the cores ([`threads`]), and logs of what repeats, throttled ([`throttle`]).

pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod shutdown;
pub mod threads;
pub mod throttle;

pub use shutdown::Shutdown;

/// The release, from the workspace's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit the build is from (`build.rs`): git's, `TALLY_COMMIT`'s, or `unknown`.
pub const COMMIT: &str = env!("TALLY_COMMIT");
