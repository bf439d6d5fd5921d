//! Byte layouts of requests, responses, events, the shared rings and the
//! buffer's page directory. All little endian, as on every Xen architecture.

use super::{evt, op};

/// Xen page size; grants, rings and the event page are one page each.
pub const PAGE_SIZE: usize = 4096;
/// Every request, response and event is 64 bytes.
pub const MSG_SIZE: usize = 64;

/// Shared request ring (`struct xen_sndif_sring`): header of four indices,
/// padding to 64 bytes, then `REQ_RING_SIZE` entries of 64 bytes.
pub mod sring {
    pub const REQ_PROD: usize = 0;
    pub const REQ_EVENT: usize = 4;
    pub const RSP_PROD: usize = 8;
    pub const RSP_EVENT: usize = 12;
    pub const ENTRIES: usize = 64;
}
/// Entries in the request ring: (4096 - 64) / 64 = 63, rounded down to a power of two.
pub const REQ_RING_SIZE: u32 = 32;

/// Event page (`struct xensnd_event_page`): `in_cons`, `in_prod`, then events.
pub mod evt_page {
    pub const IN_CONS: usize = 0;
    pub const IN_PROD: usize = 4;
    pub const ENTRIES: usize = 64;
}
/// Events in the event page: (4096 - 64) / 64 = 63; indices are taken modulo 63.
pub const EVT_RING_LEN: u32 = ((PAGE_SIZE - evt_page::ENTRIES) / MSG_SIZE) as u32;

/// Byte offset in the event page of event number `idx`.
pub fn evt_slot_offset(idx: u32) -> usize {
    evt_page::ENTRIES + (idx % EVT_RING_LEN) as usize * MSG_SIZE
}

/// Byte offset in the request ring page of slot `idx`.
pub fn ring_slot_offset(idx: u32) -> usize {
    sring::ENTRIES + (idx & (REQ_RING_SIZE - 1)) as usize * MSG_SIZE
}

/// Grant references per directory page: one `next` gref, then the entries.
pub const GREFS_PER_DIR_PAGE: usize = (PAGE_SIZE - 4) / 4;

/// Number of buffer pages for `buffer_sz` bytes: ceil(buffer_sz / 4096).
pub fn pages_for(buffer_sz: u32) -> usize {
    (buffer_sz as usize).div_ceil(PAGE_SIZE)
}

/// Why a buffer's page directory cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryError {
    /// A directory page's gref was seen before in this chain.
    Loops { gref: u32 },
    /// The chain ends (next = 0) before it listed every buffer page.
    TooShort { listed: usize, needed: usize },
    /// The page that lists the last buffer page names a next one.
    TooLong,
    /// A directory page could not be read (not granted, not mappable).
    Unreadable { gref: u32, why: String },
}

impl std::fmt::Display for DirectoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Loops { gref } => write!(f, "page directory loops (gref {gref} twice)"),
            Self::TooShort { listed, needed } => {
                write!(f, "page directory shorter than the buffer ({listed} of {needed} pages)")
            }
            Self::TooLong => write!(f, "page directory longer than the buffer"),
            Self::Unreadable { gref, why } => write!(f, "directory page {gref}: {why}"),
        }
    }
}

impl std::error::Error for DirectoryError {}

/// Follows a buffer's page directory (`struct xensnd_page_directory`: a
/// `next` gref, then grefs) from the page `first` and collects exactly
/// `count` buffer grefs. `read_page(gref)` copies one directory page out of
/// the guest's memory, once: the walk only ever looks at that copy. Chains
/// that loop, end early, or go on past the last buffer page are refused;
/// at most `count.div_ceil(GREFS_PER_DIR_PAGE)` pages are read, whatever
/// the guest wrote.
pub fn walk_directory<E: std::fmt::Display>(
    first: u32,
    count: usize,
    mut read_page: impl FnMut(u32) -> Result<[u8; PAGE_SIZE], E>,
) -> Result<Vec<u32>, DirectoryError> {
    let pages = count.div_ceil(GREFS_PER_DIR_PAGE);
    let mut grefs = Vec::with_capacity(count);
    let mut seen = Vec::with_capacity(pages);
    let mut dir = first;
    for _ in 0..pages {
        if seen.contains(&dir) {
            return Err(DirectoryError::Loops { gref: dir });
        }
        seen.push(dir);
        let raw = read_page(dir).map_err(|e| DirectoryError::Unreadable { gref: dir, why: e.to_string() })?;
        let word =
            |i: usize| u32::from_le_bytes([raw[i * 4], raw[i * 4 + 1], raw[i * 4 + 2], raw[i * 4 + 3]]);
        let next = word(0);
        let take = GREFS_PER_DIR_PAGE.min(count - grefs.len());
        grefs.extend((1..=take).map(word));
        if grefs.len() == count {
            return if next == 0 { Ok(grefs) } else { Err(DirectoryError::TooLong) };
        }
        if next == 0 {
            break;
        }
        dir = next;
    }
    Err(DirectoryError::TooShort { listed: grefs.len(), needed: count })
}

fn u16_at(b: &[u8; MSG_SIZE], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8; MSG_SIZE], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn put_u32(b: &mut [u8; MSG_SIZE], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Offsets of the request fields (`struct xensnd_req`): id, operation, then the
/// operation's payload from byte 8.
pub mod req {
    pub const ID: usize = 0;
    pub const OPERATION: usize = 2;
    pub const PAYLOAD: usize = 8;
    pub const OPEN_RATE: usize = 8;
    pub const OPEN_FORMAT: usize = 12;
    pub const OPEN_CHANNELS: usize = 13;
    pub const OPEN_BUFFER_SZ: usize = 16;
    pub const OPEN_GREF_DIR: usize = 20;
    pub const OPEN_PERIOD_SZ: usize = 24;
    pub const RW_OFFSET: usize = 8;
    pub const RW_LENGTH: usize = 12;
    pub const TRIGGER_TYPE: usize = 8;
}

/// Offsets in responses (`struct xensnd_resp`).
pub mod resp {
    pub const ID: usize = 0;
    pub const OPERATION: usize = 2;
    pub const STATUS: usize = 4;
    pub const HW_PARAM: usize = 8;
}

/// Offsets in events (`struct xensnd_evt`).
pub mod event {
    pub const ID: usize = 0;
    pub const TYPE: usize = 2;
    pub const CUR_POS_POSITION: usize = 8;
    /// Delay extension: u32 frames in what sndif.h calls reserved bytes 16..19.
    pub const CUR_POS_DELAY: usize = 16;
}

/// OPEN payload (`struct xensnd_open_req`). `format` is the raw byte: the
/// guest may send any value and validation belongs to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenReq {
    pub rate: u32,
    pub format: u8,
    pub channels: u8,
    pub buffer_sz: u32,
    pub gref_directory: u32,
    pub period_sz: u32,
}

/// Payload of READ/WRITE and of the volume/mute requests (`struct xensnd_rw_req`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RwReq {
    pub offset: u32,
    pub length: u32,
}

/// `struct xensnd_query_hw_param`: a format mask and four [min, max] intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HwParam {
    pub formats: u64,
    pub rates: (u32, u32),
    pub channels: (u32, u32),
    pub buffer_frames: (u32, u32),
    pub period_frames: (u32, u32),
}

impl HwParam {
    pub const SIZE: usize = 40;

    fn decode(b: &[u8; MSG_SIZE], off: usize) -> HwParam {
        let pair = |o: usize| (u32_at(b, off + o), u32_at(b, off + o + 4));
        HwParam {
            formats: u32_at(b, off) as u64 | (u32_at(b, off + 4) as u64) << 32,
            rates: pair(8),
            channels: pair(16),
            buffer_frames: pair(24),
            period_frames: pair(32),
        }
    }

