#!/bin/sh
# Pipeline benchmark (issue 5, acceptance 5): RUNS runs of the shipped 5-stage
# `feature` pipeline at concurrency 16 against an instantly-answering fake model
# (tests/tools/fake_model.lua, its own process, every reply a valid COMPLETE
# TaskResult), durable state in a fresh SQLite file (tests/bench/pipeline.lua); then,
# against the same fake with the same prompts and replies, the same 5-step graph in
# LangGraph.js (tests/bench/langgraph, installed here with npm ci) with its SQLite
# checkpointer (or MemorySaver if that does not load, said in the output). Prints
# runs/s, per-stage overhead and peak RSS (VmHWM) of each, the ratio Factory /
# LangGraph (goal >= 10) and the memory ratio (goal: Factory <= 1/5 of LangGraph);
# then the machine bound: the runs/s every core could give at Factory's and the
# fake's CPU per stage (the engine's one Lua thread bounds it more tightly still).
# At full size the two sides run ROUNDS=3 times, alternating (so that both see the
# same moments of a shared machine), each time on a fresh database: the first
# round prints its full figures, the others a line each, and the ratios are the
# medians of the rounds' (peak RSS: the largest of the rounds).
# BENCH_SIZE=tiny: 20 runs each, one round; LangGraph only when tests/bench/langgraph is
# already installed (npm ci compiles better-sqlite3, over a minute). Exits non-zero
# only when something failed to run. Environment: FACTORY_BIN (default ./factory).
set -u
BIN=${FACTORY_BIN:-./factory}
if [ "${BENCH_SIZE:-full}" = tiny ]; then RUNS=20; ROUNDS=1; else RUNS=1000; ROUNDS=3; fi
CONC=16
LG=tests/bench/langgraph

fail() { echo "bench_pipeline: $*" >&2; exit 1; }
. tests/bench/fake_model.sh

echo "Fake model: tests/tools/fake_model.lua as its own process ($url), shared by both sides."
echo "SQLite: Factory's factory.db (WAL; transactions that queue for the writer meanwhile share the next"
echo "        commit, and each returns only once it is on disk: factory fdatasyncs the WAL outside the write lock);"
echo "LangGraph's SqliteSaver: WAL, better-sqlite3's default synchronous=FULL (the same durability)."

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
    lg_ok=1
fi

v() { sed -n "s|^$1 ||p" "$2"; }
. tests/bench/median.sh
fac="" lgs="" ratios="" fmem=0 gmem=0
r=0
while [ "$r" -lt "$ROUNDS" ]; do
    r=$((r + 1))
    fo="$dir/factory$r.out"
    FAKE_PID=$fake_pid FAKE_HZ=$(getconf CLK_TCK) \
        "$BIN" tests/bench/pipeline.lua "$url" "$dir/factory$r.db" "$RUNS" "$CONC" "$dir/shared.json" >"$fo" \
        || { cat "$fo" >&2; fail "factory failed"; }
    fac="$fac $(v runs/s "$fo")"
    fmem=$(awk -v a="$fmem" -v b="$(v vmhwm_kb "$fo")" 'BEGIN { print (b > a) ? b : a }')
    if [ "$r" = 1 ]; then
        grep -v '^runs/s \|^overhead_ms \|^cpu_ms \|^fake_ms \|^vmhwm_kb ' "$fo"
    else
        echo "round $r: factory $(v runs/s "$fo") runs/s, engine CPU per stage $(v cpu_ms "$fo") ms," \
            "peak RSS $(v vmhwm_kb "$fo") kB"
    fi
    [ $lg_ok = 1 ] || continue
    go="$dir/langgraph$r.out"
    (cd "$LG" && node bench.mjs "$url" "$dir/shared.json" "$RUNS" "$CONC" "$dir/langgraph$r.db") >"$go" \
        || { cat "$go" >&2; fail "LangGraph failed"; }
    lgs="$lgs $(v runs/s "$go")"
    gmem=$(awk -v a="$gmem" -v b="$(v vmhwm_kb "$go")" 'BEGIN { print (b > a) ? b : a }')
    ratios="$ratios $(awk -v f="$(v runs/s "$fo")" -v g="$(v runs/s "$go")" 'BEGIN { printf "%.3f", f / g }')"
    if [ "$r" = 1 ]; then
        grep -v '^runs/s \|^overhead_ms \|^cpu_ms \|^vmhwm_kb \|^checkpointer ' "$go"
        awk -v fc="$(v cpu_ms "$fo")" -v gc="$(v cpu_ms "$go")" \
            'BEGIN { printf "CPU per stage: factory %.3f ms, langgraph %.3f ms\n", fc, gc }'
    else
        echo "round $r: langgraph $(v runs/s "$go") runs/s, CPU per step $(v cpu_ms "$go") ms," \
            "peak RSS $(v vmhwm_kb "$go") kB"
    fi
    echo "round $r: ratio factory / langgraph runs/s: ${ratios##* }"
done

f=$(median_of "$fac")
if [ $lg_ok = 1 ]; then
    g=$(median_of "$lgs")
    m=$(median_of "$ratios")
    awk -v f="$f" -v g="$g" -v m="$m" -v n="$ROUNDS" -v fm="$fmem" -v gm="$gmem" \
        -v cp="$(v checkpointer "$dir/langgraph1.out")" 'BEGIN {
        printf "median of %d round(s): factory %.1f runs/s, langgraph %.1f runs/s (checkpointer %s)\n", n, f, g, cp
        printf "ratio factory / langgraph runs/s (median of the rounds): %.2f (goal >= 10: %s)\n", m, (m >= 10) ? "met" : "NOT met"
        printf "memory factory / langgraph peak RSS: %d / %d kB = %.3f (goal <= 0.2: %s)\n", fm, gm, fm / gm, (fm / gm <= 0.2) ? "met" : "NOT met"
    }'
    # What the machine could do at these costs: every core busy with the engine's and
    # the fake's work (the engine's one Lua thread is a tighter bound still).
    awk -v c="$(v cpu_ms "$dir/factory1.out")" -v fk="$(v fake_ms "$dir/factory1.out")" -v cores="$(nproc)" -v g="$g" 'BEGIN {
        s = cores / ((c + fk) / 1000)
        printf "machine bound: factory %.3f ms + fake model %.3f ms of CPU per stage; %d cores at these costs serve at most %.0f stages/s = %.0f runs/s = %.2f x langgraph\n", c, fk, cores, s, s / 5, s / 5 / g
    }'
else
    echo "factory $f runs/s; ratios: not computed (LangGraph skipped)"
fi
