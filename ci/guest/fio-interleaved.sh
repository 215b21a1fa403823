#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# fio in ONE guest against qemu-storage-daemon and Tandem disks at once, interleaved.
#
#   ci/guest/fio-interleaved.sh [--rounds 3] [--runtime SECS] [--target-bin PATH] [MODE...]
#
# One guest (TCG here) gets /dev/vda from qemu-storage-daemon (null-co, read-zeroes=off)
# and one more disk per MODE (poll|interrupt|adaptive; default: adaptive) from a
# vhost-target null bdev in that mode. Every round runs each job on each disk in turn
# (4k randread QD1, 4k randread QD32, 4k randwrite QD32, 128k write QD32; --runtime s
# each after a 1 s ramp), so a ratio compares runs seconds apart inside one boot, unlike
# fio-bench.sh, which boots one guest per backend one after another.
# Placement: every server on CPU 0, QEMU on CPU 1. Prints per-round IOPS and the median
# per-round Tandem/qsd ratio.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
rounds=3
runtime=3
target_bin=$repo/target/release/vhost-target
modes=()
while [[ $# -gt 0 ]]; do
    case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --target-bin) target_bin=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    poll | interrupt | adaptive) modes+=("$1"); shift ;;
    *) echo "fio-interleaved.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ ${#modes[@]} -gt 0 ]] || modes=(adaptive)
[[ -x "$target_bin" ]] || (cd "$repo" && cargo build --release -p vhost-target >&2)

scratch=$(mktemp -d /tmp/tandem-fio-il.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$scratch"
}
trap cleanup EXIT

blocks=2097152 # 1 GiB of 512-byte sectors
taskset -c 0 qemu-storage-daemon \
    --blockdev driver=null-co,node-name=n,size=$((blocks * 512)),read-zeroes=off \
    --export "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=$scratch/qsd.sock,writable=on,num-queues=1" \
    >"$scratch/qsd.log" 2>&1 &
pids+=($!)
disks=("$scratch/qsd.sock")
names=(qsd)
for m in "${modes[@]}"; do
    mkdir -p "$scratch/$m"
    cat >"$scratch/$m/config.json" <<JSON
{"subsystems":[
 {"subsystem":"bdev","config":[{"method":"bdev_null_create","params":{"name":"Null0","num_blocks":$blocks,"block_size":512}}]},
 {"subsystem":"vhost_blk","config":[{"method":"vhost_create_blk_controller","params":{"ctrlr":"vhost.0","dev_name":"Null0","cpumask":"0x1","poll_mode":"$m","num_queues":1}}]}
]}
JSON
    taskset -c 0 "$target_bin" serve -r "$scratch/$m/rpc.sock" -S "$scratch/$m" \
        -c "$scratch/$m/config.json" >"$scratch/$m/log" 2>&1 &
    pids+=($!)
    disks+=("$scratch/$m/vhost.0")
    names+=("tandem-$m")
done
for d in "${disks[@]}"; do
    for _ in $(seq 200); do [[ -S "$d" ]] && break; sleep 0.05; done
    [[ -S "$d" ]] || { echo "no socket $d" >&2; cat "$scratch"/*.log "$scratch"/*/log >&2; exit 1; }
done

devs=""
args=()
for i in "${!disks[@]}"; do
    devs+=" vd$(printf "\\x$(printf %x $((97 + i)))")"
    args+=(--vhost-user-blk "${disks[$i]}")
done
cat >"$scratch/script.sh" <<SCRIPT
for r in \$(seq 1 $rounds); do for j in "randread 4k 1" "randread 4k 32" "randwrite 4k 32" "write 128k 32"; do
  set -- \$j
  for d in$devs; do
    fio --name=x --filename=/dev/\$d --ioengine=libaio --direct=1 --time_based=1 --runtime=$runtime \
      --ramp_time=1 --rw=\$1 --bs=\$2 --iodepth=\$3 --norandommap=1 --output-format=json >/tmp/o.json
    echo "RES \$r \$d \$1-\$2-qd\$3 \$(tr -d '\n ' </tmp/o.json | sed 's/.*"read":{[^}]*"iops":\([0-9.]*\).*"write":{[^}]*"iops":\([0-9.]*\).*/\1 \2/')"
  done
done; done
SCRIPT
timeout=$((rounds * 4 * ${#disks[@]} * (runtime + 3) + 180))
TANDEM_QEMU_TASKSET=1 "$here/run-guest.sh" --fio --script "$scratch/script.sh" "${args[@]}" \
    --timeout "$timeout" --log "$scratch/console.log" >"$scratch/out"

python3 - "$scratch/out" "${names[@]}" <<'PY'
import statistics, sys
names = sys.argv[2:]
res = {}  # (job, disk index) -> {round: iops}
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) != 6 or p[0] != "RES":
        continue
    r, dev, job, rd, wr = int(p[1]), p[2], p[3], float(p[4]), float(p[5])
    res.setdefault((job, ord(dev[2]) - 97), {})[r] = rd + wr
jobs = sorted({j for j, _ in res}, key=lambda j: list(res).index((j, 0)))
print("| job | " + " | ".join(f"{n} IOPS per round" for n in names) + " | " +
      " | ".join(f"{n}/qsd (median)" for n in names[1:]) + " |")
print("|---|" + "---|" * len(names) + "---:|" * (len(names) - 1))
for j in jobs:
    cells = [", ".join(f"{v:.0f}" for _, v in sorted(res.get((j, i), {}).items())) for i in range(len(names))]
    q = res.get((j, 0), {})
    rat = []
    for i in range(1, len(names)):
        t = res.get((j, i), {})
        rs = [t[k] / q[k] for k in t if q.get(k)]
        rat.append(", ".join(f"{x:.2f}" for x in rs) + (f" ({statistics.median(rs):.2f})" if rs else ""))
    print(f"| {j} | " + " | ".join(cells) + " | " + " | ".join(rat) + " |")
PY
