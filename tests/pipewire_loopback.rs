//! End to end over the loopback transport: `xen-vsnd serve` and simulated
//! guests as separate processes, a real PipeWire + WirePlumber.

mod common;

use common::*;
use std::time::Duration;

/// What the backend logs when its data thread has no real-time scheduling.
const NO_RT_WARNING: &str = "data thread runs without real-time scheduling";

#[test]
fn guest_playback_arrives_at_the_sink_sample_exact() {
    for kernel in FRONTEND_KERNELS {
        playback_arrives_intact(kernel);
    }
}

fn playback_arrives_intact(kernel: &str) {
    let mut env = PwEnv::start();
    let (sock, log) = env.start_backend();
    let wav = env.dir.path().join("monitor.wav");
    let mut rec = env.record_monitor(&wav);
    let args = ["--domain", "play-vm", "--play", "pattern", "--seconds", "2", "--frontend-kernel", kernel];
    let (ok, report, err) = env.sim(&sock, &args);
    assert!(ok, "sim-guest ({kernel}) failed: {err}");
    finish_recording(&mut rec, &pattern(2.0), &wav);
    let p = &report["playback"];
    assert_eq!(p["frames"], 96000);
    assert_eq!(p["xruns"], 0);
    assert_eq!(p["bad_event_ids"], 0);
    assert_eq!(p["early_interrupts"], 0);
    assert!(p["period_interrupts"].as_u64().unwrap() >= 40, "{p}");
    assert!(p["final_position_bytes"].as_u64().unwrap() >= 96000 * 4);
    assert_arrived_intact(&env, &pattern(2.0), &wav);
    // Where the host gives real-time scheduling, nothing to warn about.
    if env.backend_data_threads().iter().any(|(_, p)| *p == "SCHED_FIFO") {
        assert!(!std::fs::read_to_string(&log).unwrap().contains(NO_RT_WARNING));
    }
}

/// A guest closes its stream right after the cycle that carries its last
/// frames. Part of that cycle can still be in the graph then: the backend
/// lets it play out (without that, 716 frames of a 44.1 kHz stream were
/// lost at a 4096 quantum, found on a real Xen guest).
#[test]
fn the_last_frames_before_close_reach_the_sink() {
    let mut env = PwEnv::start_with_conf("context.properties = { default.clock.max-quantum = 8192 }");
    env.run("pw-metadata", &["-n", "settings", "0", "clock.force-rate", "44100"]);
    let (sock, _log) = env.start_backend();
    let sent = xen_vsnd_sim::signal::generate(xen_vsnd_sim::signal::Signal::Pattern, 44100, 2, 132300);
    let src = env.dir.path().join("src.wav");
    xen_vsnd_sim::signal::write_wav_s16(&src, 44100, 2, &sent).unwrap();
    let wav = env.dir.path().join("monitor.wav");
    let mut rec = env.record_monitor_at(&wav, 44100);
    let args = ["--domain", "tail-vm", "--rate", "44100", "--period", "8820", "--periods", "12"];
    let more = ["--card-buffer-size", "1048576", "--play-wav", src.to_str().unwrap()];
    let (ok, report, err) = env.sim(&sock, &[&args[..], &more[..]].concat());
    assert!(ok, "sim-guest failed: {err}");
    assert_eq!(report["playback"]["frames"], 132300);
    finish_recording(&mut rec, &sent, &wav);
    assert_arrived_intact(&env, &sent, &wav);
}

