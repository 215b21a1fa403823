#!/usr/bin/env bash
# Lease renewal benchmark of the authority: a 1-member and a 3-member group on loopback,
# release build, fsync on (the stores always fsync). Not a test: prints numbers.
#
#   ci/bench-authority.sh [SECONDS] [VOLUMES] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-10}; vols=${2:-512}; conns=${3:-4}
cargo build --release -p authority --bin authority --example lease_bench >&2
bin=target/release/authority
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

run() { # N base_port
    local n=$1 base=$2 members="" addrs=""
    for i in $(seq 1 "$n"); do
        members+="${members:+,}$i=127.0.0.1:$((base + 2*i + 1))=127.0.0.1:$((base + 2*i))"
        addrs+="${addrs:+,}127.0.0.1:$((base + 2*i))"
    done
    pids=()
    for i in $(seq 1 "$n"); do
        "$bin" serve --node-id "$i" --data-dir "$tmp/$n-$i" --rpc-addr "127.0.0.1:$((base + 2*i))" \
            --raft-addr "127.0.0.1:$((base + 2*i + 1))" --unix-socket none --members "$members" \
            2>"$tmp/$n-$i.log" &
        pids+=($!)
    done
    sleep 3
    echo "== $n-member group (fsync on), $vols volumes, $conns connections, ${secs}s"
    target/release/examples/lease_bench --addrs "$addrs" --volumes "$vols" --connections "$conns" --seconds "$secs"
    for p in "${pids[@]}"; do kill "$p"; done
    wait 2>/dev/null || true
}
run 1 17400
run 3 17500
