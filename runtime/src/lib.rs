//! What Tally's services share, and nothing stage-specific: Kafka client settings and
//! the topic layout ([`kafka`]), Prometheus metrics ([`metrics`]) and the `/metrics`,
//! `/healthz` and `/readyz` endpoints ([`ops`]), orderly shutdown ([`shutdown`]), work spread over
//! the cores ([`threads`]), logs of what repeats, throttled ([`throttle`]), and a
//! sender's text made safe to log ([`loggable`]).

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

/// A sender's text as a log field: its control characters escaped (`\n`, `\u{1b}`), so
/// it cannot write lines of its own into a text log nor a terminal's escape codes, and
/// nothing else, so a JSON log quotes it once.
pub fn loggable(text: &str) -> String {
    let mut logged = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            logged.extend(c.escape_debug());
        } else {
            logged.push(c);
        }
    }
    logged
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_control_characters_are_escaped_for_a_log() {
        assert_eq!(super::loggable("we\"ird café"), "we\"ird café");
        assert_eq!(
            super::loggable("a\nERROR forged\u{1b}[2J"),
            "a\\nERROR forged\\u{1b}[2J"
        );
    }
}
