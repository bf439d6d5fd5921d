//! A clock for guest streams their host does not run: PipeWire restarting
//! or not there yet, a JACK server away, a node no driver schedules (not
//! linked yet, WirePlumber still starting). A running stream whose host has
//! not run a cycle of it for `STALL` (`EngineSlot::since_host_cycle`), and
//! that this clock has then seen running for `GRACE`, is moved on by this
//! clock instead, at the stream's rate, with period interrupts
//! as usual, so guest applications play on (their sound goes nowhere;
//! capture records silence) instead of stalling until ALSA gives up with
//! EIO. As soon as the host runs the stream again the clock lets go.
//!
//! One thread watches every stream handed to it and runs the stalled ones
//! in cycles the size the host would use (`cycle_frames` of the period), at
//! absolute deadlines so rounding never drifts the rate.

#![forbid(unsafe_code)]

use super::slot::EngineSlot;
use crate::dma::histogram::now_ns;
use crate::dma::DmaEngine;
use crate::sndif::StreamKind;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a running stream may go without a host cycle before this clock
/// takes over: well above the longest cycle a graph runs (8192 frames at
/// 44.1 kHz, 186 ms) and a late one, well below what a guest application
/// waits before it gives up (ALSA: 10 s).
pub const STALL: Duration = Duration::from_millis(500);
/// How long a stream must then be seen running before this clock takes it:
/// a stream just opened gets its node time to start.
pub const GRACE: Duration = Duration::from_millis(250);
/// How often the thread looks at its streams while none is stalled.
const WATCH: Duration = Duration::from_millis(50);
/// How often it runs the stalled ones.
const TICK: Duration = Duration::from_millis(5);
/// Scratch space for one cycle: the largest cycle (8192 frames) of the
/// widest frame the protocol carries (8 channels of 64-bit samples).
pub(super) const SCRATCH_BYTES: usize = 8192 * 8 * 8;

/// One cycle of `engine` (its `cycle_frames`) with no audio behind it:
/// playback frames are read and dropped, capture is given silence.
/// `scratch` holds a cycle (`SCRATCH_BYTES`).
pub(super) fn silent_cycle(engine: &mut DmaEngine, kind: StreamKind, scratch: &mut [u8]) {
    let stride = engine.frame_bytes().max(1);
    let bytes = (engine.geom.cycle_frames as usize * stride).min(scratch.len() / stride * stride);
    let buf = &mut scratch[..bytes];
    match kind {
        StreamKind::Playback => engine.playback_cycle(buf, 0),
        StreamKind::Capture => {
            engine.geom.format.fill_silence(buf);
            engine.capture_cycle(buf, 0);
        }
    }
}

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

    /// Watches the stream in `slot` from now on (for the life of its
    /// connection), running it whenever it stalls.
    pub fn add(&self, id: u64, slot: Arc<EngineSlot>, kind: StreamKind) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Ctl::Add { id, slot, kind });
        }
    }

    /// Stops watching stream `id`; when this returns the thread no longer
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

/// A watched stream.
struct Watched {
    slot: Arc<EngineSlot>,
    kind: StreamKind,
    /// Running with no host cycle since this instant, in the engine with
    /// this key (`EngineSlot::installs`: a new OPEN brings another engine):
    /// the wait before this clock takes over starts with the engine, not
    /// with the host's last cycle of an earlier one.
    waiting: Option<(Instant, u64)>,
    /// While this clock runs the stream: when it took over, the frames it
    /// has moved since, and the engine's key.
    driving: Option<(Instant, u64, u64)>,
}

