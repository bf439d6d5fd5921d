//! `xen-vsnd`: the Xen PV sound backend daemon (the simulated guest is `xen-vsnd-sim`, src/sim).

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use xen_vsnd::backend::registry::Registry;
use xen_vsnd::control::{self, server::ControlServer, Reply, Request};
#[cfg(feature = "alsa")]
use xen_vsnd::host::alsa::{AlsaConfig, AlsaHost};
#[cfg(feature = "jack")]
use xen_vsnd::host::jack::{JackConfig, JackConnect, JackHost};
use xen_vsnd::host::null::NullHost;
#[cfg(feature = "pipewire")]
use xen_vsnd::host::pipewire::{PipeWireConfig, PipeWireHost};
use xen_vsnd::host::HostBackend;
use xen_vsnd::xen::{linux, loopback::Hypervisor};

#[derive(Parser)]
#[command(
    name = "xen-vsnd",
    version,
    about = "Xen PV sound backend: every guest PCM stream becomes a PipeWire node (or a JACK client, or an ALSA PCM)",
    long_about = "Serves the Xen paravirtual sound protocol (vsnd, sndif.h) to guests. \
Each guest stream becomes a PipeWire node (--host jack: a JACK client; --host alsa: a PCM) named \
xen-vsnd.<domain>.<card>.<pcm>.<playback|capture>; the graph clock drives the guest's DMA \
position and period interrupts, and the downstream latency is reported back to guests that \
opt in to the delay extension.\n\n\
Policy (which VM may play, record, where its nodes go): /etc/xen-vsnd/config.toml or \
serve --config; `xen-vsnd status` and `xen-vsnd ctl` talk to a running serve.\n\n\
Logging: RUST_LOG (default info)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the backend.
    Serve {
        /// `xen` for a real hypervisor (/dev/xen/*), or `loopback:<socket>`
        /// to serve simulated guests that connect to <socket>.
        #[arg(long, default_value = "xen")]
        transport: String,
        /// Where guest streams go: `pipewire` nodes, `jack` clients (of the
        /// default server or $JACK_DEFAULT_SERVER; guests then run at the
        /// server's rate), or `alsa` PCMs of their own (--alsa-device).
        /// `null`: play nowhere and record silence, on a clock of its own.
        #[arg(long, value_enum, default_value = DEFAULT_HOST)]
        host: HostKind,
        #[cfg(feature = "alsa")]
        #[command(flatten)]
        alsa: AlsaArgs,
        #[cfg(feature = "jack")]
        #[command(flatten)]
        jack: JackArgs,
        #[cfg(feature = "pipewire")]
        #[command(flatten)]
        pipewire: PipeWireArgs,
        /// Log each open stream's figures (cycles, callback time, under- and
        /// overruns, late cycles, delay) every this many seconds.
        #[arg(long, value_name = "SECONDS")]
        stats_interval: Option<f64>,
        /// Do not offer the delay extension (`feature-delay-report`): guests
        /// then get the base protocol's CUR_POS events only.
        #[arg(long)]
        no_delay_report: bool,
        /// Policy file (TOML): per-VM playback, capture, target node, volume
        /// cap, node properties. Default: /etc/xen-vsnd/config.toml when it
        /// exists, else built-in defaults (guests play; capture is denied).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Control socket for `status` and `ctl` (default: $RUNTIME_DIRECTORY/control
        /// under systemd, /run/xen-vsnd/control as root, else in $XDG_RUNTIME_DIR;
        /// beside a loopback transport's socket).
        #[arg(long, value_name = "PATH")]
        control_socket: Option<PathBuf>,
    },
    /// Show every guest stream of a running serve: state, format, period,
    /// quantum, delay, under- and overruns, late cycles, node, policy.
    Status {
        /// Machine-readable: one JSON object.
        #[arg(long)]
        json: bool,
        /// The control socket (default: $XEN_VSND_CONTROL, /run/xen-vsnd/control,
        /// then $XDG_RUNTIME_DIR/xen-vsnd/control).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Change a running serve's policy (root or the service's user only).
    Ctl {
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Hand this user's PipeWire to the system service when it asks.
    ///
    /// Runs in the desktop session, e.g. as the xen-vsnd-session user unit.
    Session {
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// The PipeWire socket's name in $PIPEWIRE_RUNTIME_DIR or
        /// $XDG_RUNTIME_DIR, or its path (default: $PIPEWIRE_REMOTE or pipewire-0).
        #[arg(long)]
        pipewire_remote: Option<String>,
    },
    /// Vouch for guests' names to backends in driver domains (in dom0).
    ///
    /// Copies each guest's name into its vsnd devices' backend directories
    /// (`domain-name`), which the driver domain can read and the guest
    /// cannot write, when the toolstack creates a device and when a guest
    /// is renamed. Runs until stopped.
    Vouch,
    /// Attach guests' cards again after their driver domain was restarted.
    ///
    /// In dom0, as root (it runs xl): every vsnd card whose backend
    /// directory is gone is attached again (as a new device) and the old
    /// one detached, with the configuration dom0 keeps for it (`xl list
    /// -l`), once a domain of its backend's name runs again. Prints what
    /// it did.
    Reattach {
        /// Only cards served by the driver domain of this name.
        #[arg(long, value_name = "NAME")]
        backend: Option<String>,
        /// Print the xl commands instead of running them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write the man pages and shell completions (for packagers).
    ///
    /// Under DIR: man/ (one page per command) and completions/ (bash, zsh,
    /// fish), generated from this command line's own definition.
    Assets {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// The ALSA host's options.
#[cfg(feature = "alsa")]
#[derive(clap::Args)]
struct AlsaArgs {
    /// ALSA: the device guest streams play on and record from (e.g.
    /// default, plughw:1,0, dmix); --alsa-capture-device sets capture's.
    #[arg(long, value_name = "DEVICE", default_value = "default")]
    alsa_device: String,
    /// ALSA: the device guest capture streams record from (default:
    /// --alsa-device).
    #[arg(long, value_name = "DEVICE")]
    alsa_capture_device: Option<String>,
    /// ALSA: periods per device buffer (each period is half the guest's
    /// period, rounded down to a power of two).
    #[arg(long, default_value_t = 4)]
    alsa_periods: u32,
}

/// The JACK host's options.
#[cfg(feature = "jack")]
#[derive(clap::Args)]
struct JackArgs {
    /// JACK: where each new stream's ports are connected, channel by
    /// channel: `physical` (the server's physical ports), `none`, or a
    /// regular expression over full port names (e.g. '^mixer:').
    #[arg(long, value_name = "PORTS", default_value = "physical")]
    jack_connect: String,
}

/// The PipeWire host's options.
#[cfg(feature = "pipewire")]
#[derive(clap::Args)]
struct PipeWireArgs {
    /// PipeWire remote to connect to (default: $PIPEWIRE_REMOTE or pipewire-0).
    #[arg(long)]
    pipewire_remote: Option<String>,
    /// Extra PipeWire property for every guest node, KEY=VALUE; may be
    /// repeated (e.g. node.autoconnect=false to link nodes yourself).
    #[arg(long = "node-property", value_name = "KEY=VALUE", value_parser = parse_prop)]
    node_properties: Vec<(String, String)>,
    /// PipeWire host: do not connect by name; use the PipeWire of the
    /// desktop sessions that register (`xen-vsnd session`). For the
    /// system service, which cannot reach a user's runtime directory.
    #[arg(long, conflicts_with = "pipewire_remote")]
    pipewire_from_sessions: bool,
}

fn main() {
    xen_vsnd::logging::init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Serve {
            transport,
            host,
            #[cfg(feature = "alsa")]
            alsa,
            #[cfg(feature = "jack")]
            jack,
            #[cfg(feature = "pipewire")]
            pipewire,
            stats_interval,
            no_delay_report,
            config,
            control_socket,
        } => serve(
            &transport,
            match host {
                #[cfg(feature = "pipewire")]
                HostKind::Pipewire => HostChoice::PipeWire(PipeWireConfig {
                    remote: pipewire.pipewire_remote,
                    node_props: pipewire.node_properties,
                    handoff: pipewire.pipewire_from_sessions.then(Default::default),
                }),
                #[cfg(feature = "alsa")]
                HostKind::Alsa => HostChoice::Alsa(AlsaConfig {
                    capture_device: alsa.alsa_capture_device.unwrap_or_else(|| alsa.alsa_device.clone()),
                    playback_device: alsa.alsa_device,
                    periods: alsa.alsa_periods,
                }),
                #[cfg(feature = "jack")]
                HostKind::Jack => HostChoice::Jack(JackConfig {
                    connect: match jack.jack_connect.as_str() {
                        "physical" => JackConnect::Physical,
                        "none" => JackConnect::Nowhere,
                        pattern => JackConnect::Matching(pattern.to_owned()),
                    },
                }),
                HostKind::Null => HostChoice::Null,
            },
            xen_vsnd::backend::Options {
                stats_interval: stats_interval.map(std::time::Duration::from_secs_f64),
                delay_reports: !no_delay_report,
            },
            config,
            control_socket.unwrap_or_else(|| control::default_socket(&transport)),
        ),
        Cmd::Status { json, control } => status(&control::client_socket(control.as_deref()), json),
        Cmd::Ctl { control, action } => ctl(&control::client_socket(control.as_deref()), action),
        Cmd::Session { control, pipewire_remote } => control::session::run(
            &control::client_socket(control.as_deref()),
            &control::session::pipewire_socket(pipewire_remote.as_deref()),
        ),
        Cmd::Vouch => xen_vsnd::xen::linux::open_store()
            .and_then(|(store, events, own)| xen_vsnd::vouch::run(&*store, &events, own)),
        Cmd::Reattach { backend, dry_run } => xen_vsnd::xen::linux::open_store()
            .and_then(|(store, _, _)| xen_vsnd::reattach::run(&*store, backend.as_deref(), dry_run))
            .map(|n| println!("reattach: {n} card(s)")),
        Cmd::Assets { out } => assets(&out),
    };
    if let Err(e) = r {
        eprintln!("xen-vsnd: {e:#}");
        std::process::exit(1);
    }
}

/// Man pages (one per visible subcommand, as `xen-vsnd-serve(1)`) and
/// shell completions, for packages: generated, so they never drift from
/// the options the binary really has.
fn assets(out: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let man = out.join("man");
    let completions = out.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man).context("writing man pages")?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "xen-vsnd", &completions)
            .with_context(|| format!("writing {shell} completions"))?;
    }
    Ok(())
}

