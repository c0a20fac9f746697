//! Redis cache sink: one hash per row (`{prefix}:{id}`), optional set of active ids.
//!
//! Every write goes through one Lua script that compares the stored `_version` with
//! the new one and writes only if newer (versions are 19-digit decimals, compared as
//! strings of equal length, because Lua numbers are doubles and would round them).
//! The hash is replaced whole (DEL + HSET), so fields never linger from an older image;
//! set membership changes in the same script, so it cannot disagree with the hash.
//!
//! Connection loss is a transient [`SinkError`]; per-key refusals (e.g. a key of another
//! type) are [`Rejection`]s.
//!
//! Lost data is detected, not assumed away: a Redis restarted without persistence (or from
//! an old file), or a failover to a replica that missed writes, comes back without
//! entries it acknowledged. Two signs are checked on writes: the server's `run_id` (INFO,
//! at most once a second) differs from the one seen before, or the write script is gone
//! (NOSCRIPT: the script cache does not survive a restart). Either is a
//! [`Lost::Sink`] error, and the engine re-writes every entry of the sink's projections
//! from the state store before it retries.

pub mod config;

pub use config::RedisConfig;

use futures_util::future::BoxFuture;
use redis::aio::ConnectionManager;
use redis::{Script, Value as RValue};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use viewkeeper_core::sink::{Lost, Rejection, Sink, SinkDoc, SinkError, Target};
use viewkeeper_core::ErrorKind;

/// How often a write checks the server's `run_id`.
const RUN_ID_CHECK: Duration = Duration::from_secs(1);

const CAS_SCRIPT: &str = r#"
-- KEYS[1] hash, KEYS[2] set of active ids (or the hash itself when there is none)
-- ARGV[1] version, ARGV[2] set member, ARGV[3] 'add' | 'rem' | '', ARGV[4] ttl milliseconds (0: keep)
-- ARGV[5..] field, value, ...
local cur = redis.pcall('HGET', KEYS[1], '_version')
if type(cur) == 'table' and cur.err then return 'E:' .. cur.err end
local v = ARGV[1]
if cur and (#cur > #v or (#cur == #v and cur >= v)) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '_version', v, unpack(ARGV, 5))
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
if ARGV[3] == 'add' then
  local r = redis.pcall('SADD', KEYS[2], ARGV[2])
  if type(r) == 'table' and r.err then return 'E:' .. r.err end
elseif ARGV[3] == 'rem' then
  local r = redis.pcall('SREM', KEYS[2], ARGV[2])
  if type(r) == 'table' and r.err then return 'E:' .. r.err end
end
return 1
"#;

#[derive(Clone)]
pub struct RedisSink {
    name: String,
    conn: ConnectionManager,
    script: Script,
    pipeline: usize,
    /// The server's `run_id` when last checked (`None`: INFO not permitted), and when.
    seen: Arc<Mutex<(Option<String>, Instant)>>,
}

/// How a JSON value is stored in a hash field; `None` leaves the field out.
pub fn field_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(_) | Value::Number(_) => Some(v.to_string()),
        Value::Array(_) | Value::Object(_) => Some(v.to_string()),
    }
}

