//! `xen-vsnd-sim`: the simulated guest and the test-signal tools, apart from
//! the daemon (which never needs them).

use anyhow::bail;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use xen_vsnd_sim::signal::{self, align, compare_allowing_glitches, read_wav};
use xen_vsnd_sim::SimOptions;

#[derive(Parser)]
#[command(
    name = "xen-vsnd-sim",
    version,
    about = "A simulated Xen vsnd guest for xen-vsnd's loopback transport, and test-signal tools",
    long_about = "Tools for tests, demos and measurements of xen-vsnd: `guest` connects to \
`xen-vsnd serve --transport loopback:<socket>` as a new domain with one vsnd card and plays, \
records, measures latency or misbehaves; `signal` writes a test signal; `compare` checks a \
recording of it frame by frame.\n\nLogging: RUST_LOG (default info)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a simulated guest against a loopback backend.
    Guest(Box<SimOptions>),
    /// Write a test signal as a 16-bit WAV (to play in a real guest).
    Signal {
        #[arg(long, value_enum, default_value = "pattern")]
        kind: signal::Signal,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 48000)]
        rate: u32,
        #[arg(long, default_value_t = 2)]
        channels: u32,
        /// Seconds of silence before the signal (a player whose ports are
        /// linked one by one starts with some of its channels unlinked).
        #[arg(long, default_value_t = 0.0)]
        lead_in: f64,
        /// Seconds of silence after it (a sink that pauses when its last
        /// stream leaves drops what its device still holds).
        #[arg(long, default_value_t = 0.0)]
        lead_out: f64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a recording of a test pattern, frame by frame.
    ///
    /// The recording must carry a `signal --kind pattern` WAV intact:
    /// from where the recording picks it up to its end, every frame present,
    /// in order and unchanged. Prints what differs (silent gaps, which keep
    /// the timeline; or shifted/altered frames) and exits non-zero then;
    /// when the only fault is silence inserted into the signal (every frame
    /// still there, in order), says so on a line of its own.
    Compare {
        #[arg(long)]
        sent: PathBuf,
        #[arg(long)]
        got: PathBuf,
        /// Smallest share of the signal that must have been recorded.
        #[arg(long, default_value_t = 0.8)]
        min_fraction: f64,
    },
}

fn main() {
    xen_vsnd::logging::init();
    let r = match Cli::parse().cmd {
        Cmd::Guest(o) => guest(&o),
        Cmd::Signal { kind, seconds, rate, channels, lead_in, lead_out, out } => {
            let silence = |secs: f64| vec![0i16; (secs.max(0.0) * rate as f64) as usize * channels as usize];
            let mut s = silence(lead_in);
            s.extend(signal::generate(kind, rate, channels, (seconds * rate as f64) as usize));
            s.extend(silence(lead_out));
            signal::write_wav_s16(&out, rate, channels, &s)
        }
        Cmd::Compare { sent, got, min_fraction } => compare(&sent, &got, min_fraction),
    };
    if let Err(e) = r {
        eprintln!("xen-vsnd-sim: {e:#}");
        std::process::exit(1);
    }
}

/// The longest host cycle a glitch may span (PipeWire's largest quantum).
const MAX_CYCLE_FRAMES: usize = 8192;

fn compare(sent: &Path, got: &Path, min_fraction: f64) -> anyhow::Result<()> {
    let (s, g) = (read_wav(sent)?, read_wav(got)?);
    if (s.rate, s.channels) != (g.rate, g.channels) {
        bail!("{} Hz x{} against {} Hz x{}", s.rate, s.channels, g.rate, g.channels);
    }
    let ch = s.channels as usize;
    let total = s.samples.len() / ch;
    let Some(a) = align(&s.samples, &g.samples, ch) else {
        bail!("the signal never appears in {}", got.display());
    };
    println!(
        "compare: signal of {total} frames recorded from its frame {}: {} exact, {} silent in {} gaps, {} wrong",
        a.from, a.exact, a.silent, a.gaps, a.wrong
    );
    if a.wrong > 0 || a.silent > 0 {
        // Say whether silence was only inserted (a cycle some host node ran
        // late, after which the signal comes whole and in order), or what
        // glitches of at most a host cycle each account for every frame
        // (a late cycle's frames delayed or dropped): the caller decides
        // whether something it counted explains them, one each.
        // One pass allowing both: with no dropped run it is the same walk
        // as one that allows only inserted silence.
        if let Some(d) = compare_allowing_glitches(&s.samples, &g.samples, ch, 64, MAX_CYCLE_FRAMES) {
            let glitches = d.inserted_silences + d.dropped_runs;
            if d.complete(total) && glitches > 0 {
                if d.dropped_runs == 0 {
                    println!(
                        "compare: every frame in order but for inserted silence: {} runs, {} frames",
                        d.inserted_silences, d.inserted_frames
                    );
                }
                println!(
                    "compare: every frame accounted for but for {glitches} glitches: {} inserted silences \
                     ({} frames), {} dropped runs ({} frames)",
                    d.inserted_silences, d.inserted_frames, d.dropped_runs, d.dropped_frames
                );
            }
        }
    }
    if a.wrong > 0 {
        bail!("not intact: shifted or altered frames");
    }
    if a.silent > 0 {
        bail!("not intact: silent gaps");
    }
    if (a.exact as f64) < min_fraction * total as f64 || a.from + a.exact != total {
        bail!("only {} of {total} frames recorded", a.exact);
    }
    Ok(())
}

fn guest(o: &SimOptions) -> anyhow::Result<()> {
    let report = xen_vsnd_sim::run(o)?;
    println!("sim-guest: {}", serde_json::to_string(&report)?);
    if let Some(l) = &report.latency {
        println!("latency: measured {} reported {} error {}", l.measured, l.reported, l.error);
        if l.error.unsigned_abs() > o.latency_tolerance as u64 {
            bail!(
                "latency error {} frames exceeds {} (per impulse: see the report)",
                l.error,
                o.latency_tolerance
            );
        }
    }
    if let Some(m) = &report.misbehave {
        // The backend must have refused the bad request or closed the stream.
        let refused = m.status.is_some_and(|s| s < 0) || m.stream_closed;
        use xen_vsnd_sim::misbehave::Misbehave::{NotifyFlood, QueryFlood, StateFlood};
        // A flood is served (more slowly): every request answered in time.
        let flood_ok =
            matches!(m.kind, NotifyFlood | StateFlood | QueryFlood) && m.still_served && m.unanswered == 0;
        if !(refused || flood_ok) {
            bail!("backend accepted {:?}", m.kind);
        }
    }
    Ok(())
}
