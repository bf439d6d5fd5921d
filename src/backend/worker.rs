//! One thread per vsnd device. A device's handshake, its streams' setup and
//! its teardown run there, so that one device's slow step (a host that
//! takes seconds to let go of a stream, a device's ALSA play-out) never
//! holds up another guest's. The dispatcher (`backend::run`) only wakes it.
//!
//! Wake-ups coalesce: however many xenstore events arrive while the device
//! is busy, it steps once more afterwards, and never more often than every
//! `MIN_STEP_INTERVAL`. A guest that rewrites its state key as fast as it
//! can therefore costs dom0 a bounded number of steps a second.

#![forbid(unsafe_code)]

use super::device::{Device, Services, Step};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// At most this many steps a second per device (each reads a handful of
/// xenstore keys).
const MIN_STEP_INTERVAL: Duration = Duration::from_millis(5);
/// After a failed xenstore call, the step is tried again this much later
/// (doubling up to `RETRY_MAX`), with or without a new event.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

struct Signal {
    /// (a step is due, the backend is exiting)
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

pub struct DeviceWorker {
    signal: Arc<Signal>,
    /// Set when the device is gone (its directory was removed).
    gone: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceWorker {
    /// Starts the device's thread; it steps once right away.
    pub fn spawn(mut device: Device, services: Services) -> anyhow::Result<DeviceWorker> {
        let signal = Arc::new(Signal { state: Mutex::new((true, false)), cv: Condvar::new() });
        let gone = Arc::new(AtomicBool::new(false));
        let (sig, done) = (signal.clone(), gone.clone());
        let name = format!("vsnd-dev{}.{}", device.domid, device.devid);
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let mut last = Instant::now() - MIN_STEP_INTERVAL;
            let mut retry: Option<Duration> = None;
            loop {
                {
                    let mut st = sig.state.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(after) = retry {
                        // Due again after the delay, or on an event.
                        st = sig
                            .cv
                            .wait_timeout_while(st, after, |st| !st.0 && !st.1)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    } else {
                        while !st.0 && !st.1 {
                            st = sig.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                        }
                    }
                    if st.1 {
                        break;
                    }
                    st.0 = false;
                }
                // Pace before the step: the events that come meanwhile
                // fold into it.
                let since = last.elapsed();
                if since < MIN_STEP_INTERVAL {
                    std::thread::sleep(MIN_STEP_INTERVAL - since);
                    sig.state.lock().unwrap_or_else(|e| e.into_inner()).0 = false;
                }
                last = Instant::now();
                match device.step(&services) {
                    Step::Continue => retry = None,
                    Step::Retry => retry = Some(retry.map_or(RETRY_FIRST, |d| (d * 2).min(RETRY_MAX))),
                    Step::Gone => {
                        done.store(true, Ordering::Release);
                        return;
                    }
                }
            }
            device.shutdown(&services);
        })?;
        Ok(DeviceWorker { signal, gone, thread: Some(thread) })
    }

    /// Asks for one more step.
    pub fn wake(&self) {
        self.signal.state.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
        self.signal.cv.notify_one();
    }

    /// The device went away and its thread has ended (or is ending).
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Asks the thread to shut the device down (backend exit) without
    /// waiting: every device shuts down at once, then dropping each waits.
    pub fn stop(&self) {
        self.signal.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.signal.cv.notify_one();
    }
}

impl Drop for DeviceWorker {
    /// Stops the thread (a gone device's has ended already) and waits for it.
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
