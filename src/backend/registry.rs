//! Every connected guest stream and the policy in force for it: what the
//! control socket (`status`, `ctl`) reads and changes. A stream registers
//! when its connection comes up and is gone when its `StreamRecord` is
//! dropped; the policy reaches a running stream through its
//! `StreamControls` (the engine reads them at every cycle) and through its
//! node's properties (the host updates them in place).

#![forbid(unsafe_code)]

use super::pcm::StreamIdentity;
use crate::dma::{DmaShared, Geometry, StreamControls};
use crate::host::{HostBackend, StreamSpec};
use crate::policy::{Policy, VmPolicy};
use crate::sndif::StreamKind;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, Weak};

/// Node property saying whether dom0 lets the stream's samples through.
pub const PROP_CAPTURE: &str = "xen-vsnd.capture";
pub const PROP_PLAYBACK: &str = "xen-vsnd.playback";

pub struct Registry {
    host: Arc<dyn HostBackend>,
    /// `serve --config` (None: the default path if it exists).
    path: Option<PathBuf>,
    policy: Mutex<Policy>,
    /// `ctl mic allow|deny` since the last (re)load, by domain name.
    mic: Mutex<BTreeMap<String, bool>>,
    streams: Mutex<Vec<Weak<StreamRecord>>>,
}

/// One connected guest stream.
pub struct StreamRecord {
    pub ident: Arc<StreamIdentity>,
    pub controls: Arc<StreamControls>,
    /// The open stream's geometry and counters (OPEN until CLOSE).
    open: Mutex<Option<(Geometry, Arc<DmaShared>)>>,
    /// The policy in force and where its capture rule came from.
    policy: Mutex<(VmPolicy, &'static str)>,
}

/// A policy change as it reached one stream (`ctl`'s answer).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Applied {
    pub node: String,
    pub allowed: bool,
    /// The stream's DMA position (bytes) when the change was stored: from
    /// the next cycle on the engine follows it.
    pub position: Option<u64>,
}

impl Registry {
    pub fn new(host: Arc<dyn HostBackend>, path: Option<PathBuf>) -> anyhow::Result<Registry> {
        let policy = Policy::load(path.as_deref())?;
        Ok(Registry::with_policy(host, path, policy))
    }

    pub fn with_policy(host: Arc<dyn HostBackend>, path: Option<PathBuf>, policy: Policy) -> Registry {
        match &policy.source {
            Some(p) => tracing::info!("policy from {}", p.display()),
            None => tracing::info!("no policy file: built-in defaults (guests may play; capture is denied)"),
        }
        Registry { host, path, policy: Mutex::new(policy), mic: Mutex::default(), streams: Mutex::default() }
    }

    /// The policy for `ident`'s VM: the file's, then `ctl mic`.
    fn resolve(&self, ident: &StreamIdentity) -> (VmPolicy, &'static str) {
        let mut p = self.policy.lock().unwrap().for_vm(ident.vm_name.as_deref());
        let from = match ident.vm_name.as_ref().and_then(|n| self.mic.lock().unwrap().get(n).copied()) {
            Some(allow) => {
                p.capture = allow;
                "ctl"
            }
            None if p.section.is_some() => "config",
            None => "defaults",
        };
        (p, from)
    }

    /// A stream whose connection came up.
    pub fn register(&self, ident: Arc<StreamIdentity>) -> Arc<StreamRecord> {
        let (p, from) = self.resolve(&ident);
        let (allowed, cap) = controls_for(ident.cfg.kind, &p);
        if !allowed {
            tracing::info!(
                stream = %ident.node_name(),
                "{} is denied by the policy ({from}): the stream carries digital silence \
                 (allow it in the policy file, or `xen-vsnd ctl mic allow <domain>` for capture)",
                ident.cfg.kind.as_str()
            );
        }
        let r = Arc::new(StreamRecord {
            ident,
            controls: Arc::new(StreamControls::new(allowed, cap)),
            open: Mutex::default(),
            policy: Mutex::new((p, from)),
        });
        let mut streams = self.streams.lock().unwrap();
        streams.retain(|w| w.strong_count() > 0);
        streams.push(Arc::downgrade(&r));
        r
    }

    fn live(&self) -> Vec<Arc<StreamRecord>> {
        self.streams.lock().unwrap().iter().filter_map(Weak::upgrade).collect()
    }

