//! The loopback "hypervisor": xenstore, grants and event channels between this
//! process (the backend, domain 0) and guest processes that connect over a
//! Unix socket. A guest's grantable memory is one memfd (gref N = page N), an
//! event channel is a pair of eventfds. When a guest's socket closes, the
//! hypervisor does what the toolstack does on `xl destroy`: it removes the
//! guest's xenstore directories, which the backend sees through its watches.
//!
//! Test and demo transport only; the backend code above it is the same.

pub mod client;
pub mod proto;
mod store;

use super::{
    DomId, EventChannel, EventChannels, GrantMapper, HypervisorError, SharedPages, StoreError, Transport,
    WatchEvent, XenStore,
};
use anyhow::{anyhow, bail, Context};
use proto::{GuestMsg, HvMsg};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use store::Tree;

use crate::sndif::PAGE_SIZE;

/// The backend's own domain id.
pub const BACKEND_DOMID: DomId = 0;
/// Largest guest memory a loopback guest may register (64 MiB).
pub const MAX_GUEST_PAGES: u32 = 16384;

struct Guest {
    memfd: Arc<OwnedFd>,
    pages: u32,
}

/// A guest's port for the backend: its two eventfds, and whether the
/// backend holds it bound. As in Xen, a port the backend unbinds (closes)
/// is unbound again and may be bound anew (a connection tried again), and
/// a bound one cannot be bound twice.
struct Unbound {
    to_backend: OwnedFd,
    to_guest: OwnedFd,
    bound: Arc<AtomicBool>,
}

/// The backend's end of a bound port; dropping it unbinds the port.
struct BoundPort {
    channel: EventFdChannel,
    bound: Arc<AtomicBool>,
}

impl EventChannel for BoundPort {
    fn notify(&self) -> bool {
        self.channel.notify()
    }
    fn fd(&self) -> RawFd {
        self.channel.fd()
    }
    fn consume(&self) -> bool {
        self.channel.consume()
    }
}

