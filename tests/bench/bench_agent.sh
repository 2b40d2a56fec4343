#!/bin/sh
# Agent-loop benchmark (issue 6, acceptance 6): the built-in agent's own overhead
# per tool call against an instantly-answering fake model (tests/tools/fake_model.lua
# as its own process): wall time minus the time waiting on the model, per tool call,
# for read_file, write_file and run_command (tests/bench/agent.lua explains the
# measure). No peer is named for this figure. Exits non-zero only when something
# failed to run. Environment: BENCH_SIZE=tiny|full, FACTORY_BIN.
set -u
BIN=${FACTORY_BIN:-./factory}
if [ "${BENCH_SIZE:-full}" = tiny ]; then RUNS=2; CALLS=5; else RUNS=50; CALLS=20; fi

. tests/bench/fake_model.sh

echo "agent loop: $RUNS runs x $CALLS tool calls + finish per tool, fake model in its own process ($url)"
"$BIN" tests/bench/agent.lua "$url" "$RUNS" "$CALLS" >"$dir/out" 2>&1 || { cat "$dir/out" >&2; exit 1; }
grep -v '^overhead_us ' "$dir/out"
