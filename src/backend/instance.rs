//! One backend per transport. A second `serve` on the same transport would
//! fight the first over every device (both answer the handshake, both map
//! the rings), so it must not start. The running instance holds an abstract
//! Unix socket named after its transport: the kernel frees the name when
//! the process ends, however it ends, so there is no stale lock file to
//! clean up after a crash or `kill -9`. A second instance finds the name
//! taken, asks the socket who holds it (`SO_PEERCRED`) and names that
//! process in its error.

#![forbid(unsafe_code)]

use anyhow::{bail, Context};
use std::io::ErrorKind;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;

/// Held for as long as the backend serves its transport.
pub struct InstanceLock {
    _name: UnixListener,
}

/// The instance name of a transport: `xen` (per domain: one network
/// namespace is one domain's), or `loopback:<socket>` by the socket's
/// absolute path.
pub fn transport_key(transport: &str) -> String {
    match transport.strip_prefix("loopback:") {
        Some(p) => {
            let p = Path::new(p);
            // The socket may not exist yet: its directory does.
            let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let abs = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
            let file = p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            format!("loopback:{}", abs.join(file).display())
        }
        None => transport.to_string(),
    }
}

/// FNV-1a: abstract names are at most 107 bytes, paths may be longer, and
/// every version of xen-vsnd must derive the same name from the same key.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn abstract_name(key: &str) -> String {
    format!("xen-vsnd/{:016x}", fnv1a(key))
}

/// Claims the transport `key` for this process, or says which process has it.
pub fn claim(key: &str) -> anyhow::Result<InstanceLock> {
    let addr = SocketAddr::from_abstract_name(abstract_name(key).as_bytes())
        .context("naming the instance socket")?;
    match UnixListener::bind_addr(&addr) {
        Ok(l) => Ok(InstanceLock { _name: l }),
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            bail!("another xen-vsnd already serves {key}: {}; stop it first", holder(&addr))
        }
        Err(e) => Err(e).with_context(|| format!("claiming {key} for this instance")),
    }
}

/// "pid N (command line)" of the process listening on `addr`, as far as
/// it can be found out.
fn holder(addr: &SocketAddr) -> String {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let Ok(s) = UnixStream::connect_addr(addr) else {
        return "a process that does not answer".into();
    };
    let Ok(cred) = getsockopt(&s, PeerCredentials) else {
        return "a process whose id the kernel does not tell".into();
    };
    let pid = cred.pid();
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_string())
        .unwrap_or_default();
    if cmd.is_empty() {
        format!("pid {pid}")
    } else {
        format!("pid {pid} ({cmd})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_names_the_first() {
        let key = format!("loopback:/test/{}/{}", std::process::id(), line!());
        let first = claim(&key).unwrap();
        let err = format!("{:#}", claim(&key).err().unwrap());
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(err.contains(&key), "{err}");
        drop(first);
        assert!(claim(&key).is_ok(), "the name is free again once the holder is gone");
    }

    #[test]
    fn loopback_keys_are_absolute_paths() {
        let here = std::env::current_dir().unwrap().canonicalize().unwrap();
        assert_eq!(transport_key("loopback:s.sock"), format!("loopback:{}", here.join("s.sock").display()));
        assert_eq!(transport_key("xen"), "xen");
        assert_ne!(abstract_name("xen"), abstract_name("loopback:/tmp/s"));
    }
}
