//! dom0's policy for its guests: a TOML file (`serve --config`, by default
//! /etc/xen-vsnd/config.toml) with defaults and one section per VM, matched
//! on the domain name dom0 wrote (`/local/domain/<id>/name`), never on
//! anything the guest can write.
//!
//! ```toml
//! [defaults]
//! capture = false          # the microphone: off unless a VM is allowed
//! playback = true
//! volume_cap = 1.0         # the most the guest's playback volume reaches
//!
//! [vm.work-vm]
//! capture = true
//! target = "alsa_output.usb-headset.analog-stereo"
//! capture_target = "alsa_input.usb-headset.mono-fallback"
//! volume_cap = 0.5
//! node_properties = { "node.description" = "Work VM" }
//! ```
//!
//! Pure: parsing and resolving only. Applying it to streams is the
//! backend's (`backend::registry`).

#![forbid(unsafe_code)]

pub use crate::dma::PlaybackPosition;
use anyhow::{bail, Context};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The graph cycle no guest goes below unless its VM is allowed, in frames
/// at 48 kHz: the low end desktops commonly run at (5.3 ms).
pub const DEFAULT_MIN_QUANTUM: u32 = 256;
/// What `min_quantum` may be set to (PipeWire's own quantum limits).
pub const MIN_QUANTUM_LOWEST: u32 = 16;
pub const MIN_QUANTUM_HIGHEST: u32 = 8192;

/// Where `serve` looks for its policy when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/xen-vsnd/config.toml";

/// What one section may say; anything left out comes from `[defaults]`,
/// then from the built-in defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    pub playback: Option<bool>,
    pub capture: Option<bool>,
    /// PipeWire `target.object` of the VM's playback nodes (a sink's
    /// node name or serial).
    pub target: Option<String>,
    /// `target.object` of its capture nodes (a source).
    pub capture_target: Option<String>,
    /// Linear gain, 0–1: the guest's playback volume never goes above it.
    pub volume_cap: Option<f32>,
    /// The smallest graph cycle (quantum) the VM's streams may ask for, in
    /// frames at 48 kHz (scaled to the stream's rate): a guest with a
    /// small period must not pull every other stream of dom0's graph down
    /// with it. Default 256 (5.3 ms).
    pub min_quantum: Option<u32>,
    /// Where the playback position told to a guest without the delay
    /// extension stands: "dma" (what the host took) or "dac" (what was
    /// heard: the guest's own delay figure is then right, at the cost of
    /// that much of its buffer). Default "dma" (docs/latency.md).
    pub playback_position: Option<PlaybackPosition>,
    /// Extra properties of the VM's nodes (a VM's override a default's).
    #[serde(default)]
    pub node_properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: Section,
    #[serde(default)]
    vm: BTreeMap<String, Section>,
}

/// The policy in force for one VM.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VmPolicy {
    pub playback: bool,
    pub capture: bool,
    pub target: Option<String>,
    pub capture_target: Option<String>,
    pub volume_cap: f32,
    pub min_quantum: u32,
    pub playback_position: PlaybackPosition,
    pub node_properties: BTreeMap<String, String>,
    /// The `[vm.<name>]` section that applied, if any.
    pub section: Option<String>,
}

/// A parsed policy file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    file: File,
    /// Where it came from (None: the built-in defaults).
    pub source: Option<PathBuf>,
}

impl Policy {
    /// Parses policy text; `source` is only for messages.
    pub fn parse(text: &str, source: Option<PathBuf>) -> anyhow::Result<Policy> {
        let file: File = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        for (name, s) in
            std::iter::once(("defaults", &file.defaults)).chain(file.vm.iter().map(|(k, v)| (k.as_str(), v)))
        {
            if let Some(c) = s.volume_cap {
                if !(0.0..=1.0).contains(&c) {
                    bail!("[{name}] volume_cap = {c}: it must be between 0 and 1 (a linear gain)");
                }
            }
            if let Some(q) = s.min_quantum {
                if !(MIN_QUANTUM_LOWEST..=MIN_QUANTUM_HIGHEST).contains(&q) {
                    bail!(
                        "[{name}] min_quantum = {q}: it must be between {MIN_QUANTUM_LOWEST} and \
                         {MIN_QUANTUM_HIGHEST} frames (at 48 kHz)"
                    );
                }
            }
        }
        Ok(Policy { file, source })
    }

