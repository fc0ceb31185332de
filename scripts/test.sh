#!/usr/bin/env bash
# Sets up, builds and runs every test (the README's test command; .ci/run calls it).
# Without /dev/kvm the KVM-only tests skip with a stated reason and the rest run emulated.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
werror=OFF
[[ -n ${CI:-} ]] && werror=ON
scripts/build.sh -DKILN_WERROR=$werror
build=${BUILD_DIR:-build}
echo "Backends on this machine (tests labelled kvm skip, with this reason, when kvm is unusable):"
"$build/tools/kiln" backends
ctest --test-dir "$build" --output-on-failure -j "${JOBS:-$(nproc)}" --timeout 600
