//! The state store: one SQLite file under the data dir (`state.db`, WAL mode,
//! `synchronous=FULL`).
//!
//! It keeps, for every table a projection reads: the latest image of each row
//! (only the columns projections need), tombstones, each row's source position,
//! reverse indexes for joins; and, for the engine: the hybrid version clock, the
//! per-source checkpoints and the dead-letter store.
//!
//! Invariants:
//! * Applying a change whose position is not newer than the stored row's is a no-op
//!   for the row; [`Applied::images`] still names the row so that its documents are
//!   re-rendered (a replay after a crash must still reach the sinks).
//! * A checkpoint is written only by [`Store::set_checkpoints`], which the engine calls
//!   after every sink acknowledged the batch; a crash before that replays the batch.
//! * The version clock never goes back: `max(last + 1, unix_ms << 20)`, persisted in
//!   the same transaction as the state it versions.
//! * Other processes (status, verify, dlq) may open the file read-only while the
//!   worker writes; WAL mode gives them consistent snapshots.

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use viewkeeper_connectors::source::{SnapshotMark, TableProgress};
use viewkeeper_projections::model::{Cell, Change, Key, Op, Position, Row, StoredRow, Tombstone, TombstoneKind};
use viewkeeper_projections::render::{LookupError, RowLookup};
use viewkeeper_projections::spec::TableSpec;

pub const STATE_FILE: &str = "state.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state store: corrupt row image of {table} {key}: {source}")]
    Corrupt {
        table: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// What the store needs to know about tables: keys, decommission rules, which
/// columns to keep and which join columns to index.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub tables: BTreeMap<String, TableSpec>,
    pub needed_columns: BTreeMap<String, BTreeSet<String>>,
    pub indexes: BTreeSet<(String, Vec<String>)>,
}

/// A dead letter: data that could not apply, with where it came from and why.
/// `id` and `at_ms` are assigned on insert (0 means "now").
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub at_ms: i64,
    pub source: String,
    pub position: String,
    pub table: String,
    pub key: String,
    pub stage: String,
    pub reason: String,
    pub payload: String,
}

/// The outcome of applying one change: row images whose documents must be
/// re-rendered (old and new image; the stored image for a no-op).
#[derive(Debug, Default)]
pub struct Applied {
    /// The row's images before and after (several for a key change or a truncate).
    pub images: Vec<Row>,
    /// An update of a stored row in place: same key, same tombstone; `images` holds
    /// exactly the stored image and the new one. Projections whose columns of this table
    /// are equal in both need not render anything for it.
    pub in_place: bool,
    /// Columns sent as "unchanged TOAST" for which no stored value exists.
    pub missing_unchanged: Vec<String>,
}

pub struct Store {
    conn: Connection,
    catalog: Catalog,
}

