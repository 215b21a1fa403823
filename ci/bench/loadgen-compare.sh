#!/usr/bin/env bash
# Compare Tandem's vhost-target with qemu-storage-daemon (qsd) as vhost-user-blk backends,
# measured by `vhost-target loadgen` (a guest-less vhost-user frontend; no VM, so TCG does
# not pollute the numbers).
#
# Usage: ci/bench/loadgen-compare.sh [--rounds 3] [--runtime 2s] [--only-device null|file]
#                                    [OUT.md]
#
# Both backends run for the whole benchmark, each pinned to CPU 0:
#   qsd:    one process, null-co (read-zeroes=off, the fair "null" peer: no memset on reads)
#           and file (cache.direct=on, aio=io_uring) exports, one virtqueue each
#   Tandem: `vhost-target serve -m 0x1`, bdev_null_create and bdev_uring_create on the same
#           file; for each job a controller (cpumask 0x1, one worker) is created in the mode
#           measured (poll, adaptive) and deleted afterwards, so no idle polled worker ever
#           shares CPU 0 with the backend being measured.
# Jobs, on each device: 4k randread QD32, 4k randwrite QD32, 4k randread QD1 (mean
# latency), 128k seq write QD32. The load generator runs on CPU 1 and busy-polls its used
# ring.
#
# Interleaving: every round runs each job against qsd, Tandem poll and Tandem adaptive back
# to back (the order rotates per round), so a ratio compares runs seconds apart. The table
# gives medians over rounds of IOPS and mean latency and the median of the per-round
# ratios with its range. On a shared 2-vCPU VM, throughput swings up to 2x within minutes
# (vCPU placement on the host, other tenants); a ratio from one run pair means little.
#
# Priority: on the null device the hot threads (every qsd thread, Tandem's queue worker,
# the load generator) run SCHED_FIFO 10 (BENCH_FIFO=0 turns it off) so builds running at
# nice 19 cannot take multi-millisecond slices from them. Tandem's control threads stay
# SCHED_OTHER (a FIFO control thread behind a FIFO busy-polling worker on one CPU never
# runs); they get the kernel's RT throttling share, so tearing a poll-mode session down can
# take up to a second. On the file device everything runs at nice -10 instead: the kernel
# threads that complete disk I/O must not be starved by FIFO spinners.
#
# Output: a Markdown table on stdout and in OUT.md when given; raw JSON lines beside it
# (OUT.md.jsonl). Environment: BENCH_FILE (default /var/tmp/tandem-bench.img),
# BENCH_FILE_SIZE (1G), QSD_AIO (io_uring; native as fallback), CARGO (cargo).
set -euo pipefail

rounds=3
runtime="2s"
only_device=""
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --runtime) runtime="$2"; shift 2 ;;
        --only-device) only_device="$2"; shift 2 ;;
        -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
        *) out="$1"; shift ;;
    esac
done

root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/target/release/vhost-target"
bench_file="${BENCH_FILE:-/var/tmp/tandem-bench.img}"
file_size="${BENCH_FILE_SIZE:-1G}"
qsd_aio="${QSD_AIO:-io_uring}"
fifo="${BENCH_FIFO:-1}"
null_blocks=2097152 # 1 GiB of 512-byte blocks, same size as the qsd null device

