#!/usr/bin/env bash
# Compare Tandem's vhost-target with qemu-storage-daemon (qsd) as vhost-user-blk backends,
# measured by `vhost-target loadgen` (a guest-less vhost-user frontend; no VM, so TCG does
# not pollute the numbers).
#
# Usage: ci/bench/loadgen-compare.sh [--only qsd|tandem] [--runtime 10s] [OUT.md]
#
# One run starts each backend in turn with two devices:
#   null: qsd null-co (read-zeroes=off, the fair "null" peer: no memset on reads)
#         vs Tandem bdev_null_create
#   file: a file under /var/tmp, O_DIRECT + io_uring in both
#         (qsd: driver=file,cache.direct=on,aio=io_uring; Tandem: bdev_uring_create)
# and runs these jobs against each device:
#   4k randread QD32, 4k randwrite QD32, 4k randread QD1 (mean latency), 128k write QD32
# CPU placement: the backend on CPU 0 (taskset -c 0; Tandem also -m 0x1 / cpumask 0x1),
# the load generator on CPU 1 (taskset -c 1, --cpus 1). The load generator busy-polls
# its used rings (its default), so CPU 1 is fully busy during a job by design.
#
# Output: a Markdown table (IOPS, MiB/s, mean and p99 latency, Tandem/qsd ratios) on stdout
# and in OUT.md when given; raw JSON lines beside it (OUT.md.jsonl).
#
# Environment: BENCH_FILE (default /var/tmp/tandem-bench.img), BENCH_FILE_SIZE (1G),
# QSD_AIO (io_uring; native as fallback), TANDEM_POLL_MODE (poll), CARGO (cargo).
set -euo pipefail

only=""
runtime="10s"
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --only) only="$2"; shift 2 ;;
        --runtime) runtime="$2"; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) out="$1"; shift ;;
    esac
done
case "$only" in ""|qsd|tandem) ;; *) echo "--only takes qsd or tandem" >&2; exit 2 ;; esac

root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/target/release/vhost-target"
bench_file="${BENCH_FILE:-/var/tmp/tandem-bench.img}"
file_size="${BENCH_FILE_SIZE:-1G}"
qsd_aio="${QSD_AIO:-io_uring}"
poll_mode="${TANDEM_POLL_MODE:-poll}"
null_blocks=2097152 # 1 GiB of 512-byte blocks, same size as the qsd null device

work="$(mktemp -d /tmp/tandem-bench.XXXXXX)"
results="$work/results.jsonl"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

log() { echo "loadgen-compare: $*" >&2; }

log "building (release)"
(cd "$root" && ${CARGO:-cargo} build --release -p vhost-target --bin vhost-target >&2)

# Write the file in full once: reads of holes or unwritten extents skip the disk.
want_bytes=$(numfmt --from=iec "$file_size")
if [ ! -f "$bench_file" ] || [ "$(stat -c %s "$bench_file")" != "$want_bytes" ]; then
    log "writing $bench_file ($file_size)"
    dd if=/dev/zero of="$bench_file" bs=1M count=$((want_bytes >> 20)) oflag=direct status=none
fi

