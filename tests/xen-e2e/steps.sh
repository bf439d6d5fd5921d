# Sourced by guest.sh and drvdom.sh (each defines run_step).

# wait_until <seconds> <command...>: polls until the command succeeds.
wait_until() {
    local end=$(($(date +%s) + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt $end ] || return 1
        sleep 0.1
    done
}

# serve_steps <regex>: runs the steps dom0 asks for, for ever. dom0
# writes a step name to the domain's own xenstore key data/go; the step
# runs and its outcome goes to the console as `GUEST: <step> ok <its lines matching $1>` or
# `GUEST: <step> failed: <its last lines>`, which dom0 reads.
# step_failed, when defined, adds what a failure needs to be understood.
serve_steps() {
    local last='' go out
    while true; do
        go=$(xenstore-read data/go 2>/dev/null)
        if [ -n "$go" ] && [ "$go" != "$last" ]; then
            last=$go
            [ "$go" = loop ] && run_step loop
            if out=$(run_step "$go" 2>&1); then
                echo "GUEST: $go ok $(echo "$out" | grep "$1")"
            else
                echo "GUEST: $go failed: $(echo "$out" | tail -3 | tr '\n' ' ')"
                command -v step_failed >/dev/null && step_failed
            fi
        fi
        sleep 0.5
    done
}
