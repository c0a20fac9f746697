//! `orders_view` end to end: three Postgres databases → the worker → the search server,
//! compared field by field with a join in SQL after every step (tests/common/orders.rs).
//! Data sets stay small: the local OpenSearch-compatible server writes a few hundred
//! nested documents per second.

mod common;

use common::orders::*;
use common::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// 40 customers, 20 products, `orders` orders of 3 items each.
async fn seed(shop: &Shop, orders: i64) {
    shop.exec("identity", "INSERT INTO customers SELECT g, 'Customer ' || g, 'c' || g || '@example.com', now() FROM generate_series(1, 40) g").await;
    shop.exec("catalog", "INSERT INTO products(id, sku, name, price) SELECT g, 'SKU-' || g, 'Product ' || g, g + 0.5 FROM generate_series(1, 20) g").await;
    shop.exec("ordering", &format!(
            "INSERT INTO orders SELECT g, 1 + g % 40, (ARRAY['new','paid','shipped'])[1 + g % 3], g * 1.25,
                    jsonb_build_object('city', 'Lisbon', 'zip', g), timestamptz '2026-01-01 10:00:00+00' + g * interval '7 hours', now()
             FROM generate_series(1, {orders}) g;
             INSERT INTO order_items SELECT o, l, 1 + (o + l) % 20, l, 2.50 FROM generate_series(1, {orders}) o, generate_series(1, 3) l;"
        )).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_lifecycle_joins_fan_out_and_tombstones() {
    let shop = Shop::new("orders").await;
    let _w = shop.worker(&shop.config("")).await;
    let mut mem = Remembered::default();
    seed(&shop, 60).await;
    converge_orders(&shop, &mem, T).await;

    let ordering = shop.pg("ordering").await;
    let catalog = shop.pg("catalog").await;
    let identity = shop.pg("identity").await;
    // Order lifecycle and items added, changed, removed.
    ordering
        .batch_execute("UPDATE orders SET status = 'shipped', updated_at = now() WHERE id = 1")
        .await
        .unwrap();
    ordering
        .batch_execute("INSERT INTO order_items VALUES (1, 4, 7, 9, 1.10)")
        .await
        .unwrap();
    ordering
        .batch_execute("UPDATE order_items SET qty = 42 WHERE order_id = 2 AND line_no = 1")
        .await
        .unwrap();
    ordering
        .batch_execute("DELETE FROM order_items WHERE order_id = 3 AND line_no = 2")
        .await
        .unwrap();
    // A customer's email changes: every order of that customer follows.
    identity
        .batch_execute("UPDATE customers SET email = 'new@example.com' WHERE id = 5")
        .await
        .unwrap();
    converge_orders(&shop, &mem, T).await;

    // A product rename fans out to every order that references it.
    catalog
        .batch_execute("UPDATE products SET name = 'Renamed ✓ \"7\"' WHERE id = 7")
        .await
        .unwrap();
    converge_orders(&shop, &mem, T).await;

    // Decommission one product, hard-delete another: both stay in the orders, flagged.
    catalog
        .batch_execute("UPDATE products SET status = 'decommissioned' WHERE id = 3")
        .await
        .unwrap();
    mem.deleted_products.insert(4, ("SKU-4".into(), "Product 4".into()));
    catalog
        .batch_execute("DELETE FROM products WHERE id = 4")
        .await
        .unwrap();
    converge_orders(&shop, &mem, T).await;
    let doc = search(&shop, json!({"query": {"term": {"_id": "2"}}})).await;
    let items = &doc["hits"]["hits"][0]["_source"]["items"];
    let p4 = items
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["product"]["id"] == json!(4))
        .expect("order 2 has product 4");
    assert_eq!(
        p4["product"],
        json!({"id": 4, "sku": "SKU-4", "name": "Product 4", "status": "decommissioned", "decommissioned": true})
    );

    // A hard-deleted order keeps its document, flagged.
    ordering
        .batch_execute("DELETE FROM order_items WHERE order_id = 10; DELETE FROM orders WHERE id = 10")
        .await
        .unwrap();
    mem.deleted_orders.insert(10);
    // A primary-key change moves the row.
    ordering
        .batch_execute("UPDATE order_items SET line_no = 9 WHERE order_id = 11 AND line_no = 3")
        .await
        .unwrap();
    converge_orders(&shop, &mem, T).await;

    // Dashboards: terms on status, sum on total, date_histogram on created_at equal SQL.
    let aggs = search(
        &shop,
        json!({"size": 0, "query": {"bool": {"must_not": {"term": {"deleted": true}}}},
               "aggs": {"s": {"terms": {"field": "status", "size": 50}},
                        "t": {"sum": {"field": "total"}},
                        "h": {"date_histogram": {"field": "created_at", "calendar_interval": "day"}}}}),
    )
    .await;
    let mut by_status = BTreeMap::new();
    for b in aggs["aggregations"]["s"]["buckets"].as_array().unwrap() {
        by_status.insert(b["key"].as_str().unwrap().to_string(), b["doc_count"].as_i64().unwrap());
    }
    let mut sql_status = BTreeMap::new();
    for r in ordering
        .query("SELECT status, count(*) FROM orders GROUP BY status", &[])
        .await
        .unwrap()
    {
        sql_status.insert(r.get::<_, String>(0), r.get::<_, i64>(1));
    }
    assert_eq!(by_status, sql_status);
    let sql_sum: String = ordering
        .query_one("SELECT sum(total)::text FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    let es_sum = aggs["aggregations"]["t"]["value"].as_f64().unwrap();
    assert!(
        (es_sum - sql_sum.parse::<f64>().unwrap()).abs() < 0.005,
        "sum {es_sum} vs {sql_sum}"
    );
    let mut hist = BTreeMap::new();
    for b in aggs["aggregations"]["h"]["buckets"].as_array().unwrap() {
        if b["doc_count"].as_i64().unwrap() > 0 {
            hist.insert(b["key"].as_i64().unwrap(), b["doc_count"].as_i64().unwrap());
        }
    }
    let mut sql_hist = BTreeMap::new();
    for r in ordering
        .query(
            "SELECT (extract(epoch FROM date_trunc('day', created_at AT TIME ZONE 'UTC')) * 1000)::bigint, count(*) FROM orders GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
    {
        sql_hist.insert(r.get::<_, i64>(0), r.get::<_, i64>(1));
    }
    assert_eq!(hist, sql_hist);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_sources_render_unresolved_and_heal() {
    let shop = Shop::new("unresolved").await;
    let _w = shop.worker(&shop.config("")).await;
    let mem = Remembered::default();
    // The order and its items arrive before the customer and the product exist.
    shop.exec("ordering", "INSERT INTO orders VALUES (1, 77, 'new', 10, NULL, now(), now()), (2, 555, 'new', 5, '{\"deep\": {\"a\": [1, 2]}}', now(), now());
             INSERT INTO order_items VALUES (1, 1, 999, 1, 10), (2, 1, 999, 2, 2.5)").await;
    converge_orders(&shop, &mem, T).await;
    let doc = search(&shop, json!({"query": {"term": {"_id": "1"}}})).await;
    let src = &doc["hits"]["hits"][0]["_source"];
    assert_eq!(src["customer"], json!({"id": 77, "unresolved": true}));
    assert_eq!(src["items"][0]["product"], json!({"id": 999, "unresolved": true}));
    // They arrive later, from other databases: the documents heal.
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price) VALUES (999, 'LATE', 'Late product', 1)",
    )
    .await;
    shop.exec(
        "identity",
        "INSERT INTO customers VALUES (77, 'Late customer', NULL, now())",
    )
    .await;
    converge_orders(&shop, &mem, T).await;
    // Customer 555 never exists: order 2 stays unresolved.
    let doc = search(&shop, json!({"query": {"term": {"_id": "2"}}})).await;
    assert_eq!(
        doc["hits"]["hits"][0]["_source"]["customer"],
        json!({"id": 555, "unresolved": true})
    );
    let unresolved = search(
        &shop,
        json!({"size": 0, "query": {"term": {"customer.unresolved": true}}}),
    )
    .await;
    assert_eq!(unresolved["hits"]["total"]["value"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_of_a_product_to_hundreds_of_orders() {
    let shop = Shop::new("fanout").await;
    let _w = shop.worker(&shop.config("")).await;
    let mem = Remembered::default();
    seed(&shop, 300).await;
    shop.exec("ordering", "UPDATE order_items SET product_id = 1 WHERE line_no = 1")
        .await;
    converge_orders(&shop, &mem, Duration::from_secs(120)).await;
    shop.exec("catalog", "UPDATE products SET name = 'Everywhere' WHERE id = 1")
        .await;
    converge_orders(&shop, &mem, Duration::from_secs(120)).await;
    let n = search(
        &shop,
        json!({"size": 0, "query": {"term": {"items.product.name.keyword": "Everywhere"}}}),
    )
    .await;
    assert_eq!(n["hits"]["total"]["value"], json!(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_converges_for_joined_documents() {
    let shop = Shop::new("orderkill").await;
    let cfg = shop.config("");
    let mut w = shop.worker(&cfg).await;
    let mem = Remembered::default();
    seed(&shop, 40).await;
    let writer = {
        let (o, c, i) = (
            shop.pg("ordering").await,
            shop.pg("catalog").await,
            shop.pg("identity").await,
        );
        tokio::spawn(async move {
            for round in 0..60 {
                o.batch_execute(&format!(
                    "UPDATE orders SET status = (ARRAY['new','paid','shipped','cancelled'])[1 + {round} % 4], total = total + 1
                     WHERE id % 6 = {}",
                    round % 6
                ))
                .await
                .unwrap();
                c.batch_execute(&format!(
                    "UPDATE products SET name = 'P{round}-' || id WHERE id % 5 = {}",
                    round % 5
                ))
                .await
                .unwrap();
                i.batch_execute(&format!(
                    "UPDATE customers SET name = 'C{round}' WHERE id % 7 = {}",
                    round % 7
                ))
                .await
                .unwrap();
            }
        })
    };
    for _ in 0..2 {
        let before = shop.confirmed_flush("ordering").await.unwrap_or(0);
        wait_until("worker acknowledged something new", T, || async {
            (shop.confirmed_flush("ordering").await.unwrap_or(0) > before).then_some(())
        })
        .await;
        w.kill9();
        w = shop.worker(&cfg).await;
    }
    writer.await.unwrap();
    converge_orders(&shop, &mem, Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_orders_are_loaded_by_the_initial_snapshot_resumed_after_a_kill() {
    let shop = Shop::new("ordersnap").await;
    seed(&shop, 400).await;
    // Small chunks, so that the kill lands between chunks of order_items (1,200 rows).
    let cfg = shop.config("");
    with_chunk_rows(&cfg, 50);
    let data = shop.data_dir.path().join("data");
    let mut w = Worker::start(&cfg, &data);
    wait_until("some snapshot chunks stored", T, || async {
        (stored_chunks(&data) > 0).then_some(())
    })
    .await;
    w.kill9();
    shop.exec("ordering", "UPDATE orders SET status = 'paid' WHERE id <= 5")
        .await;
    let w2 = Worker::start(&cfg, &data);
    converge_orders(&shop, &Remembered::default(), Duration::from_secs(120)).await;
    let log = w2.log_text();
    assert!(
        !log.contains("creating replication slot"),
        "resumed on the same slots, not started over"
    );
}

/// `viewkeeper backfill` as a child process.
fn backfill(cfg: &std::path::Path, data: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_viewkeeper"))
        .args(["backfill", "--config"])
        .arg(cfg)
        .arg("--data-dir")
        .arg(data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Sets every source's `snapshot_chunk_rows` in the config file.
fn with_chunk_rows(cfg: &std::path::Path, n: usize) {
    with_source_setting(cfg, &format!("snapshot_chunk_rows = {n}"));
}

/// Number of snapshot chunks the state store has recorded.
fn stored_chunks(data: &std::path::Path) -> i64 {
    rusqlite::Connection::open_with_flags(data.join("state.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| c.query_row("SELECT count(*) FROM snapshot_progress", [], |r| r.get::<_, i64>(0)))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_loads_existing_data_then_run_streams_on() {
    let shop = Shop::new("backfill").await;
    seed(&shop, 300).await;
    let cfg = shop.config("");
    let data = shop.data_dir.path().join("data");
    let out = backfill(&cfg, &data).wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let summary = log
        .lines()
        .find(|l| l.contains("backfill finished"))
        .expect("a summary line");
    // JSON log: the Debug map of rows per table sits in a string, its quotes escaped.
    for rows in [r#"\"orders\": 300"#, r#"\"order_items\": 900"#, r#"\"customers\": 40"#] {
        assert!(summary.contains(rows), "{rows} in {summary}");
    }
    let mem = Remembered::default();
    // Everything is there when backfill exits, before any worker runs.
    matches_truth(&shop, &mem).await.unwrap();
    // Changes made between backfill and run are streamed from the slot.
    shop.exec("catalog", "UPDATE products SET name = 'after backfill' WHERE id = 3")
        .await;
    shop.exec("ordering", "DELETE FROM order_items WHERE order_id = 7")
        .await;
    let _w = shop.worker(&cfg).await;
    converge_orders(&shop, &mem, T).await;
    converge(&shop, T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_with_a_changed_mapping_swaps_the_alias_without_a_dip() {
    let shop = Shop::new("rebuild").await;
    let cfg = shop.config("");
    let _w = shop.worker(&cfg).await;
    let mem = Remembered::default();
    seed(&shop, 150).await;
    converge_orders(&shop, &mem, T).await;

    // A changed mapping: the customer's email becomes searchable text.
    let new_cfg = shop.data_dir.path().join("changed.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let changed = text.replace(
        "email = { type = \"keyword\" }",
        "email = { type = \"text\", fields = { keyword = { type = \"keyword\" } } }",
    );
    assert_ne!(text, changed);
    std::fs::write(&new_cfg, changed).unwrap();

    // Readers poll the alias's count all along; writers keep changing orders.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (stop, url) = (stop.clone(), format!("{}/{}/_count", servers().search, shop.alias()));
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut min = u64::MAX;
            let mut polls = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let v: serde_json::Value = http.get(&url).send().await.unwrap().json().await.unwrap();
                min = min.min(v["count"].as_u64().unwrap_or(0));
                polls += 1;
            }
            (min, polls)
        })
    };
    let writer = {
        let o = shop.pg("ordering").await;
        tokio::spawn(async move {
            for i in 0..30 {
                o.batch_execute(&format!(
                    "UPDATE orders SET status = 'shipped' WHERE id % 30 = {i};
                     INSERT INTO orders VALUES ({}, 1, 'new', 1, NULL, now(), now())",
                    1000 + i
                ))
                .await
                .unwrap();
            }
        })
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_viewkeeper"))
        .args(["backfill", "--projection", "orders_view", "--rebuild", "--config"])
        .arg(&new_cfg)
        .arg("--data-dir")
        .arg(shop.data_dir.path().join("data"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    writer.await.unwrap();
    converge_orders(&shop, &mem, T).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (min, polls) = poller.await.unwrap();
    assert!(polls > 3, "the reader polled during the rebuild ({polls} polls)");
    assert!(min >= 150, "the alias dipped to {min} documents");

    let http = reqwest::Client::new();
    let aliases: serde_json::Value = http
        .get(format!("{}/_alias/{}", servers().search, shop.alias()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let v2 = format!("{}_v2", shop.alias());
    assert!(aliases.get(&v2).is_some(), "alias now on {v2}: {aliases}");
    let mapping: serde_json::Value = http
        .get(format!("{}/{v2}/_mapping", servers().search))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        mapping[&v2]["mappings"]["properties"]["customer"]["properties"]["email"]["type"],
        json!("text")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_killed_midway_resumes_from_its_last_chunk() {
    let shop = Shop::new("bfkill").await;
    seed(&shop, 400).await;
    let cfg = shop.config("");
    with_chunk_rows(&cfg, 40);
    let data = shop.data_dir.path().join("data");
    let mut first = backfill(&cfg, &data);
    wait_until("some snapshot chunks stored", T, || async {
        (stored_chunks(&data) > 0).then_some(())
    })
    .await;
    first.kill().unwrap(); // SIGKILL
    let _ = first.wait();
    shop.exec("identity", "UPDATE customers SET name = 'during' WHERE id = 1")
        .await;
    let out = backfill(&cfg, &data).wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        !log.contains("creating replication slot"),
        "resumed, not started over: {log}"
    );
    let mem = Remembered::default();
    let _w = shop.worker(&cfg).await;
    converge_orders(&shop, &mem, T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_pauses_to_stream_when_the_slot_retains_too_much_wal() {
    let shop = Shop::new("bfthrottle").await;
    seed(&shop, 400).await;
    let cfg = shop.config("");
    with_chunk_rows(&cfg, 40);
    with_source_setting(&cfg, "max_retained_wal_bytes = 1048576");
    let data = shop.data_dir.path().join("data");

    // The slots exist and hold WAL from their consistent points once the first chunks are in.
    let mut first = backfill(&cfg, &data);
    wait_until("some snapshot chunks stored", T, || async {
        (stored_chunks(&data) > 0).then_some(())
    })
    .await;
    first.kill().unwrap(); // SIGKILL
    let _ = first.wait();
    let before = shop.confirmed_flush("ordering").await.unwrap();
    // Several MB of WAL (a table nobody publishes) and changes the read models must show.
    shop.exec(
        "ordering",
        "CREATE TABLE filler AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 50000) g;
         UPDATE orders SET status = 'shipped' WHERE id % 7 = 0;
         INSERT INTO orders VALUES (5000, 1, 'new', 1, NULL, now(), now());
         INSERT INTO order_items VALUES (5000, 1, 2, 1, 3.00);
         DELETE FROM order_items WHERE order_id = 9",
    )
    .await;
    let wal = shop.current_lsn("ordering").await - before;
    assert!(wal > 2 << 20, "{wal} bytes of WAL written");

    let out = backfill(&cfg, &data).wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("snapshot paused"), "the backfill paused: {log}");
    assert!(log.contains("snapshot resumed"), "and resumed after catching up: {log}");
    // Streaming during the pause let the slot go of that WAL (and applied the changes).
    let after = shop.confirmed_flush("ordering").await.unwrap();
    assert!(
        after >= before + wal,
        "slot confirmed {after}, was {before}, {wal} bytes written"
    );

    let mem = Remembered::default();
    matches_truth(&shop, &mem).await.unwrap();
    let _w = shop.worker(&cfg).await;
    shop.exec("ordering", "UPDATE orders SET status = 'paid' WHERE id = 5000")
        .await;
    converge_orders(&shop, &mem, T).await;
}

/// The issue's scale: ten thousand orders (thirty thousand items) already in the
/// databases, written to while the backfill reads, every document equal to the join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_of_ten_thousand_orders_with_concurrent_writes() {
    let shop = Shop::new("bfbig").await;
    seed(&shop, 10_000).await;
    let cfg = shop.config("");
    let data = shop.data_dir.path().join("data");
    let child = backfill(&cfg, &data);
    let writer = {
        let (o, c) = (shop.pg("ordering").await, shop.pg("catalog").await);
        tokio::spawn(async move {
            for i in 0..200 {
                o.batch_execute(&format!(
                    "UPDATE orders SET status = 'shipped' WHERE id = {};
                     INSERT INTO orders VALUES ({}, 2, 'new', 1, NULL, now(), now());
                     INSERT INTO order_items VALUES ({1}, 1, 3, 1, 3.00);
                     DELETE FROM order_items WHERE order_id = {} AND line_no = 2",
                    1 + i * 37,
                    20_000 + i,
                    1 + i * 41
                ))
                .await
                .unwrap();
                if i % 50 == 0 {
                    c.batch_execute(&format!(
                        "UPDATE products SET price = price + 1 WHERE id = {}",
                        1 + i % 20
                    ))
                    .await
                    .unwrap();
                }
            }
        })
    };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    writer.await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _w = shop.worker(&cfg).await;
    converge_orders(&shop, &Remembered::default(), Duration::from_secs(180)).await;
}
