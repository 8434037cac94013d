#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this).
# Needs root (userfaultfd on shared memory, other users' credentials) and a
# Rust toolchain; it installs anything else it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
# Simulator schedules checked in CI (each a full random run with crashes).
export DSM_SIM_SEEDS="${DSM_SIM_SEEDS:-20000}"

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets --quiet -- -D warnings

echo "== build"
cargo build --release --workspace --all-targets --quiet

echo "== tests"
# Two test threads: each multi-node test runs three daemons and several
# spinning processes on this 2-core machine.
cargo test --release --workspace -- --test-threads=2
