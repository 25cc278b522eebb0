#!/usr/bin/env bash
# wraft against etcd on this machine (issue 6), and two slow figures of wraft's own.
#
#   scripts/bench-compare.sh [compare]   3 etcd members and 3 wraft nodes on loopback (fsync on,
#                                        data in $DIR), 100 idle kv tenants beside the measured
#                                        one; ROUNDS rounds, each running every workload on
#                                        etcd and on wraft alternately (the order flips every
#                                        round), wraft both with unary calls (`wraft`) and with
#                                        a `Pipeline` stream per client (`wraft-pipe`, which
#                                        etcd's API has no counterpart of); prints medians; raw
#                                        JSON lines in $DIR/compare.jsonl
#   scripts/bench-compare.sh scan        wraft alone (no idle tenants): writes with 1, 16, 64 and
#                                        256 clients, reads with 256 clients at each consistency;
#                                        ROUNDS interleaved rounds
#   scripts/bench-compare.sh idle        two wraft clusters side by side, one with $IDLE idle kv
#                                        tenants beside the measured one, one without; ROUNDS
#                                        rounds alternating them (issue 6: no figure may get
#                                        worse by more than 5% with 100 idle tenants)
#   scripts/bench-compare.sh large       etcd and wraft each holding ~35 MB (80,000 puts of
#                                        1 KiB over 40,000 keys), then 256 clients' writes of
#                                        256-byte values over those keys; ROUNDS alternating
#                                        rounds (a state of megabytes costs checkpoints that a
#                                        small one does not show)
#   scripts/bench-compare.sh deploy      deploy time of a 1 MiB module (kv padded with a custom
#                                        section), fresh (compiled) and again (cached)
#   scripts/bench-compare.sh catchup     load ~1 GiB into kv tenants, add a 4th node with
#                                        `serve --join`, time until its applied index reaches
#                                        the leader's commit index (long: separate on purpose)
#
# Environment: ROUNDS (5), DURATION (8 s per run), IDLE (100 idle tenants), DIR (/tmp/wbench-cmp),
# API (unary; `pipeline` drives every wraft run through `Pipeline` streams),
# CATCHUP_MIB (1024), SKIP_BUILD=1 (use the binaries as they are). Needs: Debian's etcd-server (`etcd`), python3, and the builds below.
# The node is the dev profile (`cargo build -p wraft`), like every figure in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-compare}"
ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-8}"
IDLE="${IDLE:-100}"
DIR="${DIR:-/tmp/wbench-cmp}"
CATCHUP_MIB="${CATCHUP_MIB:-1024}"
target="${CARGO_TARGET_DIR:-target}"
wraft_built="$target/debug/wraft"
wraft="$DIR/wraft"
kv="$target/wasm32-unknown-unknown/release/kv.wasm"
etcd_bench="$target/etcd-bench/debug/etcd-bench"

# Ports apart from the demo (7001-), the older bench runs (7101-, 7401-) and each other.
W_PORTS=(7301 7302 7303)
E_CLIENT=(7311 7312 7313)
E_PEER=(7321 7322 7323)
W_E=127.0.0.1:7301,127.0.0.1:7302,127.0.0.1:7303
# The second wraft cluster of `idle` (no idle tenants).
B_PORTS=(7331 7332 7333)
B_E=127.0.0.1:7331,127.0.0.1:7332,127.0.0.1:7333
E_E=127.0.0.1:7311,127.0.0.1:7312,127.0.0.1:7313

