//! The latency self-test: the guest plays marked impulses while capturing,
//! with its playback linked to its capture in the host, and compares the
//! round trip it measures with the sum of the delays it was told.
//!
//! For an impulse written at playback frame `Pw` and found at capture frame
//! `Cr`, take the host cycle `j` that moved it: playback pointer `hp`, capture
//! pointer `hc` and the two reported delays `dp`, `dc` of that same cycle
//! (events of one cycle are paired by the time the guest received them).
//! Then the measured round trip is `Cr - Pw - (hc - hp)` and the reported
//! one `dp + dc`: for a guest with exact delays they are equal.
//!
//! One direction alone, when the playback node feeds the capture node
//! straight (no sink between): the capture node is then the playback's
//! device, and a frame is heard in the host cycle that hands it over, at
//! its place in that cycle. The capture event of that cycle says when (it
//! arrives a moment after the cycle, as the playback's events do). The
//! guest's prediction is made from the playback event before the impulse
//! was taken: heard `delay + (Pw - hp)` frames after that event arrived.
//! Its error shows what instant the delay refers to: `one_way_as_sent` takes
//! the delay as it came, `one_way_as_of_event` adds the frames that event
//! moved (the delay as of the event, were it as of the end of the cycle).

#![forbid(unsafe_code)]

use super::front::PosEvent;
use serde::Serialize;
use std::time::Duration;

/// Frames between impulses (0.25 s at 48 kHz; scaled with the rate).
pub fn spacing(rate: u32) -> usize {
    rate as usize / 4
}

/// Interleaved S16 silence with a one-frame impulse every `spacing(rate)`
/// frames, the first one `spacing` frames in.
pub fn impulse_train(rate: u32, channels: u32, frames: usize) -> (Vec<i16>, Vec<u64>) {
    let sp = spacing(rate);
    let mut s = vec![0i16; frames * channels as usize];
    let mut at = Vec::new();
    let mut f = sp;
    while f + sp / 2 < frames {
        for c in 0..channels as usize {
            s[f * channels as usize + c] = 16384;
        }
        at.push(f as u64);
        f += sp;
    }
    (s, at)
}

/// Capture frames of the impulses: the largest sample of each burst.
pub fn find_impulses(captured: &[i16], channels: u32, rate: u32) -> Vec<u64> {
    let ch = channels as usize;
    let mut out = Vec::new();
    let mut f = 0;
    let frames = captured.len() / ch;
    while f < frames {
        if captured[f * ch].unsigned_abs() > 4000 {
            let end = (f + 64).min(frames);
            let peak = (f..end).max_by_key(|&k| captured[k * ch].unsigned_abs()).unwrap_or(f);
            out.push(peak as u64);
            f = peak + spacing(rate) / 2;
        } else {
            f += 1;
        }
    }
    out
}

/// Cycles on each side whose pairings give the local pointer offset.
const OFFSET_WINDOW: usize = 16;

/// How far apart in receive time two events of one cycle can be.
const PAIRING_WINDOW: Duration = Duration::from_millis(8);

/// Frames the reported delay may move during one impulse's flight for the
/// graph to count as steady (resamplers move it by a frame or two).
const STEADY_JITTER: i64 = 16;

#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub playback_frame: u64,
    pub capture_frame: u64,
    pub measured: i64,
    pub reported: i64,
    pub error: i64,
    /// Predicted less actual time the impulse was heard, frames (see the
    /// module's text; only meaningful for a straight link).
    pub one_way_as_sent: Option<i64>,
    pub one_way_as_of_event: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    pub measurements: Vec<Measurement>,
    /// Impulses not measured: lost, or in flight while the reported delay
    /// changed (the topology was being changed).
    pub skipped: usize,
    pub measured: i64,
    pub reported: i64,
    /// The error of largest magnitude.
    pub error: i64,
    /// Medians of the measurements' one-way errors.
    pub one_way_as_sent: Option<i64>,
    pub one_way_as_of_event: Option<i64>,
}

/// One impulse's one-way errors (module text): `pw` played, taken by the
/// playback event `play_log[i]`; found at capture frame `cr`, handed over
/// by the capture event `cap_log[j]`.
fn one_way(
    play_log: &[PosEvent],
    i: usize,
    cap_log: &[PosEvent],
    j: usize,
    pw: u64,
    cr: u64,
    rate: u32,
) -> Option<(i64, i64)> {
    let (before, moved_by) = (play_log.get(i.checked_sub(1)?)?, play_log.get(i.checked_sub(2)?)?);
    let (arrival, cycle_start) = (cap_log.get(j)?, cap_log.get(j.checked_sub(1)?)?);
    if arrival.at < before.at || cr < cycle_start.hw_frames || pw < before.hw_frames {
        return None;
    }
    let since = ((arrival.at - before.at).as_secs_f64() * rate as f64).round() as i64;
    let heard = since + (cr - cycle_start.hw_frames) as i64;
    let predicted = before.delay as i64 + (pw - before.hw_frames) as i64;
    let as_sent = predicted - heard;
    Some((as_sent, as_sent + (before.hw_frames - moved_by.hw_frames) as i64))
}

/// Where `e` is in `log`.
fn index_in(log: &[PosEvent], e: &PosEvent) -> Option<usize> {
    log.iter().position(|p| p.at == e.at && p.hw_frames == e.hw_frames)
}

/// The event that moved the pointer past `frame`.
fn event_covering(log: &[PosEvent], frame: u64) -> Option<&PosEvent> {
    log.iter().find(|e| e.hw_frames > frame)
}

fn distance(a: std::time::Instant, b: std::time::Instant) -> Duration {
    if a > b {
        a - b
    } else {
        b - a
    }
}

