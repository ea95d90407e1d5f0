#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests: a temp dir, a free port on
# 127.0.0.1, trust auth, fsync off. Root cannot run postgres, so as root the
# cluster runs as the `postgres` user (or `nobody`).
#
#   .ci/postgres.sh install              # apt-get install postgresql unless present (root)
#   eval "$(.ci/postgres.sh start)"      # exports MLLPD_TEST_POSTGRES_DSN and _DIR
#   .ci/postgres.sh start durable        # fsync on, as deployed (benchmarks)
#   python -m twisted.trial tests.test_connector_postgres
#   .ci/postgres.sh restart "$MLLPD_TEST_POSTGRES_DIR"   # crash and start again
#   .ci/postgres.sh stop "$MLLPD_TEST_POSTGRES_DIR"
set -euo pipefail

bindir() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then
        echo "$dir"
    fi
}

as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u "$OWNER" -- "$@"
    else
        "$@"
    fi
}

owner() {
    if [ "$(id -u)" -ne 0 ]; then
        id -un
    elif id -u postgres >/dev/null 2>&1; then
        echo postgres
    else
        echo nobody
    fi
}

# The cluster directory a stop or restart is given: only one that start made.
cluster_dir() {
    case "$2" in
    */mllpd-pg.*) echo "$2" ;;
    *) echo "postgres.sh $1: expected a directory made by '$0 start', got '$2'" >&2; exit 2 ;;
    esac
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

cmd=${1:-}
case "$cmd" in
install)
    if [ -z "$(bindir)" ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2
        apt-get install -y -q postgresql >&2
    fi
    ;;
start)
    BIN=$(bindir)
    if [ -z "$BIN" ]; then
        echo "postgres.sh: no /usr/lib/postgresql/*/bin/initdb; run '$0 install' as root" >&2
        exit 1
    fi
    OWNER=$(owner)
    dir=$(mktemp -d "${TMPDIR:-/tmp}/mllpd-pg.XXXXXX")
    chmod 700 "$dir"
    if [ "$(id -u)" -eq 0 ]; then
        chown "$OWNER" "$dir"
    fi
    as_owner "$BIN/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    # Tests need no durability; benchmarks (durable) measure it as deployed.
    speed="-c fsync=off -c full_page_writes=off -c synchronous_commit=off"
    if [ "${2:-}" = "durable" ]; then
        speed=""
    fi
    # A port can be taken between choosing and binding: try a few.
    for _ in 1 2 3 4 5; do
        port=$(free_port)
        if as_owner "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 $speed" \
            start >/dev/null; then
            echo "export MLLPD_TEST_POSTGRES_DIR=$dir"
            echo "export MLLPD_TEST_POSTGRES_DSN=postgresql://postgres@127.0.0.1:$port/postgres"
            exit 0
        fi
    done
    cat "$dir/server.log" >&2 || true
    exit 1
    ;;
stop)
    dir=$(cluster_dir stop "${2:-${MLLPD_TEST_POSTGRES_DIR:-}}")
    BIN=$(bindir)
    OWNER=$(stat -c %U "$dir")
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_owner "$BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null || true
    fi
    rm -rf "$dir"
    ;;
restart)
    # An immediate (crash-like) stop and a start on the same port and data,
    # for the tests of a database that goes away under load.
    dir=$(cluster_dir restart "${2:-${MLLPD_TEST_POSTGRES_DIR:-}}")
    BIN=$(bindir)
    OWNER=$(stat -c %U "$dir")
    as_owner "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m immediate -w -t 30 restart >/dev/null
    ;;
*)
    echo "usage: $0 install | start [durable] | stop [DIR] | restart [DIR]" >&2
    exit 2
    ;;
esac
