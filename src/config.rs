//! The config file: one TOML file, every setting overridable from the environment as
//! `VIEWKEEPER__A__B` (e.g. `VIEWKEEPER__SOURCES__CATALOG__URL`). Layering is figment's;
//! this module adds named defaults, `deny_unknown_fields`, and [`Config::validate`],
//! whose errors name the key path and say how to fix it. Secrets (passwords in URLs)
//! are redacted in `Debug` and in `check-config` output.

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use viewkeeper_projections::spec::{self, ProjectionSpec, TableSpec};

pub const ENV_PREFIX: &str = "VIEWKEEPER__";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the worker persists everything (state store, dead letters).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    #[serde(default)]
    pub tables: BTreeMap<String, TableSpec>,
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
    #[serde(default)]
    pub projections: BTreeMap<String, ProjectionSpec>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Upper bound of changes applied, rendered and written as one batch.
    #[serde(default = "EngineConfig::default_max_batch_changes")]
    pub max_batch_changes: usize,
    /// Bound of the queue of committed transactions between sources and the engine.
    #[serde(default = "EngineConfig::default_queue_transactions")]
    pub queue_transactions: usize,
    /// Bound of the changes held in that queue (what bounds the worker's memory while the
    /// engine is behind; a single transaction larger than this still passes, alone).
    #[serde(default = "EngineConfig::default_queue_changes")]
    pub queue_changes: usize,
    /// Backoff of retried sink writes and source reconnects: first and largest delay.
    #[serde(default = "EngineConfig::default_retry_min_ms")]
    pub retry_min_ms: u64,
    #[serde(default = "EngineConfig::default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// On SIGTERM/SIGINT: how long the batch in hand may take to reach the sinks and be
    /// checkpointed before it is abandoned (it replays on the next start).
    #[serde(default = "EngineConfig::default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

impl EngineConfig {
    fn default_max_batch_changes() -> usize {
        5_000
    }
    fn default_queue_transactions() -> usize {
        1_024
    }
    fn default_queue_changes() -> usize {
        20_000
    }
    fn default_retry_min_ms() -> u64 {
        100
    }
    fn default_retry_max_ms() -> u64 {
        5_000
    }
    fn default_drain_timeout_ms() -> u64 {
        10_000
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_changes: Self::default_max_batch_changes(),
            queue_transactions: Self::default_queue_transactions(),
            queue_changes: Self::default_queue_changes(),
            retry_min_ms: Self::default_retry_min_ms(),
            retry_max_ms: Self::default_retry_max_ms(),
            drain_timeout_ms: Self::default_drain_timeout_ms(),
        }
    }
}

/// `[http]`: the worker's `/metrics`, `/healthz`, `/readyz` listener.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "HttpConfig::default_enabled")]
    pub enabled: bool,
    /// Loopback by default; `127.0.0.1:0` picks a free port (logged).
    #[serde(default = "HttpConfig::default_listen")]
    pub listen: String,
    /// `/readyz` answers 503 while a source's replication lag exceeds this.
    #[serde(default = "HttpConfig::default_max_lag_seconds")]
    pub max_lag_seconds: f64,
}

impl HttpConfig {
    fn default_max_lag_seconds() -> f64 {
        300.0
    }
    fn default_enabled() -> bool {
        true
    }
    fn default_listen() -> String {
        "127.0.0.1:9464".into()
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_lag_seconds: Self::default_max_lag_seconds(),
            enabled: Self::default_enabled(),
            listen: Self::default_listen(),
        }
    }
}

/// A connection string whose password never reaches logs. In the config either the
/// string itself or `{ file = "/run/secrets/pg_url" }`: the file's content (one line,
/// surrounding whitespace trimmed), so the secret need not sit in the config or the
/// environment (Docker/Kubernetes secrets).
#[derive(Clone)]
pub struct SecretUrl(pub String);

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Inline(String),
            File { file: PathBuf },
        }
        match Form::deserialize(d)? {
            Form::Inline(s) => Ok(SecretUrl(s)),
            Form::File { file } => std::fs::read_to_string(&file)
                .map(|s| SecretUrl(s.trim().to_string()))
                .map_err(|e| serde::de::Error::custom(format!("cannot read the secret file {}: {e}", file.display()))),
        }
    }
}

