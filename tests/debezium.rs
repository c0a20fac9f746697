//! The Debezium source end to end: a producer here writes Debezium-shaped change events
//! (JsonConverter with schemas, precise decimals, ZonedTimestamp, Json) for the shop
//! into the real broker, and the worker (`config/shop-debezium.toml`) must build the same
//! caches and `orders_view` as from Postgres.
//!
//! Ground truth: every event is made from a statement run on the shop's Postgres
//! databases (`RETURNING` the rows), so the databases hold exactly the state the events
//! describe and the comparisons of the Postgres tests apply unchanged. No worker reads
//! those databases here: the only path into the read models is the broker.

mod common;

use base64::Engine as _;
use common::orders::*;
use common::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Map, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, PartialEq)]
enum Ty {
    I64,
    I32,
    Text,
    /// numeric(12,2): Connect Decimal, base64 unscaled (decimal.handling.mode=precise).
    Dec2,
    /// timestamptz: io.debezium.time.ZonedTimestamp.
    Zoned,
    /// jsonb: io.debezium.data.Json, JSON text in a string.
    Json,
}

struct Table {
    service: &'static str,
    name: &'static str,
    key: &'static [&'static str],
    cols: &'static [(&'static str, Ty)],
    partitions: i32,
}

const CUSTOMERS: Table = Table {
    service: "identity",
    name: "customers",
    key: &["id"],
    cols: &[
        ("id", Ty::I64),
        ("name", Ty::Text),
        ("email", Ty::Text),
        ("created_at", Ty::Zoned),
    ],
    partitions: 1,
};
const PRODUCTS: Table = Table {
    service: "catalog",
    name: "products",
    key: &["id"],
    cols: &[
        ("id", Ty::I64),
        ("sku", Ty::Text),
        ("name", Ty::Text),
        ("description", Ty::Text),
        ("price", Ty::Dec2),
        ("status", Ty::Text),
        ("updated_at", Ty::Zoned),
    ],
    partitions: 2,
};
const ORDERS: Table = Table {
    service: "ordering",
    name: "orders",
    key: &["id"],
    cols: &[
        ("id", Ty::I64),
        ("customer_id", Ty::I64),
        ("status", Ty::Text),
        ("total", Ty::Dec2),
        ("shipping_address", Ty::Json),
        ("created_at", Ty::Zoned),
        ("updated_at", Ty::Zoned),
    ],
    partitions: 2,
};
const ITEMS: Table = Table {
    service: "ordering",
    name: "order_items",
    key: &["order_id", "line_no"],
    cols: &[
        ("order_id", Ty::I64),
        ("line_no", Ty::I32),
        ("product_id", Ty::I64),
        ("qty", Ty::I32),
        ("unit_price", Ty::Dec2),
    ],
    partitions: 2,
};

fn field_schema(col: &str, ty: Ty, optional: bool) -> Value {
    let mut s = match ty {
        Ty::I64 => json!({"type": "int64"}),
        Ty::I32 => json!({"type": "int32"}),
        Ty::Text => json!({"type": "string"}),
        Ty::Dec2 => json!({"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "version": 1,
                           "parameters": {"scale": "2", "connect.decimal.precision": "12"}}),
        Ty::Zoned => json!({"type": "string", "name": "io.debezium.time.ZonedTimestamp", "version": 1}),
        Ty::Json => json!({"type": "string", "name": "io.debezium.data.Json", "version": 1}),
    };
    s["optional"] = json!(optional);
    s["field"] = json!(col);
    s
}

/// Big-endian two's complement, as few bytes as possible (Connect's Decimal).
fn unscaled_base64(v: i64) -> String {
    let bytes = v.to_be_bytes();
    let mut start = 0;
    while start < 7 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    base64::engine::general_purpose::STANDARD.encode(&bytes[start..])
}

