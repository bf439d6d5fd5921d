//! The system service's split (real PipeWire and WirePlumber): `serve
//! --pipewire-from-sessions` cannot reach any PipeWire by name; guests
//! connect and run on the fallback clock until a desktop session registers
//! (`xen-vsnd session`) and hands over its PipeWire, then their streams
//! move there and play intact; the session's PipeWire restarting is
//! survived the same way.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn guest_streams_wait_for_a_desktop_session_then_move_to_its_pipewire() {
    let mut env = PwEnv::start();
    // As the unit runs it: no runtime directory, no PipeWire by name.
    let (sock, log) = env.start_backend_under(
        &["env", "-u", "XDG_RUNTIME_DIR", "-u", "PIPEWIRE_RUNTIME_DIR", "-u", "PIPEWIRE_REMOTE"],
        &["--pipewire-from-sessions"],
    );
    let control = format!("{}.control", sock.display());
    let node = "xen-vsnd.boot-vm.0.0.playback";
    let sent = pattern(14.0);
    let guest = spawn_sim_with(
        env.cmd("nice"),
        &sock,
        &["--domain", "boot-vm", "--play", "pattern", "--seconds", "14"],
    );
    // No session: the guest plays on (the fallback clock), no node exists.
    let status = |env: &PwEnv| -> serde_json::Value {
        let out = env.run(BIN, &["status", "--json", "--control", &control]);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    wait_until("the guest's stream to run on the fallback clock", Duration::from_secs(10), || {
        status(&env)["streams"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["node"] == node).cloned())
            .is_some_and(|s| s["fallback_cycles"].as_u64().unwrap_or(0) > 10)
    });
    assert!(!env.node_exists(node), "a node without any session");
    assert_eq!(status(&env)["sessions"], 0);

    // The user logs in: the session part hands over its PipeWire.
    let mut session = env.start_session(&control);
    wait_until("the guest's node in the session's PipeWire, running", Duration::from_secs(10), || {
        env.node_running(node)
    });
    assert_eq!(status(&env)["sessions"], 1);
    let wav = env.dir.path().join("after-login.wav");
    let mut rec = env.record_monitor(&wav);
    let (ok, report, err) = finish_sim(guest);
    assert!(ok, "the guest stalled or failed: {err}\n{report}");
    finish_recording(&mut rec, &sent, &wav);
    // The last 4 s were played through the session's PipeWire, intact.
    assert_tail_intact(&env, &sent, &wav, 4 * 48000);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("connected through the session's PipeWire"), "{text}");

    // The session's PipeWire restarts: asked again, it hands over the new one.
    let guest = env.spawn_sim(&sock, &["--domain", "boot-vm", "--play", "tone", "--seconds", "12"]);
    wait_until("the guest to play", Duration::from_secs(10), || env.node_running(node));
    env.restart_pipewire(Duration::from_secs(2));
    wait_until("the node back after the session's PipeWire restarted", Duration::from_secs(15), || {
        env.node_running(node)
    });
    let (ok, _, err) = finish_sim(guest);
    assert!(ok, "{err}");
    session.interrupt_and_wait(Duration::from_secs(5));
}
