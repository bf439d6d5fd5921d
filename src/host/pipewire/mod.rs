//! PipeWire host: one node (`pw_stream`) per connected guest stream, all
//! owned by one thread that runs the PipeWire main loop. Other threads talk
//! to it through a `pipewire::channel`; the engine reaches the node's
//! real-time callback through an `EngineSlot`, never through that thread.
//!
//! - `node`: a node's life on the PipeWire thread (create, renegotiate at
//!   OPEN, activate, deactivate, remove);
//! - `rt`: the real-time cycle (PipeWire's data thread, `RT_PROCESS`);
//! - `graph`: the registry mirror, for the one latency PipeWire does not
//!   report.
//!
//! A node lives as long as the guest stream's connection: links made to
//! it (pw-link, qpwgraph, WirePlumber) survive the guest's OPENs and
//! CLOSEs. Between CLOSE and the next OPEN it plays silence for a moment
//! (the graph still carries the last cycle's frames), then is inactive:
//! not scheduled, not driving the graph, keeping no sink awake.

mod graph;
mod node;
mod rt;

use crate::dma::DmaEngine;
use crate::host::slot::EngineSlot;
use crate::host::{HostBackend, HostNode, Shape, StreamSpec};
use crate::sndif::{PcmFormat, StreamKind};
use anyhow::{anyhow, Context};
use graph::{Graph, Kind};
use node::Node;
use pipewire as pw;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// How long a caller waits for the PipeWire thread to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// A closed stream's node stays active this long, playing silence, so the
/// graph plays out the last cycle's frames; then it is deactivated.
const IDLE_AFTER: Duration = Duration::from_millis(500);

enum Cmd {
    Attach {
        id: u64,
        spec: StreamSpec,
        slot: Arc<EngineSlot>,
        reply: mpsc::SyncSender<anyhow::Result<()>>,
    },
    /// OPEN: the node takes the guest's format and period, and activates.
    Open {
        id: u64,
        shape: Shape,
        period_frames: u32,
        reply: mpsc::SyncSender<anyhow::Result<()>>,
    },
    /// CLOSE: deactivate after `IDLE_AFTER` unless the stream opens again.
    Close {
        id: u64,
    },
    Deactivate {
        id: u64,
        generation: u64,
    },
    /// The guest stream's connection is gone: remove the node, after
    /// `IDLE_AFTER` if it was playing (the graph still carries its last
    /// cycle: a guest that closes and disconnects at once, as a VM that
    /// shuts down after a sound, would lose it).
    Detach {
        id: u64,
    },
    Remove {
        id: u64,
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

/// Sends `cmd` made with a reply channel and waits for the answer.
fn ask(
    tx: &pw::channel::Sender<Cmd>,
    cmd: impl FnOnce(mpsc::SyncSender<anyhow::Result<()>>) -> Cmd,
) -> anyhow::Result<()> {
    let (reply, rx) = mpsc::sync_channel(1);
    tx.send(cmd(reply)).map_err(|_| anyhow!("PipeWire thread is gone"))?;
    rx.recv_timeout(REPLY_TIMEOUT).map_err(|_| anyhow!("PipeWire thread did not answer"))?
}

impl HostBackend for PipeWireHost {
    fn supports(&self, format: PcmFormat) -> bool {
        node::spa_format(format).is_some()
    }

    fn attach(&self, spec: StreamSpec) -> anyhow::Result<Box<dyn HostNode>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(EngineSlot::default());
        let name = spec.node_name.clone();
        ask(&self.tx, |reply| Cmd::Attach { id, spec, slot: slot.clone(), reply })
            .with_context(|| format!("creating node {name}"))?;
        Ok(Box::new(PwNode { id, tx: self.tx.clone(), slot }))
    }
}

/// A guest stream's node, seen from the stream's request thread.
struct PwNode {
    id: u64,
    tx: pw::channel::Sender<Cmd>,
    slot: Arc<EngineSlot>,
}

impl HostNode for PwNode {
    fn start(&mut self, engine: DmaEngine) -> anyhow::Result<()> {
        drop(self.slot.take());
        let (id, shape, period_frames) = (self.id, Shape::of(&engine.geom), engine.geom.period_frames());
        ask(&self.tx, |reply| Cmd::Open { id, shape, period_frames, reply })?;
        self.slot.install(engine);
        Ok(())
    }

    fn stop(&mut self) {
        if self.slot.take().is_some() {
            let _ = self.tx.send(Cmd::Close { id: self.id });
        }
    }

