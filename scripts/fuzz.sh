#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/: one, or all of them one after the other.
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]     (defaults: all, 60 seconds per target)
#   scripts/fuzz.sh list                        (the targets)
#
# Installs cargo-fuzz if it is missing; needs a nightly toolchain (`rustup toolchain install
# nightly`). Builds without a sanitizer (every crate under test is safe Rust; panics and
# failed assertions are what the targets look for) and with the release profile of
# fuzz/Cargo.toml, which keeps overflow checks and debug assertions on in wraft's own crates.
# The corpus grows in fuzz/corpus/TARGET, crashes land in fuzz/artifacts/TARGET (both
# gitignored), and libFuzzer's last status line (executions, coverage) is printed per target.
# Reproduce a crash with: cargo +nightly fuzz run -O -s none TARGET fuzz/artifacts/TARGET/crash-...
# Extra libFuzzer flags can be given in FUZZ_FLAGS (e.g. FUZZ_FLAGS="-jobs=2 -workers=2").
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(module_validation guest_abi client_request snapshot_chunks)
target="${1:-all}"
seconds="${2:-60}"

if [[ "$target" == list ]]; then
    printf '%s\n' "${targets[@]}"
    exit 0
fi
if [[ "$target" == all ]]; then
    run=("${targets[@]}")
else
    if [[ ! " ${targets[*]} " == *" $target "* ]]; then
        echo "unknown target '$target'; one of: ${targets[*]} (or all)" >&2
        exit 2
    fi
    run=("$target")
fi
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
    echo "SECONDS must be a number, got '$seconds'" >&2
    exit 2
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "cargo-fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

build=(-O -s none --target-dir fuzz/target)
mkdir -p fuzz/artifacts
# One build for every target asked for (cargo fuzz builds them all when given none).
one=()
[[ "$target" != all ]] && one=("$target")
if ! cargo +nightly fuzz build "${build[@]}" "${one[@]}" >fuzz/artifacts/build.log 2>&1; then
    tail -n 30 fuzz/artifacts/build.log >&2
    exit 1
fi
status=0
for t in "${run[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    corpora=("fuzz/corpus/$t")
    [[ -d "fuzz/seeds/$t" ]] && corpora+=("fuzz/seeds/$t")
    flags=(-max_total_time="$seconds" -print_final_stats=1)
    [[ -f "fuzz/dicts/$t.dict" ]] && flags+=(-dict="fuzz/dicts/$t.dict")
    # Compiling a module dominates module_validation: keep inputs near the size of real ABI
    # modules' interesting parts rather than libFuzzer's default growth.
    [[ "$t" == module_validation ]] && flags+=(-max_len=8192)
    log="fuzz/artifacts/$t/last-run.log"
    echo "== $t for ${seconds}s (log: $log)"
    # shellcheck disable=SC2086 # FUZZ_FLAGS is a list of flags.
    if cargo +nightly fuzz run "${build[@]}" "$t" "${corpora[@]}" -- "${flags[@]}" ${FUZZ_FLAGS:-} \
        >"$log" 2>&1; then
        grep -E '^#[0-9]+[[:space:]]+(DONE|pulse)' "$log" | tail -n 1 || true
        grep -E '^stat::number_of_executed_units' "$log" || true
    else
        status=1
        echo "!! $t failed; the crash and its input:" >&2
        grep -E 'panicked at|Test unit written to|SUMMARY' "$log" >&2 || tail -n 30 "$log" >&2
    fi
done
exit "$status"
