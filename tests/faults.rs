//! Faults on the backend's own code paths, in process: the daemon's
//! backend (`backend::run`) over the loopback transport with a fault plan
//! at the hypervisor seam (`xen::faults`), the null host cycled by the
//! test, and simulated guests in threads of this process. Every grant map,
//! event-channel bind and xenstore call of a guest's handshake and OPEN
//! fails in turn, by this side's failure and by the hypervisor's refusal
//! (or hangs, then fails); guests die in the middle of every request type;
//! 1,000 guests of one name are made and killed. Each time the guest is
//! answered (connected after the call is tried again, an error status, a
//! Closed backend with its reason) instead of left waiting, the next
//! guest is served, and the
//! backend's threads, file descriptors and mappings (this process's) come
//! back to what they were.

use clap::Parser;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use xen_vsnd::backend::{self, registry::Registry};
use xen_vsnd::host::null::NullHost;
use xen_vsnd::policy::Policy;
use xen_vsnd::sndif::{op, trigger, OpenReq, PcmFormat, Request, RwReq};
use xen_vsnd::xen::faults::{self, Call, Fault, FaultPlan};
use xen_vsnd::xen::loopback::Hypervisor;
use xen_vsnd_sim::front::PeriodRule;
use xen_vsnd_sim::{self as sim, Guest, SimOptions};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    o: SimOptions,
}

struct Backend {
    plan: Arc<FaultPlan>,
    host: Arc<NullHost>,
    registry: Arc<Registry>,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Backend {
    /// The backend, serving; it runs until the test process ends.
    fn start() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("hypervisor");
        let (hv, t) = Hypervisor::new_transport();
        hv.listen(&sock).unwrap();
        let plan = Arc::new(FaultPlan::default());
        let t = faults::inject(t, plan.clone());
        let host = Arc::new(NullHost::manual());
        let registry = Arc::new(Registry::with_policy(host.clone(), None, Policy::default()));
        let (h, r) = (host.clone(), registry.clone());
        std::thread::spawn(move || {
            backend::run(t, h, r, Arc::new(AtomicBool::new(false)), backend::Options::default())
        });
        Backend { plan, host, registry, sock, _dir: dir }
    }

    fn options(&self, domain: &str) -> SimOptions {
        Args::parse_from(["sim", "--connect", self.sock.to_str().unwrap(), "--domain", domain]).o
    }

    /// Waits until the backend holds no stream of any guest.
    fn wait_idle(&self, what: &str) {
        wait(Duration::from_secs(10), what, || self.registry.status().is_empty());
    }

    /// `wait_idle`, and then no hypervisor call for 60 ms (the dispatcher's
    /// rescan after a guest went away): the next call counted is the next
    /// guest's.
    fn wait_quiet(&self, what: &str) {
        self.wait_idle(what);
        let calls = || KINDS.map(|k| self.plan.count(k));
        let (mut last, mut since) = (calls(), Instant::now());
        wait(Duration::from_secs(10), what, || {
            let now = calls();
            if now != last {
                (last, since) = (now, Instant::now());
            }
            since.elapsed() >= Duration::from_millis(60)
        });
    }
}

const KINDS: [Call; 6] = [
    Call::StoreRead,
    Call::StoreWrite,
    Call::StoreDirectory,
    Call::StoreWatch,
    Call::GrantMap,
    Call::EvtchnBind,
];

/// Polls `ok` until it holds, at most `limit`.
fn wait(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < end, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// This process's threads, open file descriptors, and mappings of files
/// and of guest memory (the backend's grant maps, the simulated guests'
/// own views: memfds). Anonymous mappings are left out: glibc keeps the
/// stacks of threads that ended for later ones, and more when more ran at
/// once; a stack that is not reused shows as a thread that did not end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resources {
    threads: usize,
    fds: usize,
    file_mappings: usize,
    guest_mappings: usize,
}

fn resources() -> Resources {
    let count = |dir: &str| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    Resources {
        threads: count("/proc/self/task"),
        fds: count("/proc/self/fd"),
        file_mappings: maps
            .lines()
            .filter(|l| l.split_whitespace().nth(5).is_some_and(|p| p.starts_with('/')))
            .count(),
        guest_mappings: maps.lines().filter(|l| l.contains("/memfd:")).count(),
    }
}

