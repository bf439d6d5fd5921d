//! The JACK host: each guest stream is a JACK client of its own, named after
//! the stream (`xen-vsnd.work-vm.0.0.playback`), with one port per channel
//! (`output_FL`, `input_FR`, ...: the names PipeWire gives its ports). The
//! JACK period drives the guest as PipeWire's quantum does, and the latency
//! JACK reports for the ports is the delay sent to the guest. JACK neither
//! resamples nor converts, so a guest stream runs at the server's rate and
//! its samples are converted to and from JACK's floats here.
//!
//! The server is libjack's default, or the one `JACK_DEFAULT_SERVER` names.
//! When it goes away the guest streams keep running on a fallback clock
//! (`fallback`), and when it comes back, at whatever rate, every stream's
//! client is made again with its name, ports and connections; an open
//! stream at a rate the server no longer runs ends with an error for the
//! guest (`DmaShared::host_gone`), and the next OPEN must take the new rate.

use super::convert::{from_f32, to_f32};
use super::fallback::FallbackClock;
use super::punctuality::{frames_ns, Punctuality};
use super::slot::EngineSlot;
use super::{channel_names, HostBackend, HostNode, StreamSpec};
use crate::dma::histogram::now_ns;
use crate::dma::{DmaEngine, DmaShared};
use crate::sndif::{PcmFormat, StreamKind};
use anyhow::{anyhow, bail, Context};
use jack::PortSpec;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Longest JACK client name (`jack_client_name_size()` less the NUL).
const MAX_CLIENT_NAME: usize = 63;
/// Largest JACK period the scratch buffer is made for before the first
/// `buffer_size` callback says the real one.
const INITIAL_FRAMES: usize = 8192;
/// Largest sample of any wire format (float64).
const MAX_SAMPLE_BYTES: usize = 8;

#[derive(Debug, Clone, Default)]
pub struct JackConfig {
    pub connect: JackConnect,
}

/// Where a new stream's ports are connected, channel by channel: playback
/// outputs to input ports, capture inputs from output ports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum JackConnect {
    /// The server's physical ports, as JACK applications usually do.
    #[default]
    Physical,
    /// The ports whose full names match this regular expression (JACK's
    /// own port search), in the server's order.
    Matching(String),
    /// Nowhere: connect them yourself (qjackctl, jack_connect, a patchbay).
    Nowhere,
}

pub struct JackHost {
    server: Arc<Server>,
    supervisor: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

/// The JACK server as every stream sees it.
struct Server {
    config: JackConfig,
    /// The server's sample rate; 0 while it is away.
    rate: AtomicU32,
    /// Every stream's shared state, to re-create its client when the
    /// server comes back.
    nodes: Mutex<Vec<Weak<NodeShared>>>,
    next_id: AtomicU64,
    /// Runs the guest streams the server does not (while it is away, and
    /// one whose rate it no longer runs at, until the guest closes it).
    fallback: FallbackClock,
}

/// While the server is away, the first retry comes this soon, each next
/// one twice as late, up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How often the supervisor looks whether the server went away.
const WATCH_EVERY: Duration = Duration::from_millis(50);

impl JackHost {
    /// Checks that a JACK server answers and learns its sample rate; from
    /// then on follows it: when it goes away the guest streams run on a
    /// fallback clock, and when it comes back (at whatever rate) every
    /// stream's client is made again.
    pub fn start(config: JackConfig) -> anyhow::Result<JackHost> {
        jack::set_logger(jack::LoggerType::Custom { info: jack_info, error: jack_error });
        let (probe, lost) = watch().context("connecting to the JACK server")?;
        let server = Arc::new(Server {
            config,
            rate: AtomicU32::new(0),
            nodes: Mutex::default(),
            next_id: AtomicU64::new(1),
            fallback: FallbackClock::start("jack-fallback").context("starting the fallback clock")?,
        });
        server.rate.store(probe.as_client().sample_rate(), Ordering::SeqCst);
        tracing::info!(
            rate = probe.as_client().sample_rate(),
            buffer = probe.as_client().buffer_size(),
            "JACK server"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (server.clone(), stop.clone());
        let supervisor = std::thread::Builder::new()
            .name("jack-watch".into())
            .spawn(move || supervise(&s, probe, lost, &st))
            .context("spawning the JACK supervisor")?;
        Ok(JackHost { server, supervisor: Some(supervisor), stop })
    }
}

impl Drop for JackHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
    }
}