pids=()
cleanup() {
  # SIGTERM first (clean stops), then whatever is left after 10 s.
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

# fresh_dir: a new $DIR with its own copy of the node binary, so that a rebuild during the run
# (this target directory is shared) cannot mix two builds in one measurement.
fresh_dir() {
  rm -rf "$DIR" && mkdir -p "$DIR"
  cp "$wraft_built" "$wraft"
  git log -1 --format='binary built from the working tree at HEAD %h (%cd)' >"$DIR/build.txt" 2>/dev/null || true
}

build() {
  [ "${SKIP_BUILD:-0}" = 1 ] && return 0
  cargo build -p wraft
  bash scripts/build-plugins.sh >/dev/null
  if [ "$mode" = compare ] || [ "$mode" = large ]; then
    command -v etcd >/dev/null || { echo "etcd not found: apt-get install etcd-server etcd-client"; exit 1; }
    CARGO_TARGET_DIR="$target/etcd-bench" cargo build --manifest-path scripts/etcd-bench/Cargo.toml
  fi
}

load1() { cut -d' ' -f1 /proc/loadavg; }

# start_wraft DIR PORT... : one node per port, every one with the same --peers; extra flags in
# $WRAFT_FLAGS.
start_wraft() {
  local dir=$1; shift
  local ports=("$@") peers="" i
  for i in "${!ports[@]}"; do peers+="${peers:+,}$((i + 1))=127.0.0.1:${ports[$i]}"; done
  for i in "${!ports[@]}"; do
    mkdir -p "$dir"
    # shellcheck disable=SC2086
    "$wraft" serve --id $((i + 1)) --listen "127.0.0.1:${ports[$i]}" --data-dir "$dir/w$((i + 1))" \
      --peers "$peers" --metrics-listen "127.0.0.1:$((ports[i] + 40))" ${WRAFT_FLAGS:-} \
      >"$dir/w$((i + 1)).log" 2>&1 &
    pids+=($!)
  done
}

# wait_wraft_leader ENDPOINTS: prints the leader's id.
wait_wraft_leader() {
  local leader=""
  for _ in $(seq 1 150); do
    leader=$({ "$wraft" status --endpoints "$1" --json 2>/dev/null || true; } |
      python3 -c 'import sys,json
for l in sys.stdin:
  l=l.strip()
  if not l: continue
  try: s=json.loads(l)
  except Exception: continue
  items = s if isinstance(s, list) else [s]
  for x in items:
    if str(x.get("role","")).lower()=="leader": print(x.get("id") or x.get("node_id")); sys.exit()' || true)
    [ -n "$leader" ] && { echo "$leader"; return 0; }
    sleep 0.2
  done
  echo "no wraft leader; see logs in $DIR" >&2
  return 1
}

# The first endpoint leads, on every cluster: a single client talks to the first endpoint, and
# which node leads decides how far its requests travel and how the load spreads, so a run
# where one cluster's first node leads and the other's does not compares placements, not
# systems. Done after loading, just before the measured runs.
wraft_lead_from_first() {
  [ "$(wait_wraft_leader "$1")" = 1 ] || "$wraft" leader transfer --endpoints "$1" --to 1 >/dev/null
}

etcd_lead_from_first() {
  local status member leader
  status=$(ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:${E_CLIENT[0]}" endpoint status -w json)
  member=$(python3 -c 'import sys,json; print(json.loads(sys.argv[1])[0]["Status"]["header"]["member_id"])' "$status")
  leader=$(python3 -c 'import sys,json; print(json.loads(sys.argv[1])[0]["Status"]["leader"])' "$status")
  [ "$member" = "$leader" ] ||
    ETCDCTL_API=3 etcdctl --endpoints "$E_E" move-leader "$(printf '%x' "$member")" >/dev/null
}

start_etcd() {
  local cluster="" i
  for i in 0 1 2; do cluster+="${cluster:+,}e$((i + 1))=http://127.0.0.1:${E_PEER[$i]}"; done
  for i in 0 1 2; do
    # etcd 3.4's defaults match wraft's timing: 100 ms heartbeat, 1 s election timeout; the WAL
    # is fsync'd on every commit (no --unsafe-no-fsync).
    etcd --name "e$((i + 1))" --data-dir "$DIR/e$((i + 1))" \
      --listen-client-urls "http://127.0.0.1:${E_CLIENT[$i]}" \
      --advertise-client-urls "http://127.0.0.1:${E_CLIENT[$i]}" \
      --listen-peer-urls "http://127.0.0.1:${E_PEER[$i]}" \
      --initial-advertise-peer-urls "http://127.0.0.1:${E_PEER[$i]}" \
      --initial-cluster "$cluster" --initial-cluster-token wraft-bench \
      --initial-cluster-state new --logger zap --log-level warn \
      >"$DIR/e$((i + 1)).log" 2>&1 &
    pids+=($!)
  done
  for _ in $(seq 1 150); do
    ETCDCTL_API=3 etcdctl --endpoints "$E_E" endpoint health >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "etcd did not become healthy; see $DIR/e*.log" >&2
  return 1
}

# run_one SYSTEM WORKLOAD ROUND: one measured run, appended to $DIR/compare.jsonl. One client
# runs on a one-thread generator (no thread wake-up of the generator's own inside the latency);
# 256 clients on one thread per core, as one thread can be the bottleneck of a fast system.
# etcd-bench is built like `wraft bench` (same runtime, same flags) so both pay the same.
run_one() {
  local system=$1 workload=$2 round=$3 load out cmd base=$1 extra=()
  load=$(load1)
  # wraft-pipe: the wraft cluster again, each client on a `Pipeline` stream of its own.
  if [ "$system" = wraft-pipe ]; then base=wraft; extra=(--api pipeline); fi
  # API=pipeline: every wraft system of the mode (e.g. both clusters of `idle`) on the pipeline.
  if [ "${API:-unary}" = pipeline ] && [ "$base" != etcd ]; then extra=(--api pipeline); fi
  case "$base/$workload" in
    etcd/put-c1) cmd=("$etcd_bench" --endpoints "$E_E" --clients 1 --threads 1) ;;
    etcd/put-c256) cmd=("$etcd_bench" --endpoints "$E_E" --clients 256) ;;
    etcd/get-linearizable-c256) cmd=("$etcd_bench" --endpoints "$E_E" --clients 256 --read-ratio 1 --consistency linearizable) ;;
    etcd/get-serializable-c256) cmd=("$etcd_bench" --endpoints "$E_E" --clients 256 --read-ratio 1 --consistency serializable) ;;
    wraft/put-c1) cmd=("$wraft" bench --endpoints "$W_E" --clients 1 --threads 1) ;;
    wraft/put-c16) cmd=("$wraft" bench --endpoints "$W_E" --clients 16) ;;
    wraft/put-c64) cmd=("$wraft" bench --endpoints "$W_E" --clients 64) ;;
    wraft/put-c256) cmd=("$wraft" bench --endpoints "$W_E" --clients 256) ;;
    wraft/get-linearizable-c256) cmd=("$wraft" bench --endpoints "$W_E" --clients 256 --read-ratio 1 --consistency linearizable) ;;
    wraft/get-lease-c256) cmd=("$wraft" bench --endpoints "$W_E" --clients 256 --read-ratio 1 --consistency lease) ;;
    wraft/get-stale-c256) cmd=("$wraft" bench --endpoints "$W_E" --clients 256 --read-ratio 1 --consistency stale) ;;
    wraft-bare/put-c1) cmd=("$wraft" bench --endpoints "$B_E" --clients 1 --threads 1) ;;
    wraft-bare/put-c256) cmd=("$wraft" bench --endpoints "$B_E" --clients 256) ;;
    wraft-bare/get-linearizable-c256) cmd=("$wraft" bench --endpoints "$B_E" --clients 256 --read-ratio 1 --consistency linearizable) ;;
    wraft-bare/get-lease-c256) cmd=("$wraft" bench --endpoints "$B_E" --clients 256 --read-ratio 1 --consistency lease) ;;
    wraft-bare/get-stale-c256) cmd=("$wraft" bench --endpoints "$B_E" --clients 256 --read-ratio 1 --consistency stale) ;;
    *) echo "unknown run $system/$workload" >&2; return 1 ;;
  esac
  cmd+=("${extra[@]}" --duration "$DURATION" --value-size 256 --keys "${KEYS:-1000}" --fsync-probe "$DIR" --json)
  out=$("${cmd[@]}") || true
  python3 - "$system" "$workload" "$round" "$load" "$out" >>"$DIR/compare.jsonl" <<'EOF'
