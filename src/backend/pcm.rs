//! One guest PCM stream: answers its requests (OPEN, CLOSE, READ, WRITE,
//! TRIGGER, HW_PARAM_QUERY, volume and mute) and owns its life
//! (`lifecycle::Phase`) and its host node, which exists for as long as the
//! stream is connected and runs the stream's engine from OPEN to CLOSE.
//! Every request field comes from the guest and is validated here.

#![forbid(unsafe_code)]

use super::lifecycle::{Event, Phase};
use super::ratelimit::LogLimiter;
use super::registry::StreamRecord;
use crate::dma::{DmaEngine, DmaShared, EventIndex, EventRing, Geometry, Report};
use crate::host::{HostBackend, HostNode, Shape, StreamSpec};
use crate::sndif::config::limits;
use crate::sndif::wire::{pages_for, walk_directory, MSG_SIZE};
use crate::sndif::PAGE_SIZE;
use crate::sndif::{errno, HwParam, OpenReq, PcmFormat, Request, Response, RwReq, StreamConfig, StreamKind};
use crate::xen::{DomId, EventChannel, GrantMapper, HypervisorError, SharedPages};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Who a stream belongs to; used for node names, properties and logs.
#[derive(Debug, Clone)]
pub struct StreamIdentity {
    pub domid: DomId,
    /// The domain's name as in node names (`device::node_safe_name`).
    pub domain: String,
    /// The name dom0 wrote for the domain, as it is: what policy matches
    /// on. None when it could not be read.
    pub vm_name: Option<String>,
    pub devid: u32,
    pub card_long_name: String,
    pub pcm_index: u32,
    pub pcm_name: String,
    pub cfg: StreamConfig,
}

impl StreamIdentity {
    pub fn node_name(&self) -> String {
        format!("xen-vsnd.{}.{}.{}.{}", self.domain, self.devid, self.pcm_index, self.stream_suffix())
    }

    fn stream_suffix(&self) -> String {
        let kind = self.cfg.kind.as_str();
        // Streams of one kind in a pcm are told apart by their index.
        if self.cfg.index <= 1 {
            kind.to_string()
        } else {
            format!("{kind}{}", self.cfg.index)
        }
    }

    pub fn description(&self) -> String {
        let pcm =
            if self.pcm_name.is_empty() { format!("pcm{}", self.pcm_index) } else { self.pcm_name.clone() };
        format!("{}: {} {} ({})", self.domain, self.card_long_name, pcm, self.cfg.kind.as_str())
    }

    /// What a node shows before the first OPEN: the configuration's first
    /// format, 48 kHz when offered (else its highest rate), all channels.
    fn initial_shape(&self) -> Shape {
        let p = &self.cfg.params;
        Shape {
            format: p.formats.first().copied().unwrap_or(PcmFormat::S16Le),
            rate: if p.rates.contains(&48000) { 48000 } else { p.rates.last().copied().unwrap_or(48000) },
            channels: p.channels_max,
        }
    }

    pub fn spec(&self) -> StreamSpec {
        StreamSpec {
            initial: self.initial_shape(),
            kind: self.cfg.kind,
            node_name: self.node_name(),
            description: self.description(),
            domain: self.domain.clone(),
            props: vec![
                ("xen.domid".into(), self.domid.to_string()),
                ("xen.domain".into(), self.domain.clone()),
                ("xen.unique-id".into(), self.cfg.unique_id.clone()),
                ("xen.card".into(), self.devid.to_string()),
                ("xen.pcm".into(), self.pcm_index.to_string()),
                ("xen.pcm.name".into(), self.pcm_name.clone()),
                ("xen.stream".into(), self.cfg.index.to_string()),
            ],
        }
    }
}

/// Why a request was refused: the status for the guest and a line for the log.
struct Refusal(i32, String);

/// A grant map that failed at OPEN: a grant the hypervisor refuses is the
/// guest's (-EINVAL), one this side could not map now a host fault (-EIO).
fn map_refusal(what: &str, e: &HypervisorError) -> Refusal {
    let status = if e.is_refused() { -errno::EINVAL } else { -errno::EIO };
    Refusal(status, format!("OPEN: {what}: {e}"))
}

fn refuse<T>(status: i32, why: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(status, why.into()))
}

/// An open stream (any phase but Closed).
struct Opened {
    geom: Geometry,
    buffer: Arc<SharedPages>,
    shared: Arc<DmaShared>,
    /// Per-channel volume in 0.001 dB, and mute flags (SET_VOLUME/MUTE).
    volume_mdb: Vec<i32>,
    muted: Vec<bool>,
}