/// Tells the supervisor that the server shut this client down.
struct Watch(Arc<AtomicBool>);

impl jack::NotificationHandler for Watch {
    unsafe fn shutdown(&mut self, _status: jack::ClientStatus, _reason: &str) {
        // Async-signal-safe: a store.
        self.0.store(true, Ordering::SeqCst);
    }
}

type Probe = jack::AsyncClient<Watch, ()>;

/// An active client that only watches the server: its shutdown callback
/// says when the server goes away.
fn watch() -> anyhow::Result<(Probe, Arc<AtomicBool>)> {
    let (client, _) =
        jack::Client::new("xen-vsnd", jack::ClientOptions::NO_START_SERVER).map_err(|e| anyhow!("{e:?}"))?;
    let lost = Arc::new(AtomicBool::new(false));
    let probe = client.activate_async(Watch(lost.clone()), ()).map_err(|e| anyhow!("{e:?}"))?;
    Ok((probe, lost))
}

/// The supervisor thread: waits for the server to go away, lets every
/// stream's client go (the fallback clock runs the open streams, which no
/// cycle reaches any more), reconnects with bounded backoff, and makes
/// every stream's client again.
fn supervise(server: &Server, probe: Probe, lost: Arc<AtomicBool>, stop: &AtomicBool) {
    let (mut probe, mut lost) = (Some(probe), lost);
    loop {
        while !lost.load(Ordering::SeqCst) {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(WATCH_EVERY);
        }
        SERVER_AWAY.store(true, Ordering::Relaxed);
        server.rate.store(0, Ordering::SeqCst);
        let nodes = server.live_nodes();
        tracing::warn!(
            streams = nodes.len(),
            "the JACK server went away: guest streams run on a fallback clock (their sound goes \
             nowhere) until it is back; reconnecting"
        );
        for n in &nodes {
            n.lose();
        }
        // The dead server's clients: closing them only frees them here.
        drop(probe.take());
        let mut retry = RETRY_FIRST;
        let (p, l) = loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(retry);
            match watch() {
                Ok(v) => break v,
                Err(e) => {
                    tracing::debug!(?retry, "JACK server not reachable yet: {e:#}");
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        };
        SERVER_AWAY.store(false, Ordering::Relaxed);
        let rate = p.as_client().sample_rate();
        (probe, lost) = (Some(p), l);
        server.rate.store(rate, Ordering::SeqCst);
        let nodes = server.live_nodes();
        for n in &nodes {
            n.rebuild(server, rate);
        }
        tracing::info!(rate, streams = nodes.len(), "the JACK server is back; guest clients made again");
    }
}

impl Server {
    /// The streams still attached (forgetting the others).
    fn live_nodes(&self) -> Vec<Arc<NodeShared>> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.retain(|w| w.strong_count() > 0);
        nodes.iter().filter_map(Weak::upgrade).collect()
    }
}

impl HostBackend for JackHost {
    fn supports(&self, _format: PcmFormat) -> bool {
        true // every wire format converts to and from floats
    }

    /// The server's rate now (JACK does not resample); none while it is
    /// away.
    fn supports_rate(&self, rate: u32) -> bool {
        rate == self.server.rate.load(Ordering::SeqCst)
    }

    /// The stream's JACK client, with a port for each of its channels, for
    /// the life of its connection: connections made to it survive OPENs.
    fn attach(&self, spec: StreamSpec) -> anyhow::Result<Box<dyn HostNode>> {
        let ports = spec.initial.channels;
        let node = Arc::new(NodeShared {
            id: self.server.next_id.fetch_add(1, Ordering::Relaxed),
            spec,
            slot: Arc::new(EngineSlot::default()),
            state: Mutex::default(),
        });
        match self.server.rate.load(Ordering::SeqCst) {
            0 => {} // made when the server is back
            rate => node.lock().client = Some(node.make_client(&self.server.config, rate)?),
        }
        self.server.fallback.add(node.id, node.slot.clone(), node.spec.kind);
        self.server.nodes.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&node));
        Ok(Box::new(JackNode { node, server: self.server.clone(), ports }))
    }
}

