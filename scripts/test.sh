#!/usr/bin/env bash
# Sets up, builds and runs every test (the README's test command; .ci/run calls it).
#
# Both backends, always: every test runs here (the emulated backend everywhere); the tests
# labelled `kvm` then run where /dev/kvm works: on this machine if it has a usable /dev/kvm,
# otherwise inside a Linux guest under QEMU's software emulation that offers a real /dev/kvm
# (scripts/kvm-vm.sh). In the VM, everything runs many times slower, so the stress tests run at a
# reduced scale there (KILN_VM_STRESS_SCALE, default 0.02) and time-bound tests scale their
# budgets (KILN_TIME_SCALE, default 20); a full-scale KVM stress run is
# `KILN_STRESS_SCALE=1 ctest --test-dir build -L stress` on a host with /dev/kvm.
#
# Environment: KILN_KVM_TESTS=vm|host|off says where the KVM tests run (default: host when
# /dev/kvm is usable, else vm; off: on the host, skipping where /dev/kvm is unusable);
# BUILD_DIR, JOBS as for scripts/build.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/check-format.sh
werror=OFF
[[ -n ${CI:-} ]] && werror=ON
scripts/build.sh -DKILN_WERROR=$werror
build=${BUILD_DIR:-build}
scripts/check-tidy.sh "$build"
echo "Backends on this machine (tests labelled kvm skip, with this reason, when kvm is unusable):"
"$build/tools/kiln" backends

kvm_tests=${KILN_KVM_TESTS:-}
if [[ -z $kvm_tests ]]; then
  if "$build/tools/kiln" backends | grep -q '^kvm *usable'; then kvm_tests=host; else kvm_tests=vm; fi
fi

# On a host with /dev/kvm the KVM tests run with the rest, and must not skip; with
# KILN_KVM_TESTS=off they skip themselves, with the reason.
exclude=()
[[ $kvm_tests == vm ]] && exclude=(-LE kvm)
[[ $kvm_tests == host ]] && export KILN_REQUIRE_KVM=1
ctest --test-dir "$build" --output-on-failure -j "${JOBS:-$(nproc)}" --timeout 600 "${exclude[@]}"

if [[ $kvm_tests == vm ]]; then
  echo
  echo "No usable /dev/kvm here: the KVM tests run in a VM with nested KVM (scripts/kvm-vm.sh)."
  # The VM's vCPUs share one host thread (see kvm-vm.sh), so tests run one at a time.
  # KILN_REQUIRE_KVM=1 makes a KVM test that would skip fail there instead.
  scripts/kvm-vm.sh --timeout "${KILN_VM_TIMEOUT:-1500}" \
    "export KILN_REQUIRE_KVM=1 KILN_TIME_SCALE=\${KILN_TIME_SCALE:-20} \
            KILN_STRESS_SCALE=\${KILN_STRESS_SCALE:-${KILN_VM_STRESS_SCALE:-0.02}}
     $build/tools/kiln backends &&
     ctest --test-dir $build --output-on-failure -L kvm --timeout 900"
fi
