//! Hostile rows end to end: each one either renders correctly or becomes a dead letter
//! with its reason, and nothing stops the rows after it. Schema changes mid-stream
//! (column added, dropped, type changed) arrive as new relation messages.

mod common;

use common::*;
use redis::AsyncCommands;
use std::collections::HashMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rows_render_or_dead_letter_and_the_rest_flows() {
    let shop = Shop::new("hostile").await;
    // A cache over columns that do not exist yet (tags, meta) and one that will go away.
    let cfg = shop.config(&format!(
        r#"
[projections.hostile]
root = "products"
sink = "cache"
key = "{}:hostile:{{id}}"
fields = ["name", "price", "description", "tags", "meta"]
"#,
        shop.prefix
    ));
    let _w = shop.worker(&cfg).await;
    let pg = shop.pg("catalog").await;
    let odd = "e\u{301} \u{202e}rtl\u{202c} \u{1F9EA}\u{200d}\u{1F52C} \u{FFFD} \u{10FFFF} tab\there 'quote\" \\ back";
    pg.execute(
        "INSERT INTO products(id, sku, name, price, description) VALUES
           (1, 'nan', 'not a number', 'NaN', NULL),
           (2, 'uni', $1, 3.50, $1),
           (3, 'big', repeat('x', 50000000), 1, 'fifty megabytes in the name')",
        &[&odd],
    )
    .await
    .unwrap();
    // Mid-stream schema changes: added columns (an empty array, deep JSON), a type change.
    pg.batch_execute(
        "ALTER TABLE products ADD COLUMN tags text[], ADD COLUMN meta jsonb;
         INSERT INTO products(id, sku, name, price, tags, meta) VALUES
           (4, 'empty', 'empty array', 4, '{}', '{\"a\": []}');
         INSERT INTO products(id, sku, name, price, meta) VALUES
           (5, 'deep', 'deeply nested', 5, (SELECT (repeat('[', 300) || '1' || repeat(']', 300))::jsonb));
         ALTER TABLE products ALTER COLUMN price TYPE numeric(14,3);
         UPDATE products SET price = price + 1 WHERE id = 4;
         ALTER TABLE products DROP COLUMN description;
         INSERT INTO products(id, sku, name, price) VALUES (6, 'after', 'after everything', 6)",
    )
    .await
    .unwrap();
    // An order whose date no search mapping takes, then a normal one.
    shop.exec(
        "ordering",
        "INSERT INTO orders VALUES (1, 1, 'new', 1, NULL, 'infinity', now());
         INSERT INTO orders VALUES (2, 1, 'new', 2, '{\"zip\": \"\\u00e9\"}', now(), now())",
    )
    .await;

    // The type change rewrote the table without a single row event: rows not written
    // since keep their old text (3.50, not 3.500). Logical replication does not carry
    // DDL; `verify` is how that shows, and `--repair` how it heals.
    let mut r = shop.redis().await;
    wait_until("the last row applied", T, || async {
        let mut r = shop.redis().await;
        let n: bool = r.exists(shop.key("hostile:6")).await.ok()?;
        n.then_some(())
    })
    .await;
    let verify = |projection: &str, extra: &[&str]| {
        shop.viewkeeper(&cfg, &[&["verify", "--projection", projection], extra].concat())
    };
    let out = verify("ordering_products", &[]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{report}");
    assert!(
        report.contains(&format!(
            "Stale {}: fields differ: price",
            shop.key("ordering:product:2")
        )),
        "{report}"
    );
    for p in ["ordering_products", "storefront_products"] {
        let out = verify(p, &["--repair"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    }
    // The caches equal the tables now (price text as Postgres prints it: NaN, 5.000).
    converge(&shop, T).await;
    let h = |id: i64| shop.key(&format!("hostile:{id}"));
    let e: HashMap<String, String> = r.hgetall(h(2)).await.unwrap();
    assert_eq!(e["name"], odd, "odd unicode kept byte for byte");
    let e: HashMap<String, String> = r.hgetall(h(3)).await.unwrap();
    assert_eq!(e["name"].len(), 50_000_000);
    let e: HashMap<String, String> = r.hgetall(h(4)).await.unwrap();
    assert_eq!(e.get("tags").map(String::as_str), Some("[]"), "{e:?}");
    assert_eq!(e["price"], "5.000", "the type change reached the decoder: {e:?}");
    let e: HashMap<String, String> = r.hgetall(h(6)).await.unwrap();
    assert_eq!(e["name"], "after everything");
    assert!(!e.contains_key("description"), "dropped column gone: {e:?}");

    // The deep JSON either renders or is a dead letter naming the row; the order with an
    // `infinity` date either is in the index or is a dead letter with the server's reason.
    let letters = shop.dead_letters();
    let deep: HashMap<String, String> = r.hgetall(h(5)).await.unwrap();
    assert!(
        deep.contains_key("meta") || letters.iter().any(|(t, k, _)| t == "products" && k == "[5]"),
        "deep JSON rendered or dead-lettered: {deep:?} {letters:?}"
    );
    let search = reqwest::Client::new();
    let doc = |id: i64| format!("{}/{}/_doc/{id}", servers().search, shop.alias());
    wait_until("the normal order indexed", T, || async {
        (search.get(doc(2)).send().await.ok()?.status() == 200).then_some(())
    })
    .await;
    let first = search.get(doc(1)).send().await.unwrap().status();
    assert!(
        first == 200 || letters.iter().any(|(t, k, _)| t == "orders" && k == "[1]"),
        "infinity order indexed or dead-lettered ({first}): {letters:?}"
    );
}

/// A table without a primary key or replica identity is refused at start, with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_replica_identity_is_refused_with_the_fix() {
    let shop = Shop::new("nopk").await;
    shop.exec("catalog", "CREATE TABLE notes (body text)").await;
    let cfg = shop.config(&format!(
        r#"
[tables.notes]
source = "catalog"
name = "public.notes"
primary_key = ["body"]

[projections.notes]
root = "notes"
sink = "cache"
key = "{}:notes:{{body}}"
fields = ["body"]
"#,
        shop.prefix
    ));
    let out = shop.viewkeeper(&cfg, &["run"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("public.notes") && err.contains("REPLICA IDENTITY"),
        "{err}"
    );
}