pub struct PcmStream {
    pub ident: Arc<StreamIdentity>,
    /// The stream as `status` and policy see it; its controls go into
    /// every engine.
    record: Arc<StreamRecord>,
    grants: Arc<dyn GrantMapper>,
    host: Arc<dyn HostBackend>,
    evt_page: Arc<SharedPages>,
    evt_channel: Arc<dyn EventChannel>,
    /// The event page's producer index: it runs on across OPENs, and each
    /// OPEN's ids start from it (`dma::events`).
    evt_index: EventIndex,
    report_delay: bool,
    /// Where the stream is in its protocol life; `opened` is Some exactly
    /// when it is not Closed.
    phase: Phase,
    opened: Option<Opened>,
    /// The host's node for this connected stream (None only while the host
    /// cannot make one: it is tried again at the next OPEN).
    node: Option<Box<dyn HostNode>>,
    log: LogLimiter,
    /// Counters at the last `log_stats`, to report the interval since.
    /// (callback time histogram, [underruns, overruns, late cycles])
    stats_prev: Option<(Vec<u64>, [u64; 3])>,
}

/// Smallest period the backend accepts, in frames.
const MIN_PERIOD_FRAMES: u32 = 16;

impl PcmStream {
    pub fn new(
        record: Arc<StreamRecord>,
        grants: Arc<dyn GrantMapper>,
        host: Arc<dyn HostBackend>,
        evt_page: Arc<SharedPages>,
        evt_channel: Arc<dyn EventChannel>,
        report_delay: bool,
    ) -> PcmStream {
        let mut s = PcmStream {
            ident: record.ident.clone(),
            record,
            grants,
            host,
            evt_page,
            evt_channel,
            evt_index: EventIndex::default(),
            report_delay,
            phase: Phase::Closed,
            opened: None,
            node: None,
            log: LogLimiter::new(Duration::from_secs(10)),
            stats_prev: None,
        };
        if let Err(e) = s.attach() {
            tracing::warn!(stream = %s.ident.node_name(), "no host node yet (tried again at OPEN): {e:#}");
        }
        s
    }

    /// Makes the stream's host node if there is none.
    fn attach(&mut self) -> anyhow::Result<&mut Box<dyn HostNode>> {
        if self.node.is_none() {
            self.node = Some(self.host.attach(self.record.spec())?);
        }
        self.node.as_mut().ok_or_else(|| anyhow::anyhow!("no host node"))
    }

    /// Logs guest misbehaviour, at most one line per interval per stream.
    pub fn warn(&mut self, what: &str) {
        if let Some(suppressed) = self.log.allow() {
            let id = &self.ident;
            tracing::warn!(
                domid = id.domid,
                stream = %id.node_name(),
                suppressed,
                "guest error: {what}"
            );
        }
    }

    /// A request the host could not carry out, logged as such (rate
    /// limited with the guest's errors).
    pub fn host_fault(&mut self, what: &str) {
        if let Some(suppressed) = self.log.allow() {
            let id = &self.ident;
            tracing::warn!(domid = id.domid, stream = %id.node_name(), suppressed, "host fault: {what}");
        }
    }

    /// Logs the open stream's figures since the last call: cycles, callback
    /// time quantiles, under/overruns and the current delay.
    pub fn log_stats(&mut self) {
        let Some(o) = &self.opened else {
            self.stats_prev = None;
            return;
        };
        let s = &o.shared;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let now = (s.cycle_time.snapshot(), [load(&s.underruns), load(&s.overruns), load(&s.late_cycles)]);
        let (counts, [under, over, late]) = match &self.stats_prev {
            Some((c, prev)) => {
                (crate::dma::histogram_delta(c, &now.0), std::array::from_fn(|i| now.1[i] - prev[i]))
            }
            None => now.clone(),
        };
        tracing::info!(
            stream = %self.ident.node_name(),
            cycles = counts.iter().sum::<u64>(),
            callback_p50_us = crate::dma::quantile_us_of(&counts, 0.5).unwrap_or(0.0),
            callback_p99_us = crate::dma::quantile_us_of(&counts, 0.99).unwrap_or(0.0),
            underruns = under,
            overruns = over,
            late_cycles = late,
            delay_frames = s.delay_frames.load(Ordering::Relaxed),
            "stats"
        );
        self.stats_prev = Some(now);
    }

    /// Counters of the open stream, for logs and tests.
    pub fn shared(&self) -> Option<Arc<DmaShared>> {
        self.opened.as_ref().map(|o| o.shared.clone())
    }

    pub fn handle(&mut self, msg: &[u8; MSG_SIZE]) -> Response {
        let (id, operation, req) = Request::decode(msg);
        let mut hw_param = None;
        let result = match req {
            Request::Open(o) => self.open(&o),
            Request::Close => {
                self.close();
                Ok(())
            }
            Request::Write(rw) => self.transfer(rw, StreamKind::Playback),
            Request::Read(rw) => self.transfer(rw, StreamKind::Capture),
            Request::Trigger(t) => self.trigger(t),
            Request::HwParamQuery(q) => self.query(&q).map(|h| hw_param = Some(h)),
            Request::SetVolume(rw) => self.set_volume(rw),
            Request::GetVolume(rw) => self.get_volume(rw),
            Request::Mute(rw) => self.mute(rw, true),
            Request::Unmute(rw) => self.mute(rw, false),
            Request::Unknown(op) => refuse(-errno::ENOSYS, format!("unknown operation {op}")),
        };
        let status = match result {
            Ok(()) => 0,
            Err(Refusal(status, why)) => {
                if status == -errno::EIO {
                    // -EIO is what the host could not do (its node, a
                    // server that went away), not what the guest asked.
                    self.host_fault(&why);
                } else {
                    self.warn(&why);
                }
                hw_param = None;
                status
            }
        };
        Response { id, operation, status, hw_param }
    }

