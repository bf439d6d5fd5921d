//! The guest's "DMA engine": each host cycle moves N frames between the
//! guest's shared buffer and the host buffer at the stream position, advances
//! the position and tells the guest with one CUR_POS event.
//!
//! Host-agnostic and real-time safe: no allocation, no locks, no logging,
//! no panics. The request thread and the real-time side share only atomics
//! (`DmaShared`); the engine itself is owned by the host's process callback.

pub mod controls;
mod events;
pub mod histogram;

pub use controls::StreamControls;
pub use events::{EventIndex, EventRing};
pub use histogram::{delta as histogram_delta, quantile_us_of, CycleHistogram};

use crate::sndif::PcmFormat;
use crate::xen::{EventChannel, SharedPages};
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::Arc;

/// Counters and flags shared between the request thread and the host cycle.
#[derive(Debug, Default)]
pub struct DmaShared {
    /// Set by TRIGGER START/RESUME, cleared by PAUSE/STOP.
    pub running: AtomicBool,
    /// Set by the host when it can no longer carry this open stream (a
    /// JACK server back at another rate): the guest's WRITE, READ and
    /// TRIGGER START/RESUME are refused from then on, so its application
    /// gets an error and opens the stream again, at what the host offers.
    pub host_gone: AtomicBool,
    /// Bytes the host has moved since OPEN (the DMA position).
    pub position: AtomicU64,
    /// The position the guest was told last (bytes): the DMA position, or
    /// the DAC position (`Report::DacPosition`).
    pub told: AtomicU64,
    /// Playback: bytes the guest has WRITten; capture: bytes it has READ.
    pub guest_bytes: AtomicU64,
    /// Host cycles in which the guest had not written enough (playback).
    pub underruns: AtomicU64,
    /// Host cycles that overwrote data the guest had not read (capture).
    pub overruns: AtomicU64,
    /// Frames replaced by silence because of underruns.
    pub silent_frames: AtomicU64,
    pub cycles: AtomicU64,
    /// Graph cycles that went by without this stream's data: its callback
    /// finished after the next cycle had begun, or cycles passed without
    /// one (`host::punctuality`). The sink then played silence and this
    /// stream later, although the guest's position moved on as usual: the
    /// host did not run the real-time thread in time (no real-time
    /// scheduling, an overloaded CPU), which no guest-visible counter shows.
    pub late_cycles: AtomicU64,
    /// Cycles the fallback clock ran because the host did not (PipeWire
    /// or JACK away, a node no driver schedules).
    pub fallback_cycles: AtomicU64,
    /// Events that did not fit because the guest stopped consuming them.
    pub events_dropped: AtomicU64,
    pub notify_failures: AtomicU64,
    /// Delay sent with the last event, frames at the stream rate.
    pub delay_frames: AtomicU32,
    /// Frames the last cycle moved (the host's quantum for this stream).
    pub cycle_frames: AtomicU32,
    /// Time the host's real-time callback spent per cycle on this stream.
    pub cycle_time: CycleHistogram,
    /// Of that, the time raising the guest's interrupt took (one system
    /// call: an eventfd write, or the event-channel ioctl on Xen).
    pub notify_time: CycleHistogram,
}

/// Where a playback position the guest is told stands, for a frontend
/// without the delay extension (dom0's policy, `playback_position`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaybackPosition {
    /// What the host has taken from the guest's buffer (a DMA engine's
    /// pointer): the guest's `snd_pcm_delay()` misses what dom0 still
    /// holds, but the guest keeps its whole buffer as headroom.
    #[default]
    Dma,
    /// What has reached the DAC: taken minus the host's delay, never
    /// earlier than the truth, so period interrupts stay safe. An
    /// unmodified guest's `snd_pcm_delay()` is then the whole delay; it
    /// has that much less of its buffer as headroom. What is held back
    /// never leaves the guest less headroom than two periods and two
    /// cycles (`DmaEngine::dac_position`).
    Dac,
}

/// What the guest is told each cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The DMA position and the host's delay (the frontend opted in to the
    /// delay extension).
    PositionAndDelay,
    /// The DMA position alone.
    DmaPosition,
    /// Playback only: the DAC position alone (`PlaybackPosition::Dac`).
    DacPosition,
}

impl Report {
    /// The report for a stream: the extension when the frontend took it;
    /// otherwise the policy's choice for playback (capture has no DAC
    /// side: its data exists only once the host delivered it).
    pub fn choose(delay_extension: bool, playback: bool, rule: PlaybackPosition) -> Report {
        match (delay_extension, playback, rule) {
            (true, _, _) => Report::PositionAndDelay,
            (false, true, PlaybackPosition::Dac) => Report::DacPosition,
            _ => Report::DmaPosition,
        }
    }
}

