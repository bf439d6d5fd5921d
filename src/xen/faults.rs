//! Fault injection at the hypervisor seam: a `Transport` whose xenstore,
//! grant and event-channel calls fail (or hang, then fail: a time-out) at
//! a chosen call, so tests drive the backend's own handshake, OPEN and
//! teardown code through every failure a real Xen can give it (a guest
//! that revoked a grant, a port already closed, xenstored gone away).

#![forbid(unsafe_code)]

use super::{
    DomId, EventChannel, EventChannels, GrantMapper, HypervisorError, SharedPages, StoreError, Transport,
    XenStore,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The calls a fault can be put on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    StoreRead,
    StoreWrite,
    StoreDirectory,
    StoreWatch,
    GrantMap,
    EvtchnBind,
}

const CALLS: usize = 6;

/// What the chosen call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails at once, not by the guest's doing: xenstored or this side
    /// could not do it now (`StoreError::Unavailable`,
    /// `HypervisorError::Unavailable`).
    Fail,
    /// Refused at once: a revoked grant, a closed port, a key we may not
    /// read (`StoreError::Refused`, `HypervisorError::Refused`).
    Refuse,
    /// Blocks this long, then fails as `Fail` does (a hypervisor or
    /// xenstored that does not answer).
    TimeOut(Duration),
}

/// An injected fault, before it takes the type of the call it is on.
struct Injected {
    refused: bool,
    why: String,
}

/// Which call fails next; calls are counted per kind from `arm`.
#[derive(Default)]
pub struct FaultPlan {
    armed: Mutex<Option<(Call, u64, Fault)>>,
    counts: [AtomicU64; CALLS],
    fired: AtomicU64,
}

impl FaultPlan {
    /// The `nth` call of kind `call` from now (1: the next) gets `fault`;
    /// every other call goes through.
    pub fn arm(&self, call: Call, nth: u64, fault: Fault) {
        let mut a = self.armed.lock().unwrap_or_else(|e| e.into_inner());
        self.counts[call as usize].store(0, Ordering::SeqCst);
        *a = Some((call, nth.max(1), fault));
    }

    /// Calls of kind `call` since it was last armed.
    pub fn count(&self, call: Call) -> u64 {
        self.counts[call as usize].load(Ordering::SeqCst)
    }

    /// How many faults have been injected so far.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::SeqCst)
    }

    fn check(&self, call: Call, what: &str) -> Result<(), Injected> {
        let n = self.counts[call as usize].fetch_add(1, Ordering::SeqCst) + 1;
        let fault = {
            let mut a = self.armed.lock().unwrap_or_else(|e| e.into_inner());
            match *a {
                Some((c, nth, f)) if c == call && nth == n => {
                    *a = None;
                    f
                }
                _ => return Ok(()),
            }
        };
        self.fired.fetch_add(1, Ordering::SeqCst);
        let why = |how: String| format!("injected fault: {call:?} #{n} ({what}) {how}");
        Err(match fault {
            Fault::Fail => Injected { refused: false, why: why("fails".into()) },
            Fault::Refuse => Injected { refused: true, why: why("is refused".into()) },
            Fault::TimeOut(d) => {
                std::thread::sleep(d);
                Injected { refused: false, why: why(format!("timed out after {d:?}")) }
            }
        })
    }
}

/// `t` with every call going through `plan` first.
pub fn inject(t: Transport, plan: Arc<FaultPlan>) -> Transport {
    Transport {
        store: Arc::new(Store(t.store, plan.clone())),
        grants: Arc::new(Grants(t.grants, plan.clone())),
        evtchn: Arc::new(Channels(t.evtchn, plan)),
        watch_events: t.watch_events,
        own_domid: t.own_domid,
    }
}

struct Store(Arc<dyn XenStore>, Arc<FaultPlan>);
struct Grants(Arc<dyn GrantMapper>, Arc<FaultPlan>);
struct Channels(Arc<dyn EventChannels>, Arc<FaultPlan>);

/// An injected fault on a xenstore call, as the store reports one.
fn store_fault(op: &'static str, path: &str, f: Injected) -> StoreError {
    let path = path.to_string();
    match f.refused {
        true => StoreError::Refused { op, path, errno: format!("EACCES ({})", f.why) },
        false => StoreError::Unavailable { op, path, why: f.why },
    }
}

/// An injected fault on a grant map or bind, as the hypervisor reports one.
fn hypervisor_fault(call: &'static str, target: String, f: Injected) -> HypervisorError {
    match f.refused {
        true => HypervisorError::Refused { call, target, why: f.why },
        false => HypervisorError::Unavailable { call, target, why: f.why },
    }
}

impl XenStore for Store {
    fn read(&self, path: &str) -> Result<Option<String>, StoreError> {
        self.1.check(Call::StoreRead, path).map_err(|e| store_fault("read", path, e))?;
        self.0.read(path)
    }
    fn write(&self, path: &str, value: &str) -> Result<(), StoreError> {
        self.1.check(Call::StoreWrite, path).map_err(|e| store_fault("write", path, e))?;
        self.0.write(path, value)
    }
    fn directory(&self, path: &str) -> Result<Vec<String>, StoreError> {
        self.1.check(Call::StoreDirectory, path).map_err(|e| store_fault("directory", path, e))?;
        self.0.directory(path)
    }
    fn rm(&self, path: &str) -> Result<(), StoreError> {
        self.0.rm(path)
    }
    fn watch(&self, path: &str, token: &str) -> Result<(), StoreError> {
        self.1.check(Call::StoreWatch, path).map_err(|e| store_fault("watch", path, e))?;
        self.0.watch(path, token)
    }
    fn unwatch(&self, path: &str, token: &str) -> Result<(), StoreError> {
        self.0.unwatch(path, token)
    }
}

impl GrantMapper for Grants {
    fn map(&self, domid: DomId, grefs: &[u32]) -> Result<SharedPages, HypervisorError> {
        let target = format!("domain {domid}, {} pages", grefs.len());
        self.1
            .check(Call::GrantMap, &target)
            .map_err(|f| hypervisor_fault(HypervisorError::GRANT_MAP, target, f))?;
        self.0.map(domid, grefs)
    }
}

impl EventChannels for Channels {
    fn bind(&self, domid: DomId, remote_port: u32) -> Result<Arc<dyn EventChannel>, HypervisorError> {
        let target = format!("domain {domid}, port {remote_port}");
        self.1
            .check(Call::EvtchnBind, &target)
            .map_err(|f| hypervisor_fault(HypervisorError::EVTCHN_BIND, target, f))?;
        self.0.bind(domid, remote_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_nth_call_of_its_kind_fails_and_only_once() {
        let plan = FaultPlan::default();
        plan.arm(Call::GrantMap, 2, Fault::Fail);
        assert!(plan.check(Call::EvtchnBind, "x").is_ok());
        assert!(plan.check(Call::GrantMap, "x").is_ok());
        assert!(plan.check(Call::GrantMap, "x").is_err());
        assert!(plan.check(Call::GrantMap, "x").is_ok());
        assert_eq!((plan.fired(), plan.count(Call::GrantMap)), (1, 3));
        plan.arm(Call::StoreRead, 1, Fault::TimeOut(Duration::from_millis(20)));
        let t = std::time::Instant::now();
        assert!(plan.check(Call::StoreRead, "x").is_err());
        assert!(t.elapsed() >= Duration::from_millis(20));
    }
}
