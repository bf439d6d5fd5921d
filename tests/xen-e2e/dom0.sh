#!/bin/bash
# Runs inside dom0 (the host's filesystem, read-only, tmpfs on /run /tmp):
# the toolstack, PipeWire + WirePlumber with a null sink, xen-vsnd, then a
# guest with a vsnd device (tests/xen-e2e/guest.sh is its init), driven step
# by step through its xenstore key data/go. Every check prints
# `XE: PASS <step>` or `XE: FAIL <step>: <why>`; logs go to $work/out.
root=$1 work=$2
out=$work/out
bin=$root/target/release/xen-vsnd
sim=$root/target/release/xen-vsnd-sim
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin

# wait_for <seconds> <command...>: polls until the command succeeds, bounded
# by the clock (under emulation every fork is slow: never count polls).
wait_for() {
    local end=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.5
    done
}
# check <step> <command...>: PASS if the command succeeds. The logs are
# saved each time, so a run cut short still leaves them.
check() {
    local step=$1; shift
    checks=$((checks + 1))
    if "$@"; then echo "XE: PASS $step [${SECONDS}s]"; else echo "XE: FAIL $step${why:+: $why} [${SECONDS}s]"; fi
    why=
    save_logs
    touch /run/last-check
}
# stop <pid> <signal>: signals a process and waits for it, 5 s at most.
stop() {
    kill -$2 $1 2>/dev/null
    for _ in $(seq 50); do kill -0 $1 2>/dev/null || return 0; sleep 0.1; done
    kill -9 $1 2>/dev/null
}