impl Drop for BoundPort {
    fn drop(&mut self) {
        self.bound.store(false, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct State {
    tree: Tree,
    guests: HashMap<DomId, Guest>,
    unbound: HashMap<(DomId, u32), Unbound>,
    next_domid: DomId,
    next_port: u32,
}

#[derive(Default)]
pub struct Hypervisor {
    state: Mutex<State>,
}

impl Hypervisor {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update of
        // plain maps; the data is still consistent enough to serve.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the hypervisor and the backend's view of it.
    pub fn new_transport() -> (Arc<Hypervisor>, Transport) {
        let hv = Arc::new(Hypervisor::default());
        {
            let mut st = hv.lock();
            st.next_domid = 1;
            st.next_port = 1;
            st.tree.write("/local/domain/0/name", "Domain-0");
            st.tree.write("/local/domain/0/domid", "0");
        }
        let (tx, rx) = mpsc::channel();
        let store = Arc::new(LocalStore { hv: hv.clone(), events: tx });
        let t = Transport {
            store,
            grants: hv.clone(),
            evtchn: hv.clone(),
            watch_events: rx,
            own_domid: BACKEND_DOMID,
        };
        (hv, t)
    }

    /// Accepts guests on `path` (a SOCK_SEQPACKET socket), one thread each.
    pub fn listen(self: &Arc<Self>, path: &Path) -> anyhow::Result<std::thread::JoinHandle<()>> {
        use nix::sys::socket::{bind, listen, Backlog, SockFlag, UnixAddr};
        let _ = std::fs::remove_file(path);
        let fd = proto::seqpacket_socket()?;
        bind(fd.as_raw_fd(), &UnixAddr::new(path)?).with_context(|| format!("bind {}", path.display()))?;
        listen(&fd, Backlog::new(16)?)?;
        let hv = self.clone();
        Ok(std::thread::Builder::new().name("loopback-accept".into()).spawn(move || loop {
            match nix::sys::socket::accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(c) => {
                    // SAFETY: accept4 returned a new descriptor that we own.
                    let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(c) };
                    let hv = hv.clone();
                    let _ = std::thread::Builder::new()
                        .name("loopback-guest".into())
                        .spawn(move || hv.serve_guest(conn));
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("loopback: accept failed: {e}");
                    return;
                }
            }
        })?)
    }

    fn serve_guest(&self, conn: OwnedFd) {
        let fd = conn.as_raw_fd();
        let domid = match self.welcome(fd) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("loopback: guest refused: {e:#}");
                let _ = proto::send(fd, &HvMsg::Error(format!("{e:#}")), &[]);
                return;
            }
        };
        // Watch events go out on their own thread; each packet is atomic, so
        // it may interleave with replies written here.
        let (wtx, wrx) = mpsc::channel::<WatchEvent>();
        let wfd = match conn.try_clone() {
            Ok(f) => f,
            Err(_) => return,
        };
        std::thread::spawn(move || {
            for ev in wrx {
                let m = HvMsg::WatchFired { path: ev.path, token: ev.token };
                if proto::send(wfd.as_raw_fd(), &m, &[]).is_err() {
                    break;
                }
            }
        });
        loop {
            let (msg, fds) = match proto::recv::<GuestMsg>(fd) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(domid, "loopback: bad message, disconnecting guest: {e:#}");
                    break;
                }
            };
            let reply = self.handle(domid, msg, fds, &wtx).unwrap_or_else(|e| HvMsg::Error(format!("{e:#}")));
            if proto::send(fd, &reply, &[]).is_err() {
                break;
            }
        }
        self.destroy_domain(domid);
    }

    fn welcome(&self, fd: RawFd) -> anyhow::Result<DomId> {
        let Some((GuestMsg::Hello { name, pages, vsnd }, mut fds)) = proto::recv::<GuestMsg>(fd)? else {
            bail!("expected Hello");
        };
        if fds.len() != 1 || pages == 0 || pages > MAX_GUEST_PAGES {
            bail!("Hello needs one memfd and 1..={MAX_GUEST_PAGES} pages");
        }
        let size = nix::sys::stat::fstat(fds[0].as_raw_fd())?.st_size as u64;
        if size < pages as u64 * PAGE_SIZE as u64 {
            bail!("memfd smaller than {pages} pages");
        }
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_graphic()) {
            bail!("bad domain name");
        }
        let memfd = Arc::new(fds.remove(0));
        let mut st = self.lock();
        let domid = st.next_domid;
        st.next_domid += 1;
        st.guests.insert(domid, Guest { memfd, pages });
        // What libxl does for a vsnd device: frontend config, backend dir.
        let fe = format!("/local/domain/{domid}/device/vsnd/0");
        let be = format!("/local/domain/0/backend/vsnd/{domid}/0");
        st.tree.write(&format!("/local/domain/{domid}/name"), &name);
        st.tree.write(&format!("/local/domain/{domid}/domid"), &domid.to_string());
        for (k, v) in vsnd {
            if k.is_empty() || k.contains("..") || k.starts_with('/') {
                continue;
            }
            st.tree.write(&format!("{fe}/{k}"), &v);
        }
        st.tree.write(&format!("{fe}/backend-id"), "0");
        st.tree.write(&format!("{fe}/backend"), &be);
        st.tree.write(&format!("{fe}/state"), "1");
        st.tree.write(&format!("{be}/frontend"), &fe);
        st.tree.write(&format!("{be}/frontend-id"), &domid.to_string());
        st.tree.write(&format!("{be}/online"), "1");
        st.tree.write(&format!("{be}/state"), "1");
        drop(st);
        proto::send(fd, &HvMsg::Welcome { domid }, &[])?;
        tracing::info!(domid, "loopback: guest {name} connected");
        Ok(domid)
    }

    /// Guests may read their own tree and their devices' backend dirs, and
    /// write only their own tree, as xenstore permissions allow on real Xen
    /// — but not the keys the toolstack writes there for dom0 (libxl makes
    /// `name` and `domid` read-only to the guest).
    fn check_access(domid: DomId, path: &str, write: bool) -> anyhow::Result<()> {
        let own = format!("/local/domain/{domid}");
        let be = format!("/local/domain/0/backend/vsnd/{domid}");
        let under = |top: &str| path == top || path.starts_with(&format!("{top}/"));
        let dom0s = write && (path == own || under(&format!("{own}/name")) || under(&format!("{own}/domid")));
        if dom0s {
            return Err(anyhow!("EACCES: {path}"));
        }
        if under(&own) || (!write && under(&be)) {
            Ok(())
        } else {
            Err(anyhow!("EACCES: {path}"))
        }
    }

    fn handle(
        &self,
        domid: DomId,
        msg: GuestMsg,
        fds: Vec<OwnedFd>,
        w: &mpsc::Sender<WatchEvent>,
    ) -> anyhow::Result<HvMsg> {
        Ok(match msg {
            GuestMsg::Hello { .. } => bail!("already connected"),
            GuestMsg::Read { path } => {
                Self::check_access(domid, &path, false)?;
                HvMsg::Value(self.lock().tree.read(&path))
            }
            GuestMsg::Write { path, value } => {
                Self::check_access(domid, &path, true)?;
                self.lock().tree.write(&path, &value);
                HvMsg::Ok
            }
            GuestMsg::Directory { path } => {
                Self::check_access(domid, &path, false)?;
                HvMsg::List(self.lock().tree.directory(&path))
            }
            GuestMsg::Rm { path } => {
                Self::check_access(domid, &path, true)?;
                self.lock().tree.rm(&path);
                HvMsg::Ok
            }
            GuestMsg::Watch { path, token } => {
                Self::check_access(domid, &path, false)?;
                self.lock().tree.watch(domid, &path, &token, w.clone());
                HvMsg::Ok
            }
            GuestMsg::AllocUnbound => {
                let mut fds = fds.into_iter();
                let (Some(to_backend), Some(to_guest)) = (fds.next(), fds.next()) else {
                    bail!("AllocUnbound needs two eventfds");
                };
                let mut st = self.lock();
                let port = st.next_port;
                st.next_port += 1;
                st.unbound.insert((domid, port), Unbound { to_backend, to_guest, bound: Arc::default() });
                HvMsg::Port(port)
            }
        })
    }

    /// What `xl destroy` leaves behind: no guest directories, no grants.
    fn destroy_domain(&self, domid: DomId) {
        let mut st = self.lock();
        st.guests.remove(&domid);
        st.unbound.retain(|(d, _), _| *d != domid);
        st.tree.drop_watches_of(domid);
        st.tree.rm(&format!("/local/domain/0/backend/vsnd/{domid}"));
        st.tree.rm(&format!("/local/domain/{domid}"));
        tracing::info!(domid, "loopback: guest disconnected, domain destroyed");
    }
}

