//! The producer side of the event page. Only the host cycle writes events,
//! so the producer index and the event id live here, never re-read from
//! shared memory; the guest's `in_cons` is read once per push.

use crate::sndif::wire::{encode_cur_pos, evt_page, evt_slot_offset};
use crate::sndif::EVT_RING_LEN;
use crate::xen::SharedPages;
use std::sync::Arc;

pub struct EventRing {
    page: Arc<SharedPages>,
    prod: u32,
    next_id: u16,
}

impl EventRing {
    /// Takes over the page with ids starting at 0, as the frontend expects
    /// after each OPEN. The producer index continues from the page.
    pub fn new(page: Arc<SharedPages>) -> EventRing {
        let prod = page.load_u32(evt_page::IN_PROD);
        EventRing { page, prod, next_id: 0 }
    }

    /// Pushes one CUR_POS; false when the guest's ring is full (or its
    /// `in_cons` is nonsense), in which case nothing is written.
    pub fn push_cur_pos(&mut self, position: u64, delay: Option<u32>) -> bool {
        let cons = self.page.load_u32(evt_page::IN_CONS);
        if self.prod.wrapping_sub(cons) >= EVT_RING_LEN {
            return false;
        }
        let msg = encode_cur_pos(self.next_id, position, delay);
        self.page.write_msg(evt_slot_offset(self.prod), &msg);
        self.prod = self.prod.wrapping_add(1);
        self.page.store_u32(evt_page::IN_PROD, self.prod);
        self.next_id = self.next_id.wrapping_add(1);
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
        let mut r = EventRing::new(page.clone());
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
    }
}
