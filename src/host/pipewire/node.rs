//! One guest stream's PipeWire node, on the PipeWire thread: created when
//! the guest's stream connects, its format renegotiated in place at each
//! OPEN, active while the guest stream is open, removed when the stream's
//! connection goes away. Users' links to it survive the guest's OPENs and
//! CLOSEs.

use super::rt::{process, Rt};
use crate::host::punctuality::Punctuality;
use crate::host::slot::EngineSlot;
use crate::host::{Shape, StreamSpec};
use crate::sndif::{PcmFormat, StreamKind};
use anyhow::{anyhow, Context};
use pipewire as pw;
use pw::spa;
use pw::spa::param::audio::{AudioFormat, AudioInfoRaw};
use pw::spa::pod::Pod;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

pub(super) struct Node {
    pub stream: pw::stream::StreamRc,
    _rt: pw::stream::StreamListener<Rt>,
    /// A second listener for main-thread events, so that they never touch
    /// the real-time callback's state.
    _control: pw::stream::StreamListener<Control>,
    pub kind: StreamKind,
    /// Graph cycles of latency PipeWire does not report (see `graph`),
    /// kept current by the registry listener, read by the cycle.
    pub unreported_cycles: Arc<AtomicU32>,
    /// The format last offered (EnumFormat) and the period it was for.
    offered: (Shape, u32),
    /// Activated (scheduled by the graph): from OPEN until a while after
    /// CLOSE.
    pub active: bool,
}

/// What the main-thread listener keeps.
struct Control {
    negotiated: Arc<AtomicU64>,
}

/// A shape as one number, for the real-time side (0: none).
pub(super) fn shape_key(s: Shape) -> u64 {
    ((s.format.wire() as u64 + 1) << 40) | ((s.channels as u64 & 0xff) << 32) | s.rate as u64
}

/// The sample format and channels of a `shape_key`.
pub(super) fn format_of_key(key: u64) -> Option<(PcmFormat, u32)> {
    let wire = (key >> 40).checked_sub(1)?;
    Some((PcmFormat::from_wire(wire as u8)?, ((key >> 32) & 0xff) as u32))
}

pub(super) fn spa_format(f: PcmFormat) -> Option<AudioFormat> {
    use PcmFormat::*;
    Some(match f {
        S8 => AudioFormat::S8,
        U8 => AudioFormat::U8,
        S16Le => AudioFormat::S16LE,
        S16Be => AudioFormat::S16BE,
        U16Le => AudioFormat::U16LE,
        U16Be => AudioFormat::U16BE,
        S24Le => AudioFormat::S24LE,
        S24Be => AudioFormat::S24BE,
        U24Le => AudioFormat::U24LE,
        U24Be => AudioFormat::U24BE,
        S32Le => AudioFormat::S32LE,
        S32Be => AudioFormat::S32BE,
        U32Le => AudioFormat::U32LE,
        U32Be => AudioFormat::U32BE,
        F32Le => AudioFormat::F32LE,
        F32Be => AudioFormat::F32BE,
        F64Le => AudioFormat::F64LE,
        F64Be => AudioFormat::F64BE,
    })
}

/// SPA channel positions for `n` channels, after `channel_names`.
fn positions(n: u32) -> [u32; spa::param::audio::MAX_CHANNELS] {
    use spa::sys::*;
    let mut p = [0u32; spa::param::audio::MAX_CHANNELS];
    for (i, (slot, name)) in p.iter_mut().zip(crate::host::channel_names(n)).enumerate() {
        *slot = match name.as_str() {
            "MONO" => SPA_AUDIO_CHANNEL_MONO,
            "FL" => SPA_AUDIO_CHANNEL_FL,
            "FR" => SPA_AUDIO_CHANNEL_FR,
            "FC" => SPA_AUDIO_CHANNEL_FC,
            "LFE" => SPA_AUDIO_CHANNEL_LFE,
            "RL" => SPA_AUDIO_CHANNEL_RL,
            "RR" => SPA_AUDIO_CHANNEL_RR,
            "SL" => SPA_AUDIO_CHANNEL_SL,
            "SR" => SPA_AUDIO_CHANNEL_SR,
            _ => SPA_AUDIO_CHANNEL_AUX0 + i as u32,
        };
    }
    p
}