work="$(mktemp -d /tmp/tandem-bench.XXXXXX)"
results="$work/results.jsonl"
qsd_pid=""
tandem_pid=""
cleanup() {
    for p in $qsd_pid $tandem_pid; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
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

wait_for_socket() { # PATH PID
    for _ in $(seq 1 400); do
        [ -S "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || { log "server died"; cat "$work"/*.log >&2; return 1; }
        sleep 0.05
    done
    log "no socket $1 after 20s"
    return 1
}

rpc() { "$bin" rpc -s "$work/tandem-rpc.sock" -t 30 "$@" >/dev/null; }

# --- servers -------------------------------------------------------------------------------
aio="$qsd_aio"
# io_uring may be compiled out of a distribution's qsd; native AIO is the next best.
qemu-storage-daemon --blockdev "driver=file,node-name=probe,filename=$bench_file,cache.direct=on,aio=$aio" \
    --export "type=vhost-user-blk,id=p,node-name=probe,addr.type=unix,addr.path=$work/probe.sock" \
    >"$work/probe.log" 2>&1 &
probe=$!
sleep 0.5
if ! kill -0 "$probe" 2>/dev/null; then
    log "qsd aio=$aio unavailable ($(head -1 "$work/probe.log")); using aio=native"
    aio=native
else
    kill "$probe"; wait "$probe" 2>/dev/null || true
fi
rm -f "$work/probe.sock"

log "starting qemu-storage-daemon on CPU 0 (aio=$aio)"
nice -n -10 taskset -c 0 qemu-storage-daemon \
    --blockdev driver=null-co,node-name=null0,size=$((null_blocks * 512)),read-zeroes=off \
    --blockdev "driver=file,node-name=file0,filename=$bench_file,cache.direct=on,aio=$aio" \
    --export "type=vhost-user-blk,id=exp-null,node-name=null0,addr.type=unix,addr.path=$work/qsd-null.sock,writable=on,num-queues=1" \
    --export "type=vhost-user-blk,id=exp-file,node-name=file0,addr.type=unix,addr.path=$work/qsd-file.sock,writable=on,num-queues=1" \
    >"$work/qsd.log" 2>&1 &
qsd_pid=$!
wait_for_socket "$work/qsd-null.sock" "$qsd_pid"
wait_for_socket "$work/qsd-file.sock" "$qsd_pid"

log "starting vhost-target on CPU 0"
mkdir -p "$work/vhost"
nice -n -10 taskset -c 0 "$bin" serve -S "$work/vhost" -r "$work/tandem-rpc.sock" -m 0x1 \
    >"$work/tandem.log" 2>&1 &
tandem_pid=$!
wait_for_socket "$work/tandem-rpc.sock" "$tandem_pid"
rpc bdev_null_create name=Null0 num_blocks=$null_blocks block_size=512
rpc bdev_uring_create name=Uring0 filename="$bench_file" block_size=512

# Sets the scheduling class of every thread of PID (qsd) or of Tandem's queue workers.
set_prio() { # fifo|other PID [vq]
    local t comm
    for t in /proc/"$2"/task/*; do
        comm=$(cat "$t/comm" 2>/dev/null) || continue
        [ "${3:-}" = vq ] && [[ "$comm" != vq-* ]] && continue
        if [ "$1" = fifo ]; then chrt -f -p 10 "${t##*/}" >/dev/null
        else chrt -o -p 0 "${t##*/}" >/dev/null; fi
    done
}

# --- jobs ----------------------------------------------------------------------------------
# job name | loadgen flags
jobs=(
    "4k randread QD32|--rw randread --bs 4k --iodepth 32"
    "4k randwrite QD32|--rw randwrite --bs 4k --iodepth 32"
    "4k randread QD1|--rw randread --bs 4k --iodepth 1"
    "128k write QD32|--rw write --bs 128k --iodepth 32"
)
variants=(qsd tandem-poll tandem-adaptive)

run_one() { # VARIANT DEVICE ROUND JOB
    local variant="$1" device="$2" round="$3" job="$4" name flags sock bdev prio line ctrlr
    name="${job%%|*}"
    flags="${job#*|}"
    prio="nice -n -10"
    [ "$device" = null ] && [ "$fifo" = 1 ] && prio="chrt -f 10"
    case "$variant" in
        qsd) sock="$work/qsd-$device.sock" ;;
        tandem-*)
            case "$device" in null) bdev=Null0 ;; file) bdev=Uring0 ;; esac
            ctrlr="bench.$device.${variant#tandem-}"
            rpc vhost_create_blk_controller ctrlr="$ctrlr" dev_name=$bdev cpumask=0x1 \
                poll_mode="${variant#tandem-}"
            sock="$work/vhost/$ctrlr"
            wait_for_socket "$sock" "$tandem_pid"
            [ "$prio" = "chrt -f 10" ] && set_prio fifo "$tandem_pid" vq
            ;;
    esac
    # shellcheck disable=SC2086 # flags and prio are words on purpose
    # A job with errors still prints its JSON (then exits 1): keep it, the table shows it.
    if ! line=$($prio taskset -c 1 "$bin" loadgen --socket "$sock" $flags --runtime "$runtime" \
        --cpus 1 --json); then
        log "$variant $device: $name failed"
    fi
    if [ -n "$line" ]; then
        jq -c --arg s "$variant" --arg d "$device" --arg j "$name" --argjson r "$round" \
            '. + {server: $s, device: $d, job: $j, round: $r}' <<<"$line" >>"$results"
    fi
    if [ "$variant" != qsd ]; then rpc vhost_delete_controller ctrlr="$ctrlr"; fi
}

