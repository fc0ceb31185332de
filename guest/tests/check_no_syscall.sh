#!/bin/sh
# Fails if any guest image contains a syscall, sysenter or int $0x80 instruction.
# A guest reaches the host only through hypercalls; such an instruction means a libc object that
# talks to Linux got linked in.
# Usage: check_no_syscall.sh OBJDUMP IMAGE.elf...
set -u
objdump=${1:?usage: check_no_syscall.sh OBJDUMP IMAGE...}
shift
[ "$#" -gt 0 ] || { echo "no guest images given" >&2; exit 2; }
status=0
for image in "$@"; do
  if [ ! -f "$image" ]; then
    echo "FAIL $image: missing (build the kiln_guests target first)"
    status=1
    continue
  fi
  if ! listing=$("$objdump" -d --no-show-raw-insn "$image"); then
    echo "FAIL $image: $objdump could not disassemble it"
    status=1
    continue
  fi
  hits=$(printf '%s\n' "$listing" | grep -E '[[:space:]](syscall|sysenter)([[:space:]]|$)|[[:space:]]int[[:space:]]+\$0x80' || true)
  if [ -n "$hits" ]; then
    echo "FAIL $image:"
    printf '%s\n' "$hits"
    status=1
  else
    echo "ok   $image"
  fi
done
exit $status
