#!/usr/bin/env bash
# kvm-vm.sh: runs a command on a machine where /dev/kvm works, on a host that has none.
#
# Build machines and CI have no /dev/kvm and their CPUs show neither vmx nor svm. QEMU's software
# emulator (TCG) with `-cpu max` models an AMD CPU with SVM and nested paging (NPT), so a Linux
# guest booted under it can load kvm_amd and offer a real /dev/kvm: Linux's own KVM code runs
# kiln's KVM backend there. TCG does not emulate Intel VMX, so there is no Intel variant.
#
# This script boots a Debian kernel under TCG with a tiny busybox initramfs. The guest mounts the
# host's / read-only over virtio-9p under an overlay whose upper layer is tmpfs (so everything is
# visible and writable, and writes are thrown away at the end), chroots into it and runs the
# command there as root, in the caller's working directory, with the caller's environment. The
# command's stdout and stderr come back on ours while it runs; its exit status becomes ours.
#
# usage: scripts/kvm-vm.sh [options] 'command'
#   --smp N             guest vCPUs (default 2)
#   --mem SIZE          guest memory in QEMU syntax (default 4G); the overlay's tmpfs uses it too
#   --timeout S         kill the guest after S seconds and exit 124 (default: no limit)
#   --rw DIR            mount host directory DIR read-write at the same path, uncached, so the
#                       command's results land on the host (written as root); repeatable
#   --kernel bpo|stable bpo (default): bookworm-backports' 6.12 kernel (has KVM_PRE_FAULT_MEMORY),
#                       falling back to stable when backports can't be reached; stable: bookworm's 6.1
#   --keep              keep the run directory (console log, stdout/stderr copies) and print its path
#   --verbose           show the guest's console (kernel messages, init) on stderr
#   env KILN_KVM_VM_CACHE  cache directory (default /tmp/kiln-kvm-vm-cache); delete it to refresh
#
# Exit status: the command's; 124 on --timeout; 125 when the guest died without reporting one
# (the console's tail is printed then); 2 on bad usage.
#
# Needs qemu-system-x86, kmod and xz-utils; installs them with apt-get when missing. The kernel
# (linux-image-*-amd64) and busybox-static are fetched with `apt-get download` and unpacked into
# the cache, never installed; backports is reached through a private apt state in the cache, so
# /etc/apt is not touched. The first run downloads ~100-180 MB; later runs boot in ~6-15 s.
#
# Limits:
#  * Everything is emulated and slow: timings measured inside are meaningless, and time-bound
#    tests may fail for that reason alone. The KVM guest sees TCG's CPU, not real silicon.
#  * stdout and stderr are virtio ports, not a tty (programs buffer as into a pipe), and travel
#    separately, so their relative order is not kept. stdin is /dev/null.
#  * The host's /tmp is visible (writes discarded); /run and /dev/shm are fresh; the host's /proc,
#    /sys, /dev and processes are not visible; there is no network.
#  * Host files are cached (9p cache=loose): files changed on the host during the run may look
#    stale inside. --rw directories are not cached.
set -euo pipefail

smp=2 mem=4G timeout=0 kernel=bpo keep=0 verbose=0 rw=()
die() { echo "kvm-vm: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --smp|--mem|--timeout|--rw|--kernel) [[ $# -ge 2 ]] || die "$1 needs a value" ;;&
    --smp) smp=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --rw) [[ -d $2 ]] || die "--rw $2: not a directory"; rw+=("$(readlink -f "$2")"); shift 2 ;;
    --kernel) kernel=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --verbose) verbose=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "$0"; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || die "usage: kvm-vm.sh [options] 'command'   (see --help)"
[[ $kernel == bpo || $kernel == stable ]] || die "--kernel takes bpo or stable"
cmd=$*
log() { echo "kvm-vm: $*" >&2; }

