#!/usr/bin/env bash
# The demo (README Quick start): servers up, the shop schema loaded, the worker syncing the
# three service databases into the Redis caches, a generator of realistic changes, and a
# look at the result. Idempotent: every run starts the shop from scratch.
#
#   scripts/demo.sh                 # runs the generator for DEMO_SECONDS (default 30), shows
#                                   # the caches against Postgres, stops the worker
#   DEMO_KEEP=1 scripts/demo.sh     # leaves worker and generator running (stop: scripts/demo.sh stop)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=${VIEWKEEPER_SERVICES_DIR:-$ROOT/.services}/demo
PG="postgres://postgres@127.0.0.1:${VK_PG_PORT:-54329}"
RCLI=(redis-cli -p "${VK_REDIS_PORT:-63799}")
SECONDS_TO_RUN=${DEMO_SECONDS:-30}

stop() {
  for p in worker generator; do
    if [[ -f $STATE/$p.pid ]]; then kill "$(cat "$STATE/$p.pid")" 2>/dev/null || true; rm -f "$STATE/$p.pid"; fi
  done
}
if [[ ${1:-} == stop ]]; then stop; echo "demo stopped"; exit 0; fi

mkdir -p "$STATE"
stop
echo "== servers"
scripts/services.sh up postgres redis
echo "== building viewkeeper"
cargo build --quiet --bin viewkeeper
echo "== loading the shop schema (config/shop.sql) and clearing old cache keys"
psql -X -q -v ON_ERROR_STOP=1 -d "$PG/postgres" -f config/shop.sql
"${RCLI[@]}" --scan --pattern 'ordering:product:*' | xargs -r "${RCLI[@]}" del >/dev/null
"${RCLI[@]}" --scan --pattern 'storefront:*' | xargs -r "${RCLI[@]}" del >/dev/null
rm -rf "$STATE/data"

echo "== seeding: 200 customers, 100 products, 300 orders"
psql -X -q -v ON_ERROR_STOP=1 -d "$PG/identity" -c "
  INSERT INTO customers SELECT g, 'Customer ' || g, 'c' || g || '@example.com', now() FROM generate_series(1, 200) g"
psql -X -q -v ON_ERROR_STOP=1 -d "$PG/catalog" -c "
  INSERT INTO products(id, sku, name, description, price, status, updated_at)
  SELECT g, 'SKU-' || lpad(g::text, 4, '0'), (ARRAY['Widget','Gadget','Gizmo','Doohickey'])[1 + g % 4] || ' ' || g,
         'A fine product', round((random() * 100)::numeric, 2) + 1, CASE WHEN g % 17 = 0 THEN 'draft' ELSE 'active' END, now()
  FROM generate_series(1, 100) g"
psql -X -q -v ON_ERROR_STOP=1 -d "$PG/ordering" -c "
  INSERT INTO orders SELECT g, 1 + g % 200, (ARRAY['new','paid','shipped'])[1 + g % 3], 0, '{\"city\": \"Lisbon\"}', now(), now()
  FROM generate_series(1, 300) g;
  INSERT INTO order_items SELECT o, l, 1 + (o * 7 + l) % 100, 1 + l, 9.99 FROM generate_series(1, 300) o, generate_series(1, 3) l;
  UPDATE orders SET total = (SELECT sum(qty * unit_price) FROM order_items WHERE order_id = orders.id)"

