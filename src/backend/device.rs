//! One vsnd device of one guest: the xenbus handshake and its streams.
//!
//! Backend states: Initialising → InitWait (ready) → Connected once the
//! frontend is Initialised and every stream's rings and channels are set up.
//! When the frontend closes or goes back to Initialising, the streams are torn
//! down and the backend returns to InitWait so the guest can connect again.

#![forbid(unsafe_code)]

use super::pcm::{PcmStream, StreamIdentity};
use super::ring::BackRing;
use super::service::StreamService;
use crate::host::HostBackend;
use crate::sndif::config::{parse_card, CardConfig, ConfigSource};
use crate::sndif::{keys, XenbusState};
use crate::xen::{worth_retrying, DomId, EventChannels, GrantMapper, StoreError, XenStore};
use anyhow::{anyhow, Context};
use std::cell::RefCell;
use std::sync::Arc;

/// The parts of the transport and host a device needs.
#[derive(Clone)]
pub struct Services {
    pub store: Arc<dyn XenStore>,
    pub grants: Arc<dyn GrantMapper>,
    pub evtchn: Arc<dyn EventChannels>,
    pub host: Arc<dyn HostBackend>,
    /// Every connected stream and dom0's policy for it.
    pub registry: Arc<super::registry::Registry>,
    /// Log each open stream's figures this often (`serve --stats-interval`).
    pub stats_interval: Option<std::time::Duration>,
    /// Offer the delay extension (off with `serve --no-delay-report`).
    pub delay_reports: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Fresh,
    InitWait,
    Connected,
    Failed,
    /// Found a frontend still Initialised/Connected from a previous backend
    /// (we restarted): its rings are stale. We said Closed and wait for it to
    /// reset to Initialising before offering InitWait.
    Restarting,
    /// The toolstack set `online = 0` (xl destroy / device detach): torn
    /// down and Closed until the directory goes away.
    Removed,
}

/// What a device's step found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Continue,
    /// A xenstore call failed: step again shortly.
    Retry,
    /// The device is gone: drop it.
    Gone,
}

pub struct Device {
    pub domid: DomId,
    pub devid: u32,
    pub be: String,
    pub fe: String,
    phase: Phase,
    streams: Vec<StreamService>,
    /// What the frontend had published when we connected: its ring refs
    /// and ports, per stream. A frontend that publishes others while we
    /// are Connected has started over (see `step`).
    published: Vec<[u32; 4]>,
    /// The card's left-out formats were logged (once per device).
    told_left_out: bool,
    told_no_name: bool,
    /// A state we took but could not write yet (xenstore failed).
    unwritten: Option<XenbusState>,
    /// The last step failed on xenstore and is being tried again.
    retrying: bool,
}

/// The frontend's directory as the card parser reads it. A key that could
/// not be read is not "absent": the first failure is kept, and the card is
/// not taken from a partial read (`read_card`).
struct StoreSource<'a> {
    store: &'a dyn XenStore,
    base: &'a str,
    failed: RefCell<Option<StoreError>>,
}

impl StoreSource<'_> {
    fn note<T: Default>(&self, r: Result<T, StoreError>) -> T {
        r.unwrap_or_else(|e| {
            self.failed.borrow_mut().get_or_insert(e);
            T::default()
        })
    }
}

impl ConfigSource for StoreSource<'_> {
    fn read(&self, rel: &str) -> Option<String> {
        self.note(self.store.read(&format!("{}/{rel}", self.base)))
    }
    fn list(&self, rel: &str) -> Vec<String> {
        let p = if rel.is_empty() { self.base.to_string() } else { format!("{}/{rel}", self.base) };
        self.note(self.store.directory(&p))
    }
}

