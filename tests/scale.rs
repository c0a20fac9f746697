//! Several workers over one shop fed from Debezium's topics: the ordering source's topics
//! (orders, order_items) are split across the workers of one consumer group
//! (`assignment = "partitioned"`), the identity and catalog topics are read whole by every
//! worker (`assignment = "shared"`). Each worker has its own data dir; together they must
//! build the same caches and `orders_view` as one worker would, through a SIGKILL of one
//! of them and the join of another, while changes keep coming.
//!
//! Events are produced as Debezium's PartitionRouting SMT would route them: an order by
//! `id`, its lines by `order_id` (so both land in the same partition), products and
//! customers by `id`. Ground truth is Postgres, as in tests/debezium.rs: every event is made
//! from a statement run on the shop's databases.

mod common;
#[path = "debezium/harness.rs"]
mod harness;

use common::orders::*;
use common::*;
use harness::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);
const PARTITIONS: i32 = 4;

/// config/shop-debezium.toml for `shop`, with identity and catalog `shared` and ordering
/// `partitioned`.
fn scaled_config(shop: &Shop) -> std::path::PathBuf {
    let cfg = shop.config_from("shop-debezium.toml", "");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    for (svc, assignment) in [
        ("identity", "shared"),
        ("catalog", "shared"),
        ("ordering", "partitioned"),
    ] {
        let line = format!("topic_prefix = \"{}_{svc}\"", shop.prefix);
        assert!(text.contains(&line), "no `{line}` in {}", cfg.display());
        text = text.replace(&line, &format!("assignment = \"{assignment}\"\n{line}"));
    }
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// `viewkeeper status --json` on a worker's data dir (beside the running worker).
fn status(cfg: &Path, data_dir: &Path) -> Value {
    let out = viewkeeper_in(cfg, data_dir, &["status", "--json"]);
    assert!(
        out.status.success(),
        "viewkeeper status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// What a worker's `viewkeeper status` says of the partitioned source: its worker id
/// and owned partitions, when every partition is reported with this worker as owner
/// exactly where it owns it and, there, nothing left to read (committed = end).
fn status_split(s: &Value) -> Result<(String, BTreeSet<u32>), Value> {
    let src = s["sources"]["ordering"].clone();
    let check = || -> Option<(String, BTreeSet<u32>)> {
        let id = src["worker"]["id"].as_str()?.to_string();
        let owned: BTreeSet<u32> = serde_json::from_value(src["worker"]["owned_partitions"].clone()).ok()?;
        let parts = src["partitions"].as_array()?;
        // Both topics of the source, every partition.
        (parts.len() == 2 * PARTITIONS as usize).then_some(())?;
        for p in parts {
            let mine = owned.contains(&(p["partition"].as_u64()? as u32));
            (mine == (p["owner"].as_str() == Some(id.as_str()))).then_some(())?;
            (!mine || p["lag"] == 0).then_some(())?;
        }
        Some((id, owned))
    };
    check().ok_or(src)
}

/// Orders whose document has an unresolved customer or product.
async fn unresolved(shop: &Shop) -> Vec<String> {
    let docs = actual(shop).await.unwrap();
    let yes = |v: &Value| v.get("unresolved") == Some(&Value::Bool(true));
    docs.iter()
        .filter(|(_, d)| {
            yes(&d["customer"])
                || d["items"]
                    .as_array()
                    .is_some_and(|items| items.iter().any(|i| yes(&i["product"])))
        })
        .map(|(id, _)| id.clone())
        .collect()
}

/// The partitions of the last `owning partitions` line of a worker's log (its `partitions`
/// field: a list, as JSON or as text like `[0, 1]`).
fn owned_partitions(w: &Worker) -> Option<BTreeSet<u32>> {
    let log = w.log_text();
    let line = log.lines().rev().find(|l| l.contains("owning partitions"))?;
    let v: Value = serde_json::from_str(line).ok()?;
    let field = v.get("partitions").or_else(|| v.get("fields")?.get("partitions"))?;
    let text = match field {
        Value::String(s) => s.clone(),
        Value::Array(_) => field.to_string(),
        _ => return None,
    };
    Some(
        text.split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_split_the_orders_and_converge_through_a_kill_and_a_join() {
    let shop = Shop::new("scale").await;
    let mut dbz = Debezium::with_partitions(&shop, PARTITIONS).await;
    let mut mem = Remembered::default();

    // The connectors' initial snapshots: 20 customers, 30 products, 200 orders of 1–3
    // lines each (each product in about 13 orders, spread over the partitions).
    shop.exec("identity", "INSERT INTO customers SELECT g, 'Customer ' || g, 'c' || g || '@example.com', timestamptz '2026-01-01 10:00:00+00' + g * interval '1 day' FROM generate_series(1, 20) g").await;
    shop.exec("catalog", "INSERT INTO products(id, sku, name, description, price, status, updated_at) SELECT g, 'SKU-' || g, 'Product ' || g, 'about ' || g, g + 0.25, 'active', now() FROM generate_series(1, 30) g").await;
    shop.exec("ordering", "INSERT INTO orders SELECT g, 1 + g % 20, 'new', g * 1.10, jsonb_build_object('city', 'Lisbon', 'zip', g), timestamptz '2026-02-01 08:00:00+00' + g * interval '1 hour', now() FROM generate_series(1, 200) g;
                           INSERT INTO order_items SELECT o, l, 1 + (7 * o + l) % 30, l, 2.50 FROM generate_series(1, 200) o, generate_series(1, 3) l WHERE l <= 1 + o % 3").await;
    for t in [&CUSTOMERS, &PRODUCTS, &ORDERS, &ITEMS] {
        dbz.snapshot(&shop, t).await;
    }

    // Three workers, one data dir each, one config.
    let cfg = scaled_config(&shop);
    let dir = |name: &str| shop.data_dir.path().join(name);
    let a = Worker::start(&cfg, &dir("a"));
    let mut b = Worker::start(&cfg, &dir("b"));
    let c = Worker::start(&cfg, &dir("c"));
    converge(&shop, T).await;
    converge_orders(&shop, &mem, T).await;
    assert_eq!(unresolved(&shop).await, Vec::<String>::new(), "after the snapshot");

    // Three workers: renames fanning out to orders of every partition, new orders (lines
    // first for some), status changes, a customer's email.
    dbz.dml(
        &shop,
        &PRODUCTS,
        "UPDATE products SET name = name || ' (renamed)', updated_at = now() WHERE id IN (1, 2, 3)",
        &[],
    )
    .await;
    dbz.dml(&shop, &ITEMS, "INSERT INTO order_items SELECT o, l, 1 + (o + l) % 30, 1, 4.00 FROM generate_series(201, 215) o, generate_series(1, 2) l", &[]).await;
    dbz.dml(
        &shop,
        &ORDERS,
        "INSERT INTO orders SELECT g, 1 + g % 20, 'new', 8.00, NULL, now(), now() FROM generate_series(201, 230) g",
        &[],
    )
    .await;
    dbz.dml(
        &shop,
        &ITEMS,
        "INSERT INTO order_items SELECT o, 1, 1 + o % 30, 3, 1.00 FROM generate_series(216, 230) o",
        &[],
    )
    .await;
    dbz.dml(
        &shop,
        &ORDERS,
        "UPDATE orders SET status = 'paid', updated_at = now() WHERE id % 5 = 0",
        &[],
    )
    .await;
    dbz.dml(
        &shop,
        &CUSTOMERS,
        "UPDATE customers SET email = 'moved' || id || '@example.com' WHERE id IN (4, 5)",
        &[],
    )
    .await;
    // A burst, and b is SIGKILLed while it is being consumed.
    dbz.dml(
        &shop,
        &ORDERS,
        "UPDATE orders SET status = 'packed', updated_at = now() WHERE id <= 120",
        &[],
    )
    .await;
    wait_until("some of the burst indexed", T, || async {
        let docs = actual(&shop).await.ok()?;
        docs.values().any(|d| d["status"] == "packed").then_some(())
    })
    .await;
    b.kill9();

    // Two workers (b's partitions are taken over): renames, a decommission, a deleted
    // order (its lines first), new orders.
    dbz.dml(
        &shop,
        &PRODUCTS,
        "UPDATE products SET name = 'While b is down ' || id, updated_at = now() WHERE id IN (4, 5)",
        &[],
    )
    .await;
    dbz.dml(
        &shop,
        &PRODUCTS,
        "UPDATE products SET status = 'decommissioned', updated_at = now() WHERE id = 6",
        &[],
    )
    .await;
    dbz.dml(&shop, &ITEMS, "DELETE FROM order_items WHERE order_id = 17", &[])
        .await;
    mem.deleted_orders.insert(17);
    dbz.dml(&shop, &ORDERS, "DELETE FROM orders WHERE id = 17", &[]).await;
    dbz.dml(&shop, &ORDERS, "INSERT INTO orders SELECT g, 1 + g % 20, 'new', 9.00, '{\"city\": \"Porto\"}', now(), now() FROM generate_series(231, 250) g", &[]).await;
    dbz.dml(&shop, &ITEMS, "INSERT INTO order_items SELECT o, l, 1 + (3 * o + l) % 30, l, 2.00 FROM generate_series(231, 250) o, generate_series(1, 3) l", &[]).await;
    converge(&shop, T).await;
    converge_orders(&shop, &mem, T).await;

    // A fourth worker joins while changes keep coming, and more once it owns partitions.
    let d = Worker::start(&cfg, &dir("d"));
    dbz.dml(
        &shop,
        &PRODUCTS,
        "UPDATE products SET name = 'While d joins', updated_at = now() WHERE id = 7",
        &[],
    )
    .await;
    dbz.dml(
        &shop,
        &ORDERS,
        "UPDATE orders SET status = 'shipped', updated_at = now() WHERE id % 7 = 0",
        &[],
    )
    .await;
    dbz.dml(
        &shop,
        &ORDERS,
        "INSERT INTO orders SELECT g, 1 + g % 20, 'new', 5.00, NULL, now(), now() FROM generate_series(251, 260) g",
        &[],
    )
    .await;
    dbz.dml(
        &shop,
        &ITEMS,
        "INSERT INTO order_items SELECT o, 1, 1 + o % 30, 2, 2.50 FROM generate_series(251, 260) o",
        &[],
    )
    .await;
    wait_until("d owns partitions", T, || async {
        d.log_text().contains("owning partitions").then_some(())
    })
    .await;
    dbz.dml(
        &shop,
        &PRODUCTS,
        "UPDATE products SET name = 'Renamed twice', updated_at = now() WHERE id = 1",
        &[],
    )
    .await;
    dbz.dml(
        &shop,
        &PRODUCTS,
        "UPDATE products SET status = 'decommissioned', updated_at = now() WHERE id = 8",
        &[],
    )
    .await;
    dbz.dml(&shop, &ITEMS, "DELETE FROM order_items WHERE order_id = 42", &[])
        .await;
    mem.deleted_orders.insert(42);
    dbz.dml(&shop, &ORDERS, "DELETE FROM orders WHERE id = 42", &[]).await;
    dbz.dml(
        &shop,
        &ORDERS,
        "UPDATE orders SET status = 'paid', updated_at = now() WHERE id > 200",
        &[],
    )
    .await;
    dbz.dml(
        &shop,
        &CUSTOMERS,
        "UPDATE customers SET name = 'Renamed customer ' || id WHERE id IN (2, 3)",
        &[],
    )
    .await;

    // Settled: the read models equal the truth, nothing unresolved.
    converge(&shop, T).await;
    converge_orders(&shop, &mem, T).await;
    assert_eq!(
        unresolved(&shop).await,
        Vec::<String>::new(),
        "after the kill and the join"
    );

    // The orders were split: the live workers own disjoint parts that cover every
    // partition, none owns them all.
    let live = [("a", &a), ("c", &c), ("d", &d)];
    let logged = [("a", &a), ("b", &b), ("c", &c), ("d", &d)]
        .iter()
        .filter(|(_, w)| w.log_text().contains("owning partitions"))
        .count();
    assert!(logged >= 2, "only {logged} worker(s) logged `owning partitions`");
    let split = || {
        let owned: Vec<(&str, Option<BTreeSet<u32>>)> = live.iter().map(|(n, w)| (*n, owned_partitions(w))).collect();
        let mut all = BTreeSet::new();
        for (_, o) in &owned {
            match o {
                Some(o) if !o.is_empty() && o.len() < PARTITIONS as usize && o.is_disjoint(&all) => {
                    all.extend(o.iter().copied())
                }
                _ => return Err(owned),
            }
        }
        (all == (0..PARTITIONS as u32).collect::<BTreeSet<_>>())
            .then_some(())
            .ok_or(owned)
    };
    let start = std::time::Instant::now();
    while let Err(owned) = split() {
        assert!(
            start.elapsed() < T,
            "the live workers do not split the {PARTITIONS} partitions (last `owning partitions` of each): {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // `viewkeeper status` on each live worker's data dir shows the same split, each
    // worker under its own id, and the shared sources read to the end of their topics.
    let start = std::time::Instant::now();
    loop {
        let mut wrong = vec![];
        let mut ids = BTreeSet::new();
        for (n, w) in &live {
            let s = status(&cfg, &dir(n));
            match status_split(&s) {
                Ok((id, owned)) if Some(&owned) == owned_partitions(w).as_ref() => {
                    ids.insert(id);
                }
                other => wrong.push(format!("{n}: {other:?}")),
            }
            for svc in ["identity", "catalog"] {
                let parts = s["sources"][svc]["partitions"].as_array().cloned().unwrap_or_default();
                if parts.is_empty() || parts.len() % PARTITIONS as usize != 0 || parts.iter().any(|p| p["lag"] != 0) {
                    wrong.push(format!("{n} {svc}: {parts:?}"));
                }
            }
        }
        if wrong.is_empty() && ids.len() == live.len() {
            break;
        }
        assert!(
            start.elapsed() < T,
            "`viewkeeper status` does not show the split (worker ids {ids:?}): {wrong:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Every worker reports its partitions' lag, labelled by topic and partition.
    let addr = a.http_addr().await;
    let orders_topic = dbz.topic(&ORDERS);
    wait_until("per-partition lag in /metrics", T, || async {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .any(|l| {
                l.starts_with("viewkeeper_kafka_partition_lag{")
                    && l.contains(&format!("topic=\"{orders_topic}\""))
                    && l.contains("partition=\"")
            })
            .then_some(())
    })
    .await;

    // A rebuild beside one worker would see only its partitions: refused, with the reason.
    let out = viewkeeper_in(
        &cfg,
        &dir("a"),
        &["backfill", "--projection", "orders_view", "--rebuild"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("split across the workers"),
        "{err}"
    );

    // `viewkeeper verify` is clean on every live worker's data dir.
    for (name, _) in &live {
        let out = viewkeeper_in(&cfg, &dir(name), &["verify"]);
        assert!(
            out.status.success(),
            "verify on {name}'s data dir failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A worker whose clock is behind the previous owner's takes its documents over: its
/// writes are not refused as older (it raises its clock above the versions the sinks
/// hold for them), so changes after the takeover show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_whose_clock_is_behind_takes_the_documents_over() {
    let shop = Shop::new("scaleclock").await;
    let mut dbz = Debezium::with_partitions(&shop, PARTITIONS).await;
    let mem = Remembered::default();
    shop.exec("identity", "INSERT INTO customers SELECT g, 'Customer ' || g, 'c' || g || '@example.com', now() FROM generate_series(1, 5) g").await;
    shop.exec("catalog", "INSERT INTO products(id, sku, name, price, status, updated_at) SELECT g, 'SKU-' || g, 'Product ' || g, 1.50, 'active', now() FROM generate_series(1, 8) g").await;
    shop.exec(
        "ordering",
        "INSERT INTO orders SELECT g, 1 + g % 5, 'new', 3.00, NULL, now(), now() FROM generate_series(1, 20) g;
                           INSERT INTO order_items SELECT o, 1, 1 + o % 8, 1, 1.50 FROM generate_series(1, 20) o",
    )
    .await;
    for t in [&CUSTOMERS, &PRODUCTS, &ORDERS, &ITEMS] {
        dbz.snapshot(&shop, t).await;
    }
    let cfg = scaled_config(&shop);
    // The first owner's clock runs an hour ahead.
    let mut ahead = Worker::start_with(
        &cfg,
        &shop.data_dir.path().join("ahead"),
        &[("VIEWKEEPER_TEST_CLOCK_SKEW_MS", "3600000")],
    );
    converge(&shop, T).await;
    converge_orders(&shop, &mem, T).await;
    assert_eq!(ahead.terminate(), Some(0));

    let _behind = Worker::start(&cfg, &shop.data_dir.path().join("behind"));
    dbz.dml(
        &shop,
        &PRODUCTS,
        "UPDATE products SET name = 'After the takeover ' || id, updated_at = now() WHERE id IN (1, 2)",
        &[],
    )
    .await;
    dbz.dml(
        &shop,
        &ORDERS,
        "UPDATE orders SET status = 'shipped', updated_at = now() WHERE id <= 10",
        &[],
    )
    .await;
    converge(&shop, T).await;
    converge_orders(&shop, &mem, T).await;
}

/// Documents of the order view with `status` (after a refresh).
async fn count_status(shop: &Shop, status: &str) -> u64 {
    let http = reqwest::Client::new();
    let base = format!("{}/{}", servers().search, shop.alias());
    http.post(format!("{base}/_refresh")).send().await.unwrap();
    let v: Value = http
        .post(format!("{base}/_count"))
        .json(&serde_json::json!({"query": {"term": {"status": status}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["count"].as_u64().unwrap_or(0)
}

/// Throughput with 1, 2 and 3 workers (BENCHMARKS.md, `scripts/bench-scale.sh`):
/// `VK_SCALE_ORDERS` orders (default 20,000) of two lines over 4 partitions, 500 products,
/// 200 customers. Catch-up: every worker started on the topics from their start (restore,
/// then the takeover writes its share) until every order is indexed. Live: one UPDATE of
/// every order's status, produced as one event each, until every document shows it.
/// One JSON line per run on stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: scripts/bench-scale.sh"]
async fn bench_workers() {
    let n: u64 = std::env::var("VK_SCALE_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rounds: usize = std::env::var("VK_SCALE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // `VK_SCALE_WORKERS=1,3`: only those counts.
    let counts: Vec<usize> = std::env::var("VK_SCALE_WORKERS")
        .map(|v| {
            v.split(',')
                .map(|c| c.trim().parse().expect("VK_SCALE_WORKERS: counts like 1,2,3"))
                .collect()
        })
        .unwrap_or_else(|_| vec![1, 2, 3]);
    let long = Duration::from_secs(1800);
    // Each poll is a refresh and a count over every document: asked every 50 ms it
    // competes with the workers' writes for the search server; once a second it costs
    // little and the figures are within a second.
    let poll = Duration::from_secs(1);
    for round in 0..rounds {
        for &workers in &counts {
            let shop = Shop::new(&format!("bench{workers}r{round}")).await;
            let mut dbz = Debezium::with_partitions(&shop, PARTITIONS).await;
            shop.exec("identity", "INSERT INTO customers SELECT g, 'Customer ' || g, 'c' || g || '@example.com', now() FROM generate_series(1, 200) g").await;
            shop.exec("catalog", "INSERT INTO products(id, sku, name, price, status, updated_at) SELECT g, 'SKU-' || g, 'Product ' || g, 1.50, 'active', now() FROM generate_series(1, 500) g").await;
            shop.exec("ordering", &format!("INSERT INTO orders SELECT g, 1 + g % 200, 'new', 3.00, NULL, now(), now() FROM generate_series(1, {n}) g;
                INSERT INTO order_items SELECT o, l, 1 + (o * 7 + l) % 500, 1, 1.50 FROM generate_series(1, {n}) o, generate_series(1, 2) l")).await;
            for t in [&CUSTOMERS, &PRODUCTS, &ORDERS, &ITEMS] {
                dbz.snapshot_bulk(&shop, t).await;
            }
            let cfg = scaled_config(&shop);
            let started = std::time::Instant::now();
            let mut ws: Vec<Worker> = (0..workers)
                .map(|i| Worker::start(&cfg, &shop.data_dir.path().join(format!("w{i}"))))
                .collect();
            wait_until_every("every order indexed", long, poll, || async {
                (count_status(&shop, "new").await == n).then_some(())
            })
            .await;
            let catch_up = started.elapsed().as_secs_f64();
            // Live: every order's status changes once (n events over the 4 partitions).
            // Produced in bulk (deliveries awaited together): one at a time, the producer
            // (about 150 records/s to Tansu) and not the workers would set the pace.
            let live_start = std::time::Instant::now();
            dbz.begin_bulk();
            dbz.dml(
                &shop,
                &ORDERS,
                "UPDATE orders SET status = 'paid', updated_at = now()",
                &[],
            )
            .await;
            dbz.end_bulk().await;
            let produced = live_start.elapsed().as_secs_f64();
            wait_until_every("every order paid", long, poll, || async {
                (count_status(&shop, "paid").await == n).then_some(())
            })
            .await;
            let live = live_start.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({"workers": workers, "round": round, "orders": n,
                    "catch_up_s": catch_up, "catch_up_docs_per_s": n as f64 / catch_up,
                    "live_s": live, "live_produce_s": produced, "live_changes_per_s": n as f64 / live})
            );
            for w in &mut ws {
                w.terminate();
            }
        }
    }
}
