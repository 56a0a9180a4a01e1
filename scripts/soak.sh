#!/usr/bin/env bash
# Soak: the release gateway under a steady open-loop load for a long time, sampling what must
# stay flat (resident memory, file descriptors, threads, store write queue, cross-shard queue,
# open connections, store size on disk) once a minute.
#
#   scripts/soak.sh RATE MINUTES [OUT.csv]
#
# The same RATE*60 group devices re-register every minute (new TLS connection each, MQTT),
# so the store holds a fixed fleet: it should stay flat too, once compaction keeps up.
# Prints a summary (first, last and highest sample of each column) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:?rate per second}
minutes=${2:?minutes}
out=${3:-soak.csv}
dps=target/release/dps
loadgen=target/release/loadgen
[ -x "$dps" ] && [ -x "$loadgen" ] || cargo build --release -p dps-gateway -p dps-loadgen
data=$(mktemp -d)
log="$data/dps.log"
cat >"$data/dps.toml" <<'TOML'
[[linked_hubs]]
host_name = "soak-hub.example"
connection_string = "HostName=soak-hub.example;SharedAccessKeyName=iothubowner;SharedAccessKey=c29hay1rZXktc29hay1rZXktc29hay1rZXktc29haw=="
TOML
DPS_PORTS__BIND=127.0.0.1 DPS_PORTS__ADMIN=0 DPS_PORTS__CONSOLE=0 DPS_LOG=warn \
  "$dps" serve --data-dir "$data/dps" --config "$data/dps.toml" --mqtt-port 0 --amqp-port 0 --https-port 0 >"$log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT
for _ in $(seq 100); do [ -s "$data/dps/endpoint.json" ] && break; sleep 0.2; done
admin=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ports"]["admin"])' "$data/dps/endpoint.json")

metric() { # sum of a metric's series
  curl -s "http://127.0.0.1:$admin/metrics" | awk -v m="$1" '$1 ~ "^"m"({|$)" { s += $2 } END { print s + 0 }'
}
sample() {
  local rss fds threads store
  rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")
  fds=$(ls "/proc/$pid/fd" | wc -l)
  threads=$(awk '/^Threads/ { print $2 }' "/proc/$pid/status")
  store=$(du -sk "$data/dps/store" | cut -f1)
  echo "$1,$rss,$fds,$threads,$(metric dps_store_write_queue_depth),$(metric dps_cross_shard_pending),$(metric dps_connections_open),$store,$(metric dps_device_assignments_total)"
}

echo "minute,rss_kib,fds,threads,store_write_queue,cross_shard_pending,connections_open,store_kib,assignments" >"$out"
sample 0 >>"$out"
for m in $(seq "$minutes"); do
  "$loadgen" --endpoint "$data/dps/endpoint.json" --rate "$rate" --devices $((rate * 60)) \
    --concurrency 512 --prefix soak --progress 0 --json >"$data/loadgen-$m.txt" 2>&1 || true
  grep -E '^\{' "$data/loadgen-$m.txt" | tail -1 | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    lat = r.get('latency_ms', {})
    print(f\"minute $m: {r.get('sessions_per_s', 0):.0f}/s ok {r.get('ok')} errors {r.get('errors')} p50 {lat.get('p50')} ms p99 {lat.get('p99')} ms\", file=sys.stderr)
" || true
  sample "$m" >>"$out"
done
python3 - "$out" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"{'column':22} {'first':>10} {'after 5 min':>12} {'last':>10} {'highest':>10}")
for col in rows[0]:
    if col == "minute":
        continue
    v = [float(r[col]) for r in rows]
    five = v[min(5, len(v) - 1)]
    print(f"{col:22} {v[0]:>10.0f} {five:>12.0f} {v[-1]:>10.0f} {max(v):>10.0f}")
PY
