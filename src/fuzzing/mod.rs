//! The bodies of the fuzz targets (tests/fuzz runs them under libFuzzer,
//! `./scripts/fuzz`), here in the library so that the ordinary test suite
//! replays the committed corpus and every input that ever failed
//! (tests/fuzz_corpus.rs). Each takes any bytes; a panic is a finding.
//! Not for the daemon: nothing in it runs outside a fuzzer or a test.

#![forbid(unsafe_code)]

mod stream;

pub use stream::stream;

use crate::policy::Policy;
use crate::sndif::config::{example::MapSource, limits, parse_card};
use crate::sndif::format::parse_format_list;
use crate::sndif::wire::{decode_event, Request, Response, MSG_SIZE};
use crate::sndif::wire::{walk_directory, GREFS_PER_DIR_PAGE, PAGE_SIZE};
use std::collections::BTreeMap;

/// Every 64-byte message decoder: requests (as the backend reads them from
/// the ring), responses and events (as a frontend reads them). None may
/// panic, and a request the backend understands survives encode + decode.
pub fn request(data: &[u8]) {
    let mut b = [0u8; MSG_SIZE];
    let n = data.len().min(MSG_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    let (id, operation, req) = Request::decode(&b);
    if !matches!(req, Request::Unknown(_)) {
        let again = Request::decode(&req.encode(id));
        assert_eq!(again, (id, operation, req), "encode/decode differ");
    }
    let _ = Response::decode(&b);
    let _ = decode_event(&b);
}

/// The buffer's page directory walk: the input is the page count asked for,
/// the first directory gref, and the pages the guest granted (gref i+1 is
/// the i-th 4 KiB of the rest). A walk never reads more pages than the
/// buffer needs directory pages, and a walk that succeeds lists exactly the
/// buffer's pages, as the pages said.
pub fn directory(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    // Up to 3 directory pages' worth of buffer pages.
    let count = usize::from(u16::from_le_bytes([data[0], data[1]])) % (3 * GREFS_PER_DIR_PAGE + 2);
    let first = u32::from(data[2] % 8);
    let pages: Vec<[u8; PAGE_SIZE]> = data[3..]
        .chunks(PAGE_SIZE)
        .map(|c| {
            let mut p = [0u8; PAGE_SIZE];
            p[..c.len()].copy_from_slice(c);
            p
        })
        .collect();
    let mut reads = 0;
    let r = walk_directory(first, count, |gref| {
        reads += 1;
        let i = (gref as usize).checked_sub(1).ok_or("gref 0")?;
        pages.get(i).copied().ok_or("not granted")
    });
    assert!(reads <= count.div_ceil(GREFS_PER_DIR_PAGE), "read {reads} pages for {count}");
    if let Ok(grefs) = r {
        assert_eq!(grefs.len(), count);
    }
}

/// The card configuration in the frontend's xenstore directory (which the
/// guest can write): the input is `key=value` lines. Parsing never panics,
/// and a card it accepts is within the limits the backend relies on.
pub fn card_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = parse_format_list(&text);
    let map: BTreeMap<String, String> =
        text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let Ok(card) = parse_card(&MapSource(map)) else { return };
    assert!(card.pcms.len() <= limits::MAX_PCMS);
    for (_, s) in card.streams() {
        let p = &s.params;
        assert!(!p.rates.is_empty() && !p.formats.is_empty());
        assert!(
            1 <= p.channels_min && p.channels_min <= p.channels_max && p.channels_max <= limits::MAX_CHANNELS
        );
        assert!(p.rates.iter().all(|r| (limits::MIN_RATE..=limits::MAX_RATE).contains(r)));
        assert!(p.buffer_size > 0 && p.buffer_size <= limits::MAX_BUFFER_SIZE);
        assert!(s.unique_id.chars().count() <= limits::MAX_NAME_LEN);
    }
}

/// dom0's policy file (TOML): any text either parses into a policy or is
/// refused with an error, never a panic.
pub fn policy(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(p) = Policy::parse(text, None) {
            let _ = p.for_vm(Some("vm"));
            let _ = p.for_vm(None);
        }
    }
}
