#!/bin/sh
# Worktree create+remove per second: factory.git (libgit2, in-process, no `git`
# process) against `git worktree add -b` + `git worktree remove` run as processes,
# in the same run on the same repository (tests/bench/worktree.lua; best of the
# rounds, interleaved). Goal: libgit2 / CLI >= 3. Exits non-zero only if something
# failed to run. Environment: BENCH_SIZE=tiny|full, FACTORY_BIN, BUILD.
set -eu
trap '[ $? -eq 0 ] || echo "bench_worktree: a run failed" >&2' EXIT
BIN=${FACTORY_BIN:-./factory}
if [ "${BENCH_SIZE:-full}" = tiny ]; then N=10; ROUNDS=2; else N=100; ROUNDS=5; fi

out=$("$BIN" tests/bench/worktree.lua "$N" "$ROUNDS")
lib=$(echo "$out" | awk '$1 == "libgit2" { print $2 }')
cli=$(echo "$out" | awk '$1 == "cli" { print $2 }')
case "$lib$cli" in ''|*[!0-9]*) echo "bench_worktree: no figures in: $out" >&2; exit 1;; esac
say() { printf '%-58s %s\n' "$1" "$2"; }
say "worktree create+remove, factory.git (libgit2, N=$N x $ROUNDS):" "$lib per s"
say "worktree create+remove, git CLI processes:" "$cli per s"
say "worktree ratio libgit2/CLI:" "$(awk -v a="$lib" -v b="$cli" 'BEGIN { printf "%.2f", a / b }') (goal >= 3)"
