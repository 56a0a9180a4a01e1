#!/bin/bash
# scripts/bench-nodes.sh NODES DEVICES: one etcd member (ports 23790/23800), NODES gateway nodes
# (1 shard each, on 127.0.0.N) sharing it, and one closed-loop loadgen per node (64 in flight,
# MQTT, a new TLS connection per device). Prints the total rate, the CPU per registration of the
# gateways and of etcd, and etcd's requests per registration. Needs the release build
# (cargo build --release -p dps-gateway -p dps-loadgen), etcd, curl and bc. tuning.md has runs.
set -e
nodes=$1; devices=$2
cd "$(dirname "$0")/.."
W=$(mktemp -d /tmp/nodes.XXXX)
etcd --name b --data-dir $W/etcd --listen-client-urls http://127.0.0.1:23790 --advertise-client-urls http://127.0.0.1:23790 \
  --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
  --initial-cluster b=http://127.0.0.1:23800 > $W/etcd.log 2>&1 &
epid=$!
sleep 2
printf '[store]\nkind = "etcd"\netcd_endpoints = ["http://127.0.0.1:23790"]\netcd_root = "/bench"\n[[linked_hubs]]\nhost_name = "hub-a.example"\nconnection_string = "HostName=hub-a.example;SharedAccessKeyName=iothubowner;SharedAccessKey=aHViLWtleQ=="\n' > $W/cfg.toml
pids=()
for n in $(seq 1 $nodes); do
  mkdir -p $W/n$n
  [ $n -gt 1 ] && cp $W/n1/data.key $W/n$n/data.key
  env DPS_PORTS__BIND=127.0.0.$n DPS_PORTS__ADMIN=0 DPS_PORTS__CONSOLE=0 DPS_LOG=warn \
    DPS_LIMITS__SERVICE_OPERATIONS_PER_MINUTE=0 DPS_LIMITS__HUB_LATENCY_REFRESH_SECS=0 DPS_LIMITS__POLLS_PER_DEVICE=0 \
    target/release/dps serve --data-dir $W/n$n --config $W/cfg.toml --https-port 0 --mqtt-port 0 --amqp-port 0 --shards 1 > $W/n$n.log 2>&1 &
  pids+=($!)
  for i in $(seq 100); do [ -f $W/n$n/endpoint.json ] && break; sleep 0.1; done
done
target/release/loadgen --endpoint $W/n1/endpoint.json --devices 200 --concurrency 16 --connect 127.0.0.1 --prefix warm > /dev/null 2>&1
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
rpcs() { curl -s http://127.0.0.1:23790/metrics | awk '/^grpc_server_handled_total/ {s+=$2} END {printf "%d", s}'; }
txns() { curl -s http://127.0.0.1:23790/metrics | awk '/^grpc_server_handled_total.*grpc_method="Txn"/ {s+=$2} END {printf "%d", s}'; }
r0=$(rpcs); t0=$(txns)
g0=0; for p in ${pids[@]}; do g0=$((g0 + $(cpu $p))); done; e0=$(cpu $epid)
start=$(date +%s.%N)
lpids=()
per=$((devices / nodes))
for n in $(seq 1 $nodes); do
  target/release/loadgen --endpoint $W/n$n/endpoint.json --devices $per --concurrency 64 --threads 1 --connect 127.0.0.$n --prefix run$n > $W/lg$n.out 2>&1 &
  lpids+=($!)
done
for p in ${lpids[@]}; do wait $p; done
end=$(date +%s.%N)
g1=0; for p in ${pids[@]}; do g1=$((g1 + $(cpu $p))); done; e1=$(cpu $epid)
r1=$(rpcs); t1=$(txns)
for p in ${pids[@]}; do kill -TERM $p; done; wait ${pids[@]} 2>/dev/null || true
kill $epid; wait $epid 2>/dev/null || true
ok=0; for n in $(seq 1 $nodes); do a=$(grep -E "^\| mqtt" $W/lg$n.out | head -1 | awk -F'|' '{gsub(/ /,"",$9); print $9}'); ok=$((ok + ${a:-0})); done
secs=$(echo "$end - $start" | bc)
echo "nodes=$nodes devices=$devices assigned=$ok seconds=$secs rate=$(echo "$ok / $secs" | bc) gateway_cpu_us_per_reg=$(( (g1-g0)*10000/devices )) etcd_cpu_us_per_reg=$(( (e1-e0)*10000/devices )) etcd_rpcs_per_reg=$(echo "scale=2; ($r1-$r0)/$devices" | bc) etcd_txns_per_reg=$(echo "scale=2; ($t1-$t0)/$devices" | bc)"
grep -hE "^\| mqtt" $W/lg*.out | head -2
rm -rf $W
