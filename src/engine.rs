//! The engine: applies source batches to the state store, renders the affected
//! documents, writes them to the sinks, and only then checkpoints and acknowledges.
//!
//! One batch at a time, in this order (each step's failure leaves the previous
//! steps' effects safe to replay):
//! 1. In one state-store transaction: apply every change, find the affected root
//!    keys of every projection (each document once per batch), reserve versions,
//!    render the documents, store the source's dead letters; commit.
//! 2. Write each projection's documents to its sink; a failed write is retried with
//!    backoff until it succeeds or the worker shuts down. Nothing is acknowledged
//!    meanwhile, so a dead sink stalls the pipeline instead of losing changes.
//! 3. Store sink rejections and render failures as dead letters.
//! 4. Store the checkpoints; then send them to the sources, which ack upstream.
//!
//! A crash between 1 and 4 replays the batch from the old checkpoint: changes are
//! no-ops for rows already newer, but their documents are rendered and written again
//! with new, higher versions, so the sinks converge.

use crate::store::{DeadLetter, Store, StoreError};
use backon::BackoffBuilder;
use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use viewkeeper_connectors::elasticsearch::SearchSink;
use viewkeeper_connectors::redis::RedisSink;
use viewkeeper_connectors::sink::{Lost, Rejection, SinkDoc, SinkError};
use viewkeeper_connectors::source::{SnapshotMark, SourceBatch};
use viewkeeper_projections::model::{Key, Position};
use viewkeeper_projections::render::{MemoLookup, Projection, RenderError, RowLookup};

/// Rows remembered while one batch (or chunk) renders: shared customers and products are
/// read from the store once.
const MEMO_ROWS: usize = 10_000;

/// A connected sink.
pub enum Sink {
    Redis(RedisSink),
    Search(SearchSink),
    /// Takes every document and keeps none (counted per sink).
    Blackhole(String),
}

impl Sink {
    /// What the sink's storage is (Redis: the server's `run_id`), when it can tell.
    pub fn identity(&self) -> Option<String> {
        match self {
            Sink::Redis(r) => r.identity(),
            _ => None,
        }
    }

    async fn write(&self, p: &Projection, docs: &[SinkDoc]) -> Result<Vec<Rejection>, SinkError> {
        match self {
            Sink::Redis(r) => r.write(&p.spec, docs).await,
            Sink::Search(s) => match &p.spec.index {
                Some(ix) => s.write(&ix.alias, docs).await,
                None => Err(SinkError::new(
                    &p.spec.sink,
                    format!("projection {} has no index", p.name),
                )),
            },
            Sink::Blackhole(name) => {
                metrics::counter!("viewkeeper_blackhole_documents_total", "sink" => name.clone())
                    .increment(docs.len() as u64);
                Ok(vec![])
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("state store lookup failed while rendering: {0}")]
    Lookup(String),
}

/// Counters the engine keeps (for logs now, metrics later).
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub batches: u64,
    pub changes: u64,
    pub documents: u64,
    pub dead_letters: u64,
}

pub struct Engine {
    pub store: Store,
    pub projections: Vec<Projection>,
    pub sinks: BTreeMap<String, Arc<Sink>>,
    pub acks: BTreeMap<String, watch::Sender<Position>>,
    pub max_batch_changes: usize,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub stats: Stats,
    /// `viewkeeper backfill`: render once at the end, after every source's snapshot,
    /// instead of after each one.
    pub defer_snapshot_render: bool,
    /// Sources whose snapshot is complete but not yet rendered (deferred), with their
    /// checkpoints, stored only after the rendering.
    pub held: BTreeMap<String, Position>,
    /// Readiness flags for `/readyz` (the worker's; `None` for one-shot commands).
    pub health: Option<Arc<crate::http::Health>>,
    /// When `viewkeeper_state_store_bytes` was last measured.
    pub last_size_check: Option<std::time::Instant>,
    /// The queue's change permits, handed back once a batch is durable (the worker's).
    pub queue_permits: Option<QueuePermits>,
    /// Projections were marked for a re-write while another was being re-written.
    pub resync_due: bool,
}

/// Permits of the queue between sources and engine: one per change, a batch larger than
/// the whole bound takes all of them (it passes alone).
#[derive(Clone)]
pub struct QueuePermits {
    sem: Arc<tokio::sync::Semaphore>,
    cap: usize,
}

impl QueuePermits {
    pub fn new(changes: usize) -> Self {
        let cap = changes.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        QueuePermits {
            sem: Arc::new(tokio::sync::Semaphore::new(cap)),
            cap,
        }
    }