    fn encode(&self, b: &mut [u8; MSG_SIZE], off: usize) {
        put_u32(b, off, self.formats as u32);
        put_u32(b, off + 4, (self.formats >> 32) as u32);
        for (i, (lo, hi)) in
            [self.rates, self.channels, self.buffer_frames, self.period_frames].into_iter().enumerate()
        {
            put_u32(b, off + 8 + i * 8, lo);
            put_u32(b, off + 12 + i * 8, hi);
        }
    }
}

/// A decoded request. Decoding never fails: unknown opcodes become `Unknown`
/// and the handler answers them with an error status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Open(OpenReq),
    Close,
    Read(RwReq),
    Write(RwReq),
    SetVolume(RwReq),
    GetVolume(RwReq),
    Mute(RwReq),
    Unmute(RwReq),
    Trigger(u8),
    HwParamQuery(HwParam),
    Unknown(u8),
}

impl Request {
    /// Splits a 64-byte ring slot into (id, operation, request).
    pub fn decode(b: &[u8; MSG_SIZE]) -> (u16, u8, Request) {
        let id = u16_at(b, req::ID);
        let operation = b[req::OPERATION];
        let rw = RwReq { offset: u32_at(b, req::RW_OFFSET), length: u32_at(b, req::RW_LENGTH) };
        let r = match operation {
            op::OPEN => Request::Open(OpenReq {
                rate: u32_at(b, req::OPEN_RATE),
                format: b[req::OPEN_FORMAT],
                channels: b[req::OPEN_CHANNELS],
                buffer_sz: u32_at(b, req::OPEN_BUFFER_SZ),
                gref_directory: u32_at(b, req::OPEN_GREF_DIR),
                period_sz: u32_at(b, req::OPEN_PERIOD_SZ),
            }),
            op::CLOSE => Request::Close,
            op::READ => Request::Read(rw),
            op::WRITE => Request::Write(rw),
            op::SET_VOLUME => Request::SetVolume(rw),
            op::GET_VOLUME => Request::GetVolume(rw),
            op::MUTE => Request::Mute(rw),
            op::UNMUTE => Request::Unmute(rw),
            op::TRIGGER => Request::Trigger(b[req::TRIGGER_TYPE]),
            op::HW_PARAM_QUERY => Request::HwParamQuery(HwParam::decode(b, req::PAYLOAD)),
            other => Request::Unknown(other),
        };
        (id, operation, r)
    }

    /// Encodes a request as a frontend would (used by the simulated guest).
    pub fn encode(&self, id: u16) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        b[req::ID..req::ID + 2].copy_from_slice(&id.to_le_bytes());
        let rw = |b: &mut [u8; MSG_SIZE], r: &RwReq| {
            put_u32(b, req::RW_OFFSET, r.offset);
            put_u32(b, req::RW_LENGTH, r.length);
        };
        let operation = match self {
            Request::Open(o) => {
                put_u32(&mut b, req::OPEN_RATE, o.rate);
                b[req::OPEN_FORMAT] = o.format;
                b[req::OPEN_CHANNELS] = o.channels;
                put_u32(&mut b, req::OPEN_BUFFER_SZ, o.buffer_sz);
                put_u32(&mut b, req::OPEN_GREF_DIR, o.gref_directory);
                put_u32(&mut b, req::OPEN_PERIOD_SZ, o.period_sz);
                op::OPEN
            }
            Request::Close => op::CLOSE,
            Request::Read(r) => {
                rw(&mut b, r);
                op::READ
            }
            Request::Write(r) => {
                rw(&mut b, r);
                op::WRITE
            }
            Request::SetVolume(r) => {
                rw(&mut b, r);
                op::SET_VOLUME
            }
            Request::GetVolume(r) => {
                rw(&mut b, r);
                op::GET_VOLUME
            }
            Request::Mute(r) => {
                rw(&mut b, r);
                op::MUTE
            }
            Request::Unmute(r) => {
                rw(&mut b, r);
                op::UNMUTE
            }
            Request::Trigger(t) => {
                b[req::TRIGGER_TYPE] = *t;
                op::TRIGGER
            }
            Request::HwParamQuery(h) => {
                h.encode(&mut b, req::PAYLOAD);
                op::HW_PARAM_QUERY
            }
            Request::Unknown(o) => *o,
        };
        b[req::OPERATION] = operation;
        b
    }
}

