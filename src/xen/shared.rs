//! Memory shared with a guest. The guest can change any byte at any time, so
//! nothing here hands out references into the mapping: values are copied out
//! (once) and copied in, with every range checked first.

use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};

type Release = Box<dyn FnOnce(*mut u8, usize) + Send + Sync>;

pub struct SharedPages {
    ptr: NonNull<u8>,
    len: usize,
    release: Option<Release>,
}

// SAFETY: the mapping is plain shared memory, accessed only through raw
// pointer copies and atomics; it stays mapped until `release` runs in Drop.
unsafe impl Send for SharedPages {}
unsafe impl Sync for SharedPages {}

impl SharedPages {
    /// # Safety
    /// `ptr..ptr+len` must be a readable and writable mapping, page aligned,
    /// that stays valid until `release(ptr, len)` is called.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize, release: Release) -> SharedPages {
        SharedPages { ptr, len, release: Some(release) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn in_range(&self, off: usize, n: usize) -> bool {
        off.checked_add(n).is_some_and(|end| end <= self.len)
    }

    fn atomic_u32(&self, off: usize) -> Option<&AtomicU32> {
        if off % 4 != 0 || !self.in_range(off, 4) {
            return None;
        }
        // SAFETY: in range, 4-byte aligned (the mapping is page aligned), and
        // AtomicU32 has the layout of u32; concurrent guest writes are atomic
        // word stores on every Xen architecture.
        Some(unsafe { &*(self.ptr.as_ptr().add(off) as *const AtomicU32) })
    }

    /// Reads a ring index the guest produces (acquire: the entries it
    /// published before are visible after this load). Out of range reads 0.
    pub fn load_u32(&self, off: usize) -> u32 {
        self.atomic_u32(off).map(|a| a.load(Ordering::Acquire)).unwrap_or(0)
    }

    /// Publishes a ring index (release: our entries are visible first).
    pub fn store_u32(&self, off: usize, v: u32) {
        if let Some(a) = self.atomic_u32(off) {
            a.store(v, Ordering::Release);
        }
    }

    /// Copies `dst.len()` bytes out from `off`; false (and nothing copied)
    /// when the range is outside the mapping.
    ///
    /// Another domain may write the same bytes at the same time, which a
    /// plain memcpy is allowed to assume does not happen (it may read a byte
    /// twice, or merge reads): every read of the mapping is a volatile
    /// access, aligned words where possible, as vm-memory does.
    pub fn copy_out(&self, off: usize, dst: &mut [u8]) -> bool {
        if !self.in_range(off, dst.len()) {
            return false;
        }
        // SAFETY: range checked; `src` is valid for reads of `dst.len()`
        // bytes for as long as `self` lives.
        let src = unsafe { self.ptr.as_ptr().add(off) };
        let head = src.align_offset(8).min(dst.len());
        let words = (dst.len() - head) / 8;
        for (i, b) in dst[..head].iter_mut().enumerate() {
            // SAFETY: in range (above).
            *b = unsafe { src.add(i).read_volatile() };
        }
        for (w, chunk) in dst[head..head + words * 8].chunks_exact_mut(8).enumerate() {
            // SAFETY: in range and 8-byte aligned (`head` aligned it).
            let v = unsafe { (src.add(head + w * 8) as *const u64).read_volatile() };
            chunk.copy_from_slice(&v.to_ne_bytes());
        }
        for (i, b) in dst.iter_mut().enumerate().skip(head + words * 8) {
            // SAFETY: in range.
            *b = unsafe { src.add(i).read_volatile() };
        }
        true
    }

    /// Copies `src` in at `off`; false when the range is outside the mapping.
    /// Every write to the mapping is volatile (see `copy_out`).
    pub fn copy_in(&self, off: usize, src: &[u8]) -> bool {
        if !self.in_range(off, src.len()) {
            return false;
        }
        // SAFETY: range checked; we never hold a reference into the mapping.
        let dst = unsafe { self.ptr.as_ptr().add(off) };
        let head = dst.align_offset(8).min(src.len());
        let words = (src.len() - head) / 8;
        for (i, b) in src[..head].iter().enumerate() {
            // SAFETY: in range.
            unsafe { dst.add(i).write_volatile(*b) };
        }
        for (w, chunk) in src[head..head + words * 8].chunks_exact(8).enumerate() {
            let v = u64::from_ne_bytes(chunk.try_into().unwrap_or_default());
            // SAFETY: in range and 8-byte aligned.
            unsafe { (dst.add(head + w * 8) as *mut u64).write_volatile(v) };
        }
        for (i, b) in src.iter().enumerate().skip(head + words * 8) {
            // SAFETY: in range.
            unsafe { dst.add(i).write_volatile(*b) };
        }
        true
    }

    /// Reads one 64-byte message slot.
    pub fn read_msg(&self, off: usize) -> [u8; 64] {
        let mut b = [0u8; 64];
        self.copy_out(off, &mut b);
        b
    }

    /// Writes one 64-byte message slot, ordered before a later `store_u32`.
    pub fn write_msg(&self, off: usize, msg: &[u8; 64]) {
        self.copy_in(off, msg);
        fence(Ordering::Release);
    }
}

impl Drop for SharedPages {
    fn drop(&mut self) {
        if let Some(r) = self.release.take() {
            r(self.ptr.as_ptr(), self.len);
        }
    }
}

impl std::fmt::Debug for SharedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedPages({} bytes)", self.len)
    }
}

/// Anonymous memory as SharedPages, for unit tests of the ring and DMA code.
#[cfg(test)]
pub fn test_pages(len: usize) -> SharedPages {
    let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).unwrap();
    // SAFETY: zeroed allocation of `len` bytes, freed by the release closure.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout);
        SharedPages::new(NonNull::new(p).unwrap(), len, Box::new(move |p, _| std::alloc::dealloc(p, layout)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        let p = test_pages(8192);
        let mut b = [0u8; 16];
        assert!(p.copy_in(8192 - 16, &[7u8; 16]));
        assert!(p.copy_out(8192 - 16, &mut b));
        assert_eq!(b, [7u8; 16]);
        assert!(!p.copy_out(8192 - 15, &mut b));
        assert!(!p.copy_in(usize::MAX - 4, &b));
        assert_eq!(p.load_u32(8192), 0);
        assert_eq!(p.load_u32(3), 0);
        p.store_u32(4, 99);
        assert_eq!(p.load_u32(4), 99);
    }

    /// The word-wise volatile copies give the same bytes as a plain copy,
    /// from and to every alignment and length around a word.
    #[test]
    fn volatile_copies_are_exact_at_any_alignment() {
        let p = test_pages(4096);
        let data: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for off in 0..9 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 200 - off] {
                p.copy_in(0, &[0u8; 256]);
                assert!(p.copy_in(off + 100, &data[off..off + len]));
                let mut back = vec![0u8; len + 2];
                assert!(p.copy_out(off + 99, &mut back));
                assert_eq!(back[0], 0, "off {off} len {len}: nothing before");
                assert_eq!(&back[1..=len], &data[off..off + len], "off {off} len {len}");
                assert_eq!(back[len + 1], 0, "off {off} len {len}: nothing after");
            }
        }
    }
}
