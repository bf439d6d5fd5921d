//! The real-time side of a guest node: PipeWire's data thread calls
//! `process` every graph cycle (`RT_PROCESS`). It only moves frames through
//! the DMA engine the node holds while the guest stream is open: no
//! allocation, no lock, no logging.

#![forbid(unsafe_code)]

use super::node::shape_key;
use crate::dma::histogram::now_ns;
use crate::dma::DmaEngine;
use crate::host::punctuality::{frames_ns, Punctuality};
use crate::host::slot::EngineSlot;
use crate::host::Shape;
use crate::sndif::{PcmFormat, StreamKind};
use pipewire as pw;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// State owned by the process callback.
pub(super) struct Rt {
    /// The open stream's engine (`EngineSlot`); empty while closed.
    pub slot: Arc<EngineSlot>,
    /// The format the node negotiated last (`node::shape_key`), set by the
    /// main thread: the engine runs only in its own format, so while a
    /// renegotiation is on its way the cycle plays silence.
    pub negotiated: Arc<AtomicU64>,
    pub kind: StreamKind,
    /// Graph cycles of latency PipeWire does not report (`graph`).
    pub unreported_cycles: Arc<AtomicU32>,
    pub punctuality: Punctuality,
}

/// Frames between the DMA position and the device (playback) or from the
/// device to the position (capture), at the stream's rate.
fn delay_frames(t: &pw::stream::Time, stream_rate: u32, frame_bytes: usize) -> u32 {
    let raw = t.as_raw();
    let (num, denom) = (raw.rate.num as i128, raw.rate.denom as i128);
    let graph = if denom > 0 { (raw.delay as i128 * num * stream_rate as i128) / denom } else { 0 };
    let queued = (raw.queued as usize / frame_bytes.max(1)) as i128;
    (graph + queued + raw.buffered as i128).clamp(0, u32::MAX as i128) as u32
}

/// One graph cycle.
pub(super) fn process(stream: &pw::stream::Stream, rt: &mut Rt) {
    let start = now_ns();
    rt.slot.host_cycle();
    let time = stream.time().ok();
    let Some(mut buffer) = stream.dequeue_buffer() else {
        return;
    };
    let negotiated = rt.negotiated.load(Ordering::Acquire);
    let Rt { slot, kind, unreported_cycles, punctuality, .. } = rt;
    let ran = slot.with(|engine| {
        if shape_key(Shape::of(&engine.geom)) != negotiated {
            // The node is still renegotiating: a cycle without the stream,
            // counted where a running stream's gaps are (never silent).
            if engine.shared.running.load(Ordering::Relaxed) {
                engine.shared.late_cycles.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        }
        let Some(frames) = cycle(&mut buffer, time.as_ref(), engine, *kind, unreported_cycles) else {
            return false;
        };
        let end = now_ns();
        engine.shared.cycle_time.record(end.saturating_sub(start));
        let timing = time
            .as_ref()
            .map(|t| (u64::try_from(t.as_raw().now).unwrap_or(0), frames_ns(frames, engine.geom.rate)));
        punctuality.account(&engine.shared, timing, end);
        true
    });
    if ran != Some(true) {
        punctuality.pause();
        silence(&mut buffer, *kind, negotiated);
    }
}

/// A cycle without the guest: playback gives silence in the negotiated
/// format, capture's input goes nowhere.
fn silence(buffer: &mut pw::buffer::Buffer, kind: StreamKind, negotiated: u64) {
    if kind != StreamKind::Playback {
        return;
    }
    let requested = buffer.requested() as usize;
    let Some(d) = buffer.datas_mut().first_mut() else {
        return;
    };
    let (format, channels) = super::node::format_of_key(negotiated).unwrap_or((PcmFormat::S16Le, 0));
    let stride = format.sample_bytes() * channels as usize;
    let size = match d.data() {
        Some(slice) if stride > 0 => {
            let max = slice.len() / stride;
            let frames = if requested == 0 { max } else { requested.min(max) };
            format.fill_silence(&mut slice[..frames * stride]);
            frames * stride
        }
        _ => 0,
    };
    set_chunk(d, stride, size);
}

/// Says what a playback buffer holds: `size` bytes from its start.
fn set_chunk(d: &mut pw::spa::buffer::Data, stride: usize, size: usize) {
    let chunk = d.chunk_mut();
    *chunk.offset_mut() = 0;
    *chunk.stride_mut() = stride as i32;
    *chunk.size_mut() = size as u32;
}

/// One cycle's work on the guest's engine; returns the frames moved.
fn cycle(
    buffer: &mut pw::buffer::Buffer,
    time: Option<&pw::stream::Time>,
    engine: &mut DmaEngine,
    kind: StreamKind,
    unreported_cycles: &AtomicU32,
) -> Option<usize> {
    let requested = buffer.requested() as usize;
    let stride = engine.frame_bytes();
    let rate = engine.geom.rate;
    let mut delay = time.map(|t| delay_frames(t, rate, stride)).unwrap_or(0);
    let d = buffer.datas_mut().first_mut()?;
    match kind {
        StreamKind::Playback => {
            let frames = {
                let slice = d.data()?;
                let max = slice.len() / stride.max(1);
                let frames = if requested == 0 { max } else { requested.min(max) };
                engine.playback_cycle(&mut slice[..frames * stride], delay);
                frames
            };
            set_chunk(d, stride, frames * stride);
            Some(frames)
        }
        StreamKind::Capture => {
            let (offset, size) = {
                let c = d.chunk();
                (c.offset() as usize, c.size() as usize)
            };
            let slice = d.data()?;
            let end = offset.saturating_add(size).min(slice.len());
            let start = offset.min(end);
            let whole = (end - start) / stride.max(1) * stride;
            // A cycle PipeWire does not report is one cycle's worth of frames.
            let cycles = unreported_cycles.load(Ordering::Relaxed);
            delay = delay.saturating_add(cycles.saturating_mul((whole / stride.max(1)) as u32));
            engine.capture_cycle(&slice[start..start + whole], delay);
            Some(whole / stride.max(1))
        }
    }
}
