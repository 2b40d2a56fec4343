#!/bin/sh
# Runs every benchmark (tests/bench/bench_*.sh), each printing its figures.
# BENCH_SIZE=tiny runs them as a smoke check (CI); the default is the full size.
# Ends with "N passed, N failed": a benchmark passes when it ran to the end.
set -u
export BENCH_SIZE=${BENCH_SIZE:-full}
export FACTORY_BIN=${FACTORY_BIN:-./factory}
export BUILD=${BUILD:-build/rel}
passed=0
failed=0
for b in tests/bench/bench_*.sh; do
    [ -f "$b" ] || continue
    echo "## $b (size: $BENCH_SIZE)"
    if sh "$b"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL $b"; fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