impl SecretUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        let s = &self.0;
        if let Some(scheme_end) = s.find("://") {
            let rest = &s[scheme_end + 3..];
            let auth_end = rest.find('/').unwrap_or(rest.len());
            if let Some(at) = rest[..auth_end].rfind('@') {
                if let Some(colon) = rest[..at].find(':') {
                    return format!("{}{}:***{}", &s[..scheme_end + 3], &rest[..colon], &rest[at..]);
                }
            }
        }
        // key=value form: password=...
        s.split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// A secret that is not a URL (an API key): the string itself or `{ file = "…" }`, like
/// [`SecretUrl`]; shown as `***` in `Debug` and `check-config`.
#[derive(Clone)]
pub struct Secret(pub String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        SecretUrl::deserialize(d).map(|s| Secret(s.0))
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// librdkafka properties; the values of secret ones (`sasl.password`, `ssl.key.password`,
/// `sasl.jaas.config`, …: any key naming a password, secret, key or JAAS config) are
/// `***` in `Debug` and `check-config`. A value may also be `{ file = "…" }`.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct KafkaProperties(pub BTreeMap<String, Secret>);

impl KafkaProperties {
    pub fn is_secret(key: &str) -> bool {
        let k = key.to_ascii_lowercase();
        ["password", "secret", "jaas", ".key.pem", "ssl.key", "keystore", "token"]
            .iter()
            .any(|w| k.contains(w))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    /// The plain values, for librdkafka.
    pub fn exposed(&self) -> BTreeMap<String, String> {
        self.0.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect()
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if Self::is_secret(k) { "***" } else { v.0.as_str() };
                (k, shown)
            }))
            .finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    Postgres(PostgresSource),
    /// Debezium change-event topics in Kafka (JsonConverter, with or without schemas).
    Debezium(DebeziumSource),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebeziumSource {
    /// `bootstrap.servers`, e.g. `127.0.0.1:19092`.
    pub brokers: String,
    /// The connector's `topic.prefix`: table `schema.table` is read from
    /// `<topic_prefix>.<schema>.<table>` unless `topics` names another topic.
    pub topic_prefix: String,
    /// Consumer group; default `viewkeeper-<source name>`.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Table name (`[tables.NAME]`) → topic, where Debezium's naming is not used.
    #[serde(default)]
    pub topics: BTreeMap<String, String>,
    /// Table name → column → type, for topics without schemas (`schemas.enable=false`):
    /// e.g. `products = { price = "decimal(2)" }`. A schema in the message wins.
    #[serde(default)]
    pub column_types: BTreeMap<String, BTreeMap<String, String>>,
    /// Extra librdkafka consumer properties (security, fetch sizes, …); secret ones are
    /// redacted in `Debug` / `check-config` (see [`KafkaProperties`]).
    #[serde(default)]
    pub properties: KafkaProperties,
    #[serde(default = "DebeziumSource::default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// Records per batch at most.
    #[serde(default = "DebeziumSource::default_max_batch_records")]
    pub max_batch_records: usize,
    /// On a rebalance, how long to wait for the engine to acknowledge what was read
    /// before the partitions go (what is not acknowledged by then is replayed).
    #[serde(default = "DebeziumSource::default_revoke_timeout_ms")]
    pub revoke_timeout_ms: u64,
}

impl DebeziumSource {
    fn default_session_timeout_ms() -> u64 {
        10_000
    }
    fn default_max_batch_records() -> usize {
        5_000
    }
    fn default_revoke_timeout_ms() -> u64 {
        30_000
    }

    /// The topic of table `alias` (`schema.table` `name`).
    pub fn topic_of(&self, alias: &str, name: &str) -> String {
        self.topics
            .get(alias)
            .cloned()
            .unwrap_or_else(|| format!("{}.{name}", self.topic_prefix))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSource {
    /// `postgres://user[:password]@host:port/database[?sslmode=verify-full&sslrootcert=/ca.crt]`
    /// (TLS as in libpq: see [`viewkeeper_connectors::postgres::connect`]).
    pub url: SecretUrl,
    /// Logical replication slot (created when missing).
    pub slot: String,
    /// Publication over the source's tables (created when missing).
    pub publication: String,
    /// How often standby status updates report the checkpoint.
    #[serde(default = "PostgresSource::default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// `initial` (default): when the slot is created, read the rows that already exist
    /// under its snapshot, then stream. `never`: stream only what changes from then on.
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Warn when the slot retains more WAL than this (and see
    /// `viewkeeper_slot_retained_wal_bytes`); an initial snapshot pauses to stream the
    /// slot when it does. Default 1 GiB.
    #[serde(default = "PostgresSource::default_max_retained_wal_bytes")]
    pub max_retained_wal_bytes: u64,
    /// Heartbeat while streaming (`pg_logical_emit_message`, milliseconds; 0: off), so
    /// the slot of a database whose published tables do not change still advances.
    #[serde(default = "PostgresSource::default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Rows per chunk of the initial snapshot (one batch each; progress is stored per chunk).
    #[serde(default = "PostgresSource::default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: usize,
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    #[default]
    Initial,
    Never,
}

impl PostgresSource {
    /// Connects to the source's database with the URL's TLS settings; the connection is
    /// driven by the returned task.
    pub async fn connect(&self) -> anyhow::Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
        let pg = viewkeeper_connectors::postgres::PgConnector::parse(self.url.expose()).map_err(anyhow::Error::msg)?;
        Ok(pg.connect().await?)
    }

    fn default_status_interval_ms() -> u64 {
        1_000
    }
    fn default_max_retained_wal_bytes() -> u64 {
        1 << 30
    }
    fn default_heartbeat_interval_ms() -> u64 {
        60_000
    }
    fn default_snapshot_chunk_rows() -> usize {
        viewkeeper_connectors::postgres::snapshot::CHUNK_ROWS
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SinkConfig {
    Redis(RedisSink),
    /// Elasticsearch 8 or OpenSearch 2 (`kind = "opensearch"` is the same).
    #[serde(alias = "opensearch")]
    Elasticsearch(SearchSink),
    /// Discards every write and counts it (`viewkeeper_blackhole_documents_total{sink}`):
    /// to measure sources, joins and rendering without a sink's cost.
    Blackhole(BlackholeSink),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlackholeSink {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSink {
    /// `http(s)://[user:password@]host:port`: a user and password in the URL are sent as
    /// HTTP basic authentication.
    pub url: SecretUrl,
    /// An Elasticsearch API key (the base64 `encoded` form the API returns), sent as
    /// `Authorization: ApiKey …`; instead of a user and password.
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// A PEM file of the CA certificates that sign the server's (HTTPS); without it the
    /// Mozilla roots. The host name is always checked.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A bulk request is cut once it passes this size; one request is in flight.
    #[serde(default = "SearchSink::default_max_bulk_bytes")]
    pub max_bulk_bytes: usize,
    /// Rounds of retrying only the items refused with 429/5xx within one write.
    #[serde(default = "SearchSink::default_item_retries")]
    pub item_retries: usize,
    #[serde(default = "SearchSink::default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

impl SearchSink {
    /// The search client for sink `name` (no request made yet).
    pub fn client(
        &self,
        name: &str,
        engine: &EngineConfig,
    ) -> Result<viewkeeper_connectors::elasticsearch::SearchSink, viewkeeper_connectors::sink::SinkError> {
        viewkeeper_connectors::elasticsearch::SearchSink::new(
            name,
            &viewkeeper_connectors::elasticsearch::SearchSettings {
                url: self.url.expose().to_string(),
                api_key: self.api_key.as_ref().map(|k| k.expose().to_string()),
                ca_file: self.ca_file.clone(),
                max_bulk_bytes: self.max_bulk_bytes,
                retry_min: std::time::Duration::from_millis(engine.retry_min_ms),
                retry_max: std::time::Duration::from_millis(engine.retry_max_ms),
                item_retries: self.item_retries,
                request_timeout: std::time::Duration::from_millis(self.request_timeout_ms),
            },
        )
    }

    fn default_max_bulk_bytes() -> usize {
        5 * 1024 * 1024
    }
    fn default_item_retries() -> usize {
        3
    }
    fn default_request_timeout_ms() -> u64 {
        30_000
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSink {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://…` for TLS (the host name
    /// is checked against the server's certificate).
    pub url: SecretUrl,
    /// A PEM file of the CA certificates that sign the server's (with `rediss://`);
    /// without it the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Commands per pipelined round trip.
    #[serde(default = "RedisSink::default_pipeline")]
    pub pipeline: usize,
}

impl RedisSink {
    fn default_pipeline() -> usize {
        256
    }

    /// Connects the sink `name` (Redis answered, the write script is loaded).
    pub async fn connect(
        &self,
        name: &str,
        pipeline: usize,
    ) -> Result<viewkeeper_connectors::redis::RedisSink, viewkeeper_connectors::sink::SinkError> {
        viewkeeper_connectors::redis::RedisSink::connect(name, self.url.expose(), self.ca_file.as_deref(), pipeline)
            .await
    }
}

/// A config that failed to load or validate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Load {
        path: String,
        #[source]
        source: Box<figment::Error>,
    },
    #[error("config {path} is invalid:\n  - {}", .problems.join("\n  - "))]
    Invalid { path: String, problems: Vec<String> },
}

impl Config {
    /// Loads `path`, applies `VIEWKEEPER__…` environment overrides, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_from(path, Env::prefixed(ENV_PREFIX).split("__"))
    }

    fn load_from(path: &Path, env: Env) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(ConfigError::Invalid {
                path: shown.clone(),
                problems: vec![format!(
                    "no such file: {shown} (pass --config with the path of a TOML file, e.g. config/shop.toml)"
                )],
            });
        }
        let cfg: Config = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(env)
            .extract()
            .map_err(|e| ConfigError::Load {
                path: shown.clone(),
                source: Box::new(e),
            })?;
        let problems = cfg.validate();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid { path: shown, problems })
        }
    }

    /// Every problem found, each starting with its key path.
    pub fn validate(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.sources.is_empty() {
            out.push("sources: no source declared; add a [sources.NAME] table".into());
        }
        if self.projections.is_empty() {
            out.push("projections: no projection declared; add a [projections.NAME] table".into());
        }
        if self.http.enabled && self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            out.push(format!(
                "http.listen: '{}' is not an address:port, e.g. 127.0.0.1:9464",
                self.http.listen
            ));
        }
        if self.engine.max_batch_changes == 0 {
            out.push("engine.max_batch_changes: must be at least 1".into());
        }
        if self.engine.retry_min_ms == 0 || self.engine.retry_min_ms > self.engine.retry_max_ms {
            out.push("engine.retry_min_ms: must be at least 1 and at most engine.retry_max_ms".into());
        }
        let mut slots = BTreeSet::new();
        for (name, src) in &self.sources {
            check_ident(&mut out, &format!("sources.{name}"), name);
            match src {
                SourceConfig::Postgres(pg) => {
                    let p = format!("sources.{name}");
                    check_ident(&mut out, &format!("{p}.slot"), &pg.slot);
                    check_ident(&mut out, &format!("{p}.publication"), &pg.publication);
                    if let Err(e) = viewkeeper_connectors::postgres::PgConnector::parse(pg.url.expose()) {
                        out.push(format!("{p}.url: not a usable Postgres connection string ({e}); e.g. postgres://postgres@127.0.0.1:54329/catalog?sslmode=verify-full&sslrootcert=/etc/viewkeeper/ca.crt"));
                    }
                    if pg.snapshot_chunk_rows == 0 {
                        out.push(format!("{p}.snapshot_chunk_rows: must be at least 1"));
                    }
                    if !slots.insert((pg.url.expose().to_string(), pg.slot.clone())) {
                        out.push(format!("{p}.slot: slot '{}' is used by another source on the same database; each source needs its own slot", pg.slot));
                    }
                    if !self.tables.values().any(|t| &t.source == name) {
                        out.push(format!("{p}: no table reads from this source; add [tables.NAME] with source = \"{name}\" or remove the source"));
                    }
                }
                SourceConfig::Debezium(d) => {
                    let p = format!("sources.{name}");
                    if d.brokers.trim().is_empty() {
                        out.push(format!("{p}.brokers: empty; e.g. brokers = \"127.0.0.1:19092\""));
                    }
                    if d.topic_prefix.trim().is_empty() {
                        out.push(format!(
                            "{p}.topic_prefix: empty; the Debezium connector's topic.prefix, e.g. \"catalog\""
                        ));
                    }
                    if d.max_batch_records == 0 {
                        out.push(format!("{p}.max_batch_records: must be at least 1"));
                    }
                    let own = |t: &String| self.tables.get(t).is_some_and(|t| &t.source == name);
                    for t in d.topics.keys().filter(|t| !own(t)) {
                        out.push(format!("{p}.topics.{t}: no table '{t}' reads from source '{name}'"));
                    }
                    for (t, cols) in &d.column_types {
                        if !own(t) {
                            out.push(format!(
                                "{p}.column_types.{t}: no table '{t}' reads from source '{name}'"
                            ));
                        }
                        for (c, ty) in cols {
                            if let Err(e) = viewkeeper_connectors::debezium::ColumnType::from_hint(ty) {
                                out.push(format!("{p}.column_types.{t}.{c}: {e}"));
                            }
                        }
                    }
                    for k in d.properties.keys() {
                        if viewkeeper_connectors::kafka::OWN_PROPERTIES.contains(&k.as_str()) {
                            out.push(format!("{p}.properties.{k}: set by viewkeeper itself (use the source's own keys: brokers, group_id, session_timeout_ms)"));
                        }
                    }
                    if !self.tables.values().any(|t| &t.source == name) {
                        out.push(format!("{p}: no table reads from this source; add [tables.NAME] with source = \"{name}\" or remove the source"));
                    }
                }
            }
        }
        for (name, t) in &self.tables {
            if !self.sources.contains_key(&t.source) {
                out.push(format!(
                    "tables.{name}.source: unknown source '{}' (declared: {})",
                    t.source,
                    self.sources.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        for (name, sink) in &self.sinks {
            check_ident(&mut out, &format!("sinks.{name}"), name);
            match sink {
                SinkConfig::Redis(r) => {
                    if !r.url.expose().starts_with("redis://") && !r.url.expose().starts_with("rediss://") {
                        out.push(format!("sinks.{name}.url: must start with redis:// or rediss://"));
                    }
                    if r.pipeline == 0 {
                        out.push(format!("sinks.{name}.pipeline: must be at least 1"));
                    }
                    if let Some(ca) = &r.ca_file {
                        if !r.url.expose().starts_with("rediss://") {
                            out.push(format!("sinks.{name}.ca_file: only for TLS; use a rediss:// URL"));
                        }
                        if let Err(e) = viewkeeper_connectors::tls::load_roots(ca) {
                            out.push(format!("sinks.{name}.ca_file: {e}"));
                        }
                    }
                }
                SinkConfig::Elasticsearch(e) => {
                    if !e.url.expose().starts_with("http://") && !e.url.expose().starts_with("https://") {
                        out.push(format!("sinks.{name}.url: must start with http:// or https://"));
                    }
                    if let Some(ca) = &e.ca_file {
                        if !e.url.expose().starts_with("https://") {
                            out.push(format!("sinks.{name}.ca_file: only for HTTPS; use an https:// URL"));
                        }
                        if let Err(err) = viewkeeper_connectors::tls::load_roots(ca) {
                            out.push(format!("sinks.{name}.ca_file: {err}"));
                        }
                    }
                    if e.api_key.is_some() && e.url.redacted() != *e.url.expose() {
                        out.push(format!(
                            "sinks.{name}.api_key: give either an API key or a user and password in the URL, not both"
                        ));
                    }
                }
                SinkConfig::Blackhole(_) => {}
            }
        }
        for (name, p) in &self.projections {
            check_ident(&mut out, &format!("projections.{name}"), name);
            if !self.sinks.contains_key(&p.sink) {
                out.push(format!(
                    "projections.{name}.sink: unknown sink '{}' (declared: {})",
                    p.sink,
                    self.sinks.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            match self.sinks.get(&p.sink) {
                Some(SinkConfig::Redis(_)) => {
                    if p.fields.is_empty() {
                        out.push(format!("projections.{name}.fields: a cache entry needs at least one field"));
                    }
                    if p.index.is_some() {
                        out.push(format!("projections.{name}.index: only for search sinks; sink '{}' is Redis", p.sink));
                    }
                    if p.on_delete == viewkeeper_projections::spec::OnDelete::Delete {
                        out.push(format!("projections.{name}.on_delete: Redis entries of deleted rows are kept as tombstones; remove on_delete or use tombstone_ttl_s"));
                    }
                }
                Some(SinkConfig::Elasticsearch(_)) => match &p.index {
                    None => out.push(format!(
                        "projections.{name}.index: a search projection needs [projections.{name}.index] with alias (and mappings)"
                    )),
                    Some(ix) => check_ident(&mut out, &format!("projections.{name}.index.alias"), &ix.alias),
                },
                Some(SinkConfig::Blackhole(_)) | None => {}
            }
        }
        out.extend(
            spec::validate(&self.tables, &self.projections)
                .into_iter()
                .map(|e| e.to_string()),
        );
        out
    }
}

/// Postgres identifiers we create (slots, publications) and config names: lowercase
/// letters, digits and underscores, starting with a letter or underscore, ≤ 63 bytes.
fn check_ident(out: &mut Vec<String>, path: &str, s: &str) {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit();
    if !ok {
        out.push(format!(
            "{path}: '{s}' is not a valid name: use 1-63 lowercase letters, digits and underscores, not starting with a digit"
        ));
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail API
mod tests {
    use super::*;
    use figment::Jail;

    const GOOD: &str = r#"
        data_dir = "d"
        [sources.catalog]
        kind = "postgres"
        url = "postgres://postgres:hunter2@127.0.0.1:54329/catalog"
        slot = "vk_catalog"
        publication = "vk_catalog"
        [tables.products]
        source = "catalog"
        name = "public.products"
        decommissioned = { column = "status", values = ["decommissioned"] }
        [sinks.cache]
        kind = "redis"
        url = "redis://127.0.0.1:63799"
        [projections.ordering_product]
        root = "products"
        sink = "cache"
        key = "ordering:product:{id}"
        fields = ["sku", "name"]
    "#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let mut out = None;
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", text)?;
            out = Some(Config::load(Path::new("c.toml")));
            Ok(())
        });
        out.unwrap()
    }

    #[test]
    fn loads_and_env_overrides_any_key() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", GOOD)?;
            jail.set_env("VIEWKEEPER__SOURCES__CATALOG__URL", "postgres://u@db:5432/catalog");
            jail.set_env("VIEWKEEPER__ENGINE__MAX_BATCH_CHANGES", "7");
            let c = Config::load(Path::new("c.toml")).expect("valid");
            let SourceConfig::Postgres(pg) = &c.sources["catalog"] else {
                panic!("a postgres source")
            };
            assert_eq!(pg.url.expose(), "postgres://u@db:5432/catalog");
            assert_eq!(c.engine.max_batch_changes, 7);
            assert_eq!(c.data_dir, PathBuf::from("d"));
            Ok(())
        });
    }

    #[test]
    fn urls_can_come_from_secret_files() {
        Jail::expect_with(|jail| {
            jail.create_file("pg_url", "postgres://vk:s3cret@db:5432/catalog\n")?;
            let text = GOOD.replace(
                "url = \"postgres://postgres:hunter2@127.0.0.1:54329/catalog\"",
                "url = { file = \"pg_url\" }",
            );
            jail.create_file("c.toml", &text)?;
            let c = Config::load(Path::new("c.toml")).expect("valid");
            let SourceConfig::Postgres(pg) = &c.sources["catalog"] else {
                panic!("a postgres source")
            };
            assert_eq!(pg.url.expose(), "postgres://vk:s3cret@db:5432/catalog");
            assert!(!format!("{c:?}").contains("s3cret"));
            jail.create_file("c.toml", &text.replace("pg_url", "missing_file"))?;
            let err = Config::load(Path::new("c.toml")).unwrap_err().to_string();
            assert!(err.contains("cannot read the secret file missing_file"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn password_is_redacted_in_debug() {
        let c = load(GOOD).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("postgres:***@127.0.0.1"), "{dbg}");
        assert_eq!(
            SecretUrl("host=x password=s3 user=u".into()).redacted(),
            "host=x password=*** user=u"
        );
    }

    #[test]
    fn api_keys_and_kafka_secrets_are_redacted() {
        let text = DEBEZIUM.replace(
            "topics = { products",
            "properties = { \"security.protocol\" = \"SASL_SSL\", \"sasl.username\" = \"vk\", \"sasl.password\" = \"kafka-s3cret\", \"ssl.key.password\" = \"key-s3cret\" }\n        topics = { products",
        ) + r#"
        [sinks.search]
        kind = "elasticsearch"
        url = "https://es.example:9200"
        api_key = "YXBpLWtleS1zM2NyZXQ="
        "#;
        let c = load(&text).unwrap();
        let shown = format!("{c:#?}");
        for secret in ["kafka-s3cret", "key-s3cret", "YXBpLWtleS1zM2NyZXQ="] {
            assert!(!shown.contains(secret), "{secret} shown:\n{shown}");
        }
        assert!(shown.contains("SASL_SSL") && shown.contains("\"vk\""), "{shown}");
        let SourceConfig::Debezium(d) = &c.sources["catalog"] else {
            panic!("a debezium source")
        };
        assert_eq!(d.properties.exposed()["sasl.password"], "kafka-s3cret");
        let both = text.replace("https://es.example", "https://u:p@es.example");
        let err = load(&both).unwrap_err().to_string();
        assert!(err.contains("sinks.search.api_key: give either"), "{err}");
    }

    #[test]
    fn unknown_key_names_its_path() {
        let err = load(&GOOD.replace("slot = \"vk_catalog\"", "slot = \"vk_catalog\"\nslott = 1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("slott") && err.contains("sources.catalog"), "{err}");
    }

    #[test]
    fn cross_references_are_checked_with_fixes() {
        let bad = GOOD
            .replace("sink = \"cache\"", "sink = \"cahce\"")
            .replace("slot = \"vk_catalog\"", "slot = \"VK-catalog\"")
            .replace("source = \"catalog\"", "source = \"catalogue\"");
        let err = load(&bad).unwrap_err().to_string();
        for needle in [
            "projections.ordering_product.sink: unknown sink 'cahce' (declared: cache)",
            "sources.catalog.slot: 'VK-catalog' is not a valid name",
            "tables.products.source: unknown source 'catalogue'",
            "sources.catalog: no table reads from this source",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }

    const DEBEZIUM: &str = r#"
        [sources.catalog]
        kind = "debezium"
        brokers = "127.0.0.1:19092"
        topic_prefix = "catalog"
        topics = { products = "cat.products.v2" }
        column_types = { products = { price = "decimal(2)" } }
        [tables.products]
        source = "catalog"
        name = "public.products"
        [tables.tags]
        source = "catalog"
        name = "public.tags"
        [sinks.cache]
        kind = "redis"
        url = "redis://127.0.0.1:63799"
        [projections.ordering_product]
        root = "products"
        sink = "cache"
        key = "ordering:product:{id}"
        fields = ["sku", "name"]
    "#;

    #[test]
    fn debezium_sources_name_topics_and_check_hints() {
        let c = load(DEBEZIUM).unwrap();
        let SourceConfig::Debezium(d) = &c.sources["catalog"] else {
            panic!("a debezium source")
        };
        assert_eq!(d.topic_of("products", "public.products"), "cat.products.v2");
        assert_eq!(d.topic_of("tags", "public.tags"), "catalog.public.tags");
        assert_eq!(d.session_timeout_ms, 10_000);
        let bad = DEBEZIUM.replace("decimal(2)", "money").replace(
            "topics = { products",
            "properties = { \"group.id\" = \"x\" }\n        topics = { nope",
        );
        let err = load(&bad).unwrap_err().to_string();
        for needle in [
            "sources.catalog.column_types.products.price: unknown column type 'money'",
            "sources.catalog.topics.nope: no table 'nope' reads from source 'catalog'",
            "sources.catalog.properties.group.id: set by viewkeeper itself",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }

    /// config/shop-debezium.toml is config/shop.toml with other sources: the rest must
    /// not drift apart.
    #[test]
    fn shop_configs_differ_only_in_their_sources() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/");
        let pg = Config::load(Path::new(&format!("{dir}shop.toml"))).unwrap();
        let dbz = Config::load(Path::new(&format!("{dir}shop-debezium.toml"))).unwrap();
        assert_eq!(format!("{:?}", pg.tables), format!("{:?}", dbz.tables));
        assert_eq!(format!("{:?}", pg.sinks), format!("{:?}", dbz.sinks));
        assert_eq!(format!("{:?}", pg.projections), format!("{:?}", dbz.projections));
        assert_eq!(
            pg.sources.keys().collect::<Vec<_>>(),
            dbz.sources.keys().collect::<Vec<_>>()
        );
        assert!(dbz.sources.values().all(|s| matches!(s, SourceConfig::Debezium(_))));
    }

    #[test]
    fn missing_file_says_what_to_pass() {
        let err = Config::load(Path::new("/nonexistent/x.toml")).unwrap_err().to_string();
        assert!(err.contains("--config"), "{err}");
    }
}
