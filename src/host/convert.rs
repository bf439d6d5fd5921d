//! Guest samples to and from the 32-bit float samples of hosts that take
//! nothing else (JACK). Integers map to [-1, 1) with full scale 2^(bits-1)
//! (unsigned ones biased by half their range), so 8-, 16- and 24-bit
//! samples go there and back exactly. Real-time safe: no allocation.

#![forbid(unsafe_code)]

use crate::sndif::PcmFormat;

/// How one sample is stored.
#[derive(Debug, Clone, Copy)]
enum Layout {
    Int { bytes: usize, signed: bool, big_endian: bool },
    Float { bytes: usize, big_endian: bool },
}

fn layout(f: PcmFormat) -> Layout {
    use PcmFormat::*;
    let int = |bytes, signed, big_endian| Layout::Int { bytes, signed, big_endian };
    match f {
        S8 => int(1, true, false),
        U8 => int(1, false, false),
        S16Le => int(2, true, false),
        S16Be => int(2, true, true),
        U16Le => int(2, false, false),
        U16Be => int(2, false, true),
        S24Le => int(3, true, false),
        S24Be => int(3, true, true),
        U24Le => int(3, false, false),
        U24Be => int(3, false, true),
        S32Le => int(4, true, false),
        S32Be => int(4, true, true),
        U32Le => int(4, false, false),
        U32Be => int(4, false, true),
        F32Le => Layout::Float { bytes: 4, big_endian: false },
        F32Be => Layout::Float { bytes: 4, big_endian: true },
        F64Le => Layout::Float { bytes: 8, big_endian: false },
        F64Be => Layout::Float { bytes: 8, big_endian: true },
    }
}

/// The sample's bytes as a little-endian u64 (`src` is one sample).
fn load(src: &[u8], big_endian: bool) -> u64 {
    let mut v = 0u64;
    for i in 0..src.len() {
        let b = if big_endian { src[src.len() - 1 - i] } else { src[i] };
        v |= u64::from(b) << (8 * i);
    }
    v
}

fn store(v: u64, dst: &mut [u8], big_endian: bool) {
    let n = dst.len();
    for i in 0..n {
        let b = (v >> (8 * i)) as u8;
        if big_endian {
            dst[n - 1 - i] = b;
        } else {
            dst[i] = b;
        }
    }
}

/// One sample of `format` (its first `sample_bytes()` bytes) as a float.
pub fn to_f32(format: PcmFormat, src: &[u8]) -> f32 {
    match layout(format) {
        Layout::Int { bytes, signed, big_endian } => {
            let bits = 8 * bytes as u32;
            let raw = load(&src[..bytes], big_endian);
            // Two's complement from the top bit; unsigned: remove the bias.
            let shift = 64 - bits;
            let value =
                if signed { ((raw << shift) as i64) >> shift } else { raw as i64 - (1i64 << (bits - 1)) };
            (value as f64 / (1u64 << (bits - 1)) as f64) as f32
        }
        Layout::Float { bytes: 4, big_endian } => f32::from_bits(load(&src[..4], big_endian) as u32),
        Layout::Float { big_endian, .. } => f64::from_bits(load(&src[..8], big_endian)) as f32,
    }
}

/// Stores `v` as one sample of `format` into the first `sample_bytes()`
/// bytes of `dst`; integers are rounded and clipped to full scale.
pub fn from_f32(format: PcmFormat, v: f32, dst: &mut [u8]) {
    match layout(format) {
        Layout::Int { bytes, signed, big_endian } => {
            let bits = 8 * bytes as u32;
            let full = (1u64 << (bits - 1)) as f64;
            let v = if v.is_nan() { 0.0 } else { v as f64 };
            let scaled = (v * full).round().clamp(-full, full - 1.0) as i64;
            let raw = if signed { scaled as u64 } else { (scaled + (1i64 << (bits - 1))) as u64 };
            store(raw, &mut dst[..bytes], big_endian);
        }
        Layout::Float { bytes: 4, big_endian } => store(u64::from(v.to_bits()), &mut dst[..4], big_endian),
        Layout::Float { big_endian, .. } => store((v as f64).to_bits(), &mut dst[..8], big_endian),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(to_f32(PcmFormat::S16Le, &[0x00, 0x80]), -1.0);
        assert_eq!(to_f32(PcmFormat::S16Be, &[0x40, 0x00]), 0.5);
        assert_eq!(to_f32(PcmFormat::U8, &[0x80]), 0.0);
        assert_eq!(to_f32(PcmFormat::U16Le, &[0x00, 0x00]), -1.0);
        assert_eq!(to_f32(PcmFormat::S24Le, &[0x00, 0x00, 0xc0]), -0.5);
        assert_eq!(to_f32(PcmFormat::F32Be, &0.25f32.to_be_bytes()), 0.25);
        assert_eq!(to_f32(PcmFormat::F64Le, &(-0.75f64).to_le_bytes()), -0.75);
        let mut b = [0u8; 4];
        from_f32(PcmFormat::S32Le, 1.5, &mut b);
        assert_eq!(i32::from_le_bytes(b), i32::MAX, "clipped");
        from_f32(PcmFormat::U16Be, 0.0, &mut b);
        assert_eq!(&b[..2], &[0x80, 0x00]);
        from_f32(PcmFormat::S16Le, f32::NAN, &mut b);
        assert_eq!(&b[..2], &[0, 0]);
    }

    #[test]
    fn integers_up_to_24_bits_go_there_and_back_exactly() {
        for f in PcmFormat::all() {
            let n = f.sample_bytes();
            if n > 3 {
                continue;
            }
            let steps = 1u64 << (8 * n);
            let stride = (steps / 5000).max(1);
            let mut out = [0u8; 8];
            for raw in (0..steps).step_by(stride as usize).chain([steps - 1]) {
                let mut src = [0u8; 8];
                store(raw, &mut src[..n], false);
                from_f32(f, to_f32(f, &src[..n]), &mut out);
                assert_eq!(&out[..n], &src[..n], "{f:?} {raw:#x}");
            }
        }
    }

    #[test]
    fn silence_is_zero() {
        for f in PcmFormat::all() {
            assert_eq!(to_f32(f, &f.silence_sample()), 0.0, "{f:?}");
        }
    }
}
