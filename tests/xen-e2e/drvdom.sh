#!/bin/busybox sh
# The driver domain (a PV domU; guest.sh execs this when the kernel
# command line says xen_role=drvdom): it owns the "sound hardware" (a null
# sink in its own PipeWire: there is no sound device inside QEMU), and
# serves guests whose vsnd device says backend=drvdom with xen-vsnd, as an
# unprivileged domain with only its own xenstore rights. Guest names come
# from dom0's `xen-vsnd vouch` (domain-name in the backend directory).
# Steps as in guest.sh: dom0 writes a step to data/go, this prints
# `GUEST: <step> ok|failed ...` on the console.
for m in xen-privcmd xenfs xen-evtchn xen-gntdev; do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
if [ ! -e /dev/xen/xenbus ]; then
    mkdir -p /proc/xen; mount -t xenfs xenfs /proc/xen; export XENSTORED_PATH=/proc/xen/xenbus
fi
trap 'echo "GUEST: powering off"; poweroff -f' USR2 TERM
echo "GUEST: kernel $(uname -r)"
ls -l /dev/xen | sed 's/^/GUEST: dev /'

# wait_until and the step loop (serve_steps).
. /steps.sh
export XDG_RUNTIME_DIR=/tmp/pw PIPEWIRE_RUNTIME_DIR=/tmp/pw XDG_CONFIG_HOME=/drvdom HOME=/tmp
mkdir -p /tmp/pw
# PipeWire with the null sink (/drvdom/pipewire/pipewire.conf.d), then
# WirePlumber, which links the guests' nodes to it and its monitor.
pipewire >/tmp/pipewire.log 2>&1 &
wait_until 30 test -S /tmp/pw/pipewire-0 || echo "GUEST: PipeWire did not start"
wireplumber >/tmp/wireplumber.log 2>&1 &
wait_until 60 sh -c 'pw-cli ls Client | grep -q "\"WirePlumber\""' || echo "GUEST: WirePlumber did not start"
# xen-vsnd as root here (the domain is the unprivileged part).
xen-vsnd serve --transport xen --config /drvdom/policy.toml --control-socket /tmp/xen-vsnd.control \
    >/tmp/vsnd.log 2>&1 &
wait_until 30 grep -q "serving vsnd devices" /tmp/vsnd.log || { echo "GUEST: xen-vsnd did not start"; cat /tmp/vsnd.log; }
echo "GUEST: driver domain ready"

RT="chrt -f 20"
run_step() {
    case $1 in
    nodes*)
        # The nodes of the guests it serves, on one line.
        echo "nodes: $(pw-cli ls Node | sed -n 's/.*node.name = "\(xen-vsnd[^"]*\)".*/\1/p' | tr '\n' ' ')" ;;
    record*)
        # Records the null sink's monitor until a check step.
        $RT pw-record --target null-sink -P '{ stream.capture.sink = true node.name = drv-recorder }' \
            --format s16 --rate 48000 --channels 2 /tmp/rec.wav >>/tmp/record.log 2>&1 &
        echo $! >/tmp/rec.pid
        wait_until 20 sh -c 'pw-link -l | grep -q "drv-recorder:input_FL"' ;;
    check*)
        # What the guest played reached the sink intact.
        sleep 1
        kill -INT "$(cat /tmp/rec.pid)"; wait_until 10 sh -c '! kill -0 $(cat /tmp/rec.pid)'
        xen-vsnd-sim compare --sent /pattern48.wav --got /tmp/rec.wav ;;
    play*)
        # The pattern into the null sink: its monitor feeds the guest's
        # capture node.
        $RT pw-play --target null-sink /pattern48.wav ;;
    status*)
        echo "status: $(xen-vsnd status --control /tmp/xen-vsnd.control | tr '\n' ' ')" ;;
    esac
}

# On a failure, what xen-vsnd said last.
step_failed() { tail -20 /tmp/vsnd.log | sed 's/^/GUEST-VSND: /'; }
serve_steps '^compare:\|^nodes:\|^status:'
