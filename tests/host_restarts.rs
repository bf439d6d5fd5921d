//! The daemon outlives its host: PipeWire killed and started again (three
//! times, for 3 s each) while a guest plays and records. The guest stays
//! connected, its positions keep moving meanwhile (a stream stalled for
//! 2 s fails the simulated guest), its nodes come back with the same names, its audio
//! resumes frame-exact both ways, and the backend holds no more file
//! descriptors or threads than before.

mod common;

use common::*;
use std::time::Duration;

/// (open file descriptors, threads) of process `pid`.
fn resources(pid: u32) -> (usize, usize) {
    let count = |what: &str| std::fs::read_dir(format!("/proc/{pid}/{what}")).map_or(0, |d| d.count());
    (count("fd"), count("task"))
}

/// What each open file descriptor of `pid` is, sorted (for a failure).
fn fd_kinds(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|t| t.to_string_lossy().replace(|c: char| c.is_ascii_digit(), ""))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits (bounded) until `pid`'s resources reach `want`; returns the last
/// count. The backend's short-lived helper threads (deferred commands to
/// the PipeWire thread) end within 2 s.
fn settle_to(pid: u32, want: (usize, usize)) -> (usize, usize) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let mut now = resources(pid);
    while now != want && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        now = resources(pid);
    }
    now
}

/// Waits until `pid`'s resources have stayed the same for 3 s (10 s at
/// most).
fn settle(pid: u32) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let (mut last, mut since) = (resources(pid), std::time::Instant::now());
    while std::time::Instant::now() < end && since.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
        let now = resources(pid);
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        }
    }
}

fn guest_nodes(env: &PwEnv, domain: &str) -> Vec<String> {
    let prefix = format!("xen-vsnd.{domain}.");
    env.dump()
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|o| o["info"]["props"]["node.name"].as_str())
                .filter(|n| n.starts_with(&prefix))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_guest_plays_and_records_on_through_pipewire_restarts() {
    let mut env = PwEnv::start();
    let (sock, log) = env.start_backend();
    let domain = "restart-vm";
    let (play, capture) =
        (format!("xen-vsnd.{domain}.0.0.playback"), format!("xen-vsnd.{domain}.0.0.capture"));
    // The guest plays the pattern and records at once; WirePlumber links
    // its capture to the sink's monitor, so it records its own playback.
    let seconds = 45.0;
    let sent = pattern(seconds);
    let cap = env.dir.path().join("captured.wav");
    let guest = env.spawn_sim(
        &sock,
        &[
            "--domain",
            domain,
            "--play",
            "pattern",
            "--seconds",
            "45",
            "--capture-seconds",
            "47",
            "--capture-wav",
            cap.to_str().unwrap(),
        ],
    );
    let both_run = |env: &PwEnv| env.node_running(&play) && env.node_running(&capture);
    wait_until("the guest's nodes to run", Duration::from_secs(10), || both_run(&env));
    let backend = env.backend_pid();
    let (mut before, mut kinds_before) = (resources(backend), fd_kinds(backend));

    for round in 1..=3 {
        // Away longer than a guest waits for a position before it gives
        // up (2 s in the simulated guest, ALSA's own is longer).
        env.restart_pipewire(Duration::from_secs(3));
        wait_until("the guest's nodes back and running", Duration::from_secs(15), || both_run(&env));
        let nodes = guest_nodes(&env, domain);
        assert_eq!(nodes.len(), 2, "after restart {round}: {nodes:?}");
        if round == 1 {
            // The first reconnect leaves libpipewire with one eventfd more
            // for good (the same after 2, 3 or 4 restarts): the count from
            // here on must not grow.
            settle(backend);
            (before, kinds_before) = (resources(backend), fd_kinds(backend));
        }
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("the PipeWire daemon went away").count(), 3, "{text}");
    assert_eq!(text.matches("connected to the PipeWire daemon again").count(), 3, "{text}");

    // Nothing left behind by the connections that went away (the guest
    // still plays: the same streams and nodes as after the first).
    let now = settle_to(backend, before);
    assert_eq!(
        now,
        before,
        "(fds, threads) of the backend before and after the restarts; fds before: {kinds_before:?}, after: {:?}",
        fd_kinds(backend)
    );

    // What the guest plays from now on reaches the sink frame-exact.
    let wav = env.dir.path().join("after-restarts.wav");
    let mut rec = env.record_monitor(&wav);
    let (ok, report, err) = finish_sim(guest);
    assert!(ok, "the guest's streams stalled or failed: {err}\n{report}");
    // The fallback clock ran them while PipeWire was away.
    for stream in [&play, &capture] {
        wait_until("the stream's closed line", Duration::from_secs(5), || {
            env.closed_streams().iter().any(|l| l.contains(&format!("stream={stream} ")))
        });
        assert!(env.closed_counter(stream, "fallback_cycles") > 0, "{:?}", env.closed_streams());
    }
    let tail = 3 * 48000;
    finish_recording(&mut rec, &sent[sent.len() - tail * 2..], &wav);
    assert_tail_intact(&env, &sent, &wav, tail);
    // ... and back into the guest's capture, through the sink's monitor.
    let got = xen_vsnd_sim::signal::read_wav(&cap).expect("the guest's recording").samples;
    let (_, n) = xen_vsnd_sim::signal::find_and_compare(&sent[sent.len() - tail * 2..], &got, 2, 64, 0)
        .expect("the tail of the pattern in the guest's recording");
    assert_eq!(n, tail, "the guest recorded only {n} of the last {tail} frames intact");
}

/// A node no driver schedules (left unlinked: `node.autoconnect=false`, as
/// while WirePlumber starts): the guest's stream moves on regardless, on
/// the fallback clock, and its closed line counts those cycles.
#[test]
fn a_guest_whose_node_nothing_schedules_plays_on_the_fallback_clock() {
    let mut env = PwEnv::start();
    let (sock, _log) = env.start_backend_with(&["--node-property", "node.autoconnect=false"]);
    let (ok, report, err) = env.sim(&sock, &["--domain", "lonely-vm", "--play", "tone", "--seconds", "3"]);
    assert!(ok, "the guest's stream stalled: {err}\n{report}");
    let stream = "xen-vsnd.lonely-vm.0.0.playback";
    wait_until("the stream's closed line", Duration::from_secs(5), || {
        env.closed_streams().iter().any(|l| l.contains(&format!("stream={stream} ")))
    });
    assert!(env.closed_counter(stream, "fallback_cycles") > 0, "{:?}", env.closed_streams());
}
