#!/bin/sh
# HTTP client benchmark: the engine (tests/bench/http.lua, N GETs by 64 fibers) and
# wrk (-t1 -c64) against the same nginx serving a ~100-byte file on 127.0.0.1;
# prints both requests/sec and the ratio engine/wrk (goal: >= 0.5). At full size
# each side runs 3 times and the best run counts, which damps the noise of a shared
# machine. BENCH_SIZE=tiny: N=500, wrk -d1, one run each (a smoke run). Exits
# non-zero only when something failed to run. Environment: FACTORY_BIN (default
# ./factory).
set -u
BIN=${FACTORY_BIN:-./factory}
if [ "${BENCH_SIZE:-full}" = tiny ]; then N=500; SECS=1; RUNS=1; else N=20000; SECS=2; RUNS=3; fi
CONC=64

fail() { echo "bench_http: $*" >&2; exit 1; }
command -v wrk >/dev/null 2>&1 || fail "wrk not found (Debian package wrk)"

dir=$(mktemp -d)
nginx_pid=""
cleanup() {
    [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null && wait "$nginx_pid" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

. tests/bench/nginx.sh
mkdir -p "$dir/html"
printf '%099d\n' 0 >"$dir/html/index.html"
nginx_start "root $dir/html;"
url="http://127.0.0.1:$nginx_port/index.html"

best() { sort -n | tail -n 1; }
engine_all=""
wrk_all=""
i=0
while [ "$i" -lt "$RUNS" ]; do
    i=$((i + 1))
    engine=$("$BIN" tests/bench/http.lua "$url" "$N" "$CONC") || fail "the engine benchmark failed"
    echo "$engine"
    engine_all="$engine_all ${engine##*rps=}"
    wrk_out=$(wrk -t1 -c"$CONC" -d"${SECS}s" --latency "$url") || fail "wrk failed"
    wrk_rps=$(echo "$wrk_out" | awk '/^Requests\/sec:/ { printf "%.0f", $2 }')
    [ -n "$wrk_rps" ] || fail "cannot read wrk's requests/sec: $wrk_out"
    echo "wrk:    -t1 -c$CONC -d${SECS}s, p50 $(echo "$wrk_out" | awk '$1 == "50%" { print $2 }')," \
        "p99 $(echo "$wrk_out" | awk '$1 == "99%" { print $2 }'), rps=$wrk_rps"
    wrk_all="$wrk_all $wrk_rps"
done
engine_rps=$(echo "$engine_all" | tr ' ' '\n' | best)
wrk_rps=$(echo "$wrk_all" | tr ' ' '\n' | best)
awk -v e="$engine_rps" -v w="$wrk_rps" -v n="$RUNS" 'BEGIN {
    printf "best of %d: engine %d req/s, wrk %d req/s", n, e, w
    printf ", ratio engine/wrk: %.2f (goal >= 0.5)\n", e / w }'
