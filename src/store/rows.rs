//! Row storage: images (the needed columns, JSON), positions, tombstones, the reverse
//! indexes of joins (`idx`: table, columns, canonical values, key) and the truncate
//! watermarks, behind the [`Rows`] trait the merge rules use.

use super::cache::first_after;
use super::merge::{self, Applied, Rows, Stored, TableRules};
use super::{meta_get, meta_set, Store, StoreError, StoreTx};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use std::collections::BTreeSet;
use viewkeeper_core::model::{Change, Key, Origin, Position, Row, StoredRow, Tombstone, TombstoneKind};

pub(super) fn cols_key(cols: &[String]) -> String {
    cols.join(",")
}

/// The canonical value of `cols` in `image`, `None` when any is missing or null.
pub(super) fn index_value(image: &Row, cols: &[String]) -> Option<String> {
    let vals: Option<Vec<&Value>> = cols.iter().map(|c| image.get(c).filter(|v| !v.is_null())).collect();
    vals.map(|v| Key::from_values(v).as_str().to_string())
}

fn tomb_kind_str(k: TombstoneKind) -> &'static str {
    match k {
        TombstoneKind::Deleted => "deleted",
        TombstoneKind::Decommissioned => "decommissioned",
    }
}

pub(super) fn decode_row(
    table: &str,
    key: Key,
    image: &str,
    kind: Option<String>,
    at: Option<i64>,
) -> Result<StoredRow, StoreError> {
    let image: Row = serde_json::from_str(image).map_err(|e| StoreError::Corrupt {
        table: table.to_string(),
        key: key.to_string(),
        source: e,
    })?;
    let tombstone = kind.map(|k| Tombstone {
        kind: if k == "deleted" {
            TombstoneKind::Deleted
        } else {
            TombstoneKind::Decommissioned
        },
        // 0: unknown (stores written before times could be unknown used 0 for it).
        at_ms: at.filter(|a| *a > 0),
    });
    Ok(StoredRow { key, image, tombstone })
}

/// Keys of up to `limit` rows of `table` that are not tombstones.
pub(super) fn live_keys(conn: &Connection, table: &str, limit: usize) -> Result<Vec<Key>, StoreError> {
    let mut st = conn.prepare_cached("SELECT key FROM rows WHERE tbl = ?1 AND tomb_kind IS NULL LIMIT ?2")?;
    let rows = st.query_map(params![table, limit as i64], |r| r.get::<_, String>(0))?;
    Ok(rows.map(|r| r.map(Key::from_canonical)).collect::<Result<_, _>>()?)
}

pub(super) fn keys(conn: &Connection, table: &str) -> Result<Vec<Key>, StoreError> {
    let mut st = conn.prepare_cached("SELECT key FROM rows WHERE tbl = ?1 ORDER BY key")?;
    let rows = st.query_map(params![table], |r| r.get::<_, String>(0))?;
    Ok(rows.map(|r| r.map(Key::from_canonical)).collect::<Result<_, _>>()?)
}

impl Store {
    /// Builds reverse indexes that the catalog declares but the file lacks (a new
    /// projection or relation), and drops ones no longer declared.
    pub(super) fn sync_indexes(&mut self) -> Result<(), StoreError> {
        let have: BTreeSet<(String, String)> = self.stored_indexes()?;
        let want: BTreeSet<(String, String)> = self
            .catalog
            .indexes
            .iter()
            .map(|(t, c)| (t.clone(), cols_key(c)))
            .collect();
        if have == want {
            return Ok(());
        }
        let catalog = self.catalog.clone();
        self.write(|tx| {
            for (t, c) in have.difference(&want) {
                tx.execute("DELETE FROM idx WHERE tbl = ?1 AND cols = ?2", params![t, c])?;
            }
            for (t, cols) in &catalog.indexes {
                if have.contains(&(t.clone(), cols_key(cols))) {
                    continue;
                }
                let mut found = Vec::new();
                {
                    let mut st = tx.prepare("SELECT key, image FROM rows WHERE tbl = ?1")?;
                    let mut q = st.query(params![t])?;
                    while let Some(r) = q.next()? {
                        found.push((r.get::<_, String>(0)?, r.get::<_, String>(1)?));
                    }
                }
                for (key, image) in found {
                    let image: Row = serde_json::from_str(&image).map_err(|e| StoreError::Corrupt {
                        table: t.clone(),
                        key: key.clone(),
                        source: e,
                    })?;
                    if let Some(val) = index_value(&image, cols) {
                        tx.execute(
                            "INSERT OR IGNORE INTO idx(tbl, cols, val, key) VALUES (?1, ?2, ?3, ?4)",
                            params![t, cols_key(cols), val, key],
                        )?;
                    }
                }
            }
            meta_set(
                tx,
                "indexes",
                Some(&serde_json::to_string(&want).expect("serializable")),
            )
        })
    }

    /// The reverse indexes the file keeps: (table, columns joined by `,`).
    pub(super) fn stored_indexes(&self) -> Result<BTreeSet<(String, String)>, StoreError> {
        Ok(self
            .meta("indexes")?
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default())
    }
}