#[test]
fn guest_capture_receives_what_pipewire_plays() {
    for kernel in FRONTEND_KERNELS {
        let mut env = PwEnv::start();
        let (sock, _log) = env.start_backend();
        // There is no source: WirePlumber links the guest's capture node to
        // the sink's monitor.
        let port = "xen-vsnd.cap-vm.0.0.capture:input_FL";
        let (report, sent, cap) =
            capture_what_the_sink_plays(&env, &sock, "cap-vm", port, &["--frontend-kernel", kernel]);
        let c = &report["capture"];
        assert_eq!(c["xruns"], 0, "{kernel}: {c}");
        assert_eq!(c["bad_event_ids"], 0, "{kernel}: {c}");
        assert_eq!(c["early_interrupts"], 0, "{kernel}: {c}");
        assert_arrived_intact(&env, &sent, &cap);
    }
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
    let cap = env.dir.path().join("c.wav");
    let args = ["--domain", "work-vm", "--play", "tone", "--seconds", "4", "--capture-seconds", "4"];
    let mut sim =
        Proc(env.spawn_sim(&sock, &[&args[..], &["--capture-wav", cap.to_str().unwrap()]].concat()), "sim");
    wait_until("both guest nodes", Duration::from_secs(10), || {
        env.node_exists("xen-vsnd.work-vm.0.0.playback") && env.node_exists("xen-vsnd.work-vm.0.0.capture")
    });
    let dump = env.dump();
    let play = node_props(&dump, "xen-vsnd.work-vm.0.0.playback").expect("playback node in pw-dump");
    assert_eq!(play["media.class"], "Stream/Output/Audio");
    assert_eq!(play["node.description"], "work-vm: Xen PV Sound dev0 (playback)");
    assert_eq!(play["application.name"], "work-vm");
    assert_eq!(play["xen.unique-id"], "work-vm-play");
    assert_eq!(play["xen.domain"], "work-vm");
    assert!(play["xen.domid"].as_u64().is_some() || play["xen.domid"].as_str().is_some());
    let cap = node_props(&dump, "xen-vsnd.work-vm.0.0.capture").expect("capture node in pw-dump");
    assert_eq!(cap["media.class"], "Stream/Input/Audio");
    assert_eq!(cap["node.description"], "work-vm: Xen PV Sound dev0 (capture)");
    assert_eq!(cap["xen.unique-id"], "work-vm-cap");
    // WirePlumber linked the guest's playback to the sink like any application.
    assert!(env.links().contains("xen-vsnd.work-vm.0.0.playback:output_FL"), "{}", env.links());
    sim.interrupt_and_wait(Duration::from_secs(5));
}

#[test]
fn a_guest_reconnects_after_disconnecting() {
    let mut env = PwEnv::start();
    let (sock, log) = env.start_backend();
    for round in 0..4 {
        let kernel = FRONTEND_KERNELS[round % 2];
        let args = ["--domain", "again", "--play", "tone", "--seconds", "0.5", "--frontend-kernel", kernel];
        let (ok, report, err) = env.sim(&sock, &args);
        assert!(ok, "round {round} ({kernel}): {err}");
        assert_eq!(report["playback"]["frames"], 24000, "round {round}");
        // The backend tears the streams down when the domain goes away.
        wait_until("the node to go away", Duration::from_secs(10), || {
            !env.node_exists("xen-vsnd.again.0.0.playback")
        });
    }
    let text = std::fs::read_to_string(log).unwrap();
    assert_eq!(text.matches("loopback: guest again connected").count(), 4, "{text}");
    assert_eq!(text.matches("backend directory removed").count(), 4, "{text}");
}

#[test]
fn frontend_close_and_reconnect_in_the_same_domain() {
    connects_three_times("reload-vm", "closing", "frontend state Closing");
}

/// Three rounds (`three_rounds`) for both frontend generations, each round
/// after the first starting with a new connection that the backend
/// announces as "disconnecting: `why`".
fn connects_three_times(domain: &str, mode: &str, why: &str) {
    for kernel in FRONTEND_KERNELS {
        let (_report, log) = three_rounds(domain, mode, kernel);
        assert_eq!(log.matches(&format!("disconnecting: {why}")).count(), 2, "{kernel}: {log}");
        assert_eq!(log.matches("connected domid=1 devid=0 streams=2").count(), 3, "{kernel}: {log}");
    }
}

