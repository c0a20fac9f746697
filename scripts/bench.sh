#!/usr/bin/env bash
# The benchmark (BENCHMARKS.md): viewkeeper and PGSync side by side in one run, over the real
# Postgres and Redis of scripts/services.sh, with the machine's limits (pg_recvlogical,
# redis-benchmark) as baselines. Installs what it needs (idempotent): redis-tools for
# redis-benchmark (via services.sh), a Python venv with PGSync and the harness's clients, a
# release build of viewkeeper.
#
#   scripts/bench.sh            # the issue's sizes: 100,000 orders, 20,000 + 200,000 updates
#   scripts/bench.sh --quick    # smaller sizes (17 min on a fresh 2-core machine, with the 2,000,000-row transaction)
#   scripts/bench.sh --orders 50000 --stream-cache 100000 ...   (see scripts/bench.py --help)
#
# Results: target/bench/results.json (machine, workloads.{NAME}.{viewkeeper,pgsync},
# baselines, ratios) and target/bench/results.txt (the table, also printed); logs of every
# process in target/bench/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PGSYNC_VERSION=${VK_PGSYNC_VERSION:-7.3.0}
VENV=${VK_BENCH_VENV:-$ROOT/target/bench/venv}

echo "== servers" >&2
scripts/services.sh up postgres redis opensearch >&2
if ! command -v redis-benchmark >/dev/null; then
  echo "== installing redis-tools (redis-benchmark)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-tools >/dev/null
fi

if [[ ! -x $VENV/bin/pgsync ]] || ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('pgsync') == '$PGSYNC_VERSION'" 2>/dev/null; then
  echo "== Python venv with pgsync $PGSYNC_VERSION ($VENV)" >&2
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "pgsync==$PGSYNC_VERSION" psycopg2-binary redis
fi

echo "== release build of viewkeeper" >&2
cargo build --release --quiet --bin viewkeeper

exec "$VENV/bin/python" scripts/bench.py "$@"
