-- The demo shop of DESIGN.md §5: three databases on one server, one per service.
--
--   psql -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 54329 -U postgres -d postgres -f config/shop.sql
--
-- (Re)creates identity, catalog and ordering from scratch: it drops the logical replication
-- slots left in those databases (terminating the walsenders that hold them), then the
-- databases themselves (terminating other sessions). Idempotent: run it as often as needed.
-- Also used by docker-compose.yml as a /docker-entrypoint-initdb.d script.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;

-- Database names default to the services' names; tests pass their own
-- (psql -v identity_db=t1_identity -v catalog_db=... -v ordering_db=...).
\if :{?identity_db} \else \set identity_db identity \endif
\if :{?catalog_db} \else \set catalog_db catalog \endif
\if :{?ordering_db} \else \set ordering_db ordering \endif
SELECT set_config('viewkeeper.dbs', :'identity_db' || ',' || :'catalog_db' || ',' || :'ordering_db', false) \gset

-- 1. Leftover replication slots. DROP DATABASE refuses while a logical slot of the database
--    exists, and an active slot cannot be dropped: terminate its walsender first (waiting up
--    to 5 s for it to exit), then drop; retry briefly in case the slot is released late.
SELECT count(pg_terminate_backend(active_pid, 5000)) AS terminated_walsenders
  FROM pg_replication_slots
 WHERE database = ANY (string_to_array(current_setting('viewkeeper.dbs'), ','))
   AND active_pid IS NOT NULL \gset

DO $$
DECLARE
  s record;
  tries int;
BEGIN
  FOR s IN SELECT slot_name FROM pg_replication_slots
            WHERE database = ANY (string_to_array(current_setting('viewkeeper.dbs'), ','))
  LOOP
    tries := 0;
    LOOP
      BEGIN
        PERFORM pg_drop_replication_slot(s.slot_name);
        EXIT;
      EXCEPTION
        WHEN undefined_object THEN EXIT;               -- already gone
        WHEN object_in_use THEN                         -- still held by a walsender
          tries := tries + 1;
          IF tries > 50 THEN RAISE; END IF;
          PERFORM pg_terminate_backend(active_pid, 1000)
             FROM pg_replication_slots
            WHERE slot_name = s.slot_name AND active_pid IS NOT NULL;
          PERFORM pg_sleep(0.1);
      END;
    END LOOP;
  END LOOP;
END
$$;

-- 2. The databases. WITH (FORCE) (PostgreSQL 13+) terminates other sessions connected to them.
DROP DATABASE IF EXISTS :"identity_db" WITH (FORCE);
DROP DATABASE IF EXISTS :"catalog_db" WITH (FORCE);
DROP DATABASE IF EXISTS :"ordering_db" WITH (FORCE);

-- psql -v drop_only=1 ... removes the shop and stops here (used by the tests' cleanup).
\if :{?drop_only}
\quit
\endif

CREATE DATABASE :"identity_db";
CREATE DATABASE :"catalog_db";
CREATE DATABASE :"ordering_db";

-- 3. identity: customers
\connect :identity_db
SET client_min_messages = warning;

CREATE TABLE customers (
  id          bigint PRIMARY KEY,
  name        text NOT NULL,
  email       text,
  created_at  timestamptz
);
-- Logical replication identifies updated/deleted rows by the primary key.
ALTER TABLE customers REPLICA IDENTITY DEFAULT;

-- 4. catalog: products (decommissioned means status = 'decommissioned')
\connect :catalog_db
SET client_min_messages = warning;

CREATE TABLE products (
  id           bigint PRIMARY KEY,
  sku          text UNIQUE NOT NULL,
  name         text NOT NULL,
  description  text,
  price        numeric(12,2) NOT NULL,
  status       text NOT NULL DEFAULT 'active',
  updated_at   timestamptz
);
ALTER TABLE products REPLICA IDENTITY DEFAULT;

-- 5. ordering: orders and order_items
\connect :ordering_db
SET client_min_messages = warning;

CREATE TABLE orders (
  id                bigint PRIMARY KEY,
  customer_id       bigint NOT NULL,
  status            text NOT NULL,
  total             numeric(12,2) NOT NULL,
  shipping_address  jsonb,
  created_at        timestamptz,
  updated_at        timestamptz
);
ALTER TABLE orders REPLICA IDENTITY DEFAULT;

CREATE TABLE order_items (
  order_id    bigint,
  line_no     int,
  product_id  bigint,
  qty         int,
  unit_price  numeric(12,2),
  PRIMARY KEY (order_id, line_no)
);
ALTER TABLE order_items REPLICA IDENTITY DEFAULT;

-- For the demo's lookups ("orders of customer X", "order lines of product Y"); the engine
-- resolves these joins from its own state store, the indexes serve backfill and verify.
CREATE INDEX orders_customer_id_idx ON orders (customer_id);
CREATE INDEX order_items_product_id_idx ON order_items (product_id);
