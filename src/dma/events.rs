//! The producer side of the event page. Only the host cycle writes events,
//! so the producer index lives here (and, between OPENs, in the stream's
//! `EventIndex`), never re-read from shared memory; the guest's `in_cons` is
//! read once per push.
//!
//! Event ids: a frontend skips, without a word, every event whose id is not
//! the one it expects, and the two generations of Linux's `snd_xen_front`
//! expect different ones (docs/protocol.md):
//! - 4.18 to 7.1 count the id from 0 when the channel is set up and never
//!   reset it: the expected id is the slot index.
//! - 7.2 and later reset it to 0 at every stream clear (with `in_cons` set
//!   to `in_prod`), the last of which comes just before OPEN: the expected
//!   id is the slot index minus the producer index at OPEN (`base`).
//!
//! Both agree when `base` is a multiple of 65536 (ids are 16 bits). When
//! they do not, each position goes out as twins: two consecutive slots with
//! the same payload, the first with the slot index as id (only the older
//! frontend takes it), the second with slot − base (only the newer one takes
//! it). Each frontend takes exactly one of the pair and skips the other, so
//! neither needs to know which kernel it faces; a frontend that ignores ids
//! sees the same position twice, which moves nothing.

#![forbid(unsafe_code)]

use crate::sndif::wire::{encode_cur_pos, evt_page, evt_slot_offset};
use crate::sndif::EVT_RING_LEN;
use crate::xen::SharedPages;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;

/// The backend's producer index of one event channel, kept across the
/// stream's OPENs for the life of the connection (0 when the channel is
/// connected: the frontend hands over a zeroed page).
pub type EventIndex = Arc<AtomicU32>;

pub struct EventRing {
    page: Arc<SharedPages>,
    prod: u32,
    /// The producer index when this OPEN was accepted.
    base: u32,
    /// Where `prod` is kept for the next OPEN on the channel.
    saved: EventIndex,
}

impl EventRing {
    /// Takes over the page at an accepted OPEN; the producer index continues
    /// from `saved`.
    pub fn new(page: Arc<SharedPages>, saved: EventIndex) -> EventRing {
        let prod = saved.load(Relaxed);
        EventRing { page, prod, base: prod, saved }
    }

    /// Whether each position needs a twin (see the module comment).
    fn twins(&self) -> bool {
        self.base % 65536 != 0
    }