    /// The geometry an OPEN asks for, checked against config and host.
    fn validate_open(&self, o: &OpenReq) -> Result<Geometry, Refusal> {
        let p = &self.ident.cfg.params;
        let Some(format) = PcmFormat::from_wire(o.format) else {
            return refuse(-errno::EINVAL, format!("OPEN: unknown format {}", o.format));
        };
        if !p.formats.contains(&format) || !self.host.supports(format) {
            return refuse(-errno::EINVAL, format!("OPEN: format {} not offered", format.name()));
        }
        if !p.rates.contains(&o.rate) || !self.host.supports_rate(o.rate) {
            return refuse(-errno::EINVAL, format!("OPEN: rate {} not offered", o.rate));
        }
        let ch = o.channels as u32;
        if ch < p.channels_min || ch > p.channels_max {
            return refuse(-errno::EINVAL, format!("OPEN: {ch} channels not offered"));
        }
        let mut geom = Geometry {
            format,
            rate: o.rate,
            channels: ch,
            buffer_bytes: o.buffer_sz,
            period_bytes: o.period_sz,
            cycle_frames: 0,
        };
        let floor = crate::host::quantum_floor(o.rate, self.record.min_quantum());
        geom.cycle_frames = crate::host::cycle_frames(geom.period_frames(), floor);
        let frame = geom.frame_bytes() as u32;
        let max = p.buffer_size.min(limits::MAX_BUFFER_SIZE);
        if o.buffer_sz == 0 || o.buffer_sz > max || o.buffer_sz % frame != 0 {
            return refuse(
                -errno::EINVAL,
                format!("OPEN: buffer_sz {} (max {max}, frame {frame})", o.buffer_sz),
            );
        }
        if o.period_sz != 0
            && (o.period_sz > o.buffer_sz
                || o.period_sz % frame != 0
                || o.period_sz / frame < MIN_PERIOD_FRAMES)
        {
            return refuse(-errno::EINVAL, format!("OPEN: period_sz {}", o.period_sz));
        }
        Ok(geom)
    }

    /// Follows the page directory chain from `first` and collects exactly
    /// `count` buffer grefs (`wire::walk_directory`), mapping each
    /// directory page in turn and copying it out once.
    fn read_directory(&self, first: u32, count: usize) -> Result<Vec<u32>, Refusal> {
        let mut map_failed = None;
        walk_directory(first, count, |gref| {
            let page =
                self.grants.map(self.ident.domid, &[gref]).inspect_err(|e| map_failed = Some(e.clone()))?;
            let mut raw = [0u8; PAGE_SIZE];
            page.copy_out(0, &mut raw);
            Ok::<_, HypervisorError>(raw)
        })
        .map_err(|e| match map_failed {
            Some(m) => map_refusal("directory", &m),
            None => Refusal(-errno::EINVAL, format!("OPEN: {e}")),
        })
    }

    fn open(&mut self, o: &OpenReq) -> Result<(), Refusal> {
        // An OPEN on an open stream is CLOSE + OPEN (`lifecycle`).
        if self.phase.is_open() {
            tracing::debug!(stream = %self.ident.node_name(), "OPEN while open: the new one replaces it");
            self.close();
        }
        let geom = self.validate_open(o)?;
        let grefs = self.read_directory(o.gref_directory, pages_for(o.buffer_sz))?;
        let buffer =
            Arc::new(self.grants.map(self.ident.domid, &grefs).map_err(|e| map_refusal("buffer", &e))?);
        self.start(geom, buffer)
    }

