#!/usr/bin/env bash
# Soak: runs the fault workload (3 real nodes behind fault proxies; kill -9, pause, partitions,
# delays, flaky links; a linearizability check of every history; Raft invariants from the nodes'
# logs; replica digests compared) again and again with fresh seeds for MINUTES minutes, then
# prints the ops done, faults injected and violations found. Zero violations are expected; each
# one is listed with its seed, and its history and node logs are kept under target/tmp/.
#
# With MEMBERSHIP=1, every other round runs the membership fault test instead (tests/faults.rs:
# nodes join, leave, rejoin under new ids and the leader is removed, mixed with the same faults,
# under registers, a bank and acknowledged writes).
#
#   scripts/soak.sh 30            # 30 minutes, each round injecting faults for 60 s
#   FAULT_SECS=20 scripts/soak.sh 5
#   MEMBERSHIP=1 scripts/soak.sh 30
#   MEMBERSHIP=1 SPARE_IDS=0 scripts/soak.sh 30   # joined nodes outside the fault proxies
#                                                  # (the default gives 8 ids proxies up front)
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-30}
fault_secs=${FAULT_SECS:-60}
export WRAFT_SPARE_IDS=${SPARE_IDS:-8}
membership=${MEMBERSHIP:-0}
cargo build -p wraft --bin wraft -q && bash scripts/build-plugins.sh >/dev/null || exit 1
cargo build -p wraft-tests --tests -q || exit 1
end=$(( $(date +%s) + minutes * 60 ))
rounds=0; ops=0; faults=0; violations=0; failed_seeds=()
log=$(mktemp)
while [ "$(date +%s)" -lt "$end" ]; do
  seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
  rounds=$((rounds + 1))
  test=(--test linearizability register_linearizable_under_faults)
  if [ "$membership" = 1 ] && [ $((rounds % 2)) -eq 0 ]; then
    test=(--test faults membership_changes_under_faults)
  fi
  if WRAFT_SEED=$seed WRAFT_FAULT_SECS=$fault_secs WRAFT_REQUIRE_PLUGINS=1 \
      cargo test -q -p wraft-tests "${test[@]}" -- --nocapture >"$log" 2>&1; then
    result=ok
  else
    result=VIOLATION
    violations=$((violations + 1))
    failed_seeds+=("$seed")
    cp "$log" "target/tmp/soak-seed$seed.log" 2>/dev/null || true
  fi
  line=$(grep -m1 '^summary:' "$log" || true)
  n_ops=$(sed -n 's/^summary: \([0-9]*\) workload ops.*/\1/p' <<<"$line"); n_ops=${n_ops:-0}
  n_faults=$(sed -n 's/.* \([0-9]*\) faults injected.*/\1/p' <<<"$line"); n_faults=${n_faults:-0}
  ops=$((ops + n_ops)); faults=$((faults + n_faults))
  echo "round $rounds seed $seed (${test[1]}): $result, $n_ops ops, $n_faults faults (totals: $ops ops, $faults faults, $violations violations)"
done
rm -f "$log"
echo "soak: ${minutes} min, $rounds rounds, $ops ops, $faults faults injected, $violations violations"
[ "$violations" -eq 0 ] || { echo "failed seeds: ${failed_seeds[*]} (logs in target/tmp/)"; exit 1; }
