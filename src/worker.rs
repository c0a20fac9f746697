//! `viewkeeper run`: wires config → state store → sources → engine → sinks, and
//! runs until a shutdown signal or a fatal error.
//!
//! Shutdown: one [`CancellationToken`] reaches every task. Sources stop reading, the
//! engine abandons an unfinished batch before its checkpoint (it replays on the next
//! start), and the process exits 0. A fatal source error cancels everything and exits
//! non-zero with the error's fix.

use crate::config::{Config, SinkConfig, SourceConfig};
use crate::engine::{Engine, Sink};
use crate::store::shape::{fingerprint, Adoption};
use crate::store::{Catalog, Store, WorkerLock};
use anyhow::{bail, Context};
use backon::BackoffBuilder;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use viewkeeper_connectors::debezium::{ColumnType, TopicTable};
use viewkeeper_connectors::elasticsearch::SearchSink;
use viewkeeper_connectors::kafka::{KafkaSource, KafkaSourceSettings};
use viewkeeper_connectors::postgres::decode::TableBinding;
use viewkeeper_connectors::postgres::reload::Reload;
use viewkeeper_connectors::postgres::source::{PgSource, PgSourceSettings};
use viewkeeper_connectors::sink::SinkError;
use viewkeeper_connectors::source::TableProgress;
use viewkeeper_projections::model::{Key, Position};
use viewkeeper_projections::render::Projection;

/// Compiles the config's projections and the store catalog they need.
pub fn compile(cfg: &Config) -> anyhow::Result<(Vec<Projection>, Catalog)> {
    let mut projections = Vec::new();
    let mut catalog = Catalog {
        tables: cfg.tables.clone(),
        ..Default::default()
    };
    for (name, spec) in &cfg.projections {
        let p = Projection::new(name, spec, &cfg.tables).map_err(anyhow::Error::msg)?;
        for (t, cols) in p.needed_columns() {
            catalog.needed_columns.entry(t).or_default().extend(cols);
        }
        catalog.indexes.extend(p.join_indexes());
        projections.push(p);
    }
    Ok((projections, catalog))
}

/// Connects every sink (retrying until reachable). Also returns the projections whose
/// search index was just created.
#[allow(clippy::type_complexity)]
async fn connect_sinks(
    cfg: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<(BTreeMap<String, Arc<Sink>>, Vec<String>)>> {
    let mut sinks = BTreeMap::new();
    let mut created = Vec::new();
    for (name, sc) in &cfg.sinks {
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(cfg.engine.retry_min_ms))
            .with_max_delay(Duration::from_millis(cfg.engine.retry_max_ms))
            .with_jitter()
            .without_max_times()
            .build();
        let sink = loop {
            let r = match sc {
                SinkConfig::Redis(r) => r.connect(name, r.pipeline).await.map(Sink::Redis),
                SinkConfig::Elasticsearch(e) => connect_search(cfg, name, e, &mut created).await.map(Sink::Search),
                SinkConfig::Blackhole(_) => Ok(Sink::Blackhole(name.clone())),
            };
            match r {
                Ok(s) => break s,
                Err(e) => {
                    let d = backoff.next().unwrap_or(Duration::from_secs(5));
                    warn!(sink = %name, error = %e, retry_in_ms = d.as_millis() as u64, "sink unreachable; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(d) => {}
                    }
                }
            }
        };
        sinks.insert(name.clone(), Arc::new(sink));
    }
    Ok(Some((sinks, created)))
}

/// Builds the search client and makes sure every projection's index and alias exist.
async fn connect_search(
    cfg: &Config,
    name: &str,
    e: &crate::config::SearchSink,
    created_indexes: &mut Vec<String>,
) -> Result<SearchSink, SinkError> {
    let sink = e.client(name, &cfg.engine)?;
    for (pname, p) in &cfg.projections {
        if p.sink == name {
            if let Some(ix) = &p.index {
                let (index, created) = sink.ensure_index(ix).await?;
                info!(projection = %pname, alias = %ix.alias, %index, created, "search index ready");
                if created {
                    created_indexes.push(pname.clone());
                }
            }
        }
    }
    Ok(sink)
}