    /// Starts the host stream on a mapped buffer: the second half of OPEN.
    fn start(&mut self, geom: Geometry, buffer: Arc<SharedPages>) -> Result<(), Refusal> {
        let shared = Arc::new(DmaShared::default());
        let engine = DmaEngine::new(
            geom,
            buffer.clone(),
            EventRing::new(self.evt_page.clone(), self.evt_index.clone()),
            self.evt_channel.clone(),
            shared.clone(),
            self.record.controls.clone(),
            Report::choose(
                self.report_delay,
                self.ident.cfg.kind == StreamKind::Playback,
                self.record.playback_position(),
            ),
        );
        // Each OPEN starts at full volume, as the guest's mixer expects
        // (before the engine can run a cycle).
        self.record.controls.set_guest_gains(&[]);
        let node = self.attach().map_err(|e| Refusal(-errno::EIO, format!("OPEN: host node: {e:#}")))?;
        if let Err(e) = node.start(engine) {
            // A node the host lost is made anew at the next OPEN.
            self.node = None;
            return refuse(-errno::EIO, format!("OPEN: host node: {e:#}"));
        }
        let n = geom.channels as usize;
        tracing::info!(
            stream = %self.ident.node_name(),
            rate = geom.rate, channels = geom.channels, format = geom.format.name(),
            buffer = geom.buffer_bytes, period = geom.period_bytes, "opened"
        );
        self.stats_prev = None;
        self.record.opened(geom, shared.clone());
        self.opened = Some(Opened { geom, buffer, shared, volume_mdb: vec![0; n], muted: vec![false; n] });
        self.phase = self.phase.next(Event::Open).unwrap_or(Phase::Prepared);
        Ok(())
    }

    /// CLOSE: the node lets go of the engine (its cycle never touches the
    /// guest's buffer again once this returns) and the buffer mapping is
    /// released. The node stays, for the next OPEN.
    pub fn close(&mut self) {
        self.phase = Phase::Closed;
        self.record.closed();
        if let Some(o) = self.opened.take() {
            if let Some(node) = self.node.as_mut() {
                node.stop();
            }
            let s = &o.shared;
            tracing::info!(
                stream = %self.ident.node_name(),
                position = s.position.load(Ordering::Relaxed),
                told = s.told.load(Ordering::Relaxed),
                delay_frames = s.delay_frames.load(Ordering::Relaxed),
                cycle_frames = s.cycle_frames.load(Ordering::Relaxed),
                cycles = s.cycles.load(Ordering::Relaxed),
                underruns = s.underruns.load(Ordering::Relaxed),
                overruns = s.overruns.load(Ordering::Relaxed),
                silent_frames = s.silent_frames.load(Ordering::Relaxed),
                late_cycles = s.late_cycles.load(Ordering::Relaxed),
                fallback_cycles = s.fallback_cycles.load(Ordering::Relaxed),
                events_dropped = s.events_dropped.load(Ordering::Relaxed),
                notify_failures = s.notify_failures.load(Ordering::Relaxed),
                callback_p50_us = s.cycle_time.quantile_us(0.5).unwrap_or(0.0),
                callback_p99_us = s.cycle_time.quantile_us(0.99).unwrap_or(0.0),
                callback_max_us = s.cycle_time.max_us(),
                notify_p50_us = s.notify_time.quantile_us(0.5).unwrap_or(0.0),
                notify_p99_us = s.notify_time.quantile_us(0.99).unwrap_or(0.0),
                "closed"
            );
            drop(o);
        }
    }

    fn opened(&self, what: &str) -> Result<&Opened, Refusal> {
        self.opened.as_ref().ok_or_else(|| Refusal(-errno::EINVAL, format!("{what} before OPEN")))
    }

    fn check_range(o: &Opened, rw: RwReq, what: &str) -> Result<(), Refusal> {
        match rw.offset.checked_add(rw.length) {
            Some(end) if end <= o.geom.buffer_bytes => Ok(()),
            _ => refuse(
                -errno::EINVAL,
                format!(
                    "{what}: offset {} + length {} past buffer {}",
                    rw.offset, rw.length, o.geom.buffer_bytes
                ),
            ),
        }
    }

    /// WRITE (playback) / READ (capture): the guest filled / drained a region.
    fn transfer(&mut self, rw: RwReq, dir: StreamKind) -> Result<(), Refusal> {
        let what = if dir == StreamKind::Playback { "WRITE" } else { "READ" };
        if self.ident.cfg.kind != dir {
            return refuse(-errno::EINVAL, format!("{what} on a {} stream", self.ident.cfg.kind.as_str()));
        }
        let o = self.opened(what)?;
        Self::check_host(o, what)?;
        Self::check_range(o, rw, what)?;
        o.shared.guest_bytes.fetch_add(rw.length as u64, Ordering::AcqRel);
        Ok(())
    }

    /// Refuses what would keep an open stream going once its host gave it
    /// up (`DmaShared::host_gone`).
    fn check_host(o: &Opened, what: &str) -> Result<(), Refusal> {
        if o.shared.host_gone.load(Ordering::Acquire) {
            return refuse(
                -errno::EIO,
                format!("{what}: the host can no longer carry this stream; the guest must open it again"),
            );
        }
        Ok(())
    }

    fn trigger(&mut self, t: u8) -> Result<(), Refusal> {
        let next = self.phase.next(Event::Trigger(t)).map_err(|why| Refusal(-errno::EINVAL, why))?;
        let o = self.opened("TRIGGER")?;
        if next.is_running() {
            Self::check_host(o, "TRIGGER")?;
        }
        o.shared.running.store(next.is_running(), Ordering::Release);
        self.phase = next;
        Ok(())
    }

