//! Real Xen through the Linux device files of dom0 or a driver domain:
//! `/dev/xen/xenbus` (the xenstore wire protocol, `xs_wire.h`),
//! `/dev/xen/evtchn` (one open file per bound channel) and `/dev/xen/gntdev`.
//! Selected with `serve --transport xen`; exercised by the real-Xen harness.

use super::{
    DomId, EventChannel, EventChannels, GrantMapper, HypervisorError, SharedPages, StoreError, Transport,
    WatchEvent, XenStore,
};
use crate::sndif::PAGE_SIZE;
use anyhow::bail;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// `enum xsd_sockmsg_type` values used here.
pub mod xs {
    pub const DIRECTORY: u32 = 1;
    pub const READ: u32 = 2;
    pub const WATCH: u32 = 4;
    pub const UNWATCH: u32 = 5;
    pub const WRITE: u32 = 11;
    pub const RM: u32 = 13;
    pub const WATCH_EVENT: u32 = 15;
    pub const ERROR: u32 = 16;
    /// `XENSTORE_PAYLOAD_MAX`
    pub const PAYLOAD_MAX: usize = 4096;
}

/// ioctl numbers of `xen/sys/evtchn.h` and `xen/sys/gntdev.h` (checked
/// against the headers in tests/sndif_abi.rs).
pub mod ioctl {
    pub const EVTCHN_BIND_INTERDOMAIN: u64 = 0x0008_4501;
    pub const EVTCHN_UNBIND: u64 = 0x0004_4503;
    pub const EVTCHN_NOTIFY: u64 = 0x0004_4504;
    pub const GNTDEV_MAP_GRANT_REF: u64 = 0x0018_4700;
    pub const GNTDEV_UNMAP_GRANT_REF: u64 = 0x0010_4701;
}

const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

type Reply = Result<Vec<u8>, String>;

/// xenstore over /dev/xen/xenbus. One reader thread routes replies to their
/// callers by request id and watch events to the backend's channel.
struct XenBus {
    dev: Mutex<File>,
    pending: Arc<Mutex<HashMap<u32, mpsc::SyncSender<Reply>>>>,
    next_id: AtomicU32,
}

fn open_xenbus() -> anyhow::Result<File> {
    let mut errors = Vec::new();
    let mut hint = "";
    for p in ["/dev/xen/xenbus", "/proc/xen/xenbus"] {
        match OpenOptions::new().read(true).write(true).open(p) {
            Ok(f) => return Ok(f),
            Err(e) => {
                // The first device's reason is the telling one.
                if hint.is_empty() {
                    hint = device_hint(e.kind());
                }
                errors.push(format!("{p}: {e}"));
            }
        }
    }
    bail!("cannot reach xenstore ({}){hint}", errors.join("; "))
}

/// What an open error of a /dev/xen device most likely means.
fn device_hint(kind: std::io::ErrorKind) -> &'static str {
    match kind {
        std::io::ErrorKind::PermissionDenied => {
            " — this user may not use the Xen devices: install the udev rule \
             (60-xen-vsnd.rules, group xen-vsnd) and run as a member of that group"
        }
        std::io::ErrorKind::NotFound => {
            " — is this a Xen domain with the xen-evtchn, xen-gntdev and xenfs drivers loaded?"
        }
        _ => "",
    }
}

/// Opens a /dev/xen device, saying why not (the OS error, and a hint).
fn open_device(path: &str, write: bool) -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| anyhow::anyhow!("open {path}: {e}{}", device_hint(e.kind())))
}