impl StoreTx<'_> {
    /// Applies one change by the rules of [`merge`]. Tables no projection reads are not
    /// kept.
    pub fn apply(&self, change: &Change) -> Result<Applied, StoreError> {
        let table = change.table.as_str();
        let (Some(spec), Some(needed)) = (self.catalog.tables.get(table), self.catalog.needed_columns.get(table))
        else {
            return Ok(Applied::default());
        };
        merge::apply(self, TableRules { spec, needed }, change)
    }

    fn reindex(&self, table: &str, key: &Key, old: Option<&Row>, new: &Row) -> Result<(), StoreError> {
        for (t, cols) in &self.catalog.indexes {
            if t != table {
                continue;
            }
            let before = old.and_then(|o| index_value(o, cols));
            let after = index_value(new, cols);
            if before == after {
                continue;
            }
            let ck = cols_key(cols);
            if let Some(v) = before {
                self.tx
                    .prepare_cached("DELETE FROM idx WHERE tbl = ?1 AND cols = ?2 AND val = ?3 AND key = ?4")?
                    .execute(params![t, ck, v, key.as_str()])?;
            }
            if let Some(v) = after {
                self.tx
                    .prepare_cached("INSERT OR IGNORE INTO idx(tbl, cols, val, key) VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![t, ck, v, key.as_str()])?;
            }
        }
        Ok(())
    }

    pub(super) fn meta(&self, k: &str) -> Result<Option<String>, StoreError> {
        meta_get(&self.tx, k)
    }

    pub(super) fn set_meta(&self, k: &str, v: Option<&str>) -> Result<(), StoreError> {
        meta_set(&self.tx, k, v)
    }
}

/// The stored row of `table` with `key`, as SQLite has it.
pub(super) fn load_stored(conn: &Connection, table: &str, key: &Key) -> Result<Option<Stored>, StoreError> {
    {
        let mut st = conn.prepare_cached(
            "SELECT image, pos_major, pos_minor, tomb_kind, tomb_at, origin, origin_offset FROM rows
             WHERE tbl = ?1 AND key = ?2",
        )?;
        let row = st
            .query_row(params![table, key.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Position::new(r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64),
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                ))
            })
            .optional()?;
        row.map(|(image, pos, kind, at, stream, offset)| {
            Ok(Stored {
                row: decode_row(table, key.clone(), &image, kind, at)?,
                pos,
                origin: stream.map(|stream| Origin {
                    stream,
                    offset: offset.unwrap_or(0) as u64,
                }),
            })
        })
        .transpose()
    }
}

impl Rows for StoreTx<'_> {
    /// From what this transaction wrote, else the cache, else SQLite (then cached).
    fn load(&self, table: &str, key: &Key) -> Result<Option<Stored>, StoreError> {
        if let Some(s) = self.overlay.borrow().rows.get(&(table.to_string(), key.clone())) {
            return Ok(s.clone());
        }
        if let Some(s) = self.cache.borrow_mut().get(table, key) {
            return Ok(s);
        }
        let s = load_stored(&self.tx, table, key)?;
        self.cache.borrow_mut().put(table, key, s.clone());
        Ok(s)
    }

    fn save(&self, table: &str, s: &Stored, replaced: Option<&Row>) -> Result<(), StoreError> {
        let (kind, at) = match &s.row.tombstone {
            None => (None, None),
            Some(t) => (Some(tomb_kind_str(t.kind)), Some(t.at_ms.unwrap_or(0))),
        };
        let mut st = self.tx.prepare_cached(
            "INSERT INTO rows(tbl, key, image, pos_major, pos_minor, tomb_kind, tomb_at, origin, origin_offset)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT(tbl, key) DO UPDATE SET image = excluded.image, pos_major = excluded.pos_major,
               pos_minor = excluded.pos_minor, tomb_kind = excluded.tomb_kind, tomb_at = excluded.tomb_at,
               origin = excluded.origin, origin_offset = excluded.origin_offset",
        )?;
        st.execute(params![
            table,
            s.row.key.as_str(),
            serde_json::to_string(&s.row.image).expect("JSON map serializes"),
            s.pos.major as i64,
            s.pos.minor as i64,
            kind,
            at,
            s.origin.as_ref().map(|o| o.stream.as_str()),
            s.origin.as_ref().map(|o| o.offset as i64),
        ])?;
        self.reindex(table, &s.row.key, replaced, &s.row.image)?;
        self.overlay
            .borrow_mut()
            .rows
            .insert((table.to_string(), s.row.key.clone()), Some(s.clone()));
        Ok(())
    }

    fn keys(&self, table: &str) -> Result<Vec<Key>, StoreError> {
        keys(&self.tx, table)
    }

    fn truncated_after(&self, table: &str, pos: Position) -> Result<Option<(Position, i64)>, StoreError> {
        let committed = first_after(self.cache.borrow_mut().truncations(&self.tx, table)?, pos);
        let own = self
            .overlay
            .borrow()
            .truncations
            .iter()
            .filter(|(t, p, _)| t == table && *p > pos)
            .map(|(_, p, at)| (*p, *at))
            .min();
        Ok(committed.into_iter().chain(own).min())
    }

    fn add_truncation(&self, table: &str, pos: Position, at_ms: i64) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT OR IGNORE INTO truncations(tbl, pos_major, pos_minor, at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![table, pos.major as i64, pos.minor as i64, at_ms],
        )?;
        self.overlay
            .borrow_mut()
            .truncations
            .push((table.to_string(), pos, at_ms));
        Ok(())
    }
}