    /// Narrows the guest's hw-param intervals to what config and host allow.
    fn query(&self, q: &HwParam) -> Result<HwParam, Refusal> {
        let p = &self.ident.cfg.params;
        let mut formats = 0u64;
        for f in &p.formats {
            if self.host.supports(*f) {
                formats |= f.mask_bit();
            }
        }
        formats &= q.formats;
        let rates: Vec<u32> = p
            .rates
            .iter()
            .copied()
            .filter(|r| *r >= q.rates.0 && *r <= q.rates.1 && self.host.supports_rate(*r))
            .collect();
        let ch = (q.channels.0.max(p.channels_min), q.channels.1.min(p.channels_max));
        if formats == 0 || rates.is_empty() || ch.0 > ch.1 {
            return refuse(-errno::EINVAL, "HW_PARAM_QUERY: no configuration satisfies the request");
        }
        let min_sample = PcmFormat::all()
            .filter(|f| formats & f.mask_bit() != 0)
            .map(|f| f.sample_bytes() as u32)
            .min()
            .unwrap_or(1);
        let max_frames = p.buffer_size.min(limits::MAX_BUFFER_SIZE) / (min_sample * ch.0);
        let buf = (q.buffer_frames.0.max(2 * MIN_PERIOD_FRAMES), q.buffer_frames.1.min(max_frames));
        let per = (q.period_frames.0.max(MIN_PERIOD_FRAMES), q.period_frames.1.min(max_frames / 2));
        if buf.0 > buf.1 || per.0 > per.1 {
            return refuse(-errno::EINVAL, "HW_PARAM_QUERY: buffer/period sizes impossible");
        }
        Ok(HwParam {
            formats,
            rates: (rates[0], rates[rates.len() - 1]),
            channels: ch,
            buffer_frames: buf,
            period_frames: per,
        })
    }

    /// The guest's volume and mute become the engine's gain on its
    /// samples; the host node's own volume stays the dom0 user's.
    fn apply_volume(&self) {
        let Some(o) = &self.opened else { return };
        let gains: Vec<f32> = o
            .volume_mdb
            .iter()
            .zip(&o.muted)
            .map(|(mdb, m)| if *m { 0.0 } else { 10f32.powf(*mdb as f32 / 20_000.0).min(1.0) })
            .collect();
        self.record.controls.set_guest_gains(&gains);
    }

    fn set_volume(&mut self, rw: RwReq) -> Result<(), Refusal> {
        let o =
            self.opened.as_mut().ok_or_else(|| Refusal(-errno::EINVAL, "SET_VOLUME before OPEN".into()))?;
        Self::check_range(o, rw, "SET_VOLUME")?;
        let n = o.volume_mdb.len();
        if (rw.length as usize) < n * 4 {
            return refuse(-errno::EINVAL, "SET_VOLUME: fewer values than channels");
        }
        let mut raw = vec![0u8; n * 4];
        o.buffer.copy_out(rw.offset as usize, &mut raw);
        for (i, v) in o.volume_mdb.iter_mut().enumerate() {
            // Volumes above 0 dB are clamped: the backend only attenuates.
            *v = i32::from_le_bytes([raw[i * 4], raw[i * 4 + 1], raw[i * 4 + 2], raw[i * 4 + 3]]).min(0);
        }
        self.apply_volume();
        Ok(())
    }

    fn get_volume(&mut self, rw: RwReq) -> Result<(), Refusal> {
        let o = self.opened("GET_VOLUME")?;
        Self::check_range(o, rw, "GET_VOLUME")?;
        if (rw.length as usize) < o.volume_mdb.len() * 4 {
            return refuse(-errno::EINVAL, "GET_VOLUME: buffer smaller than the channels");
        }
        let raw: Vec<u8> = o.volume_mdb.iter().flat_map(|v| v.to_le_bytes()).collect();
        o.buffer.copy_in(rw.offset as usize, &raw);
        Ok(())
    }

    fn mute(&mut self, rw: RwReq, mute: bool) -> Result<(), Refusal> {
        let o = self.opened.as_mut().ok_or_else(|| Refusal(-errno::EINVAL, "MUTE before OPEN".into()))?;
        Self::check_range(o, rw, "MUTE")?;
        let n = o.muted.len();
        if (rw.length as usize) < n {
            return refuse(-errno::EINVAL, "MUTE: fewer flags than channels");
        }
        let mut flags = vec![0u8; n];
        o.buffer.copy_out(rw.offset as usize, &mut flags);
        for (m, f) in o.muted.iter_mut().zip(flags) {
            if f != 0 {
                *m = mute;
            }
        }
        self.apply_volume();
        Ok(())
    }
}

