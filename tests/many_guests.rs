//! Many guests at once, each with playback and capture, whose streams start,
//! pause, resume, stall and disconnect independently: no guest disturbs
//! another's audio.

mod common;

use common::*;
use std::time::Duration;

fn play(name: &str) -> String {
    format!("xen-vsnd.{name}.0.0.playback")
}
fn cap(name: &str) -> String {
    format!("xen-vsnd.{name}.0.0.capture")
}

#[test]
fn guests_are_independent() {
    let mut env = PwEnv::start();
    // Each guest's playback is linked to its own capture, so every guest's
    // audio can be checked on its own.
    let (sock, log) = env.start_backend_with(&["--node-property", "node.autoconnect=false"]);
    let good = ["calm-1", "calm-2", "calm-3"];
    let wav = |n: &str| env.dir.path().join(format!("{n}.wav")).to_str().unwrap().to_string();
    // Half the guests behave as Linux 7.2 frontends, half as 4.18-7.1 ones.
    let kernel = |n: &str| FRONTEND_KERNELS[["calm-2", "pauser", "doomed"].contains(&n) as usize];
    let base = |n: &'static str| -> Vec<String> {
        [
            "--frontend-kernel",
            kernel(n),
            "--domain",
            n,
            "--play",
            "pattern",
            "--seconds",
            "5",
            "--capture-seconds",
            "3.5",
            "--capture-wav",
            &wav(n),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut sims = Vec::new();
    for n in good {
        sims.push((n, env.spawn_sim(&sock, &base(n).iter().map(String::as_str).collect::<Vec<_>>())));
    }
    let pauser =
        [base("pauser"), vec!["--pause-at".into(), "1".into(), "--pause-for".into(), "0.5".into()]].concat();
    sims.push(("pauser", env.spawn_sim(&sock, &pauser.iter().map(String::as_str).collect::<Vec<_>>())));
    let staller =
        [base("staller"), vec!["--stall-at".into(), "1".into(), "--stall-for".into(), "1.5".into()]].concat();
    sims.push(("staller", env.spawn_sim(&sock, &staller.iter().map(String::as_str).collect::<Vec<_>>())));
    let mut doomed =
        Proc(env.spawn_sim(&sock, &base("doomed").iter().map(String::as_str).collect::<Vec<_>>()), "doomed");

    let names: Vec<&str> = sims.iter().map(|(n, _)| *n).chain(["doomed"]).collect();
    for n in &names {
        wait_until("the guest's nodes", Duration::from_secs(15), || {
            let ports = env.ports();
            ports.contains(&format!("{}:output_FR", play(n)))
                && ports.contains(&format!("{}:input_FR", cap(n)))
        });
        env.link(&play(n), &cap(n), "output", "input");
    }
    std::thread::sleep(Duration::from_millis(1500));
    doomed.0.kill().unwrap();
    doomed.0.wait().unwrap();

    let sent = pattern(5.0);
    for (n, child) in sims {
        let (ok, report, err) = finish_sim(child);
        assert!(ok, "{n}: {err}");
        let (p, c) = (&report["playback"], &report["capture"]);
        for s in [p, c] {
            assert_eq!(s["bad_event_ids"], 0, "{n}: {s}");
            assert_eq!(s["early_interrupts"], 0, "{n}: {s}");
        }
        match n {
            "staller" => assert!(p["xruns"].as_u64().unwrap() >= 1, "the staller underran: {p}"),
            _ => assert_eq!(p["xruns"], 0, "{n}: {p}"),
        }
        if good.contains(&n) {
            // From the moment the test linked it, everything this guest
            // played came back to it unchanged and without a gap, up to the
            // end of its capture.
            use xen_vsnd_sim::signal::{find_and_compare, first_appearance, read_wav};
            let got = read_wav(std::path::Path::new(&wav(n))).unwrap();
            let (at, from) = first_appearance(&sent, &got.samples, 2)
                .unwrap_or_else(|| panic!("{n}: its signal never came back"));
            let (start, frames) =
                find_and_compare(&sent[from * 2..], &got.samples[at * 2..], 2, 64, 0).unwrap();
            let recorded = got.samples.len() / 2 - at;
            assert_eq!(start, 0);
            assert_eq!(frames, recorded, "{n}: only {frames} of {recorded} frames intact");
            assert!(frames > 48000 * 2, "{n}: {frames} frames");
        }
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let staller_close = text
        .lines()
        .find(|l| l.contains("closed stream=xen-vsnd.staller.0.0.playback"))
        .expect("staller closed");
    assert!(
        !staller_close.contains("underruns=0 "),
        "the backend counted the staller's underruns: {staller_close}"
    );
    for n in good {
        let close = text.lines().find(|l| l.contains(&format!("closed stream={}", play(n)))).unwrap();
        // Only the drain at the very end may run short of data.
        let underruns: u64 =
            close.split("underruns=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        assert!(underruns <= 1, "{n}: {close}");
    }
    assert!(
        text.contains("disconnecting: backend directory removed domid="),
        "the dead guest was cleaned up"
    );
}
