//! PipeWire host: one `pw_stream` per guest stream, all owned by one thread
//! that runs the PipeWire main loop. Other threads talk to it through a
//! `pipewire::channel`. The process callback runs in PipeWire's data thread
//! (`RT_PROCESS`) and only calls the DMA engine.

use super::punctuality::{frames_ns, Punctuality};
use super::pw_graph::{Graph, Kind};
use super::{HostBackend, HostStream, StreamSpec};
use crate::dma::histogram::now_ns;
use crate::dma::DmaEngine;
use crate::sndif::{PcmFormat, StreamKind};
use anyhow::{anyhow, Context};
use pipewire as pw;
use pw::spa;
use pw::spa::param::audio::{AudioFormat, AudioInfoRaw};
use pw::spa::pod::Pod;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// How long a caller waits for the PipeWire thread to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this long a closing playback stream plays out what the graph
/// still holds of it (a quantum or two) before it is removed.
const DRAIN_BOUND: Duration = Duration::from_millis(500);

enum Cmd {
    Open {
        id: u64,
        spec: StreamSpec,
        engine: Box<DmaEngine>,
        reply: mpsc::SyncSender<anyhow::Result<()>>,
    },
    Close {
        id: u64,
        reply: mpsc::SyncSender<()>,
    },
    /// A closing playback stream has drained (or its bound passed).
    Finish {
        id: u64,
    },
    Active {
        id: u64,
        active: bool,
    },
    Volume {
        id: u64,
        gains: Vec<f32>,
    },
}

/// How the PipeWire host connects and what it adds to every node.
#[derive(Debug, Clone, Default)]
pub struct PipeWireConfig {
    /// `PIPEWIRE_REMOTE`-style daemon name; None for the default.
    pub remote: Option<String>,
    /// Extra properties for every guest node (`serve --node-property`).
    pub node_props: Vec<(String, String)>,
}

pub struct PipeWireHost {
    tx: pw::channel::Sender<Cmd>,
    next_id: AtomicU64,
}

