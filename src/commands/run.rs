//! `viewkeeper run` (and the initial load of `backfill`): wires config → state store →
//! sources → engine → sinks, and runs until a shutdown signal or an error that stops it.
//!
//! Before anything streams: the data dir's lock is taken (one worker per data dir), the
//! store adopts the config (re-reads and re-writes it needs, [`adopt_config`]), the sinks
//! are connected and checked for lost data ([`check_sinks_kept`]), and every search
//! projection's index is made ready.
//!
//! Shutdown: one [`CancellationToken`] reaches every task. Sources stop reading, the
//! engine abandons the batches in hand after the drain bound, before their checkpoints
//! (they replay on the next start), and the process exits 0. An error whose policy is to
//! stop cancels everything and exits non-zero with the error's fix.

use super::{compile, connect_sinks, sinks_of};
use crate::config::{Config, SnapshotMode, SourceConfig};
use crate::engine::{queue, Engine};
use crate::store::shape::{fingerprint, Adoption};
use crate::store::{Store, WorkerLock};
use anyhow::{bail, Context};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use viewkeeper_connectors::sources::debezium::{DebeziumSource, FedTable, Scaling};
use viewkeeper_connectors::sources::postgres::decode::TableBinding;
use viewkeeper_connectors::sources::postgres::reload::Reload;
use viewkeeper_connectors::sources::postgres::{PgRun, PgSource};
use viewkeeper_core::sink::Sink;
use viewkeeper_core::source::{Source, SourceBatch, SourceError, SourceRun, TableProgress};
use viewkeeper_core::Checkpoint;
use viewkeeper_projections::render::Projection;

/// What the worker is started for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `viewkeeper run`: snapshot new slots, then stream until shutdown.
    Run,
    /// `viewkeeper backfill`: take (or resume) the initial snapshot of every source that
    /// has none yet, render every document once, checkpoint, exit. `run` then streams on
    /// from exactly the snapshot's position.
    Backfill,
}

/// The tables of source `name` as pgoutput names them (`schema.table` → binding).
fn bindings(cfg: &Config, name: &str) -> HashMap<String, TableBinding> {
    cfg.tables
        .iter()
        .filter(|(_, t)| t.source == name)
        .map(|(alias, t)| {
            (
                t.name.clone(),
                TableBinding {
                    alias: alias.clone(),
                    primary_key: t.primary_key.clone(),
                },
            )
        })
        .collect()
}

/// The tables of source `name` as a Debezium source feeds them.
pub fn fed_tables(cfg: &Config, name: &str) -> Vec<FedTable> {
    cfg.tables
        .iter()
        .filter(|(_, t)| t.source == name)
        .map(|(alias, t)| FedTable {
            alias: alias.clone(),
            name: t.name.clone(),
            primary_key: t.primary_key.clone(),
        })
        .collect()
}

/// The configured source `name`, ready to run (`None`: nothing to do in this mode).
fn source_of(
    cfg: &Config,
    name: &str,
    sc: &SourceConfig,
    store: &Store,
    mode: Mode,
    streaming: Arc<std::sync::atomic::AtomicBool>,
    scale: &Scaling,
) -> anyhow::Result<Option<Box<dyn Source>>> {
    Ok(match sc {
        SourceConfig::Debezium(_) if mode == Mode::Backfill => {
            // The connector's own snapshot (op `r`) is the initial load of a topic.
            info!(source = %name, "Debezium source: nothing to backfill (the connector's snapshot is in its topics; `run` reads them)");
            None
        }
        SourceConfig::Debezium(d) => Some(Box::new(DebeziumSource::new(
            name,
            d.clone(),
            &fed_tables(cfg, name),
            streaming,
            scale.clone(),
        )?)),
        SourceConfig::Postgres(pg) => Some(Box::new(PgSource::new(
            name,
            pg.clone(),
            PgRun {
                tables: bindings(cfg, name),
                retry_min: Duration::from_millis(cfg.engine.retry_min_ms),
                retry_max: Duration::from_millis(cfg.engine.retry_max_ms),
                initial_snapshot: pg.snapshot == SnapshotMode::Initial || mode == Mode::Backfill,
                snapshot_progress: store.snapshot_progress(name)?,
                stop_after_snapshot: mode == Mode::Backfill,
                streaming,
            },
        ))),
    })
}

