//! The protocol side of a simulated frontend stream, behaving like Linux's
//! `snd_xen_front`: requests wait for their response, CUR_POS events move
//! the hardware pointer, and period interrupts follow either the upstream
//! rule (strictly more than a period) or the exact rule (at least a period).
//! Its event handling is that of one of the two generations of the Linux
//! frontend (`FrontendKernel`), which expect different event ids.

#![forbid(unsafe_code)]

use anyhow::{anyhow, bail};
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use xen_sndif::wire::{decode_event, evt_page, evt_slot_offset, ring_slot_offset, sring, GREFS_PER_DIR_PAGE};
use xen_sndif::{evt, OpenReq, Request, Response, PAGE_SIZE};
use xen_vsnd::xen::loopback::client::{wait_channel, GuestConn};
use xen_vsnd::xen::loopback::EventFdChannel;
use xen_vsnd::xen::{EventChannel, SharedPages};

/// How long a request waits for its response (the Linux frontend's 3 s).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum PeriodRule {
    /// Linux `snd_xen_front`: elapsed when more than a period has passed.
    Upstream,
    /// Our guest driver: elapsed as soon as a whole period has passed.
    Exact,
}

/// Which generation of Linux's `snd_xen_front` the frontend's event handling
/// follows (docs/protocol.md). Both skip, without a word, every event whose
/// id is not the one they expect, and count its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum FrontendKernel {
    /// Linux 4.18 to 7.1: the expected id starts at 0 when the event
    /// channel is set up and is never reset; events are read whenever they
    /// come.
    #[value(name = "4.18")]
    Linux4_18,
    /// Linux 7.2 and later: at every stream clear (PCM open, hw_params and
    /// hw_free) the expected id goes back to 0 and `in_cons` to `in_prod`;
    /// the channel is connected only after a successful OPEN and
    /// disconnected in hw_free before CLOSE, and no event is read while it
    /// is disconnected.
    #[value(name = "7.2")]
    Linux7_2,
}

/// What the stream saw, reported at the end.
#[derive(Debug, Default, Clone, Serialize)]
pub struct StreamReport {
    pub frames: u64,
    pub events: u64,
    /// Events skipped for their id whose position no neighbouring event
    /// with the expected id carried: positions this frontend lost.
    pub bad_event_ids: u64,
    /// Events skipped for their id whose twin (the neighbouring slot, same
    /// payload) it took: the backend serving the other kernel generation.
    pub twin_events: u64,
    pub period_interrupts: u64,
    /// Of those, the ones since the last OPEN (whose position is
    /// `final_position_bytes`).
    pub last_open_period_interrupts: u64,
    /// Interrupts that came before the host had moved that many periods.
    pub early_interrupts: u64,
    /// Interrupts that came more than one host cycle after their period
    /// ended (the cycle's frames are the event's position delta).
    pub late_interrupts: u64,
    /// Largest distance, in frames, between a period's end and its interrupt.
    pub max_lag_frames: u64,
    /// Frames moved per event: smallest and largest (the host quantum at
    /// the stream's rate).
    pub min_cycle_frames: u64,
    pub max_cycle_frames: u64,
    pub xruns: u64,
    pub final_position_bytes: u64,
    /// Last delay the backend reported with the extension (frames).
    pub last_delay_frames: u32,
    /// Largest delay reported during the stream (frames).
    pub max_delay_frames: u32,
    /// What `snd_pcm_delay()` returned last for a driver that puts the
    /// reported delay into `runtime->delay`: frames between the
    /// application pointer and the DAC (playback) or ADC (capture).
    pub pcm_delay_frames: i64,
}

