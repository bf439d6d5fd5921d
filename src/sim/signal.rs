//! Test signals and a minimal WAV reader/writer (16-bit PCM, 32-bit float).

#![forbid(unsafe_code)]

use anyhow::{bail, Context};
use std::io::{Read, Write};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Signal {
    /// A 440 Hz sine at half scale.
    Tone,
    /// Deterministic pseudo-random noise at half scale: every window of a few
    /// frames is unique, so a receiver can find it and check it sample by
    /// sample for gaps and repeats.
    Pattern,
}

/// Interleaved S16 frames of `signal` (the sim's native sample format).
pub fn generate(signal: Signal, rate: u32, channels: u32, frames: usize) -> Vec<i16> {
    let mut out = Vec::with_capacity(frames * channels as usize);
    let mut seed: u32 = 0x1234_5678;
    for i in 0..frames {
        for c in 0..channels {
            let v = match signal {
                Signal::Tone => {
                    let t = i as f64 / rate as f64;
                    ((t * 440.0 * std::f64::consts::TAU).sin() * 16384.0) as i16
                }
                Signal::Pattern => {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    let s = ((seed >> 16) as i16) / 2;
                    // Keep channels distinct so a swap would be caught.
                    if c % 2 == 1 {
                        s.wrapping_neg() / 2
                    } else {
                        s
                    }
                }
            };
            out.push(v);
        }
    }
    out
}

/// Writes interleaved S16 samples as a WAV file.
pub fn write_wav_s16(path: &Path, rate: u32, channels: u32, samples: &[i16]) -> anyhow::Result<()> {
    let data_len = (samples.len() * 2) as u32;
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
    );
    f.write_all(b"RIFF")?;
    f.write_all(&(36 + data_len).to_le_bytes())?;
    f.write_all(b"WAVEfmt ")?;
    f.write_all(&16u32.to_le_bytes())?;
    f.write_all(&1u16.to_le_bytes())?;
    f.write_all(&(channels as u16).to_le_bytes())?;
    f.write_all(&rate.to_le_bytes())?;
    f.write_all(&(rate * channels * 2).to_le_bytes())?;
    f.write_all(&((channels * 2) as u16).to_le_bytes())?;
    f.write_all(&16u16.to_le_bytes())?;
    f.write_all(b"data")?;
    f.write_all(&data_len.to_le_bytes())?;
    for s in samples {
        f.write_all(&s.to_le_bytes())?;
    }
    f.flush()?;
    Ok(())
}

/// A decoded WAV: rate, channels and interleaved S16 samples.
pub struct Wav {
    pub rate: u32,
    pub channels: u32,
    pub samples: Vec<i16>,
}

/// Reads a 16-bit PCM or 32-bit float WAV (float is converted to S16).
/// Tolerates the unknown data length (0 or 0xffffffff) that streaming
/// writers such as pw-record leave when they are stopped.
pub fn read_wav(path: &Path) -> anyhow::Result<Wav> {
    let mut b = Vec::new();
    std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?.read_to_end(&mut b)?;
    if b.len() < 12 || &b[0..4] != b"RIFF" || &b[8..12] != b"WAVE" {
        bail!("{}: not a WAV file", path.display());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let (mut fmt, mut pos) = (None, 12usize);
    while pos + 8 <= b.len() {
        let id = &b[pos..pos + 4];
        let len = u32_at(pos + 4) as usize;
        let body = pos + 8;
        if id == b"fmt " && body + 16 <= b.len() {
            fmt = Some((u16_at(body), u16_at(body + 2) as u32, u32_at(body + 4), u16_at(body + 14)));
        } else if id == b"data" {
            let (tag, channels, rate, bits) = fmt.context("data before fmt")?;
            let end = if len == 0 || body.saturating_add(len) > b.len() { b.len() } else { body + len };
            let data = &b[body..end];
            let samples = match (tag, bits) {
                (1, 16) => data.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect(),
                (3, 32) | (0xfffe, 32) => data
                    .chunks_exact(4)
                    .map(|c| {
                        (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * 32768.0)
                            .round()
                            .clamp(-32768.0, 32767.0) as i16
                    })
                    .collect(),
                _ => bail!("unsupported WAV encoding (tag {tag}, {bits} bits)"),
            };
            return Ok(Wav { rate, channels, samples });
        }
        pos = body.saturating_add(len + (len & 1));
    }
    bail!("{}: no data chunk", path.display())
}

/// Where `sent` (interleaved) first appears in `got`, found by its first
/// `window` frames; then how many of its frames arrived identical (±tol),
/// counted until the first mismatch.
pub fn find_and_compare(
    sent: &[i16],
    got: &[i16],
    channels: usize,
    window: usize,
    tol: i32,
) -> Option<(usize, usize)> {
    let w = window * channels;
    if sent.len() < w || got.len() < w {
        return None;
    }
    let close = |a: &[i16], b: &[i16]| a.iter().zip(b).all(|(x, y)| (*x as i32 - *y as i32).abs() <= tol);
    let start = (0..=(got.len() - w) / channels)
        .map(|f| f * channels)
        .find(|&o| close(&sent[..w], &got[o..o + w]))?;
    let n = sent
        .chunks_exact(channels)
        .zip(got[start..].chunks_exact(channels))
        .take_while(|(a, b)| close(a, b))
        .count();
    Some((start / channels, n))
}

/// How a recording carries a signal, frame by frame, once it is found:
/// on the signal's own timeline (a recorder that runs on the same clock
/// keeps every frame at a fixed offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// Signal frame at which the recording picks it up.
    pub from: usize,
    /// Frames from there on that are exactly where and what they should be.
    pub exact: usize,
    /// Frames that are silence instead (an underrun that kept the clock).
    pub silent: usize,
    /// Silent stretches.
    pub gaps: usize,
    /// Frames that are neither: shifted, repeated or altered audio.
    pub wrong: usize,
}

