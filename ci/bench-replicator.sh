#!/usr/bin/env bash
# Replication benchmark: writes through the client library (ReplicationPipeline) to two
# `replicator serve` processes on loopback (real authority, in the bench process), against
# the same client writing to one server without a secondary and the store written in this
# process, in interleaved rounds; then catch-up and rebuild throughput. Not a test: prints Markdown (docs/replication-performance.md).
#
#   ci/bench-replicator.sh [DIR] [ROUNDS] [SECONDS] [-- more `replicator bench` flags]
#
# DIR (default target/bench-replicator) is emptied first; it must be on the disk under test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=${1:-target/bench-replicator}; rounds=${2:-3}; secs=${3:-3}
shift $(( $# < 3 ? $# : 3 )); [[ ${1:-} == -- ]] && shift
nice -n 19 cargo build --release -p replicator >&2
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r); load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
RUST_LOG=${RUST_LOG:-warn} target/release/replicator bench --dir "$dir" --rounds "$rounds" --seconds "$secs" "$@"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
