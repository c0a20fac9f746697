//! What every sink receives and how it reports failure.
//!
//! Contract for sinks:
//! * A write carries whole documents with versions from the engine's clock; a sink
//!   must never let an older version overwrite a newer one (Redis: compare-and-set on
//!   `_version`; search: `version_type=external_gte`). Writing the same document
//!   twice is therefore harmless, and the engine may retry or replay at will.
//! * `write` returns `Ok` only when every document is durable in the sink or was
//!   rejected for good (returned as a [`Rejection`], which the engine dead-letters).
//! * `Err(SinkError)` means nothing can be assumed: the engine retries the whole
//!   write with backoff and does not advance any checkpoint meanwhile.

use viewkeeper_projections::model::Row;

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

/// A failure of a whole write: retried by the engine.
#[derive(Debug, thiserror::Error)]
#[error("sink {sink}: {message}")]
pub struct SinkError {
    pub sink: String,
    pub message: String,
    /// Set when the sink lost data: the engine re-writes what it lost before retrying.
    pub lost: Option<Lost>,
}

impl SinkError {
    pub fn new(sink: &str, message: impl Into<String>) -> Self {
        SinkError {
            sink: sink.to_string(),
            message: message.into(),
            lost: None,
        }
    }

    pub fn lost(sink: &str, lost: Lost, message: impl Into<String>) -> Self {
        SinkError {
            lost: Some(lost),
            ..SinkError::new(sink, message)
        }
    }
}