/// A response: id and operation copied from the request, status 0 or -errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub id: u16,
    pub operation: u8,
    pub status: i32,
    pub hw_param: Option<HwParam>,
}

impl Response {
    pub fn encode(&self) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        b[resp::ID..resp::ID + 2].copy_from_slice(&self.id.to_le_bytes());
        b[resp::OPERATION] = self.operation;
        b[resp::STATUS..resp::STATUS + 4].copy_from_slice(&self.status.to_le_bytes());
        if let Some(h) = &self.hw_param {
            h.encode(&mut b, resp::HW_PARAM);
        }
        b
    }

    pub fn decode(b: &[u8; MSG_SIZE]) -> Response {
        let operation = b[resp::OPERATION];
        Response {
            id: u16_at(b, resp::ID),
            operation,
            status: u32_at(b, resp::STATUS) as i32,
            hw_param: (operation == op::HW_PARAM_QUERY).then(|| HwParam::decode(b, resp::HW_PARAM)),
        }
    }
}

/// Encodes a CUR_POS event. `delay_frames` is written only when the frontend
/// opted in to the delay extension; otherwise the reserved bytes stay zero.
pub fn encode_cur_pos(id: u16, position: u64, delay_frames: Option<u32>) -> [u8; MSG_SIZE] {
    let mut b = [0u8; MSG_SIZE];
    b[event::ID..event::ID + 2].copy_from_slice(&id.to_le_bytes());
    b[event::TYPE] = evt::CUR_POS;
    b[event::CUR_POS_POSITION..event::CUR_POS_POSITION + 8].copy_from_slice(&position.to_le_bytes());
    if let Some(d) = delay_frames {
        put_u32(&mut b, event::CUR_POS_DELAY, d);
    }
    b
}