/// Waits until the resources are back to `base` (threads end and mappings
/// go a moment after a guest's streams do), at most 10 s.
fn back_to(base: Resources, what: &str) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let now = resources();
        if now == base {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: resources {now:?}, before {base:?}\n{}",
            std::fs::read_to_string("/proc/self/maps").unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A buffer for the guest's playback stream, granted, and the OPEN
/// request for it, as `xen-vsnd-sim guest` makes them.
fn prepare_open(g: &mut Guest, o: &SimOptions) -> OpenReq {
    g.playback.alloc_buffer(&mut g.conn, o.period * o.periods * frame_bytes(o)).unwrap();
    sim::open_req(o, &g.playback, PcmFormat::S16Le)
}

fn frame_bytes(o: &SimOptions) -> u32 {
    2 * u32::from(o.channels)
}

/// OPEN of the guest's playback stream, as `xen-vsnd-sim guest` does it.
fn open(g: &mut Guest, o: &SimOptions) -> anyhow::Result<()> {
    let req = prepare_open(g, o);
    g.playback.open(req, frame_bytes(o), PeriodRule::Upstream)
}

/// A guest that connects, plays a few cycles and closes: the backend
/// serves.
fn healthy_guest(b: &Backend, name: &str) {
    let o = b.options(name);
    let mut g = sim::connect(&o).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    open(&mut g, &o).unwrap();
    g.playback.request(Request::Trigger(trigger::START)).unwrap();
    for _ in 0..4 {
        b.host.cycle();
    }
    g.playback.request(Request::Trigger(trigger::STOP)).unwrap();
    g.playback.close().unwrap();
    drop(g);
    b.wait_idle(name);
}

/// The calls of each kind one guest's handshake makes, counted.
fn handshake_calls(b: &Backend) -> Vec<(Call, u64)> {
    let o = b.options("counted");
    // Armed far out: nothing fails, every call is counted.
    let mut counts = Vec::new();
    for k in KINDS {
        b.wait_quiet("before counting");
        b.plan.arm(k, u64::MAX, Fault::Fail);
        let g = sim::connect(&o).unwrap();
        counts.push((k, b.plan.count(k)));
        drop(g);
    }
    b.wait_quiet("counted");
    counts
}

/// One backend, the phases in turn: resources are counted for the whole
/// process, so nothing else may run beside them (one test in this file).
#[test]
fn faults_and_killed_guests_are_answered_and_leak_nothing() {
    let b = Backend::start();
    healthy_guest(&b, "warm-up");
    let base = resources();
    every_call_of_the_handshake_and_of_open_failing(&b, base);
    a_hung_call_holding_up_only_its_own_guest(&b, base);
    a_guest_killed_during_each_request_type(&b, base);
    a_thousand_guests_of_one_name_made_and_killed(&b, base);
}

fn every_call_of_the_handshake_and_of_open_failing(b: &Backend, base: Resources) {
    let calls = handshake_calls(b);
    eprintln!("calls of one handshake: {calls:?}");
    assert!(calls.iter().any(|(c, n)| *c == Call::GrantMap && *n == 4), "{calls:?}");
    let mut cases = 0;
    for (call, n) in calls {
        for nth in 1..=n {
            for fault in [Fault::Fail, Fault::Refuse] {
                b.wait_quiet("before the fault");
                let name = format!("fault-{call:?}-{nth}-{fault:?}");
                b.plan.arm(call, nth, fault);
                let fired = b.plan.fired();
                let t = Instant::now();
                let r = sim::connect(&b.options(&name));
                // Answered, not left waiting: connected (a call tried
                // again) or refused with the reason.
                let took = t.elapsed();
                assert!(took < Duration::from_secs(5), "{name}: handshake took {took:?}");
                if let Err(e) = &r {
                    assert!(format!("{e:#}").contains("injected fault"), "{name}: {e:#}");
                }
                if matches!(call, Call::GrantMap | Call::EvtchnBind) {
                    match fault {
                        // A grant or port the hypervisor refuses is the
                        // guest's doing: its device is closed with why.
                        Fault::Refuse => assert!(r.is_err(), "{name}: connected with a refused {call:?}"),
                        // This side failing is not: the connection is
                        // tried again, and the guest connects.
                        _ => assert!(r.is_ok(), "{name}: not tried again: {:#}", r.err().unwrap()),
                    }
                }
                drop(r);
                b.wait_quiet(&name);
                assert_eq!(b.plan.fired(), fired + 1, "{name}: the fault did not fire");
                b.plan.arm(call, u64::MAX, Fault::Fail);
                healthy_guest(b, &format!("after-{name}"));
                back_to(base, &name);
                cases += 1;
            }
        }
    }
    // OPEN: its directory page (the first map) or its buffer (the second),
    // refused (the guest's grant: -EINVAL) or failing on this side (-EIO).
    for nth in 1..=2 {
        for (fault, status) in [(Fault::Refuse, -22), (Fault::Fail, -5)] {
            let name = format!("open-map-{nth}-{fault:?}");
            let o = b.options(&name);
            let mut g = sim::connect(&o).unwrap();
            let req = prepare_open(&mut g, &o);
            b.plan.arm(Call::GrantMap, nth, fault);
            let r = g.playback.try_request(Request::Open(req)).unwrap().expect("OPEN answered");
            assert_eq!(r.status, status, "{name}: OPEN with a failed map");
            // The stream is fine for the next OPEN.
            let r = g.playback.try_request(Request::Open(req)).unwrap().expect("OPEN answered");
            assert_eq!(r.status, 0, "{name}: the next OPEN");
            g.playback.request(Request::Close).unwrap();
            drop(g);
            b.wait_idle(&name);
            back_to(base, &name);
            cases += 1;
        }
    }
    eprintln!("{cases} fault cases, each answered; resources back to {base:?}");
}

fn a_hung_call_holding_up_only_its_own_guest(b: &Backend, base: Resources) {
    // The first grant map of the next handshake hangs 2 s, then fails (no
    // answer in time: this side's failure, so the connection is tried
    // again).
    let fired = b.plan.fired();
    b.plan.arm(Call::GrantMap, 1, Fault::TimeOut(Duration::from_secs(2)));
    let slow = {
        let o = b.options("hung");
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = sim::connect(&o).map(drop);
            (r, t.elapsed())
        })
    };
    wait(Duration::from_secs(5), "the hung call", || b.plan.fired() == fired + 1);
    // Meanwhile another guest connects, plays and leaves.
    let t = Instant::now();
    healthy_guest(b, "beside");
    let beside = t.elapsed();
    assert!(beside < Duration::from_secs(1), "a guest beside the hung one took {beside:?}");
    let (r, took) = slow.join().unwrap();
    r.expect("the hung guest connects when the map is tried again");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(6), "{took:?}");
    b.wait_idle("hung");
    back_to(base, "hung");
}

