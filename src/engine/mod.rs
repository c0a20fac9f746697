//! The engine: applies source batches to the state store, renders the documents they
//! affect, writes them to the sinks, and only then checkpoints and acknowledges.
//!
//! A pipeline, in this order for every batch (each step's failure leaves the previous
//! steps' effects safe to replay):
//! 1. [`apply`]: in one state-store transaction, apply every change, find the documents
//!    it affects, reserve their versions, render them, store the documents still owed;
//!    commit. Sequential: batch N+1 is applied after batch N.
//! 2. [`write`]: the documents go to the sinks in a task of their own, so batch N+1 is
//!    applied and rendered while batch N is being written; up to
//!    `[engine] pipeline_batches` batches are in flight, each sink with at most
//!    `sink_concurrency` requests. Versions make overlapping writes safe: an older version
//!    never overwrites a newer one.
//! 3. In batch order, over a contiguous run of batches every sink made durable: store the
//!    sinks' refusals as dead letters, the checkpoints (which clear the documents owed),
//!    then acknowledge to the sources, which ack upstream.
//!
//! A crash between 1 and 3 replays from the old checkpoint: changes are no-ops for rows
//! already newer, their documents (and those the state store says are still owed) are
//! written again with higher versions, so the sinks converge. On stop, no new batch is
//! taken; the batches in flight get `drain_timeout_ms` to finish, then are abandoned before
//! their checkpoints. Whole re-writes are [`resync`]; metrics and readiness [`observe`];
//! the queue from the sources [`queue`].

mod apply;
pub mod meta;
mod observe;
pub mod queue;
pub mod resync;
pub mod split;
mod write;

pub use observe::Stats;
pub use queue::QueuePermits;
pub use resync::{LogProgress, Progress};

use crate::store::{Store, StoreError};
use apply::{checkpoints_of, Prepared};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use viewkeeper_core::model::Key;
use viewkeeper_core::sink::{IndexLayout, Sink, Target};
use viewkeeper_core::source::{SnapshotMark, SourceBatch};
use viewkeeper_core::Checkpoint;
use viewkeeper_projections::render::{Projection, RowLookup};
use write::Outcome;

/// Rows remembered while one batch (or chunk) renders: shared customers and products are
/// read from the store once.
const MEMO_ROWS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("state store lookup failed while rendering: {0}")]
    Lookup(String),
}

/// Where each projection's documents go, as its sink needs to know it.
fn target_of(p: &Projection) -> Target {
    Target {
        projection: p.name.clone(),
        layout: p.spec.index.as_ref().map(|ix| IndexLayout {
            alias: ix.alias.clone(),
            index: ix.index_name(),
            settings: ix.settings.clone(),
            mappings: ix.mappings.clone(),
        }),
        into: None,
        also_into: None,
        active_set: p.spec.active_set.clone(),
        tombstone_ttl_ms: p.spec.tombstone_ttl_ms,
    }
}

pub struct Engine {
    pub store: Store,
    pub projections: Vec<Projection>,
    /// Per projection: its sink's view of it.
    targets: Vec<Target>,
    /// Per projection: the columns it reads of each table (an update that changes none of
    /// them renders nothing for it).
    needed: Vec<BTreeMap<String, BTreeSet<String>>>,
    pub sinks: BTreeMap<String, Arc<dyn Sink>>,
    /// Per sink: its requests in flight.
    limits: BTreeMap<String, Arc<Semaphore>>,
    pub acks: BTreeMap<String, watch::Sender<Option<Checkpoint>>>,
    pub max_batch_changes: usize,
    pub pipeline_batches: usize,
    pub sink_concurrency: usize,
    pub render_threads: usize,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub stats: Stats,
    /// `viewkeeper backfill`: render once at the end, after every source's snapshot,
    /// instead of after each one.
    pub defer_snapshot_render: bool,
    /// Sources whose snapshot is complete but not yet rendered (deferred), with their
    /// checkpoints, stored only after the rendering.
    pub held: BTreeMap<String, Checkpoint>,
    /// Readiness flags for `/readyz` (the worker's; `None` for one-shot commands).
    pub health: Option<Arc<crate::http::Health>>,
    /// When `viewkeeper_state_store_bytes` was last measured.
    last_size_check: Option<std::time::Instant>,
    /// The queue's change permits, handed back once a batch is durable (the worker's).
    pub queue_permits: Option<QueuePermits>,
    /// Projections were marked for a re-write while another was being re-written.
    resync_due: bool,
    /// Who watches long re-writes (a bar on a terminal, log lines otherwise).
    pub progress: Arc<dyn Progress>,
    /// Per source: how far the state store applied it (the `_meta` of documents).
    pub applied: BTreeMap<String, meta::Applied>,
    /// Per source: where its durable position is published (`/v1/wait`); the engine
    /// raises Postgres sources' LSN with every checkpoint stored.
    pub durable: BTreeMap<String, viewkeeper_core::DurableTx>,
    /// Several workers over a partitioned source: which documents this one writes.
    pub split: Option<split::Split>,
}

