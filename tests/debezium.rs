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
#[path = "debezium/harness.rs"]
mod harness;

use common::orders::*;
use common::*;
use harness::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

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

/// Two workers in one consumer group would each hold some partitions and write
/// half-joined documents: both hold (read nothing, say why, not ready) until one leaves;
/// then the other takes every partition and applies what was sent meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_in_the_group_makes_both_hold_until_it_leaves() {
    let shop = Shop::new("dbzgroup").await;
    let mut dbz = Debezium::new(&shop).await;
    let cfg = shop.config_from("shop-debezium.toml", "");
    let a = Worker::start(&cfg, &shop.data_dir.path().join("a"));
    dbz.dml(
        &shop,
        &PRODUCTS,
        "INSERT INTO products(id, sku, name, price) VALUES (1, 'x', 'first', 1)",
        &[],
    )
    .await;
    converge(&shop, T).await;

    let mut b = Worker::start(&cfg, &shop.data_dir.path().join("b"));
    let holding = |w: &Worker| w.log_text().contains("another member shares consumer group");
    wait_until("both workers hold", T, || async {
        (holding(&a) && holding(&b)).then_some(())
    })
    .await;
    dbz.dml(
        &shop,
        &PRODUCTS,
        "UPDATE products SET name = 'while held' WHERE id = 1",
        &[],
    )
    .await;
    dbz.dml(
        &shop,
        &PRODUCTS,
        "INSERT INTO products(id, sku, name, price) VALUES (2, 'y', 'second', 2)",
        &[],
    )
    .await;
    assert_eq!(b.terminate(), Some(0));
    // The one left takes every partition again and reads what was sent meanwhile.
    converge(&shop, T).await;
    let mut r = shop.redis().await;
    let name: Option<String> = redis::AsyncCommands::hget(&mut r, shop.key("ordering:product:1"), "name")
        .await
        .unwrap();
    assert_eq!(name.as_deref(), Some("while held"));
}

/// Read-your-writes on a Debezium source: `/v1/wait` with the record's topic, partition
/// and offset answers once the record is in every read model of its source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_a_record_offset_then_reads_see_it() {
    let shop = Shop::new("dbzwait").await;
    let mut dbz = Debezium::new(&shop).await;
    let cfg = shop.config_from("shop-debezium.toml", "");
    let w = Worker::start(&cfg, &shop.data_dir.path().join("data"));
    let addr = w.http_addr().await;
    let http = reqwest::Client::new();
    let wait = |q: Vec<(&'static str, String)>| {
        let (http, addr) = (http.clone(), addr.clone());
        async move {
            let r = http
                .get(format!("http://{addr}/v1/wait"))
                .query(&q)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let topic = dbz.topic(&PRODUCTS);
    let mut r = shop.redis().await;
    for i in 1..=8 {
        dbz.dml(
            &shop,
            &PRODUCTS,
            &format!("INSERT INTO products(id, sku, name, price) VALUES ({i}, 'S{i}', 'probe {i}', 1)"),
            &[],
        )
        .await;
        let (partition, offset) = dbz.last.unwrap();
        let (code, body) = wait(vec![
            ("source", "catalog".into()),
            ("topic", topic.clone()),
            ("partition", partition.to_string()),
            ("offset", offset.to_string()),
            ("timeout_ms", "30000".into()),
        ])
        .await;
        assert_eq!(code, 200, "record {i}: {body}");
        assert!(body["position"]["next_offset"].as_i64().unwrap() > offset, "{body}");
        let name: Option<String> =
            redis::AsyncCommands::hget(&mut r, shop.key(&format!("ordering:product:{i}")), "name")
                .await
                .unwrap();
        assert_eq!(name.as_deref(), Some(format!("probe {i}").as_str()), "record {i}");
    }
    let (partition, offset) = dbz.last.unwrap();
    let (code, body) = wait(vec![
        ("source", "catalog".into()),
        ("topic", topic.clone()),
        ("partition", partition.to_string()),
        ("offset", (offset + 1000).to_string()),
        ("timeout_ms", "200".into()),
    ])
    .await;
    assert_eq!(code, 408, "{body}");
    let (code, body) = wait(vec![("source", "catalog".into()), ("lsn", "0/1".into())]).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("parameter topic:"),
        "{body}"
    );
}

