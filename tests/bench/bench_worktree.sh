#!/bin/sh
# Worktree create+remove per second: factory.git (libgit2, in-process, no `git`
# process) against `git worktree add -b` + `git worktree remove` run as processes,
# in the same run on the same repository (tests/bench/worktree.lua: both sides keep
# the branch they create; rounds alternate which side goes first; best round of
# each). Goal: libgit2 / CLI >= 3. Exits non-zero only if something failed to run.
#
# Where it runs: BENCH_DIR, default the system temporary directory (a disk, where
# users' worktrees live). On ext4 each file creation scans past the inodes deleted
# in the last few seconds, a cost that grows with the deletion rate, so it charges
# the faster side more per file and the result drifts with the round length;
# BENCH_DIR=/dev/shm (tmpfs) measures the git work alone.
# Environment: BENCH_SIZE=tiny|full, BENCH_DIR, FACTORY_BIN, BUILD.
set -eu
trap '[ $? -eq 0 ] || echo "bench_worktree: a run failed" >&2' EXIT
BIN=${FACTORY_BIN:-./factory}
if [ "${BENCH_SIZE:-full}" = tiny ]; then N=10; ROUNDS=3; else N=100; ROUNDS=5; fi
BENCH_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}}
fstype=$(stat -f -c %T "$BENCH_DIR" 2>/dev/null || echo '?')

out=$("$BIN" tests/bench/worktree.lua "$N" "$ROUNDS" "$BENCH_DIR")
lib=$(echo "$out" | awk '$1 == "libgit2" { print $2 }')
cli=$(echo "$out" | awk '$1 == "cli" { print $2 }')
case "$lib$cli" in ''|*[!0-9]*) echo "bench_worktree: no figures in: $out" >&2; exit 1;; esac
say() { printf '%-58s %s\n' "$1" "$2"; }
echo "worktree bench in $BENCH_DIR ($fstype), 50-file repo, best of $ROUNDS alternating rounds of $N;"
echo "  libgit2: worktree_add (new branch + checkout) + worktree_remove (dirty check);"
echo "  cli: git worktree add -b + git worktree remove (dirty check); both keep the branch"
say "worktree create+remove, factory.git (libgit2, N=$N x $ROUNDS):" "$lib per s"
say "worktree create+remove, git CLI processes:" "$cli per s"
say "worktree ratio libgit2/CLI:" "$(awk -v a="$lib" -v b="$cli" 'BEGIN { printf "%.2f", a / b }') (goal >= 3)"