    /// Brings every stream to the policy in force now.
    fn apply(&self) -> Vec<Applied> {
        let mut out = Vec::new();
        for r in self.live() {
            let (p, from) = self.resolve(&r.ident);
            let (allowed, cap) = controls_for(r.ident.cfg.kind, &p);
            r.controls.set_policy(allowed, cap);
            let position = r.open.lock().unwrap().as_ref().map(|(_, s)| s.position.load(Relaxed));
            let props = policy_props(r.ident.cfg.kind, &p);
            let (old, _) = std::mem::replace(&mut *r.policy.lock().unwrap(), (p, from));
            if policy_props(r.ident.cfg.kind, &old) != props {
                self.host.update_properties(&r.ident.node_name(), props);
            }
            out.push(Applied { node: r.ident.node_name(), allowed, position });
        }
        out
    }

    /// Reads the policy file again; on success it replaces the old one
    /// (and every `ctl mic` since) and applies to every stream at once.
    /// A file that does not parse leaves everything as it was.
    pub fn reload(&self) -> anyhow::Result<Vec<Applied>> {
        let policy = Policy::load(self.path.as_deref())?;
        *self.policy.lock().unwrap() = policy;
        self.mic.lock().unwrap().clear();
        let applied = self.apply();
        tracing::info!(streams = applied.len(), "policy reloaded");
        Ok(applied)
    }

    /// `ctl mic allow|deny <domain>`: until the next reload.
    pub fn set_mic(&self, domain: &str, allow: bool) -> Vec<Applied> {
        self.mic.lock().unwrap().insert(domain.to_string(), allow);
        let applied = self.apply();
        tracing::info!(domain, allow, "capture {} by ctl", if allow { "allowed" } else { "denied" });
        applied
    }

    /// Every connected stream, for `status`.
    pub fn status(&self) -> Vec<StreamStatus> {
        let ids = self.host.node_ids();
        let mut v: Vec<StreamStatus> = self.live().iter().map(|r| r.status(&ids)).collect();
        v.sort_by(|a, b| (a.domid, &a.node).cmp(&(b.domid, &b.node)));
        v
    }
}

/// The engine's controls for a stream of `kind` under `p`: whether its
/// samples pass, and the cap on the guest's gain (playback only: the
/// microphone's level is the dom0 user's).
fn controls_for(kind: StreamKind, p: &VmPolicy) -> (bool, f32) {
    match kind {
        StreamKind::Playback => (p.playback, p.volume_cap),
        StreamKind::Capture => (p.capture, 1.0),
    }
}

/// The `target.object` a policy gives a stream of `kind`.
fn target_of(kind: StreamKind, p: &VmPolicy) -> Option<&String> {
    match kind {
        StreamKind::Playback => p.target.as_ref(),
        StreamKind::Capture => p.capture_target.as_ref(),
    }
}

/// The node properties a policy gives a stream of `kind`.
pub fn policy_props(kind: StreamKind, p: &VmPolicy) -> Vec<(String, String)> {
    let word = |b: bool| if b { "allowed" } else { "denied" }.to_string();
    let mut v = match kind {
        StreamKind::Playback => vec![(PROP_PLAYBACK.to_string(), word(p.playback))],
        StreamKind::Capture => vec![(PROP_CAPTURE.to_string(), word(p.capture))],
    };
    if let Some(t) = target_of(kind, p) {
        v.push(("target.object".into(), t.clone()));
    }
    v.extend(p.node_properties.iter().map(|(k, v)| (k.clone(), v.clone())));
    v
}

impl StreamRecord {
    /// The VM's floor for its streams' graph cycle (policy `min_quantum`).
    pub fn min_quantum(&self) -> u32 {
        self.policy.lock().unwrap_or_else(|e| e.into_inner()).0.min_quantum
    }

    /// Where the VM's playback positions stand without the delay extension
    /// (policy `playback_position`).
    pub fn playback_position(&self) -> crate::dma::PlaybackPosition {
        self.policy.lock().unwrap_or_else(|e| e.into_inner()).0.playback_position
    }

    /// The node's name and properties, with the policy's.
    pub fn spec(&self) -> StreamSpec {
        let mut spec = self.ident.spec();
        spec.props.extend(policy_props(self.ident.cfg.kind, &self.policy.lock().unwrap().0));
        spec
    }

