//! One guest PCM stream: answers its requests (OPEN, CLOSE, READ, WRITE,
//! TRIGGER, HW_PARAM_QUERY, volume and mute) and owns its host stream.
//! Every request field comes from the guest and is validated here.

use super::ratelimit::LogLimiter;
use crate::dma::{DmaEngine, DmaShared, EventRing, Geometry};
use crate::host::{HostBackend, HostStream, StreamSpec};
use crate::sndif::config::limits;
use crate::sndif::wire::{pages_for, GREFS_PER_DIR_PAGE, MSG_SIZE};
use crate::sndif::{
    errno, trigger, HwParam, OpenReq, PcmFormat, Request, Response, RwReq, StreamConfig, StreamKind,
};
use crate::xen::{DomId, EventChannel, GrantMapper, SharedPages};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Who a stream belongs to; used for node names, properties and logs.
#[derive(Debug, Clone)]
pub struct StreamIdentity {
    pub domid: DomId,
    pub domain: String,
    pub devid: u32,
    pub card_long_name: String,
    pub pcm_index: u32,
    pub pcm_name: String,
    pub cfg: StreamConfig,
}

impl StreamIdentity {
    pub fn node_name(&self) -> String {
        format!(
            "xen-vsnd.{}.{}.{}.{}",
            self.domain,
            self.devid,
            self.pcm_index,
            self.stream_suffix()
        )
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
        let pcm = if self.pcm_name.is_empty() {
            format!("pcm{}", self.pcm_index)
        } else {
            self.pcm_name.clone()
        };
        format!(
            "{}: {} {} ({})",
            self.domain,
            self.card_long_name,
            pcm,
            self.cfg.kind.as_str()
        )
    }

    pub fn spec(&self) -> StreamSpec {
        StreamSpec {
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

fn refuse<T>(status: i32, why: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(status, why.into()))
}

struct Opened {
    geom: Geometry,
    buffer: Arc<SharedPages>,
    shared: Arc<DmaShared>,
    host: Box<dyn HostStream>,
    /// Per-channel volume in 0.001 dB, and mute flags (SET_VOLUME/MUTE).
    volume_mdb: Vec<i32>,
    muted: Vec<bool>,
}

pub struct PcmStream {
    pub ident: Arc<StreamIdentity>,
    grants: Arc<dyn GrantMapper>,
    host: Arc<dyn HostBackend>,
    evt_page: Arc<SharedPages>,
    evt_channel: Arc<dyn EventChannel>,
    report_delay: bool,
    opened: Option<Opened>,
    log: LogLimiter,
}

/// Smallest period the backend accepts, in frames.
const MIN_PERIOD_FRAMES: u32 = 16;

impl PcmStream {
    pub fn new(
        ident: Arc<StreamIdentity>,
        grants: Arc<dyn GrantMapper>,
        host: Arc<dyn HostBackend>,
        evt_page: Arc<SharedPages>,
        evt_channel: Arc<dyn EventChannel>,
        report_delay: bool,
    ) -> PcmStream {
        PcmStream {
            ident,
            grants,
            host,
            evt_page,
            evt_channel,
            report_delay,
            opened: None,
            log: LogLimiter::new(Duration::from_secs(10)),
        }
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
                self.warn(&why);
                hw_param = None;
                status
            }
        };
        Response {
            id,
            operation,
            status,
            hw_param,
        }
    }

