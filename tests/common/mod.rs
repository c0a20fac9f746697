//! Test harness: real servers, a fresh shop (databases, slots, key prefix) per test,
//! the real `viewkeeper` binary as a child process, and waits on conditions with
//! deadlines (never bare sleeps).
//!
//! Servers: each endpoint comes from the environment (`VK_PG_URL`, `VK_REDIS_URL`,
//! `VK_OPENSEARCH_URL`, `VK_KAFKA_BROKERS`), so
//! the suite can run against any server; otherwise the local servers of
//! `scripts/services.sh` (started here if they are not up).
#![allow(dead_code)]

pub mod orders;
mod private_redis;

#[allow(unused_imports)] // not every test binary starts its own Redis
pub use private_redis::PrivateRedis;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

pub struct Servers {
    /// Server URL without a database, e.g. `postgres://postgres@127.0.0.1:54329`.
    pub pg: String,
    pub redis: String,
    /// Elasticsearch/OpenSearch base URL.
    pub search: String,
    /// Kafka bootstrap servers.
    pub kafka: String,
}

/// The servers, started through `scripts/services.sh` when not given by the env.
pub fn servers() -> &'static Servers {
    static S: OnceLock<Servers> = OnceLock::new();
    S.get_or_init(|| {
        let pg = std::env::var("VK_PG_URL").ok();
        let redis = std::env::var("VK_REDIS_URL").ok();
        let search = std::env::var("VK_OPENSEARCH_URL").ok();
        let kafka = std::env::var("VK_KAFKA_BROKERS").ok();
        let mut missing = vec![];
        for (have, name) in [
            (pg.is_some(), "postgres"),
            (redis.is_some(), "redis"),
            (search.is_some(), "opensearch"),
            (kafka.is_some(), "kafka"),
        ] {
            if !have {
                missing.push(name);
            }
        }
        if !missing.is_empty() {
            let st = Command::new(format!("{REPO}/scripts/services.sh"))
                .arg("up")
                .args(&missing)
                .stdout(Stdio::null())
                .status()
                .expect("run scripts/services.sh");
            assert!(st.success(), "scripts/services.sh up {missing:?} failed");
        }
        let pg = pg.unwrap_or_else(|| "postgres://postgres@127.0.0.1:54329/postgres".into());
        let pg = pg.rsplit_once('/').map(|(a, _)| a.to_string()).unwrap();
        let search = search.unwrap_or_else(|| "http://127.0.0.1:19200".into());
        remove_stale_shops(&pg, &search);
        Servers {
            pg,
            redis: redis.unwrap_or_else(|| "redis://127.0.0.1:63799".into()),
            search,
            kafka: kafka.unwrap_or_else(|| "127.0.0.1:19092".into()),
        }
    })
}

/// A third cache over the products that carries their description (TOASTed when long),
/// as TOML to append to the shop's config.
pub fn descriptions_projection(shop: &Shop) -> String {
    format!(
        r#"
[projections.descriptions]
root = "products"
sink = "cache"
key = "{}:desc:{{id}}"
fields = ["description", "price"]
"#,
        shop.prefix
    )
}

