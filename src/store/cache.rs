//! The rows the worker read or wrote lately, and every table's TRUNCATE watermarks, in
//! memory: most changes of a busy table meet a row written a moment ago, most lookups of a
//! render ask for the same customers and products, and every change asks whether a
//! TRUNCATE came after it.
//!
//! Committed state only. A write transaction keeps what it writes aside ([`Overlay`]) and
//! hands it over at its commit, so a rolled-back batch leaves nothing behind. Another
//! connection that commits to the file (a `dlq replay` or `verify --repair` beside the
//! worker) changes this connection's `PRAGMA data_version`; the next write transaction
//! notices and the cache starts over. Bounded: at most `capacity` rows (least recently
//! used go first; `[engine] row_cache_rows`).

use super::merge::Stored;
use rusqlite::Connection;
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use viewkeeper_core::model::{Key, Position};

/// A table's TRUNCATEs: (position, commit time in ms), in position order.
pub(super) type Truncations = Vec<(Position, i64)>;

pub(super) struct RowCache {
    /// `None`: caching of rows is off (capacity 0).
    rows: Option<lru::LruCache<(String, Key), Option<Stored>>>,
    /// Every table's TRUNCATEs, once read.
    truncations: Option<BTreeMap<String, Truncations>>,
    data_version: Option<i64>,
}

/// What a write transaction wrote, for the cache once it commits.
#[derive(Default)]
pub(super) struct Overlay {
    pub rows: HashMap<(String, Key), Option<Stored>>,
    pub truncations: Vec<(String, Position, i64)>,
}

/// The first TRUNCATE in `list` after `pos`.
pub(super) fn first_after(list: &[(Position, i64)], pos: Position) -> Option<(Position, i64)> {
    let i = list.partition_point(|(p, _)| *p <= pos);
    list.get(i).copied()
}

impl RowCache {
    pub fn new(capacity: usize) -> RowCache {
        RowCache {
            rows: NonZeroUsize::new(capacity).map(lru::LruCache::new),
            truncations: None,
            data_version: None,
        }
    }

    pub fn clear(&mut self) {
        if let Some(rows) = &mut self.rows {
            rows.clear();
        }
        self.truncations = None;
    }

    /// Starts over when another connection committed since the last check.
    pub fn check(&mut self, conn: &Connection) -> Result<(), rusqlite::Error> {
        let v: i64 = conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        if self.data_version != Some(v) {
            self.clear();
            self.data_version = Some(v);
        }
        Ok(())
    }

    /// `Some(None)`: known to be absent.
    pub fn get(&mut self, table: &str, key: &Key) -> Option<Option<Stored>> {
        self.rows.as_mut()?.get(&(table.to_string(), key.clone())).cloned()
    }

    pub fn put(&mut self, table: &str, key: &Key, row: Option<Stored>) {
        if let Some(rows) = &mut self.rows {
            rows.put((table.to_string(), key.clone()), row);
        }
    }

    /// The TRUNCATEs of `table` (read from `conn` the first time: a write transaction
    /// reads them at its start, before it writes any, so that only committed ones are
    /// cached).
    pub fn truncations(&mut self, conn: &Connection, table: &str) -> Result<&[(Position, i64)], rusqlite::Error> {
        if self.truncations.is_none() {
            let mut all: BTreeMap<String, Truncations> = BTreeMap::new();
            let mut st = conn.prepare_cached(
                "SELECT tbl, pos_major, pos_minor, at_ms FROM truncations ORDER BY tbl, pos_major, pos_minor",
            )?;
            let mut q = st.query([])?;
            while let Some(r) = q.next()? {
                let pos = Position::new(r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64);
                all.entry(r.get(0)?).or_default().push((pos, r.get(3)?));
            }
            self.truncations = Some(all);
        }
        Ok(self
            .truncations
            .as_ref()
            .and_then(|t| t.get(table))
            .map_or(&[][..], |v| v.as_slice()))
    }

    /// Takes over what a transaction committed.
    pub fn absorb(&mut self, overlay: Overlay) {
        for ((table, key), row) in overlay.rows {
            self.put(&table, &key, row);
        }
        if let Some(all) = &mut self.truncations {
            for (table, pos, at) in overlay.truncations {
                let list = all.entry(table).or_default();
                let i = list.partition_point(|(p, _)| *p < pos);
                if list.get(i).map(|(p, _)| *p) != Some(pos) {
                    list.insert(i, (pos, at));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_after_takes_the_next_truncate_strictly_after() {
        let list = [(Position::new(10, 0), 1), (Position::new(20, 3), 2)];
        assert_eq!(first_after(&list, Position::new(5, 0)), Some(list[0]));
        assert_eq!(first_after(&list, Position::new(10, 0)), Some(list[1]));
        assert_eq!(first_after(&list, Position::new(20, 2)), Some(list[1]));
        assert_eq!(first_after(&list, Position::new(20, 3)), None);
    }

    #[test]
    fn a_bounded_cache_forgets_the_least_recently_used() {
        let mut c = RowCache::new(2);
        let k = |n: i64| Key::from_values(&[serde_json::json!(n)]);
        c.put("t", &k(1), None);
        c.put("t", &k(2), None);
        assert!(c.get("t", &k(1)).is_some()); // 1 is now the most recent
        c.put("t", &k(3), None);
        assert!(c.get("t", &k(2)).is_none());
        assert!(c.get("t", &k(1)).is_some() && c.get("t", &k(3)).is_some());
        assert!(RowCache::new(0).get("t", &k(1)).is_none());
    }
}
