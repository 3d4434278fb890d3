#!/usr/bin/env bash
# The static checks CI applies before the tests: ruff (lint and format) on the project, mypy --strict on app/ and worker/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "lint: ruff check"
.venv/bin/ruff check app worker tests bench migrations
echo "lint: ruff format --check"
.venv/bin/ruff format --check app worker tests bench migrations
echo "lint: mypy app worker"
.venv/bin/mypy app worker
