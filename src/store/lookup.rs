//! Read access for rendering and fan-out ([`RowLookup`]), over any connection: the
//! worker's transaction (through its cache and what it wrote), or a read-only connection
//! of another process or render thread. A row older than a TRUNCATE of its table reads as
//! deleted by it ([`effective`]).

use super::cache::first_after;
use super::merge::{effective, Rows};
use super::rows::{cols_key, decode_row};
use super::{Catalog, Store, StoreTx};
use rusqlite::params;
use serde_json::Value;
use viewkeeper_core::model::{Key, StoredRow};
use viewkeeper_projections::render::{LookupError, RowLookup};

impl Store {
    fn seen(
        &self,
        table: &str,
        row: StoredRow,
        pos: viewkeeper_core::model::Position,
    ) -> Result<StoredRow, LookupError> {
        let t = first_after(self.cache.borrow_mut().truncations(&self.conn, table)?, pos);
        Ok(effective(row, t))
    }
}

impl RowLookup for Store {
    fn get(&self, table: &str, key: &Key) -> Result<Option<StoredRow>, LookupError> {
        match super::rows::load_stored(&self.conn, table, key)? {
            Some(s) => Ok(Some(self.seen(table, s.row, s.pos)?)),
            None => Ok(None),
        }
    }

    fn find(&self, table: &str, columns: &[String], values: &[Value]) -> Result<Vec<StoredRow>, LookupError> {
        if is_primary_key(&self.catalog, table, columns) {
            return Ok(self.get(table, &Key::from_values(values))?.into_iter().collect());
        }
        let mut st = self.conn.prepare_cached(
            "SELECT r.key, r.image, r.tomb_kind, r.tomb_at, r.pos_major, r.pos_minor
             FROM idx i JOIN rows r ON r.tbl = i.tbl AND r.key = i.key
             WHERE i.tbl = ?1 AND i.cols = ?2 AND i.val = ?3",
        )?;
        let mut found = Vec::new();
        let mut q = st.query(params![table, cols_key(columns), Key::from_values(values).as_str()])?;
        while let Some(r) = q.next()? {
            let key = Key::from_canonical(r.get(0)?);
            let row = decode_row(table, key, &r.get::<_, String>(1)?, r.get(2)?, r.get(3)?)?;
            let pos = viewkeeper_core::model::Position::new(r.get::<_, i64>(4)? as u64, r.get::<_, i64>(5)? as u64);
            found.push((row, pos));
        }
        found.into_iter().map(|(row, pos)| self.seen(table, row, pos)).collect()
    }
}

fn is_primary_key(catalog: &Catalog, table: &str, columns: &[String]) -> bool {
    catalog.tables.get(table).is_some_and(|t| t.primary_key == columns)
}

impl RowLookup for StoreTx<'_> {
    fn get(&self, table: &str, key: &Key) -> Result<Option<StoredRow>, LookupError> {
        match self.load(table, key)? {
            Some(s) => Ok(Some(effective(s.row, self.truncated_after(table, s.pos)?))),
            None => Ok(None),
        }
    }

    /// By the reverse index's keys, each row through [`Rows::load`] (the cache).
    fn find(&self, table: &str, columns: &[String], values: &[Value]) -> Result<Vec<StoredRow>, LookupError> {
        if is_primary_key(self.catalog, table, columns) {
            return Ok(self.get(table, &Key::from_values(values))?.into_iter().collect());
        }
        let keys: Vec<Key> = {
            let mut st = self
                .tx
                .prepare_cached("SELECT key FROM idx WHERE tbl = ?1 AND cols = ?2 AND val = ?3")?;
            let q = st.query_map(
                params![table, cols_key(columns), Key::from_values(values).as_str()],
                |r| r.get::<_, String>(0),
            )?;
            q.map(|k| k.map(Key::from_canonical)).collect::<Result<_, _>>()?
        };
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(row) = self.get(table, &k)? {
                out.push(row);
            }
        }
        Ok(out)
    }
}