guest=audioguest
glog=/var/log/xen/console/guest-$guest.log
# guest_said <regex>: the guest's console has a line matching it.
guest_said() { grep -aEq "$1" $glog 2>/dev/null; }
# go <step>: asks the guest to run a step (see guest.sh).
go() { xenstore-write /local/domain/$domid/data/go "$1"; }
# run_guest_step <step> <seconds>: asks, then waits for its ok/failed line.
run_guest_step() {
    go $1
    wait_for $2 guest_said "GUEST: $1 (ok|failed)"
    guest_step_ok $1
}
# guest_step_ok <step>: the guest's last word on the step was ok.
guest_step_ok() {
    why=$(grep -a "GUEST: $1 " $glog | tail -1)
    guest_said "GUEST: $1 ok"
}
# A guest's nodes live as long as its sound driver is connected, so a
# snapshot finds them whenever the guest plays.
node_exists() { pw-cli ls Node 2>/dev/null | grep -q "node.name = \"$1\""; }
# $RT <command...>: runs a PipeWire client at real-time priority (chrt
# execs it: $! of a background one is the client's pid). pw-play
# and pw-record process audio in their main thread: at normal priority,
# under emulation, a cycle now and then came too late and the sink mixed
# one quantum of silence for the player (seen in a guest's capture, with
# xen-vsnd's own capture stream on time: late_cycles=0).
RT="chrt -f 20"
# record <rate> <file>: records the null sink's monitor in the background
# (to tmpfs: writing through 9p under emulation costs too much).
record() {
    $RT pw-record --target null-sink -P '{ stream.capture.sink = true node.name = e2e-recorder }' \
        --format s16 --rate $1 --channels 2 "$2" >>/run/record.log 2>&1 &
    rec=$!
    wait_for 20 sh -c 'pw-link -l | grep -q "e2e-recorder:input_FL"'
}
# intact <sent> <recording> [compare options]: the recording carries the
# signal frame by frame (one compare: under emulation it takes seconds).
intact() {
    local rc
    why=$($sim compare --sent "$1" --got "$2" "${@:3}" 2>&1)
    rc=$?
    why=$(echo "$why" | tr '\n' ' ')
    echo "XE: $why"
    return $rc
}
# delivered_all <stream>: xen-vsnd's own count for the stream's last run:
# no underrun but the final, partly filled cycle.
delivered_all() {
    local line
    line=$(grep -h "closed stream=$1 " /run/vsnd*.log | tail -1)
    why="${line#*closed }"
    [ -n "$line" ] && [ "$(echo "$line" | sed -n 's/.* underruns=\([0-9]*\) .*/\1/p')" -le 1 ]
}
# resources <pid>: event channels (one /dev/xen/evtchn file each) and grant
# mappings (/dev/xen/gntdev maps) the backend process holds.
resources() {
    echo "evtchn=$(ls -l /proc/$1/fd 2>/dev/null | grep -c /dev/xen/evtchn)" \
         "grant_maps=$(grep -c /dev/xen/gntdev /proc/$1/maps 2>/dev/null)"
}
# released <domid>: after the guest is gone, the backend holds nothing of
# it, its backend directory is gone, and Xen freed the domain (a domain
# whose pages are still mapped stays behind as a "(null)" zombie).
released() {
    why="backend $(resources $backend); xl list: $(xl list | awk 'NR>1 {printf "%s ", $1}')"
    [ "$(resources $backend)" = "evtchn=0 grant_maps=0" ] &&
        ! xenstore-exists /local/domain/0/backend/vsnd/$1 &&
        ! xl list | grep -q '(null)'
}
save_logs() {
    cp /run/*.log /run/*.wav $out/ 2>/dev/null; cp /var/log/xen/console/*.log* $out/ 2>/dev/null
    printf 'guest=%s\nbackend=%s\n' "$guest" "$backend_log" >$out/current
}

mkdir -p /run/xen /var/log/xen/console
# Logs reach the host every few seconds too, so a run that hangs still
# leaves them.
( while sleep 10; do cp /run/*.log /var/log/xen/console/*.log* $out/ 2>/dev/null; done ) &
# A stall reporter: when no check has ended for 600 s (the longest gap
# between two checks is under 120 s), what every process waits on, the
# domains, and the kernel's last words go to out/stall.log, once per stall;
# the run prints it. (One CI run hung after a guest's xl destroy with
# nothing to say why.)
touch /run/last-check
( while sleep 30; do
    [ -n "$(find /run/last-check -mmin -10)" ] && continue
    [ -e /run/stall-reported ] && [ /run/stall-reported -nt /run/last-check ] && continue
    { date; ps -eo pid,stat,wchan:32,etime,args; xl list; dmesg | tail -40
      for p in $(pgrep -x xl); do echo "xl $p:"; cat /proc/$p/stack; done; } >$out/stall.log 2>&1
    touch /run/stall-reported
    echo "XE: stall: no check for 600 s (out/stall.log)"
  done ) &
xenstored --pid-file /run/xenstored.pid
xen-init-dom0 >/dev/null
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
echo "XE: toolstack up"

export XDG_RUNTIME_DIR=/run/pw XDG_CONFIG_HOME=/run/pwconf XDG_STATE_HOME=/run/pwstate PIPEWIRE_RUNTIME_DIR=/run/pw
mkdir -p $XDG_RUNTIME_DIR $XDG_CONFIG_HOME/pipewire/pipewire.conf.d $XDG_STATE_HOME; chmod 700 $XDG_RUNTIME_DIR
cp $root/pw-modules/null-sink.conf $XDG_CONFIG_HOME/pipewire/pipewire.conf.d/
# Let the guests' 200 ms periods set a quantum of 4096 (the default stops at
# 2048): half the wake-ups, which the emulated machine needs.
echo 'context.properties = { default.clock.max-quantum = 8192 }' \
    >$XDG_CONFIG_HOME/pipewire/pipewire.conf.d/quantum.conf
# start_pipewire: PipeWire, then WirePlumber, each up ($pw and $wp).
start_pipewire() {
    pipewire >>/run/pipewire.log 2>&1 &
    pw=$!
    wait_for 20 test -S $XDG_RUNTIME_DIR/pipewire-0
    dbus-run-session -- wireplumber >>/run/wireplumber.log 2>&1 &
    wp=$!
    wait_for 60 sh -c 'pw-cli ls Client | grep -q "\"WirePlumber\""'
}
start_pipewire

# xen-vsnd as the system unit runs it (session-config/xen-vsnd.service):
# user and group xen-vsnd (tests/xen-e2e/run creates them, as the package
# would), the Xen devices through the udev rule, no capabilities, no new
# privileges, real-time limits, its runtime directory, and the desktop
# session's PipeWire handed over by `xen-vsnd session`.
mkdir -p /run/udev/rules.d
cp $root/session-config/60-xen-vsnd.rules /run/udev/rules.d/
# udev_rule_applies: udev's own rule engine (udevadm test applies what it
# finds) gives the service's group the three devices, read-write.
udev_rule_applies() {
    local d out
    for d in xenbus evtchn gntdev; do
        out=$(udevadm test --action=add "/sys/class/misc/xen!$d" 2>&1)
        echo "$out" | grep -q "60-xen-vsnd.rules:[0-9]* GROUP" || { why="xen/$d: the rule did not match"; return 1; }
        [ "$(stat -c '%G %a' /dev/xen/$d)" = "xen-vsnd 660" ] || { why="/dev/xen/$d: $(stat -c '%G %a' /dev/xen/$d)"; return 1; }
    done
    why=$(ls -l /dev/xen | tr '\n' ' ')
}
check "udev rule: group xen-vsnd gets /dev/xen/xenbus, evtchn and gntdev (mode 660)" udev_rule_applies
# As the package installs it: the binary where the service user can run it.
install -D -m755 $bin /run/xen-vsnd-bin/xen-vsnd
bin=/run/xen-vsnd-bin/xen-vsnd
# dom0's policy: the microphone for audioguest and vsndguest, not for
# guest612 (the default: denied).
policy=/run/xen-vsnd-policy.toml
printf '[vm.audioguest]\ncapture = true\n\n[vm.vsndguest]\ncapture = true\n' >$policy
chmod 644 $policy
mkdir -p /run/xen-vsnd && chown xen-vsnd:xen-vsnd-session /run/xen-vsnd && chmod 755 /run/xen-vsnd
# start_backend [serve options]: as the unit's ExecStart, User=, Group=,
# SupplementaryGroups=, NoNewPrivileges=, CapabilityBoundingSet=,
# LimitRTPRIO=, RuntimeDirectory=.
start_backend() {
    prlimit --rtprio=95 --memlock=$((64 << 20)) -- \
        setpriv --reuid=xen-vsnd --regid=xen-vsnd-session --groups=xen-vsnd --no-new-privs --inh-caps=-all --bounding-set=-all \
        env -i PATH=/usr/bin:/bin RUNTIME_DIRECTORY=/run/xen-vsnd \
        $bin serve --transport xen --pipewire-from-sessions --config $policy "$@" >/run/$backend_log 2>&1 &
    backend=$!
}
backend_log=vsnd.log
start_backend
wait_for 20 grep -q "serving vsnd devices" /run/vsnd.log && echo "XE: backend up"
check "xen-vsnd runs as user xen-vsnd with no capabilities; its control socket is group xen-vsnd-session" \
    sh -c "[ \"\$(stat -c %U /proc/$backend)\" = xen-vsnd ] && grep -q '^CapEff:[[:space:]]*0*\$' /proc/$backend/status &&
        [ \"\$(stat -c '%G %a' /run/xen-vsnd/control)\" = 'xen-vsnd-session 660' ]"
# The desktop user's part: hands its PipeWire to the service when asked.
$bin session --control /run/xen-vsnd/control >>/run/session.log 2>&1 &
check "xen-vsnd session hands dom0's PipeWire to the service" \
    wait_for 30 grep -q "connected through the session's PipeWire" /run/$backend_log

xl_create() { xl create ${1:-$work/guest.cfg} >/run/xl.log 2>&1; local rc=$?; why=$(tail -3 /run/xl.log); return $rc; }
# The domain that serves the guest's card (dom0, or the driver domain)
# and the card's device id (a card attached again is a new device).
bedom=0 devid=0
states() {
    fe=$(xenstore-read /local/domain/$domid/device/vsnd/$devid/state 2>/dev/null)
    be=$(xenstore-read /local/domain/$bedom/backend/vsnd/$domid/$devid/state 2>/dev/null)
    why="frontend=$fe backend=$be"
    [ "$fe" = 4 ] && [ "$be" = 4 ]
}

# playback_step <guest step> <rate> <label>: the guest plays the pattern at
# <rate>, dom0 records the sink and compares.
playback_step() {
    record $2 /run/$1.wav
    go $1
    wait_for 60 node_exists xen-vsnd.$guest.0.0.playback
    check "$3guest playback node in dom0 PipeWire, named by the domain ($1)" \
        node_exists xen-vsnd.$guest.0.0.playback
    wait_for 90 guest_said "GUEST: $1 (ok|failed)"
    check "$3guest plays S16_LE $2 Hz stereo ($1)" guest_step_ok $1
    sleep 1   # the last frames reach the sink a few cycles after aplay returns
    stop $rec INT
    check "$3xen-vsnd delivered every frame of the guest's playback ($1)" \
        delivered_all xen-vsnd.$guest.0.0.playback
    check "$3guest playback ($1) arrives intact at the sink: every frame, in order, unchanged" \
        intact $work/guest/pattern${2:0:2}.wav /run/$1.wav
}

# Capture: the guest records while dom0 plays into the sink whose monitor
# WirePlumber links to the guest's capture node.
capture_step() {   # capture_step <guest step> <label>
    go $1
    wait_for 60 sh -c "pw-link -l | grep -q 'xen-vsnd.$guest.0.0.capture:input_FL'"
    # The guest says when its capture runs: play only then.
    wait_for 60 sh -c "[ \"\$(xenstore-read /local/domain/$domid/data/capturing)\" = $1 ]"
    local t0=$SECONDS top
    # pw-top samples every node's xrun count (ERR) once a second.
    pw-top -b >/run/top-$1.log 2>&1 &
    top=$!
    $RT pw-play --target null-sink $work/guest/pattern48.wav >>/run/play.log 2>&1
    stop $top INT
    player_xruns=$(awk '/ pw-play *$/ && $9 ~ /^[0-9]+$/ && $9 > m { m = $9 } END { print m + 0 }' /run/top-$1.log)
    echo "XE: $1: the guest captured from [${t0}s], dom0's pw-play of 3 s ended at [${SECONDS}s]," \
        "xruns of pw-play counted by dom0: $player_xruns"
    check "$2guest capture node in dom0 PipeWire, linked" node_exists xen-vsnd.$guest.0.0.capture
    wait_for 60 guest_said "GUEST: $1 (ok|failed)"
    check "$2dom0 plays into the guest's capture: the guest records it intact ($1)" captured_intact $1
    check "$2xen-vsnd status shows the guest's capture stream, allowed by the config" \
        sh -c "$bin status --json | grep -A40 '\"node\": \"xen-vsnd.$guest.0.0.capture\"' | grep -q '\"capture_from\": \"config\"'"
}
# A guest the policy does not allow the microphone: it records while dom0
# plays the pattern into the sink, and gets nothing but zeros.
capture_denied_step() {   # capture_denied_step <label>
    go capturedenied
    wait_for 60 sh -c "pw-link -l | grep -q 'xen-vsnd.$guest.0.0.capture:input_FL'"
    wait_for 60 sh -c "[ \"\$(xenstore-read /local/domain/$domid/data/capturing)\" = capturedenied ]"
    # (the only guest capture node in dom0's graph now)
    why=$(pw-dump 2>&1 | grep -a '"xen-vsnd.capture"')
    check "$1the guest's capture node says the microphone is denied" \
        sh -c "pw-dump | grep -q '\"xen-vsnd.capture\": \"denied\"'"
    $RT pw-play --target null-sink $work/guest/pattern48.wav >>/run/play.log 2>&1
    wait_for 60 guest_said "GUEST: capturedenied (ok|failed)"
    check "$1capture denied by dom0's policy: the guest records only zero samples while dom0 plays" \
        guest_step_ok capturedenied
}
# closed_value <stream> <key>: a figure of the stream's last closed line.
closed_value() {
    grep -h "closed stream=$1 " /run/vsnd*.log 2>/dev/null | tail -1 | sed -n "s/.* $2=\([0-9]*\) .*/\1/p"
}
# captured_intact <step>: the guest recorded the pattern intact. The one
# allowance: every frame is accounted for but for glitches of at most a
# cycle each (silence inserted, or a cycle's frames lost), and dom0 counted
# at least as many late cycles while the pattern played — of the player
# (pw-top's ERR for pw-play; under emulation a cycle of it now and then
# comes too late: the sink mixes silence for it, and may drop what it
# brings late) or of xen-vsnd's capture stream. Then the check passes and
# says so.
captured_intact() {
    guest_step_ok $1 && return 0
    local glitches late
    glitches=$(echo "$why" | sed -n 's/.*every frame accounted for but for \([0-9]*\) glitches.*/\1/p')
    [ -n "$glitches" ] || return 1
    late=$(closed_value xen-vsnd.$guest.0.0.capture late_cycles)
    echo "XE: note: $1: $glitches glitches; xruns of pw-play: $player_xruns, late cycles of xen-vsnd: ${late:-?}"
    [ "$glitches" -le $((player_xruns + ${late:-0})) ]
}
# late_cycles <stream>: xen-vsnd's count of late cycles for the stream's
# last run (0 when it has not closed one).
late_cycles() {
    local n
    n=$(closed_value $1 late_cycles)
    echo "${n:-0}"
}
# excused_by_late_cycles <impulses off>: the latency checks' one allowance:
# as many impulses off as xen-vsnd counted late cycles in the guest's two
# streams (a cycle the host ran late moves what it carried by a cycle);
# says so.
excused_by_late_cycles() {
    local late
    late=$(( $(late_cycles xen-vsnd.$guest.0.0.playback) + $(late_cycles xen-vsnd.$guest.0.0.capture) ))
    echo "XE: note: latency: $1 impulses off by more than 2 frames; late cycles of xen-vsnd's two streams: $late"
    [ "$1" -le "$late" ]
}
# latency_exact: the in-guest latency check (guest-latency): every impulse
# came back within 2 frames of where snd_pcm_delay() said, but for
# excused_by_late_cycles.
latency_exact() {
    run_guest_step latency 150 && return 0
    local off
    off=$(echo "$why" | sed -n 's/.*guest-latency: \([0-9]*\) of [0-9]* impulses off.*/\1/p')
    [ -n "$off" ] && excused_by_late_cycles "$off"
}
# latency_figures <label>: the check's spread and median lines.
latency_figures() {
    grep -ao "guest-latency: measured [a-z0-9 -]*" $glog | tail -1 | sed "s/^/XE: $1/"
    grep -ao "guest-latency-impulses: [a-z0-9 -]*" $glog | tail -1 | sed "s/^/XE: $1/"
}
# restart_step <label> [serve options]: kill the backend while the guest is
# connected and playing, start it again; the guest must connect and play
# again.
restart_step() {
    go loop
    wait_for 30 guest_said "aplay ok again"
    kill -9 $backend; wait $backend 2>/dev/null
    before=$(grep -ac "aplay ok again" $glog)
    restarts=$((restarts + 1))
    backend_log=vsnd-restart$restarts.log
    start_backend "${@:2}"
    # The frontend first removes its card (the guest application sees
    # errors and closes), then connects again: give it time under emulation.
    check "$1xen-vsnd killed and restarted with a guest connected: the guest reconnects" \
        wait_for 180 grep -q "connected domid=$domid" /run/$backend_log
    check "$1the guest plays again after the backend restart" wait_for 120 played_again
    echo "XE: backend with the guest connected: $(resources $backend)"
}
played_again() { [ "$(grep -ac "aplay ok again" $glog)" -gt "$before" ]; }
# Every phase plays at least three times on one connection, each recorded
# and compared: the play steps after the first are labelled "second" and
# "third aplay on the same connection". Each OPEN after the first starts
# the event ids anew for a Linux 7.2 frontend and not for older ones:
# xen-vsnd serves both (docs/protocol.md). aplay returning means its period
# interrupts came (without them ALSA gives up with EIO).
SECOND="second aplay on the same connection: " THIRD="third aplay on the same connection: "
# boot_guest <cfg> <label>: xl create, both ends Connected, the card.
boot_guest() {
    check "$2xl create with a vsnd device (the backend answers the handshake)" xl_create $1
    domid=$(xl domid $guest 2>/dev/null)
    wait_for 120 states
    check "$2backend and frontend Connected" states
    wait_for 90 guest_said "GUEST: ready"
    why=$(grep -a -A4 "GUEST: cards" $glog | tr '\n' ' ')
    check "$2guest ALSA card with PCM dev0: playback and capture" \
        grep -aq '00-00: dev0 .*playback 1 : capture 1' $glog
    echo "XE: $(grep -a "GUEST: kernel" $glog | tail -1)"
}
# destroy_guest <label>: xl destroy, and nothing of the guest is left.
destroy_guest() {
    why=$(timeout -k 5 120 xl destroy $guest 2>&1 | tr '\n' ' ')
    check "$1xl destroy: the toolstack removes the device" sh -c "! xl domid $guest >/dev/null 2>&1"
    check "$1after xl destroy: no backend state, grant maps or event channels left" wait_for 30 released $domid
}
# E2E_PHASES (tests/xen-e2e/run passes it on): a comma-separated choice of
# upstream (6.1 guest, snd_xen_front), upstream612 (6.12 guest,
# snd_xen_front), ours (6.1 guest, snd-xen-vsnd), drvdom (xen-vsnd in a
# driver domain) and peer (snd_be beside xen-vsnd; only with
# E2E_PEER_SND_BE); all by default.
phases=$(cat $work/phases 2>/dev/null)
phase() { case ",${phases:-all}," in *,all,*|*,$1,*) return 0 ;; esac; return 1; }
if phase upstream; then
boot_guest $work/guest.cfg ""
echo "XE: backend with the guest connected: $(resources $backend)"