fn a_guest_killed_during_each_request_type(b: &Backend, base: Resources) {
    for op in 0..=op::HW_PARAM_QUERY {
        for opened in [false, true] {
            let name = format!("killed-during-{op}-{}", if opened { "open" } else { "closed" });
            let o = b.options(&name);
            let mut g = sim::connect(&o).unwrap();
            let open_req = prepare_open(&mut g, &o);
            if opened {
                g.playback.open(open_req, frame_bytes(&o), PeriodRule::Upstream).unwrap();
                g.playback.request(Request::Trigger(trigger::START)).unwrap();
                b.host.cycle();
            }
            let rw = RwReq { offset: 0, length: 4096 };
            let req = match op {
                op::OPEN => Request::Open(open_req),
                op::CLOSE => Request::Close,
                op::READ => Request::Read(rw),
                op::WRITE => Request::Write(rw),
                op::SET_VOLUME => Request::SetVolume(RwReq { offset: 0, length: 8 }),
                op::GET_VOLUME => Request::GetVolume(RwReq { offset: 0, length: 8 }),
                op::MUTE => Request::Mute(RwReq { offset: 0, length: 2 }),
                op::UNMUTE => Request::Unmute(RwReq { offset: 0, length: 2 }),
                op::TRIGGER => Request::Trigger(trigger::STOP),
                _ => Request::HwParamQuery(Default::default()),
            };
            // Asked, and gone before the answer (the socket closes: the
            // toolstack removes the guest's directories).
            g.playback.push_raw(&req.encode(7));
            b.host.cycle();
            drop(g);
            b.wait_idle(&name);
            back_to(base, &name);
        }
    }
    healthy_guest(b, "after");
}

fn a_thousand_guests_of_one_name_made_and_killed(b: &Backend, base: Resources) {
    let t = Instant::now();
    for i in 0..1000 {
        let o = b.options("again");
        let mut g = sim::connect(&o).unwrap_or_else(|e| panic!("cycle {i}: {e:#}"));
        // Killed at a different point each time: connected, opened,
        // playing.
        match i % 3 {
            0 => {}
            1 => open(&mut g, &o).unwrap(),
            _ => {
                open(&mut g, &o).unwrap();
                g.playback.request(Request::Trigger(trigger::START)).unwrap();
                b.host.cycle();
                b.host.cycle();
            }
        }
        drop(g);
        b.wait_idle(&format!("cycle {i}"));
    }
    back_to(base, "after 1,000 guests");
    eprintln!("1,000 guests made and killed in {:?}; resources {:?}", t.elapsed(), resources());
    healthy_guest(b, "after");
}