fn cols_key(cols: &[String]) -> String {
    cols.join(",")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating) the state store for writing. Only the worker does this.
    pub fn open(dir: &Path, catalog: Catalog) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
        })?;
        let path = dir.join(STATE_FILE);
        let conn = Connection::open(&path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            source: e,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS rows(
                tbl TEXT NOT NULL, key TEXT NOT NULL, image TEXT NOT NULL,
                pos_major INTEGER NOT NULL, pos_minor INTEGER NOT NULL,
                tomb_kind TEXT, tomb_at INTEGER,
                PRIMARY KEY(tbl, key)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS idx(
                tbl TEXT NOT NULL, cols TEXT NOT NULL, val TEXT NOT NULL, key TEXT NOT NULL,
                PRIMARY KEY(tbl, cols, val, key)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS checkpoints(
                source TEXT PRIMARY KEY, pos_major INTEGER NOT NULL, pos_minor INTEGER NOT NULL,
                updated_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS dead_letters(
                id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, source TEXT NOT NULL,
                position TEXT NOT NULL, tbl TEXT NOT NULL, key TEXT NOT NULL, stage TEXT NOT NULL,
                reason TEXT NOT NULL, payload TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS snapshot_progress(
                source TEXT NOT NULL, tbl TEXT NOT NULL, last_key TEXT, done INTEGER NOT NULL,
                PRIMARY KEY(source, tbl));",
        )?;
        let mut store = Store { conn, catalog };
        store.sync_indexes()?;
        Ok(store)
    }

    /// Opens an existing state store read-only (for status/verify/dlq while the
    /// worker runs).
    pub fn open_read_only(dir: &Path, catalog: Catalog) -> Result<Store, StoreError> {
        let path = dir.join(STATE_FILE);
        let conn =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                source: e,
            })?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        Ok(Store { conn, catalog })
    }

    /// Builds reverse indexes that the config declares but the file lacks (a new
    /// projection or relation), and drops ones no longer declared.
    fn sync_indexes(&mut self) -> Result<(), StoreError> {
        let have: BTreeSet<(String, String)> = {
            let mut st = self.conn.prepare("SELECT v FROM meta WHERE k = 'indexes'")?;
            let v: Option<String> = st.query_row([], |r| r.get(0)).optional()?;
            v.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
        };
        let want: BTreeSet<(String, String)> = self
            .catalog
            .indexes
            .iter()
            .map(|(t, c)| (t.clone(), cols_key(c)))
            .collect();
        if have == want {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for (t, c) in have.difference(&want) {
            tx.execute("DELETE FROM idx WHERE tbl = ?1 AND cols = ?2", params![t, c])?;
        }
        for (t, cols) in &self.catalog.indexes {
            if have.contains(&(t.clone(), cols_key(cols))) {
                continue;
            }
            let mut rows = Vec::new();
            {
                let mut st = tx.prepare("SELECT key, image FROM rows WHERE tbl = ?1")?;
                let mut q = st.query(params![t])?;
                while let Some(r) = q.next()? {
                    rows.push((r.get::<_, String>(0)?, r.get::<_, String>(1)?));
                }
            }
            for (key, image) in rows {
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
        tx.execute(
            "INSERT INTO meta(k, v) VALUES ('indexes', ?1) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            params![serde_json::to_string(&want).expect("serializable")],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Starts a write transaction. IMMEDIATE: the write lock is taken at the start, so
    /// another process writing meanwhile (a `backfill --rebuild` beside the worker) makes
    /// this wait (busy timeout) instead of failing at its first write with
    /// SQLITE_BUSY_SNAPSHOT, as a deferred transaction whose snapshot went stale does.
    pub fn begin(&mut self) -> Result<StoreTx<'_>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        Ok(StoreTx {
            tx,
            catalog: &self.catalog,
        })
    }

    pub fn checkpoint(&self, source: &str) -> Result<Option<Position>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT pos_major, pos_minor FROM checkpoints WHERE source = ?1",
                params![source],
                |r| Ok(Position::new(r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .optional()?)
    }

    /// When the checkpoint of `source` last advanced (unix ms).
    pub fn checkpoint_updated_ms(&self, source: &str) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT updated_ms FROM checkpoints WHERE source = ?1",
                params![source],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Records that everything of these sources up to the positions is in the state
    /// store and acknowledged by every sink. Call only then.
    pub fn set_checkpoints(&mut self, positions: &BTreeMap<String, Position>) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for (source, p) in positions {
            tx.execute(
                "INSERT INTO checkpoints(source, pos_major, pos_minor, updated_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(source) DO UPDATE SET pos_major = excluded.pos_major,
                   pos_minor = excluded.pos_minor, updated_ms = excluded.updated_ms
                 WHERE (excluded.pos_major, excluded.pos_minor) > (checkpoints.pos_major, checkpoints.pos_minor)",
                params![source, p.major as i64, p.minor as i64, now_ms()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Where the initial snapshot of `source` stands, per table (`schema.table`).
    pub fn snapshot_progress(&self, source: &str) -> Result<HashMap<String, TableProgress>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT tbl, last_key, done FROM snapshot_progress WHERE source = ?1")?;
        let rows = st.query_map(params![source], |r| {
            let last: Option<String> = r.get(1)?;
            Ok((
                r.get::<_, String>(0)?,
                TableProgress {
                    last_key: last.and_then(|l| serde_json::from_str(&l).ok()),
                    done: r.get::<_, i64>(2)? != 0,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The index a running rebuild of `projection` fills, if any: the worker writes its
    /// documents there too, so nothing written during the rebuild is missing after the swap.
    pub fn rebuild_target(&self, projection: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT v FROM meta WHERE k = ?1")?
            .query_row(params![format!("rebuild:{projection}")], |r| r.get(0))
            .optional()?)
    }

    pub fn set_rebuild_target(&mut self, projection: &str, index: Option<&str>) -> Result<(), StoreError> {
        let k = format!("rebuild:{projection}");
        match index {
            Some(i) => self.conn.execute(
                "INSERT INTO meta(k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                params![k, i],
            )?,
            None => self.conn.execute("DELETE FROM meta WHERE k = ?1", params![k])?,
        };
        Ok(())
    }

    pub fn dead_letter_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM dead_letters", [], |r| r.get::<_, i64>(0))? as u64)
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

    /// Adds dead letters in their own transaction (for failures found after the
    /// state was committed: rendering, sink rejections).
    /// Removes dead letters (`dlq drop`, or replayed); returns how many were removed.
    pub fn delete_dead_letters(&mut self, ids: &[i64]) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let mut n = 0;
        for id in ids {
            n += tx.execute("DELETE FROM dead_letters WHERE id = ?1", params![id])?;
        }
        tx.commit()?;
        Ok(n)
    }

    pub fn add_dead_letters(&mut self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        if letters.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        insert_dead_letters(&tx, letters)?;
        tx.commit()?;
        Ok(())
    }

    /// Number of stored rows per table (tombstones included).
    /// Size of the database file (pages in use × page size).
    pub fn size_bytes(&self) -> u64 {
        self.conn
            .query_row(
                "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_or(0, |v| v as u64)
    }

    pub fn row_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut st = self.conn.prepare("SELECT tbl, count(*) FROM rows GROUP BY tbl")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Keys of every stored row of `table`.
    pub fn keys(&self, table: &str) -> Result<Vec<Key>, StoreError> {
        let mut st = self.conn.prepare("SELECT key FROM rows WHERE tbl = ?1 ORDER BY key")?;
        let rows = st.query_map(params![table], |r| r.get::<_, String>(0))?;
        Ok(rows.map(|r| r.map(Key::from_canonical)).collect::<Result<_, _>>()?)
    }
}

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
        stage: r.get(6)?,
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
            d.stage,
            d.reason,
            d.payload
        ])?;
    }
    Ok(())
}

/// The canonical value of `cols` in `image`, `None` when any is missing or null.
fn index_value(image: &Row, cols: &[String]) -> Option<String> {
    let vals: Option<Vec<&Value>> = cols.iter().map(|c| image.get(c).filter(|v| !v.is_null())).collect();
    vals.map(|v| Key::from_values(v).as_str().to_string())
}

/// A write transaction over the state store. Dropping it without [`StoreTx::commit`]
/// rolls everything back.
pub struct StoreTx<'a> {
    tx: Transaction<'a>,
    catalog: &'a Catalog,
}

impl StoreTx<'_> {
    pub fn commit(self) -> Result<(), StoreError> {
        Ok(self.tx.commit()?)
    }

    pub fn add_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        insert_dead_letters(&self.tx, letters)
    }

    /// Records a snapshot batch's progress with its rows.
    pub fn record_snapshot(&self, source: &str, mark: &SnapshotMark) -> Result<(), StoreError> {
        let (tbl, last, done) = match mark {
            SnapshotMark::Chunk { table, last_key } => {
                (table.as_str(), Some(serde_json::to_string(last_key).expect("JSON")), 0)
            }
            SnapshotMark::TableDone { table } => (table.as_str(), None, 1),
            SnapshotMark::Complete | SnapshotMark::CatchUp => return Ok(()),
            SnapshotMark::Begin => {
                self.tx
                    .execute("DELETE FROM snapshot_progress WHERE source = ?1", params![source])?;
                return Ok(());
            }
        };
        self.tx.execute(
            "INSERT INTO snapshot_progress(source, tbl, last_key, done) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(source, tbl) DO UPDATE SET last_key = coalesce(excluded.last_key, snapshot_progress.last_key),
               done = excluded.done",
            params![source, tbl, last, done],
        )?;
        Ok(())
    }

    /// Reserves `n` versions from the hybrid clock; returns the first.
    pub fn next_versions(&self, n: u64) -> Result<u64, StoreError> {
        let last: Option<String> = self
            .tx
            .query_row("SELECT v FROM meta WHERE k = 'clock'", [], |r| r.get(0))
            .optional()?;
        let last: u64 = last.and_then(|s| s.parse().ok()).unwrap_or(0);
        let first = (last + 1).max((now_ms() as u64) << 20);
        let new_last = first + n.saturating_sub(1);
        self.tx.execute(
            "INSERT INTO meta(k, v) VALUES ('clock', ?1) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            params![new_last.to_string()],
        )?;
        Ok(first)
    }

    fn load(&self, table: &str, key: &Key) -> Result<Option<(StoredRow, Position)>, StoreError> {
        let mut st = self.tx.prepare_cached(
            "SELECT image, pos_major, pos_minor, tomb_kind, tomb_at FROM rows WHERE tbl = ?1 AND key = ?2",
        )?;
        let row = st
            .query_row(params![table, key.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Position::new(r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64),
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            })
            .optional()?;
        row.map(|(image, pos, kind, at)| Ok((decode_row(table, key.clone(), &image, kind, at)?, pos)))
            .transpose()
    }

    fn save(&self, table: &str, row: &StoredRow, pos: Position) -> Result<(), StoreError> {
        let (kind, at) = match &row.tombstone {
            None => (None, None),
            Some(t) => (Some(tomb_kind_str(t.kind)), Some(t.at_ms)),
        };
        let mut st = self.tx.prepare_cached(
            "INSERT INTO rows(tbl, key, image, pos_major, pos_minor, tomb_kind, tomb_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(tbl, key) DO UPDATE SET image = excluded.image, pos_major = excluded.pos_major,
               pos_minor = excluded.pos_minor, tomb_kind = excluded.tomb_kind, tomb_at = excluded.tomb_at",
        )?;
        st.execute(params![
            table,
            row.key.as_str(),
            serde_json::to_string(&row.image).expect("JSON map serializes"),
            pos.major as i64,
            pos.minor as i64,
            kind,
            at
        ])?;
        Ok(())
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

    /// Applies one change (see the module's invariants).
    pub fn apply(&self, change: &Change) -> Result<Applied, StoreError> {
        let table = change.table.as_str();
        // Tables no projection reads are not kept.
        let (Some(spec), Some(needed)) = (self.catalog.tables.get(table), self.catalog.needed_columns.get(table))
        else {
            return Ok(Applied::default());
        };
        let mut applied = Applied::default();
        match &change.op {
            Op::Upsert { cells } => {
                if let Some(old_key) = change.old_key.as_ref().filter(|k| **k != change.key) {
                    // A primary-key change moves the row: the old key becomes a tombstone.
                    self.delete(table, old_key, change, &mut applied)?;
                }
                let stored = self.load(table, &change.key)?;
                if let Some((s, pos)) = &stored {
                    if *pos >= change.position {
                        // Older: ignored, except that it fills needed columns the stored image
                        // lacks (an unchanged TOAST value streamed before the snapshot read
                        // the row whole).
                        let mut image = s.image.clone();
                        for (col, cell) in cells {
                            if let Cell::Value(v) = cell {
                                if needed.contains(col) && !image.contains_key(col) {
                                    image.insert(col.clone(), v.clone());
                                }
                            }
                        }
                        if image.len() > s.image.len() {
                            let row = StoredRow { image, ..s.clone() };
                            self.save(table, &row, *pos)?;
                            self.reindex(table, &row.key, Some(&s.image), &row.image)?;
                            applied.images.push(s.image.clone());
                            applied.images.push(row.image);
                        } else {
                            applied.images.push(image);
                        }
                        return Ok(applied);
                    }
                }
                let mut image = Row::new();
                for (col, cell) in cells {
                    if !needed.contains(col) {
                        continue;
                    }
                    match cell {
                        Cell::Value(v) => {
                            image.insert(col.clone(), v.clone());
                        }
                        Cell::Unchanged => match stored.as_ref().and_then(|(s, _)| s.image.get(col)) {
                            Some(v) => {
                                image.insert(col.clone(), v.clone());
                            }
                            None => applied.missing_unchanged.push(col.clone()),
                        },
                    }
                }
                let old_tomb = stored.as_ref().and_then(|(s, _)| s.tombstone.clone());
                let tombstone = match &spec.decommissioned {
                    Some(rule) if rule.matches(&image) => Some(match old_tomb.clone() {
                        Some(t) if t.kind == TombstoneKind::Decommissioned => t,
                        _ => Tombstone {
                            kind: TombstoneKind::Decommissioned,
                            at_ms: change.commit_time_ms,
                        },
                    }),
                    _ => None,
                };
                let row = StoredRow {
                    key: change.key.clone(),
                    image,
                    tombstone,
                };
                self.save(table, &row, change.position)?;
                let moved = change.old_key.as_ref().is_some_and(|k| *k != change.key);
                applied.in_place = !moved && stored.is_some() && old_tomb == row.tombstone;
                let old_image = stored.map(|(s, _)| s.image);
                self.reindex(table, &row.key, old_image.as_ref(), &row.image)?;
                applied.images.extend(old_image);
                applied.images.push(row.image);
            }
            Op::Delete => self.delete(table, &change.key, change, &mut applied)?,
            Op::Truncate => {
                let mut keys = Vec::new();
                {
                    let mut st = self.tx.prepare_cached("SELECT key FROM rows WHERE tbl = ?1")?;
                    let mut q = st.query(params![table])?;
                    while let Some(r) = q.next()? {
                        keys.push(Key::from_canonical(r.get(0)?));
                    }
                }
                for k in keys {
                    self.delete(table, &k, change, &mut applied)?;
                }
            }
        }
        Ok(applied)
    }

    fn delete(&self, table: &str, key: &Key, change: &Change, applied: &mut Applied) -> Result<(), StoreError> {
        let spec = &self.catalog.tables[table];
        match self.load(table, key)? {
            Some((s, pos)) if pos >= change.position => applied.images.push(s.image),
            Some((mut s, _)) => {
                if !matches!(&s.tombstone, Some(t) if t.kind == TombstoneKind::Deleted) {
                    s.tombstone = Some(Tombstone {
                        kind: TombstoneKind::Deleted,
                        at_ms: s.tombstone.map_or(change.commit_time_ms, |t| t.at_ms),
                    });
                }
                self.save(table, &s, change.position)?;
                applied.images.push(s.image);
            }
            None => {
                // Never seen: remember the tombstone (so an older replay cannot
                // resurrect it), with the key columns as its only image.
                let mut image = Row::new();
                for (c, v) in spec.primary_key.iter().zip(key.values()) {
                    image.insert(c.clone(), v);
                }
                let row = StoredRow {
                    key: key.clone(),
                    image,
                    tombstone: Some(Tombstone {
                        kind: TombstoneKind::Deleted,
                        at_ms: change.commit_time_ms,
                    }),
                };
                self.save(table, &row, change.position)?;
                self.reindex(table, key, None, &row.image)?;
                applied.images.push(row.image);
            }
        }
        Ok(())
    }
}

fn tomb_kind_str(k: TombstoneKind) -> &'static str {
    match k {
        TombstoneKind::Deleted => "deleted",
        TombstoneKind::Decommissioned => "decommissioned",
    }
}

fn decode_row(
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
        at_ms: at.unwrap_or(0),
    });
    Ok(StoredRow { key, image, tombstone })
}

/// Read access for rendering and fan-out, over any connection (the worker's, or a
/// read-only one).
fn lookup_get(conn: &Connection, table: &str, key: &Key) -> Result<Option<StoredRow>, LookupError> {
    let mut st = conn.prepare_cached("SELECT image, tomb_kind, tomb_at FROM rows WHERE tbl = ?1 AND key = ?2")?;
    let r = st
        .query_row(params![table, key.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<i64>>(2)?,
            ))
        })
        .optional()?;
    Ok(r.map(|(i, k, a)| decode_row(table, key.clone(), &i, k, a))
        .transpose()?)
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
    let mut st = conn.prepare_cached(
        "SELECT r.key, r.image, r.tomb_kind, r.tomb_at FROM idx i JOIN rows r ON r.tbl = i.tbl AND r.key = i.key
         WHERE i.tbl = ?1 AND i.cols = ?2 AND i.val = ?3",
    )?;
    let mut out = Vec::new();
    let mut q = st.query(params![table, cols_key(columns), Key::from_values(values).as_str()])?;
    while let Some(r) = q.next()? {
        let key = Key::from_canonical(r.get(0)?);
        out.push(decode_row(table, key, &r.get::<_, String>(1)?, r.get(2)?, r.get(3)?)?);
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

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
