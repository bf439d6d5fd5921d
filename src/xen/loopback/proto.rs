//! Messages between a loopback guest and the loopback hypervisor: JSON over a
//! SOCK_SEQPACKET Unix socket (one message per packet), with file descriptors
//! (the guest's memfd, event-channel eventfds) passed as SCM_RIGHTS.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

pub use crate::ipc::{connect, recv, send, seqpacket_socket, MAX_MSG};

#[derive(Debug, Serialize, Deserialize)]
pub enum GuestMsg {
    /// First message. Carries the guest's memfd (its grantable memory of
    /// `pages` pages) and, as a toolstack would write it, the vsnd device's
    /// frontend keys relative to `device/vsnd/0`.
    Hello {
        name: String,
        pages: u32,
        vsnd: Vec<(String, String)>,
    },
    Read {
        path: String,
    },
    Write {
        path: String,
        value: String,
    },
    Directory {
        path: String,
    },
    Rm {
        path: String,
    },
    Watch {
        path: String,
        token: String,
    },
    /// Allocates an unbound port; carries two eventfds: [to_backend, to_guest].
    AllocUnbound,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum HvMsg {
    Welcome { domid: u32 },
    Ok,
    Value(Option<String>),
    List(Vec<String>),
    Port(u32),
    Error(String),
    WatchFired { path: String, token: String },
}
