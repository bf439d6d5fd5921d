//! The backend: finds vsnd devices under this domain's `backend/vsnd`
//! directory and runs one `Device` per guest device.

pub mod device;
pub mod instance;
pub mod pcm;
pub mod ratelimit;
pub mod ring;
pub mod service;

use crate::host::HostBackend;
use crate::sndif::keys;
use crate::xen::Transport;
use device::{Device, Services};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

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

/// Serves every vsnd device until `shutdown` is set.
pub fn run(
    transport: Transport,
    host: Arc<dyn HostBackend>,
    shutdown: Arc<AtomicBool>,
    options: Options,
) -> anyhow::Result<()> {
    let s = Services {
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
    let mut devices: BTreeMap<(u32, u32), Device> = BTreeMap::new();
    while !shutdown.load(Ordering::Relaxed) {
        match transport.watch_events.recv_timeout(Duration::from_millis(200)) {
            Ok(_) => while transport.watch_events.try_recv().is_ok() {},
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        }
        rescan(&s, &root, &mut devices);
        devices.retain(|_, d| {
            let keep = d.step(&s);
            if !keep {
                let _ = s.store.unwatch(&format!("{}/{}", d.fe, keys::STATE), &d.be);
            }
            keep
        });
    }
    for d in devices.values_mut() {
        d.shutdown(&s);
    }
    Ok(())
}

/// Adds a `Device` for every `<root>/<domid>/<devid>` that has a frontend.
fn rescan(s: &Services, root: &str, devices: &mut BTreeMap<(u32, u32), Device>) {
    for dom in s.store.directory(root).unwrap_or_default() {
        let Ok(domid) = dom.parse::<u32>() else {
            continue;
        };
        for dev in s.store.directory(&format!("{root}/{dom}")).unwrap_or_default() {
            let Ok(devid) = dev.parse::<u32>() else {
                continue;
            };
            if devices.contains_key(&(domid, devid)) {
                continue;
            }
            let be = format!("{root}/{dom}/{dev}");
            let Some(fe) = s.store.read(&format!("{be}/{}", keys::FRONTEND)).ok().flatten() else {
                continue;
            };
            // The frontend path is toolstack-written; still, insist it is the
            // guest's own device directory before watching it.
            if !fe.starts_with(&format!("/local/domain/{domid}/device/vsnd/")) {
                tracing::warn!(domid, "ignoring vsnd device with frontend path {fe:?}");
                continue;
            }
            if let Err(e) = s.store.watch(&format!("{fe}/{}", keys::STATE), &be) {
                tracing::warn!(domid, "cannot watch {fe}: {e:#}");
                continue;
            }
            devices.insert((domid, devid), Device::new(domid, devid, be, fe));
        }
    }
}
