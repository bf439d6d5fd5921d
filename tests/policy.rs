//! dom0's policy, with real PipeWire and WirePlumber: a guest hears dom0's
//! input only when allowed (by the file, SIGHUP or `ctl mic`), a denial
//! reaches a running stream within one graph cycle, a guest cannot take
//! another VM's policy or names, the guest's volume is xen-vsnd's gain
//! (the node's volume stays the dom0 user's) and dom0 caps it, and
//! `status --json` shows every stream.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

fn control(sock: &Path) -> String {
    format!("{}.control", sock.display())
}

fn status(env: &PwEnv, sock: &Path) -> serde_json::Value {
    let out = env.run(BIN, &["status", "--json", "--control", &control(sock)]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn stream_status(env: &PwEnv, sock: &Path, node: &str) -> serde_json::Value {
    let s = status(env, sock);
    s["streams"].as_array().unwrap().iter().find(|x| x["node"] == node).cloned().unwrap_or_else(|| {
        panic!("{node} not in the status: {s}");
    })
}

/// `xen-vsnd ctl ...`; returns its output.
fn ctl(env: &PwEnv, sock: &Path, args: &[&str]) -> String {
    let c = control(sock);
    let out = env.run(BIN, &[&["ctl", "--control", c.as_str()][..], args].concat());
    assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn node_prop(env: &PwEnv, node: &str, key: &str) -> Option<String> {
    env.dump().as_array()?.iter().find_map(|o| {
        let p = &o["info"]["props"];
        (p["node.name"] == node).then(|| p[key].as_str().map(str::to_string)).flatten()
    })
}

fn samples(wav: &Path) -> Vec<i16> {
    xen_vsnd_sim::signal::read_wav(wav).expect("the guest's recording").samples
}

fn policy_file(env: &PwEnv, name: &str, text: &str) -> PathBuf {
    let p = env.dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn the_microphone_is_off_until_dom0_allows_it() {
    let mut env = PwEnv::start();
    // No policy at all: the built-in defaults.
    assert!(
        !Path::new(xen_vsnd::policy::DEFAULT_PATH).exists(),
        "{} exists on this machine: this test needs a dom0 without a policy",
        xen_vsnd::policy::DEFAULT_PATH
    );
    let (sock, log) = env.start_backend_as_is(&[], &[]);
    assert!(std::fs::read_to_string(&log).unwrap().contains("no policy file: built-in defaults"));
    let node = "xen-vsnd.mic-vm.0.0.capture";

    // 1. Denied by default: the guest records only zeros while dom0 plays
    //    the pattern into what its capture node is linked to.
    let (_, _, cap) = capture_what_the_sink_plays(&env, &sock, "mic-vm", &format!("{node}:input_FL"), &[]);
    let got = samples(&cap);
    assert!(got.len() >= 2 * 48000 * 4, "recorded {} samples", got.len());
    assert!(got.iter().all(|s| *s == 0), "a denied guest heard dom0's input");
    // The node says so, and so does the log line of the policy.
    assert!(std::fs::read_to_string(&log).unwrap().contains("capture is denied by the policy"));

    // 2. A policy file that leaves mic-vm out, then allows it, applied by
    //    SIGHUP to the running stream: intact, frame for frame.
    let policy = policy_file(&env, "policy.toml", "[vm.other-vm]\ncapture = true\n");
    env.stop_backend();
    let (sock, _log) = env.start_backend_with(&["--config", policy.to_str().unwrap()]);
    let (sim, _) = start_recording_guest(&env, &sock, "mic-vm", 8);
    wait_until("the capture node", Duration::from_secs(10), || env.node_exists(node));
    assert_eq!(node_prop(&env, node, "xen-vsnd.capture").as_deref(), Some("denied"));
    std::fs::write(&policy, "[vm.mic-vm]\ncapture = true\n").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(env.backend_pid() as i32), nix::sys::signal::SIGHUP)
        .unwrap();
    wait_until("the node to say allowed", Duration::from_secs(10), || {
        node_prop(&env, node, "xen-vsnd.capture").as_deref() == Some("allowed")
    });
    let st = stream_status(&env, &sock, node);
    assert_eq!(st["allowed"], true, "{st}");
    assert_eq!(st["policy"]["capture_from"], "config", "{st}");
    assert_eq!(st["policy"]["section"], "mic-vm", "{st}");
    let (ok, _, err) = finish_sim(sim);
    assert!(ok, "{err}");
    let (_, sent, cap) = capture_what_the_sink_plays(&env, &sock, "mic-vm", &format!("{node}:input_FL"), &[]);
    assert_arrived_intact(&env, &sent, &cap);

    // 3. Denied again mid-stream (`ctl mic deny`): silence from the next
    //    graph cycle after the change on, the pattern before it.
    let (sim, cap) = start_recording_guest(&env, &sock, "mic-vm", 8);
    wait_until("the guest's capture stream to be linked", Duration::from_secs(10), || {
        env.links().contains(&format!("{node}:input_FL"))
    });
    let src = env.dir.path().join("long-src.wav");
    xen_vsnd_sim::signal::write_wav_s16(&src, 48000, 2, &pattern(5.0)).unwrap();
    let mut play = Proc(
        env.realtime_cmd("pw-play")
            .args(["--target", SINK, src.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        "pw-play",
    );
    std::thread::sleep(Duration::from_millis(2000)); // pattern playing
    let quantum =
        stream_status(&env, &sock, node)["quantum"].as_u64().expect("quantum of the running stream");
    let out = ctl(&env, &sock, &["mic", "deny", "mic-vm"]);
    let at: u64 = out
        .lines()
        .find(|l| l.starts_with(node))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no position for {node} in: {out}"));
    let st = stream_status(&env, &sock, node);
    assert_eq!((&st["allowed"], &st["policy"]["capture_from"]), (&false.into(), &"ctl".into()), "{st}");
    // Everything `status` promises, for a running stream.
    assert_eq!(
        (&st["state"], &st["format"], &st["rate"], &st["channels"]),
        (&"running".into(), &"s16_le".into(), &48000.into(), &2.into()),
        "{st}"
    );
    assert_eq!(st["node_id"].as_u64(), env.node_id(node), "{st}");
    for key in
        ["period_frames", "buffer_frames", "quantum", "delay_frames", "underruns", "overruns", "late_cycles"]
    {
        assert!(st[key].is_u64(), "{key} missing: {st}");
    }
    assert_eq!(st["domain"], "mic-vm");
    assert_eq!(st["policy"]["capture"], false);
    play.interrupt_and_wait(Duration::from_secs(10));
    let (ok, _, err) = finish_sim(sim);
    assert!(ok, "{err}");
    let got = samples(&cap);
    let from = (at / 4 + quantum) as usize * 2; // one cycle after the change
    assert!(got.len() > from + 48000, "recorded {} samples, deny at {from}", got.len());
    let before = &got[from.saturating_sub(2 * 48000)..(at / 4) as usize * 2];
    assert!(before.iter().any(|s| *s != 0), "the pattern did not arrive before the deny");
    let leaked = got[from..].iter().filter(|s| **s != 0).count();
    assert_eq!(leaked, 0, "{leaked} nonzero samples more than one cycle ({quantum} frames) after the deny");

    // 4. `ctl mic allow`: the VM's next recording is intact again.
    let out = ctl(&env, &sock, &["mic", "allow", "mic-vm"]);
    assert!(out.contains("applied (no guest streams now)"), "{out}");
    let (_, sent, cap) = capture_what_the_sink_plays(&env, &sock, "mic-vm", &format!("{node}:input_FL"), &[]);
    assert_arrived_intact(&env, &sent, &cap);
}

/// A guest recording `seconds` into a WAV of its own; returns it and the path.
fn start_recording_guest(
    env: &PwEnv,
    sock: &Path,
    domain: &str,
    seconds: u32,
) -> (std::process::Child, PathBuf) {
    let cap = env.dir.path().join(format!("{domain}-{}.wav", std::process::id() ^ seconds));
    let _ = std::fs::remove_file(&cap);
    let secs = seconds.to_string();
    let args = ["--domain", domain, "--capture-seconds", &secs, "--capture-wav", cap.to_str().unwrap()];
    (env.spawn_sim(sock, &args), cap)
}

/// A guest that writes another VM's name into every key it can write gets
/// neither that VM's policy nor its node names.
#[test]
fn a_guest_cannot_take_another_vms_policy_or_names() {
    let mut env = PwEnv::start();
    let policy = policy_file(&env, "policy.toml", "[vm.work-vm]\ncapture = true\n");
    let (sock, _log) = env.start_backend_with(&["--config", policy.to_str().unwrap()]);
    let work_cap = env.dir.path().join("work.wav");
    let evil_cap = env.dir.path().join("evil.wav");
    let work = env.spawn_sim(
        &sock,
        &["--domain", "work-vm", "--capture-seconds", "5", "--capture-wav", work_cap.to_str().unwrap()],
    );
    let evil = env.spawn_sim(
        &sock,
        &[
            "--domain",
            "evil-vm",
            "--impersonate",
            "work-vm",
            "--capture-seconds",
            "5",
            "--capture-wav",
            evil_cap.to_str().unwrap(),
        ],
    );
    wait_until("both capture streams linked", Duration::from_secs(10), || {
        let l = env.links();
        l.contains("xen-vsnd.work-vm.0.0.capture:input_FL")
            && l.contains("xen-vsnd.evil-vm.0.0.capture:input_FL")
    });
    // Exactly one node of each stream per VM, named by dom0's name.
    let names: Vec<String> = env
        .dump()
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["info"]["props"]["node.name"].as_str().map(str::to_string))
        .filter(|n| n.starts_with("xen-vsnd."))
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "xen-vsnd.evil-vm.0.0.capture",
            "xen-vsnd.evil-vm.0.0.playback",
            "xen-vsnd.work-vm.0.0.capture",
            "xen-vsnd.work-vm.0.0.playback"
        ],
        "{names:?}"
    );
    assert_eq!(node_prop(&env, "xen-vsnd.evil-vm.0.0.capture", "xen.domain").as_deref(), Some("evil-vm"));
    assert_eq!(
        node_prop(&env, "xen-vsnd.evil-vm.0.0.capture", "xen-vsnd.capture").as_deref(),
        Some("denied")
    );
    assert_eq!(
        node_prop(&env, "xen-vsnd.work-vm.0.0.capture", "xen-vsnd.capture").as_deref(),
        Some("allowed")
    );
    let evil_status = stream_status(&env, &sock, "xen-vsnd.evil-vm.0.0.capture");
    assert_eq!(evil_status["domain"], "evil-vm");
    assert_eq!(evil_status["policy"]["section"], serde_json::Value::Null, "{evil_status}");
    let src = env.dir.path().join("src.wav");
    let sent = pattern(2.0);
    xen_vsnd_sim::signal::write_wav_s16(&src, 48000, 2, &sent).unwrap();
    assert!(env
        .realtime_cmd("pw-play")
        .args(["--target", SINK, src.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    for (g, who) in [(work, "work-vm"), (evil, "evil-vm")] {
        let (ok, _, err) = finish_sim(g);
        assert!(ok, "{who}: {err}");
    }
    assert_arrived_intact(&env, &sent, &work_cap);
    let got = samples(&evil_cap);
    assert!(!got.is_empty() && got.iter().all(|s| *s == 0), "the impersonator heard dom0's input");
}

/// The guest's volume scales its samples in xen-vsnd; the node's own volume
/// (the dom0 user's slider) is never moved; dom0's cap bounds the guest.
#[test]
fn guest_volume_is_xen_vsnds_gain_and_dom0_caps_it() {
    let mut env = PwEnv::start();
    let policy = policy_file(&env, "policy.toml", "[vm.capped-vm]\nvolume_cap = 0.25\n");
    let (sock, _log) = env.start_backend_with(&["--config", policy.to_str().unwrap()]);
    // The tone's peak is 16384: -6 dB gives 0.501 of it, the cap 0.25.
    for (domain, extra, gain) in
        [("quiet-vm", &["--set-volume-mdb", "-6000"][..], 0.501), ("capped-vm", &[][..], 0.25)]
    {
        let wav = env.dir.path().join(format!("{domain}.wav"));
        let mut rec = env.record_monitor(&wav);
        let args = [&["--domain", domain, "--play", "tone", "--seconds", "2"][..], extra].concat();
        let sim = env.spawn_sim(&sock, &args);
        let node = format!("xen-vsnd.{domain}.0.0.playback");
        wait_until("the guest to play", Duration::from_secs(10), || env.node_running(&node));
        // The node's channel volumes stay the user's (1.0 unless moved).
        let volumes: Vec<f64> = env
            .dump()
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["info"]["props"]["node.name"] == node.as_str())
            .flat_map(|o| o["info"]["params"]["Props"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["channelVolumes"].as_array().cloned())
            .flatten()
            .filter_map(|v| v.as_f64())
            .collect();
        assert!(volumes.iter().all(|v| *v == 1.0), "{domain}: node volumes moved: {volumes:?}");
        let (ok, report, err) = finish_sim(sim);
        assert!(ok, "{err}");
        if !extra.is_empty() {
            assert_eq!(report["volume_mdb"], serde_json::json!([-6000, -6000]));
        }
        rec.interrupt_and_wait(Duration::from_secs(5));
        let peak = samples(&wav).iter().map(|s| s.unsigned_abs() as f64).fold(0.0, f64::max);
        let want = 16384.0 * gain;
        assert!((peak - want).abs() < want * 0.02, "{domain}: peak {peak}, expected {want}");
    }
}
