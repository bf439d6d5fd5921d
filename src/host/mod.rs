//! Host audio backends: where a guest stream's frames go to / come from.
//! One trait; PipeWire is the default implementation.

pub mod pipewire;
pub mod punctuality;
pub mod pw_graph;
pub mod realtime;

use crate::dma::DmaEngine;
use crate::sndif::StreamKind;

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
}

/// An opened host stream. Dropping it removes the node; once `drop`
/// returns, the engine's cycle is never called again.
pub trait HostStream: Send {
    fn set_active(&self, active: bool);
    /// Linear per-channel gains (mute is a gain of 0).
    fn set_volume(&self, gains: Vec<f32>);
}

pub trait HostBackend: Send + Sync {
    /// Which sample formats this host can carry.
    fn supports(&self, format: crate::sndif::PcmFormat) -> bool;
    fn open(&self, spec: StreamSpec, engine: DmaEngine) -> anyhow::Result<Box<dyn HostStream>>;
}
