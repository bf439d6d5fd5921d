//! Real Xen: placeholder (filled in next).
use super::Transport;
pub fn open() -> anyhow::Result<Transport> {
    anyhow::bail!("not yet")
}
