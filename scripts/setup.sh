#!/usr/bin/env bash
# Prepares a fresh Debian machine with a Rust toolchain to build wraft: the clang library that
# RocksDB's bindings need, and the wasm32 target for plugins. protoc comes vendored (a crate).
set -euo pipefail

need_apt=()
# libclang itself (`libclang.so`, `libclang-N.so`), not `libclang-cpp`, which some images ship alone.
if ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 \
  && ! ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9.]+)?\.so'; then
  need_apt+=(libclang-dev)
fi
command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: installing ${need_apt[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! rustup target list --installed | grep -q '^wasm32-unknown-unknown$'; then
  echo "setup: adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown
fi
echo "setup: ok"