    fn set_volume(&self, gains: Vec<f32>) {
        let _ = self.tx.send(Cmd::Volume { id: self.id, gains });
    }
}

impl Drop for PwNode {
    /// The engine is let go of here; the node is removed by the PipeWire
    /// thread afterwards, with nothing of the guest left to touch.
    fn drop(&mut self) {
        drop(self.slot.take());
        let _ = self.tx.send(Cmd::Detach { id: self.id });
    }
}

/// Sends `cmd` to the PipeWire thread once `IDLE_AFTER` has passed.
fn after_idle(tx: &pw::channel::Sender<Cmd>, cmd: Cmd) {
    let tx = tx.clone();
    let _ = std::thread::Builder::new().name("pw-idle".into()).spawn(move || {
        std::thread::sleep(IDLE_AFTER);
        let _ = tx.send(cmd);
    });
}

/// Recomputes every capture node's unreported latency from the graph.
fn refresh_unreported(nodes: &RefCell<HashMap<u64, Node>>, graph: &RefCell<Graph>) {
    let graph = graph.borrow();
    for n in nodes.borrow().values().filter(|n| n.kind == StreamKind::Capture) {
        let c = graph.unreported_cycles(n.stream.node_id());
        if n.unreported_cycles.swap(c, Ordering::Relaxed) != c {
            tracing::debug!(node = n.stream.node_id(), cycles = c, "unreported latency changed");
        }
    }
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
    let nodes: Rc<RefCell<HashMap<u64, Node>>> = Rc::default();
    let graph: Rc<RefCell<Graph>> = Rc::default();
    let registry = core.get_registry_rc().context("PipeWire registry")?;
    // Our capture nodes, bound to follow their `node.driver-id`.
    let watched: Rc<RefCell<HashMap<u32, (pw::node::Node, pw::node::NodeListener)>>> = Rc::default();
    let (n1, g1, n2, g2, w1, w2, reg) = (
        nodes.clone(),
        graph.clone(),
        nodes.clone(),
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
                    let (n, g, id) = (n1.clone(), g1.clone(), obj.id);
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
                            refresh_unreported(&n, &g);
                        })
                        .register();
                    w1.borrow_mut().insert(obj.id, (node, listener));
                }
            }
            refresh_unreported(&n1, &g1);
        })
        .global_remove(move |id| {
            w2.borrow_mut().remove(&id);
            g2.borrow_mut().remove(id);
            refresh_unreported(&n2, &g2);
        })
        .register();
    let core2 = core.clone();
    let _attached = rx.attach(mainloop.loop_(), move |cmd| match cmd {
        Cmd::Attach { id, spec, slot, reply } => {
            let r = Node::create(&core2, spec, &config.node_props, slot).map(|n| {
                nodes.borrow_mut().insert(id, n);
            });
            refresh_unreported(&nodes, &graph);
            let _ = reply.send(r);
        }
        Cmd::Open { id, shape, period_frames, reply } => {
            let r = match nodes.borrow_mut().get_mut(&id) {
                Some(n) => n.open(shape, period_frames),
                None => Err(anyhow!("the node is gone")),
            };
            let _ = reply.send(r);
        }
        Cmd::Close { id } => {
            if let Some(n) = nodes.borrow_mut().get_mut(&id) {
                let generation = n.close();
                after_idle(&to_self, Cmd::Deactivate { id, generation });
            }
        }
        Cmd::Deactivate { id, generation } => {
            if let Some(n) = nodes.borrow_mut().get_mut(&id).filter(|n| n.generation == generation) {
                n.deactivate();
            }
        }
        Cmd::Detach { id } => {
            let playing = nodes.borrow().get(&id).is_some_and(|n| n.active && n.kind == StreamKind::Playback);
            if playing {
                after_idle(&to_self, Cmd::Remove { id });
            } else if let Some(n) = nodes.borrow_mut().remove(&id) {
                let _ = n.stream.disconnect();
            }
        }
        Cmd::Remove { id } => {
            if let Some(n) = nodes.borrow_mut().remove(&id) {
                let _ = n.stream.disconnect();
            }
        }
        Cmd::Volume { id, gains } => {
            if let Some(n) = nodes.borrow().get(&id) {
                let _ = n.stream.set_control(pw::spa::sys::SPA_PROP_channelVolumes, &gains);
                *n.gains.borrow_mut() = Some(gains);
            }
        }
    });
    ready.send(Ok(tx)).map_err(|_| anyhow!("caller gone"))?;
    mainloop.run();
    Ok(())
}