fn split_nul(b: &[u8]) -> Vec<String> {
    b.split(|c| *c == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

impl XenBus {
    fn start(events: mpsc::Sender<WatchEvent>) -> anyhow::Result<XenBus> {
        let dev = open_xenbus()?;
        let mut reader = dev.try_clone()?;
        let pending: Arc<Mutex<HashMap<u32, mpsc::SyncSender<Reply>>>> = Arc::default();
        let p2 = pending.clone();
        std::thread::Builder::new().name("xenbus".into()).spawn(move || {
            let mut hdr = [0u8; 16];
            loop {
                if let Err(e) = reader.read_exact(&mut hdr) {
                    tracing::error!("xenbus: read failed: {e}");
                    break;
                }
                let w = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
                let (ty, req_id, len) = (w(0), w(4), w(12) as usize);
                let mut body = vec![0u8; len.min(xs::PAYLOAD_MAX * 2)];
                if reader.read_exact(&mut body).is_err() {
                    break;
                }
                if ty == xs::WATCH_EVENT {
                    let parts = split_nul(&body);
                    if parts.len() >= 2 {
                        let _ = events.send(WatchEvent { path: parts[0].clone(), token: parts[1].clone() });
                    }
                    continue;
                }
                let reply = if ty == xs::ERROR { Err(split_nul(&body).join("")) } else { Ok(body) };
                if let Some(tx) = p2.lock().unwrap_or_else(|e| e.into_inner()).remove(&req_id) {
                    let _ = tx.send(reply);
                }
            }
        })?;
        Ok(XenBus { dev: Mutex::new(dev), pending, next_id: AtomicU32::new(1) })
    }

    fn call(&self, ty: u32, parts: &[&[u8]]) -> Result<Vec<u8>, CallError> {
        let body: Vec<u8> = parts.concat();
        if body.len() > xs::PAYLOAD_MAX {
            return Err(CallError::Unavailable("request too large".into()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let mut msg = Vec::with_capacity(16 + body.len());
        for v in [ty, id, 0, body.len() as u32] {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        msg.extend_from_slice(&body);
        // The device wants each message in a single write.
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(&msg)
            .map_err(|e| CallError::Unavailable(format!("xenbus write: {e}")))?;
        match rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(errno)) => Err(CallError::Errno(errno)),
            Err(_) => {
                self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                Err(CallError::Unavailable("xenstored did not answer".into()))
            }
        }
    }
}

fn z(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Why a xenbus call got no value.
enum CallError {
    /// xenstored's answer: an errno name (ENOENT, EACCES, ...).
    Errno(String),
    /// No answer: the device, the reply thread, the time-out.
    Unavailable(String),
}

impl XenBus {
    /// `call`, with its failure typed for the trait: ENOENT is `Ok(None)`.
    fn ask(
        &self,
        op: &'static str,
        ty: u32,
        path: &str,
        parts: &[&[u8]],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match self.call(ty, parts) {
            Ok(b) => Ok(Some(b)),
            Err(CallError::Errno(e)) if e == "ENOENT" => Ok(None),
            Err(CallError::Errno(errno)) => Err(StoreError::Refused { op, path: path.to_string(), errno }),
            Err(CallError::Unavailable(why)) => {
                Err(StoreError::Unavailable { op, path: path.to_string(), why })
            }
        }
    }
}

impl XenStore for XenBus {
    fn read(&self, path: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .ask("read", xs::READ, path, &[&z(path)])?
            .map(|b| String::from_utf8_lossy(&b).trim_end_matches('\0').to_string()))
    }
    fn write(&self, path: &str, value: &str) -> Result<(), StoreError> {
        match self.ask("write", xs::WRITE, path, &[&z(path), value.as_bytes()])? {
            Some(_) => Ok(()),
            // ENOENT from a write: a parent that cannot be made.
            None => Err(StoreError::Refused { op: "write", path: path.to_string(), errno: "ENOENT".into() }),
        }
    }
    fn directory(&self, path: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .ask("directory", xs::DIRECTORY, path, &[&z(path)])?
            .map(|b| split_nul(&b))
            .unwrap_or_default())
    }
    fn rm(&self, path: &str) -> Result<(), StoreError> {
        self.ask("rm", xs::RM, path, &[&z(path)]).map(drop)
    }
    fn watch(&self, path: &str, token: &str) -> Result<(), StoreError> {
        self.ask("watch", xs::WATCH, path, &[&z(path), &z(token)]).map(drop)
    }
    fn unwatch(&self, path: &str, token: &str) -> Result<(), StoreError> {
        self.ask("unwatch", xs::UNWATCH, path, &[&z(path), &z(token)]).map(drop)
    }
}

/// One bound channel: its own /dev/xen/evtchn instance, so its fd is
/// readable exactly when this channel fired.
struct EvtchnPort {
    dev: File,
    local_port: u32,
}

impl EventChannel for EvtchnPort {
    fn notify(&self) -> bool {
        let arg: u32 = self.local_port;
        // SAFETY: IOCTL_EVTCHN_NOTIFY reads one u32 from `arg`.
        unsafe { libc::ioctl(self.dev.as_raw_fd(), ioctl::EVTCHN_NOTIFY as _, &arg) == 0 }
    }
    fn fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }
    fn consume(&self) -> bool {
        let mut ports = [0u32; 8];
        // SAFETY: reading into a u32 array; the fd is non-blocking.
        let n = unsafe {
            libc::read(self.dev.as_raw_fd(), ports.as_mut_ptr().cast(), std::mem::size_of_val(&ports))
        };
        if n <= 0 {
            return false;
        }
        // Writing the port back unmasks it.
        let p = self.local_port.to_ne_bytes();
        // SAFETY: 4-byte write from a valid buffer.
        unsafe { libc::write(self.dev.as_raw_fd(), p.as_ptr().cast(), 4) };
        true
    }
}

impl Drop for EvtchnPort {
    fn drop(&mut self) {
        let arg: u32 = self.local_port;
        // SAFETY: IOCTL_EVTCHN_UNBIND reads one u32.
        unsafe { libc::ioctl(self.dev.as_raw_fd(), ioctl::EVTCHN_UNBIND as _, &arg) };
    }
}

struct Evtchn;

impl EventChannels for Evtchn {
    fn bind(&self, domid: DomId, remote_port: u32) -> Result<Arc<dyn EventChannel>, HypervisorError> {
        let target = || format!("port {remote_port} of domain {domid}");
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/xen/evtchn")
            .map_err(|e| HypervisorError::Unavailable {
                call: HypervisorError::EVTCHN_BIND,
                target: target(),
                why: format!("open /dev/xen/evtchn: {e}{}", device_hint(e.kind())),
            })?;
        let arg: [u32; 2] = [domid, remote_port];
        // SAFETY: IOCTL_EVTCHN_BIND_INTERDOMAIN reads {remote_domain, remote_port}.
        let port = unsafe { libc::ioctl(dev.as_raw_fd(), ioctl::EVTCHN_BIND_INTERDOMAIN as _, &arg) };
        if port < 0 {
            let e = std::io::Error::last_os_error();
            return Err(HypervisorError::from_os(HypervisorError::EVTCHN_BIND, target(), &e));
        }
        Ok(Arc::new(EvtchnPort { dev, local_port: port as u32 }))
    }
}

struct Gntdev {
    dev: Arc<File>,
}

impl GrantMapper for Gntdev {
    fn map(&self, domid: DomId, grefs: &[u32]) -> Result<SharedPages, HypervisorError> {
        let target = || format!("{} page(s) of domain {domid}", grefs.len());
        let failed = |e: std::io::Error| HypervisorError::from_os(HypervisorError::GRANT_MAP, target(), &e);
        if grefs.is_empty() {
            return Err(HypervisorError::refused(
                HypervisorError::GRANT_MAP,
                target(),
                "no grant references",
            ));
        }
        // struct ioctl_gntdev_map_grant_ref { u32 count; u32 pad; u64 index; {u32 domid; u32 ref;}[count] }
        let mut arg = vec![0u32; 4 + 2 * grefs.len()];
        arg[0] = grefs.len() as u32;
        for (i, g) in grefs.iter().enumerate() {
            arg[4 + 2 * i] = domid;
            arg[5 + 2 * i] = *g;
        }
        let fd = self.dev.as_raw_fd();
        // SAFETY: `arg` is laid out as the kernel struct and large enough.
        if unsafe { libc::ioctl(fd, ioctl::GNTDEV_MAP_GRANT_REF as _, arg.as_mut_ptr()) } != 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
        let index = arg[2] as u64 | (arg[3] as u64) << 32;
        let len = grefs.len() * PAGE_SIZE;
        let unmap_ioctl = |fd: RawFd, index: u64, count: u32| {
            let u: [u32; 4] = [index as u32, (index >> 32) as u32, count, 0];
            // SAFETY: struct ioctl_gntdev_unmap_grant_ref { u64 index; u32 count; u32 pad; }.
            unsafe { libc::ioctl(fd, ioctl::GNTDEV_UNMAP_GRANT_REF as _, u.as_ptr()) };
        };
        // SAFETY: maps the grants just set up at `index`; unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                index as i64,
            )
        };
        // gntdev maps the grants here: a grant the guest did not make is
        // EINVAL (refused), a shortage of ours ENOMEM.
        let ptr = match std::ptr::NonNull::new(p as *mut u8) {
            Some(ptr) if p != libc::MAP_FAILED => ptr,
            _ => {
                let e = std::io::Error::last_os_error();
                unmap_ioctl(fd, index, grefs.len() as u32);
                return Err(failed(e));
            }
        };
        let dev = self.dev.clone();
        let count = grefs.len() as u32;
        // SAFETY: a fresh mapping of `len` bytes released exactly once below.
        Ok(unsafe {
            SharedPages::new(
                ptr,
                len,
                Box::new(move |p, l| {
                    libc::munmap(p.cast(), l);
                    unmap_ioctl(dev.as_fd().as_raw_fd(), index, count);
                }),
            )
        })
    }
}

