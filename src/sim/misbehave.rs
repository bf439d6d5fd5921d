//! Hostile-guest behaviours. Each does one bad thing to the playback stream
//! and records how the backend answered: an error status, or no answer at all
//! (the backend closed the stream).

#![forbid(unsafe_code)]

use super::{open_req, Guest, SimOptions};
use anyhow::Context;
use serde::Serialize;
use std::time::{Duration, Instant};
use xen_sndif::{trigger, HwParam, PcmFormat, Request, RwReq, REQ_RING_SIZE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Misbehave {
    /// req_prod claims far more requests than the ring holds.
    RingOverflow,
    /// WRITE with offset + length past buffer_sz.
    WritePastEnd,
    /// OPEN with buffer_sz above the card's xenstore buffer-size.
    BufferTooBig,
    /// Page directory chain ends before all buffer pages are listed.
    DirShort,
    /// Page directory chain continues after all buffer pages are listed.
    DirLong,
    /// Page directory chain points back to itself.
    DirLoop,
    /// Buffer grant references that were never granted.
    BadGref,
    /// A request with an opcode that does not exist.
    UnknownOp,
    /// TRIGGER START before any OPEN.
    TriggerBeforeOpen,
    /// OPEN with a format the card does not offer.
    BadFormat,
    /// OPEN with a rate the card does not offer.
    BadRate,
    /// OPEN with more channels than the card offers.
    BadChannels,
    /// Hundreds of thousands of notifications with no request.
    NotifyFlood,
    /// The frontend rewrites its own state key (Connected) 10,000 times a
    /// second for --seconds: every write fires the backend's watch.
    StateFlood,
    /// HW_PARAM_QUERY for --seconds, each as soon as the last was answered
    /// (one in flight, as snd_xen_front sends them): an application
    /// refining its hardware parameters in a loop.
    QueryFlood,
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub kind: Misbehave,
    /// Status of the bad request; None when it got no answer.
    pub status: Option<i32>,
    /// The backend stopped answering on this stream (it closed it).
    pub stream_closed: bool,
    /// A well-formed request afterwards was answered with success.
    pub still_served: bool,
    /// How many times a flood did its thing.
    pub count: u64,
    /// Query flood: requests that got no answer within the frontend's
    /// time-out, and the longest wait for one that did (ms).
    pub unanswered: u64,
    pub longest_wait_ms: f64,
}

pub fn run(kind: Misbehave, o: &SimOptions, g: &mut Guest) -> anyhow::Result<Outcome> {
    let fmt = PcmFormat::S16Le;
    let frame = 2 * o.channels as u32;
    let period = o.period * frame;
    let mut buffer = (o.period * o.periods * frame).min(o.card_buffer_size);
    buffer -= buffer % period;
    let s = &mut g.playback;
    let mut status = None;
    let mut closed = false;
    let mut count = 0u64;
    let (mut unanswered, mut longest) = (0u64, Duration::ZERO);
    match kind {
        Misbehave::RingOverflow => {
            s.alloc_buffer(&mut g.conn, buffer)?;
            s.set_req_prod(REQ_RING_SIZE * 40);
            s.notify_backend();
            std::thread::sleep(Duration::from_millis(200));
            s.set_req_prod(0);
        }
        Misbehave::WritePastEnd => {
            s.alloc_buffer(&mut g.conn, buffer)?;
            s.request(Request::Open(open_req(o, s, fmt)))?;
            status = reply(
                s.try_request(Request::Write(RwReq { offset: buffer - 4, length: period }))?,
                &mut closed,
            );
        }
        Misbehave::BufferTooBig => {
            let big = o.card_buffer_size + period;
            s.alloc_buffer(&mut g.conn, big)?;
            status = reply(s.try_request(Request::Open(open_req(o, s, fmt)))?, &mut closed);
        }
        Misbehave::DirShort | Misbehave::DirLong | Misbehave::DirLoop | Misbehave::BadGref => {
            // Short and loop need a buffer of more than 1023 pages (two
            // directory pages): run them with --card-buffer-size 4194304.
            s.alloc_buffer(&mut g.conn, buffer)?;
            let grefs = s.buffer_grefs.clone();
            let dirs = s.dir_grefs.clone();
            match kind {
                Misbehave::DirShort => s.write_directory(&dirs[..1], &grefs, 0),
                Misbehave::DirLong => {
                    let extra = g.conn.grant_page()?;
                    s.write_directory(&dirs, &grefs, extra);
                }
                Misbehave::DirLoop => s.write_directory(&dirs[..1], &grefs, dirs[0]),
                _ => {
                    let bogus: Vec<u32> = grefs.iter().map(|g| g + 1_000_000).collect();
                    s.write_directory(&dirs, &bogus, 0);
                }
            }
            status = reply(s.try_request(Request::Open(open_req(o, s, fmt)))?, &mut closed);
            // Repair the chain so the follow-up OPEN below is well formed.
            s.write_directory(&dirs, &grefs, 0);
        }
        Misbehave::UnknownOp => {
            s.alloc_buffer(&mut g.conn, buffer)?;
            status = reply(s.try_request(Request::Unknown(42))?, &mut closed);
        }
        Misbehave::TriggerBeforeOpen => {
            s.alloc_buffer(&mut g.conn, buffer)?;
            status = reply(s.try_request(Request::Trigger(trigger::START))?, &mut closed);
        }
        Misbehave::BadFormat | Misbehave::BadRate | Misbehave::BadChannels => {
            s.alloc_buffer(&mut g.conn, buffer)?;
            let mut r = open_req(o, s, fmt);
            match kind {
                Misbehave::BadFormat => r.format = PcmFormat::F64Le.wire(),
                Misbehave::BadRate => r.rate = 12345,
                _ => r.channels = 9,
            }
            status = reply(s.try_request(Request::Open(r))?, &mut closed);
        }
        Misbehave::NotifyFlood => {
            s.alloc_buffer(&mut g.conn, buffer)?;
            let until = Instant::now() + Duration::from_secs(2);
            let mut n = 0u64;
            while Instant::now() < until {
                s.notify_backend();
                n += 1;
            }
            tracing::info!("sent {n} notifications");
            count = n;
        }
        Misbehave::StateFlood => {
            s.alloc_buffer(&mut g.conn, buffer)?;
            let state = format!("{}/{}", g.fe, xen_sndif::keys::STATE);
            let start = Instant::now();
            let until = Duration::from_secs_f64(o.seconds);
            while start.elapsed() < until {
                // 10,000 a second, in bursts of 100.
                for _ in 0..100 {
                    g.conn.write(&state, xen_sndif::XenbusState::Connected.as_str())?;
                    count += 1;
                }
                let due = Duration::from_micros(count * 100);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            tracing::info!("wrote the state key {count} times in {:?}", start.elapsed());
        }
        Misbehave::QueryFlood => {
            s.alloc_buffer(&mut g.conn, buffer)?;
            let q = HwParam {
                formats: u64::MAX,
                rates: (8000, 192000),
                channels: (1, 8),
                buffer_frames: (1, u32::MAX),
                period_frames: (1, u32::MAX),
            };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs_f64(o.seconds) {
                let asked = Instant::now();
                match s.try_request(Request::HwParamQuery(q))? {
                    Some(r) => {
                        status = Some(r.status);
                        count += 1;
                        longest = longest.max(asked.elapsed());
                    }
                    None => unanswered += 1,
                }
            }
            tracing::info!(
                "{count} queries answered in {:?}, {unanswered} not, longest wait {longest:?}",
                start.elapsed()
            );
        }
    }
    // Whatever happened, a well-formed OPEN/CLOSE must be answered unless the
    // backend closed the stream.
    let still_served = if closed {
        false
    } else {
        match s.try_request(Request::Open(open_req(o, s, fmt))).context("follow-up OPEN")? {
            None => {
                closed = true;
                false
            }
            Some(r) => r.status == 0 && s.request(Request::Close).is_ok(),
        }
    };
    Ok(Outcome {
        kind,
        status,
        stream_closed: closed,
        still_served,
        count,
        unanswered,
        longest_wait_ms: longest.as_secs_f64() * 1e3,
    })
}

fn reply(r: Option<xen_sndif::Response>, closed: &mut bool) -> Option<i32> {
    if r.is_none() {
        *closed = true;
    }
    r.map(|r| r.status)
}
