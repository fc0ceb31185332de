#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan) in build-fuzz and runs each for N inputs.
# Usage: fuzz/run.sh [runs-per-target, default 1000000] [extra libFuzzer flags...]
# Environment: KILN_FUZZ_BUILD (build folder), JOBS (build parallelism, default 2).
set -euo pipefail

runs=${1:-1000000}
shift || true
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${KILN_FUZZ_BUILD:-$root/build-fuzz}

CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DKILN_FUZZ=ON -DKILN_SANITIZE=address,undefined \
  -DKILN_BUILD_TESTS=OFF -DKILN_BUILD_BENCH=OFF -DKILN_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" -j"${JOBS:-2}" --target wire_decode_fuzz elf_parse_fuzz kiln_fuzz_seeds

# Seeds from valid messages and images; libFuzzer adds what it finds to the same folders.
corpus=$build/fuzz-corpus
mkdir -p "$corpus/wire_decode" "$corpus/elf_parse" "$build/fuzz-artifacts"
"$build/fuzz/kiln_fuzz_seeds" "$corpus/wire_decode" "$corpus/elf_parse"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
# max_len: the 64 KiB I/O buffer for messages; ELF images stay small enough to mutate well.
declare -A max_len=([wire_decode]=65536 [elf_parse]=16384)
for target in wire_decode elf_parse; do
  echo "== $target: $runs runs"
  start=$(date +%s)
  "$build/fuzz/${target}_fuzz" -runs="$runs" -max_len="${max_len[$target]}" -print_final_stats=1 \
    -artifact_prefix="$build/fuzz-artifacts/${target}-" "$@" "$corpus/$target"
  echo "== $target: $runs runs in $(( $(date +%s) - start )) s"
done
