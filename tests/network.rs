//! A guest's sound to another machine with PipeWire's own network modules,
//! no transport of xen-vsnd's: dom0's PipeWire loads pw-modules/rtp-send.conf
//! (module-rtp-sink, sending from 127.0.0.1), the policy routes the VM's
//! playback node to that sink, and a second PipeWire — the other machine —
//! loads pw-modules/rtp-receive.conf (module-rtp-source; dom0 sends to
//! 127.0.0.2) and plays what arrives on its own sink, which is recorded.
//! RTP's receiver resamples to hold its jitter buffer, so the check is on
//! the signal, not frame by frame: the guest's 440 Hz tone arrives whole
//! (its length), without a gap (every 10 ms window at the tone's level)
//! and at its pitch.

mod common;
use common::*;
use std::time::{Duration, Instant};

const TONE_HZ: f64 = 440.0;
const SECONDS: f64 = 6.0;
const RATE: usize = 48000;

#[test]
fn a_guests_playback_reaches_another_pipewire_over_rtp() {
    // An even port of our own (RTP's convention), so parallel runs do not meet.
    let port = (40000 + (std::process::id() % 10000) * 2).to_string();
    let send = include_str!("../pw-modules/rtp-send.conf")
        .replace("\"0.0.0.0\"", "\"127.0.0.1\"")
        .replace("192.0.2.10", "127.0.0.2")
        .replace("46000", &port);
    let receive = include_str!("../pw-modules/rtp-receive.conf").replace("46000", &port);
    let mut dom0 = PwEnv::start_with_conf(&send);
    let mut remote = PwEnv::start_with_conf(&receive);
    wait_until("dom0's RTP sink", Duration::from_secs(10), || dom0.node_exists("rtp-send"));
    wait_until("the remote's RTP source", Duration::from_secs(10), || remote.node_exists("rtp-receive"));

    let policy = dom0.dir.path().join("policy.toml");
    std::fs::write(&policy, "[vm.net-vm]\ntarget = \"rtp-send\"\n").unwrap();
    let (sock, _log) = dom0.start_backend_with(&["--config", policy.to_str().unwrap()]);
    let wav = remote.dir.path().join("remote.wav");
    let mut rec = remote.record_monitor(&wav);

    let mut guest =
        dom0.spawn_sim(&sock, &["--domain", "net-vm", "--play", "tone", "--seconds", &SECONDS.to_string()]);
    let linked = || {
        let links = dom0.links();
        links.contains("xen-vsnd.net-vm.0.0.playback:output_FL") && links.contains("rtp-send:send_FL")
    };
    let t = Instant::now();
    while !linked() {
        if t.elapsed() > Duration::from_secs(10) || guest.try_wait().is_ok_and(|s| s.is_some()) {
            let _ = guest.kill();
            let (_, _, err) = finish_sim(guest);
            panic!("the guest's node is not linked to the RTP sink:\n{}\nguest: {err}", dom0.links());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _, err) = finish_sim(guest);
    assert!(ok, "guest: {err}");
    // What it played crosses the network and the receiver's 100 ms jitter
    // buffer: record on for a second more (bounded, measured by the file).
    let grown = std::fs::metadata(&wav).map(|m| m.len()).unwrap_or(0);
    let t = Instant::now();
    wait_until("a second more of the remote's recording", Duration::from_secs(10), || {
        std::fs::metadata(&wav).map(|m| m.len()).unwrap_or(0) >= grown + (RATE * 4) as u64
    });
    rec.interrupt_and_wait(Duration::from_secs(5));
    eprintln!("recorded {:.1} s more after the guest ended", t.elapsed().as_secs_f64());

    let samples = xen_vsnd_sim::signal::read_wav(&wav).expect("the remote's recording").samples;
    let left: Vec<f64> = samples.iter().step_by(2).map(|&s| s as f64).collect();
    let loud = |s: &f64| s.abs() > 4000.0;
    let start =
        left.iter().position(loud).expect("nothing of the guest's tone arrived at the other PipeWire");
    let end = left.len() - left.iter().rev().position(loud).unwrap();
    let secs = (end - start) as f64 / RATE as f64;
    assert!((secs - SECONDS).abs() < 0.1, "the tone arrived for {secs:.3} s, the guest played {SECONDS} s");

    // No gap: every 10 ms window inside it carries the tone's level.
    let want = 16384.0 / 2f64.sqrt();
    let body = &left[start + RATE / 50..end - RATE / 50];
    for (i, w) in body.chunks_exact(RATE / 100).enumerate() {
        let rms = (w.iter().map(|s| s * s).sum::<f64>() / w.len() as f64).sqrt();
        assert!(
            (rms / want - 1.0).abs() < 0.1,
            "window {i} ({:.2} s into the tone): level {rms:.0}, the tone's is {want:.0}",
            (i * RATE / 100 + RATE / 50) as f64 / RATE as f64
        );
    }
    // Its pitch: rising zero crossings per second.
    let rises = body.windows(2).filter(|p| p[0] < 0.0 && p[1] >= 0.0).count();
    let hz = rises as f64 / (body.len() as f64 / RATE as f64);
    assert!(
        (hz / TONE_HZ - 1.0).abs() < 0.01,
        "the tone arrived at {hz:.1} Hz, the guest played {TONE_HZ} Hz"
    );
    eprintln!("over RTP: {secs:.3} s of the tone, {hz:.2} Hz, no window off its level");
}
