#!/usr/bin/env bash
# A profile-guided release build of the gateway, loadgen and dps-bench (tuning.md,
# "Whole-program optimisation"). An instrumented build runs the benchmark twice as its
# training: `--smoke` (every transport and attestation, a few devices each, so no path an
# operator uses is laid out as never taken) and `--quick` (the registration under load, closed
# and open loop); the release build is then made again with the merged profile.
#   bash scripts/build-pgo.sh        # -> target/pgo/use/<host>/release/{dps,loadgen,dps-bench}
# Needs what the benchmark needs (scripts/deps.sh: Mosquitto, swtpm) and llvm-profdata of
# rustc's own LLVM (the rustup component llvm-tools, added here if missing). About 15 minutes
# on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
host=$(rustc -vV | sed -n 's/^host: //p')
find_profdata() { find "$(rustc --print sysroot)/lib/rustlib" -name llvm-profdata -type f 2>/dev/null | head -n 1; }
profdata=$(find_profdata)
if [ -z "$profdata" ]; then
  rustup component add llvm-tools
  profdata=$(find_profdata)
fi
out=$PWD/target/pgo
rm -rf "$out/raw" "$out/merged.profdata"
mkdir -p "$out/raw"
# --target keeps the flags off build scripts and proc macros (they run at build time only).
RUSTFLAGS="-Cprofile-generate=$out/raw" \
  cargo build --release --target "$host" --target-dir "$out/gen" -p dps-bench
"$out/gen/$host/release/dps-bench" --smoke >"$out/train-smoke.log" 2>&1
"$out/gen/$host/release/dps-bench" --quick >"$out/train-quick.log" 2>&1
"$profdata" merge -o "$out/merged.profdata" "$out/raw"
RUSTFLAGS="-Cprofile-use=$out/merged.profdata" \
  cargo build --release --target "$host" --target-dir "$out/use" -p dps-gateway -p dps-loadgen -p dps-bench
ls -l "$out/use/$host/release/dps" "$out/use/$host/release/loadgen" "$out/use/$host/release/dps-bench"