/// What a stream's request thread and the supervisor share.
struct NodeShared {
    id: u64,
    spec: StreamSpec,
    slot: Arc<EngineSlot>,
    state: Mutex<NodeState>,
}

#[derive(Default)]
struct NodeState {
    /// The client, while the server is there.
    client: Option<ActiveClient>,
    /// The open stream's rate, counters and flags (OPEN until CLOSE).
    open: Option<(u32, Arc<DmaShared>)>,
}

impl NodeShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server went away: the client goes (the fallback clock runs an
    /// open stream meanwhile).
    fn lose(&self) {
        drop(self.lock().client.take());
    }

    /// The server is back at `rate`: the client again (same name, ports
    /// and connections), the open stream on it when it runs at that rate;
    /// one at another rate ends (`DmaShared::host_gone`; the fallback clock
    /// runs it until the guest closes it) and its next OPEN must take the
    /// server's rate.
    fn rebuild(&self, server: &Server, rate: u32) {
        let mut state = self.lock();
        match self.make_client(&server.config, rate) {
            Ok(c) => state.client = Some(c),
            Err(e) => {
                tracing::warn!(stream = %self.spec.node_name, "making the JACK client again: {e:#}");
                return;
            }
        }
        if let Some((stream_rate, shared)) = state.open.as_ref().filter(|(r, _)| *r != rate) {
            tracing::warn!(
                stream = %self.spec.node_name,
                stream_rate,
                server_rate = rate,
                "the JACK server came back at another rate: the open stream ends (its next WRITE, \
                 READ or START fails with -EIO, so the guest opens it again at the server's rate; \
                 until then it runs on the fallback clock)"
            );
            shared.host_gone.store(true, Ordering::Release);
        }
    }

    /// The stream's client at the server's `rate`, active and connected.
    fn make_client(&self, config: &JackConfig, rate: u32) -> anyhow::Result<ActiveClient> {
        let name = client_name(&self.spec.node_name);
        let (client, _) = jack::Client::new(&name, jack::ClientOptions::NO_START_SERVER)
            .map_err(|e| anyhow!("{e:?}"))
            .with_context(|| format!("opening JACK client {name}"))?;
        let names = channel_names(self.spec.initial.channels);
        let ports = match self.spec.kind {
            StreamKind::Playback => {
                Ports::Out(register(&client, &names, "output", jack::AudioOut::default())?)
            }
            StreamKind::Capture => Ports::In(register(&client, &names, "input", jack::AudioIn::default())?),
        };
        let rt = JackRt {
            slot: self.slot.clone(),
            rate,
            ports,
            scratch: vec![0; INITIAL_FRAMES * names.len() * MAX_SAMPLE_BYTES],
            punctuality: Punctuality::default(),
        };
        let active = client.activate_async((), rt).map_err(|e| anyhow!("{e:?}")).context("activating")?;
        autoconnect(active.as_client(), &config.connect, self.spec.kind, &name, &names);
        tracing::debug!(client = name, "JACK client up");
        Ok(ActiveClient(Some(active)))
    }
}

/// A guest stream's JACK client, seen from its request thread.
struct JackNode {
    node: Arc<NodeShared>,
    server: Arc<Server>,
    ports: u32,
}

impl HostNode for JackNode {
    fn start(&mut self, engine: DmaEngine) -> anyhow::Result<()> {
        let g = engine.geom;
        let mut state = self.node.lock();
        let rate = self.server.rate.load(Ordering::SeqCst);
        if rate == 0 {
            bail!("the JACK server is away");
        }
        if g.rate != rate {
            bail!("the JACK server runs at {rate} Hz, the guest stream at {}", g.rate);
        }
        if g.channels > self.ports {
            bail!("{} channels, the client has {} ports", g.channels, self.ports);
        }
        state.open = Some((g.rate, engine.shared.clone()));
        self.node.slot.install(engine);
        Ok(())
    }

    fn stop(&mut self) {
        drop(self.node.slot.take());
        self.node.lock().open = None;
    }
}

impl Drop for JackNode {
    fn drop(&mut self) {
        // The engine first (deactivating the client may wait for the
        // server).
        drop(self.node.slot.take());
        drop(self.node.lock().client.take());
        self.server.fallback.remove(self.node.id);
    }
}

