#!/bin/sh
# Process spawning: the engine (factory.proc, posix_spawn + pidfd) against a plain C
# posix_spawn + waitpid loop, both running /bin/true N times with 32 in flight;
# then the engine again with a big Lua heap, and libuv's uv_spawn (fork) with and
# without as much memory, for the record. Figures are processes per second, best
# of 5 runs (the uv_spawn ones: 1 run) to damp the noise of a shared machine.
# Goal: engine / peer >= 0.8 at any heap size. Exits non-zero only if something
# failed to run. Environment: BENCH_SIZE=tiny|full, FACTORY_BIN, BUILD.
set -eu
trap '[ $? -eq 0 ] || echo "bench_spawn: a run failed" >&2' EXIT
BIN=${FACTORY_BIN:-./factory}
BUILD=${BUILD:-build/rel}
CONC=32
if [ "${BENCH_SIZE:-full}" = tiny ]; then N=50; MB=20; else N=2000; MB=500; fi

mkdir -p "$BUILD/bench"
PEER="$BUILD/bench/spawn_peer"
# shellcheck disable=SC2046
cc -O2 -Wall -Wextra -o "$PEER" tests/bench/spawn_peer.c $(pkg-config --cflags --libs libuv)

# max BEST FIGURE: the larger; fails unless FIGURE is a number.
max() {
    case $2 in ''|*[!0-9]*) echo "bench_spawn: not a figure: '$2'" >&2; return 1;; esac
    if [ "$1" -gt "$2" ]; then echo "$1"; else echo "$2"; fi
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
say() { printf '%-58s %s\n' "$1" "$2"; }

# Rounds interleave the runs so that each sees the same background load.
engine=0 peer=0 big=0 peerbig=0
for _ in 1 2 3 4 5; do
    e=$("$BIN" tests/bench/spawn.lua "$N" "$CONC" 0)
    p=$("$PEER" posix "$N" "$CONC")
    b=$("$BIN" tests/bench/spawn.lua "$N" "$CONC" "$MB")
    pb=$("$PEER" posix "$N" "$CONC" "$MB")
    engine=$(max "$engine" "$e")
    peer=$(max "$peer" "$p")
    big=$(max "$big" "$b")
    peerbig=$(max "$peerbig" "$pb")
done
uv=$("$PEER" uv "$N" "$CONC")
uvbig=$("$PEER" uv "$N" "$CONC" "$MB")
say "spawn engine (factory.proc, N=$N, concurrency $CONC):" "$engine processes/s"
say "spawn peer (C posix_spawn + waitpid):" "$peer processes/s"
say "spawn ratio engine/peer:" "$(ratio "$engine" "$peer") (goal >= 0.8)"
say "spawn engine with $MB MB in the Lua heap:" "$big processes/s"
say "spawn ratio engine ($MB MB heap)/peer:" "$(ratio "$big" "$peer") (goal >= 0.8)"
say "spawn peer with $MB MB allocated and touched:" "$peerbig processes/s"
say "spawn ratio engine/peer, both with $MB MB:" "$(ratio "$big" "$peerbig")"
say "spawn libuv uv_spawn (fork), for the record:" "$uv processes/s"
say "spawn libuv uv_spawn with $MB MB allocated and touched:" "$uvbig processes/s"
