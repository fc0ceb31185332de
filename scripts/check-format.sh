#!/usr/bin/env bash
# Checks that every C and C++ source the repository tracks is formatted by .clang-format (Debian
# 12's clang-format 14); prints the files that are not. `scripts/check-format.sh --fix` formats
# them in place.
set -euo pipefail
cd "$(dirname "$0")/.."
fix=0
[[ ${1:-} == --fix ]] && fix=1
mapfile -t files < <(git ls-files '*.c' '*.h' '*.cpp' '*.hpp')
bad=()
for f in "${files[@]}"; do
  clang-format --style=file "$f" | cmp -s - "$f" || bad+=("$f")
done
if [[ ${#bad[@]} -eq 0 ]]; then
  echo "check-format: ${#files[@]} files, all formatted"
  exit 0
fi
if [[ $fix == 1 ]]; then
  clang-format --style=file -i "${bad[@]}"
  echo "check-format: formatted ${#bad[@]} files"
  exit 0
fi
echo "check-format: ${#bad[@]} of ${#files[@]} files differ from .clang-format (fix: scripts/check-format.sh --fix):"
printf '  %s\n' "${bad[@]}"
exit 1