import json, sys
system, workload, rnd, load, out = sys.argv[1:6]
try:
    r = json.loads(out)
except Exception:
    r = {"error": out[-500:]}
print(json.dumps({"system": system, "workload": workload, "round": int(rnd), "load1": float(load), "result": r}))
EOF
  python3 - "$system" "$workload" "$round" "$load" "$out" <<'EOF'
import json, sys
system, workload, rnd, load, out = sys.argv[1:6]
try:
    r = json.loads(out)
    t = r["reads"] if r["reads"]["ops"] else r["writes"]
    lat = t.get("latency_us") or {}
    errs = sum(v["count"] for v in t["errors"].values())
    print(f"round {rnd} {system:5} {workload:26} {r['ops_per_s']:9.0f} ops/s  p50 {lat.get('p50',0)/1000:7.2f} ms  p99 {lat.get('p99',0)/1000:7.2f} ms  errors {errs}  fsync {r['fsync_probe']['median_us']} us  load {load}")
except Exception as e:
    print(f"round {rnd} {system} {workload}: no result ({e}): {out[-300:]}")
EOF
}

summarize() {
  python3 - "$DIR/compare.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
order = ["put-c1", "put-c16", "put-c64", "put-c256", "get-linearizable-c256", "get-serializable-c256", "get-lease-c256", "get-stale-c256"]
print("| system | workload | ops/s median | ops/s (rounds) | p50 ms | p99 ms | errors | fsync median µs (rounds) | load (rounds) |")
print("| --- | --- | ---: | --- | ---: | ---: | ---: | --- | --- |")
for wl in order:
    for system in ["etcd", "wraft", "wraft-pipe", "wraft-bare"]:
        runs = [r for r in rows if r["system"] == system and r["workload"] == wl and "ops_per_s" in r["result"]]
        if not runs:
            continue
        runs.sort(key=lambda r: r["round"])
        ops = [r["result"]["ops_per_s"] for r in runs]
        med = statistics.median(ops)
        # Latency of the run with the median throughput (the lower middle one for an even count).
        mid = sorted(runs, key=lambda r: r["result"]["ops_per_s"])[(len(runs) - 1) // 2]
        t = mid["result"]["reads"] if mid["result"]["reads"]["ops"] else mid["result"]["writes"]
        lat = t.get("latency_us") or {}
        errors = sum(sum(v["count"] for v in (r["result"]["reads"]["errors"] | r["result"]["writes"]["errors"]).values()) for r in runs)
        fs = " / ".join(str(r["result"]["fsync_probe"]["median_us"]) for r in runs)
        ld = " / ".join(f'{r["load1"]:.2f}' for r in runs)
        print(f"| {system} | {wl} | {med:,.0f} | {' / '.join(f'{o:,.0f}' for o in ops)} | {lat.get('p50', 0)/1000:.2f} | {lat.get('p99', 0)/1000:.2f} | {errors} | {fs} | {ld} |")
EOF
}

# start_both IDLE OPS CLIENTS KEYS VALUE_SIZE: etcd, and wraft with kv as tenant bench beside
# IDLE idle kv tenants; each loaded with OPS puts of VALUE_SIZE bytes over KEYS keys by CLIENTS
# clients; leaders on the first endpoints; an empty compare.jsonl.
start_both() {
  local idle=$1 ops=$2 clients=$3 keys=$4 size=$5
  start_etcd
  start_wraft "$DIR" "${W_PORTS[@]}"
  wait_wraft_leader "$W_E" >/dev/null
  echo "== deploying kv as tenant bench and $idle idle tenants"
  "$wraft" deploy --endpoints "$W_E" --tenant bench "$kv" >/dev/null
  for i in $(seq 1 "$idle"); do "$wraft" deploy --endpoints "$W_E" --tenant "idle$i" "$kv" >/dev/null; done
  echo "== loading the key space ($ops puts of $size bytes over $keys keys on each system)"
  "$etcd_bench" --endpoints "$E_E" --ops "$ops" --clients "$clients" --keys "$keys" --value-size "$size" --json >/dev/null
  "$wraft" bench --endpoints "$W_E" --ops "$ops" --clients "$clients" --keys "$keys" --value-size "$size" --json >/dev/null
  etcd_lead_from_first
  wraft_lead_from_first "$W_E"
  : >"$DIR/compare.jsonl"
  echo "== $ROUNDS rounds of ${DURATION}s runs (load average at start: $(cat /proc/loadavg))"
}

compare() {
  fresh_dir
  start_both "$IDLE" 20000 64 1000 256
  local workloads=(put-c1 put-c256 get-linearizable-c256 get-serializable-c256 get-lease-c256 get-stale-c256)
  for round in $(seq 1 "$ROUNDS"); do
    for wl in "${workloads[@]}"; do
      local systems=(etcd wraft wraft-pipe)
      [ $((round % 2)) -eq 0 ] && systems=(wraft-pipe wraft etcd)
      for system in "${systems[@]}"; do
        case "$system/$wl" in
          etcd/get-lease-c256 | etcd/get-stale-c256 | wraft*/get-serializable-c256) continue ;;
        esac
        run_one "$system" "$wl" "$round"
      done
    done
  done
  echo "== medians of $ROUNDS alternating runs (raw: $DIR/compare.jsonl)"
  summarize
  echo "== lease reads on each wraft node (wraft_lease_reads_total): served / fell back to ReadIndex"
  for port in "${W_PORTS[@]}"; do
    python3 - "$((port + 40))" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
count = {"served": 0, "fallback": 0}
for line in text.splitlines():
    for k in count:
        if line.startswith(f'wraft_lease_reads_total{{result="{k}"}} '):
            count[k] = int(float(line.split()[-1]))
print(f"metrics port {sys.argv[1]}: served {count['served']}, fallback {count['fallback']}")
EOF
  done
}

