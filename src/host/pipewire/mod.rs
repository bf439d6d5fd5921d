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
//!
//! The daemon may go away (a restart, an upgrade, a crash) and come back:
//! the guests stay connected, their streams run on a fallback clock
//! (`host::fallback`) meanwhile, the thread reconnects with bounded
//! backoff, and every node is made again with its name and properties,
//! open streams continuing on it where the fallback clock left them.

mod graph;
mod node;
mod rt;

use crate::control::handoff::Handoff;
use crate::dma::DmaEngine;
use crate::host::fallback::FallbackClock;
use crate::host::slot::EngineSlot;
use crate::host::{HostBackend, HostNode, Shape, StreamSpec};
use crate::sndif::{PcmFormat, StreamKind};
use anyhow::{anyhow, Context};
use graph::{Graph, Kind};
use node::Node;
use pipewire as pw;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
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
/// While PipeWire is away: the first retry comes this soon, each next one
/// twice as late, up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

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
        cycle_frames: u32,
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
    /// Work that needs the thread's state (property updates, queries).
    Run(Box<dyn FnOnce(&State) + Send>),
    /// The connection of session `session` to the daemon broke.
    Lost {
        session: u64,
    },
    /// Try to connect to the daemon again.
    Reconnect,
    /// A desktop session handed over a connection to its daemon
    /// (`handoff`); None: it could not.
    Handed(Option<OwnedFd>),
}

/// How the PipeWire host connects and what it adds to every node.
#[derive(Debug, Clone, Default)]
pub struct PipeWireConfig {
    /// `PIPEWIRE_REMOTE`-style daemon name; None for the default.
    pub remote: Option<String>,
    /// Extra properties for every guest node (`serve --node-property`).
    pub node_props: Vec<(String, String)>,
    /// Set: never connect by name; use the connections desktop sessions
    /// hand over (`xen-vsnd session`, for the system service).
    pub handoff: Option<Arc<Handoff>>,
}

pub struct PipeWireHost {
    tx: pw::channel::Sender<Cmd>,
    next_id: AtomicU64,
}

impl PipeWireHost {
    /// Starts the PipeWire thread and connects to the daemon (`remote`:
    /// `PIPEWIRE_REMOTE` style name, or the default); a daemon that is not
    /// there yet is waited for (guest streams run on the fallback clock
    /// meanwhile).
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

    fn update_properties(&self, node_name: &str, props: Vec<(String, String)>) {
        let name = node_name.to_string();
        let _ = self.tx.send(Cmd::Run(Box::new(move |state| {
            for e in state.entries.borrow_mut().values_mut().filter(|e| e.spec.node_name == name) {
                for (k, v) in &props {
                    match e.spec.props.iter_mut().find(|(key, _)| key == k) {
                        Some(p) => p.1 = v.clone(),
                        None => e.spec.props.push((k.clone(), v.clone())),
                    }
                }
                if let Some(n) = &e.live {
                    n.update_properties(&props);
                }
            }
        })));
    }

    fn node_ids(&self) -> BTreeMap<String, u32> {
        let (reply, rx) = mpsc::sync_channel(1);
        let asked = self.tx.send(Cmd::Run(Box::new(move |state| {
            let ids = state
                .entries
                .borrow()
                .values()
                .filter_map(|e| Some((e.spec.node_name.clone(), e.live.as_ref()?.stream.node_id())))
                .filter(|(_, id)| *id != pw::spa::sys::SPA_ID_INVALID)
                .collect();
            let _ = reply.send(ids);
        })));
        if asked.is_err() {
            return BTreeMap::new();
        }
        rx.recv_timeout(REPLY_TIMEOUT).unwrap_or_default()
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
        let (id, shape, cycle_frames) = (self.id, Shape::of(&engine.geom), engine.geom.cycle_frames);
        ask(&self.tx, |reply| Cmd::Open { id, shape, cycle_frames, reply })?;
        self.slot.install(engine);
        Ok(())
    }

