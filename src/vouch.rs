//! dom0's word on a guest's name, for backends in driver domains.
//!
//! A backend names a guest's nodes and applies the policy by the domain
//! name dom0 wrote (`/local/domain/<guest>/name`). libxl lets only dom0 and
//! the guest itself read that key, so a backend in a driver domain cannot.
//! The guest's own directories are no substitute (the guest writes them).
//! What a driver domain can read and the guest cannot write is the
//! device's backend directory, `/local/domain/<backend>/backend/vsnd/<guest>/<devid>`
//! (owned by the backend domain, created by dom0's toolstack): `xen-vsnd
//! vouch`, run in dom0, copies each guest's name into [`DOMAIN_NAME_KEY`]
//! there as soon as the toolstack creates the device, and again if the
//! guest is renamed.

#![forbid(unsafe_code)]

use crate::xen::{DomId, WatchEvent, XenStore};
use anyhow::Context;
use std::sync::mpsc::Receiver;

/// Key in a device's backend directory holding the frontend domain's name,
/// as dom0 knows it.
pub const DOMAIN_NAME_KEY: &str = "domain-name";

const TOKEN: &str = "vouch";

/// A vsnd device as its backend directory names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Device {
    backend: DomId,
    frontend: DomId,
    devid: u32,
}

impl Device {
    fn dir(&self) -> String {
        format!("/local/domain/{}/backend/vsnd/{}/{}", self.backend, self.frontend, self.devid)
    }
}

/// What a changed path means to the voucher.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// At or below a vsnd device's backend directory.
    Device(Device),
    /// A domain's name (written at creation and by `xl rename`).
    Name(DomId),
    Other,
}

fn classify(path: &str) -> Change {
    let Some(rest) = path.strip_prefix("/local/domain/") else { return Change::Other };
    let parts: Vec<&str> = rest.split('/').collect();
    let num = |s: &str| s.parse::<u32>().ok();
    match parts.as_slice() {
        [d, "name"] => num(d).map_or(Change::Other, Change::Name),
        [b, "backend", "vsnd", f, dev, ..] => match (num(b), num(f), num(dev)) {
            (Some(backend), Some(frontend), Some(devid)) => {
                Change::Device(Device { backend, frontend, devid })
            }
            _ => Change::Other,
        },
        _ => Change::Other,
    }
}

/// Vouches for names to every backend domain but `own` (a backend in
/// dom0 reads the names itself).
pub struct Voucher<'a> {
    store: &'a dyn XenStore,
    own: DomId,
}

impl<'a> Voucher<'a> {
    pub fn new(store: &'a dyn XenStore, own: DomId) -> Self {
        Voucher { store, own }
    }

    /// Every vsnd device of every backend domain but our own. Returns how
    /// many names were written.
    pub fn all(&self) -> usize {
        let mut written = 0;
        for b in self.store.child_ids("/local/domain") {
            for f in self.store.child_ids(&format!("/local/domain/{b}/backend/vsnd")) {
                for devid in self.store.child_ids(&format!("/local/domain/{b}/backend/vsnd/{f}")) {
                    written += usize::from(self.device(Device { backend: b, frontend: f, devid }));
                }
            }
        }
        written
    }

    /// Acts on one watch event; returns how many names were written.
    pub fn changed(&self, path: &str) -> usize {
        match classify(path) {
            Change::Device(d) => usize::from(self.device(d)),
            Change::Name(f) => {
                let mut written = 0;
                for b in self.store.child_ids("/local/domain") {
                    for devid in self.store.child_ids(&format!("/local/domain/{b}/backend/vsnd/{f}")) {
                        written += usize::from(self.device(Device { backend: b, frontend: f, devid }));
                    }
                }
                written
            }
            Change::Other if path == "/local/domain" => self.all(),
            Change::Other => 0,
        }
    }

