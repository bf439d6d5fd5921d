//! A clock for guest streams while their host is away (PipeWire restarting,
//! not yet reachable): the guest's position keeps moving at the stream's
//! rate, with period interrupts as usual, so guest applications play on
//! (their sound goes nowhere; capture records silence) instead of stalling
//! until ALSA gives up with EIO. When the host is back its cycle takes the
//! stream over again.
//!
//! One thread runs every stream handed to it, in cycles the size the host
//! would use (`cycle_frames` of the period), at absolute deadlines so
//! rounding never drifts the rate.

use super::slot::EngineSlot;
use crate::sndif::StreamKind;
use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest a thread waits between looks at its streams.
const TICK: Duration = Duration::from_millis(5);
/// Scratch space for one cycle: the largest cycle (8192 frames) of the
/// widest frame the protocol carries (8 channels of 64-bit samples).
const SCRATCH_BYTES: usize = 8192 * 8 * 8;

enum Ctl {
    Add {
        id: u64,
        slot: Arc<EngineSlot>,
        kind: StreamKind,
    },
    /// Answered once the thread no longer touches the stream.
    Remove {
        id: u64,
        done: mpsc::SyncSender<()>,
    },
}

/// The fallback clock's thread; ends when dropped.
pub struct FallbackClock {
    tx: Option<mpsc::Sender<Ctl>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FallbackClock {
    pub fn start(name: &str) -> std::io::Result<FallbackClock> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || run(&rx))?;
        Ok(FallbackClock { tx: Some(tx), thread: Some(thread) })
    }

    /// Starts running the stream in `slot` (whenever an engine is in it).
    pub fn add(&self, id: u64, slot: Arc<EngineSlot>, kind: StreamKind) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Ctl::Add { id, slot, kind });
        }
    }

    /// Stops running stream `id`; when this returns the thread no longer
    /// touches it (it waits for the cycle in progress, a few ms at most).
    pub fn remove(&self, id: u64) {
        let (done, wait) = mpsc::sync_channel(1);
        if let Some(tx) = &self.tx {
            if tx.send(Ctl::Remove { id, done }).is_ok() {
                let _ = wait.recv_timeout(Duration::from_secs(5));
            }
        }
    }
}

impl Drop for FallbackClock {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A stream on the fallback clock.
struct Run {
    slot: Arc<EngineSlot>,
    kind: StreamKind,
    /// When the clock took over the engine it runs now, and the frames it
    /// has moved since; None until an engine is seen.
    since: Option<(Instant, u64, usize)>,
}

fn run(rx: &mpsc::Receiver<Ctl>) {
    let mut streams: HashMap<u64, Run> = HashMap::new();
    let mut scratch = vec![0u8; SCRATCH_BYTES];
    let mut raised = false;
    loop {
        // Idle (nothing to run) the thread sleeps until told otherwise.
        let next = if streams.is_empty() {
            rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(TICK)
        };
        match next {
            Ok(Ctl::Add { id, slot, kind }) => {
                if !raised {
                    // Real-time once it runs audio (it may never).
                    super::realtime::raise_this_thread();
                    raised = true;
                }
                streams.insert(id, Run { slot, kind, since: None });
            }
            Ok(Ctl::Remove { id, done }) => {
                streams.remove(&id);
                let _ = done.send(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        for s in streams.values_mut() {
            catch_up(s, now, &mut scratch);
        }
    }
}

/// Runs every cycle of `s` that is due by `now`.
fn catch_up(s: &mut Run, now: Instant, scratch: &mut [u8]) {
    let kind = s.kind;
    let since = &mut s.since;
    let ran = s.slot.with(|engine| {
        // A new engine (a new OPEN) is told apart by its shared counters.
        let key = Arc::as_ptr(&engine.shared) as usize;
        let (start, done, _) = match *since {
            Some(v) if v.2 == key => v,
            _ => (now, 0, key),
        };
        let rate = u64::from(engine.geom.rate.max(1));
        let cycle = u64::from(super::cycle_frames(engine.geom.period_frames()));
        let due = now.saturating_duration_since(start).as_nanos() as u64 * rate / 1_000_000_000;
        let stride = engine.frame_bytes().max(1);
        let bytes = (cycle as usize * stride).min(scratch.len() / stride * stride);
        let buf = &mut scratch[..bytes];
        let mut done = done;
        while done + cycle <= due {
            match kind {
                StreamKind::Playback => engine.playback_cycle(buf, 0),
                StreamKind::Capture => {
                    engine.geom.format.fill_silence(buf);
                    engine.capture_cycle(buf, 0);
                }
            }
            done += cycle;
        }
        *since = Some((start, done, key));
    });
    if ran.is_none() {
        s.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::testing::engine;
    use crate::dma::DmaShared;
    use std::sync::atomic::Ordering::Relaxed;

    /// A running stream on the clock moves at its rate, in whole cycles;
    /// after `remove` it never moves again.
    #[test]
    fn the_clock_moves_a_stream_at_its_rate_until_removed() {
        let shared = Arc::new(DmaShared::default());
        let e = engine(shared.clone());
        let (rate, stride, cycle) =
            (e.geom.rate as u64, e.frame_bytes() as u64, super::super::cycle_frames(e.geom.period_frames()));
        shared.running.store(true, Relaxed);
        let slot = Arc::new(EngineSlot::default());
        slot.install(e);
        let clock = FallbackClock::start("test-fallback").unwrap();
        let t0 = Instant::now();
        clock.add(1, slot.clone(), StreamKind::Playback);
        std::thread::sleep(Duration::from_millis(300));
        clock.remove(1);
        let elapsed = t0.elapsed().as_secs_f64();
        let frames = shared.position.load(Relaxed) / stride;
        assert_eq!(frames % u64::from(cycle), 0, "whole cycles");
        // At most the elapsed time's worth; at least all but two cycles of
        // the 300 ms it surely ran (one before the first look, one due).
        let most = (elapsed * rate as f64) as u64;
        let least = (0.3 * rate as f64) as u64 - 2 * u64::from(cycle);
        assert!(frames <= most && frames >= least, "{frames} frames in {elapsed:.3}s at {rate} Hz");
        let frozen = shared.position.load(Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(shared.position.load(Relaxed), frozen, "moved after remove");
    }
}
