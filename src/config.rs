//! The config file: one TOML file, every setting overridable from the environment as
//! `VIEWKEEPER__A__B` (e.g. `VIEWKEEPER__SOURCES__CATALOG__URL`). Layering is figment's;
//! this module adds named defaults, `deny_unknown_fields`, and [`Config::validate`],
//! whose errors name the key path and say how to fix it. Secrets (passwords in URLs)
//! are redacted in `Debug` and in `check-config` output.

pub use viewkeeper_connectors::sinks::blackhole::BlackholeConfig;
pub use viewkeeper_connectors::sinks::elasticsearch::SearchConfig;
pub use viewkeeper_connectors::sinks::redis::RedisConfig;
pub use viewkeeper_connectors::sources::debezium::DebeziumConfig;
pub use viewkeeper_connectors::sources::postgres::{PostgresConfig, SnapshotMode};
pub use viewkeeper_core::secret::{KafkaProperties, Secret, SecretUrl};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
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
    /// On SIGTERM/SIGINT: how long the batches in hand may take to reach the sinks and be
    /// checkpointed before they are abandoned (they replay on the next start).
    #[serde(default = "EngineConfig::default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// Batches applied and rendered ahead of the ones being written (the pipeline's depth).
    #[serde(default = "EngineConfig::default_pipeline_batches")]
    pub pipeline_batches: usize,
    /// Requests in flight per sink.
    #[serde(default = "EngineConfig::default_sink_concurrency")]
    pub sink_concurrency: usize,
    /// Threads rendering a whole re-write (backfill, rebuild, resync); default: the
    /// machine's cores, at most 4.
    #[serde(default)]
    pub render_threads: Option<usize>,
    /// Rows the state store keeps in memory for applying and rendering (0: none).
    #[serde(default = "EngineConfig::default_row_cache_rows")]
    pub row_cache_rows: usize,
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
    fn default_row_cache_rows() -> usize {
        crate::store::DEFAULT_ROW_CACHE
    }
    fn default_pipeline_batches() -> usize {
        4
    }
    fn default_sink_concurrency() -> usize {
        4
    }

    /// Threads rendering a whole re-write.
    pub fn render_threads(&self) -> usize {
        self.render_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
            .max(1)
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_changes: Self::default_max_batch_changes(),
            row_cache_rows: Self::default_row_cache_rows(),
            queue_transactions: Self::default_queue_transactions(),
            queue_changes: Self::default_queue_changes(),
            retry_min_ms: Self::default_retry_min_ms(),
            retry_max_ms: Self::default_retry_max_ms(),
            drain_timeout_ms: Self::default_drain_timeout_ms(),
            pipeline_batches: Self::default_pipeline_batches(),
            sink_concurrency: Self::default_sink_concurrency(),
            render_threads: None,
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
    #[serde(default = "HttpConfig::default_max_lag_ms")]
    pub max_lag_ms: u64,
    /// The status page (`/`) samples lag and throughput this often…
    #[serde(default = "HttpConfig::default_sample_interval_ms")]
    pub sample_interval_ms: u64,
    /// …and keeps this much history in memory for its plots.
    #[serde(default = "HttpConfig::default_history_ms")]
    pub history_ms: u64,
}

impl HttpConfig {
    fn default_max_lag_ms() -> u64 {
        300_000
    }
    fn default_sample_interval_ms() -> u64 {
        2_000
    }
    fn default_history_ms() -> u64 {
        600_000
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
            max_lag_ms: Self::default_max_lag_ms(),
            sample_interval_ms: Self::default_sample_interval_ms(),
            history_ms: Self::default_history_ms(),
            enabled: Self::default_enabled(),
            listen: Self::default_listen(),
        }
    }
}

/// `[sources.NAME]`: the settings are each connector's own (its `config.rs`).
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    Postgres(PostgresConfig),
    /// Debezium change-event topics in Kafka (JsonConverter, with or without schemas).
    Debezium(DebeziumConfig),
}