/// xenstore alone (for dom0's `vouch`): the store, its watch events and
/// this domain's id.
pub fn open_store() -> anyhow::Result<(Arc<dyn XenStore>, mpsc::Receiver<WatchEvent>, DomId)> {
    let (tx, rx) = mpsc::channel();
    let bus = Arc::new(XenBus::start(tx)?);
    let own_domid = bus.read("domid")?.and_then(|d| d.trim().parse().ok()).unwrap_or(0);
    Ok((bus, rx, own_domid))
}

/// Opens the real Xen transport.
pub fn open() -> anyhow::Result<Transport> {
    let (store, rx, own_domid) = open_store()?;
    let gnt = open_device("/dev/xen/gntdev", true)?;
    // Fail early, with a clear message, when event channels are unavailable.
    open_device("/dev/xen/evtchn", true)?;
    Ok(Transport {
        store,
        grants: Arc::new(Gntdev { dev: Arc::new(gnt) }),
        evtchn: Arc::new(Evtchn),
        watch_events: rx,
        own_domid,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_device_error_keeps_the_os_error_and_says_what_it_means() {
        let e = format!("{:#}", super::open_device("/nonexistent/xen/evtchn", true).unwrap_err());
        assert!(e.contains("No such file or directory (os error 2)") && e.contains("xen-evtchn"), "{e}");
        assert!(super::device_hint(std::io::ErrorKind::PermissionDenied).contains("udev rule"));
    }
}
