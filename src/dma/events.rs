//! The producer side of the event page. Only the host cycle writes events,
//! so the producer index lives here, never re-read from shared memory; the
//! guest's `in_cons` is read once per push. Event ids run on for the life of
//! the event channel, across OPENs: the upstream frontend resets its expected
//! id only when the channel is set up, and skips every event that does not
//! carry exactly the id it expects.

use crate::sndif::wire::{encode_cur_pos, evt_page, evt_slot_offset};
use crate::sndif::EVT_RING_LEN;
use crate::xen::SharedPages;
use std::sync::atomic::{AtomicU16, Ordering::Relaxed};
use std::sync::Arc;

pub struct EventRing {
    page: Arc<SharedPages>,
    prod: u32,
    /// The channel's next event id, shared with the stream's later opens.
    next_id: Arc<AtomicU16>,
}

impl EventRing {
    /// Takes over the page; the producer index continues from the page and
    /// the ids from `next_id` (0 when the channel was connected).
    pub fn new(page: Arc<SharedPages>, next_id: Arc<AtomicU16>) -> EventRing {
        let prod = page.load_u32(evt_page::IN_PROD);
        EventRing { page, prod, next_id }
    }

    /// Pushes one CUR_POS; false when the guest's ring is full (or its
    /// `in_cons` is nonsense), in which case nothing is written.
    pub fn push_cur_pos(&mut self, position: u64, delay: Option<u32>) -> bool {
        let cons = self.page.load_u32(evt_page::IN_CONS);
        if self.prod.wrapping_sub(cons) >= EVT_RING_LEN {
            return false;
        }
        // Only the host cycle of the one open stream pushes: load + store
        // need no read-modify-write.
        let id = self.next_id.load(Relaxed);
        let msg = encode_cur_pos(id, position, delay);
        self.page.write_msg(evt_slot_offset(self.prod), &msg);
        self.prod = self.prod.wrapping_add(1);
        self.page.store_u32(evt_page::IN_PROD, self.prod);
        self.next_id.store(id.wrapping_add(1), Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sndif::wire::decode_event;
    use crate::xen::shared::test_pages;

    #[test]
    fn ids_are_consecutive_and_a_full_ring_drops() {
        let page = Arc::new(test_pages(4096));
        let ids = Arc::new(AtomicU16::new(0));
        let mut r = EventRing::new(page.clone(), ids.clone());
        for i in 0..EVT_RING_LEN {
            assert!(r.push_cur_pos(i as u64 * 10, None));
        }
        assert!(!r.push_cur_pos(0, None), "ring full");
        page.store_u32(evt_page::IN_CONS, 10);
        assert!(r.push_cur_pos(999, None));
        let (id, _, pos, _) = decode_event(&page.read_msg(evt_slot_offset(EVT_RING_LEN)));
        assert_eq!((id, pos), (EVT_RING_LEN as u16, 999));
        // A hostile in_cons "ahead" of prod counts as full, never as space.
        page.store_u32(evt_page::IN_CONS, 1_000_000);
        assert!(!r.push_cur_pos(1, None));
        // A later OPEN on the same channel continues the ids.
        let mut again = EventRing::new(page.clone(), ids.clone());
        page.store_u32(evt_page::IN_CONS, again.prod);
        assert!(again.push_cur_pos(5, None));
        let (id, _, _, _) = decode_event(&page.read_msg(evt_slot_offset(again.prod.wrapping_sub(1))));
        assert_eq!(id, EVT_RING_LEN as u16 + 1);
    }
}
