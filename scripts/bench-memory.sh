#!/usr/bin/env bash
# Memory figures for BENCHMARKS.md: a node's peak RSS under a 256-client write load, and what
# 1,000 idle kv tenants add per node (and how long deploying them takes). Builds nothing: run
# `cargo build -p wraft && scripts/build-plugins.sh` first. Uses ports 7401-7403.
set -u
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-target}"
W=$T/debug/wraft
KV=$T/wasm32-unknown-unknown/release/kv.wasm
D=$(mktemp -d)
P=1=127.0.0.1:7401,2=127.0.0.1:7402,3=127.0.0.1:7403
E=127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403
for i in 1 2 3; do $W serve --id $i --listen 127.0.0.1:740$i --data-dir $D/n$i --peers $P >$D/n$i.log 2>&1 & echo $! > $D/n$i.pid; done
for _ in $(seq 1 100); do $W status --endpoints $E --json 2>/dev/null | grep -q '"role":"leader"' && break; sleep 0.1; done
rss() { for i in 1 2 3; do grep -E "^$1" /proc/$(cat $D/n$i.pid)/status | awk '{print $2}'; done | paste -sd' '; }
echo "idle RSS kB (n1 n2 n3): $(rss VmRSS)"
$W bench --endpoints $E --deploy $KV --duration 10 --clients 256 --json | python3 -c 'import json,sys; r=json.load(sys.stdin)["writes"]; print("256-client writes:", round(r["ops_per_s"]), "ops/s, p99", r["latency_us"]["p99"]/1000, "ms")'
echo "peak RSS kB after 256-client writes (VmHWM n1 n2 n3): $(rss VmHWM)"
before=$(rss VmRSS); echo "RSS kB before 1000 tenants: $before"
start=$(date +%s.%N)
for t in $(seq 1 1000); do $W deploy --endpoints $E --tenant idle$t $KV >/dev/null || echo "deploy $t failed"; done
end=$(date +%s.%N)
echo "1000 deploys took $(python3 -c "print(round($end-$start,1))") s"
sleep 2
after=$(rss VmRSS); echo "RSS kB after 1000 idle tenants: $after"
python3 -c "
b=[int(x) for x in '$before'.split()]; a=[int(x) for x in '$after'.split()]
print('per node added MiB:', [round((y-x)/1024,1) for x,y in zip(b,a)], 'per tenant KiB:', [round((y-x)/1000,1) for x,y in zip(b,a)])"
$W tenants --endpoints 127.0.0.1:7401 | tail -2
for i in 1 2 3; do kill $(cat $D/n$i.pid); done; wait
rm -rf "$D"