/// A batch in flight: its write task and what step 3 needs.
struct InFlight {
    handle: JoinHandle<Vec<(usize, Outcome)>>,
    prepared: Prepared,
}

impl Engine {
    /// An engine over `store` writing to `sinks`, with the `[engine]` settings; nothing
    /// acknowledged to sources, no health flags, no queue permits (the worker sets those).
    pub fn new(
        mut store: Store,
        projections: Vec<Projection>,
        sinks: BTreeMap<String, Arc<dyn Sink>>,
        cfg: &crate::config::EngineConfig,
    ) -> Engine {
        store.set_row_cache(cfg.row_cache_rows);
        // What the store holds already: documents rendered before the first batch (owed
        // ones, re-writes) reflect at least the stored checkpoints.
        let mut applied = BTreeMap::new();
        for s in projections.iter().flat_map(|p| p.sources()) {
            if let Ok(Some(Checkpoint::Lsn(v))) = store.checkpoint(s) {
                applied.insert(
                    s.to_string(),
                    meta::Applied {
                        lsn: Some(v),
                        ..Default::default()
                    },
                );
            }
        }
        let limits = sinks
            .keys()
            .map(|n| (n.clone(), Arc::new(Semaphore::new(cfg.sink_concurrency.max(1)))))
            .collect();
        Engine {
            store,
            targets: projections.iter().map(target_of).collect(),
            needed: projections.iter().map(Projection::needed_columns).collect(),
            projections,
            sinks,
            limits,
            acks: BTreeMap::new(),
            max_batch_changes: cfg.max_batch_changes,
            pipeline_batches: cfg.pipeline_batches.max(1),
            sink_concurrency: cfg.sink_concurrency.max(1),
            render_threads: cfg.render_threads(),
            retry_min: Duration::from_millis(cfg.retry_min_ms),
            retry_max: Duration::from_millis(cfg.retry_max_ms),
            stats: Stats::default(),
            defer_snapshot_render: false,
            held: BTreeMap::new(),
            health: None,
            last_size_check: None,
            queue_permits: None,
            resync_due: false,
            progress: Arc::new(LogProgress::default()),
            applied,
            durable: BTreeMap::new(),
            split: None,
        }
    }

    /// The `_meta` value of projection `pi`'s documents rendered now (`None`: off).
    pub(super) fn meta_of(&self, pi: usize) -> Option<serde_json::Value> {
        meta::meta_of(&self.projections[pi], &self.applied, observe::now_ms())
    }

