#!/bin/sh
# Queue benchmark: claim+complete throughput at concurrency 16 and enqueue-to-start
# latency, through factory.queue on SQLite and on PostgreSQL (tests/bench/queue.lua)
# and through graphile-worker on the same throwaway PostgreSQL server
# (tests/bench/graphile, installed here with npm ci); prints the ratio
# Factory-PG / graphile-worker (goal >= 1.5) and Factory-PG's enqueue-to-start p50
# (goal < 5 ms). Then the SIGKILL crash test at a bigger size than in the suite.
# BENCH_SIZE=tiny: a smoke run of some seconds. Exits non-zero only when something
# failed to run. Environment: FACTORY_BIN (default ./factory).
set -u
BIN=${FACTORY_BIN:-./factory}
if [ "${BENCH_SIZE:-full}" = tiny ]; then
    JOBS=2000; LAT=100; CRASH_ROUNDS=0
else
    JOBS=50000; LAT=2000; CRASH_ROUNDS=200
fi
CONC=16

fail() { echo "bench_queue: $*" >&2; exit 1; }
dir=$(mktemp -d)
pgdir=""
cleanup() {
    [ -n "$pgdir" ] && sh tests/tools/pg.sh stop "$pgdir"
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

sh tests/tools/pg.sh start $$ >"$dir/pg.env" 2>&1 || { cat "$dir/pg.env" >&2; fail "cannot start PostgreSQL"; }
pgdir=$(sed -n 's/^dir=//p' "$dir/pg.env")
url=$(sed -n 's/^url=//p' "$dir/pg.env")
port=$(sed -n 's/^port=//p' "$dir/pg.env")

# One database each, on the same server.
for name in factory_bench graphile_bench crash_bench; do
    psql -X -q -h "$pgdir" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
        -c "CREATE DATABASE $name OWNER factory" >/dev/null || fail "cannot create database $name"
done
dburl() { echo "$url" | sed "s|/factory\$|/$1|"; }

echo "SQLite: WAL mode; a commit returns only once the WAL holding it is fsynced (factory.db syncs it"
echo "outside the write lock, one sync for every commit made meanwhile), so a completed job survives a"
echo "process kill AND a power loss."
echo "PostgreSQL: the throwaway test server, fsync=off for both queues (figures are for the"
echo "queues' own work, not the disk)."

"$BIN" tests/bench/queue.lua "sqlite:$dir/bench.db" "$JOBS" "$LAT" "$CONC" >"$dir/sqlite.out" || fail "factory on SQLite failed"
grep -v '^jobs/s \|^p50_ms ' "$dir/sqlite.out"
"$BIN" tests/bench/queue.lua "$(dburl factory_bench)?pool=20" "$JOBS" "$LAT" "$CONC" >"$dir/pg.out" || fail "factory on PostgreSQL failed"
grep -v '^jobs/s \|^p50_ms ' "$dir/pg.out"

(cd tests/bench/graphile && npm ci --no-audit --no-fund --loglevel=error >"$dir/npm.log" 2>&1) \
    || { cat "$dir/npm.log" >&2; fail "npm ci for graphile-worker failed"; }
(cd tests/bench/graphile && node bench.mjs "$(dburl graphile_bench)" "$JOBS" "$LAT" "$CONC") >"$dir/graphile.out" \
    || { cat "$dir/graphile.out" >&2; fail "graphile-worker failed"; }
grep -v '^jobs/s ' "$dir/graphile.out"

f=$(sed -n 's/^jobs\/s //p' "$dir/pg.out")
g=$(sed -n 's/^jobs\/s //p' "$dir/graphile.out")
p50=$(sed -n 's/^p50_ms //p' "$dir/pg.out")
awk -v f="$f" -v g="$g" -v p="$p50" 'BEGIN {
    printf "ratio factory-pg / graphile-worker: %.2f (goal >= 1.5: %s)\n", f / g, (f / g >= 1.5) ? "met" : "NOT met"
    printf "factory-pg enqueue-to-start p50: %.2f ms (goal < 5 ms: %s)\n", p, (p < 5) ? "met" : "NOT met"
}'

if [ "$CRASH_ROUNDS" -gt 0 ]; then
    "$BIN" tests/bench/queue_crash.lua "sqlite:$dir/crash.db" "$CRASH_ROUNDS" 0.4 || fail "crash test on SQLite failed"
    "$BIN" tests/bench/queue_crash.lua "$(dburl crash_bench)" "$CRASH_ROUNDS" 0.4 || fail "crash test on PostgreSQL failed"
else
    echo "crash test: in the test suite at this size (50 kills per backend); 200 per backend at full size"
fi