# ---- Host packages, installed only when missing. ----
sudo=(); [[ $(id -u) == 0 ]] || sudo=(sudo)
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v depmod >/dev/null || need+=(kmod)
command -v xz >/dev/null || need+=(xz-utils)
if [[ ${#need[@]} -gt 0 ]]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
    { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi

# ---- Kernel and busybox, unpacked into the cache. The lock keeps concurrent runs apart. ----
cache=${KILN_KVM_VM_CACHE:-/tmp/kiln-kvm-vm-cache}
mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9
aptlog=$cache/apt.log
# A private apt state that only knows bookworm-backports.
bpo_apt=(-o Dir::Etc::SourceList="$cache/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
         -o Dir::State::Lists="$cache/apt/lists" -o Dir::Cache="$cache/apt/cache")

# unpack_deb DIR PACKAGE [apt options...]: downloads PACKAGE's .deb and unpacks it as DIR (once).
unpack_deb() {
  local dir=$1 pkg=$2 tmp; shift 2
  [[ -d $dir ]] && return 0
  tmp=$(mktemp -d "$cache/dl.XXXXXX")
  if (cd "$tmp" && apt-get "$@" download "$pkg") >>"$aptlog" 2>&1 &&
     dpkg-deb -x "$tmp"/*.deb "$tmp/root"; then
    mv "$tmp/root" "$dir"; rm -rf "$tmp"
  else
    rm -rf "$tmp"; return 1
  fi
}
# kernel_pkg [apt options...]: the linux-image-<abi>-amd64 that linux-image-amd64 points at.
kernel_pkg() { apt-cache "$@" depends linux-image-amd64 2>>"$aptlog" | awk '/Depends: linux-image-/{print $2; exit}'; }

if [[ $kernel == bpo && ! -d $cache/kernel-bpo ]]; then
  mkdir -p "$cache/apt/lists/partial" "$cache/apt/cache/archives/partial"
  echo 'deb http://deb.debian.org/debian bookworm-backports main' >"$cache/apt/sources.list"
  pkg=
  apt-get "${bpo_apt[@]}" update -qq >>"$aptlog" 2>&1 && pkg=$(kernel_pkg "${bpo_apt[@]}")
  if [[ -z $pkg ]] || ! unpack_deb "$cache/kernel-bpo" "$pkg" "${bpo_apt[@]}"; then
    log "bookworm-backports unreachable (see $aptlog); using bookworm's kernel"
    kernel=stable
  fi
fi
if [[ $kernel == stable && ! -d $cache/kernel-stable ]]; then
  pkg=$(kernel_pkg)
  [[ -n $pkg ]] || { "${sudo[@]}" apt-get update -qq || true; pkg=$(kernel_pkg); }
  unpack_deb "$cache/kernel-stable" "$pkg" || { log "cannot fetch $pkg (see $aptlog)"; exit 125; }
fi
unpack_deb "$cache/busybox" busybox-static || { log "cannot fetch busybox-static (see $aptlog)"; exit 125; }
kroot=$cache/kernel-$kernel
kvers=("$kroot"/lib/modules/*); kver=${kvers[0]##*/}
busybox=$cache/busybox/bin/busybox

# ---- The guest's init (PID 1 in the initramfs, busybox sh). ----
# /job is the run directory shared by the host: job.sh and rw (mounts) in, rc out.
read -r -d '' init <<'INIT' || true
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "kvm-vm init: insmod $m failed"; done
o9p=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /job /host /upper /newroot
mount -t 9p -o $o9p,cache=none job /job || poweroff -f
finish() { echo "$1" >/job/rc; sync; poweroff -f; }
mount -t 9p -o $o9p,ro,cache=loose hostroot /host || finish 125
mount -t tmpfs -o mode=755 upper /upper && mkdir /upper/data /upper/work
mount -t overlay -o lowerdir=/host,upperdir=/upper/data,workdir=/upper/work root /newroot || finish 125
cd /newroot
mount -t proc proc proc; mount -t sysfs sys sys; mount -t devtmpfs dev dev
mkdir -p dev/pts dev/shm; mount -t devpts devpts dev/pts; mount -t tmpfs -o mode=1777 shm dev/shm
mount -t tmpfs -o mode=755 run run   # /tmp stays the host's: build trees live there
while read -r tag path; do
  mkdir -p "/newroot$path" && mount -t 9p -o $o9p,cache=none "$tag" "/newroot$path" ||
    echo "kvm-vm: cannot mount $path read-write" >&2
done </job/rw
cp /job/job.sh run/kvm-vm-job.sh
for p in /sys/class/virtio-ports/*; do eval "port_$(cat $p/name)=/dev/${p##*/}"; done
[ -c /dev/kvm ] || echo "kvm-vm: the guest has no /dev/kvm: $(dmesg | grep -iE 'kvm|svm' | tail -n 3)" >$port_err
chroot /newroot /bin/bash /run/kvm-vm-job.sh </dev/null >$port_out 2>$port_err
finish $?
INIT

# ---- The initramfs: busybox, the modules we need (dependencies first, decompressed: busybox's
#      insmod reads only plain .ko), the init. Rebuilt only when one of them changes. ----
[[ -f $kroot/lib/modules/$kver/modules.dep ]] || depmod -b "$kroot" "$kver"
# modprobe prints "insmod PATH" per module to load, "builtin NAME" for built-in ones.
mods=$(for m in kvm-amd 9pnet_virtio 9p overlay virtio_pci virtio_console; do
         modprobe -d "$kroot" -S "$kver" --show-depends "$m"
       done | awk '$1 == "insmod" && !seen[$2]++ {print $2}')
key=$( { echo "$kver"; echo "$mods"; md5sum <"$busybox"; echo "$init"; } | md5sum | cut -c1-16)
initrd=$cache/initrd-$kver-$key.gz
if [[ ! -f $initrd ]]; then
  log "building the initramfs for $kver"
  ir=$(mktemp -d "$cache/initrd.XXXXXX")
  mkdir -p "$ir"/{bin,modules,proc,sys,dev}
  cp "$busybox" "$ir/bin/busybox"
  printf '%s\n' "$init" >"$ir/init"; chmod 755 "$ir/init"
  for f in $mods; do
    b=$(basename "${f%.xz}")
    case $f in *.xz) xz -dc "$f" >"$ir/modules/$b" ;; *) cp "$f" "$ir/modules/$b" ;; esac
    echo "$b" >>"$ir/modules/order"
  done
  (cd "$ir" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) >"$initrd.tmp"
  mv "$initrd.tmp" "$initrd"; rm -rf "$ir"
fi
flock -u 9; exec 9>&-

# ---- The run. ----
run=$(mktemp -d /tmp/kvm-vm-run.XXXXXX)
qpid=
# shellcheck disable=SC2317  # (called by the EXIT trap)
cleanup() {
  [[ -z $qpid ]] || { kill "$qpid" 2>/dev/null; wait "$qpid" 2>/dev/null || true; }
  if [[ $keep == 1 ]]; then log "run directory kept: $run"; else rm -rf "$run"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# The job: the caller's environment, the caller's directory, the command.
{
  export -p | grep -vE '^declare -x (SHLVL|PWD|OLDPWD|_)='
  printf 'cd %q || exit 126\n%s\n' "$PWD" "$cmd"
} >"$run/job.sh"
: >"$run/out"; : >"$run/err"; : >"$run/console"; : >"$run/rw"
q9p() { echo "local,path=${1//,/,,},mount_tag=$2,security_model=none,multidevs=remap${3:-}"; }
shares=(-virtfs "$(q9p / hostroot ,readonly=on)" -virtfs "$(q9p "$run" job)")
i=0
while IFS= read -r d; do   # sorted: parents are mounted before their children
  [[ -n $d ]] || continue
  shares+=(-virtfs "$(q9p "$d" "rw$i")"); echo "rw$i $d" >>"$run/rw"; i=$((i + 1))
done < <(printf '%s\n' "${rw[@]}" | sort -u)
qemu=(qemu-system-x86_64 -accel "tcg,thread=single" -cpu max -smp "$smp" -m "$mem"
      -nodefaults -no-user-config -display none -vga none -nic none -no-reboot
      -kernel "$kroot/boot/vmlinuz-$kver" -initrd "$initrd"
      -append 'console=ttyS0 panic=-1 quiet loglevel=4 edd=off tsc=reliable mitigations=off'
      -serial "file:$run/console" -device virtio-serial-pci
      -chardev "file,id=out,path=$run/out" -device "virtserialport,chardev=out,name=out"
      -chardev "file,id=err,path=$run/err" -device "virtserialport,chardev=err,name=err"
      "${shares[@]}")
# thread=single: with one host thread per vCPU (TCG's default) the guest kernel dies with
# "Oops: int3" once KVM VMs are created and destroyed; one shared thread is stable.
timeout -k 10 "$timeout" "${qemu[@]}" </dev/null >"$run/qemu.log" 2>&1 &
qpid=$!
follow() { tail -q -s 0.2 -c +1 -F --pid="$qpid" "$1" 2>/dev/null; }
follow "$run/out" & tails=($!)
follow "$run/err" >&2 & tails+=($!)
[[ $verbose == 0 ]] || { follow "$run/console" | tr -d '\r' >&2 & }
qrc=0; wait "$qpid" || qrc=$?
qpid=
wait "${tails[@]}" || true
if [[ $qrc == 124 ]]; then
  log "timed out after ${timeout}s"; rc=124
elif [[ -s $run/rc && $(cat "$run/rc") != 125 ]]; then
  rc=$(cat "$run/rc")
else   # the guest died, its init could not build the root, or the command itself exited 125
  rc=125
  [[ -s $run/rc ]] || log "the guest reported no exit status (qemu exit $qrc) $(tail -n 5 "$run/qemu.log")"
  log "exit status 125; guest console tail:"; tail -n 30 "$run/console" | tr -d '\r' >&2
fi
exit "$rc"
