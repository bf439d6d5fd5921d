//! The guest's PipeWire side: each ALSA node of a snd-xen-vsnd stream gets
//! the delay dom0 reports for that stream as its latency offset
//! (`latencyOffsetNsec`, a runtime setting of PipeWire's ALSA nodes), so
//! the latency the guest's PipeWire reports to its clients
//! (pw_stream_get_time_n, PulseAudio's latency API through pipewire-pulse)
//! counts the whole way to dom0's sound device, and is updated when it
//! changes. It also turns on the node's `api.alsa.htimestamp`: the card's
//! pointer moves only when dom0's cycle event comes, and the node must take
//! the pointer's age into account (the driver has ALSA stamp the status at
//! each event) or the fill it keeps is off by that age (docs/latency.md).

use crate::cards::StreamKey;
use anyhow::{anyhow, Context};
use pipewire as pw;
use pw::spa;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// The driver name PipeWire's ALSA nodes carry for snd-xen-vsnd's PCMs.
const PW_DRIVER_NAME: &str = "snd_xen_vsnd";

/// A sink or source of the guest's graph, bound.
struct Followed {
    proxy: pw::node::Node,
    _listener: pw::node::NodeListener,
    /// The snd-xen-vsnd stream it plays or records, once its properties
    /// said so.
    stream: Option<StreamKey>,
    /// The delay it was given last, µs.
    applied: Option<i32>,
}

#[derive(Default)]
struct State {
    nodes: HashMap<u32, Followed>,
    /// The delay of each stream, µs, as the driver reported it last.
    delays: HashMap<StreamKey, i32>,
}

