# Sourced by scripts: a private PipeWire + WirePlumber with the null sink of
# pw-modules/null-sink.conf as graph driver, and helpers to wait and clean up.
# Callers set $work (a scratch directory) and keep started pids in $pids.

# wait_for <seconds> <command...>: polls the command until it succeeds.
wait_for() {
    local t=$1; shift
    for _ in $(seq $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}

# stop_all: SIGINT everything in $pids (newest first), then SIGKILL stragglers.
stop_all() {
    local i p
    for ((i=${#pids[@]}-1; i>=0; i--)); do kill -INT "${pids[$i]}" 2>/dev/null; done
    for p in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
    done
    pids=()
}

# start_private_pipewire: exports the environment of a private daemon under
# $work and starts it; returns non-zero (with a message) if it does not come up.
start_private_pipewire() {
    export XDG_RUNTIME_DIR=$work/run XDG_CONFIG_HOME=$work/config XDG_STATE_HOME=$work/state
    export PIPEWIRE_RUNTIME_DIR=$XDG_RUNTIME_DIR
    unset PIPEWIRE_REMOTE DBUS_SESSION_BUS_ADDRESS
    mkdir -p "$XDG_RUNTIME_DIR" "$XDG_CONFIG_HOME/pipewire/pipewire.conf.d" "$XDG_STATE_HOME"
    chmod 700 "$XDG_RUNTIME_DIR"
    cp "$(dirname "${BASH_SOURCE[0]}")/../../pw-modules/null-sink.conf" "$XDG_CONFIG_HOME/pipewire/pipewire.conf.d/"
    pipewire >"$work/pipewire.log" 2>&1 & pids+=($!)
    wait_for 10 test -S "$XDG_RUNTIME_DIR/pipewire-0" || { echo "PipeWire did not start (see $work/pipewire.log)"; return 1; }
    dbus-run-session -- wireplumber >"$work/wireplumber.log" 2>&1 & pids+=($!)
    wait_for 15 sh -c 'pw-cli ls Node | grep -q null-sink' || { echo "no null sink"; return 1; }
    wait_for 15 sh -c 'pw-cli ls Client | grep -q "\"WirePlumber\""' || { echo "WirePlumber did not start"; return 1; }
}
