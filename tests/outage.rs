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
