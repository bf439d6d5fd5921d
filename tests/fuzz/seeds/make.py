#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into tests/fuzz/corpus/<target>/
(seed-*): one well-formed case of each thing a target reads, so the fuzzer
starts from the protocol's real shapes. ./scripts/fuzz runs it."""
import os
import struct
import sys

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "corpus")


def put(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def req(rid, op, payload=b"", pad=0):
    b = struct.pack("<HBB4x", rid, op, pad) + payload
    return b + bytes(64 - len(b))


OPEN = 0
CLOSE, READ, WRITE, SET_VOL, GET_VOL, MUTE, UNMUTE, TRIGGER, QUERY = range(1, 10)
open_msg = req(1, OPEN, struct.pack("<IBBxxIII", 48000, 2, 2, 65536, 3, 4096))
# HW_PARAM_QUERY: formats (u64 mask), then min/max of rate, channels,
# buffer and period frames.
query = req(2, QUERY, struct.pack("<QIIIIIIII", 1 << 2, 44100, 48000, 1, 2, 64, 16384, 64, 8192))

# request: each operation once.
for i, m in enumerate([open_msg, query] + [req(3, op, struct.pack("<II", 0, 4096)) for op in range(1, 10)]):
    put("request", "op%d" % i, m)

# directory: 20 pages from directory gref 1 (one page listing 2..21).
page = struct.pack("<I", 0) + b"".join(struct.pack("<I", g) for g in range(2, 22))
put("directory", "one-page", struct.pack("<H", 20) + bytes([1]) + page + bytes(4096 - len(page)))

# card_config: what libxl writes for a card with one PCM, two streams.
put("card_config", "libxl", b"\n".join(s.encode() for s in [
    "short-name=XenSnd", "long-name=Xen PV Sound", "sample-rates=44100,48000",
    "sample-formats=s16_le,s32_le", "channels-min=1", "channels-max=2", "buffer-size=65536",
    "0/name=dev0", "0/0/unique-id=pw0-play", "0/0/type=p", "0/1/unique-id=pw0-cap", "0/1/type=c",
    "0/1/sample-rates=48000", "0/1/channels-max=1"]))

# policy: the shape of session-config/config.default.toml.
put("policy", "vm", b'[defaults]\nplayback = true\ncapture = false\n\n[vm.work-vm]\ncapture = true\nvolume_cap = 0.5\n'
    b'target = "alsa_output.pci"\nmin_quantum = 64\n[vm.work-vm.node_properties]\n"node.latency" = "256/48000"\n')

# stream: flags, then steps (0 queue a request, 1 poke, 2 req_prod, 3 serve, 4 cycles).
def queue(m):
    return bytes([0]) + m


good_open = req(1, OPEN, struct.pack("<BH", 1, 1024), pad=0x80)
start = req(2, TRIGGER, bytes([0]))
prog = bytes([0]) + queue(good_open) + b"\x03" + queue(start) + b"\x03" + b"\x04\x07" * 4
prog += queue(query) + queue(req(4, SET_VOL, struct.pack("<II", 0, 8))) + b"\x03"
prog += queue(req(5, TRIGGER, bytes([2]))) + queue(req(6, CLOSE)) + b"\x03"
put("stream", "play", prog)
put("stream", "capture-delay", bytes([3]) + prog[1:])
