#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan) in build-fuzz and runs each for N inputs.
# Usage: fuzz/run.sh [runs-per-target, default 1000000] [extra libFuzzer flags...]
# Environment: TARGETS (the targets to run, space-separated; default all), KILN_FUZZ_BUILD (build
# folder), JOBS (build parallelism, default 2).
#
# Each target starts from its seeds in fuzz/corpus/<target> (written again by kiln_fuzz_seeds on
# every run; the output depends only on the sources and tests/golden, so the tree stays clean
# unless a format changed) and keeps what it finds in <build>/fuzz-corpus/<target>; crashing
# inputs go to <build>/fuzz-artifacts. The last line for each target gives the runs libFuzzer
# really did (stat::number_of_executed_units), which is fewer than asked after a crash.
set -euo pipefail

runs=${1:-1000000}
shift || true
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${KILN_FUZZ_BUILD:-$root/build-fuzz}
all="wire_decode elf_parse ksnap_file snapshot_state cli_values"
targets=${TARGETS:-$all}

CC=clang CXX=clang++ cmake -S "$root" -B "$build" -G Ninja -DKILN_FUZZ=ON \
  -DKILN_SANITIZE=address,undefined -DKILN_BUILD_TESTS=OFF -DKILN_BUILD_BENCH=OFF \
  -DKILN_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" -j"${JOBS:-2}" --target kiln_fuzz_seeds $(printf '%s_fuzz ' $targets)

"$build/fuzz/kiln_fuzz_seeds" "$root/fuzz/corpus"
mkdir -p "$build/fuzz-artifacts"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
# max_len: the 64 KiB I/O buffer for messages; ELF images stay small enough to mutate well; a
# .ksnap input carries its files' non-zero runs (the seeds are about 30 KiB each); a snapshot's
# runtime sections are a few KiB; CLI values are short.
declare -A max_len=([wire_decode]=65536 [elf_parse]=16384 [ksnap_file]=131072
  [snapshot_state]=16384 [cli_values]=4096)
status=0
for target in $targets; do
  if [[ -z ${max_len[$target]:-} ]]; then
    echo "fuzz/run.sh: unknown target '$target' (known: $all)" >&2
    exit 2
  fi
  mkdir -p "$build/fuzz-corpus/$target"
  log="$build/fuzz-artifacts/$target.log"
  echo "== $target: $runs runs"
  start=$(date +%s)
  rc=0
  "$build/fuzz/${target}_fuzz" -runs="$runs" -max_len="${max_len[$target]}" \
    -print_final_stats=1 -artifact_prefix="$build/fuzz-artifacts/${target}-" "$@" \
    "$build/fuzz-corpus/$target" "$root/fuzz/corpus/$target" 2>&1 | tee "$log" || rc=$?
  done_runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  echo "== $target: ${done_runs:-?} runs in $(( $(date +%s) - start )) s (exit $rc)"
  [[ $rc == 0 ]] || status=$rc
done
exit $status