/// A decoded CUR_POS event as the guest sees it: (id, type, position, delay field).
pub fn decode_event(b: &[u8; MSG_SIZE]) -> (u16, u8, u64, u32) {
    let mut pos = [0u8; 8];
    pos.copy_from_slice(&b[event::CUR_POS_POSITION..event::CUR_POS_POSITION + 8]);
    (u16_at(b, event::ID), b[event::TYPE], u64::from_le_bytes(pos), u32_at(b, event::CUR_POS_DELAY))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Directory pages by gref: (next, entries).
    fn dir_pages(pages: &[(u32, u32, Vec<u32>)]) -> HashMap<u32, [u8; PAGE_SIZE]> {
        let mut out = HashMap::new();
        for (gref, next, entries) in pages {
            let mut p = [0u8; PAGE_SIZE];
            p[..4].copy_from_slice(&next.to_le_bytes());
            for (i, e) in entries.iter().enumerate() {
                p[4 + i * 4..8 + i * 4].copy_from_slice(&e.to_le_bytes());
            }
            out.insert(*gref, p);
        }
        out
    }

    fn walk(
        pages: &HashMap<u32, [u8; PAGE_SIZE]>,
        first: u32,
        count: usize,
    ) -> Result<Vec<u32>, DirectoryError> {
        walk_directory(first, count, |g| pages.get(&g).copied().ok_or("not granted"))
    }

    #[test]
    fn directory_walks() {
        let full: Vec<u32> = (100..100 + GREFS_PER_DIR_PAGE as u32).collect();
        let two = dir_pages(&[(1, 2, full.clone()), (2, 0, vec![7, 8])]);
        let got = walk(&two, 1, GREFS_PER_DIR_PAGE + 2).unwrap();
        assert_eq!((got.len(), got[0], got[GREFS_PER_DIR_PAGE + 1]), (GREFS_PER_DIR_PAGE + 2, 100, 8));
        // The second page ends the chain but the buffer needs a third.
        let (n, more) = (2 * GREFS_PER_DIR_PAGE, 2 * GREFS_PER_DIR_PAGE + 1);
        assert_eq!(walk(&two, 1, more), Err(DirectoryError::TooShort { listed: n, needed: more }));
        // The first page names a next one, but it already held every page.
        assert_eq!(walk(&two, 1, 5), Err(DirectoryError::TooLong));
        let looped = dir_pages(&[(1, 2, full.clone()), (2, 1, full.clone())]);
        assert_eq!(walk(&looped, 1, 3 * GREFS_PER_DIR_PAGE), Err(DirectoryError::Loops { gref: 1 }));
        let dangling = dir_pages(&[(1, 9, full)]);
        assert!(matches!(
            walk(&dangling, 1, 2 * GREFS_PER_DIR_PAGE),
            Err(DirectoryError::Unreadable { gref: 9, .. })
        ));
        // No pages asked for: nothing is read.
        assert_eq!(
            walk_directory(1, 0, |_| Err::<[u8; PAGE_SIZE], _>("read")),
            Err(DirectoryError::TooShort { listed: 0, needed: 0 })
        );
    }

    #[test]
    fn ring_geometry() {
        assert_eq!(REQ_RING_SIZE, 32);
        assert_eq!(EVT_RING_LEN, 63);
        assert_eq!(ring_slot_offset(0), 64);
        assert_eq!(ring_slot_offset(33), 64 + 64);
        assert_eq!(evt_slot_offset(63), 64);
        assert_eq!(evt_slot_offset(62), 64 + 62 * 64);
        assert_eq!(GREFS_PER_DIR_PAGE, 1023);
        assert_eq!(pages_for(65536), 16);
        assert_eq!(pages_for(1), 1);
        assert_eq!(pages_for(0), 0);
    }

    #[test]
    fn requests_round_trip() {
        let all = [
            Request::Open(OpenReq {
                rate: 48000,
                format: 2,
                channels: 2,
                buffer_sz: 65536,
                gref_directory: 77,
                period_sz: 4096,
            }),
            Request::Close,
            Request::Read(RwReq { offset: 1, length: 2 }),
            Request::Write(RwReq { offset: 4096, length: 1024 }),
            Request::SetVolume(RwReq { offset: 0, length: 8 }),
            Request::GetVolume(RwReq { offset: 0, length: 8 }),
            Request::Mute(RwReq { offset: 0, length: 2 }),
            Request::Unmute(RwReq { offset: 0, length: 2 }),
            Request::Trigger(3),
            Request::HwParamQuery(HwParam {
                formats: 0x1_0000_0004,
                rates: (8000, 192000),
                channels: (1, 8),
                buffer_frames: (64, 65536),
                period_frames: (32, 32768),
            }),
            Request::Unknown(200),
        ];
        for (i, r) in all.iter().enumerate() {
            let bytes = r.encode(i as u16 + 1000);
            let (id, _, back) = Request::decode(&bytes);
            assert_eq!(id, i as u16 + 1000);
            assert_eq!(&back, r);
        }
    }

    #[test]
    fn responses_round_trip() {
        let r = Response {
            id: 7,
            operation: op::HW_PARAM_QUERY,
            status: -22,
            hw_param: Some(HwParam { formats: 4, rates: (1, 2), ..Default::default() }),
        };
        assert_eq!(Response::decode(&r.encode()), r);
        let w = Response { id: 65535, operation: op::WRITE, status: 0, hw_param: None };
        assert_eq!(Response::decode(&w.encode()), w);
    }

    #[test]
    fn cur_pos_keeps_reserved_bytes_zero_without_opt_in() {
        let b = encode_cur_pos(5, 0x1_2345_6789, None);
        assert!(b[16..].iter().all(|x| *x == 0));
        assert_eq!(decode_event(&b), (5, evt::CUR_POS, 0x1_2345_6789, 0));
        let d = encode_cur_pos(6, 10, Some(480));
        assert_eq!(decode_event(&d).3, 480);
        assert!(d[20..].iter().all(|x| *x == 0));
    }
}
