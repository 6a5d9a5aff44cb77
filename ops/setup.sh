#!/usr/bin/env bash
# Set up everything aigw needs on a fresh Debian machine: system packages
# (DICOM tools used as real peers by the tests and the demo's reference
# tools) and a Python virtual environment with the gateway installed.
#
# Usage: ops/setup.sh [test]   ("test" also installs the test extras)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

# dcmtk: storescu/echoscu/storescp (scanner and reference SCP in tests)
# orthanc: the PACS in tests; dicom3tools: dciodvfy to validate outputs
# prometheus: scrapes the gateway in the monitoring test (promtool checks rules)
echo "== apt packages" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-dev dcmtk orthanc dicom3tools prometheus >/dev/null
# The Debian package starts a system Orthanc on 4242/8042; the tests run their
# own instances on free ports and do not need it.

echo "== python environment (.venv)" >&2
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "test" ]; then
    .venv/bin/python -m pip install -q -e ".[test]"
else
    .venv/bin/python -m pip install -q -e .
fi
.venv/bin/aigw --version >&2
