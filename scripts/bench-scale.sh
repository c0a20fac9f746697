#!/usr/bin/env bash
# Throughput of 1, 2 and 3 workers over a partitioned Debezium source (BENCHMARKS.md,
# "Several workers"): the ignored test `bench_workers` of tests/scale.rs driving the
# release build of the worker (VK_WORKER_BIN), against the loopback servers.
# VK_SCALE_ORDERS (default 20000), VK_SCALE_ROUNDS (default 1) and VK_SCALE_WORKERS
# (default 1,2,3) size it. Prints one JSON line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh up postgres redis kafka opensearch >&2
cargo build --release --bin viewkeeper >&2
VK_WORKER_BIN="$PWD/target/release/viewkeeper" \
  cargo nextest run --test scale --run-ignored only -E 'test(bench_workers)' --no-capture 2>/dev/null \
  | grep '^{"'
