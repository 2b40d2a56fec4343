#!/bin/sh
# Model proxy benchmark: `factory serve` in front of the fake model server
# (tests/tools/fake_model.lua), each its own process.
#  - Sequential: tests/bench/proxy.lua sends the same chat request to both, one at a
#    time in interleaved rounds, and prints the proxy's added latency (p50, p99).
#  - Concurrency 64: wrk (-t1 -c64, a C load generator, so that the client takes as
#    little as possible of the cores the three processes share) sends the same
#    request to the fake directly, through the proxy, and through nginx as a plain
#    reverse proxy (keep-alive upstream, no JSON, no routing: a reference for what
#    the cheapest proxy achieves on this machine), in ROUNDS rounds of the three.
#    Prints each round, then the medians: the throughput ratio proxy/direct, the
#    added latency, and the nginx ratio. Any non-2xx response or socket error fails.
# Then the proxy's peak RSS and the CPU per proxied request of the proxy and the
# fake. Goals: added p50 < 0.3 ms sequential, ratio >= 0.6, RSS < 50 MB.
# The proxy measured is `factory serve --no-db` (the router alone; by default serve
# records every call in the store). Last, for reference, `factory serve --db` (every
# call recorded in a SQLite store, as serve does by default) under the same load: its
# throughput, and that the store holds every call.
# BENCH_SIZE=tiny: a smoke run of a few seconds. Exits non-zero only when something
# failed to run. Environment: FACTORY_BIN (default ./factory).
set -u
BIN=${FACTORY_BIN:-./factory}
if [ "${BENCH_SIZE:-full}" = tiny ]; then SEQ=300; SECS=1; ROUNDS=1; else SEQ=5000; SECS=3; ROUNDS=5; fi
CONC=64

