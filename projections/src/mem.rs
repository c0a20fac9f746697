//! An in-memory [`RowLookup`]: a plain map of rows. Used by unit tests and by tools
//! that render from rows read elsewhere (e.g. `verify`'s ground truth).

use crate::render::{LookupError, RowLookup};
use serde_json::Value;
use std::collections::BTreeMap;
use viewkeeper_core::model::{Key, Row, StoredRow, Tombstone};

#[derive(Default, Debug, Clone)]
pub struct MemRows {
    tables: BTreeMap<String, BTreeMap<Key, StoredRow>>,
}

impl MemRows {
    /// Inserts or replaces a row keyed by `pk`. Panics if a key column is missing:
    /// callers build rows they control.
    pub fn put(&mut self, table: &str, pk: &[&str], image: Row, tombstone: Option<Tombstone>) {
        let pk: Vec<String> = pk.iter().map(|s| s.to_string()).collect();
        let key = Key::of_row(&image, &pk).expect("row has its key columns");
        self.tables
            .entry(table.to_string())
            .or_default()
            .insert(key.clone(), StoredRow { key, image, tombstone });
    }
}

impl RowLookup for MemRows {
    fn get(&self, table: &str, key: &Key) -> Result<Option<StoredRow>, LookupError> {
        Ok(self.tables.get(table).and_then(|t| t.get(key)).cloned())
    }

    fn find(&self, table: &str, columns: &[String], values: &[Value]) -> Result<Vec<StoredRow>, LookupError> {
        Ok(self
            .tables
            .get(table)
            .map(|t| {
                t.values()
                    .filter(|r| columns.iter().zip(values).all(|(c, v)| r.image.get(c) == Some(v)))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }
}
