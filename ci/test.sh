#!/usr/bin/env bash
# The test command: what CI runs and what a newcomer runs on a fresh machine.
#
#   ci/test.sh
#
# 1. ci/install-deps.sh (skip with TANDEM_SKIP_INSTALL=1)
# 2. cargo fmt --check, cargo clippy -D warnings, cargo build of every target
# 3. doc tests, then every test with cargo-nextest (cargo test when nextest is absent); the
#    output ends with the test runner's summary.
#
# TANDEM_REQUIRE_GUEST=1 (the default here) makes the real-guest tests fail rather than skip
# when QEMU or a guest kernel is missing. Guest tests run one at a time (.config/nextest.toml).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TANDEM_REQUIRE_GUEST=${TANDEM_REQUIRE_GUEST:-1}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

t0=$(date +%s)
step() { echo "==> [$(($(date +%s) - t0))s] $*" >&2; }

if [[ "${TANDEM_SKIP_INSTALL:-0}" != 1 ]]; then
    step "ci/install-deps.sh"
    ci/install-deps.sh
fi

step "cargo fmt --all -- --check"
cargo fmt --all -- --check
step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo build --workspace --all-targets"
cargo build --workspace --all-targets

if cargo nextest --version >/dev/null 2>&1; then
    step "cargo test --workspace --doc"
    cargo test --workspace --doc
    profile=default
    [[ "${CI:-}" == true ]] && profile=ci
    step "cargo nextest run --workspace --profile $profile"
    cargo nextest run --workspace --profile "$profile"
else
    # cargo test runs the doc tests too, last, so its summary closes the output.
    step "cargo test --workspace (cargo-nextest not installed)"
    cargo test --workspace
fi