pub struct FrontStream {
    pub mem: Arc<SharedPages>,
    ring_off: usize,
    evt_off: usize,
    pub ring_gref: u32,
    pub evt_gref: u32,
    pub req_port: u32,
    pub evt_port: u32,
    req_ch: EventFdChannel,
    evt_ch: EventFdChannel,
    req_prod_pvt: u32,
    rsp_cons: u32,
    next_req_id: u16,
    next_evt_id: u16,
    pub kernel: FrontendKernel,
    /// The event channel is connected: events are read (7.2 connects it
    /// only between a successful OPEN and hw_free).
    evt_connected: bool,
    /// Payload of the last slot when its event was taken.
    last_taken: Option<EvtPayload>,
    /// Payload of a skipped event no taken neighbour has matched yet.
    unmatched_skip: Option<EvtPayload>,
    // Buffer state after OPEN.
    pub buffer_grefs: Vec<u32>,
    pub dir_grefs: Vec<u32>,
    pub buffer_bytes: u32,
    pub frame_bytes: u32,
    pub period_frames: u64,
    last_pos_bytes: u64,
    /// Frames the hardware pointer has moved since OPEN.
    pub hw_frames: u64,
    /// Period interrupts since OPEN.
    periods_since_open: u64,
    acc_frames: u64,
    pub rule: Option<PeriodRule>,
    /// Frames the last event moved the pointer by.
    last_delta: u64,
    pub report: StreamReport,
    /// Per-channel volume read back with GET_VOLUME.
    pub volume_mdb: Option<Vec<i32>>,
    /// When set, every CUR_POS is logged with the time it was processed.
    pub event_log: Option<Vec<PosEvent>>,
    /// Playback (true) or capture: decides the sign in `snd_pcm_delay()`.
    pub playback: bool,
}

/// An event without its id: (type, position, delay).
type EvtPayload = (u8, u64, u32);

/// One processed CUR_POS: when, the pointer after it (frames since OPEN),
/// and the delay the backend reported.
#[derive(Debug, Clone, Copy)]
pub struct PosEvent {
    pub at: Instant,
    pub hw_frames: u64,
    pub delay: u32,
}

impl FrontStream {
    /// Allocates and initialises the request ring and the event page, and
    /// two unbound channels, as the frontend does before Initialised.
    pub fn new(conn: &mut GuestConn, kernel: FrontendKernel) -> anyhow::Result<FrontStream> {
        let ring_gref = conn.grant_page()?;
        let evt_gref = conn.grant_page()?;
        let (req_port, req_ch) = conn.alloc_evtchn()?;
        let (evt_port, evt_ch) = conn.alloc_evtchn()?;
        let mem = conn.memory();
        let ring_off = ring_gref as usize * PAGE_SIZE;
        // FRONT_RING_INIT: all indices 0, events wanted from the first one.
        mem.store_u32(ring_off + sring::REQ_EVENT, 1);
        mem.store_u32(ring_off + sring::RSP_EVENT, 1);
        Ok(FrontStream {
            mem,
            ring_off,
            evt_off: evt_gref as usize * PAGE_SIZE,
            ring_gref,
            evt_gref,
            req_port,
            evt_port,
            req_ch,
            evt_ch,
            req_prod_pvt: 0,
            rsp_cons: 0,
            next_req_id: 0,
            next_evt_id: 0,
            kernel,
            evt_connected: kernel == FrontendKernel::Linux4_18,
            last_taken: None,
            unmatched_skip: None,
            buffer_grefs: Vec::new(),
            dir_grefs: Vec::new(),
            buffer_bytes: 0,
            frame_bytes: 1,
            period_frames: 1,
            last_pos_bytes: 0,
            hw_frames: 0,
            periods_since_open: 0,
            acc_frames: 0,
            rule: None,
            last_delta: 0,
            report: StreamReport::default(),
            volume_mdb: None,
            event_log: None,
            playback: true,
        })
    }

    /// Grants the buffer pages and a directory chain describing them.
    pub fn alloc_buffer(&mut self, conn: &mut GuestConn, bytes: u32) -> anyhow::Result<()> {
        let n = (bytes as usize).div_ceil(PAGE_SIZE);
        self.buffer_grefs = (0..n).map(|_| conn.grant_page()).collect::<anyhow::Result<_>>()?;
        let ndirs = n.div_ceil(GREFS_PER_DIR_PAGE).max(1);
        self.dir_grefs = (0..ndirs).map(|_| conn.grant_page()).collect::<anyhow::Result<_>>()?;
        self.write_directory(&self.dir_grefs.clone(), &self.buffer_grefs.clone(), 0);
        self.buffer_bytes = bytes;
        Ok(())
    }

