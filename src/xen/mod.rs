//! The three hypervisor primitives the backend needs, each behind one trait:
//! xenstore, grant mapping and event channels. `linux` drives a real Xen
//! through /dev/xen/*; `loopback` provides the same primitives between two
//! processes on one host for tests and demos. The backend only sees the traits.

pub mod faults;
pub mod linux;
pub mod loopback;
pub mod memory;
pub mod shared;

use std::os::fd::RawFd;
use std::sync::{mpsc, Arc};

pub use shared::SharedPages;

pub type DomId = u32;

/// A watch fired: `path` changed (or is at/below the watched path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
}

/// A xenstore call that failed. A node that does not exist is no failure
/// (`Ok(None)`, an empty listing): callers tell "absent" from "could not
/// ask" by type, never by the text of an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// xenstored refused the call (its errno name: EACCES, EINVAL, E2BIG...).
    #[error("xenstore {op} {path}: {errno}")]
    Refused { op: &'static str, path: String, errno: String },
    /// No answer in time, or the way to xenstored is broken.
    #[error("xenstore {op} {path}: {why}")]
    Unavailable { op: &'static str, path: String, why: String },
}

pub trait XenStore: Send + Sync {
    /// `Ok(None)` when the node does not exist.
    fn read(&self, path: &str) -> Result<Option<String>, StoreError>;
    fn write(&self, path: &str, value: &str) -> Result<(), StoreError>;
    /// Names of the children of `path`; empty when it does not exist.
    fn directory(&self, path: &str) -> Result<Vec<String>, StoreError>;
    /// The numeric children of `path` (domain ids, device ids); others
    /// are skipped, and a path that cannot be listed has none.
    fn child_ids(&self, path: &str) -> Vec<u32> {
        self.directory(path).unwrap_or_default().iter().filter_map(|s| s.parse().ok()).collect()
    }
    /// Removes `path` and everything below; one that does not exist is gone.
    fn rm(&self, path: &str) -> Result<(), StoreError>;
    /// Fires once right away and then on every change at or below `path`.
    fn watch(&self, path: &str, token: &str) -> Result<(), StoreError>;
    fn unwatch(&self, path: &str, token: &str) -> Result<(), StoreError>;
}

pub trait GrantMapper: Send + Sync {
    /// Maps the pages `grefs` granted by `domid`, contiguously and writable.
    /// The mapping is released when the returned value is dropped.
    fn map(&self, domid: DomId, grefs: &[u32]) -> anyhow::Result<SharedPages>;
}

pub trait EventChannels: Send + Sync {
    /// Binds the guest's unbound port `remote_port` to a local channel.
    fn bind(&self, domid: DomId, remote_port: u32) -> anyhow::Result<Arc<dyn EventChannel>>;
}

/// One bound interdomain event channel.
pub trait EventChannel: Send + Sync {
    /// Raises the guest's interrupt. Real-time safe: one non-blocking system
    /// call, no allocation; a failure is only counted by the caller.
    fn notify(&self) -> bool;
    /// Readable when the guest has notified us.
    fn fd(&self) -> RawFd;
    /// Clears a pending notification and re-arms the channel. Returns whether
    /// one was pending.
    fn consume(&self) -> anyhow::Result<bool>;
}

/// Everything the backend needs from the hypervisor, bundled.
pub struct Transport {
    pub store: Arc<dyn XenStore>,
    pub grants: Arc<dyn GrantMapper>,
    pub evtchn: Arc<dyn EventChannels>,
    /// Watch events for this process's watches, in order.
    pub watch_events: mpsc::Receiver<WatchEvent>,
    /// The domain this backend runs in (0 for dom0).
    pub own_domid: DomId,
}
