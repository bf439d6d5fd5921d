//! The vsnd wire format (Xen `public/io/sndif.h`, protocol version 2) and the
//! card/pcm/stream configuration that the toolstack writes into xenstore.
//!
//! Pure code: no I/O, no unsafe, no dependencies. Everything here decodes
//! bytes and strings that come from an untrusted guest, so decoding never
//! panics and never trusts a length (the fuzz targets in tests/fuzz hold it
//! to that). A backend or a frontend written in Rust can use it as is:
//! xen-vsnd's daemon and its simulated guest both do.

#![forbid(unsafe_code)]

pub mod config;
pub mod format;
pub mod wire;

pub use config::{CardConfig, PcmConfig, StreamConfig, StreamKind, StreamParams};
pub use format::PcmFormat;
pub use wire::{HwParam, OpenReq, Request, Response, RwReq, EVT_RING_LEN, PAGE_SIZE, REQ_RING_SIZE};

/// Protocol version this backend speaks (`XENSND_PROTOCOL_VERSION`).
pub const PROTOCOL_VERSION: u32 = 2;

/// Request opcodes (`XENSND_OP_*`).
pub mod op {
    pub const OPEN: u8 = 0;
    pub const CLOSE: u8 = 1;
    pub const READ: u8 = 2;
    pub const WRITE: u8 = 3;
    pub const SET_VOLUME: u8 = 4;
    pub const GET_VOLUME: u8 = 5;
    pub const MUTE: u8 = 6;
    pub const UNMUTE: u8 = 7;
    pub const TRIGGER: u8 = 8;
    pub const HW_PARAM_QUERY: u8 = 9;
}

/// Trigger types (`XENSND_OP_TRIGGER_*`).
pub mod trigger {
    pub const START: u8 = 0;
    pub const PAUSE: u8 = 1;
    pub const STOP: u8 = 2;
    pub const RESUME: u8 = 3;
}

/// Event types (`XENSND_EVT_*`).
pub mod evt {
    pub const CUR_POS: u8 = 0;
}

/// Xen errno values, sent negated in `Response::status`.
pub mod errno {
    pub const EIO: i32 = 5;
    pub const ENOMEM: i32 = 12;
    pub const EFAULT: i32 = 14;
    pub const EBUSY: i32 = 16;
    pub const EINVAL: i32 = 22;
    pub const ENOSYS: i32 = 38;
    pub const ENOTSUP: i32 = 95;
}

/// xenstore key names (`XENSND_FIELD_*`) and the keys of the delay extension.
pub mod keys {
    pub const SHORT_NAME: &str = "short-name";
    pub const LONG_NAME: &str = "long-name";
    pub const RING_REF: &str = "ring-ref";
    pub const EVT_CHNL: &str = "event-channel";
    pub const EVT_RING_REF: &str = "evt-ring-ref";
    pub const EVT_EVT_CHNL: &str = "evt-event-channel";
    pub const DEVICE_NAME: &str = "name";
    pub const TYPE: &str = "type";
    pub const UNIQUE_ID: &str = "unique-id";
    pub const CHANNELS_MIN: &str = "channels-min";
    pub const CHANNELS_MAX: &str = "channels-max";
    pub const SAMPLE_RATES: &str = "sample-rates";
    pub const SAMPLE_FORMATS: &str = "sample-formats";
    pub const BUFFER_SIZE: &str = "buffer-size";
    pub const BE_VERSIONS: &str = "versions";
    pub const STATE: &str = "state";
    pub const FRONTEND: &str = "frontend";
    pub const FRONTEND_ID: &str = "frontend-id";
    pub const BACKEND: &str = "backend";
    pub const BACKEND_ID: &str = "backend-id";
    pub const ONLINE: &str = "online";
    /// Delay extension (DESIGN.md): written as "1" by both sides to opt in.
    pub const FEATURE_DELAY_REPORT: &str = "feature-delay-report";
    pub const TYPE_PLAYBACK: &str = "p";
    pub const TYPE_CAPTURE: &str = "c";
}

/// xenbus device states (`enum xenbus_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    InitWait = 2,
    Initialised = 3,
    Connected = 4,
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl XenbusState {
    /// Parses the decimal string found in a `state` key; anything else is `Unknown`.
    pub fn parse(s: &str) -> XenbusState {
        match s.trim().parse::<u32>() {
            Ok(1) => Self::Initialising,
            Ok(2) => Self::InitWait,
            Ok(3) => Self::Initialised,
            Ok(4) => Self::Connected,
            Ok(5) => Self::Closing,
            Ok(6) => Self::Closed,
            Ok(7) => Self::Reconfiguring,
            Ok(8) => Self::Reconfigured,
            _ => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "0",
            Self::Initialising => "1",
            Self::InitWait => "2",
            Self::Initialised => "3",
            Self::Connected => "4",
            Self::Closing => "5",
            Self::Closed => "6",
            Self::Reconfiguring => "7",
            Self::Reconfigured => "8",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xenbus_state_round_trip() {
        for n in 0..=8u32 {
            let st = XenbusState::parse(&n.to_string());
            assert_eq!(st.as_str(), n.to_string());
        }
        assert_eq!(XenbusState::parse("garbage"), XenbusState::Unknown);
        assert_eq!(XenbusState::parse("99"), XenbusState::Unknown);
    }
}
