#!/usr/bin/env bash
# The test command: builds the node, the example plugins and runs every test (unit tests and
# the multi-process cluster tests in tests/). Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo fmt --all -- --check
cargo build --workspace --all-targets
bash scripts/build-plugins.sh
# Tests that load the built plugins fail (rather than skip) when they are missing.
export WRAFT_REQUIRE_PLUGINS=1

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  # nextest does not run doctests; the SDK's crate doc is the plugin author's first example.
  cargo test --doc -p wraft-guest-sdk
else
  cargo test --workspace --no-fail-fast
fi
