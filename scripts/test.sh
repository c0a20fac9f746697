#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one (idempotent):
#   1. installs what is missing (cargo-nextest, chromium; the servers' packages via services.sh),
#   2. starts the real servers on loopback (scripts/services.sh up),
#   3. checks formatting and lints, runs every test; tests that stop shared servers
#      (tests/outage.rs) run last, alone.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -E 'test(toast)'   # extra arguments go to the main nextest run
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# Headless Chromium renders the status page in tests/status_page.rs.
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium"
  SUDO=$([[ $(id -u) -eq 0 ]] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi

echo "== starting servers"
scripts/services.sh up postgres redis kafka opensearch

echo "== fmt and clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== tests"
cargo nextest run --workspace --no-fail-fast -E 'not binary(outage)' "$@"
if [[ $# -eq 0 ]]; then
  echo "== outage tests (alone: they stop shared servers)"
  cargo nextest run --workspace --no-fail-fast -j 1 -E 'binary(outage)'
fi
