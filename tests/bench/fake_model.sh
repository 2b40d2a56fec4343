# Sourced by the benchmarks that talk to the fake model (tests/tools/fake_model.lua)
# as its own process. Needs BIN. Makes a temporary directory $dir, starts the fake,
# sets fake_pid and url, and on exit stops the fake and removes $dir.
dir=$(mktemp -d)
fake_pid=""
cleanup() {
    [ -n "$fake_pid" ] && kill "$fake_pid" 2>/dev/null && wait "$fake_pid" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

"$BIN" tests/tools/fake_model.lua >"$dir/fake.url" 2>"$dir/fake.err" &
fake_pid=$!
i=0
while [ ! -s "$dir/fake.url" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
url=$(head -n 1 "$dir/fake.url")
[ -n "$url" ] || { cat "$dir/fake.err" >&2; echo "$0: the fake model did not start" >&2; exit 1; }
