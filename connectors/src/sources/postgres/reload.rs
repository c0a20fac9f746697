//! Re-reads of tables whose needed columns grew after their initial load (a field or a
//! relation added to a projection, a table added to the config), while streaming goes on.
//!
//! Like the initial snapshot, each table is read in primary-key order in chunks (keyset
//! pagination), each chunk one batch carrying its progress
//! ([`SnapshotMark::ReloadChunk`]), which the engine stores with the rows, so a re-read
//! interrupted by a crash resumes after its last stored chunk. Rows carry the lowest
//! position, so they never overwrite a stored row: they only fill in the columns it lacks
//! (and add rows the store never had, for a new table). That is enough, because every
//! change committed since is streamed with a higher position: the re-read starts only once
//! the source streams, i.e. after the table is in the publication.

use super::chunks;
use super::connect::PgConnector;
use super::decode::TableBinding;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use viewkeeper_core::model::Position;
use viewkeeper_core::source::{SnapshotMark, SourceBatch, SourceError, TableProgress};
use viewkeeper_core::ErrorKind;

/// The re-reads of one source.
pub struct Reload {
    pub source: String,
    pub url: String,
    /// `schema.table`, its binding, where its re-read stands.
    pub tables: Vec<(String, TableBinding, TableProgress)>,
    pub chunk_rows: usize,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// The source's streaming flag: the re-read waits for it.
    pub streaming: Arc<AtomicBool>,
}

impl Reload {
    /// Runs every re-read to its end (retrying transient failures), or until shutdown.
    pub async fn run(mut self, tx: mpsc::Sender<SourceBatch>, shutdown: CancellationToken) -> Result<(), SourceError> {
        let pg = PgConnector::parse(&self.url)
            .map_err(|e| SourceError::new(&self.source, ErrorKind::Unfit, format!("bad connection string: {e}")))?;
        let mut backoff = viewkeeper_core::retry::backoff(self.retry_min, self.retry_max);
        loop {
            // Streaming means the table is in the publication: changes from here on reach
            // the slot, so what the re-read misses is streamed.
            while !self.streaming.load(Ordering::Relaxed) {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            match self.read_all(&pg, &tx, &shutdown).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    let delay = backoff.delay();
                    warn!(source = %self.source, error = %e, retry_in_ms = delay.as_millis() as u64, "re-read interrupted");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn read_all(
        &mut self,
        pg: &PgConnector,
        tx: &mpsc::Sender<SourceBatch>,
        shutdown: &CancellationToken,
    ) -> Result<(), SourceError> {
        let (c, task) = pg
            .connect()
            .await
            .map_err(|e| SourceError::new(&self.source, e.kind, format!("re-read: {e}")))?;
        let r = self.read_on(&c, tx, shutdown).await;
        drop(c);
        let _ = task.await;
        r
    }

    async fn read_on(
        &mut self,
        c: &tokio_postgres::Client,
        tx: &mpsc::Sender<SourceBatch>,
        shutdown: &CancellationToken,
    ) -> Result<(), SourceError> {
        let failed = |e: chunks::ChunkError| SourceError::new(&self.source, e.kind(), format!("re-read: {e}"));
        c.batch_execute(chunks::SESSION_SETTINGS)
            .await
            .map_err(|e| SourceError::new(&self.source, super::errors::kind_of_sql(&e), format!("re-read: {e}")))?;
        for (table, binding, progress) in &mut self.tables {
            if progress.done {
                continue;
            }
            let started = std::time::Instant::now();
            info!(source = %self.source, %table, resumed = progress.last_key.is_some(), "re-reading table");
            let tc = chunks::columns(c, table, binding).await.map_err(failed)?;
            let mut rows = 0usize;
            loop {
                let (mut batch, next) = chunks::read_chunk(
                    c,
                    &self.source,
                    (table, binding, &tc),
                    progress.last_key.as_deref(),
                    Position::ZERO,
                    self.chunk_rows,
                )
                .await
                .map_err(failed)?;
                let mark = match &next {
                    Some(last_key) => SnapshotMark::ReloadChunk {
                        table: table.clone(),
                        last_key: last_key.clone(),
                    },
                    None => SnapshotMark::ReloadDone { table: table.clone() },
                };
                rows += batch.changes.len() + batch.dead_letters.len();
                batch.snapshot = Some(mark);
                let sent = tokio::select! {
                    _ = shutdown.cancelled() => false,
                    r = tx.send(batch) => r.is_ok(),
                };
                if !sent {
                    return Ok(());
                }
                match next {
                    Some(n) => progress.last_key = Some(n),
                    None => {
                        progress.done = true;
                        info!(source = %self.source, %table, rows, elapsed_ms = started.elapsed().as_millis() as u64, "table re-read");
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}
