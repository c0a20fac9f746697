//! What a stop, a crash or a sink that lost its data must not cost: documents a replay
//! would not name again, entries a Redis restart threw away, an unchanged TOAST value on
//! a primary-key change, and a source stalled by a hung SQL connection. Real Postgres,
//! real Redis (the shared one, or one of the test's own it can restart), the real binary.

mod common;

use common::*;
use redis::AsyncCommands;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

async fn acl(shop: &Shop, rule: &[&str]) {
    let mut r = shop.redis().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(rule)
        .query_async(&mut r)
        .await
        .unwrap();
}

async fn hget(shop: &Shop, key: &str, field: &str) -> Option<String> {
    shop.redis().await.hget(shop.key(key), field).await.unwrap()
}

/// A child moved to another parent (an order to another customer), applied to the state
/// store while the sink refused the writes, then the worker stopped before the checkpoint:
/// the change replays as a no-op that names only the new parent. The documents the batch
/// owed are kept with the state, so the old parent's entry loses the order too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_moved_to_another_parent_leaves_the_old_one_after_an_abandoned_batch() {
    let shop = Shop::new("moved").await;
    let user = format!("{}_w", shop.prefix);
    acl(&shop, &[&user, "reset", "on", ">pw", "allkeys", "+@all"]).await;
    let url = servers().redis.replacen("redis://", &format!("redis://{user}:pw@"), 1);
    let cfg = shop.config(&format!(
        r#"
[projections.customer_orders]
root = "customers"
sink = "cache"
key = "{}:customer:{{id}}"
fields = ["name"]

[[projections.customer_orders.relations]]
name = "orders"
table = "orders"
kind = "many"
local = ["id"]
remote = ["customer_id"]
fields = ["id", "status"]
count = "order_count"
"#,
        shop.prefix
    ));
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&format!("url = \"{}\"", servers().redis), &format!("url = \"{url}\""))
        .replace("[engine]\n", "[engine]\ndrain_timeout_ms = 500\n");
    std::fs::write(&cfg, text).unwrap();
    let mut w = shop.worker(&cfg).await;
    shop.exec(
        "identity",
        "INSERT INTO customers(id, name) VALUES (1, 'Ana'), (2, 'Bo')",
    )
    .await;
    shop.exec(
        "ordering",
        "INSERT INTO orders(id, customer_id, status, total) VALUES (10, 1, 'new', 1)",
    )
    .await;
    wait_until("customer 1 has the order", T, || async {
        (hget(&shop, "customer:1", "order_count").await.as_deref() == Some("1")).then_some(())
    })
    .await;

    // The sink refuses every write; the move is applied, not written; stop.
    acl(&shop, &[&user, "-evalsha"]).await;
    shop.exec("ordering", "UPDATE orders SET customer_id = 2 WHERE id = 10")
        .await;
    wait_until("worker reports failed sink writes", T, || async {
        w.log_text().contains("sink write failed").then_some(())
    })
    .await;
    assert_eq!(w.terminate(), Some(0));
    assert!(
        w.log_text().contains("drain bound reached"),
        "stopped before the checkpoint"
    );
    acl(&shop, &[&user, "+evalsha"]).await;

    let w = shop.worker(&cfg).await;
    wait_until("the order moved to customer 2 in both entries", T, || async {
        let one = hget(&shop, "customer:1", "order_count").await;
        let two = hget(&shop, "customer:2", "order_count").await;
        (one.as_deref() == Some("0") && two.as_deref() == Some("1")).then_some(())
    })
    .await;
    assert!(w
        .log_text()
        .contains("writing the documents a previous run did not finish"));
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut shop.redis().await)
        .await
        .unwrap();
}

/// Redis restarted without persistence comes back empty: the worker notices (the script
/// cache is gone, the server's run_id changed) and writes every entry again from the state
/// store; also when Redis restarted while the worker was stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_without_persistence_gets_every_entry_back() {
    let mut shop = Shop::new("redisloss").await;
    let mut redis = PrivateRedis::start().await;
    shop.redis_url = Some(redis.url());
    let cfg = shop.config("");
    let mut w = shop.worker(&cfg).await;
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price, status)
         SELECT g, 'S' || g, 'P' || g, g, CASE WHEN g % 10 = 0 THEN 'draft' ELSE 'active' END
         FROM generate_series(1, 100) g",
    )
    .await;
    converge(&shop, T).await;

    redis.restart().await;
    let mut r = shop.redis().await;
    let left: usize = redis::cmd("DBSIZE").query_async(&mut r).await.unwrap();
    assert_eq!(left, 0, "the restart lost everything");
    // One change: every entry comes back, not just the changed one.
    shop.exec("catalog", "UPDATE products SET name = 'changed' WHERE id = 1")
        .await;
    converge(&shop, T).await;
    let out = shop.viewkeeper(&cfg, &["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(w.log_text().contains("the sink lost documents"), "said why");

    // Restarted while the worker was away: noticed at start, without any change.
    assert_eq!(w.terminate(), Some(0));
    redis.restart().await;
    let _w = shop.worker(&cfg).await;
    converge(&shop, T).await;
}

/// A primary-key change that leaves a TOASTed column as it was: pgoutput sends it as
/// "unchanged", to be taken from the row's image under its old key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_toast_value_survives_a_primary_key_change() {
    let shop = Shop::new("toastkey").await;
    let cfg = shop.config(&descriptions_projection(&shop));
    let _w = shop.worker(&cfg).await;
    let pg = shop.pg("catalog").await;
    let description = insert_toasted_product(&pg, 1).await;
    wait_until("description cached", T, || async {
        hget(&shop, "desc:1", "description").await.filter(|d| *d == description)
    })
    .await;
    pg.batch_execute("UPDATE products SET id = 2, price = 3 WHERE id = 1")
        .await
        .unwrap();
    let (d, p) = wait_until("the moved row's entry", T, || async {
        let p = hget(&shop, "desc:2", "price").await?;
        Some((hget(&shop, "desc:2", "description").await, p))
    })
    .await;
    assert_eq!(p, "3.00");
    assert_eq!(
        d.as_deref(),
        Some(description.as_str()),
        "taken from the old key's image"
    );
    assert!(shop.dead_letters().is_empty(), "{:?}", shop.dead_letters());
}

