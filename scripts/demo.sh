#!/usr/bin/env bash
# Install, then run the embedded demo (no PostgreSQL or Redis needed); arguments go to `retrotest demo`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/bootstrap.sh
exec .venv/bin/retrotest demo "$@"
