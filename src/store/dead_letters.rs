//! The dead-letter store: data that could not apply, render or be written, with where it
//! came from and why; `viewkeeper dlq` lists, replays and drops it.

use super::{now_ms, Store, StoreError, StoreTx};
use rusqlite::{params, Connection, OptionalExtension};
use viewkeeper_core::{DeadLetter, Stage};

const DEAD_LETTER_SELECT: &str =
    "SELECT id, at_ms, source, position, tbl, key, stage, reason, payload FROM dead_letters";

/// Maps a row of [`DEAD_LETTER_SELECT`].
fn dead_letter_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.get(0)?,
        at_ms: r.get(1)?,
        source: r.get(2)?,
        position: r.get(3)?,
        table: r.get(4)?,
        key: r.get(5)?,
        // A stage this version does not know (written by a newer one) reads as a decode
        // letter: kept, never lost.
        stage: r.get::<_, String>(6)?.parse::<Stage>().unwrap_or_default(),
        reason: r.get(7)?,
        payload: r.get(8)?,
    })
}

fn insert_dead_letters(conn: &Connection, letters: &[DeadLetter]) -> Result<(), StoreError> {
    let mut st = conn.prepare_cached(
        "INSERT INTO dead_letters(at_ms, source, position, tbl, key, stage, reason, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for d in letters {
        st.execute(params![
            if d.at_ms == 0 { now_ms() } else { d.at_ms },
            d.source,
            d.position,
            d.table,
            d.key,
            d.stage.to_string(),
            d.reason,
            d.payload
        ])?;
    }
    Ok(())
}

impl Store {
    pub fn dead_letter_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM dead_letters", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// The newest `limit` dead letters, newest first.
    pub fn latest_dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut st = self
            .conn
            .prepare(&format!("{DEAD_LETTER_SELECT} ORDER BY id DESC LIMIT ?1"))?;
        let rows = st.query_map([limit as i64], dead_letter_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut st = self
            .conn
            .prepare(&format!("{DEAD_LETTER_SELECT} ORDER BY id LIMIT ?1"))?;
        let rows = st.query_map(params![limit as i64], dead_letter_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!("{DEAD_LETTER_SELECT} WHERE id = ?1"),
                params![id],
                dead_letter_row,
            )
            .optional()?)
    }

    /// Removes dead letters (`dlq drop`, or replayed); returns how many were removed.
    pub fn delete_dead_letters(&mut self, ids: &[i64]) -> Result<usize, StoreError> {
        self.write(|tx| {
            let mut n = 0;
            for id in ids {
                n += tx.execute("DELETE FROM dead_letters WHERE id = ?1", params![id])?;
            }
            Ok(n)
        })
    }

    /// Adds dead letters in their own transaction (for failures found after the
    /// state was committed: rendering, sink rejections).
    pub fn add_dead_letters(&mut self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        if letters.is_empty() {
            return Ok(());
        }
        self.write(|tx| insert_dead_letters(tx, letters))
    }
}

impl StoreTx<'_> {
    pub fn add_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        insert_dead_letters(&self.tx, letters)
    }
}