    /// Reads `path`, or DEFAULT_PATH when `path` is None and that file
    /// exists; otherwise the built-in defaults.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Policy> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_PATH).exists() => PathBuf::from(DEFAULT_PATH),
            None => return Ok(Policy::default()),
        };
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Policy::parse(&text, Some(path.clone())).with_context(|| format!("in {}", path.display()))
    }

    /// The policy for the domain dom0 named `domain`.
    pub fn for_domain(&self, domain: &str) -> VmPolicy {
        self.for_vm(Some(domain))
    }

    /// The policy for a domain dom0 named `name`; a domain whose name
    /// could not be read gets the defaults.
    pub fn for_vm(&self, name: Option<&str>) -> VmPolicy {
        let vm = name.and_then(|n| self.file.vm.get(n));
        let d = &self.file.defaults;
        let pick =
            |f: fn(&Section) -> Option<bool>, builtin: bool| vm.and_then(f).or(f(d)).unwrap_or(builtin);
        let mut node_properties = d.node_properties.clone();
        if let Some(v) = vm {
            node_properties.extend(v.node_properties.clone());
        }
        VmPolicy {
            playback: pick(|s| s.playback, true),
            // The microphone is dom0's: a guest hears it only when allowed.
            capture: pick(|s| s.capture, false),
            target: vm.and_then(|s| s.target.clone()).or_else(|| d.target.clone()),
            capture_target: vm.and_then(|s| s.capture_target.clone()).or_else(|| d.capture_target.clone()),
            volume_cap: vm.and_then(|s| s.volume_cap).or(d.volume_cap).unwrap_or(1.0),
            min_quantum: vm.and_then(|s| s.min_quantum).or(d.min_quantum).unwrap_or(DEFAULT_MIN_QUANTUM),
            playback_position: vm
                .and_then(|s| s.playback_position)
                .or(d.playback_position)
                .unwrap_or_default(),
            node_properties,
            section: name.filter(|_| vm.is_some()).map(str::to_string),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_default_file_is_the_built_in_defaults() {
        let p = Policy::parse(include_str!("../session-config/config.default.toml"), None).unwrap();
        for vm in ["work-vm", "any"] {
            assert_eq!(p.for_domain(vm), Policy::default().for_domain(vm));
        }
    }

    #[test]
    fn min_quantum_defaults_to_256_and_stays_in_pipewires_range() {
        assert_eq!(Policy::default().for_domain("any").min_quantum, 256);
        let p = Policy::parse("[vm.lowlat]\nmin_quantum = 32\n", None).unwrap();
        assert_eq!((p.for_domain("lowlat").min_quantum, p.for_domain("other").min_quantum), (32, 256));
        for bad in ["0", "8", "16384"] {
            assert!(Policy::parse(&format!("[defaults]\nmin_quantum = {bad}\n"), None).is_err(), "{bad}");
        }
    }

    #[test]
    fn playback_position_defaults_to_dma_and_takes_dac_per_vm() {
        assert_eq!(Policy::default().for_domain("any").playback_position, PlaybackPosition::Dma);
        let p = Policy::parse("[vm.media]\nplayback_position = \"dac\"\n", None).unwrap();
        assert_eq!(p.for_domain("media").playback_position, PlaybackPosition::Dac);
        assert_eq!(p.for_domain("other").playback_position, PlaybackPosition::Dma);
        let e = Policy::parse("[defaults]\nplayback_position = \"speaker\"\n", None).unwrap_err();
        assert!(format!("{e}").contains("dma"), "the choices are named: {e}");
    }

    #[test]
    fn built_in_defaults_deny_the_microphone() {
        let p = Policy::default().for_domain("any");
        assert!(p.playback && !p.capture);
        assert_eq!((p.volume_cap, p.target, p.section), (1.0, None, None));
    }

    #[test]
    fn sections_override_defaults_field_by_field() {
        let p = Policy::parse(
            r#"
            [defaults]
            volume_cap = 0.8
            node_properties = { "a" = "1", "b" = "2" }
            [vm.work-vm]
            capture = true
            target = "sink-2"
            node_properties = { "b" = "3" }
            [vm."q\"x"]
            playback = false
            "#,
            None,
        )
        .unwrap();
        let w = p.for_domain("work-vm");
        assert!(w.capture && w.playback);
        assert_eq!(w.volume_cap, 0.8);
        assert_eq!(w.target.as_deref(), Some("sink-2"));
        assert_eq!(w.node_properties.get("b").map(String::as_str), Some("3"));
        assert_eq!(w.node_properties.get("a").map(String::as_str), Some("1"));
        assert_eq!(w.section.as_deref(), Some("work-vm"));
        let q = p.for_domain("q\"x");
        assert!(!q.playback && !q.capture);
        // Names match exactly: no prefix, no case folding.
        assert_eq!(p.for_domain("work-vm2").section, None);
        assert_eq!(p.for_domain("Work-VM").section, None);
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let e = Policy::parse("[vm.a]\nvolume_cap = 2.0\n", None).unwrap_err();
        assert!(format!("{e}").contains("between 0 and 1"), "{e}");
        let e = Policy::parse("[vm.a]\nmicrophone = true\n", None).unwrap_err();
        assert!(format!("{e}").contains("microphone"), "{e}");
        assert!(Policy::parse("[vm.a\n", None).is_err());
    }
}
