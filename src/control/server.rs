//! `serve`'s end of the control socket: a thread that answers `status`,
//! applies `ctl` (and SIGHUP: a reload), and registers desktop sessions.

use super::handoff::Handoff;
use super::{Reply, Request};
use crate::backend::registry::Registry;
use crate::ipc;
use anyhow::Context;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

/// The write end of the SIGHUP pipe (-1: none).
static SIGHUP_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sighup(_: libc::c_int) {
    let fd = SIGHUP_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; a full pipe already
        // holds a wake-up.
        unsafe { libc::write(fd, b"h".as_ptr().cast(), 1) };
    }
}

/// SIGHUP from now on writes a byte to the returned pipe.
fn sighup_pipe() -> anyhow::Result<OwnedFd> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    SIGHUP_PIPE.store(w.as_raw_fd(), Ordering::Relaxed);
    std::mem::forget(w); // lives as long as the process
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_sighup),
        nix::sys::signal::SaFlags::SA_RESTART,
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only writes to a pipe.
    unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGHUP, &action)? };
    Ok(r)
}

/// Members of this group may reach the control socket: read the status
/// and hand over their PipeWire (`xen-vsnd session`), not change the
/// policy. A group of its own: the group `xen-vsnd` owns /dev/xen, which
/// no desktop user should get.
pub const SESSION_GROUP: &str = "xen-vsnd-session";

/// Makes `path` group-owned by SESSION_GROUP when that group exists. The
/// system unit runs with it as its primary group, so the socket is born
/// that way (its system-call filter forbids chown); a serve started
/// otherwise by someone in the group gets it changed here.
fn give_to_session_group(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(Some(g)) = nix::unistd::Group::from_name(SESSION_GROUP) else { return };
    if std::fs::metadata(path).is_ok_and(|m| m.gid() == g.gid.as_raw()) {
        return;
    }
    if let Err(e) = nix::unistd::chown(path, None, Some(g.gid)) {
        tracing::warn!("the control socket stays in this user's group ({SESSION_GROUP}: {e})");
    }
}

pub struct ControlServer {
    path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl ControlServer {
    /// Listens on `path` (mode 0660) and serves until dropped.
    pub fn start(
        path: &Path,
        registry: Arc<Registry>,
        handoff: Option<Arc<Handoff>>,
    ) -> anyhow::Result<ControlServer> {
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        // One serve per transport (`instance`): a socket left here is a
        // dead one's.
        let _ = std::fs::remove_file(path);
        let listener =
            socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
        socket::bind(listener.as_raw_fd(), &UnixAddr::new(path)?)
            .with_context(|| format!("binding the control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        give_to_session_group(path);
        socket::listen(&listener, Backlog::new(16)?)?;
        let hup = sighup_pipe().context("SIGHUP handler")?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = Server { registry, handoff, own_uid: nix::unistd::geteuid().as_raw() };
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vsnd-control".into())
            .spawn(move || s.run(listener, hup, &stop2))
            .context("spawning the control thread")?;
        tracing::info!("control socket {}", path.display());
        Ok(ControlServer { path: path.to_path_buf(), thread: Some(thread), stop })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Server {
    registry: Arc<Registry>,
    handoff: Option<Arc<Handoff>>,
    own_uid: u32,
}

impl Server {
    fn run(&self, listener: OwnedFd, hup: OwnedFd, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(hup.as_fd(), PollFlags::POLLIN),
            ];
            if poll(&mut fds, PollTimeout::from(200u16)).unwrap_or(0) <= 0 {
                continue;
            }
            let (conn, hangup) = (fds[0].any().unwrap_or(false), fds[1].any().unwrap_or(false));
            if hangup {
                let mut buf = [0u8; 64];
                while nix::unistd::read(hup.as_raw_fd(), &mut buf).is_ok_and(|n| n > 0) {}
                tracing::info!("SIGHUP: reloading the policy");
                if let Err(e) = self.registry.reload() {
                    tracing::error!("policy not reloaded, the old one stays: {e:#}");
                }
            }
            if conn {
                match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    // SAFETY: accept just gave us this descriptor.
                    Ok(fd) => self.serve_one(unsafe { OwnedFd::from_raw_fd(fd) }),
                    Err(e) => tracing::debug!("control accept: {e}"),
                }
            }
        }
    }

    /// One client: one request, one answer (a session stays registered).
    fn serve_one(&self, sock: OwnedFd) {
        let Ok(cred) = socket::getsockopt(&sock, sockopt::PeerCredentials) else { return };
        // A client that never speaks must not hold up the others.
        let tv = nix::sys::time::TimeVal::new(1, 0);
        let _ = socket::setsockopt(&sock, sockopt::ReceiveTimeout, &tv);
        let req = match ipc::recv::<Request>(sock.as_raw_fd()) {
            Ok(Some((r, _))) => r,
            Ok(None) => return,
            Err(e) => {
                let _ = ipc::send(sock.as_raw_fd(), &Reply::Error(format!("{e:#}")), &[]);
                return;
            }
        };
        let privileged = cred.uid() == 0 || cred.uid() == self.own_uid;
        let reply = match req {
            Request::Status => match serde_json::to_value(self.status()) {
                Ok(v) => Reply::Status(v),
                Err(e) => Reply::Error(e.to_string()),
            },
            Request::Reload | Request::Mic { .. } if !privileged => Reply::Error(format!(
                "uid {} may read the status but not change the policy (run it as root)",
                cred.uid()
            )),
            Request::Reload => match self.registry.reload() {
                Ok(a) => Reply::Applied(a),
                Err(e) => Reply::Error(format!("policy not reloaded, the old one stays: {e:#}")),
            },
            Request::Mic { domain, allow } => Reply::Applied(self.registry.set_mic(&domain, allow)),
            Request::Session => match &self.handoff {
                Some(h) => {
                    if ipc::send(sock.as_raw_fd(), &Reply::Ok, &[]).is_ok() {
                        h.offer(sock, cred.uid(), cred.pid());
                    }
                    return;
                }
                None => Reply::Error(
                    "this xen-vsnd connects to PipeWire itself (serve --pipewire-from-sessions)".into(),
                ),
            },
        };
        let _ = ipc::send(sock.as_raw_fd(), &reply, &[]);
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": std::process::id(),
            "sessions": self.handoff.as_ref().map(|h| h.sessions()),
            "streams": self.registry.status(),
        })
    }
}
