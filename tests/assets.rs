//! `xen-vsnd assets`: the man pages and completions the package ships are
//! generated from the command line itself, one page per visible command.

mod common;
use common::BIN;
use std::process::Command;

#[test]
fn man_pages_and_completions_cover_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).args(["assets", "--out"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    for cmd in ["serve", "status", "ctl", "session", "vouch", "reattach", "assets"] {
        let page = read(&format!("man/xen-vsnd-{cmd}.1"));
        assert!(page.starts_with(".ie") || page.contains(".TH"), "{cmd}: not a man page");
    }
    // The simulated guest and its tools are xen-vsnd-sim's, not the daemon's.
    for cmd in ["sim-guest", "guest", "signal", "compare"] {
        assert!(!dir.path().join(format!("man/xen-vsnd-{cmd}.1")).exists(), "the daemon has `{cmd}`");
    }
    // Options appear as the binary defines them.
    assert!(read("man/xen-vsnd-serve.1").contains("pipewire\\-from\\-sessions"));
    for f in ["completions/xen-vsnd.bash", "completions/_xen-vsnd", "completions/xen-vsnd.fish"] {
        let c = read(f);
        assert!(c.contains("vouch") && c.contains("pipewire-from-sessions"), "{f}");
    }
}
