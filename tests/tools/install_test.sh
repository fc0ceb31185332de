#!/usr/bin/env bash
# Installs kiln from BUILD_DIR into a temporary prefix, builds a consumer project against it with
# find_package(kiln), and runs it on the calc guest.
set -euo pipefail
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
cmake -S "$src/tests/tools/consumer" -B "$tmp/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/consumer" >/dev/null
out=$("$tmp/consumer/consumer" "$build/guests/calc.elf")
echo "consumer printed: $out"
[[ $out == 5 ]]
