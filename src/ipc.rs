//! JSON messages over SOCK_SEQPACKET Unix sockets (one message per packet),
//! with file descriptors passed as SCM_RIGHTS: the loopback transport's
//! guest protocol and the control socket (`control`) both use it.

use anyhow::{bail, Context};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Largest message; xenstore values are small, directory listings bounded.
pub const MAX_MSG: usize = 64 * 1024;

pub fn send<T: Serialize>(fd: RawFd, msg: &T, fds: &[RawFd]) -> anyhow::Result<()> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_MSG {
        bail!("message too large ({} bytes)", body.len());
    }
    let iov = [IoSlice::new(&body)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).context("sendmsg")?;
    Ok(())
}

/// Receives one message; `Ok(None)` when the peer closed the socket.
pub fn recv<T: for<'de> Deserialize<'de>>(fd: RawFd) -> anyhow::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MSG];
    let mut cbuf = nix::cmsg_space!([RawFd; 4]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(fd, &mut iov, Some(&mut cbuf), MsgFlags::MSG_CMSG_CLOEXEC) {
            // A peer that exits with data still queued resets the socket:
            // that is a close, not an error.
            Err(nix::errno::Errno::ECONNRESET) => return Ok(None),
            r => r.context("recvmsg")?,
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().context("control messages")? {
            if let ControlMessageOwned::ScmRights(list) = c {
                // SAFETY: the kernel just installed these descriptors for us.
                fds.extend(list.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        (msg.bytes, fds)
    };
    if n == 0 {
        return Ok(None);
    }
    let m = serde_json::from_slice(&buf[..n]).context("malformed message")?;
    Ok(Some((m, fds)))
}

/// A new SOCK_SEQPACKET Unix socket.
pub fn seqpacket_socket() -> anyhow::Result<OwnedFd> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    Ok(socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?)
}

/// A SOCK_SEQPACKET socket connected to `path`.
pub fn connect(path: &std::path::Path) -> anyhow::Result<OwnedFd> {
    let fd = seqpacket_socket()?;
    let addr = nix::sys::socket::UnixAddr::new(path)?;
    nix::sys::socket::connect(fd.as_raw_fd(), &addr)
        .with_context(|| format!("connect to {}", path.display()))?;
    Ok(fd)
}