wait_for_socket() {
    local path="$1"
    for _ in $(seq 1 200); do
        [ -S "$path" ] && return 0
        kill -0 "$server_pid" 2>/dev/null || { log "server died; see $work/*.log"; cat "$work"/*.log >&2; return 1; }
        sleep 0.05
    done
    log "no socket $path after 10s"
    return 1
}

stop_server() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}

# job name | loadgen flags
jobs=(
    "4k randread QD32|--rw randread --bs 4k --iodepth 32"
    "4k randwrite QD32|--rw randwrite --bs 4k --iodepth 32"
    "4k randread QD1|--rw randread --bs 4k --iodepth 1"
    "128k write QD32|--rw write --bs 128k --iodepth 32"
)

run_jobs() {
    local server="$1" device="$2" sock="$3" job name flags line
    for job in "${jobs[@]}"; do
        name="${job%%|*}"
        flags="${job#*|}"
        log "$server $device: $name"
        # shellcheck disable=SC2086 # flags are words on purpose
        # A job with errors still prints its JSON (then exits 1): keep it, the table
        # shows the error count.
        if ! line=$(taskset -c 1 "$bin" loadgen --socket "$sock" $flags --runtime "$runtime" \
            --cpus 1 --json); then
            log "$server $device: $name failed"
        fi
        [ -n "$line" ] || continue
        jq -c --arg s "$server" --arg d "$device" --arg j "$name" \
            '. + {server: $s, device: $d, job: $j}' <<<"$line" >>"$results"
    done
}

run_qsd() {
    local aio="$qsd_aio"
    # io_uring may be compiled out of a distribution's qsd; native AIO is the next best.
    qemu-storage-daemon --blockdev "driver=file,node-name=probe,filename=$bench_file,cache.direct=on,aio=$aio" \
        --export "type=vhost-user-blk,id=p,node-name=probe,addr.type=unix,addr.path=$work/probe.sock" \
        >"$work/probe.log" 2>&1 &
    local probe=$!
    sleep 0.5
    if ! kill -0 "$probe" 2>/dev/null; then
        log "qsd aio=$aio unavailable ($(head -1 "$work/probe.log")); using aio=native"
        aio=native
    else
        kill "$probe"; wait "$probe" 2>/dev/null || true
    fi
    rm -f "$work/probe.sock"
    log "starting qemu-storage-daemon on CPU 0 (aio=$aio)"
    taskset -c 0 qemu-storage-daemon \
        --blockdev driver=null-co,node-name=null0,size=$((null_blocks * 512)),read-zeroes=off \
        --blockdev "driver=file,node-name=file0,filename=$bench_file,cache.direct=on,aio=$aio" \
        --export "type=vhost-user-blk,id=exp-null,node-name=null0,addr.type=unix,addr.path=$work/qsd-null.sock,writable=on,num-queues=1" \
        --export "type=vhost-user-blk,id=exp-file,node-name=file0,addr.type=unix,addr.path=$work/qsd-file.sock,writable=on,num-queues=1" \
        >"$work/qsd.log" 2>&1 &
    server_pid=$!
    wait_for_socket "$work/qsd-null.sock"
    wait_for_socket "$work/qsd-file.sock"
    run_jobs qsd null "$work/qsd-null.sock"
    run_jobs qsd file "$work/qsd-file.sock"
    stop_server
}

run_tandem() {
    local rpc="$work/tandem-rpc.sock"
    log "starting vhost-target on CPU 0 (poll mode $poll_mode)"
    mkdir -p "$work/vhost"
    taskset -c 0 "$bin" serve -S "$work/vhost" -r "$rpc" -m 0x1 --poll-mode "$poll_mode" \
        >"$work/tandem.log" 2>&1 &
    server_pid=$!
    wait_for_socket "$rpc"
    "$bin" rpc -s "$rpc" bdev_null_create name=Null0 num_blocks=$null_blocks block_size=512 >/dev/null
    "$bin" rpc -s "$rpc" bdev_uring_create name=Uring0 filename="$bench_file" block_size=512 >/dev/null
    # One controller at a time: with polled workers, an idle controller on CPU 0 would
    # still take CPU 0 cycles from the one being measured.
    local dev bdev
    for dev in null file; do
        case "$dev" in null) bdev=Null0 ;; file) bdev=Uring0 ;; esac
        "$bin" rpc -s "$rpc" vhost_create_blk_controller ctrlr=vhost.$dev dev_name=$bdev cpumask=0x1 >/dev/null
        wait_for_socket "$work/vhost/vhost.$dev"
        run_jobs tandem $dev "$work/vhost/vhost.$dev"
        "$bin" rpc -s "$rpc" vhost_delete_controller ctrlr=vhost.$dev >/dev/null
    done
    stop_server
}

[ "$only" = "tandem" ] || run_qsd
[ "$only" = "qsd" ] || run_tandem

table=$(python3 - "$results" "$(nproc)" "$runtime" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {(r["server"], r["device"], r["job"]): r for r in rows}
keys = []
for r in rows:
    k = (r["device"], r["job"])
    if k not in keys:
        keys.append(k)
def f(v, fmt):
    return "-" if v is None else format(v, fmt)
def ratio(a, b):
    return "-" if a is None or b in (None, 0) else f"{a / b:.2f}"
print(f"Backend on CPU 0, loadgen (busy-poll) on CPU 1; {sys.argv[3]} per job; {sys.argv[2]} CPUs on this machine.")
print()
print("| device | job | qsd IOPS | qsd MiB/s | qsd lat mean/p99 us | Tandem IOPS | Tandem MiB/s | Tandem lat mean/p99 us | IOPS Tandem/qsd | mean lat Tandem/qsd | errors |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for dev, job in keys:
    q = by.get(("qsd", dev, job), {})
    t = by.get(("tandem", dev, job), {})
    lat = lambda r: "-" if not r else f"{r['lat_mean_us']:.1f} / {r['lat_p99_us']:.1f}"
    errs = sum(r.get("errors", 0) + r.get("verify_failures", 0) for r in (q, t) if r)
    print(f"| {dev} | {job} | {f(q.get('iops'), '.0f')} | {f(q.get('mib_s'), '.1f')} | {lat(q)} "
          f"| {f(t.get('iops'), '.0f')} | {f(t.get('mib_s'), '.1f')} | {lat(t)} "
          f"| {ratio(t.get('iops'), q.get('iops'))} | {ratio(t.get('lat_mean_us'), q.get('lat_mean_us'))} | {errs} |")
EOF
)
echo "$table"
if [ -n "$out" ]; then
    echo "$table" >"$out"
    cp "$results" "$out.jsonl"
    log "wrote $out and $out.jsonl"
fi
