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
NGINX=/usr/sbin/nginx
if [ "${BENCH_SIZE:-full}" = tiny ]; then N=500; SECS=1; RUNS=1; else N=20000; SECS=2; RUNS=3; fi
CONC=64

fail() { echo "bench_http: $*" >&2; exit 1; }
[ -x "$NGINX" ] || fail "$NGINX not found (Debian package nginx-light)"
command -v wrk >/dev/null 2>&1 || fail "wrk not found (Debian package wrk)"

dir=$(mktemp -d)
nginx_pid=""
cleanup() {
    [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null && wait "$nginx_pid" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])') || fail "cannot pick a free port"
mkdir -p "$dir/html" "$dir/logs"
printf '%099d\n' 0 >"$dir/html/index.html"
chmod -R a+rX "$dir"   # nginx workers run as nobody when started by root
cat >"$dir/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/logs/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    server {
        listen 127.0.0.1:$port;
        root $dir/html;
    }
}
EOF
"$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" &
nginx_pid=$!
url="http://127.0.0.1:$port/index.html"

# Wait for nginx to answer (up to 5 s).
python3 - "$port" <<'EOF' || { cat "$dir/logs/error.log" >&2; fail "nginx did not start"; }
import socket, sys, time
deadline = time.time() + 5
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit(1)
        time.sleep(0.05)
EOF

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