fn run(rx: &mpsc::Receiver<Ctl>) {
    let mut streams: HashMap<u64, Watched> = HashMap::new();
    let mut scratch = vec![0u8; SCRATCH_BYTES];
    let mut raised = false;
    let mut pace = WATCH;
    loop {
        // With nothing to watch the thread sleeps until told otherwise.
        let next = if streams.is_empty() {
            rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(pace)
        };
        match next {
            Ok(Ctl::Add { id, slot, kind }) => {
                streams.insert(id, Watched { slot, kind, waiting: None, driving: None });
            }
            Ok(Ctl::Remove { id, done }) => {
                streams.remove(&id);
                let _ = done.send(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        let mut driving = false;
        for s in streams.values_mut() {
            driving |= look_after(s, now, &mut scratch);
        }
        if driving && !raised {
            // Real-time once it runs audio (it may never).
            super::realtime::raise_this_thread();
            raised = true;
        }
        pace = if driving { TICK } else { WATCH };
    }
}

/// Runs `s` if it is running and its host has let it stall: every cycle
/// due by `now` since this clock took over. True while it drives it (or is
/// about to).
fn look_after(s: &mut Watched, now: Instant, scratch: &mut [u8]) -> bool {
    // While the host runs the stream the slot is left alone: entering it
    // could keep the host's cycle out.
    if s.slot.since_host_cycle(now_ns()) < STALL.as_nanos() as u64 {
        (s.waiting, s.driving) = (None, None);
        return false;
    }
    if s.slot.is_empty() {
        (s.waiting, s.driving) = (None, None);
        return false;
    }
    let Watched { slot, kind, waiting, driving } = s;
    let ran = slot.with(|engine| {
        // Read inside: the engine seen here is the last one installed.
        let key = slot.installs();
        let shared = engine.shared.clone();
        if !shared.running.load(Ordering::Acquire) {
            (*waiting, *driving) = (None, None);
            return false;
        }
        match *waiting {
            Some((since, k)) if k == key => {
                if now.saturating_duration_since(since) < GRACE {
                    return true;
                }
            }
            _ => {
                *waiting = Some((now, key));
                return true;
            }
        }
        let (start, mut done, _) = match *driving {
            Some(d) if d.2 == key => d,
            _ => (now, 0, key),
        };
        let rate = u64::from(engine.geom.rate.max(1));
        let cycle = u64::from(engine.geom.cycle_frames);
        let due = now.saturating_duration_since(start).as_nanos() as u64 * rate / 1_000_000_000;
        while done + cycle <= due {
            silent_cycle(engine, *kind, scratch);
            done += cycle;
            shared.fallback_cycles.fetch_add(1, Ordering::Relaxed);
        }
        *driving = Some((start, done, key));
        true
    });
    // Busy: the host came back this instant (or the engine was just taken
    // back): look again soon.
    ran.unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::testing::engine;
    use crate::dma::DmaShared;
    use std::sync::atomic::Ordering::Relaxed;

    /// A running stream no host runs is moved on at its rate, in whole
    /// cycles, once it has waited `GRACE`; a host cycle takes it back;
    /// after `remove` the clock never moves it again.
    #[test]
    fn the_clock_runs_a_stalled_stream_at_its_rate_until_its_host_is_back() {
        let shared = Arc::new(DmaShared::default());
        let e = engine(shared.clone());
        let (rate, stride) = (e.geom.rate as u64, e.frame_bytes() as u64);
        let cycle = u64::from(e.geom.cycle_frames);
        shared.running.store(true, Relaxed);
        let slot = Arc::new(EngineSlot::default());
        slot.install(e);
        let clock = FallbackClock::start("test-fallback").unwrap();
        let t0 = Instant::now();
        clock.add(1, slot.clone(), StreamKind::Playback);
        std::thread::sleep(GRACE / 2);
        assert_eq!(shared.position.load(Relaxed), 0, "moved before it had waited");
        std::thread::sleep(GRACE / 2 + Duration::from_millis(300));
        let stalled = t0.elapsed().as_secs_f64() - GRACE.as_secs_f64();
        let frames = shared.position.load(Relaxed) / stride;
        assert_eq!(frames % cycle, 0, "whole cycles");
        // At most the stalled time's worth; at least all but a look and a
        // cycle of the 300 ms it surely ran.
        let most = (stalled * rate as f64) as u64;
        let least = ((0.3 - WATCH.as_secs_f64()) * rate as f64) as u64 - cycle;
        assert!(frames <= most && frames >= least, "{frames} frames in {stalled:.3}s at {rate} Hz");
        assert_eq!(shared.fallback_cycles.load(Relaxed), frames / cycle);
        // The host runs it again (a cycle every 10 ms): the clock lets go.
        let host = {
            let (slot, stop) = (slot.clone(), Arc::new(std::sync::atomic::AtomicBool::new(false)));
            let s2 = stop.clone();
            (
                std::thread::spawn(move || {
                    while !s2.load(Relaxed) {
                        slot.host_cycle();
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }),
                stop,
            )
        };
        std::thread::sleep(WATCH * 2);
        let held = shared.position.load(Relaxed);
        std::thread::sleep(WATCH * 4);
        assert_eq!(shared.position.load(Relaxed), held, "moved while its host ran it again");
        clock.remove(1);
        host.1.store(true, Relaxed);
        host.0.join().unwrap();
        std::thread::sleep(STALL * 2 + WATCH * 2);
        assert_eq!(shared.position.load(Relaxed), held, "moved after remove");
    }
}
