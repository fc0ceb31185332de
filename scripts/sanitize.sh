#!/usr/bin/env bash
# Builds kiln with a sanitizer and runs the whole test suite under it: on this machine (the
# emulated backend, and KVM where /dev/kvm is usable), then the tests labelled `kvm` in the
# nested-KVM VM (scripts/kvm-vm.sh) where it is not. Too slow for every CI run on 2 cores; the
# latest results go in the issue notes.
#
# usage: scripts/sanitize.sh address|thread [extra ctest arguments...]
#   address: AddressSanitizer with UndefinedBehaviorSanitizer; thread: ThreadSanitizer.
# Environment: KILN_SANITIZE_KVM=vm|off (default vm where KVM is unusable here), JOBS (build
# parallelism), KILN_STRESS_SCALE (as for the stress tests; CI size when unset).
# Logs: build-<kind>/sanitize-host.log and build-<kind>/sanitize-kvm.log.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:?usage: scripts/sanitize.sh address|thread [ctest arguments...]}
shift
case $kind in
  thread) san=thread ;;
  address) san=address,undefined ;;
  *) echo "usage: scripts/sanitize.sh address|thread [ctest arguments...]" >&2; exit 2 ;;
esac
build=build-$kind
scripts/setup.sh
cmake -S . -B "$build" -G Ninja -DKILN_SANITIZE=$san -DKILN_BUILD_BENCH=OFF -DKILN_BUILD_EXAMPLES=OFF
cmake --build "$build" -j "${JOBS:-$(nproc)}"

# halt_on_error: the first report fails the test that caused it, with its stack.
export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1"
[[ -f tests/stress/tsan.supp ]] && TSAN_OPTIONS+=":suppressions=$PWD/tests/stress/tsan.supp"
# Sanitized code runs several times slower: stretch the tests' time budgets as the VM does.
export KILN_TIME_SCALE=${KILN_TIME_SCALE:-5}

status=0
kvm_here=$("$build/tools/kiln" backends | grep -c '^kvm *usable' || true)
exclude=()
[[ $kvm_here == 0 ]] && exclude=(-LE kvm)
ctest --test-dir "$build" --output-on-failure -j "${JOBS:-$(nproc)}" --timeout 1200 \
  "${exclude[@]}" "$@" 2>&1 | tee "$build/sanitize-host.log" || status=1

if [[ $kvm_here == 0 && ${KILN_SANITIZE_KVM:-vm} == vm ]]; then
  scripts/kvm-vm.sh --timeout "${KILN_VM_TIMEOUT:-3000}" \
    "export KILN_REQUIRE_KVM=1 KILN_TIME_SCALE=100 ASAN_OPTIONS='$ASAN_OPTIONS' \
            UBSAN_OPTIONS='$UBSAN_OPTIONS' TSAN_OPTIONS='$TSAN_OPTIONS' \
            KILN_STRESS_SCALE=\${KILN_STRESS_SCALE:-0.02}
     ctest --test-dir $build --output-on-failure -L kvm --timeout 1800 $*" \
    2>&1 | tee "$build/sanitize-kvm.log" || status=1
fi
exit $status