/// A TCP proxy in front of Postgres that can stop answering new connections (accepted,
/// never forwarded): a hung SQL connection, as behind a dead load balancer.
struct Proxy {
    port: u16,
    hang: Arc<AtomicBool>,
    hung: Arc<AtomicUsize>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (hang, hung) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (h, n) = (hang.clone(), hung.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                if h.load(Ordering::SeqCst) {
                    n.fetch_add(1, Ordering::SeqCst);
                    held.push(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Proxy { port, hang, hung }
    }
}

/// The slot checks and heartbeats open SQL connections of their own; one that never
/// answers must not stall the replication stream beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_sql_connection_does_not_stall_the_stream() {
    let shop = Shop::new("hungsql").await;
    let pg_port: u16 = servers().pg.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = Proxy::start(pg_port).await;
    let cfg = shop.config("");
    with_source_setting(&cfg, "heartbeat_interval_ms = 300");
    let catalog = shop.db_url("catalog");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("\"{catalog}\""),
        &format!(
            "\"{}\"",
            catalog.replace(&format!(":{pg_port}/"), &format!(":{}/", proxy.port))
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let w = shop.worker(&cfg).await;
    proxy.hang.store(true, Ordering::SeqCst);
    wait_until("a heartbeat's connection hangs", T, || async {
        (proxy.hung.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price) VALUES (1, 'a', 'while hung', 1)",
    )
    .await;
    converge(&shop, Duration::from_secs(30)).await;
    for i in 2..=20 {
        shop.exec(
            "catalog",
            &format!("INSERT INTO products(id, sku, name, price) VALUES ({i}, 's{i}', 'n', 1)"),
        )
        .await;
    }
    converge(&shop, Duration::from_secs(30)).await;
    wait_until("the hung check is reported", T, || async {
        w.log_text().contains("did not answer in time").then_some(())
    })
    .await;
}

/// A transaction larger than `transaction_chunk_changes` goes to the engine in chunks,
/// checkpointed only at its commit. Killed after a chunk is durable (in the store and
/// the cache) but before the commit: the restart replays the whole transaction from the
/// old checkpoint and converges, with nothing of it lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_inside_a_large_transaction_converges_after_restart() {
    let shop = Shop::new("bigtx").await;
    let cfg = shop.config("");
    with_source_setting(&cfg, "transaction_chunk_changes = 500");
    let mut w = shop.worker(&cfg).await;
    // Itself larger than a chunk: 4 chunks and a commit.
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price) SELECT g, 'S' || g, 'P' || g, g FROM generate_series(1, 2000) g",
    )
    .await;
    converge(&shop, T).await;
    assert_eq!(w.terminate(), Some(0));

    let pause = tempfile::tempdir().unwrap();
    let held = pause.path().join("engine-chunk-durable.paused");
    let mut w = shop
        .worker_with(&cfg, &[("VIEWKEEPER_PAUSE_DIR", pause.path().to_str().unwrap())])
        .await;
    let before = shop.confirmed_flush("catalog").await.unwrap();
    shop.exec(
        "catalog",
        "UPDATE products SET name = name || ' big', price = price + 1",
    )
    .await;
    let commit = shop.current_lsn("catalog").await;
    assert!(commit > before);
    wait_until("a chunk of the update is durable", T, || async {
        held.exists().then_some(())
    })
    .await;
    // Part of the transaction is in the cache already, the slot not past its commit.
    let mut r = shop.redis().await;
    let mut written = 0;
    for id in 1..=2000 {
        let name: Option<String> = r
            .hget(shop.key(&format!("ordering:product:{id}")), "name")
            .await
            .unwrap();
        written += name.is_some_and(|n| n.ends_with(" big")) as usize;
    }
    // (Later chunks may be written too: the pipeline writes ahead of the checkpoint.)
    assert!(written >= 500, "at least a chunk written: {written} of 2000");
    assert!(
        shop.confirmed_flush("catalog").await.unwrap() < commit,
        "checkpointed before the commit"
    );
    w.kill9();
    std::fs::remove_file(&held).unwrap();

    let _w = shop.worker(&cfg).await;
    converge(&shop, T).await;
    wait_until("the slot confirmed the commit", T, || async {
        (shop.confirmed_flush("catalog").await.unwrap() >= commit).then_some(())
    })
    .await;
    let out = shop.viewkeeper(&cfg, &["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