    fn cost(&self, batches: &[SourceBatch]) -> usize {
        batches.iter().map(|b| b.changes.len().min(self.cap)).sum()
    }

    /// Waits until `b` fits; `false` when the queue is closed.
    pub async fn take(&self, b: &SourceBatch) -> bool {
        match self.sem.acquire_many(self.cost(std::slice::from_ref(b)) as u32).await {
            Ok(p) => {
                p.forget();
                true
            }
            Err(_) => false,
        }
    }

    fn give_back(&self, n: usize) {
        self.sem.add_permits(n);
    }
}

/// The plain text of a key (`42`, `1001:2`): the member of cache sets.
fn plain_key(key: &Key) -> String {
    key.values()
        .iter()
        .map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(":")
}

impl Engine {
    /// An engine over `store` writing to `sinks`, with the `[engine]` settings; nothing
    /// acknowledged to sources, no health flags, no queue permits (the worker sets those).
    pub fn new(
        store: Store,
        projections: Vec<Projection>,
        sinks: BTreeMap<String, Arc<Sink>>,
        cfg: &crate::config::EngineConfig,
    ) -> Engine {
        Engine {
            store,
            projections,
            sinks,
            acks: BTreeMap::new(),
            max_batch_changes: cfg.max_batch_changes,
            retry_min: Duration::from_millis(cfg.retry_min_ms),
            retry_max: Duration::from_millis(cfg.retry_max_ms),
            stats: Stats::default(),
            defer_snapshot_render: false,
            held: BTreeMap::new(),
            health: None,
            last_size_check: None,
            queue_permits: None,
            resync_due: false,
        }
    }

    /// Processes batches until `stop` or until every source is gone. On `stop` no new
    /// batch is taken; the batch in hand gets `drain` to reach the sinks and its
    /// checkpoint, then it is abandoned before its checkpoint (it replays on the next
    /// start).
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
                    "drain bound reached: abandoning the batch in hand (it replays on the next start)"
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

