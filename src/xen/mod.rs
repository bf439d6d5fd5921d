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

/// A grant map or event-channel bind that failed, told apart by whose
/// doing it is: what a guest gave that the hypervisor refuses is final for
/// that guest (its device is closed with the reason, its OPEN refused with
/// -EINVAL); what this side could not do now is tried again (its
/// connection) or answered as a host fault (-EIO at OPEN).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HypervisorError {
    /// The hypervisor refused what the guest gave: a grant reference it did
    /// not make (or not to us), a port not left unbound for us, a domain
    /// that is gone.
    #[error("{call} ({target}): refused: {why}")]
    Refused { call: &'static str, target: String, why: String },
    /// This side could not do it now: out of mappings, file descriptors or
    /// memory, the device missing, no answer in time.
    #[error("{call} ({target}): {why}")]
    Unavailable { call: &'static str, target: String, why: String },
}

impl HypervisorError {
    pub const GRANT_MAP: &'static str = "grant map";
    pub const EVTCHN_BIND: &'static str = "event-channel bind";

    /// The guest's doing, from the errno the kernel gave: resource
    /// shortages and missing devices are ours, everything else (EINVAL
    /// for a bad grant or port, ESRCH for a gone domain, EPERM) the guest's.
    pub fn from_os(call: &'static str, target: String, e: &std::io::Error) -> HypervisorError {
        let ours = matches!(
            e.raw_os_error(),
            Some(
                libc::ENOMEM
                    | libc::EMFILE
                    | libc::ENFILE
                    | libc::EAGAIN
                    | libc::ENOSPC
                    | libc::EBUSY
                    | libc::EINTR
                    | libc::ENODEV
                    | libc::ENXIO
                    | libc::ENOENT
            )
        );
        let why = e.to_string();
        if ours {
            HypervisorError::Unavailable { call, target, why }
        } else {
            HypervisorError::Refused { call, target, why }
        }
    }

    /// The hypervisor refused `call` on `target` (the guest's doing).
    pub fn refused(call: &'static str, target: impl Into<String>, why: impl Into<String>) -> HypervisorError {
        HypervisorError::Refused { call, target: target.into(), why: why.into() }
    }

    pub fn is_refused(&self) -> bool {
        matches!(self, HypervisorError::Refused { .. })
    }
}

/// Whether `e` (anywhere in its chain) is a failure of this side or of
/// xenstore that trying again may cure, rather than the guest's doing.
pub fn worth_retrying(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref(), Some(StoreError::Unavailable { .. }))
            || matches!(c.downcast_ref(), Some(HypervisorError::Unavailable { .. }))
    })
}

pub trait GrantMapper: Send + Sync {
    /// Maps the pages `grefs` granted by `domid`, contiguously and writable.
    /// The mapping is released when the returned value is dropped.
    fn map(&self, domid: DomId, grefs: &[u32]) -> Result<SharedPages, HypervisorError>;
}

pub trait EventChannels: Send + Sync {
    /// Binds the guest's unbound port `remote_port` to a local channel.
    fn bind(&self, domid: DomId, remote_port: u32) -> Result<Arc<dyn EventChannel>, HypervisorError>;
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
    fn consume(&self) -> bool;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortages_of_ours_are_retried_and_what_the_guest_gave_is_refused() {
        let of = |errno| {
            HypervisorError::from_os(
                "grant map",
                "1 page(s)".into(),
                &std::io::Error::from_raw_os_error(errno),
            )
        };
        for ours in [libc::ENOMEM, libc::EMFILE, libc::EAGAIN, libc::ENOSPC] {
            let e = of(ours);
            assert!(
                !e.is_refused() && worth_retrying(&anyhow::Error::new(e.clone()).context("stream 0/0")),
                "{e}"
            );
        }
        for guests in [libc::EINVAL, libc::ESRCH, libc::EPERM, libc::EFAULT] {
            let e = of(guests);
            assert!(e.is_refused() && !worth_retrying(&anyhow::Error::new(e.clone())), "{e}");
        }
        let refused = StoreError::Refused { op: "read", path: "/x".into(), errno: "EACCES".into() };
        assert!(!worth_retrying(&anyhow::Error::new(refused)));
        let unanswered = StoreError::Unavailable { op: "read", path: "/x".into(), why: "timed out".into() };
        assert!(worth_retrying(&anyhow::Error::new(unanswered)));
    }
}