# scan: every client count on one cluster without idle tenants.
scan() {
  fresh_dir
  start_wraft "$DIR" "${W_PORTS[@]}"
  wait_wraft_leader "$W_E" >/dev/null
  "$wraft" deploy --endpoints "$W_E" --tenant bench "$kv" >/dev/null
  "$wraft" bench --endpoints "$W_E" --ops 20000 --clients 64 --keys 1000 --value-size 256 --json >/dev/null
  wraft_lead_from_first "$W_E"
  : >"$DIR/compare.jsonl"
  echo "== $ROUNDS rounds of ${DURATION}s runs (load average at start: $(cat /proc/loadavg))"
  local workloads=(put-c1 put-c16 put-c64 put-c256 get-linearizable-c256 get-lease-c256 get-stale-c256)
  for round in $(seq 1 "$ROUNDS"); do
    for wl in "${workloads[@]}"; do run_one wraft "$wl" "$round"; done
  done
  echo "== medians of $ROUNDS rounds (raw: $DIR/compare.jsonl)"
  summarize
}

# large: 256 clients' writes on etcd and wraft, each holding ~35 MB.
large() {
  fresh_dir
  # About 35 MB each: 80,000 puts of 1 KiB over 40,000 keys reach 86% of them.
  start_both 0 80000 256 40000 1024
  for round in $(seq 1 "$ROUNDS"); do
    local systems=(etcd wraft)
    [ $((round % 2)) -eq 0 ] && systems=(wraft etcd)
    for system in "${systems[@]}"; do KEYS=40000 run_one "$system" put-c256 "$round"; done
  done
  echo "== medians of $ROUNDS alternating runs (raw: $DIR/compare.jsonl)"
  summarize
}