/// Runs the worker until `shutdown` fires or an error stops it (or, for
/// [`Mode::Backfill`], until the backfill is done). Returns the engine's counters.
pub async fn run(
    cfg: &Config,
    data_dir: &Path,
    mode: Mode,
    shutdown: CancellationToken,
    progress: Option<Arc<dyn crate::engine::Progress>>,
) -> anyhow::Result<crate::engine::Stats> {
    let (projections, catalog) = compile(cfg)?;
    // One worker per data dir; only the worker changes the store's shape.
    let _lock = WorkerLock::acquire(data_dir)?;
    let mut store =
        Store::open(data_dir, catalog).with_context(|| format!("opening the state store in {}", data_dir.display()))?;
    info!(data_dir = %data_dir.display(), projections = projections.len(), "state store open");
    adopt_config(cfg, &mut store, &projections)?;
    let Some(clients) = connect_sinks(cfg, &shutdown).await else {
        return Ok(Default::default());
    };
    let sinks = sinks_of(&clients);
    // What Kafka sources shared with other workers need of this store.
    let scale = Scaling {
        worker_id: store.worker_id()?,
        offsets: store.stream_offsets()?,
        gate: Default::default(),
    };
    let mut engine = Engine::new(store, projections, sinks.clone(), &cfg.engine);
    if let Some((source, governed)) = cfg.split().filter(|_| mode == Mode::Run) {
        info!(worker = %scale.worker_id, source = %source, tables = ?governed, "several workers: documents split by the partitions of source {source}");
        engine.split = Some(crate::engine::split::Split::new(source, governed));
    }
    // Every search projection's index (and alias) exists; one created over a state store
    // that already holds rows (the search server lost its data while the worker was away)
    // is filled before streaming on.
    if !engine.prepare_targets(&shutdown).await? {
        return Ok(Default::default());
    }
    check_sinks_kept(&mut engine.store, &engine.projections, &sinks)?;
    // Readiness flags, and the HTTP listener for a long-running worker. Every sink
    // answered just now: an idle worker is ready before its first write.
    let mut health = crate::http::Health {
        max_lag: std::time::Duration::from_millis(cfg.http.max_lag_ms),
        sinks_ok: true.into(),
        ..Default::default()
    };
    for name in cfg.sources.keys() {
        health.sources.insert(name.clone(), Default::default());
    }
    health
        .board
        .stored(engine.store.dead_letter_count()?, &engine.store.latest_dead_letters(5)?);
    let health = Arc::new(health);
    // Per source: how far it is durable everywhere (`/v1/wait`), from the stored checkpoint
    // on (its documents were written before it was stored).
    let mut durable = BTreeMap::new();
    let mut waits = crate::wait::Waits::default();
    let mut layout = crate::status_page::Layout::default();
    for (name, sc) in &cfg.sources {
        let d = viewkeeper_core::durable::durable_channel();
        let kind = match sc {
            SourceConfig::Postgres(_) => {
                if let Some(Checkpoint::Lsn(v)) = engine.store.checkpoint(name)? {
                    d.send_modify(|d| {
                        d.raise_lsn(v);
                    });
                }
                crate::wait::Kind::Postgres
            }
            SourceConfig::Debezium(_) => crate::wait::Kind::Kafka,
        };
        waits.sources.insert(name.clone(), (kind, d.subscribe()));
        layout.sources.insert(name.clone(), kind);
        durable.insert(name.clone(), d);
    }
    if mode == Mode::Run && cfg.http.enabled {
        let handle = crate::http::install_metrics()?;
        layout.projections = cfg
            .projections
            .iter()
            .map(|(n, p)| (n.clone(), p.sink.clone()))
            .collect();
        layout.sinks = cfg.sinks.keys().cloned().collect();
        let page = crate::status_page::StatusPage::new(
            handle.clone(),
            health.clone(),
            waits.clone(),
            layout,
            Duration::from_millis(cfg.http.sample_interval_ms),
            Duration::from_millis(cfg.http.history_ms),
        );
        page.spawn_sampler(shutdown.clone());
        let served = crate::http::Served {
            health: health.clone(),
            metrics: handle,
            waits,
            page,
        };
        let (addr, _task) = crate::http::serve(&cfg.http.listen, served, shutdown.clone()).await?;
        info!(%addr, "http listening (/ status page, /v1/status, /v1/wait, /metrics, /healthz, /readyz)");
    }
    let (tx, rx, permits) = queue::bounded(&cfg.engine);
    let mut acks = BTreeMap::new();
    let mut sources = tokio::task::JoinSet::new();
    for (name, sc) in &cfg.sources {
        let from = engine.store.checkpoint(name)?;
        let (ack_tx, ack_rx) = watch::channel(from);
        acks.insert(name.clone(), ack_tx);
        let Some(src) = source_of(cfg, name, sc, &engine.store, mode, health.sources[name].clone(), &scale)? else {
            continue;
        };
        let run = SourceRun {
            from,
            tx: tx.clone(),
            acks: ack_rx,
            shutdown: shutdown.clone(),
            durable: durable[name].clone(),
        };
        sources.spawn(src.run(run));
    }
    if mode == Mode::Run {
        spawn_reloads(cfg, &engine.store, &health, &tx, &shutdown, &mut sources)?;
    }
    drop(tx);
    engine.acks = acks;
    engine.durable = durable;
    engine.defer_snapshot_render = mode == Mode::Backfill;
    engine.health = Some(health);
    engine.queue_permits = Some(permits);
    if let Some(p) = progress {
        engine.progress = p;
    }
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
                        error!(error = %e, hint = e.kind.hint(), "source error; stopping");
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
    Ok(stats)
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
                    if pg.snapshot == SnapshotMode::Never {
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
    sinks: &BTreeMap<String, Arc<dyn Sink>>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Handle::current();
    for (name, r) in sinks {
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
            let sample = super::verify::sample_ids(store, p, 8)?;
            if sample.is_empty() {
                continue;
            }
            match tokio::task::block_in_place(|| rt.block_on(r.holds(&sample))) {
                Ok(Some(0)) => {
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
    tx: &mpsc::Sender<SourceBatch>,
    shutdown: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<Result<(), SourceError>>,
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