/// The fixed shape of an opened stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub format: PcmFormat,
    pub rate: u32,
    pub channels: u32,
    pub buffer_bytes: u32,
    pub period_bytes: u32,
    /// Frames per host cycle the stream asks for (`host::cycle_frames`,
    /// chosen at OPEN with dom0's floor).
    pub cycle_frames: u32,
}

impl Geometry {
    pub fn frame_bytes(&self) -> usize {
        self.format.sample_bytes() * self.channels as usize
    }
    pub fn period_frames(&self) -> u32 {
        (self.period_bytes as usize / self.frame_bytes().max(1)) as u32
    }
}

pub struct DmaEngine {
    pub geom: Geometry,
    buffer: Arc<SharedPages>,
    events: EventRing,
    evtchn: Arc<dyn EventChannel>,
    pub shared: Arc<DmaShared>,
    /// dom0's policy and the guest's volume, applied to every cycle.
    controls: Arc<StreamControls>,
    /// What each cycle's event tells the guest.
    report: Report,
    /// The last position the guest was told (bytes): a DAC position never
    /// goes back when the host's delay grows.
    told: u64,
}

impl DmaEngine {
    pub fn new(
        geom: Geometry,
        buffer: Arc<SharedPages>,
        events: EventRing,
        evtchn: Arc<dyn EventChannel>,
        shared: Arc<DmaShared>,
        controls: Arc<StreamControls>,
        report: Report,
    ) -> DmaEngine {
        DmaEngine { geom, buffer, events, evtchn, shared, controls, report, told: 0 }
    }

    pub fn frame_bytes(&self) -> usize {
        self.geom.frame_bytes()
    }

    fn running(&self) -> bool {
        self.shared.running.load(Acquire)
    }

    /// Splits `len` bytes from stream position `pos` into the contiguous
    /// pieces they occupy in the ring buffer: (buffer offset, range of the
    /// caller's slice). At most two pieces; no allocation.
    fn for_each_span(&self, pos: u64, len: usize, mut f: impl FnMut(usize, std::ops::Range<usize>)) {
        let size = self.geom.buffer_bytes as u64;
        let mut done = 0usize;
        while done < len {
            let off = ((pos + done as u64) % size) as usize;
            let n = (len - done).min(size as usize - off);
            f(off, done..done + n);
            done += n;
        }
    }

    /// Copies the ring buffer from stream position `pos` into `dst`.
    fn ring_out(&self, pos: u64, dst: &mut [u8]) {
        self.for_each_span(pos, dst.len(), |off, r| {
            self.buffer.copy_out(off, &mut dst[r]);
        });
    }

    /// Copies `src` into the ring buffer at stream position `pos`.
    fn ring_in(&self, pos: u64, src: &[u8]) {
        self.for_each_span(pos, src.len(), |off, r| {
            self.buffer.copy_in(off, &src[r]);
        });
    }

    /// One playback cycle: fills `out` (whole frames) from the guest buffer.
    /// A stopped stream or missing guest data gives silence; the position
    /// advances while running whatever the guest did, as real hardware does.
    pub fn playback_cycle(&mut self, out: &mut [u8], delay_frames: u32) {
        if !self.running() {
            self.geom.format.fill_silence(out);
            return;
        }
        let pos = self.shared.position.load(Relaxed);
        let written = self.shared.guest_bytes.load(Acquire);
        let avail = written.saturating_sub(pos).min(out.len() as u64) as usize;
        let avail = avail - avail % self.frame_bytes().max(1);
        if self.controls.allowed() {
            self.ring_out(pos, &mut out[..avail]);
            self.controls.apply(self.geom.format, self.geom.channels as usize, &mut out[..avail]);
        } else {
            // dom0 does not let this guest play: the position moves on,
            // the host hears silence.
            self.geom.format.fill_silence(&mut out[..avail]);
        }
        if avail < out.len() {
            self.geom.format.fill_silence(&mut out[avail..]);
            self.shared.underruns.fetch_add(1, Relaxed);
            let missing = (out.len() - avail) / self.frame_bytes().max(1);
            self.shared.silent_frames.fetch_add(missing as u64, Relaxed);
        }
        self.advance(pos, out.len(), delay_frames);
    }

