#!/usr/bin/env bash
# Installs the system packages the build and the tests use, when missing (Debian): Node.js and
# npm and Python's venv for the interop tests, Mosquitto (the benchmark's peer), and for TPM
# attestation the TSS libraries (tss-esapi links them), swtpm (a software TPM) and tpm2-tools;
# strace (the durability test watches fsync against acknowledgements) and a C compiler (the
# fsync-failure test builds a small LD_PRELOAD library); Chromium (the web console's end-to-end
# test drives it headless); etcd (the shared store's tests run a cluster), protoc and the
# protobuf well-known types (etcd-client generates its gRPC code at build time); promtool, from Prometheus (checks the metrics exposition).
set -euo pipefail
missing=()
command -v node >/dev/null && command -v npm >/dev/null || missing+=(nodejs npm)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v mosquitto >/dev/null && command -v mosquitto_passwd >/dev/null || missing+=(mosquitto)
command -v swtpm >/dev/null || missing+=(swtpm swtpm-tools)
command -v tpm2_createprimary >/dev/null || missing+=(tpm2-tools)
command -v strace >/dev/null || missing+=(strace)
command -v cc >/dev/null || missing+=(gcc libc6-dev)
command -v chromium >/dev/null || missing+=(chromium)
command -v etcd >/dev/null || missing+=(etcd-server)
command -v protoc >/dev/null && [ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(protobuf-compiler libprotobuf-dev)
pkg-config --exists tss2-esys 2>/dev/null || missing+=(libtss2-dev pkg-config)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
# promtool only: without its recommends (the node exporter and the rest of a Prometheus setup).
if ! command -v promtool >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi
