//! The fault suite's kill loop: a steady mixed workload across the three databases, the
//! worker SIGKILLed at random moments, and after each restart the read models converge
//! and `viewkeeper verify` passes.
//!
//! Short form by default (3 kills, for CI); the long form is
//! `VK_CHAOS_KILLS=20 cargo nextest run --test chaos`. The schedule comes from
//! `VK_CHAOS_SEED` (printed, so a failing run can be replayed).

mod common;

use common::orders::*;
use common::*;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

/// The steady mixed workload: seeded shop data, then one transaction at a time, a random
/// kind, across the three databases, until stopped; `paused` holds it between
/// transactions (`idle` says it is holding), `done` counts transactions.
struct Workload {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Workload {
    /// `pace`: a pause after each transaction (`None`: as fast as it goes).
    async fn start(shop: &Shop, seed: u64, pace: Option<Duration>) -> Workload {
        shop.exec("identity", "INSERT INTO customers SELECT g, 'Customer ' || g, 'c' || g || '@example.com', now() FROM generate_series(1, 30) g").await;
        shop.exec("catalog", "INSERT INTO products(id, sku, name, price) SELECT g, 'SKU-' || g, 'Product ' || g, g + 0.5 FROM generate_series(1, 20) g").await;
        shop.exec(
            "ordering",
            "INSERT INTO orders SELECT g, 1 + g % 30, 'new', g, NULL, now(), now() FROM generate_series(1, 60) g;
             INSERT INTO order_items SELECT o, l, 1 + (o + l) % 20, l, 2.50 FROM generate_series(1, 60) o, generate_series(1, 2) l",
        )
        .await;
        let (stop, paused, idle) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let done = Arc::new(AtomicU64::new(0));
        let (i, c, o) = (
            shop.pg("identity").await,
            shop.pg("catalog").await,
            shop.pg("ordering").await,
        );
        let task = {
            let (stop, paused, idle, done) = (stop.clone(), paused.clone(), idle.clone(), done.clone());
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut next_order = 1000;
                while !stop.load(Ordering::SeqCst) {
                    if paused.load(Ordering::SeqCst) {
                        idle.store(true, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    idle.store(false, Ordering::SeqCst);
                    let p = rng.random_range(1..=20);
                    let cu = rng.random_range(1..=30);
                    let r = match rng.random_range(0..6) {
                        0 => c.batch_execute(&format!("UPDATE products SET price = price + 1, name = 'Product {p} v' || floor(random() * 1000) WHERE id = {p}")).await,
                        1 => c.batch_execute(&format!("UPDATE products SET status = CASE WHEN status = 'active' THEN 'decommissioned' ELSE 'active' END WHERE id = {p}")).await,
                        2 => i.batch_execute(&format!("UPDATE customers SET email = 'c{cu}.' || floor(random() * 1000) || '@example.com' WHERE id = {cu}")).await,
                        3 => {
                            next_order += 1;
                            o.batch_execute(&format!(
                                "BEGIN; INSERT INTO orders VALUES ({next_order}, {cu}, 'new', 9.99, NULL, now(), now());
                                 INSERT INTO order_items VALUES ({next_order}, 1, {p}, 1, 9.99), ({next_order}, 2, {}, 2, 1.00); COMMIT",
                                1 + p % 20
                            ))
                            .await
                        }
                        4 => o.batch_execute(&format!("UPDATE orders SET status = 'paid', updated_at = now() WHERE id = {}", rng.random_range(1..=60))).await,
                        _ => o.batch_execute(&format!("DELETE FROM order_items WHERE order_id = {} AND line_no = 2", rng.random_range(1..=60))).await,
                    };
                    r.unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                    if let Some(p) = pace {
                        tokio::time::sleep(p).await; // the workload's rate, not a wait for a condition
                    }
                }
            })
        };
        Workload {
            stop,
            paused,
            idle,
            done,
            task,
        }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sigkills_under_load_converge_and_verify() {
    let kills: usize = std::env::var("VK_CHAOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("VK_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("chaos: {kills} kills, VK_CHAOS_SEED={seed}");
    let shop = Shop::new("chaos").await;
    let cfg = shop.config("");
    let mut w = shop.worker(&cfg).await;
    let mem = Remembered::default();
    let wl = Workload::start(&shop, seed, None).await;
    let (paused, idle, done) = (wl.paused.clone(), wl.idle.clone(), wl.done.clone());

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    for k in 0..kills {
        // The random moment: part of the schedule, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
        w.kill9();
        w = shop.worker(&cfg).await;
        paused.store(true, Ordering::SeqCst);
        wait_until("writer paused", T, || async {
            idle.load(Ordering::SeqCst).then_some(())
        })
        .await;
        converge(&shop, T).await;
        converge_orders(&shop, &mem, T).await;
        let out = shop.viewkeeper(&cfg, &["verify"]);
        assert!(
            out.status.success(),
            "kill {k} (seed {seed}): verify failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        eprintln!(
            "chaos: kill {} of {kills} converged and verified after {} transactions",
            k + 1,
            done.load(Ordering::SeqCst)
        );
        paused.store(false, Ordering::SeqCst);
    }
    wl.stop().await;
    assert!(done.load(Ordering::SeqCst) > kills as u64, "the workload ran");
}

/// Unmounts on drop, even when the test fails.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The data dir's disk fills up: the worker stops with a clear error instead of
/// acknowledging anything it could not store; with room again it resumes, the state
/// store passes SQLite's integrity check, and `verify` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_worker_cleanly_and_it_resumes_with_room() {
    let shop = Shop::new("nospace").await;
    let data = shop.data_dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&data)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a small tmpfs here (needs root); the disk-full test did not run");
        return;
    }
    let _m = Mount(data.clone());
    let cfg = shop.config("");
    let w = shop.worker(&cfg).await;
    // Rows whose stored images outgrow 1 MB.
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price) SELECT g, 'SKU-' || g, repeat('n', 400) || g, 1 FROM generate_series(1, 4000) g",
    )
    .await;
    let child = std::sync::Mutex::new(w);
    let status = wait_until("worker stops on the full disk", T, || async {
        child.lock().unwrap().child.try_wait().ok().flatten()
    })
    .await;
    let w = child.into_inner().unwrap();
    assert!(!status.success());
    let log = w.log_text();
    let error = log
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        error.contains("database or disk is full"),
        "a clear error, got {error:?} in:\n{log}"
    );
    drop(w);

    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(grown.success());
    let _w = shop.worker(&cfg).await;
    converge(&shop, T).await;
    let ok: String = rusqlite::Connection::open(data.join("state.db"))
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let out = shop.viewkeeper(&cfg, &["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// A sustained run of the workload with the worker's memory and lag sampled every second:
/// both stay bounded, and the read models are exact afterwards. Short by default (20 s);
/// the long form is `VK_LOAD_SECONDS=600 cargo nextest run --test chaos sustained --no-capture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_load_keeps_memory_and_lag_bounded() {
    let secs: u64 = std::env::var("VK_LOAD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let shop = Shop::new("load").await;
    let cfg = shop.config("");
    let w = shop.worker(&cfg).await;
    let addr = w.http_addr().await;
    // A rate this machine holds with the in-memory search server as a sink (~40 tx/s;
    // product changes fan out to every order that has the product).
    let wl = Workload::start(&shop, 7, Some(Duration::from_millis(25))).await;
    let rss_kb = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    };
    let (mut rss, mut lags) = (Vec::new(), Vec::new());
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while started.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        rss.push(rss_kb(w.child.id()));
        let m = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let lag = m
            .lines()
            .filter(|l| l.starts_with("viewkeeper_replication_lag_seconds{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, f64::max);
        lags.push(lag);
    }
    let txs = wl.done.load(Ordering::SeqCst);
    wl.stop().await;
    converge(&shop, T).await;
    converge_orders(&shop, &Remembered::default(), T).await;
    let out = shop.viewkeeper(&cfg, &["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    lags.sort_by(f64::total_cmp);
    let p99 = lags[(lags.len() * 99 / 100).min(lags.len() - 1)];
    let (first, max) = (rss[rss.len().min(5) - 1], *rss.iter().max().unwrap());
    eprintln!(
        "load: {secs} s, {txs} transactions ({:.0}/s), worker RSS {} MB after 5 s, max {} MB, lag p99 {p99:.2} s, max {:.2} s",
        txs as f64 / secs as f64,
        first / 1024,
        max / 1024,
        lags.last().unwrap()
    );
    // Bounded: memory does not grow with the run (generous for a noisy machine).
    assert!(max < first * 3 + 100 * 1024, "RSS grew from {first} kB to {max} kB");
    assert!(p99 < 30.0, "lag p99 {p99} s");
}
