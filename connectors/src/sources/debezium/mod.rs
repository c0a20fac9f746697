//! The Debezium source: change events of a Debezium connector's Kafka topics
//! (JsonConverter, with or without schemas) as [`viewkeeper_core::model::Change`]s.
//!
//! * [`config`]: the `[sources.NAME]` settings.
//! * [`consumer`]: the Kafka consumer group ([`DebeziumSource`]), batching, offsets stored
//!   only once the engine acknowledged, rebalances.
//! * [`group`]: several workers (assignment whole, partitioned or shared); `scale` the
//!   partitioned and shared assignments; [`describe`]: the group as the brokers see it
//!   (`viewkeeper status`).
//!
//! The decoding is pure (no Kafka client): the consumer hands each record's topic, key
//! and value bytes to [`decode`].
//!
//! * [`envelope`]: the record → [`Decoded`] (a change, or why it is skipped) or a
//!   [`DecodeError`] for the dead-letter store; ops, keys, positions, skips.
//! * [`values`]: one column value → the project's JSON conventions, by [`ColumnType`]
//!   (from the Connect schema, or from configured hints when there is none).
//! * `decimal`: Connect's decimal encodings → exact decimal text, big integers by hand.
//! * `time`: Debezium's temporal encodings rendered as the pgoutput source renders the
//!   same Postgres types.
//!
//! Invariants shared with the pgoutput source (`crate::sources::postgres`): a Postgres row decodes
//! to the same cells whichever source delivered it (exact numerics as decimal text,
//! `timestamptz` in UTC with `+00:00`, `timestamp` without offset, json parsed, bytea
//! base64), within the limits [`values`] lists; unchanged TOAST values are
//! [`Cell::Unchanged`](viewkeeper_core::model::Cell); a replayed record decodes to
//! the same change with the same position.

pub mod config;
pub mod consumer;
mod decimal;
pub mod describe;
pub mod envelope;
pub mod group;
mod scale;
mod time;
pub mod values;

#[cfg(test)]
mod tests;

pub use config::DebeziumConfig;
pub use consumer::{topic_tables, DebeziumSource, FedTable};
pub use envelope::{decode, decode_key, topic_kind, DecodeError, Decoded, ErrorKind, Skip, TopicKind, TopicTable};
pub use group::{Assignment, Gate, Scaling};
pub use values::ColumnType;