fail() { echo "bench_proxy: $*" >&2; exit 1; }
command -v wrk >/dev/null 2>&1 || fail "wrk not found (Debian package wrk)"
dir=$(mktemp -d)
fake_pid="" db_pid=""
serve_pid=""
nginx_pid=""
cleanup() {
    [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null && wait "$nginx_pid" 2>/dev/null
    [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null
    [ -n "$db_pid" ] && kill "$db_pid" 2>/dev/null && wait "$db_pid" 2>/dev/null
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
"$BIN" serve --port 0 --config "$dir/factory.lua" --no-db >"$dir/serve.out" 2>&1 &
serve_pid=$!
proxy_url=$(wait_url "$dir/serve.out") || { cat "$dir/serve.out" >&2; fail "factory serve did not start"; }

. tests/bench/nginx.sh
nginx_start "location / { proxy_pass http://fake; proxy_http_version 1.1; proxy_set_header Connection \"\"; }" \
    "upstream fake { server ${fake_url#http://}; keepalive 128; keepalive_requests 1000000; }"
nginx_url="http://127.0.0.1:$nginx_port"

"$BIN" tests/bench/proxy.lua "$fake_url" "$proxy_url" "$SEQ" || fail "the sequential benchmark client failed"

cat >"$dir/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
wrk.body = '{"model":"' .. os.getenv("BENCH_MODEL") .. '","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}'
EOF

# CPU seconds (user + system) a process has used so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }
# wrk's latency ("812.00us", "1.20ms", "1.02s") in ms.
ms() { awk -v v="$1" 'BEGIN { n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
                              if (u == "us") n /= 1000; else if (u == "s") n *= 1000; printf "%.3f", n }'; }
. tests/bench/median.sh

# wrk NAME URL MODEL SECONDS: sets rps, p50, p99 (ms) and n (requests).
load() {
    out=$(BENCH_MODEL=$3 wrk -t1 -c"$CONC" -d"$4s" --latency -s "$dir/post.lua" "$2/v1/chat/completions") \
        || fail "wrk failed against $1: $out"
    if echo "$out" | grep -q -e '^ *Non-2xx' -e '^ *Socket errors'; then
        fail "errors in the $1 run: $(echo "$out" | grep -e 'Non-2xx' -e 'Socket errors')"
    fi
    rps=$(echo "$out" | awk '/^Requests\/sec:/ { printf "%.0f", $2 }')
    n=$(echo "$out" | awk '/ requests in / { print $1 }')
    p50=$(ms "$(echo "$out" | awk '$1 == "50%" { print $2 }')")
    p99=$(ms "$(echo "$out" | awk '$1 == "99%" { print $2 }')")
    [ -n "$rps" ] && [ -n "$n" ] || fail "cannot read wrk's figures for $1: $out"
}

# Warm-up: the proxy's and nginx's upstream connections open.
load proxy "$proxy_url" factory/bench 1
load nginx "$nginx_url" gpt-bench 1
ratios="" added50="" added99="" nginx_ratios="" proxy_n=0 proxy_cpu=0 fake_cpu=0
r=0
while [ "$r" -lt "$ROUNDS" ]; do
    r=$((r + 1))
    load direct "$fake_url" gpt-bench "$SECS"
    d_rps=$rps d50=$p50 d99=$p99
    s0=$(cpu "$serve_pid") f0=$(cpu "$fake_pid")
    load proxy "$proxy_url" factory/bench "$SECS"
    proxy_cpu=$(awk -v a="$proxy_cpu" -v s0="$s0" -v s1="$(cpu "$serve_pid")" 'BEGIN { print a + s1 - s0 }')
    fake_cpu=$(awk -v a="$fake_cpu" -v f0="$f0" -v f1="$(cpu "$fake_pid")" 'BEGIN { print a + f1 - f0 }')
    proxy_n=$((proxy_n + n))
    p_rps=$rps
    ratios="$ratios $(awk -v p="$p_rps" -v d="$d_rps" 'BEGIN { printf "%.3f", p / d }')"
    added50="$added50 $(awk -v a="$p50" -v b="$d50" 'BEGIN { printf "%.3f", a - b }')"
    added99="$added99 $(awk -v a="$p99" -v b="$d99" 'BEGIN { printf "%.3f", a - b }')"
    echo "round $r (concurrency $CONC, ${SECS}s each): direct $d_rps req/s (p50 $d50 ms, p99 $d99 ms)," \
        "proxy $p_rps req/s (p50 $p50 ms, p99 $p99 ms), ratio ${ratios##* }"
    load nginx "$nginx_url" gpt-bench "$SECS"
    nginx_ratios="$nginx_ratios $(awk -v p="$rps" -v d="$d_rps" 'BEGIN { printf "%.3f", p / d }')"
    echo "         reference: nginx reverse proxy $rps req/s (p50 $p50 ms, p99 $p99 ms), ratio ${nginx_ratios##* }"
done
m=$(median_of "$ratios")
echo "concurrency $CONC added latency (median of $ROUNDS rounds): p50 $(median_of "$added50") ms," \
    "p99 $(median_of "$added99") ms"
echo "throughput ratio proxy/direct (median of $ROUNDS rounds): $m (goal >= 0.6);" \
    "nginx reverse proxy/direct: $(median_of "$nginx_ratios")"
rss=$(awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$serve_pid/status") || fail "cannot read the proxy's RSS"
echo "proxy peak RSS: $rss MB (goal < 50)"
# On a machine with fewer cores than busy processes (client, proxy, upstream) the
# ratio measures CPU cost per request, which these give directly. Each server is one
# thread: where each runs flat out on a core of its own, the direct run serves what
# the fake can, 1 / f requests a second, and the proxied one 1 / p, a ratio of f / p.
awk -v p="$proxy_cpu" -v f="$fake_cpu" -v n="$proxy_n" -v cores="$(nproc)" \
    'BEGIN { printf "CPU per proxied request: proxy %.1f us, fake upstream %.1f us (%d cores)\n", p / n * 1e6, f / n * 1e6, cores
             printf "fake / proxy CPU per request: %.3f (the ratio where each server is the bottleneck on a core of its own)\n", f / p }'

"$BIN" serve --port 0 --config "$dir/factory.lua" --db "sqlite:$dir/calls.db" >"$dir/serve_db.out" 2>&1 &
db_pid=$!
db_url=$(wait_url "$dir/serve_db.out") || { cat "$dir/serve_db.out" >&2; fail "factory serve --db did not start"; }
load "proxy --db" "$db_url" factory/bench 1
sent=$n
load "proxy --db" "$db_url" factory/bench "$SECS"
sent=$((sent + n))
kill "$db_pid" && wait "$db_pid"
db_pid=""
recorded=$(CALLS_DB="$dir/calls.db" "$BIN" -e 'local d = assert(require("factory.db").open("sqlite:" .. os.getenv("CALLS_DB")))
  print(assert(d:query("SELECT COUNT(*) AS n FROM model_calls WHERE status = ?", { "ok" }))[1].n)') \
    || fail "cannot count the calls recorded by factory serve --db"
echo "reference: factory serve --db (every call recorded) $rps req/s, ratio to the last direct run" \
    "$(awk -v p="$rps" -v d="$d_rps" 'BEGIN { printf "%.3f", p / d }'); recorded $recorded calls of the $sent wrk counted"
[ "$recorded" -ge "$sent" ] || fail "factory serve --db recorded $recorded calls of $sent"