    async fn run_until(
        &mut self,
        rx: &mut mpsc::Receiver<SourceBatch>,
        stop: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<(), EngineError> {
        if !self.write_pending(abort).await? || !self.resync_marked(abort).await? {
            return Ok(());
        }
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                b = rx.recv() => match b { Some(b) => b, None => break },
            };
            let mut n = first.changes.len();
            let mut batches = vec![first];
            while n < self.max_batch_changes {
                match rx.try_recv() {
                    Ok(b) => {
                        n += b.changes.len();
                        batches.push(b);
                    }
                    Err(_) => break,
                }
            }
            let taken = self.queue_permits.as_ref().map_or(0, |q| q.cost(&batches));
            if !self.process(batches, abort).await? {
                return Ok(());
            }
            if let Some(q) = &self.queue_permits {
                q.give_back(taken);
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

    /// Returns `false` when shutdown interrupted the batch (not checkpointed).
    pub async fn process(
        &mut self,
        batches: Vec<SourceBatch>,
        shutdown: &CancellationToken,
    ) -> Result<bool, EngineError> {
        let Prepared {
            docs,
            mut letters,
            completed,
            tag,
        } = tokio::task::block_in_place(|| self.apply_and_render(&batches))?;
        // The projections' first writes go out together (each sink works on its own; one
        // Redis connection pipelines them); a failed one is retried alone below.
        let work: Vec<usize> = (0..docs.len()).filter(|pi| !docs[*pi].is_empty()).collect();
        let mut extras = Vec::with_capacity(work.len());
        for &pi in &work {
            // A rebuild in progress (maybe in another process) fills a new index: write
            // there too. Read after this batch was applied, so the rebuild's own render
            // (which starts after it registered) covers everything written before.
            let name = &self.projections[pi].name;
            extras.push(tokio::task::block_in_place(|| self.store.rebuild_target(name))?);
        }
        let firsts = {
            let projections = &self.projections;
            let health = self.health.clone();
            let sinks: Vec<Arc<Sink>> = work
                .iter()
                .map(|&pi| self.sinks[&projections[pi].spec.sink].clone())
                .collect();
            let health = health.as_deref();
            futures_util::future::join_all(
                work.iter()
                    .zip(&extras)
                    .zip(&sinks)
                    .map(|((&pi, extra), sink)| attempt(sink, &projections[pi], extra.as_deref(), &docs[pi], health)),
            )
            .await
        };
        for (&pi, first) in work.iter().zip(firsts) {
            let docs = &docs[pi];
            let Some(rejections) = self.write_retrying(pi, docs, shutdown, Some(first)).await? else {
                return Ok(false);
            };
            let proj = &self.projections[pi];
            for r in rejections {
                warn!(projection = %proj.name, id = %r.id, reason = %r.reason, "sink rejected document; dead-lettered");
                letters.push(rejection_letter(proj, r, docs));
            }
            self.stats.documents += docs.len() as u64;
        }
        // Catch-up batches (streamed while a snapshot is paused) are acknowledged, so the
        // slot advances, but are no checkpoint: the snapshot is not complete yet.
        let mut checkpoints: BTreeMap<String, Position> = BTreeMap::new();
        let mut acks: BTreeMap<String, Position> = BTreeMap::new();
        for b in &batches {
            let e = acks.entry(b.source.clone()).or_default();
            *e = (*e).max(b.checkpoint);
            if b.snapshot != Some(SnapshotMark::CatchUp) {
                let e = checkpoints.entry(b.source.clone()).or_default();
                *e = (*e).max(b.checkpoint);
            }
        }
        if !completed.is_empty() {
            if self.defer_snapshot_render {
                for s in &completed {
                    if let Some(p) = checkpoints.remove(s) {
                        self.held.insert(s.clone(), p);
                    }
                }
            } else if !self.render_snapshot(&completed, shutdown).await? {
                return Ok(false);
            }
        }
        tokio::task::block_in_place(|| -> Result<(), StoreError> {
            self.store.add_dead_letters(&letters)?;
            self.store.set_checkpoints(&checkpoints, tag)
        })?;
        // A re-read finished (the projections waiting for it are re-written whole), or a
        // sink lost the documents of more projections than the one just re-written.
        let reloaded = batches
            .iter()
            .any(|b| matches!(b.snapshot, Some(SnapshotMark::ReloadDone { .. })));
        if (reloaded || std::mem::take(&mut self.resync_due)) && !self.resync_marked(shutdown).await? {
            return Ok(false);
        }
        self.stats.dead_letters += letters.len() as u64;
        metrics::counter!("viewkeeper_dead_letters_total").increment(letters.len() as u64);
        metrics::counter!("viewkeeper_batches_total").increment(1);
        metrics::counter!("viewkeeper_changes_applied_total")
            .increment(batches.iter().map(|b| b.changes.len() as u64).sum());
        for (source, pos) in &checkpoints {
            metrics::gauge!("viewkeeper_checkpoint_lsn", "source" => source.clone()).set(pos.major as f64);
        }
        // Lag in seconds: from the commit of the newest change applied to now (0 for a
        // batch without changes: the source had nothing newer to send).
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut lags: BTreeMap<&str, f64> = BTreeMap::new();
        for b in batches.iter().filter(|b| b.snapshot.is_none()) {
            let lag = b
                .changes
                .iter()
                .map(|c| c.commit_time_ms)
                .filter(|t| *t > 0) // 0: a snapshot read, no commit time
                .max()
                .map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0);
            lags.insert(&b.source, lag);
        }
        for (source, lag) in lags {
            metrics::gauge!("viewkeeper_replication_lag_seconds", "source" => source.to_string()).set(lag);
            if let Some(h) = &self.health {
                h.lag_seconds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(source.to_string(), lag);
            }
        }
        if self
            .last_size_check
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.last_size_check = Some(std::time::Instant::now());
            metrics::gauge!("viewkeeper_state_store_bytes").set(self.store.size_bytes() as f64);
        }
        for (source, pos) in acks {
            if self.held.contains_key(&source) {
                continue; // backfill: acknowledged when the held checkpoint is stored
            }
            if let Some(a) = self.acks.get(&source) {
                a.send_if_modified(|cur| {
                    let newer = pos > *cur;
                    if newer {
                        *cur = pos;
                    }
                    newer
                });
            }
        }
        self.stats.batches += 1;
        debug!(
            batches = batches.len(),
            changes = batches.iter().map(|b| b.changes.len()).sum::<usize>(),
            documents = docs.iter().map(Vec::len).sum::<usize>(),
            "batch durable"
        );
        Ok(true)
    }

