#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Boot the test guest once, run a script in it, and return the script's exit status.
#
#   ci/guest/run-guest.sh --script FILE [options]
#
# Options:
#   --script FILE        shell script run by the guest's /init (required)
#   --vhost-user-blk S   attach a vhost-user-blk-pci disk served on Unix socket S; repeatable
#                        (first is /dev/vda, then /dev/vdb, ...)
#   --num-queues N       virtqueues per vhost-user-blk disk (default 1)
#   --fio                boot the initramfs variant that carries fio
#   --smp N              guest vCPUs (default 1)
#   --mem SIZE           guest memory in MiB (default 512)
#   --timeout SECS       kill QEMU after SECS (default 300); exit status 124 then
#   --log FILE           keep the full serial console log in FILE (default: a temp file)
#   --cache DIR          where the initramfs is built and cached (default: target/guest)
#
# Prints the script's output (the lines between TANDEM-RESULT-BEGIN and TANDEM-RESULT-END) on
# stdout. Exit status: the script's status; 124 on timeout; 125 when the guest died without
# reporting one (the console log tail is then printed on stderr).
#
# Environment: TANDEM_GUEST_ACCEL=kvm|tcg forces the accelerator (see lib.sh for detection),
# TANDEM_GUEST_KERNEL picks the kernel, QEMU overrides the qemu-system-x86_64 binary,
# TANDEM_QEMU_TASKSET=CPULIST pins QEMU with taskset.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"

script=
socks=()
num_queues=1
fio_flag=()
smp=1
mem=512
timeout_s=300
log=
cache=${CARGO_TARGET_DIR:-$repo/target}/guest
while [[ $# -gt 0 ]]; do
    case "$1" in
    --script) script=$2; shift 2 ;;
    --vhost-user-blk) socks+=("$2"); shift 2 ;;
    --num-queues) num_queues=$2; shift 2 ;;
    --fio) fio_flag=(--fio); shift ;;
    --smp) smp=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    --cache) cache=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run-guest.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -n "$script" && -f "$script" ]] || { echo "run-guest.sh: --script FILE is required" >&2; exit 2; }

qemu=${QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null || { echo "run-guest.sh: $qemu not found (ci/install-deps.sh)" >&2; exit 2; }
kernel=$(guest_kernel)
accel=$(guest_accel)
base=$("$here/build-initramfs.sh" "${fio_flag[@]}" "$cache")

work=$(mktemp -d "${TMPDIR:-/tmp}/tandem-guest.XXXXXX")
qemu_pid=
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    if [[ -n "$qemu_pid" ]] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
[[ -n "$log" ]] || log=$work/console.log
: >"$log"

# The script travels as a second (uncompressed) cpio segment appended to the cached base
# image; the kernel unpacks concatenated archives in order. An uncompressed segment must
# start at a 4-byte aligned offset, and the kernel skips zero bytes between segments, so the
# gzip'd base is padded with zeros to a 512-byte boundary.
mkdir -p "$work/seg/tandem"
cp "$script" "$work/seg/tandem/script.sh"
(cd "$work/seg" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$work/seg.cpio"
base_size=$(stat -c %s "$base")
{
    cat "$base"
    head -c $(((512 - base_size % 512) % 512)) /dev/zero
    cat "$work/seg.cpio"
} >"$work/initrd"

if [[ "$accel" == kvm ]]; then
    cpu=host
else
    cpu=max
fi
args=(
    -machine "q35,accel=$accel,memory-backend=mem"
    -cpu "$cpu" -smp "$smp" -m "${mem}M"
    # vhost-user needs guest memory the backend can map: a shared memfd.
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on"
    -nodefaults -no-user-config -display none -no-reboot
    -serial "file:$log"
    -kernel "$kernel" -initrd "$work/initrd"
    -append "console=ttyS0 quiet loglevel=3 panic=-1 8250.nr_uarts=1 i8042.noaux i8042.nokbd tsc=reliable no_timer_check cryptomgr.notests random.trust_cpu=on"
)
i=0
for s in "${socks[@]}"; do
    args+=(
        -chardev "socket,id=vub$i,path=$s"
        -device "vhost-user-blk-pci,chardev=vub$i,num-queues=$num_queues"
    )
    i=$((i + 1))
done

pin=()
if [[ -n "${TANDEM_QEMU_TASKSET:-}" ]]; then
    pin=(taskset -c "$TANDEM_QEMU_TASKSET")
fi

start=$(date +%s.%N)
"${pin[@]}" "$qemu" "${args[@]}" 2>"$work/qemu.err" &
qemu_pid=$!
status=0
timed_out=0
deadline=$(($(date +%s) + timeout_s))
while kill -0 "$qemu_pid" 2>/dev/null; do
    if [[ $(date +%s) -ge $deadline ]]; then
        timed_out=1
        kill "$qemu_pid" 2>/dev/null || true
        sleep 1
        kill -9 "$qemu_pid" 2>/dev/null || true
        break
    fi
    sleep 0.2
done
wait "$qemu_pid" || status=$?
qemu_pid=
end=$(date +%s.%N)
elapsed=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')

tr -d '\r' <"$log" | sed -n '/^TANDEM-RESULT-BEGIN$/,/^TANDEM-RESULT-END$/{/^TANDEM-RESULT-\(BEGIN\|END\)$/d;p}'
exit_line=$(tr -d '\r' <"$log" | grep -E '^TANDEM-EXIT [0-9]+$' | tail -n 1 || true)
echo "run-guest.sh: accel=$accel kernel=$(basename "$kernel") qemu_status=$status elapsed=${elapsed}s" >&2
if [[ $timed_out -eq 1 ]]; then
    echo "run-guest.sh: guest timed out after ${timeout_s}s; console tail:" >&2
    tail -n 40 "$log" >&2
    exit 124
fi
if [[ -z "$exit_line" ]]; then
    echo "run-guest.sh: guest reported no exit status (qemu status $status); qemu stderr:" >&2
    cat "$work/qemu.err" >&2
    echo "console tail:" >&2
    tail -n 40 "$log" >&2
    exit 125
fi
exit "${exit_line#TANDEM-EXIT }"
