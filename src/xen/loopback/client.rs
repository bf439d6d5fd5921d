//! The guest's side of the loopback transport: what a simulated frontend uses
//! in place of the guest kernel's xenbus, grant table and event channels.

use super::proto::{self, GuestMsg, HvMsg};
use super::{new_eventfd, EventFdChannel};
use crate::sndif::PAGE_SIZE;
use crate::xen::memory::GuestMemory;
use crate::xen::{EventChannel, SharedPages, WatchEvent};
use anyhow::{anyhow, bail, Context};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct GuestConn {
    sock: OwnedFd,
    pub domid: u32,
    watch_queue: VecDeque<WatchEvent>,
    memory: GuestMemory,
    next_page: u32,
    pages: u32,
}

impl GuestConn {
    /// Connects as a new guest called `name` with `pages` pages of grantable
    /// memory and a vsnd device configured by `vsnd` (frontend-relative keys).
    pub fn connect(
        path: &Path,
        name: &str,
        pages: u32,
        vsnd: Vec<(String, String)>,
    ) -> anyhow::Result<GuestConn> {
        let sock = proto::connect(path)?;
        let memory = GuestMemory::new(pages)?;
        let hello = GuestMsg::Hello { name: name.to_string(), pages, vsnd };
        proto::send(sock.as_raw_fd(), &hello, &[memory.fd()])?;
        let mut c = GuestConn { sock, domid: 0, watch_queue: VecDeque::new(), memory, next_page: 1, pages };
        match c.reply(Duration::from_secs(5))? {
            HvMsg::Welcome { domid } => c.domid = domid,
            HvMsg::Error(e) => bail!("hypervisor refused: {e}"),
            other => bail!("unexpected {other:?}"),
        }
        Ok(c)
    }

    /// Waits for the next non-watch message, queueing watch events.
    fn reply(&mut self, timeout: Duration) -> anyhow::Result<HvMsg> {
        let deadline = Instant::now() + timeout;
        loop {
            self.wait_readable(deadline)?;
            match proto::recv::<HvMsg>(self.sock.as_raw_fd())? {
                None => bail!("hypervisor closed the connection"),
                Some((HvMsg::WatchFired { path, token }, _)) => {
                    self.watch_queue.push_back(WatchEvent { path, token })
                }
                Some((m, _)) => return Ok(m),
            }
        }
    }

    fn wait_readable(&self, deadline: Instant) -> anyhow::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::ZERO);
        if poll(&mut fds, ms)? == 0 {
            bail!("timed out waiting for the hypervisor");
        }
        Ok(())
    }

    fn call(&mut self, m: GuestMsg) -> anyhow::Result<HvMsg> {
        proto::send(self.sock.as_raw_fd(), &m, &[])?;
        match self.reply(Duration::from_secs(5))? {
            HvMsg::Error(e) => Err(anyhow!(e)),
            r => Ok(r),
        }
    }

    pub fn read(&mut self, path: &str) -> anyhow::Result<Option<String>> {
        match self.call(GuestMsg::Read { path: path.into() })? {
            HvMsg::Value(v) => Ok(v),
            o => bail!("unexpected {o:?}"),
        }
    }

    pub fn write(&mut self, path: &str, value: &str) -> anyhow::Result<()> {
        self.call(GuestMsg::Write { path: path.into(), value: value.into() }).map(|_| ())
    }

    pub fn watch(&mut self, path: &str, token: &str) -> anyhow::Result<()> {
        self.call(GuestMsg::Watch { path: path.into(), token: token.into() }).map(|_| ())
    }

    /// Next watch event, waiting until `deadline`.
    pub fn next_watch(&mut self, deadline: Instant) -> anyhow::Result<WatchEvent> {
        if let Some(e) = self.watch_queue.pop_front() {
            return Ok(e);
        }
        self.wait_readable(deadline)?;
        match proto::recv::<HvMsg>(self.sock.as_raw_fd())? {
            None => bail!("hypervisor closed the connection"),
            Some((HvMsg::WatchFired { path, token }, _)) => Ok(WatchEvent { path, token }),
            Some((m, _)) => bail!("unsolicited {m:?}"),
        }
    }

    /// Watches `path` with `token` and returns once the watch's first
    /// firing (the one on registration) is consumed: from then on, events
    /// with `token` are writes made after this call.
    pub fn watch_from_now(&mut self, path: &str, token: &str, timeout: Duration) -> anyhow::Result<()> {
        self.watch(path, token)?;
        self.next_watch_with(token, Instant::now() + timeout).map(|_| ())
    }

    /// The next event of the watch `token`, skipping others, bounded.
    pub fn next_watch_with(&mut self, token: &str, deadline: Instant) -> anyhow::Result<WatchEvent> {
        loop {
            let e = self.next_watch(deadline)?;
            if e.token == token {
                return Ok(e);
            }
        }
    }

    /// Waits until `path` reads `want` (via a watch on it), bounded.
    pub fn wait_for_value(&mut self, path: &str, want: &str, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for_any(path, &[want], timeout).map(drop)
    }

    /// Waits until `path` holds one of `wants`; returns which.
    pub fn wait_for_any(&mut self, path: &str, wants: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        self.watch(path, "wait")?;
        loop {
            if let Some(v) = self.read(path)?.filter(|v| wants.contains(&v.as_str())) {
                return Ok(v);
            }
            self.next_watch(deadline)
                .with_context(|| format!("waiting for {path} to be one of {wants:?}"))?;
        }
    }

    /// Grants a fresh zeroed page; returns its gref.
    pub fn grant_page(&mut self) -> anyhow::Result<u32> {
        if self.next_page >= self.pages {
            bail!("guest memory exhausted");
        }
        let g = self.next_page;
        self.next_page += 1;
        self.memory.pages().copy_in(g as usize * PAGE_SIZE, &[0u8; PAGE_SIZE]);
        Ok(g)
    }

    /// The guest's own view of its memory (gref N at N * PAGE_SIZE).
    pub fn memory(&self) -> Arc<SharedPages> {
        self.memory.pages().clone()
    }

    /// Allocates an unbound event channel; returns (port, the guest's end).
    pub fn alloc_evtchn(&mut self) -> anyhow::Result<(u32, EventFdChannel)> {
        let to_backend = new_eventfd()?;
        let to_guest = new_eventfd()?;
        proto::send(
            self.sock.as_raw_fd(),
            &GuestMsg::AllocUnbound,
            &[to_backend.as_raw_fd(), to_guest.as_raw_fd()],
        )?;
        match self.reply(Duration::from_secs(5))? {
            HvMsg::Port(p) => Ok((p, EventFdChannel { wait: to_guest, notify: to_backend })),
            HvMsg::Error(e) => Err(anyhow!(e)),
            o => bail!("unexpected {o:?}"),
        }
    }
}

/// Waits until `ch` is notified or `deadline` passes; true when notified.
pub fn wait_channel(ch: &dyn EventChannel, deadline: Instant) -> anyhow::Result<bool> {
    // SAFETY: the channel's fd stays open for the duration of this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(ch.fd()) };
    let left = deadline.saturating_duration_since(Instant::now());
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::ZERO);
    if poll(&mut fds, ms)? == 0 {
        return Ok(false);
    }
    Ok(ch.consume())
}