    fn stop(&mut self) {
        if self.slot.take().is_some() {
            let _ = self.tx.send(Cmd::Close { id: self.id });
        }
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

/// Sends `cmd` to the PipeWire thread once `delay` has passed.
fn send_after(tx: &pw::channel::Sender<Cmd>, delay: Duration, cmd: Cmd) {
    let tx = tx.clone();
    let _ = std::thread::Builder::new().name("pw-later".into()).spawn(move || {
        std::thread::sleep(delay);
        let _ = tx.send(cmd);
    });
}

/// A guest stream as the PipeWire thread keeps it: what it takes to build
/// its node again after the daemon restarts, and the node while connected.
struct Entry {
    spec: StreamSpec,
    slot: Arc<EngineSlot>,
    /// The open stream's shape and period (OPEN until CLOSE).
    open: Option<(Shape, u32)>,
    /// Bumped at every OPEN and CLOSE: a deactivation deferred at CLOSE
    /// applies only when nothing happened since.
    generation: u64,
    /// The node, while connected to the daemon.
    live: Option<Node>,
}

/// One connection to the daemon and what hangs on it.
struct Session {
    core: pw::core::CoreRc,
    _core_listener: pw::core::Listener,
    _registry: pw::registry::RegistryRc,
    _registry_listener: pw::registry::Listener,
}

/// The PipeWire thread's state.
struct State {
    context: pw::context::ContextRc,
    config: PipeWireConfig,
    to_self: pw::channel::Sender<Cmd>,
    entries: RefCell<HashMap<u64, Entry>>,
    graph: RefCell<Graph>,
    /// Our capture nodes, bound to follow their `node.driver-id`.
    watched: RefCell<HashMap<u32, (pw::node::Node, pw::node::NodeListener)>>,
    session: RefCell<Option<(u64, Session)>>,
    sessions: Cell<u64>,
    /// The next retry's delay while the daemon is away.
    retry: Cell<Duration>,
    /// A handoff thread is asking the sessions.
    asking: Cell<bool>,
    /// Runs the guest streams the daemon does not (away, not linked yet).
    fallback: FallbackClock,
}

impl State {
    fn connected(&self) -> bool {
        self.session.borrow().is_some()
    }

    /// Builds `e`'s node on the current connection, as the stream stands.
    fn build(&self, e: &mut Entry) -> anyhow::Result<()> {
        let session = self.session.borrow();
        let Some((_, s)) = session.as_ref() else { return Ok(()) };
        let mut n = Node::create(&s.core, e.spec.clone(), &self.config.node_props, e.slot.clone())?;
        if let Some((shape, period)) = e.open {
            n.open(shape, period)?;
        }
        e.live = Some(n);
        Ok(())
    }

    /// Recomputes every capture node's unreported latency from the graph.
    fn refresh_unreported(&self) {
        let graph = self.graph.borrow();
        for n in self.entries.borrow().values().filter_map(|e| e.live.as_ref()) {
            if n.kind != StreamKind::Capture {
                continue;
            }
            let c = graph.unreported_cycles(n.stream.node_id());
            if n.unreported_cycles.swap(c, Ordering::Relaxed) != c {
                tracing::debug!(node = n.stream.node_id(), cycles = c, "unreported latency changed");
            }
        }
    }

    fn handle(self: &Rc<Self>, cmd: Cmd) {
        match cmd {
            Cmd::Attach { id, spec, slot, reply } => {
                let mut e = Entry { spec, slot, open: None, generation: 0, live: None };
                self.build_or_wait(&mut e);
                self.fallback.add(id, e.slot.clone(), e.spec.kind);
                self.entries.borrow_mut().insert(id, e);
                self.refresh_unreported();
                let _ = reply.send(Ok(()));
            }
            Cmd::Open { id, shape, cycle_frames, reply } => {
                let r = match self.entries.borrow_mut().get_mut(&id) {
                    Some(e) => {
                        e.generation += 1;
                        e.open = Some((shape, cycle_frames));
                        match e.live.as_mut() {
                            Some(n) => {
                                if let Err(err) = n.open(shape, cycle_frames) {
                                    // The daemon went away a moment ago
                                    // (its news is still on its way), or
                                    // the node broke: make it again.
                                    tracing::warn!(node = %e.spec.node_name, "the node did not take the OPEN: {err:#}");
                                    if let Some(n) = e.live.take() {
                                        let _ = n.stream.disconnect();
                                    }
                                    self.build_or_wait(e);
                                }
                            }
                            None => self.build_or_wait(e),
                        }
                        Ok(())
                    }
                    None => Err(anyhow!("the node is gone")),
                };
                let _ = reply.send(r);
            }
            Cmd::Close { id } => {
                if let Some(e) = self.entries.borrow_mut().get_mut(&id) {
                    e.generation += 1;
                    e.open = None;
                    let generation = e.generation;
                    send_after(&self.to_self, IDLE_AFTER, Cmd::Deactivate { id, generation });
                }
            }
            Cmd::Deactivate { id, generation } => {
                if let Some(e) = self.entries.borrow_mut().get_mut(&id).filter(|e| e.generation == generation)
                {
                    if let Some(n) = e.live.as_mut() {
                        n.deactivate();
                    }
                }
            }
            Cmd::Detach { id } => {
                let playing = self
                    .entries
                    .borrow()
                    .get(&id)
                    .and_then(|e| e.live.as_ref())
                    .is_some_and(|n| n.active && n.kind == StreamKind::Playback);
                if playing {
                    send_after(&self.to_self, IDLE_AFTER, Cmd::Remove { id });
                } else {
                    self.remove(id);
                }
            }
            Cmd::Remove { id } => self.remove(id),
            Cmd::Run(work) => work(self),
            Cmd::Lost { session } => {
                if self.session.borrow().as_ref().is_some_and(|(n, _)| *n == session) {
                    self.disconnect();
                }
            }
            Cmd::Reconnect => self.reconnect(),
            Cmd::Handed(fd) => {
                self.asking.set(false);
                match fd {
                    Some(fd) if !self.connected() => {
                        let r = self.context.connect_fd_rc(fd, None).map_err(|e| anyhow!("{e}"));
                        self.connected_or_retry(r.and_then(|core| self.follow(core)));
                    }
                    Some(_) => {}
                    None => {
                        self.connected_or_retry(Err(anyhow!("no desktop session handed over its PipeWire")))
                    }
                }
            }
        }
    }

    fn remove(&self, id: u64) {
        let Some(e) = self.entries.borrow_mut().remove(&id) else { return };
        if let Some(n) = e.live {
            let _ = n.stream.disconnect();
        }
        self.fallback.remove(id);
    }

    /// Builds `e`'s node if the daemon is there; if that fails the stream
    /// waits without one (the fallback clock runs it when it is open) until
    /// its next OPEN or the next connection.
    fn build_or_wait(&self, e: &mut Entry) {
        if let Err(err) = self.build(e) {
            tracing::warn!(node = %e.spec.node_name, "making the node: {err:#}; trying again at the next OPEN");
        }
    }

    /// The daemon went away: every node goes with it, the guest streams
    /// run on the fallback clock, and reconnecting starts.
    fn disconnect(&self) {
        let mut entries = self.entries.borrow_mut();
        for e in entries.values_mut() {
            if let Some(n) = e.live.take() {
                let _ = n.stream.disconnect();
            }
        }
        let open = entries.values().filter(|e| e.open.is_some()).count();
        drop(entries);
        self.watched.borrow_mut().clear();
        *self.graph.borrow_mut() = Graph::default();
        *self.session.borrow_mut() = None;
        tracing::warn!(
            open_streams = open,
            "the PipeWire daemon went away: guest streams run on a fallback clock (their sound goes \
             nowhere) until it is back; reconnecting"
        );
        self.retry.set(RETRY_FIRST);
        send_after(&self.to_self, RETRY_FIRST, Cmd::Reconnect);
    }

    /// One attempt to reach the daemon; on success every node is built
    /// again (same name and properties) and open streams continue on it.
    fn reconnect(self: &Rc<Self>) {
        if self.connected() {
            return;
        }
        if let Some(h) = &self.config.handoff {
            // The sessions are asked off this thread (they may be slow to
            // answer); the answer comes back as `Handed`.
            if !self.asking.replace(true) {
                let (h, tx) = (h.clone(), self.to_self.clone());
                let spawned = std::thread::Builder::new().name("pw-handoff".into()).spawn(move || {
                    let _ = tx.send(Cmd::Handed(h.fetch()));
                });
                if spawned.is_err() {
                    self.asking.set(false);
                    self.connected_or_retry(Err(anyhow!("cannot spawn a thread")));
                }
            }
            return;
        }
        let r = self.connect();
        self.connected_or_retry(r);
    }

    /// After an attempt to connect: on success every node is built again,
    /// else the next attempt is scheduled.
    fn connected_or_retry(self: &Rc<Self>, r: anyhow::Result<()>) {
        match r {
            Ok(()) => {
                let mut entries = self.entries.borrow_mut();
                for e in entries.values_mut() {
                    self.build_or_wait(e);
                }
                let rebuilt = entries.values().filter(|e| e.live.is_some()).count();
                drop(entries);
                self.refresh_unreported();
                tracing::info!(
                    nodes = rebuilt,
                    "connected to the PipeWire daemon again; guest nodes re-created"
                );
            }
            Err(e) => {
                let delay = self.retry.get();
                tracing::debug!(retry_in = ?delay, "PipeWire daemon not reachable yet: {e:#}");
                self.retry.set((delay * 2).min(RETRY_MAX));
                send_after(&self.to_self, delay, Cmd::Reconnect);
            }
        }
    }

    /// Connects to the daemon by name and follows its registry.
    fn connect(self: &Rc<Self>) -> anyhow::Result<()> {
        let props = self
            .config
            .remote
            .as_ref()
            .map(|r| pw::properties::properties! { *pw::keys::REMOTE_NAME => r.as_str() });
        let core = self.context.connect_rc(props).map_err(|e| {
            anyhow!(
                "connecting to the PipeWire daemon: {e} (is PipeWire running for this user? \
                 XDG_RUNTIME_DIR/PIPEWIRE_RUNTIME_DIR and PIPEWIRE_REMOTE select the daemon)"
            )
        })?;
        self.follow(core)
    }

    /// Makes `core` the current session: its loss is noticed, its
    /// registry followed.
    fn follow(self: &Rc<Self>, core: pw::core::CoreRc) -> anyhow::Result<()> {
        let number = self.sessions.get() + 1;
        self.sessions.set(number);
        let to_self = self.to_self.clone();
        let core_listener = core
            .add_listener_local()
            .error(move |id, seq, res, msg| {
                if id == pw::core::PW_ID_CORE && res == -libc::EPIPE {
                    let _ = to_self.send(Cmd::Lost { session: number });
                } else {
                    tracing::warn!(id, seq, res, "PipeWire: {msg}");
                }
            })
            .register();
        let registry = core.get_registry_rc().context("PipeWire registry")?;
        let registry_listener = self.follow_registry(&registry);
        *self.session.borrow_mut() = Some((
            number,
            Session {
                core,
                _core_listener: core_listener,
                _registry: registry,
                _registry_listener: registry_listener,
            },
        ));
        Ok(())
    }

    /// Mirrors the registry into `graph` and follows the driver of each of
    /// our capture nodes.
    fn follow_registry(self: &Rc<Self>, registry: &pw::registry::RegistryRc) -> pw::registry::Listener {
        let (on_global, on_remove, reg) = (Rc::downgrade(self), Rc::downgrade(self), registry.clone());
        registry
            .add_listener_local()
            .global(move |obj| {
                let Some(state) = on_global.upgrade() else { return };
                let kind = match obj.type_ {
                    pw::types::ObjectType::Node => Kind::Node,
                    pw::types::ObjectType::Port => Kind::Port,
                    pw::types::ObjectType::Link => Kind::Link,
                    _ => Kind::Other,
                };
                let lookup = |k: &str| obj.props.and_then(|p| p.get(k)).map(str::to_string);
                state.graph.borrow_mut().add(obj.id, kind, &lookup);
                let ours = lookup("node.name").is_some_and(|n| n.starts_with("xen-vsnd."))
                    && lookup("media.class").as_deref() == Some("Stream/Input/Audio");
                if kind == Kind::Node && ours {
                    if let Ok(node) = reg.bind::<pw::node::Node, _>(obj) {
                        let (weak, id) = (Rc::downgrade(&state), obj.id);
                        let listener = node
                            .add_listener_local()
                            .info(move |info| {
                                // Properties come only with the events that change them.
                                if !info.change_mask().contains(pw::node::NodeChangeMask::PROPS) {
                                    return;
                                }
                                let Some(state) = weak.upgrade() else { return };
                                let driver = info
                                    .props()
                                    .and_then(|p| p.get("node.driver-id"))
                                    .and_then(|v| v.parse().ok());
                                tracing::debug!(node = id, ?driver, "capture node driver");
                                state.graph.borrow_mut().set_driver(id, driver);
                                state.refresh_unreported();
                            })
                            .register();
                        state.watched.borrow_mut().insert(obj.id, (node, listener));
                    }
                }
                state.refresh_unreported();
            })
            .global_remove(move |id| {
                let Some(state) = on_remove.upgrade() else { return };
                state.watched.borrow_mut().remove(&id);
                state.graph.borrow_mut().remove(id);
                state.refresh_unreported();
            })
            .register()
    }
}

fn run_loop(
    config: PipeWireConfig,
    ready: &mpsc::SyncSender<anyhow::Result<pw::channel::Sender<Cmd>>>,
) -> anyhow::Result<()> {
    pw::init();
    let mainloop = pw::main_loop::MainLoopRc::new(None).context("PipeWire main loop")?;
    let context = pw::context::ContextRc::new(&mainloop, None).context("PipeWire context")?;
    let (tx, rx) = pw::channel::channel::<Cmd>();
    let fallback = FallbackClock::start("vsnd-fallback").context("starting the fallback clock")?;
    let state = Rc::new(State {
        context,
        config,
        to_self: tx.clone(),
        entries: RefCell::default(),
        graph: RefCell::default(),
        watched: RefCell::default(),
        session: RefCell::new(None),
        sessions: Cell::new(0),
        retry: Cell::new(RETRY_FIRST),
        asking: Cell::new(false),
        fallback,
    });
    if let Some(h) = &state.config.handoff {
        // A session that comes while none is connected is asked at once.
        let tx2 = tx.clone();
        h.on_offer(move || {
            let _ = tx2.send(Cmd::Reconnect);
        });
        tracing::info!(
            "waiting for a desktop session to hand over its PipeWire (xen-vsnd session);              guest streams run on a fallback clock meanwhile"
        );
        let _ = tx.send(Cmd::Reconnect);
    } else if let Err(e) = state.connect() {
        // A daemon that is not there yet (xen-vsnd started first, PipeWire
        // restarting) is waited for: guests connect and run meanwhile.
        tracing::warn!(
            "{e:#}; guest streams run on a fallback clock (their sound goes nowhere) until it is reachable"
        );
        send_after(&tx, RETRY_FIRST, Cmd::Reconnect);
    }
    let handler = state.clone();
    let _attached = rx.attach(mainloop.loop_(), move |cmd| handler.handle(cmd));
    ready.send(Ok(tx)).map_err(|_| anyhow!("caller gone"))?;
    mainloop.run();
    Ok(())
}
