//! The per-service Redis product caches, end to end: real Postgres (pgoutput), the real
//! worker binary, real Redis. Every step is checked against the ground truth in
//! Postgres (see `common::cache_matches_truth`).

mod common;

use common::*;
use redis::AsyncCommands;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn product_lifecycle_follows_postgres() {
    let shop = Shop::new("lifecycle").await;
    let _w = shop.worker(&shop.config("")).await;
    let pg = shop.pg("catalog").await;
    let steps = [
        "INSERT INTO products(id, sku, name, price) VALUES (1, 'W-1', 'Widget', 12.50), (2, 'G-2', 'Gadget', 3), (3, 'D-3', 'Draft thing', 1)",
        "UPDATE products SET status = 'draft' WHERE id = 3",
        "UPDATE products SET price = 13.75, name = 'Widget+' WHERE id = 1",
        "UPDATE products SET status = 'decommissioned' WHERE id = 2",
        "UPDATE products SET status = 'active' WHERE id = 2",
        "DELETE FROM products WHERE id = 1",
        "INSERT INTO products(id, sku, name, price) VALUES (1, 'W-1b', 'Widget reborn', 14)",
        "DELETE FROM products WHERE id = 3",
    ];
    for sql in steps {
        pg.batch_execute(sql).await.unwrap();
        converge(&shop, T).await;
    }
    let mut r = shop.redis().await;
    // Deleted row 3: kept with its last image, flagged, out of the active set.
    let h: std::collections::BTreeMap<String, String> = r.hgetall(shop.key("ordering:product:3")).await.unwrap();
    assert_eq!(h["status"], "decommissioned");
    assert_eq!(h["name"], "Draft thing");
    assert!(h.contains_key("decommissioned_at"));
    // Re-inserted row 1 is active again, with no leftover tombstone field.
    let h: std::collections::BTreeMap<String, String> = r.hgetall(shop.key("storefront:product:1")).await.unwrap();
    assert_eq!(h["name"], "Widget reborn");
    assert!(!h.contains_key("decommissioned_at"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_turns_every_row_into_a_tombstone() {
    let shop = Shop::new("truncate").await;
    let _w = shop.worker(&shop.config("")).await;
    let pg = shop.pg("catalog").await;
    pg.batch_execute(
        "INSERT INTO products(id, sku, name, price) SELECT g, 'S' || g, 'P' || g, g FROM generate_series(1, 50) g",
    )
    .await
    .unwrap();
    converge(&shop, T).await;
    pg.batch_execute("TRUNCATE products").await.unwrap();
    converge(&shop, T).await;
    let mut r = shop.redis().await;
    let n: usize = r.scard(shop.key("storefront:products:active")).await.unwrap();
    assert_eq!(n, 0);
    let status: String = r.hget(shop.key("ordering:product:50"), "status").await.unwrap();
    assert_eq!(status, "decommissioned");
    // A truncated table can come back.
    pg.batch_execute("INSERT INTO products(id, sku, name, price) VALUES (7, 'S7', 'back', 1)")
        .await
        .unwrap();
    converge(&shop, T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toast_column_survives_an_update_that_does_not_send_it() {
    let shop = Shop::new("toast").await;
    // A third cache that carries the description, so the TOASTed column matters.
    let cfg = shop.config(&descriptions_projection(&shop));
    let _w = shop.worker(&cfg).await;
    let pg = shop.pg("catalog").await;
    let desc = insert_toasted_product(&pg, 1).await;
    assert_eq!(desc.len(), 25_600);
    pg.batch_execute("UPDATE products SET price = 6.25 WHERE id = 1")
        .await
        .unwrap();
    converge(&shop, T).await;
    let mut r = shop.redis().await;
    let key = shop.key("desc:1");
    let (d, p): (String, String) = wait_until("description cache has the new price", T, || {
        let mut r = r.clone();
        let key = key.clone();
        async move {
            let (d, p): (Option<String>, Option<String>) = redis::pipe()
                .hget(&key, "description")
                .hget(&key, "price")
                .query_async(&mut r)
                .await
                .ok()?;
            (p.as_deref() == Some("6.25")).then(|| (d.unwrap_or_default(), p.unwrap()))
        }
    })
    .await;
    assert_eq!(p, "6.25");
    assert_eq!(d, desc, "the unchanged TOAST value is merged from the stored image");
    let _: () = r.del(&key).await.unwrap();
    assert!(shop.dead_letters().is_empty(), "{:?}", shop.dead_letters());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_row_transaction_with_unicode_and_quotes() {
    let shop = Shop::new("bigtx").await;
    let _w = shop.worker(&shop.config("")).await;
    let pg = shop.pg("catalog").await;
    pg.batch_execute(
        r#"INSERT INTO products(id, sku, name, price, status)
           SELECT g, 'SKU-' || g, 'Ünïcødé "quoted" ''single'' \ back ✓ 🚀 #' || g, (g % 1000) + 0.99,
                  CASE WHEN g % 10 = 0 THEN 'draft' ELSE 'active' END
           FROM generate_series(1, 5000) g"#,
    )
    .await
    .unwrap();
    converge(&shop, Duration::from_secs(90)).await;
    let mut r = shop.redis().await;
    let name: String = r.hget(shop.key("ordering:product:42"), "name").await.unwrap();
    assert_eq!(name, "Ünïcødé \"quoted\" 'single' \\ back ✓ 🚀 #42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_converges_after_restart() {
    let shop = Shop::new("sigkill").await;
    let cfg = shop.config("");
    let mut w = shop.worker(&cfg).await;
    let pg = shop.pg("catalog").await;
    pg.batch_execute(
        "INSERT INTO products(id, sku, name, price) SELECT g, 'K' || g, 'p' || g, 1 FROM generate_series(1, 200) g",
    )
    .await
    .unwrap();
    // A stream of 4,000 updates in 100 transactions, with kills in the middle.
    let writer = {
        let pg = shop.pg("catalog").await;
        tokio::spawn(async move {
            for round in 0..100 {
                let status = ["active", "draft", "decommissioned", "active"][round % 4];
                pg.batch_execute(&format!(
                    "BEGIN; UPDATE products SET price = price + 1, status = '{status}' WHERE id % 5 = {m};
                     UPDATE products SET name = name || '.' WHERE id <= 40 + {round}; COMMIT;",
                    m = round % 5
                ))
                .await
                .unwrap();
            }
        })
    };
    for _ in 0..3 {
        // Kill once the worker has made progress past its start.
        let before = shop.confirmed_flush("catalog").await.unwrap_or(0);
        wait_until("worker acknowledged something new", T, || async {
            (shop.confirmed_flush("catalog").await.unwrap_or(0) > before).then_some(())
        })
        .await;
        w.kill9();
        w = shop.worker(&cfg).await;
    }
    writer.await.unwrap();
    pg.batch_execute("DELETE FROM products WHERE id % 7 = 0").await.unwrap();
    converge(&shop, Duration::from_secs(90)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_cannot_render_is_dead_lettered_and_the_rest_flows() {
    let shop = Shop::new("deadletter").await;
    // A cache keyed by both primary-key columns of a table whose key holds an array: such a
    // row has no usable cache key (an id cannot hold an array), the others render.
    shop.exec(
        "catalog",
        "CREATE TABLE labels (id bigint, tags text[], name text, PRIMARY KEY (id, tags))",
    )
    .await;
    let cfg = shop.config(&format!(
        r#"
[tables.labels]
source = "catalog"
name = "public.labels"
primary_key = ["id", "tags"]

[projections.by_tags]
root = "labels"
sink = "cache"
key = "{}:label:{{id}}:{{tags}}"
fields = ["name"]
"#,
        shop.prefix
    ));
    let w = shop.worker(&cfg).await;
    let pg = shop.pg("catalog").await;
    pg.batch_execute(
        "INSERT INTO labels(id, tags, name) VALUES (1, '{a,b}', 'two tags');
         INSERT INTO products(id, sku, name, price) VALUES (2, 'b', 'described', 1)",
    )
    .await
    .unwrap();
    converge(&shop, T).await;
    let letters = wait_until("dead letter recorded", T, || async {
        let d = shop.dead_letters();
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(letters[0].0, "labels");
    assert_eq!(letters[0].1, r#"[1,["a","b"]]"#);
    assert!(
        letters[0].2.contains(r#"key column 'tags' is ["a","b"]"#),
        "{letters:?}"
    );
    assert!(w.log_text().contains("cannot render"), "logged too");
    // The on-call view, beside the running worker.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_viewkeeper"))
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(shop.data_dir.path().join("data"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let list: serde_json::Value = serde_json::from_str(&cli(&["dlq", "list", "--json"])).unwrap();
    assert_eq!(list["total"], serde_json::json!(letters.len()));
    assert_eq!(list["dead_letters"][0]["key"], serde_json::json!(r#"[1,["a","b"]]"#));
    let id = list["dead_letters"][0]["id"].as_i64().unwrap().to_string();
    assert!(cli(&["dlq", "show", &id]).contains("key column 'tags' is"));
    let status: serde_json::Value = serde_json::from_str(&cli(&["status", "--json"])).unwrap();
    assert_eq!(status["dead_letters"], serde_json::json!(letters.len()));
    assert_eq!(status["rows"]["products"], serde_json::json!(1));
    assert_eq!(status["rows"]["labels"], serde_json::json!(1));
    assert_eq!(
        status["sources"]["catalog"]["slot_state"]["active"],
        serde_json::json!(true)
    );
    assert!(
        status["sources"]["catalog"]["slot_state"]["lag_bytes"].is_i64(),
        "{status}"
    );
    assert!(
        status["sources"]["catalog"]["checkpoint_updated_at"].is_string(),
        "{status}"
    );
    assert_eq!(
        status["sinks"]["cache"]["reachable"],
        serde_json::json!(true),
        "{status}"
    );
    assert_eq!(
        status["sinks"]["search"]["reachable"],
        serde_json::json!(true),
        "{status}"
    );
    // The label was read, but it is a dead letter: no entry. The product's caches have one.
    assert_eq!(
        status["projections"]["by_tags"]["documents"].as_u64(),
        Some(0),
        "{status}"
    );
    assert_eq!(
        status["projections"]["ordering_products"]["documents"].as_u64(),
        Some(1),
        "{status}"
    );
    assert!(
        status["projections"]["ordering_products"]["last_write_at"].is_string(),
        "{status}"
    );

    // Dropping needs --yes.
    assert!(cli(&["dlq", "drop", &id]).contains("add --yes"));
    assert_eq!(shop.dead_letters().len(), letters.len());
    // Replayed without a fix, it still fails: kept, with its reason, and the exit says so.
    let replay = shop.viewkeeper(&cfg, &["dlq", "replay", "--all"]);
    assert!(!replay.status.success());
    assert!(
        String::from_utf8_lossy(&replay.stdout).contains("replayed 0, still failing 1"),
        "{}",
        String::from_utf8_lossy(&replay.stdout)
    );
    assert_eq!(shop.dead_letters().len(), letters.len());
    // Another one, dropped for good.
    pg.batch_execute("INSERT INTO labels(id, tags, name) VALUES (3, '{c}', 'c')")
        .await
        .unwrap();
    wait_until("second dead letter", T, || async {
        (!shop.dead_letters().is_empty()).then_some(())
    })
    .await;
    wait_until("second dead letter", T, || async {
        (shop.dead_letters().len() == 2).then_some(())
    })
    .await;
    assert!(cli(&["dlq", "drop", "--all", "--yes"]).contains("deleted 2"));
    assert!(shop.dead_letters().is_empty());
}

/// A value sent as "unchanged TOAST" for a row never seen whole (the source streams only
/// new changes) cannot apply: a dead letter, until the row is written whole and the letter
/// replayed, which re-renders what reads the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toast_value_never_seen_whole_is_dead_lettered_until_replayed() {
    let shop = Shop::new("toastletter").await;
    let pg = shop.pg("catalog").await;
    insert_toasted_product(&pg, 1).await;
    let cfg = shop.config(&descriptions_projection(&shop));
    with_source_setting(&cfg, "snapshot = \"never\"");
    let _w = shop.worker(&cfg).await;
    pg.batch_execute("UPDATE products SET price = 2 WHERE id = 1")
        .await
        .unwrap();
    let letters = wait_until("dead letter recorded", T, || async {
        let d = shop.dead_letters();
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert!(
        letters[0].2.contains("unchanged TOAST column(s) [\"description\"]"),
        "{letters:?}"
    );
    pg.batch_execute("UPDATE products SET description = description || '!' WHERE id = 1")
        .await
        .unwrap();
    let full: String = pg
        .query_one("SELECT description FROM products WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    wait_until("the whole row cached", T, || async {
        let mut r = shop.redis().await;
        let d: Option<String> = r.hget(shop.key("desc:1"), "description").await.unwrap();
        (d.as_deref() == Some(full.as_str())).then_some(())
    })
    .await;
    let replay = shop.viewkeeper(&cfg, &["dlq", "replay", "--all"]);
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    assert!(String::from_utf8_lossy(&replay.stdout).contains("replayed 1, still failing 0"));
    assert!(shop.dead_letters().is_empty(), "{:?}", shop.dead_letters());
}

#[test]
fn bad_config_names_the_key_path_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(format!("{REPO}/config/shop.toml"))
        .unwrap()
        .replace(
            "sink = \"cache\"\nkey = \"ordering",
            "sink = \"cahce\"\nkey = \"ordering",
        );
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let (ok, err) = check_config(&path);
    assert!(!ok);
    assert!(
        err.contains("projections.ordering_products.sink: unknown sink 'cahce' (declared: cache, search)"),
        "{err}"
    );
    let (ok, err) = check_config(Path::new(&format!("{REPO}/config/shop.toml")));
    assert!(ok, "{err}");
    // A key over a column that can change would leave the old entry behind, active.
    let text = std::fs::read_to_string(format!("{REPO}/config/shop.toml"))
        .unwrap()
        .replace("key = \"ordering:product:{id}\"", "key = \"ordering:product:{sku}\"");
    std::fs::write(&path, text).unwrap();
    let (ok, err) = check_config(&path);
    assert!(!ok);
    assert!(
        err.contains("projections.ordering_products.key: 'ordering:product:{sku}' uses column 'sku' not in the primary key of table products"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_rows_are_read_by_the_initial_snapshot_and_writes_during_it_are_kept() {
    let shop = Shop::new("snapshot").await;
    let pg = shop.pg("catalog").await;
    pg.batch_execute(
        "INSERT INTO products(id, sku, name, price, status)
         SELECT g, 'S' || g, 'existing ' || g, g, CASE WHEN g % 3 = 0 THEN 'decommissioned' ELSE 'active' END
         FROM generate_series(1, 3000) g",
    )
    .await
    .unwrap();
    // Writes race the worker's start: each lands either in the snapshot or in the stream.
    let writer = {
        let pg = shop.pg("catalog").await;
        tokio::spawn(async move {
            for i in 0..200 {
                pg.batch_execute(&format!(
                    "UPDATE products SET price = price + 1 WHERE id = {}; INSERT INTO products(id, sku, name, price) VALUES ({}, 'N{i}', 'new', 1)",
                    1 + i * 7,
                    10_000 + i
                ))
                .await
                .unwrap();
            }
        })
    };
    let _w = Worker::start(&shop.config(""), &shop.data_dir.path().join("data"));
    writer.await.unwrap();
    converge(&shop, Duration::from_secs(90)).await;
    // Already decommissioned when the snapshot read it: since when is unknown, so there is
    // no decommissioned_at (it was 1970-01-01, the snapshot's commit time 0); one
    // decommissioned while streaming has its commit time.
    let mut r = shop.redis().await;
    let at: Option<String> = r
        .hget(shop.key("ordering:product:3"), "decommissioned_at")
        .await
        .unwrap();
    assert_eq!(at, None);
    pg.batch_execute("UPDATE products SET status = 'decommissioned' WHERE id = 1")
        .await
        .unwrap();
    converge(&shop, T).await;
    let at: Option<String> = r
        .hget(shop.key("ordering:product:1"), "decommissioned_at")
        .await
        .unwrap();
    assert!(at.as_deref().is_some_and(|t| t.starts_with("20")), "{at:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_serves_health_readiness_and_metrics() {
    let shop = Shop::new("http").await;
    let w = shop.worker(&shop.config("")).await;
    let addr = w.http_addr().await;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://{addr}{path}")).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    // Ready while idle: every source streams, every sink answered at start (no write needed).
    wait_until("ready while idle", T, || async {
        (get("/readyz").await.ok()?.status() == 200).then_some(())
    })
    .await;
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price) VALUES (1, 'a', 'a', 1)",
    )
    .await;
    converge(&shop, T).await;
    // Ready: every source streams and the last sink write succeeded.
    wait_until("ready", T, || async {
        (get("/readyz").await.ok()?.status() == 200).then_some(())
    })
    .await;
    // A batch's counters and gauges are set once it is checkpointed, a moment after its
    // documents are in the sink: wait for them rather than read once.
    let names = [
        "viewkeeper_changes_applied_total 1",
        "viewkeeper_batches_total",
        "viewkeeper_documents_written_total{projection=\"ordering_products\"}",
        "viewkeeper_sink_write_seconds_bucket",
        "viewkeeper_checkpoint_lsn{source=\"catalog\"}",
        "viewkeeper_slot_retained_wal_bytes{source=\"catalog\"}",
        "viewkeeper_replication_lag_bytes{source=\"catalog\"}",
        "viewkeeper_replication_lag_seconds{source=\"catalog\"}",
        "viewkeeper_state_store_bytes",
    ];
    let deadline = std::time::Instant::now() + T;
    loop {
        let text = get("/metrics").await.unwrap().text().await.unwrap();
        let missing: Vec<&&str> = names.iter().filter(|n| !text.contains(**n)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{missing:?} missing from:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A blackhole sink takes every document, keeps none, and counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackhole_sink_counts_what_it_discards() {
    let shop = Shop::new("blackhole").await;
    let cfg = shop.config(
        r#"
[sinks.void]
kind = "blackhole"

[projections.measured]
root = "products"
sink = "void"
fields = ["name", "price"]
"#,
    );
    let w = shop.worker(&cfg).await;
    let addr = w.http_addr().await;
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price) SELECT g, 's' || g, 'p' || g, 1 FROM generate_series(1, 25) g",
    )
    .await;
    converge(&shop, T).await;
    let counted = wait_until("25 documents discarded", T, || async {
        let m = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let n: f64 = m
            .lines()
            .find(|l| l.starts_with("viewkeeper_blackhole_documents_total{sink=\"void\"}"))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()?;
        (n >= 25.0).then_some(n)
    })
    .await;
    assert_eq!(counted, 25.0);
    // Nothing kept, nothing to compare: verify checks the other projections only.
    let out = shop.viewkeeper(&cfg, &["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("measured"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_expire_after_their_ttl_and_live_entries_never() {
    let shop = Shop::new("ttl").await;
    let extra = format!(
        r#"
[projections.expiring]
root = "products"
sink = "cache"
key = "{}:expiring:{{id}}"
fields = ["name"]
tombstone_ttl_ms = 600000
"#,
        shop.prefix
    );
    let _w = shop.worker(&shop.config(&extra)).await;
    let pg = shop.pg("catalog").await;
    pg.batch_execute("INSERT INTO products(id, sku, name, price) VALUES (1, 'A', 'kept', 1), (2, 'B', 'gone', 2)")
        .await
        .unwrap();
    pg.batch_execute("DELETE FROM products WHERE id = 2").await.unwrap();
    converge(&shop, T).await;
    let mut r = shop.redis().await;
    let live: i64 = r.pttl(shop.key("expiring:1")).await.unwrap();
    let tomb: i64 = r.pttl(shop.key("expiring:2")).await.unwrap();
    assert_eq!(live, -1, "a live entry has no expiry");
    assert!(
        (1..=600_000).contains(&tomb),
        "tombstone PTTL {tomb} ms, configured 600000 ms"
    );
    let gone: bool = r.hexists(shop.key("expiring:2"), "decommissioned_at").await.unwrap();
    assert!(gone, "the entry of the deleted row is a tombstone");
    // The projection without a TTL keeps its tombstone for good.
    let kept: i64 = r.pttl(shop.key("ordering:product:2")).await.unwrap();
    assert_eq!(kept, -1);
}
