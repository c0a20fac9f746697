//! Read access for rendering and fan-out ([`RowLookup`]), over any connection: the
//! worker's transaction, or a read-only connection of another process.

use super::merge::effective;
use super::rows::{cols_key, decode_row};
use super::{Catalog, Store, StoreTx};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use viewkeeper_core::model::{Key, Position, StoredRow};

/// The commit time of the first TRUNCATE of the row's table after the row's position
/// (NULL: none), so a row older than a TRUNCATE reads as deleted.
const TRUNCATED: &str = "(SELECT t.at_ms FROM truncations t WHERE t.tbl = r.tbl
     AND (t.pos_major, t.pos_minor) > (r.pos_major, r.pos_minor) ORDER BY t.pos_major, t.pos_minor LIMIT 1)";

fn seen(row: StoredRow, truncated_at: Option<i64>) -> StoredRow {
    effective(row, truncated_at.map(|at| (Position::ZERO, at)))
}
use viewkeeper_projections::render::{LookupError, RowLookup};

fn lookup_get(conn: &Connection, table: &str, key: &Key) -> Result<Option<StoredRow>, LookupError> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT r.image, r.tomb_kind, r.tomb_at, {TRUNCATED} FROM rows r WHERE r.tbl = ?1 AND r.key = ?2"
    ))?;
    let r = st
        .query_row(params![table, key.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })
        .optional()?;
    Ok(
        r.map(|(i, k, a, t)| decode_row(table, key.clone(), &i, k, a).map(|row| seen(row, t)))
            .transpose()?,
    )
}

fn lookup_find(
    conn: &Connection,
    catalog: &Catalog,
    table: &str,
    columns: &[String],
    values: &[Value],
) -> Result<Vec<StoredRow>, LookupError> {
    if catalog.tables.get(table).is_some_and(|t| t.primary_key == columns) {
        return Ok(lookup_get(conn, table, &Key::from_values(values))?
            .into_iter()
            .collect());
    }
    let mut st = conn.prepare_cached(&format!(
        "SELECT r.key, r.image, r.tomb_kind, r.tomb_at, {TRUNCATED} FROM idx i JOIN rows r ON r.tbl = i.tbl AND r.key = i.key
         WHERE i.tbl = ?1 AND i.cols = ?2 AND i.val = ?3"
    ))?;
    let mut out = Vec::new();
    let mut q = st.query(params![table, cols_key(columns), Key::from_values(values).as_str()])?;
    while let Some(r) = q.next()? {
        let key = Key::from_canonical(r.get(0)?);
        let row = decode_row(table, key, &r.get::<_, String>(1)?, r.get(2)?, r.get(3)?)?;
        out.push(seen(row, r.get(4)?));
    }
    Ok(out)
}

impl RowLookup for Store {
    fn get(&self, table: &str, key: &Key) -> Result<Option<StoredRow>, LookupError> {
        lookup_get(&self.conn, table, key)
    }
    fn find(&self, table: &str, columns: &[String], values: &[Value]) -> Result<Vec<StoredRow>, LookupError> {
        lookup_find(&self.conn, &self.catalog, table, columns, values)
    }
}

impl RowLookup for StoreTx<'_> {
    fn get(&self, table: &str, key: &Key) -> Result<Option<StoredRow>, LookupError> {
        lookup_get(&self.tx, table, key)
    }
    fn find(&self, table: &str, columns: &[String], values: &[Value]) -> Result<Vec<StoredRow>, LookupError> {
        lookup_find(&self.tx, self.catalog, table, columns, values)
    }
}