/// `[sinks.NAME]`: the settings are each connector's own (its `config.rs`).
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SinkConfig {
    Redis(RedisConfig),
    /// Elasticsearch 8 or OpenSearch 2 (`kind = "opensearch"` is the same).
    #[serde(alias = "opensearch")]
    Elasticsearch(SearchConfig),
    /// Discards every write and counts it (`viewkeeper_blackhole_documents_total{sink}`):
    /// to measure sources, joins and rendering without a sink's cost.
    Blackhole(BlackholeConfig),
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
        if self.http.sample_interval_ms == 0 || self.http.history_ms < self.http.sample_interval_ms {
            out.push("http.sample_interval_ms: must be at least 1 and at most http.history_ms".into());
        }
        if self.engine.max_batch_changes == 0 {
            out.push("engine.max_batch_changes: must be at least 1".into());
        }
        if self.engine.pipeline_batches == 0 || self.engine.sink_concurrency == 0 {
            out.push("engine.pipeline_batches, engine.sink_concurrency: must be at least 1".into());
        }
        if self.engine.retry_min_ms == 0 || self.engine.retry_min_ms > self.engine.retry_max_ms {
            out.push("engine.retry_min_ms: must be at least 1 and at most engine.retry_max_ms".into());
        }
        let mut slots = BTreeSet::new();
        for (name, src) in &self.sources {
            check_ident(&mut out, &format!("sources.{name}"), name);
            let p = format!("sources.{name}");
            match src {
                SourceConfig::Postgres(pg) => {
                    check_ident(&mut out, &format!("{p}.slot"), &pg.slot);
                    check_ident(&mut out, &format!("{p}.publication"), &pg.publication);
                    pg.validate(&p, &mut out);
                    if !slots.insert((pg.url.expose().to_string(), pg.slot.clone())) {
                        out.push(format!("{p}.slot: slot '{}' is used by another source on the same database; each source needs its own slot", pg.slot));
                    }
                }
                SourceConfig::Debezium(d) => {
                    let own = |t: &str| self.tables.get(t).is_some_and(|t| &t.source == name);
                    d.validate(&p, name, &own, &mut out);
                }
            }
            if !self.tables.values().any(|t| &t.source == name) {
                out.push(format!("{p}: no table reads from this source; add [tables.NAME] with source = \"{name}\" or remove the source"));
            }
        }
        self.validate_assignment(&mut out);
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
            let p = format!("sinks.{name}");
            match sink {
                SinkConfig::Redis(r) => r.validate(&p, &mut out),
                SinkConfig::Elasticsearch(e) => e.validate(&p, &mut out),
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
                        out.push(format!("projections.{name}.on_delete: Redis entries of deleted rows are kept as tombstones; remove on_delete or use tombstone_ttl_ms"));
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

impl Config {
    /// The Debezium sources by `assignment`: at most one `partitioned` (its partitions
    /// split the documents of every split table), and `shared` ones only beside it.
    fn validate_assignment(&self, out: &mut Vec<String>) {
        use viewkeeper_connectors::sources::debezium::Assignment;
        let of = |a: Assignment| -> Vec<&String> {
            self.sources
                .iter()
                .filter(|(_, s)| matches!(s, SourceConfig::Debezium(d) if d.assignment == a))
                .map(|(n, _)| n)
                .collect()
        };
        let (partitioned, shared) = (of(Assignment::Partitioned), of(Assignment::Shared));
        if partitioned.len() > 1 {
            out.push(format!(
                "sources.{}.assignment: only one source may be \"partitioned\" (also: {}); the workers split documents by one source's partitions",
                partitioned[1],
                partitioned[0]
            ));
        }
        if let Some(p) = partitioned.first() {
            // Every worker runs every source: the others must be read whole by each.
            for (name, src) in &self.sources {
                match src {
                    SourceConfig::Debezium(d) if d.assignment == Assignment::Whole => out.push(format!(
                        "sources.{name}.assignment: beside the partitioned source '{p}' every other source is read by every worker: set assignment = \"shared\""
                    )),
                    SourceConfig::Postgres(_) => out.push(format!(
                        "sources.{name}: a Postgres source beside the partitioned source '{p}': every worker would stream from its one replication slot; feed its tables through Debezium with assignment = \"shared\", or run it in a worker of its own"
                    )),
                    _ => {}
                }
            }
        }
        if partitioned.is_empty() {
            for s in shared {
                out.push(format!("sources.{s}.assignment: \"shared\" goes with one \"partitioned\" source (whose partitions split the work between workers); a single worker reads it whole with the default, \"whole\""));
            }
        }
    }

    /// Several workers: the partitioned source and the tables whose documents are split
    /// (those of the partitioned and of the shared sources).
    pub fn split(&self) -> Option<(String, BTreeSet<String>)> {
        use viewkeeper_connectors::sources::debezium::Assignment;
        let assignment = |s: &str| match self.sources.get(s) {
            Some(SourceConfig::Debezium(d)) => d.assignment,
            _ => Assignment::Whole,
        };
        let source = self
            .sources
            .keys()
            .find(|s| assignment(s) == Assignment::Partitioned)?
            .clone();
        let governed = self
            .tables
            .iter()
            .filter(|(_, t)| assignment(&t.source) != Assignment::Whole)
            .map(|(n, _)| n.clone())
            .collect();
        Some((source, governed))
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
    fn several_workers_need_one_partitioned_source() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/");
        let text = std::fs::read_to_string(format!("{dir}shop-debezium.toml")).unwrap();
        let with = |pairs: &[(&str, &str)]| {
            let mut t = text.clone();
            for (svc, a) in pairs {
                let line = format!("topic_prefix = \"{svc}\"");
                t = t.replace(&line, &format!("{line}\nassignment = \"{a}\""));
            }
            load(&t)
        };
        let c = with(&[
            ("ordering", "partitioned"),
            ("catalog", "shared"),
            ("identity", "shared"),
        ])
        .unwrap();
        let (source, governed) = c.split().unwrap();
        assert_eq!(source, "ordering");
        assert_eq!(governed.len(), 4, "{governed:?}");
        let err = with(&[("ordering", "partitioned"), ("catalog", "partitioned")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("only one source may be \"partitioned\""), "{err}");
        let err = with(&[("ordering", "partitioned"), ("catalog", "shared")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sources.identity.assignment: beside the partitioned source 'ordering'"),
            "{err}"
        );
        let err = with(&[("catalog", "shared")]).unwrap_err().to_string();
        assert!(
            err.contains("sources.catalog.assignment: \"shared\" goes with one \"partitioned\""),
            "{err}"
        );
        assert!(with(&[]).unwrap().split().is_none());
    }

    #[test]
    fn missing_file_says_what_to_pass() {
        let err = Config::load(Path::new("/nonexistent/x.toml")).unwrap_err().to_string();
        assert!(err.contains("--config"), "{err}");
    }
}
