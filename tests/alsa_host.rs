//! The plain ALSA host (`serve --host alsa`) on a real alsa-lib device:
//! PipeWire's ALSA plugin (`pipewire`), so what the device plays can be
//! recorded at the test PipeWire's sink, frame for frame.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn guest_playback_reaches_an_alsa_device_frame_exact() {
    let mut env = PwEnv::start();
    let (sock, log) = env.start_backend_with(&["--host", "alsa", "--alsa-device", "pipewire"]);
    let wav = env.dir.path().join("monitor.wav");
    let mut rec = env.record_monitor(&wav);
    let sent = pattern(2.0);
    let (ok, report, err) =
        env.sim(&sock, &["--domain", "alsa-vm", "--play", "pattern", "--seconds", "2", "--delay-report"]);
    assert!(ok, "{err}");
    eprintln!("{report}");
    eprintln!("{}", env.links());
    finish_recording(&mut rec, &sent, &wav);
    eprintln!("{}", std::fs::read_to_string(&log).unwrap());
    assert_arrived_intact(&env, &sent, &wav);
    let _ = Duration::from_secs(1);
}