# A link made by hand (pw-link) to the guest's node before it plays: the
# node lives as long as the guest's driver is connected, idle (inactive)
# until the guest opens a stream, so pw-link completes when the first
# aplay starts; the link must then survive that stream's CLOSE and the
# next OPEN, and be the same link at the second aplay.
$RT pw-record -P '{ node.name = manual-tap node.autoconnect = false }' --format s16 --rate 48000 \
    --channels 2 /run/manual-tap.wav >>/run/record.log 2>&1 &
tap=$!
wait_for 20 sh -c 'pw-link -i | grep -q "manual-tap:input_FR"'
for ch in FL FR; do
    pw-link xen-vsnd.$guest.0.0.playback:output_$ch manual-tap:input_$ch >>/run/record.log 2>&1 &
done
# manual_links: the links into the tap, with their ids ("52 |-> 47 manual-tap:input_FL").
manual_links() { pw-link -l -I | grep -a '|->.*manual-tap:input_F'; }
playback_step play48 48000 ""
links_before=$(manual_links)
why="$links_before"
check "a pw-link made before the guest played connects its node" [ "$(echo "$links_before" | grep -c manual-tap)" = 2 ]
playback_step replay2 48000 "$SECOND"
links_after=$(manual_links)
why="before: $links_before; after: $links_after"
check "${SECOND}the hand-made links are still the same links" [ -n "$links_before" -a "$links_before" = "$links_after" ]
stop $tap INT

