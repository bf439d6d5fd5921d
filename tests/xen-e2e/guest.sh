#!/bin/busybox sh
# init of the PV guest. Loads the sound modules listed in /modules.list,
# waits for the vsnd card, then runs the steps dom0 asks for: dom0 writes a
# step name to the guest's own xenstore key data/go, the guest runs it and
# prints `GUEST: <step> ok` or `GUEST: <step> failed ...` on its console,
# which dom0 reads. Audio goes through hw:0,0 (no ALSA plugins).
/bin/busybox --install -s /bin
mkdir -p /sbin; ln -sf /bin/busybox /sbin/poweroff   # the kernel runs it on `xl shutdown`
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /tmp; mount -t tmpfs tmpfs /tmp
# vsnd_module=ours on the kernel command line: our snd-xen-vsnd instead of
# the upstream snd_xen_front.
list=/modules.list
grep -q "vsnd_module=ours" /proc/cmdline && list=/modules-ours.list
for m in $(cat $list); do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
# xenstore-read talks to /dev/xen/xenbus; fall back to xenfs's file.
if [ ! -e /dev/xen/xenbus ]; then
    mkdir -p /proc/xen; mount -t xenfs xenfs /proc/xen; export XENSTORED_PATH=/proc/xen/xenbus
fi
# `xl shutdown` runs /sbin/poweroff, which signals init (us).
trap 'echo "GUEST: powering off"; poweroff -f' USR2 TERM

for i in $(seq 120); do grep -q "[0-9]" /proc/asound/cards 2>/dev/null && break; sleep 0.5; done
echo "GUEST: cards"; cat /proc/asound/cards; echo "GUEST: pcms"; cat /proc/asound/pcm 2>/dev/null
echo "GUEST: ready"

# A 2.5 s buffer and 200 ms periods: under emulation the host graph can take
# more than a second to start a new node, and ALSA gives up (EIO) when no
# period passes within 1.1 buffer lengths. Long periods also mean a large
# quantum in dom0: fewer wake-ups for the emulated machine.
BUF="-B 2500000 -F 200000"

# wait_until <seconds> <command...>: polls until the command succeeds.
wait_until() {
    local end=$(($(date +%s) + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt $end ] || return 1
        sleep 0.1
    done
}
pw_port() { pw-link $1 | grep -qx "$2"; }
# pcm_ptr <hw_ptr|appl_ptr>: the playback PCM's pointer, in frames.
pcm=/proc/asound/card0/pcm0p/sub0
pcm_ptr() { sed -n "s/^$1 *: *//p" $pcm/status; }
played_to() { [ "$(pcm_ptr hw_ptr)" -ge "$1" ]; }

run_step() {
    case $1 in
    play48)
        aplay -D hw:0,0 $BUF /pattern48.wav ;;
    play44)
        aplay -D hw:0,0 $BUF /pattern44.wav ;;
    play48mmap)
        aplay -M -D hw:0,0 $BUF /pattern48.wav ;;
    pwplay)
        # PipeWire in the guest (guest-pipewire.conf, no session manager):
        # its ALSA sink drives hw:0,0 through mmap; pw-play of the pattern
        # is linked to it by hand. pw-play returns once the sink took its
        # last frames, which the card still holds: wait until its hardware
        # pointer has passed them (stopping PipeWire drops the rest).
        export XDG_RUNTIME_DIR=/tmp/pw PIPEWIRE_RUNTIME_DIR=/tmp/pw HOME=/tmp
        mkdir -p /tmp/pw
        PIPEWIRE_DEBUG=${PWDEBUG:-2} pipewire -c vsnd-guest.conf >/tmp/pipewire.log 2>&1 &
        pw=$!
        rc=1
        if wait_until 30 pw_port -i guest-sink:playback_FR; then
            pw-play -P '{ node.name = guest-player adapter.auto-port-config = { mode = dsp } }' \
                /pattern48-lead.wav >/tmp/pw-play.log 2>&1 &
            play=$!
            if ! wait_until 30 pw_port -o guest-player:output_FR; then echo "no pw-play ports"
            elif ! pw-link guest-player:output_FL guest-sink:playback_FL ||
                 ! pw-link guest-player:output_FR guest-sink:playback_FR; then echo "pw-link failed"
            elif ! wait $play; then echo "pw-play failed"
            elif ! grep -q "access: MMAP_INTERLEAVED" $pcm/hw_params; then
                echo "PipeWire does not use mmap: $(cat $pcm/hw_params)"
            elif ! end=$(pcm_ptr appl_ptr) || ! wait_until 10 played_to "$end"; then
                echo "the card did not play to $end: $(cat $pcm/status)"
            else
                echo "pipewire: $(grep -h "access\|period_size\|buffer_size" $pcm/hw_params | tr '\n' ' ')"
                rc=0
            fi
        else echo "no guest-sink ports"
        fi
        kill $pw; wait $pw
        sed 's/^/GUEST-PW: /' /tmp/pipewire.log /tmp/pw-play.log >/dev/console
        return $rc ;;
    capture|capturemmap)
        # Record; once the capture really runs, tell dom0 (data/capturing)
        # so that it plays the pattern into the sink whose monitor feeds us.
        mode=; [ $1 = capturemmap ] && mode=-M
        arecord $mode -D hw:0,0 $BUF -f S16_LE -r 48000 -c 2 -d 10 /tmp/cap.wav &
        rec=$!
        for i in $(seq 100); do
            grep -q RUNNING /proc/asound/card0/pcm0c/sub0/status 2>/dev/null && break
            sleep 0.1
        done
        xenstore-write data/capturing $1
        wait $rec && xen-vsnd compare --sent /pattern48.wav --got /tmp/cap.wav ;;
    latency)
        # dom0's WirePlumber links playback to the sink and capture to its
        # monitor: the round trip goes through dom0's graph.
        guest-latency 10 ;;
    loop)
        # 1 s plays for ever: they fail while the backend is away and work
        # again once it is back.
        while true; do
            if grep -q "[0-9]" /proc/asound/cards 2>/dev/null &&
                aplay -q -D hw:0,0 $BUF -d 1 /pattern48.wav 2>/dev/null; then
                echo "GUEST: aplay ok again"
            fi
            sleep 1
        done ;;
    esac
}

last=
while true; do
    go=$(xenstore-read data/go 2>/dev/null)
    if [ -n "$go" ] && [ "$go" != "$last" ]; then
        last=$go
        [ "$go" = loop ] && run_step loop
        if out=$(run_step "$go" 2>&1); then
            echo "GUEST: $go ok $(echo "$out" | grep '^compare:\|^guest-latency:\|^pipewire:')"
        else
            echo "GUEST: $go failed: $(echo "$out" | tail -3 | tr '\n' ' ')"
        fi
    fi
    sleep 0.5
done
