//! A lock-free histogram of host-cycle durations, written from the
//! real-time callback (one relaxed atomic add per cycle) and read by
//! anyone. Buckets are 250 ns wide up to 1 ms; longer cycles land in the
//! last bucket.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const BUCKET_NS: u64 = 250;
const BUCKETS: usize = 4000;

pub struct CycleHistogram {
    buckets: Box<[AtomicU64]>,
    max_ns: AtomicU64,
}

impl Default for CycleHistogram {
    fn default() -> Self {
        CycleHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_ns: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for CycleHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CycleHistogram(n={})", self.count())
    }
}

impl CycleHistogram {
    /// Real-time safe: no allocation, no locks.
    pub fn record(&self, ns: u64) {
        let i = ((ns / BUCKET_NS) as usize).min(BUCKETS - 1);
        self.buckets[i].fetch_add(1, Relaxed);
        self.max_ns.fetch_max(ns, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// The `q`-quantile (0..=1) in microseconds: the upper edge of the
    /// bucket it falls in. None when nothing was recorded.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        quantile_us_of(&self.snapshot(), q)
    }

    /// The bucket counts now; two snapshots give the histogram in between.
    pub fn snapshot(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.load(Relaxed)).collect()
    }

    pub fn max_us(&self) -> f64 {
        self.max_ns.load(Relaxed) as f64 / 1000.0
    }
}

/// CLOCK_MONOTONIC in nanoseconds (a vDSO call, no system call: RT safe).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `q`-quantile in microseconds of bucket counts (see `snapshot`).
pub fn quantile_us_of(counts: &[u64], q: f64) -> Option<f64> {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return None;
    }
    let want = ((n as f64 * q).ceil() as u64).clamp(1, n);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= want {
            return Some(((i as u64 + 1) * BUCKET_NS) as f64 / 1000.0);
        }
    }
    None
}

/// Counts recorded between two snapshots.
pub fn delta(before: &[u64], after: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a.saturating_sub(*b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let h = CycleHistogram::default();
        assert_eq!(h.quantile_us(0.5), None);
        for _ in 0..98 {
            h.record(1_100); // bucket 4: 1.00..1.25 µs
        }
        h.record(30_000);
        h.record(5_000_000); // beyond the last bucket
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile_us(0.5), Some(1.25));
        assert_eq!(h.quantile_us(0.99), Some(30.25));
        assert_eq!(h.quantile_us(1.0), Some(1000.0));
        assert_eq!(h.max_us(), 5000.0);
        let before = h.snapshot();
        h.record(2_000);
        let d = delta(&before, &h.snapshot());
        assert_eq!(quantile_us_of(&d, 0.5), Some(2.25));
    }
}
