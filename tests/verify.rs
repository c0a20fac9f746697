//! `viewkeeper verify [--repair]` beside a running worker: clean on a converged system,
//! names the ids of documents and cache entries changed behind the worker's back, and
//! `--repair` puts them right.

mod common;

use common::orders::*;
use common::*;
use redis::AsyncCommands;
use serde_json::{json, Value};
use std::process::Output;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn verify(shop: &Shop, cfg: &std::path::Path, extra: &[&str]) -> Output {
    shop.viewkeeper(cfg, &[&["verify"], extra].concat())
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_tampering_and_repair_fixes_it() {
    let shop = Shop::new("verify").await;
    let cfg = shop.config("");
    let _w = shop.worker(&cfg).await;
    shop.exec("identity", "INSERT INTO customers SELECT g, 'Customer ' || g, 'c' || g || '@example.com', now() FROM generate_series(1, 10) g").await;
    shop.exec("catalog", "INSERT INTO products(id, sku, name, price) SELECT g, 'SKU-' || g, 'Product ' || g, g + 0.5 FROM generate_series(1, 8) g").await;
    shop.exec(
        "ordering",
        "INSERT INTO orders SELECT g, 1 + g % 10, 'new', g, NULL, now(), now() FROM generate_series(1, 20) g;
         INSERT INTO order_items SELECT o, l, 1 + (o + l) % 8, l, 2.50 FROM generate_series(1, 20) o, generate_series(1, 2) l",
    )
    .await;
    shop.exec(
        "catalog",
        "UPDATE products SET status = 'decommissioned' WHERE id = 2; DELETE FROM products WHERE id = 3",
    )
    .await;
    let mut mem = Remembered::default();
    mem.deleted_products.insert(3, ("SKU-3".into(), "Product 3".into()));
    converge(&shop, T).await;
    converge_orders(&shop, &mem, T).await;

    let out = verify(&shop, &cfg, &[]);
    assert!(out.status.success(), "clean on a converged system: {}", text(&out));

    // Behind the worker's back: a stale cache entry, a missing one, an extra one, a
    // member taken out of the active set, and a changed and a deleted document.
    let mut r = shop.redis().await;
    let _: () = r.hset(shop.key("ordering:product:5"), "price", "0.01").await.unwrap();
    let _: () = r.del(shop.key("storefront:product:6")).await.unwrap();
    let _: () = r.hset(shop.key("ordering:product:99"), "name", "ghost").await.unwrap();
    let _: () = r.srem(shop.key("storefront:products:active"), "7").await.unwrap();
    let http = reqwest::Client::new();
    let doc = format!("{}/{}/_doc", servers().search, shop.alias());
    let mut d4: Value = http.get(format!("{doc}/4")).send().await.unwrap().json().await.unwrap();
    d4["_source"]["status"] = json!("tampered");
    let put = http.put(format!("{doc}/4")).json(&d4["_source"]).send().await.unwrap();
    assert!(put.status().is_success(), "{:?}", put.text().await);
    let del = http.delete(format!("{doc}/9")).send().await.unwrap();
    assert!(del.status().is_success(), "{:?}", del.text().await);

    let out = verify(&shop, &cfg, &["--json"]);
    assert!(!out.status.success(), "tampering found: {}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let found: Vec<(String, String, String)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["projection"].as_str().unwrap().to_string(),
                f["kind"].as_str().unwrap().to_string(),
                f["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("ordering_products", "stale", shop.key("ordering:product:5")),
        ("storefront_products", "missing", shop.key("storefront:product:6")),
        ("ordering_products", "extra", shop.key("ordering:product:99")),
        ("storefront_products", "active_set", "7".to_string()),
        ("orders_view", "stale", "4".to_string()),
        ("orders_view", "missing", "9".to_string()),
    ];
    for (p, k, id) in &want {
        assert!(
            found
                .iter()
                .any(|f| (f.0.as_str(), f.1.as_str(), f.2.as_str()) == (*p, *k, id.as_str())),
            "{p} {k} {id} in {found:?}"
        );
    }
    assert_eq!(found.len(), want.len(), "nothing else: {found:?}");
    let stale = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == json!("4"))
        .unwrap();
    assert!(stale["detail"].as_str().unwrap().contains("status"), "{stale}");

    let out = verify(&shop, &cfg, &["--repair"]);
    assert!(out.status.success(), "repaired: {}", text(&out));
    let out = verify(&shop, &cfg, &[]);
    assert!(out.status.success(), "clean after repair: {}", text(&out));
    cache_matches_truth(&shop).await.unwrap();
    matches_truth(&shop, &mem).await.unwrap();
    let ghost: i64 = r.exists(shop.key("ordering:product:99")).await.unwrap();
    assert_eq!(ghost, 0, "the extra entry is gone");

    // The worker's later writes still win over the repaired entries.
    shop.exec("catalog", "UPDATE products SET price = 77.70 WHERE id = 5")
        .await;
    converge(&shop, T).await;
}

/// `verify --repair` beside live writes: a change the worker writes after verify read the
/// truth (held between its findings and its repair) must win over the repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_never_wins_over_a_change_written_after_it_read_the_truth() {
    let shop = Shop::new("repairrace").await;
    let cfg = shop.config("");
    let _w = shop.worker(&cfg).await;
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price) SELECT g, 'S' || g, 'P' || g, g FROM generate_series(1, 5) g",
    )
    .await;
    converge(&shop, T).await;
    let mut r = shop.redis().await;
    let _: () = r.hset(shop.key("ordering:product:5"), "price", "0.01").await.unwrap();

    let pause = tempfile::tempdir().unwrap();
    let held = pause.path().join("verify-before-repair.paused");
    let repair = std::process::Command::new(env!("CARGO_BIN_EXE_viewkeeper"))
        .args(["verify", "--repair", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(shop.data_dir.path().join("data"))
        .env("VIEWKEEPER_PAUSE_DIR", pause.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("verify holds before its repair", T, || async {
        held.exists().then_some(())
    })
    .await;
    // The tampered entry is found; meanwhile the product changes and the worker writes it.
    shop.exec("catalog", "UPDATE products SET price = 77.70 WHERE id = 5")
        .await;
    wait_until("the worker wrote the change", T, || async {
        let p: Option<String> = shop
            .redis()
            .await
            .hget(shop.key("ordering:product:5"), "price")
            .await
            .unwrap();
        (p.as_deref() == Some("77.70")).then_some(())
    })
    .await;
    std::fs::remove_file(&held).unwrap();
    let out = repair.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let p: Option<String> = r.hget(shop.key("ordering:product:5"), "price").await.unwrap();
    assert_eq!(
        p.as_deref(),
        Some("77.70"),
        "the repair did not write the old price over it"
    );
    cache_matches_truth(&shop).await.unwrap();
}

/// Cache key templates may overlap (`p:{id}` and `p:{id}:desc`): one projection's entries
/// are never another's extras, so verify is clean and `--repair` deletes none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_key_templates_are_not_each_others_extras() {
    let shop = Shop::new("overlap").await;
    let cfg = shop.config(&format!(
        r#"
[projections.descriptions]
root = "products"
sink = "cache"
key = "{}:ordering:product:{{id}}:desc"
fields = ["description"]
"#,
        shop.prefix
    ));
    let _w = shop.worker(&cfg).await;
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price, description) SELECT g, 'S' || g, 'P' || g, g, 'd' || g FROM generate_series(1, 5) g",
    )
    .await;
    converge(&shop, T).await;
    wait_until("descriptions cached", T, || async {
        let n: i64 = shop
            .redis()
            .await
            .exists(shop.key("ordering:product:5:desc"))
            .await
            .unwrap();
        (n == 1).then_some(())
    })
    .await;
    let mut r = shop.redis().await;
    let out = verify(&shop, &cfg, &[]);
    assert!(out.status.success(), "clean: {}", text(&out));
    let out = verify(&shop, &cfg, &["--repair"]);
    assert!(out.status.success(), "{}", text(&out));
    for id in 1..=5 {
        let d: Option<String> = r
            .hget(shop.key(&format!("ordering:product:{id}:desc")), "description")
            .await
            .unwrap();
        assert_eq!(d, Some(format!("d{id}")), "kept");
    }
    let status: Value = serde_json::from_slice(&shop.viewkeeper(&cfg, &["status", "--json"]).stdout).unwrap();
    assert_eq!(
        status["projections"]["ordering_products"]["documents"],
        json!(5),
        "{status}"
    );
    assert_eq!(status["projections"]["descriptions"]["documents"], json!(5), "{status}");
}