impl Drop for PcmStream {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::registry::Registry;
    use crate::dma::testing::CountingChannel;
    use crate::host::HostNode;
    use crate::policy::Policy;
    use crate::sndif::config::example::libxl_dump;
    use crate::sndif::config::parse_card;
    use crate::sndif::trigger;
    use crate::sndif::wire::GREFS_PER_DIR_PAGE;
    use crate::sndif::PAGE_SIZE;
    use crate::xen::shared::test_pages;
    use std::sync::Mutex;

    /// A guest that granted grefs 1..N. Gref 1 is a page directory that
    /// lists grefs 2, 3, ... (next = 0); every other mapping is fresh zeroed
    /// memory.
    struct FakeGrants(u32);
    impl GrantMapper for FakeGrants {
        fn map(&self, _domid: DomId, grefs: &[u32]) -> Result<SharedPages, HypervisorError> {
            if !grefs.iter().all(|g| *g != 0 && *g < self.0) {
                return Err(HypervisorError::refused(
                    HypervisorError::GRANT_MAP,
                    format!("{grefs:?}"),
                    "bad gref",
                ));
            }
            let pages = test_pages(grefs.len() * PAGE_SIZE);
            if grefs == [1] {
                for (i, g) in (2..self.0).take(GREFS_PER_DIR_PAGE).enumerate() {
                    pages.copy_in(4 + i * 4, &g.to_le_bytes());
                }
            }
            Ok(pages)
        }
    }

