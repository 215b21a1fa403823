#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# fio inside a real guest, against Tandem's vhost-target and qemu-storage-daemon, same run.
#
#   ci/guest/fio-bench.sh [--only tandem|qsd] [--runtime SECS] [--out DIR] [--target-bin PATH]
#   ci/guest/fio-bench.sh --report DIR     # print the tables of an earlier run again
#
# Backends (each exports one 1 GiB disk over vhost-user-blk, one virtqueue):
#   tandem-null   vhost-target, bdev_null_create
#   tandem-uring  vhost-target, bdev_uring_create on a preallocated file in /var/tmp
#   qsd-null      qemu-storage-daemon, null-co (read-zeroes=off: like SPDK's null bdev, no copy)
#   qsd-file      qemu-storage-daemon, file driver, aio=io_uring, cache.direct=on, same file
# For each backend one guest boots and runs, one after another (stonewall), with libaio,
# direct=1, on /dev/vda:
#   randread-4k-qd32, randwrite-4k-qd32, randread-4k-qd1, write-128k-qd32
# each for --runtime seconds (default 10) after a 2 s ramp.
#
# CPU placement (2-core CI host): the server is pinned to CPU 0 (taskset; vhost-target's own
# cpumask is 0x1 too), QEMU (1 vCPU) to CPU 1. Under TCG the guest CPU is emulated and is
# nearly always the bottleneck: compare backends against each other, not with bare metal.
#
# Prints a Markdown table (IOPS, mean and p99 completion latency, bandwidth) and, when both
# sides ran, the Tandem/qsd ratios. Raw fio JSON is kept in --out (default
# target/guest-bench/<UTC time>). Needs python3 on the host to read fio's JSON.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"

only=
runtime=10
out=
target_bin=
report=
while [[ $# -gt 0 ]]; do
    case "$1" in
    --only) only=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --target-bin) target_bin=$2; shift 2 ;;
    --report) report=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "fio-bench.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$only" in "" | tandem | qsd) ;; *) echo "--only takes tandem or qsd" >&2; exit 2 ;; esac
command -v python3 >/dev/null || { echo "fio-bench.sh: needs python3" >&2; exit 2; }

all_backends=(tandem-null tandem-uring qsd-null qsd-file)
print_report() { # DIR BACKEND...
python3 - "$@" <<'PY'
import json, os, sys

out, backends = sys.argv[1], sys.argv[2:]
results = {}  # (backend, job) -> dict
for b in backends:
    with open(os.path.join(out, b + ".json")) as f:
        data = json.load(f)
    for job in data["jobs"]:
        side = job["write"] if job["write"]["io_bytes"] > job["read"]["io_bytes"] else job["read"]
        pct = side["clat_ns"].get("percentile", {})
        results[(b, job["jobname"])] = {
            "iops": side["iops"],
            "mean_us": side["clat_ns"]["mean"] / 1000,
            "p99_us": pct.get("99.000000", 0) / 1000,
            "mbs": side["bw_bytes"] / 1e6,
            "err": job["error"],
        }

jobs = []
for (b, j) in results:
    if j not in jobs:
        jobs.append(j)

print("| job | backend | IOPS | mean clat (us) | p99 clat (us) | MB/s |")
print("|---|---|---:|---:|---:|---:|")
for j in jobs:
    for b in backends:
        r = results.get((b, j))
        if r:
            err = "" if r["err"] == 0 else f" (fio error {r['err']})"
            print(f"| {j} | {b}{err} | {r['iops']:.0f} | {r['mean_us']:.1f} | {r['p99_us']:.1f} | {r['mbs']:.1f} |")

pairs = [("tandem-null", "qsd-null"), ("tandem-uring", "qsd-file")]
pairs = [(t, q) for t, q in pairs if t in backends and q in backends]
if pairs:
    print()
    print("| job | Tandem / qsd | IOPS ratio | mean clat ratio |")
    print("|---|---|---:|---:|")
    for j in jobs:
        for t, q in pairs:
            rt, rq = results.get((t, j)), results.get((q, j))
            if rt and rq and rq["iops"] and rq["mean_us"]:
                print(f"| {j} | {t} / {q} | {rt['iops'] / rq['iops']:.2f} | {rt['mean_us'] / rq['mean_us']:.2f} |")
PY
}

