//! Hands a stream's DMA engine to a host's real-time cycle and takes it
//! back, lock-free: the cycle never blocks, and once `take` returns the
//! cycle can no longer reach the engine (nor, through it, the guest's
//! pages), on every path, without a timeout.
//!
//! A single-slot hazard pointer. The cycle marks itself busy, then loads
//! the pointer; `take` swaps the pointer out, then waits until the cycle
//! is not busy. Both sides use sequentially consistent operations, so
//! either the cycle saw the pointer and `take` sees it busy (and waits one
//! callback at most), or the cycle marked itself busy after the swap and
//! loads null. Two cycles may call at once while a stream changes hands
//! (the host's cycle and the fallback clock, `fallback`): the one that
//! finds the slot busy skips that turn.

use crate::dma::histogram::now_ns;
use crate::dma::DmaEngine;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};

#[derive(Default)]
pub struct EngineSlot {
    engine: AtomicPtr<DmaEngine>,
    busy: AtomicBool,
    /// When the host last ran a cycle for this slot (`now_ns`), engine or
    /// not: the fallback clock reads it without entering the slot, so it
    /// never keeps the host's cycle out while the host runs.
    host_ns: AtomicU64,
    /// Engines installed so far: tells one OPEN's engine from the next.
    installs: AtomicU64,
}

impl EngineSlot {
    /// Real-time side, at every host cycle: the host runs this stream.
    pub fn host_cycle(&self) {
        self.host_ns.store(now_ns(), Relaxed);
    }

    /// Nanoseconds since the host last ran a cycle for this slot (`now`
    /// from `now_ns`); `now` itself if it never did.
    pub fn since_host_cycle(&self, now: u64) -> u64 {
        now.saturating_sub(self.host_ns.load(Relaxed))
    }

    /// Real-time side: runs `f` on the engine when one is installed and no
    /// other cycle is in it. No allocation, no lock, no waiting.
    pub fn with<R>(&self, f: impl FnOnce(&mut DmaEngine) -> R) -> Option<R> {
        if self.busy.swap(true, SeqCst) {
            return None;
        }
        let p = self.engine.load(SeqCst);
        // SAFETY: a non-null pointer came from `install`'s Box and is freed
        // only by `take`, which waits while we are busy; the swap above let
        // only one cycle in, so the `&mut` is unique.
        let r = (!p.is_null()).then(|| f(unsafe { &mut *p }));
        self.busy.store(false, SeqCst);
        r
    }

    /// Installs `engine` (OPEN), replacing (and dropping) any previous one.
    pub fn install(&self, engine: DmaEngine) {
        drop(self.take());
        self.installs.fetch_add(1, SeqCst);
        self.engine.store(Box::into_raw(Box::new(engine)), SeqCst);
    }

    /// Takes the engine back (CLOSE). When this returns, the cycle no
    /// longer uses it; it waits at most for one callback in progress.
    pub fn take(&self) -> Option<Box<DmaEngine>> {
        let p = self.engine.swap(ptr::null_mut(), SeqCst);
        while self.busy.load(SeqCst) {
            std::thread::yield_now();
        }
        // SAFETY: `p` came from `Box::into_raw` in `install` and, swapped
        // out, is owned by us alone now that the cycle is not busy.
        (!p.is_null()).then(|| unsafe { Box::from_raw(p) })
    }

    /// How many engines have been installed: the one in the slot now is
    /// the last of them.
    pub fn installs(&self) -> u64 {
        self.installs.load(SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.engine.load(SeqCst).is_null()
    }
}

impl Drop for EngineSlot {
    fn drop(&mut self) {
        drop(self.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::testing::engine;
    use crate::dma::DmaShared;
    use std::sync::Arc;

    /// A cycle running flat out on another thread while engines are
    /// installed and taken: after each `take`, the taken engine's counters
    /// never move again.
    #[test]
    fn after_take_the_cycle_never_touches_the_engine() {
        let slot = Arc::new(EngineSlot::default());
        let stop = Arc::new(AtomicBool::new(false));
        let cycles = Arc::new(AtomicU64::new(0));
        let rt = {
            let (slot, stop, cycles) = (slot.clone(), stop.clone(), cycles.clone());
            std::thread::spawn(move || {
                let mut out = [0u8; 256];
                while !stop.load(Relaxed) {
                    slot.with(|e| {
                        e.shared.running.store(true, Relaxed);
                        e.playback_cycle(&mut out, 0);
                    });
                    cycles.fetch_add(1, Relaxed);
                }
            })
        };
        for _ in 0..200 {
            let shared = Arc::new(DmaShared::default());
            slot.install(engine(shared.clone()));
            let seen = cycles.load(Relaxed);
            while cycles.load(Relaxed) < seen + 3 {
                std::hint::spin_loop();
            }
            assert!(slot.take().is_some());
            let frozen = shared.cycles.load(Relaxed);
            let seen = cycles.load(Relaxed);
            while cycles.load(Relaxed) < seen + 3 {
                std::hint::spin_loop();
            }
            assert_eq!(shared.cycles.load(Relaxed), frozen, "the cycle ran a taken engine");
        }
        stop.store(true, Relaxed);
        rt.join().unwrap();
        assert!(slot.is_empty());
    }
}
