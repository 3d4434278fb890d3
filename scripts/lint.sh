#!/usr/bin/env bash
# The static checks CI applies before the tests: ruff (lint and format) on the project, the layer rules
# (scripts/check_layers.py: no import cycle between packages, no function over 6 parameters), mypy --strict on
# app/ and worker/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "lint: ruff check"
.venv/bin/ruff check app worker tests bench migrations scripts
echo "lint: ruff format --check"
.venv/bin/ruff format --check app worker tests bench migrations scripts
echo "lint: layers (scripts/check_layers.py)"
.venv/bin/python scripts/check_layers.py
echo "lint: mypy app worker scripts/check_layers.py"
.venv/bin/mypy app worker scripts/check_layers.py
