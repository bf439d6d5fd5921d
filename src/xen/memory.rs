//! A guest's grantable memory held in this process: one memfd, gref N =
//! page N, mapped the way Xen maps grants (every mapping of a page sees the
//! same bytes, at once). The loopback transport maps a guest process's
//! memfd with it, and a simulated guest holds its memory as a
//! `GuestMemory`; in-process tests and the fuzz targets (tests/fuzz) use one
//! as the guest's side, changing any byte between requests.

use super::{DomId, EventChannel, GrantMapper, HypervisorError, SharedPages};
use crate::sndif::PAGE_SIZE;
use anyhow::{anyhow, Context};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Maps the pages `grefs` of `memfd` (which holds `pages` pages) into one
/// contiguous, writable range. gref 0 and grefs past the end are refused,
/// as Xen refuses grants a guest never made; a failed mmap is this side's.
pub fn map_grefs(memfd: &OwnedFd, pages: u32, grefs: &[u32]) -> Result<SharedPages, HypervisorError> {
    let target = || format!("{} page(s)", grefs.len());
    let refused = |why: String| HypervisorError::refused(HypervisorError::GRANT_MAP, target(), why);
    let failed = |e: nix::Error| HypervisorError::from_os(HypervisorError::GRANT_MAP, target(), &e.into());
    if let Some(bad) = grefs.iter().find(|g| **g == 0 || **g >= pages) {
        return Err(refused(format!("grant reference {bad} is not granted")));
    }
    let len = grefs.len() * PAGE_SIZE;
    let Some(nz) = NonZeroUsize::new(len) else {
        return Err(refused("no grant references".into()));
    };
    let page = NonZeroUsize::new(PAGE_SIZE).expect("a page is not empty");
    // Reserve a contiguous range, then put each granted page in place.
    // SAFETY: a fresh anonymous mapping; pages are replaced with MAP_FIXED
    // inside the range we own, and the whole range is unmapped on drop.
    unsafe {
        let base = mmap_anonymous(None, nz, ProtFlags::PROT_NONE, MapFlags::MAP_PRIVATE).map_err(failed)?;
        for (i, g) in grefs.iter().enumerate() {
            let at = NonZeroUsize::new(base.as_ptr() as usize + i * PAGE_SIZE);
            let r = mmap(
                at,
                page,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
                memfd.as_fd(),
                (*g as usize * PAGE_SIZE) as i64,
            );
            if let Err(e) = r {
                let _ = munmap(base, len);
                return Err(failed(e));
            }
        }
        let ptr = base.cast::<u8>();
        Ok(SharedPages::new(
            ptr,
            len,
            Box::new(|p, l| {
                if let Some(p) = NonNull::new(p as *mut libc::c_void) {
                    let _ = munmap(p, l);
                }
            }),
        ))
    }
}

/// A guest's memory of `pages` pages, all granted to every domain (gref 0
/// excepted, as on Xen). `pages()` is the guest's own view of all of it.
pub struct GuestMemory {
    memfd: OwnedFd,
    pages: u32,
    all: Arc<SharedPages>,
}

impl GuestMemory {
    pub fn new(pages: u32) -> anyhow::Result<GuestMemory> {
        let len =
            NonZeroUsize::new(pages as usize * PAGE_SIZE).ok_or_else(|| anyhow!("a guest with no memory"))?;
        let memfd =
            nix::sys::memfd::memfd_create(c"xen-vsnd-guest", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .context("memfd_create")?;
        nix::unistd::ftruncate(&memfd, len.get() as i64).context("sizing guest memory")?;
        // The guest's view: every page, gref 0 included, in one mapping.
        // SAFETY: a fresh shared mapping of the whole memfd, unmapped on drop.
        let all = unsafe {
            let p = mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                memfd.as_fd(),
                0,
            )?;
            SharedPages::new(
                NonNull::new(p.as_ptr() as *mut u8).ok_or_else(|| anyhow!("null mapping"))?,
                len.get(),
                Box::new(|p, l| {
                    if let Some(p) = NonNull::new(p as *mut libc::c_void) {
                        let _ = munmap(p, l);
                    }
                }),
            )
        };
        Ok(GuestMemory { memfd, pages, all: Arc::new(all) })
    }

    /// All of the guest's pages, page N at N * PAGE_SIZE.
    pub fn pages(&self) -> &Arc<SharedPages> {
        &self.all
    }

    /// How many pages it has.
    pub fn len(&self) -> u32 {
        self.pages
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// The memfd, to hand to the loopback hypervisor.
    pub fn fd(&self) -> RawFd {
        self.memfd.as_raw_fd()
    }
}

impl GrantMapper for GuestMemory {
    fn map(&self, _domid: DomId, grefs: &[u32]) -> Result<SharedPages, HypervisorError> {
        map_grefs(&self.memfd, self.pages, grefs)
    }
}

/// An event channel that only counts the interrupts raised through it.
#[derive(Default)]
pub struct CountingChannel {
    pub notified: AtomicU64,
}

impl EventChannel for CountingChannel {
    fn notify(&self) -> bool {
        self.notified.fetch_add(1, Ordering::Relaxed);
        true
    }
    fn fd(&self) -> RawFd {
        -1
    }
    fn consume(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapping_sees_what_the_guest_writes_and_ungranted_pages_are_refused() {
        let mem = GuestMemory::new(8).unwrap();
        mem.pages().copy_in(3 * PAGE_SIZE + 10, b"hello");
        let m = mem.map(1, &[5, 3]).unwrap();
        let mut got = [0u8; 5];
        assert!(m.copy_out(PAGE_SIZE + 10, &mut got));
        assert_eq!(&got, b"hello");
        m.copy_in(0, b"back");
        let mut seen = [0u8; 4];
        assert!(mem.pages().copy_out(5 * PAGE_SIZE, &mut seen));
        assert_eq!(&seen, b"back");
        for bad in [&[0u32][..], &[8], &[], &[2, 9]] {
            assert!(mem.map(1, bad).is_err(), "{bad:?} mapped");
        }
    }
}
