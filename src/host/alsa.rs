//! The plain ALSA host: each guest stream opens a PCM of its own on an ALSA
//! device (`default`, `plughw:1,0`, `hw:0,0`, `pipewire`, a dmix...) in the
//! guest's format, rate and channels — a `plug` device converts, a `hw`
//! device takes what the card takes, and an OPEN it refuses is refused to
//! the guest. A thread per stream moves one ALSA period per cycle, paced by
//! the device (blocking reads and writes): the device's clock drives the
//! guest. The delay sent is `snd_pcm_delay()` taken as of the end of the
//! cycle, as every host's is (docs/protocol.md): the frames between the
//! guest's position and the DAC, or from the ADC to it, once the period
//! this cycle moves has been played or recorded.

#![forbid(unsafe_code)]

use super::slot::EngineSlot;
use super::{HostBackend, HostNode, StreamSpec};
use crate::dma::histogram::now_ns;
use crate::dma::{DmaEngine, Geometry};
use crate::sndif::{PcmFormat, StreamKind};
use alsa::pcm::{Access, Format, HwParams, State, PCM};
use alsa::{Direction, ValueOr};
use anyhow::Context;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest wait for the device in one go, in milliseconds.
const WAIT_MS: u32 = 100;

#[derive(Debug, Clone)]
pub struct AlsaConfig {
    /// The ALSA device guest playback streams play on.
    pub playback_device: String,
    /// The ALSA device guest capture streams record from.
    pub capture_device: String,
    /// ALSA periods per buffer.
    pub periods: u32,
}

impl Default for AlsaConfig {
    fn default() -> Self {
        AlsaConfig { playback_device: "default".into(), capture_device: "default".into(), periods: 4 }
    }
}

pub struct AlsaHost {
    config: AlsaConfig,
}

impl AlsaHost {
    pub fn new(config: AlsaConfig) -> AlsaHost {
        tracing::info!(
            playback = config.playback_device,
            capture = config.capture_device,
            periods = config.periods,
            "ALSA host"
        );
        AlsaHost { config }
    }
}

/// The ALSA format of a wire format (24-bit ones are packed in 3 bytes).
fn alsa_format(f: PcmFormat) -> Format {
    use PcmFormat::*;
    match f {
        S8 => Format::S8,
        U8 => Format::U8,
        S16Le => Format::S16LE,
        S16Be => Format::S16BE,
        U16Le => Format::U16LE,
        U16Be => Format::U16BE,
        S24Le => Format::S243LE,
        S24Be => Format::S243BE,
        U24Le => Format::U243LE,
        U24Be => Format::U243BE,
        S32Le => Format::S32LE,
        S32Be => Format::S32BE,
        U32Le => Format::U32LE,
        U32Be => Format::U32BE,
        F32Le => Format::FloatLE,
        F32Be => Format::FloatBE,
        F64Le => Format::Float64LE,
        F64Be => Format::Float64BE,
    }
}

impl HostBackend for AlsaHost {
    fn supports(&self, _format: PcmFormat) -> bool {
        true // the device decides at OPEN
    }

    /// An ALSA PCM is no node users link: it is opened at each OPEN, in
    /// the guest's format, and closed at CLOSE.
    fn attach(&self, spec: StreamSpec) -> anyhow::Result<Box<dyn HostNode>> {
        Ok(Box::new(AlsaNode { config: self.config.clone(), spec, run: None, playing_out: None }))
    }
}

struct AlsaNode {
    config: AlsaConfig,
    spec: StreamSpec,
    run: Option<AlsaRun>,
    /// The thread of the last closed stream, playing out what its device
    /// still held: joined before the device is opened again (a `hw:`
    /// device takes one opener at a time), never at CLOSE.
    playing_out: Option<std::thread::JoinHandle<()>>,
}