for device in null file; do
    [ -n "$only_device" ] && [ "$device" != "$only_device" ] && continue
    if [ "$device" = null ] && [ "$fifo" = 1 ]; then set_prio fifo "$qsd_pid"; else set_prio other "$qsd_pid"; fi
    for job in "${jobs[@]}"; do
        for round in $(seq 1 "$rounds"); do
            # Rotate the order so no variant always runs first (or right after a teardown).
            n=${#variants[@]}
            for k in $(seq 0 $((n - 1))); do
                v=${variants[$(((k + round) % n))]}
                log "round $round $device ${job%%|*}: $v"
                run_one "$v" "$device" "$round" "$job"
            done
        done
    done
done
load=$(cut -d' ' -f1-3 /proc/loadavg)

table=$(python3 - "$results" "$(nproc)" "$runtime" "$rounds" "$load" "$fifo" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
runtime, rounds, load, fifo = sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "1"
keys = []
for r in rows:
    k = (r["device"], r["job"])
    if k not in keys:
        keys.append(k)
def get(server, dev, job):
    return {r["round"]: r for r in rows if (r["server"], r["device"], r["job"]) == (server, dev, job)}
def med(xs):
    return statistics.median(xs) if xs else None
def ratios(a, b, field):
    out = [a[k][field] / b[k][field] for k in a if k in b and b[k][field]]
    return out
def fr(xs):
    if not xs:
        return "-"
    return f"{med(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"
print(f"Backends on CPU 0, loadgen (busy-poll) on CPU 1; {rounds} interleaved rounds of {runtime} "
      f"per job and backend; {sys.argv[2]} CPUs; load average at the end {load}; "
      f"null jobs {'SCHED_FIFO 10' if fifo else 'nice -10'}, file jobs nice -10.")
print()
print("| device | job | qsd IOPS | Tandem poll IOPS | Tandem adaptive IOPS | qsd / poll / adaptive mean lat us | IOPS poll/qsd | IOPS adaptive/qsd | mean lat poll/qsd | mean lat adaptive/qsd | errors |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for dev, job in keys:
    q, p, a = (get(s, dev, job) for s in ("qsd", "tandem-poll", "tandem-adaptive"))
    def m(d, f, fmt):
        v = med([r[f] for r in d.values()])
        return "-" if v is None else format(v, fmt)
    errs = sum(r.get("errors", 0) + r.get("verify_failures", 0) for d in (q, p, a) for r in d.values())
    print(f"| {dev} | {job} | {m(q, 'iops', '.0f')} | {m(p, 'iops', '.0f')} | {m(a, 'iops', '.0f')} "
          f"| {m(q, 'lat_mean_us', '.1f')} / {m(p, 'lat_mean_us', '.1f')} / {m(a, 'lat_mean_us', '.1f')} "
          f"| {fr(ratios(p, q, 'iops'))} | {fr(ratios(a, q, 'iops'))} "
          f"| {fr(ratios(p, q, 'lat_mean_us'))} | {fr(ratios(a, q, 'lat_mean_us'))} | {errs} |")
print()
print("Ratios: median over rounds of the per-round ratio (range in brackets). Medians of p50 latency (us):")
print()
for dev, job in keys:
    parts = []
    for s in ("qsd", "tandem-poll", "tandem-adaptive"):
        v = med([r["lat_p50_us"] for r in get(s, dev, job).values()])
        parts.append(f"{s} {v:.1f}" if v is not None else f"{s} -")
    print(f"- {dev} {job}: " + ", ".join(parts))
EOF
)
echo "$table"
if [ -n "$out" ]; then
    echo "$table" >"$out"
    cp "$results" "$out.jsonl"
    log "wrote $out and $out.jsonl"
fi
