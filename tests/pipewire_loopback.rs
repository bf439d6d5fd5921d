//! End to end over the loopback transport: `xen-vsnd serve` and simulated
//! guests as separate processes, a real PipeWire + WirePlumber.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn guest_playback_arrives_at_the_sink_sample_exact() {
    let mut env = PwEnv::start();
    let (sock, _log) = env.start_backend();
    let wav = env.dir.path().join("monitor.wav");
    let mut rec = env.record_monitor(&wav);
    let (ok, report, err) = env.sim(
        &sock,
        &["--domain", "play-vm", "--play", "pattern", "--seconds", "2"],
    );
    assert!(ok, "sim-guest failed: {err}");
    finish_recording(&mut rec, &pattern(2.0), &wav);
    let p = &report["playback"];
    assert_eq!(p["frames"], 96000);
    assert_eq!(p["xruns"], 0);
    assert_eq!(p["bad_event_ids"], 0);
    assert_eq!(p["early_interrupts"], 0);
    assert!(p["period_interrupts"].as_u64().unwrap() >= 40, "{p}");
    assert!(p["final_position_bytes"].as_u64().unwrap() >= 96000 * 4);
    assert_arrived_intact(&pattern(2.0), &wav);
}

#[test]
fn guest_capture_receives_what_pipewire_plays() {
    let mut env = PwEnv::start();
    let (sock, _log) = env.start_backend();
    let src = env.dir.path().join("src.wav");
    let sent = pattern(2.0);
    xen_vsnd::sim::signal::write_wav_s16(&src, 48000, 2, &sent).unwrap();
    let cap = env.dir.path().join("captured.wav");
    let sim = {
        let mut c = env.cmd(BIN);
        c.args(["sim-guest", "--connect"]).arg(&sock);
        c.args([
            "--domain",
            "cap-vm",
            "--capture-seconds",
            "5",
            "--capture-wav",
        ])
        .arg(&cap);
        c.stdout(std::process::Stdio::piped()).spawn().unwrap()
    };
    // WirePlumber links the guest's capture node to the sink's monitor
    // (there is no source): play into the sink and the guest hears it.
    wait_until(
        "the guest capture node to be linked",
        Duration::from_secs(10),
        || env.links().contains("xen-vsnd.cap-vm.0.0.capture:input_FL"),
    );
    let play = env.run("pw-play", &["--target", "test-sink", src.to_str().unwrap()]);
    assert!(play.status.success(), "pw-play failed");
    let out = sim.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("sim-guest: "))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(report["capture"]["xruns"], 0);
    assert_eq!(report["capture"]["bad_event_ids"], 0);
    assert_eq!(report["capture"]["early_interrupts"], 0);
    assert_arrived_intact(&sent, &cap);
}

fn node_props<'a>(dump: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    dump.as_array()?.iter().find_map(|o| {
        let p = &o["info"]["props"];
        (p["node.name"] == name).then_some(p)
    })
}

#[test]
fn nodes_carry_the_names_and_properties_users_see() {
    let mut env = PwEnv::start();
    let (sock, _log) = env.start_backend();
    let mut sim = {
        let mut c = env.cmd(BIN);
        c.args(["sim-guest", "--connect"]).arg(&sock);
        c.args([
            "--domain",
            "work-vm",
            "--play",
            "tone",
            "--seconds",
            "4",
            "--capture-wav",
        ]);
        c.arg(env.dir.path().join("c.wav"))
            .args(["--capture-seconds", "4"]);
        Proc(
            c.stdout(std::process::Stdio::null()).spawn().unwrap(),
            "sim",
        )
    };
    wait_until("both guest nodes", Duration::from_secs(10), || {
        env.node_exists("xen-vsnd.work-vm.0.0.playback")
            && env.node_exists("xen-vsnd.work-vm.0.0.capture")
    });
    let dump = env.dump();
    let play =
        node_props(&dump, "xen-vsnd.work-vm.0.0.playback").expect("playback node in pw-dump");
    assert_eq!(play["media.class"], "Stream/Output/Audio");
    assert_eq!(
        play["node.description"],
        "work-vm: Xen PV Sound dev0 (playback)"
    );
    assert_eq!(play["application.name"], "work-vm");
    assert_eq!(play["xen.unique-id"], "work-vm-play");
    assert_eq!(play["xen.domain"], "work-vm");
    assert!(play["xen.domid"].as_u64().is_some() || play["xen.domid"].as_str().is_some());
    let cap = node_props(&dump, "xen-vsnd.work-vm.0.0.capture").expect("capture node in pw-dump");
    assert_eq!(cap["media.class"], "Stream/Input/Audio");
    assert_eq!(
        cap["node.description"],
        "work-vm: Xen PV Sound dev0 (capture)"
    );
    assert_eq!(cap["xen.unique-id"], "work-vm-cap");
    // WirePlumber linked the guest's playback to the sink like any application.
    assert!(
        env.links()
            .contains("xen-vsnd.work-vm.0.0.playback:output_FL"),
        "{}",
        env.links()
    );
    sim.interrupt_and_wait(Duration::from_secs(5));
}

#[test]
fn a_guest_reconnects_after_disconnecting() {
    let mut env = PwEnv::start();
    let (sock, log) = env.start_backend();
    for round in 0..3 {
        let (ok, report, err) = env.sim(
            &sock,
            &["--domain", "again", "--play", "tone", "--seconds", "0.5"],
        );
        assert!(ok, "round {round}: {err}");
        assert_eq!(report["playback"]["frames"], 24000, "round {round}");
        // The backend tears the streams down when the domain goes away.
        wait_until("the node to go away", Duration::from_secs(10), || {
            !env.node_exists("xen-vsnd.again.0.0.playback")
        });
    }
    let text = std::fs::read_to_string(log).unwrap();
    assert_eq!(
        text.matches("loopback: guest again connected").count(),
        3,
        "{text}"
    );
    assert_eq!(
        text.matches("backend directory removed").count(),
        3,
        "{text}"
    );
}
