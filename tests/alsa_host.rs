//! The plain ALSA host (`serve --host alsa`) on a real alsa-lib device:
//! PipeWire's ALSA plugin (`pipewire`), so what the device plays can be
//! recorded at the test PipeWire's sink, frame for frame.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn guest_playback_reaches_an_alsa_device_frame_exact() {
    let mut env = PwEnv::start();
    let (sock, _log) = env.start_backend_with(&["--host", "alsa", "--alsa-device", "pipewire"]);
    let wav = env.dir.path().join("monitor.wav");
    let mut rec = env.record_monitor(&wav);
    let sent = pattern(2.0);
    let (ok, report, err) = env.sim(&sock, &["--domain", "alsa-vm", "--play", "pattern", "--seconds", "2"]);
    assert!(ok, "{err}");
    assert_eq!(report["playback"]["xruns"], 0, "{report}");
    finish_recording(&mut rec, &sent, &wav);
    assert_arrived_intact(&env, &sent, &wav);
    assert_eq!(env.closed_counter("xen-vsnd.alsa-vm.0.0.playback", "late_cycles"), 0);
}

#[test]
fn guest_capture_from_an_alsa_device_is_frame_exact() {
    let mut env = PwEnv::start();
    let (sock, _log) = env.start_backend_with(&["--host", "alsa", "--alsa-device", "pipewire"]);
    // WirePlumber links the plugin's capture stream to the sink's monitor.
    let (report, sent, cap) =
        capture_what_the_sink_plays(&env, &sock, "acap-vm", "alsa_capture.xen-vsnd:input_FL", &[]);
    assert_eq!(report["capture"]["xruns"], 0, "{report}");
    assert_arrived_intact(&env, &sent, &cap);
}

/// The latency self-test through two ALSA PCMs: the guest's impulses play
/// on one, into the sink, and come back from the sink's monitor on the
/// other; the round trip equals the sum of the `snd_pcm_delay()` values the
/// guest was sent. (Linked to each other directly instead, PipeWire's ALSA
/// plugin counts the cycle it hands over as still to be played, which a
/// sink does but a stream reading it in the same cycle does not: one
/// quantum too many.) The plugin's delay also moves on with the time since
/// the graph's cycle, as a device's hardware pointer would, while this
/// graph moves in whole cycles: each figure is off by the time the backend
/// took to wake after the cycle, a few frames; 2 ms (96 frames) is allowed,
/// a cycle (512) is not.
#[test]
fn round_trip_through_alsa_devices_matches_the_reported_delay() {
    let mut env = PwEnv::start();
    // The test links the plugin's streams itself.
    let (sock, _log) = env.start_backend_under(
        &["env", "PIPEWIRE_ALSA={ node.autoconnect = false }"],
        &["--host", "alsa", "--alsa-device", "pipewire"],
    );
    // 5 s: about 19 impulses (in one run of 13, 6 found no pair while
    // another test ran beside it).
    let base = ["--domain", "alat-vm", "--measure-latency", "--seconds", "5", "--latency-tolerance", "96"];
    let sim = env.spawn_sim(&sock, &base);
    // The plugin names its streams after the program.
    let (play, cap) = ("alsa_playback.xen-vsnd", "alsa_capture.xen-vsnd");
    wait_until("both ALSA streams", Duration::from_secs(10), || {
        let ports = String::from_utf8_lossy(&env.run("pw-link", &["-o", "-i"]).stdout).into_owned();
        ports.contains(&format!("{play}:output_FR")) && ports.contains(&format!("{cap}:input_FR"))
    });
    env.link(play, SINK, "output", "playback");
    env.link(SINK, cap, "monitor", "input");
    let (ok, report, err) = finish_sim(sim);
    assert!(ok, "self-test failed: {err}\n{report}");
    let l = &report["latency"];
    // The self-test pairs the two streams' position events by when they
    // arrive; the ALSA host's two threads wake independently, and without
    // real-time scheduling an impulse now and then finds no pair (2 of 9
    // seen): most must be measured.
    assert!(l["measurements"].as_array().unwrap().len() >= 8, "{l}");
    assert!(l["measured"].as_i64().unwrap() > 0, "{l}");
    assert!(l["error"].as_i64().unwrap().abs() <= 96, "{l}");
}