/// What the worker is started for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `viewkeeper run`: snapshot new slots, then stream until shutdown.
    Run,
    /// `viewkeeper backfill`: take (or resume) the initial snapshot of every source that
    /// has none yet, render every document once, checkpoint, exit. `run` then streams on
    /// from exactly the snapshot's position.
    Backfill,
    /// `viewkeeper backfill --projection P [--rebuild]`: see [`rebuild`].
    Rebuild { projection: String, new_index: bool },
}

/// Runs the worker until `shutdown` fires or a fatal error occurs (or, for
/// [`Mode::Backfill`], until the backfill is done).
pub async fn run(cfg: Config, data_dir: &Path, mode: Mode, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (projections, catalog) = compile(&cfg)?;
    // One worker per data dir; only the worker changes the store's shape.
    let _lock = WorkerLock::acquire(data_dir)?;
    let mut store =
        Store::open(data_dir, catalog).with_context(|| format!("opening the state store in {}", data_dir.display()))?;
    info!(data_dir = %data_dir.display(), projections = projections.len(), "state store open");
    adopt_config(&cfg, &mut store, &projections)?;
    let Some((sinks, created)) = connect_sinks(&cfg, &shutdown).await? else {
        return Ok(());
    };
    // A new index over a state store that already holds rows (the search server lost
    // its data while the worker was away): fill it before streaming on.
    let counts = store.row_counts()?;
    for p in &projections {
        if created.contains(&p.name) && counts.get(p.root_table()).is_some_and(|n| *n > 0) {
            store.mark_resync(&p.name, "its index was created over a non-empty state store")?;
        }
    }
    check_sinks_kept(&mut store, &projections, &sinks)?;
    // Readiness flags, and the HTTP listener for a long-running worker.
    // Every sink answered just now (connect_sinks waits for that): an idle worker is ready
    // before its first write.
    let mut health = crate::http::Health {
        max_lag_seconds: cfg.http.max_lag_seconds,
        sinks_ok: true.into(),
        ..Default::default()
    };
    for name in cfg.sources.keys() {
        health.sources.insert(name.clone(), Default::default());
    }
    let health = Arc::new(health);
    if mode == Mode::Run && cfg.http.enabled {
        let handle = crate::http::install_metrics()?;
        let (addr, _task) = crate::http::serve(&cfg.http.listen, health.clone(), handle, shutdown.clone()).await?;
        info!(%addr, "http listening (/metrics, /healthz, /readyz)");
    }
    let (tx, rx, permits) = bounded_queue(&cfg.engine);
    let mut acks = BTreeMap::new();
    let mut sources = tokio::task::JoinSet::new();
    for (name, sc) in &cfg.sources {
        let checkpoint = store.checkpoint(name)?;
        let (ack_tx, ack_rx) = watch::channel(checkpoint.unwrap_or(Position::ZERO));
        acks.insert(name.clone(), ack_tx);
        match sc {
            SourceConfig::Debezium(_) if mode == Mode::Backfill => {
                // The connector's own snapshot (op `r`) is the initial load of a topic.
                info!(source = %name, "Debezium source: nothing to backfill (the connector's snapshot is in its topics; `run` reads them)");
            }
            SourceConfig::Debezium(d) => {
                let mut topics = HashMap::new();
                for (alias, t) in cfg.tables.iter().filter(|(_, t)| &t.source == name) {
                    let mut table = TopicTable::new(alias.clone(), t.primary_key.clone());
                    for (col, hint) in d.column_types.get(alias).into_iter().flatten() {
                        table = table
                            .with_column_type(col.clone(), ColumnType::from_hint(hint).map_err(anyhow::Error::msg)?);
                    }
                    topics.insert(d.topic_of(alias, &t.name), table);
                }
                let src = KafkaSource::new(KafkaSourceSettings {
                    name: name.clone(),
                    brokers: d.brokers.clone(),
                    group_id: d.group_id.clone().unwrap_or_else(|| format!("viewkeeper-{name}")),
                    topics,
                    properties: d.properties.exposed(),
                    session_timeout_ms: d.session_timeout_ms,
                    max_batch_records: d.max_batch_records,
                    revoke_timeout: Duration::from_millis(d.revoke_timeout_ms),
                    streaming: health.sources[name].clone(),
                });
                let (tx, sd) = (tx.clone(), shutdown.clone());
                sources.spawn(async move { src.run(checkpoint, tx, ack_rx, sd).await });
            }
            SourceConfig::Postgres(pg) => {
                let tables: HashMap<String, TableBinding> = cfg
                    .tables
                    .iter()
                    .filter(|(_, t)| &t.source == name)
                    .map(|(alias, t)| {
                        (
                            t.name.clone(),
                            TableBinding {
                                alias: alias.clone(),
                                primary_key: t.primary_key.clone(),
                            },
                        )
                    })
                    .collect();
                let src = PgSource::new(PgSourceSettings {
                    name: name.clone(),
                    url: pg.url.expose().to_string(),
                    slot: pg.slot.clone(),
                    publication: pg.publication.clone(),
                    tables,
                    status_interval: Duration::from_millis(pg.status_interval_ms),
                    retry_min: Duration::from_millis(cfg.engine.retry_min_ms),
                    retry_max: Duration::from_millis(cfg.engine.retry_max_ms),
                    initial_snapshot: pg.snapshot == crate::config::SnapshotMode::Initial || mode == Mode::Backfill,
                    snapshot_progress: store.snapshot_progress(name)?,
                    stop_after_snapshot: mode == Mode::Backfill,
                    snapshot_chunk_rows: pg.snapshot_chunk_rows,
                    streaming: health.sources[name].clone(),
                    max_retained_wal_bytes: pg.max_retained_wal_bytes,
                    heartbeat_interval: (pg.heartbeat_interval_ms > 0)
                        .then(|| Duration::from_millis(pg.heartbeat_interval_ms)),
                });
                let (tx, sd) = (tx.clone(), shutdown.clone());
                sources.spawn(async move { src.run(checkpoint, tx, ack_rx, sd).await });
            }
        }
    }
    if mode == Mode::Run {
        spawn_reloads(&cfg, &store, &health, &tx, &shutdown, &mut sources)?;
    }
    drop(tx);
    let engine = Engine {
        acks,
        defer_snapshot_render: mode == Mode::Backfill,
        health: Some(health),
        queue_permits: Some(permits),
        ..Engine::new(store, projections, sinks, &cfg.engine)
    };
    let started = std::time::Instant::now();
    let drain = Duration::from_millis(cfg.engine.drain_timeout_ms);
    let mut engine_task = tokio::spawn(engine.run(rx, shutdown.clone(), drain));
    let mut fatal = None;
    let stats = loop {
        tokio::select! {
            r = &mut engine_task => {
                shutdown.cancel();
                break r.context("engine task panicked")??;
            }
            Some(r) = sources.join_next() => {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        error!(error = %e, "fatal source error; stopping");
                        fatal.get_or_insert(e.to_string());
                        shutdown.cancel();
                    }
                    Err(e) => {
                        fatal.get_or_insert(format!("source task panicked: {e}"));
                        shutdown.cancel();
                    }
                }
            }
        }
    };
    while sources.join_next().await.is_some() {}
    if let Some(e) = fatal {
        bail!(e);
    }
    if mode == Mode::Backfill {
        let (_, catalog) = compile(&cfg)?;
        let rows = Store::open_read_only(data_dir, catalog)?.row_counts()?;
        info!(
            ?rows,
            changes = stats.changes,
            documents = stats.documents,
            dead_letters = stats.dead_letters,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "backfill finished"
        );
    }
    Ok(())
}

