//! The backend: finds vsnd devices under this domain's `backend/vsnd`
//! directory and runs one `Device` per guest device.

pub mod device;
pub mod instance;
pub mod lifecycle;
pub mod pcm;
pub mod ratelimit;
pub mod registry;
pub mod ring;
pub mod service;
pub mod worker;

use crate::host::HostBackend;
use crate::sndif::keys;
use crate::xen::{Transport, WatchEvent};
use anyhow::Context;
use device::{Device, Services};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;
use worker::DeviceWorker;

const ROOT_TOKEN: &str = "vsnd-root";

/// How the backend serves its guests (`xen-vsnd serve` options).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Log each open stream's figures this often.
    pub stats_interval: Option<Duration>,
    /// Offer the delay extension (`feature-delay-report`).
    pub delay_reports: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { stats_interval: None, delay_reports: true }
    }
}

/// Serves every vsnd device until `shutdown` is set; every stream is
/// registered in `registry` (policy, status).
pub fn run(
    transport: Transport,
    host: Arc<dyn HostBackend>,
    registry: Arc<registry::Registry>,
    shutdown: Arc<AtomicBool>,
    options: Options,
) -> anyhow::Result<()> {
    let s = Services {
        registry,
        store: transport.store,
        grants: transport.grants,
        evtchn: transport.evtchn,
        host,
        stats_interval: options.stats_interval,
        delay_reports: options.delay_reports,
    };
    let root = format!("/local/domain/{}/backend/vsnd", transport.own_domid);
    s.store.watch(&root, ROOT_TOKEN)?;
    tracing::info!("serving vsnd devices under {root}");
    let mut d = Dispatcher {
        s,
        root,
        devices: BTreeMap::new(),
        by_token: HashMap::new(),
        failed: BTreeSet::new(),
        rescan_due: false,
    };
    while !shutdown.load(Ordering::Relaxed) {
        match transport.watch_events.recv_timeout(Duration::from_millis(200)) {
            Ok(ev) => {
                d.route(&ev);
                while let Ok(ev) = transport.watch_events.try_recv() {
                    d.route(&ev);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        d.reap();
        d.retry();
    }
    d.shutdown();
    Ok(())
}

/// Keys the backend writes in a device's backend directory itself: their
/// watch events are our own writes, not news for the device.
const OWN_KEYS: [&str; 4] = [keys::STATE, keys::FEATURE_DELAY_REPORT, keys::BE_VERSIONS, "error"];

/// Routes xenstore watch events to the one device they concern; each device
/// runs on its own worker.
struct Dispatcher {
    s: Services,
    root: String,
    /// Each device's worker and its frontend-state watch path.
    devices: BTreeMap<(u32, u32), (DeviceWorker, String)>,
    /// A device's frontend-state watch token (its backend path) → device.
    by_token: HashMap<String, (u32, u32)>,
    /// Devices whose start failed on a xenstore call (not on something
    /// found absent): tried again at every turn of the loop (200 ms), as
    /// no event may come for them again.
    failed: BTreeSet<(u32, u32)>,
    /// A directory listing failed: the whole tree is listed again.
    rescan_due: bool,
}

impl Dispatcher {
    fn route(&mut self, ev: &WatchEvent) {
        if ev.token != ROOT_TOKEN {
            if let Some((w, _)) = self.by_token.get(&ev.token).and_then(|k| self.devices.get(k)) {
                w.wake();
            }
            return;
        }
        let rel: Option<Vec<&str>> = match ev.path.strip_prefix(&self.root) {
            Some("") => Some(Vec::new()),
            Some(r) => r.strip_prefix('/').map(|r| r.split('/').collect()),
            None => None,
        };
        match rel.as_deref() {
            // The root itself (its first event, or removed) or above it.
            None | Some([]) => self.rescan(None),
            Some([dom]) => {
                if let Ok(domid) = dom.parse::<u32>() {
                    self.rescan(Some(domid));
                }
            }
            Some([dom, dev, rest @ ..]) => {
                let (Ok(domid), Ok(devid)) = (dom.parse::<u32>(), dev.parse::<u32>()) else {
                    return;
                };
                // Only this device is looked at: a flood of events costs
                // nothing in proportion to the number of devices.
                if self.devices.get(&(domid, devid)).is_some_and(|(w, _)| w.is_gone()) {
                    self.forget(domid, devid);
                }
                match self.devices.get(&(domid, devid)) {
                    Some((w, _)) if !matches!(rest, [k] if OWN_KEYS.contains(k)) => w.wake(),
                    Some(_) => {}
                    None => self.add(domid, devid),
                }
            }
        }
    }

    /// Adds the devices of every domain (or of `domid`) not known yet and
    /// wakes the known ones, which find out themselves what changed.
    fn rescan(&mut self, domid: Option<u32>) {
        self.reap();
        let doms = match domid {
            Some(d) => vec![d],
            None => self.ids(&self.root.clone()),
        };
        for dom in doms {
            for devid in self.ids(&format!("{}/{dom}", self.root)) {
                self.add(dom, devid);
            }
        }
        for (_, (w, _)) in self.devices.iter().filter(|((d, _), _)| domid.map_or(true, |x| x == *d)) {
            w.wake();
        }
    }

    /// Starts serving `<root>/<domid>/<devid>` if it has a frontend.
    fn add(&mut self, domid: u32, devid: u32) {
        if self.devices.contains_key(&(domid, devid)) {
            return;
        }
        match self.start(domid, devid) {
            Ok(()) => {
                self.failed.remove(&(domid, devid));
            }
            Err(e) => {
                // Once per failure spell, not at every retry.
                if self.failed.insert((domid, devid)) {
                    tracing::warn!(domid, devid, "cannot start serving the device (trying again): {e:#}");
                }
            }
        }
    }

    /// Ok when the device is served now, or has nothing to serve (no
    /// frontend, a frontend path that is not the guest's own).
    fn start(&mut self, domid: u32, devid: u32) -> anyhow::Result<()> {
        let be = format!("{}/{domid}/{devid}", self.root);
        let Some(fe) = self.s.store.read(&format!("{be}/{}", keys::FRONTEND))? else {
            return Ok(());
        };
        // The frontend path is toolstack-written; still, insist it is the
        // guest's own device directory before watching it.
        if !fe.starts_with(&format!("/local/domain/{domid}/device/vsnd/")) {
            tracing::warn!(domid, "ignoring vsnd device with frontend path {fe:?}");
            return Ok(());
        }
        let watch = format!("{fe}/{}", keys::STATE);
        self.s.store.watch(&watch, &be).with_context(|| format!("watching {watch}"))?;
        match DeviceWorker::spawn(Device::new(domid, devid, be.clone(), fe), self.s.clone()) {
            Ok(w) => {
                self.by_token.insert(be, (domid, devid));
                self.devices.insert((domid, devid), (w, watch));
                Ok(())
            }
            Err(e) => {
                let _ = self.s.store.unwatch(&watch, &be);
                Err(e).context("starting the device's thread")
            }
        }
    }

    /// Tries again what failed before.
    fn retry(&mut self) {
        if std::mem::take(&mut self.rescan_due) {
            self.rescan(None);
        }
        // Each stays in the set (no new log line) until it starts.
        for (domid, devid) in self.failed.clone() {
            self.add(domid, devid);
        }
    }

    /// The numeric children of `path`; a listing that fails (not one of a
    /// path that is gone) has the whole tree listed again at the next turn.
    fn ids(&mut self, path: &str) -> Vec<u32> {
        match self.s.store.directory(path) {
            Ok(names) => names.iter().filter_map(|n| n.parse().ok()).collect(),
            Err(e) => {
                if !self.rescan_due {
                    tracing::warn!("listing {path} (trying again): {e:#}");
                }
                self.rescan_due = true;
                Vec::new()
            }
        }
    }

    /// Forgets the devices whose directory went away.
    fn reap(&mut self) {
        let gone: Vec<(u32, u32)> =
            self.devices.iter().filter(|(_, (w, _))| w.is_gone()).map(|(k, _)| *k).collect();
        for (domid, devid) in gone {
            self.forget(domid, devid);
        }
    }

    fn forget(&mut self, domid: u32, devid: u32) {
        let be = format!("{}/{domid}/{devid}", self.root);
        self.by_token.remove(&be);
        if let Some((w, watch)) = self.devices.remove(&(domid, devid)) {
            drop(w);
            let _ = self.s.store.unwatch(&watch, &be);
        }
    }

    /// Backend exit: every device shuts down at once.
    fn shutdown(self) {
        for (w, _) in self.devices.values() {
            w.stop();
        }
        drop(self.devices);
    }
}
