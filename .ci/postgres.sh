#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests of `cadence tune --storage postgresql://...`.
#
#   .ci/postgres.sh install      install the distribution's server when it is missing (root + apt)
#   .ci/postgres.sh start DIR    initdb + start a server whose files all live in DIR (created);
#                                prints its URL, e.g. postgresql://postgres@127.0.0.1:PORT/cadence_test
#   .ci/postgres.sh stop DIR     stop it (pg_ctl -m fast) and remove DIR; never fails
#   .ci/postgres.sh check        start, connect, stop: what .ci/run does, alone
#
# The server listens on 127.0.0.1 only, on a free port, with its unix sockets in DIR, trust
# authentication (loopback, throwaway data) and fsync off (nothing in it needs to survive a crash).
# PostgreSQL refuses to run as root: as root the server runs as the `postgres` user the package
# creates. tests/integration/conftest.py calls `start`/`stop` the same way when
# CADENCE_TEST_POSTGRES is not set.
set -euo pipefail

pg_bin() {
    # Debian/Ubuntu keep initdb and pg_ctl out of PATH, under /usr/lib/postgresql/VERSION/bin.
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then
        echo "$dir"
    elif command -v initdb >/dev/null; then
        dirname "$(command -v initdb)"
    else
        return 1
    fi
}

as_server_user() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

cmd_install() {
    if pg_bin >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
            || echo "ci: postgresql not installed" >&2
    else
        echo "ci: postgresql missing and cannot be installed here (needs root and apt-get)" >&2
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cmd_start() {
    local dir=${1:?usage: postgres.sh start DIR} bin port
    bin=$(pg_bin) || { echo "ci: no PostgreSQL server binaries (run: $0 install)" >&2; return 1; }
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$dir"
    fi
    as_server_user "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; return 1; }
    port=$(free_port)
    as_server_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >/dev/null || { cat "$dir/server.log" >&2; return 1; }
    echo "$port" >"$dir/port"
    "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres cadence_test
    echo "postgresql://postgres@127.0.0.1:$port/cadence_test"
}

cmd_stop() {
    local dir=${1:?usage: postgres.sh stop DIR} bin
    if [ -d "$dir/data" ] && bin=$(pg_bin); then
        as_server_user "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}

cmd_check() {
    local dir url
    dir=$(mktemp -d)
    trap 'cmd_stop "$dir"' EXIT
    cmd_install
    url=$(cmd_start "$dir")
    echo "started: $url"
    "$(pg_bin)/psql" "$url" -tAc 'select version()'
    cmd_stop "$dir"
    trap - EXIT
    if [ -e "$dir" ] || pgrep -f -- "-D $dir/data" >/dev/null; then
        echo "ci: the server did not stop" >&2
        return 1
    fi
    echo "stopped"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start "${2:-}" ;;
    stop) cmd_stop "${2:-}" ;;
    check) cmd_check ;;
    *)
        echo "usage: $0 install | start DIR | stop DIR | check" >&2
        exit 2
        ;;
esac
