#!/usr/bin/env bash
# Builds the example plugins (kv, counter, bank) as Wasm modules and prints where they are.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --target wasm32-unknown-unknown -p wraft-plugin-kv -p wraft-plugin-counter -p wraft-plugin-bank
out="${CARGO_TARGET_DIR:-target}/wasm32-unknown-unknown/release"
for name in kv counter bank; do
    echo "$out/$name.wasm"
done
