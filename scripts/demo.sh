#!/usr/bin/env bash
# The main job: set up this machine, build wraft, start a local 3-node cluster, deploy the kv
# plugin and run a few commands against it. The cluster lives in ./cluster (logs and data).
# KEEP=1 leaves the nodes running afterwards; `scripts/demo.sh stop` stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=cluster
target="${CARGO_TARGET_DIR:-target}"
wraft="$target/debug/wraft"
E=127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003
peers=1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003

stop() {
  local pids=()
  for i in 1 2 3; do
    if [ -f "$dir/n$i.pid" ]; then
      pid=$(cat "$dir/n$i.pid")
      kill "$pid" 2>/dev/null && pids+=("$pid")
      rm -f "$dir/n$i.pid"
    fi
  done
  # SIGTERM is a clean stop (leadership handover, checkpoint, flush): wait for it, bounded.
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}
if [ "${1:-}" = stop ]; then stop; exit 0; fi

bash scripts/setup.sh
echo "== building wraft and the plugins (the first build takes a while: RocksDB and wasmtime)"
cargo build -p wraft
bash scripts/build-plugins.sh >/dev/null
kv="$target/wasm32-unknown-unknown/release/kv.wasm"

stop
# A demo starts from scratch: data left by an earlier run (perhaps of another build) goes.
rm -rf "$dir"/n1 "$dir"/n2 "$dir"/n3
mkdir -p "$dir"
echo "== starting 3 nodes (logs in $dir/n*.log)"
for i in 1 2 3; do
  "$wraft" serve --id "$i" --listen "127.0.0.1:700$i" --data-dir "$dir/n$i" --peers "$peers" \
    >"$dir/n$i.log" 2>&1 &
  echo $! >"$dir/n$i.pid"
done
[ "${KEEP:-0}" = 1 ] || trap stop EXIT

echo "== waiting for a leader"
leader=0
for _ in $(seq 1 150); do
  leader=$("$wraft" status --endpoints $E --json 2>/dev/null | sed -n 's/.*"role":"leader".*/&/p' | sed -n 's/.*"id":\([0-9]*\).*/\1/p' | head -n1 || true)
  [ -n "$leader" ] && break
  sleep 0.2
done
[ -n "$leader" ] || { echo "no leader elected; see $dir/n*.log"; exit 1; }
follower=$(( leader % 3 + 1 ))
echo "leader is node $leader; talking to node $follower, a follower, which forwards to it"
F=127.0.0.1:700$follower

run() { echo "\$ wraft $*"; "$wraft" "$@"; }
run deploy --endpoints $F --tenant demo "$kv"
run exec --endpoints $F --tenant demo '{"op":"put","key":"greeting","value":"hello"}'
run exec --endpoints $F --tenant demo '{"op":"put","key":"greeting","value":"hello, wraft"}'
run exec --endpoints $F --tenant demo '{"op":"cas","key":"color","expect":null,"value":"blue"}'
run exec --endpoints $F --tenant demo --client-id demo-client --seq 1 '{"op":"put","key":"once","value":"1"}'
run exec --endpoints $F --tenant demo --client-id demo-client --seq 1 '{"op":"put","key":"once","value":"1"}'
echo "\$ printf '<three puts>' | wraft exec --tenant demo --stdin   (many commands on one stream)"
printf '%s\n' '{"op":"put","key":"fruit/1","value":"apple"}' '{"op":"put","key":"fruit/2","value":"pear"}' \
  '{"op":"put","key":"fruit/1","value":"quince"}' | "$wraft" exec --endpoints $F --tenant demo --stdin --in-flight 1
run query --endpoints $F --tenant demo '{"op":"get","key":"greeting"}'
run query --endpoints $F --tenant demo --consistency stale '{"op":"scan","prefix":""}'
echo "\$ wraft exec --tenant demo 'not json'   (the module's own error: exit 3)"
"$wraft" exec --endpoints $F --tenant demo 'not json' || echo "exit code $?"
run status --endpoints $E
run digest --endpoints $E --tenant demo
if [ "${KEEP:-0}" = 1 ]; then
  echo "== the cluster keeps running; stop it with: scripts/demo.sh stop"
else
  echo "== stopping the cluster (KEEP=1 keeps it running)"
fi
