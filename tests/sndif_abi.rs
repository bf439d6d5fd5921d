//! The wire layout in `src/sndif` against the C header Debian's libxen-dev
//! installs (`/usr/include/xen/io/sndif.h`): a small C program prints sizes
//! and offsets, and each one must match what the Rust code uses.

use std::collections::HashMap;
use std::process::Command;
use xen_vsnd::sndif::wire::{self, event, evt_page, req, resp, sring};
use xen_vsnd::sndif::{errno, evt, op, trigger, HwParam, PcmFormat};

const PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/sndif.h>
#define P(name, v) printf("%s %ld\n", name, (long)(v))
int main(void) {
    P("req", sizeof(struct xensnd_req));
    P("resp", sizeof(struct xensnd_resp));
    P("evt", sizeof(struct xensnd_evt));
    P("evt_page", sizeof(struct xensnd_event_page));
    P("hw_param", sizeof(struct xensnd_query_hw_param));
    P("req.id", offsetof(struct xensnd_req, id));
    P("req.operation", offsetof(struct xensnd_req, operation));
    P("req.op", offsetof(struct xensnd_req, op));
    P("open.rate", offsetof(struct xensnd_req, op.open.pcm_rate));
    P("open.format", offsetof(struct xensnd_req, op.open.pcm_format));
    P("open.channels", offsetof(struct xensnd_req, op.open.pcm_channels));
    P("open.buffer_sz", offsetof(struct xensnd_req, op.open.buffer_sz));
    P("open.gref_directory", offsetof(struct xensnd_req, op.open.gref_directory));
    P("open.period_sz", offsetof(struct xensnd_req, op.open.period_sz));
    P("rw.offset", offsetof(struct xensnd_req, op.rw.offset));
    P("rw.length", offsetof(struct xensnd_req, op.rw.length));
    P("trigger.type", offsetof(struct xensnd_req, op.trigger.type));
    P("resp.id", offsetof(struct xensnd_resp, id));
    P("resp.operation", offsetof(struct xensnd_resp, operation));
    P("resp.status", offsetof(struct xensnd_resp, status));
    P("resp.hw_param", offsetof(struct xensnd_resp, resp.hw_param));
    P("hw.rates", offsetof(struct xensnd_query_hw_param, rates));
    P("hw.channels", offsetof(struct xensnd_query_hw_param, channels));
    P("hw.buffer", offsetof(struct xensnd_query_hw_param, buffer));
    P("hw.period", offsetof(struct xensnd_query_hw_param, period));
    P("evt.id", offsetof(struct xensnd_evt, id));
    P("evt.type", offsetof(struct xensnd_evt, type));
    P("evt.cur_pos", offsetof(struct xensnd_evt, op.cur_pos.position));
    P("evt_page.in_cons", offsetof(struct xensnd_event_page, in_cons));
    P("evt_page.in_prod", offsetof(struct xensnd_event_page, in_prod));
    P("in_ring_offs", XENSND_IN_RING_OFFS);
    P("in_ring_len", XENSND_IN_RING_LEN);
    P("sring.req_prod", offsetof(struct xen_sndif_sring, req_prod));
    P("sring.req_event", offsetof(struct xen_sndif_sring, req_event));
    P("sring.rsp_prod", offsetof(struct xen_sndif_sring, rsp_prod));
    P("sring.rsp_event", offsetof(struct xen_sndif_sring, rsp_event));
    P("sring.ring", offsetof(struct xen_sndif_sring, ring));
    P("ring_size", __CONST_RING_SIZE(xen_sndif, 4096));
    P("dir.gref", offsetof(struct xensnd_page_directory, gref));
    P("version", XENSND_PROTOCOL_VERSION);
    P("OP_OPEN", XENSND_OP_OPEN); P("OP_CLOSE", XENSND_OP_CLOSE); P("OP_READ", XENSND_OP_READ);
    P("OP_WRITE", XENSND_OP_WRITE); P("OP_SET_VOLUME", XENSND_OP_SET_VOLUME);
    P("OP_GET_VOLUME", XENSND_OP_GET_VOLUME); P("OP_MUTE", XENSND_OP_MUTE);
    P("OP_UNMUTE", XENSND_OP_UNMUTE); P("OP_TRIGGER", XENSND_OP_TRIGGER);
    P("OP_HW_PARAM_QUERY", XENSND_OP_HW_PARAM_QUERY);
    P("TRIGGER_START", XENSND_OP_TRIGGER_START); P("TRIGGER_PAUSE", XENSND_OP_TRIGGER_PAUSE);
    P("TRIGGER_STOP", XENSND_OP_TRIGGER_STOP); P("TRIGGER_RESUME", XENSND_OP_TRIGGER_RESUME);
    P("EVT_CUR_POS", XENSND_EVT_CUR_POS);
    P("F_S8", XENSND_PCM_FORMAT_S8); P("F_U8", XENSND_PCM_FORMAT_U8);
    P("F_S16_LE", XENSND_PCM_FORMAT_S16_LE); P("F_S16_BE", XENSND_PCM_FORMAT_S16_BE);
    P("F_U16_LE", XENSND_PCM_FORMAT_U16_LE); P("F_U16_BE", XENSND_PCM_FORMAT_U16_BE);
    P("F_S24_LE", XENSND_PCM_FORMAT_S24_LE); P("F_S24_BE", XENSND_PCM_FORMAT_S24_BE);
    P("F_U24_LE", XENSND_PCM_FORMAT_U24_LE); P("F_U24_BE", XENSND_PCM_FORMAT_U24_BE);
    P("F_S32_LE", XENSND_PCM_FORMAT_S32_LE); P("F_S32_BE", XENSND_PCM_FORMAT_S32_BE);
    P("F_U32_LE", XENSND_PCM_FORMAT_U32_LE); P("F_U32_BE", XENSND_PCM_FORMAT_U32_BE);
    P("F_F32_LE", XENSND_PCM_FORMAT_F32_LE); P("F_F32_BE", XENSND_PCM_FORMAT_F32_BE);
    P("F_F64_LE", XENSND_PCM_FORMAT_F64_LE); P("F_F64_BE", XENSND_PCM_FORMAT_F64_BE);
    return 0;
}
"#;

