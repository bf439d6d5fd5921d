//! The backend's side of the request ring (`xen_sndif` back ring).
//!
//! The guest owns `req_prod`; it is read once per pass and checked before use:
//! a producer claiming more outstanding requests than the ring holds is a
//! broken or hostile frontend, and the ring is no longer served.

#![forbid(unsafe_code)]

use crate::sndif::wire::{ring_slot_offset, sring, MSG_SIZE};
use crate::sndif::REQ_RING_SIZE;
use crate::xen::SharedPages;
use std::sync::atomic::{fence, Ordering};

pub struct BackRing {
    page: SharedPages,
    req_cons: u32,
    rsp_prod_pvt: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub struct RingOverflow {
    pub req_prod: u32,
    pub req_cons: u32,
}

impl BackRing {
    /// Starts serving at the indices the frontend initialised.
    pub fn new(page: SharedPages) -> BackRing {
        let rsp = page.load_u32(sring::RSP_PROD);
        BackRing { page, req_cons: rsp, rsp_prod_pvt: rsp }
    }

    /// Takes the requests published so far (at most one ring's worth).
    pub fn take_requests(&mut self, out: &mut Vec<[u8; MSG_SIZE]>) -> Result<(), RingOverflow> {
        let prod = self.page.load_u32(sring::REQ_PROD);
        let pending = prod.wrapping_sub(self.req_cons);
        // Requests may only occupy slots whose responses were consumed.
        let in_flight = self.req_cons.wrapping_sub(self.rsp_prod_pvt);
        if pending > REQ_RING_SIZE || pending.wrapping_add(in_flight) > REQ_RING_SIZE {
            return Err(RingOverflow { req_prod: prod, req_cons: self.req_cons });
        }
        while self.req_cons != prod {
            out.push(self.page.read_msg(ring_slot_offset(self.req_cons)));
            self.req_cons = self.req_cons.wrapping_add(1);
        }
        Ok(())
    }

    pub fn push_response(&mut self, msg: &[u8; MSG_SIZE]) {
        self.page.write_msg(ring_slot_offset(self.rsp_prod_pvt), msg);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    /// Publishes responses; true when the frontend asked to be notified
    /// (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY).
    pub fn publish_responses(&mut self) -> bool {
        let old = self.page.load_u32(sring::RSP_PROD);
        let new = self.rsp_prod_pvt;
        self.page.store_u32(sring::RSP_PROD, new);
        fence(Ordering::SeqCst);
        let event = self.page.load_u32(sring::RSP_EVENT);
        new.wrapping_sub(event) < new.wrapping_sub(old)
    }

    /// Re-arms `req_event` and reports whether more requests raced in
    /// (RING_FINAL_CHECK_FOR_REQUESTS).
    pub fn final_check(&mut self) -> bool {
        self.page.store_u32(sring::REQ_EVENT, self.req_cons.wrapping_add(1));
        fence(Ordering::SeqCst);
        self.page.load_u32(sring::REQ_PROD) != self.req_cons
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sndif::{Request, Response};
    use crate::xen::shared::test_pages;

    #[test]
    fn requests_in_responses_out() {
        let page = test_pages(4096);
        let mut ring = BackRing::new(page);
        for i in 0..3u32 {
            ring.page.write_msg(ring_slot_offset(i), &Request::Close.encode(i as u16));
        }
        ring.page.store_u32(sring::REQ_PROD, 3);
        ring.page.store_u32(sring::RSP_EVENT, 1);
        let mut v = Vec::new();
        ring.take_requests(&mut v).unwrap();
        assert_eq!(v.len(), 3);
        for m in &v {
            let (id, op, _) = Request::decode(m);
            ring.push_response(&Response { id, operation: op, status: 0, hw_param: None }.encode());
        }
        assert!(ring.publish_responses());
        assert_eq!(ring.page.load_u32(sring::RSP_PROD), 3);
        assert!(!ring.final_check());
        assert_eq!(ring.page.load_u32(sring::REQ_EVENT), 4);
    }

    #[test]
    fn overflowing_producer_is_refused() {
        let mut ring = BackRing::new(test_pages(4096));
        ring.page.store_u32(sring::REQ_PROD, REQ_RING_SIZE + 1);
        let mut v = Vec::new();
        assert!(ring.take_requests(&mut v).is_err());
        assert!(v.is_empty());
        ring.page.store_u32(sring::REQ_PROD, u32::MAX);
        assert!(ring.take_requests(&mut v).is_err());
    }
}
