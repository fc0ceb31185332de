#!/usr/bin/env bash
# Runs clang-tidy (.clang-tidy) over kiln's own sources: the library, the CLI, the examples and
# the benchmarks (tests and fuzzers are left out: they compile against the same headers, which
# are checked here). Needs a configured build directory for compile_commands.json.
#   scripts/check-tidy.sh [BUILD_DIR]      # default: build
# Exit status 1 when any check fires (.clang-tidy makes every warning an error).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
if [[ ! -f "$build/compile_commands.json" ]]; then
  echo "check-tidy: $build/compile_commands.json missing: configure the build first" >&2
  exit 2
fi
tidy=$(command -v clang-tidy || command -v clang-tidy-14 || true)
if [[ -z "$tidy" ]]; then
  echo "check-tidy: clang-tidy is not installed (scripts/setup.sh installs it)" >&2
  exit 2
fi
mapfile -t files < <(git ls-files 'support/*.cpp' 'memory/*.cpp' 'vcpu/*.cpp' 'runtime/*.cpp' \
  'tools/*.cpp' 'examples/*.cpp' 'bench/*.cpp')
jobs=$(nproc)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# One clang-tidy per file, nproc at a time; each prints only its findings (--quiet).
printf '%s\n' "${files[@]}" |
  xargs -P "$jobs" -I{} sh -c '"$0" -p "$1" --quiet "$2" 2>/dev/null || echo "FAILED $2"' \
    "$tidy" "$build" {} >"$log"
if grep -qE 'error:|^FAILED' "$log"; then
  grep -E 'error:|^FAILED' "$log" | sort -u
  echo "check-tidy: findings above (${#files[@]} files checked)" >&2
  exit 1
fi
echo "check-tidy: ${#files[@]} files, clean"