/// An open stream's device thread, and what it shares with the node.
struct AlsaRun {
    slot: Arc<EngineSlot>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl HostNode for AlsaNode {
    fn start(&mut self, engine: DmaEngine) -> anyhow::Result<()> {
        self.stop();
        if let Some(t) = self.playing_out.take() {
            let _ = t.join();
        }
        let spec = &self.spec;
        let (device, dir) = match spec.kind {
            StreamKind::Playback => (&self.config.playback_device, Direction::Playback),
            StreamKind::Capture => (&self.config.capture_device, Direction::Capture),
        };
        let pcm = PCM::new(device, dir, false).with_context(|| format!("opening ALSA PCM {device}"))?;
        let g = engine.geom;
        let period = {
            let hw = HwParams::any(&pcm).context("hw params")?;
            hw.set_access(Access::RWInterleaved).context("interleaved access")?;
            hw.set_format(alsa_format(g.format)).with_context(|| format!("format {}", g.format.name()))?;
            hw.set_channels(g.channels).with_context(|| format!("{} channels", g.channels))?;
            hw.set_rate(g.rate, ValueOr::Nearest).with_context(|| format!("rate {}", g.rate))?;
            hw.set_period_size_near(g.cycle_frames as alsa::pcm::Frames, ValueOr::Nearest)
                .context("period size")?;
            hw.set_periods_near(self.config.periods, ValueOr::Nearest).context("periods")?;
            pcm.hw_params(&hw).with_context(|| format!("configuring ALSA PCM {device}"))?;
            hw.get_period_size().context("period size")? as usize
        };
        let frame_bytes = engine.frame_bytes();
        let stop = Arc::new(AtomicBool::new(false));
        let slot = Arc::new(EngineSlot::default());
        slot.install(engine);
        let mut rt = AlsaRt {
            slot: slot.clone(),
            geom: g,
            pcm,
            kind: spec.kind,
            buf: vec![0; period * frame_bytes],
            period,
            stop: stop.clone(),
        };
        tracing::debug!(stream = spec.node_name, device, period, "ALSA PCM up");
        // At CLOSE the thread lets go of the engine at once, then plays out
        // what the device still holds and ends by itself.
        let thread = std::thread::Builder::new()
            .name("vsnd-alsa".into())
            .spawn(move || rt.run())
            .context("spawning the ALSA stream thread")?;
        self.run = Some(AlsaRun { slot, stop, thread });
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(r) = self.run.take() {
            r.stop.store(true, Ordering::Relaxed);
            drop(r.slot.take());
            self.playing_out = Some(r.thread);
        }
    }
}

impl Drop for AlsaNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One stream's device loop, owned by its thread.
struct AlsaRt {
    /// The engine while the guest stream is open (`EngineSlot`).
    slot: Arc<EngineSlot>,
    geom: Geometry,
    pcm: PCM,
    kind: StreamKind,
    /// One ALSA period of interleaved guest-format frames.
    buf: Vec<u8>,
    period: usize,
    stop: Arc<AtomicBool>,
}

impl AlsaRt {
    fn run(&mut self) {
        super::realtime::raise_this_thread();
        if self.kind == StreamKind::Capture {
            let _ = self.pcm.start();
        }
        while !self.stop.load(Ordering::Relaxed) {
            // Wait until the device takes (or gives) a whole period, never
            // longer than WAIT_MS so that a stop is seen even when nothing
            // runs the device (a PipeWire plugin stream nobody links).
            let ok = match self.pcm.wait(Some(WAIT_MS)) {
                Ok(false) => continue,
                Ok(true) => match self.kind {
                    StreamKind::Playback => self.play_period(),
                    StreamKind::Capture => self.record_period(),
                },
                Err(e) => Err(e),
            };
            if let Err(e) = ok {
                // An xrun: this thread did not run in time for the device.
                self.slot.with(|e| e.shared.late_cycles.fetch_add(1, Ordering::Relaxed));
                if self.pcm.try_recover(e, true).is_err() {
                    break;
                }
                if self.kind == StreamKind::Capture {
                    let _ = self.pcm.start();
                }
            }
        }
        self.play_out();
        let _ = self.pcm.drop();
    }

    /// Lets the frames the device still holds play (a closed guest stream's
    /// last ones), for at most twice the time they can take.
    fn play_out(&self) {
        if self.kind != StreamKind::Playback {
            return;
        }
        let rate = self.geom.rate.max(1) as u64;
        let held = self.device_delay() as u64;
        let deadline = Instant::now() + Duration::from_micros(2 * held * 1_000_000 / rate);
        let step = Duration::from_micros(self.period as u64 * 500_000 / rate);
        while Instant::now() < deadline
            && self.pcm.state() == State::Running
            && self.pcm.delay().is_ok_and(|d| d > 0)
        {
            std::thread::sleep(step);
        }
    }

    /// The frames the device holds (playback: queued before the DAC;
    /// capture: captured and not yet read), clamped to what a delay can be.
    fn device_delay(&self) -> u32 {
        self.pcm.delay().map_or(0, |d| d.clamp(0, u32::MAX as alsa::pcm::Frames) as u32)
    }

    fn play_period(&mut self) -> alsa::Result<()> {
        // This period is written behind what the device holds now: its
        // first frame, and at the cycle's end the position past it, is
        // that far from the DAC.
        let delay = self.device_delay();
        let buf = &mut self.buf;
        let played = timed(&self.slot, |e| e.playback_cycle(buf, delay));
        if played.is_none() {
            self.geom.format.fill_silence(&mut self.buf); // closed: the loop ends
        }
        let io = self.pcm.io_bytes();
        let mut done = 0;
        while done < self.buf.len() {
            let frames = io.writei(&self.buf[done..])?;
            done += frames * self.geom.frame_bytes();
        }
        Ok(())
    }

    fn record_period(&mut self) -> alsa::Result<()> {
        {
            let io = self.pcm.io_bytes();
            let mut done = 0;
            while done < self.buf.len() {
                let frames = io.readi(&mut self.buf[done..])?;
                done += frames * self.geom.frame_bytes();
            }
        }
        // What the device holds now was captured after this period; by the
        // cycle's end a period more will have been.
        let delay = self.device_delay() + self.period as u32;
        let buf = &self.buf;
        timed(&self.slot, |e| e.capture_cycle(buf, delay));
        Ok(())
    }
}

/// Runs one cycle's work (not the device wait) on the open stream's engine,
/// into its callback-time histogram; None when the stream is closed.
fn timed(slot: &EngineSlot, work: impl FnOnce(&mut DmaEngine)) -> Option<()> {
    slot.with(|e| {
        let start = now_ns();
        work(e);
        e.shared.cycle_time.record(now_ns().saturating_sub(start));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_formats_map_to_alsa_formats_of_the_same_size() {
        for f in PcmFormat::all() {
            let a = alsa_format(f);
            assert_eq!(a.physical_width().ok(), Some(8 * f.sample_bytes() as i32), "{f:?} -> {a}");
        }
    }
}
