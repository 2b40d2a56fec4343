#!/bin/sh
# Pipeline benchmark (issue 5, acceptance 5): RUNS runs of the shipped 5-stage
# `feature` pipeline at concurrency 16 against an instantly-answering fake model
# (tests/tools/fake_model.lua, its own process, every reply a valid COMPLETE
# TaskResult), durable state in a fresh SQLite file (tests/bench/pipeline.lua); then,
# against the same fake with the same prompts and replies, the same 5-step graph in
# LangGraph.js (tests/bench/langgraph, installed here with npm ci) with its SQLite
# checkpointer (or MemorySaver if that does not load, said in the output). Prints
# runs/s, per-stage overhead and peak RSS (VmHWM) of each, the ratio Factory /
# LangGraph (goal >= 10) and the memory ratio (goal: Factory <= 1/5 of LangGraph).
# BENCH_SIZE=tiny: 20 runs each; LangGraph only when tests/bench/langgraph is
# already installed (npm ci compiles better-sqlite3, over a minute). Exits non-zero
# only when something failed to run. Environment: FACTORY_BIN (default ./factory).
set -u
BIN=${FACTORY_BIN:-./factory}
if [ "${BENCH_SIZE:-full}" = tiny ]; then RUNS=20; else RUNS=1000; fi
CONC=16
LG=tests/bench/langgraph

fail() { echo "bench_pipeline: $*" >&2; exit 1; }
. tests/bench/fake_model.sh

echo "Fake model: tests/tools/fake_model.lua as its own process ($url), shared by both sides."
echo "SQLite: Factory's factory.db (WAL; transactions that queue for the writer meanwhile share the next"
echo "        commit, and each returns only once it is on disk: factory fdatasyncs the WAL outside the write lock);"
echo "LangGraph's SqliteSaver: WAL, better-sqlite3's default synchronous=FULL (the same durability)."
"$BIN" tests/bench/pipeline.lua "$url" "$dir/factory.db" "$RUNS" "$CONC" "$dir/shared.json" >"$dir/factory.out" \
    || { cat "$dir/factory.out" >&2; fail "factory failed"; }
grep -v '^runs/s \|^overhead_ms \|^cpu_ms \|^vmhwm_kb ' "$dir/factory.out"

lg_ok=0
if [ "${BENCH_SIZE:-full}" = tiny ] && [ ! -f "$LG/node_modules/.package-lock.json" ]; then
    echo "langgraph: SKIPPED at tiny size: not installed, and npm ci (building better-sqlite3) takes over a minute;"
    echo "           run the full size once, or (cd $LG && npm ci), to include it"
else
    if [ "${BENCH_SIZE:-full}" = tiny ]; then
        echo "langgraph: tiny size: using the existing install of $LG (no npm ci)"
    else
        (cd "$LG" && npm ci --no-audit --no-fund --loglevel=error >"$dir/npm.log" 2>&1) \
            || { cat "$dir/npm.log" >&2; fail "npm ci for LangGraph failed"; }
    fi
    (cd "$LG" && node bench.mjs "$url" "$dir/shared.json" "$RUNS" "$CONC" "$dir/langgraph.db") >"$dir/langgraph.out" \
        || { cat "$dir/langgraph.out" >&2; fail "LangGraph failed"; }
    grep -v '^runs/s \|^overhead_ms \|^cpu_ms \|^vmhwm_kb \|^checkpointer ' "$dir/langgraph.out"
    lg_ok=1
fi

v() { sed -n "s|^$1 ||p" "$2"; }
if [ $lg_ok = 1 ]; then
    awk -v f="$(v runs/s "$dir/factory.out")" -v g="$(v runs/s "$dir/langgraph.out")" \
        -v fm="$(v vmhwm_kb "$dir/factory.out")" -v gm="$(v vmhwm_kb "$dir/langgraph.out")" \
        -v fc="$(v cpu_ms "$dir/factory.out")" -v gc="$(v cpu_ms "$dir/langgraph.out")" \
        -v cp="$(v checkpointer "$dir/langgraph.out")" 'BEGIN {
        printf "factory %.1f runs/s, langgraph %.1f runs/s (checkpointer %s)\n", f, g, cp
        printf "ratio factory / langgraph runs/s: %.2f (goal >= 10: %s)\n", f / g, (f / g >= 10) ? "met" : "NOT met"
        printf "memory factory / langgraph peak RSS: %d / %d kB = %.3f (goal <= 0.2: %s)\n", fm, gm, fm / gm, (fm / gm <= 0.2) ? "met" : "NOT met"
        printf "CPU per stage: factory %.3f ms, langgraph %.3f ms\n", fc, gc
    }'
else
    echo "ratios: not computed (LangGraph skipped)"
fi
