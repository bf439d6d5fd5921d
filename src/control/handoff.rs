//! Connections to a desktop user's PipeWire, handed over by that user's
//! session (`xen-vsnd session`) to the system service, which has no access
//! to the user's runtime directory and the user none to /dev/xen.
//!
//! A session registers over the control socket and stays connected; when
//! the service needs a daemon (at start, after the daemon went away) it
//! asks the newest session, which connects to its own PipeWire socket and
//! passes the connected socket back (SCM_RIGHTS). The service is then an
//! ordinary client of that daemon, which sees the session's credentials:
//! no proxy, no copy, no added buffering on the real-time path.

#![forbid(unsafe_code)]

use crate::control::{FromSession, ToSession};
use crate::ipc;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

/// How long a session may take to connect to its daemon and answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// A registered session: its control connection and who it is.
struct Peer {
    sock: OwnedFd,
    uid: u32,
    pid: i32,
}

type Waker = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
pub struct Handoff {
    /// Newest last.
    sessions: Mutex<Vec<Peer>>,
    on_offer: Mutex<Option<Waker>>,
}

impl Handoff {
    /// A session registered (the control server checked who may).
    pub fn offer(&self, sock: OwnedFd, uid: u32, pid: i32) {
        let tv = nix::sys::time::TimeVal::new(ANSWER_TIMEOUT.as_secs() as i64, 0);
        if let Err(e) = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv) {
            tracing::warn!(uid, pid, "session socket: {e}");
            return;
        }
        tracing::info!(uid, pid, "a desktop session offers its PipeWire");
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).push(Peer { sock, uid, pid });
        if let Some(wake) = self.on_offer.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            wake();
        }
    }

    /// Called whenever a session registers.
    pub fn on_offer(&self, f: impl Fn() + Send + Sync + 'static) {
        *self.on_offer.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(f));
    }

    /// Sessions registered now.
    pub fn sessions(&self) -> usize {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A connection to the newest session's daemon that can give one.
    /// Sessions that went away, or do not answer, are forgotten; one whose
    /// daemon is not up is kept, for the next time.
    pub fn fetch(&self) -> Option<OwnedFd> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut i = sessions.len();
        while i > 0 {
            i -= 1;
            let p = &sessions[i];
            match ask(&p.sock) {
                Ok(Some(fd)) => {
                    tracing::info!(uid = p.uid, pid = p.pid, "connected through the session's PipeWire");
                    return Some(fd);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::info!(uid = p.uid, pid = p.pid, "desktop session gone: {e:#}");
                    sessions.remove(i);
                }
            }
        }
        None
    }
}

/// One question to a session: Ok(None) when its daemon is not reachable.
fn ask(sock: &OwnedFd) -> anyhow::Result<Option<OwnedFd>> {
    ipc::send(sock.as_raw_fd(), &ToSession::Connect, &[])?;
    match ipc::recv::<FromSession>(sock.as_raw_fd())? {
        Some((FromSession::Connected, mut fds)) if fds.len() == 1 => Ok(fds.pop()),
        Some((FromSession::Unavailable(why), _)) => {
            tracing::debug!("the session's PipeWire is not reachable: {why}");
            Ok(None)
        }
        Some(_) => anyhow::bail!("unexpected answer"),
        None => anyhow::bail!("closed"),
    }
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff").field("sessions", &self.sessions()).finish()
    }
}
