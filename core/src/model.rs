//! The data model shared by sources, the state store, projections and sinks.
//!
//! A source turns committed row changes into [`Change`]s. Values are JSON values with
//! fixed conventions, so that every source renders the same row the same way:
//! exact numerics are strings holding the database's own text (`"12.50"`), timestamps
//! are ISO 8601 strings, json/jsonb are parsed JSON, bytea is base64.
//!
//! Invariants:
//! * A [`Key`] is the canonical JSON array of a row's primary-key values in the
//!   table's primary-key order; two changes name the same row iff their keys are equal.
//! * [`Position`]s are comparable only within one source. A change whose position is
//!   not newer than the stored row's position is a no-op for that row.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// One row image: column name → value.
pub type Row = serde_json::Map<String, Value>;

/// Canonical primary-key encoding: the JSON array text of the key values, e.g. `[42]`
/// or `[1001,2]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key(String);

impl Key {
    /// Builds the key from values in primary-key order.
    pub fn from_values<'a>(values: impl IntoIterator<Item = &'a Value>) -> Key {
        let arr: Vec<&Value> = values.into_iter().collect();
        Key(serde_json::to_string(&arr).expect("JSON values always serialize"))
    }

    /// Builds the key of `row` from the columns `pk`; `None` when a key column is
    /// missing or null (such a row cannot be identified).
    pub fn of_row(row: &Row, pk: &[String]) -> Option<Key> {
        let mut vals = Vec::with_capacity(pk.len());
        for c in pk {
            match row.get(c) {
                None | Some(Value::Null) => return None,
                Some(v) => vals.push(v),
            }
        }
        Some(Key::from_values(vals))
    }

    /// Wraps an already canonical key text (as read back from the state store).
    pub fn from_canonical(s: String) -> Key {
        Key(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key values, in primary-key order.
    pub fn values(&self) -> Vec<Value> {
        serde_json::from_str(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A source position: ordered lexicographically. pgoutput: (commit LSN, ordinal of
/// the change in its transaction); Debezium: (`sequence[0]`, `source.lsn`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    pub major: u64,
    pub minor: u64,
}

impl Position {
    pub const ZERO: Position = Position { major: 0, minor: 0 };

    pub fn new(major: u64, minor: u64) -> Self {
        Position { major, minor }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:X}/{:X}#{}",
            self.major >> 32,
            self.major & 0xffff_ffff,
            self.minor
        )
    }
}

/// A column value in a change: either a value, or "unchanged TOAST" (the source did not
/// send it because it did not change; the stored image supplies it).
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Value(Value),
    Unchanged,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Insert or update: the new image. Columns absent from `cells` keep their stored
    /// value only if they are [`Cell::Unchanged`]; a full image is expected otherwise.
    Upsert { cells: Vec<(String, Cell)> },
    /// Delete of the row named by the change's key.
    Delete,
    /// Truncate of the whole table: every known row becomes a tombstone.
    Truncate,
}

/// One committed row change, in commit order within its source.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The configured table name (the alias under `[tables.NAME]`).
    pub table: String,
    /// The row's key; for a key change, the new key. Ignored for [`Op::Truncate`].
    pub key: Key,
    /// For an update that changed the primary key: the old key (its row moves).
    pub old_key: Option<Key>,
    pub op: Op,
    pub position: Position,
    /// Commit time of the transaction, ms since the Unix epoch: used for tombstone
    /// timestamps, so that a replay produces the same documents. 0: unknown (a snapshot
    /// read).
    pub commit_time_ms: i64,
    /// Where in an ordered log the change was read (a Kafka partition and offset), when it
    /// came from one: see [`Origin`].
    pub origin: Option<Origin>,
}

/// A change's place in an ordered log: a Kafka partition (`topic[partition]`) and its
/// offset. Within one partition, a streamed change read after a snapshot read of its row
/// is newer than the read, whatever its position says (a transaction in flight while the
/// snapshot was taken wrote the row before the snapshot's LSN and committed after it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub stream: String,
    pub offset: u64,
}

/// Why a row is a tombstone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TombstoneKind {
    /// Hard DELETE (or TRUNCATE) in the source.
    Deleted,
    /// An update into the table's decommissioned state.
    Decommissioned,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub kind: TombstoneKind,
    /// When it happened: commit time, ms since the Unix epoch. `None` when unknown: a
    /// snapshot that reads a row already decommissioned cannot know since when.
    pub at_ms: Option<i64>,
}

/// A row as the state store keeps it: the last image, and a tombstone when deleted
/// or decommissioned.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRow {
    pub key: Key,
    pub image: Row,
    pub tombstone: Option<Tombstone>,
}

/// Formats ms since the Unix epoch as RFC 3339 UTC with millisecond precision.
pub fn format_ms(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_is_canonical_json_array() {
        let mut row = Row::new();
        row.insert("order_id".into(), json!(1001));
        row.insert("line_no".into(), json!(2));
        let k = Key::of_row(&row, &["order_id".into(), "line_no".into()]).unwrap();
        assert_eq!(k.as_str(), "[1001,2]");
        assert_eq!(k.values(), vec![json!(1001), json!(2)]);
        assert!(Key::of_row(&row, &["id".into()]).is_none());
    }

    #[test]
    fn positions_order_by_major_then_minor() {
        assert!(Position::new(1, 9) < Position::new(2, 0));
        assert!(Position::new(2, 1) > Position::new(2, 0));
        assert_eq!(Position::new(0x1_0000_0010, 3).to_string(), "1/10#3");
    }

    #[test]
    fn formats_commit_time() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
