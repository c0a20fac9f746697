//! What every source hands the engine, and how the engine acknowledges it.
//!
//! Contract for sources:
//! * Batches are sent in commit order; each holds whole transactions (never part of
//!   one), so a checkpoint always falls on a transaction boundary.
//! * `checkpoint` is the position from which the source can resume without losing
//!   anything of this batch or the ones before it. The engine sends it back on the
//!   source's ack channel only after the batch is in the state store and every sink
//!   acknowledged it; only then may the source report it upstream (Postgres flushed
//!   LSN, Kafka committed offset).
//! * After a reconnect a source may send changes again: duplicates are harmless,
//!   because the engine ignores changes not newer than a row's stored position.

use viewkeeper_projections::model::{Change, Position};

/// One or more committed transactions of one source.
#[derive(Debug, Default)]
pub struct SourceBatch {
    pub source: String,
    pub changes: Vec<Change>,
    /// Data of these transactions that could not be turned into changes.
    pub dead_letters: Vec<SourceDeadLetter>,
    pub checkpoint: Position,
    /// Set on the batches of an initial snapshot.
    pub snapshot: Option<SnapshotMark>,
}

/// Progress of an initial snapshot, carried by its batches and stored by the engine in
/// the same transaction as their rows.
#[derive(Clone, Debug, PartialEq)]
pub enum SnapshotMark {
    /// A snapshot starts from scratch (a new slot): forget earlier progress.
    Begin,
    /// The batch holds the rows of `table` up to `last_key` (the key columns' texts).
    Chunk { table: String, last_key: Vec<String> },
    /// `table` is read completely.
    TableDone { table: String },
    /// Changes streamed while the snapshot is paused because the slot retained too much
    /// WAL: applied (not rendered) and acknowledged so the slot advances, but not a
    /// checkpoint (the snapshot is not complete yet).
    CatchUp,
    /// Every table is read; the batch's checkpoint is where streaming goes on (the
    /// slot's consistent point, or the end of the last catch-up).
    Complete,
    /// A re-read of `table` (whose needed columns grew after the initial load) up to
    /// `last_key`: rows at the lowest position, so they only fill in columns the stored
    /// rows lack (and add rows the store never had); not a checkpoint.
    ReloadChunk { table: String, last_key: Vec<String> },
    /// The re-read of `table` is complete.
    ReloadDone { table: String },
}

impl SnapshotMark {
    /// Batches of a re-read (not of the initial snapshot).
    pub fn is_reload(&self) -> bool {
        matches!(self, SnapshotMark::ReloadChunk { .. } | SnapshotMark::ReloadDone { .. })
    }
}

/// Where a source's interrupted snapshot stands, per table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TableProgress {
    pub last_key: Option<Vec<String>>,
    pub done: bool,
}

/// A change the source could not decode: kept with its reason, never dropped silently.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceDeadLetter {
    /// Where in the source: a position (`LSN#ordinal`) or `topic[partition]@offset`.
    pub position: String,
    pub table: String,
    pub key: String,
    pub reason: String,
    pub payload: String,
}

/// A source failure: transient ones are retried by reconnecting, fatal ones stop the
/// worker with a message that says how to fix the cause.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {source_name}: {message} (retrying)")]
    Transient { source_name: String, message: String },
    #[error("source {source_name}: {message}")]
    Fatal { source_name: String, message: String },
}

impl SourceError {
    pub fn is_fatal(&self) -> bool {
        matches!(self, SourceError::Fatal { .. })
    }
}
