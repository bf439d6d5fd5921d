//! Per-channel gains (the guest's volume and mute) for hosts that apply
//! them themselves (JACK, ALSA): set from the request thread, read by the
//! real-time loop, lock-free (an f32's bits in an atomic per channel).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ChannelGains(Arc<[AtomicU32]>);

impl ChannelGains {
    /// `channels` gains of 1.
    pub fn unity(channels: usize) -> ChannelGains {
        ChannelGains((0..channels).map(|_| AtomicU32::new(1f32.to_bits())).collect())
    }

    /// Sets the gains (linear; extra values are ignored, missing ones kept).
    pub fn set(&self, gains: &[f32]) {
        for (slot, g) in self.0.iter().zip(gains) {
            slot.store(g.to_bits(), Ordering::Relaxed);
        }
    }

    /// The gain of channel `c` (1 for a channel it does not have).
    pub fn get(&self, c: usize) -> f32 {
        self.0.get(c).map_or(1.0, |g| f32::from_bits(g.load(Ordering::Relaxed)))
    }

    pub fn channels(&self) -> usize {
        self.0.len()
    }

    /// Whether every gain is 1 (then there is nothing to apply).
    pub fn all_unity(&self) -> bool {
        self.0.iter().all(|g| g.load(Ordering::Relaxed) == 1f32.to_bits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_get() {
        let g = ChannelGains::unity(2);
        assert!(g.all_unity());
        g.set(&[0.5, 1.0, 7.0]);
        assert_eq!((g.get(0), g.get(1), g.get(2)), (0.5, 1.0, 1.0));
        assert!(!g.all_unity());
        assert_eq!(g.channels(), 2);
    }
}
