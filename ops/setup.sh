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
# libpixelmed-java, default-jdk-headless: PixelMed's validators in the tests
#   (tests/validators.py compiles a small driver, so a JDK, not just a JRE)
# tesseract-ocr: the viewer tests read the report's probability off the screenshot
# orthanc-dicomweb, chromium, fonts-dejavu-core: the viewer harness
#   (gateway/apps/viewer/: OHIF over Orthanc's DICOMweb in headless Chromium;
#   DejaVu for OHIF's overlay text and the harness's own pictures)
echo "== apt packages" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-dev dcmtk orthanc orthanc-dicomweb dicom3tools prometheus \
    chromium fonts-dejavu-core libpixelmed-java default-jdk-headless \
    tesseract-ocr tesseract-ocr-eng >/dev/null
# The Debian package starts a system Orthanc on 4242/8042; the tests run their
# own instances on free ports and do not need it.
if [ "${1:-}" = "test" ]; then
    # postgresql, rabbitmq-server: the shared index and the wake-up broker of the
    # scale-out tests. tests/services.py starts a throw-away server of each
    # (initdb + pg_ctl from /usr/lib/postgresql/<version>/bin, a rabbitmq-server
    # node with its own epmd) on free loopback ports in a temp folder. The system
    # services the packages may start at install (5432, 5672) are not used.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        postgresql rabbitmq-server >/dev/null
fi

# OHIF, prebuilt: the dist/ folder of the @ohif/app package (`npm install` of it
# does not resolve; its tarball has the built viewer). npm pack checks the
# download against the registry's integrity field; the pin below makes sure it
# is the version the harness was written for. AIGW_OHIF_TGZ=<file> uses a
# tarball already at hand instead (checked against the same pin).
OHIF_VERSION=3.13.2
OHIF_INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
if [ ! -f .viewer/ohif/dist/index.html ]; then
    echo "== OHIF viewer $OHIF_VERSION (.viewer/ohif/dist)" >&2
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    if [ -n "${AIGW_OHIF_TGZ:-}" ]; then
        tgz="$AIGW_OHIF_TGZ"
    else
        # Debian's nodejs/npm only where no npm is installed already.
        command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
            --no-install-recommends nodejs npm >/dev/null
        (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
        tgz="$tmp/ohif-app-$OHIF_VERSION.tgz"
    fi
    got="$(python3 -c 'import base64, hashlib, sys
print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tgz")"
    if [ "$got" != "$OHIF_INTEGRITY" ]; then
        echo "$tgz is not @ohif/app@$OHIF_VERSION: integrity $got, expected $OHIF_INTEGRITY" >&2
        exit 1
    fi
    tar -xzf "$tgz" -C "$tmp" package/dist
    mkdir -p .viewer/ohif
    rm -rf .viewer/ohif/dist
    mv "$tmp/package/dist" .viewer/ohif/dist
fi

echo "== python environment (.venv)" >&2
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# [viewer]: playwright, the Python driver of the system Chromium above (never
# `playwright install`: the harness uses /usr/bin/chromium).
if [ "${1:-}" = "test" ]; then
    .venv/bin/python -m pip install -q -e ".[test,viewer]"
else
    .venv/bin/python -m pip install -q -e ".[viewer]"
fi
.venv/bin/aigw --version >&2
