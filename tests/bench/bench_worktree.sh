#!/bin/sh
# Worktree create+remove per second: factory.git (libgit2, in-process, no `git`
# process) against `git worktree add -b` + `git worktree remove` run as processes,
# in the same run on the same repository (tests/bench/worktree.lua: both sides keep
# the branch they create; rounds alternate which side goes first; best round of
# each). Goal: libgit2 / CLI >= 3. Exits non-zero only if something failed to run.
#
# Where it runs: the system temporary directory (a disk, where users' worktrees
# live) and /dev/shm (tmpfs: the git work alone), or only BENCH_DIR when it is set.
# Both sides make their worktrees in one directory prepared as Factory prepares its
# worktree root: marked as the top of unrelated trees (FS_TOPDIR_FL), so that ext4
# gives each worktree a block group of its own. On an ext4 without a journal (this
# development machine's disk, mounted with online discard) each file creation still
# scans past the inodes deleted in its group in the last half minute (in .git, where
# both sides create their files too) and each delete issues a discard: costs that
# grow with the deletion rate, so they charge the faster side more per file, and the
# disk figure drifts with the round length.
# A third reading, when BENCH_DIR is unset and this runs as root with loop devices:
# a fresh ext4 made by mkfs.ext4 with its defaults (so with a journal, as
# distributions install it), mounted from an image file in the temporary directory.
# With a journal ext4 does not scan past recently deleted inodes, so this shows the
# two sides on an ordinary disk filesystem; it is skipped, saying why, when it
# cannot be made.
# Environment: BENCH_SIZE=tiny|full, BENCH_DIR, FACTORY_BIN, BUILD.
set -eu
img=""
mnt=""
unmount() {
    [ -n "$mnt" ] && { umount "$mnt" 2>/dev/null; rmdir "$mnt" 2>/dev/null; }
    [ -n "$img" ] && rm -f "$img"
    mnt=""
    img=""
}
trap 'rc=$?; unmount; [ $rc -eq 0 ] || echo "bench_worktree: a run failed" >&2' EXIT
trap 'exit 1' INT TERM
BIN=${FACTORY_BIN:-./factory}
if [ "${BENCH_SIZE:-full}" = tiny ]; then N=10; ROUNDS=3; else N=100; ROUNDS=5; fi
# Each directory is measured in turn: BENCH_DIR (default: the system temporary
# directory, a disk) and, when it exists, /dev/shm (memory: the git work alone).
DIRS=${BENCH_DIR:-${TMPDIR:-/tmp}}
[ -z "${BENCH_DIR:-}" ] && [ -d /dev/shm ] && DIRS="$DIRS /dev/shm"
# The journaled ext4 image (see the top): 2 GiB, sparse, so it costs what is written.
ext4_note=""
if [ -z "${BENCH_DIR:-}" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v mkfs.ext4 >/dev/null 2>&1; then
        ext4_note="not measured: needs root and mkfs.ext4"
    else
        img=$(mktemp "${TMPDIR:-/tmp}/bench-ext4.XXXXXX")
        mnt=$(mktemp -d "${TMPDIR:-/tmp}/bench-ext4-mnt.XXXXXX")
        if truncate -s 2G "$img" && mkfs.ext4 -q -F "$img" >/dev/null 2>&1 &&
            mount -o loop "$img" "$mnt" 2>/dev/null; then
            DIRS="$DIRS $mnt"
        else
            unmount
            ext4_note="not measured: this machine cannot mount a loop device"
        fi
    fi
fi
say() { printf '%-58s %s\n' "$1" "$2"; }
echo "worktree bench, 50-file repo, best of $ROUNDS alternating rounds of $N per side;"
echo "  libgit2: worktree_add (new branch + checkout) + worktree_remove (dirty check);"
echo "  cli: git worktree add -b + git worktree remove (dirty check); both keep the branch;"
echo "  files: the checkout's files written and removed with no git (what the filesystem costs)"
for dir in $DIRS; do
    fstype=$(stat -f -c %T "$dir" 2>/dev/null || echo '?')
    out=$("$BIN" tests/bench/worktree.lua "$N" "$ROUNDS" "$dir")
    lib=$(echo "$out" | awk '$1 == "libgit2" { print $2 }')
    cli=$(echo "$out" | awk '$1 == "cli" { print $2 }')
    files=$(echo "$out" | awk '$1 == "files" { print $2 }')
    case "$lib$cli$files" in ''|*[!0-9]*) echo "bench_worktree: no figures in: $out" >&2; exit 1;; esac
    where="$dir ($fstype)"
    [ "$dir" = "$mnt" ] && where="a fresh journaled ext4 image ($dir)"
    echo "in $where:"
    say "  worktree create+remove, factory.git (libgit2):" "$lib per s"
    say "  worktree create+remove, git CLI processes:" "$cli per s"
    say "  the same files written and removed, no git (the floor):" "$files per s"
    say "  filesystem share of a libgit2 create+remove:" "$(awk -v a="$lib" -v f="$files" 'BEGIN { printf "%.0f%%", 100 * a / f }')"
    say "  worktree ratio libgit2/CLI:" "$(awk -v a="$lib" -v b="$cli" 'BEGIN { printf "%.2f", a / b }') (goal >= 3)"
done
[ -n "$ext4_note" ] && echo "journaled ext4 image: $ext4_note"
exit 0
