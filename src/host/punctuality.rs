//! Tells, from a host's own cycle times, when it ran a stream's real-time
//! callback too late for the graph. The guest's position moves on at every
//! callback whatever happened, so without this a host that scheduled the
//! thread late (no real-time priority, an overloaded CPU, a stopped
//! process) would glitch where no guest-visible counter shows it.

#![forbid(unsafe_code)]

use crate::dma::DmaShared;
use std::sync::atomic::Ordering;

/// One stream's watch over its cycles. Lives in the real-time callback:
/// plain integers, no allocation.
#[derive(Debug, Default)]
pub struct Punctuality {
    /// (start, duration) of the previous cycle, in nanoseconds.
    last: Option<(u64, u64)>,
}

impl Punctuality {
    /// A cycle that the graph began at `start_ns` and that moves
    /// `duration_ns` of audio finished at `end_ns` (all on the same
    /// monotonic clock). Returns how many cycles the graph ran without this
    /// stream's data: cycles that began since the previous callback beyond
    /// the one expected, plus this one if it finished after the next began.
    pub fn cycle(&mut self, start_ns: u64, duration_ns: u64, end_ns: u64) -> u64 {
        if start_ns == 0 || duration_ns == 0 {
            self.last = None;
            return 0;
        }
        let mut late = 0;
        if let Some((prev_start, prev_duration)) = self.last {
            if start_ns > prev_start {
                // Rounded: the driver's clock drifts a little around the
                // nominal cycle.
                let cycles_since = (start_ns - prev_start + prev_duration / 2) / prev_duration;
                late += cycles_since.saturating_sub(1);
            }
        }
        late += u64::from(end_ns > start_ns + duration_ns);
        self.last = Some((start_ns, duration_ns));
        late
    }

    /// The stream stopped on purpose (paused, stopped): the gap before its
    /// next cycle is not lateness.
    pub fn pause(&mut self) {
        self.last = None;
    }

    /// After a host cycle of a stream: adds its late cycles to the
    /// stream's count while the guest stream runs. `timing` is the cycle's
    /// (start, duration) in nanoseconds, None when the host gave none; a
    /// stream not running, or a cycle without timing, starts the watch
    /// afresh.
    pub fn account(&mut self, shared: &DmaShared, timing: Option<(u64, u64)>, end_ns: u64) {
        match timing {
            Some((start, duration)) if shared.running.load(Ordering::Relaxed) => {
                let late = self.cycle(start, duration, end_ns);
                if late > 0 {
                    shared.late_cycles.fetch_add(late, Ordering::Relaxed);
                }
            }
            _ => self.pause(),
        }
    }
}

/// Nanoseconds `frames` last at `rate`.
pub fn frames_ns(frames: usize, rate: u32) -> u64 {
    if rate == 0 {
        return 0;
    }
    frames as u64 * 1_000_000_000 / u64::from(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: u64 = 21_333_333; // 1024 frames at 48 kHz

    #[test]
    fn cycles_on_time_are_not_late() {
        let mut p = Punctuality::default();
        let t0 = 1_000_000_000;
        for k in 0..100 {
            // A little drift and a callback that takes 1 ms.
            let start = t0 + k * Q + (k % 3) * 20_000;
            assert_eq!(p.cycle(start, Q, start + 1_000_000), 0, "cycle {k}");
        }
    }

    #[test]
    fn a_callback_that_ends_after_the_next_cycle_began_is_late_once() {
        let mut p = Punctuality::default();
        let t0 = 1_000_000_000;
        assert_eq!(p.cycle(t0, Q, t0 + 1_000), 0);
        assert_eq!(p.cycle(t0 + Q, Q, t0 + 2 * Q + 1), 1);
        // The next cycle comes on time again.
        assert_eq!(p.cycle(t0 + 2 * Q, Q, t0 + 2 * Q + 1_000_000), 0);
    }

    #[test]
    fn cycles_without_a_callback_are_counted() {
        let mut p = Punctuality::default();
        let t0 = 1_000_000_000;
        assert_eq!(p.cycle(t0, Q, t0 + 1_000), 0);
        // The process was stopped: the next callback sees the clock of a
        // cycle five cycles on.
        assert_eq!(p.cycle(t0 + 5 * Q, Q, t0 + 5 * Q + 1_000), 4);
    }

    #[test]
    fn a_quantum_change_is_not_lateness() {
        let mut p = Punctuality::default();
        let t0 = 1_000_000_000;
        assert_eq!(p.cycle(t0, Q, t0 + 1_000), 0);
        assert_eq!(p.cycle(t0 + Q, Q / 2, t0 + Q + 1_000), 0);
        assert_eq!(p.cycle(t0 + Q + Q / 2, 2 * Q, t0 + Q + Q / 2 + 1_000), 0);
        assert_eq!(p.cycle(t0 + 3 * Q + Q / 2, Q, t0 + 3 * Q + Q / 2 + 1_000), 0);
    }

    #[test]
    fn late_cycles_are_counted_only_while_the_stream_runs() {
        let shared = DmaShared::default();
        let mut p = Punctuality::default();
        let t0 = 1_000_000_000;
        p.account(&shared, Some((t0, Q)), t0 + 2 * Q);
        assert_eq!(shared.late_cycles.load(Ordering::Relaxed), 0, "stopped");
        shared.running.store(true, Ordering::Relaxed);
        p.account(&shared, Some((t0 + 10 * Q, Q)), t0 + 12 * Q);
        assert_eq!(shared.late_cycles.load(Ordering::Relaxed), 1, "late, no earlier cycle to count from");
        p.account(&shared, Some((t0 + 13 * Q, Q)), t0 + 13 * Q + 1_000);
        assert_eq!(shared.late_cycles.load(Ordering::Relaxed), 3, "two cycles went by without it");
        p.account(&shared, None, t0 + 14 * Q);
        p.account(&shared, Some((t0 + 20 * Q, Q)), t0 + 20 * Q + 1_000);
        assert_eq!(shared.late_cycles.load(Ordering::Relaxed), 3, "no timing: the watch starts afresh");
    }

    #[test]
    fn a_pause_is_not_lateness() {
        let mut p = Punctuality::default();
        let t0 = 1_000_000_000;
        assert_eq!(p.cycle(t0, Q, t0 + 1_000), 0);
        p.pause();
        assert_eq!(p.cycle(t0 + 100 * Q, Q, t0 + 100 * Q + 1_000), 0);
        assert_eq!(frames_ns(1024, 48000), Q);
        assert_eq!(frames_ns(1, 0), 0);
    }
}
