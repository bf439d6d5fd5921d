#!/bin/bash
# Runs inside dom0 (the host's filesystem, read-only, tmpfs on /run /tmp):
# the toolstack, PipeWire, xen-vsnd, then a guest with a vsnd device.
root=$1 work=$2
# stop <pid> <signal>: signals a process and waits for it, 5 s at most.
stop() {
    kill -$2 $1 2>/dev/null
    for i in $(seq 50); do kill -0 $1 2>/dev/null || return 0; sleep 0.1; done
    kill -9 $1 2>/dev/null
}
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /run/xen
xenstored --pid-file /run/xenstored.pid
xen-init-dom0 >/dev/null
mkdir -p /var/log/xen/console
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
echo "XE: toolstack up"

export XDG_RUNTIME_DIR=/run/pw XDG_CONFIG_HOME=/run/pwconf XDG_STATE_HOME=/run/pwstate PIPEWIRE_RUNTIME_DIR=/run/pw
mkdir -p $XDG_RUNTIME_DIR $XDG_CONFIG_HOME/pipewire/pipewire.conf.d $XDG_STATE_HOME; chmod 700 $XDG_RUNTIME_DIR
cp $root/pw-modules/null-sink.conf $XDG_CONFIG_HOME/pipewire/pipewire.conf.d/
pipewire >/run/pipewire.log 2>&1 &
for i in $(seq 100); do [ -S $XDG_RUNTIME_DIR/pipewire-0 ] && break; sleep 0.2; done
dbus-run-session -- wireplumber >/run/wireplumber.log 2>&1 &
for i in $(seq 100); do pw-cli ls Client 2>/dev/null | grep -q '"WirePlumber"' && break; sleep 0.2; done
pw-record --target null-sink -P '{ stream.capture.sink = true node.name = e2e-recorder }' \
    --format s16 --rate 48000 --channels 2 $work/out/monitor.wav >/run/rec.log 2>&1 &
rec=$!
$root/target/release/xen-vsnd serve --transport xen >/run/vsnd.log 2>&1 &
backend=$!
for i in $(seq 100); do grep -q "serving vsnd devices" /run/vsnd.log && break; sleep 0.2; done
grep -q "serving vsnd devices" /run/vsnd.log && echo "XE: backend up"

if xl create $work/guest.cfg >/run/xl.log 2>&1; then echo "XE: PASS xl-create"; else echo "XE: FAIL xl-create"; cat /run/xl.log; fi
domid=$(xl domid audioguest 2>/dev/null)
for i in $(seq 120); do
    fe=$(xenstore-read /local/domain/$domid/device/vsnd/0/state 2>/dev/null)
    be=$(xenstore-read /local/domain/0/backend/vsnd/$domid/0/state 2>/dev/null)
    [ "$fe" = 4 ] && [ "$be" = 4 ] && break
    sleep 1
done
echo "XE: states frontend=$fe backend=$be"
[ "$fe" = 4 ] && [ "$be" = 4 ] && echo "XE: PASS connected"
for i in $(seq 60); do grep -q "GUEST: ready" /var/log/xen/console/guest-audioguest.log 2>/dev/null && break; sleep 1; done
# The guest plays now: its playback node exists while the stream is open.
for i in $(seq 60); do pw-cli ls Node 2>/dev/null | grep -q 'xen-vsnd.audioguest' && break; sleep 0.5; done
pw-cli ls Node 2>/dev/null | grep 'node.name = "xen-vsnd' | sed 's/^/XE: node /'
pw-cli ls Node 2>/dev/null | grep -q 'xen-vsnd.audioguest.0.0.playback' && echo "XE: PASS nodes"
for i in $(seq 60); do grep -q "GUEST: done" /var/log/xen/console/guest-audioguest.log 2>/dev/null && break; sleep 1; done
sed 's/^/GUEST-LOG: /' /var/log/xen/console/guest-audioguest.log 2>/dev/null | tail -30
sleep 1   # the last frames reach the sink a few cycles after aplay returns
stop $rec INT

# Kill the backend while the guest is connected, start it again.
glog=/var/log/xen/console/guest-audioguest.log
kill -9 $backend; wait $backend 2>/dev/null
before=$(grep -c "aplay ok again" $glog)
$root/target/release/xen-vsnd serve --transport xen >/run/vsnd2.log 2>&1 &
# The guest's frontend first removes its card (its application sees I/O
# errors and closes), then connects again: give it time under emulation.
# (The upstream frontend was seen to stay at state 3 in xenstore after such
# a reconnect while working; the next check is whether it plays.)
for i in $(seq 180); do
    grep -q "connected domid=$domid" /run/vsnd2.log && break
    sleep 1
done
fe=$(xenstore-read /local/domain/$domid/device/vsnd/0/state 2>/dev/null)
echo "XE: after restart: frontend state $fe"
grep -q "connected domid=$domid" /run/vsnd2.log && echo "XE: PASS reconnected"
for i in $(seq 120); do [ "$(grep -c "aplay ok again" $glog)" -gt "$before" ] && break; sleep 1; done
[ "$(grep -c "aplay ok again" $glog)" -gt "$before" ] && echo "XE: PASS plays after restart"
cat /run/vsnd2.log >>/run/vsnd.log

if xl destroy audioguest >/run/xl-destroy.log 2>&1 && ! grep -q "unable to remove" /run/xl-destroy.log; then
    echo "XE: PASS destroyed"
else
    sed 's/^/XE: xl destroy: /' /run/xl-destroy.log
fi
for i in $(seq 20); do xenstore-ls /local/domain/0/backend/vsnd 2>/dev/null | grep -q . || break; sleep 0.5; done

# The same guest again: a fresh domain with the same name.
mv $glog $glog.1
xl create $work/guest.cfg >/run/xl2.log 2>&1
for i in $(seq 120); do grep -q "GUEST: done" $glog 2>/dev/null && break; sleep 1; done
grep -q "GUEST: aplay ok" $glog 2>/dev/null && echo "XE: PASS second guest plays"
sed 's/^/GUEST2-LOG: /' $glog 2>/dev/null | grep GUEST | tail -5
xl destroy audioguest >/dev/null 2>&1
sed 's/^/XE-LOG: /' /run/vsnd.log | tail -40
echo "XE: dom0 done"