    /// One capture cycle: stores `input` (whole frames) into the guest buffer.
    pub fn capture_cycle(&mut self, input: &[u8], delay_frames: u32) {
        if !self.running() {
            return;
        }
        let pos = self.shared.position.load(Relaxed);
        let read = self.shared.guest_bytes.load(Acquire);
        let n = input.len().min(self.geom.buffer_bytes as usize);
        if (pos + n as u64).saturating_sub(read) > self.geom.buffer_bytes as u64 {
            self.shared.overruns.fetch_add(1, Relaxed);
        }
        if self.controls.allowed() && self.controls.is_unity(self.geom.channels as usize) {
            self.ring_in(pos, &input[..n]);
        } else {
            self.ring_in_processed(pos, &input[..n]);
        }
        self.advance(pos, n, delay_frames);
    }

    /// Stores `input` at `pos` as the controls say: digital silence when
    /// dom0 denies this guest its input (nothing of dom0's reaches the
    /// guest), else scaled by the gains. Through a stack buffer: no
    /// allocation in the cycle.
    fn ring_in_processed(&self, pos: u64, input: &[u8]) {
        let fb = self.frame_bytes().max(1);
        let mut scratch = [0u8; 2048];
        let chunk = scratch.len() / fb * fb;
        let allowed = self.controls.allowed();
        let mut done = 0;
        while done < input.len() {
            let n = (input.len() - done).min(chunk);
            let part = &mut scratch[..n];
            if allowed {
                part.copy_from_slice(&input[done..done + n]);
                self.controls.apply(self.geom.format, self.geom.channels as usize, part);
            } else {
                self.geom.format.fill_silence(part);
            }
            self.ring_in(pos + done as u64, part);
            done += n;
        }
    }

    fn advance(&mut self, pos: u64, bytes: usize, delay_frames: u32) {
        let new_pos = pos + bytes as u64;
        self.shared.position.store(new_pos, Release);
        self.shared.cycles.fetch_add(1, Relaxed);
        self.shared.delay_frames.store(delay_frames, Relaxed);
        self.shared.cycle_frames.store((bytes / self.frame_bytes().max(1)) as u32, Relaxed);
        if self.geom.period_bytes == 0 {
            return; // the guest asked for no position events
        }
        let (told, delay) = match self.report {
            Report::PositionAndDelay => (new_pos, Some(delay_frames)),
            Report::DmaPosition => (new_pos, None),
            Report::DacPosition => (self.dac_position(new_pos, bytes, delay_frames), None),
        };
        self.told = told;
        self.shared.told.store(told, Relaxed);
        if !self.events.push_cur_pos(told, delay) {
            self.shared.events_dropped.fetch_add(1, Relaxed);
        }
        let start = crate::dma::histogram::now_ns();
        let notified = self.evtchn.notify();
        self.shared.notify_time.record(crate::dma::histogram::now_ns().saturating_sub(start));
        if !notified {
            self.shared.notify_failures.fetch_add(1, Relaxed);
        }
    }

    /// The position at the DAC: `dma_pos` less the host's delay. A guest
    /// that fills its whole buffer keeps dom0 only its buffer less what
    /// is held back; a guest whose buffer is not much longer than dom0's
    /// delay (a Bluetooth sink's 200 ms) would write every frame behind
    /// the DMA position and never be heard. So at most the buffer less two
    /// periods and two cycles is held back: the guest keeps the headroom
    /// a two-period buffer has under the DMA rule (it refills a period at
    /// a time, while dom0 takes a cycle at a time); its delay then reads
    /// short, never its audio. Never goes back.
    fn dac_position(&self, dma_pos: u64, cycle_bytes: usize, delay_frames: u32) -> u64 {
        let room = u64::from(self.geom.buffer_bytes)
            .saturating_sub(2 * u64::from(self.geom.period_bytes))
            .saturating_sub(2 * cycle_bytes as u64);
        let held = (u64::from(delay_frames) * self.frame_bytes() as u64).min(room);
        dma_pos.saturating_sub(held).max(self.told)
    }
}

