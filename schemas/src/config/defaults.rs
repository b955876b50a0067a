//! Every default of tally.toml, in one place. The README's configuration table is
//! written from this file.

use std::time::Duration;

use crate::time::WindowSize;

/// Length of the event-time tumbling windows usage is grouped into: `[aggregator] window`.
pub const fn default_window() -> Duration {
    Duration::from_secs(3600)
}

/// How long, in event time, an event's `(source, id)` is remembered for dedupe, and so
/// the oldest an event may be (relative to the newest event time seen) and still be
/// accepted: `[aggregator] dedupe_horizon`. 35 days covers a calendar month plus a few
/// days of late retries. The two are one setting so that a late retry can never outlive
/// the memory of its original.
pub const fn default_dedupe_horizon() -> Duration {
    Duration::from_secs(35 * 86_400)
}

/// How far past the wall clock an event's `time` may be before it is rejected as a
/// clock error: `[events] max_future_skew`.
pub const fn default_max_future_skew() -> Duration {
    Duration::from_secs(5 * 60)
}

/// Validated runtime settings with defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub window: WindowSize,
    pub dedupe_horizon: Duration,
    pub max_future_skew: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            window: WindowSize::default(),
            dedupe_horizon: default_dedupe_horizon(),
            max_future_skew: default_max_future_skew(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_window_is_the_default_window_size() {
        assert_eq!(
            WindowSize::new(default_window()),
            Some(WindowSize::default())
        );
    }
}
