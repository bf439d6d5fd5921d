//! Fault injection, for tests of what the backend does when a part it
//! depends on misbehaves. `XEN_VSND_FAULTS=<point>=<value>,...` in the
//! environment of `xen-vsnd serve` arms the named points; without the
//! variable every point is a no-op. Read once, at the first use.
//!
//! Points:
//! - `teardown-delay-ms=N`: a device's teardown takes N ms longer, as when
//!   a host takes long to let go of its streams (a stopped JACK server, an
//!   ALSA device playing out a long buffer).

#![forbid(unsafe_code)]

use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Faults {
    pub teardown_delay: Option<Duration>,
}

fn parse(spec: &str) -> Faults {
    let mut f = Faults::default();
    for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some(("teardown-delay-ms", v)) => f.teardown_delay = v.parse().ok().map(Duration::from_millis),
            _ => tracing::warn!("XEN_VSND_FAULTS: unknown fault {item:?}"),
        }
    }
    f
}

/// The faults armed for this process.
pub fn armed() -> &'static Faults {
    static FAULTS: OnceLock<Faults> = OnceLock::new();
    FAULTS.get_or_init(|| {
        let f = parse(&std::env::var("XEN_VSND_FAULTS").unwrap_or_default());
        if f != Faults::default() {
            tracing::warn!("fault injection armed: {f:?}");
        }
        f
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_parse() {
        assert_eq!(parse(""), Faults::default());
        assert_eq!(parse("teardown-delay-ms=250").teardown_delay, Some(Duration::from_millis(250)));
        assert_eq!(parse("nonsense=1"), Faults::default());
    }
}
