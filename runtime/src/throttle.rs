//! Logging what can repeat many times a second without flooding the log: each kind at
//! most once a minute, with how many like it were left out since. In: a kind (a Kafka
//! error code, a rejection code) and the time. Out: whether to log it now.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::threads::lock;

/// How often one kind is logged while it keeps coming.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// When each kind was last logged, and how many were left out since.
#[derive(Debug)]
pub struct LogThrottle<K> {
    logged: Mutex<Vec<(K, Instant, u64)>>,
}

impl<K> Default for LogThrottle<K> {
    fn default() -> Self {
        LogThrottle {
            logged: Mutex::new(Vec::new()),
        }
    }
}

impl<K: PartialEq> LogThrottle<K> {
    /// Whether one of `kind` is to be logged `now`, with how many of its kind were left
    /// out since the last that was; `None` to leave this one out.
    pub fn due(&self, kind: K, now: Instant) -> Option<u64> {
        let mut logged = lock(&self.logged);
        match logged.iter_mut().find(|(k, _, _)| *k == kind) {
            Some((_, at, left_out)) if now.duration_since(*at) < LOG_INTERVAL => {
                *left_out += 1;
                None
            }
            Some((_, at, left_out)) => {
                *at = now;
                Some(std::mem::take(left_out))
            }
            None => {
                logged.push((kind, now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_that_keeps_coming_is_logged_once_a_minute_with_how_many_were_left_out() {
        let throttle = LogThrottle::default();
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        assert_eq!(throttle.due("all_brokers_down", at(0)), Some(0));
        for second in 1..40 {
            assert_eq!(throttle.due("all_brokers_down", at(second)), None);
        }
        // Another kind is logged on its own schedule.
        assert_eq!(throttle.due("transport_failure", at(40)), Some(0));
        assert_eq!(throttle.due("all_brokers_down", at(60)), Some(39));
        assert_eq!(throttle.due("all_brokers_down", at(61)), None);
    }
}
