//! PCM sample formats (`XENSND_PCM_FORMAT_*`): numbers, xenstore names, sizes.

/// The formats this backend can carry. The others of sndif.h (IEC958, mu-law,
/// A-law, ADPCM, MPEG, GSM) have no PipeWire raw-audio equivalent: they are
/// left out of what the guest is offered, and refused at OPEN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PcmFormat {
    S8,
    U8,
    S16Le,
    S16Be,
    U16Le,
    U16Be,
    S24Le,
    S24Be,
    U24Le,
    U24Be,
    S32Le,
    S32Be,
    U32Le,
    U32Be,
    F32Le,
    F32Be,
    F64Le,
    F64Be,
}

const ALL: [(PcmFormat, u8, &str); 18] = [
    (PcmFormat::S8, 0, "s8"),
    (PcmFormat::U8, 1, "u8"),
    (PcmFormat::S16Le, 2, "s16_le"),
    (PcmFormat::S16Be, 3, "s16_be"),
    (PcmFormat::U16Le, 4, "u16_le"),
    (PcmFormat::U16Be, 5, "u16_be"),
    (PcmFormat::S24Le, 6, "s24_le"),
    (PcmFormat::S24Be, 7, "s24_be"),
    (PcmFormat::U24Le, 8, "u24_le"),
    (PcmFormat::U24Be, 9, "u24_be"),
    (PcmFormat::S32Le, 10, "s32_le"),
    (PcmFormat::S32Be, 11, "s32_be"),
    (PcmFormat::U32Le, 12, "u32_le"),
    (PcmFormat::U32Be, 13, "u32_be"),
    (PcmFormat::F32Le, 14, "float_le"),
    (PcmFormat::F32Be, 15, "float_be"),
    (PcmFormat::F64Le, 16, "float64_le"),
    (PcmFormat::F64Be, 17, "float64_be"),
];

impl PcmFormat {
    pub fn all() -> impl Iterator<Item = PcmFormat> {
        ALL.iter().map(|(f, _, _)| *f)
    }

    pub fn from_wire(v: u8) -> Option<PcmFormat> {
        ALL.iter().find(|(_, n, _)| *n == v).map(|(f, _, _)| *f)
    }

    pub fn wire(self) -> u8 {
        ALL.iter().find(|(f, _, _)| *f == self).map(|e| e.1).unwrap_or(0)
    }

    /// Parses the xenstore spelling (`s16_le`, `float_le`, ...).
    pub fn from_name(s: &str) -> Option<PcmFormat> {
        let s = s.trim();
        ALL.iter().find(|(_, _, name)| name.eq_ignore_ascii_case(s)).map(|(f, _, _)| *f)
    }

    pub fn name(self) -> &'static str {
        ALL.iter().find(|(f, _, _)| *f == self).map(|e| e.2).unwrap_or("?")
    }

    /// Bit in the `formats` mask of HW_PARAM_QUERY.
    pub fn mask_bit(self) -> u64 {
        1u64 << self.wire()
    }

    /// Bytes of one sample of one channel as stored in the buffer.
    /// 24-bit formats are packed in 3 bytes, as ALSA's `S24_3LE` and
    /// PipeWire's `S24LE` are.
    pub fn sample_bytes(self) -> usize {
        use PcmFormat::*;
        match self {
            S8 | U8 => 1,
            S16Le | S16Be | U16Le | U16Be => 2,
            S24Le | S24Be | U24Le | U24Be => 3,
            S32Le | S32Be | U32Le | U32Be | F32Le | F32Be => 4,
            F64Le | F64Be => 8,
        }
    }

    /// The byte pattern of one silent sample (unsigned formats are biased).
    pub fn silence_sample(self) -> [u8; 8] {
        use PcmFormat::*;
        let mut s = [0u8; 8];
        match self {
            U8 => s[0] = 0x80,
            U16Le => s[1] = 0x80,
            U16Be => s[0] = 0x80,
            U24Le => s[2] = 0x80,
            U24Be => s[0] = 0x80,
            U32Le => s[3] = 0x80,
            U32Be => s[0] = 0x80,
            _ => {}
        }
        s
    }

    /// Fills `dst` with silence in this format; `dst` need not be frame aligned.
    pub fn fill_silence(self, dst: &mut [u8]) {
        let pat = self.silence_sample();
        let n = self.sample_bytes();
        if pat.iter().all(|b| *b == 0) {
            dst.fill(0);
            return;
        }
        for (i, b) in dst.iter_mut().enumerate() {
            *b = pat[i % n];
        }
    }
}

/// The other format names of sndif.h: formats a frontend may be configured
/// with but that no host here carries (no raw-audio equivalent in PipeWire,
/// JACK or a plain PCM stream).
const NOT_CARRIED: [&str; 7] =
    ["iec958_subframe_le", "iec958_subframe_be", "mu_law", "a_law", "ima_adpcm", "mpeg", "gsm"];

/// A xenstore format list (`"s16_le,s32_le"`; libxl's `;` is accepted too),
/// split into the formats we carry and the names we leave out: sndif.h's
/// non-linear formats, and names it does not know (a typo, or a format of a
/// later protocol). The guest is offered only the first; the caller logs
/// the second, so nothing is left out silently.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FormatList {
    pub carried: Vec<PcmFormat>,
    pub left_out: Vec<String>,
}

pub fn parse_format_list(s: &str) -> FormatList {
    let mut out = FormatList::default();
    for item in s.split([',', ';']).map(str::trim).filter(|t| !t.is_empty()) {
        match PcmFormat::from_name(item) {
            Some(f) if !out.carried.contains(&f) => out.carried.push(f),
            Some(_) => {}
            None => {
                // Bounded: the list comes from the guest-writable directory.
                let name: String = item.chars().filter(|c| !c.is_control()).take(32).collect();
                let name = if NOT_CARRIED.contains(&item) { name } else { format!("{name} (unknown)") };
                if out.left_out.len() < 16 && !out.left_out.contains(&name) {
                    out.left_out.push(name);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        for f in PcmFormat::all() {
            assert_eq!(PcmFormat::from_wire(f.wire()), Some(f));
            assert_eq!(PcmFormat::from_name(f.name()), Some(f));
        }
        assert_eq!(PcmFormat::from_wire(18), None);
        assert_eq!(PcmFormat::from_wire(255), None);
    }

    #[test]
    fn format_list_parses_both_separators() {
        assert_eq!(
            parse_format_list("s16_le;s32_le,float_le").carried,
            vec![PcmFormat::S16Le, PcmFormat::S32Le, PcmFormat::F32Le]
        );
    }

    #[test]
    fn formats_we_cannot_carry_are_left_out_by_name() {
        let l = parse_format_list("mu_law;s16_le;a_law;iec958_subframe_le;s16_le;mp3");
        assert_eq!(l.carried, vec![PcmFormat::S16Le]);
        assert_eq!(l.left_out, vec!["mu_law", "a_law", "iec958_subframe_le", "mp3 (unknown)"]);
        assert_eq!(parse_format_list("gsm").carried, vec![]);
    }

    #[test]
    fn unsigned_silence_is_biased() {
        let mut b = [0u8; 6];
        PcmFormat::U16Le.fill_silence(&mut b);
        assert_eq!(b, [0, 0x80, 0, 0x80, 0, 0x80]);
        PcmFormat::S16Le.fill_silence(&mut b);
        assert_eq!(b, [0; 6]);
    }
}