/// The text of a message libjack hands over.
///
/// # Safety
/// `msg` is null or a NUL-terminated string that lives for the call.
unsafe fn jack_message(msg: *const libc::c_char) -> String {
    if msg.is_null() {
        return String::new();
    }
    // SAFETY: as the caller promises.
    unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy().into_owned()
}

/// libjack's informational messages, at debug level.
unsafe extern "C" fn jack_info(msg: *const libc::c_char) {
    // SAFETY: libjack passes a message string valid for the call.
    let text = unsafe { jack_message(msg) };
    let _ = std::panic::catch_unwind(|| tracing::debug!(target: "jack", "{text}"));
}

/// Set while the server is away: what libjack says then about every
/// client it cannot reach and every connection attempt it cannot make is
/// expected (the supervisor logs the outage once).
static SERVER_AWAY: AtomicBool = AtomicBool::new(false);

/// libjack's error messages. Closing a client through the bindings clears
/// its thread-init callback, which libjack reports as an error although
/// nothing failed: that one goes to debug, as everything while the server
/// is away.
unsafe extern "C" fn jack_error(msg: *const libc::c_char) {
    // SAFETY: libjack passes a message string valid for the call.
    let text = unsafe { jack_message(msg) };
    let _ = std::panic::catch_unwind(|| {
        if text.contains("SetInitCallback") || SERVER_AWAY.load(Ordering::Relaxed) {
            tracing::debug!(target: "jack", "{text}");
        } else {
            tracing::error!(target: "jack", "{text}");
        }
    });
}

/// A JACK client name for a stream, cut to JACK's limit.
fn client_name(node_name: &str) -> String {
    let mut end = node_name.len().min(MAX_CLIENT_NAME);
    while !node_name.is_char_boundary(end) {
        end -= 1;
    }
    node_name[..end].to_owned()
}

fn register<PS: jack::PortSpec + Clone>(
    client: &jack::Client,
    names: &[String],
    prefix: &str,
    spec: PS,
) -> anyhow::Result<Vec<jack::Port<PS>>> {
    names
        .iter()
        .map(|ch| {
            client
                .register_port(&format!("{prefix}_{ch}"), spec.clone())
                .map_err(|e| anyhow!("{e:?}"))
                .with_context(|| format!("registering port {prefix}_{ch}"))
        })
        .collect()
}

/// Connects channel i to the i-th port `connect` chooses.
fn autoconnect(
    client: &jack::Client,
    connect: &JackConnect,
    kind: StreamKind,
    name: &str,
    channels: &[String],
) {
    let (mut flags, prefix) = match kind {
        StreamKind::Playback => (jack::PortFlags::IS_INPUT, "output"),
        StreamKind::Capture => (jack::PortFlags::IS_OUTPUT, "input"),
    };
    let pattern = match connect {
        JackConnect::Nowhere => return,
        JackConnect::Physical => {
            flags |= jack::PortFlags::IS_PHYSICAL;
            None
        }
        JackConnect::Matching(p) => Some(p.as_str()),
    };
    let targets = client.ports(pattern, Some(jack::AudioIn::default().jack_port_type()), flags);
    // Never our own ports (a pattern may match them).
    let own = format!("{name}:");
    let targets = targets.iter().filter(|p| !p.starts_with(&own));
    for (ch, other) in channels.iter().zip(targets) {
        let ours = format!("{name}:{prefix}_{ch}");
        let result = match kind {
            StreamKind::Playback => client.connect_ports_by_name(&ours, other),
            StreamKind::Capture => client.connect_ports_by_name(other, &ours),
        };
        if let Err(e) = result {
            tracing::warn!(port = ours, other, "JACK autoconnect: {e:?}");
        }
    }
}

enum Ports {
    Out(Vec<jack::Port<jack::AudioOut>>),
    In(Vec<jack::Port<jack::AudioIn>>),
}

/// State owned by the JACK process callback.
struct JackRt {
    /// The engine while the guest stream is open.
    slot: Arc<EngineSlot>,
    /// The server's rate when the client was made: an engine at another
    /// one is not run here (the fallback clock runs it).
    rate: u32,
    ports: Ports,
    /// One period of interleaved guest-format frames, room for every port
    /// at the widest sample; sized in `buffer_size`, which JACK calls
    /// before the first cycle and whenever the period changes (allocating
    /// there is allowed).
    scratch: Vec<u8>,
    punctuality: Punctuality,
}

