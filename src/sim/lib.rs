//! A simulated guest: connects to a loopback backend as a new domain with one
//! vsnd card (one pcm, a playback and a capture stream), behaves like Linux's
//! `snd_xen_front` plus a simple ALSA application on top, and reports what it
//! saw. `--misbehave` turns it into a hostile guest for robustness tests.

#![forbid(unsafe_code)]

pub mod front;
pub mod latency;
pub mod misbehave;
pub mod signal;

use anyhow::{bail, Context};
use front::{FrontStream, FrontendKernel, PeriodRule, StreamReport};
use serde::Serialize;
use signal::Signal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use xen_sndif::{keys, trigger, OpenReq, PcmFormat, Request, XenbusState};
use xen_vsnd::xen::loopback::client::GuestConn;

/// Pages of grantable memory a simulated guest brings (16 MiB).
const GUEST_PAGES: u32 = 4096;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct SimOptions {
    /// Loopback socket of `xen-vsnd serve --transport loopback:<path>`.
    #[arg(long)]
    pub connect: PathBuf,
    /// The guest's domain name (appears in node names).
    #[arg(long, default_value = "sim-guest")]
    pub domain: String,
    #[arg(long, default_value_t = 48000)]
    pub rate: u32,
    #[arg(long, default_value_t = 2)]
    pub channels: u8,
    /// Period in frames.
    #[arg(long, default_value_t = 1024)]
    pub period: u32,
    /// Buffer in periods.
    #[arg(long, default_value_t = 4)]
    pub periods: u32,
    /// Play a generated signal on the playback stream.
    #[arg(long, value_enum)]
    pub play: Option<Signal>,
    /// Play a WAV file (16-bit PCM or float) instead of a generated signal.
    #[arg(long, conflicts_with = "play")]
    pub play_wav: Option<PathBuf>,
    /// Seconds of generated signal to play.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Record the capture stream into this WAV file.
    #[arg(long)]
    pub capture_wav: Option<PathBuf>,
    /// Seconds to capture.
    #[arg(long, default_value_t = 3.0)]
    pub capture_seconds: f64,
    /// Period-interrupt rule of the simulated frontend driver.
    #[arg(long, value_enum, default_value = "upstream")]
    pub period_rule: PeriodRule,
    /// Event handling of the simulated frontend: Linux 4.18 to 7.1 (event
    /// ids counted from the channel's setup) or 7.2 and later (ids from 0
    /// at every stream clear, the channel connected only while prepared).
    #[arg(long, value_enum, default_value = "4.18")]
    pub frontend_kernel: FrontendKernel,
    /// The applications set their hardware parameters twice, as ALSA
    /// allows: the frontend sends a second OPEN without CLOSE.
    #[arg(long)]
    pub hw_params_twice: bool,
    /// Opt in to the delay extension (`feature-delay-report`).
    #[arg(long)]
    pub delay_report: bool,
    /// Stay connected this many seconds after the streams are done.
    #[arg(long, default_value_t = 0.0)]
    pub linger: f64,
    /// Wait this many seconds after the handshake before the applications
    /// start (time to link the guest's nodes by hand).
    #[arg(long, default_value_t = 0.0)]
    pub start_delay: f64,
    /// Sample rates of the rounds (--reconnects): round i plays at the
    /// i-th, cycling; --rate when not given.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<u32>,
    /// Behave as a hostile guest in one way and report how the backend reacted.
    #[arg(long, value_enum)]
    pub misbehave: Option<misbehave::Misbehave>,
    /// After playing, close the frontend and connect again this many times
    /// (as unloading and reloading the guest driver does), playing each time.
    #[arg(long, default_value_t = 0)]
    pub reconnects: u32,
    /// How each of --reconnects starts over.
    #[arg(long, value_enum, default_value = "closing")]
    pub reconnect_mode: ReconnectMode,
    /// Set the playback volume (0.001 dB steps) with SET_VOLUME after OPEN,
    /// and read it back with GET_VOLUME.
    #[arg(long, allow_hyphen_values = true)]
    pub set_volume_mdb: Option<i32>,
    /// Latency self-test: play impulses for --seconds while capturing, and
    /// compare the measured round trip with the reported delays. Link the
    /// guest's playback node to its capture node (or through a sink and its
    /// monitor) first. Implies --delay-report.
    #[arg(long)]
    pub measure_latency: bool,
    /// Largest |measured - reported| in frames that --measure-latency accepts.
    #[arg(long, default_value_t = 1)]
    pub latency_tolerance: u32,
    /// Pause playback (TRIGGER PAUSE) this many seconds after it starts...
    #[arg(long)]
    pub pause_at: Option<f64>,
    /// ...for this long, then TRIGGER RESUME.
    #[arg(long, default_value_t = 0.5)]
    pub pause_for: f64,
    /// Stall this many seconds after playback starts: neither write data
    /// nor consume position events (a hung guest)...
    #[arg(long)]
    pub stall_at: Option<f64>,
    /// ...for this long.
    #[arg(long, default_value_t = 1.0)]
    pub stall_for: f64,
    /// buffer-size the "toolstack" writes for the card (bytes).
    #[arg(long, default_value_t = 65536)]
    pub card_buffer_size: u32,
    /// Hostile identity: write this other VM's name into every key the
    /// guest can write (unique-ids, card and PCM names) and try to
    /// overwrite its own domain name, which dom0 owns.
    #[arg(long, value_name = "VM")]
    pub impersonate: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub domain: String,
    pub domid: u32,
    pub playback: Option<StreamReport>,
    pub capture: Option<StreamReport>,
    pub misbehave: Option<misbehave::Outcome>,
    /// Frontend close/re-handshake rounds completed (`--reconnects`).
    pub reconnects: u32,
    /// What GET_VOLUME returned after `--set-volume-mdb`.
    pub volume_mdb: Option<Vec<i32>>,
    /// From the guest's connection to both ends Connected.
    pub handshake_ms: u64,
    pub latency: Option<latency::LatencyReport>,
}

