#!/usr/bin/env bash
# The one test command: install (Python packages, then docker-compose if missing), start PostgreSQL and Redis,
# run the static checks (scripts/lint.sh), then pytest with any arguments given.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/bootstrap.sh --dev
bash scripts/system-packages.sh
bash scripts/services.sh
bash scripts/lint.sh
exec .venv/bin/python -m pytest "$@"
