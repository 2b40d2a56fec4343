#!/bin/sh
# A throwaway PostgreSQL server for the tests.
#
#   pg.sh start [WATCH_PID]   initdb into a new temp dir, start the server on a UNIX
#                             socket in that dir and on 127.0.0.1 at a free port, create
#                             the password-authenticated role and database "factory";
#                             prints key=value lines: dir, port, url, socket_url, admin_url.
#                             With WATCH_PID, a watchdog stops the server when that
#                             process exits, so a crashed test run leaves nothing behind.
#   pg.sh stop DIR            stop the server and remove DIR
#
# PostgreSQL refuses to run as root: as root, the server runs as the `postgres` system
# user (created by Debian's postgresql package), which owns the temp dir.
# fsync is off: this server's data is thrown away, and the tests are about the client.
set -eu

PASSWORD=factory-test

pgbin() {
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n -r); do
        [ -x "$d/initdb" ] && { echo "$d"; return; }
    done
    command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return; }
    echo "pg.sh: no PostgreSQL server binaries (initdb) found; run 'make deps'" >&2
    exit 1
}

as_owner() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

stop() {
    dir=$1
    [ -d "$dir" ] || return 0
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_owner "$(pgbin)/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}

random_port() {
    echo $(( $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % 30000 + 20000 ))
}

start() {
    watch=${1:-}
    bin=$(pgbin)
    dir=$(mktemp -d /tmp/factory-pg.XXXXXX)
    chmod 755 "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres "$dir"
    if ! as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust --auth-host=scram-sha-256 \
            -E UTF8 --no-locale -N >"$dir/initdb.log" 2>&1; then
        echo "pg.sh: initdb failed:" >&2
        cat "$dir/initdb.log" >&2
        rm -rf "$dir"
        exit 1
    fi
    port=""
    for _ in 1 2 3 4 5 6 7 8; do
        try=$(random_port)
        if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
                -o "-c listen_addresses=127.0.0.1 -p $try -k $dir -c fsync=off -c full_page_writes=off" \
                start >/dev/null 2>&1; then
            port=$try
            break
        fi
    done
    if [ -z "$port" ]; then
        echo "pg.sh: the server did not start:" >&2
        tail -n 20 "$dir/server.log" >&2 || true
        rm -rf "$dir"
        exit 1
    fi
    psql -X -q -h "$dir" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE factory LOGIN PASSWORD '$PASSWORD'" \
        -c "CREATE DATABASE factory OWNER factory" >/dev/null
    if [ -n "$watch" ]; then
        # In its own session, so a Ctrl-C or a kill of the test's process group leaves
        # it running to clean up; detached from our stdout, so the caller sees EOF now.
        setsid sh "$0" watch "$watch" "$dir" </dev/null >/dev/null 2>&1 &
    fi
    enc_dir=$(printf '%s' "$dir" | sed 's|/|%2F|g')
    echo "dir=$dir"
    echo "port=$port"
    echo "url=postgres://factory:$PASSWORD@127.0.0.1:$port/factory"
    echo "socket_url=postgres://factory:$PASSWORD@$enc_dir:$port/factory"
    echo "admin_url=postgres://postgres@$enc_dir:$port/postgres"
}

watch() {
    while kill -0 "$1" 2>/dev/null && [ -d "$2" ]; do sleep 1; done
    stop "$2"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    watch) [ $# -eq 3 ] || exit 2; watch "$2" "$3" ;;
    stop) [ $# -eq 2 ] || { echo "usage: pg.sh stop DIR" >&2; exit 2; }; stop "$2" ;;
    *) echo "usage: pg.sh start [WATCH_PID] | stop DIR" >&2; exit 2 ;;
esac