capture_step capture ""

# dom0's PipeWire killed (as a crash; an upgrade restarts it the same way)
# and started again while the guest plays 60 s (PipeWire and WirePlumber
# took 17 to 29 s to come back under emulation: twice that is left to
# record afterwards): the guest's aplay goes on
# (xen-vsnd runs its stream on a fallback clock meanwhile), the node comes
# back with its name, and what the guest plays from then on reaches the
# sink intact.
go longplay
wait_for 60 sh -c "[ \"\$(xenstore-read /local/domain/$domid/data/playing)\" = longplay ]"
t0=$SECONDS
kill -9 $pw; stop $wp INT; wait $pw 2>/dev/null
start_pipewire
check "dom0 PipeWire restarted while the guest plays: the guest's node is back" \
    wait_for 60 node_exists xen-vsnd.$guest.0.0.playback
echo "XE: PipeWire restarted in $((SECONDS - t0)) s"
record 48000 /run/longplay.wav
wait_for 120 guest_said "GUEST: longplay (ok|failed)"
check "dom0 PipeWire restarted while the guest plays: the guest plays on to the end" guest_step_ok longplay
sleep 1
stop $rec INT
why=$(grep -a "PipeWire daemon" /run/$backend_log | tr '\n' ' ')
check "dom0 PipeWire restarted while the guest plays: xen-vsnd saw it go and connected again" \
    grep -q "connected to the PipeWire daemon again" /run/$backend_log