/// The backend's xenstore handle (domain 0: may read and write everything).
struct LocalStore {
    hv: Arc<Hypervisor>,
    events: mpsc::Sender<WatchEvent>,
}

impl XenStore for LocalStore {
    fn read(&self, path: &str) -> Result<Option<String>, StoreError> {
        Ok(self.hv.lock().tree.read(path))
    }
    fn write(&self, path: &str, value: &str) -> Result<(), StoreError> {
        self.hv.lock().tree.write(path, value);
        Ok(())
    }
    fn directory(&self, path: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.hv.lock().tree.directory(path))
    }
    fn rm(&self, path: &str) -> Result<(), StoreError> {
        self.hv.lock().tree.rm(path);
        Ok(())
    }
    fn watch(&self, path: &str, token: &str) -> Result<(), StoreError> {
        self.hv.lock().tree.watch(BACKEND_DOMID, path, token, self.events.clone());
        Ok(())
    }
    fn unwatch(&self, path: &str, token: &str) -> Result<(), StoreError> {
        self.hv.lock().tree.unwatch(BACKEND_DOMID, path, token);
        Ok(())
    }
}

impl GrantMapper for Hypervisor {
    fn map(&self, domid: DomId, grefs: &[u32]) -> Result<SharedPages, HypervisorError> {
        let (memfd, pages) = {
            let st = self.lock();
            let g = st.guests.get(&domid).ok_or_else(|| {
                HypervisorError::refused(
                    HypervisorError::GRANT_MAP,
                    format!("domain {domid}"),
                    "no such domain",
                )
            })?;
            (g.memfd.clone(), g.pages)
        };
        super::memory::map_grefs(&memfd, pages, grefs)
    }
}

impl EventChannels for Hypervisor {
    fn bind(&self, domid: DomId, remote_port: u32) -> Result<Arc<dyn EventChannel>, HypervisorError> {
        let target = || format!("port {remote_port} of domain {domid}");
        let st = self.lock();
        let u = st
            .unbound
            .get(&(domid, remote_port))
            .filter(|u| !u.bound.swap(true, Ordering::SeqCst))
            .ok_or_else(|| {
                HypervisorError::refused(
                    HypervisorError::EVTCHN_BIND,
                    target(),
                    "not an unbound port of that domain",
                )
            })?;
        let dup = |fd: &OwnedFd| fd.try_clone();
        let channel = match (dup(&u.to_backend), dup(&u.to_guest)) {
            (Ok(wait), Ok(notify)) => EventFdChannel { wait, notify },
            (Err(e), _) | (_, Err(e)) => {
                u.bound.store(false, Ordering::SeqCst);
                return Err(HypervisorError::from_os(HypervisorError::EVTCHN_BIND, target(), &e));
            }
        };
        Ok(Arc::new(BoundPort { channel, bound: u.bound.clone() }))
    }
}

/// One direction of notification each way, as eventfds.
pub struct EventFdChannel {
    pub wait: OwnedFd,
    pub notify: OwnedFd,
}

impl EventChannel for EventFdChannel {
    fn notify(&self) -> bool {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a valid buffer to an eventfd we own.
        let n = unsafe { libc::write(self.notify.as_raw_fd(), one.as_ptr().cast(), 8) };
        n == 8
    }
    fn fd(&self) -> RawFd {
        self.wait.as_raw_fd()
    }
    fn consume(&self) -> bool {
        let mut v = [0u8; 8];
        // SAFETY: reading 8 bytes into a valid buffer; the eventfd is non-blocking.
        let n = unsafe { libc::read(self.wait.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        n == 8
    }
}

/// A non-blocking eventfd, as both sides of a loopback channel use.
pub fn new_eventfd() -> anyhow::Result<OwnedFd> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let e = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
    Ok(e.into())
}
