//! The subcommands, one file each, and the wiring they share: compiling the config's
//! projections, connecting the sinks, an engine for one-off work.
//!
//! * [`run`]: the worker (`run`, and `backfill`'s initial load).
//! * [`backfill`]: `backfill` (initial load, then exit) with its progress bar.
//! * [`rebuild`]: `backfill --projection P [--rebuild]`.
//! * [`dlq`]: `dlq list|show|replay|drop`.
//! * [`verify`]: `verify [--repair]`.
//! * [`status`]: `status`, `slot list|drop`.
//! * [`wait`]: `wait` (read-your-writes against a running worker).

pub mod backfill;
pub mod dlq;
pub mod progress;
pub mod rebuild;
pub mod run;
pub mod status;
pub mod verify;
pub mod wait;

use crate::config::{Config, SinkConfig};
use crate::engine::Engine;
use crate::store::{Catalog, Store};
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use viewkeeper_connectors::sinks::blackhole::BlackholeSink;
use viewkeeper_connectors::sinks::elasticsearch::SearchSink;
use viewkeeper_connectors::sinks::redis::RedisSink;
use viewkeeper_core::sink::{Sink, SinkError};
use viewkeeper_projections::render::Projection;

/// Compiles the config's projections and the store catalog they need.
pub fn compile(cfg: &Config) -> anyhow::Result<(Vec<Projection>, Catalog)> {
    let mut projections = Vec::new();
    let mut catalog = Catalog {
        tables: cfg.tables.clone(),
        ..Default::default()
    };
    for (name, spec) in &cfg.projections {
        let p = Projection::new(name, spec, &cfg.tables)?;
        for (t, cols) in p.needed_columns() {
            catalog.needed_columns.entry(t).or_default().extend(cols);
        }
        catalog.indexes.extend(p.join_indexes());
        projections.push(p);
    }
    Ok((projections, catalog))
}

/// A connected sink, with the concrete client the commands need beside the engine's
/// [`Sink`] (verify reads back, a rebuild swaps aliases).
#[derive(Clone)]
pub enum Client {
    Redis(RedisSink),
    Search(SearchSink),
    Blackhole(Arc<BlackholeSink>),
}

impl Client {
    /// Connects sink `name` once (Redis answers; a search client makes no request yet).
    pub async fn connect(cfg: &Config, name: &str, sc: &SinkConfig) -> Result<Client, SinkError> {
        Ok(match sc {
            SinkConfig::Redis(r) => Client::Redis(RedisSink::connect(name, r).await?),
            SinkConfig::Elasticsearch(e) => Client::Search(search_client(cfg, name, e)?),
            SinkConfig::Blackhole(_) => Client::Blackhole(Arc::new(BlackholeSink::new(name))),
        })
    }

    pub fn sink(&self) -> Arc<dyn Sink> {
        match self {
            Client::Redis(r) => Arc::new(r.clone()),
            Client::Search(s) => Arc::new(s.clone()),
            Client::Blackhole(b) => b.clone(),
        }
    }
}

/// The search client of sink `name`.
pub fn search_client(
    cfg: &Config,
    name: &str,
    e: &viewkeeper_connectors::sinks::elasticsearch::SearchConfig,
) -> Result<SearchSink, SinkError> {
    SearchSink::new(
        name,
        e,
        Duration::from_millis(cfg.engine.retry_min_ms),
        Duration::from_millis(cfg.engine.retry_max_ms),
    )
}

/// Connects every sink, retrying each until it answers; `None`: shutdown came first.
pub async fn connect_sinks(cfg: &Config, shutdown: &CancellationToken) -> Option<BTreeMap<String, Client>> {
    let mut clients = BTreeMap::new();
    for (name, sc) in &cfg.sinks {
        let mut backoff = viewkeeper_core::retry::backoff(
            Duration::from_millis(cfg.engine.retry_min_ms),
            Duration::from_millis(cfg.engine.retry_max_ms),
        );
        let client = loop {
            match Client::connect(cfg, name, sc).await {
                Ok(c) => break c,
                Err(e) => {
                    let d = backoff.delay();
                    warn!(sink = %name, error = %e, retry_in_ms = d.as_millis() as u64, "sink unreachable; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(d) => {}
                    }
                }
            }
        };
        clients.insert(name.clone(), client);
    }
    Some(clients)
}

/// The engine's view of the clients.
pub fn sinks_of(clients: &BTreeMap<String, Client>) -> BTreeMap<String, Arc<dyn Sink>> {
    clients.iter().map(|(n, c)| (n.clone(), c.sink())).collect()
}

/// An engine for one-off work beside (or without) a running worker: the state store
/// opened for writing beside its owner (SQLite serializes the processes; a config that
/// needs more than the store keeps is refused), sinks connected, no sources.
pub async fn standalone_engine(
    cfg: &Config,
    data_dir: &Path,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<(Engine, BTreeMap<String, Client>)>> {
    let (projections, catalog) = compile(cfg)?;
    let store = Store::open_beside(data_dir, catalog)
        .with_context(|| format!("opening the state store in {}", data_dir.display()))?;
    let Some(clients) = connect_sinks(cfg, shutdown).await else {
        return Ok(None);
    };
    let ownership = store.ownership()?;
    let mut engine = Engine::new(store, projections, sinks_of(&clients), &cfg.engine);
    if let (Some((source, governed)), Some(rec)) = (cfg.split(), ownership) {
        // Beside a worker of a split source: only the documents it owns.
        engine.split = Some(crate::engine::split::Split::owning(source, governed, &rec));
    }
    Ok(Some((engine, clients)))
}

/// The state store read-only (status, dlq), beside a running worker or not.
pub fn open_read_only(cfg: &Config, data_dir: &Path) -> anyhow::Result<Store> {
    let catalog = Catalog {
        tables: cfg.tables.clone(),
        ..Default::default()
    };
    Store::open_read_only(data_dir, catalog).with_context(|| {
        format!(
            "no state store in {} (has `viewkeeper run` ever run there?)",
            data_dir.display()
        )
    })
}

/// Waits for SIGTERM or SIGINT.
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
