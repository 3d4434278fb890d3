#!/usr/bin/env bash
# Create .venv with Python 3.11 and install the pinned dependencies and the project into it.
#   bootstrap.sh        what the service needs (requirements.lock): the demo, an API or worker host
#   bootstrap.sh --dev  also the tests' and linters' packages (requirements-dev.lock, a superset), and MLServer in
#                       an environment of its own (.venv-server from requirements-server.lock) for
#                       RETRO_MODEL_ENV=worker, its tests and bench/
# Idempotent: each install is skipped while its lock and pyproject.toml are unchanged.
set -euo pipefail

MODE=runtime
for arg in "$@"; do
    case "$arg" in
        --dev) MODE=dev ;;
        *) echo "bootstrap: unknown argument $arg (use --dev)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV=.venv

say() { echo "bootstrap: $*"; }

is_py311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; }

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" "$(command -v python3.11 || true)" /root/.pyenv/versions/3.11*/bin/python3.11 /usr/local/bin/python3.11 /usr/bin/python3.11; do
        if [[ -n "$candidate" && -x "$candidate" ]] && is_py311 "$candidate"; then
            # Resolve pyenv shims to the real interpreter so the venv does not depend on pyenv.
            "$candidate" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    return 1
}

if [[ -x "$VENV/bin/python" ]] && ! is_py311 "$VENV/bin/python"; then
    say "$VENV is not a working Python 3.11 environment; recreating it"
    rm -rf "$VENV"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    PY="$(find_python)" || { echo "bootstrap: Python 3.11 not found (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
    say "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi

# Stamps: the hash of the lock (and pyproject.toml) last installed; the dev lock holds the runtime lock's pins.
lock_hash() { cat "$1" pyproject.toml | sha256sum | cut -d' ' -f1; }
up_to_date() { [[ -f "$VENV/.stamp-$1" && "$(cat "$VENV/.stamp-$1")" == "$(lock_hash "$2")" ]]; }

ensure_uv() {
    if [[ ! -x "$VENV/bin/uv" ]]; then
        say "installing uv into $VENV"
        "$VENV/bin/python" -m pip install --quiet uv
    fi
}

install_project() {
    local name="$1" lock="$2"
    if up_to_date "$name" "$lock"; then
        say "$lock up to date ($VENV)"
        return 0
    fi
    ensure_uv
    say "installing $lock"
    # Bytecode compiled once at install: the processes here run with PYTHONDONTWRITEBYTECODE set or in a read-only
    # image, and every model server start would compile mlflow, pandas and scikit-learn again (~12 s against ~6 s).
    # sync, not install: a package the lock no longer holds (mlserver, moved to .venv-server) is removed too.
    "$VENV/bin/uv" pip sync --python "$VENV/bin/python" --compile-bytecode "$lock"
    say "installing retrotest (editable)"
    "$VENV/bin/uv" pip install --python "$VENV/bin/python" --no-deps -e .
    lock_hash "$lock" > "$VENV/.stamp-$name"
}

# MLServer 1.7.1 pins fastapi<0.116, which the API cannot use (docs/security.md): it gets a venv of its own, found by
# the local deployer as .venv-server/bin/mlserver (app/integrations/deployers/local.py).
install_server() {
    local server=.venv-server lock=requirements-server.lock
    if [[ -x "$server/bin/mlserver" && -f "$server/.stamp" && "$(cat "$server/.stamp")" == "$(lock_hash "$lock")" ]]; then
        say "$lock up to date ($server)"
        return 0
    fi
    ensure_uv
    say "installing $lock into $server"
    "$VENV/bin/uv" venv --quiet --allow-existing --python "$VENV/bin/python" "$server"
    "$VENV/bin/uv" pip install --python "$server/bin/python" --compile-bytecode -r "$lock"
    lock_hash "$lock" > "$server/.stamp"
}

if [[ "$MODE" == dev ]]; then
    install_project dev requirements-dev.lock
    lock_hash requirements.lock > "$VENV/.stamp-runtime"  # the dev lock holds every runtime pin
    install_server
else
    up_to_date dev requirements-dev.lock || install_project runtime requirements.lock
fi
say "done"