impl State {
    /// Gives every node of a known stream its stream's delay, when it
    /// differs from what it was given last.
    fn apply(&mut self) {
        for (id, node) in &mut self.nodes {
            let Some(us) = node.stream.and_then(|k| self.delays.get(&k).copied()) else { continue };
            if node.applied == Some(us) {
                continue;
            }
            match latency_pod(offset_ns(us)) {
                Ok(pod) => {
                    node.proxy.set_param(spa::param::ParamType::Props, 0, pod_ref(&pod));
                    tracing::info!(node = id, delay_us = us, "node latency set");
                    node.applied = Some(us);
                }
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
    }
}

/// The latency offset for a Host Delay control of `us`: the driver and
/// PipeWire both truncate toward zero (frames to whole microseconds, then
/// nanoseconds to frames), so `us * 1000` came back a frame short (4096
/// frames at 48 kHz: 85333 µs, then 4095.98 frames, then 4095). The far
/// end of the microsecond the driver truncated to gives the frames back, on
/// either side of zero (a capture's delay can be below it; checked below at
/// the usual rates).
fn offset_ns(us: i32) -> i64 {
    i64::from(us) * 1000 + 999 * i64::from(us.signum())
}

/// Runs until the PipeWire connection ends: follows the graph's sinks and
/// sources, and takes the delays that `delays` carries in.
pub fn run(delays: pw::channel::Receiver<(StreamKey, i32)>) -> anyhow::Result<()> {
    pw::init();
    let mainloop = pw::main_loop::MainLoopRc::new(None).context("PipeWire main loop")?;
    let context = pw::context::ContextRc::new(&mainloop, None).context("PipeWire context")?;
    let core = context.connect_rc(None).context("connecting to PipeWire")?;
    let registry = core.get_registry_rc().context("PipeWire registry")?;
    let state = Rc::new(RefCell::new(State::default()));

    let _delays = {
        let state = state.clone();
        delays.attach(mainloop.loop_(), move |(key, us)| {
            let mut st = state.borrow_mut();
            st.delays.insert(key, us);
            st.apply();
        })
    };
    let _core_listener = {
        let ml = mainloop.clone();
        core.add_listener_local()
            .error(move |id, _seq, res, msg| {
                if id == pw::core::PW_ID_CORE {
                    tracing::warn!("PipeWire: {msg} ({res})");
                    ml.quit();
                }
            })
            .register()
    };
    let _registry_listener = {
        let (on_global, on_remove, reg) = (state.clone(), state.clone(), registry.clone());
        registry
            .add_listener_local()
            .global(move |obj| {
                let class = obj.props.and_then(|p| p.get("media.class")).unwrap_or_default();
                if obj.type_ != pw::types::ObjectType::Node
                    || !(class.starts_with("Audio/Sink") || class.starts_with("Audio/Source"))
                {
                    return;
                }
                let Ok(node) = reg.bind::<pw::node::Node, _>(obj) else { return };
                let (weak, id) = (Rc::downgrade(&on_global), obj.id);
                let listener = node
                    .add_listener_local()
                    .info(move |info| {
                        let Some(state) = weak.upgrade() else { return };
                        let Some(key) = info.props().and_then(|p| stream_of(|k| p.get(k))) else { return };
                        let mut st = state.borrow_mut();
                        if let Some(node) = st.nodes.get_mut(&id) {
                            if node.stream != Some(key) {
                                tracing::info!(node = id, ?key, "a snd-xen-vsnd node");
                                node.stream = Some(key);
                            }
                        }
                        st.apply();
                    })
                    .register();
                let followed = Followed { proxy: node, _listener: listener, stream: None, applied: None };
                on_global.borrow_mut().nodes.insert(obj.id, followed);
            })
            .global_remove(move |id| {
                on_remove.borrow_mut().nodes.remove(&id);
            })
            .register()
    };
    mainloop.run();
    Err(anyhow!("the PipeWire connection ended"))
}

/// The stream an ALSA node plays or records, from its properties.
fn stream_of<'a>(prop: impl Fn(&str) -> Option<&'a str>) -> Option<StreamKey> {
    if prop("alsa.driver_name")? != PW_DRIVER_NAME {
        return None;
    }
    let class = prop("media.class")?;
    Some(StreamKey {
        card: prop("alsa.card")?.parse().ok()?,
        device: prop("alsa.device")?.parse().ok()?,
        subdevice: prop("alsa.subdevice").and_then(|s| s.parse().ok()).unwrap_or(0),
        capture: class.starts_with("Audio/Source"),
    })
}

/// `Props { latencyOffsetNsec = ns, params = [ "api.alsa.htimestamp" true ] }`.
/// The latency offset is what pavucontrol calls a port's latency offset:
/// PipeWire's ALSA nodes add it to their process latency and announce the
/// new port latency, so it reaches every linked client (`latency.internal.ns`
/// set through `params` changes the figure without announcing it, PipeWire
/// 1.4). With `api.alsa.htimestamp` the node measures its fill as of its
/// cycle's time, from the time ALSA stamped on the pointer's last move,
/// rather than taking a pointer that may be a whole dom0 cycle old as now.
fn latency_pod(ns: i64) -> anyhow::Result<Vec<u8>> {
    use spa::pod::{Object, Property, PropertyFlags, Value};
    let prop = |key, value| Property { key, flags: PropertyFlags::empty(), value };
    let props = Value::Object(Object {
        type_: spa::sys::SPA_TYPE_OBJECT_Props,
        id: spa::sys::SPA_PARAM_Props,
        properties: vec![
            prop(spa::sys::SPA_PROP_latencyOffsetNsec, Value::Long(ns)),
            prop(
                spa::sys::SPA_PROP_params,
                Value::Struct(vec![Value::String("api.alsa.htimestamp".into()), Value::Bool(true)]),
            ),
        ],
    });
    Ok(spa::pod::serialize::PodSerializer::serialize(std::io::Cursor::new(Vec::new()), &props)
        .map_err(|e| anyhow!("latency pod: {e:?}"))?
        .0
        .into_inner())
}

fn pod_ref(bytes: &[u8]) -> &spa::pod::Pod {
    spa::pod::Pod::from_bytes(bytes).expect("a pod just serialized")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_gives_back_the_frames_the_driver_had() {
        // The driver's control: frames * 1e6 / rate (div_s64); PipeWire's
        // conversion of the offset: ns * rate / 1e9 (C's int64 division):
        // both truncate toward zero, as Rust's does.
        let back =
            |frames: i64, rate: i64| offset_ns((frames * 1_000_000 / rate) as i32) * rate / 1_000_000_000;
        for rate in [8000i64, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000, 176400, 192000] {
            for frames in -20_000..20_000 {
                assert_eq!(back(frames, rate), frames, "{frames} frames at {rate} Hz");
            }
        }
        assert_eq!(back(4096, 48000), 4096, "the e2e's capture delay");
    }

    #[test]
    fn a_snd_xen_vsnd_node_is_matched_to_its_stream_and_others_are_not() {
        let props = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| *v)
        };
        let sink = props(&[
            ("alsa.driver_name", "snd_xen_vsnd"),
            ("media.class", "Audio/Sink"),
            ("alsa.card", "1"),
            ("alsa.device", "0"),
        ]);
        assert_eq!(stream_of(sink), Some(StreamKey { card: 1, device: 0, subdevice: 0, capture: false }));
        let source = props(&[
            ("alsa.driver_name", "snd_xen_vsnd"),
            ("media.class", "Audio/Source"),
            ("alsa.card", "0"),
            ("alsa.device", "2"),
            ("alsa.subdevice", "1"),
        ]);
        assert_eq!(stream_of(source), Some(StreamKey { card: 0, device: 2, subdevice: 1, capture: true }));
        let other = props(&[("alsa.driver_name", "snd_hda_intel"), ("media.class", "Audio/Sink")]);
        assert_eq!(stream_of(other), None);
    }

    #[test]
    fn the_props_carry_the_offset_and_turn_on_htimestamp() {
        use spa::pod::{deserialize::PodDeserializer, Value};
        let bytes = latency_pod(12_500_999).unwrap();
        let (_, Value::Object(obj)) = PodDeserializer::deserialize_any_from(&bytes).unwrap() else {
            panic!("not an object")
        };
        assert_eq!(obj.type_, spa::sys::SPA_TYPE_OBJECT_Props);
        let value = |key| obj.properties.iter().find(|p| p.key == key).map(|p| p.value.clone());
        assert!(matches!(value(spa::sys::SPA_PROP_latencyOffsetNsec), Some(Value::Long(12_500_999))));
        match value(spa::sys::SPA_PROP_params) {
            Some(Value::Struct(v)) => assert!(
                matches!(&v[..], [Value::String(k), Value::Bool(true)] if k == "api.alsa.htimestamp"),
                "{v:?}"
            ),
            other => panic!("params: {other:?}"),
        }
    }
}
