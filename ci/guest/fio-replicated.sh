#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The replicated disk against a local disk, side by side in one run.
#
#   ci/guest/fio-replicated.sh [--rounds 2] [--runtime SECS] [--guest|--no-guest] [OUT.md]
#
# Starts `vhost-target cluster` (an authority, two replicator servers and the target, all
# under one scratch directory on /var/tmp) and adds to the same target a local `uring` bdev
# over a file of the same size in the same directory (the replicas' files are there too).
# Then, in rounds, the same job on each disk in turn:
#   1. guest-less (`vhost-target loadgen`): 4k randwrite QD32, 4k randread QD32, 4k randwrite QD1;
#   2. unless --no-guest: the same jobs with fio in one TCG guest that has both disks
#      (vda local, vdb replicated).
# Prints (and writes to OUT.md) per-round IOPS and the median per-round replicated/local ratio;
# QD1 latency is 1/IOPS (one request in flight). Placement: the cluster on CPU 0, the client
# (loadgen or QEMU) on CPU 1.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
rounds=2
runtime=5
guest=1
out=
while [[ $# -gt 0 ]]; do
    case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --guest) guest=1; shift ;;
    --no-guest) guest=0; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fio-replicated.sh: unknown argument $1" >&2; exit 2 ;;
    *) out=$1; shift ;;
    esac
done
bin=$repo/target/release/vhost-target
(cd "$repo" && cargo build --release -p vhost-target >&2)

scratch=$(mktemp -d /var/tmp/tandem-fio-rep.XXXXXX)
cluster_pid=
cleanup() {
    if [[ -n "$cluster_pid" ]]; then
        kill -INT "$cluster_pid" 2>/dev/null || true
        wait "$cluster_pid" 2>/dev/null || true
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT

size=$((1 << 30))
taskset -c 0 "$bin" cluster --dir "$scratch/c" --size "$size" --metrics-addr "" -m 0x1 \
    >"$scratch/cluster.out" 2>"$scratch/cluster.log" &
cluster_pid=$!
for _ in $(seq 600); do grep -q "Ctrl-C stops" "$scratch/cluster.out" 2>/dev/null && break; sleep 0.1; done
grep -q "Ctrl-C stops" "$scratch/cluster.out" || { cat "$scratch/cluster.log" >&2; exit 1; }
rpc() { "$bin" rpc -s "$scratch/c/tandem.sock" "$@" >/dev/null; }
truncate -s "$size" "$scratch/local.img"
rpc bdev_uring_create name=Local0 filename="$scratch/local.img"
rpc vhost_create_blk_controller ctrlr=vhost.local dev_name=Local0 cpumask=0x1 num_queues=1
names=(local replicated)
socks=("$scratch/c/vhost.local" "$scratch/c/vhost.0")
jobs=("randwrite 4k 32" "randread 4k 32" "randwrite 4k 1")
res=$scratch/results
: >"$res"

for r in $(seq 1 "$rounds"); do
    for j in "${jobs[@]}"; do
        set -- $j
        for i in 0 1; do
            iops=$(taskset -c 1 "$bin" loadgen --socket "${socks[$i]}" --rw "$1" --bs "$2" \
                --iodepth "$3" --runtime "${runtime}s" --size 256M --cpus 1 --json 2>/dev/null |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["iops"])')
            echo "RES loadgen $r ${names[$i]} $1-$2-qd$3 $iops" | tee -a "$res" >&2
        done
    done
done

if [[ $guest == 1 ]]; then
    cat >"$scratch/script.sh" <<SCRIPT
for r in \$(seq 1 $rounds); do for j in "randwrite 4k 32" "randread 4k 32" "randwrite 4k 1"; do
  set -- \$j
  for d in vda vdb; do
    fio --name=x --filename=/dev/\$d --ioengine=libaio --direct=1 --time_based=1 --runtime=$runtime \
      --ramp_time=1 --rw=\$1 --bs=\$2 --iodepth=\$3 --size=256M --norandommap=1 --output-format=json >/tmp/o.json
    echo "RES \$r \$d \$1-\$2-qd\$3 \$(tr -d '\n ' </tmp/o.json | sed 's/.*"read":{[^}]*"iops":\([0-9.]*\).*"write":{[^}]*"iops":\([0-9.]*\).*/\1 \2/')"
  done
done; done
SCRIPT
    timeout=$((rounds * 6 * (runtime + 4) + 240))
    TANDEM_QEMU_TASKSET=1 "$here/run-guest.sh" --fio --script "$scratch/script.sh" \
        --vhost-user-blk "${socks[0]}" --vhost-user-blk "${socks[1]}" \
        --timeout "$timeout" --log "$scratch/console.log" >"$scratch/guest.out"
    awk '$1 == "RES" { d = ($3 == "vda") ? "local" : "replicated"; print "RES guest", $2, d, $4, $5 + $6 }' \
        "$scratch/guest.out" | tee -a "$res" >&2
fi

python3 - "$res" <<'PY' | tee "${out:-/dev/null}"
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) != 6 or p[0] != "RES":
        continue
    _, how, r, disk, job, iops = p
    rows.setdefault((how, job), {}).setdefault(disk, {})[int(r)] = float(iops)
print("| client | job | local IOPS per round | replicated IOPS per round | replicated/local per round (median) |")
print("|---|---|---|---|---:|")
for (how, job), d in rows.items():
    loc, rep = d.get("local", {}), d.get("replicated", {})
    rat = [rep[k] / loc[k] for k in rep if loc.get(k)]
    cell = lambda v: ", ".join(f"{x:.0f}" for _, x in sorted(v.items()))
    med = f" ({statistics.median(rat):.2f})" if rat else ""
    extra = ""
    if job.endswith("qd1") and loc and rep:
        lm = statistics.median(1e6 / x for x in loc.values())
        rm = statistics.median(1e6 / x for x in rep.values())
        extra = f"; QD1 latency local {lm:.0f} us, replicated {rm:.0f} us (+{rm - lm:.0f} us)"
    print(f"| {how} | {job} | {cell(loc)} | {cell(rep)} | " + ", ".join(f"{x:.2f}" for x in rat) + med + extra + " |")
PY