/// Compiles `program` against the installed Xen headers, runs it, and
/// returns what it printed.
fn compile_and_run(program: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (src, exe) = (dir.path().join("abi.c"), dir.path().join("abi"));
    std::fs::write(&src, program).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc).arg("-o").arg(&exe).arg(&src).output().expect("a C compiler");
    assert!(
        out.status.success(),
        "compiling against /usr/include/xen failed (is libxen-dev installed?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(Command::new(&exe).output().unwrap().stdout).unwrap()
}

fn c_layout() -> HashMap<String, i64> {
    compile_and_run(PROGRAM)
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn wire_layout_matches_the_c_header() {
    let c = c_layout();
    let expect = |name: &str, rust: usize| assert_eq!(c[name], rust as i64, "{name}");
    expect("req", wire::MSG_SIZE);
    expect("resp", wire::MSG_SIZE);
    expect("evt", wire::MSG_SIZE);
    expect("evt_page", evt_page::ENTRIES);
    expect("hw_param", HwParam::SIZE);
    expect("req.id", req::ID);
    expect("req.operation", req::OPERATION);
    expect("req.op", req::PAYLOAD);
    expect("open.rate", req::OPEN_RATE);
    expect("open.format", req::OPEN_FORMAT);
    expect("open.channels", req::OPEN_CHANNELS);
    expect("open.buffer_sz", req::OPEN_BUFFER_SZ);
    expect("open.gref_directory", req::OPEN_GREF_DIR);
    expect("open.period_sz", req::OPEN_PERIOD_SZ);
    expect("rw.offset", req::RW_OFFSET);
    expect("rw.length", req::RW_LENGTH);
    expect("trigger.type", req::TRIGGER_TYPE);
    expect("resp.id", resp::ID);
    expect("resp.operation", resp::OPERATION);
    expect("resp.status", resp::STATUS);
    expect("resp.hw_param", resp::HW_PARAM);
    // HwParam::decode/encode use these relative offsets.
    expect("hw.rates", 8);
    expect("hw.channels", 16);
    expect("hw.buffer", 24);
    expect("hw.period", 32);
    expect("evt.id", event::ID);
    expect("evt.type", event::TYPE);
    expect("evt.cur_pos", event::CUR_POS_POSITION);
    expect("evt_page.in_cons", evt_page::IN_CONS);
    expect("evt_page.in_prod", evt_page::IN_PROD);
    expect("in_ring_offs", evt_page::ENTRIES);
    expect("in_ring_len", wire::EVT_RING_LEN as usize);
    expect("sring.req_prod", sring::REQ_PROD);
    expect("sring.req_event", sring::REQ_EVENT);
    expect("sring.rsp_prod", sring::RSP_PROD);
    expect("sring.rsp_event", sring::RSP_EVENT);
    expect("sring.ring", sring::ENTRIES);
    expect("ring_size", wire::REQ_RING_SIZE as usize);
    expect("dir.gref", 4);
    expect("version", xen_vsnd::sndif::PROTOCOL_VERSION as usize);
    // The delay extension lives in bytes the header calls reserved.
    assert!(event::CUR_POS_DELAY >= c["evt.cur_pos"] as usize + 8);
}

#[test]
fn constants_match_the_c_header() {
    let c = c_layout();
    let ops = [
        ("OP_OPEN", op::OPEN),
        ("OP_CLOSE", op::CLOSE),
        ("OP_READ", op::READ),
        ("OP_WRITE", op::WRITE),
        ("OP_SET_VOLUME", op::SET_VOLUME),
        ("OP_GET_VOLUME", op::GET_VOLUME),
        ("OP_MUTE", op::MUTE),
        ("OP_UNMUTE", op::UNMUTE),
        ("OP_TRIGGER", op::TRIGGER),
        ("OP_HW_PARAM_QUERY", op::HW_PARAM_QUERY),
        ("TRIGGER_START", trigger::START),
        ("TRIGGER_PAUSE", trigger::PAUSE),
        ("TRIGGER_STOP", trigger::STOP),
        ("TRIGGER_RESUME", trigger::RESUME),
        ("EVT_CUR_POS", evt::CUR_POS),
    ];
    for (name, v) in ops {
        assert_eq!(c[name], v as i64, "{name}");
    }
    for f in PcmFormat::all() {
        let name = format!("F_{}", f.name().to_uppercase().replace("FLOAT64", "F64").replace("FLOAT", "F32"));
        assert_eq!(c[&name], f.wire() as i64, "{name}");
    }
    // Xen errno values are Linux's on x86 and Arm.
    assert_eq!(errno::EINVAL, libc::EINVAL);
    assert_eq!(errno::EBUSY, libc::EBUSY);
    assert_eq!(errno::ENOSYS, libc::ENOSYS);
}

const IOCTLS: &str = r#"
#include <stdio.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <xen/xen.h>
#include <xen/io/xs_wire.h>
typedef uint16_t domid_t;
#include <xen/sys/evtchn.h>
#include <xen/sys/gntdev.h>
int main(void) {
    printf("%lu %lu %lu %lu %lu\n", (unsigned long)IOCTL_EVTCHN_BIND_INTERDOMAIN,
           (unsigned long)IOCTL_EVTCHN_UNBIND, (unsigned long)IOCTL_EVTCHN_NOTIFY,
           (unsigned long)IOCTL_GNTDEV_MAP_GRANT_REF, (unsigned long)IOCTL_GNTDEV_UNMAP_GRANT_REF);
    printf("%d %d %d %d %d %d %d %d %d\n", XS_DIRECTORY, XS_READ, XS_WATCH, XS_UNWATCH, XS_WRITE,
           XS_RM, XS_WATCH_EVENT, XS_ERROR, XENSTORE_PAYLOAD_MAX);
    return 0;
}
"#;

#[test]
fn linux_transport_numbers_match_the_c_headers() {
    use xen_vsnd::xen::linux::{ioctl, xs};
    let text = compile_and_run(IOCTLS);
    let mut lines = text.lines();
    let ioctls: Vec<u64> = lines.next().unwrap().split(' ').map(|v| v.parse().unwrap()).collect();
    assert_eq!(
        ioctls,
        [
            ioctl::EVTCHN_BIND_INTERDOMAIN,
            ioctl::EVTCHN_UNBIND,
            ioctl::EVTCHN_NOTIFY,
            ioctl::GNTDEV_MAP_GRANT_REF,
            ioctl::GNTDEV_UNMAP_GRANT_REF
        ]
    );
    let wire: Vec<usize> = lines.next().unwrap().split(' ').map(|v| v.parse().unwrap()).collect();
    assert_eq!(
        wire,
        [
            xs::DIRECTORY as usize,
            xs::READ as usize,
            xs::WATCH as usize,
            xs::UNWATCH as usize,
            xs::WRITE as usize,
            xs::RM as usize,
            xs::WATCH_EVENT as usize,
            xs::ERROR as usize,
            xs::PAYLOAD_MAX
        ]
    );
}
