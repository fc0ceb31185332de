#!/usr/bin/env bash
# Builds kiln with a sanitizer and runs the stress and runtime tests under it (too slow for CI's
# 2 cores on every run; the latest result goes in the issue notes).
# usage: scripts/sanitize.sh thread|address   (address means address,undefined)
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:?usage: scripts/sanitize.sh thread|address}
case $kind in
  thread) san=thread ;;
  address) san=address,undefined ;;
  *) echo "usage: scripts/sanitize.sh thread|address" >&2; exit 2 ;;
esac
build=build-$kind
scripts/setup.sh
cmake -S . -B "$build" -G Ninja -DKILN_SANITIZE=$san -DKILN_BUILD_BENCH=OFF -DKILN_BUILD_EXAMPLES=OFF
cmake --build "$build" -j "${JOBS:-$(nproc)}" --target stress_emulated_test e2e_emulated_test
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1"
[[ -f tests/stress/tsan.supp ]] && TSAN_OPTIONS+=" suppressions=$PWD/tests/stress/tsan.supp"
export UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1"
export KILN_STRESS_SCALE=${KILN_STRESS_SCALE:-}
"$build/tests/stress/stress_emulated_test"
"$build/tests/e2e/e2e_emulated_test" --gtest_filter='runtime_test.*:fault_guest.kick*:memory_e2e.*:snapshot*:lazy_load_e2e.*'
