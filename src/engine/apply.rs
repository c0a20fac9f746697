//! Step 1 of a batch: in one state-store transaction, apply every change, find the root
//! keys of every projection it affects (each document once per batch), reserve their
//! versions, render the documents, and store the source's dead letters and the documents
//! still owed; commit. Snapshot and re-read batches are applied without rendering: their
//! documents are rendered whole once the snapshot (or re-read) is complete.

use super::{Engine, EngineError, MEMO_ROWS};
use crate::store::Applied;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tracing::warn;
use viewkeeper_core::model::Key;
use viewkeeper_core::sink::SinkDoc;
use viewkeeper_core::source::{SnapshotMark, SourceBatch};
use viewkeeper_core::{Checkpoint, DeadLetter, Stage};
use viewkeeper_projections::render::{MemoLookup, Projection, RenderError, RowLookup};

/// What is kept of a batch once it is applied (the changes themselves are not).
#[derive(Debug)]
pub(super) struct BatchInfo {
    pub source: String,
    pub checkpoint: Option<Checkpoint>,
    pub snapshot: Option<SnapshotMark>,
    pub changes: usize,
    /// Commit time of its newest change (0: none, or a snapshot read).
    pub newest_commit_ms: i64,
}

/// A batch applied and rendered, on its way to the sinks.
pub(super) struct Prepared {
    pub infos: Vec<BatchInfo>,
    /// Per projection index.
    pub docs: Vec<Arc<Vec<SinkDoc>>>,
    /// Per projection index: the index a rebuild in progress fills beside the alias.
    pub also_into: Vec<Option<String>>,
    /// Rendering failures.
    pub letters: Vec<DeadLetter>,
    /// Sources whose initial snapshot completed with this batch.
    pub completed: Vec<String>,
    /// Tag of its pending documents (cleared with its checkpoint).
    pub tag: Option<u64>,
    /// Queue permits to hand back once durable.
    pub permits: usize,
    /// Dead letters of the sources (stored with the batch's state), for the metrics and
    /// the status page.
    pub source_letters: Vec<DeadLetter>,
    /// Partitions taken over with this batch: their documents are written whole before
    /// it is acknowledged ([`super::split`]).
    pub takeover: BTreeSet<u32>,
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

/// Whether an applied change leaves every column in `cols` as it was (so a projection
/// reading only those columns of the table has nothing to re-render).
fn unchanged_for(applied: &Applied, cols: Option<&BTreeSet<String>>) -> bool {
    match (applied.in_place, applied.images.as_slice(), cols) {
        (true, [before, after], Some(cols)) => cols.iter().all(|c| before.get(c) == after.get(c)),
        _ => false,
    }
}

/// Renders the documents of `keys`, numbering versions from `first`; rows that cannot be
/// rendered become dead letters.
/// With `meta` (the projection's `meta = true`), each body gets it as its `_meta` field.
pub(super) fn render_docs<'a>(
    p: &Projection,
    keys: impl Iterator<Item = &'a Key>,
    first: u64,
    lookup: &dyn RowLookup,
    letters: &mut Vec<DeadLetter>,
    meta: Option<&serde_json::Value>,
) -> Result<Vec<SinkDoc>, EngineError> {
    let mut docs = Vec::new();
    for (i, key) in keys.enumerate() {
        match p.render(key, lookup) {
            Ok(Some(mut r)) => {
                if let (Some(m), Some(body)) = (meta, r.body.as_mut()) {
                    body.insert(super::meta::META_FIELD.into(), m.clone());
                }
                let active = !r.tombstoned
                    && match (&p.spec.active_when, &r.body) {
                        (Some(cond), Some(body)) => body.get(&cond.column).is_some_and(|v| cond.values.contains(v)),
                        _ => false,
                    };
                docs.push(SinkDoc {
                    root: key.as_str().to_string(),
                    id: r.id,
                    member: plain_key(key),
                    body: r.body,
                    version: first + i as u64,
                    tombstoned: r.tombstoned,
                    active,
                })
            }
            Ok(None) => {}
            Err(RenderError::Lookup(e)) => return Err(EngineError::Lookup(e.to_string())),
            Err(e @ RenderError::Row { .. }) => {
                warn!(projection = %p.name, key = %key, error = %e, "cannot render; dead-lettered");
                letters.push(DeadLetter {
                    table: p.root_table().to_string(),
                    key: key.to_string(),
                    stage: Stage::Render {
                        projection: p.name.clone(),
                    },
                    reason: e.to_string(),
                    ..Default::default()
                });
            }
        }
    }
    Ok(docs)
}

