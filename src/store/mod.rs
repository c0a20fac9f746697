//! The state store: one SQLite file under the data dir (`state.db`, WAL mode,
//! `synchronous=FULL`).
//!
//! It keeps, for every table a projection reads: the latest image of each row
//! (only the columns projections need), tombstones, each row's source position,
//! reverse indexes for joins; and, for the engine: the hybrid version clock, the
//! per-source checkpoints, the documents still to write, the dead-letter store, and the
//! shape (columns, indexes) it was built for.
//!
//! Invariants:
//! * How a change meets a stored row is decided by the pure rules of [`merge`]; this
//!   module only stores (rows in [`rows`], lookups in [`lookup`]).
//! * A checkpoint is written only by [`Store::set_checkpoints`], which the engine calls
//!   after every sink acknowledged the batch; a crash before that replays the batch. The
//!   root keys a batch must still write are stored with its state and cleared with its
//!   checkpoint ([`checkpoints`]), so a replay that is a no-op still writes them.
//! * The version clock never goes back: `max(last + 1, unix_ms << 20)`, persisted in
//!   the same transaction as the state it versions ([`clock`]).
//! * Only the worker (which holds the data dir's lock) changes the store's shape; other
//!   processes that write (rebuild, dlq replay, verify --repair) refuse a config that
//!   needs more than the store keeps ([`shape`]).
//! * Other processes (status, verify, dlq) may open the file read-only while the
//!   worker writes; WAL mode gives them consistent snapshots.

mod cache;
mod checkpoints;
mod clock;
mod dead_letters;
mod lookup;
pub mod merge;
mod rows;
pub mod shape;
pub mod streams;

pub use checkpoints::Pending;
pub use merge::Applied;
pub use shape::{ShapeError, WorkerLock};
pub use viewkeeper_core::DeadLetter;

use cache::{Overlay, RowCache};
use rusqlite::{params, Connection, OpenFlags, Transaction};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
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
    #[error(transparent)]
    Shape(#[from] ShapeError),
}

/// What the store needs to know about tables: keys, decommission rules, which
/// columns to keep and which join columns to index.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub tables: BTreeMap<String, TableSpec>,
    pub needed_columns: BTreeMap<String, BTreeSet<String>>,
    pub indexes: BTreeSet<(String, Vec<String>)>,
}

pub struct Store {
    conn: Connection,
    catalog: Catalog,
    /// The data dir (for [`Store::reader`]).
    dir: std::path::PathBuf,
    /// Rows and TRUNCATE watermarks in memory ([`cache`]).
    cache: RefCell<RowCache>,
}

/// Rows a store keeps in memory unless told otherwise ([`Store::set_row_cache`]).
pub const DEFAULT_ROW_CACHE: usize = 50_000;

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS rows(
        tbl TEXT NOT NULL, key TEXT NOT NULL, image TEXT NOT NULL,
        pos_major INTEGER NOT NULL, pos_minor INTEGER NOT NULL,
        tomb_kind TEXT, tomb_at INTEGER, origin TEXT, origin_offset INTEGER,
        PRIMARY KEY(tbl, key)) WITHOUT ROWID;
     CREATE TABLE IF NOT EXISTS idx(
        tbl TEXT NOT NULL, cols TEXT NOT NULL, val TEXT NOT NULL, key TEXT NOT NULL,
        PRIMARY KEY(tbl, cols, val, key)) WITHOUT ROWID;
     CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT NOT NULL);
     CREATE TABLE IF NOT EXISTS streams(stream TEXT PRIMARY KEY, next INTEGER NOT NULL);
     CREATE TABLE IF NOT EXISTS checkpoints(
        source TEXT PRIMARY KEY, pos_major INTEGER NOT NULL, pos_minor INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL);
     CREATE TABLE IF NOT EXISTS dead_letters(
        id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, source TEXT NOT NULL,
        position TEXT NOT NULL, tbl TEXT NOT NULL, key TEXT NOT NULL, stage TEXT NOT NULL,
        reason TEXT NOT NULL, payload TEXT NOT NULL);
     CREATE TABLE IF NOT EXISTS snapshot_progress(
        source TEXT NOT NULL, tbl TEXT NOT NULL, last_key TEXT, done INTEGER NOT NULL,
        PRIMARY KEY(source, tbl));
     CREATE TABLE IF NOT EXISTS reload_progress(
        source TEXT NOT NULL, tbl TEXT NOT NULL, last_key TEXT, done INTEGER NOT NULL,
        PRIMARY KEY(source, tbl));
     CREATE TABLE IF NOT EXISTS truncations(
        tbl TEXT NOT NULL, pos_major INTEGER NOT NULL, pos_minor INTEGER NOT NULL,
        at_ms INTEGER NOT NULL, PRIMARY KEY(tbl, pos_major, pos_minor)) WITHOUT ROWID;
     CREATE TABLE IF NOT EXISTS pending(
        projection TEXT NOT NULL, key TEXT NOT NULL, batch INTEGER NOT NULL,
        PRIMARY KEY(projection, key)) WITHOUT ROWID;";