fn spa_format(f: PcmFormat) -> Option<AudioFormat> {
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
    for (i, (slot, name)) in p.iter_mut().zip(super::channel_names(n)).enumerate() {
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

/// Frames between the DMA position and the device (playback) or from the
/// device to the position (capture), at the stream's rate.
fn delay_frames(t: &pw::stream::Time, stream_rate: u32, frame_bytes: usize) -> u32 {
    let raw = t.as_raw();
    let (num, denom) = (raw.rate.num as i128, raw.rate.denom as i128);
    let graph = if denom > 0 { (raw.delay as i128 * num * stream_rate as i128) / denom } else { 0 };
    let queued = (raw.queued as usize / frame_bytes.max(1)) as i128;
    (graph + queued + raw.buffered as i128).clamp(0, u32::MAX as i128) as u32
}

impl PipeWireHost {
    /// Starts the PipeWire thread and connects to the daemon (`remote`:
    /// `PIPEWIRE_REMOTE` style name, or the default).
    pub fn start(config: PipeWireConfig) -> anyhow::Result<PipeWireHost> {
        let (ready_tx, ready_rx) = mpsc::sync_channel::<anyhow::Result<pw::channel::Sender<Cmd>>>(1);
        std::thread::Builder::new()
            .name("pipewire".into())
            .spawn(move || {
                if let Err(e) = run_loop(config, &ready_tx) {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .context("spawning the PipeWire thread")?;
        let tx =
            ready_rx.recv_timeout(REPLY_TIMEOUT).map_err(|_| anyhow!("PipeWire thread did not start"))??;
        Ok(PipeWireHost { tx, next_id: AtomicU64::new(1) })
    }
}

/// The guest's channel gains, kept so they can be applied again once the
/// stream has negotiated (a control set before that is lost).
type Gains = Rc<RefCell<Option<Vec<f32>>>>;

struct Entry {
    stream: pw::stream::StreamRc,
    _listener: pw::stream::StreamListener<Rt>,
    /// A second listener for main-thread events, so that they never touch
    /// the real-time callback's state.
    _control: pw::stream::StreamListener<Gains>,
    gains: Gains,
    kind: StreamKind,
    /// Set while a closed playback stream drains: answered when it is gone.
    closing: Option<mpsc::SyncSender<()>>,
    /// Graph cycles of latency PipeWire does not report (see `pw_graph`),
    /// kept current by the registry listener, read by the cycle.
    unreported_cycles: Arc<AtomicU32>,
}

/// Recomputes every capture stream's unreported latency from the graph.
fn refresh_unreported(streams: &RefCell<HashMap<u64, Entry>>, graph: &RefCell<Graph>) {
    let graph = graph.borrow();
    for e in streams.borrow().values().filter(|e| e.kind == StreamKind::Capture) {
        let n = graph.unreported_cycles(e.stream.node_id());
        if e.unreported_cycles.swap(n, Ordering::Relaxed) != n {
            tracing::debug!(node = e.stream.node_id(), cycles = n, "unreported latency changed");
        }
    }
}

/// State owned by the real-time process callback.
struct Rt {
    engine: Box<DmaEngine>,
    kind: StreamKind,
    unreported_cycles: Arc<AtomicU32>,
    punctuality: Punctuality,
}

fn run_loop(
    config: PipeWireConfig,
    ready: &mpsc::SyncSender<anyhow::Result<pw::channel::Sender<Cmd>>>,
) -> anyhow::Result<()> {
    pw::init();
    let mainloop = pw::main_loop::MainLoopRc::new(None).context("PipeWire main loop")?;
    let context = pw::context::ContextRc::new(&mainloop, None).context("PipeWire context")?;
    let props = config.remote.map(|r| pw::properties::properties! { *pw::keys::REMOTE_NAME => r });
    let core = context.connect_rc(props).map_err(|e| {
        anyhow!(
            "connecting to the PipeWire daemon: {e} (is PipeWire running for this user? \
             XDG_RUNTIME_DIR/PIPEWIRE_RUNTIME_DIR and PIPEWIRE_REMOTE select the daemon)"
        )
    })?;
    let _core_listener = core
        .add_listener_local()
        .error(|id, seq, res, msg| tracing::warn!(id, seq, res, "PipeWire: {msg}"))
        .register();
    let (tx, rx) = pw::channel::channel::<Cmd>();
    let to_self = tx.clone();
    let streams: Rc<RefCell<HashMap<u64, Entry>>> = Rc::default();
    let graph: Rc<RefCell<Graph>> = Rc::default();
    let registry = core.get_registry_rc().context("PipeWire registry")?;
    // Our capture nodes, bound to follow their `node.driver-id`.
    let watched: Rc<RefCell<HashMap<u32, (pw::node::Node, pw::node::NodeListener)>>> = Rc::default();
    let (s1, g1, s2, g2, w1, w2, reg) = (
        streams.clone(),
        graph.clone(),
        streams.clone(),
        graph.clone(),
        watched.clone(),
        watched,
        registry.clone(),
    );
    let _registry_listener = registry
        .add_listener_local()
        .global(move |obj| {
            let kind = match obj.type_ {
                pw::types::ObjectType::Node => Kind::Node,
                pw::types::ObjectType::Port => Kind::Port,
                pw::types::ObjectType::Link => Kind::Link,
                _ => Kind::Other,
            };
            let lookup = |k: &str| obj.props.and_then(|p| p.get(k)).map(str::to_string);
            g1.borrow_mut().add(obj.id, kind, &lookup);
            let ours = lookup("node.name").is_some_and(|n| n.starts_with("xen-vsnd."))
                && lookup("media.class").as_deref() == Some("Stream/Input/Audio");
            if kind == Kind::Node && ours {
                if let Ok(node) = reg.bind::<pw::node::Node, _>(obj) {
                    let (s, g, id) = (s1.clone(), g1.clone(), obj.id);
                    let listener = node
                        .add_listener_local()
                        .info(move |info| {
                            // Properties come only with the events that change them.
                            if !info.change_mask().contains(pw::node::NodeChangeMask::PROPS) {
                                return;
                            }
                            let driver = info
                                .props()
                                .and_then(|p| p.get("node.driver-id"))
                                .and_then(|v| v.parse().ok());
                            tracing::debug!(node = id, ?driver, "capture node driver");
                            g.borrow_mut().set_driver(id, driver);
                            refresh_unreported(&s, &g);
                        })
                        .register();
                    w1.borrow_mut().insert(obj.id, (node, listener));
                }
            }
            refresh_unreported(&s1, &g1);
        })
        .global_remove(move |id| {
            w2.borrow_mut().remove(&id);
            g2.borrow_mut().remove(id);
            refresh_unreported(&s2, &g2);
        })
        .register();
    let core2 = core.clone();
    let _attached = rx.attach(mainloop.loop_(), move |cmd| match cmd {
        Cmd::Open { id, spec, engine, reply } => {
            let r = open_stream(&core2, spec, engine, &config.node_props, id, &to_self).map(|e| {
                streams.borrow_mut().insert(id, e);
            });
            refresh_unreported(&streams, &graph);
            let _ = reply.send(r);
        }
        Cmd::Close { id, reply } => {
            // A guest closes right after its last cycle: part of that cycle
            // can still be on its way through the graph. Let it play out.
            let mut map = streams.borrow_mut();
            let draining = map.get_mut(&id).filter(|e| {
                e.kind == StreamKind::Playback
                    && matches!(e.stream.state(), pw::stream::StreamState::Streaming)
                    && e.stream.flush(true).is_ok()
            });
            if let Some(e) = draining {
                e.closing = Some(reply);
                let tx = to_self.clone();
                let _ = std::thread::Builder::new().name("pw-drain".into()).spawn(move || {
                    std::thread::sleep(DRAIN_BOUND);
                    let _ = tx.send(Cmd::Finish { id });
                });
            } else {
                if let Some(e) = map.remove(&id) {
                    let _ = e.stream.disconnect();
                }
                let _ = reply.send(());
            }
        }
        Cmd::Finish { id } => {
            if let Some(e) = streams.borrow_mut().remove(&id) {
                let _ = e.stream.disconnect();
                if let Some(reply) = &e.closing {
                    let _ = reply.send(());
                }
            }
        }
        Cmd::Active { id, active } => {
            if let Some(e) = streams.borrow().get(&id) {
                let _ = e.stream.set_active(active);
            }
        }
        Cmd::Volume { id, gains } => {
            if let Some(e) = streams.borrow().get(&id) {
                let _ = e.stream.set_control(spa::sys::SPA_PROP_channelVolumes, &gains);
                *e.gains.borrow_mut() = Some(gains);
            }
        }
    });
    ready.send(Ok(tx)).map_err(|_| anyhow!("caller gone"))?;
    mainloop.run();
    Ok(())
}

fn open_stream(
    core: &pw::core::CoreRc,
    spec: StreamSpec,
    engine: Box<DmaEngine>,
    node_props: &[(String, String)],
    id: u64,
    to_self: &pw::channel::Sender<Cmd>,
) -> anyhow::Result<Entry> {
    let g = engine.geom;
    let format = spa_format(g.format).ok_or_else(|| anyhow!("format {} unsupported", g.format.name()))?;
    let (class, category) = match spec.kind {
        StreamKind::Playback => ("Stream/Output/Audio", "Playback"),
        StreamKind::Capture => ("Stream/Input/Audio", "Capture"),
    };
    let latency = format!("{}/{}", super::cycle_frames(g.period_frames()), g.rate);
    let mut props = pw::properties::properties! {
        *pw::keys::MEDIA_TYPE => "Audio",
        *pw::keys::MEDIA_CATEGORY => category,
        *pw::keys::MEDIA_CLASS => class,
        *pw::keys::MEDIA_NAME => spec.description.as_str(),
        *pw::keys::NODE_NAME => spec.node_name.as_str(),
        *pw::keys::NODE_DESCRIPTION => spec.description.as_str(),
        *pw::keys::APP_NAME => spec.domain.as_str(),
        *pw::keys::NODE_LATENCY => latency.as_str(),
        "node.rate" => format!("1/{}", g.rate),
        *pw::keys::AUDIO_CHANNELS => g.channels.to_string(),
    };
    // The administrator's properties come last and win.
    for (k, v) in spec.props.iter().chain(node_props) {
        props.insert(k.as_str(), v.as_str());
    }
    let stream = pw::stream::StreamRc::new(core.clone(), &spec.node_name, props).context("pw_stream_new")?;
    let unreported_cycles = Arc::new(AtomicU32::new(0));
    let rt = Rt {
        engine,
        kind: spec.kind,
        unreported_cycles: unreported_cycles.clone(),
        punctuality: Punctuality::default(),
    };
    let listener = stream
        .add_local_listener_with_user_data(rt)
        .process(process)
        .register()
        .context("stream listener")?;
    let gains: Gains = Rc::default();
    let control = stream
        .add_local_listener_with_user_data(gains.clone())
        .state_changed(|stream, gains, _old, new| {
            use pw::stream::StreamState::{Paused, Streaming};
            if matches!(new, Streaming) {
                super::realtime::warn_once_without_realtime();
            }
            if matches!(new, Paused | Streaming) {
                if let Some(g) = gains.borrow().as_ref() {
                    let _ = stream.set_control(spa::sys::SPA_PROP_channelVolumes, g);
                }
            }
        })
        .drained({
            let tx = to_self.clone();
            move |_, _| {
                let _ = tx.send(Cmd::Finish { id });
            }
        })
        .register()
        .context("stream control listener")?;

    let mut info = AudioInfoRaw::new();
    info.set_format(format);
    info.set_rate(g.rate);
    info.set_channels(g.channels);
    info.set_position(positions(g.channels));
    let bytes = spa::pod::serialize::PodSerializer::serialize(
        std::io::Cursor::new(Vec::new()),
        &spa::pod::Value::Object(spa::pod::Object {
            type_: spa::sys::SPA_TYPE_OBJECT_Format,
            id: spa::sys::SPA_PARAM_EnumFormat,
            properties: info.into(),
        }),
    )
    .map_err(|e| anyhow!("format pod: {e:?}"))?
    .0
    .into_inner();
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
                | pw::stream::StreamFlags::RT_PROCESS,
            &mut params,
        )
        .context("pw_stream_connect")?;
    Ok(Entry {
        _control: control,
        gains,
        stream,
        _listener: listener,
        kind: spec.kind,
        closing: None,
        unreported_cycles,
    })
}

/// The real-time cycle, timed into the stream's histogram and checked
/// against the graph's clock.
fn process(stream: &pw::stream::Stream, rt: &mut Rt) {
    let start = now_ns();
    let time = stream.time().ok();
    let frames = process_cycle(stream, time.as_ref(), rt);
    let end = now_ns();
    rt.engine.shared.cycle_time.record(end.saturating_sub(start));
    let timing = time.zip(frames).map(|(t, frames)| {
        (u64::try_from(t.as_raw().now).unwrap_or(0), frames_ns(frames, rt.engine.geom.rate))
    });
    rt.punctuality.account(&rt.engine.shared, timing, end);
}

/// One cycle's work; returns the frames moved. No allocation, no locks, no
/// logging.
fn process_cycle(stream: &pw::stream::Stream, time: Option<&pw::stream::Time>, rt: &mut Rt) -> Option<usize> {
    let mut buffer = stream.dequeue_buffer()?;
    let requested = buffer.requested() as usize;
    let stride = rt.engine.frame_bytes();
    let rate = rt.engine.geom.rate;
    let mut delay = time.map(|t| delay_frames(t, rate, stride)).unwrap_or(0);
    let datas = buffer.datas_mut();
    let d = datas.first_mut()?;
    match rt.kind {
        StreamKind::Playback => {
            let frames = {
                let slice = d.data()?;
                let max = slice.len() / stride.max(1);
                let frames = if requested == 0 { max } else { requested.min(max) };
                rt.engine.playback_cycle(&mut slice[..frames * stride], delay);
                frames
            };
            let chunk = d.chunk_mut();
            *chunk.offset_mut() = 0;
            *chunk.stride_mut() = stride as i32;
            *chunk.size_mut() = (frames * stride) as u32;
            Some(frames)
        }
        StreamKind::Capture => {
            let (offset, size) = {
                let c = d.chunk();
                (c.offset() as usize, c.size() as usize)
            };
            let slice = d.data()?;
            let end = offset.saturating_add(size).min(slice.len());
            let start = offset.min(end);
            let whole = (end - start) / stride.max(1) * stride;
            // A cycle PipeWire does not report is one cycle's worth of frames.
            let cycles = rt.unreported_cycles.load(Ordering::Relaxed);
            delay = delay.saturating_add(cycles.saturating_mul((whole / stride.max(1)) as u32));
            rt.engine.capture_cycle(&slice[start..start + whole], delay);
            Some(whole / stride.max(1))
        }
    }
}

struct PwStream {
    id: u64,
    tx: pw::channel::Sender<Cmd>,
}

impl HostStream for PwStream {
    fn set_active(&self, active: bool) {
        let _ = self.tx.send(Cmd::Active { id: self.id, active });
    }
    fn set_volume(&self, gains: Vec<f32>) {
        let _ = self.tx.send(Cmd::Volume { id: self.id, gains });
    }
}

impl Drop for PwStream {
    fn drop(&mut self) {
        let (reply, done) = mpsc::sync_channel(1);
        if self.tx.send(Cmd::Close { id: self.id, reply }).is_ok()
            && done.recv_timeout(REPLY_TIMEOUT).is_err()
        {
            tracing::error!(id = self.id, "PipeWire thread did not close the stream in time");
        }
    }
}

impl HostBackend for PipeWireHost {
    fn supports(&self, format: PcmFormat) -> bool {
        spa_format(format).is_some()
    }

    fn open(&self, spec: StreamSpec, engine: DmaEngine) -> anyhow::Result<Box<dyn HostStream>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = mpsc::sync_channel(1);
        let name = spec.node_name.clone();
        self.tx
            .send(Cmd::Open { id, spec, engine: Box::new(engine), reply })
            .map_err(|_| anyhow!("PipeWire thread is gone"))?;
        rx.recv_timeout(REPLY_TIMEOUT)
            .map_err(|_| anyhow!("PipeWire thread did not answer"))?
            .with_context(|| format!("creating node {name}"))?;
        Ok(Box::new(PwStream { id, tx: self.tx.clone() }))
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
}