    /// Writes the frontend's name into the device's backend directory when
    /// it is missing or stale. A directory the toolstack is removing (no
    /// `frontend-id`) is left alone: writing would create it again.
    fn device(&self, d: Device) -> bool {
        if d.backend == self.own {
            return false;
        }
        let dir = d.dir();
        let read = |p: &str| self.store.read(p).ok().flatten();
        let live = || {
            read(&format!("{dir}/frontend-id")).and_then(|v| v.trim().parse::<u32>().ok()) == Some(d.frontend)
        };
        if !live() {
            return false;
        }
        let Some(name) = read(&format!("/local/domain/{}/name", d.frontend)).filter(|n| !n.is_empty()) else {
            return false;
        };
        let key = format!("{dir}/{DOMAIN_NAME_KEY}");
        if read(&key).as_deref() == Some(name.as_str()) {
            return false;
        }
        if let Err(e) = self.store.write(&key, &name) {
            tracing::warn!(device = %dir, "writing the guest's name: {e:#}");
            return false;
        }
        // The toolstack may have removed the device between the check and
        // the write (which then made the directory again): undo it.
        if !live() {
            let _ = self.store.rm(&dir);
            return false;
        }
        tracing::info!(device = %dir, name = %name, "vouched for the guest's name");
        true
    }
}

/// Runs in dom0 until the store goes away: vouches for every existing
/// device, then for each new one and each rename.
pub fn run(store: &dyn XenStore, events: &Receiver<WatchEvent>, own: DomId) -> anyhow::Result<()> {
    let v = Voucher::new(store, own);
    // One watch over every domain's directory: device creation, removal
    // and renames all show up there. It fires once at registration, which
    // makes the first full pass.
    store.watch("/local/domain", TOKEN).context("watching /local/domain")?;
    tracing::info!("vouching for guests' names to vsnd backends in other domains");
    for ev in events.iter() {
        if ev.token == TOKEN {
            v.changed(&ev.path);
        }
    }
    anyhow::bail!("the xenstore connection closed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::loopback::Hypervisor;

    #[test]
    fn paths_are_classified() {
        assert_eq!(classify("/local/domain/7/name"), Change::Name(7));
        assert_eq!(
            classify("/local/domain/3/backend/vsnd/7/0/state"),
            Change::Device(Device { backend: 3, frontend: 7, devid: 0 })
        );
        assert_eq!(
            classify("/local/domain/3/backend/vsnd/7/0"),
            Change::Device(Device { backend: 3, frontend: 7, devid: 0 })
        );
        for p in [
            "/local/domain/3/backend/vsnd/7",
            "/local/domain/x/name",
            "/local/domain/7/device/vsnd/0/name",
            "/vm/x",
        ] {
            assert_eq!(classify(p), Change::Other, "{p}");
        }
    }

    fn device(store: &dyn XenStore, b: u32, f: u32, name: &str) {
        store.write(&format!("/local/domain/{f}/name"), name).unwrap();
        store.write(&format!("/local/domain/{b}/backend/vsnd/{f}/0/frontend-id"), &f.to_string()).unwrap();
    }

    #[test]
    fn names_reach_backends_in_other_domains_only() {
        let (_hv, t) = Hypervisor::new_transport();
        let s = &*t.store;
        device(s, 3, 7, "work-vm");
        device(s, 0, 8, "dom0-served");
        let v = Voucher::new(s, 0);
        assert_eq!(v.all(), 1);
        assert_eq!(
            s.read("/local/domain/3/backend/vsnd/7/0/domain-name").unwrap().as_deref(),
            Some("work-vm")
        );
        assert_eq!(s.read("/local/domain/0/backend/vsnd/8/0/domain-name").unwrap(), None);
        // Nothing to do twice.
        assert_eq!(v.all(), 0);
        // A rename reaches the backend.
        s.write("/local/domain/7/name", "work-vm-2").unwrap();
        assert_eq!(v.changed("/local/domain/7/name"), 1);
        assert_eq!(
            s.read("/local/domain/3/backend/vsnd/7/0/domain-name").unwrap().as_deref(),
            Some("work-vm-2")
        );
    }

    #[test]
    fn a_device_being_removed_is_not_made_again() {
        let (_hv, t) = Hypervisor::new_transport();
        let s = &*t.store;
        s.write("/local/domain/7/name", "work-vm").unwrap();
        // The toolstack removed the device; a late event for it arrives.
        assert_eq!(Voucher::new(s, 0).changed("/local/domain/3/backend/vsnd/7/0/state"), 0);
        assert!(s.directory("/local/domain/3/backend/vsnd/7").unwrap().is_empty());
        // A forged frontend-id (not the path's) is not vouched for either.
        s.write("/local/domain/3/backend/vsnd/7/0/frontend-id", "8").unwrap();
        assert_eq!(Voucher::new(s, 0).changed("/local/domain/3/backend/vsnd/7/0"), 0);
    }
}
