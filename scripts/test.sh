#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this).
# Needs root (userfaultfd on shared memory, other users' credentials) and a
# Rust toolchain; it installs anything else it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
# Simulator schedules checked in CI (each a full random run with crashes).
export DSM_SIM_SEEDS="${DSM_SIM_SEEDS:-20000}"

echo "== packages the real-program and partition tests run"
# Apache (prefork, SysV accept mutex), PHP (opcache in a SysV segment),
# PostgreSQL 15, ab and curl; nftables for one-way and partial network
# cuts; tmux; installed when missing.
need=()
command -v apache2 >/dev/null || [ -x /usr/sbin/apache2 ] || need+=(apache2)
command -v ab >/dev/null || need+=(apache2-utils)
[ -e /usr/lib/apache2/modules/libphp8.2.so ] || need+=(libapache2-mod-php)
command -v curl >/dev/null || need+=(curl)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need+=(nftables)
# tmux: `omctl top`'s live view is read off a real terminal's screen.
command -v tmux >/dev/null || need+=(tmux)
# php-cli: balance-bench times its PHP page with it.
command -v php >/dev/null || need+=(php-cli)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null; }
        # Packages may start their default servers: the tests run their
        # own, so stop those we just caused to start.
        if printf '%s\n' "${need[@]}" | grep -q '^apache2$'; then
            apache2ctl stop >/dev/null 2>&1 || true
        fi
        if printf '%s\n' "${need[@]}" | grep -q '^postgresql'; then
            pg_ctlcluster 15 main stop >/dev/null 2>&1 || true
        fi
    else
        echo "cannot install ${need[*]} (not root or no apt-get): those tests will say so and skip"
    fi
fi

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets --quiet -- -D warnings

echo "== build"
cargo build --release --workspace --all-targets --quiet

echo "== tests"
# Two test threads: each multi-node test runs three daemons and several
# spinning processes on this 2-core machine.
cargo test --release --workspace -- --test-threads=2
