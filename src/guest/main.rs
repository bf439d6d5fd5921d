//! `xen-vsnd-guest`: runs in a Xen guest with snd-xen-vsnd and PipeWire,
//! and gives PipeWire the delay dom0 reports for each stream, so the
//! latency the guest's applications are told counts all the way to dom0's
//! sound device.

mod cards;
mod latency;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "xen-vsnd-guest",
    version,
    about = "In a Xen guest: snd-xen-vsnd's host delay becomes the latency of the guest PipeWire's ALSA nodes",
    long_about = "Follows the snd-xen-vsnd cards of this guest (their \"Playback Host Delay\" and \
\"Capture Host Delay\" controls: what dom0 reports between the stream's buffer and its sound \
device) and sets each matching PipeWire ALSA node's latency offset (latencyOffsetNsec) to it, so \
that PipeWire reports the whole latency to its clients. Run it as the user whose PipeWire it is (a user unit \
beside pipewire.service). Logging: RUST_LOG (default info)."
)]
struct Cli {}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = Cli::parse();
    let (tx, rx) = pipewire::channel::channel();
    std::thread::spawn(move || {
        cards::follow(move |key, us| {
            tracing::debug!(?key, us, "host delay");
            let _ = tx.send((key, us));
        })
    });
    if let Err(e) = latency::run(rx) {
        eprintln!("xen-vsnd-guest: {e:#}");
        std::process::exit(1);
    }
}
