//! The JACK host (`serve --host jack`) against a real JACK 2 server with its
//! dummy driver: simulated guests play into and record from JACK clients of
//! this test, frame for frame; the delay a guest gets is the latency JACK
//! reports; a rate other than the server's is refused. Then the server is
//! killed and started again under a playing guest (3 s away each time):
//! at the same rate the stream plays on through JACK, at another rate it
//! ends with a clean -EIO and new OPENs take the new rate.
//!
//! One test: the server's name reaches this process's own JACK clients
//! through `JACK_DEFAULT_SERVER`, set once before any of them exists.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

const RATE: u32 = 48000;
/// The dummy driver's period and port latencies (`jack_lsp -l`).
const PERIOD: u32 = 1024;

struct JackEnv {
    dir: tempfile::TempDir,
    server: String,
    procs: Vec<Proc>,
}

impl JackEnv {
    /// Starts `jackd` (dummy driver, two physical ports each way).
    fn start() -> JackEnv {
        let dir = tempfile::tempdir().unwrap();
        let server = format!("xen-vsnd-test-{}", std::process::id());
        // SAFETY (of set_var): the only test of this binary, before it
        // starts any thread or JACK client.
        std::env::set_var("JACK_DEFAULT_SERVER", &server);
        let mut env = JackEnv { dir, server, procs: Vec::new() };
        env.start_server(RATE);
        env
    }

