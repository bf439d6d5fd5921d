//! xen-vsnd: the Xen PV sound (vsnd) backend that turns every guest PCM
//! stream into a PipeWire node driven by the graph clock.
//!
//! - `sndif`: the wire format and card configuration (pure)
//! - `xen`: xenstore, grants and event channels behind traits (`linux`, `loopback`)
//! - `backend`: one state machine per guest device, one request thread per stream
//! - `dma`: the guest's DMA engine, run from the host's real-time cycle
//! - `host`: host audio backends (PipeWire)
//!
//! The simulated guest that tests and demos run is its own crate
//! (`xen-vsnd-sim`, src/sim): the daemon never needs it.

pub mod backend;
pub mod control;
pub mod dma;
pub mod fault;
pub mod fuzzing;
pub mod host;
pub mod ipc;
pub mod logging;
pub mod policy;
pub mod reattach;
pub use xen_sndif as sndif;
pub mod vouch;
pub mod xen;