/// The event of the other stream received closest in time to `at`.
fn nearest(log: &[PosEvent], at: std::time::Instant, within: Duration) -> Option<&PosEvent> {
    log.iter().min_by_key(|e| distance(e.at, at)).filter(|e| distance(e.at, at) <= within)
}

/// The other stream's event of the same graph cycle as `e`. Both streams
/// move by the same frames every cycle, so their pointers differ by a fixed
/// `offset` (found over the whole run): among the events received around
/// the same time, the one at that offset is of the same cycle. Receive times
/// alone are not enough at small quanta, where the guest's threads wake a
/// cycle late now and then.
fn same_cycle<'a>(other: &'a [PosEvent], e: &PosEvent, offset: i64, sign: i64) -> Option<&'a PosEvent> {
    other
        .iter()
        .filter(|o| distance(o.at, e.at) <= PAIRING_WINDOW)
        .min_by_key(|o| (sign * (o.hw_frames as i64 - e.hw_frames as i64) - offset).abs())
}

fn median(v: &mut [i64]) -> i64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

pub fn analyse(
    played_at: &[u64],
    captured: &[i16],
    channels: u32,
    rate: u32,
    play_log: &[PosEvent],
    cap_log: &[PosEvent],
) -> anyhow::Result<LatencyReport> {
    let peaks = find_impulses(captured, channels, rate);
    let mut measurements = Vec::new();
    // Capture pointer minus playback pointer in one cycle, per playback
    // event: pairs by receive time are mostly right, so the median over the
    // neighbouring cycles is the offset there. It is local because a
    // resampler settling, or a cycle one stream skipped, moves it once.
    let raw: Vec<Option<i64>> = play_log
        .iter()
        .map(|p| {
            nearest(cap_log, p.at, Duration::from_millis(2)).map(|c| c.hw_frames as i64 - p.hw_frames as i64)
        })
        .collect();
    let offset_at = |i: usize| {
        let lo = i.saturating_sub(OFFSET_WINDOW);
        let mut v: Vec<i64> =
            raw[lo..(i + OFFSET_WINDOW + 1).min(raw.len())].iter().flatten().copied().collect();
        median(&mut v)
    };
    let index_of = |e: &PosEvent| index_in(play_log, e);
    let margin = PAIRING_WINDOW;
    // Impulses are `spacing` apart: one arriving later than half of that
    // after it was played is another impulse.
    let flight = Duration::from_secs_f64(spacing(rate) as f64 / rate as f64 / 2.0);
    for &pw in played_at {
        let Some(pe) = event_covering(play_log, pw) else { continue };
        let Some(ce) = same_cycle(cap_log, pe, offset_at(index_of(pe).unwrap_or(0)), 1) else { continue };
        let Some((cr, arrival)) = peaks.iter().find_map(|&c| {
            let e = event_covering(cap_log, c)?;
            (e.at + margin >= pe.at && e.at <= pe.at + flight).then_some((c, e))
        }) else {
            continue;
        };
        let reported = pe.delay as i64 + ce.delay as i64;
        // The report describes a steady graph: skip impulses in flight while
        // the delay changed (a resampler's few frames of jitter aside, both
        // ends of the flight must agree).
        let Some(near) = nearest(play_log, arrival.at, PAIRING_WINDOW) else { continue };
        let Some(pa) = same_cycle(play_log, arrival, offset_at(index_of(near).unwrap_or(0)), -1) else {
            continue;
        };
        if (pa.delay as i64 + arrival.delay as i64 - reported).abs() > STEADY_JITTER {
            continue;
        }
        let measured = cr as i64 - pw as i64 - (ce.hw_frames as i64 - pe.hw_frames as i64);
        let directions = index_of(pe)
            .zip(index_in(cap_log, arrival))
            .and_then(|(i, j)| one_way(play_log, i, cap_log, j, pw, cr, rate));
        measurements.push(Measurement {
            playback_frame: pw,
            capture_frame: cr,
            measured,
            reported,
            error: measured - reported,
            one_way_as_sent: directions.map(|d| d.0),
            one_way_as_of_event: directions.map(|d| d.1),
        });
    }
    if measurements.len() < played_at.len().div_ceil(2) {
        anyhow::bail!(
            "measured {} of {} impulses ({} peaks in the capture): is the playback node linked to the capture node?",
            measurements.len(),
            played_at.len(),
            peaks.len()
        );
    }
    let skipped = played_at.len() - measurements.len();
    let error = measurements.iter().map(|m| m.error).max_by_key(|e| e.abs()).unwrap_or(0);
    let measured = median(&mut measurements.iter().map(|m| m.measured).collect::<Vec<_>>());
    let reported = median(&mut measurements.iter().map(|m| m.reported).collect::<Vec<_>>());
    let one_way_median = |f: fn(&Measurement) -> Option<i64>| {
        let mut v: Vec<i64> = measurements.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    let one_way_as_sent = one_way_median(|m| m.one_way_as_sent);
    let one_way_as_of_event = one_way_median(|m| m.one_way_as_of_event);
    Ok(LatencyReport {
        measurements,
        skipped,
        measured,
        reported,
        error,
        one_way_as_sent,
        one_way_as_of_event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impulses_are_found_where_they_were_put() {
        let (s, at) = impulse_train(48000, 2, 48000 * 2);
        assert_eq!(at, vec![12000, 24000, 36000, 48000, 60000, 72000, 84000]);
        let mut delayed = vec![0i16; 2 * 777];
        delayed.extend_from_slice(&s);
        let found = find_impulses(&delayed, 2, 48000);
        assert_eq!(found, at.iter().map(|f| f + 777).collect::<Vec<_>>());
    }
}
