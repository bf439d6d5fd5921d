//! One guest stream, whole: the request ring, the stream's state machine,
//! its DMA engine run by host cycles, the event page, the buffer and its
//! page directory, all in one guest memory whose every byte the input may
//! change between steps, as a hostile guest can. The backend side is the
//! daemon's own code (`BackRing`, `PcmStream`) on the null host.
//!
//! The input is a program, one step per leading byte:
//! - queue a request (the next 64 bytes; its operation folded onto the
//!   protocol's ten, sometimes an OPEN of a buffer the guest set up right);
//! - write up to 16 bytes anywhere in the guest's memory;
//! - set the ring's request producer to any value;
//! - serve the ring (as the stream's request thread does);
//! - run host cycles.
//!
//! Every request served gets one response, with the request's id, and a
//! status of 0 or a negative errno.

#![forbid(unsafe_code)]

use crate::backend::pcm::{PcmStream, StreamIdentity};
use crate::backend::registry::Registry;
use crate::backend::ring::BackRing;
use crate::host::null::NullHost;
use crate::policy::Policy;
use crate::sndif::config::{example::libxl_dump, parse_card};
use crate::sndif::op;
use crate::sndif::wire::{req, ring_slot_offset, sring, OpenReq, Request, MSG_SIZE};
use crate::sndif::{PcmFormat, PAGE_SIZE};
use crate::xen::memory::{CountingChannel, GuestMemory};
use crate::xen::GrantMapper;
use std::sync::Arc;

/// Guest pages: 1 the request ring, 2 the event page, 3 a directory that
/// lists 4.. (the buffer), 4 + BUFFER_PAGES.. spare.
const RING: u32 = 1;
const EVENTS: u32 = 2;
const DIRECTORY: u32 = 3;
const BUFFER_PAGES: u32 = 16;
const PAGES: u32 = 4 + BUFFER_PAGES + 4;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.byte()?;
        }
        Some(out)
    }
}

/// What one run reached: how many requests were answered, how many of them
/// with success, and how many interrupts the stream raised.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reached {
    pub answered: usize,
    pub succeeded: usize,
    pub interrupts: u64,
}

pub fn stream(data: &[u8]) {
    run(data);
}

/// Runs the program in `data`; what it reached.
pub fn run(data: &[u8]) -> Reached {
    let mut reached = Reached::default();
    let mut input = Input(data);
    let Some(flags) = input.byte() else { return reached };
    let mem = Arc::new(GuestMemory::new(PAGES).expect("guest memory"));
    let page = |n: u32| n as usize * PAGE_SIZE;
    // The directory the guest would write for a 64 KiB buffer.
    for i in 0..BUFFER_PAGES {
        mem.pages().copy_in(page(DIRECTORY) + 4 + i as usize * 4, &(4 + i).to_le_bytes());
    }
    let card = parse_card(&libxl_dump()).expect("the example card");
    let kind = usize::from(flags & 1);
    let ident = Arc::new(StreamIdentity {
        domid: 7,
        domain: "fuzz".into(),
        vm_name: Some("fuzz".into()),
        devid: 0,
        card_long_name: card.long_name.clone(),
        pcm_index: 0,
        pcm_name: card.pcms[0].name.clone(),
        cfg: card.pcms[0].streams[kind].clone(),
    });
    let host = Arc::new(NullHost::manual());
    let registry = Registry::with_policy(host.clone(), None, Policy::default());
    let evt_page = Arc::new(mem.map(7, &[EVENTS]).expect("event page"));
    let channel = Arc::new(CountingChannel::default());
    let mut stream = PcmStream::new(
        registry.register(ident),
        mem.clone(),
        host.clone(),
        evt_page,
        channel.clone(),
        flags & 2 != 0,
    );
    let mut ring = BackRing::new(mem.map(7, &[RING]).expect("ring page"));
    let mut req_prod = 0u32;
    let mut pending = Vec::new();
    while let Some(step) = input.byte() {
        match step % 5 {
            0 => {
                let Some(mut msg) = input.bytes::<MSG_SIZE>() else { break };
                msg[req::OPERATION] %= 10;
                if msg[req::OPERATION] == op::TRIGGER {
                    msg[req::TRIGGER_TYPE] %= 4;
                }
                if msg[req::OPERATION] == op::OPEN && msg[3] & 0x80 != 0 {
                    // An OPEN the guest set up right (byte 3 is padding in
                    // the protocol), at a rate and period the input picks.
                    let rate = [44100, 48000][usize::from(msg[8] & 1)];
                    let period_sz = u32::from(u16::from_le_bytes([msg[9], msg[10]])) * 4;
                    let id = u16::from_le_bytes([msg[0], msg[1]]);
                    msg = Request::Open(OpenReq {
                        rate,
                        format: PcmFormat::S16Le.wire(),
                        channels: 2,
                        buffer_sz: BUFFER_PAGES * PAGE_SIZE as u32,
                        gref_directory: DIRECTORY,
                        period_sz,
                    })
                    .encode(id);
                }
                mem.pages().copy_in(page(RING) + ring_slot_offset(req_prod), &msg);
                req_prod = req_prod.wrapping_add(1);
                mem.pages().store_u32(page(RING) + sring::REQ_PROD, req_prod);
            }
            1 => {
                let Some([a, b, c, len]) = input.bytes::<4>() else { break };
                let at = (usize::from(u16::from_le_bytes([a, b])) * 8 + usize::from(c)) % page(PAGES);
                let len = usize::from(len % 17).min(page(PAGES) - at);
                let Some(bytes) = input.bytes::<16>() else { break };
                mem.pages().copy_in(at, &bytes[..len]);
            }
            2 => {
                let Some(v) = input.bytes::<4>() else { break };
                req_prod = u32::from_le_bytes(v);
                mem.pages().store_u32(page(RING) + sring::REQ_PROD, req_prod);
            }
            3 => {
                pending.clear();
                if ring.take_requests(&mut pending).is_err() {
                    // The worker stops serving a ring that overflows.
                    break;
                }
                for msg in &pending {
                    let rsp = stream.handle(msg);
                    let (id, operation, _) = Request::decode(msg);
                    assert_eq!((rsp.id, rsp.operation), (id, operation), "answered another request");
                    assert!(rsp.status <= 0, "status {}", rsp.status);
                    reached.answered += 1;
                    reached.succeeded += usize::from(rsp.status == 0);
                    ring.push_response(&rsp.encode());
                }
                ring.publish_responses();
            }
            _ => {
                let Some(n) = input.byte() else { break };
                for _ in 0..n % 8 {
                    host.cycle();
                }
            }
        }
    }
    stream.close();
    reached.interrupts = channel.notified.load(std::sync::atomic::Ordering::Relaxed);
    reached
}

#[cfg(test)]
mod tests {
    /// The seed program (tests/fuzz/seeds/make.py) opens, starts, plays
    /// through cycles that raise interrupts, queries, sets the volume,
    /// stops and closes: the fuzzer starts from a stream that runs.
    #[test]
    fn the_seed_program_runs_a_stream() {
        let seed = include_bytes!("../../tests/fuzz/corpus/stream/seed-play");
        let r = super::run(seed);
        assert_eq!((r.answered, r.succeeded), (6, 6), "{r:?}");
        assert!(r.interrupts > 0, "{r:?}");
    }
}
