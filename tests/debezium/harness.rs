//! The broker side of the Debezium tests: the shop's tables as Debezium describes them,
//! topics, a producer, and the LSNs each service's connector would give its events.
#![allow(dead_code)] // shared by several test binaries, each using part of it

use super::common::*;
use base64::Engine as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Map, Value};
use std::time::Duration;

#[derive(Clone, Copy, PartialEq)]
pub enum Ty {
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

pub struct Table {
    pub service: &'static str,
    pub name: &'static str,
    pub key: &'static [&'static str],
    pub cols: &'static [(&'static str, Ty)],
    pub partitions: i32,
    /// The column that names the row's root, by which [`Debezium::with_partitions`] routes
    /// it (as Debezium's PartitionRouting SMT would: an order by `id`, its lines by
    /// `order_id`, so both land in the same partition).
    pub route: &'static str,
}

pub const CUSTOMERS: Table = Table {
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
    route: "id",
};
pub const PRODUCTS: Table = Table {
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
    route: "id",
};
pub const ORDERS: Table = Table {
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
    route: "id",
};
pub const ITEMS: Table = Table {
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
    route: "order_id",
};

pub fn field_schema(col: &str, ty: Ty, optional: bool) -> Value {
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
pub fn unscaled_base64(v: i64) -> String {
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
pub fn encode(v: &Value, ty: Ty) -> Value {
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
pub struct Debezium {
    pub prefix: String,
    pub producer: FutureProducer,
    /// Per service: (LSN of the last commit, next LSN).
    pub lsn: std::collections::HashMap<&'static str, (u64, u64)>,
    /// Records produced per topic.
    pub produced: std::collections::HashMap<String, i64>,
    /// Partition and offset of the last record produced.
    pub last: Option<(i32, i64)>,
    /// Set by [`Debezium::with_partitions`]: every topic has this many partitions and a
    /// row's events go to partition `route column % n` instead of by key.
    pub routed: Option<i32>,
    /// Deliveries not yet waited for (see [`Debezium::begin_bulk`]).
    pub bulk: Option<Vec<rdkafka::producer::DeliveryFuture>>,
}

impl Debezium {
    /// Topics with each table's own partition count; records are partitioned by key.
    pub async fn new(shop: &Shop) -> Debezium {
        Self::create(shop, None).await
    }

    /// Topics with `n` partitions each; a row's events go to partition `id % n` of its
    /// root (the table's [`Table::route`] column), co-partitioning an order and its lines.
    pub async fn with_partitions(shop: &Shop, n: i32) -> Debezium {
        Self::create(shop, Some(n)).await
    }

    async fn create(shop: &Shop, routed: Option<i32>) -> Debezium {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &servers().kafka);
        let admin: AdminClient<DefaultClientContext> = cfg.create().unwrap();
        let prefix = shop.prefix.clone();
        let topics: Vec<(String, i32)> = [&CUSTOMERS, &PRODUCTS, &ORDERS, &ITEMS]
            .iter()
            .map(|t| {
                (
                    format!("{prefix}_{}.public.{}", t.service, t.name),
                    routed.unwrap_or(t.partitions),
                )
            })
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
            last: None,
            routed,
            bulk: None,
        }
    }

    pub fn topic(&self, t: &Table) -> String {
        format!("{}_{}.public.{}", self.prefix, t.service, t.name)
    }

    pub fn key_of(&self, t: &Table, row: &Map<String, Value>) -> String {
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

    pub fn envelope(&self, t: &Table, op: &str, before: Value, after: Value, seq: (Option<u64>, u64)) -> String {
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

    pub fn encode_row(t: &Table, row: &Map<String, Value>) -> Value {
        Value::Object(
            t.cols
                .iter()
                .map(|(c, ty)| (c.to_string(), encode(&row[*c], *ty)))
                .collect(),
        )
    }

    /// The partition a row's events go to: `None` (by key) unless routed.
    pub fn partition_of(&self, t: &Table, row: &Map<String, Value>) -> Option<i32> {
        let n = self.routed?;
        let id = row[t.route]
            .as_i64()
            .unwrap_or_else(|| panic!("{}.{} is not an integer: {row:?}", t.name, t.route));
        Some(id.rem_euclid(n as i64) as i32)
    }

    pub async fn send(&mut self, topic: &str, key: &str, value: Option<&str>) {
        self.send_to(topic, None, key, value).await
    }

    /// [`Debezium::send`] to partition `partition` (`None`: the producer's partitioner).
    /// From now on records are sent without waiting for each acknowledgement, until
    /// [`Debezium::end_bulk`] (the benchmarks' bursts).
    pub fn begin_bulk(&mut self) {
        self.bulk = Some(Vec::new());
    }

    /// Waits for every record sent since [`Debezium::begin_bulk`].
    pub async fn end_bulk(&mut self) {
        for f in self.bulk.take().unwrap_or_default() {
            f.await
                .expect("delivery future")
                .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        }
    }

    pub async fn send_to(&mut self, topic: &str, partition: Option<i32>, key: &str, value: Option<&str>) {
        *self.produced.entry(topic.to_string()).or_default() += 1;
        let mut rec = FutureRecord::<str, str>::to(topic).key(key);
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        if self.bulk.is_some() {
            let f = self
                .producer
                .send_result(rec)
                .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
            let flight = self.bulk.as_mut().expect("bulk");
            flight.push(f);
            if flight.len() >= 5000 {
                self.end_bulk().await;
                self.begin_bulk();
            }
            return;
        }
        let delivered = self
            .producer
            .send(rec, Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
        if let Some(p) = partition {
            assert_eq!(delivered.partition, p, "{topic}: produced to partition {p}");
        }
        self.last = Some((delivered.partition, delivered.offset));
    }

    /// Runs `sql` (one INSERT/UPDATE/DELETE on `t`) in Postgres and produces what
    /// Debezium would: `c`/`u`, or `d` (before = the key only, as with REPLICA IDENTITY
    /// DEFAULT) and then a tombstone. `unavailable`: columns sent as the TOAST placeholder.
    /// Returns the events produced (key, value) for redelivery.
    pub async fn dml(&mut self, shop: &Shop, t: &Table, sql: &str, unavailable: &[&str]) -> Vec<(String, String)> {
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
            let partition = self.partition_of(t, row);
            self.send_to(&self.topic(t), partition, &key, Some(&value)).await;
            if op == "d" {
                self.send_to(&self.topic(t), partition, &key, None).await;
            }
            out.push((key, value));
            lsn += 8;
        }
        self.lsn.insert(t.service, (lsn, lsn + 0x1000));
        out
    }

    /// [`Debezium::snapshot`] for many rows: records sent in flights of a few thousand
    /// (the benchmarks' loads), each flight acknowledged before the next.
    pub async fn snapshot_bulk(&mut self, shop: &Shop, t: &Table) {
        let rows = returning(shop, t, &format!("SELECT * FROM {}", t.name)).await;
        let (_, next) = self.lsn[t.service];
        let topic = self.topic(t);
        for chunk in rows.chunks(5000) {
            let mut flight = Vec::with_capacity(chunk.len());
            for row in chunk {
                let value = self.envelope(t, "r", Value::Null, Self::encode_row(t, row), (None, next));
                let key = self.key_of(t, row);
                let mut rec = FutureRecord::<str, str>::to(&topic).key(&key).payload(&value);
                if let Some(p) = self.partition_of(t, row) {
                    rec = rec.partition(p);
                }
                flight.push(
                    self.producer
                        .send_result(rec)
                        .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}")),
                );
            }
            for f in flight {
                f.await
                    .expect("delivery future")
                    .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
            }
            *self.produced.entry(topic.clone()).or_default() += chunk.len() as i64;
        }
        self.lsn.insert(t.service, (next, next + 0x1000));
    }

    /// Debezium's initial snapshot of `t`: an `r` event per row, at one LSN.
    pub async fn snapshot(&mut self, shop: &Shop, t: &Table) {
        let rows = returning(shop, t, &format!("SELECT * FROM {}", t.name)).await;
        let (_, next) = self.lsn[t.service];
        for row in &rows {
            let value = self.envelope(t, "r", Value::Null, Self::encode_row(t, row), (None, next));
            let partition = self.partition_of(t, row);
            self.send_to(&self.topic(t), partition, &self.key_of(t, row), Some(&value))
                .await;
        }
        // Streaming goes on after the snapshot's position.
        self.lsn.insert(t.service, (next, next + 0x1000));
    }
}

/// The rows a statement returns (`RETURNING *`, or a SELECT), as `row_to_json` objects.
pub async fn returning(shop: &Shop, t: &Table, sql: &str) -> Vec<Map<String, Value>> {
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

pub async fn alias_count(shop: &Shop) -> u64 {
    let v: Value = reqwest::get(format!("{}/{}/_count", servers().search, shop.alias()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["count"].as_u64().unwrap_or(0)
}