    /// The geometry an OPEN asks for, checked against config and host.
    fn validate_open(&self, o: &OpenReq) -> Result<Geometry, Refusal> {
        let p = &self.ident.cfg.params;
        let Some(format) = PcmFormat::from_wire(o.format) else {
            return refuse(-errno::EINVAL, format!("OPEN: unknown format {}", o.format));
        };
        if !p.formats.contains(&format) || !self.host.supports(format) {
            return refuse(
                -errno::EINVAL,
                format!("OPEN: format {} not offered", format.name()),
            );
        }
        if !p.rates.contains(&o.rate) {
            return refuse(-errno::EINVAL, format!("OPEN: rate {} not offered", o.rate));
        }
        let ch = o.channels as u32;
        if ch < p.channels_min || ch > p.channels_max {
            return refuse(-errno::EINVAL, format!("OPEN: {ch} channels not offered"));
        }
        let geom = Geometry {
            format,
            rate: o.rate,
            channels: ch,
            buffer_bytes: o.buffer_sz,
            period_bytes: o.period_sz,
        };
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
    /// `count` buffer grefs. Refuses chains that are too short, too long,
    /// loop, or whose pages cannot be mapped.
    fn read_directory(&self, first: u32, count: usize) -> Result<Vec<u32>, Refusal> {
        let dirs = count.div_ceil(GREFS_PER_DIR_PAGE);
        let mut grefs = Vec::with_capacity(count);
        let mut seen = HashSet::new();
        let mut dir = first;
        for _ in 0..dirs {
            if !seen.insert(dir) {
                return refuse(-errno::EINVAL, "OPEN: page directory loops");
            }
            let page = self.grants.map(self.ident.domid, &[dir]).map_err(|e| {
                Refusal(-errno::EINVAL, format!("OPEN: directory page {dir}: {e:#}"))
            })?;
            // Copy the page out once; the guest may keep changing it.
            let mut raw = vec![0u8; crate::sndif::PAGE_SIZE];
            page.copy_out(0, &mut raw);
            let word = |i: usize| {
                u32::from_le_bytes([raw[i * 4], raw[i * 4 + 1], raw[i * 4 + 2], raw[i * 4 + 3]])
            };
            let next = word(0);
            let take = GREFS_PER_DIR_PAGE.min(count - grefs.len());
            grefs.extend((1..=take).map(word));
            if grefs.len() == count {
                if next != 0 {
                    return refuse(
                        -errno::EINVAL,
                        "OPEN: page directory longer than the buffer",
                    );
                }
                return Ok(grefs);
            }
            if next == 0 {
                return refuse(
                    -errno::EINVAL,
                    "OPEN: page directory shorter than the buffer",
                );
            }
            dir = next;
        }
        refuse(
            -errno::EINVAL,
            "OPEN: page directory shorter than the buffer",
        )
    }

    fn open(&mut self, o: &OpenReq) -> Result<(), Refusal> {
        if self.opened.is_some() {
            return refuse(-errno::EBUSY, "OPEN: stream already open");
        }
        let geom = self.validate_open(o)?;
        let grefs = self.read_directory(o.gref_directory, pages_for(o.buffer_sz))?;
        let buffer = Arc::new(
            self.grants
                .map(self.ident.domid, &grefs)
                .map_err(|e| Refusal(-errno::EINVAL, format!("OPEN: buffer: {e:#}")))?,
        );
        let shared = Arc::new(DmaShared::default());
        let engine = DmaEngine::new(
            geom,
            buffer.clone(),
            EventRing::new(self.evt_page.clone()),
            self.evt_channel.clone(),
            shared.clone(),
            self.report_delay,
        );
        let host = self
            .host
            .open(self.ident.spec(), engine)
            .map_err(|e| Refusal(-errno::EIO, format!("OPEN: host stream: {e:#}")))?;
        let n = geom.channels as usize;
        tracing::info!(
            stream = %self.ident.node_name(),
            rate = geom.rate, channels = geom.channels, format = geom.format.name(),
            buffer = geom.buffer_bytes, period = geom.period_bytes, "opened"
        );
        self.opened = Some(Opened {
            geom,
            buffer,
            shared,
            host,
            volume_mdb: vec![0; n],
            muted: vec![false; n],
        });
        Ok(())
    }

    /// Closes the host stream (the callback is gone when this returns) and
    /// releases the buffer mapping.
    pub fn close(&mut self) {
        if let Some(o) = self.opened.take() {
            let s = &o.shared;
            tracing::info!(
                stream = %self.ident.node_name(),
                position = s.position.load(Ordering::Relaxed),
                cycles = s.cycles.load(Ordering::Relaxed),
                underruns = s.underruns.load(Ordering::Relaxed),
                overruns = s.overruns.load(Ordering::Relaxed),
                events_dropped = s.events_dropped.load(Ordering::Relaxed),
                "closed"
            );
            drop(o.host);
        }
    }

    fn opened(&self, what: &str) -> Result<&Opened, Refusal> {
        self.opened
            .as_ref()
            .ok_or_else(|| Refusal(-errno::EINVAL, format!("{what} before OPEN")))
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
        let what = if dir == StreamKind::Playback {
            "WRITE"
        } else {
            "READ"
        };
        if self.ident.cfg.kind != dir {
            return refuse(
                -errno::EINVAL,
                format!("{what} on a {} stream", self.ident.cfg.kind.as_str()),
            );
        }
        let o = self.opened(what)?;
        Self::check_range(o, rw, what)?;
        o.shared
            .guest_bytes
            .fetch_add(rw.length as u64, Ordering::AcqRel);
        Ok(())
    }

    fn trigger(&mut self, t: u8) -> Result<(), Refusal> {
        let o = self.opened("TRIGGER")?;
        let run = match t {
            trigger::START | trigger::RESUME => true,
            trigger::PAUSE | trigger::STOP => false,
            other => return refuse(-errno::EINVAL, format!("TRIGGER: unknown type {other}")),
        };
        o.shared.running.store(run, Ordering::Release);
        if run {
            o.host.set_active(true);
        }
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
            .filter(|r| *r >= q.rates.0 && *r <= q.rates.1)
            .collect();
        let ch = (
            q.channels.0.max(p.channels_min),
            q.channels.1.min(p.channels_max),
        );
        if formats == 0 || rates.is_empty() || ch.0 > ch.1 {
            return refuse(
                -errno::EINVAL,
                "HW_PARAM_QUERY: no configuration satisfies the request",
            );
        }
        let min_sample = PcmFormat::all()
            .filter(|f| formats & f.mask_bit() != 0)
            .map(|f| f.sample_bytes() as u32)
            .min()
            .unwrap_or(1);
        let max_frames = p.buffer_size.min(limits::MAX_BUFFER_SIZE) / (min_sample * ch.0);
        let buf = (
            q.buffer_frames.0.max(2 * MIN_PERIOD_FRAMES),
            q.buffer_frames.1.min(max_frames),
        );
        let per = (
            q.period_frames.0.max(MIN_PERIOD_FRAMES),
            q.period_frames.1.min(max_frames / 2),
        );
        if buf.0 > buf.1 || per.0 > per.1 {
            return refuse(
                -errno::EINVAL,
                "HW_PARAM_QUERY: buffer/period sizes impossible",
            );
        }
        Ok(HwParam {
            formats,
            rates: (rates[0], rates[rates.len() - 1]),
            channels: ch,
            buffer_frames: buf,
            period_frames: per,
        })
    }

    fn apply_volume(o: &Opened) {
        let gains = o
            .volume_mdb
            .iter()
            .zip(&o.muted)
            .map(|(mdb, m)| {
                if *m {
                    0.0
                } else {
                    10f32.powf(*mdb as f32 / 20_000.0).min(1.0)
                }
            })
            .collect();
        o.host.set_volume(gains);
    }

    fn set_volume(&mut self, rw: RwReq) -> Result<(), Refusal> {
        let o = self
            .opened
            .as_mut()
            .ok_or_else(|| Refusal(-errno::EINVAL, "SET_VOLUME before OPEN".into()))?;
        Self::check_range(o, rw, "SET_VOLUME")?;
        let n = o.volume_mdb.len();
        if (rw.length as usize) < n * 4 {
            return refuse(-errno::EINVAL, "SET_VOLUME: fewer values than channels");
        }
        let mut raw = vec![0u8; n * 4];
        o.buffer.copy_out(rw.offset as usize, &mut raw);
        for (i, v) in o.volume_mdb.iter_mut().enumerate() {
            // Volumes above 0 dB are clamped: the backend only attenuates.
            *v = i32::from_le_bytes([raw[i * 4], raw[i * 4 + 1], raw[i * 4 + 2], raw[i * 4 + 3]])
                .min(0);
        }
        Self::apply_volume(o);
        Ok(())
    }

    fn get_volume(&mut self, rw: RwReq) -> Result<(), Refusal> {
        let o = self.opened("GET_VOLUME")?;
        Self::check_range(o, rw, "GET_VOLUME")?;
        if (rw.length as usize) < o.volume_mdb.len() * 4 {
            return refuse(
                -errno::EINVAL,
                "GET_VOLUME: buffer smaller than the channels",
            );
        }
        let raw: Vec<u8> = o.volume_mdb.iter().flat_map(|v| v.to_le_bytes()).collect();
        o.buffer.copy_in(rw.offset as usize, &raw);
        Ok(())
    }

    fn mute(&mut self, rw: RwReq, mute: bool) -> Result<(), Refusal> {
        let o = self
            .opened
            .as_mut()
            .ok_or_else(|| Refusal(-errno::EINVAL, "MUTE before OPEN".into()))?;
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
        Self::apply_volume(o);
        Ok(())
    }
}

impl Drop for PcmStream {
    fn drop(&mut self) {
        self.close();
    }
}
