//! The status page at `/`, rendered by headless Chromium (Debian's `chromium`, which
//! scripts/test.sh installs): every number it shows under a metric's name equals what
//! `/metrics` exports, and a screenshot is kept (`<target dir>/status-page.png`).

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Headless Chromium on `url` with `args` (e.g. `--dump-dom`), in a fresh profile; its
/// stdout. The page marks itself ready after its first render; the virtual-time budget
/// lets it fetch `/v1/status` and render before the DOM is taken.
fn chromium(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .args(["90", "chromium"])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium (apt-get install chromium; scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `/metrics` → metric (as printed, with labels) → value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Every `data-metric="…" data-value="…"` pair of the rendered page (HTML entities of the
/// metric names decoded).
fn shown(dom: &str) -> Vec<(String, Option<f64>)> {
    let mut out = Vec::new();
    let mut rest = dom;
    while let Some(i) = rest.find("data-metric=\"") {
        rest = &rest[i + 13..];
        let Some(end) = rest.find('"') else { break };
        let name = rest[..end].replace("&quot;", "\"").replace("&amp;", "&");
        rest = &rest[end..];
        let v = rest
            .find("data-value=\"")
            .map(|j| &rest[j + 12..])
            .and_then(|r| r.find('"').map(|e| r[..e].to_string()));
        out.push((name, v.and_then(|v| v.parse().ok())));
    }
    out
}

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target dir")
        .to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_the_live_numbers_of_metrics() {
    let shop = Shop::new("page").await;
    let w = shop
        .worker_with(&shop.config(""), &[("VIEWKEEPER__HTTP__SAMPLE_INTERVAL_MS", "500")])
        .await;
    let addr = w.http_addr().await;
    let http = reqwest::Client::new();
    shop.exec("identity", "INSERT INTO customers SELECT g, 'Customer ' || g, 'c' || g || '@example.com', now() FROM generate_series(1, 10) g").await;
    shop.exec(
        "ordering",
        "INSERT INTO orders SELECT g, 1 + g % 10, 'new', g, '{}'::jsonb, now(), now() FROM generate_series(1, 30) g",
    )
    .await;
    // A stream of changes for the throughput plot.
    for i in 0..20 {
        shop.exec(
            "catalog",
            &format!("INSERT INTO products(id, sku, name, price) SELECT g, 'S' || g, 'P' || g, 1 FROM generate_series({0} * 10 + 1, {0} * 10 + 10) g", i),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await; // pacing the load, not a wait
    }
    converge(&shop, T).await;
    let metrics = || async {
        parse_metrics(
            &http
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        )
    };
    // The counters of every projection are exported once their batches are checkpointed.
    wait_until("documents written by every projection", T, || async {
        let m = metrics().await;
        ["ordering_products", "storefront_products", "orders_view"]
            .iter()
            .all(|p| m.contains_key(&format!("viewkeeper_documents_written_total{{projection=\"{p}\"}}")))
            .then_some(())
    })
    .await;
    let url = format!("http://{addr}/");
    // The page against /metrics fetched just before and just after it rendered: a number
    // that did not move meanwhile must be shown exactly, a counter that moved must lie in
    // between (gauges of the shared Postgres server, like retained WAL, may move: then try
    // again).
    let mut compared = BTreeMap::new();
    let mut last_dom = String::new();
    for _ in 0..10 {
        let before = metrics().await;
        let dom = tokio::task::spawn_blocking({
            let url = url.clone();
            move || chromium(&url, &["--dump-dom"])
        })
        .await
        .unwrap();
        let after = metrics().await;
        assert!(dom.contains("data-ready=\"1\""), "the page did not render:\n{dom}");
        let values = shown(&dom);
        assert!(values.len() >= 15, "{values:?}");
        compared.clear();
        let mut moved = false;
        for (name, v) in &values {
            match (before.get(name), after.get(name)) {
                (Some(b), Some(a)) if a == b => {
                    assert_eq!(*v, Some(*b), "{name}: the page shows {v:?}, /metrics {b}");
                    compared.insert(name.clone(), *b);
                }
                (None, None) => assert_eq!(*v, None, "{name}: shown, but not in /metrics"),
                // A counter that moved meanwhile (batches: an idle source's keepalives pass
                // through the engine while the shared server's WAL moves): in between.
                (b, Some(a)) if name.ends_with("_total") || name.contains("_count{") => {
                    let v = v.unwrap_or_else(|| panic!("{name}: not shown"));
                    assert!(
                        b.is_none_or(|b| *b <= v) && v <= *a,
                        "{name}: shown {v}, /metrics {b:?} then {a}"
                    );
                    compared.insert(name.clone(), v);
                }
                _ => moved = true,
            }
        }
        last_dom = dom;
        if !moved {
            break;
        }
    }
    for must in [
        "viewkeeper_changes_applied_total",
        "viewkeeper_batches_total",
        "viewkeeper_documents_written_total{projection=\"orders_view\"}",
        "viewkeeper_documents_written_total{projection=\"ordering_products\"}",
        "viewkeeper_sink_write_seconds_count{sink=\"cache\"}",
        "viewkeeper_replication_lag_seconds{source=\"catalog\"}",
    ] {
        assert!(compared.contains_key(must), "{must} not compared: {compared:?}");
    }
    assert!(compared["viewkeeper_changes_applied_total"] >= 240.0, "{compared:?}");
    // Sources, projections and sinks are all listed, with plots drawn from the history.
    for text in [
        "identity",
        "catalog",
        "ordering",
        "storefront_products",
        "search",
        "polyline",
    ] {
        assert!(last_dom.contains(text), "{text} missing from the page");
    }
    let status: serde_json::Value = http
        .get(format!("http://{addr}/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(status["history"]["t"].as_array().unwrap().len() >= 2, "{status}");
    assert!(status["sources"][0]["durable_position"].is_string(), "{status}");

    let png = target_dir().join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let shot = format!("--screenshot={}", png.display());
    tokio::task::spawn_blocking(move || chromium(&url, &[&shot, "--window-size=1400,1100"]))
        .await
        .unwrap();
    let bytes = std::fs::read(&png).expect("a screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000,
        "{} bytes",
        bytes.len()
    );
    eprintln!("screenshot: {}", png.display());
}