    /// Records the node properties it is given; takes only rate `.1` when
    /// set; counts the engines its nodes run now in `.2`, and the nodes it
    /// made in `.3`.
    #[derive(Default)]
    struct FakeHost(Mutex<Vec<PropsUpdate>>, Option<u32>, AtomicU64, AtomicU64);
    type PropsUpdate = (String, Vec<(String, String)>);
    struct FakeNode(Arc<FakeHost>, Option<DmaEngine>);
    impl HostNode for FakeNode {
        fn start(&mut self, engine: DmaEngine) -> anyhow::Result<()> {
            self.stop();
            self.0 .2.fetch_add(1, Ordering::Relaxed);
            self.1 = Some(engine);
            Ok(())
        }
        fn stop(&mut self) {
            if self.1.take().is_some() {
                self.0 .2.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
    impl HostBackend for Arc<FakeHost> {
        fn supports(&self, _: PcmFormat) -> bool {
            true
        }
        fn supports_rate(&self, rate: u32) -> bool {
            self.1.is_none_or(|only| only == rate)
        }
        fn attach(&self, _: StreamSpec) -> anyhow::Result<Box<dyn HostNode>> {
            self.3.fetch_add(1, Ordering::Relaxed);
            Ok(Box::new(FakeNode(self.clone(), None)))
        }
        fn update_properties(&self, node: &str, props: Vec<(String, String)>) {
            self.0.lock().unwrap().push((node.to_string(), props));
        }
    }

    fn stream() -> (PcmStream, Arc<FakeGrants>, Arc<FakeHost>) {
        stream_on(FakeHost::default())
    }

    fn stream_on(host: FakeHost) -> (PcmStream, Arc<FakeGrants>, Arc<FakeHost>) {
        let card = parse_card(&libxl_dump()).unwrap();
        let ident = Arc::new(StreamIdentity {
            domid: 7,
            domain: "vm".into(),
            vm_name: Some("vm".into()),
            devid: 0,
            card_long_name: card.long_name.clone(),
            pcm_index: 0,
            pcm_name: "dev0".into(),
            cfg: card.pcms[0].streams[0].clone(),
        });
        let grants = Arc::new(FakeGrants(64));
        let host = Arc::new(host);
        let registry = Registry::with_policy(Arc::new(host.clone()), None, Policy::default());
        let s = PcmStream::new(
            registry.register(ident),
            grants.clone(),
            Arc::new(host.clone()),
            Arc::new(test_pages(PAGE_SIZE)),
            Arc::new(CountingChannel::default()),
            false,
        );
        (s, grants, host)
    }

    fn send(s: &mut PcmStream, r: Request) -> Response {
        s.handle(&r.encode(1))
    }

    fn open_req(buffer_sz: u32) -> OpenReq {
        OpenReq {
            rate: 48000,
            format: PcmFormat::S16Le.wire(),
            channels: 2,
            buffer_sz,
            gref_directory: 1,
            period_sz: 1024,
        }
    }

    #[test]
    fn node_names_and_properties() {
        let (s, _, _) = stream();
        assert_eq!(s.ident.node_name(), "xen-vsnd.vm.0.0.playback");
        assert_eq!(s.ident.description(), "vm: Xen PV Sound dev0 (playback)");
        let spec = s.ident.spec();
        assert!(spec.props.contains(&("xen.unique-id".into(), "pw0-play".into())));
        assert!(spec.props.contains(&("xen.domid".into(), "7".into())));
    }

    #[test]
    fn open_validates_against_the_card() {
        let (mut s, _, _) = stream();
        let bad = [
            OpenReq { format: 22, ..open_req(4096) },
            OpenReq { format: PcmFormat::F32Le.wire(), ..open_req(4096) },
            OpenReq { rate: 96000, ..open_req(4096) },
            OpenReq { channels: 0, ..open_req(4096) },
            OpenReq { channels: 3, ..open_req(4096) },
            open_req(0),
            open_req(65536 + 4096),
            open_req(4098),
            OpenReq { period_sz: 8192, ..open_req(4096) },
            OpenReq { period_sz: 1022, ..open_req(4096) },
            OpenReq { gref_directory: 0, ..open_req(4096) },
        ];
        for o in bad {
            assert_eq!(send(&mut s, Request::Open(o)).status, -errno::EINVAL, "{o:?}");
        }
    }

    #[test]
    fn requests_before_open_are_refused() {
        let (mut s, _, _) = stream();
        for r in [
            Request::Trigger(trigger::START),
            Request::Write(RwReq { offset: 0, length: 4 }),
            Request::SetVolume(RwReq { offset: 0, length: 8 }),
            Request::GetVolume(RwReq { offset: 0, length: 8 }),
            Request::Mute(RwReq { offset: 0, length: 2 }),
        ] {
            assert_eq!(send(&mut s, r).status, -errno::EINVAL, "{r:?}");
        }
        assert_eq!(send(&mut s, Request::Close).status, 0, "CLOSE is idempotent");
        assert_eq!(send(&mut s, Request::Unknown(77)).status, -errno::ENOSYS);
    }

    #[test]
    fn directory_chain_is_followed_and_checked() {
        let (s, _, _) = stream();
        assert_eq!(s.read_directory(1, 4).ok(), Some(vec![2, 3, 4, 5]));
        // Directory page 1 says next = 0: a buffer that needs two is short.
        assert!(s.read_directory(1, GREFS_PER_DIR_PAGE + 1).is_err());
        // Any other page maps as zeroes: a list of gref 0, never mappable.
        assert_eq!(s.read_directory(2, 1).ok(), Some(vec![0]));
        assert!(s.read_directory(0, 1).is_err(), "unmappable directory page");
    }

    /// A host that gives up an open stream (a JACK server back at another
    /// rate): the guest's next WRITE and START fail with -EIO, a STOP and
    /// CLOSE still work, and a new OPEN runs normally.
    #[test]
    fn a_stream_its_host_gave_up_fails_until_opened_again() {
        let (mut s, _, _) = stream();
        assert_eq!(send(&mut s, Request::Open(open_req(8192))).status, 0);
        assert_eq!(send(&mut s, Request::Trigger(trigger::START)).status, 0);
        s.shared().unwrap().host_gone.store(true, Ordering::Release);
        assert_eq!(send(&mut s, Request::Write(RwReq { offset: 0, length: 4096 })).status, -errno::EIO);
        assert_eq!(send(&mut s, Request::Trigger(trigger::STOP)).status, 0);
        assert_eq!(send(&mut s, Request::Trigger(trigger::START)).status, -errno::EIO);
        assert_eq!(send(&mut s, Request::Close).status, 0);
        assert_eq!(send(&mut s, Request::Open(open_req(8192))).status, 0);
        assert_eq!(send(&mut s, Request::Write(RwReq { offset: 0, length: 4096 })).status, 0);
        assert_eq!(send(&mut s, Request::Trigger(trigger::START)).status, 0);
    }

    /// hw_params twice: the frontend prepares anew with a second OPEN and
    /// no CLOSE. It replaces the open stream, in its new geometry.
    #[test]
    fn a_second_open_without_close_reopens() {
        let (mut s, _, host) = stream();
        assert_eq!(send(&mut s, Request::Open(open_req(8192))).status, 0);
        assert_eq!(host.2.load(Ordering::Relaxed), 1);
        let again = OpenReq { rate: 44100, period_sz: 2048, ..open_req(16384) };
        assert_eq!(send(&mut s, Request::Open(again)).status, 0);
        assert_eq!(host.2.load(Ordering::Relaxed), 1, "the first engine was stopped");
        assert_eq!(host.3.load(Ordering::Relaxed), 1, "one node for the connection");
        let geom = s.opened.as_ref().map(|o| o.geom);
        assert_eq!(geom.map(|g| (g.rate, g.buffer_bytes, g.period_bytes)), Some((44100, 16384, 2048)));
        assert_eq!(send(&mut s, Request::Write(RwReq { offset: 12288, length: 4096 })).status, 0);
        // A refused OPEN on an open stream leaves it closed, as CLOSE + OPEN.
        assert_eq!(send(&mut s, Request::Open(OpenReq { rate: 96000, ..again })).status, -errno::EINVAL);
        assert_eq!(host.2.load(Ordering::Relaxed), 0);
        assert_eq!(send(&mut s, Request::Trigger(trigger::START)).status, -errno::EINVAL);
    }

    /// A HW_PARAM_QUERY that asks for anything.
    fn widest_query() -> HwParam {
        HwParam {
            formats: u64::MAX,
            rates: (8000, 192000),
            channels: (1, 8),
            buffer_frames: (1, u32::MAX),
            period_frames: (1, u32::MAX),
        }
    }

    #[test]
    fn hw_param_query_narrows_to_the_card() {
        let (mut s, _, _) = stream();
        let q = widest_query();
        let r = send(&mut s, Request::HwParamQuery(q));
        assert_eq!(r.status, 0);
        let h = r.hw_param.unwrap();
        assert_eq!(h.formats, PcmFormat::S16Le.mask_bit() | PcmFormat::S32Le.mask_bit());
        assert_eq!(h.rates, (44100, 48000));
        assert_eq!(h.channels, (1, 2));
        assert_eq!(h.buffer_frames, (32, 65536 / 2));
        assert_eq!(h.period_frames, (16, 65536 / 4));
        let none = HwParam { rates: (96000, 192000), ..q };
        let r = send(&mut s, Request::HwParamQuery(none));
        assert_eq!((r.status, r.hw_param), (-errno::EINVAL, None));
    }

    #[test]
    fn a_host_of_one_rate_narrows_query_and_open() {
        // The card offers 44100 and 48000; a JACK server runs at 48000.
        let (mut s, _, _) =
            stream_on(FakeHost(Mutex::default(), Some(48000), AtomicU64::new(0), AtomicU64::new(0)));
        let q = widest_query();
        let r = send(&mut s, Request::HwParamQuery(q));
        assert_eq!(r.hw_param.map(|h| h.rates), Some((48000, 48000)));
        let at_44k = OpenReq { rate: 44100, ..open_req(4096) };
        assert_eq!(send(&mut s, Request::Open(at_44k)).status, -errno::EINVAL);
    }

    #[test]
    fn volume_and_mute_round_trip() {
        let (mut s, _, host) = stream();
        // Fake buffer pages are each fresh memory: start on one buffer of
        // our own, as `open` does after mapping the guest's.
        let geom = s.validate_open(&open_req(4096)).ok().unwrap();
        let buffer = Arc::new(test_pages(PAGE_SIZE));
        assert!(s.start(geom, buffer.clone()).is_ok());

        buffer.copy_in(100, &(-6000i32).to_le_bytes());
        buffer.copy_in(104, &(3000i32).to_le_bytes());
        assert_eq!(send(&mut s, Request::SetVolume(RwReq { offset: 100, length: 8 })).status, 0);
        let g = |c| s.record.controls.guest_gain(c);
        assert!((g(0) - 0.501).abs() < 0.001 && g(1) == 1.0, "{} {}", g(0), g(1));
        assert_eq!(send(&mut s, Request::GetVolume(RwReq { offset: 200, length: 8 })).status, 0);
        let mut back = [0u8; 8];
        buffer.copy_out(200, &mut back);
        assert_eq!(back[..4], (-6000i32).to_le_bytes());
        assert_eq!(back[4..], 0i32.to_le_bytes(), "gain above 0 dB is clamped");
        buffer.copy_in(300, &[0, 1]);
        assert_eq!(send(&mut s, Request::Mute(RwReq { offset: 300, length: 2 })).status, 0);
        assert_eq!(s.record.controls.guest_gain(1), 0.0);
        assert_eq!(send(&mut s, Request::Unmute(RwReq { offset: 300, length: 2 })).status, 0);
        assert_eq!(s.record.controls.guest_gain(1), 1.0);
        // The guest's volume is xen-vsnd's gain: the node was never told.
        assert!(host.0.lock().unwrap().is_empty());
        assert_eq!(
            send(&mut s, Request::SetVolume(RwReq { offset: 4090, length: 8 })).status,
            -errno::EINVAL
        );
        assert_eq!(send(&mut s, Request::SetVolume(RwReq { offset: 0, length: 4 })).status, -errno::EINVAL);
        assert_eq!(
            send(&mut s, Request::Write(RwReq { offset: u32::MAX, length: 2 })).status,
            -errno::EINVAL
        );
        assert_eq!(
            send(&mut s, Request::Read(RwReq { offset: 0, length: 2 })).status,
            -errno::EINVAL,
            "READ on playback"
        );
        assert_eq!(send(&mut s, Request::Write(RwReq { offset: 0, length: 4096 })).status, 0);
        assert_eq!(s.shared().unwrap().guest_bytes.load(Ordering::Relaxed), 4096);
        assert_eq!(send(&mut s, Request::Trigger(9)).status, -errno::EINVAL);
        assert_eq!(send(&mut s, Request::Trigger(trigger::START)).status, 0);
        assert!(s.shared().unwrap().running.load(Ordering::Relaxed));
        assert_eq!(send(&mut s, Request::Trigger(trigger::PAUSE)).status, 0);
        assert!(!s.shared().unwrap().running.load(Ordering::Relaxed));
    }
}
