//! Replays the fuzz corpus (tests/fuzz/corpus/<target>/: the seeds, what
//! long fuzzer runs kept, and every input that ever failed) through the
//! targets' bodies, so the ordinary test suite holds every finding fixed.

use std::path::Path;
use xen_vsnd::fuzzing;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| body(&data)).is_err() {
            panic!("{target}: {} fails", path.display());
        }
        n += 1;
    }
    assert!(n > 0, "{target}: no corpus in {}", dir.display());
}

#[test]
fn request_corpus() {
    replay("request", fuzzing::request);
}

#[test]
fn directory_corpus() {
    replay("directory", fuzzing::directory);
}

#[test]
fn card_config_corpus() {
    replay("card_config", fuzzing::card_config);
}

#[test]
fn policy_corpus() {
    replay("policy", fuzzing::policy);
}

#[test]
fn stream_corpus() {
    replay("stream", fuzzing::stream);
}