#[cfg(feature = "pipewire")]
fn parse_prop(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[derive(Subcommand)]
enum CtlAction {
    /// Let a VM's capture streams hear dom0's input, or give them digital
    /// silence; applies from the next graph cycle, until the next reload.
    Mic {
        #[arg(value_enum)]
        what: MicWord,
        /// The domain's name, as dom0 knows it (`xl list`).
        domain: String,
    },
    /// Read the policy file again and apply it to every stream (as SIGHUP).
    Reload,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MicWord {
    Allow,
    Deny,
}

/// The hosts this build has (one cargo feature each), and the null host.
#[derive(Clone, Copy, clap::ValueEnum)]
enum HostKind {
    #[cfg(feature = "pipewire")]
    Pipewire,
    #[cfg(feature = "jack")]
    Jack,
    #[cfg(feature = "alsa")]
    Alsa,
    /// Play nowhere, record silence, on a clock of its own.
    Null,
}

/// The default host: PipeWire when built in.
const DEFAULT_HOST: &str = if cfg!(feature = "pipewire") { "pipewire" } else { "null" };

enum HostChoice {
    #[cfg(feature = "pipewire")]
    PipeWire(PipeWireConfig),
    #[cfg(feature = "jack")]
    Jack(JackConfig),
    #[cfg(feature = "alsa")]
    Alsa(AlsaConfig),
    Null,
}

fn serve(
    transport: &str,
    host: HostChoice,
    options: xen_vsnd::backend::Options,
    config: Option<PathBuf>,
    control_socket: PathBuf,
) -> anyhow::Result<()> {
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook_like::SIGINT, signal_hook_like::SIGTERM] {
        signal_hook_like::on(sig, shutdown.clone())?;
    }
    // Before anything touches the transport or the host.
    let _instance =
        xen_vsnd::backend::instance::claim(&xen_vsnd::backend::instance::transport_key(transport))?;
    let handoff = match &host {
        #[cfg(feature = "pipewire")]
        HostChoice::PipeWire(c) => c.handoff.clone(),
        _ => None,
    };
    let host: Arc<dyn HostBackend> = match host {
        #[cfg(feature = "pipewire")]
        HostChoice::PipeWire(c) => Arc::new(PipeWireHost::start(c).context("starting the PipeWire host")?),
        #[cfg(feature = "jack")]
        HostChoice::Jack(c) => Arc::new(JackHost::start(c).context("starting the JACK host")?),
        #[cfg(feature = "alsa")]
        HostChoice::Alsa(c) => Arc::new(AlsaHost::new(c)),
        HostChoice::Null => Arc::new(NullHost::clocked().context("starting the null host's clock")?),
    };
    let t = if transport == "xen" {
        linux::open().context("opening the Xen transport (/dev/xen)")?
    } else if let Some(path) = transport.strip_prefix("loopback:") {
        let (hv, t) = Hypervisor::new_transport();
        hv.listen(&PathBuf::from(path))?;
        tracing::info!("loopback transport listening on {path}");
        t
    } else {
        bail!("unknown transport {transport:?} (xen or loopback:<path>)");
    };
    let registry = Arc::new(Registry::new(host.clone(), config).context("reading the policy")?);
    let _control = ControlServer::start(&control_socket, registry.clone(), handoff)?;
    xen_vsnd::backend::run(t, host, registry, shutdown.clone(), options)?;
    tracing::info!("stopped");
    let _ = shutdown.load(Ordering::Relaxed);
    Ok(())
}

fn status(socket: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let Reply::Status(v) = control::request(socket, &Request::Status)? else {
        bail!("unexpected answer");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let streams = v["streams"].as_array().cloned().unwrap_or_default();
    if let Some(n) = v["sessions"].as_u64() {
        println!("desktop sessions offering PipeWire: {n}");
    }
    if streams.is_empty() {
        println!("no guest streams");
    }
    for s in streams {
        let text = |k: &str| match &s[k] {
            serde_json::Value::Null => "-".to_string(),
            serde_json::Value::String(t) => t.clone(),
            other => other.to_string(),
        };
        let p = &s["policy"];
        let allowed = if s["allowed"].as_bool() == Some(true) { "allowed" } else { "DENIED (silence)" };
        println!(
            "{} (domid {}) {} [node {}]: {}",
            text("domain"),
            text("domid"),
            text("node"),
            text("node_id"),
            text("state")
        );
        if s["format"].is_string() {
            println!(
                "    {} {} Hz x{}, period {} of buffer {} frames, quantum {}, delay {} frames",
                text("format"),
                text("rate"),
                text("channels"),
                text("period_frames"),
                text("buffer_frames"),
                text("quantum"),
                text("delay_frames")
            );
            println!(
                "    underruns {}, overruns {}, late cycles {}, fallback cycles {}",
                text("underruns"),
                text("overruns"),
                text("late_cycles"),
                text("fallback_cycles")
            );
        }
        println!(
            "    {} {allowed}; capture rule from {}; volume cap {}; target {}",
            text("kind"),
            p["capture_from"].as_str().unwrap_or("-"),
            p["volume_cap"],
            p["target"].as_str().unwrap_or("default"),
        );
    }
    Ok(())
}

fn ctl(socket: &std::path::Path, action: CtlAction) -> anyhow::Result<()> {
    let req = match action {
        CtlAction::Mic { what, domain } => Request::Mic { domain, allow: matches!(what, MicWord::Allow) },
        CtlAction::Reload => Request::Reload,
    };
    match control::request(socket, &req)? {
        Reply::Applied(list) => {
            for a in &list {
                let at = a.position.map_or_else(String::new, |p| format!(" from byte {p}"));
                println!("{}: {}{at}", a.node, if a.allowed { "allowed" } else { "denied" });
            }
            if list.is_empty() {
                println!("applied (no guest streams now)");
            }
            Ok(())
        }
        _ => bail!("unexpected answer"),
    }
}

/// Minimal signal handling: SIGINT/SIGTERM set a flag the backend polls.
mod signal_hook_like {
    pub use nix::sys::signal::Signal::{SIGINT, SIGTERM};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, OnceLock};

    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

    extern "C" fn handler(_: libc::c_int) {
        if let Some(f) = FLAG.get() {
            f.store(true, Ordering::Relaxed);
        }
    }

    pub fn on(sig: nix::sys::signal::Signal, flag: Arc<AtomicBool>) -> anyhow::Result<()> {
        let _ = FLAG.set(flag);
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(handler),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler only stores to an atomic.
        unsafe { nix::sys::signal::sigaction(sig, &action)? };
        Ok(())
    }
}