impl Engine {
    /// Step 1 (see the module docs), on the calling thread (it blocks).
    pub(super) fn apply_and_render(&mut self, batches: Vec<SourceBatch>) -> Result<Prepared, EngineError> {
        let permits = self.queue_permits.as_ref().map_or(0, |q| q.cost(&batches));
        let tx = self.store.begin()?;
        let mut affected: Vec<BTreeSet<Key>> = vec![BTreeSet::new(); self.projections.len()];
        let mut source_letters = Vec::new();
        let mut completed = Vec::new();
        let mut infos = Vec::with_capacity(batches.len());
        let mut takeover = BTreeSet::new();
        for b in &batches {
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
                        stage: Stage::Apply,
                        reason,
                        ..Default::default()
                    });
                }
                if b.snapshot.is_some() {
                    continue; // rendered whole once the snapshot or re-read is complete
                }
                let images: Vec<&_> = applied.images.iter().collect();
                for (pi, p) in self.projections.iter().enumerate() {
                    if p.uses_table(&c.table) && !unchanged_for(&applied, self.needed[pi].get(&c.table)) {
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
                    stage: Stage::Decode,
                    reason: d.reason.clone(),
                    payload: d.payload.clone(),
                    ..Default::default()
                });
            }
            if let (Some(own), Some(split)) = (&b.ownership, self.split.as_mut()) {
                // Gathered last (see `gather`): what came before was under the old ownership.
                for (pi, p) in self.projections.iter().enumerate() {
                    split.retain(pi, p.root_table(), &mut affected[pi], &tx)?;
                }
                let first = !split.known();
                takeover.extend(split.take(own.clone(), &mut affected));
                tx.record_ownership(&split.record())?;
                if first {
                    self.resync_due = true; // marked re-writes waited for it
                }
            }
            tx.record_streams(&b.changes)?;
            super::meta::record(&mut self.applied, b);
            self.stats.changes += b.changes.len() as u64;
            infos.push(BatchInfo {
                source: b.source.clone(),
                checkpoint: b.checkpoint,
                snapshot: b.snapshot.clone(),
                changes: b.changes.len(),
                newest_commit_ms: b.changes.iter().map(|c| c.commit_time_ms).max().unwrap_or(0),
            });
        }
        drop(batches);
        if let Some(split) = self.split.as_mut() {
            for (pi, p) in self.projections.iter().enumerate() {
                split.retain(pi, p.root_table(), &mut affected[pi], &tx)?;
            }
        }
        tx.add_dead_letters(&source_letters)?;
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
        let mut docs = Vec::with_capacity(self.projections.len());
        let mut letters = Vec::new();
        // Every change is applied: the store holds still while the documents render.
        let now = super::observe::now_ms();
        let metas: Vec<_> = self
            .projections
            .iter()
            .map(|p| super::meta::meta_of(p, &self.applied, now))
            .collect();
        let memo = MemoLookup::new(&tx, MEMO_ROWS);
        for (pi, p) in self.projections.iter().enumerate() {
            docs.push(Arc::new(render_docs(
                p,
                affected[pi].iter(),
                version,
                &memo,
                &mut letters,
                metas[pi].as_ref(),
            )?));
            version += affected[pi].len() as u64;
        }
        drop(memo);
        tx.commit()?;
        // A rebuild in progress (maybe in another process) fills a new index: its documents
        // go there too. Read after this batch was applied, so the rebuild's own render
        // (which starts after it registered) covers everything written before.
        let mut also_into = Vec::with_capacity(self.projections.len());
        for (pi, p) in self.projections.iter().enumerate() {
            let needs = !docs[pi].is_empty() && self.targets[pi].layout.is_some();
            also_into.push(if needs {
                self.store.rebuild_target(&p.name)?
            } else {
                None
            });
        }
        Ok(Prepared {
            infos,
            docs,
            also_into,
            letters,
            completed,
            tag,
            permits,
            source_letters,
            takeover,
        })
    }
}

/// The checkpoints and acknowledgements of applied batches, per source. Catch-up batches
/// (streamed while a snapshot is paused) are acknowledged, so the slot advances, but are
/// no checkpoint: the snapshot is not complete yet.
pub(super) fn checkpoints_of(infos: &[BatchInfo]) -> (BTreeMap<String, Checkpoint>, BTreeMap<String, Checkpoint>) {
    let mut checkpoints: BTreeMap<String, Checkpoint> = BTreeMap::new();
    let mut acks: BTreeMap<String, Checkpoint> = BTreeMap::new();
    for b in infos {
        let Some(cp) = b.checkpoint else { continue };
        let merge = |m: &mut BTreeMap<String, Checkpoint>| {
            m.entry(b.source.clone()).and_modify(|e| *e = e.max(cp)).or_insert(cp);
        };
        merge(&mut acks);
        if b.snapshot != Some(SnapshotMark::CatchUp) {
            merge(&mut checkpoints);
        }
    }
    (checkpoints, acks)
}