/// Plays half a second of the pattern three times on one simulated guest
/// whose frontend is that of Linux `kernel`, starting over between rounds
/// as `mode` says; returns (report, backend log). Every round must get its
/// period interrupts: the guest fails after 2 s without a position event.
fn three_rounds(domain: &str, mode: &str, kernel: &str) -> (serde_json::Value, String) {
    let mut env = PwEnv::start();
    let (sock, log) = env.start_backend();
    let args = ["--domain", domain, "--play", "pattern", "--seconds", "0.5", "--reconnects", "2"];
    let more = ["--reconnect-mode", mode, "--frontend-kernel", kernel];
    let (ok, report, err) = env.sim(&sock, &[&args[..], &more[..]].concat());
    assert!(ok, "{kernel}: {err}");
    assert_eq!(report["reconnects"], 2);
    let p = &report["playback"];
    assert_eq!(p["frames"], 24000, "{kernel}: the last round played in full: {p}");
    assert_eq!(p["xruns"], 0, "{kernel}: {p}");
    assert_eq!(p["bad_event_ids"], 0, "{kernel}: {p}");
    assert_eq!(p["early_interrupts"], 0, "{kernel}: {p}");
    // A reopen keeps the frontend's streams (and their counts) for all
    // three rounds; the other modes start with new ones.
    let rounds = if mode == "reopen" { 3 } else { 1 };
    assert!(p["period_interrupts"].as_u64().unwrap() >= rounds * 20, "{kernel}: every round's periods: {p}");
    (report, std::fs::read_to_string(log).unwrap())
}

/// The delay extension is offered and used only when both ends opt in: a
/// guest that asks for it gets delays from a backend that offers it, and
/// the base protocol's zeroes from one started with --no-delay-report. (A
/// capture from the sink's monitor, which WirePlumber links, has at least
/// one cycle of delay.)
#[test]
fn delays_reach_only_guests_of_a_backend_that_offers_them() {
    for (extra, offered) in [(&[][..], true), (&["--no-delay-report"][..], false)] {
        let mut env = PwEnv::start();
        let (sock, _log) = env.start_backend_with(extra);
        let cap = env.dir.path().join("cap.wav");
        let args = ["--domain", "delay-vm", "--capture-seconds", "1", "--delay-report", "--capture-wav"];
        let (ok, report, err) = env.sim(&sock, &[&args[..], &[cap.to_str().unwrap()]].concat());
        assert!(ok, "{err}");
        let c = &report["capture"];
        assert!(c["events"].as_u64().unwrap() > 10, "{c}");
        assert_eq!(c["max_delay_frames"].as_u64().unwrap() > 0, offered, "offered {offered}: {c}");
    }
}

/// The upstream frontend handles InitWait once per backend write it sees,
/// so it can drop the rings the backend just mapped and publish new ones,
/// passing through Initialising faster than the backend's watch fires. The
/// backend must notice the new rings while Connected and take them.
#[test]
fn frontend_republishing_rings_while_connected_is_served_on_the_new_ones() {
    connects_three_times("republish-vm", "republish", "the frontend published new rings");
}

/// A second and a third play on one connection. Linux 4.18 to 7.1 expect
/// event ids to run on across OPENs of a stream (they reset them only with
/// the channel); 7.2 expects them from 0 after each OPEN. Each play must get
/// every position event of its own kind (twins: docs/protocol.md), or it
/// gets no period interrupts.
#[test]
fn later_plays_on_one_connection_get_their_events_on_both_kernel_generations() {
    for kernel in FRONTEND_KERNELS {
        let (report, log) = three_rounds("replay-vm", "reopen", kernel);
        assert_eq!(log.matches("connected domid=1 devid=0 streams=2").count(), 1, "{log}");
        // The second and third OPEN start past slot 0: their positions
        // went out as twins, and this frontend took one of each pair.
        let p = &report["playback"];
        assert!(p["twin_events"].as_u64().unwrap() > 0, "{kernel}: {p}");
    }
}

