#!/usr/bin/env bash
# Sets up, builds and runs the demo: the calc guest's functions through the kiln CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh >/dev/null
build=${BUILD_DIR:-build}
kiln=$build/tools/kiln
calc=$build/guests/calc.elf
run() { echo "\$ kiln run calc.elf $*"; "$kiln" run "$calc" "$@"; }
"$kiln" backends
run add 2 3
run mul_i64 123456789:i64 1000:i64
run add_f64 0.5 2.25
run concat str:kiln str:-sandbox
run checksum hex:6b696c6e
run call_host str:host_add 40:i64 2:i64
run add_i32 2 3 --stats
