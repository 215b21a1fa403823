#!/usr/bin/env bash
# Runs the virtio-blk request fuzzer for a while (default 60 s).
# cargo-fuzz needs nightly-only compiler flags; RUSTC_BOOTSTRAP lets the
# stable toolchain accept them, since no other toolchain can be installed here.
# The same harness also runs as a proptest in every `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/../vhost-target"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p fuzz/corpus/blk_request
RUSTC_BOOTSTRAP=1 cargo fuzz run blk_request fuzz/corpus/blk_request fuzz/seeds/blk_request \
  -- -max_total_time="$seconds"