check "dom0 PipeWire restarted while the guest plays: what the guest plays after the restart arrives intact" \
    intact $work/guest/pattern48-long.wav /run/longplay.wav --min-fraction 0.1

# Playback at 44.1 kHz, with the graph at 44.1 kHz so nothing resamples.
pw-metadata -n settings 0 clock.force-rate 44100 >/dev/null
playback_step play44 44100 "$THIRD"
pw-metadata -n settings 0 clock.force-rate 0 >/dev/null

restart_step ""

# Orderly shutdown: the frontend closes, the toolstack removes the device.
why=$(timeout 120 xl shutdown -w audioguest 2>&1 | tail -2 | tr '\n' ' ')
check "xl shutdown: the guest powers off" sh -c '! xl domid audioguest >/dev/null 2>&1'
check "after xl shutdown: no backend state, grant maps or event channels left" wait_for 30 released $domid

# The same guest again, destroyed this time.
mv $glog $glog.1
xl_create
domid=$(xl domid audioguest 2>/dev/null)
wait_for 120 guest_said "GUEST: ready"
check "a new guest with the same name gets sound again" run_guest_step play48 90
destroy_guest ""
check "xen-vsnd still running" kill -0 $backend

fi

# A later generation of the upstream frontend: the guest on Linux 6.12.
if phase upstream612; then
guest=guest612
glog=/var/log/xen/console/guest-$guest.log
L="Linux 6.12 snd_xen_front: "
boot_guest $work/guest612.cfg "$L"
check "${L}the guest runs Linux 6.12" guest_said "GUEST: kernel 6\.12\."
playback_step play48 48000 "$L"
playback_step replay2 48000 "$L$SECOND"
playback_step replay3 48000 "$L$THIRD"
capture_denied_step "$L"
# What an unmodified guest's snd_pcm_delay() misses: its playback goes
# through a sink with an output latency, as a real device has (50 ms, a
# delay line declared as its latency offset; the null sink has none), and
# its capture records the null sink's monitor. guest-latency's error per
# impulse is what the guest was not told: with the playback position at
# the DMA engine (the default) both delays dom0 measured, at the DAC
# (`playback_position = "dac"`) the capture delay alone (a capture
# position cannot run ahead of the data: only the extension carries it).
# The guest may record for these steps (`xen-vsnd ctl mic`, until the next
# reload).
$bin ctl --control /run/xen-vsnd/control mic allow $guest >/dev/null
pw-cli -m load-module libpipewire-module-loopback '{ node.description = "delay50"
    capture.props = { node.name = "delay-sink" media.class = "Audio/Sink" audio.position = [ FL FR ] }
    playback.props = { node.name = "delay-out" target.object = "null-sink" audio.position = [ FL FR ] }
    target.delay.sec = 0.05 }' </dev/null >>/run/loopback.log 2>&1 &
