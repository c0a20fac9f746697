//! The [`Sink`] contract: what every sink receives, what it promises, how it fails.
//!
//! * **Whole documents, versioned.** A write carries whole documents with versions from
//!   the engine's clock; a sink never lets an older version overwrite a newer one (Redis:
//!   compare-and-set on `_version`; search: `version_type=external_gte`). Writing a document
//!   twice, or an older one after a newer, is therefore harmless: the engine may retry,
//!   replay, and have several writes in flight at once.
//! * **Durable when `Ok`.** `write` returns `Ok` only when every document is durable in the
//!   sink or refused for good (a [`Rejection`], which the engine dead-letters with the
//!   sink's reason). Nothing is acknowledged to a source before that.
//! * **`Err` assumes nothing.** The engine retries the whole write by the error's policy
//!   ([`crate::error`]); a [`Lost`] error makes it re-write what the sink lost first.
//! * **No order** between writes: versions order them.

use crate::error::{ErrorKind, Policy, Side};
use crate::model::Row;
use futures_util::future::BoxFuture;
use serde_json::Value;

/// One document to write.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkDoc {
    /// Search `_id` or cache key.
    pub id: String,
    /// The root row's key as plain text (`42`, `1001:2`): the member of cache sets.
    pub member: String,
    /// The root row's key in the state store's canonical form (`[42]`), for dead letters.
    pub root: String,
    /// `None` removes the document.
    pub body: Option<Row>,
    pub version: u64,
    pub tombstoned: bool,
    /// Whether the document belongs in the target's active set (when it has one).
    pub active: bool,
}

/// How a search index is laid out: readers query `alias`; documents live in the versioned
/// `index` behind it, created with `settings` and `mappings` when the alias is missing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IndexLayout {
    pub alias: String,
    pub index: String,
    pub settings: Value,
    pub mappings: Value,
}

/// Where one projection's documents go, as the sink needs to know it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Target {
    pub projection: String,
    /// Search sinks: the alias to write through (a missing alias is lost data, never an
    /// auto-created index).
    pub layout: Option<IndexLayout>,
    /// Search sinks: write into this concrete index instead of through the alias (a
    /// rebuild filling a new index).
    pub into: Option<String>,
    /// Search sinks: also write into this concrete index (a rebuild in progress, which the
    /// worker keeps up to date).
    pub also_into: Option<String>,
    /// Cache sinks: the set holding the members of the active documents.
    pub active_set: Option<String>,
    /// Cache sinks: tombstoned entries expire after this many seconds.
    pub tombstone_ttl_ms: Option<u64>,
}

/// A document the sink refused for good, with the sink's reason.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub id: String,
    pub reason: String,
}

/// What a sink lost, when a write finds out that it lost documents it had acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// The projection's documents (the index behind its alias is gone): the engine
    /// recreates the index and re-writes every document of the projection.
    Projection,
    /// Everything on the sink (Redis restarted empty or from an old file, a failover to
    /// a replica that missed writes): every projection on it is re-written.
    Sink,
}

/// A failure of a whole write.
#[derive(Debug, thiserror::Error)]
#[error("sink {sink}: {message}")]
pub struct SinkError {
    pub sink: String,
    pub kind: ErrorKind,
    pub message: String,
}

impl SinkError {
    /// A failure of no known kind: retried.
    pub fn new(sink: &str, message: impl Into<String>) -> Self {
        SinkError::of(sink, ErrorKind::Remote, message)
    }

    pub fn of(sink: &str, kind: ErrorKind, message: impl Into<String>) -> Self {
        SinkError {
            sink: sink.to_string(),
            kind,
            message: message.into(),
        }
    }

    pub fn lost(sink: &str, lost: Lost, message: impl Into<String>) -> Self {
        SinkError::of(sink, ErrorKind::Lost(lost), message)
    }

    /// What the sink lost, if that is what happened.
    pub fn lost_what(&self) -> Option<Lost> {
        match self.kind {
            ErrorKind::Lost(l) => Some(l),
            _ => None,
        }
    }

    pub fn policy(&self) -> Policy {
        self.kind.policy(Side::Sink)
    }
}

/// A sink of whole, versioned documents (see the module's contract).
pub trait Sink: Send + Sync {
    fn name(&self) -> &str;

    /// Makes `target` ready to be written (a search index and its alias exist); `Ok(true)`
    /// when it had to be created, i.e. holds nothing yet. Sinks without such a step (a
    /// Redis hash is created by its first write) keep this default.
    fn prepare<'a>(&'a self, _target: &'a Target) -> BoxFuture<'a, Result<bool, SinkError>> {
        Box::pin(async { Ok(false) })
    }

    /// Writes the documents of one projection (see the module's contract).
    fn write<'a>(&'a self, target: &'a Target, docs: &'a [SinkDoc])
        -> BoxFuture<'a, Result<Vec<Rejection>, SinkError>>;

    /// What the sink's storage is now (Redis: the server's `run_id`), when it can tell:
    /// kept with the state store, another one on the next start means the documents
    /// written before may be gone.
    fn identity(&self) -> Option<String> {
        None
    }

    /// How many of `ids` the sink holds (`None`: it cannot tell); none of a sample of
    /// stored documents means the sink lost them.
    fn holds<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<Option<usize>, SinkError>> {
        let _ = ids;
        Box::pin(async { Ok(None) })
    }

    /// The highest version the sink holds among the documents `ids` of `target` (`None`:
    /// none of them, or it cannot tell). A worker taking documents over from another
    /// raises its clock above it, so its writes are not refused as older.
    fn max_version<'a>(
        &'a self,
        target: &'a Target,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Option<u64>, SinkError>> {
        let _ = (target, ids);
        Box::pin(async { Ok(None) })
    }
}