    /// Writes directory pages `dirs` listing `grefs`; the last page's next
    /// is `last_next` (0 for a well-formed chain).
    pub fn write_directory(&self, dirs: &[u32], grefs: &[u32], last_next: u32) {
        for (i, d) in dirs.iter().enumerate() {
            let off = *d as usize * PAGE_SIZE;
            let next = dirs.get(i + 1).copied().unwrap_or(last_next);
            self.mem.copy_in(off, &next.to_le_bytes());
            let chunk = grefs.iter().skip(i * GREFS_PER_DIR_PAGE).take(GREFS_PER_DIR_PAGE);
            for (j, g) in chunk.enumerate() {
                self.mem.copy_in(off + 4 + j * 4, &g.to_le_bytes());
            }
        }
    }

    /// Walks `len` bytes of the ring buffer from stream byte `pos` as the
    /// contiguous pieces they occupy in guest memory: (address, range of the
    /// caller's slice). A piece ends at a page end or at the buffer's end.
    fn for_each_span(&self, pos: u64, len: usize, mut f: impl FnMut(usize, std::ops::Range<usize>)) {
        let mut done = 0;
        while done < len {
            let off = ((pos + done as u64) % self.buffer_bytes as u64) as usize;
            let addr = self.buffer_grefs[off / PAGE_SIZE] as usize * PAGE_SIZE + off % PAGE_SIZE;
            let room = (PAGE_SIZE - off % PAGE_SIZE).min(self.buffer_bytes as usize - off);
            let n = room.min(len - done);
            f(addr, done..done + n);
            done += n;
        }
    }

    /// Copies `data` into the buffer at stream byte `pos`.
    pub fn buffer_write(&self, pos: u64, data: &[u8]) {
        self.for_each_span(pos, data.len(), |addr, r| {
            self.mem.copy_in(addr, &data[r]);
        });
    }

    /// Copies the buffer from stream byte `pos` into `out`.
    pub fn buffer_read(&self, pos: u64, out: &mut [u8]) {
        self.for_each_span(pos, out.len(), |addr, r| {
            self.mem.copy_out(addr, &mut out[r]);
        });
    }

    /// Puts raw bytes in the next request slot and publishes it.
    pub fn push_raw(&mut self, msg: &[u8; 64]) {
        self.mem.write_msg(self.ring_off + ring_slot_offset(self.req_prod_pvt), msg);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        self.mem.store_u32(self.ring_off + sring::REQ_PROD, self.req_prod_pvt);
        self.req_ch.notify();
    }

    /// Sets the shared producer index directly (for the misbehaving guest).
    pub fn set_req_prod(&mut self, v: u32) {
        self.mem.store_u32(self.ring_off + sring::REQ_PROD, v);
    }

    pub fn notify_backend(&self) -> bool {
        self.req_ch.notify()
    }