    /// Pushes one CUR_POS (as twins when needed), publishes `in_prod` once
    /// for all its slots; false when the guest's ring has no room for them
    /// (or its `in_cons` is nonsense), in which case nothing is written.
    pub fn push_cur_pos(&mut self, position: u64, delay: Option<u32>) -> bool {
        let slots = if self.twins() { 2 } else { 1 };
        let cons = self.page.load_u32(evt_page::IN_CONS);
        if self.prod.wrapping_sub(cons) > EVT_RING_LEN - slots {
            return false;
        }
        // Slot index: what 4.18-7.1 expect.
        let msg = encode_cur_pos(self.prod as u16, position, delay);
        self.page.write_msg(evt_slot_offset(self.prod), &msg);
        self.prod = self.prod.wrapping_add(1);
        if slots == 2 {
            // Slot index since OPEN: what 7.2 expects.
            let id = self.prod.wrapping_sub(self.base) as u16;
            self.page.write_msg(evt_slot_offset(self.prod), &encode_cur_pos(id, position, delay));
            self.prod = self.prod.wrapping_add(1);
        }
        self.page.store_u32(evt_page::IN_PROD, self.prod);
        self.saved.store(self.prod, Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sndif::wire::decode_event;
    use crate::xen::shared::test_pages;

    /// A frontend's event consumer: `reset_at_open` is 7.2's (expected id 0
    /// and in_cons = in_prod at the clear before OPEN), otherwise 4.18-7.1's
    /// (expected id counted from the channel's setup). Returns the positions
    /// it accepted and the slots it skipped.
    struct Front {
        reset_at_open: bool,
        expected: u16,
        cons: u32,
        taken: Vec<u64>,
        skipped: u32,
    }

    impl Front {
        fn new(reset_at_open: bool) -> Front {
            Front { reset_at_open, expected: 0, cons: 0, taken: Vec::new(), skipped: 0 }
        }
        fn clear_before_open(&mut self, page: &SharedPages) {
            if self.reset_at_open {
                self.expected = 0;
                self.cons = page.load_u32(evt_page::IN_PROD);
                page.store_u32(evt_page::IN_CONS, self.cons);
            }
        }
        fn consume(&mut self, page: &SharedPages) {
            let prod = page.load_u32(evt_page::IN_PROD);
            while self.cons != prod {
                let (id, _, pos, _) = decode_event(&page.read_msg(evt_slot_offset(self.cons)));
                self.cons = self.cons.wrapping_add(1);
                let expected = self.expected;
                self.expected = self.expected.wrapping_add(1);
                if id == expected {
                    self.taken.push(pos);
                } else {
                    self.skipped += 1;
                }
            }
            page.store_u32(evt_page::IN_CONS, self.cons);
        }
    }

    /// Three OPENs on one connection with `per_open` positions each; every
    /// frontend generation must take every position exactly once.
    fn plays(reset_at_open: bool, per_open: u64) -> Front {
        let page = Arc::new(test_pages(4096));
        let index = EventIndex::default();
        let mut front = Front::new(reset_at_open);
        for open in 0..3u64 {
            front.clear_before_open(&page);
            let mut ring = EventRing::new(page.clone(), index.clone());
            for i in 1..=per_open {
                assert!(ring.push_cur_pos(open * 1000 + i, None), "room: the front consumes");
                front.consume(&page);
            }
        }
        let want: Vec<u64> = (0..3).flat_map(|o| (1..=per_open).map(move |i| o * 1000 + i)).collect();
        assert_eq!(front.taken, want, "reset_at_open {reset_at_open}");
        front
    }

    #[test]
    fn both_frontend_generations_take_every_position_once() {
        for reset_at_open in [false, true] {
            let f = plays(reset_at_open, 10);
            // The first OPEN is at slot 0: no twins; the later two are.
            assert_eq!(f.skipped, 20, "reset_at_open {reset_at_open}");
        }
    }

    #[test]
    fn ids_wrap_at_16_bits_for_both_generations() {
        // 40000 positions per OPEN: the second OPEN starts past 65536.
        for reset_at_open in [false, true] {
            plays(reset_at_open, 40000);
        }
    }

    #[test]
    fn an_open_at_a_multiple_of_65536_sends_single_events() {
        let page = Arc::new(test_pages(4096));
        let index = EventIndex::new(AtomicU32::new(65536 * 3));
        page.store_u32(evt_page::IN_CONS, 65536 * 3);
        let mut ring = EventRing::new(page.clone(), index.clone());
        assert!(ring.push_cur_pos(7, None));
        assert_eq!(index.load(Relaxed), 65536 * 3 + 1);
        let (id, _, pos, _) = decode_event(&page.read_msg(evt_slot_offset(65536 * 3)));
        assert_eq!((id, pos), (0, 7));
    }

    #[test]
    fn a_full_ring_drops_whole_pairs_and_hostile_cons_is_no_room() {
        let page = Arc::new(test_pages(4096));
        let index = EventIndex::new(AtomicU32::new(5));
        page.store_u32(evt_page::IN_CONS, 5);
        let mut r = EventRing::new(page.clone(), index.clone());
        for i in 0..EVT_RING_LEN / 2 {
            assert!(r.push_cur_pos(i as u64, None));
        }
        // One slot is left, a pair needs two: nothing is written.
        assert_eq!(index.load(Relaxed), 5 + EVT_RING_LEN - 1);
        assert!(!r.push_cur_pos(99, None));
        assert_eq!(page.load_u32(evt_page::IN_PROD), 5 + EVT_RING_LEN - 1);
        page.store_u32(evt_page::IN_CONS, 7);
        assert!(r.push_cur_pos(99, None));
        // A hostile in_cons "ahead" of prod counts as full, never as space.
        page.store_u32(evt_page::IN_CONS, 1_000_000);
        assert!(!r.push_cur_pos(1, None));
    }
}