/// How a simulated frontend starts over with new rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReconnectMode {
    /// Closing, wait for InitWait, Initialising, new handshake (a driver
    /// unloaded and loaded again).
    Closing,
    /// New rings published and Initialised written while the backend is
    /// Connected, with no state in between: what the backend sees when the
    /// upstream frontend re-runs its InitWait handling faster than the
    /// backend's watch fires.
    Republish,
    /// Keep the connection; only the stream is opened again (an
    /// application playing a second file).
    Reopen,
}

/// What libxl writes for `vsnd = [[ 'CARD, ...', 'PCM, name=dev0', 'STREAM,
/// unique-id=<domain>-play, type=p', 'STREAM, unique-id=<domain>-cap, type=c' ]]`.
fn card_entries(o: &SimOptions) -> Vec<(String, String)> {
    let kv = |k: &str, v: String| (k.to_string(), v);
    // A guest may write its frontend directory: an impersonator puts the
    // other VM's name everywhere it can.
    let who = o.impersonate.as_deref().unwrap_or(&o.domain);
    let name = |n: &str| o.impersonate.clone().unwrap_or_else(|| n.to_string());
    vec![
        kv(keys::SHORT_NAME, name("XenSnd")),
        kv(keys::LONG_NAME, name("Xen PV Sound")),
        kv(keys::SAMPLE_RATES, "44100,48000".into()),
        kv(keys::SAMPLE_FORMATS, "s16_le,s32_le".into()),
        kv(keys::CHANNELS_MIN, "1".into()),
        kv(keys::CHANNELS_MAX, "2".into()),
        kv(keys::BUFFER_SIZE, o.card_buffer_size.to_string()),
        kv("0/name", name("dev0")),
        kv("0/0/unique-id", format!("{who}-play")),
        kv("0/0/type", keys::TYPE_PLAYBACK.into()),
        kv("0/1/unique-id", format!("{who}-cap")),
        kv("0/1/type", keys::TYPE_CAPTURE.into()),
    ]
}

