//! The card → pcm → stream configuration in the frontend's xenstore
//! directory, exactly as libxl writes it (see DESIGN.md for a real dump):
//!
//! ```text
//! <fe>/short-name, long-name, sample-rates, sample-formats, channels-min,
//!      channels-max, buffer-size                       (card defaults)
//! <fe>/<pcm>/name, and optional overrides of the above
//! <fe>/<pcm>/<stream>/unique-id, type (p|c), optional overrides
//! ```
//!
//! The frontend directory is writable by the guest, so every value is parsed
//! defensively and bounded by the backend's own limits.

use super::format::{parse_format_list, PcmFormat};
use super::keys;

/// Hard limits that hold whatever the guest's xenstore says.
pub mod limits {
    pub const MAX_PCMS: usize = 16;
    pub const MAX_STREAMS_PER_PCM: usize = 16;
    pub const MIN_RATE: u32 = 8000;
    pub const MAX_RATE: u32 = 384_000;
    pub const MAX_CHANNELS: u32 = 32;
    /// 4 MiB is ~5 s of 48 kHz stereo S32: far above any real period/buffer.
    pub const MAX_BUFFER_SIZE: u32 = 4 * 1024 * 1024;
    pub const MAX_NAME_LEN: usize = 80;
}

/// Sample rates, formats, channels and buffer size, after inheritance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamParams {
    pub rates: Vec<u32>,
    pub formats: Vec<PcmFormat>,
    pub channels_min: u32,
    pub channels_max: u32,
    pub buffer_size: u32,
}

