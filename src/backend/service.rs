//! The request thread of one stream: waits on the stream's event channel,
//! serves the request ring, answers, and notifies. One thread per stream, so
//! a stalled or hostile stream never delays another.

use super::pcm::PcmStream;
use super::ratelimit::RequestBudget;
use super::ring::BackRing;
use crate::xen::EventChannel;
use anyhow::Context;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Wake-ups without a request tolerated per second before throttling.
const FLOOD_WAKEUPS_PER_SEC: u32 = 2000;
/// Requests one stream is served per second beyond a burst (`RequestBudget`).
/// An application that opens a stream sends tens (hw_params refinement
/// sends one HW_PARAM_QUERY per step; a guest PipeWire probing its card a
/// few hundred at start, in bursts): far within. A guest asking without
/// pause (snd_xen_front answers about 10,000 a second on the loopback
/// transport) is slowed to this, each request waiting at most 1 ms, far
/// from the frontend's 3 s time-out.
const REQUESTS_PER_SEC: u32 = 1000;
const REQUEST_BURST: u32 = 256;

pub struct StreamService {
    stop: OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StreamService {
    pub fn spawn(
        pcm: PcmStream,
        ring: BackRing,
        channel: Arc<dyn EventChannel>,
        stats_interval: Option<Duration>,
    ) -> anyhow::Result<StreamService> {
        let stop = crate::xen::loopback::new_eventfd()?;
        let stop_wait = stop.try_clone()?;
        let name = format!("vsnd-d{}", pcm.ident.domid);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(pcm, ring, channel, stop_wait, stats_interval))
            .context("spawning stream thread")?;
        Ok(StreamService { stop, thread: Some(thread) })
    }
}

impl Drop for StreamService {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: 8-byte write to our own eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Counts wake-ups that brought no request, per one-second window.
struct FloodMeter {
    window: Instant,
    idle_wakeups: u32,
}

impl FloodMeter {
    /// Returns true when this idle wake-up is over the budget.
    fn idle(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.idle_wakeups = 0;
        }
        self.idle_wakeups += 1;
        self.idle_wakeups > FLOOD_WAKEUPS_PER_SEC
    }
}

fn serve(
    mut pcm: PcmStream,
    mut ring: BackRing,
    channel: Arc<dyn EventChannel>,
    stop: OwnedFd,
    stats_interval: Option<Duration>,
) {
    let mut last_stats = Instant::now();
    let wait_ms = stats_interval.map_or(1000, |d| d.as_millis().clamp(10, 1000) as u16);
    // SAFETY: the channel outlives this function (we hold an Arc).
    let ch_fd = unsafe { BorrowedFd::borrow_raw(channel.fd()) };
    let mut batch = Vec::with_capacity(crate::sndif::REQ_RING_SIZE as usize);
    let mut flood = FloodMeter { window: Instant::now(), idle_wakeups: 0 };
    let mut broken = false;
    let (started, mut requests) = (Instant::now(), 0u64);
    let mut budget = RequestBudget::new(REQUESTS_PER_SEC, REQUEST_BURST);
    let mut throttled = Duration::ZERO;
    loop {
        let mut fds = [PollFd::new(ch_fd, PollFlags::POLLIN), PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        if stats_interval.is_some_and(|d| last_stats.elapsed() >= d) {
            last_stats = Instant::now();
            pcm.log_stats();
        }
        match poll(&mut fds, PollTimeout::from(wait_ms)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(stream = %pcm.ident.node_name(), "poll failed: {e}");
                break;
            }
        }
        if fds[1].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) {
            break;
        }
        let notified = fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLIN));
        if notified {
            channel.consume();
        }
        if broken {
            continue; // the ring is not served any more; notifications are drained
        }
        let mut served = 0usize;
        loop {
            batch.clear();
            if let Err(o) = ring.take_requests(&mut batch) {
                pcm.warn(&format!(
                    "request ring overflow (req_prod {} req_cons {}): stream closed",
                    o.req_prod, o.req_cons
                ));
                pcm.close();
                broken = true;
                break;
            }
            for m in &batch {
                let wait = budget.take(Instant::now());
                if !wait.is_zero() {
                    if throttled.is_zero() {
                        pcm.warn(&format!(
                            "request flood: serving this stream {REQUESTS_PER_SEC} requests a second"
                        ));
                    }
                    throttled += wait;
                    std::thread::sleep(wait);
                }
                let resp = pcm.handle(m);
                ring.push_response(&resp.encode());
            }
            served += batch.len();
            requests += batch.len() as u64;
            if !batch.is_empty() && ring.publish_responses() {
                channel.notify();
            }
            if !ring.final_check() {
                break;
            }
        }
        if notified && served == 0 && flood.idle() {
            if flood.idle_wakeups == FLOOD_WAKEUPS_PER_SEC + 1 {
                pcm.warn("notification flood: throttling this stream's request thread");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    pcm.close();
    if !throttled.is_zero() {
        // What the flood cost dom0: this thread's CPU time over its life.
        tracing::info!(
            stream = %pcm.ident.node_name(),
            requests,
            throttled_s = throttled.as_secs_f64(),
            cpu_ms = thread_cpu().as_secs_f64() * 1e3,
            seconds = started.elapsed().as_secs_f64(),
            "request thread done after a request flood"
        );
    }
}

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_or(Duration::ZERO, Duration::from)
}