/// The EnumFormat param offering exactly `shape`.
fn format_pod(shape: Shape) -> anyhow::Result<Vec<u8>> {
    let format =
        spa_format(shape.format).ok_or_else(|| anyhow!("format {} unsupported", shape.format.name()))?;
    let mut info = AudioInfoRaw::new();
    info.set_format(format);
    info.set_rate(shape.rate);
    info.set_channels(shape.channels);
    info.set_position(positions(shape.channels));
    Ok(spa::pod::serialize::PodSerializer::serialize(
        std::io::Cursor::new(Vec::new()),
        &spa::pod::Value::Object(spa::pod::Object {
            type_: spa::sys::SPA_TYPE_OBJECT_Format,
            id: spa::sys::SPA_PARAM_EnumFormat,
            properties: info.into(),
        }),
    )
    .map_err(|e| anyhow!("format pod: {e:?}"))?
    .0
    .into_inner())
}

/// `node.latency` for the stream's cycle (`host::cycle_frames`: it divides
/// the period, and is not below dom0's floor).
fn latency(shape: Shape, cycle_frames: u32) -> String {
    format!("{cycle_frames}/{}", shape.rate)
}

/// The shape of a negotiated Format param.
fn negotiated_shape(param: &Pod) -> Option<Shape> {
    let mut info = AudioInfoRaw::default();
    info.parse(param).ok()?;
    let format = PcmFormat::all().find(|f| spa_format(*f) == Some(info.format()))?;
    Some(Shape { format, rate: info.rate(), channels: info.channels() })
}

impl Node {
    /// Creates the node, inactive (neither driving the graph nor keeping a
    /// sink awake) until the guest's first OPEN, in `spec.initial`.
    pub fn create(
        core: &pw::core::CoreRc,
        spec: StreamSpec,
        node_props: &[(String, String)],
        slot: Arc<EngineSlot>,
    ) -> anyhow::Result<Node> {
        let shape = spec.initial;
        let (class, category) = match spec.kind {
            StreamKind::Playback => ("Stream/Output/Audio", "Playback"),
            StreamKind::Capture => ("Stream/Input/Audio", "Capture"),
        };
        // Until an OPEN says the period: PipeWire's usual quantum.
        let period = 2048;
        let latency = latency(shape, period);
        let mut props = pw::properties::properties! {
            *pw::keys::MEDIA_TYPE => "Audio",
            *pw::keys::MEDIA_CATEGORY => category,
            *pw::keys::MEDIA_CLASS => class,
            *pw::keys::MEDIA_NAME => spec.description.as_str(),
            *pw::keys::NODE_NAME => spec.node_name.as_str(),
            *pw::keys::NODE_DESCRIPTION => spec.description.as_str(),
            *pw::keys::APP_NAME => spec.domain.as_str(),
            *pw::keys::NODE_LATENCY => latency.as_str(),
            "node.rate" => format!("1/{}", shape.rate),
            *pw::keys::AUDIO_CHANNELS => shape.channels.to_string(),
        };
        // The administrator's properties come last and win.
        for (k, v) in spec.props.iter().chain(node_props) {
            props.insert(k.as_str(), v.as_str());
        }
        let stream =
            pw::stream::StreamRc::new(core.clone(), &spec.node_name, props).context("pw_stream_new")?;
        let unreported_cycles = Arc::new(AtomicU32::new(0));
        let negotiated = Arc::new(AtomicU64::new(0));
        let rt = Rt {
            slot,
            negotiated: negotiated.clone(),
            kind: spec.kind,
            unreported_cycles: unreported_cycles.clone(),
            punctuality: Punctuality::default(),
        };
        let rt_listener = stream
            .add_local_listener_with_user_data(rt)
            .process(process)
            .register()
            .context("stream listener")?;
        let control = stream
            .add_local_listener_with_user_data(Control { negotiated })
            .state_changed(|_, _, _old, new| {
                if matches!(new, pw::stream::StreamState::Streaming) {
                    crate::host::realtime::warn_once_without_realtime();
                }
            })
            .param_changed(|_, c, id, param| {
                if id != spa::sys::SPA_PARAM_Format {
                    return;
                }
                let key = param.and_then(negotiated_shape).map_or(0, shape_key);
                c.negotiated.store(key, Ordering::Release);
                tracing::debug!(?key, "node format negotiated");
            })
            .register()
            .context("stream control listener")?;
        let bytes = format_pod(shape)?;
        let mut params = [Pod::from_bytes(&bytes).ok_or_else(|| anyhow!("format pod"))?];
        let dir = match spec.kind {
            StreamKind::Playback => spa::utils::Direction::Output,
            StreamKind::Capture => spa::utils::Direction::Input,
        };
        stream
            .connect(
                dir,
                None,
                pw::stream::StreamFlags::AUTOCONNECT
                    | pw::stream::StreamFlags::MAP_BUFFERS
                    | pw::stream::StreamFlags::RT_PROCESS
                    | pw::stream::StreamFlags::INACTIVE,
                &mut params,
            )
            .context("pw_stream_connect")?;
        Ok(Node {
            stream,
            _rt: rt_listener,
            _control: control,
            kind: spec.kind,
            unreported_cycles,
            offered: (shape, period),
            active: false,
        })
    }

