//! The [`Source`] contract: what every source hands the engine, and how the engine
//! acknowledges it.
//!
//! * **Order.** Batches are sent in commit order. A batch holds whole transactions, or a
//!   chunk of one large transaction (then only its last chunk carries the checkpoint), so a
//!   checkpoint always falls on a transaction boundary.
//! * **Durability.** `checkpoint` is where the source can resume without losing anything of
//!   this batch or those before it. The engine sends it back on the source's ack channel
//!   only after the batch is in the state store and every sink made it durable, over a
//!   contiguous run of batches; only then may the source report it upstream (Postgres
//!   flushed LSN, Kafka committed offset).
//! * **Duplicates.** After a reconnect or a restart a source may send changes again:
//!   harmless, because a change not newer than a row's stored position is a no-op for the
//!   row (its documents are still written again).
//! * **Failure.** A [`SourceError`] carries its [`ErrorKind`]: the runtime retries or stops
//!   by [`ErrorKind::policy`].

use crate::checkpoint::Checkpoint;
use crate::error::{ErrorKind, Policy, Side};
use crate::model::Change;
use futures_util::future::BoxFuture;
use std::fmt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// A running source's wiring.
pub struct SourceRun {
    /// Where the state store says the source is durable (`None`: never loaded).
    pub from: Option<Checkpoint>,
    pub tx: mpsc::Sender<SourceBatch>,
    /// The engine's acknowledgements: the latest checkpoint durable everywhere.
    pub acks: watch::Receiver<Option<Checkpoint>>,
    pub shutdown: CancellationToken,
    /// Where a source that knows more than its checkpoints (Kafka: offsets per
    /// partition) publishes how far it is durable, once acknowledged.
    pub durable: crate::durable::DurableTx,
}

/// A source of committed row changes (see the module's contract).
pub trait Source: Send {
    fn name(&self) -> &str;
    /// Runs until shutdown or an error whose policy is to stop (it retries the others
    /// itself).
    fn run(self: Box<Self>, run: SourceRun) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// One or more committed transactions of one source (or a chunk of one).
#[derive(Debug, Default)]
pub struct SourceBatch {
    pub source: String,
    pub changes: Vec<Change>,
    /// Data of these transactions that could not be turned into changes.
    pub dead_letters: Vec<SourceDeadLetter>,
    /// `None` for a chunk of a transaction that goes on in the next batch, and for
    /// batches that are no resume point (snapshot chunks, re-reads).
    pub checkpoint: Option<Checkpoint>,
    /// Set on the batches of an initial snapshot or a re-read.
    pub snapshot: Option<SnapshotMark>,
    /// A partitioned source's ownership from this batch on (see [`Ownership`]).
    pub ownership: Option<Ownership>,
}

/// Which partitions of a partitioned source (several workers in one consumer group)
/// this worker writes the documents of. Carried by a batch, it takes effect once the
/// batch's changes are applied: a document is written only while the partition of its
/// root row is owned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ownership {
    /// Partitions of each of the source's topics (co-partitioned). A document rooted in a
    /// shared table belongs to partition `root row's partition mod partitions`.
    pub partitions: u32,
    pub owned: std::collections::BTreeSet<u32>,
    /// Partitions a rebalance in progress may take away: their documents affected
    /// meanwhile are remembered and written if the partitions stay (`owned` again).
    pub suspended: std::collections::BTreeSet<u32>,
    /// Partitions taken over with this batch (their rows are restored): every document
    /// of them is written again once the batch is applied, with versions above those the
    /// sinks hold for them (their previous owners' clocks may be ahead of this one's).
    pub takeover: std::collections::BTreeSet<u32>,
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
    /// Rows of partitions a worker takes over, read up to where the previous owner got:
    /// applied (not rendered), not a checkpoint; the batch taking the partitions over
    /// ([`Ownership::takeover`]) renders their documents.
    Restore,
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

/// A source failure, with its kind: the runtime retries or stops by its policy.
#[derive(Debug)]
pub struct SourceError {
    pub source_name: String,
    pub kind: ErrorKind,
    pub message: String,
}

impl SourceError {
    pub fn new(source_name: &str, kind: ErrorKind, message: impl Into<String>) -> Self {
        SourceError {
            source_name: source_name.to_string(),
            kind,
            message: message.into(),
        }
    }

    pub fn policy(&self) -> Policy {
        self.kind.policy(Side::Source)
    }

    /// Stops the worker (waiting would not heal it).
    pub fn is_fatal(&self) -> bool {
        self.policy() == Policy::Stop
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "source {}: {}", self.source_name, self.message)?;
        if self.policy() == Policy::Retry {
            f.write_str(" (retrying)")?;
        }
        Ok(())
    }
}

impl std::error::Error for SourceError {}