# idle: the same workloads on a cluster with $IDLE idle tenants ("wraft") and on one without
# ("wraft-bare"), alternately; both run all the time, so both share the machine equally.
idle() {
  fresh_dir
  start_wraft "$DIR" "${W_PORTS[@]}"
  start_wraft "$DIR/bare" "${B_PORTS[@]}"
  wait_wraft_leader "$W_E" >/dev/null
  wait_wraft_leader "$B_E" >/dev/null
  echo "== deploying kv as tenant bench on both clusters, and $IDLE idle tenants on the first"
  "$wraft" deploy --endpoints "$W_E" --tenant bench "$kv" >/dev/null
  "$wraft" deploy --endpoints "$B_E" --tenant bench "$kv" >/dev/null
  for i in $(seq 1 "$IDLE"); do "$wraft" deploy --endpoints "$W_E" --tenant "idle$i" "$kv" >/dev/null; done
  for e in "$W_E" "$B_E"; do
    "$wraft" bench --endpoints "$e" --ops 20000 --clients 64 --keys 1000 --value-size 256 --json >/dev/null
    wraft_lead_from_first "$e"
  done
  : >"$DIR/compare.jsonl"
  echo "== $ROUNDS rounds of ${DURATION}s runs (load average at start: $(cat /proc/loadavg))"
  local workloads=(put-c1 put-c256 get-linearizable-c256 get-lease-c256 get-stale-c256)
  for round in $(seq 1 "$ROUNDS"); do
    for wl in "${workloads[@]}"; do
      local systems=(wraft-bare wraft)
      [ $((round % 2)) -eq 0 ] && systems=(wraft wraft-bare)
      for system in "${systems[@]}"; do run_one "$system" "$wl" "$round"; done
    done
  done
  echo "== medians of $ROUNDS alternating runs; wraft: $IDLE idle tenants, wraft-bare: none (raw: $DIR/compare.jsonl)"
  summarize
}

