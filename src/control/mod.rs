//! The control socket: `xen-vsnd status`, `xen-vsnd ctl ...` and desktop
//! sessions (`xen-vsnd session`) talk to a running `serve` over it. JSON
//! messages over a SOCK_SEQPACKET Unix socket (`ipc`).
//!
//! Who may do what: the socket's mode (0660, the service's group) decides
//! who reaches it; changes (`ctl`) also need to come from root or from the
//! service's own user (SO_PEERCRED), so a desktop program that may read the
//! status or hand over its PipeWire still cannot allow a guest the
//! microphone.

pub mod handoff;
pub mod server;
pub mod session;

use crate::backend::registry::Applied;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// What a client asks.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Status,
    Reload,
    Mic {
        domain: String,
        allow: bool,
    },
    /// A desktop session offers its PipeWire; the connection stays open
    /// for `ToSession` / `FromSession`.
    Session,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Status(serde_json::Value),
    /// The streams a policy change reached.
    Applied(Vec<Applied>),
    Ok,
    Error(String),
}

/// The service asks a registered session ...
#[derive(Debug, Serialize, Deserialize)]
pub enum ToSession {
    /// ... for a new connection to its PipeWire.
    Connect,
}

/// ... which answers with a connected socket (SCM_RIGHTS) or why not.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromSession {
    Connected,
    Unavailable(String),
}

/// Where `serve` puts its control socket when not told: the systemd
/// runtime directory (`RuntimeDirectory=xen-vsnd`), /run/xen-vsnd as root,
/// else the user's runtime directory; a loopback transport's beside its
/// socket, so test instances never share one.
pub fn default_socket(transport: &str) -> PathBuf {
    if let Some(path) = transport.strip_prefix("loopback:") {
        return PathBuf::from(format!("{path}.control"));
    }
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        // systemd may list several, separated by ':'.
        let first = dir.to_string_lossy().split(':').next().unwrap_or_default().to_string();
        return Path::new(&first).join("control");
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/xen-vsnd/control");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => Path::new(&d).join("xen-vsnd/control"),
        None => PathBuf::from("/run/xen-vsnd/control"),
    }
}

/// Where clients look when not told: $XEN_VSND_CONTROL, the system
/// service's socket, then the user's own `serve`'s.
pub fn client_socket(given: Option<&Path>) -> PathBuf {
    if let Some(p) = given {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("XEN_VSND_CONTROL") {
        return PathBuf::from(p);
    }
    let system = PathBuf::from("/run/xen-vsnd/control");
    if system.exists() {
        return system;
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => Path::new(&d).join("xen-vsnd/control"),
        None => system,
    }
}

/// Asks `serve` one thing and returns its answer.
pub fn request(socket: &Path, req: &Request) -> anyhow::Result<Reply> {
    let sock = crate::ipc::connect(socket).with_context(|| {
        format!("reaching xen-vsnd (is `xen-vsnd serve` running? its control socket: {})", socket.display())
    })?;
    // The control thread answers at once; a policy reload reads one file.
    let tv = nix::sys::time::TimeVal::new(10, 0);
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv)?;
    crate::ipc::send(sock.as_raw_fd(), req, &[])?;
    match crate::ipc::recv::<Reply>(sock.as_raw_fd())? {
        Some((Reply::Error(e), _)) => bail!("{e}"),
        Some((r, _)) => Ok(r),
        None => bail!("xen-vsnd closed the connection without an answer"),
    }
}
