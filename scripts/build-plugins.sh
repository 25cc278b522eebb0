#!/usr/bin/env bash
# Builds the example plugins (kv, counter, bank, kv2) as Wasm modules and prints where they are.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --target wasm32-unknown-unknown -p wraft-plugin-kv -p wraft-plugin-counter -p wraft-plugin-bank -p wraft-plugin-kv2
out="${CARGO_TARGET_DIR:-target}/wasm32-unknown-unknown/release"
for name in kv counter bank kv2; do
    echo "$out/$name.wasm"
done
