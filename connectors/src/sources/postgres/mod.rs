//! The Postgres source (pgoutput over `pgwire-replication`): prepares the publication and
//! slot ([`setup`]), takes the initial snapshot when the slot is new ([`initial_load`]),
//! streams ([`stream`]) and re-reads tables whose needed columns grew ([`reload`]), and
//! hands transactions to the engine in commit order.
//!
//! Acknowledgement: the flushed LSN reported to Postgres is exactly the checkpoint the
//! engine sent back (the end LSN of the last transaction that is in the state store and in
//! every sink). While idle, a keepalive's WAL end is passed through the engine as an empty
//! batch, so the checkpoint, and with it the slot, moves forward on a quiet database; slot
//! checks and heartbeats run beside the stream ([`slot`]).
//!
//! Errors are classified once ([`errors`]): losing the connection is retried (reconnect
//! with backoff, resume from the checkpoint; duplicates are harmless); a missing or
//! invalidated slot while a checkpoint exists, a table without a usable replica identity,
//! `wal_level` other than `logical`, or TLS that cannot be set up stop the worker, with the
//! fix in the message.
//!
//! Files: [`config`] (the `[sources.NAME]` settings), [`connect`] (URLs and TLS),
//! [`pgoutput`] (the wire decoder), [`values`] (text values → JSON), [`decode`] (messages →
//! changes), [`chunks`] (keyset reads of a table, shared by the snapshot, re-reads and
//! `verify`).

pub mod chunks;
pub mod config;
pub mod connect;
pub mod decode;
pub mod errors;
mod initial_load;
pub mod pgoutput;
pub mod reload;
mod setup;
mod slot;
mod stream;
pub mod values;

pub use config::{PostgresConfig, SnapshotMode};
pub use connect::{BadUrl, PgConnectError, PgConnector};

use decode::TableBinding;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use viewkeeper_core::model::Position;
use viewkeeper_core::source::{SnapshotMark, Source, SourceBatch, SourceError, SourceRun, TableProgress};
use viewkeeper_core::{Checkpoint, ErrorKind};

/// What a run of the source needs beside its config.
#[derive(Clone, Debug)]
pub struct PgRun {
    /// `schema.table` → binding.
    pub tables: HashMap<String, TableBinding>,
    /// Backoff of reconnects: first and largest delay.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Read the existing rows when the slot is created (see [`initial_load`]).
    pub initial_snapshot: bool,
    /// Where an interrupted snapshot stands (from the state store), per table.
    pub snapshot_progress: HashMap<String, TableProgress>,
    /// `viewkeeper backfill`: stop once the snapshot is sent instead of streaming.
    pub stop_after_snapshot: bool,
    /// Set while streaming from the slot (read by the worker's `/readyz` and the re-reads).
    pub streaming: Arc<AtomicBool>,
}

/// How a (re)connection starts.
enum Start {
    Stream,
    /// Take (or resume) the initial snapshot; `fresh`: the slot was just created.
    Snapshot {
        cp: Position,
        fresh: bool,
    },
}

pub struct PgSource {
    name: String,
    cfg: PostgresConfig,
    run: PgRun,
    /// The parsed URL with its TLS setup (an error: the URL or its CA file is bad).
    pg: Result<PgConnector, BadUrl>,
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_table(t: &str) -> String {
    t.split('.').map(quote_ident).collect::<Vec<_>>().join(".")
}

/// The LSN the engine last acknowledged (as a row position: `(lsn, 0)`).
fn acked(acks: &watch::Receiver<Option<Checkpoint>>) -> Position {
    acks.borrow().map_or(Position::ZERO, |c| Position::new(c.value(), 0))
}

impl PgSource {
    pub fn new(name: &str, cfg: PostgresConfig, run: PgRun) -> Self {
        let pg = cfg.connector();
        PgSource {
            name: name.to_string(),
            cfg,
            run,
            pg,
        }
    }

