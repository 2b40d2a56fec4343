#!/bin/sh
# Runs every test: the C unit tests, the Lua specs (unit and CLI integration) and
# the benchmarks at a tiny size, then prints one total line "N passed, N failed".
# Environment: FACTORY_BIN (default ./factory), BUILD (default build/rel).
set -u
BIN=${FACTORY_BIN:-./factory}
BUILD=${BUILD:-build/rel}
export FACTORY_BIN="$BIN"
passed=0
failed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Adds the "N passed, N failed" of the last run to the totals; a run that printed no
# summary (it crashed) counts as one failure.
tally() {
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1)
    if [ -z "$line" ]; then
        echo "FAIL $1 (no summary line; exit $2)"
        failed=$((failed + 1))
        return
    fi
    p=${line%% passed*}
    f=${line#*, }
    f=${f%% failed}
    if [ "$2" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; echo "FAIL $1 (exit $2)"; fi
    passed=$((passed + p))
    failed=$((failed + f))
}

echo "== C unit tests"
"$BUILD/test_fiber" >"$log" 2>&1; rc=$?
cat "$log"; tally "C unit tests" $rc

echo "== Lua specs"
specs=$(find tests -name '*_spec.lua' -not -path 'tests/bench/*' | sort)
# shellcheck disable=SC2086
"$BIN" tests/run.lua $specs >"$log" 2>&1; rc=$?
cat "$log"; tally "Lua specs" $rc

for t in tests/cli/*_test.py; do
    [ -f "$t" ] || continue
    echo "== $t"
    python3 "$t" >"$log" 2>&1; rc=$?
    cat "$log"; tally "$t" $rc
done

if [ "${SKIP_BENCH:-0}" != 1 ] && [ -f tests/bench/run.sh ]; then
    echo "== benchmarks (smoke size)"
    BENCH_SIZE=tiny sh tests/bench/run.sh >"$log" 2>&1; rc=$?
    cat "$log"; tally "benchmarks" $rc
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