pub struct Guest {
    pub conn: GuestConn,
    pub handshake: Duration,
    pub fe: String,
    pub be: String,
    pub playback: FrontStream,
    pub capture: FrontStream,
}

fn state_key(dir: &str) -> String {
    format!("{dir}/{}", keys::STATE)
}

/// Waits until the backend's state is `st` (bounded).
fn wait_backend(conn: &mut GuestConn, be: &str, st: XenbusState) -> anyhow::Result<()> {
    conn.wait_for_value(&state_key(be), st.as_str(), HANDSHAKE_TIMEOUT)
        .with_context(|| format!("backend never reached {st:?}"))
}

/// The frontend's half of the handshake once the backend is in InitWait:
/// rings, event pages and channels for both streams, published in
/// xenstore; then Initialised, and Connected after the backend.
fn handshake(
    o: &SimOptions,
    conn: &mut GuestConn,
    fe: &str,
    be: &str,
) -> anyhow::Result<(FrontStream, FrontStream)> {
    wait_backend(conn, be, XenbusState::InitWait)?;
    let streams = publish(o, conn, fe)?;
    // A backend that cannot connect says why and goes Closed: a frontend
    // gives up then, instead of waiting.
    let (connected, closed) = (XenbusState::Connected.as_str(), XenbusState::Closed.as_str());
    let st = conn
        .wait_for_any(&state_key(be), &[connected, closed], HANDSHAKE_TIMEOUT)
        .context("backend never reached Connected")?;
    if st == closed {
        let why = conn.read(&format!("{be}/error"))?.unwrap_or_default();
        bail!("the backend refused the connection: {why}");
    }
    conn.write(&state_key(fe), XenbusState::Connected.as_str())?;
    Ok(streams)
}

/// New rings, event pages and channels for both streams, published in
/// xenstore, then Initialised.
fn publish(o: &SimOptions, conn: &mut GuestConn, fe: &str) -> anyhow::Result<(FrontStream, FrontStream)> {
    let playback = FrontStream::new(conn, o.frontend_kernel)?;
    let mut capture = FrontStream::new(conn, o.frontend_kernel)?;
    capture.playback = false;
    for (idx, s) in [(0, &playback), (1, &capture)] {
        let p = format!("{fe}/0/{idx}");
        conn.write(&format!("{p}/{}", keys::RING_REF), &s.ring_gref.to_string())?;
        conn.write(&format!("{p}/{}", keys::EVT_CHNL), &s.req_port.to_string())?;
        conn.write(&format!("{p}/{}", keys::EVT_RING_REF), &s.evt_gref.to_string())?;
        conn.write(&format!("{p}/{}", keys::EVT_EVT_CHNL), &s.evt_port.to_string())?;
    }
    if o.delay_report || o.measure_latency {
        conn.write(&format!("{fe}/{}", keys::FEATURE_DELAY_REPORT), "1")?;
    }
    conn.write(&state_key(fe), XenbusState::Initialised.as_str())?;
    Ok((playback, capture))
}

/// Connects as a new domain and performs the xenbus handshake.
pub fn connect(o: &SimOptions) -> anyhow::Result<Guest> {
    let start = Instant::now();
    let mut conn = GuestConn::connect(&o.connect, &o.domain, GUEST_PAGES, card_entries(o))?;
    if let Some(other) = &o.impersonate {
        // dom0 owns the domain's name: this must be refused.
        let own = format!("/local/domain/{}", conn.domid);
        for key in ["name", "vm", "device/vsnd/0/name", "data/name"] {
            let r = conn.write(&format!("{own}/{key}"), other);
            tracing::info!(
                "impersonating {other}: writing {own}/{key}: {}",
                if r.is_ok() { "done" } else { "refused" }
            );
        }
    }
    let fe = format!("/local/domain/{}/device/vsnd/0", conn.domid);
    let be = conn.read(&format!("{fe}/{}", keys::BACKEND))?.context("no backend path")?;
    let (playback, capture) = handshake(o, &mut conn, &fe, &be)?;
    Ok(Guest { conn, handshake: start.elapsed(), fe, be, playback, capture })
}

