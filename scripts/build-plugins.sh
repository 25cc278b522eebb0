#!/usr/bin/env bash
# Builds the example plugins (kv, counter, bank, kv2, kvstore) and the SDK guide's examples
# (hello, hello2: guest-sdk/examples/guide) as Wasm modules and prints where they are.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --target wasm32-unknown-unknown -p wraft-plugin-kv -p wraft-plugin-counter -p wraft-plugin-bank -p wraft-plugin-kv2 -p wraft-plugin-kvstore
cargo build --release --target wasm32-unknown-unknown -p wraft-guest-sdk --example hello --example hello2
out="${CARGO_TARGET_DIR:-target}/wasm32-unknown-unknown/release"
for name in kv counter bank kv2 kvstore; do
    echo "$out/$name.wasm"
done
for name in hello hello2; do
    echo "$out/examples/$name.wasm"
done
