//! The device-wide ceiling on signatures per second: a token bucket shared by every session, as a network HSM's
//! capacity is shared by every client. Callers either wait for their turn (the bucket hands out reservations, so
//! N waiting threads are spaced 1/rate apart) or are refused at once, as configured.
//!
//! The bucket takes the current time as an argument so its arithmetic is tested without sleeping.

use std::time::{Duration, Instant};

/// A token bucket: `rate` permits per second, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilled at `rate_per_sec`, holding at most `burst` permits (at least one).
    pub fn new(rate_per_sec: f64, burst: u64, now: Instant) -> TokenBucket {
        let burst = (burst.max(1)) as f64;
        // Below one signature a day the bucket is as good as closed; the floor keeps the arithmetic finite.
        let rate = if rate_per_sec.is_finite() {
            rate_per_sec.max(1e-6)
        } else {
            1e-6
        };
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if now > self.last {
            let elapsed = now.duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
            self.last = now;
        }
    }

    /// Reserves one permit and says how long the caller must wait before using it (zero when one was free).
    /// Reservations queue up: the k-th caller beyond the burst waits k/rate.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::try_from_secs_f64(-self.tokens / self.rate).unwrap_or(Duration::MAX)
        }
    }

    /// Takes a permit only if one is available now.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refused_then_refilled() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3, t0);
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0), "the burst is spent");
        // 10/s: one permit every 100 ms.
        assert!(!b.try_take(t0 + Duration::from_millis(50)));
        assert!(b.try_take(t0 + Duration::from_millis(101)));
        assert!(!b.try_take(t0 + Duration::from_millis(101)));
        // A long idle period refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        let granted = (0..10).filter(|_| b.try_take(later)).count();
        assert_eq!(granted, 3);
    }

    #[test]
    fn reservations_space_waiters_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 1, t0);
        assert_eq!(b.reserve(t0), Duration::ZERO);
        let waits: Vec<u128> = (0..4).map(|_| b.reserve(t0).as_micros()).collect();
        // 100/s: each further caller waits 10 ms more than the previous one.
        for (i, w) in waits.iter().enumerate() {
            let expected = 10_000 * (i as u128 + 1);
            assert!(
                w.abs_diff(expected) <= 1,
                "waiter {i}: {w} µs, expected {expected} µs"
            );
        }
        // Once the reserved time has passed, the next caller goes at once again... after the queue drains.
        assert_eq!(b.reserve(t0 + Duration::from_millis(60)), Duration::ZERO);
    }
}