    fn connector(&self) -> Result<&PgConnector, SourceError> {
        self.pg
            .as_ref()
            .map_err(|e| self.error(ErrorKind::Unfit, format!("bad connection string: {e}")))
    }

    fn error(&self, kind: ErrorKind, message: impl Into<String>) -> SourceError {
        SourceError::new(&self.name, kind, message)
    }

    /// A failed connection while `what`, with its kind (TLS failures stop the worker).
    fn connect_failed(&self, what: &str, e: PgConnectError) -> SourceError {
        self.error(e.kind, format!("{what}: {e}"))
    }

    /// Runs `f` on a connection of its own, closed (and its task awaited) afterwards.
    async fn on_connection<T>(
        &self,
        what: &str,
        f: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        let (client, conn_task) = self
            .connector()?
            .connect()
            .await
            .map_err(|e| self.connect_failed(what, e))?;
        let r = f(&client).await;
        drop(client);
        let _ = conn_task.await;
        r
    }

    fn status_interval(&self) -> Duration {
        Duration::from_millis(self.cfg.status_interval_ms)
    }

    /// Runs until shutdown or an error that stops the worker, reconnecting after the
    /// others.
    async fn run_until(self, r: SourceRun) -> Result<(), SourceError> {
        let SourceRun {
            from,
            tx,
            mut acks,
            shutdown,
            ..
        } = r;
        let checkpoint = from.map(|c| Position::new(c.value(), 0));
        let mut backoff = viewkeeper_core::retry::backoff(self.run.retry_min, self.run.retry_max);
        let mut progress = self.run.snapshot_progress.clone();
        // Acks alone do not say the snapshot is complete: catch-up batches are acked too.
        let mut loaded = checkpoint.is_some_and(|c| c != Position::ZERO);
        loop {
            let resume = acked(&acks).max(checkpoint.unwrap_or_default());
            let result = match self.prepare(loaded).await {
                Ok(Start::Snapshot { cp, fresh }) => {
                    if fresh {
                        progress.clear();
                        let begin = SourceBatch {
                            source: self.name.clone(),
                            snapshot: Some(SnapshotMark::Begin),
                            ..Default::default()
                        };
                        if !self.send(&tx, &shutdown, begin).await? {
                            return Ok(());
                        }
                    }
                    let snapshot = self.on_connection("initial snapshot", async |c| {
                        self.snapshot(c, cp, &mut progress, &tx, &mut acks, &shutdown).await
                    });
                    match snapshot.await {
                        Ok(Some(_)) if self.run.stop_after_snapshot => return Ok(()),
                        Ok(Some(from)) => {
                            loaded = true;
                            self.stream(from, None, &tx, &mut acks, &shutdown).await.map(|_| ())
                        }
                        Ok(None) => return Ok(()),
                        Err(e) => Err(e),
                    }
                }
                Ok(Start::Stream) if self.run.stop_after_snapshot => {
                    info!(source = %self.name, "already loaded (the state store has a checkpoint): nothing to backfill");
                    return Ok(());
                }
                Ok(Start::Stream) => self.stream(resume, None, &tx, &mut acks, &shutdown).await.map(|_| ()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    let delay = backoff.delay();
                    warn!(source = %self.name, error = %e, retry_in_ms = delay.as_millis() as u64, "postgres source interrupted");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Hands a batch to the engine (waiting for room); `Ok(false)` on shutdown.
    async fn send(
        &self,
        tx: &mpsc::Sender<SourceBatch>,
        shutdown: &CancellationToken,
        b: SourceBatch,
    ) -> Result<bool, SourceError> {
        tokio::select! {
            _ = shutdown.cancelled() => Ok(false),
            r = tx.send(b) => r.map(|_| true).map_err(|_| self.error(ErrorKind::Unavailable, "engine stopped")),
        }
    }
}

impl Source for PgSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(self: Box<Self>, run: SourceRun) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin((*self).run_until(run))
    }
}