impl Guest {
    /// What the Linux frontend does when its module is removed and loaded
    /// again: Closing, wait for the backend to be back in InitWait, then a
    /// new handshake with new rings and channels.
    pub fn reconnect(&mut self, o: &SimOptions) -> anyhow::Result<()> {
        let (p, c) = match o.reconnect_mode {
            ReconnectMode::Reopen => return Ok(()),
            ReconnectMode::Closing => {
                self.conn.write(&state_key(&self.fe), XenbusState::Closing.as_str())?;
                wait_backend(&mut self.conn, &self.be, XenbusState::InitWait)?;
                self.conn.write(&state_key(&self.fe), XenbusState::Initialising.as_str())?;
                handshake(o, &mut self.conn, &self.fe, &self.be)?
            }
            ReconnectMode::Republish => {
                // The backend is Connected already: like the upstream
                // frontend, wait for it to write Connected once more (the
                // value does not change; the write does).
                let be_state = state_key(&self.be);
                self.conn.watch_from_now(&be_state, "rewrite", HANDSHAKE_TIMEOUT)?;
                let streams = publish(o, &mut self.conn, &self.fe)?;
                self.conn
                    .next_watch_with("rewrite", Instant::now() + HANDSHAKE_TIMEOUT)
                    .context("the backend never answered the new rings")?;
                if self.conn.read(&be_state)?.as_deref() != Some(XenbusState::Connected.as_str()) {
                    bail!("the backend did not reconnect to the new rings");
                }
                self.conn.write(&state_key(&self.fe), XenbusState::Connected.as_str())?;
                streams
            }
        };
        self.playback = p;
        self.capture = c;
        Ok(())
    }
}

pub fn open_req(o: &SimOptions, s: &FrontStream, format: PcmFormat) -> OpenReq {
    let frame = format.sample_bytes() as u32 * o.channels as u32;
    OpenReq {
        rate: o.rate,
        format: format.wire(),
        channels: o.channels,
        buffer_sz: s.buffer_bytes,
        gref_directory: s.dir_grefs.first().copied().unwrap_or(0),
        period_sz: o.period * frame,
    }
}

/// Runs the guest as configured and returns its report.
pub fn run(o: &SimOptions) -> anyhow::Result<Report> {
    let mut g = connect(o)?;
    let mut report = Report {
        domain: o.domain.clone(),
        domid: g.conn.domid,
        handshake_ms: g.handshake.as_millis() as u64,
        ..Default::default()
    };
    if let Some(m) = o.misbehave {
        report.misbehave = Some(misbehave::run(m, o, &mut g)?);
        return Ok(report);
    }
    if o.measure_latency {
        report.latency = Some(measure_latency(o, &mut g)?);
        return Ok(report);
    }
    let source: Option<Vec<i16>> = match (&o.play_wav, o.play) {
        (Some(p), _) => {
            let w = signal::read_wav(p)?;
            if w.channels != o.channels as u32 || w.rate != o.rate {
                bail!("{}: {} Hz x{} does not match --rate/--channels", p.display(), w.rate, w.channels);
            }
            Some(w.samples)
        }
        (None, Some(sig)) => {
            Some(signal::generate(sig, o.rate, o.channels as u32, (o.seconds * o.rate as f64) as usize))
        }
        (None, None) => None,
    };
    let mut captured = Vec::new();
    if o.start_delay > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(o.start_delay));
    }
    for round in 0..=o.reconnects {
        if round > 0 {
            g.reconnect(o)?;
        }
        let rate = if o.rates.is_empty() { o.rate } else { o.rates[round as usize % o.rates.len()] };
        let ro = SimOptions { rate, ..o.clone() };
        let capture_frames = o.capture_wav.as_ref().map(|_| (o.capture_seconds * rate as f64) as u64);
        run_streams(&ro, &mut g, source.as_deref(), capture_frames, &mut captured)?;
        report.reconnects = round;
    }
    if let Some(path) = &o.capture_wav {
        signal::write_wav_s16(path, o.rate, o.channels as u32, &captured)?;
        report.capture = Some(g.capture.report.clone());
    }
    if source.is_some() {
        report.playback = Some(g.playback.report.clone());
    }
    report.volume_mdb = g.playback.volume_mdb.clone();
    if o.linger > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(o.linger));
    }
    Ok(report)
}

