//! A table partitioned by range works as one table: the publication publishes its
//! partitions' changes under the root's name (`publish_via_partition_root`), the initial
//! snapshot reads the root, and a row moving between partitions (its partition key is in
//! the primary key) leaves a tombstone under its old key and lives under the new one.

mod common;

use common::*;
use redis::AsyncCommands;
use std::collections::BTreeMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Every payment's cache entry against Postgres; keys of rows gone (deleted, or moved to
/// another partition) must be tombstones.
async fn payments_match(shop: &Shop, gone: &[(i64, &str)]) -> Result<(), String> {
    let pg = shop.pg("ordering").await;
    let mut r = shop.redis().await;
    let rows = pg
        .query("SELECT id, paid_at::text, order_id, amount::text FROM payments", &[])
        .await
        .map_err(|e| e.to_string())?;
    for row in &rows {
        let (id, day, order, amount): (i64, String, i64, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
        let key = shop.key(&format!("payment:{id}:{day}"));
        let h: BTreeMap<String, String> = r.hgetall(&key).await.map_err(|e| e.to_string())?;
        let want = [("amount", amount), ("order_id", order.to_string()), ("paid_at", day)];
        for (f, v) in want {
            if h.get(f) != Some(&v) {
                return Err(format!("{key}: {f} is {:?}, want {v}", h.get(f)));
            }
        }
        if h.contains_key("deleted") {
            return Err(format!("{key}: a live row shown deleted: {h:?}"));
        }
    }
    for (id, day) in gone {
        let key = shop.key(&format!("payment:{id}:{day}"));
        let deleted: Option<String> = r.hget(&key, "deleted").await.map_err(|e| e.to_string())?;
        if deleted.as_deref() != Some("true") {
            return Err(format!("{key}: not a tombstone ({deleted:?})"));
        }
    }
    Ok(())
}

async fn converge_payments(shop: &Shop, gone: &[(i64, &str)]) {
    let mut last = String::new();
    let start = std::time::Instant::now();
    while start.elapsed() < T {
        match payments_match(shop, gone).await {
            Ok(()) => return,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("payments did not converge within {T:?}: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_partitioned_table_syncs_as_one_table() {
    let shop = Shop::new("partitioned").await;
    shop.exec(
        "ordering",
        "CREATE TABLE payments (id bigint NOT NULL, paid_at date NOT NULL, order_id bigint NOT NULL,
                                amount numeric(12,2) NOT NULL, PRIMARY KEY (id, paid_at))
           PARTITION BY RANGE (paid_at);
         CREATE TABLE payments_2026_01 PARTITION OF payments FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
         CREATE TABLE payments_2026_02 PARTITION OF payments FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
         CREATE TABLE payments_2026_03 PARTITION OF payments FOR VALUES FROM ('2026-03-01') TO ('2026-04-01');
         -- Before the worker: the initial snapshot reads these through the root.
         INSERT INTO payments SELECT g, date '2026-01-10' + (g % 3) * 31, g, g + 0.25 FROM generate_series(1, 30) g",
    )
    .await;
    let cfg = shop.config(&format!(
        r#"
[tables.payments]
source = "ordering"
name = "public.payments"
primary_key = ["id", "paid_at"]

[projections.payments]
root = "payments"
sink = "cache"
key = "{}:payment:{{id}}:{{paid_at}}"
fields = ["order_id", "amount", "paid_at"]
"#,
        shop.prefix
    ));
    let _w = shop.worker(&cfg).await;
    converge_payments(&shop, &[]).await;
    // The publication was made for partitions.
    let via_root: bool = shop
        .pg("ordering")
        .await
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&format!("{}_ordering", shop.prefix)],
        )
        .await
        .unwrap()
        .get(0);
    assert!(via_root);

    // Changes in every partition, a row moving from January to March, and a delete.
    shop.exec(
        "ordering",
        "INSERT INTO payments VALUES (100, '2026-02-14', 7, 99.99), (101, '2026-03-01', 8, 1.00);
         UPDATE payments SET amount = amount + 1 WHERE id BETWEEN 1 AND 12;
         UPDATE payments SET paid_at = '2026-03-20' WHERE id = 3;
         DELETE FROM payments WHERE id = 4",
    )
    .await;
    let day = |id: i64| ["2026-01-10", "2026-02-10", "2026-03-13"][(id % 3) as usize];
    converge_payments(&shop, &[(3, day(3)), (4, day(4))]).await;
    let out = shop.viewkeeper(&cfg, &["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
