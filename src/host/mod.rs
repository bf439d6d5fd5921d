//! Host audio backends: where a guest stream's frames go to / come from.
//! One trait; PipeWire is the default implementation, JACK and plain ALSA
//! the others (each a cargo feature), and the null host, always there.

#[cfg(feature = "alsa")]
pub mod alsa;
pub mod convert;
pub mod fallback;
#[cfg(feature = "jack")]
pub mod jack;
pub mod null;
#[cfg(feature = "pipewire")]
pub mod pipewire;
pub mod punctuality;
pub mod realtime;
pub mod slot;

use crate::dma::DmaEngine;
use crate::sndif::{PcmFormat, StreamKind};

/// Everything a host backend needs to present one guest stream.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub kind: StreamKind,
    /// Stable machine name, e.g. `xen-vsnd.work-vm.0.0.playback`.
    pub node_name: String,
    /// Human text, e.g. `work-vm: Xen PV Sound dev0 (playback)`.
    pub description: String,
    /// The guest's domain name (shown as the application).
    pub domain: String,
    /// Extra properties for session-manager rules (`xen.domid`, ...).
    pub props: Vec<(String, String)>,
    /// The format a node shows before the guest's first OPEN: the stream's
    /// most likely one (its configuration's first format, 48 kHz when
    /// offered, all its channels). Each OPEN brings its own.
    pub initial: Shape,
}

/// A stream's sample format, rate and channel count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub format: PcmFormat,
    pub rate: u32,
    pub channels: u32,
}

impl Shape {
    pub fn of(g: &crate::dma::Geometry) -> Shape {
        Shape { format: g.format, rate: g.rate, channels: g.channels }
    }
}

/// One guest stream as the host presents it, for the life of the stream's
/// connection (frontend Connected until it goes away): a PipeWire node, a
/// JACK client. Links users make to it survive the guest's OPENs and
/// CLOSEs. Dropping it removes it.
pub trait HostNode: Send {
    /// OPEN: the host's cycle starts driving `engine`, in the engine's
    /// format (the node renegotiates in place when it differs from the
    /// last). A stopped engine plays silence, as a card does.
    fn start(&mut self, engine: DmaEngine) -> anyhow::Result<()>;
    /// CLOSE: the cycle lets go of the engine. Once this returns it never
    /// touches it, nor the guest's buffer, again; it waits at most for one
    /// callback in progress, never for the host.
    fn stop(&mut self);
}

pub trait HostBackend: Send + Sync {
    /// Which sample formats this host can carry.
    fn supports(&self, format: PcmFormat) -> bool;
    /// Which sample rates this host can carry (a host that resamples takes
    /// them all).
    fn supports_rate(&self, _rate: u32) -> bool {
        true
    }
    /// Presents a connected guest stream; no engine runs until `start`.
    fn attach(&self, spec: StreamSpec) -> anyhow::Result<Box<dyn HostNode>>;
    /// Sets (adds or replaces) properties of the node named `node_name`,
    /// in place and for the node's later incarnations (policy reloads).
    /// Hosts without node properties ignore it.
    fn update_properties(&self, _node_name: &str, _props: Vec<(String, String)>) {}
    /// The host's object ids of its guest nodes, by node name (`status`).
    fn node_ids(&self) -> std::collections::BTreeMap<String, u32> {
        Default::default()
    }
}

/// Channel position names for `n` channels: the usual layouts up to 8
/// (PipeWire's and PulseAudio's), `AUX<i>` beyond.
pub fn channel_names(n: u32) -> Vec<String> {
    let layout: &[&str] = match n {
        1 => &["MONO"],
        2 => &["FL", "FR"],
        3 => &["FL", "FR", "LFE"],
        4 => &["FL", "FR", "RL", "RR"],
        6 => &["FL", "FR", "FC", "LFE", "RL", "RR"],
        8 => &["FL", "FR", "FC", "LFE", "RL", "RR", "SL", "SR"],
        _ => &[],
    };
    (0..n as usize).map(|i| layout.get(i).map_or_else(|| format!("AUX{i}"), |s| s.to_string())).collect()
}

/// Frames per host cycle for a guest period (PipeWire's `node.latency`,
/// the ALSA host's period): the largest power of two that is at most half
/// the period, so cycles divide the period and every period interrupt
/// falls on a cycle boundary; but never below `floor` (dom0's limit, see
/// `quantum_floor`), so one guest's small period (or a period_sz of 0)
/// cannot pull the whole graph's quantum down. A period under twice the
/// floor then gets its interrupts on cycle boundaries: up to one cycle
/// late, never early.
pub fn cycle_frames(period_frames: u32, floor: u32) -> u32 {
    let half = (period_frames / 2).clamp(16, 8192);
    (1u32 << (31 - half.leading_zeros())).max(floor.clamp(16, 8192).next_power_of_two())
}

/// The smallest cycle, in frames at `rate`, for a limit of `min_quantum`
/// frames at 48 kHz (the same time at every rate).
pub fn quantum_floor(rate: u32, min_quantum: u32) -> u32 {
    (u64::from(min_quantum) * u64::from(rate)).div_ceil(48000).min(8192) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_divide_the_period() {
        assert_eq!(cycle_frames(1024, 16), 512);
        assert_eq!(cycle_frames(960, 16), 256);
        assert_eq!(cycle_frames(441, 16), 128);
        assert_eq!(cycle_frames(8, 16), 16);
        assert_eq!(cycle_frames(1 << 20, 16), 8192);
    }

    #[test]
    fn no_cycle_below_the_floor() {
        let floor = quantum_floor(48000, 256);
        assert_eq!(floor, 256);
        assert_eq!(cycle_frames(1024, floor), 512);
        assert_eq!(cycle_frames(128, floor), 256);
        // period_sz 0 (no period events) gets the floor, not 16 frames.
        assert_eq!(cycle_frames(0, floor), 256);
        // The same time at 44.1 kHz (235 frames): the next power of two.
        assert_eq!(cycle_frames(441, quantum_floor(44100, 256)), 256);
        assert_eq!(cycle_frames(128, quantum_floor(48000, 32)), 64);
    }

    #[test]
    fn channel_layouts() {
        assert_eq!(channel_names(2), ["FL", "FR"]);
        assert_eq!(channel_names(6)[3], "LFE");
        assert_eq!(channel_names(5), ["AUX0", "AUX1", "AUX2", "AUX3", "AUX4"]);
    }
}