    /// Sends a request and waits for its response; `Ok(None)` on time-out.
    pub fn try_request(&mut self, req: Request) -> anyhow::Result<Option<Response>> {
        let id = self.next_req_id;
        self.next_req_id = self.next_req_id.wrapping_add(1);
        self.push_raw(&req.encode(id));
        let deadline = Instant::now() + RESPONSE_TIMEOUT;
        loop {
            let prod = self.mem.load_u32(self.ring_off + sring::RSP_PROD);
            while self.rsp_cons != prod {
                let r = Response::decode(&self.mem.read_msg(self.ring_off + ring_slot_offset(self.rsp_cons)));
                self.rsp_cons = self.rsp_cons.wrapping_add(1);
                if r.id == id {
                    self.mem.store_u32(self.ring_off + sring::RSP_EVENT, self.rsp_cons.wrapping_add(1));
                    return Ok(Some(r));
                }
            }
            self.mem.store_u32(self.ring_off + sring::RSP_EVENT, self.rsp_cons.wrapping_add(1));
            if self.mem.load_u32(self.ring_off + sring::RSP_PROD) != self.rsp_cons {
                continue;
            }
            if !wait_channel(&self.req_ch, deadline)? && Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    /// Sends a request; an error unless it is answered with status 0.
    pub fn request(&mut self, req: Request) -> anyhow::Result<Response> {
        let r = self
            .try_request(req)?
            .ok_or_else(|| anyhow!("no response to {req:?} within {RESPONSE_TIMEOUT:?}"))?;
        if r.status != 0 {
            bail!("{req:?} failed with status {}", r.status);
        }
        Ok(r)
    }

    /// A stream clear of the 7.2 frontend (PCM open, hw_params, hw_free):
    /// expected id 0, and the events not yet read are dropped. The 4.18
    /// frontend resets nothing here: its ids run on with the channel.
    fn clear(&mut self) {
        if self.kernel == FrontendKernel::Linux7_2 {
            self.next_evt_id = 0;
            let base = self.evt_off;
            self.mem.store_u32(base + evt_page::IN_CONS, self.mem.load_u32(base + evt_page::IN_PROD));
            self.settle_unmatched();
            self.last_taken = None;
        }
    }

    /// PCM open, hw_params and prepare (OPEN) of an application; `times`
    /// hw_params + prepare rounds, as an application that sets its
    /// parameters twice sends OPEN twice without CLOSE.
    pub fn open_times(
        &mut self,
        o: OpenReq,
        frame_bytes: u32,
        rule: PeriodRule,
        times: u32,
    ) -> anyhow::Result<()> {
        self.clear(); // PCM open
        for _ in 0..times.max(1) {
            self.clear(); // hw_params
            self.request(Request::Open(o))?;
        }
        self.frame_bytes = frame_bytes;
        self.period_frames = (o.period_sz / frame_bytes).max(1) as u64;
        self.last_pos_bytes = 0;
        self.hw_frames = 0;
        self.periods_since_open = 0;
        self.report.last_open_period_interrupts = 0;
        self.acc_frames = 0;
        self.rule = Some(rule);
        // 7.2 connects the channel after a successful prepare.
        self.evt_connected = true;
        Ok(())
    }

    pub fn open(&mut self, o: OpenReq, frame_bytes: u32, rule: PeriodRule) -> anyhow::Result<()> {
        self.open_times(o, frame_bytes, rule, 1)
    }

    /// hw_free and CLOSE: 7.2 disconnects the channel first and clears the
    /// stream after.
    pub fn close(&mut self) -> anyhow::Result<()> {
        if self.kernel == FrontendKernel::Linux7_2 {
            self.evt_connected = false;
        }
        self.request(Request::Close)?;
        self.clear();
        Ok(())
    }

    /// SET_VOLUME for every channel, then GET_VOLUME into `volume_mdb`. The
    /// values travel through the first bytes of the stream's buffer, as
    /// sndif.h specifies, before any audio is written there.
    pub fn set_volume(&mut self, mdb: i32, channels: usize) -> anyhow::Result<()> {
        let raw: Vec<u8> = (0..channels).flat_map(|_| mdb.to_le_bytes()).collect();
        self.buffer_write(0, &raw);
        let rw = xen_sndif::RwReq { offset: 0, length: raw.len() as u32 };
        self.request(Request::SetVolume(rw))?;
        self.buffer_write(0, &vec![0u8; raw.len()]);
        self.request(Request::GetVolume(rw))?;
        let mut back = vec![0u8; raw.len()];
        self.buffer_read(0, &mut back);
        self.volume_mdb =
            Some(back.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
        Ok(())
    }

    /// Waits for the event channel (bounded) and processes every event.
    /// Returns false when no usable event came before `deadline` (events
    /// with the wrong id are skipped, as the frontend does, and not usable).
    pub fn wait_events(&mut self, deadline: Instant) -> anyhow::Result<bool> {
        loop {
            if self.process_events() > 0 {
                return Ok(true);
            }
            // A notification can come without a new event (one the backend
            // could not push while the page was full): wait again.
            if Instant::now() >= deadline || !wait_channel(&self.evt_ch, deadline)? {
                return Ok(self.process_events() > 0);
            }
        }
    }

    /// `snd_pcm_delay()` as ALSA computes it: the frames between the
    /// application pointer and the hardware pointer, plus `runtime->delay`.
    pub fn update_pcm_delay(&mut self, appl_frames: u64) {
        let d = self.report.last_delay_frames as i64;
        let (hw, appl) = (self.hw_frames as i64, appl_frames as i64);
        self.report.pcm_delay_frames = if self.playback { appl - hw + d } else { hw - appl + d };
    }

    /// Consumes the event page like `evtchnl_interrupt_evt` does: every
    /// slot counts, an event with another id than expected is skipped. A
    /// disconnected channel (7.2, outside OPEN..hw_free) reads nothing.
    pub fn process_events(&mut self) -> usize {
        if !self.evt_connected {
            return 0;
        }
        let base = self.evt_off;
        let prod = self.mem.load_u32(base + evt_page::IN_PROD);
        let mut cons = self.mem.load_u32(base + evt_page::IN_CONS);
        let mut n = 0;
        while cons != prod {
            let (id, ty, pos, delay) = decode_event(&self.mem.read_msg(base + evt_slot_offset(cons)));
            cons = cons.wrapping_add(1);
            let expected = self.next_evt_id;
            self.next_evt_id = self.next_evt_id.wrapping_add(1);
            let payload = (ty, pos, delay);
            if id != expected {
                self.on_skipped(payload);
                continue;
            }
            self.on_taken(payload);
            if ty == evt::CUR_POS {
                self.on_cur_pos(pos, delay);
                n += 1;
            }
        }
        self.mem.store_u32(base + evt_page::IN_CONS, cons);
        n
    }

    /// Accounts a skipped event: a twin when the slot before was taken with
    /// the same payload, otherwise held until the next taken one says.
    fn on_skipped(&mut self, payload: EvtPayload) {
        if self.last_taken.take() == Some(payload) {
            self.report.twin_events += 1;
        } else {
            self.settle_unmatched();
            self.unmatched_skip = Some(payload);
        }
    }

    fn on_taken(&mut self, payload: EvtPayload) {
        if self.unmatched_skip == Some(payload) {
            self.unmatched_skip = None;
            self.report.twin_events += 1;
        }
        self.settle_unmatched();
        self.last_taken = Some(payload);
    }

    /// A skipped event that no taken neighbour matched was lost.
    fn settle_unmatched(&mut self) {
        if self.unmatched_skip.take().is_some() {
            self.report.bad_event_ids += 1;
        }
    }

    fn on_cur_pos(&mut self, pos: u64, delay: u32) {
        self.report.events += 1;
        self.report.last_delay_frames = delay;
        self.report.max_delay_frames = self.report.max_delay_frames.max(delay);
        self.report.final_position_bytes = pos;
        let delta = pos.saturating_sub(self.last_pos_bytes) / self.frame_bytes as u64;
        self.last_pos_bytes = pos;
        self.hw_frames += delta;
        self.acc_frames += delta;
        if delta > 0 {
            let r = &mut self.report;
            r.min_cycle_frames = if r.min_cycle_frames == 0 { delta } else { r.min_cycle_frames.min(delta) };
            r.max_cycle_frames = r.max_cycle_frames.max(delta);
        }
        self.last_delta = delta;
        if let Some(log) = &mut self.event_log {
            log.push(PosEvent { at: Instant::now(), hw_frames: self.hw_frames, delay });
        }
        let p = self.period_frames;
        match self.rule {
            Some(PeriodRule::Upstream) if self.acc_frames > p => {
                self.acc_frames %= p;
                self.period_elapsed();
            }
            Some(PeriodRule::Exact) => {
                while self.acc_frames >= p {
                    self.acc_frames -= p;
                    self.period_elapsed();
                }
            }
            _ => {}
        }
    }

    fn period_elapsed(&mut self) {
        let r = &mut self.report;
        r.period_interrupts += 1;
        self.periods_since_open += 1;
        r.last_open_period_interrupts = self.periods_since_open;
        let period_end = self.periods_since_open * self.period_frames;
        if self.hw_frames < period_end {
            r.early_interrupts += 1;
            return;
        }
        let lag = self.hw_frames - period_end;
        r.max_lag_frames = r.max_lag_frames.max(lag);
        if lag > self.last_delta {
            r.late_interrupts += 1;
        }
    }
}
