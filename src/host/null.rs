//! A host with no audio server: playback goes nowhere, capture records
//! silence. Two clocks:
//! - `NullHost::clocked()`, for `serve --host null` (a dom0 with no sound
//!   that still serves guests as a card does): the fallback clock runs
//!   every open stream at its rate, from `fallback::GRACE` after its OPEN;
//! - `NullHost::manual()`, for in-process tests and fuzzing: nothing moves
//!   until the caller runs a cycle (`cycle`), so a run is the same every
//!   time, with no thread of its own.

#![forbid(unsafe_code)]

use super::fallback::{silent_cycle, FallbackClock, SCRATCH_BYTES};
use super::slot::EngineSlot;
use super::{HostBackend, HostNode, StreamSpec};
use crate::dma::DmaEngine;
use crate::sndif::{PcmFormat, StreamKind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

#[derive(Default)]
struct Nodes {
    next_id: AtomicU64,
    live: Mutex<Vec<(Weak<EngineSlot>, StreamKind)>>,
}

pub struct NullHost {
    nodes: Arc<Nodes>,
    clock: Option<Arc<FallbackClock>>,
    scratch: Mutex<Vec<u8>>,
}

impl NullHost {
    /// Streams run on their own clock, at their rate.
    pub fn clocked() -> std::io::Result<NullHost> {
        let clock = FallbackClock::start("null-host-clock")?;
        Ok(NullHost { clock: Some(Arc::new(clock)), ..NullHost::manual() })
    }

    /// Streams move only when `cycle` runs.
    pub fn manual() -> NullHost {
        NullHost { nodes: Arc::default(), clock: None, scratch: Mutex::new(vec![0; SCRATCH_BYTES]) }
    }

    /// Runs one host cycle of every open stream: each moves by its own
    /// cycle size (`Geometry::cycle_frames`), as a graph would, raising the
    /// period interrupts and position events that fall due. Playback frames
    /// are read and dropped; capture is given silence.
    pub fn cycle(&self) {
        let Ok(mut scratch) = self.scratch.lock() else { return };
        let slots: Vec<_> = match self.nodes.live.lock() {
            Ok(mut live) => {
                live.retain(|(w, _)| w.strong_count() > 0);
                live.iter().filter_map(|(w, k)| Some((w.upgrade()?, *k))).collect()
            }
            Err(_) => return,
        };
        for (slot, kind) in slots {
            slot.host_cycle();
            slot.with(|engine| silent_cycle(engine, kind, &mut scratch));
        }
    }
}

struct NullNode {
    id: u64,
    slot: Arc<EngineSlot>,
    clock: Option<Arc<FallbackClock>>,
}

impl HostNode for NullNode {
    fn start(&mut self, engine: DmaEngine) -> anyhow::Result<()> {
        self.slot.install(engine);
        Ok(())
    }
    fn stop(&mut self) {
        drop(self.slot.take());
    }
}

impl Drop for NullNode {
    fn drop(&mut self) {
        if let Some(c) = &self.clock {
            c.remove(self.id);
        }
        drop(self.slot.take());
    }
}

impl HostBackend for NullHost {
    fn supports(&self, _format: PcmFormat) -> bool {
        true
    }
    fn attach(&self, spec: StreamSpec) -> anyhow::Result<Box<dyn HostNode>> {
        let id = self.nodes.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(EngineSlot::default());
        self.nodes
            .live
            .lock()
            .map_err(|_| anyhow::anyhow!("null host: poisoned"))?
            .push((Arc::downgrade(&slot), spec.kind));
        if let Some(c) = &self.clock {
            c.add(id, slot.clone(), spec.kind);
        }
        Ok(Box::new(NullNode { id, slot, clock: self.clock.clone() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::testing::engine;
    use crate::dma::DmaShared;
    use crate::host::Shape;
    use std::sync::atomic::Ordering::Relaxed;

    fn spec(kind: StreamKind) -> StreamSpec {
        StreamSpec {
            kind,
            node_name: "xen-vsnd.vm.0.0.playback".into(),
            description: "vm".into(),
            domain: "vm".into(),
            props: Vec::new(),
            initial: Shape { format: PcmFormat::S16Le, rate: 48000, channels: 2 },
        }
    }

    #[test]
    fn a_manual_cycle_moves_each_open_stream_by_its_cycle_and_no_more() {
        let host = NullHost::manual();
        let mut node = host.attach(spec(StreamKind::Playback)).unwrap();
        let shared = Arc::new(DmaShared::default());
        let e = engine(shared.clone());
        let (cycle, stride) = (u64::from(e.geom.cycle_frames), e.frame_bytes() as u64);
        shared.running.store(true, Relaxed);
        host.cycle();
        assert_eq!(shared.position.load(Relaxed), 0, "moved before it was started");
        node.start(e).unwrap();
        host.cycle();
        host.cycle();
        assert_eq!(shared.position.load(Relaxed), 2 * cycle * stride);
        node.stop();
        host.cycle();
        assert_eq!(shared.position.load(Relaxed), 2 * cycle * stride, "moved after stop");
        drop(node);
        assert!(host.nodes.live.lock().unwrap().iter().all(|(w, _)| w.strong_count() == 0));
    }
}