/// Plays an impulse train while capturing and analyses the round trip.
fn measure_latency(o: &SimOptions, g: &mut Guest) -> anyhow::Result<latency::LatencyReport> {
    let frames = (o.seconds * o.rate as f64) as usize;
    let (mut source, played_at) = latency::impulse_train(o.rate, o.channels as u32, frames);
    // Keep playing silence until the capture is done: with the two nodes
    // linked only to each other, closing the playback would stop the capture.
    source.resize(source.len() + o.rate as usize * o.channels as usize, 0);
    g.playback.event_log = Some(Vec::new());
    g.capture.event_log = Some(Vec::new());
    // Capture a little longer than the playback, for the last impulse.
    let capture_frames = frames as u64 + o.rate as u64 / 2;
    let mut captured = Vec::new();
    run_streams(o, g, Some(&source), Some(capture_frames), &mut captured)?;
    let play_log = g.playback.event_log.take().unwrap_or_default();
    let cap_log = g.capture.event_log.take().unwrap_or_default();
    latency::analyse(&played_at, &captured, o.channels as u32, o.rate, &play_log, &cap_log)
}

/// One session of the two applications: playback and capture at once.
fn run_streams(
    o: &SimOptions,
    g: &mut Guest,
    source: Option<&[i16]>,
    capture_frames: Option<u64>,
    captured: &mut Vec<i16>,
) -> anyhow::Result<()> {
    let frame = 2 * o.channels as u32;
    let buffer = o.period * o.periods * frame;
    g.playback.alloc_buffer(&mut g.conn, buffer)?;
    g.capture.alloc_buffer(&mut g.conn, buffer)?;
    let Guest { playback, capture, .. } = g;
    // Playback ends early once the capture is done, so that neither stream
    // outlives the other when they are linked only to each other.
    let capture_done = AtomicBool::new(false);
    let done = &capture_done;
    std::thread::scope(|sc| -> anyhow::Result<()> {
        let p = source.map(|src| sc.spawn(move || play(o, playback, src, done)));
        let c = capture_frames.map(|n| {
            sc.spawn(move || {
                let r = record(o, capture, n);
                done.store(true, Ordering::Release);
                r
            })
        });
        if let Some(p) = p {
            p.join().map_err(|_| anyhow::anyhow!("playback thread panicked"))??;
        }
        if let Some(c) = c {
            captured.extend(c.join().map_err(|_| anyhow::anyhow!("capture thread panicked"))??);
        }
        Ok(())
    })
}

/// OPEN in the simulated applications' format: S16_LE at the chosen rate
/// (twice, without CLOSE, with --hw-params-twice).
fn open_s16(o: &SimOptions, s: &mut FrontStream) -> anyhow::Result<()> {
    let fmt = PcmFormat::S16Le;
    let frame = fmt.sample_bytes() as u32 * o.channels as u32;
    s.open_times(open_req(o, s, fmt), frame, o.period_rule, if o.hw_params_twice { 2 } else { 1 })
}

