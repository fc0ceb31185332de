#!/usr/bin/env bash
# Installs what kiln needs from Debian 12's packages; does nothing when all of it is there.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config binutils
  libboost1.81-dev libfmt-dev liburing-dev libunicorn-dev
  libgtest-dev libbenchmark-dev libcli11-dev musl-dev
  clang-format clang-tidy
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
echo "setup: installing ${missing[*]}"
sudo_cmd=()
[[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
