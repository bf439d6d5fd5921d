//! Rate limits on what a guest can make dom0 do: log lines about its
//! misbehaviour (the first is logged, the rest within the interval are only
//! counted and summarised with the next one), and the requests of one
//! stream served per second (`RequestBudget`).

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

pub struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> LogLimiter {
        LogLimiter { interval, last: None, suppressed: 0 }
    }

    /// Returns `Some(suppressed_since_last)` when a line may be logged now.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A token bucket over one stream's requests: `burst` at once, then
/// `per_second`. A guest that asks faster is served more slowly, never
/// refused: each request past the budget waits for its token, at most
/// 1 / per_second. What the guest can make its request thread do is then
/// bounded by the rate, however fast it asks.
pub struct RequestBudget {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RequestBudget {
    pub fn new(per_second: u32, burst: u32) -> RequestBudget {
        RequestBudget {
            per_second: f64::from(per_second.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes a token at `now`: how long the request must wait for it first
    /// (zero within the budget).
    pub fn take(&mut self, now: Instant) -> Duration {
        let earned = now.saturating_duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.last = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_second)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = RequestBudget::new(1000, 4);
        for _ in 0..4 {
            assert_eq!(b.take(t0), Duration::ZERO);
        }
        // The fifth at once waits one token's time; the sixth two.
        assert_eq!(b.take(t0), Duration::from_millis(1));
        assert_eq!(b.take(t0), Duration::from_millis(2));
        // After the waits, and a quiet second, the burst is back (no more).
        let later = t0 + Duration::from_secs(1);
        for _ in 0..4 {
            assert_eq!(b.take(later), Duration::ZERO);
        }
        assert!(b.take(later) > Duration::ZERO);
        // 10,000 requests asked at once take 10 s less the burst.
        let mut b = RequestBudget::new(1000, 4);
        let waited: Duration = (0..10_000).map(|_| b.take(t0)).max().unwrap();
        assert!((waited.as_secs_f64() - 9.996).abs() < 1e-6, "{waited:?}");
    }

    #[test]
    fn one_line_per_interval() {
        let mut l = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        l.last = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(l.allow(), Some(2));
    }
}
