//! `xen-vsnd session`: the desktop user's small part of the system
//! service. It registers with `serve` over the control socket and, each
//! time the service asks, connects to this user's PipeWire and hands the
//! connected socket over (`control::handoff`). It has no access to
//! Xen and moves no audio.

#![forbid(unsafe_code)]

use super::{FromSession, Reply, Request, ToSession};
use crate::ipc;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The user's PipeWire socket: `remote` (or $PIPEWIRE_REMOTE, or
/// pipewire-0) in $PIPEWIRE_RUNTIME_DIR or $XDG_RUNTIME_DIR; an absolute
/// name is a path.
pub fn pipewire_socket(remote: Option<&str>) -> PathBuf {
    let name = remote
        .map(str::to_string)
        .or_else(|| std::env::var("PIPEWIRE_REMOTE").ok())
        .unwrap_or_else(|| "pipewire-0".into());
    if name.starts_with('/') {
        return PathBuf::from(name);
    }
    let dir = std::env::var_os("PIPEWIRE_RUNTIME_DIR")
        .or_else(|| std::env::var_os("XDG_RUNTIME_DIR"))
        .unwrap_or_else(|| "/run/pipewire".into());
    Path::new(&dir).join(name)
}

/// Serves the service for as long as this process lives: registers, then
/// answers each request for a connection; registers again whenever the
/// service restarts.
pub fn run(control: &Path, pipewire: &Path) -> anyhow::Result<()> {
    let mut said_waiting = false;
    loop {
        match register(control) {
            Ok(sock) => {
                said_waiting = false;
                tracing::info!(
                    "registered with xen-vsnd at {}; handing over {} when asked",
                    control.display(),
                    pipewire.display()
                );
                serve(&sock, pipewire);
                tracing::info!("xen-vsnd went away; registering again when it is back");
            }
            Err(e) if !said_waiting => {
                tracing::info!("waiting for xen-vsnd: {e:#}");
                said_waiting = true;
            }
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn register(control: &Path) -> anyhow::Result<std::os::fd::OwnedFd> {
    let sock = ipc::connect(control)?;
    ipc::send(sock.as_raw_fd(), &Request::Session, &[])?;
    match ipc::recv::<Reply>(sock.as_raw_fd())? {
        Some((Reply::Ok, _)) => Ok(sock),
        Some((Reply::Error(e), _)) => anyhow::bail!("{e}"),
        _ => anyhow::bail!("unexpected answer"),
    }
}

/// Answers the service until it closes the connection.
fn serve(sock: &std::os::fd::OwnedFd, pipewire: &Path) {
    while let Ok(Some((ToSession::Connect, _))) = ipc::recv::<ToSession>(sock.as_raw_fd()) {
        let sent = match std::os::unix::net::UnixStream::connect(pipewire) {
            Ok(conn) => {
                tracing::info!("handing xen-vsnd a connection to {}", pipewire.display());
                ipc::send(sock.as_raw_fd(), &FromSession::Connected, &[conn.as_raw_fd()])
            }
            Err(e) => ipc::send(
                sock.as_raw_fd(),
                &FromSession::Unavailable(format!("{}: {e}", pipewire.display())),
                &[],
            ),
        };
        if sent.is_err() {
            return;
        }
    }
}
