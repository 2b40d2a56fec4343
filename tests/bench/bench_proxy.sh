#!/bin/sh
# Model proxy benchmark: `factory serve` in front of the fake model server
# (tests/tools/fake_model.lua), each its own process; tests/bench/proxy.lua sends the
# same chat request to both and prints the proxy's added latency (p50, p99;
# sequential and at concurrency 64) and its throughput as a ratio to direct, then
# this prints the proxy's peak RSS. Goals: added p50 < 0.3 ms sequential, ratio
# >= 0.6, RSS < 50 MB. BENCH_SIZE=tiny: a smoke run of a few seconds. Exits non-zero
# only when something failed to run. Environment: FACTORY_BIN (default ./factory).
set -u
BIN=${FACTORY_BIN:-./factory}
if [ "${BENCH_SIZE:-full}" = tiny ]; then SEQ=300; CONC_N=3000; else SEQ=5000; CONC_N=50000; fi

fail() { echo "bench_proxy: $*" >&2; exit 1; }
dir=$(mktemp -d)
fake_pid=""
serve_pid=""
cleanup() {
    [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null
    [ -n "$fake_pid" ] && kill "$fake_pid" 2>/dev/null && wait "$fake_pid" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# Each server prints its URL as its first line of output.
wait_url() {
    i=0
    while [ "$i" -lt 100 ]; do
        url=$(grep -o 'http://[0-9.:]*' "$1" 2>/dev/null | head -n 1)
        [ -n "$url" ] && { echo "$url"; return 0; }
        sleep 0.05
        i=$((i + 1))
    done
    return 1
}

"$BIN" tests/tools/fake_model.lua >"$dir/fake.out" 2>&1 &
fake_pid=$!
fake_url=$(wait_url "$dir/fake.out") || { cat "$dir/fake.out" >&2; fail "the fake model server did not start"; }
cat >"$dir/factory.lua" <<EOC
providers { fake = { base_url = "$fake_url/v1", api_key = "sk-bench" } }
models { ["factory/bench"] = { "fake/gpt-bench" } }
EOC
"$BIN" serve --port 0 --config "$dir/factory.lua" >"$dir/serve.out" 2>&1 &
serve_pid=$!
proxy_url=$(wait_url "$dir/serve.out") || { cat "$dir/serve.out" >&2; fail "factory serve did not start"; }

# CPU seconds (user + system) a process has used so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }
serve_cpu0=$(cpu "$serve_pid")
fake_cpu0=$(cpu "$fake_pid")
"$BIN" tests/bench/proxy.lua "$fake_url" "$proxy_url" "$SEQ" "$CONC_N" 64 || fail "the benchmark client failed"
rss=$(awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$serve_pid/status") || fail "cannot read the proxy's RSS"
echo "proxy peak RSS: $rss MB (goal < 50)"
# The throughput ratio depends on how many cores the three processes share: on a
# machine with fewer cores than busy processes it measures CPU cost per request,
# which these figures give directly. proxy.lua sends 200 + SEQ + CONC_N (rounded up
# to whole fibers) requests each way; the fake upstream serves both.
per=$(( (CONC_N + 63) / 64 * 64 + 200 + SEQ ))
awk -v s0="$serve_cpu0" -v s1="$(cpu "$serve_pid")" -v f0="$fake_cpu0" -v f1="$(cpu "$fake_pid")" -v n="$per" \
    -v cores="$(nproc)" 'BEGIN { printf "CPU per request: proxy %.1f us, fake upstream %.1f us (%d cores)\n",
                                  (s1 - s0) / n * 1e6, (f1 - f0) / (2 * n) * 1e6, cores }'
