//! What may happen to a stream's samples, applied by the engine in the
//! host's cycle (so every host does the same, and a change takes effect at
//! the next cycle): dom0's policy (the direction allowed at all, a cap on
//! the guest's playback volume) and the guest's own volume and mute.
//!
//! The guest's volume is xen-vsnd's gain on the guest's samples, never the
//! host node's volume: that one stays the dom0 user's.
//!
//! Written by the request thread (guest volume) and the control thread
//! (policy); read by the real-time cycle; atomics only.

#![forbid(unsafe_code)]

use crate::host::convert::{from_f32, to_f32};
use crate::sndif::PcmFormat;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};

/// Channels with a gain of their own; a stream has at most this many
/// (`sndif::config::limits::MAX_CHANNELS`).
pub const MAX_CHANNELS: usize = 32;

const UNITY: u32 = 0x3f80_0000; // 1.0f32

#[derive(Debug)]
pub struct StreamControls {
    allowed: AtomicBool,
    cap: AtomicU32,
    gains: [AtomicU32; MAX_CHANNELS],
}

impl StreamControls {
    pub fn new(allowed: bool, cap: f32) -> StreamControls {
        let c = StreamControls {
            allowed: AtomicBool::new(allowed),
            cap: AtomicU32::new(UNITY),
            gains: std::array::from_fn(|_| AtomicU32::new(UNITY)),
        };
        c.set_policy(allowed, cap);
        c
    }

    /// dom0's word: whether samples pass at all, and the cap (0–1) on the
    /// guest's gain.
    pub fn set_policy(&self, allowed: bool, cap: f32) {
        self.cap.store(cap.clamp(0.0, 1.0).to_bits(), Relaxed);
        self.allowed.store(allowed, Relaxed);
    }

    pub fn allowed(&self) -> bool {
        self.allowed.load(Relaxed)
    }

    pub fn cap(&self) -> f32 {
        f32::from_bits(self.cap.load(Relaxed))
    }

    /// The guest's linear gains per channel (mute is 0); missing ones are 1.
    pub fn set_guest_gains(&self, gains: &[f32]) {
        for (i, slot) in self.gains.iter().enumerate() {
            let g = gains.get(i).copied().unwrap_or(1.0);
            slot.store(if g.is_finite() { g.clamp(0.0, 1.0) } else { 1.0 }.to_bits(), Relaxed);
        }
    }

    pub fn guest_gain(&self, c: usize) -> f32 {
        self.gains.get(c).map_or(1.0, |g| f32::from_bits(g.load(Relaxed)))
    }

    /// The gain the engine applies to channel `c`.
    fn gain(&self, c: usize) -> f32 {
        self.guest_gain(c).min(self.cap())
    }

    /// Whether every channel of `channels` passes unchanged.
    pub fn is_unity(&self, channels: usize) -> bool {
        self.cap.load(Relaxed) == UNITY && self.gains.iter().take(channels).all(|g| g.load(Relaxed) == UNITY)
    }

    /// Applies the gains to whole frames of `format` in `buf`, in place.
    /// Nothing to do (and nothing done) at unity, the usual case.
    pub fn apply(&self, format: PcmFormat, channels: usize, buf: &mut [u8]) {
        if self.is_unity(channels) {
            return;
        }
        let sample = format.sample_bytes();
        for frame in buf.chunks_exact_mut(sample * channels.max(1)) {
            for (c, s) in frame.chunks_exact_mut(sample).enumerate() {
                from_f32(format, to_f32(format, s) * self.gain(c), s);
            }
        }
    }
}

impl Default for StreamControls {
    /// Allowed, no cap, the guest's gains at 1.
    fn default() -> StreamControls {
        StreamControls::new(true, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s16(v: &[i16]) -> Vec<u8> {
        v.iter().flat_map(|s| s.to_le_bytes()).collect()
    }

    #[test]
    fn guest_gain_and_cap_scale_channels() {
        let c = StreamControls::default();
        let mut buf = s16(&[1000, 1000, -2000, -2000]);
        c.apply(PcmFormat::S16Le, 2, &mut buf);
        assert_eq!(buf, s16(&[1000, 1000, -2000, -2000]), "unity leaves samples alone");
        c.set_guest_gains(&[0.5, 1.0]);
        c.apply(PcmFormat::S16Le, 2, &mut buf);
        assert_eq!(buf, s16(&[500, 1000, -1000, -2000]));
        // The cap bounds the guest's gain, it does not multiply it.
        c.set_policy(true, 0.25);
        let mut buf = s16(&[1000, 1000]);
        c.apply(PcmFormat::S16Le, 2, &mut buf);
        assert_eq!(buf, s16(&[250, 250]));
    }

    #[test]
    fn guest_values_are_bounded() {
        let c = StreamControls::default();
        c.set_guest_gains(&[f32::NAN, 7.0, -1.0]);
        assert_eq!(
            (c.guest_gain(0), c.guest_gain(1), c.guest_gain(2), c.guest_gain(40)),
            (1.0, 1.0, 0.0, 1.0)
        );
        c.set_policy(false, 9.0);
        assert!(!c.allowed());
        assert_eq!(c.cap(), 1.0);
    }
}
