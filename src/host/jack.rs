//! The JACK host: each guest stream is a JACK client of its own, named after
//! the stream (`xen-vsnd.work-vm.0.0.playback`), with one port per channel
//! (`output_FL`, `input_FR`, ...: the names PipeWire gives its ports). The
//! JACK period drives the guest as PipeWire's quantum does, and the latency
//! JACK reports for the ports is the delay sent to the guest. JACK neither
//! resamples nor converts, so a guest stream runs at the server's rate and
//! its samples are converted to and from JACK's floats here.
//!
//! The server is libjack's default, or the one `JACK_DEFAULT_SERVER` names.

use super::convert::{from_f32, to_f32};
use super::gains::ChannelGains;
use super::punctuality::{frames_ns, Punctuality};
use super::slot::EngineSlot;
use super::{channel_names, HostBackend, HostNode, StreamSpec};
use crate::dma::histogram::now_ns;
use crate::dma::DmaEngine;
use crate::sndif::{PcmFormat, StreamKind};
use anyhow::{anyhow, bail, Context};
use jack::PortSpec;
use std::sync::Arc;

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
    config: JackConfig,
    rate: u32,
}

impl JackHost {
    /// Checks that a JACK server answers and learns its sample rate.
    pub fn start(config: JackConfig) -> anyhow::Result<JackHost> {
        jack::set_logger(jack::LoggerType::Custom { info: jack_info, error: jack_error });
        let (probe, _) = jack::Client::new("xen-vsnd", jack::ClientOptions::NO_START_SERVER)
            .map_err(|e| anyhow!("{e:?}"))
            .context("connecting to the JACK server")?;
        let rate = probe.sample_rate();
        tracing::info!(rate, buffer = probe.buffer_size(), "JACK server");
        Ok(JackHost { config, rate })
    }
}

impl HostBackend for JackHost {
    fn supports(&self, _format: PcmFormat) -> bool {
        true // every wire format converts to and from floats
    }

    fn supports_rate(&self, rate: u32) -> bool {
        rate == self.rate
    }

    /// The stream's JACK client, with a port for each of its channels, for
    /// the life of its connection: connections made to it survive OPENs.
    fn attach(&self, spec: StreamSpec) -> anyhow::Result<Box<dyn HostNode>> {
        let name = client_name(&spec.node_name);
        let (client, _) = jack::Client::new(&name, jack::ClientOptions::NO_START_SERVER)
            .map_err(|e| anyhow!("{e:?}"))
            .with_context(|| format!("opening JACK client {name}"))?;
        let rate = client.sample_rate();
        let names = channel_names(spec.initial.channels);
        let ports = match spec.kind {
            StreamKind::Playback => {
                Ports::Out(register(&client, &names, "output", jack::AudioOut::default())?)
            }
            StreamKind::Capture => Ports::In(register(&client, &names, "input", jack::AudioIn::default())?),
        };
        let gains = ChannelGains::unity(names.len());
        let slot = Arc::new(EngineSlot::default());
        let rt = JackRt {
            slot: slot.clone(),
            ports,
            scratch: vec![0; INITIAL_FRAMES * names.len() * MAX_SAMPLE_BYTES],
            gains: gains.clone(),
            punctuality: Punctuality::default(),
        };
        let active = client.activate_async((), rt).map_err(|e| anyhow!("{e:?}")).context("activating")?;
        autoconnect(active.as_client(), &self.config.connect, spec.kind, &name, &names);
        tracing::debug!(client = name, "JACK client up");
        Ok(Box::new(JackNode {
            slot,
            gains,
            rate,
            ports: names.len() as u32,
            _client: ActiveClient(Some(active)),
        }))
    }
}

/// A guest stream's JACK client.
struct JackNode {
    slot: Arc<EngineSlot>,
    gains: ChannelGains,
    /// The server's rate: JACK does not resample.
    rate: u32,
    ports: u32,
    _client: ActiveClient,
}

impl HostNode for JackNode {
    fn start(&mut self, engine: DmaEngine) -> anyhow::Result<()> {
        let g = engine.geom;
        if g.rate != self.rate {
            bail!("the JACK server runs at {} Hz, the guest stream at {}", self.rate, g.rate);
        }
        if g.channels > self.ports {
            bail!("{} channels, the client has {} ports", g.channels, self.ports);
        }
        self.gains.set(&vec![1.0; self.ports as usize]);
        self.slot.install(engine);
        Ok(())
    }

    fn stop(&mut self) {
        drop(self.slot.take());
    }

    fn set_volume(&self, gains: Vec<f32>) {
        self.gains.set(&gains);
    }
}

impl Drop for JackNode {
    fn drop(&mut self) {
        // The engine first (the client, a field, is deactivated after
        // this, which may wait for the server).
        drop(self.slot.take());
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

/// libjack's error messages. Closing a client through the bindings clears
/// its thread-init callback, which libjack reports as an error although
/// nothing failed: that one goes to debug.
unsafe extern "C" fn jack_error(msg: *const libc::c_char) {
    // SAFETY: libjack passes a message string valid for the call.
    let text = unsafe { jack_message(msg) };
    let _ = std::panic::catch_unwind(|| {
        if text.contains("SetInitCallback") {
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
    ports: Ports,
    /// One period of interleaved guest-format frames, room for every port
    /// at the widest sample; sized in `buffer_size`, which JACK calls
    /// before the first cycle and whenever the period changes (allocating
    /// there is allowed).
    scratch: Vec<u8>,
    gains: ChannelGains,
    punctuality: Punctuality,
}

impl jack::ProcessHandler for JackRt {
    fn process(&mut self, client: &jack::Client, ps: &jack::ProcessScope) -> jack::Control {
        let JackRt { slot, ports, scratch, gains, punctuality } = self;
        let ran = slot.with(|engine| {
            let start = now_ns();
            let frames = ps.n_frames() as usize;
            let format = engine.geom.format;
            let (channels, sample) = (engine.geom.channels as usize, format.sample_bytes());
            let bytes = frames * channels * sample;
            if bytes > scratch.len() {
                // Cannot happen (buffer_size came first); never panic here.
                return false;
            }
            let gain = |c: usize| gains.get(c);
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
                        let g = gain(c);
                        for (f, o) in out.iter_mut().enumerate() {
                            let at = (f * channels + c) * sample;
                            *o = to_f32(format, &scratch[at..at + sample]) * g;
                        }
                    }
                }
                Ports::In(ports) => {
                    for (c, port) in ports.iter().enumerate().take(channels) {
                        let g = gain(c);
                        for (f, v) in port.as_slice(ps).iter().enumerate() {
                            let at = (f * channels + c) * sample;
                            from_f32(format, v * g, &mut scratch[at..at + sample]);
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
                tracing::warn!("JACK client deactivation: {e:?}");
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
