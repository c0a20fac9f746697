#!/usr/bin/env bash
# The demo (README Quick start): servers up, the shop schema loaded and seeded, the worker
# syncing the three service databases into the Redis caches and the orders_view search
# index, a generator of realistic changes, and a look at the result. Idempotent: every run
# starts the shop from scratch.
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
ES="http://127.0.0.1:${VK_OPENSEARCH_PORT:-19200}"
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
scripts/services.sh up postgres redis opensearch
echo "== building viewkeeper"
cargo build --quiet --bin viewkeeper
echo "== loading the shop schema (config/shop.sql) and clearing old cache keys"
psql -X -q -v ON_ERROR_STOP=1 -d "$PG/postgres" -f config/shop.sql
"${RCLI[@]}" --scan --pattern 'ordering:product:*' | xargs -r "${RCLI[@]}" del >/dev/null
"${RCLI[@]}" --scan --pattern 'storefront:*' | xargs -r "${RCLI[@]}" del >/dev/null
curl -s -o /dev/null -X DELETE "$ES/orders_view_v*" || true
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
# The worker creates its slots on start, reads the seeded rows under their snapshots
# (initial snapshot), then streams; wait until it streams from all three.
for _ in $(seq 100); do
  n=$(psql -X -Atq -d "$PG/postgres" -c "select count(*) from pg_replication_slots s join pg_stat_replication r on r.pid = s.active_pid
                                           where s.slot_name like 'viewkeeper\_%' and r.state = 'streaming'")
  [[ $n == 3 ]] && break
  sleep 0.2
done
[[ $n == 3 ]] || { echo "worker did not start; see $STATE/worker.log"; tail -5 "$STATE/worker.log"; exit 1; }

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
      DELETE FROM products WHERE id > 1000 AND random() < 0.1;
      UPDATE products SET name = name || '*' WHERE id = 1 + floor(random() * 100)::int AND random() < 0.2;" >/dev/null 2>&1 || true
    psql -X -q -d "$PG/ordering" -c "
      UPDATE orders SET status = (ARRAY['paid','shipped','delivered'])[1 + floor(random() * 3)::int], updated_at = now()
       WHERE id = 1 + floor(random() * 300)::int;
      INSERT INTO orders SELECT $i, 1 + floor(random() * 200)::int, 'new', 19.98, '{\"city\": \"Porto\"}', now(), now();
      INSERT INTO order_items VALUES ($i, 1, 1 + floor(random() * 100)::int, 2, 9.99);" >/dev/null 2>&1 || true
    psql -X -q -d "$PG/identity" -c "
      UPDATE customers SET email = 'moved' || floor(random() * 1000)::int || '@example.com' WHERE id = 1 + floor(random() * 200)::int" >/dev/null 2>&1 || true
    sleep 0.5
  done
) &
echo $! >"$STATE/generator.pid"

if [[ ${DEMO_KEEP:-0} == 1 ]]; then
  echo
  echo "Running. Look at:"
  echo "  ${RCLI[*]} hgetall ordering:product:1"
  echo "  ${RCLI[*]} smembers storefront:products:active"
  echo "  curl -s '$ES/orders_view/_doc/1?pretty'"
  echo "  curl -s '$ES/orders_view/_search?size=0&pretty' -H 'content-type: application/json' -d '{\"aggs\":{\"s\":{\"terms\":{\"field\":\"status\"}}}}'"
  echo "  curl -s 127.0.0.1:9464/metrics | grep ^viewkeeper_"
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
echo
echo "== orders_view (alias over orders_view_v1 in the search server)"
for _ in $(seq 60); do
  curl -s -o /dev/null -X POST "$ES/orders_view/_refresh"
  docs=$(curl -s "$ES/orders_view/_count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')
  orders=$(psql -X -Atq -d "$PG/ordering" -c "select count(*) from orders")
  [[ $docs == "$orders" ]] && break
  sleep 0.5
done
echo "orders in Postgres: $orders, documents behind orders_view: $docs"
[[ $docs == "$orders" ]] || ok=0
echo "order 1, joined across identity, catalog and ordering →"
curl -s "$ES/orders_view/_doc/1" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["_source"], indent=2, ensure_ascii=False))'
echo "orders by status (terms aggregation) →"
curl -s "$ES/orders_view/_search" -H 'content-type: application/json' \
  -d '{"size":0,"aggs":{"s":{"terms":{"field":"status"}},"t":{"sum":{"field":"total"}}}}' |
  python3 -c 'import json,sys; a=json.load(sys.stdin)["aggregations"]; print({b["key"]: b["doc_count"] for b in a["s"]["buckets"]}, "total:", round(a["t"]["value"], 2))'
echo "same in SQL →"
psql -X -Atq -d "$PG/ordering" -c "select string_agg(status || '=' || n, ' ' order by status) || '  total: ' || (select sum(total) from orders) from (select status, count(*) n from orders group by status) s"
stop
if [[ $ok == 1 ]]; then echo; echo "Caches and orders_view match Postgres. Worker log: $STATE/worker.log"; else echo "Read models did not match Postgres; see $STATE/worker.log"; exit 1; fi