fn open_conn(dir: &Path) -> Result<Connection, StoreError> {
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
    conn.execute_batch(SCHEMA)?; // Stores written before rows remembered their log place, and checkpoints their kind.
    let has = |table: &str, column: &str| -> Result<bool, rusqlite::Error> {
        conn.query_row(
            "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
            params![table, column],
            |r| r.get(0),
        )
    };
    if !has("rows", "origin")? {
        conn.execute_batch(
            "ALTER TABLE rows ADD COLUMN origin TEXT; ALTER TABLE rows ADD COLUMN origin_offset INTEGER;",
        )?;
    }
    if !has("checkpoints", "kind")? {
        conn.execute_batch("ALTER TABLE checkpoints ADD COLUMN kind TEXT NOT NULL DEFAULT 'lsn';")?;
    }
    Ok(conn)
}

impl Store {
    /// Opens (creating) the state store as its owner: the worker, holding the data dir's
    /// [`WorkerLock`]. Reverse indexes the catalog declares but the file lacks are built
    /// (from the stored images), ones no longer declared dropped; see
    /// [`Store::shape_growth`] for columns.
    pub fn open(dir: &Path, catalog: Catalog) -> Result<Store, StoreError> {
        let conn = open_conn(dir)?;
        let mut store = Store {
            conn,
            catalog,
            dir: dir.to_path_buf(),
            cache: RefCell::new(RowCache::new(DEFAULT_ROW_CACHE)),
        };
        store.sync_indexes()?;
        Ok(store)
    }

    /// Opens the state store for writing beside its owner (a rebuild, `dlq replay`,
    /// `verify --repair`): the store's shape is left as it is, and a catalog that needs
    /// columns or indexes the store does not keep is refused with the reason.
    pub fn open_beside(dir: &Path, catalog: Catalog) -> Result<Store, StoreError> {
        let conn = open_conn(dir)?;
        let store = Store {
            conn,
            catalog,
            dir: dir.to_path_buf(),
            cache: RefCell::new(RowCache::new(DEFAULT_ROW_CACHE)),
        };
        store.check_fits()?;
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
        Ok(Store {
            conn,
            catalog,
            dir: dir.to_path_buf(),
            // Reads outside write transactions do not use cached rows (nothing would tell
            // them that the worker wrote meanwhile); the TRUNCATE watermarks are read once.
            cache: RefCell::new(RowCache::new(0)),
        })
    }

    /// How many rows write transactions keep in memory (0: none).
    pub fn set_row_cache(&mut self, rows: usize) {
        self.cache = RefCell::new(RowCache::new(rows));
    }

    /// Another read-only connection to the same file (a renderer on another thread).
    pub fn reader(&self) -> Result<Store, StoreError> {
        Store::open_read_only(&self.dir, self.catalog.clone())
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Starts a write transaction. IMMEDIATE: the write lock is taken at the start, so
    /// another process writing meanwhile (a `backfill --rebuild` beside the worker) makes
    /// this wait (busy timeout) instead of failing at its first write with
    /// SQLITE_BUSY_SNAPSHOT, as a deferred transaction whose snapshot went stale does.
    pub fn begin(&mut self) -> Result<StoreTx<'_>, StoreError> {
        let Store {
            conn, catalog, cache, ..
        } = self;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Holding the write lock: nobody else commits until this transaction ends.
        let c = cache.get_mut();
        c.check(&tx)?;
        c.truncations(&tx, "")?;
        Ok(StoreTx {
            tx,
            catalog,
            cache,
            overlay: RefCell::default(),
        })
    }

    /// Runs `f` in one IMMEDIATE write transaction and commits.
    fn write<T>(&mut self, f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let r = f(&tx)?;
        tx.commit()?;
        Ok(r)
    }

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

    /// Number of stored rows per table (tombstones included).
    pub fn row_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut st = self.conn.prepare("SELECT tbl, count(*) FROM rows GROUP BY tbl")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Keys of every stored row of `table`.
    pub fn keys(&self, table: &str) -> Result<Vec<viewkeeper_core::model::Key>, StoreError> {
        rows::keys(&self.conn, table)
    }

    /// Keys of up to `limit` stored rows of `table` that are not tombstones.
    pub fn live_keys(&self, table: &str, limit: usize) -> Result<Vec<viewkeeper_core::model::Key>, StoreError> {
        rows::live_keys(&self.conn, table, limit)
    }

    fn meta(&self, k: &str) -> Result<Option<String>, StoreError> {
        meta_get(&self.conn, k)
    }
}

fn meta_get(conn: &Connection, k: &str) -> Result<Option<String>, StoreError> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .prepare_cached("SELECT v FROM meta WHERE k = ?1")?
        .query_row(params![k], |r| r.get(0))
        .optional()?)
}

fn meta_set(conn: &Connection, k: &str, v: Option<&str>) -> Result<(), StoreError> {
    match v {
        Some(v) => conn.execute(
            "INSERT INTO meta(k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            params![k, v],
        )?,
        None => conn.execute("DELETE FROM meta WHERE k = ?1", params![k])?,
    };
    Ok(())
}

/// A write transaction over the state store. Dropping it without [`StoreTx::commit`]
/// rolls everything back.
pub struct StoreTx<'a> {
    tx: Transaction<'a>,
    catalog: &'a Catalog,
    cache: &'a RefCell<RowCache>,
    /// What this transaction wrote, for the cache once it commits.
    overlay: RefCell<Overlay>,
}

impl StoreTx<'_> {
    pub fn commit(self) -> Result<(), StoreError> {
        let StoreTx { tx, cache, overlay, .. } = self;
        tx.commit()?;
        cache.borrow_mut().absorb(overlay.into_inner());
        Ok(())
    }
}

#[cfg(test)]
mod tests;