if [[ -n "$report" ]]; then
    backends=()
    for b in "${all_backends[@]}"; do
        [[ -s "$report/$b.json" ]] && backends+=("$b")
    done
    [[ ${#backends[@]} -gt 0 ]] || { echo "no results in $report" >&2; exit 1; }
    print_report "$report" "${backends[@]}"
    exit 0
fi

target_dir=${CARGO_TARGET_DIR:-$repo/target}
[[ -n "$out" ]] || out=$target_dir/guest-bench/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
disk_bytes=$((1 << 30))

backends=()
if [[ "$only" != qsd ]]; then
    backends+=(tandem-null tandem-uring)
    if [[ -z "$target_bin" ]]; then
        echo "fio-bench.sh: building vhost-target (release)" >&2
        (cd "$repo" && cargo build --release -p vhost-target --bin vhost-target) >&2
        target_bin=$target_dir/release/vhost-target
    fi
fi
[[ "$only" == tandem ]] || backends+=(qsd-null qsd-file)

scratch=$(mktemp -d /var/tmp/tandem-bench.XXXXXX)
server_pid=
stop_server() {
    if [[ -n "$server_pid" ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
}
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    stop_server
    rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A real, fully written file (not sparse, not unwritten extents) so the file backends do
# real I/O on reads.
image=$scratch/disk.img
echo "fio-bench.sh: writing the 1 GiB backing file" >&2
dd if=/dev/zero of="$image" bs=1M count=$((disk_bytes >> 20)) oflag=direct conv=fsync status=none

start_server() { # backend socket
    local backend=$1 sock=$2
    local cfg=$scratch/config.json
    case "$backend" in
    tandem-*)
        local bdev
        if [[ "$backend" == tandem-null ]]; then
            bdev='{"method":"bdev_null_create","params":{"name":"Bench0","num_blocks":'$((disk_bytes / 512))',"block_size":512}}'
        else
            bdev='{"method":"bdev_uring_create","params":{"name":"Bench0","filename":"'"$image"'","block_size":512}}'
        fi
        cat >"$cfg" <<JSON
{"subsystems":[
 {"subsystem":"bdev","config":[$bdev]},
 {"subsystem":"vhost_blk","config":[{"method":"vhost_create_blk_controller","params":{"ctrlr":"vhost.0","dev_name":"Bench0","cpumask":"0x1"}}]}
]}
JSON
        mkdir -p "$scratch/vhost"
        taskset -c 0 "$target_bin" serve -r "$scratch/rpc.sock" -S "$scratch/vhost" -c "$cfg" \
            >"$out/$backend.server.log" 2>&1 &
        server_pid=$!
        ln -sf "$scratch/vhost/vhost.0" "$sock"
        ;;
    qsd-*)
        local blockdev
        if [[ "$backend" == qsd-null ]]; then
            blockdev="driver=null-co,node-name=disk0,size=$disk_bytes,read-zeroes=off"
        else
            blockdev="driver=file,node-name=disk0,filename=$image,aio=io_uring,cache.direct=on"
        fi
        taskset -c 0 qemu-storage-daemon --blockdev "$blockdev" \
            --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1,logical-block-size=512" \
            >"$out/$backend.server.log" 2>&1 &
        server_pid=$!
        ;;
    esac
    local i=0
    while [[ ! -S "$sock" ]]; do
        kill -0 "$server_pid" 2>/dev/null || { echo "$backend server exited:" >&2; cat "$out/$backend.server.log" >&2; return 1; }
        ((i++ < 200)) || { echo "$backend server made no socket in 20 s" >&2; return 1; }
        sleep 0.1
    done
}

guest_script=$scratch/fio-guest.sh
cat >"$guest_script" <<SCRIPT
set -eu
cat >/tmp/jobs.fio <<'JOBS'
[global]
filename=/dev/vda
ioengine=libaio
direct=1
time_based=1
runtime=$runtime
ramp_time=2
norandommap=1
randrepeat=0

[randread-4k-qd32]
stonewall
rw=randread
bs=4k
iodepth=32

[randwrite-4k-qd32]
stonewall
rw=randwrite
bs=4k
iodepth=32

[randread-4k-qd1]
stonewall
rw=randread
bs=4k
iodepth=1

[write-128k-qd32]
stonewall
rw=write
bs=128k
iodepth=32
JOBS
fio --eta=never --output-format=json --output=/tmp/fio.json /tmp/jobs.fio
echo
echo FIO-JSON-BEGIN
cat /tmp/fio.json
echo FIO-JSON-END
SCRIPT

for backend in "${backends[@]}"; do
    sock=$scratch/$backend.sock
    echo "fio-bench.sh: $backend" >&2
    start_server "$backend" "$sock"
    TANDEM_QEMU_TASKSET=1 "$here/run-guest.sh" --fio --script "$guest_script" \
        --vhost-user-blk "$sock" --timeout $((runtime * 4 * 3 + 180)) \
        --log "$out/$backend.console.log" >"$out/$backend.out"
    sed -n '/^FIO-JSON-BEGIN$/,/^FIO-JSON-END$/{/^FIO-JSON-/d;p}' "$out/$backend.out" >"$out/$backend.json"
    stop_server
done

echo "accel: $(guest_accel), guest kernel: $(basename "$(guest_kernel)"), runtime ${runtime}s per job, raw results: $out" >&2
print_report "$out" "${backends[@]}"
