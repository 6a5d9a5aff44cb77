#!/usr/bin/env bash
# Quick start, command 2: set up (with test extras), lint and type-check, then
# run the whole test suite. A lint or type error fails the script before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh test
echo "== ruff" >&2
.venv/bin/ruff check .
echo "== mypy" >&2
.venv/bin/python -m mypy  # what to check: [tool.mypy] files in pyproject.toml
echo "== pytest" >&2
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
