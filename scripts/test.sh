#!/usr/bin/env bash
# Runs every test: unit, store crash-recovery, in-process gateway tests over TLS, and the interop
# tests with the official Azure SDKs (installed here from npm and PyPI if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  apt-get update -qq && apt-get install -y -qq nodejs npm
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  apt-get update -qq && apt-get install -y -qq python3-venv
fi
# Mosquitto is the benchmark's peer (dps-bench, run by .ci/run as a smoke test).
if ! command -v mosquitto >/dev/null || ! command -v mosquitto_passwd >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto
fi
bash tests/interop/setup.sh
cargo test --workspace --all-targets "$@"