echo "== starting the worker (log: $STATE/worker.log)"
target/debug/viewkeeper run --config config/shop.toml --data-dir "$STATE/data" >"$STATE/worker.log" 2>&1 &
echo $! >"$STATE/worker.pid"
# The worker creates its slots on start; changes made before that are not streamed
# (onboarding existing rows is `viewkeeper backfill`), so wait for the slots.
for _ in $(seq 100); do
  n=$(psql -X -Atq -d "$PG/postgres" -c "select count(*) from pg_replication_slots s join pg_stat_replication r on r.pid = s.active_pid
                                           where s.slot_name like 'viewkeeper\_%' and r.state = 'streaming'")
  [[ $n == 3 ]] && break
  sleep 0.2
done
[[ $n == 3 ]] || { echo "worker did not start; see $STATE/worker.log"; tail -5 "$STATE/worker.log"; exit 1; }
# Touch every seeded product once so the caches fill (stand-in for backfill until it exists).
psql -X -q -d "$PG/catalog" -c "UPDATE products SET updated_at = now()"

echo "== generator: price changes, decommissions, revivals, new and deleted products"
(
  i=1000
  while true; do
    i=$((i + 1))
    psql -X -q -d "$PG/catalog" -c "
      UPDATE products SET price = round((random() * 100)::numeric, 2) + 1, updated_at = now() WHERE id = 1 + floor(random() * 100)::int;
      UPDATE products SET status = 'decommissioned', updated_at = now() WHERE id = 1 + floor(random() * 100)::int AND random() < 0.3;
      UPDATE products SET status = 'active', updated_at = now() WHERE status = 'decommissioned' AND random() < 0.1;
      INSERT INTO products(id, sku, name, price) SELECT $i, 'NEW-$i', 'Novelty $i', 5 WHERE random() < 0.3;
      DELETE FROM products WHERE id > 1000 AND random() < 0.1;" >/dev/null 2>&1 || true
    sleep 0.5
  done
) &
echo $! >"$STATE/generator.pid"

if [[ ${DEMO_KEEP:-0} == 1 ]]; then
  echo
  echo "Running. Look at:"
  echo "  ${RCLI[*]} hgetall ordering:product:1"
  echo "  ${RCLI[*]} smembers storefront:products:active"
  echo "  tail -f $STATE/worker.log"
  echo "Stop with: scripts/demo.sh stop"
  exit 0
fi
echo "   running for ${SECONDS_TO_RUN}s ..."
sleep "$SECONDS_TO_RUN"
kill "$(cat "$STATE/generator.pid")" 2>/dev/null || true; rm -f "$STATE/generator.pid"

echo "== caught up? comparing every cache entry with Postgres"
ok=0
for _ in $(seq 60); do
  want=$(psql -X -Atq -d "$PG/catalog" -c "select coalesce(string_agg(id::text || '=' || price::text || '/' || status, ',' order by id), '') from products")
  have=$(psql -X -Atq -d "$PG/catalog" -c "select id from products order by id" | while read -r id; do
    printf '%s=%s/%s,' "$id" "$("${RCLI[@]}" hget "ordering:product:$id" price)" "$("${RCLI[@]}" hget "ordering:product:$id" status)"; done)
  active_want=$(psql -X -Atq -d "$PG/catalog" -c "select count(*) from products where status = 'active'")
  active_have=$("${RCLI[@]}" scard storefront:products:active)
  if [[ "$want," == "$have" && $active_want == "$active_have" ]]; then ok=1; break; fi
  sleep 0.5
done
echo
echo "products in Postgres: $(psql -X -Atq -d "$PG/catalog" -c 'select count(*) from products'), active: $active_want"
echo "storefront:products:active in Redis: $active_have members"
echo "ordering:product:1 →"; "${RCLI[@]}" hgetall ordering:product:1 | paste - -
dec=$(psql -X -Atq -d "$PG/catalog" -c "select id from products where status = 'decommissioned' limit 1")
if [[ -n $dec ]]; then echo "a decommissioned product, ordering:product:$dec →"; "${RCLI[@]}" hgetall "ordering:product:$dec" | paste - -; fi
gone=$("${RCLI[@]}" --scan --pattern 'ordering:product:10*' | head -50 | while read -r k; do
  id=${k##*:}; [[ $(psql -X -Atq -d "$PG/catalog" -c "select count(*) from products where id = $id") == 0 ]] && echo "$k" && break; done || true)
if [[ -n $gone ]]; then echo "a product deleted in Postgres, still known to the cache, $gone →"; "${RCLI[@]}" hgetall "$gone" | paste - -; fi
stop
if [[ $ok == 1 ]]; then echo; echo "Caches match Postgres. Worker log: $STATE/worker.log"; else echo "Caches did not match Postgres; see $STATE/worker.log"; exit 1; fi
