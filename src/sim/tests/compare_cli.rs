//! `xen-vsnd-sim compare`, the check the real-Xen harness runs on every
//! recording: what it accepts, and how it tells inserted silence (a host
//! node that ran late for a cycle) from lost or altered frames.

use std::path::Path;
use std::process::Command;
use xen_vsnd_sim::signal::{generate, write_wav_s16, Signal};

fn compare(sent: &Path, got: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xen-vsnd-sim"))
        .args(["compare", "--sent"])
        .arg(sent)
        .arg("--got")
        .arg(got)
        .output()
        .expect("run xen-vsnd-sim compare");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn compare_passes_intact_and_names_inserted_silence_apart_from_loss() {
    let dir = tempfile::tempdir().unwrap();
    let sent = generate(Signal::Pattern, 48000, 2, 48000);
    let sent_wav = dir.path().join("sent.wav");
    write_wav_s16(&sent_wav, 48000, 2, &sent).unwrap();
    let write = |name: &str, samples: &[i16]| {
        let p = dir.path().join(name);
        write_wav_s16(&p, 48000, 2, samples).unwrap();
        p
    };
    let lead = vec![0i16; 2 * 300];

    let intact = write("intact.wav", &[&lead[..], &sent[..], &lead[..]].concat());
    let (ok, out) = compare(&sent_wav, &intact);
    assert!(ok, "{out}");
    assert!(!out.contains("inserted"), "{out}");

    // One cycle of 4096 frames of silence inserted at frame 6144.
    let cut = 2 * 6144;
    let gap = vec![0i16; 2 * 4096];
    let inserted =
        write("inserted.wav", &[&lead[..], &sent[..cut], &gap[..], &sent[cut..], &lead[..]].concat());
    let (ok, out) = compare(&sent_wav, &inserted);
    assert!(!ok, "{out}");
    assert!(out.contains("every frame in order but for inserted silence: 1 runs, 4096 frames"), "{out}");
    assert!(out.contains("every frame accounted for but for 1 glitches"), "{out}");

    // The same silence replacing sound (a cycle's frames lost): not only
    // inserted; as glitches, a silence and a dropped run: two, for the
    // caller to match with what it counted.
    let replaced = write(
        "replaced.wav",
        &[&lead[..], &sent[..cut], &gap[..], &sent[cut + gap.len()..], &lead[..]].concat(),
    );
    let (ok, out) = compare(&sent_wav, &replaced);
    assert!(!ok, "{out}");
    assert!(!out.contains("every frame in order but for inserted silence"), "{out}");
    assert!(
        out.contains("every frame accounted for but for 2 glitches: 1 inserted silences (4096 frames), 1 dropped runs (4096 frames)"),
        "{out}"
    );

    // Frames altered (not silence, not a skip): no glitch accounts for it.
    let mut altered = [&lead[..], &sent[..], &lead[..]].concat();
    for v in &mut altered[2 * 20_000..2 * 20_010] {
        *v = v.wrapping_add(7);
    }
    let altered = write("altered.wav", &altered);
    let (ok, out) = compare(&sent_wav, &altered);
    assert!(!ok, "{out}");
    assert!(!out.contains("accounted for"), "{out}");
}
