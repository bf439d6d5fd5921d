//! The latency self-test (`sim-guest --measure-latency`): the guest plays
//! impulses and captures them back through the host graph, and the round
//! trip it measures must equal the sum of the delays the backend reported.

mod common;

use common::*;
use std::time::Duration;

/// Runs the self-test with the guest's playback linked straight to its
/// capture; returns the report.
fn direct_link(extra: &[&str], tolerance: &str) -> serde_json::Value {
    let mut env = PwEnv::start();
    // The test links the nodes itself.
    let (sock, _log) = env.start_backend_with(&["--node-property", "node.autoconnect=false"]);
    let args =
        [
            &[
                "--domain",
                "lat-vm",
                "--measure-latency",
                "--seconds",
                "2.5",
                "--latency-tolerance",
                tolerance,
            ][..],
            extra,
        ]
        .concat();
    let sim = env.spawn_sim(&sock, &args);
    let (play, cap) = ("xen-vsnd.lat-vm.0.0.playback", "xen-vsnd.lat-vm.0.0.capture");
    wait_until("both guest nodes", Duration::from_secs(10), || {
        let ports = String::from_utf8_lossy(&env.run("pw-link", &["-o", "-i"]).stdout).into_owned();
        ports.contains(&format!("{play}:output_FR")) && ports.contains(&format!("{cap}:input_FR"))
    });
    env.link(play, cap, "output", "input");
    let (ok, report, err) = finish_sim(sim);
    assert!(ok, "self-test failed: {err}\n{report}");
    report
}

#[test]
fn direct_link_round_trip_matches_the_reported_delay() {
    let r = direct_link(&[], "1");
    let l = &r["latency"];
    assert!(l["measurements"].as_array().unwrap().len() >= 8, "{l}");
    assert!(l["error"].as_i64().unwrap().abs() <= 1, "{l}");
}

#[test]
fn resampled_guest_round_trip_matches_the_reported_delay() {
    // A 44.1 kHz guest in the 48 kHz graph: both directions go through
    // PipeWire's resampler, whose delay must be part of what is reported.
    let r = direct_link(&["--rate", "44100", "--period", "441"], "2");
    let l = &r["latency"];
    assert!(l["reported"].as_i64().unwrap() > 0, "the resampler delay is reported: {l}");
    assert!(l["error"].as_i64().unwrap().abs() <= 2, "{l}");
}