/// A domain name as it appears in node names: letters, digits, `-`, `_`
/// and `.` as they are, every other byte as `%XX` (its UTF-8 bytes in
/// hex), so names stay readable and distinct domains never share one
/// (`q"x` is `q%22x`, `q_x` stays `q_x`, `%` is `%25`). Nothing is cut:
/// xenstore bounds the name.
pub fn node_safe_name(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Device {
    pub fn new(domid: DomId, devid: u32, be: String, fe: String) -> Device {
        Device {
            domid,
            devid,
            be,
            fe,
            phase: Phase::Fresh,
            streams: Vec::new(),
            published: Vec::new(),
            told_left_out: false,
            told_no_name: false,
            unwritten: None,
            retrying: false,
        }
    }

    /// Writes our state. A failed write (xenstored busy or restarting) is
    /// an error: the step is tried again, for a frontend waits on it.
    fn set_state(&self, s: &Services, st: XenbusState) -> anyhow::Result<()> {
        s.store
            .write(&format!("{}/{}", self.be, keys::STATE), st.as_str())
            .context("writing the backend state")
    }

    /// Reacts to the current xenstore state: `Gone` when the device is gone
    /// (its backend directory was removed) and should be dropped; `Retry`
    /// when a xenstore call failed (not a key found absent: that is an
    /// answer), so the worker steps again shortly instead of taking a
    /// failed read for a removed device or leaving a frontend waiting on a
    /// state we could not write.
    pub fn step(&mut self, s: &Services) -> Step {
        let r = self.try_step(s);
        // One line when a spell of failures starts, one when it ends.
        match (&r, self.retrying) {
            (Err(e), false) => {
                tracing::warn!(domid = self.domid, devid = self.devid, "xenstore: {e:#} (trying again)")
            }
            (Ok(_), true) => tracing::info!(domid = self.domid, devid = self.devid, "xenstore answers again"),
            _ => {}
        }
        self.retrying = r.is_err();
        match r {
            Ok(true) => Step::Continue,
            Ok(false) => Step::Gone,
            Err(_) => Step::Retry,
        }
    }

    fn try_step(&mut self, s: &Services) -> anyhow::Result<bool> {
        let read = |path: String| s.store.read(&path).with_context(|| format!("reading {path}"));
        if read(format!("{}/{}", self.be, keys::FRONTEND))?.is_none() {
            self.teardown("backend directory removed");
            return Ok(false);
        }
        // The toolstack removes a device by writing online = 0 (and state
        // Closing) and waits for the backend to reach Closed.
        if read(format!("{}/{}", self.be, keys::ONLINE))?.as_deref().map(str::trim) == Some("0") {
            if self.phase != Phase::Removed {
                self.teardown("the toolstack removes the device");
                self.set_state(s, XenbusState::Closed)?;
                self.phase = Phase::Removed;
            }
            return Ok(true);
        }
        if let Some(st) = self.unwritten {
            self.set_state(s, st)?;
            self.unwritten = None;
        }
        let fe_state = read(format!("{}/{}", self.fe, keys::STATE))?
            .map(|v| XenbusState::parse(&v))
            .unwrap_or(XenbusState::Closed);
        if self.phase == Phase::Fresh {
            // Once, before any state: the upstream frontend re-runs its
            // whole InitWait handling on every write it sees while we are
            // in InitWait, so later writes would only make it start over.
            // "0", not absent: a backend before us may have left a "1".
            let offer = if s.delay_reports { "1" } else { "0" };
            let _ = s.store.write(&format!("{}/{}", self.be, keys::FEATURE_DELAY_REPORT), offer);
            let _ = s.store.write(&format!("{}/{}", self.be, keys::BE_VERSIONS), "2");
        }
        match (self.phase, fe_state) {
            (Phase::Fresh, XenbusState::Initialised | XenbusState::Connected) => {
                // Its ring and event pages belong to the backend that died;
                // Closed makes the frontend tear down and start over.
                tracing::info!(
                    domid = self.domid,
                    devid = self.devid,
                    "frontend left over: asking it to reset"
                );
                self.set_state(s, XenbusState::Closed)?;
                self.phase = Phase::Restarting;
            }
            (Phase::Fresh, _)
            | (Phase::Restarting, XenbusState::Initialising | XenbusState::Closed | XenbusState::Unknown) => {
                self.set_state(s, XenbusState::InitWait)?;
                self.phase = Phase::InitWait;
                tracing::info!(
                    domid = self.domid,
                    devid = self.devid,
                    "vsnd device found, waiting for the frontend"
                );
                return Ok(true);
            }
            (Phase::InitWait, XenbusState::Initialised) => self.connect_or_fail(s)?,
            // Still waiting for our Connected, or it started over: the
            // upstream frontend runs its InitWait handling once per write
            // it sees, so it may free the rings we just mapped and publish
            // new ones, passing through Initialising too briefly for us to
            // see. Its new rings are what counts; writing Connected again
            // wakes it.
            (Phase::Connected, XenbusState::Initialised)
                if self.read_published(s).is_ok_and(|p| p != self.published) =>
            {
                self.teardown("the frontend published new rings");
                self.connect_or_fail(s)?;
            }
            (Phase::Connected, XenbusState::Initialised) => {}
            (Phase::Connected, XenbusState::Connected) => {}
            (Phase::Connected, st) => {
                self.teardown(&format!("frontend state {st:?}"));
                self.set_state(s, XenbusState::InitWait)?;
                self.phase = Phase::InitWait;
            }
            (Phase::Failed, XenbusState::Initialising | XenbusState::Closed | XenbusState::Unknown) => {
                self.set_state(s, XenbusState::InitWait)?;
                self.phase = Phase::InitWait;
            }
            _ => {}
        }
        Ok(true)
    }

    /// Connects the frontend's rings and channels, or tells it we cannot:
    /// the reason in `error` and state Closed (a frontend gives up on a
    /// Closed backend instead of waiting). Err only when even that could
    /// not be written.
    fn connect_or_fail(&mut self, s: &Services) -> anyhow::Result<()> {
        match self.connect(s) {
            Ok(()) => {
                self.phase = Phase::Connected;
                // Connected but not told: the streams stay, and the next
                // step writes the state first.
                self.unwritten = Some(XenbusState::Connected);
                self.set_state(s, XenbusState::Connected)?;
                self.unwritten = None;
                tracing::info!(
                    domid = self.domid,
                    devid = self.devid,
                    streams = self.streams.len(),
                    "connected"
                );
            }
            // xenstore did not answer, or this side could not map or bind
            // now: not the guest's doing, nor final. (A refusal — a key we
            // may not read, a grant or port the hypervisor refuses — is.)
            Err(e) if worth_retrying(&e) => {
                self.teardown("xenstore or this side failed while connecting");
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(domid = self.domid, devid = self.devid, "cannot connect frontend: {e:#}");
                let _ = s.store.write(&format!("{}/error", self.be), &format!("{e:#}"));
                self.teardown("the connection failed");
                self.set_state(s, XenbusState::Closed)?;
                self.phase = Phase::Failed;
            }
        }
        Ok(())
    }

    /// The card configuration the toolstack wrote for the frontend.
    fn read_card(&self, s: &Services) -> anyhow::Result<CardConfig> {
        let src = StoreSource { store: s.store.as_ref(), base: &self.fe, failed: RefCell::new(None) };
        let card = parse_card(&src);
        if let Some(e) = src.failed.into_inner() {
            return Err(e).context("reading the card configuration");
        }
        card.map_err(|e| anyhow!(e))
    }

    /// The ring refs and ports of every stream the card configures, as the
    /// frontend has published them now.
    fn read_published(&self, s: &Services) -> anyhow::Result<Vec<[u32; 4]>> {
        self.published_refs(s, &self.read_card(s)?)
    }

    fn published_refs(&self, s: &Services, card: &CardConfig) -> anyhow::Result<Vec<[u32; 4]>> {
        card.streams()
            .map(|(pcm, sc)| {
                let sp = format!("{}/{}/{}", self.fe, pcm.index, sc.index);
                let mut v = [0u32; 4];
                for (slot, key) in
                    v.iter_mut().zip([keys::RING_REF, keys::EVT_CHNL, keys::EVT_RING_REF, keys::EVT_EVT_CHNL])
                {
                    *slot =
                        self.read_u32(s, &format!("{sp}/{key}")).with_context(|| format!("stream {sp}"))?;
                }
                Ok(v)
            })
            .collect()
    }

    fn teardown(&mut self, why: &str) {
        if !self.streams.is_empty() {
            tracing::info!(domid = self.domid, devid = self.devid, "disconnecting: {why}");
            let started = std::time::Instant::now();
            if let Some(d) = crate::fault::armed().teardown_delay {
                std::thread::sleep(d);
            }
            self.streams.clear();
            tracing::info!(
                domid = self.domid,
                devid = self.devid,
                ms = started.elapsed().as_millis() as u64,
                "disconnected"
            );
        }
        self.published.clear();
    }

    /// Shuts the device down when the backend itself exits.
    pub fn shutdown(&mut self, s: &Services) {
        self.teardown("backend exiting");
        if !matches!(self.phase, Phase::Fresh | Phase::Removed | Phase::Restarting) {
            let _ = self.set_state(s, XenbusState::Closed);
        }
    }

    /// The guest's name as dom0 wrote it, never anything from the guest's
    /// own directories: names, routing and policy key on it. In dom0 that
    /// is the domain's `name` (the guest can read it, not change it); a
    /// backend in a driver domain may not read that key, and takes what
    /// dom0's `xen-vsnd vouch` copied into the device's backend directory
    /// (the guest cannot write there either).
    fn trusted_name(&mut self, s: &Services) -> Result<Option<String>, StoreError> {
        // A driver domain may not read other domains' names (Refused):
        // then the name dom0 vouched for. A store that does not answer is
        // an error: a guest must not lose its name (and its policy) to a
        // xenstore hiccup.
        let read = |path: String| match s.store.read(&path) {
            Ok(v) => Ok(v.filter(|n| !n.is_empty())),
            Err(StoreError::Refused { .. }) => Ok(None),
            Err(e) => Err(e),
        };
        let name = match read(format!("/local/domain/{}/name", self.domid))? {
            Some(own) => Some(own),
            None => read(format!("{}/{}", self.be, crate::vouch::DOMAIN_NAME_KEY))?,
        };
        if name.is_none() && !self.told_no_name {
            self.told_no_name = true;
            tracing::warn!(
                domid = self.domid,
                "no name dom0 vouches for (in a driver domain: is `xen-vsnd vouch` running in dom0?): \
                 the guest's nodes are named by its domain id and it gets the policy's defaults"
            );
        }
        Ok(name)
    }

    fn read_u32(&self, s: &Services, path: &str) -> anyhow::Result<u32> {
        let v = s.store.read(path)?.ok_or_else(|| anyhow!("{path} missing"))?;
        v.trim().parse::<u32>().map_err(|_| anyhow!("{path}: not a number: {v:?}"))
    }

    fn connect(&mut self, s: &Services) -> anyhow::Result<()> {
        let card = self.read_card(s)?;
        if !card.left_out_formats.is_empty() && !self.told_left_out {
            self.told_left_out = true;
            tracing::warn!(
                domid = self.domid,
                devid = self.devid,
                left_out = %card.left_out_formats.join(","),
                "the card lists sample formats this backend does not carry: the guest is offered the others"
            );
        }
        let report_delay = s.delay_reports
            && s.store
                .read(&format!("{}/{}", self.fe, keys::FEATURE_DELAY_REPORT))?
                .as_deref()
                .map(str::trim)
                == Some("1");
        let vm_name = self.trusted_name(s)?;
        let domain = vm_name.as_deref().map_or_else(|| format!("domain-{}", self.domid), node_safe_name);
        let published = self.published_refs(s, &card)?;
        let mut streams = Vec::new();
        for ((pcm, sc), &[ring_ref, port, evt_ref, evt_port]) in card.streams().zip(&published) {
            let ctx = || format!("stream {}/{}/{}", self.fe, pcm.index, sc.index);
            let ring_page = s.grants.map(self.domid, &[ring_ref]).with_context(ctx)?;
            let evt_page = Arc::new(s.grants.map(self.domid, &[evt_ref]).with_context(ctx)?);
            let req_ch = s.evtchn.bind(self.domid, port).with_context(ctx)?;
            let evt_ch = s.evtchn.bind(self.domid, evt_port).with_context(ctx)?;
            let ident = Arc::new(StreamIdentity {
                domid: self.domid,
                domain: domain.clone(),
                vm_name: vm_name.clone(),
                devid: self.devid,
                card_long_name: card.long_name.clone(),
                pcm_index: pcm.index,
                pcm_name: pcm.name.clone(),
                cfg: sc.clone(),
            });
            let pcm_stream = PcmStream::new(
                s.registry.register(ident),
                s.grants.clone(),
                s.host.clone(),
                evt_page,
                evt_ch,
                report_delay,
            );
            streams.push(StreamService::spawn(
                pcm_stream,
                BackRing::new(ring_page),
                req_ch,
                s.stats_interval,
            )?);
        }
        self.streams = streams;
        self.published = published;
        Ok(())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.teardown("device dropped");
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;

    /// Distinct domain names give distinct node names, readable where
    /// they can be.
    #[test]
    fn node_names_of_distinct_domains_are_distinct() {
        assert_eq!(node_safe_name("work-vm.2_b"), "work-vm.2_b");
        assert_eq!(node_safe_name("q\"x"), "q%22x");
        assert_eq!(node_safe_name("q_x"), "q_x");
        assert_eq!(node_safe_name("a%22"), "a%2522");
        assert_eq!(node_safe_name("é"), "%C3%A9");
        let names = ["q\"x", "q_x", "q x", "q%22x", "q%x", "qx", &"a".repeat(100), &"a".repeat(101)];
        let mut seen: Vec<String> = names.iter().map(|n| node_safe_name(n)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), names.len(), "{seen:?}");
    }
}
