//! Server outages. These stop shared servers (`scripts/services.sh down …`), so
//! scripts/test.sh runs this binary alone, after the rest of the suite.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// Brings a service back up even if the test fails half-way.
struct Restore(&'static str);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = Command::new(format!("{REPO}/scripts/services.sh"))
            .args(["up", self.0])
            .status();
    }
}

fn services(action: &str, name: &str) {
    let st = Command::new(format!("{REPO}/scripts/services.sh"))
        .args([action, name])
        .status()
        .unwrap();
    assert!(st.success(), "services.sh {action} {name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_stalls_without_acking_then_recovers() {
    if std::env::var("VK_REDIS_URL").is_ok() {
        eprintln!("VK_REDIS_URL points at an external Redis: outage test needs the local one");
        return;
    }
    let shop = Shop::new("redisdown").await;
    let w = shop.worker(&shop.config("")).await;
    let pg = shop.pg("catalog").await;
    pg.batch_execute("INSERT INTO products(id, sku, name, price) VALUES (1, 'a', 'before', 1), (2, 'b', 'b', 2)")
        .await
        .unwrap();
    converge(&shop, Duration::from_secs(30)).await;

    let _restore = Restore("redis");
    services("down", "redis");
    pg.batch_execute(
        "UPDATE products SET name = 'during outage', price = 99 WHERE id = 1; DELETE FROM products WHERE id = 2",
    )
    .await
    .unwrap();
    let written = shop.current_lsn("catalog").await;
    wait_until("worker reports failed sink writes", Duration::from_secs(30), || async {
        w.log_text().contains("sink write failed").then_some(())
    })
    .await;
    // Stalled: the slot has not been acknowledged past the changes Redis never got.
    assert!(shop.confirmed_flush("catalog").await.unwrap() < written);

    services("up", "redis");
    converge(&shop, Duration::from_secs(60)).await;
    wait_until("slot acknowledged after recovery", Duration::from_secs(30), || async {
        (shop.confirmed_flush("catalog").await.unwrap() >= written).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_outage_stalls_then_refills_the_lost_index() {
    if std::env::var("VK_OPENSEARCH_URL").is_ok() {
        eprintln!("VK_OPENSEARCH_URL points at an external server: outage test needs the local one");
        return;
    }
    use common::orders::*;
    let shop = Shop::new("searchdown").await;
    let cfg = shop.config("");
    let mut w = shop.worker(&cfg).await;
    let mem = Remembered::default();
    shop.exec(
        "identity",
        "INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com', now())",
    )
    .await;
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price) VALUES (1, 'W', 'Widget', 2)",
    )
    .await;
    let ordering = shop.pg("ordering").await;
    ordering
        .batch_execute(
            "INSERT INTO orders SELECT g, 1, 'new', 2, NULL, now(), now() FROM generate_series(1, 30) g;
             INSERT INTO order_items SELECT g, 1, 1, 1, 2 FROM generate_series(1, 30) g",
        )
        .await
        .unwrap();
    converge_orders(&shop, &mem, Duration::from_secs(60)).await;

    // The in-memory search server goes down and comes back empty: the worker stalls
    // meanwhile, then recreates the index and re-writes every document.
    let _restore = Restore("opensearch");
    services("down", "opensearch");
    ordering
        .batch_execute("UPDATE orders SET status = 'paid' WHERE id <= 10")
        .await
        .unwrap();
    let written = shop.current_lsn("ordering").await;
    wait_until("worker reports failed sink writes", Duration::from_secs(30), || async {
        w.log_text().contains("sink write failed").then_some(())
    })
    .await;
    assert!(
        shop.confirmed_flush("ordering").await.unwrap() < written,
        "acked while the sink was down"
    );
    services("up", "opensearch");
    converge_orders(&shop, &mem, Duration::from_secs(90)).await;
    assert!(w.log_text().contains("re-writing every document"));

    // Lost again while the worker is stopped: the restarted worker refills it.
    assert_eq!(w.terminate(), Some(0));
    services("down", "opensearch");
    services("up", "opensearch");
    shop.exec("catalog", "UPDATE products SET name = 'Widget 2' WHERE id = 1")
        .await;
    w = shop.worker(&cfg).await;
    converge_orders(&shop, &mem, Duration::from_secs(90)).await;
    drop(w);
}

/// SIGTERM while a sink is down: the batch in hand gets `drain_timeout_ms`, is then
/// abandoned before its checkpoint, the worker exits 0, and the next start replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_outage_exits_after_the_drain_bound_and_replays() {
    if std::env::var("VK_REDIS_URL").is_ok() {
        eprintln!("VK_REDIS_URL points at an external Redis: outage test needs the local one");
        return;
    }
    let shop = Shop::new("drain").await;
    let cfg = shop.config("");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[engine]\n", "[engine]\ndrain_timeout_ms = 1000\n");
    std::fs::write(&cfg, text).unwrap();
    let mut w = shop.worker(&cfg).await;
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price) VALUES (1, 'a', 'before', 1)",
    )
    .await;
    converge(&shop, Duration::from_secs(30)).await;

    let restore = Restore("redis");
    services("down", "redis");
    shop.exec("catalog", "UPDATE products SET name = 'during outage' WHERE id = 1")
        .await;
    wait_until("worker reports failed sink writes", Duration::from_secs(30), || async {
        w.log_text().contains("sink write failed").then_some(())
    })
    .await;
    assert_eq!(w.terminate(), Some(0), "SIGTERM exits 0 after the drain bound");
    assert!(w.log_text().contains("drain bound reached"), "{}", w.log_text());
    services("up", "redis");
    drop(restore);
    let _w = shop.worker(&cfg).await;
    converge(&shop, Duration::from_secs(30)).await;
}

/// Postgres down under the worker: the sources reconnect with backoff by themselves,
/// nothing is lost, and `verify` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_reconnects_and_verify_passes() {
    if std::env::var("VK_PG_URL").is_ok() {
        eprintln!("VK_PG_URL points at an external Postgres: outage test needs the local one");
        return;
    }
    let shop = Shop::new("pgdown").await;
    let cfg = shop.config("");
    let w = shop.worker(&cfg).await;
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price) VALUES (1, 'a', 'before', 1), (2, 'b', 'b', 2)",
    )
    .await;
    converge(&shop, Duration::from_secs(30)).await;

    let restore = Restore("postgres");
    services("down", "postgres");
    wait_until("worker notices and retries", Duration::from_secs(30), || async {
        w.log_text().contains("postgres source interrupted").then_some(())
    })
    .await;
    services("up", "postgres");
    drop(restore);
    shop.exec(
        "catalog",
        "UPDATE products SET name = 'after the outage' WHERE id = 1; DELETE FROM products WHERE id = 2",
    )
    .await;
    converge(&shop, Duration::from_secs(60)).await;
    let out = shop.viewkeeper(&cfg, &["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