    /// Processes batches until `stop` or until every source is gone (see the module docs
    /// for what a stop does with the batches in flight).
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<SourceBatch>,
        stop: CancellationToken,
        drain: Duration,
    ) -> Result<Stats, EngineError> {
        let abort = CancellationToken::new();
        let timer = {
            let (stop, abort) = (stop.clone(), abort.clone());
            tokio::spawn(async move {
                stop.cancelled().await;
                tokio::time::sleep(drain).await;
                warn!(
                    drain_ms = drain.as_millis() as u64,
                    "drain bound reached: abandoning the batches in hand (they replay on the next start)"
                );
                abort.cancel();
            })
        };
        let r = self.run_until(&mut rx, &stop, &abort).await;
        timer.abort();
        r?;
        info!(
            batches = self.stats.batches,
            changes = self.stats.changes,
            documents = self.stats.documents,
            "engine stopped"
        );
        Ok(self.stats)
    }

    /// Takes the batches waiting, up to `max_batch_changes` changes.
    fn gather(&self, first: SourceBatch, rx: &mut mpsc::Receiver<SourceBatch>) -> Vec<SourceBatch> {
        let mut n = first.changes.len();
        // A change of ownership ends a group: it takes effect between two batches.
        let mut ends = first.ownership.is_some();
        let mut batches = vec![first];
        while n < self.max_batch_changes && !ends {
            match rx.try_recv() {
                Ok(b) => {
                    n += b.changes.len();
                    ends = b.ownership.is_some();
                    batches.push(b);
                }
                Err(_) => break,
            }
        }
        batches
    }

    async fn run_until(
        &mut self,
        rx: &mut mpsc::Receiver<SourceBatch>,
        stop: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<(), EngineError> {
        if !self.write_pending(abort).await? || !self.resync_marked(abort).await? {
            return Ok(());
        }
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        let mut open = true;
        loop {
            if !open && inflight.is_empty() {
                break; // every source is gone and everything they sent is durable
            }
            let room = inflight.len() < self.pipeline_batches;
            // Biased: the stop first, then the oldest batch's completion (checkpoints and
            // acknowledgements are never starved by intake), then new batches.
            tokio::select! {
                biased;
                _ = abort.cancelled() => return Ok(()),
                done = async { (&mut inflight.front_mut().expect("guarded").handle).await }, if !inflight.is_empty() => {
                    let f = inflight.pop_front().expect("guarded");
                    let outcomes = done.map_err(|e| EngineError::Lookup(format!("write task failed: {e}")))?;
                    if !self.finish(f.prepared, outcomes, abort).await? {
                        return Ok(());
                    }
                }
                b = rx.recv(), if open && room && !stop.is_cancelled() => match b {
                    None => open = false,
                    Some(first) => {
                        let batches = self.gather(first, rx);
                        let prepared = tokio::task::block_in_place(|| self.apply_and_render(batches))?;
                        let handle = self.spawn_writes(&prepared, abort);
                        inflight.push_back(InFlight { handle, prepared });
                    }
                },
                _ = stop.cancelled(), if inflight.is_empty() => break,
                else => break,
            }
        }
        if !self.held.is_empty() && !stop.is_cancelled() {
            let sources: Vec<String> = self.held.keys().cloned().collect();
            if !self.render_snapshot(&sources, abort).await? {
                return Ok(());
            }
            let held = std::mem::take(&mut self.held);
            tokio::task::block_in_place(|| self.store.set_checkpoints(&held, None))?;
        }
        Ok(())
    }

    /// Step 2: the batch's writes, in a task.
    fn spawn_writes(&self, p: &Prepared, abort: &CancellationToken) -> JoinHandle<Vec<(usize, Outcome)>> {
        let jobs: Vec<write::Job> = (0..p.docs.len())
            .filter(|pi| !p.docs[*pi].is_empty())
            .map(|pi| self.job(pi, p.docs[pi].clone(), p.also_into[pi].clone()))
            .collect();
        tokio::spawn(write::write_batch(self.write_ctx(abort), jobs))
    }

    /// Applies and writes `batches` to the end (one batch, no pipeline: the one-shot
    /// commands and the tests). `false`: shutdown interrupted it (not checkpointed).
    pub async fn process(
        &mut self,
        batches: Vec<SourceBatch>,
        shutdown: &CancellationToken,
    ) -> Result<bool, EngineError> {
        let prepared = tokio::task::block_in_place(|| self.apply_and_render(batches))?;
        let outcomes = self
            .spawn_writes(&prepared, shutdown)
            .await
            .map_err(|e| EngineError::Lookup(format!("write task failed: {e}")))?;
        self.finish(prepared, outcomes, shutdown).await
    }

    /// Step 3 of a batch whose writes ended. `false`: shutdown.
    async fn finish(
        &mut self,
        p: Prepared,
        outcomes: Vec<(usize, Outcome)>,
        shutdown: &CancellationToken,
    ) -> Result<bool, EngineError> {
        let mut letters = p.letters;
        for (pi, outcome) in outcomes {
            let rejections = match outcome {
                Outcome::Written(r) => r,
                Outcome::Stopped => return Ok(false),
                // Rare: re-write what the sink lost, then this batch's documents again.
                Outcome::Lost(lost, why) => {
                    if !self.recover(pi, lost, &why, shutdown).await? {
                        return Ok(false);
                    }
                    match self.write_retrying(pi, p.docs[pi].clone(), shutdown).await? {
                        Some(r) => r,
                        None => return Ok(false),
                    }
                }
            };
            let proj = &self.projections[pi];
            for r in rejections {
                warn!(projection = %proj.name, id = %r.id, reason = %r.reason, "sink rejected document; dead-lettered");
                letters.push(write::rejection_letter(proj, r, &p.docs[pi]));
            }
            self.stats.documents += p.docs[pi].len() as u64;
        }
        if !p.takeover.is_empty() {
            // Partitions taken over: every document of them, from this worker's rows,
            // before the batch (and so the partitions' offsets) is acknowledged.
            for pi in 0..self.projections.len() {
                if self.split_governs(pi) && !self.take_over(pi, &p.takeover, shutdown).await? {
                    return Ok(false);
                }
            }
        }
        let (mut checkpoints, acks) = checkpoints_of(&p.infos);
        if !p.completed.is_empty() {
            if self.defer_snapshot_render {
                for s in &p.completed {
                    if let Some(cp) = checkpoints.remove(s) {
                        self.held.insert(s.clone(), cp);
                    }
                }
            } else if !self.render_snapshot(&p.completed, shutdown).await? {
                return Ok(false);
            }
        }
        tokio::task::block_in_place(|| -> Result<(), StoreError> {
            self.store.add_dead_letters(&letters)?;
            self.store.set_checkpoints(&checkpoints, p.tag)
        })?;
        if let Some(q) = &self.queue_permits {
            q.give_back(p.permits);
        }
        // A re-read finished (the projections waiting for it are re-written whole), or a
        // sink lost the documents of more projections than the one just re-written.
        let reloaded = p
            .infos
            .iter()
            .any(|b| matches!(b.snapshot, Some(SnapshotMark::ReloadDone { .. })));
        if (reloaded || std::mem::take(&mut self.resync_due)) && !self.resync_marked(shutdown).await? {
            return Ok(false);
        }
        self.observe_durable(&p.infos, &checkpoints, letters.len() + p.source_letters.len());
        if let Some(h) = &self.health {
            let now = observe::now_ms();
            h.board.dead_letters(&p.source_letters, now);
            h.board.dead_letters(&letters, now);
        }
        for (source, cp) in &checkpoints {
            if let (Checkpoint::Lsn(v), Some(d)) = (cp, self.durable.get(source)) {
                d.send_if_modified(|d| d.raise_lsn(*v));
            }
        }
        if p.infos.iter().any(|b| b.checkpoint.is_none() && b.snapshot.is_none()) {
            // A chunk of a large transaction is durable in the store and the sinks, its
            // commit not yet: the crash test holds the worker here to kill it.
            crate::failpoint::pause("engine-chunk-durable").await;
        }
        for (source, cp) in acks {
            if self.held.contains_key(&source) {
                continue; // backfill: acknowledged when the held checkpoint is stored
            }
            if let Some(a) = self.acks.get(&source) {
                // By value: a store written before checkpoints had kinds reads them as LSNs.
                a.send_if_modified(|cur| {
                    let newer = cur.is_none_or(|c| cp.value() > c.value());
                    if newer {
                        *cur = Some(cp);
                    }
                    newer
                });
            }
        }
        debug!(
            batches = p.infos.len(),
            changes = p.infos.iter().map(|b| b.changes).sum::<usize>(),
            documents = p.docs.iter().map(|d| d.len()).sum::<usize>(),
            "batch durable"
        );
        Ok(true)
    }

    /// Root keys of projection `pi` whose documents read the stored row `key` of `table`.
    pub fn roots_of(&self, pi: usize, table: &str, key: &Key) -> Result<Vec<Key>, EngineError> {
        let Some(row) = RowLookup::get(&self.store, table, key).map_err(|e| EngineError::Lookup(e.to_string()))? else {
            return Ok(vec![]);
        };
        let p = &self.projections[pi];
        if !p.uses_table(table) {
            return Ok(vec![]);
        }
        Ok(p.affected_roots(table, &[&row.image], &self.store)
            .map_err(|e| EngineError::Lookup(e.to_string()))?
            .into_iter()
            .collect())
    }
}

#[cfg(test)]
mod tests;
