//! Re-writing documents whole from the state store: a projection's every document (after
//! a snapshot or re-read, when a sink lost data, when its config changed, into a rebuild's
//! new index), and at start the documents a previous run did not finish writing.
//!
//! A whole re-write renders on several threads, each with its own read-only connection
//! (the store holds still meanwhile: the engine is not applying), and writes the chunks
//! as they come, with the sink's bounded number of requests in flight. Versions are
//! reserved for all of it first. Every re-write is marked in the store before it starts
//! and cleared after, so one a crash interrupted is done again on the next start.

use super::apply::render_docs;
use super::write::{rejection_letter, write_job, Outcome};
use super::{Engine, EngineError, MEMO_ROWS};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use viewkeeper_core::model::Key;
use viewkeeper_core::sink::{SinkDoc, Target};
use viewkeeper_core::DeadLetter;
use viewkeeper_projections::render::MemoLookup;

/// Rows per rendered chunk (and so per write request batch) of a whole re-write.
const CHUNK: usize = 500;

/// Where a long re-write stands, for whoever watches (a progress bar on a terminal, log
/// lines otherwise).
pub trait Progress: Send + Sync {
    fn start(&self, what: &str, total: u64);
    fn advance(&self, done: u64);
    fn finish(&self);
}

/// Progress as a log line every 2 s, with rate and ETA.
pub struct LogProgress {
    state: std::sync::Mutex<(String, u64, Instant, Instant)>,
}

impl Default for LogProgress {
    fn default() -> Self {
        LogProgress {
            state: std::sync::Mutex::new((String::new(), 0, Instant::now(), Instant::now())),
        }
    }
}

impl Progress for LogProgress {
    fn start(&self, what: &str, total: u64) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) =
            (what.to_string(), total, Instant::now(), Instant::now());
    }
    fn advance(&self, done: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.3.elapsed() >= Duration::from_secs(2) {
            s.3 = Instant::now();
            let rate = done as f64 / s.2.elapsed().as_secs_f64().max(1e-3);
            let eta_s = s.1.saturating_sub(done) as f64 / rate.max(1e-3);
            info!(projection = %s.0, done, total = s.1, docs_per_s = rate as u64, eta_s = eta_s as u64, "rendering");
        }
    }
    fn finish(&self) {}
}

/// A rendered chunk: its documents and the rows that could not render.
type Chunk = (Vec<SinkDoc>, Vec<DeadLetter>);

impl Engine {
    /// Makes sure the projection's index exists and re-writes every document of the
    /// projection from the state store (see the module docs). `false`: shutdown.
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

    /// Renders every document of projection `pi` and writes it through the alias, or into
    /// the concrete index `into` (a rebuild). `false`: shutdown.
    pub async fn render_all(
        &mut self,
        pi: usize,
        into: Option<&str>,
        shutdown: &CancellationToken,
    ) -> Result<bool, EngineError> {
        self.render_all_of(pi, into, None, shutdown).await
    }

