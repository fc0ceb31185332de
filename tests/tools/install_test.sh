#!/usr/bin/env bash
# Installs kiln from BUILD_DIR into a temporary prefix, checks that only public headers went in
# (no detail/ folder, no header that includes one, no benchmark baseline), builds a consumer
# project against it with find_package(kiln), and runs it on the calc guest.
set -euo pipefail
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
inc=$tmp/prefix/include/kiln
[[ -f $inc/runtime/sandbox.hpp && -f $inc/guest/abi.h ]] || { echo "public headers missing"; exit 1; }
internal=$(find "$inc" -path '*/detail*' -o -name '*baseline*')
[[ -z $internal ]] || { echo "installed internals: $internal"; exit 1; }
if grep -rnE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"][^>"]*detail/' "$inc"; then
  echo "installed headers include detail headers (above)"
  exit 1
fi
cmake -S "$src/tests/tools/consumer" -B "$tmp/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/consumer" >/dev/null
out=$("$tmp/consumer/consumer" "$build/guests/calc.elf")
echo "consumer printed: $out"
[[ $out == 5 ]]