impl RedisSink {
    /// Connects (the manager reconnects by itself after a loss). `rediss://` URLs use
    /// TLS, verified against `ca_file` (PEM) when given, else the system's roots.
    pub async fn connect(name: &str, cfg: &RedisConfig) -> Result<Self, SinkError> {
        let (url, ca_file, pipeline) = (cfg.url.expose(), cfg.ca_file.as_deref(), cfg.pipeline);
        let err = |e: redis::RedisError| SinkError::of(name, kind_of(&e), format!("cannot connect to Redis: {e}"));
        let client = if url.starts_with("rediss://") {
            crate::tls::install_default_provider();
            let root_cert = match ca_file {
                Some(p) => Some(std::fs::read(p).map_err(|e| {
                    SinkError::of(
                        name,
                        ErrorKind::Tls,
                        format!("cannot read the CA file {}: {e}", p.display()),
                    )
                })?),
                None => None,
            };
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert,
            };
            redis::Client::build_with_tls(url, certs).map_err(err)?
        } else {
            redis::Client::open(url).map_err(err)?
        };
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(std::time::Duration::from_secs(5))
            .set_response_timeout(std::time::Duration::from_secs(30))
            .set_number_of_retries(1);
        let mut conn = ConnectionManager::new_with_config(client, cfg).await.map_err(err)?;
        let script = Script::new(CAS_SCRIPT);
        script.prepare_invoke().load_async(&mut conn).await.map_err(err)?;
        let mut sink = RedisSink {
            name: name.to_string(),
            conn,
            script,
            pipeline: pipeline.max(1),
            seen: Arc::new(Mutex::new((None, Instant::now()))),
        };
        let id = sink.run_id().await?;
        sink.seen = Arc::new(Mutex::new((id, Instant::now())));
        Ok(sink)
    }

    /// The server's `run_id` (a new one after every restart, another on another server);
    /// `None` when INFO is not permitted (an ACL without `+info`): then only NOSCRIPT
    /// tells of a restart.
    async fn run_id(&self) -> Result<Option<String>, SinkError> {
        let mut conn = self.conn.clone();
        match redis::cmd("INFO").arg("server").query_async::<String>(&mut conn).await {
            Ok(info) => Ok(info
                .lines()
                .find_map(|l| l.strip_prefix("run_id:"))
                .map(|v| v.trim().to_string())),
            Err(e) if e.kind() == redis::ErrorKind::IoError => Err(self.transient("INFO", e)),
            Err(_) => Ok(None),
        }
    }

    /// What the server's storage is: its `run_id` as seen when connecting. The engine
    /// keeps it with the state store; another one on the next start means the entries
    /// written before may be gone.
    pub fn identity(&self) -> Option<String> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// How many of `keys` exist.
    pub async fn exists(&self, keys: &[String]) -> Result<usize, SinkError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        redis::cmd("EXISTS")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.transient("EXISTS", e))
    }

    /// A [`Lost::Sink`] error when the server is not the one seen before (checked at most
    /// once a [`RUN_ID_CHECK`]). The new `run_id` is remembered, so it is reported once.
    async fn check_server(&self) -> Result<(), SinkError> {
        let due = {
            let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.0.is_some() && seen.1.elapsed() >= RUN_ID_CHECK
        };
        if !due {
            return Ok(());
        }
        let now = self.run_id().await?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.1 = Instant::now();
        match (&seen.0, now) {
            (Some(before), Some(now)) if *before != now => {
                let msg = format!(
                    "the Redis server changed (run_id {before} -> {now}): it restarted or failed over, and may have lost entries"
                );
                seen.0 = Some(now);
                Err(SinkError::lost(&self.name, Lost::Sink, msg))
            }
            _ => Ok(()),
        }
    }

    /// The hashes at `keys` (empty for a missing key), for `verify`.
    pub async fn read(&self, keys: &[String]) -> Result<Vec<std::collections::BTreeMap<String, String>>, SinkError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(self.pipeline) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.hgetall(k);
            }
            let mut conn = self.conn.clone();
            let r: Vec<std::collections::BTreeMap<String, String>> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| self.transient("HGETALL", e))?;
            out.extend(r);
        }
        Ok(out)
    }

    /// Every key matching `pattern` (SCAN, not KEYS: it does not block the server).
    pub async fn scan(&self, pattern: &str) -> Result<Vec<String>, SinkError> {
        let mut conn = self.conn.clone();
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.transient("SCAN", e))?;
            out.extend(keys);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    pub async fn members(&self, set: &str) -> Result<std::collections::BTreeSet<String>, SinkError> {
        let mut conn = self.conn.clone();
        redis::cmd("SMEMBERS")
            .arg(set)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.transient("SMEMBERS", e))
    }

    /// Removes entries no row stands behind (`verify --repair`), and their set members.
    pub async fn remove(&self, keys: &[String], set: Option<(&str, &[String])>) -> Result<(), SinkError> {
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.del(k).ignore();
        }
        if let Some((set, members)) = set.filter(|(_, m)| !m.is_empty()) {
            pipe.srem(set, members).ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.transient("DEL", e))
    }

    /// Adds or removes set members (`verify --repair` of the active set).
    pub async fn set_members(&self, set: &str, add: &[String], rem: &[String]) -> Result<(), SinkError> {
        let mut pipe = redis::pipe();
        if !add.is_empty() {
            pipe.sadd(set, add).ignore();
        }
        if !rem.is_empty() {
            pipe.srem(set, rem).ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.transient("SADD/SREM", e))
    }

    fn transient(&self, what: &str, e: redis::RedisError) -> SinkError {
        SinkError::of(&self.name, kind_of(&e), format!("{what}: {e}"))
    }

    /// Writes the documents of one projection.
    pub async fn write_docs(&self, target: &Target, docs: &[SinkDoc]) -> Result<Vec<Rejection>, SinkError> {
        self.check_server().await?;
        let mut rejections = Vec::new();
        for chunk in docs.chunks(self.pipeline) {
            let mut pipe = redis::pipe();
            for d in chunk {
                let Some(body) = &d.body else {
                    rejections.push(Rejection {
                        id: d.id.clone(),
                        reason: "a cache entry cannot be removed (Redis keeps tombstones); use tombstone_ttl_ms".into(),
                    });
                    continue;
                };
                let set_op = match (&target.active_set, d.active) {
                    (Some(_), true) => "add",
                    (Some(_), false) => "rem",
                    (None, _) => "",
                };
                let ttl = if d.tombstoned {
                    target.tombstone_ttl_ms.unwrap_or(0)
                } else {
                    0
                };
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(self.script.get_hash())
                    .arg(2)
                    .arg(&d.id)
                    .arg(target.active_set.as_deref().unwrap_or(&d.id))
                    .arg(d.version.to_string())
                    .arg(&d.member)
                    .arg(set_op)
                    .arg(ttl);
                for (k, v) in body {
                    if let Some(t) = field_text(v) {
                        cmd.arg(k).arg(t);
                    }
                }
            }
            let ids: Vec<&SinkDoc> = chunk.iter().filter(|d| d.body.is_some()).collect();
            if ids.is_empty() {
                continue;
            }
            let mut conn = self.conn.clone();
            let results: Vec<RValue> = match pipe.query_async(&mut conn).await {
                Ok(r) => r,
                Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                    // The script cache is empty: Redis restarted (or SCRIPT FLUSH), so the
                    // entries may be gone too. Load the script again; the engine re-writes
                    // every entry, then this write.
                    self.script
                        .prepare_invoke()
                        .load_async(&mut conn)
                        .await
                        .map_err(|e| self.transient("loading the compare-and-set script", e))?;
                    let id = self.run_id().await?;
                    *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = (id, Instant::now());
                    return Err(SinkError::lost(
                        &self.name,
                        Lost::Sink,
                        "the Redis server lost the write script (NOSCRIPT): it restarted or flushed its scripts, and may have lost entries",
                    ));
                }
                Err(e) => return Err(self.transient("pipeline failed", e)),
            };
            for (d, r) in ids.iter().zip(results) {
                if let RValue::BulkString(b) = &r {
                    rejections.push(Rejection {
                        id: d.id.clone(),
                        reason: format!("Redis refused the write: {}", String::from_utf8_lossy(b)),
                    });
                } else if let RValue::SimpleString(s) = &r {
                    rejections.push(Rejection {
                        id: d.id.clone(),
                        reason: format!("Redis refused the write: {s}"),
                    });
                }
            }
        }
        Ok(rejections)
    }
}

