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

/// Longest a sender's text (a refused `source`, a `User-Agent`, a Kafka key) is written
/// to the log, in characters: enough to tell one sender from another, not a payload.
pub const LOGGED_SENDER_CHARS: usize = 200;

/// A sender's text as a log field: cut to [`LOGGED_SENDER_CHARS`], the cut said, and
/// its control characters, line separators and bidirectional overrides escaped (`\n`,
/// `\u{1b}`, `\u{202e}`), so it can neither write lines of its own into a text log, nor
/// send a terminal escape codes, nor reorder what a viewer shows after it; nothing
/// else. Log it as a plain `&str` field (`source = text.as_str()`, not `%text`): a
/// text log writes such a field quoted, so its spaces and quotes cannot pass for
/// fields of their own, and a JSON log as a string, quoted once.
pub fn loggable(text: &str) -> String {
    let mut logged = String::with_capacity(text.len().min(4 * LOGGED_SENDER_CHARS));
    let mut chars = text.chars();
    for c in chars.by_ref().take(LOGGED_SENDER_CHARS) {
        if c.is_control() || tally_schemas::event::reorders_text(c) {
            logged.extend(c.escape_debug());
        } else {
            logged.push(c);
        }
    }
    let left_out = chars.count();
    if left_out > 0 {
        logged.push_str(&format!("... ({left_out} more characters)"));
    }
    logged
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_what_breaks_or_reorders_a_line_is_escaped_for_a_log() {
        assert_eq!(super::loggable("we\"ird café"), "we\"ird café");
        assert_eq!(
            super::loggable("a\nERROR forged\u{1b}[2J"),
            "a\\nERROR forged\\u{1b}[2J"
        );
        assert_eq!(
            super::loggable("invoice \u{202e}fdp.exe\u{2028}next"),
            "invoice \\u{202e}fdp.exe\\u{2028}next"
        );
    }

    #[test]
    fn a_long_text_is_cut_and_the_cut_said() {
        let long = "é".repeat(super::LOGGED_SENDER_CHARS + 5);
        let logged = super::loggable(&long);
        let kept = "é".repeat(super::LOGGED_SENDER_CHARS);
        assert_eq!(logged, format!("{kept}... (5 more characters)"));
        assert_eq!(super::loggable(&kept), kept);
    }
}