impl Default for StreamParams {
    /// What a card gets when the toolstack left a field out: the ranges the
    /// Linux frontend assumes for missing keys, narrowed to formats we carry.
    fn default() -> Self {
        StreamParams {
            rates: vec![8000, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000, 176400, 192000],
            formats: vec![PcmFormat::S16Le, PcmFormat::S24Le, PcmFormat::S32Le, PcmFormat::F32Le],
            channels_min: 1,
            channels_max: 2,
            buffer_size: 65536,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Playback,
    Capture,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Playback => "playback",
            StreamKind::Capture => "capture",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    /// Index of the stream directory under its pcm (`<fe>/<pcm>/<index>`).
    pub index: u32,
    pub unique_id: String,
    pub kind: StreamKind,
    pub params: StreamParams,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcmConfig {
    pub index: u32,
    pub name: String,
    pub streams: Vec<StreamConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardConfig {
    pub short_name: String,
    pub long_name: String,
    pub pcms: Vec<PcmConfig>,
    /// Format names the configuration lists that the backend does not carry
    /// (sndif.h's non-linear formats, unknown names): left out of what the
    /// guest is offered, for the caller to log.
    pub left_out_formats: Vec<String>,
}

impl CardConfig {
    /// All streams with their pcm, in xenstore order.
    pub fn streams(&self) -> impl Iterator<Item = (&PcmConfig, &StreamConfig)> {
        self.pcms.iter().flat_map(|p| p.streams.iter().map(move |s| (p, s)))
    }
}

/// Read access to one xenstore directory tree, relative to the frontend path.
pub trait ConfigSource {
    fn read(&self, rel: &str) -> Option<String>;
    fn list(&self, rel: &str) -> Vec<String>;
}

fn join(dir: &str, key: &str) -> String {
    if dir.is_empty() {
        key.to_string()
    } else {
        format!("{dir}/{key}")
    }
}

fn clean_name(s: String) -> String {
    s.chars().filter(|c| !c.is_control()).take(limits::MAX_NAME_LEN).collect::<String>().trim().to_string()
}

/// A stream's `unique-id` for properties: as `clean_name`, but one longer
/// than `MAX_NAME_LEN` keeps its first 63 characters and adds `~` and a
/// 64-bit hash of the whole id (16 hex digits: 80 in all), so two long ids
/// that differ anywhere stay apart.
fn bounded_id(s: String) -> String {
    let clean: String = s.chars().filter(|c| !c.is_control()).collect::<String>().trim().to_string();
    if clean.chars().count() <= limits::MAX_NAME_LEN {
        return clean;
    }
    // FNV-1a: stable across builds and machines.
    let hash =
        clean.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{}~{hash:016x}", clean.chars().take(limits::MAX_NAME_LEN - 17).collect::<String>())
}

fn parse_u32(key: &str, v: &str) -> Result<u32, String> {
    v.trim().parse::<u32>().map_err(|_| format!("{key}: not a number: {v:?}"))
}

/// Applies the overrides found in `dir` on top of `base`; format names we
/// do not carry are added to `left_out`.
fn inherit(
    src: &dyn ConfigSource,
    dir: &str,
    base: &StreamParams,
    left_out: &mut Vec<String>,
) -> Result<StreamParams, String> {
    let mut p = base.clone();
    if let Some(v) = src.read(&join(dir, keys::SAMPLE_RATES)) {
        let mut rates = Vec::new();
        for r in v.split([',', ';']).map(str::trim).filter(|t| !t.is_empty()) {
            let r = parse_u32(keys::SAMPLE_RATES, r)?;
            if !(limits::MIN_RATE..=limits::MAX_RATE).contains(&r) {
                return Err(format!("sample rate {r} outside {}..={}", limits::MIN_RATE, limits::MAX_RATE));
            }
            if !rates.contains(&r) {
                rates.push(r);
            }
        }
        rates.sort_unstable();
        p.rates = rates;
    }
    if let Some(v) = src.read(&join(dir, keys::SAMPLE_FORMATS)) {
        let list = parse_format_list(&v);
        for name in list.left_out {
            if !left_out.contains(&name) {
                left_out.push(name);
            }
        }
        p.formats = list.carried;
    }
    if let Some(v) = src.read(&join(dir, keys::CHANNELS_MIN)) {
        p.channels_min = parse_u32(keys::CHANNELS_MIN, &v)?;
    }
    if let Some(v) = src.read(&join(dir, keys::CHANNELS_MAX)) {
        p.channels_max = parse_u32(keys::CHANNELS_MAX, &v)?;
    }
    if let Some(v) = src.read(&join(dir, keys::BUFFER_SIZE)) {
        p.buffer_size = parse_u32(keys::BUFFER_SIZE, &v)?;
    }
    Ok(p)
}

fn check(p: &StreamParams, what: &str) -> Result<(), String> {
    if p.rates.is_empty() {
        return Err(format!("{what}: no sample rates"));
    }
    if p.formats.is_empty() {
        return Err(format!("{what}: no sample format this backend carries"));
    }
    if p.channels_min == 0 || p.channels_min > p.channels_max || p.channels_max > limits::MAX_CHANNELS {
        return Err(format!("{what}: channels {}..{} invalid", p.channels_min, p.channels_max));
    }
    if p.buffer_size == 0 || p.buffer_size > limits::MAX_BUFFER_SIZE {
        return Err(format!("{what}: buffer-size {} outside 1..={}", p.buffer_size, limits::MAX_BUFFER_SIZE));
    }
    Ok(())
}

/// Numeric child directories in ascending order (xenstore lists in any order).
fn indices(src: &dyn ConfigSource, dir: &str, max: usize, what: &str) -> Result<Vec<u32>, String> {
    let mut v: Vec<u32> = src.list(dir).iter().filter_map(|s| s.parse::<u32>().ok()).collect();
    v.sort_unstable();
    if v.len() > max {
        return Err(format!("{what}: {} entries, at most {max}", v.len()));
    }
    Ok(v)
}

/// Parses the whole card. Errors name the offending key; the caller refuses
/// the device (the frontend never sees a half-configured card).
pub fn parse_card(src: &dyn ConfigSource) -> Result<CardConfig, String> {
    let mut left_out = Vec::new();
    let card = inherit(src, "", &StreamParams::default(), &mut left_out)?;
    let mut pcms = Vec::new();
    for pi in indices(src, "", limits::MAX_PCMS, "pcm devices")? {
        let pdir = pi.to_string();
        let pparams = inherit(src, &pdir, &card, &mut left_out)?;
        let mut streams = Vec::new();
        for si in indices(src, &pdir, limits::MAX_STREAMS_PER_PCM, "streams")? {
            let sdir = format!("{pdir}/{si}");
            let params = inherit(src, &sdir, &pparams, &mut left_out)?;
            let what = format!("stream {sdir}");
            check(&params, &what)?;
            let kind = match src.read(&join(&sdir, keys::TYPE)).as_deref().map(str::trim) {
                Some(keys::TYPE_PLAYBACK) => StreamKind::Playback,
                Some(keys::TYPE_CAPTURE) => StreamKind::Capture,
                other => return Err(format!("{what}: bad type {other:?}")),
            };
            let unique_id = bounded_id(src.read(&join(&sdir, keys::UNIQUE_ID)).unwrap_or_default());
            streams.push(StreamConfig { index: si, unique_id, kind, params });
        }
        let name = clean_name(src.read(&join(&pdir, keys::DEVICE_NAME)).unwrap_or_default());
        pcms.push(PcmConfig { index: pi, name, streams });
    }
    if pcms.iter().all(|p| p.streams.is_empty()) {
        return Err("card has no streams".into());
    }
    Ok(CardConfig {
        short_name: clean_name(src.read(keys::SHORT_NAME).unwrap_or_else(|| "XenSnd".into())),
        long_name: clean_name(src.read(keys::LONG_NAME).unwrap_or_else(|| "Xen PV Sound".into())),
        pcms,
        left_out_formats: left_out,
    })
}

/// A card configuration held in memory: for tests, fuzzing, and a
/// frontend or toolstack that builds one before writing it to xenstore.
pub mod example {
    use super::ConfigSource;
    use std::collections::{BTreeMap, BTreeSet};

    /// A flat key → value map standing in for a xenstore directory.
    pub struct MapSource(pub BTreeMap<String, String>);

    impl ConfigSource for MapSource {
        fn read(&self, rel: &str) -> Option<String> {
            self.0.get(rel).cloned()
        }
        fn list(&self, rel: &str) -> Vec<String> {
            let prefix = if rel.is_empty() { String::new() } else { format!("{rel}/") };
            // Each child once, as xenstore lists them ("0" and "0/x" both
            // name child "0"; "0-a" sorts between them).
            let children: BTreeSet<&str> = self
                .0
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix))
                .filter_map(|rest| rest.split('/').next())
                .collect();
            children.into_iter().map(str::to_string).collect()
        }
    }

    /// What libxl 4.17 writes for a card like the example in xl.cfg(5):
    /// one PCM with a playback and a capture stream.
    pub fn libxl_dump() -> MapSource {
        let kv = [
            ("short-name", "XenSnd"),
            ("long-name", "Xen PV Sound"),
            ("sample-rates", "44100,48000"),
            ("sample-formats", "s16_le,s32_le"),
            ("channels-min", "1"),
            ("channels-max", "2"),
            ("buffer-size", "65536"),
            ("0/name", "dev0"),
            ("0/0/unique-id", "pw0-play"),
            ("0/0/type", "p"),
            ("0/0/ring-ref", "8"),
            ("0/1/unique-id", "pw0-cap"),
            ("0/1/type", "c"),
            ("state", "3"),
            ("backend-id", "0"),
        ];
        MapSource(kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::example::libxl_dump;
    use super::*;

    #[test]
    fn parses_the_libxl_dump() {
        let c = parse_card(&libxl_dump()).unwrap();
        assert_eq!(c.short_name, "XenSnd");
        assert_eq!(c.long_name, "Xen PV Sound");
        assert_eq!(c.pcms.len(), 1);
        assert_eq!(c.pcms[0].name, "dev0");
        let s = &c.pcms[0].streams;
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].kind, s[0].unique_id.as_str()), (StreamKind::Playback, "pw0-play"));
        // Long ids are cut with a hash of the whole: ones that differ only
        // far in stay distinct.
        let (a, b) = (format!("{}a", "x".repeat(100)), format!("{}b", "x".repeat(100)));
        let (ba, bb) = (bounded_id(a), bounded_id(b));
        assert_ne!(ba, bb);
        assert!(ba.chars().count() <= limits::MAX_NAME_LEN && ba.starts_with(&"x".repeat(63)), "{ba}");
        assert_eq!((s[1].kind, s[1].unique_id.as_str()), (StreamKind::Capture, "pw0-cap"));
        assert_eq!(s[0].params.rates, vec![44100, 48000]);
        assert_eq!(s[0].params.formats, vec![PcmFormat::S16Le, PcmFormat::S32Le]);
        assert_eq!((s[0].params.channels_min, s[0].params.channels_max), (1, 2));
        assert_eq!(s[0].params.buffer_size, 65536);
    }

    #[test]
    fn stream_and_pcm_override_card() {
        let mut src = libxl_dump();
        src.0.insert("0/sample-rates".into(), "48000".into());
        src.0.insert("0/1/channels-max".into(), "1".into());
        src.0.insert("0/1/buffer-size".into(), "8192".into());
        let c = parse_card(&src).unwrap();
        let s = &c.pcms[0].streams;
        assert_eq!(s[0].params.rates, vec![48000]);
        assert_eq!(s[1].params.rates, vec![48000]);
        assert_eq!(s[0].params.channels_max, 2);
        assert_eq!(s[1].params.channels_max, 1);
        assert_eq!(s[1].params.buffer_size, 8192);
        assert_eq!(s[0].params.buffer_size, 65536);
    }

    #[test]
    fn hostile_values_are_refused() {
        for (k, v) in [
            ("buffer-size", "999999999"),
            ("buffer-size", "-1"),
            ("sample-rates", "1"),
            ("channels-min", "3"),
            ("channels-max", "1000"),
            ("sample-formats", "mu_law"),
            ("sample-formats", "mu_law;a_law;mp3"),
            ("0/0/type", "x"),
        ] {
            let mut src = libxl_dump();
            src.0.insert(k.into(), v.into());
            assert!(parse_card(&src).is_err(), "{k}={v} accepted");
        }
    }

    /// xl.cfg(5) allows formats such as mu_law: the card is served with
    /// the formats we carry, and the rest are named for the log.
    #[test]
    fn formats_we_cannot_carry_are_left_out_not_fatal() {
        let mut src = libxl_dump();
        src.0.insert("sample-formats".into(), "s16_le;mu_law;a_law;iec958_subframe_le;s32_le".into());
        src.0.insert("0/1/sample-formats".into(), "gsm,s16_le".into());
        let c = parse_card(&src).unwrap();
        assert_eq!(c.pcms[0].streams[0].params.formats, vec![PcmFormat::S16Le, PcmFormat::S32Le]);
        assert_eq!(c.pcms[0].streams[1].params.formats, vec![PcmFormat::S16Le]);
        assert_eq!(c.left_out_formats, vec!["mu_law", "a_law", "iec958_subframe_le", "gsm"]);
    }

    #[test]
    fn too_many_pcms_are_refused() {
        let mut src = libxl_dump();
        for i in 1..=limits::MAX_PCMS {
            src.0.insert(format!("{i}/0/type"), "p".into());
        }
        assert!(parse_card(&src).is_err());
    }
}
