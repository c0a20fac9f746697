//! The replication slots of the Postgres source, end to end: they advance while the
//! databases are idle, carry heartbeats, are listed and dropped only with guards, and a
//! slot dropped behind a running worker stops it with the fix.

mod common;

use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_database_slot_advances_and_restart_resumes() {
    let shop = Shop::new("idle").await;
    let cfg = shop.config("");
    let mut w = shop.worker(&cfg).await;
    let pg = shop.pg("catalog").await;
    pg.batch_execute("INSERT INTO products(id, sku, name, price) VALUES (1, 'a', 'a', 1)")
        .await
        .unwrap();
    converge(&shop, T).await;
    // WAL written elsewhere on the server moves the idle identity slot forward
    // (keepalives are passed through the engine as empty batches).
    let identity_before = shop.confirmed_flush("identity").await.unwrap();
    let target = shop.current_lsn("catalog").await;
    assert!(target > identity_before);
    wait_until(
        "idle slot confirmed past other databases' WAL",
        Duration::from_secs(60),
        || async { (shop.confirmed_flush("identity").await.unwrap() >= target).then_some(()) },
    )
    .await;
    assert_eq!(w.terminate(), Some(0), "SIGTERM exits cleanly");
    pg.batch_execute("UPDATE products SET name = 'while stopped' WHERE id = 1")
        .await
        .unwrap();
    let _w = shop.worker(&cfg).await;
    converge(&shop, T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_flow_through_the_slot() {
    let shop = Shop::new("heartbeat").await;
    let cfg = shop.config("");
    with_source_setting(&cfg, "heartbeat_interval_ms = 200");
    let w = shop.worker(&cfg).await;
    let addr = w.http_addr().await;
    // The heartbeat written into each database comes back through its own slot.
    wait_until("heartbeats seen on every slot", T, || async {
        let m = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        ["identity", "catalog", "ordering"]
            .iter()
            .all(|s| m.contains(&format!("viewkeeper_heartbeats_total{{source=\"{s}\"}}")))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_list_and_drop_guard_the_slots() {
    let shop = Shop::new("slots").await;
    let cfg = shop.config("");
    let mut w = shop.worker(&cfg).await;
    let slot = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_viewkeeper"))
            .arg("slot")
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let list = slot(&["list", "--json"]);
    assert!(list.status.success());
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    for s in ["identity", "catalog", "ordering"] {
        assert_eq!(v[s]["active"], serde_json::json!(true), "{v}");
        assert!(v[s]["retained_wal_bytes"].is_i64(), "{v}");
    }
    let dry = slot(&["drop", "catalog"]);
    assert!(String::from_utf8_lossy(&dry.stdout).contains("add --yes"));
    let busy = slot(&["drop", "catalog", "--yes"]);
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("stop the worker first"));
    assert!(shop.confirmed_flush("catalog").await.is_some(), "still there");

    assert_eq!(w.terminate(), Some(0));
    let dropped = slot(&["drop", "catalog", "--yes"]);
    assert!(dropped.status.success(), "{}", String::from_utf8_lossy(&dropped.stderr));
    assert!(shop.confirmed_flush("catalog").await.is_none(), "dropped");
    // The state store still has a checkpoint for it: the worker refuses, with the fix.
    let out = shop.viewkeeper(&cfg, &["run"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is missing") && err.contains("backfill"), "{err}");
}

/// A slot dropped behind a running worker: a fatal error with the fix, never a new slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_behind_the_worker_stops_it_with_the_fix() {
    let shop = Shop::new("slotgone").await;
    let mut w = shop.worker(&shop.config("")).await;
    let c = shop.pg("catalog").await;
    let slot = format!("{}_catalog", shop.prefix);
    wait_until("slot dropped", T, || async {
        c.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active",
            &[&slot],
        )
        .await
        .ok()?;
        c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let child = std::sync::Mutex::new(&mut w.child);
    let status = wait_until("worker exits", T, || async {
        child.lock().unwrap().try_wait().ok().flatten()
    })
    .await;
    assert!(!status.success());
    let log = w.log_text();
    assert!(log.contains("is missing") && log.contains("backfill"), "{log}");
    // And it did not quietly make itself a new slot.
    let again = c
        .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap();
    assert!(again.is_none(), "a new slot was created");
}