/// Lays `sent` over `got` at the offset where it first appears.
pub fn align(sent: &[i16], got: &[i16], channels: usize) -> Option<Alignment> {
    let (at, from) = first_appearance(sent, got, channels)?;
    let mut a = Alignment { from, exact: 0, silent: 0, gaps: 0, wrong: 0 };
    let mut in_gap = false;
    for k in from..sent.len() / channels {
        let r = at + (k - from);
        let Some(gf) = got.get(r * channels..(r + 1) * channels) else { break };
        let sf = &sent[k * channels..(k + 1) * channels];
        if gf == sf {
            a.exact += 1;
            in_gap = false;
        } else if gf.iter().all(|v| *v == 0) {
            a.silent += 1;
            a.gaps += usize::from(!in_gap);
            in_gap = true;
        } else {
            a.wrong += 1;
            in_gap = false;
        }
    }
    Some(a)
}

/// Where the recording `got` first carries a piece of `sent` (which must be
/// unique-windowed, like the pattern): (recorded frame, sent frame).
pub fn first_appearance(sent: &[i16], got: &[i16], channels: usize) -> Option<(usize, usize)> {
    const W: usize = 8;
    let mut index = std::collections::HashMap::new();
    for f in 0..(sent.len() / channels).saturating_sub(W) {
        index.entry(&sent[f * channels..(f + W) * channels]).or_insert(f);
    }
    (0..(got.len() / channels).saturating_sub(W)).find_map(|g| {
        let w = &got[g * channels..(g + W) * channels];
        if w.iter().all(|s| *s == 0) {
            return None;
        }
        index.get(w).map(|&s| (g, s))
    })
}

/// How `sent` arrived in `got` when silence may have been inserted: a
/// host cycle that ran late plays silence and then the stream, whole and in
/// order, one cycle later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Recorded frame where `sent` starts.
    pub start: usize,
    /// Frames of `sent` that arrived, in order and unchanged, before the
    /// first frame that did not (or the end of either).
    pub delivered: usize,
    /// Runs of silence found in the middle of the sound, skipped.
    pub inserted_silences: usize,
    /// Frames of such silence.
    pub inserted_frames: usize,
    /// Runs of `sent` missing from `got` (a cycle whose frames the graph
    /// dropped), when allowed, skipped.
    pub dropped_runs: usize,
    /// Frames of `sent` in such runs.
    pub dropped_frames: usize,
}

impl Delivery {
    /// Every frame of `sent` (`frames` of them) is accounted for: arrived
    /// in order, or in a dropped run.
    pub fn complete(&self, frames: usize) -> bool {
        self.delivered + self.dropped_frames == frames
    }
}

/// Compares `sent` with `got` from where `sent`'s first `window` frames
/// appear, exactly, skipping each run of silent frames in `got` where
/// `sent` has sound. A frame lost, altered or repeated ends the count.
pub fn compare_allowing_inserted_silence(
    sent: &[i16],
    got: &[i16],
    channels: usize,
    window: usize,
) -> Option<Delivery> {
    compare_allowing_glitches(sent, got, channels, window, 0)
}

