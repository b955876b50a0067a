//! Per-key request rate limits: a token bucket per API key.
//!
//! A bucket holds up to `burst` tokens and refills at `per_second` tokens a second; each
//! request takes one. A key that sends steadily at the sustained rate is never limited;
//! one that has been idle may send `burst` requests at once. The bucket is plain
//! arithmetic on the instants it is given, so it is tested without sleeping; the
//! [`RateLimiter`] holds one per configured key behind a lock taken only for that
//! arithmetic (never across an await).

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tally_runtime::threads::lock;

/// Tokens are counted in billionths, so refills at any rate stay exact integers: one
/// nanosecond at `r` tokens a second adds exactly `r` billionths.
const UNIT: u128 = 1_000_000_000;

/// One key's bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens added per second (`[ingest] rate_limit_per_second`), at least 1.
    per_second: u128,
    /// Most billionths of a token held (`[ingest] rate_limit_burst` tokens).
    capacity: u128,
    /// Billionths of a token held at `updated`.
    level: u128,
    /// When `level` was last brought up to date.
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32, now: Instant) -> Self {
        let capacity = u128::from(burst.get()) * UNIT;
        TokenBucket {
            per_second: u128::from(per_second.get()),
            capacity,
            level: capacity,
            updated: now,
        }
    }

    /// Takes a token at `now`, or says how long until one is there. An instant before
    /// the last one seen (clocks given out of order) adds nothing.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_nanos();
        self.level = self
            .level
            .saturating_add(elapsed.saturating_mul(self.per_second))
            .min(self.capacity);
        self.updated = self.updated.max(now);
        if self.level >= UNIT {
            self.level -= UNIT;
            return Ok(());
        }
        let missing = UNIT - self.level;
        let nanos = missing.div_ceil(self.per_second);
        Err(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }
}

/// How long to tell a limited client to wait: whole seconds, rounded up, at least 1
/// (the `Retry-After` header has no fractions, and 0 would invite an immediate retry).
pub fn retry_after_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

/// One bucket per configured API key, indexed like the keys.
#[derive(Debug)]
pub struct RateLimiter {
    buckets: Mutex<Vec<TokenBucket>>,
}

impl RateLimiter {
    pub fn new(keys: usize, per_second: NonZeroU32, burst: NonZeroU32, now: Instant) -> Self {
        RateLimiter {
            buckets: Mutex::new(vec![TokenBucket::new(per_second, burst, now); keys]),
        }
    }

    /// Takes a token from key `key`'s bucket, or says how long until one is there. An
    /// index past the keys is allowed (there is no bucket to take from).
    pub fn check(&self, key: usize, now: Instant) -> Result<(), Duration> {
        let mut buckets = lock(&self.buckets);
        match buckets.get_mut(key) {
            Some(bucket) => bucket.try_take(now),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn n(count: u32) -> NonZeroU32 {
        NonZeroU32::new(count).unwrap()
    }

    #[test]
    fn a_full_bucket_allows_the_burst_at_once_then_refuses() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(n(10), n(3), t0);
        for _ in 0..3 {
            assert_eq!(bucket.try_take(t0), Ok(()));
        }
        // Empty: the next token comes after 1/10 s.
        assert_eq!(bucket.try_take(t0), Err(ms(100)));
    }

    #[test]
    fn tokens_come_back_at_the_sustained_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(n(10), n(1), t0);
        assert_eq!(bucket.try_take(t0), Ok(()));
        assert_eq!(bucket.try_take(t0 + ms(40)), Err(ms(60)));
        assert_eq!(bucket.try_take(t0 + ms(99)), Err(ms(1)));
        assert_eq!(bucket.try_take(t0 + ms(100)), Ok(()));
        assert_eq!(bucket.try_take(t0 + ms(100)), Err(ms(100)));
    }

    #[test]
    fn a_steady_sender_at_the_rate_is_never_refused() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(n(7), n(1), t0);
        // 7 a second, one every 1/7 s (rounded up to the nanosecond), for a minute.
        let step = Duration::from_nanos(1_000_000_000_u64.div_ceil(7));
        for i in 0..420 {
            assert_eq!(bucket.try_take(t0 + step * i), Ok(()), "request {i}");
        }
    }

    #[test]
    fn an_idle_bucket_fills_only_up_to_the_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(n(100), n(2), t0);
        assert_eq!(bucket.try_take(t0), Ok(()));
        assert_eq!(bucket.try_take(t0), Ok(()));
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(bucket.try_take(later), Ok(()));
        assert_eq!(bucket.try_take(later), Ok(()));
        assert_eq!(bucket.try_take(later), Err(ms(10)));
    }

    #[test]
    fn a_slow_rate_says_how_many_seconds_to_wait() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(n(1), n(1), t0);
        assert_eq!(bucket.try_take(t0), Ok(()));
        let wait = bucket.try_take(t0 + ms(250)).unwrap_err();
        assert_eq!(wait, ms(750));
        assert_eq!(retry_after_seconds(wait), 1);
    }

    #[test]
    fn an_earlier_instant_adds_no_tokens() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut bucket = TokenBucket::new(n(1), n(1), t0);
        assert_eq!(bucket.try_take(t0), Ok(()));
        assert_eq!(bucket.try_take(t0 - ms(500)), Err(Duration::from_secs(1)));
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_seconds(ms(1001)), 2);
        assert_eq!(retry_after_seconds(Duration::from_secs(30)), 30);
    }

    #[test]
    fn each_key_has_its_own_bucket() {
        let t0 = Instant::now();
        let limiter = RateLimiter::new(2, n(1), n(1), t0);
        assert_eq!(limiter.check(0, t0), Ok(()));
        assert!(limiter.check(0, t0).is_err());
        assert_eq!(limiter.check(1, t0), Ok(()));
        assert_eq!(limiter.check(5, t0), Ok(()));
    }
}