# now_ms: wall clock in milliseconds.
now_ms() { date +%s%3N; }

deploy() {
  fresh_dir
  start_wraft "$DIR" "${W_PORTS[@]}"
  wait_wraft_leader "$W_E" >/dev/null
  for i in $(seq 1 "$IDLE"); do "$wraft" deploy --endpoints "$W_E" --tenant "idle$i" "$kv" >/dev/null; done
  echo "== deploy time of a 1 MiB module (kv.wasm, $(stat -c %s "$kv") bytes, padded with a custom section)"
  local i t0 t1 f
  for i in 1 2 3 4 5; do
    f="$DIR/kv-1mib-$i.wasm"
    # A different padding each time: a different module hash, so every deploy compiles.
    python3 - "$kv" "$f" <<'EOF'
import os, sys
src, dst = sys.argv[1], sys.argv[2]
wasm = open(src, "rb").read()
target = 1 << 20
def leb(n):
    out = bytearray()
    while True:
        b = n & 0x7f; n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n: return bytes(out)
name = b"wraft-bench-padding"
# section = 0x00, leb(size), leb(len(name)), name, payload; solve for the payload length.
for payload in range(target - len(wasm) - 64, target - len(wasm)):
    body = leb(len(name)) + name + bytes(payload)
    if len(wasm) + 1 + len(leb(len(body))) + len(body) == target:
        break
else:
    sys.exit("cannot pad to 1 MiB")
body = leb(len(name)) + name + os.urandom(payload)
open(dst, "wb").write(wasm + b"\x00" + leb(len(body)) + body)
EOF
    t0=$(now_ms)
    "$wraft" deploy --endpoints "$W_E" --tenant "big$i" "$f" >/dev/null
    t1=$(now_ms)
    echo "fresh   big$i  $(stat -c %s "$f") bytes  $((t1 - t0)) ms  load $(load1)"
  done
  for i in 1 2 3 4 5; do
    t0=$(now_ms)
    "$wraft" deploy --endpoints "$W_E" --tenant "again$i" "$DIR/kv-1mib-1.wasm" >/dev/null
    t1=$(now_ms)
    echo "cached  again$i  $((t1 - t0)) ms  load $(load1)"
  done
  for i in 1 2 3 4 5; do
    t0=$(now_ms)
    "$wraft" deploy --endpoints "$W_E" --tenant "small$i" "$kv" >/dev/null
    t1=$(now_ms)
    echo "kv.wasm small$i  $((t1 - t0)) ms (cached)  load $(load1)"
  done
  t0=$(now_ms)
  "$wraft" status --endpoints "$W_E" >/dev/null
  t1=$(now_ms)
  echo "baseline: one 'wraft status' CLI call takes $((t1 - t0)) ms (process start, connect)"
}

