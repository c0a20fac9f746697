//! The initial snapshot: when a source's slot is created, every table is read in
//! primary-key order in chunks ([`super::chunks`]), each chunk one batch at the slot's
//! consistent point `(cp, 0)`, below every streamed change, with its progress, so an
//! interrupted snapshot resumes after its last stored chunk. A slot that retains too much
//! WAL meanwhile pauses the reads and is streamed up to the current WAL position first.

use super::chunks::{self, ChunkError};
use super::PgSource;
use std::collections::HashMap;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;
use viewkeeper_core::model::Position;
use viewkeeper_core::source::{SnapshotMark, SourceBatch, SourceError, TableProgress};
use viewkeeper_core::Checkpoint;

/// A paused snapshot streams the slot up to `until`; `conn` watches the slot meanwhile.
#[derive(Clone, Copy)]
pub(super) struct CatchUp<'a> {
    pub(super) until: Position,
    pub(super) conn: &'a tokio_postgres::Client,
}

impl PgSource {
    /// Reads every table not yet done, chunk by chunk, resuming after `progress`, then
    /// sends the final batch, whose checkpoint is returned: where streaming goes on.
    /// `Ok(None)`: shutdown.
    ///
    /// Throttling: the slot holds WAL from `cp` while the snapshot reads. When it
    /// retains more than `max_retained_wal_bytes`, reading pauses and the slot is
    /// streamed up to the current WAL position first (applied, acknowledged, so the
    /// slot lets go of that WAL). Rows streamed early are safe: snapshot rows carry
    /// position `(cp, 0)`, below every streamed change, so they never overwrite one.
    pub(super) async fn snapshot(
        &self,
        c: &tokio_postgres::Client,
        cp: Position,
        progress: &mut HashMap<String, TableProgress>,
        tx: &mpsc::Sender<SourceBatch>,
        acks: &mut watch::Receiver<Option<Checkpoint>>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Position>, SourceError> {
        let mut streamed = cp; // where a catch-up left the slot
        let mut pauses = 0u64;
        let err = |e: ChunkError| self.error(e.kind(), format!("initial snapshot: {e}"));
        c.batch_execute(chunks::SESSION_SETTINGS)
            .await
            .map_err(|e| self.sql_error("initial snapshot", &e))?;
        let mut tables: Vec<&String> = self.run.tables.keys().collect();
        tables.sort();
        let started = std::time::Instant::now();
        let mut rows = 0u64;
        info!(source = %self.name, consistent_point = %cp, "initial snapshot: reading existing rows");
        for table in tables {
            let p = progress.entry(table.clone()).or_default();
            if p.done {
                continue;
            }
            let binding = &self.run.tables[table];
            let tc = chunks::columns(c, table, binding).await.map_err(&err)?;
            loop {
                let (mut batch, next) = chunks::read_chunk(
                    c,
                    &self.name,
                    (table, binding, &tc),
                    p.last_key.as_deref(),
                    cp,
                    self.cfg.snapshot_chunk_rows,
                )
                .await
                .map_err(&err)?;
                let Some(next) = next else { break };
                rows += (batch.changes.len() + batch.dead_letters.len()) as u64;
                batch.snapshot = Some(SnapshotMark::Chunk {
                    table: table.clone(),
                    last_key: next.clone(),
                });
                if !self.send(tx, shutdown, batch).await? {
                    return Ok(None);
                }
                p.last_key = Some(next);
                let retained = self
                    .retained_wal(c)
                    .await
                    .map_err(|e| self.sql_error("initial snapshot: slot check", &e))?;
                if let Some((retained, current)) = retained {
                    metrics::gauge!("viewkeeper_slot_retained_wal_bytes", "source" => self.name.clone())
                        .set(retained as f64);
                    // Pause only when most of it is WAL not streamed yet: the rest (the slot's
                    // restart point trails its confirmed one) does not shrink by streaming.
                    let unread = current.major.saturating_sub(streamed.major);
                    let bound = self.cfg.max_retained_wal_bytes;
                    if retained > bound && unread > bound / 2 {
                        pauses += 1;
                        info!(source = %self.name, retained_wal_bytes = retained, unread_wal_bytes = unread, bound,
                            "snapshot paused: the slot retains more WAL than max_retained_wal_bytes");
                        let catch_up = CatchUp {
                            until: current,
                            conn: c,
                        };
                        streamed = self.stream(streamed, Some(catch_up), tx, acks, shutdown).await?;
                        if shutdown.is_cancelled() {
                            return Ok(None);
                        }
                        info!(source = %self.name, at = %streamed, "snapshot resumed");
                    }
                }
            }
            let done = SourceBatch {
                source: self.name.clone(),
                snapshot: Some(SnapshotMark::TableDone { table: table.clone() }),
                ..Default::default()
            };
            if !self.send(tx, shutdown, done).await? {
                return Ok(None);
            }
            p.done = true;
            info!(source = %self.name, %table, rows, elapsed_ms = started.elapsed().as_millis() as u64, "initial snapshot: table read");
        }
        let complete = SourceBatch {
            source: self.name.clone(),
            checkpoint: Some(Checkpoint::Lsn(streamed.major)),
            snapshot: Some(SnapshotMark::Complete),
            ..Default::default()
        };
        if !self.send(tx, shutdown, complete).await? {
            return Ok(None);
        }
        info!(source = %self.name, rows, pauses, elapsed_ms = started.elapsed().as_millis() as u64, "initial snapshot read");
        Ok(Some(streamed))
    }
}
