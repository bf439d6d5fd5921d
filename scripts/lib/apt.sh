# Sourced by scripts: installs the Debian packages that are missing.

# install_missing [apt-get install options...] -- <package...>: only the
# packages not installed yet go to apt-get (quietly); returns its status.
install_missing() {
    local opts=() need=() p
    while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
    shift
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    [ ${#need[@]} = 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${opts[@]}" "${need[@]}" >/dev/null
}