fn as_bytes(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// An ALSA application in copy mode: prefill, start, then write a period
/// whenever one is free, drain, stop, close.
fn play(o: &SimOptions, s: &mut FrontStream, src: &[i16], stop: &AtomicBool) -> anyhow::Result<()> {
    open_s16(o, s)?;
    if let Some(mdb) = o.set_volume_mdb {
        s.set_volume(mdb, o.channels as usize)?;
    }
    let data = as_bytes(src);
    let frame = s.frame_bytes as u64;
    let period = s.period_frames * frame;
    let total = data.len() as u64 - data.len() as u64 % frame;
    let mut appl = 0u64;
    let mut started: Option<Instant> = None;
    let (mut paused, mut stalled) = (false, false);
    let event_timeout = Duration::from_secs(2);
    loop {
        let since_start = started.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        if o.pause_at.is_some_and(|t| !paused && since_start >= t) {
            paused = true;
            s.request(Request::Trigger(trigger::PAUSE))?;
            std::thread::sleep(Duration::from_secs_f64(o.pause_for));
            s.request(Request::Trigger(trigger::RESUME))?;
        }
        if o.stall_at.is_some_and(|t| !stalled && since_start >= t) {
            stalled = true;
            std::thread::sleep(Duration::from_secs_f64(o.stall_for));
        }
        // Write while there is room for a period (or the tail).
        loop {
            let hw = s.hw_frames * frame;
            let room = s.buffer_bytes as u64 - (appl - hw.min(appl));
            let n = period.min(total - appl);
            if n == 0 || room < n {
                break;
            }
            s.buffer_write(appl, &data[appl as usize..(appl + n) as usize]);
            let off = (appl % s.buffer_bytes as u64) as u32;
            // One WRITE per contiguous region, as the frontend copies per
            // period; a region that wraps is sent as two.
            let first = (s.buffer_bytes - off).min(n as u32);
            s.request(Request::Write(xen_sndif::RwReq { offset: off, length: first }))?;
            if (first as u64) < n {
                s.request(Request::Write(xen_sndif::RwReq { offset: 0, length: n as u32 - first }))?;
            }
            appl += n;
        }
        if started.is_none() {
            s.request(Request::Trigger(trigger::START))?;
            started = Some(Instant::now());
        }
        if s.hw_frames * frame >= total || stop.load(Ordering::Acquire) {
            break;
        }
        let deadline = Instant::now() + event_timeout;
        let mut got = false;
        while !got && Instant::now() < deadline && !stop.load(Ordering::Acquire) {
            got = s.wait_events((Instant::now() + Duration::from_millis(100)).min(deadline))?;
        }
        if !got {
            if stop.load(Ordering::Acquire) {
                break;
            }
            bail!("playback: no position event for {event_timeout:?}");
        }
        // The pointer passing the application while data remains is an
        // underrun; passing it during the final drain is not.
        if s.hw_frames * frame > appl && appl < total {
            s.report.xruns += 1;
        }
        s.update_pcm_delay(appl / frame);
    }
    s.report.frames = appl / frame;
    s.request(Request::Trigger(trigger::STOP))?;
    s.close()?;
    Ok(())
}

/// An ALSA capture application: start, READ each period as it fills.
fn record(o: &SimOptions, s: &mut FrontStream, frames: u64) -> anyhow::Result<Vec<i16>> {
    open_s16(o, s)?;
    let frame = s.frame_bytes as u64;
    let period = s.period_frames * frame;
    let want = frames * frame;
    let mut appl = 0u64;
    let mut out = Vec::with_capacity(want as usize);
    let mut chunk = vec![0u8; period as usize];
    let event_timeout = Duration::from_secs(2);
    s.request(Request::Trigger(trigger::START))?;
    while appl < want {
        if !s.wait_events(Instant::now() + event_timeout)? {
            bail!(
                "capture: no position event for {event_timeout:?} (events {}, bad ids {})",
                s.report.events,
                s.report.bad_event_ids
            );
        }
        let hw = s.hw_frames * frame;
        s.update_pcm_delay(appl / frame);
        if hw - appl > s.buffer_bytes as u64 {
            s.report.xruns += 1;
            appl = hw - hw % period; // skip what was overwritten, as ALSA recovery does
        }
        while hw - appl >= period && appl < want {
            let off = (appl % s.buffer_bytes as u64) as u32;
            s.request(Request::Read(xen_sndif::RwReq { offset: off, length: period as u32 }))?;
            s.buffer_read(appl, &mut chunk);
            out.extend_from_slice(&chunk);
            appl += period;
        }
    }
    s.report.frames = appl / frame;
    s.request(Request::Trigger(trigger::STOP))?;
    s.close()?;
    out.truncate(want as usize);
    Ok(out.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect())
}
