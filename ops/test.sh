#!/usr/bin/env bash
# Quick start, command 2: set up (with test extras), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh test
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