impl jack::ProcessHandler for JackRt {
    fn process(&mut self, client: &jack::Client, ps: &jack::ProcessScope) -> jack::Control {
        let JackRt { slot, rate, ports, scratch, punctuality } = self;
        let ran = slot.with(|engine| {
            if engine.geom.rate != *rate {
                // Not run here: leave the stream to the fallback clock.
                return false;
            }
            slot.host_cycle();
            let start = now_ns();
            let frames = ps.n_frames() as usize;
            let format = engine.geom.format;
            let (channels, sample) = (engine.geom.channels as usize, format.sample_bytes());
            let bytes = frames * channels * sample;
            if bytes > scratch.len() {
                // Cannot happen (buffer_size came first); never panic here.
                return false;
            }
            let scratch = &mut scratch[..bytes];
            match ports {
                Ports::Out(ports) => {
                    let delay = max_latency(ports, jack::LatencyType::Playback);
                    engine.playback_cycle(scratch, delay);
                    for (c, port) in ports.iter_mut().enumerate() {
                        let out = port.as_mut_slice(ps);
                        if c >= channels {
                            out.fill(0.0);
                            continue;
                        }
                        for (f, o) in out.iter_mut().enumerate() {
                            let at = (f * channels + c) * sample;
                            *o = to_f32(format, &scratch[at..at + sample]);
                        }
                    }
                }
                Ports::In(ports) => {
                    for (c, port) in ports.iter().enumerate().take(channels) {
                        for (f, v) in port.as_slice(ps).iter().enumerate() {
                            let at = (f * channels + c) * sample;
                            from_f32(format, *v, &mut scratch[at..at + sample]);
                        }
                    }
                    let delay = max_latency(ports, jack::LatencyType::Capture);
                    engine.capture_cycle(scratch, delay);
                }
            }
            engine.shared.cycle_time.record(now_ns().saturating_sub(start));
            // JACK's clock is microseconds on the monotonic clock.
            let timing =
                ps.cycle_times().ok().map(|t| (t.current_usecs * 1000, frames_ns(frames, engine.geom.rate)));
            punctuality.account(&engine.shared, timing, client.time() * 1000);
            true
        });
        if ran != Some(true) {
            // Closed (or not yet open): silence, as a card plays.
            punctuality.pause();
            if let Ports::Out(ports) = ports {
                for p in ports {
                    p.as_mut_slice(ps).fill(0.0);
                }
            }
        }
        jack::Control::Continue
    }

    fn buffer_size(&mut self, _: &jack::Client, frames: jack::Frames) -> jack::Control {
        let channels = match &self.ports {
            Ports::Out(p) => p.len(),
            Ports::In(p) => p.len(),
        };
        let bytes = frames as usize * channels * MAX_SAMPLE_BYTES;
        if self.scratch.len() < bytes {
            self.scratch.resize(bytes, 0);
        }
        jack::Control::Continue
    }
}

/// The largest latency JACK reports for any of the ports, in frames.
fn max_latency<PS>(ports: &[jack::Port<PS>], mode: jack::LatencyType) -> u32 {
    ports.iter().map(|p| p.get_latency_range(mode).1).max().unwrap_or(0)
}

/// The stream's active client, deactivated on drop.
struct ActiveClient(Option<jack::AsyncClient<(), JackRt>>);

impl Drop for ActiveClient {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            if let Err(e) = c.deactivate() {
                if SERVER_AWAY.load(Ordering::Relaxed) {
                    tracing::debug!("JACK client deactivation: {e:?}");
                } else {
                    tracing::warn!("JACK client deactivation: {e:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_names_fit_jack() {
        assert_eq!(client_name("xen-vsnd.vm.0.0.playback"), "xen-vsnd.vm.0.0.playback");
        let long = format!("xen-vsnd.{}.0.0.playback", "é".repeat(40));
        let n = client_name(&long);
        assert!(n.len() <= MAX_CLIENT_NAME && long.starts_with(&n), "{n}");
    }
}