delayline=$!
# node_id <name>: a node's id in dom0's graph.
node_id() { pw-cli ls Node 2>/dev/null | awk -v n="node.name = \"$1\"" '/^\tid [0-9]+,/ { id = $2 } index($0, n) { sub(",", "", id); print id; exit }'; }
wait_for 30 node_exists delay-sink
pw-cli set-param "$(node_id delay-sink)" Props '{ latencyOffsetNsec: 50000000 }' >>/run/loopback.log 2>&1
moved=$(node_id xen-vsnd.$guest.0.0.playback)
pw-metadata -n default "$moved" target.object delay-sink >>/run/loopback.log 2>&1
# impulses_missed <expected>: every impulse of the last latency run (its
# lines after the first $from) came back, each off by <expected> (what the
# guest was not told) within 2 frames, but for excused_by_late_cycles.
impulses_missed() {
    local errs off
    errs=$(grep -a "GUEST-LAT: impulse" $glog | tail -n +$((from + 1)) |
        sed -n 's/.* error \(-\{0,1\}[0-9]*\) .*/\1/p; s/.*not found.*/lost/p')
    why="each should be $1; impulse errors: $(echo $errs)"
    [ -n "$errs" ] || return 1
    off=$(echo "$errs" | awk -v e="$1" '$1 == "lost" { n++; next } { d = $1 - e; if (d < -2 || d > 2) n++ } END { print n + 0 }')
    [ "$off" = 0 ] || excused_by_late_cycles "$off"
}
for pos in dma dac; do
    step=latency what="both delays"
    if [ $pos = dac ]; then
        step=latency2 what="the capture delay"
        printf '\n[vm.guest612]\nplayback_position = "dac"\ncapture = true\n' >>$policy
        $bin ctl --control /run/xen-vsnd/control reload >/dev/null
    fi
    from=$(grep -ac "GUEST-LAT: impulse" $glog)
    run_guest_step $step 150
    latency_figures "${L}playback_position = $pos: "
    dp=$(closed_value xen-vsnd.$guest.0.0.playback delay_frames)
    dc=$(closed_value xen-vsnd.$guest.0.0.capture delay_frames)
    echo "XE: ${L}playback_position = $pos: dom0's delays: playback ${dp:-?} capture ${dc:-?} frames"
    missed=$(( ${dc:-0} + ${dp:-0} )); [ $pos = dac ] && missed=${dc:-0}
    check "${L}playback_position = $pos: every impulse is off by exactly what the guest was not told, $what (guest-latency)" \
        impulses_missed "$missed"
done
# (an id PipeWire may give a later node: the move must not follow it)
pw-metadata -n default -d "$moved" target.object >>/run/loopback.log 2>&1
stop $delayline INT
destroy_guest "$L"
fi

if phase ours; then

# The guest again, with our own frontend, snd-xen-vsnd, instead of upstream's.
guest=vsndguest
glog=/var/log/xen/console/guest-$guest.log
L="snd-xen-vsnd: "
boot_guest $work/guest-ours.cfg "$L"
check "${L}the card has the configured names (XenSnd, Xen PV Sound)" \
    sh -c "grep -aq 'XenVsnd - XenSnd' $glog && grep -aq 'Xen PV Sound' $glog"
check "${L}the module parameter id= names the card (XenVsndE2E)" grep -aq '\[XenVsndE2E *\]: XenVsnd' $glog
why=$(grep -a "connected:" $glog)
check "${L}both ends speak the delay extension" guest_said "connected: 2 streams, delay reports on"
playback_step play48 48000 "$L"
playback_step replay2 48000 "$L$SECOND"
playback_step play48mmap 48000 "$L$THIRD"
# A guest running PipeWire: its ALSA sink and source use the card through
# mmap.
playback_step pwplay 48000 "${L}guest PipeWire: "
capture_step pwrecord "${L}guest PipeWire: "
# ... and as a desktop runs it, with udev and WirePlumber.
playback_step wpplay 48000 "${L}guest PipeWire + WirePlumber: "
capture_step wprecord "${L}guest PipeWire + WirePlumber: "
capture_step capturemmap "$L"
capture_step capture "$L"
# The driver logs each stream's figures when it is released (dev_dbg; the guest enables it):
# "<stream>: <frames> frames, <n> period interrupts of <p> frames, <e> early".
periods_exact() {
    why=$(grep -a "period interrupts of" $glog | sed 's/^.*vsnd-0: //' | tr '\n' ';')
    grep -a "period interrupts of" $glog | sed 's/^.*: \([0-9]*\) frames, \([0-9]*\) period interrupts of \([0-9]*\) frames, \([0-9]*\) early.*/\1 \2 \3 \4/' |
        awk 'NF == 4 { n++; if ($2 != int($1 / $3) || $4 != 0) bad++ } END { exit !(n >= 4 && !bad) }'
}
check "${L}one period interrupt per whole period played or recorded, none early" periods_exact
check "${L}snd_pcm_delay() matches the round trip through dom0's sink for every impulse, within 2 frames (guest-latency)" \
    latency_exact
latency_figures ""
check "${L}guest PipeWire + xen-vsnd-guest: the latency PipeWire reports equals the round trip through dom0 within 2 ms (guest-pw-latency; the goal, 1 ms, is judged by the figure below)" \
    run_guest_step pwlatency 300
grep -a "guest-pipewire-latency:" $glog | tail -1 | sed 's/^.*guest-pipewire-latency:/guest-pipewire-latency:/; s/^/XE: /'
restart_step "$L"
# A backend that does not offer the delay extension: the driver falls back
# to the base protocol and still plays.
restart_step "${L}backend without the delay extension: " --no-delay-report
why=$(grep -a "connected:" $glog | tail -1)
check "${L}backend without the delay extension: the driver says delay reports off" \
    sh -c "grep -a 'connected:' $glog | tail -1 | grep -q 'delay reports off'"
destroy_guest "$L"
fi