/// Makes the store fit the config it is about to run with (the worker holds the lock):
/// tables whose needed columns grew are re-read from their sources (Postgres, while
/// streaming; an initial snapshot in progress reads them again), and projections whose
/// config changed, or that are new over rows already stored, are re-written whole; all
/// recorded in one transaction, so a crash at any point resumes the same work.
fn adopt_config(cfg: &Config, store: &mut Store, projections: &[Projection]) -> anyhow::Result<()> {
    let fresh = store.row_counts()?.is_empty();
    let growth = store.shape_growth()?;
    let mut a = Adoption::default();
    for (table, cols) in &growth {
        let t = &cfg.tables[table];
        let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
        match &cfg.sources[&t.source] {
            SourceConfig::Postgres(pg) => {
                if store.checkpoint(&t.source)?.is_some() {
                    if pg.snapshot == crate::config::SnapshotMode::Never {
                        warn!(%table, columns = ?cols, source = %t.source,
                            "the state store does not keep these columns for rows stored before, and snapshot = \"never\" forbids reading them: they render as null until each row changes");
                    } else {
                        info!(%table, columns = ?cols, source = %t.source,
                            "the config needs columns the state store does not keep: re-reading the table from its source while streaming");
                        a.reloads.push((t.source.clone(), t.name.clone()));
                    }
                } else if store.snapshot_progress(&t.source)?.contains_key(&t.name) {
                    info!(%table, columns = ?cols, source = %t.source,
                        "the config needs columns the interrupted initial snapshot did not keep: reading the table again from its start");
                    a.restart_snapshots.push((t.source.clone(), t.name.clone()));
                }
            }
            SourceConfig::Debezium(_) => warn!(%table, columns = ?cols, source = %t.source,
                "the state store does not keep these columns for rows stored before, and a Debezium topic cannot be re-read here: they render as null until each row changes, or until the connector snapshots the table again (an incremental snapshot through its signal table)"),
        }
    }
    for p in projections {
        let fp = fingerprint(&p.spec);
        match store.fingerprint_of(&p.name)? {
            Some(old) if old != fp => a.resyncs.push((p.name.clone(), "its config changed".into())),
            None if !fresh => a
                .resyncs
                .push((p.name.clone(), "it is new, over rows already stored".into())),
            _ => {}
        }
        a.fingerprints.insert(p.name.clone(), fp);
    }
    for (name, why) in &a.resyncs {
        info!(projection = %name, reason = %why, "every document will be re-written");
    }
    store.adopt_shape(&a)?;
    Ok(())
}

