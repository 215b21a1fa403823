#!/usr/bin/env bash
# CPU per write of each process during one `replicator bench --only PHASE` run: the bench
# process (the client) and every `replicator serve` child, from /proc/PID/stat over a 2 s
# window in the middle of the phase, divided by the writes of that window (the phase's
# IOPS x 2 s). Also the machine's idle share in the window. Not a test; numbers in
# docs/replication-performance.md ("Why the 4k ratio stops near 0.5 here").
#
#   ci/replicator-cpu-per-write.sh PHASE [more `replicator bench` flags, e.g. --solo]
#
# PHASE: 4k (the only one reported in IOPS). Needs target/release/replicator (cargo build
# --release -p replicator). DIR: $BENCH_DIR, default /dev/shm/replicator-cpu (tmpfs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
phase=${1:?usage: $0 PHASE [bench flags]}; shift
if [[ $phase != 4k ]]; then
  echo "$0: phase '$phase' is not supported: only 4k reports IOPS to divide by" >&2
  exit 2
fi
[[ -x target/release/replicator ]] || {
  echo "$0: target/release/replicator is missing: cargo build --release -p replicator" >&2
  exit 2
}
dir=${BENCH_DIR:-/dev/shm/replicator-cpu}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
RUST_LOG=warn target/release/replicator bench --dir "$dir" --seconds 6 --only "$phase" "$@" \
  >"$out" 2>&1 &
bench=$!
until grep -q "profiling phase ready" "$out"; do
  kill -0 "$bench" 2>/dev/null || { cat "$out"; exit 1; }
  sleep 0.1
done
sleep 1.5
servers=$(pgrep -P "$bench" -f "replicator.* serve" || true)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
idle() { awk '/^cpu /{print $5 + $6}' /proc/stat; }
declare -A before
for p in $bench $servers; do before[$p]=$(cpu "$p"); done
i0=$(idle)
sleep 2
declare -A used
for p in $bench $servers; do used[$p]=$(( $(cpu "$p") - ${before[$p]} )); done
i1=$(idle)
names=()
for p in $servers; do names+=("$(tr '\0' ' ' <"/proc/$p/cmdline" | grep -oE -- '--id [^ ]+' | cut -d' ' -f2)"); done
wait "$bench" || { echo "$0: the bench failed:" >&2; cat "$out" >&2; exit 1; }
result=$(grep -E "IOPS" "$out" | tail -1) || { echo "$0: the bench printed no IOPS:" >&2; cat "$out" >&2; exit 1; }
echo "$result"
iops=$(grep -oE '[0-9]+ IOPS' <<<"$result" | cut -d' ' -f1)
hz=$(getconf CLK_TCK)
ncpu=$(nproc)
line="client $(awk -v t="${used[$bench]}" -v hz="$hz" -v n="$iops" 'BEGIN{printf "%.1f", t/hz*1e6/(n*2)}') us"
k=0
for p in $servers; do
  line+=", ${names[$k]} $(awk -v t="${used[$p]}" -v hz="$hz" -v n="$iops" 'BEGIN{printf "%.1f", t/hz*1e6/(n*2)}') us"
  k=$((k + 1))
done
echo "CPU per write: $line; machine idle $(awk -v i=$((i1 - i0)) -v hz="$hz" -v c="$ncpu" 'BEGIN{printf "%.0f", i/hz/2/c*100}')%"