# A driver domain: xen-vsnd and PipeWire in an unprivileged PV domain
# (tests/xen-e2e/drvdom.sh), serving a guest whose card says
# backend=drvdom. dom0 runs only `xen-vsnd vouch`, which copies the guest's
# name where the driver domain can read it.
if phase drvdom; then
L="driver domain: "
# As xen-vsnd-vouch.service runs it: user xen-vsnd (the udev rule gives
# its group /dev/xen/xenbus), no capabilities, no new privileges.
setpriv --reuid=xen-vsnd --regid=xen-vsnd --groups=xen-vsnd --no-new-privs --inh-caps=-all --bounding-set=-all \
    env -i PATH=/usr/bin:/bin $bin vouch >>/run/vouch.log 2>&1 &
voucher=$!
drvlog=/var/log/xen/console/guest-drvdom.log
# boot_drvdom: the driver domain up, its xen-vsnd serving ($drvid).
boot_drvdom() {
    xl create $work/drvdom.cfg >/run/xl.log 2>&1 || { why=$(tail -3 /run/xl.log); return 1; }
    drvid=$(xl domid drvdom 2>/dev/null)
    wait_for 180 grep -aq "GUEST: driver domain ready" $drvlog
    why=$(grep -a "GUEST: " $drvlog | tail -4 | tr '\n' ' ')
    grep -aq "GUEST: driver domain ready" $drvlog
}
# drv_step <step> <seconds>: a step in the driver domain (drvdom.sh).
drv_step() {
    local g=$glog d=$domid rc
    glog=$drvlog domid=$drvid
    run_guest_step "$@"; rc=$?
    glog=$g domid=$d
    return $rc
}
# drv_play_intact <n> <label>: the guest plays the pattern; the driver
# domain records its null sink and compares.
drv_play_intact() {
    check "$2the driver domain records its sink" drv_step record$1 60
    check "$2the guest plays through the driver domain" run_guest_step play48-$1 90
    check "$2the guest's playback arrives intact at the driver domain's sink" drv_step check$1 60
    grep -a "GUEST: check$1 " $drvlog | tail -1 | sed 's/^GUEST: /XE: drvdom: /'
}
check "${L}xl create of the driver domain: PipeWire and xen-vsnd up in it" boot_drvdom
echo "XE: driver domain is domain $drvid"
guest=drvguest
glog=/var/log/xen/console/guest-$guest.log
bedom=$drvid
boot_guest $work/drvguest.cfg "$L"
why=$(xenstore-ls -p /local/domain/$drvid/backend/vsnd/$domid/0 2>&1 | grep -a "domain-name\|frontend-id" | tr '\n' ' ')
check "${L}dom0 vouched for the guest's name in the backend directory" \
    sh -c "[ \"\$(xenstore-read /local/domain/$drvid/backend/vsnd/$domid/0/domain-name)\" = drvguest ]"
drv_play_intact 1 "$L"
drv_step nodes1 30
why=$(grep -a "GUEST: nodes1 " $drvlog | tail -1)
check "${L}the guest's nodes in the driver domain's PipeWire carry its name" \
    sh -c "grep -a 'GUEST: nodes1 ok' $drvlog | grep 'xen-vsnd.drvguest.0.0.playback ' | grep -q 'xen-vsnd.drvguest.0.0.capture '"
# Capture: the policy in the driver domain allows drvguest (by the vouched
# name) the microphone.
go capture
wait_for 60 sh -c "[ \"\$(xenstore-read /local/domain/$domid/data/capturing)\" = capture ]"
check "${L}the driver domain plays into its sink" drv_step play1 60
wait_for 90 guest_said "GUEST: capture (ok|failed)"
check "${L}the guest records what the driver domain plays, intact" guest_step_ok capture
# The driver domain restarted (destroyed, created again: a new domain id):
# the guest's card goes; `xen-vsnd reattach` in dom0 (as root: it runs xl)
# detaches it (libxl only cleans up the frontend when the backend domain is
# gone) and attaches it again with the configuration dom0 keeps; the guest
# plays through the new driver domain.
old_drvid=$drvid
timeout -k 5 120 xl destroy drvdom
mv $drvlog $drvlog.1
check "${L}the driver domain created again" boot_drvdom
echo "XE: driver domain is domain $drvid now (was $old_drvid)"
bedom=$drvid
$bin reattach --dry-run 2>&1 | sed 's/^/XE: reattach --dry-run: /'
$bin reattach >/run/reattach.log 2>&1
why=$(tr '\n' ' ' </run/reattach.log)
check "${L}xen-vsnd reattach: the card the old driver domain served attached again, the old one detached" \
    sh -c "grep -q 'card 0: attached again to drvdom' /run/reattach.log && ! xenstore-exists /libxl/$domid/device/vsnd/0"
devid=$(xenstore-list /libxl/$domid/device/vsnd 2>/dev/null | tail -1)
echo "XE: the card is device $devid now"
wait_for 120 states
check "${L}after the restart: the card attached again, both ends Connected" states
check "${L}after the restart: dom0 vouched for the name to the new driver domain" \
    sh -c "[ \"\$(xenstore-read /local/domain/$drvid/backend/vsnd/$domid/$devid/domain-name)\" = drvguest ]"
drv_play_intact 2 "${L}after the restart: "
why=$(timeout -k 5 120 xl destroy $guest 2>&1; timeout -k 5 120 xl destroy drvdom 2>&1)
check "${L}guest and driver domain destroyed" sh -c "! xl domid $guest && ! xl domid drvdom" 
stop $voucher TERM
fi