    /// Starts `jackd` named `self.server` (dummy driver at `rate`, two
    /// physical ports each way) and waits until it answers.
    fn start_server(&mut self, rate: u32) {
        let log = std::fs::File::create(self.dir.path().join(format!("jackd-{rate}.log"))).unwrap();
        let jackd = Command::new("jackd")
            .args(["-n", &self.server, "-d", "dummy", "-r", &rate.to_string()])
            .args(["-p", &PERIOD.to_string(), "-C", "2", "-P", "2"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("jackd");
        self.procs.insert(0, Proc(jackd, "jackd"));
        wait_until("the JACK server", Duration::from_secs(10), || {
            jack::Client::new("xv-probe", jack::ClientOptions::NO_START_SERVER).is_ok()
        });
    }

    /// Kills the server (SIGKILL, as a crash) and starts it again at `rate`
    /// 3 s later: longer than a guest waits for a position before it gives
    /// up (2 s in the simulated guest).
    fn restart_server(&mut self, rate: u32) {
        let at = self.procs.iter().position(|p| p.1 == "jackd").expect("jackd");
        let mut old = self.procs.remove(at);
        let _ = old.0.kill();
        let _ = old.0.wait();
        // The server's name is taken until libjack notices it is gone.
        wait_until("the old server to be gone", Duration::from_secs(10), || {
            jack::Client::new("xv-probe", jack::ClientOptions::NO_START_SERVER).is_err()
        });
        std::thread::sleep(Duration::from_secs(3));
        self.start_server(rate);
    }

    /// Starts `xen-vsnd serve --host jack` on a loopback socket.
    fn start_backend(&mut self, connect: &str) -> (PathBuf, PathBuf) {
        let sock = self.dir.path().join(format!("vsnd-{}.sock", self.procs.len()));
        let log = self.dir.path().join(format!("backend-{}.log", self.procs.len()));
        let f = std::fs::File::create(&log).unwrap();
        let spec = format!("loopback:{}", sock.display());
        let policy = capture_allowed_policy(self.dir.path());
        let child = Command::new(BIN)
            .args(["serve", "--host", "jack", "--jack-connect", connect, "--transport", &spec])
            .args(["--config", policy.to_str().unwrap()])
            .env("JACK_DEFAULT_SERVER", &self.server)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("xen-vsnd serve");
        self.procs.push(Proc(child, "backend"));
        wait_for_backend(&log);
        (sock, log)
    }

    fn spawn_sim(&self, sock: &Path, args: &[&str]) -> Child {
        spawn_sim_with(Command::new("nice"), sock, args)
    }
}

impl Drop for JackEnv {
    fn drop(&mut self) {
        while let Some(mut p) = self.procs.pop() {
            p.interrupt_and_wait(Duration::from_secs(3));
        }
    }
}

/// S16 samples from JACK floats (exact for what came from S16).
fn to_s16(v: f32) -> i16 {
    (v * 32768.0).round().clamp(-32768.0, 32767.0) as i16
}

/// A JACK client of this test that records its two inputs, interleaved.
struct Recorder {
    _client: jack::AsyncClient<(), jack::contrib::ClosureProcessHandler<(), Box<RecordFn>>>,
    cycles: mpsc::Receiver<Vec<i16>>,
}

type RecordFn = dyn FnMut(&jack::Client, &jack::ProcessScope) -> jack::Control + Send;

impl Recorder {
    fn start(name: &str) -> Recorder {
        let (client, _) = jack::Client::new(name, jack::ClientOptions::NO_START_SERVER).unwrap();
        let ins: Vec<_> = (1..=2)
            .map(|i| client.register_port(&format!("in_{i}"), jack::AudioIn::default()).unwrap())
            .collect();
        let (tx, cycles) = mpsc::channel();
        // A test may allocate in its own process callback.
        let record: Box<RecordFn> = Box::new(move |_, ps| {
            let (l, r) = (ins[0].as_slice(ps), ins[1].as_slice(ps));
            let _ = tx.send(l.iter().zip(r).flat_map(|(a, b)| [to_s16(*a), to_s16(*b)]).collect());
            jack::Control::Continue
        });
        let handler = jack::contrib::ClosureProcessHandler::new(record);
        Recorder { _client: client.activate_async((), handler).unwrap(), cycles }
    }

    fn samples(&self) -> Vec<i16> {
        self.cycles.try_iter().flatten().collect()
    }
}

/// A JACK client of this test that plays `samples` (interleaved stereo)
/// once `go` is set, and silence before and after.
fn player(name: &str, samples: Vec<i16>, go: Arc<AtomicBool>) -> impl Drop {
    let (client, _) = jack::Client::new(name, jack::ClientOptions::NO_START_SERVER).unwrap();
    let mut outs: Vec<_> = (1..=2)
        .map(|i| client.register_port(&format!("out_{i}"), jack::AudioOut::default()).unwrap())
        .collect();
    let mut at = 0;
    let play = move |_: &jack::Client, ps: &jack::ProcessScope| {
        let frames = ps.n_frames() as usize;
        for (c, port) in outs.iter_mut().enumerate() {
            let out = port.as_mut_slice(ps);
            for (f, v) in out.iter_mut().enumerate() {
                let i = (at + f) * 2 + c;
                *v = if go.load(Ordering::Relaxed) {
                    samples.get(i).map_or(0.0, |s| *s as f32 / 32768.0)
                } else {
                    0.0
                };
            }
        }
        if go.load(Ordering::Relaxed) {
            at += frames;
        }
        jack::Control::Continue
    };
    client.activate_async((), jack::contrib::ClosureProcessHandler::new(play)).unwrap()
}

fn counter(log: &Path, stream: &str, key: &str) -> u64 {
    closed_counter_in(&std::fs::read_to_string(log).unwrap(), stream, key)
}

#[test]
fn guests_play_and_record_through_jack() {
    let mut env = JackEnv::start();
    let sent = pattern(2.0);

    // Playback, into a recorder of this test: every frame, in order,
    // unchanged (S16 -> JACK float -> S16 is exact).
    let rec = Recorder::start("xv-rec");
    let (sock, log) = env.start_backend("^xv-(rec|play):");
    let (ok, report, err) =
        finish_sim(env.spawn_sim(&sock, &["--domain", "jplay-vm", "--play", "pattern", "--seconds", "2"]));
    assert!(ok, "{err}");
    assert_eq!(report["playback"]["xruns"], 0, "{report}");
    assert_eq!(report["playback"]["max_cycle_frames"], PERIOD, "the JACK period drives the guest");
    let got = rec.samples();
    let (start, n) =
        xen_vsnd_sim::signal::find_and_compare(&sent, &got, 2, 64, 0).expect("the pattern reached JACK");
    assert_eq!(n, sent.len() / 2, "only {n} frames intact from recorded frame {start}");
    assert_eq!(counter(&log, "xen-vsnd.jplay-vm.0.0.playback", "late_cycles"), 0);

    // Capture, from a player of this test that starts the pattern once the
    // guest's capture client is connected to it.
    let go = Arc::new(AtomicBool::new(false));
    let player_client = player("xv-play", sent.clone(), go.clone());
    let cap = env.dir.path().join("captured.wav");
    let sim = env.spawn_sim(
        &sock,
        &["--domain", "jcap-vm", "--capture-seconds", "4", "--capture-wav", cap.to_str().unwrap()],
    );
    let (probe, _) = jack::Client::new("xv-watch", jack::ClientOptions::NO_START_SERVER).unwrap();
    wait_until("the guest's capture ports to be connected", Duration::from_secs(10), || {
        probe
            .port_by_name("xen-vsnd.jcap-vm.0.0.capture:input_FR")
            .is_some_and(|p| p.connected_count().unwrap_or(0) > 0)
    });
    go.store(true, Ordering::Relaxed);
    let (ok, report, err) = finish_sim(sim);
    assert!(ok, "{err}");
    assert_eq!(report["capture"]["xruns"], 0, "{report}");
    let got = xen_vsnd_sim::signal::read_wav(&cap).unwrap().samples;
    let (start, n) =
        xen_vsnd_sim::signal::find_and_compare(&sent, &got, 2, 64, 0).expect("the guest heard the pattern");
    assert_eq!(n, sent.len() / 2, "only {n} frames intact from captured frame {start}");

    // The delay a guest is told is what JACK reports for its ports: here
    // those of the dummy driver's physical ports they are connected to.
    let (sock, _log) = env.start_backend("physical");
    let physical_latency =
        |port: &str, mode| probe.port_by_name(port).unwrap().get_latency_range(mode).1 as u64;
    let cap = env.dir.path().join("delay-cap.wav");
    let (ok, report, err) = finish_sim(env.spawn_sim(
        &sock,
        &[
            "--domain",
            "jdelay-vm",
            "--play",
            "tone",
            "--seconds",
            "1",
            "--capture-seconds",
            "1",
            "--capture-wav",
            cap.to_str().unwrap(),
            "--delay-report",
        ],
    ));
    assert!(ok, "{err}");
    let playback_latency = physical_latency("system:playback_1", jack::LatencyType::Playback);
    let capture_latency = physical_latency("system:capture_1", jack::LatencyType::Capture);
    assert!(playback_latency > 0 && capture_latency > 0);
    assert_eq!(report["playback"]["last_delay_frames"].as_u64(), Some(playback_latency), "{report}");
    assert_eq!(report["capture"]["last_delay_frames"].as_u64(), Some(capture_latency), "{report}");

    // The latency self-test with the guest's playback ports connected to
    // its capture ports: JACK runs the two clients in one cycle, so the
    // impulses come back at once, and the delays the guest was told (the
    // ports' latencies, 0 here) say so.
    let (sock, _log) = env.start_backend("none");
    let sim = env.spawn_sim(
        &sock,
        &["--domain", "jlat-vm", "--measure-latency", "--seconds", "2.5", "--latency-tolerance", "0"],
    );
    let (play, cap) = ("xen-vsnd.jlat-vm.0.0.playback", "xen-vsnd.jlat-vm.0.0.capture");
    // JACK connects ports of active clients only: retry until both are.
    wait_until("the guest's playback ports connected to its capture ports", Duration::from_secs(10), || {
        ["FL", "FR"].iter().all(|ch| {
            match probe.connect_ports_by_name(&format!("{play}:output_{ch}"), &format!("{cap}:input_{ch}")) {
                Ok(()) | Err(jack::Error::PortAlreadyConnected(..)) => true,
                Err(_) => false,
            }
        })
    });
    let (ok, report, err) = finish_sim(sim);
    assert!(ok, "self-test failed: {err}\n{report}");
    let l = &report["latency"];
    assert!(l["measurements"].as_array().unwrap().len() >= 8, "{l}");
    assert_eq!(l["error"], 0, "{l}");

    // JACK does not resample: another rate is refused, and the guest is
    // told so at OPEN.
    let (ok, _, err) =
        finish_sim(env.spawn_sim(
            &sock,
            &["--domain", "j44-vm", "--play", "tone", "--seconds", "0.2", "--rate", "44100"],
        ));
    assert!(!ok, "a 44.1 kHz stream was accepted by a 48 kHz JACK server");
    assert!(err.contains("-22"), "{err}");

    // This process's own clients go before the server does.
    drop((probe, rec, player_client));
    server_restarts(&mut env);
}

/// The JACK server killed and started again under a playing guest: at the
/// same rate the stream plays on through JACK (its client made again, its
/// sound frame-exact); at another rate the running stream ends with a
/// clean -EIO and new OPENs take the new rate.
fn server_restarts(env: &mut JackEnv) {
    let (sock, log) = env.start_backend("none");
    let stream = "xen-vsnd.jre-vm.0.0.playback";
    let seconds = 12.0;
    let sent = pattern(seconds);
    let guest = env.spawn_sim(&sock, &["--domain", "jre-vm", "--play", "pattern", "--seconds", "12"]);
    let client_there = |name: &str| {
        jack::Client::new("xv-look", jack::ClientOptions::NO_START_SERVER)
            .is_ok_and(|(c, _)| c.port_by_name(&format!("{name}:output_FR")).is_some())
    };
    let opened = |stream: &str| {
        std::fs::read_to_string(&log).unwrap_or_default().contains(&format!("opened stream={stream} "))
    };
    wait_until("the guest's stream open", Duration::from_secs(10), || opened(stream));
    env.restart_server(RATE);
    wait_until("the guest's client made again", Duration::from_secs(15), || client_there(stream));
    let rec = Recorder::start("xv-rec2");
    let (probe, _) = jack::Client::new("xv-watch2", jack::ClientOptions::NO_START_SERVER).unwrap();
    for (ch, i) in [("FL", 1), ("FR", 2)] {
        probe.connect_ports_by_name(&format!("{stream}:output_{ch}"), &format!("xv-rec2:in_{i}")).unwrap();
    }
    let (ok, report, err) = finish_sim(guest);
    assert!(ok, "the guest's stream stalled or failed across the restart: {err}\n{report}");
    let got = rec.samples();
    let tail = 2 * 48000;
    let (_, n) = xen_vsnd_sim::signal::find_and_compare(&sent[sent.len() - tail * 2..], &got, 2, 64, 0)
        .expect("the pattern's tail reached JACK after the restart");
    assert_eq!(n, tail, "only {n} of the last {tail} frames intact after the restart");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the JACK server went away") && text.contains("the JACK server is back"), "{text}");
    drop((rec, probe));

    // Back at 44.1 kHz under a guest playing at 48: that stream ends with
    // a clean error (its next WRITE fails with -EIO; positions kept moving
    // meanwhile, so no stall first), 48 kHz is refused from then on and
    // 44.1 kHz plays through JACK.
    let guest = env.spawn_sim(&sock, &["--domain", "jrate-vm", "--play", "tone", "--seconds", "12"]);
    wait_until("the guest's stream open", Duration::from_secs(10), || {
        opened("xen-vsnd.jrate-vm.0.0.playback")
    });
    env.restart_server(44100);
    let (ok, report, err) = finish_sim(guest);
    assert!(
        !ok && err.contains("-5") && !err.contains("no position event"),
        "not a clean -EIO: {err}\n{report}"
    );
    assert!(std::fs::read_to_string(&log).unwrap().contains("came back at another rate"));
    let (ok, _, err) = finish_sim(env.spawn_sim(
        &sock,
        &["--domain", "jrate-vm", "--play", "tone", "--seconds", "0.2", "--rate", "48000"],
    ));
    assert!(!ok && err.contains("-22"), "48 kHz accepted by a 44.1 kHz server: {err}");
    let rec = Recorder::start("xv-rec3");
    let sent44 = xen_vsnd_sim::signal::generate(xen_vsnd_sim::signal::Signal::Pattern, 44100, 2, 88200);
    let guest = env.spawn_sim(
        &sock,
        &[
            "--domain",
            "j44b-vm",
            "--play",
            "pattern",
            "--seconds",
            "2",
            "--rate",
            "44100",
            "--start-delay",
            "3",
        ],
    );
    let stream44 = "xen-vsnd.j44b-vm.0.0.playback";
    let (probe, _) = jack::Client::new("xv-watch3", jack::ClientOptions::NO_START_SERVER).unwrap();
    // The client is there from the guest's connection on, before it plays.
    wait_until("the 44.1 kHz guest's ports connected", Duration::from_secs(10), || {
        [("FL", 1), ("FR", 2)].iter().all(|(ch, i)| {
            match probe.connect_ports_by_name(&format!("{stream44}:output_{ch}"), &format!("xv-rec3:in_{i}"))
            {
                Ok(()) | Err(jack::Error::PortAlreadyConnected(..)) => true,
                Err(_) => false,
            }
        })
    });
    let (ok, report, err) = finish_sim(guest);
    assert!(ok, "{err}\n{report}");
    let got = rec.samples();
    let (_, n) = xen_vsnd_sim::signal::find_and_compare(&sent44, &got, 2, 64, 0)
        .expect("the 44.1 kHz pattern reached JACK");
    assert_eq!(n, sent44.len() / 2, "only {n} frames of the 44.1 kHz pattern intact");
}