/// Whether each Redis sink still holds what was written to it: a server other than the
/// one of the last run (its `run_id`), or none of a few stored rows' entries there (the
/// keyspace emptied), marks the sink's projections for a re-write.
fn check_sinks_kept(
    store: &mut Store,
    projections: &[Projection],
    sinks: &BTreeMap<String, Arc<Sink>>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Handle::current();
    for (name, sink) in sinks {
        let Sink::Redis(r) = &**sink else { continue };
        let mine: Vec<&Projection> = projections.iter().filter(|p| &p.spec.sink == name).collect();
        let mut why = None;
        if let (Some(before), Some(now)) = (store.sink_identity(name)?, r.identity()) {
            if before != now {
                why = Some(format!(
                    "the Redis server changed since the last run (run_id {before} -> {now}): it may have lost entries"
                ));
            }
        }
        for p in &mine {
            if why.is_some() {
                break;
            }
            let sample = crate::verify::sample_ids(store, p, 8)?;
            if sample.is_empty() {
                continue;
            }
            match tokio::task::block_in_place(|| rt.block_on(r.exists(&sample))) {
                Ok(0) => {
                    why = Some(format!(
                        "none of {} stored entries of projection {} is in Redis: the keyspace was emptied",
                        sample.len(),
                        p.name
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(sink = %name, error = %e, "cannot check that Redis still holds the entries (EXISTS not permitted?)")
                }
            }
        }
        match why {
            Some(why) => {
                warn!(sink = %name, reason = %why, "re-writing every entry of the sink's projections");
                for p in mine {
                    store.mark_resync(&p.name, &why)?;
                }
            }
            None => {
                if let Some(id) = r.identity() {
                    if !mine
                        .iter()
                        .any(|p| store.resyncs().is_ok_and(|m| m.contains_key(&p.name)))
                    {
                        store.set_sink_identity(name, &id)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Starts the re-reads the store has pending, one task per Postgres source (it waits until
/// the source streams, so the table is in the publication before it is read).
fn spawn_reloads(
    cfg: &Config,
    store: &Store,
    health: &crate::http::Health,
    tx: &mpsc::Sender<viewkeeper_connectors::source::SourceBatch>,
    shutdown: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<Result<(), viewkeeper_connectors::source::SourceError>>,
) -> anyhow::Result<()> {
    for (name, sc) in &cfg.sources {
        let SourceConfig::Postgres(pg) = sc else { continue };
        let progress = store.reload_progress(name)?;
        let tables: Vec<(String, TableBinding, TableProgress)> = cfg
            .tables
            .iter()
            .filter(|(_, t)| &t.source == name)
            .filter_map(|(alias, t)| {
                let p = progress.get(&t.name).filter(|p| !p.done)?;
                Some((
                    t.name.clone(),
                    TableBinding {
                        alias: alias.clone(),
                        primary_key: t.primary_key.clone(),
                    },
                    p.clone(),
                ))
            })
            .collect();
        if tables.is_empty() {
            continue;
        }
        let r = Reload {
            source: name.clone(),
            url: pg.url.expose().to_string(),
            tables,
            chunk_rows: pg.snapshot_chunk_rows,
            retry_min: Duration::from_millis(cfg.engine.retry_min_ms),
            retry_max: Duration::from_millis(cfg.engine.retry_max_ms),
            streaming: health.sources[name].clone(),
        };
        let (tx, sd) = (tx.clone(), shutdown.clone());
        tasks.spawn(async move { r.run(tx, sd).await });
    }
    Ok(())
}

/// An engine for one-off work beside (or without) a running worker: the state store
/// opened for writing (SQLite serializes the processes), sinks connected, no sources.
async fn standalone_engine(
    cfg: &Config,
    data_dir: &Path,
    projections: Vec<Projection>,
    catalog: Catalog,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Engine>> {
    let store = Store::open_beside(data_dir, catalog)
        .with_context(|| format!("opening the state store in {}", data_dir.display()))?;
    let Some((sinks, _)) = connect_sinks(cfg, shutdown).await? else {
        return Ok(None);
    };
    Ok(Some(Engine::new(store, projections, sinks, &cfg.engine)))
}

/// The queue between the sources and the engine: at most `queue_transactions` batches
/// holding at most `queue_changes` changes (a gate task takes permits per change before a
/// batch enters; the engine hands them back once the batch is durable). A source blocks
/// while the queue is full, so the worker's memory is bounded by config, not by how far
/// behind the engine is.
fn bounded_queue(
    e: &crate::config::EngineConfig,
) -> (
    mpsc::Sender<viewkeeper_connectors::source::SourceBatch>,
    mpsc::Receiver<viewkeeper_connectors::source::SourceBatch>,
    crate::engine::QueuePermits,
) {
    let (tx, mut from_sources) = mpsc::channel::<viewkeeper_connectors::source::SourceBatch>(1);
    let (to_engine, rx) = mpsc::channel(e.queue_transactions.max(1));
    let permits = crate::engine::QueuePermits::new(e.queue_changes);
    let gate = permits.clone();
    tokio::spawn(async move {
        while let Some(b) = from_sources.recv().await {
            if !gate.take(&b).await || to_engine.send(b).await.is_err() {
                return;
            }
        }
    });
    (tx, rx, permits)
}

/// `viewkeeper dlq replay`: sends dead letters through the pipeline again; a letter
/// that goes through is removed, one that still fails stays (its reason printed).
/// * `render:P`, `sink:S:P`: the root's document of P is rendered and written again
///   (after a config or mapping fix).
/// * `apply`: every document reading the row is rendered again (its stored image may
///   have been completed since).
/// * `decode` of a Debezium record: the record (kept as the payload) is decoded again
///   and goes through apply, render and write like any batch.
/// * `decode` of a Postgres message: cannot be replayed (the message needs its
///   replication context); it stays, with that reason.
pub async fn dlq_replay(
    cfg: Config,
    data_dir: &Path,
    ids: Option<Vec<i64>>,
    shutdown: CancellationToken,
) -> anyhow::Result<(usize, usize)> {
    let (projections, catalog) = compile(&cfg)?;
    let Some(mut engine) = standalone_engine(&cfg, data_dir, projections, catalog, &shutdown).await? else {
        return Ok((0, 0));
    };
    let letters: Vec<crate::store::DeadLetter> = engine
        .store
        .dead_letters(usize::MAX >> 1)?
        .into_iter()
        .filter(|d| ids.as_ref().is_none_or(|ids| ids.contains(&d.id)))
        .collect();
    if let Some(ids) = &ids {
        if let Some(id) = ids.iter().find(|id| !letters.iter().any(|d| d.id == **id)) {
            bail!("no dead letter #{id}");
        }
    }
    let (mut done, mut failed) = (Vec::new(), 0usize);
    for d in letters {
        let names: Vec<String> = engine.projections.iter().map(|p| p.name.clone()).collect();
        let pi_named = |name: &str| names.iter().position(|p| p == name);
        let outcome: anyhow::Result<Option<Vec<crate::store::DeadLetter>>> = async {
            let key = Key::from_canonical(d.key.clone());
            if let Some(p) = d.stage.strip_prefix("render:") {
                let pi = pi_named(p).with_context(|| format!("projection '{p}' is no longer in the config"))?;
                return Ok(engine.rewrite(pi, &[key], &shutdown).await?);
            }
            if let Some(rest) = d.stage.strip_prefix("sink:") {
                let p = rest.split_once(':').map(|(_, p)| p).unwrap_or_default();
                let pi = pi_named(p).with_context(|| format!("projection '{p}' is no longer in the config"))?;
                return Ok(engine.rewrite(pi, &[key], &shutdown).await?);
            }
            if d.stage == "apply" {
                let mut letters = Vec::new();
                for pi in 0..engine.projections.len() {
                    let roots = engine.roots_of(pi, &d.table, &key)?;
                    match engine.rewrite(pi, &roots, &shutdown).await? {
                        Some(l) => letters.extend(l),
                        None => return Ok(None),
                    }
                }
                return Ok(Some(letters));
            }
            if d.stage == "decode" {
                let Some(SourceConfig::Debezium(dz)) = cfg.sources.get(&d.source) else {
                    bail!("a Postgres message cannot be replayed without its replication context; fix the row in the source (an UPDATE re-sends it) and drop this letter");
                };
                let topic = d.position.rsplit_once('[').map(|(t, _)| t.to_string()).unwrap_or_default();
                let (alias, t) = cfg
                    .tables
                    .iter()
                    .find(|(a, t)| t.source == d.source && dz.topic_of(a, &t.name) == topic)
                    .with_context(|| format!("no table reads topic '{topic}'"))?;
                let mut table = TopicTable::new(alias.clone(), t.primary_key.clone());
                for (col, hint) in dz.column_types.get(alias).into_iter().flatten() {
                    table = table.with_column_type(col.clone(), ColumnType::from_hint(hint).map_err(anyhow::Error::msg)?);
                }
                let key_bytes = (!d.key.is_empty()).then_some(d.key.as_bytes());
                let decoded = viewkeeper_connectors::debezium::decode(&topic, key_bytes, Some(d.payload.as_bytes()), &table)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let changes = match decoded {
                    viewkeeper_connectors::debezium::Decoded::Change(c) => vec![c],
                    viewkeeper_connectors::debezium::Decoded::Skip(_) => vec![],
                };
                let batch = viewkeeper_connectors::source::SourceBatch {
                    source: d.source.clone(),
                    changes,
                    ..Default::default()
                };
                return Ok(engine.process(vec![batch], &shutdown).await?.then(Vec::new));
            }
            bail!("stage '{}' cannot be replayed", d.stage)
        }
        .await;
        match outcome {
            Ok(None) => break, // shutdown
            Ok(Some(still)) if still.is_empty() => {
                info!(id = d.id, stage = %d.stage, key = %d.key, "replayed");
                done.push(d.id);
            }
            Ok(Some(still)) => {
                failed += 1;
                warn!(id = d.id, stage = %d.stage, key = %d.key, reason = %still[0].reason, "still fails; kept");
            }
            Err(e) => {
                failed += 1;
                warn!(id = d.id, stage = %d.stage, key = %d.key, error = %e, "cannot replay; kept");
            }
        }
    }
    engine.store.delete_dead_letters(&done)?;
    Ok((done.len(), failed))
}

/// `viewkeeper backfill --projection P [--rebuild]`: with `rebuild`, renders P from the
/// state store into a new versioned index (`{alias}_v{N+1}`, or the configured version
/// when higher) while a running worker keeps writing the live one and, through the
/// registration in the state store, the new one too; then refreshes it and swaps the
/// alias in one `_aliases` call. Without `rebuild`, re-writes every document of P
/// through its alias. Works beside a running `viewkeeper run` on the same data dir
/// (SQLite serializes the two processes' writes).
pub async fn rebuild(
    cfg: Config,
    data_dir: &Path,
    projection: &str,
    new_index: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (projections, catalog) = compile(&cfg)?;
    let Some(pi) = projections.iter().position(|p| p.name == projection) else {
        bail!(
            "unknown projection '{projection}' (declared: {})",
            projections
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let Some(mut engine) = standalone_engine(&cfg, data_dir, projections, catalog, &shutdown).await? else {
        return Ok(());
    };
    let started = std::time::Instant::now();
    if !new_index {
        engine.render_all(pi, None, &shutdown).await?;
        info!(
            projection,
            documents = engine.stats.documents,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "re-written"
        );
        return Ok(());
    }
    let p = engine.projections[pi].clone();
    let (Some(ix), Sink::Search(search)) = (&p.spec.index, &*engine.sinks[&p.spec.sink].clone()) else {
        bail!("projection '{projection}' does not write to a search index: only search projections can be rebuilt into a new index");
    };
    let search: &SearchSink = search;
    let old = search.alias_target(&ix.alias).await?;
    let current = old
        .as_deref()
        .and_then(|o| o.rsplit_once("_v"))
        .and_then(|(_, v)| v.parse::<u32>().ok())
        .unwrap_or(0);
    let new = format!("{}_v{}", ix.alias, (current + 1).max(ix.version));
    let registered = engine.store.rebuild_target(projection)?;
    if registered.as_deref() == Some(new.as_str()) {
        info!(projection, index = %new, "resuming an interrupted rebuild into its index");
    } else {
        search.create_index(&new, ix).await?;
        engine.store.set_rebuild_target(projection, Some(&new))?;
    }
    info!(projection, alias = %ix.alias, from = old.as_deref().unwrap_or("-"), to = %new, "rebuilding");
    if !engine.render_all(pi, Some(&new), &shutdown).await? {
        return Ok(()); // interrupted: the registration stays, a rerun resumes
    }
    search.refresh(&new).await?;
    let (before, after) = (search.count(&ix.alias).await.unwrap_or(0), search.count(&new).await?);
    search.swap_alias(&ix.alias, old.as_deref(), &new).await?;
    engine.store.set_rebuild_target(projection, None)?;
    if let (Some(old), false) = (old.as_deref(), ix.keep_old_index) {
        search.delete_index(old).await?;
    }
    info!(
        projection,
        alias = %ix.alias,
        index = %new,
        documents_before = before,
        documents_after = after,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "alias swapped"
    );
    Ok(())
}