/// Engines and channels for other modules' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    pub use crate::xen::memory::CountingChannel;
    use crate::xen::shared::test_pages;

    /// The geometry of the test engines: S16 stereo at 48 kHz, a 4096-byte
    /// buffer of 1024-byte periods.
    pub fn geometry() -> Geometry {
        Geometry {
            format: PcmFormat::S16Le,
            rate: 48000,
            channels: 2,
            buffer_bytes: 4096,
            period_bytes: 1024,
            cycle_frames: 128,
        }
    }

    /// A stopped engine on fresh memory that reports to `shared`.
    pub fn engine(shared: Arc<DmaShared>) -> DmaEngine {
        let evt = EventRing::new(Arc::new(test_pages(4096)), Arc::default());
        DmaEngine::new(
            geometry(),
            Arc::new(test_pages(4096)),
            evt,
            Arc::new(CountingChannel::default()),
            shared,
            Arc::default(),
            Report::DmaPosition,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sndif::wire::{decode_event, evt_page, evt_slot_offset};
    use crate::xen::shared::test_pages;

    fn engine(
        report: Report,
    ) -> (DmaEngine, Arc<SharedPages>, Arc<SharedPages>, Arc<testing::CountingChannel>) {
        let geom = testing::geometry();
        let buf = Arc::new(test_pages(4096));
        let evt = Arc::new(test_pages(4096));
        let ch = Arc::new(testing::CountingChannel::default());
        let e = DmaEngine::new(
            geom,
            buf.clone(),
            EventRing::new(evt.clone(), Arc::default()),
            ch.clone(),
            Arc::default(),
            Arc::default(),
            report,
        );
        (e, buf, evt, ch)
    }

    #[test]
    fn stopped_playback_is_silent_and_does_not_move() {
        let (mut e, buf, _, ch) = engine(Report::DmaPosition);
        buf.copy_in(0, &[9u8; 4096]);
        e.shared.guest_bytes.store(4096, Relaxed);
        let mut out = [1u8; 256];
        e.playback_cycle(&mut out, 0);
        assert_eq!(out, [0u8; 256]);
        assert_eq!(e.shared.position.load(Relaxed), 0);
        assert_eq!(ch.notified.load(Relaxed), 0);
    }

    #[test]
    fn playback_reads_at_the_position_with_wrap_and_reports() {
        let (mut e, buf, evt, ch) = engine(Report::PositionAndDelay);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        buf.copy_in(0, &pattern);
        e.shared.running.store(true, Relaxed);
        e.shared.position.store(4096 - 128, Relaxed);
        e.shared.guest_bytes.store(4096 + 1024, Relaxed);
        let mut out = [0u8; 256];
        e.playback_cycle(&mut out, 77);
        assert_eq!(&out[..128], &pattern[4096 - 128..]);
        assert_eq!(&out[128..], &pattern[..128]);
        assert_eq!(e.shared.position.load(Relaxed), 4096 + 128);
        assert_eq!(e.shared.underruns.load(Relaxed), 0);
        assert_eq!(ch.notified.load(Relaxed), 1);
        assert_eq!(evt.load_u32(evt_page::IN_PROD), 1);
        let (id, ty, pos, delay) = decode_event(&evt.read_msg(evt_slot_offset(0)));
        assert_eq!((id, ty, pos, delay), (0, 0, 4096 + 128, 77));
    }

    /// The DAC position: the DMA position less the host's delay, never
    /// going back when the delay grows, carried without a delay field.
    #[test]
    fn dac_position_trails_the_dma_position_by_the_delay_and_never_goes_back() {
        let (mut e, _, evt, _) = engine(Report::DacPosition);
        e.shared.running.store(true, Relaxed);
        e.shared.guest_bytes.store(1 << 20, Relaxed);
        let mut out = [0u8; 256]; // 64 frames a cycle
        let mut told = Vec::new();
        // (delay in frames for each cycle): first more than was taken, then
        // steady, then growing by more than a cycle, then shrinking.
        for (i, delay) in [100u32, 100, 100, 100, 200, 200, 200, 50].into_iter().enumerate() {
            e.playback_cycle(&mut out, delay);
            let (_, _, pos, d) = decode_event(&evt.read_msg(evt_slot_offset(i as u32)));
            assert_eq!(d, 0, "no delay field without the extension");
            told.push(pos);
        }
        // DMA positions 256, 512, ..., 2048 bytes; the delay held back in bytes.
        assert_eq!(told, [0, 112, 368, 624, 624, 736, 992, 1848]);
        assert_eq!(e.shared.position.load(Relaxed), 2048, "the host reads on at the DMA position");
    }

    /// A delay longer than the guest's buffer can carry: what is held back
    /// stops at the buffer less two periods and two cycles (here 4096 - 2 *
    /// 1024 - 2 * 256 bytes), so the guest always writes ahead of the host.
    #[test]
    fn dac_position_holds_back_no_more_than_the_buffer_can_spare() {
        let (mut e, _, evt, _) = engine(Report::DacPosition);
        e.shared.running.store(true, Relaxed);
        e.shared.guest_bytes.store(1 << 20, Relaxed);
        let mut out = [0u8; 256];
        for i in 0..20u32 {
            e.playback_cycle(&mut out, 48_000); // a second: far more than the buffer
            let (_, _, pos, _) = decode_event(&evt.read_msg(evt_slot_offset(i)));
            assert_eq!(pos, (256 * (u64::from(i) + 1)).saturating_sub(1536), "cycle {i}");
        }
    }

    #[test]
    fn the_dac_position_is_for_playback_without_the_extension_only() {
        use PlaybackPosition::{Dac, Dma};
        assert_eq!(Report::choose(false, true, Dac), Report::DacPosition);
        assert_eq!(Report::choose(false, true, Dma), Report::DmaPosition);
        assert_eq!(Report::choose(false, false, Dac), Report::DmaPosition);
        assert_eq!(Report::choose(true, true, Dac), Report::PositionAndDelay);
        assert_eq!(Report::choose(true, false, Dma), Report::PositionAndDelay);
    }

    #[test]
    fn underrun_gives_silence_counts_and_keeps_the_clock() {
        let (mut e, buf, evt, _) = engine(Report::DmaPosition);
        buf.copy_in(0, &[5u8; 4096]);
        e.shared.running.store(true, Relaxed);
        e.shared.guest_bytes.store(100, Relaxed); // 25 frames; 24 whole... of 4 bytes
        let mut out = [1u8; 256];
        e.playback_cycle(&mut out, 0);
        assert!(out[..100].iter().all(|b| *b == 5));
        assert!(out[100..].iter().all(|b| *b == 0));
        assert_eq!(e.shared.underruns.load(Relaxed), 1);
        assert_eq!(e.shared.silent_frames.load(Relaxed), 39);
        assert_eq!(e.shared.position.load(Relaxed), 256);
        let (_, _, _, delay) = decode_event(&evt.read_msg(evt_slot_offset(0)));
        assert_eq!(delay, 0, "no delay without opt-in");
    }

    #[test]
    fn capture_writes_at_the_position_and_counts_overruns() {
        let (mut e, buf, _, _) = engine(Report::DmaPosition);
        e.shared.running.store(true, Relaxed);
        let input: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
        for _ in 0..4 {
            e.capture_cycle(&input, 0);
        }
        assert_eq!(e.shared.overruns.load(Relaxed), 0);
        let mut back = vec![0u8; 1024];
        buf.copy_out(3072, &mut back);
        assert_eq!(back, input);
        e.capture_cycle(&input, 0); // guest read nothing: the oldest period is overwritten
        assert_eq!(e.shared.overruns.load(Relaxed), 1);
    }

    #[test]
    fn denied_directions_carry_silence_and_keep_the_clock() {
        let (mut e, buf, _, _) = engine(Report::DmaPosition);
        let controls = Arc::new(StreamControls::new(false, 1.0));
        e.controls = controls.clone();
        e.shared.running.store(true, Relaxed);
        // Capture: the guest's buffer gets zeros, not the input.
        buf.copy_in(0, &[7u8; 4096]);
        e.capture_cycle(&[9u8; 3000], 0);
        let mut back = vec![1u8; 3000];
        buf.copy_out(0, &mut back);
        assert!(back.iter().all(|b| *b == 0));
        assert_eq!(e.shared.position.load(Relaxed), 3000);
        assert_eq!(e.shared.cycle_frames.load(Relaxed), 750);
        // Allowed again from the next cycle on, with the guest's gain.
        controls.set_policy(true, 1.0);
        controls.set_guest_gains(&[0.5, 0.5]);
        let input: Vec<u8> = [400i16, -400].iter().cycle().take(8).flat_map(|s| s.to_le_bytes()).collect();
        e.capture_cycle(&input, 0);
        let mut back = vec![0u8; 16];
        buf.copy_out(3000, &mut back);
        let expect: Vec<u8> = [200i16, -200].iter().cycle().take(8).flat_map(|s| s.to_le_bytes()).collect();
        assert_eq!(back, expect);
        // Playback denied: the host gets silence, the position moves.
        controls.set_policy(false, 1.0);
        e.shared.guest_bytes.store(1 << 20, Relaxed);
        let mut out = [1u8; 256];
        e.playback_cycle(&mut out, 0);
        assert_eq!(out, [0u8; 256]);
        assert_eq!(e.shared.underruns.load(Relaxed), 0);
    }
}
