#!/usr/bin/env bash
# Installs the official Azure SDKs the interop tests drive: npm packages into
# tests/interop/node_modules, PyPI packages into tests/interop/.venv. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
# --ignore-scripts: tss.js (the TPM client of azure-iot-security-tpm) depends on ffi-napi,
# whose native build fails on current Node and which only its Windows TBS device loads; the
# TCP device the tests use is plain JavaScript. No other package here needs an install script.
npm install --no-audit --no-fund --loglevel=error --ignore-scripts