/// Inserts product `id` with a 25 kB incompressible description (hex digits of md5
/// chains), so Postgres stores it out of line (TOAST); returns the description.
pub async fn insert_toasted_product(pg: &tokio_postgres::Client, id: i64) -> String {
    pg.batch_execute(&format!(
        "INSERT INTO products(id, sku, name, price, description)
         SELECT {id}, 'T-{id}', 'Toasty', 5, string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 800) g"
    ))
    .await
    .unwrap();
    pg.query_one("SELECT description FROM products WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// `viewkeeper check-config --config FILE`: success, and stderr.
pub fn check_config(file: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_viewkeeper"))
        .args(["check-config", "--config"])
        .arg(file)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `viewkeeper ARGS… --config CONFIG --data-dir DATA_DIR`, run to the end (an HTTP
/// listener, for `run`, on a free port).
pub fn viewkeeper_in(config: &Path, data_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_viewkeeper"))
        .args(args)
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir)
        .env("VIEWKEEPER__HTTP__LISTEN", "127.0.0.1:0")
        .output()
        .expect("run viewkeeper")
}

/// Adds `setting` (`key = value`) to every Postgres source of the config file.
pub fn with_source_setting(cfg: &Path, setting: &str) {
    let text = std::fs::read_to_string(cfg)
        .unwrap()
        .replace("publication = \"", &format!("{setting}\npublication = \""));
    std::fs::write(cfg, text).unwrap();
}

/// Waits until `f` returns `Some`, polling every 50 ms; panics with `what` after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_until_every(what, timeout, Duration::from_millis(50), f).await
}

/// [`wait_until`], asking every `every` (a benchmark's poll must not load the server it
/// measures).
pub async fn wait_until_every<T, F, Fut>(what: &str, timeout: Duration, every: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Runs config/shop.sql for the shop `prefix`: (re)creates it, or with `drop_only`
/// removes its slots and databases.
fn shop_sql(pg: &str, prefix: &str, drop_only: bool) {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1"]);
    for svc in ["identity", "catalog", "ordering"] {
        cmd.arg("-v").arg(format!("{svc}_db={prefix}_{svc}"));
    }
    if drop_only {
        cmd.args(["-v", "drop_only=1"]);
    }
    let out = cmd
        .arg("-d")
        .arg(format!("{pg}/postgres"))
        .arg("-f")
        .arg(format!("{REPO}/config/shop.sql"))
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "shop.sql for {prefix}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes shops left by test processes that no longer run (a crashed or killed run),
/// so their slots do not pile up against max_replication_slots.
fn remove_stale_shops(pg: &str, search: &str) {
    let out = Command::new("psql")
        .args(["-X", "-At", "-d"])
        .arg(format!("{pg}/postgres"))
        .args([
            "-c",
            "SELECT datname FROM pg_database WHERE datname ~ '^t[0-9]+_[0-9]+_.*_catalog$'",
        ])
        .output()
        .expect("psql");
    for db in String::from_utf8_lossy(&out.stdout).lines() {
        let pid = db[1..].split('_').next().unwrap_or("");
        if !Path::new(&format!("/proc/{pid}")).exists() {
            shop_sql(pg, db.trim_end_matches("_catalog"), true);
            drop_indexes(search, db.trim_end_matches("_catalog"));
        }
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        shop_sql(&servers().pg, &self.prefix, true);
        drop_indexes(&servers().search, &self.prefix);
    }
}

/// Deletes the search indexes of a shop (best effort; the server is in-memory anyway).
fn drop_indexes(search: &str, prefix: &str) {
    let _ = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-X", "DELETE"])
        .arg(format!("{search}/{prefix}_*"))
        .status();
}

/// A fresh copy of the demo shop: its own three databases (from config/shop.sql), its
/// own slots and publications, its own Redis key prefix.
pub struct Shop {
    pub prefix: String,
    pub data_dir: tempfile::TempDir,
    /// The Redis the config's cache sink and [`Shop::redis`] use instead of the shared one
    /// (a [`PrivateRedis`] the test may restart).
    pub redis_url: Option<String>,
}

impl Shop {
    pub async fn new(test: &str) -> Shop {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!("t{}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst), test);
        shop_sql(&servers().pg, &prefix, false);
        Shop {
            prefix,
            data_dir: tempfile::tempdir().unwrap(),
            redis_url: None,
        }
    }

    pub fn db_url(&self, service: &str) -> String {
        format!("{}/{}_{service}", servers().pg, self.prefix)
    }

    /// config/shop.toml rewritten for this shop (databases, slots, key prefix) plus
    /// `extra` TOML appended.
    pub fn config(&self, extra: &str) -> PathBuf {
        self.config_from("shop.toml", extra)
    }

    /// A file of `config/` rewritten like [`Shop::config`]; for config/shop-debezium.toml
    /// the topics (`<prefix>_<service>.public.<table>`), consumer groups and broker too.
    pub fn config_from(&self, file: &str, extra: &str) -> PathBuf {
        let mut text = std::fs::read_to_string(format!("{REPO}/config/{file}")).unwrap();
        text = text.replace(
            "brokers = \"127.0.0.1:19092\"",
            &format!("brokers = \"{}\"", servers().kafka),
        );
        for svc in ["identity", "catalog", "ordering"] {
            // Tansu joins a group after about session.timeout.ms / 2.
            text = text.replace(
                &format!("topic_prefix = \"{svc}\""),
                &format!(
                    "topic_prefix = \"{0}_{svc}\"\ngroup_id = \"{0}_{svc}\"\nsession_timeout_ms = 6000",
                    self.prefix
                ),
            );
        }
        for svc in ["identity", "catalog", "ordering"] {
            text = text
                .replace(
                    &format!("\"postgres://postgres@127.0.0.1:54329/{svc}\""),
                    &format!("\"{}\"", self.db_url(svc)),
                )
                .replace(&format!("\"viewkeeper_{svc}\""), &format!("\"{}_{svc}\"", self.prefix));
        }
        text = text.replace(
            "redis://127.0.0.1:63799",
            self.redis_url.as_ref().unwrap_or(&servers().redis),
        );
        text = text.replace("http://127.0.0.1:19200", &servers().search);
        text = text.replace("alias = \"orders_view\"", &format!("alias = \"{}\"", self.alias()));
        for k in ["ordering:product:", "storefront:product:", "storefront:products:active"] {
            text = text.replace(&format!("\"{k}"), &format!("\"{}:{k}", self.prefix));
        }
        text.push_str(extra);
        let path = self.data_dir.path().join("viewkeeper.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    pub async fn pg(&self, service: &str) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.db_url(service), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    }

    /// Runs SQL (one or more statements, each its own transaction unless wrapped in
    /// BEGIN/COMMIT) in the service's database.
    pub async fn exec(&self, service: &str, sql: &str) {
        self.pg(service)
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{service}: {sql}: {e}"));
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_ref().unwrap_or(&servers().redis).as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// This shop's `orders_view` alias.
    pub fn alias(&self) -> String {
        format!("{}_orders_view", self.prefix)
    }

    pub fn key(&self, k: &str) -> String {
        format!("{}:{k}", self.prefix)
    }

    /// The slot's confirmed flush LSN (as a number), if the slot exists.
    pub async fn confirmed_flush(&self, service: &str) -> Option<u64> {
        let c = self.pg(service).await;
        let slot = format!("{}_{service}", self.prefix);
        let row = c
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        row.and_then(|r| r.get::<_, Option<i64>>(0)).map(|v| v as u64)
    }

    pub async fn current_lsn(&self, service: &str) -> u64 {
        let c = self.pg(service).await;
        c.query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
            .await
            .unwrap()
            .get::<_, i64>(0) as u64
    }

    /// `viewkeeper ARGS… --config CONFIG --data-dir <this shop's data dir>`, run to the end
    /// (an HTTP listener, for `run`, on a free port).
    pub fn viewkeeper(&self, config: &Path, args: &[&str]) -> std::process::Output {
        viewkeeper_in(config, &self.data_dir.path().join("data"), args)
    }

    /// Dead letters recorded in the worker's state store.
    pub fn dead_letters(&self) -> Vec<(String, String, String)> {
        let path = self.data_dir.path().join("data").join("state.db");
        let Ok(c) = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
            return vec![];
        };
        let mut st = c
            .prepare("SELECT tbl, key, reason FROM dead_letters ORDER BY id")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Starts the worker and waits until it streams from all three slots (changes
    /// committed before a slot exists are not in it).
    pub async fn worker(&self, config: &Path) -> Worker {
        self.worker_with(config, &[]).await
    }

    /// [`Shop::worker`] with more environment (`VIEWKEEPER__…` overrides).
    pub async fn worker_with(&self, config: &Path, env: &[(&str, &str)]) -> Worker {
        let w = Worker::start_with(config, &self.data_dir.path().join("data"), env);
        let c = self.pg("catalog").await;
        let like = format!("{}\\_%", self.prefix.replace('_', "\\_"));
        wait_until(
            "worker streaming from its three slots",
            Duration::from_secs(30),
            || async {
                let n: i64 = c
                    .query_one(
                        // Streaming, not merely active: a slot being created is active (held
                        // by the creating backend) before it reaches its consistent point.
                        "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
                         WHERE s.slot_name LIKE $1 AND r.state = 'streaming'",
                        &[&like],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (n == 3).then_some(())
            },
        )
        .await;
        w
    }
}

/// The `viewkeeper run` child process; killed on drop.
pub struct Worker {
    pub child: Child,
    pub log: PathBuf,
}

impl Worker {
    pub fn start(config: &Path, data_dir: &Path) -> Worker {
        Worker::start_with(config, data_dir, &[])
    }

    /// [`Worker::start`] with more environment (`VIEWKEEPER__…` overrides).
    pub fn start_with(config: &Path, data_dir: &Path, env: &[(&str, &str)]) -> Worker {
        let log = data_dir.with_extension(format!(
            "log.{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let out = std::fs::File::create(&log).unwrap();
        // VK_WORKER_BIN: another build of the worker (the benchmarks run the release one).
        let bin = std::env::var_os("VK_WORKER_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_viewkeeper").into());
        let mut cmd = Command::new(bin);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .env("VIEWKEEPER_LOG", "info,viewkeeper=debug")
            // Tests run workers side by side: each takes a free port (logged).
            .env("VIEWKEEPER__HTTP__LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start viewkeeper");
        Worker { child, log }
    }

    /// The address of the worker's HTTP listener, once it logged it.
    pub async fn http_addr(&self) -> String {
        wait_until("http listener logged", Duration::from_secs(60), || async {
            let log = self.log_text();
            let line = log.lines().find(|l| l.contains("http listening"))?;
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            v["addr"].as_str().map(str::to_string)
        })
        .await
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush or checkpoint anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("\"DEBUG\""))
                .rev()
                .take(40)
                .collect();
            let keep = std::env::temp_dir().join(format!("viewkeeper-failed-{}.log", std::process::id()));
            let _ = std::fs::write(&keep, &log);
            eprintln!(
                "---- worker log (last {} lines above DEBUG; all of it in {}) ----",
                tail.len(),
                keep.display()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every cache entry against Postgres: `Ok(())` when they agree, else the first
/// difference. Rows gone from Postgres must be tombstones (status decommissioned).
pub async fn cache_matches_truth(shop: &Shop) -> Result<(), String> {
    use redis::AsyncCommands;
    use std::collections::{BTreeMap, BTreeSet};
    let pg = shop.pg("catalog").await;
    let rows = pg
        .query(
            "SELECT id, sku, name, price::text, status FROM products ORDER BY id",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut r = shop.redis().await;
    let mut truth_ids = BTreeSet::new();
    let mut active = BTreeSet::new();
    for row in &rows {
        let id: i64 = row.get(0);
        let (sku, name, price, status): (String, String, String, String) =
            (row.get(1), row.get(2), row.get(3), row.get(4));
        truth_ids.insert(id);
        if status == "active" {
            active.insert(id.to_string());
        }
        for (prefix, fields) in [
            (
                "ordering:product:",
                vec![("sku", &sku), ("name", &name), ("price", &price), ("status", &status)],
            ),
            (
                "storefront:product:",
                vec![("name", &name), ("price", &price), ("status", &status)],
            ),
        ] {
            let key = shop.key(&format!("{prefix}{id}"));
            let mut h: BTreeMap<String, String> = r.hgetall(&key).await.map_err(|e| e.to_string())?;
            h.remove("_meta"); // freshness, with `meta = true` (tests/wait.rs): not content
            if h.remove("_version").is_none() {
                return Err(format!("{key}: missing or without _version: {h:?}"));
            }
            // A decommissioned row has the time it happened, or none when the initial
            // snapshot read it already decommissioned (since when cannot be known); never
            // a made-up time.
            let at = h.remove("decommissioned_at");
            if (at.is_some() && status != "decommissioned") || at.as_deref().is_some_and(|t| t.starts_with("1970")) {
                return Err(format!("{key}: decommissioned_at {at:?} with status {status}"));
            }
            let want: BTreeMap<String, String> = fields.into_iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            if h != want {
                return Err(format!("{key}: have {h:?}, want {want:?}"));
            }
        }
    }
    let pattern = shop.key("ordering:product:*");
    let keys: Vec<String> = r.keys(&pattern).await.map_err(|e| e.to_string())?;
    for k in keys {
        // Other projections' keys may share the prefix (`…:product:5:desc`).
        let Ok(id) = k
            .strip_prefix(&shop.key("ordering:product:"))
            .unwrap_or("")
            .parse::<i64>()
        else {
            continue;
        };
        if truth_ids.contains(&id) {
            continue;
        }
        let status: Option<String> = r.hget(&k, "status").await.map_err(|e| e.to_string())?;
        let at: Option<String> = r.hget(&k, "decommissioned_at").await.map_err(|e| e.to_string())?;
        if status.as_deref() != Some("decommissioned") || at.is_none() {
            return Err(format!(
                "{k}: row deleted in Postgres but cache has status {status:?}, decommissioned_at {at:?}"
            ));
        }
    }
    let members: BTreeSet<String> = r
        .smembers(shop.key("storefront:products:active"))
        .await
        .map_err(|e| e.to_string())?;
    let want: BTreeSet<String> = active;
    if members != want {
        return Err(format!(
            "active set differs: extra {:?}, missing {:?}",
            members.difference(&want).take(5).collect::<Vec<_>>(),
            want.difference(&members).take(5).collect::<Vec<_>>()
        ));
    }
    Ok(())
}

/// Waits until the caches equal the truth; on timeout, panics with the last difference.
pub async fn converge(shop: &Shop, timeout: Duration) {
    let start = Instant::now();
    loop {
        match cache_matches_truth(shop).await {
            Ok(()) => return,
            Err(e) if start.elapsed() > timeout => {
                panic!("caches did not converge within {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
