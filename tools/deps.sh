#!/bin/sh
# Installs the Debian packages Factory needs to build, test and benchmark, if missing.
# Called by `make deps` (and so by `make`, `make test`, `make demo`).
set -eu
PACKAGES="gcc make pkg-config ca-certificates git procps
libluajit-5.1-dev libuv1-dev libcurl4-openssl-dev lua-cjson-dev libpq-dev libgit2-dev
libsqlite3-dev libedit-dev libssl-dev libhttp-parser-dev libjansson-dev libyajl-dev curl openssl
nginx-light wrk postgresql python3"

# The SDK tests need Node.js 18+ and npm; use the machine's if it has them.
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || PACKAGES="$PACKAGES nodejs npm"

missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0

echo "deps: installing:$missing"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "deps: not root and no sudo; install these packages:$missing" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