/// An application that sets its hardware parameters twice (ALSA allows
/// it) makes every frontend send a second OPEN without CLOSE: the backend
/// takes it as CLOSE + OPEN. Two plays and captures on one connection, each
/// opened twice, get every position and period interrupt.
#[test]
fn hw_params_twice_sends_a_second_open_that_is_served() {
    for kernel in FRONTEND_KERNELS {
        let mut env = PwEnv::start();
        let (sock, log) = env.start_backend();
        let cap = env.dir.path().join("cap.wav");
        let args = ["--domain", "twice-vm", "--play", "pattern", "--seconds", "1", "--capture-seconds", "1"];
        let more = ["--hw-params-twice", "--reconnects", "1", "--reconnect-mode", "reopen"];
        let (ok, report, err) = env.sim(
            &sock,
            &[&args[..], &more[..], &["--capture-wav", cap.to_str().unwrap(), "--frontend-kernel", kernel]]
                .concat(),
        );
        assert!(ok, "{kernel}: {err}");
        for dir in ["playback", "capture"] {
            let s = &report[dir];
            // (Capture reads whole periods: it may read past the second.)
            assert!(s["frames"].as_u64().unwrap() >= 48000, "{kernel} {dir}: the second round in full: {s}");
            assert_eq!(s["xruns"], 0, "{kernel} {dir}: {s}");
            assert_eq!(s["bad_event_ids"], 0, "{kernel} {dir}: {s}");
            assert_eq!(s["early_interrupts"], 0, "{kernel} {dir}: {s}");
            assert!(s["period_interrupts"].as_u64().unwrap() >= 2 * 40, "{kernel} {dir}: {s}");
        }
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.matches("opened stream=xen-vsnd.twice-vm.0.0.playback").count(), 4, "{text}");
        assert!(!text.contains("guest error"), "{kernel}: {text}");
    }
}

#[test]
fn a_guest_killed_mid_stream_is_cleaned_up_without_disturbing_another() {
    let mut env = PwEnv::start();
    let (sock, log) = env.start_backend();
    let wav = env.dir.path().join("monitor.wav");
    let mut rec = env.record_monitor(&wav);
    let good = env.spawn_sim(&sock, &["--domain", "steady-vm", "--play", "pattern", "--seconds", "4"]);
    let mut doomed =
        Proc(env.spawn_sim(&sock, &["--domain", "doomed-vm", "--play", "tone", "--seconds", "30"]), "doomed");
    wait_until("both guests to play", Duration::from_secs(10), || {
        let l = env.links();
        l.contains("xen-vsnd.doomed-vm.0.0.playback:output_FL")
            && l.contains("xen-vsnd.steady-vm.0.0.playback:output_FL")
    });
    std::thread::sleep(Duration::from_millis(500));
    doomed.0.kill().unwrap();
    doomed.0.wait().unwrap();
    wait_until("the dead guest's node to go away", Duration::from_secs(10), || {
        !env.node_exists("xen-vsnd.doomed-vm.0.0.playback")
    });
    let (ok, _, err) = finish_sim(good);
    assert!(ok, "{err}");
    let sent = pattern(4.0);
    finish_recording(&mut rec, &sent, &wav);
    // The dead guest's tone was mixed in for a while: compare only after it
    // stopped, i.e. the steady guest's tail must be intact and gap-free.
    assert_tail_intact(&env, &sent, &wav, 48000);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("disconnecting: backend directory removed"), "{text}");
    // The backend still serves a new guest.
    let (ok, report, err) = env.sim(&sock, &["--domain", "doomed-vm", "--play", "tone", "--seconds", "0.3"]);
    assert!(ok, "{err}");
    assert_eq!(report["playback"]["frames"], 14400);
}

#[test]
fn delay_is_reported_only_to_guests_that_opt_in() {
    let mut env = PwEnv::start();
    let (sock, _log) = env.start_backend();
    // A 44.1 kHz guest in a 48 kHz graph: PipeWire's resampler holds frames,
    // which the stream's time report counts, so the delay cannot be zero.
    // (The null sink itself reports no device latency.)
    let args = ["--play", "tone", "--seconds", "1", "--rate", "44100"];
    let (ok, with, err) = env.sim(&sock, &[&["--domain", "aware-vm", "--delay-report"][..], &args].concat());
    assert!(ok, "{err}");
    let d = with["playback"]["max_delay_frames"].as_u64().unwrap();
    assert!(d > 0 && d < 44100, "delay {d} frames");
    let (ok, without, err) = env.sim(&sock, &[&["--domain", "plain-vm"][..], &args].concat());
    assert!(ok, "{err}");
    assert_eq!(without["playback"]["max_delay_frames"], 0, "reserved bytes must stay zero without opt-in");
}

