#!/usr/bin/env bash
# Runs every test: unit, store crash-recovery, in-process gateway tests over TLS, and the interop
# tests with the official Azure SDKs (installed here from npm and PyPI if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash tests/interop/setup.sh
cargo test --workspace --all-targets "$@"