    /// Renders the documents of root `keys` of projection `pi` again and writes them
    /// (`dlq replay`). Returns what still cannot be rendered or written; `None`: shutdown.
    pub async fn rewrite(
        &mut self,
        pi: usize,
        keys: &[Key],
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<DeadLetter>>, EngineError> {
        let (docs, mut letters) = tokio::task::block_in_place(|| -> Result<_, EngineError> {
            let tx = self.store.begin()?;
            let first = tx.next_versions(keys.len() as u64)?;
            let mut letters = Vec::new();
            let docs = render_docs(&self.projections[pi], keys.iter(), first, &tx, &mut letters)?;
            tx.commit()?;
            Ok((docs, letters))
        })?;
        if !docs.is_empty() {
            let Some(rejections) = self.write_retrying(pi, &docs, shutdown, None).await? else {
                return Ok(None);
            };
            let p = &self.projections[pi];
            letters.extend(rejections.into_iter().map(|r| rejection_letter(p, r, &docs)));
        }
        Ok(Some(letters))
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

    fn backoff(&self) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.retry_min)
            .with_max_delay(self.retry_max)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Writes one projection's documents until the sink takes them; `None` when
    /// shutdown came first. A vanished index is recreated and refilled first.
    async fn write_retrying(
        &mut self,
        pi: usize,
        docs: &[SinkDoc],
        shutdown: &CancellationToken,
        mut first: Option<Result<Vec<Rejection>, SinkError>>,
    ) -> Result<Option<Vec<Rejection>>, EngineError> {
        let mut backoff = self.backoff();
        loop {
            let r = match first.take() {
                Some(r) => r,
                None => {
                    let sink = self.sinks[&self.projections[pi].spec.sink].clone();
                    let name = self.projections[pi].name.clone();
                    let extra = tokio::task::block_in_place(|| self.store.rebuild_target(&name))?;
                    attempt(
                        &sink,
                        &self.projections[pi],
                        extra.as_deref(),
                        docs,
                        self.health.as_deref(),
                    )
                    .await
                }
            };
            let e = match r {
                Ok(r) => return Ok(Some(r)),
                Err(e) => e,
            };
            metrics::counter!("viewkeeper_sink_retries_total", "sink" => self.projections[pi].spec.sink.clone())
                .increment(1);
            if let Some(lost) = e.lost {
                if !self.recover(pi, lost, &e.to_string(), shutdown).await? {
                    return Ok(None);
                }
                continue;
            }
            let delay = backoff.next().unwrap_or(self.retry_max);
            warn!(projection = %self.projections[pi].name, error = %e, retry_in_ms = delay.as_millis() as u64, "sink write failed; retrying (nothing is acknowledged meanwhile)");
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Makes sure the projection's index exists and re-writes every document of the
    /// projection from the state store (after the sink lost its data, when the index was
    /// created anew over a non-empty state store, or after a config change). The need is
    /// marked in the store first and cleared after, so an interrupted re-write is done
    /// again on the next start. `false`: shutdown.
    pub async fn resync_projection(&mut self, pi: usize, shutdown: &CancellationToken) -> Result<bool, EngineError> {
        let name = self.projections[pi].name.clone();
        tokio::task::block_in_place(|| self.store.mark_resync(&name, "re-write in progress"))?;
        if !self.render_all(pi, None, shutdown).await? {
            return Ok(false);
        }
        tokio::task::block_in_place(|| self.store.clear_resync(&name))?;
        self.remember_identity(&self.projections[pi].spec.sink.clone())?;
        Ok(true)
    }

    /// A sink lost what it had acknowledged: re-writes the projection, or every projection
    /// on the sink. `false`: shutdown.
    async fn recover(
        &mut self,
        pi: usize,
        lost: Lost,
        why: &str,
        shutdown: &CancellationToken,
    ) -> Result<bool, EngineError> {
        let sink = self.projections[pi].spec.sink.clone();
        let affected: Vec<usize> = match lost {
            Lost::Projection => vec![pi],
            Lost::Sink => (0..self.projections.len())
                .filter(|i| self.projections[*i].spec.sink == sink)
                .collect(),
        };
        for &i in &affected {
            let name = self.projections[i].name.clone();
            warn!(projection = %name, %sink, reason = %why, "the sink lost documents; re-writing every document of the projection from the state store");
            tokio::task::block_in_place(|| self.store.mark_resync(&name, why))?;
        }
        for i in affected {
            if !self.resync_projection(i, shutdown).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Once no projection on `sink` waits for a re-write, stores what the sink's storage
    /// is now (Redis: its `run_id`): the next start compares it.
    fn remember_identity(&mut self, sink: &str) -> Result<(), EngineError> {
        let Some(id) = self.sinks.get(sink).and_then(|s| s.identity()) else {
            return Ok(());
        };
        let marks = tokio::task::block_in_place(|| self.store.resyncs())?;
        let waiting = self
            .projections
            .iter()
            .any(|p| p.spec.sink == sink && marks.contains_key(&p.name));
        if !waiting {
            tokio::task::block_in_place(|| self.store.set_sink_identity(sink, &id))?;
        }
        Ok(())
    }

    /// Writes the documents that batches applied before a crash or a stop did not finish
    /// writing (their changes replay as no-ops, which would not name every document: a
    /// child moved from one parent to another names only the new one). `false`: shutdown.
    async fn write_pending(&mut self, shutdown: &CancellationToken) -> Result<bool, EngineError> {
        let pending = tokio::task::block_in_place(|| self.store.pending())?;
        if pending.roots.is_empty() {
            return Ok(true);
        }
        for (name, keys) in &pending.roots {
            let Some(pi) = self.projections.iter().position(|p| &p.name == name) else {
                continue; // no longer configured
            };
            info!(projection = %name, documents = keys.len(), "writing the documents a previous run did not finish");
            let Some(letters) = self.rewrite(pi, keys, shutdown).await? else {
                return Ok(false);
            };
            tokio::task::block_in_place(|| self.store.add_dead_letters(&letters))?;
        }
        tokio::task::block_in_place(|| self.store.clear_pending(pending.through))?;
        Ok(true)
    }

    /// Re-writes the projections marked in the store (see [`Engine::resync_projection`])
    /// whose sources have no re-read in progress (those are re-written when it ends).
    /// Marks of projections no longer configured are dropped. `false`: shutdown.
    async fn resync_marked(&mut self, shutdown: &CancellationToken) -> Result<bool, EngineError> {
        let marks = tokio::task::block_in_place(|| self.store.resyncs())?;
        for (name, why) in marks {
            let Some(pi) = self.projections.iter().position(|p| p.name == name) else {
                tokio::task::block_in_place(|| self.store.clear_resync(&name))?;
                continue;
            };
            let sources: BTreeSet<String> = self
                .store
                .catalog()
                .tables
                .iter()
                .filter(|(t, _)| self.projections[pi].uses_table(t))
                .map(|(_, t)| t.source.clone())
                .collect();
            let mut waiting = false;
            for s in &sources {
                waiting |= tokio::task::block_in_place(|| self.store.reloads_pending(Some(s)))?;
            }
            if waiting {
                info!(projection = %name, reason = %why, "re-writing every document once the re-read of its tables ends");
                continue;
            }
            info!(projection = %name, reason = %why, "re-writing every document");
            if !self.resync_projection(pi, shutdown).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Renders every document of projection `pi` from the state store and writes it
    /// through the alias, or into the concrete index `target` (a rebuild). Logs progress
    /// with rate and ETA. `false`: shutdown.
    pub async fn render_all(
        &mut self,
        pi: usize,
        target: Option<&str>,
        shutdown: &CancellationToken,
    ) -> Result<bool, EngineError> {
        const CHUNK: usize = 500;
        let mut backoff = self.backoff();
        'again: loop {
            let sink = self.sinks[&self.projections[pi].spec.sink].clone();
            if let (Sink::Search(s), Some(ix), None) = (&*sink, &self.projections[pi].spec.index, target) {
                if let Err(e) = s.ensure_index(ix).await {
                    let delay = backoff.next().unwrap_or(self.retry_max);
                    warn!(projection = %self.projections[pi].name, error = %e, "cannot create the index; retrying");
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(delay) => continue 'again,
                    }
                }
            }
            let root = self.projections[pi].root_table().to_string();
            let keys = tokio::task::block_in_place(|| self.store.keys(&root))?;
            info!(projection = %self.projections[pi].name, documents = keys.len(), into = target.unwrap_or("alias"), "re-writing every document");
            let started = std::time::Instant::now();
            let mut last_log = started;
            // A bar on a terminal; periodic log lines otherwise (and in the worker).
            let bar = std::io::stderr().is_terminal().then(|| {
                let b = indicatif::ProgressBar::new(keys.len() as u64);
                b.set_style(
                    indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} docs, {per_sec}, ETA {eta}")
                        .expect("valid template"),
                );
                b.set_message(self.projections[pi].name.clone());
                b
            });
            // One chunk is written (in its own task) while the next one is rendered, so
            // the sink's work and the store's overlap; at most one write is in flight.
            let proj = Arc::new(self.projections[pi].clone());
            let mut inflight: Option<tokio::task::JoinHandle<Written>> = None;
            for (ci, chunk) in keys.chunks(CHUNK).enumerate() {
                let done = ci * CHUNK;
                if let Some(b) = &bar {
                    b.set_position(done as u64);
                } else if last_log.elapsed() >= Duration::from_secs(2) {
                    last_log = std::time::Instant::now();
                    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
                    let eta_s = (keys.len() - done) as f64 / rate.max(1e-3);
                    info!(projection = %self.projections[pi].name, done, total = keys.len(), docs_per_s = rate as u64, eta_s = eta_s as u64, "rendering");
                }
                let (docs, letters) = tokio::task::block_in_place(|| -> Result<_, EngineError> {
                    let tx = self.store.begin()?;
                    let first = tx.next_versions(chunk.len() as u64)?;
                    let mut letters = Vec::new();
                    let memo = MemoLookup::new(&tx, MEMO_ROWS);
                    let docs = render_docs(&self.projections[pi], chunk.iter(), first, &memo, &mut letters)?;
                    drop(memo);
                    tx.commit()?;
                    Ok((docs, letters))
                })?;
                if let Some(h) = inflight.take() {
                    match self.settle(&proj, &sink, target, h, &mut backoff, shutdown).await? {
                        Settled::Done => {}
                        Settled::IndexMissing => continue 'again,
                        Settled::Shutdown => return Ok(false),
                    }
                }
                inflight = Some(tokio::spawn(write_chunk(
                    sink.clone(),
                    proj.clone(),
                    target.map(str::to_string),
                    docs,
                    letters,
                )));
            }
            if let Some(h) = inflight.take() {
                match self.settle(&proj, &sink, target, h, &mut backoff, shutdown).await? {
                    Settled::Done => {}
                    Settled::IndexMissing => continue 'again,
                    Settled::Shutdown => return Ok(false),
                }
            }
            if let Some(b) = bar {
                b.finish();
            }
            return Ok(true);
        }
    }

    /// Waits for a chunk written by [`write_chunk`]; a failed write is retried here
    /// (with backoff) until the sink takes it, the index is gone, or shutdown.
    async fn settle(
        &mut self,
        proj: &Projection,
        sink: &Sink,
        target: Option<&str>,
        handle: tokio::task::JoinHandle<Written>,
        backoff: &mut backon::ExponentialBackoff,
        shutdown: &CancellationToken,
    ) -> Result<Settled, EngineError> {
        let Written {
            mut result,
            docs,
            letters,
        } = handle
            .await
            .map_err(|e| EngineError::Lookup(format!("sink write task failed: {e}")))?;
        loop {
            match result {
                Ok(rejections) => {
                    let mut letters = letters;
                    letters.extend(rejections.into_iter().map(|r| rejection_letter(proj, r, &docs)));
                    tokio::task::block_in_place(|| self.store.add_dead_letters(&letters))?;
                    self.stats.documents += docs.len() as u64;
                    return Ok(Settled::Done);
                }
                Err(e) if e.lost.is_some() => {
                    if e.lost == Some(Lost::Sink) {
                        // The other projections on the sink lost theirs too: after this one.
                        for p in self.projections.iter().filter(|p| p.spec.sink == proj.spec.sink) {
                            tokio::task::block_in_place(|| self.store.mark_resync(&p.name, &e.to_string()))?;
                        }
                        self.resync_due = true;
                    }
                    return Ok(Settled::IndexMissing);
                }
                Err(e) => {
                    let delay = backoff.next().unwrap_or(self.retry_max);
                    warn!(projection = %proj.name, error = %e, "sink write failed during re-write; retrying");
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok(Settled::Shutdown),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    result = write_to(sink, proj, target, &docs).await;
                }
            }
        }
    }

    /// Re-writes every document of the projections that read tables of `sources` (whose
    /// snapshots were applied without rendering). `false`: shutdown.
    async fn render_snapshot(&mut self, sources: &[String], shutdown: &CancellationToken) -> Result<bool, EngineError> {
        let tables: Vec<String> = self
            .store
            .catalog()
            .tables
            .iter()
            .filter(|(_, t)| sources.contains(&t.source))
            .map(|(name, _)| name.clone())
            .collect();
        for pi in 0..self.projections.len() {
            if tables.iter().any(|t| self.projections[pi].uses_table(t))
                && !self.resync_projection(pi, shutdown).await?
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Step 1: one state-store transaction. Returns documents per projection index,
    /// dead letters found on the way (rendering failures), and the sources whose
    /// snapshot completed. Snapshot batches are applied without rendering: their
    /// documents are rendered whole once the snapshot is complete.
    fn apply_and_render(&mut self, batches: &[SourceBatch]) -> Result<Prepared, EngineError> {
        let tx = self.store.begin()?;
        let mut affected: Vec<BTreeSet<Key>> = vec![BTreeSet::new(); self.projections.len()];
        let mut letters = Vec::new();
        let mut source_letters = Vec::new();
        let mut completed = Vec::new();
        // Per projection, the columns it reads of each table: an update that changes none
        // of them (a price change seen by a view that shows no price) renders nothing.
        let needed: Vec<BTreeMap<String, BTreeSet<String>>> =
            self.projections.iter().map(Projection::needed_columns).collect();
        for b in batches {
            if let Some(mark) = &b.snapshot {
                tx.record_snapshot(&b.source, mark)?;
                if *mark == SnapshotMark::Complete {
                    completed.push(b.source.clone());
                }
            }
            for c in &b.changes {
                let applied = tx.apply(c)?;
                // While a snapshot is paused the row may not be read yet: it fills them in.
                if !applied.missing_unchanged.is_empty() && b.snapshot != Some(SnapshotMark::CatchUp) {
                    let reason = format!(
                        "unchanged TOAST column(s) {:?} have no stored value (the row was never seen whole); they stay missing until the row is written again or backfilled",
                        applied.missing_unchanged
                    );
                    warn!(table = %c.table, key = %c.key, "{reason}");
                    source_letters.push(DeadLetter {
                        source: b.source.clone(),
                        position: c.position.to_string(),
                        table: c.table.clone(),
                        key: c.key.to_string(),
                        stage: "apply".into(),
                        reason,
                        ..Default::default()
                    });
                }
                if b.snapshot.is_some() {
                    continue; // rendered whole once the snapshot is complete
                }
                let images: Vec<&_> = applied.images.iter().collect();
                for (pi, p) in self.projections.iter().enumerate() {
                    if p.uses_table(&c.table) && !unchanged_for(&applied, needed[pi].get(&c.table)) {
                        let roots = p
                            .affected_roots(&c.table, &images, &tx)
                            .map_err(|e| EngineError::Lookup(e.to_string()))?;
                        affected[pi].extend(roots);
                    }
                }
            }
            for d in &b.dead_letters {
                source_letters.push(DeadLetter {
                    source: b.source.clone(),
                    position: d.position.clone(),
                    table: d.table.clone(),
                    key: d.key.clone(),
                    stage: "decode".into(),
                    reason: d.reason.clone(),
                    payload: d.payload.clone(),
                    ..Default::default()
                });
            }
            self.stats.changes += b.changes.len() as u64;
        }
        tx.add_dead_letters(&source_letters)?;
        self.stats.dead_letters += source_letters.len() as u64;
        let total: u64 = affected.iter().map(|s| s.len() as u64).sum();
        let mut version = if total > 0 { tx.next_versions(total)? } else { 0 };
        // The documents to write are durable with the state they render: a replay of
        // these changes after a crash is a no-op and would not name them all again.
        let tag = (total > 0).then_some(version);
        for (pi, p) in self.projections.iter().enumerate() {
            if !affected[pi].is_empty() {
                tx.add_pending(&p.name, affected[pi].iter(), version)?;
            }
        }
        let mut out = Vec::with_capacity(self.projections.len());
        // Every change is applied: the store holds still while the documents render.
        let memo = MemoLookup::new(&tx, MEMO_ROWS);
        for (pi, p) in self.projections.iter().enumerate() {
            out.push(render_docs(p, affected[pi].iter(), version, &memo, &mut letters)?);
            version += affected[pi].len() as u64;
        }
        drop(memo);
        tx.commit()?;
        Ok(Prepared {
            docs: out,
            letters,
            completed,
            tag,
        })
    }
}

/// A batch applied and rendered: documents per projection index, dead letters found on
/// the way (rendering failures), the sources whose snapshot completed, and the tag of
/// its pending documents (cleared with its checkpoint).
struct Prepared {
    docs: Vec<Vec<SinkDoc>>,
    letters: Vec<DeadLetter>,
    completed: Vec<String>,
    tag: Option<u64>,
}

/// One write of a projection's documents through its alias (and into a rebuild's new
/// index `extra`), with the sink's metrics and the readiness flag.
async fn attempt(
    sink: &Sink,
    p: &Projection,
    extra: Option<&str>,
    docs: &[SinkDoc],
    health: Option<&crate::http::Health>,
) -> Result<Vec<Rejection>, SinkError> {
    let started = std::time::Instant::now();
    let r = match sink.write(p, docs).await {
        Ok(r) => match (sink, extra) {
            (Sink::Search(s), Some(ix)) => s.write_target(ix, false, docs).await.map(|r2| [r, r2].concat()),
            _ => Ok(r),
        },
        Err(e) => Err(e),
    };
    metrics::histogram!("viewkeeper_sink_write_seconds", "sink" => p.spec.sink.clone())
        .record(started.elapsed().as_secs_f64());
    if let Some(h) = health {
        h.sinks_ok.store(r.is_ok(), std::sync::atomic::Ordering::Relaxed);
    }
    if r.is_ok() {
        metrics::counter!("viewkeeper_documents_written_total", "projection" => p.name.clone())
            .increment(docs.len() as u64);
    }
    r
}

/// A chunk's write, handed back by its task.
struct Written {
    result: Result<Vec<Rejection>, SinkError>,
    docs: Vec<SinkDoc>,
    letters: Vec<DeadLetter>,
}

enum Settled {
    Done,
    IndexMissing,
    Shutdown,
}

/// Writes documents through the projection's alias, or into the concrete index `target`.
async fn write_to(
    sink: &Sink,
    p: &Projection,
    target: Option<&str>,
    docs: &[SinkDoc],
) -> Result<Vec<Rejection>, SinkError> {
    match (sink, target) {
        (Sink::Search(s), Some(ix)) => s.write_target(ix, false, docs).await,
        _ => sink.write(p, docs).await,
    }
}

async fn write_chunk(
    sink: Arc<Sink>,
    p: Arc<Projection>,
    target: Option<String>,
    docs: Vec<SinkDoc>,
    letters: Vec<DeadLetter>,
) -> Written {
    let result = write_to(&sink, &p, target.as_deref(), &docs).await;
    Written { result, docs, letters }
}

/// Whether an applied change leaves every column in `cols` as it was (so a projection
/// reading only those columns of the table has nothing to re-render).
fn unchanged_for(applied: &crate::store::Applied, cols: Option<&BTreeSet<String>>) -> bool {
    match (applied.in_place, applied.images.as_slice(), cols) {
        (true, [before, after], Some(cols)) => cols.iter().all(|c| before.get(c) == after.get(c)),
        _ => false,
    }
}

/// Renders the documents of `keys`, numbering versions from `first`; rows that cannot
/// be rendered become dead letters.
fn render_docs<'a>(
    p: &Projection,
    keys: impl Iterator<Item = &'a Key>,
    first: u64,
    lookup: &dyn RowLookup,
    letters: &mut Vec<DeadLetter>,
) -> Result<Vec<SinkDoc>, EngineError> {
    let mut docs = Vec::new();
    for (i, key) in keys.enumerate() {
        match p.render(key, lookup) {
            Ok(Some(r)) => docs.push(SinkDoc {
                root: key.as_str().to_string(),
                id: r.id,
                member: plain_key(key),
                body: r.body,
                version: first + i as u64,
                tombstoned: r.tombstoned,
            }),
            Ok(None) => {}
            Err(RenderError::Lookup(e)) => return Err(EngineError::Lookup(e.to_string())),
            Err(e @ RenderError::Row { .. }) => {
                warn!(projection = %p.name, key = %key, error = %e, "cannot render; dead-lettered");
                letters.push(DeadLetter {
                    table: p.root_table().to_string(),
                    key: key.to_string(),
                    stage: format!("render:{}", p.name),
                    reason: e.to_string(),
                    ..Default::default()
                });
            }
        }
    }
    Ok(docs)
}

/// A document the sink refused: keyed by its root row, so `dlq replay` can render it again.
fn rejection_letter(p: &Projection, r: Rejection, docs: &[SinkDoc]) -> DeadLetter {
    let root = docs.iter().find(|d| d.id == r.id).map(|d| d.root.clone());
    DeadLetter {
        table: p.root_table().to_string(),
        key: root.unwrap_or_else(|| r.id.clone()),
        stage: format!("sink:{}:{}", p.spec.sink, p.name),
        reason: format!("document {}: {}", r.id, r.reason),
        ..Default::default()
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