# The peer phase (E2E_PEER_SND_BE: docs/comparison.md): the upstream 6.1
# guest against xen-troops snd_be, then against xen-vsnd, with the same
# steps: the handshake, aplay of the pattern recorded at dom0's sink,
# arecord of the pattern dom0 plays, and the in-guest latency check; each
# backend's CPU (and dom0 PipeWire's) over each step and its memory at the
# end of it. snd_be's outcomes are figures (`XE: PEER snd_be ...`);
# xen-vsnd's are checks as well.
if phase peer && [ -x $work/peer/snd_be ]; then
guest=peerguest
glog=/var/log/xen/console/guest-$guest.log
printf '\n[vm.peerguest]\ncapture = true\n' >>$policy
hz=$(getconf CLK_TCK)
# ticks <pid>: the CPU time a process has used (all its threads), in ticks.
ticks() { awk '{ print $14 + $15 }' /proc/$1/stat 2>/dev/null || echo 0; }
usage_begin() { u0=$(ticks $1) p0=$(ticks $pw) w0=$(date +%s.%N); }
# cpu_share <ticks before> <ticks after>: the share of one CPU, in %, over
# the step so far (since $w0, to $w1).
cpu_share() {
    awk -v a=$1 -v b=$2 -v t0=$w0 -v t1=$w1 -v hz=$hz 'BEGIN { printf "%.1f", 100 * (b - a) / hz / (t1 - t0) }'
}
# usage_end <backend> <step> <pid>: one line of the step's figures.
usage_end() {
    local u1 p1 rss
    u1=$(ticks $3) p1=$(ticks $pw) w1=$(date +%s.%N)
    rss=$(awk '/^VmRSS/ { print $2 }' /proc/$3/status 2>/dev/null)
    echo "XE: PEER $1 $2 usage: backend cpu $(cpu_share $u0 $u1) %, pipewire cpu $(cpu_share $p0 $p1) %," \
        "backend rss ${rss:-?} kB, $(awk -v t0=$w0 -v t1=$w1 'BEGIN { printf "%.0f", t1 - t0 }') s"
}
# peer_result <backend> <step> <command...>: the outcome as a figure line;
# for xen-vsnd a check too.
peer_result() {
    local who=$1 step=$2 rc said; shift 2
    "$@"; rc=$?
    said=$why
    if [ $rc = 0 ]; then echo "XE: PEER $who $step: ok $said"; else echo "XE: PEER $who $step: FAILED $said"; fi
    if [ $who = xen-vsnd ]; then
        why=$said
        check "peer phase: xen-vsnd: $step" [ $rc = 0 ]
    fi
    why=
}
# capture_linked: a capture stream of the guest's backend records dom0's
# sink; snd_be's stream (named after its unique-id) is linked by hand when
# WirePlumber did not.
capture_linked() {
    pw-link -l | grep -q "|<- *null-sink:monitor_F" && return 0
    local ports
    ports=$(pw-link -i | grep -a '^pipewire<cap>:' | head -2)
    [ -n "$ports" ] || return 1
    set -- $ports
    pw-link null-sink:monitor_FL "$1" && pw-link null-sink:monitor_FR "${2:-$1}"
}
peer_steps() {   # peer_steps <backend> <pid>
    local who=$1 pid=$2 t
    usage_begin $pid
    t=$SECONDS
    xl_create $work/peerguest.cfg
    domid=$(xl domid $guest 2>/dev/null)
    wait_for 120 states
    peer_result $who "handshake: both ends Connected" states
    echo "XE: PEER $who handshake: Connected $((SECONDS - t)) s after xl create"
    usage_end $who handshake $pid
    wait_for 90 guest_said "GUEST: ready"
    # aplay of the pattern, recorded at the sink.
    usage_begin $pid
    record 48000 /run/peer-$who.wav
    run_guest_step play48 90 >/dev/null
    sleep 1
    stop $rec INT
    peer_result $who "aplay: the pattern arrives intact at dom0's sink" intact $work/guest/pattern48.wav /run/peer-$who.wav
    usage_end $who aplay $pid
    # arecord while dom0 plays the pattern into the sink.
    usage_begin $pid
    go capture
    wait_for 60 sh -c "[ \"\$(xenstore-read /local/domain/$domid/data/capturing)\" = capture ]"
    wait_for 30 capture_linked
    $RT pw-play --target null-sink $work/guest/pattern48.wav >>/run/play.log 2>&1
    wait_for 60 guest_said "GUEST: capture (ok|failed)"
    peer_result $who "arecord: the guest records dom0's pattern intact" guest_step_ok capture
    usage_end $who arecord $pid
    # The in-guest latency check (the guest's snd_pcm_delay() against the
    # round trip through dom0's sink): figures only, for both (with the
    # position at the DMA engine an unmodified guest cannot know what dom0
    # holds).
    usage_begin $pid
    run_guest_step latency 150
    echo "XE: PEER $who in-guest latency: $why"
    why=
    usage_end $who latency $pid
    grep -a "GUEST-LAT: impulse" $glog | sed "s/^.*GUEST-LAT: /XE: PEER $who latency: /"
}
# snd_be, as its recipe runs it: root, its own log, dom0's PipeWire.
stop $backend TERM
LD_LIBRARY_PATH=$work/peer $work/peer/snd_be -v '*:Debug' >/run/snd_be.log 2>&1 &
peer=$!
check "peer phase: snd_be runs" wait_for 20 kill -0 $peer
peer_steps snd_be $peer
timeout -k 5 120 xl destroy $guest; wait_for 30 sh -c "! xl domid $guest"
stop $peer TERM
mv $glog $glog.snd_be
# xen-vsnd, as the system service (above).
restarts=$((restarts + 1))
backend_log=vsnd-peer.log
start_backend
check "peer phase: xen-vsnd back, with the session's PipeWire" \
    wait_for 60 grep -q "connected through the session's PipeWire" /run/$backend_log
peer_steps xen-vsnd $backend
destroy_guest "peer phase: "
fi

save_logs
echo "XE: dom0 done after $checks checks"
