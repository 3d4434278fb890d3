#!/usr/bin/env bash
# Start the local PostgreSQL and Redis the tests use, unless they already answer.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_HOST=127.0.0.1
REDIS_PORT=6379
WAIT_S=30

say() { echo "services: $*"; }

port_open() {
    python3 - "$1" "$2" <<'PY' 2>/dev/null
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1):
    pass
PY
}

postgres_up() {
    if command -v pg_isready >/dev/null; then
        pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
    else
        port_open "$PG_HOST" "$PG_PORT"
    fi
}

redis_up() {
    if command -v redis-cli >/dev/null; then
        [[ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == "PONG" ]]
    else
        port_open "$REDIS_HOST" "$REDIS_PORT"
    fi
}

wait_for() {
    local name="$1" check="$2" i
    for ((i = 0; i < WAIT_S; i++)); do
        if "$check"; then
            say "$name is up"
            return 0
        fi
        sleep 1
    done
    echo "services: $name did not come up within ${WAIT_S} s" >&2
    return 1
}

if postgres_up; then
    say "PostgreSQL already answering on $PG_HOST:$PG_PORT"
else
    if ! command -v pg_ctlcluster >/dev/null || [[ ! -d /etc/postgresql ]]; then
        echo "services: PostgreSQL is not answering on $PG_HOST:$PG_PORT and pg_ctlcluster is not installed" >&2
        exit 1
    fi
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    say "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for "PostgreSQL ($PG_HOST:$PG_PORT)" postgres_up
fi

if redis_up; then
    say "Redis already answering on $REDIS_HOST:$REDIS_PORT"
else
    if ! command -v redis-server >/dev/null; then
        echo "services: Redis is not answering on $REDIS_HOST:$REDIS_PORT and redis-server is not installed" >&2
        exit 1
    fi
    say "starting Redis"
    redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no
    wait_for "Redis ($REDIS_HOST:$REDIS_PORT)" redis_up
fi
