//! Changing the config of a running system: a projection that needs columns the state
//! store never kept (a new field, a new projection over an existing table) makes the
//! worker re-read those tables from their sources while it streams and re-write what
//! depends on them; a process with a different config must not change the store under a
//! worker that runs with the old one.

mod common;

use common::orders::*;
use common::*;
use redis::AsyncCommands;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

/// The shop's config with a cache of product descriptions and the customers' `created_at`
/// in `orders_view`: columns the store did not keep for the shop's config.
fn bigger(shop: &Shop, base: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(base).unwrap().replace(
        "fields = [\"id\", \"name\", \"email\"]",
        "fields = [\"id\", \"name\", \"email\", \"created_at\"]",
    ) + &format!(
        r#"
[projections.descriptions]
root = "products"
sink = "cache"
key = "{}:desc:{{id}}"
fields = ["name", "description"]
"#,
        shop.prefix
    );
    let path = shop.data_dir.path().join("bigger.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_fields_are_read_from_the_sources_and_other_configs_are_refused_beside_the_worker() {
    let shop = Shop::new("cfgchange").await;
    let cfg = shop.config("");
    let mut w = shop.worker(&cfg).await;
    shop.exec(
        "identity",
        "INSERT INTO customers SELECT g, 'C' || g, 'c' || g || '@x', timestamptz '2026-01-01' + g * interval '1 day' FROM generate_series(1, 5) g",
    )
    .await;
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price, description) SELECT g, 'S' || g, 'P' || g, g, 'about ' || g FROM generate_series(1, 30) g",
    )
    .await;
    shop.exec(
        "ordering",
        "INSERT INTO orders SELECT g, 1 + g % 5, 'new', g, NULL, now(), now() FROM generate_series(1, 12) g;
         INSERT INTO order_items SELECT o, 1, 1 + o % 30, 1, 1 FROM generate_series(1, 12) o",
    )
    .await;
    converge(&shop, T).await;
    converge_orders(&shop, &Remembered::default(), T).await;

    // Beside the running worker, a rebuild with the bigger config would read columns the
    // store does not have: refused, with what is missing and what to do.
    let big = bigger(&shop, &cfg);
    let out = shop.viewkeeper(&big, &["backfill", "--projection", "descriptions"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("table products lacks column(s) description")
            && err.contains("table customers lacks column(s) created_at")
            && err.contains("Start `viewkeeper run` with this config first"),
        "{err}"
    );
    // Two workers on one data dir: refused too.
    let out = shop.viewkeeper(&cfg, &["run"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("one worker per data dir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The worker restarted with the bigger config re-reads products and customers while
    // streaming (a change during the re-read is kept), and re-writes what reads them.
    assert_eq!(w.terminate(), Some(0));
    let w = shop.worker(&big).await;
    shop.exec(
        "catalog",
        "UPDATE products SET description = 'changed meanwhile' WHERE id = 7",
    )
    .await;
    let pg = shop.pg("catalog").await;
    wait_until("every description cached", T, || async {
        let mut r = shop.redis().await;
        for row in pg.query("SELECT id, description FROM products", &[]).await.unwrap() {
            let id: i64 = row.get(0);
            let want: Option<String> = row.get(1);
            let have: Option<String> = r.hget(shop.key(&format!("desc:{id}")), "description").await.unwrap();
            if have != want {
                return None;
            }
        }
        Some(())
    })
    .await;
    let http = reqwest::Client::new();
    wait_until("orders show their customer's created_at", T, || async {
        for id in 1..=12 {
            let doc: Value = http
                .get(format!("{}/{}/_doc/{id}", servers().search, shop.alias()))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let at = doc["_source"]["customer"]["created_at"].as_str()?;
            let c = 1 + id % 5;
            if !at.starts_with(&format!("2026-01-{:02}", 1 + c)) {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(w.log_text().contains("re-reading the table from its source"));
    let out = shop.viewkeeper(&big, &["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // Now that the store keeps them, the rebuild is allowed beside the worker.
    let out = shop.viewkeeper(&big, &["backfill", "--projection", "descriptions"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