/// `verify` in the data dir of one worker of a split source (the store's `ownership`
/// record): projections rooted in a governed table are compared on the documents of the
/// owned partitions only; the others' documents (rendered from rows of other partitions,
/// or with no row here at all) are counted as other workers', never reported, never
/// repaired. Without the record, the same sinks are verified whole again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_of_a_split_worker_compares_only_its_partitions() {
    use redis::AsyncCommands;
    let shop = Shop::new("dbzsplit").await;
    let mut dbz = Debezium::new(&shop).await;
    let mem = Remembered::default();
    shop.exec("identity", "INSERT INTO customers SELECT g, 'Customer ' || g, 'c' || g || '@example.com', now() FROM generate_series(1, 10) g").await;
    shop.exec("catalog", "INSERT INTO products(id, sku, name, price, status) SELECT g, 'SKU-' || g, 'Product ' || g, g + 0.5, 'active' FROM generate_series(1, 12) g").await;
    shop.exec(
        "ordering",
        "INSERT INTO orders SELECT g, 1 + g % 10, 'new', g, NULL, now(), now() FROM generate_series(1, 30) g;
         INSERT INTO order_items SELECT o, l, 1 + (o + l) % 12, l, 2.50 FROM generate_series(1, 30) o, generate_series(1, 2) l",
    )
    .await;
    for t in [&CUSTOMERS, &PRODUCTS, &ORDERS, &ITEMS] {
        dbz.snapshot(&shop, t).await;
    }
    let cfg = shop.config_from("shop-debezium.toml", "");
    let data = shop.data_dir.path().join("data");
    let mut w = Worker::start(&cfg, &data);
    converge(&shop, T).await;
    converge_orders(&shop, &mem, T).await;
    assert_eq!(w.terminate(), Some(0));
    let verify = |extra: &[&str]| {
        let out = shop.viewkeeper(&cfg, &[&["verify"], extra].concat());
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), out.stdout, text)
    };
    let (clean, _, text) = verify(&[]);
    assert!(clean, "clean before the split: {text}");

    // This worker owns partition 0 of 2: the ids of each partition, by the rows' origins.
    let db = rusqlite::Connection::open(data.join("state.db")).unwrap();
    let by_partition = |table: &str| -> [Vec<i64>; 2] {
        let mut st = db.prepare("SELECT key, origin FROM rows WHERE tbl = ?1").unwrap();
        let mut out = [vec![], vec![]];
        for (key, origin) in st
            .query_map([table], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .unwrap()
            .map(Result::unwrap)
        {
            let id: Vec<i64> = serde_json::from_str(&key).unwrap();
            let p: usize = origin
                .rsplit_once('[')
                .unwrap()
                .1
                .trim_end_matches(']')
                .parse()
                .unwrap();
            out[p % 2].push(id[0]);
        }
        out
    };
    let [orders0, orders1] = by_partition("orders");
    let [products0, products1] = by_partition("products");
    assert!(
        !orders0.is_empty() && !orders1.is_empty() && !products0.is_empty() && !products1.is_empty(),
        "rows of both partitions: {orders0:?} {orders1:?} {products0:?} {products1:?}"
    );
    db.execute(
        "INSERT INTO meta(k, v) VALUES ('ownership', ?1)",
        [json!({"source": "ordering", "partitions": 2, "owned": [0],
                "governed": ["orders", "order_items", "products", "customers"],
                "since_ms": 1_764_710_000_000_i64})
        .to_string()],
    )
    .unwrap();

    // Behind the workers' backs: an owned order changed, an order of the other partition
    // deleted, a document with no row here; an owned product's entry changed, one of the
    // other partition changed and taken out of the active set.
    let (mine, not_mine) = (orders0[0], orders1[0]);
    let (mine_p, not_mine_p) = (products0[0], products1[0]);
    let http = reqwest::Client::new();
    let doc = format!("{}/{}/_doc", servers().search, shop.alias());
    let mut d: Value = http
        .get(format!("{doc}/{mine}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    d["_source"]["status"] = json!("tampered");
    let put = http
        .put(format!("{doc}/{mine}"))
        .json(&d["_source"])
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{:?}", put.text().await);
    let del = http.delete(format!("{doc}/{not_mine}")).send().await.unwrap();
    assert!(del.status().is_success(), "{:?}", del.text().await);
    let put = http
        .put(format!("{doc}/9999"))
        .json(&json!({"order_id": 9999, "status": "elsewhere"}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{:?}", put.text().await);
    let mut r = shop.redis().await;
    let key = |id: i64| shop.key(&format!("ordering:product:{id}"));
    let _: () = r.hset(key(mine_p), "price", "0.01").await.unwrap();
    let _: () = r.hset(key(not_mine_p), "price", "0.02").await.unwrap();
    let active = shop.key("storefront:products:active");
    let _: () = r.srem(&active, not_mine_p.to_string()).await.unwrap();

    let (clean, stdout, text) = verify(&["--json"]);
    assert!(!clean, "the owned documents differ: {text}");
    let report: Value = serde_json::from_slice(&stdout).unwrap_or_else(|e| panic!("{e}: {text}"));
    let found: Vec<(&str, &str, &str)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["projection"].as_str().unwrap(),
                f["kind"].as_str().unwrap(),
                f["id"].as_str().unwrap(),
            )
        })
        .collect();
    let (mine_s, mine_key) = (mine.to_string(), key(mine_p));
    assert_eq!(
        found,
        [
            ("ordering_products", "stale", mine_key.as_str()),
            ("orders_view", "stale", mine_s.as_str()),
        ],
        "only the owned documents: {text}"
    );
    assert_eq!(report["checked"]["orders_view"], json!(orders0.len()), "{text}");
    assert_eq!(
        report["other_workers"]["orders_view"],
        json!(orders1.len() + 1),
        "the other partition's orders and the document with no row here: {text}"
    );
    assert_eq!(report["checked"]["ordering_products"], json!(products0.len()), "{text}");
    assert_eq!(
        report["other_workers"]["ordering_products"],
        json!(products1.len()),
        "{text}"
    );
    let (_, _, text) = verify(&[]);
    let line = format!(
        "orders_view: {} documents of partitions [0] compared; {} belong to other workers",
        orders0.len(),
        orders1.len() + 1
    );
    assert!(text.contains(&line), "{line:?} in {text}");

    // The repair writes the owned ones only.
    let (clean, _, text) = verify(&["--repair"]);
    assert!(clean, "repaired: {text}");
    let (clean, _, text) = verify(&[]);
    assert!(clean, "clean after the repair: {text}");
    let got: Value = http
        .get(format!("{doc}/{mine}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["_source"]["status"], json!("new"), "{got}");
    let gone = http.get(format!("{doc}/{not_mine}")).send().await.unwrap();
    assert_eq!(gone.status(), 404, "another worker's document is not written");
    let kept = http.get(format!("{doc}/9999")).send().await.unwrap();
    assert_eq!(kept.status(), 200, "another worker's document is not removed");
    let p: Option<String> = r.hget(key(not_mine_p), "price").await.unwrap();
    assert_eq!(p.as_deref(), Some("0.02"), "another worker's entry is not written");
    let member: bool = r.sismember(&active, not_mine_p.to_string()).await.unwrap();
    assert!(!member, "another worker's member is not added");

    // Without the record, the store answers for every document again.
    db.execute("DELETE FROM meta WHERE k = 'ownership'", []).unwrap();
    let (clean, stdout, text) = verify(&["--json"]);
    assert!(!clean, "{text}");
    let report: Value = serde_json::from_slice(&stdout).unwrap_or_else(|e| panic!("{e}: {text}"));
    let kinds: Vec<(String, String)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["kind"].as_str().unwrap().into(), f["id"].as_str().unwrap().into()))
        .collect();
    for want in [
        ("missing".to_string(), not_mine.to_string()),
        ("extra".to_string(), "9999".to_string()),
        ("stale".to_string(), key(not_mine_p)),
        ("active_set".to_string(), not_mine_p.to_string()),
    ] {
        assert!(kinds.contains(&want), "{want:?} in {kinds:?}");
    }
}