/// As `compare_allowing_inserted_silence`, and where `got` goes on with
/// `sent` up to `max_drop` frames further on (its next `window` frames
/// found there), skips the frames in between as a dropped run.
pub fn compare_allowing_glitches(
    sent: &[i16],
    got: &[i16],
    channels: usize,
    window: usize,
    max_drop: usize,
) -> Option<Delivery> {
    let (start, _) = find_and_compare(sent, got, channels, window, 0)?;
    let frame = |buf: &[i16], f: usize| buf.get(f * channels..(f + 1) * channels).map(|s| s.to_vec());
    let silent = |s: &[i16]| s.iter().all(|v| *v == 0);
    let frames = sent.len() / channels;
    let mut d = Delivery {
        start,
        delivered: 0,
        inserted_silences: 0,
        inserted_frames: 0,
        dropped_runs: 0,
        dropped_frames: 0,
    };
    let mut g = start;
    let mut k = 0;
    while k < frames {
        let want = frame(sent, k).unwrap_or_default();
        let Some(mut have) = frame(got, g) else { break };
        if have != want && silent(&have) {
            d.inserted_silences += 1;
            while silent(&have) {
                d.inserted_frames += 1;
                g += 1;
                match frame(got, g) {
                    Some(h) => have = h,
                    None => return Some(d),
                }
            }
        }
        if have != want {
            // Did `got` go on further into `sent`? Its next window, found
            // within `max_drop` frames, says so.
            let w = window * channels;
            let ahead = got.get(g * channels..g * channels + w).and_then(|probe| {
                (k + 1..=(k + max_drop).min(frames.saturating_sub(window)))
                    .find(|&j| sent.get(j * channels..j * channels + w) == Some(probe))
            });
            let Some(j) = ahead else { break };
            d.dropped_runs += 1;
            d.dropped_frames += j - k;
            k = j;
            continue;
        }
        d.delivered += 1;
        g += 1;
        k += 1;
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserted_silence_is_told_from_loss() {
        let s = generate(Signal::Pattern, 48000, 2, 3000);
        let mut g = vec![0i16; 2 * 5];
        g.extend_from_slice(&s[..2 * 1000]);
        g.extend(std::iter::repeat_n(0, 2 * 512)); // a late cycle
        g.extend_from_slice(&s[2 * 1000..]);
        let d = compare_allowing_inserted_silence(&s, &g, 2, 64).unwrap();
        assert_eq!(
            d,
            Delivery {
                start: 5,
                delivered: 3000,
                inserted_silences: 1,
                inserted_frames: 512,
                dropped_runs: 0,
                dropped_frames: 0
            }
        );
        // Frames dropped: the count stops there.
        let mut lost = g.clone();
        lost.drain(2 * 2000..2 * 2010);
        let d = compare_allowing_inserted_silence(&s, &lost, 2, 64).unwrap();
        assert!(d.delivered < 3000, "{d:?}");
        // ... unless drops are allowed: then they are counted.
        let d = compare_allowing_glitches(&s, &lost, 2, 64, 128).unwrap();
        assert_eq!(
            (d.delivered, d.dropped_runs, d.dropped_frames, d.inserted_silences),
            (2990, 1, 10, 1),
            "{d:?}"
        );
        assert!(d.complete(3000));
        // Not beyond the drop allowed.
        assert!(!compare_allowing_glitches(&s, &lost, 2, 64, 5).unwrap().complete(3000));
        // Silence instead of sound (not inserted, replacing): the stream
        // after it is shifted and the count stops.
        let mut replaced = s.clone();
        replaced[2 * 1500..2 * 1600].fill(0);
        let d = compare_allowing_inserted_silence(&s, &replaced, 2, 64).unwrap();
        assert!(d.delivered < 3000, "{d:?}");
    }

    #[test]
    fn wav_round_trip_and_search() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.wav");
        let s = generate(Signal::Pattern, 48000, 2, 1000);
        let mut padded = vec![0i16; 2 * 37];
        padded.extend_from_slice(&s);
        write_wav_s16(&p, 48000, 2, &padded).unwrap();
        let w = read_wav(&p).unwrap();
        assert_eq!((w.rate, w.channels), (48000, 2));
        assert_eq!(find_and_compare(&s, &w.samples, 2, 32, 0), Some((37, 1000)));
        let mut broken = w.samples.clone();
        broken.drain(2 * 500..2 * 510); // ten frames lost
        assert_eq!(find_and_compare(&s, &broken, 2, 32, 0), Some((37, 463)));
    }

    #[test]
    fn alignment_tells_gaps_from_broken_audio() {
        let s = generate(Signal::Pattern, 48000, 2, 1000);
        let mut g = vec![0i16; 2 * 5];
        g.extend_from_slice(&s);
        g[2 * (5 + 400)..2 * (5 + 410)].fill(0); // ten frames of silence
        let a = align(&s, &g, 2).unwrap();
        assert_eq!((a.from, a.exact, a.silent, a.gaps, a.wrong), (0, 990, 10, 1, 0));
        let mut shifted = g.clone();
        shifted.drain(2 * 700..2 * 702); // two frames lost: the rest is shifted
        let a = align(&s, &shifted, 2).unwrap();
        assert!(a.wrong > 200, "{a:?}");
    }

    #[test]
    fn first_appearance_finds_a_signal_joined_midway() {
        let s = generate(Signal::Pattern, 48000, 2, 2000);
        let mut got = vec![0i16; 2 * 10];
        got.extend_from_slice(&s[2 * 500..]);
        assert_eq!(first_appearance(&s, &got, 2), Some((10, 500)));
        assert_eq!(first_appearance(&s, &vec![0i16; 400], 2), None);
    }
}
