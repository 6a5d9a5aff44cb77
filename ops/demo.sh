#!/usr/bin/env bash
# Quick start, command 1: set up, then run the end-to-end demo (writes report.html).
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh
exec .venv/bin/aigw demo "$@"
