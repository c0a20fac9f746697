//! Step 2 of a batch: its documents go to the sinks, every projection's write at once, in a
//! task of its own (so the next batch is applied and rendered meanwhile), each sink with a
//! bounded number of requests in flight. A write that fails is retried with backoff until
//! the sink takes it, the sink says it lost data (then the engine re-writes what it lost
//! and this write again), or the worker stops (then nothing of the batch is checkpointed:
//! it replays, and its documents are still owed in the state store).

use super::observe::observe_write;
use super::{Engine, EngineError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use viewkeeper_core::model::Key;
use viewkeeper_core::sink::{Lost, Rejection, Sink, SinkDoc, SinkError, Target};
use viewkeeper_core::{DeadLetter, Stage};
use viewkeeper_projections::render::Projection;

/// One projection's write of one batch, as its task needs it.
pub(super) struct Job {
    pub pi: usize,
    pub sink: Arc<dyn Sink>,
    pub limit: Arc<Semaphore>,
    pub target: Target,
    pub docs: Arc<Vec<SinkDoc>>,
}

/// How one projection's write of a batch ended.
pub(super) enum Outcome {
    Written(Vec<Rejection>),
    /// The sink lost data: re-write what it lost, then this write.
    Lost(Lost, String),
    /// Shutdown came first.
    Stopped,
}

/// What the write tasks share: the backoff bounds, readiness flags, the stop signal.
#[derive(Clone)]
pub(super) struct WriteCtx {
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub health: Option<Arc<crate::http::Health>>,
    pub abort: CancellationToken,
}

/// One write, measured.
async fn attempt(ctx: &WriteCtx, job: &Job) -> Result<Vec<Rejection>, SinkError> {
    let _permit = job.limit.acquire().await.expect("never closed");
    let started = std::time::Instant::now();
    let r = job.sink.write(&job.target, &job.docs).await;
    observe_write(
        ctx.health.as_deref(),
        &job.target.projection,
        job.sink.name(),
        r.is_ok(),
        job.docs.len(),
        started.elapsed(),
    );
    r
}

/// Writes one projection's documents until the sink takes them (see the module docs).
pub(super) async fn write_job(ctx: WriteCtx, job: Job) -> (usize, Outcome) {
    let mut backoff = viewkeeper_core::retry::backoff(ctx.retry_min, ctx.retry_max);
    loop {
        let e = match attempt(&ctx, &job).await {
            Ok(r) => return (job.pi, Outcome::Written(r)),
            Err(e) => e,
        };
        if let Some(lost) = e.lost_what() {
            return (job.pi, Outcome::Lost(lost, e.to_string()));
        }
        let delay = backoff.delay();
        warn!(projection = %job.target.projection, error = %e, retry_in_ms = delay.as_millis() as u64, "sink write failed; retrying (nothing is acknowledged meanwhile)");
        tokio::select! {
            biased;
            _ = ctx.abort.cancelled() => return (job.pi, Outcome::Stopped),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Every projection's write of one batch, at once.
pub(super) async fn write_batch(ctx: WriteCtx, jobs: Vec<Job>) -> Vec<(usize, Outcome)> {
    futures_util::future::join_all(jobs.into_iter().map(|j| write_job(ctx.clone(), j))).await
}

/// A document the sink refused: keyed by its root row, so `dlq replay` can render it again.
pub(super) fn rejection_letter(p: &Projection, r: Rejection, docs: &[SinkDoc]) -> DeadLetter {
    let root = docs.iter().find(|d| d.id == r.id).map(|d| d.root.clone());
    DeadLetter {
        table: p.root_table().to_string(),
        key: root.unwrap_or_else(|| r.id.clone()),
        stage: Stage::Sink {
            sink: p.spec.sink.clone(),
            projection: p.name.clone(),
        },
        reason: format!("document {}: {}", r.id, r.reason),
        ..Default::default()
    }
}

impl Engine {
    pub(super) fn write_ctx(&self, abort: &CancellationToken) -> WriteCtx {
        WriteCtx {
            retry_min: self.retry_min,
            retry_max: self.retry_max,
            health: self.health.clone(),
            abort: abort.clone(),
        }
    }

    /// The job of writing `docs` of projection `pi` (and into `also_into`, a rebuild's
    /// index).
    pub(super) fn job(&self, pi: usize, docs: Arc<Vec<SinkDoc>>, also_into: Option<String>) -> Job {
        let sink_name = &self.projections[pi].spec.sink;
        Job {
            pi,
            sink: self.sinks[sink_name].clone(),
            limit: self.limits[sink_name].clone(),
            target: Target {
                also_into,
                ..self.targets[pi].clone()
            },
            docs,
        }
    }

    /// Writes `docs` of projection `pi` until the sink takes them, re-writing what a sink
    /// lost first. `None`: shutdown.
    pub(super) async fn write_retrying(
        &mut self,
        pi: usize,
        docs: Arc<Vec<SinkDoc>>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<Rejection>>, EngineError> {
        loop {
            let also = tokio::task::block_in_place(|| self.store.rebuild_target(&self.projections[pi].name))?;
            let job = self.job(pi, docs.clone(), also);
            match write_job(self.write_ctx(shutdown), job).await.1 {
                Outcome::Written(r) => return Ok(Some(r)),
                Outcome::Stopped => return Ok(None),
                Outcome::Lost(lost, why) => {
                    if !self.recover(pi, lost, &why, shutdown).await? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Renders the documents of root `keys` of projection `pi` again and writes them
    /// (`dlq replay`, documents owed by a previous run). Returns what still cannot be
    /// rendered or written; `None`: shutdown.
    pub async fn rewrite(
        &mut self,
        pi: usize,
        keys: &[Key],
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<DeadLetter>>, EngineError> {
        let meta = self.meta_of(pi);
        let (docs, mut letters) = tokio::task::block_in_place(|| -> Result<_, EngineError> {
            let tx = self.store.begin()?;
            let first = tx.next_versions(keys.len() as u64)?;
            let mut letters = Vec::new();
            let docs = super::apply::render_docs(
                &self.projections[pi],
                keys.iter(),
                first,
                &tx,
                &mut letters,
                meta.as_ref(),
            )?;
            tx.commit()?;
            Ok((docs, letters))
        })?;
        if !docs.is_empty() {
            let docs = Arc::new(docs);
            let Some(rejections) = self.write_retrying(pi, docs.clone(), shutdown).await? else {
                return Ok(None);
            };
            let p = &self.projections[pi];
            letters.extend(rejections.into_iter().map(|r| rejection_letter(p, r, &docs)));
        }
        Ok(Some(letters))
    }

    /// A sink lost what it had acknowledged: re-writes the projection, or every projection
    /// on the sink. `false`: shutdown.
    pub(super) async fn recover(
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
}
