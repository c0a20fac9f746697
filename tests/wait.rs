//! Read-your-writes: `/v1/wait` (and `viewkeeper wait`) answers once a position is durable
//! in every read model of its source, so a write, a wait and a read always see the write;
//! and `_meta` says which positions a document reflects.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// A Postgres LSN as text → number.
const INSERT_LSN: &str = "pg_current_wal_insert_lsn()";

fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// `SELECT <f>` as LSN text (`pg_current_wal_insert_lsn()`, `pg_current_wal_lsn()`).
async fn wal_position(c: &tokio_postgres::Client, f: &str) -> String {
    c.query_one(&format!("SELECT {f}::text"), &[]).await.unwrap().get(0)
}

/// `GET /v1/wait?…` → (status, body).
async fn wait(http: &reqwest::Client, addr: &str, query: &[(&str, &str)]) -> (u16, Value) {
    let r = http
        .get(format!("http://{addr}/v1/wait"))
        .query(query)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Runs `sql` on `db`, takes the writer's position after the commit (`f`, e.g.
/// `pg_current_wal_insert_lsn()`) and waits for it on `source` (up to 20 s): the answer's
/// status and body, and the position.
async fn write_then_wait(
    http: &reqwest::Client,
    addr: &str,
    db: &tokio_postgres::Client,
    source: &str,
    sql: &str,
    f: &str,
) -> (u16, Value, String) {
    db.batch_execute(sql).await.unwrap();
    let at = wal_position(db, f).await;
    let (code, body) = wait(http, addr, &[("source", source), ("lsn", &at), ("timeout_ms", "20000")]).await;
    (code, body, at)
}

async fn hget(shop: &Shop, key: &str, field: &str) -> Option<String> {
    let mut r = shop.redis().await;
    redis::AsyncCommands::hget(&mut r, shop.key(key), field).await.unwrap()
}

async fn order_doc(http: &reqwest::Client, shop: &Shop, id: i64) -> Value {
    http.get(format!("{}/{}/_doc/{id}", servers().search, shop.alias()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Seeds products 1..=100 and orders 1..=20 (with items) and waits until the caches show
/// them.
async fn seed(shop: &Shop) {
    shop.exec("identity", "INSERT INTO customers SELECT g, 'Customer ' || g, 'c' || g || '@example.com', now() FROM generate_series(1, 10) g").await;
    shop.exec("catalog", "INSERT INTO products(id, sku, name, price) SELECT g, 'SKU-' || g, 'Product ' || g, g FROM generate_series(1, 100) g").await;
    shop.exec(
        "ordering",
        "INSERT INTO orders SELECT g, 1 + g % 10, 'new', g, '{}'::jsonb, now(), now() FROM generate_series(1, 20) g;
                           INSERT INTO order_items SELECT o, 1, o, 1, 1.00 FROM generate_series(1, 20) o",
    )
    .await;
    converge(shop, T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_then_a_wait_then_a_read_always_sees_the_write_under_load() {
    let shop = Shop::new("ryw").await;
    let w = shop.worker(&shop.config("")).await;
    let addr = w.http_addr().await;
    seed(&shop).await;
    // Load beside the probes: other products and orders change all the time.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (catalog, ordering, stop) = (shop.pg("catalog").await, shop.pg("ordering").await, stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                catalog
                    .batch_execute(&format!(
                        "UPDATE products SET price = price + 1 WHERE id BETWEEN 50 AND 100 AND id % 7 = {}",
                        n % 7
                    ))
                    .await
                    .unwrap();
                ordering
                    .batch_execute(&format!(
                        "UPDATE orders SET total = total + 1, updated_at = now() WHERE id BETWEEN 10 AND 20 AND id % 3 = {}",
                        n % 3
                    ))
                    .await
                    .unwrap();
            }
            n
        })
    };
    let http = reqwest::Client::new();
    let catalog = shop.pg("catalog").await;
    for i in 0..40 {
        // The writer's position after its commit: the insert position, or the WAL
        // position (both at or after the commit's end).
        let f = if i % 2 == 0 {
            "pg_current_wal_insert_lsn()"
        } else {
            "pg_current_wal_lsn()"
        };
        let sql = format!("UPDATE products SET name = 'probe {i}' WHERE id = 1");
        let (status, body, at) = write_then_wait(&http, &addr, &catalog, "catalog", &sql, f).await;
        assert_eq!(status, 200, "iteration {i}: {body}");
        assert!(lsn(body["position"].as_str().unwrap()) + 40 >= lsn(&at), "{body}");
        // Every projection reading the source has it: both caches.
        assert_eq!(
            hget(&shop, "ordering:product:1", "name").await.as_deref(),
            Some(format!("probe {i}").as_str()),
            "iteration {i}: the wait answered before the cache had the write"
        );
        assert_eq!(
            hget(&shop, "storefront:product:1", "name").await.as_deref(),
            Some(format!("probe {i}").as_str()),
            "iteration {i}"
        );
    }
    // The joined view: an order's status, through another source.
    let ordering = shop.pg("ordering").await;
    for i in 0..15 {
        let status = format!("s{i}");
        let sql = format!("UPDATE orders SET status = '{status}', updated_at = now() WHERE id = 1");
        let (code, body, _) = write_then_wait(&http, &addr, &ordering, "ordering", &sql, INSERT_LSN).await;
        assert_eq!(code, 200, "iteration {i}: {body}");
        let doc = order_doc(&http, &shop, 1).await;
        assert_eq!(doc["_source"]["status"], status.as_str(), "iteration {i}: {doc}");
    }
    stop.cancel();
    assert!(load.await.unwrap() > 10, "the load ran beside the probes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_answer_quickly_when_idle_time_out_with_408_and_name_bad_requests() {
    let shop = Shop::new("waitidle").await;
    let w = shop.worker(&shop.config("")).await;
    let addr = w.http_addr().await;
    seed(&shop).await;
    let http = reqwest::Client::new();
    let catalog = shop.pg("catalog").await;
    // An otherwise idle database: one write, then the insert position (which may lie
    // beyond the commit the worker saw, when other WAL follows it on the server).
    catalog
        .batch_execute("UPDATE products SET name = 'idle write' WHERE id = 2")
        .await
        .unwrap();
    let at = wal_position(&catalog, "pg_current_wal_insert_lsn()").await;
    let started = Instant::now();
    let (code, body) = wait(
        &http,
        &addr,
        &[("source", "catalog"), ("lsn", &at), ("timeout_ms", "15000")],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}: {body}",
        started.elapsed()
    );
    assert_eq!(
        hget(&shop, "ordering:product:2", "name").await.as_deref(),
        Some("idle write")
    );
    // Nothing written, the position of the server now (WAL of others beyond our commits):
    // reached from the keepalives of the idle stream.
    let at = wal_position(&catalog, "pg_current_wal_insert_lsn()").await;
    let (code, body) = wait(&http, &addr, &[("source", "identity"), ("lsn", "0/0")]).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = wait(
        &http,
        &addr,
        &[("source", "catalog"), ("lsn", &at), ("timeout_ms", "15000")],
    )
    .await;
    assert_eq!(code, 200, "an idle source reaches the server's position: {body}");

    // Beyond anything written: 408 with where the source is, after the timeout.
    let far = format!("{:X}/0", (lsn(&at) >> 32) + 16);
    let started = Instant::now();
    let (code, body) = wait(
        &http,
        &addr,
        &[("source", "catalog"), ("lsn", &far), ("timeout_ms", "300")],
    )
    .await;
    assert_eq!(code, 408, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(body["reached"], false);
    assert!(lsn(body["position"].as_str().unwrap()) >= lsn(&at) - 40, "{body}");
    // Bad requests name what is wrong.
    let (code, body) = wait(&http, &addr, &[("source", "nope"), ("lsn", "0/1")]).await;
    assert_eq!(code, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("unknown source 'nope'"),
        "{body}"
    );
    let (code, body) = wait(&http, &addr, &[("source", "catalog"), ("lsn", "12345")]).await;
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().starts_with("parameter lsn:"), "{body}");
    let (code, body) = wait(&http, &addr, &[("lsn", "0/1")]).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("parameter source:"),
        "{body}"
    );
    let (code, body) = wait(
        &http,
        &addr,
        &[("source", "catalog"), ("lsn", "0/1"), ("timeout_ms", "soon")],
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("parameter timeout_ms:"),
        "{body}"
    );

    // The CLI: exit 0 reached, 3 timed out, 1 refused; the answer on stdout.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_viewkeeper"))
            .arg("wait")
            .args(["--url", &format!("http://{addr}")])
            .args(args)
            .output()
            .unwrap()
    };
    let out = cli(&["--source", "catalog", "--lsn", &at]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["reached"], true);
    let out = cli(&["--source", "catalog", "--lsn", &far, "--timeout-ms", "200"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out after 200 ms"));
    let out = cli(&["--source", "nope", "--lsn", "0/1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown source 'nope'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_says_which_positions_a_document_reflects_and_verify_ignores_it() {
    let shop = Shop::new("meta").await;
    let cfg = shop.config("");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text
        .replace(
            "[projections.orders_view]\n",
            "[projections.orders_view]\nmeta = true\n",
        )
        .replace(
            "[projections.ordering_products]\n",
            "[projections.ordering_products]\nmeta = true\n",
        );
    std::fs::write(&cfg, text).unwrap();
    let w = shop.worker(&cfg).await;
    let addr = w.http_addr().await;
    seed(&shop).await;
    let http = reqwest::Client::new();
    let ordering = shop.pg("ordering").await;
    // The position before the commit is below the commit's end.
    let before = wal_position(&ordering, "pg_current_wal_insert_lsn()").await;
    let wrote = std::time::SystemTime::now();
    let sql = "UPDATE orders SET status = 'paid', updated_at = now() WHERE id = 3";
    let (code, body, _) = write_then_wait(&http, &addr, &ordering, "ordering", sql, INSERT_LSN).await;
    assert_eq!(code, 200, "{body}");
    let doc = order_doc(&http, &shop, 3).await;
    let meta = &doc["_source"]["_meta"];
    assert_eq!(doc["_source"]["status"], "paid");
    let mine = lsn(meta["sources"]["ordering"]["lsn"].as_str().unwrap_or("0/0"));
    assert!(mine > lsn(&before), "{meta}");
    // The order view reads the three sources; each says how far it is reflected.
    for s in ["identity", "catalog", "ordering"] {
        assert!(meta["sources"][s].is_object(), "{meta}");
    }
    let ts = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    let commit = ts(&meta["sources"]["ordering"]["commit_ts"]);
    let wrote: chrono::DateTime<chrono::Utc> = wrote.into();
    assert!(commit >= wrote - chrono::Duration::seconds(5), "{meta}");
    assert!(ts(&meta["synced_at"]) >= commit, "{meta}");
    assert_eq!(ts(&meta["commit_ts"]), commit, "{meta}");
    // A cache entry has it as JSON text; the cache without meta has none.
    let catalog = shop.pg("catalog").await;
    let sql = "UPDATE products SET name = 'fresh' WHERE id = 4";
    let (code, body, _) = write_then_wait(&http, &addr, &catalog, "catalog", sql, INSERT_LSN).await;
    assert_eq!(code, 200, "{body}");
    let entry: Value = serde_json::from_str(&hget(&shop, "ordering:product:4", "_meta").await.unwrap()).unwrap();
    assert!(entry["sources"]["catalog"]["lsn"].is_string(), "{entry}");
    assert_eq!(entry["sources"].as_object().unwrap().len(), 1, "{entry}");
    assert_eq!(hget(&shop, "storefront:product:4", "_meta").await, None);
    // verify compares content only: clean with `_meta` in the documents.
    let out = shop.viewkeeper(&cfg, &["verify"]);
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