/// A host that gives the backend no real-time scheduling gets told so in
/// the log, once, when the first stream runs.
#[test]
fn a_backend_without_realtime_scheduling_says_so() {
    let mut env = PwEnv::start();
    // No RLIMIT_RTPRIO and no CAP_SYS_NICE: neither PipeWire's module-rt nor
    // anything else can raise the data thread (there is no RTKit here).
    let no_rt =
        ["prlimit", "--rtprio=0", "setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", "--"];
    let (sock, log) = env.start_backend_under(&no_rt, &[]);
    for domain in ["first-vm", "second-vm"] {
        let (ok, _, err) = env.sim(&sock, &["--domain", domain, "--play", "tone", "--seconds", "0.3"]);
        assert!(ok, "{err}");
    }
    let threads = env.backend_data_threads();
    assert!(!threads.is_empty() && threads.iter().all(|(_, p)| *p == "SCHED_OTHER"), "{threads:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches(NO_RT_WARNING).count(), 1, "{text}");
}

/// A second `serve` on the transport of a running one would fight it over
/// every device: it refuses to start and names the running one, which
/// goes on serving.
#[test]
fn a_second_serve_on_the_same_transport_refuses_to_start() {
    let mut env = PwEnv::start();
    let (sock, _log) = env.start_backend();
    let spec = format!("loopback:{}", sock.display());
    let out = env.cmd(BIN).args(["serve", "--transport", &spec]).output().unwrap();
    assert!(!out.status.success(), "the second serve started");
    let err = String::from_utf8_lossy(&out.stderr);
    let first = env.backend_pid();
    assert!(err.contains("another xen-vsnd already serves loopback:"), "{err}");
    assert!(err.contains(&format!("pid {first} ")), "names the running one (pid {first}): {err}");
    let (ok, report, err) = env.sim(&sock, &["--domain", "still-vm", "--play", "tone", "--seconds", "0.3"]);
    assert!(ok, "the first one still serves: {err}");
    assert_eq!(report["playback"]["frames"], 14400);
}

/// A guest node is a device to the user: it lives as long as the guest's
/// stream is connected, so a link made by hand (pw-link, qpwgraph) carries
/// the guest's sound through application restarts and a change of rate.
/// With autoconnect off nothing else links the node: a round whose node
/// had lost the link would get no positions and fail.
#[test]
fn a_hand_made_link_survives_application_restarts_and_a_rate_change() {
    let mut env = PwEnv::start();
    let (sock, log) = env.start_backend_with(&["--node-property", "node.autoconnect=false"]);
    let node = "xen-vsnd.link-vm.0.0.playback";
    let sim = env.spawn_sim(
        &sock,
        &[
            "--domain",
            "link-vm",
            "--play",
            "tone",
            "--seconds",
            "0.5",
            "--start-delay",
            "2",
            "--reconnects",
            "3",
            "--reconnect-mode",
            "reopen",
            "--rates",
            "48000,48000,44100,48000",
        ],
    );
    // The node is there from the connection on, before any OPEN.
    wait_until("the guest's node", Duration::from_secs(10), || {
        env.ports().contains(&format!("{node}:output_FR"))
    });
    let id = env.node_id(node).expect("node id");
    env.link(node, SINK, "output", "playback");
    let (ok, report, err) = finish_sim(sim);
    assert!(ok, "a round lost its link: {err}");
    assert_eq!(report["reconnects"], 3);
    let p = &report["playback"];
    assert_eq!(p["frames"], 24000, "the last round played in full: {p}");
    assert_eq!(p["bad_event_ids"], 0, "{p}");
    assert_eq!(env.node_id(node), Some(id), "the same node throughout");
    assert!(env.links().contains(&format!("{node}:output_FL")), "{}", env.links());
    let text = std::fs::read_to_string(log).unwrap();
    assert_eq!(text.matches(&format!("opened stream={node} rate=44100")).count(), 1, "{text}");
    assert_eq!(text.matches(&format!("opened stream={node} rate=48000")).count(), 3, "{text}");
}