/// A column of `row_to_json` output as Debezium encodes it.
fn encode(v: &Value, ty: Ty) -> Value {
    if v.is_null() {
        return Value::Null;
    }
    match ty {
        Ty::I64 | Ty::I32 | Ty::Text => v.clone(),
        Ty::Dec2 => json!(unscaled_base64((v.as_f64().unwrap() * 100.0).round() as i64)),
        Ty::Zoned => {
            let t = chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
            json!(t
                .with_timezone(&chrono::Utc)
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        }
        Ty::Json => json!(v.to_string()),
    }
}

/// The broker side of a test: topics for the shop, a producer, and the positions each
/// service's connector would give its events.
struct Debezium {
    prefix: String,
    producer: FutureProducer,
    /// Per service: (LSN of the last commit, next LSN).
    lsn: std::collections::HashMap<&'static str, (u64, u64)>,
    /// Records produced per topic.
    produced: std::collections::HashMap<String, i64>,
}

impl Debezium {
    async fn new(shop: &Shop) -> Debezium {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &servers().kafka);
        let admin: AdminClient<DefaultClientContext> = cfg.create().unwrap();
        let prefix = shop.prefix.clone();
        let topics: Vec<(String, i32)> = [&CUSTOMERS, &PRODUCTS, &ORDERS, &ITEMS]
            .iter()
            .map(|t| (format!("{prefix}_{}.public.{}", t.service, t.name), t.partitions))
            .collect();
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(n, p)| NewTopic::new(n, *p, TopicReplication::Fixed(1)))
            .collect();
        for r in admin.create_topics(&new, &AdminOptions::new()).await.unwrap() {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &servers().kafka)
            .set("message.timeout.ms", "30000")
            .create()
            .unwrap();
        let lsn = ["identity", "catalog", "ordering"]
            .into_iter()
            .map(|s| (s, (0, 0x1000_0000)))
            .collect();
        Debezium {
            prefix,
            producer,
            lsn,
            produced: Default::default(),
        }
    }

    fn topic(&self, t: &Table) -> String {
        format!("{}_{}.public.{}", self.prefix, t.service, t.name)
    }

    fn key_of(&self, t: &Table, row: &Map<String, Value>) -> String {
        let fields: Vec<Value> = t
            .key
            .iter()
            .map(|k| field_schema(k, t.cols.iter().find(|(c, _)| c == k).unwrap().1, false))
            .collect();
        let payload: Map<String, Value> = t.key.iter().map(|k| (k.to_string(), row[*k].clone())).collect();
        json!({"schema": {"type": "struct", "optional": false, "fields": fields,
                          "name": format!("{}.Key", self.topic(t))},
               "payload": payload})
        .to_string()
    }

    fn envelope(&self, t: &Table, op: &str, before: Value, after: Value, seq: (Option<u64>, u64)) -> String {
        let value_schema = |f: &str| {
            let fields: Vec<Value> = t
                .cols
                .iter()
                .map(|(c, ty)| field_schema(c, *ty, !t.key.contains(c)))
                .collect();
            json!({"type": "struct", "optional": true, "fields": fields,
                   "name": format!("{}.Value", self.topic(t)), "field": f})
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let source = json!({
            "version": "3.0.0.Final", "connector": "postgresql", "name": format!("{}_{}", self.prefix, t.service),
            "ts_ms": now, "snapshot": if op == "r" { "true" } else { "false" }, "db": t.service, "schema": "public",
            "table": t.name, "txId": 1000, "lsn": seq.1, "xmin": null,
            "sequence": json!([seq.0.map(|l| l.to_string()), seq.1.to_string()]).to_string(),
        });
        let source_schema = json!({"type": "struct", "optional": false, "name": "io.debezium.connector.postgresql.Source",
            "field": "source", "fields": [
                {"type": "string", "optional": false, "field": "version"},
                {"type": "string", "optional": false, "field": "connector"},
                {"type": "string", "optional": false, "field": "name"},
                {"type": "int64", "optional": false, "field": "ts_ms"},
                {"type": "string", "optional": true, "field": "snapshot"},
                {"type": "string", "optional": false, "field": "db"},
                {"type": "string", "optional": true, "field": "sequence"},
                {"type": "string", "optional": false, "field": "schema"},
                {"type": "string", "optional": false, "field": "table"},
                {"type": "int64", "optional": true, "field": "txId"},
                {"type": "int64", "optional": true, "field": "lsn"},
                {"type": "int64", "optional": true, "field": "xmin"}]});
        json!({
            "schema": {"type": "struct", "optional": false, "name": format!("{}.Envelope", self.topic(t)),
                       "fields": [value_schema("before"), value_schema("after"), source_schema,
                                  {"type": "string", "optional": false, "field": "op"},
                                  {"type": "int64", "optional": true, "field": "ts_ms"}]},
            "payload": {"before": before, "after": after, "source": source, "op": op, "ts_ms": now},
        })
        .to_string()
    }

    fn encode_row(t: &Table, row: &Map<String, Value>) -> Value {
        Value::Object(
            t.cols
                .iter()
                .map(|(c, ty)| (c.to_string(), encode(&row[*c], *ty)))
                .collect(),
        )
    }

    async fn send(&mut self, topic: &str, key: &str, value: Option<&str>) {
        *self.produced.entry(topic.to_string()).or_default() += 1;
        let mut rec = FutureRecord::<str, str>::to(topic).key(key);
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        self.producer
            .send(rec, Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
    }

    /// Runs `sql` (one INSERT/UPDATE/DELETE on `t`) in Postgres and produces what
    /// Debezium would: `c`/`u`, or `d` (before = the key only, as with REPLICA IDENTITY
    /// DEFAULT) and then a tombstone. `unavailable`: columns sent as the TOAST placeholder.
    /// Returns the events produced (key, value) for redelivery.
    async fn dml(&mut self, shop: &Shop, t: &Table, sql: &str, unavailable: &[&str]) -> Vec<(String, String)> {
        let rows = returning(shop, t, sql).await;
        let op = match sql.split_whitespace().next().unwrap().to_ascii_uppercase().as_str() {
            "INSERT" => "c",
            "UPDATE" => "u",
            "DELETE" => "d",
            other => panic!("not DML: {other}"),
        };
        let (last, next) = self.lsn[t.service];
        let mut lsn = next;
        let mut out = vec![];
        for row in &rows {
            let key = self.key_of(t, row);
            let mut image = Self::encode_row(t, row);
            for c in unavailable {
                image[*c] = json!("__debezium_unavailable_value");
            }
            let value = if op == "d" {
                let before: Map<String, Value> = t
                    .cols
                    .iter()
                    .map(|(c, _)| {
                        (
                            c.to_string(),
                            if t.key.contains(c) {
                                image[*c].clone()
                            } else {
                                Value::Null
                            },
                        )
                    })
                    .collect();
                self.envelope(t, op, Value::Object(before), Value::Null, (Some(last), lsn))
            } else {
                self.envelope(t, op, Value::Null, image, (Some(last), lsn))
            };
            self.send(&self.topic(t), &key, Some(&value)).await;
            if op == "d" {
                self.send(&self.topic(t), &key, None).await;
            }
            out.push((key, value));
            lsn += 8;
        }
        self.lsn.insert(t.service, (lsn, lsn + 0x1000));
        out
    }

    /// Debezium's initial snapshot of `t`: an `r` event per row, at one LSN.
    async fn snapshot(&mut self, shop: &Shop, t: &Table) {
        let rows = returning(shop, t, &format!("SELECT * FROM {}", t.name)).await;
        let (_, next) = self.lsn[t.service];
        for row in &rows {
            let value = self.envelope(t, "r", Value::Null, Self::encode_row(t, row), (None, next));
            self.send(&self.topic(t), &self.key_of(t, row), Some(&value)).await;
        }
        // Streaming goes on after the snapshot's position.
        self.lsn.insert(t.service, (next, next + 0x1000));
    }
}

/// The rows a statement returns (`RETURNING *`, or a SELECT), as `row_to_json` objects.
async fn returning(shop: &Shop, t: &Table, sql: &str) -> Vec<Map<String, Value>> {
    let q = if sql.trim_start().to_ascii_uppercase().starts_with("SELECT") {
        format!("SELECT row_to_json(r)::text FROM ({sql}) r")
    } else {
        format!("WITH r AS ({sql} RETURNING *) SELECT row_to_json(r)::text FROM r")
    };
    let c = shop.pg(t.service).await;
    c.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();
    c.query(&q, &[])
        .await
        .unwrap_or_else(|e| panic!("{q}: {e}"))
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect()
}

async fn alias_count(shop: &Shop) -> u64 {
    let v: Value = reqwest::get(format!("{}/{}/_count", servers().search, shop.alias()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["count"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_topics_build_the_same_read_models_through_kill_and_restart() {
    let shop = Shop::new("dbz").await;
    let mut dbz = Debezium::new(&shop).await;
    let mut mem = Remembered::default();

    // The connectors' initial snapshots (op r), before any worker ran.
    shop.exec("identity", "INSERT INTO customers SELECT g, 'Customer ' || g, 'c' || g || '@example.com', timestamptz '2026-01-01 10:00:00.123456+00' + g * interval '1 day' FROM generate_series(1, 20) g").await;
    shop.exec("catalog", "INSERT INTO products(id, sku, name, description, price, status, updated_at) SELECT g, 'SKU-' || g, 'Product ' || g, repeat('long text ', 50), g + 0.25, 'active', now() FROM generate_series(1, 10) g").await;
    shop.exec("ordering", "INSERT INTO orders SELECT g, 1 + g % 20, 'new', g * 1.10, jsonb_build_object('city', 'Lisbon', 'zip', g), timestamptz '2026-02-01 08:00:00+00' + g * interval '1 hour', now() FROM generate_series(1, 30) g;
                           INSERT INTO order_items SELECT o, l, 1 + (o + l) % 10, l, 2.50 FROM generate_series(1, 30) o, generate_series(1, 3) l").await;
    for t in [&CUSTOMERS, &PRODUCTS, &ORDERS, &ITEMS] {
        dbz.snapshot(&shop, t).await;
    }
    let cfg = shop.config_from("shop-debezium.toml", "");
    let data = shop.data_dir.path().join("data");
    let mut w = Worker::start(&cfg, &data);
    converge(&shop, T).await;
    converge_orders(&shop, &mem, T).await;

    // Streaming, interleaved across topics: an order's items before the order itself.
    dbz.dml(
        &shop,
        &ITEMS,
        "INSERT INTO order_items VALUES (31, 1, 2, 1, 3.50), (31, 2, 5, 2, 1.25)",
        &[],
    )
    .await;
    dbz.dml(
        &shop,
        &CUSTOMERS,
        "UPDATE customers SET email = 'new3@example.com' WHERE id = 3",
        &[],
    )
    .await;
    dbz.dml(
        &shop,
        &ORDERS,
        "INSERT INTO orders VALUES (31, 3, 'new', 6.00, '{\"city\": \"Porto\"}', now(), now())",
        &[],
    )
    .await;
    // Unchanged TOAST values arrive as placeholders: the stored values stay.
    dbz.dml(
        &shop,
        &ORDERS,
        "UPDATE orders SET status = 'paid', updated_at = now() WHERE id IN (1, 2)",
        &["shipping_address"],
    )
    .await;
    let old_price = dbz
        .dml(
            &shop,
            &PRODUCTS,
            "UPDATE products SET price = price + 1 WHERE id = 2",
            &["description"],
        )
        .await;
    dbz.dml(
        &shop,
        &PRODUCTS,
        "UPDATE products SET price = price + 1, name = 'Renamed 2' WHERE id = 2",
        &["description"],
    )
    .await;
    // Decommission, delete (with its Kafka tombstone), a deleted order line.
    dbz.dml(
        &shop,
        &PRODUCTS,
        "UPDATE products SET status = 'decommissioned' WHERE id = 3",
        &[],
    )
    .await;
    mem.deleted_products.insert(4, ("SKU-4".into(), "Product 4".into()));
    dbz.dml(&shop, &PRODUCTS, "DELETE FROM products WHERE id = 4", &[])
        .await;
    dbz.dml(
        &shop,
        &ITEMS,
        "DELETE FROM order_items WHERE order_id = 5 AND line_no = 2",
        &[],
    )
    .await;
    // A malformed record, then a change behind it in the same partition (same key).
    let key5 = dbz.key_of(&ORDERS, json!({"id": 5}).as_object().unwrap());
    dbz.send(
        &dbz.topic(&ORDERS),
        &key5,
        Some("{\"payload\": {\"op\": \"u\", \"after\": "),
    )
    .await;
    dbz.dml(&shop, &ORDERS, "UPDATE orders SET status = 'shipped' WHERE id = 5", &[])
        .await;
    // A redelivered older event (a connector restart) must not undo the newer price.
    for (k, v) in &old_price {
        dbz.send(&dbz.topic(&PRODUCTS), k, Some(v)).await;
    }
    converge(&shop, T).await;
    converge_orders(&shop, &mem, T).await;
    let letters = shop.dead_letters();
    let orders_topic = dbz.topic(&ORDERS);
    assert!(
        letters
            .iter()
            .any(|(tbl, _, reason)| tbl == "orders" && reason.contains("malformed JSON")),
        "{letters:?}"
    );
    let positions: Vec<String> = {
        let c =
            rusqlite::Connection::open_with_flags(data.join("state.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        let mut st = c.prepare("SELECT position FROM dead_letters").unwrap();
        st.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    assert!(
        positions
            .iter()
            .any(|p| p.starts_with(&format!("{orders_topic}[")) && p.contains("]@")),
        "topic[partition]@offset in {positions:?}"
    );

    // SIGKILL while a burst is being consumed, more changes while it is down, restart.
    let before = alias_count(&shop).await;
    dbz.dml(
        &shop,
        &ORDERS,
        "INSERT INTO orders SELECT g, 1 + g % 20, 'new', 3.30, NULL, now(), now() FROM generate_series(100, 299) g",
        &[],
    )
    .await;
    dbz.dml(&shop, &ITEMS, "INSERT INTO order_items SELECT o, l, 1 + (o + l) % 10, 1, 1.50 FROM generate_series(100, 299) o, generate_series(1, 3) l", &[]).await;
    wait_until("some of the burst indexed", T, || async {
        (alias_count(&shop).await > before).then_some(())
    })
    .await;
    w.kill9();
    dbz.dml(
        &shop,
        &PRODUCTS,
        "UPDATE products SET name = 'While down' WHERE id = 5",
        &["description"],
    )
    .await;
    mem.deleted_orders.insert(7);
    dbz.dml(&shop, &ORDERS, "DELETE FROM orders WHERE id = 7", &[]).await;
    let _w = Worker::start(&cfg, &data);
    converge(&shop, T).await;
    converge_orders(&shop, &mem, T).await;

    // Offsets are committed (once acknowledged) up to the last record of each partition:
    // the committed offset is the next one to read, one past the last record.
    let group: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &servers().kafka)
        .set("group.id", format!("{}_ordering", shop.prefix))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..ORDERS.partitions {
        tpl.add_partition(&orders_topic, p);
    }
    let produced = dbz.produced[&orders_topic];
    wait_until("offsets committed up to the last record", T, || async {
        let c = group.committed_offsets(tpl.clone(), Duration::from_secs(5)).ok()?;
        let sum: i64 = c
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(n) => n,
                _ => 0,
            })
            .sum();
        (sum == produced).then_some(())
    })
    .await;
}

/// A steady trickle (a record every 30 ms, never a 100 ms gap) must not hold records back
/// until the trickle stops: a batch also closes when it is old enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_trickle_is_applied_while_it_lasts() {
    let shop = Shop::new("dbztrickle").await;
    let mut dbz = Debezium::new(&shop).await;
    // Short fetch waits, as a busy real broker gives: records arrive back to back.
    let cfg = shop.config_from("shop-debezium.toml", "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "topic_prefix = ",
        "properties = { \"fetch.wait.max.ms\" = \"5\" }\ntopic_prefix = ",
    );
    std::fs::write(&cfg, text).unwrap();
    let _w = Worker::start(&cfg, &shop.data_dir.path().join("data"));
    let mut r = shop.redis().await;
    // The group has joined once a first record is through.
    dbz.dml(
        &shop,
        &PRODUCTS,
        "INSERT INTO products(id, sku, name, price) VALUES (1000, 'x', 'first', 1)",
        &[],
    )
    .await;
    wait_until("consumer ready", T, || async {
        let mut r = shop.redis().await;
        let n: bool = redis::AsyncCommands::exists(&mut r, shop.key("ordering:product:1000"))
            .await
            .ok()?;
        n.then_some(())
    })
    .await;
    // The trickle: 150 inserts (in Postgres at once, the truth), their events sent 10 ms apart.
    let rows = returning(
        &shop,
        &PRODUCTS,
        "INSERT INTO products(id, sku, name, price) SELECT g, 's' || g, 'p' || g, 1 FROM generate_series(1, 150) g",
    )
    .await;
    let (last, next) = dbz.lsn["catalog"];
    let events: Vec<(String, String)> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let image = Debezium::encode_row(&PRODUCTS, row);
            let seq = (Some(last), next + 8 * i as u64);
            (
                dbz.key_of(&PRODUCTS, row),
                dbz.envelope(&PRODUCTS, "c", Value::Null, image, seq),
            )
        })
        .collect();
    let topic = dbz.topic(&PRODUCTS);
    let mut seen_at = None;
    for (i, (k, v)) in events.iter().enumerate() {
        dbz.send(&topic, k, Some(v)).await;
        if seen_at.is_none() {
            let n: bool = redis::AsyncCommands::exists(&mut r, shop.key("ordering:product:1"))
                .await
                .unwrap();
            if n {
                seen_at = Some(i + 1);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // the trickle's pace
    }
    eprintln!("first record visible after {seen_at:?} of 150 sent");
    assert!(
        seen_at.is_some_and(|i| i < 150),
        "the first record of the trickle became visible only after it ended ({seen_at:?})"
    );
    converge(&shop, T).await;
}

/// Ordering against snapshots and TRUNCATEs, with crafted records: a re-created
/// connector's snapshot (op `r`, newer LSN) repairs rows its predecessor's events left
/// stale; a transaction in flight when that snapshot was taken (lower LSN, streamed after
/// the reads) still wins over them; and a TRUNCATE overtaken by an older insert from
/// another partition still removed that row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_truncates_order_by_lsn_across_partitions() {
    let shop = Shop::new("dbzorder").await;
    let mut dbz = Debezium::new(&shop).await;
    let cfg = shop.config_from("shop-debezium.toml", "");
    let _w = Worker::start(&cfg, &shop.data_dir.path().join("data"));
    dbz.dml(
        &shop,
        &PRODUCTS,
        "INSERT INTO products(id, sku, name, price) SELECT g, 's' || g, 'p' || g, 1 FROM generate_series(1, 6) g",
        &[],
    )
    .await;
    converge(&shop, T).await;

    // Events the old connector never sent; the new connector's snapshot has them.
    shop.exec(
        "catalog",
        "UPDATE products SET name = 'as the snapshot read it' WHERE id <= 3",
    )
    .await;
    dbz.snapshot(&shop, &PRODUCTS).await;
    converge(&shop, T).await;

    // In flight while the snapshot was taken: written below the snapshot's LSN.
    let read_at = dbz.lsn["catalog"].0;
    let rows = returning(&shop, &PRODUCTS, "UPDATE products SET name = 'in flight' WHERE id = 4").await;
    let value = dbz.envelope(
        &PRODUCTS,
        "u",
        Value::Null,
        Debezium::encode_row(&PRODUCTS, &rows[0]),
        (Some(read_at - 64), read_at - 16),
    );
    let topic = dbz.topic(&PRODUCTS);
    dbz.send(&topic, &dbz.key_of(&PRODUCTS, &rows[0]), Some(&value)).await;
    converge(&shop, T).await;

    // An insert before the TRUNCATE (LSN L), held back in partition 1, while the TRUNCATE
    // (LSN L + 64) goes through partition 0 first.
    let l = read_at + 0x1000;
    let row7 = returning(
        &shop,
        &PRODUCTS,
        "INSERT INTO products(id, sku, name, price) VALUES (7, 's7', 'before the truncate', 1)",
    )
    .await;
    let insert = dbz.envelope(
        &PRODUCTS,
        "c",
        Value::Null,
        Debezium::encode_row(&PRODUCTS, &row7[0]),
        (Some(l - 8), l),
    );
    shop.exec("catalog", "TRUNCATE products").await;
    let truncate = dbz.envelope(&PRODUCTS, "t", Value::Null, Value::Null, (Some(l), l + 64));
    let send_to = |partition: i32, key: Option<String>, value: String| {
        let producer = dbz.producer.clone();
        let topic = topic.clone();
        async move {
            let mut rec = FutureRecord::<str, str>::to(&topic)
                .partition(partition)
                .payload(&value);
            if let Some(k) = &key {
                rec = rec.key(k);
            }
            producer.send(rec, Duration::from_secs(30)).await.unwrap();
        }
    };
    send_to(0, None, truncate).await;
    converge(&shop, T).await; // every known product is a tombstone now
    send_to(1, Some(dbz.key_of(&PRODUCTS, &row7[0])), insert).await;
    let mut r = shop.redis().await;
    let status: String = wait_until("the late insert applied", T, || async {
        let mut r = shop.redis().await;
        let s: Option<String> = redis::AsyncCommands::hget(&mut r, shop.key("ordering:product:7"), "status")
            .await
            .unwrap();
        s
    })
    .await;
    assert_eq!(status, "decommissioned", "removed by the TRUNCATE it reached us after");
    let active: bool = redis::AsyncCommands::sismember(&mut r, shop.key("storefront:products:active"), "7")
        .await
        .unwrap();
    assert!(!active);
    converge(&shop, T).await;
}
