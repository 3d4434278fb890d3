#!/usr/bin/env bash
# The one test command. Installs the Python packages, runs the static checks (scripts/lint.sh) before anything
# starts, then:
#   test.sh [PYTEST ARGS]         the whole suite: installs the system tools (chromium, Java, rclone, ...), starts
#                                 PostgreSQL and Redis if they are down, runs pytest (CI runs this)
#   test.sh --fast [PYTEST ARGS]  the fast lane: only tests marked `unit` (no PostgreSQL, Redis, Spark, MLServer or
#                                 Kubernetes emulator; tests/conftest.py marks them by the fixtures they use)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

FAST=0
if [[ "${1:-}" == "--fast" ]]; then
    FAST=1
    shift
fi

bash scripts/bootstrap.sh --dev
bash scripts/lint.sh
if ((FAST)); then
    exec .venv/bin/python -m pytest -m unit "$@"
fi
bash scripts/system-packages.sh
bash scripts/services.sh
exec .venv/bin/python -m pytest "$@"