/// The kind of a Redis failure: a refused login or missing permission, TLS, the server
/// gone, or (anything else) a remote failure of no known kind.
fn kind_of(e: &redis::RedisError) -> ErrorKind {
    use redis::ErrorKind as K;
    match e.kind() {
        K::IoError => ErrorKind::Unavailable,
        K::AuthenticationFailed => ErrorKind::Denied,
        _ if e.code() == Some("NOPERM") => ErrorKind::Denied,
        _ if e.to_string().contains("certificate") => ErrorKind::Tls,
        _ => ErrorKind::Remote,
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn write<'a>(
        &'a self,
        target: &'a Target,
        docs: &'a [SinkDoc],
    ) -> BoxFuture<'a, Result<Vec<Rejection>, SinkError>> {
        Box::pin(self.write_docs(target, docs))
    }

    fn identity(&self) -> Option<String> {
        RedisSink::identity(self)
    }

    fn holds<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<Option<usize>, SinkError>> {
        Box::pin(async move { self.exists(ids).await.map(Some) })
    }

    fn max_version<'a>(
        &'a self,
        _target: &'a Target,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Option<u64>, SinkError>> {
        Box::pin(async move {
            let mut max = None;
            for chunk in ids.chunks(1000) {
                let mut pipe = redis::pipe();
                for id in chunk {
                    pipe.cmd("HGET").arg(id).arg("_version");
                }
                let mut conn = self.conn.clone();
                let got: Vec<Option<String>> = pipe
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.transient("HGET _version", e))?;
                max = max.max(got.iter().flatten().filter_map(|v| v.parse::<u64>().ok()).max());
            }
            Ok(max)
        })
    }
}