    pub fn opened(&self, geom: Geometry, shared: Arc<DmaShared>) {
        *self.open.lock().unwrap() = Some((geom, shared));
    }

    pub fn closed(&self) {
        *self.open.lock().unwrap() = None;
    }

    fn status(&self, node_ids: &BTreeMap<String, u32>) -> StreamStatus {
        let id = &self.ident;
        let node = id.node_name();
        let (p, from) = self.policy.lock().unwrap().clone();
        let open = self.open.lock().unwrap().clone();
        let load = |f: fn(&DmaShared) -> u64| open.as_ref().map(|(_, s)| f(s));
        StreamStatus {
            domid: id.domid,
            domain: id.vm_name.clone(),
            kind: id.cfg.kind.as_str(),
            node_id: node_ids.get(&node).copied(),
            node,
            state: match &open {
                None => "closed",
                Some((_, s)) if s.running.load(Relaxed) => "running",
                Some(_) => "stopped",
            },
            format: open.as_ref().map(|(g, _)| g.format.name()),
            rate: open.as_ref().map(|(g, _)| g.rate),
            channels: open.as_ref().map(|(g, _)| g.channels),
            period_frames: open.as_ref().map(|(g, _)| g.period_frames()),
            buffer_frames: open.as_ref().map(|(g, _)| g.buffer_bytes / g.frame_bytes().max(1) as u32),
            quantum: open.as_ref().map(|(_, s)| s.cycle_frames.load(Relaxed)),
            delay_frames: open.as_ref().map(|(_, s)| s.delay_frames.load(Relaxed)),
            position_bytes: load(|s| s.position.load(Relaxed)),
            guest_position_bytes: load(|s| s.told.load(Relaxed)),
            underruns: load(|s| s.underruns.load(Relaxed)),
            overruns: load(|s| s.overruns.load(Relaxed)),
            late_cycles: load(|s| s.late_cycles.load(Relaxed)),
            fallback_cycles: load(|s| s.fallback_cycles.load(Relaxed)),
            allowed: self.controls.allowed(),
            guest_gain: (0..id.cfg.params.channels_max as usize)
                .map(|c| self.controls.guest_gain(c))
                .collect(),
            policy: PolicyView {
                playback: p.playback,
                capture: p.capture,
                capture_from: from,
                volume_cap: p.volume_cap,
                target: target_of(id.cfg.kind, &p).cloned(),
                playback_position: p.playback_position,
                section: p.section,
            },
        }
    }
}

/// One stream as `xen-vsnd status --json` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    pub domid: u32,
    /// The name dom0 gave the domain (None: unreadable).
    pub domain: Option<String>,
    pub node: String,
    pub node_id: Option<u32>,
    pub kind: &'static str,
    /// closed (connected, not open), stopped (open, not started), running.
    pub state: &'static str,
    pub format: Option<&'static str>,
    pub rate: Option<u32>,
    pub channels: Option<u32>,
    pub period_frames: Option<u32>,
    pub buffer_frames: Option<u32>,
    /// Frames per host cycle.
    pub quantum: Option<u32>,
    /// The delay reported with the last position, frames.
    pub delay_frames: Option<u32>,
    pub position_bytes: Option<u64>,
    /// The position the guest was told last: `position_bytes`, or less by
    /// dom0's delay (policy `playback_position = "dac"`).
    pub guest_position_bytes: Option<u64>,
    pub underruns: Option<u64>,
    pub overruns: Option<u64>,
    pub late_cycles: Option<u64>,
    pub fallback_cycles: Option<u64>,
    /// Whether the stream's samples pass (else digital silence).
    pub allowed: bool,
    /// The guest's own volume per channel (linear; mute is 0).
    pub guest_gain: Vec<f32>,
    pub policy: PolicyView,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyView {
    pub playback: bool,
    pub capture: bool,
    /// Where the capture rule came from: defaults, config or ctl.
    pub capture_from: &'static str,
    pub volume_cap: f32,
    pub target: Option<String>,
    /// Where the VM's playback positions stand without the delay extension.
    pub playback_position: crate::dma::PlaybackPosition,
    /// The `[vm.<name>]` section that applied.
    pub section: Option<String>,
}