    /// OPEN: offers the guest's format and period (renegotiating in place
    /// when they changed) and activates the node. The node's volume is
    /// the dom0 user's: xen-vsnd applies the guest's own volume to its
    /// samples (`dma::controls`).
    pub fn open(&mut self, shape: Shape, cycle_frames: u32) -> anyhow::Result<()> {
        if self.offered != (shape, cycle_frames) {
            let latency = latency(shape, cycle_frames);
            self.update_properties(&[
                (pw::keys::NODE_LATENCY.to_string(), latency),
                ("node.rate".to_string(), format!("1/{}", shape.rate)),
            ]);
            if self.offered.0 != shape {
                // The adapter takes a new EnumFormat when the node starts:
                // pause it, offer, start it again (below).
                if self.active {
                    let _ = self.stream.set_active(false);
                }
                let bytes = format_pod(shape)?;
                let pod = Pod::from_bytes(&bytes).ok_or_else(|| anyhow!("format pod"))?;
                self.stream.update_params(&mut [pod]).context("renegotiating the node's format")?;
            }
            self.offered = (shape, cycle_frames);
        }
        self.stream.set_active(true).context("activating the node")?;
        self.active = true;
        Ok(())
    }

    /// Adds or replaces properties of the live node.
    pub fn update_properties(&self, props: &[(String, String)]) {
        let mut p = pw::properties::PropertiesBox::new();
        for (k, v) in props {
            p.insert(k.as_str(), v.as_str());
        }
        // SAFETY: a live stream and a dict that outlives the call
        // (PipeWire copies it).
        unsafe { pw::sys::pw_stream_update_properties(self.stream.as_raw_ptr(), p.dict().as_raw()) };
    }

    /// A while after CLOSE: no longer scheduled.
    pub fn deactivate(&mut self) {
        let _ = self.stream.set_active(false);
        self.active = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_format_maps() {
        for f in PcmFormat::all() {
            assert!(spa_format(f).is_some(), "{f:?}");
        }
    }

    #[test]
    fn shape_keys_round_trip() {
        let s = Shape { format: PcmFormat::S8, rate: 44100, channels: 2 };
        assert_ne!(shape_key(s), 0, "no shape is 'none'");
        assert_eq!(format_of_key(shape_key(s)), Some((PcmFormat::S8, 2)));
        assert_eq!(format_of_key(0), None);
        let t = Shape { rate: 48000, ..s };
        assert_ne!(shape_key(s), shape_key(t));
    }
}
