#!/usr/bin/env bash
# Builds the fuzz targets of tools/fuzz and runs each for SECONDS (default
# 60), one after another. Exits non-zero when a target crashes; the crashing
# input is then in tools/fuzz/artifacts/<target>/ (minimize it with
# `cargo fuzz tmin --fuzz-dir tools/fuzz <target> <file>` and add it to
# tools/fuzz/corpus/<target>/ once the bug is fixed).
#
# Usage: tools/fuzz.sh [SECONDS] [TARGET...]   (all targets when none given)
#
# New inputs go to tools/fuzz/target/corpus/<target>/ (not committed); the
# committed seeds in tools/fuzz/corpus/<target>/ are only read. The toolchain
# is stable; cargo fuzz needs nightly flags, which RUSTC_BOOTSTRAP=1 allows.
set -euo pipefail

seconds="${1:-60}"
shift || true
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
fi
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(request_head frame_decoder unmask)
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
fuzz_dir="$root/tools/fuzz"
export RUSTC_BOOTSTRAP=1
# A target dir of its own: the sanitizer flags would otherwise invalidate
# the main build's artifacts in a shared CARGO_TARGET_DIR.
export CARGO_TARGET_DIR="$fuzz_dir/target"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "== building ${targets[*]}"
for target in "${targets[@]}"; do
    cargo fuzz build --fuzz-dir "$fuzz_dir" "$target"
done

failed=()
for target in "${targets[@]}"; do
    work_corpus="$fuzz_dir/target/corpus/$target"
    mkdir -p "$work_corpus"
    echo "== fuzzing $target for ${seconds}s (corpus: $work_corpus + tools/fuzz/corpus/$target)"
    if cargo fuzz run --fuzz-dir "$fuzz_dir" "$target" \
        "$work_corpus" "$fuzz_dir/corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1; then
        echo "== $target: no crash in ${seconds}s"
    else
        echo "== $target: CRASH (see tools/fuzz/artifacts/$target/)"
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "== crashed: ${failed[*]}" >&2
    exit 1
fi
echo "== all targets ran ${seconds}s without a crash: ${targets[*]}"