# status_field ENDPOINT FIELD: one number from `wraft status --json` of that node.
status_field() {
  { "$wraft" status --endpoints "$1" --json 2>/dev/null || true; } | python3 -c 'import sys, json
f = sys.argv[1]
for l in sys.stdin:
    l = l.strip()
    if not l: continue
    try: s = json.loads(l)
    except Exception: continue
    for x in (s if isinstance(s, list) else [s]):
        print(x.get(f, 0)); sys.exit()
print(0)' "$2"
}

catchup() {
  fresh_dir
  start_wraft "$DIR" "${W_PORTS[@]}"
  local leader
  leader=$(wait_wraft_leader "$W_E")
  local L="127.0.0.1:${W_PORTS[$((leader - 1))]}"
  # 32 tenants of 32 MiB (64 values of 512 KiB each): a tenant's linear memory is capped at
  # 256 MiB, and a snapshot needs a copy of the state beside it.
  local tenants=$((CATCHUP_MIB / 32)) per=64 value=$((512 * 1024)) t t0 t1
  echo "== loading $((tenants * per * value / 1048576)) MiB: $tenants tenants x $per values of $value bytes"
  t0=$(now_ms)
  for t in $(seq 1 "$tenants"); do
    "$wraft" bench --endpoints "$L" --tenant "big$t" --deploy "$kv" --ops "$per" --keys "$per" \
      --sequential-keys --value-size "$value" --clients 4 --timeout 60 --json >"$DIR/load-$t.json"
  done
  t1=$(now_ms)
  echo "loaded in $(((t1 - t0) / 1000)) s; leader commit $(status_field "$L" commit_index); data dirs: $(du -sh "$DIR"/w1 | cut -f1) per node; load $(load1)"
  "$wraft" tenants --endpoints "$L" | tail -n 3
  echo "== node 4 joins (serve --join), timing until its applied index reaches the leader's commit"
  t0=$(now_ms)
  "$wraft" serve --id 4 --listen 127.0.0.1:7304 --data-dir "$DIR/w4" --join "$W_E" >"$DIR/w4.log" 2>&1 &
  pids+=($!)
  local target_commit applied=0 last_report=0 now
  target_commit=$(status_field "$L" commit_index)
  while :; do
    now=$(now_ms)
    applied=$(status_field 127.0.0.1:7304 applied_index)
    if [ "${applied:-0}" -ge "$target_commit" ] && [ "$target_commit" -gt 0 ]; then break; fi
    if [ $((now - last_report)) -ge 10000 ]; then
      echo "  $(((now - t0) / 1000)) s: node 4 applied ${applied:-?} of $target_commit; snapshot bytes received $(status_field 127.0.0.1:7304 snapshot_bytes_received)"
      last_report=$now
    fi
    [ $((now - t0)) -gt 1800000 ] && { echo "node 4 did not catch up within 30 minutes"; return 1; }
    sleep 0.5
  done
  t1=$(now_ms)
  echo "node 4 caught up: applied $applied >= leader commit $target_commit (as of the join) in $(((t1 - t0))) ms; load $(load1)"
  echo "node 4 data dir: $(du -sh "$DIR"/w4 | cut -f1)"
  grep -E "installed a snapshot|snapshot" "$DIR/w4.log" | tail -n 5 || true
}

build
case "$mode" in
  compare) compare ;;
  idle) idle ;;
  scan) scan ;;
  deploy) deploy ;;
  catchup) catchup ;;
  large) large ;;
  *) echo "usage: $0 [compare|scan|idle|large|deploy|catchup]" >&2; exit 2 ;;
esac