    /// [`Engine::render_all`]; of a projection split across workers only the documents
    /// this worker owns, of partitions `only` if given ([`super::split`]).
    pub(super) async fn render_all_of(
        &mut self,
        pi: usize,
        into: Option<&str>,
        only: Option<&BTreeSet<u32>>,
        shutdown: &CancellationToken,
    ) -> Result<bool, EngineError> {
        let mut backoff = viewkeeper_core::retry::backoff(self.retry_min, self.retry_max);
        let target = Target {
            into: into.map(str::to_string),
            ..self.targets[pi].clone()
        };
        let sink = self.sinks[&self.projections[pi].spec.sink].clone();
        'again: loop {
            if let Err(e) = sink.prepare(&target).await {
                let delay = backoff.delay();
                warn!(projection = %self.projections[pi].name, error = %e, "cannot create the index; retrying");
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(delay) => continue 'again,
                }
            }
            let keys = Arc::new(self.rewrite_keys(pi, only)?);
            let name = self.projections[pi].name.clone();
            info!(projection = %name, documents = keys.len(), into = into.unwrap_or("alias"), "re-writing every document");
            self.progress.start(&name, keys.len() as u64);
            let first = tokio::task::block_in_place(|| -> Result<u64, EngineError> {
                let tx = self.store.begin()?;
                let v = tx.next_versions(keys.len().max(1) as u64)?;
                tx.commit()?;
                Ok(v)
            })?;
            // Renderers on threads of their own, each chunk in order of its index; the
            // writes go out as chunks come, bounded by the sink's limit.
            let (chunks_tx, mut chunks_rx) = tokio::sync::mpsc::channel::<Result<(usize, Chunk), EngineError>>(4);
            let threads = self.render_threads.max(1).min(keys.len().div_ceil(CHUNK).max(1));
            let meta = self.meta_of(pi);
            for t in 0..threads {
                let reader = self.store.reader()?;
                let (keys, tx, proj, meta) = (
                    keys.clone(),
                    chunks_tx.clone(),
                    self.projections[pi].clone(),
                    meta.clone(),
                );
                tokio::task::spawn_blocking(move || {
                    for (ci, chunk) in keys.chunks(CHUNK).enumerate().skip(t).step_by(threads) {
                        let memo = MemoLookup::new(&reader, MEMO_ROWS);
                        let mut letters = Vec::new();
                        let r = render_docs(
                            &proj,
                            chunk.iter(),
                            first + (ci * CHUNK) as u64,
                            &memo,
                            &mut letters,
                            meta.as_ref(),
                        )
                        .map(|docs| (ci, (docs, letters)));
                        if tx.blocking_send(r).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(chunks_tx);
            let mut writes = tokio::task::JoinSet::new();
            let ctx = self.write_ctx(shutdown);
            let limit = self.limits[&self.projections[pi].spec.sink].clone();
            let mut done = 0u64;
            let mut letters = Vec::new();
            let mut rendering = true;
            loop {
                tokio::select! {
                    chunk = chunks_rx.recv(), if rendering && writes.len() < self.sink_concurrency => match chunk {
                        None => rendering = false,
                        Some(r) => {
                            let (_, (docs, mut lost_rows)) = r?;
                            letters.append(&mut lost_rows);
                            let job = super::write::Job {
                                pi,
                                sink: sink.clone(),
                                limit: limit.clone(),
                                target: target.clone(),
                                docs: Arc::new(docs),
                            };
                            let ctx = ctx.clone();
                            writes.spawn(async move {
                                let docs = job.docs.clone();
                                (write_job(ctx, job).await.1, docs)
                            });
                        }
                    },
                    Some(w) = writes.join_next(), if !writes.is_empty() => {
                        let (outcome, docs) = w.map_err(|e| EngineError::Lookup(format!("write task failed: {e}")))?;
                        match outcome {
                            Outcome::Written(rejections) => {
                                let p = &self.projections[pi];
                                letters.extend(rejections.into_iter().map(|r| rejection_letter(p, r, &docs)));
                                done += docs.len() as u64;
                                self.stats.documents += docs.len() as u64;
                                self.progress.advance(done);
                            }
                            Outcome::Stopped => return Ok(false),
                            Outcome::Lost(lost, why) => {
                                writes.abort_all();
                                drop(chunks_rx);
                                if lost == viewkeeper_core::sink::Lost::Sink {
                                    // The other projections on the sink lost theirs too: after this one.
                                    for p in self.projections.iter().filter(|p| p.spec.sink == self.projections[pi].spec.sink) {
                                        tokio::task::block_in_place(|| self.store.mark_resync(&p.name, &why))?;
                                    }
                                    self.resync_due = true;
                                }
                                warn!(projection = %name, reason = %why, "the sink lost documents during the re-write; starting it again");
                                continue 'again;
                            }
                        }
                    },
                    else => break,
                }
            }
            tokio::task::block_in_place(|| self.store.add_dead_letters(&letters))?;
            self.progress.finish();
            return Ok(true);
        }
    }

    /// Makes every projection's target ready (a search index and its alias exist),
    /// retrying each until its sink answers; a target created over a state store that
    /// already holds rows of its root (the search server lost its data while the worker
    /// was away) is marked for a whole re-write. `false`: shutdown.
    pub async fn prepare_targets(&mut self, shutdown: &CancellationToken) -> Result<bool, EngineError> {
        let counts = tokio::task::block_in_place(|| self.store.row_counts())?;
        for pi in 0..self.projections.len() {
            let sink = self.sinks[&self.projections[pi].spec.sink].clone();
            let mut backoff = viewkeeper_core::retry::backoff(self.retry_min, self.retry_max);
            let created = loop {
                match sink.prepare(&self.targets[pi]).await {
                    Ok(c) => break c,
                    Err(e) => {
                        let delay = backoff.delay();
                        warn!(sink = %sink.name(), projection = %self.projections[pi].name, error = %e,
                            retry_in_ms = delay.as_millis() as u64, "sink unreachable; retrying");
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => return Ok(false),
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            };
            let p = &self.projections[pi];
            if let Some(layout) = &self.targets[pi].layout {
                info!(projection = %p.name, alias = %layout.alias, created, "search index ready");
            }
            if created && counts.get(p.root_table()).is_some_and(|n| *n > 0) {
                let name = p.name.clone();
                tokio::task::block_in_place(|| {
                    self.store
                        .mark_resync(&name, "its index was created over a non-empty state store")
                })?;
            }
        }
        Ok(true)
    }

    /// Re-writes every document of the projections that read tables of `sources` (whose
    /// snapshots were applied without rendering). `false`: shutdown.
    pub(super) async fn render_snapshot(
        &mut self,
        sources: &[String],
        shutdown: &CancellationToken,
    ) -> Result<bool, EngineError> {
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

    /// Once no projection on `sink` waits for a re-write, stores what the sink's storage
    /// is now (Redis: its `run_id`): the next start compares it.
    pub(super) fn remember_identity(&mut self, sink: &str) -> Result<(), EngineError> {
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
    pub(super) async fn write_pending(&mut self, shutdown: &CancellationToken) -> Result<bool, EngineError> {
        let pending = tokio::task::block_in_place(|| self.store.pending())?;
        if pending.roots.is_empty() {
            return Ok(true);
        }
        let mut held = false;
        for (name, keys) in &pending.roots {
            let Some(pi) = self.projections.iter().position(|p| &p.name == name) else {
                continue; // no longer configured
            };
            if self.split_governs(pi) {
                // Split across workers: written once this worker knows what it owns (the
                // rows stay owed in the store until then).
                let split = self.split.as_mut().expect("governs");
                split.hold(pi, keys);
                held = true;
                continue;
            }
            info!(projection = %name, documents = keys.len(), "writing the documents a previous run did not finish");
            let keys: Vec<Key> = keys.clone();
            let Some(letters) = self.rewrite(pi, &keys, shutdown).await? else {
                return Ok(false);
            };
            tokio::task::block_in_place(|| self.store.add_dead_letters(&letters))?;
        }
        if !held {
            tokio::task::block_in_place(|| self.store.clear_pending(pending.through))?;
        }
        Ok(true)
    }

    /// Re-writes the projections marked in the store (see [`Engine::resync_projection`])
    /// whose sources have no re-read in progress (those are re-written when it ends).
    /// Marks of projections no longer configured are dropped. `false`: shutdown.
    pub(super) async fn resync_marked(&mut self, shutdown: &CancellationToken) -> Result<bool, EngineError> {
        let marks = tokio::task::block_in_place(|| self.store.resyncs())?;
        for (name, why) in marks {
            let Some(pi) = self.projections.iter().position(|p| p.name == name) else {
                tokio::task::block_in_place(|| self.store.clear_resync(&name))?;
                continue;
            };
            if self.split_governs(pi) && !self.split.as_ref().is_some_and(|s| s.known()) {
                info!(projection = %name, reason = %why, "re-writing the documents this worker owns once it knows which");
                continue;
            }
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
}
