//! The store's shape: which columns of each table it keeps and which reverse indexes it
//! maintains, as built for the config the worker last ran with.
//!
//! Only the worker changes the shape, and only while it holds the data dir's
//! [`WorkerLock`]: when its config needs columns the store never kept (a new field or
//! relation, a new table), it records the shape with the re-reads that fill them in, in
//! one transaction ([`Store::adopt_shape`]). Another process writing beside it with a
//! different config (a rebuild, `dlq replay`, `verify --repair`) must not change the
//! store under it: [`Store::open_beside`] refuses a config that needs more than the store
//! keeps, and never drops an index.

use super::rows::cols_key;
use super::{Store, StoreError};
use rusqlite::params;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Why a process may not use the store with its config.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error(
        "the state store was built for another config: {}. Start `viewkeeper run` with this config first (it re-reads what the store lacks from the sources), or use the config the worker runs with",
        .missing.join("; ")
    )]
    Needs { missing: Vec<String> },
    #[error(
        "another viewkeeper worker{} runs on the data dir {dir}: one worker per data dir (stop it, or give this one its own --data-dir)",
        .pid.as_ref().map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { dir: String, pid: Option<String> },
    #[error("cannot lock the data dir {dir}: {source}")]
    Lock {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

/// A projection's fingerprint: when it changes, its documents are written again whole.
///
/// `meta` (the `_meta` field) was added after fingerprints were first stored: off, it is
/// left out, so stores written before keep their fingerprints; on, it changes them (every
/// document gets the field).
pub fn fingerprint(spec: &viewkeeper_projections::spec::ProjectionSpec) -> String {
    let text = format!("{spec:?}");
    match text.strip_suffix(", meta: false }") {
        Some(before) => format!("{before} }}"),
        None => text,
    }
}

/// What the store must do for a new config: columns to re-read, projections to re-write.
#[derive(Debug, Default)]
pub struct Adoption {
    /// Re-read from the start (chunked, while streaming): `(source, schema.table)`.
    pub reloads: Vec<(String, String)>,
    /// Initial snapshots in progress that must read these tables again from the start.
    pub restart_snapshots: Vec<(String, String)>,
    /// Projections to re-write whole, with why.
    pub resyncs: Vec<(String, String)>,
    /// Every projection's fingerprint (see [`fingerprint`]).
    pub fingerprints: BTreeMap<String, String>,
}

impl Store {
    /// The columns the store kept, per table; `None` for a store that has not recorded
    /// its shape yet (a new one, or one written before shapes were recorded).
    fn stored_columns(&self) -> Result<Option<BTreeMap<String, BTreeSet<String>>>, StoreError> {
        Ok(self.meta("shape")?.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Per table, the needed columns the store does not keep (all of them for a table it
    /// never kept). Empty for a store without a recorded shape: it adopts the catalog's.
    pub fn shape_growth(&self) -> Result<BTreeMap<String, BTreeSet<String>>, StoreError> {
        let Some(stored) = self.stored_columns()? else {
            return Ok(BTreeMap::new());
        };
        let mut out = BTreeMap::new();
        for (table, cols) in &self.catalog.needed_columns {
            let have = stored.get(table);
            let new: BTreeSet<String> = cols
                .iter()
                .filter(|c| !have.is_some_and(|h| h.contains(*c)))
                .cloned()
                .collect();
            if !new.is_empty() {
                out.insert(table.clone(), new);
            }
        }
        Ok(out)
    }

    /// The fingerprint recorded for a projection (see [`fingerprint`]), `None` for one
    /// the store has not run with.
    pub fn fingerprint_of(&self, projection: &str) -> Result<Option<String>, StoreError> {
        self.meta(&format!("projection:{projection}"))
    }

    /// Records the catalog's shape with what it takes to fill it, in one transaction: the
    /// re-reads, the restarted snapshot tables, the re-writes and the fingerprints.
    pub fn adopt_shape(&mut self, a: &Adoption) -> Result<(), StoreError> {
        let shape = serde_json::to_string(&self.catalog.needed_columns).expect("serializable");
        self.write(|tx| {
            for (source, tbl) in &a.reloads {
                tx.execute(
                    "INSERT INTO reload_progress(source, tbl, last_key, done) VALUES (?1, ?2, NULL, 0)
                     ON CONFLICT(source, tbl) DO UPDATE SET last_key = NULL, done = 0",
                    params![source, tbl],
                )?;
            }
            for (source, tbl) in &a.restart_snapshots {
                tx.execute(
                    "DELETE FROM snapshot_progress WHERE source = ?1 AND tbl = ?2",
                    params![source, tbl],
                )?;
            }
            for (p, why) in &a.resyncs {
                super::meta_set(tx, &format!("resync:{p}"), Some(why))?;
            }
            for (p, fp) in &a.fingerprints {
                super::meta_set(tx, &format!("projection:{p}"), Some(fp))?;
            }
            super::meta_set(tx, "shape", Some(&shape))
        })
    }

    /// For [`Store::open_beside`]: every needed column and index is kept by the store.
    pub(super) fn check_fits(&self) -> Result<(), StoreError> {
        let mut missing = Vec::new();
        if let Some(stored) = self.stored_columns()? {
            for (table, cols) in &self.catalog.needed_columns {
                let have = stored.get(table);
                let lacking: Vec<&str> = cols
                    .iter()
                    .filter(|c| !have.is_some_and(|h| h.contains(*c)))
                    .map(String::as_str)
                    .collect();
                if !lacking.is_empty() {
                    missing.push(format!("table {table} lacks column(s) {}", lacking.join(", ")));
                }
            }
        }
        let indexes = self.stored_indexes()?;
        for (table, cols) in &self.catalog.indexes {
            if !indexes.contains(&(table.clone(), cols_key(cols))) {
                missing.push(format!("no reverse index on {table}({})", cols.join(", ")));
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ShapeError::Needs { missing }.into())
        }
    }
}

/// The data dir's lock (`worker.lock`, an OS file lock released when the process ends,
/// even by SIGKILL): one worker per data dir, and only the worker changes the store's
/// shape.
pub struct WorkerLock {
    _file: std::fs::File,
    pub path: PathBuf,
}

impl WorkerLock {
    pub fn acquire(dir: &Path) -> Result<WorkerLock, ShapeError> {
        let shown = dir.display().to_string();
        let io = |source| ShapeError::Lock {
            dir: shown.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("worker.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim().to_string();
                return Err(ShapeError::Locked {
                    dir: shown,
                    pid: (!pid.is_empty()).then_some(pid),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(WorkerLock { _file: file, path })
    }
}

#[cfg(test)]
mod fingerprint_tests {
    use super::fingerprint;

    #[test]
    fn meta_off_keeps_the_fingerprints_of_older_stores() {
        let spec: viewkeeper_projections::spec::ProjectionSpec =
            serde_json::from_value(serde_json::json!({"root": "products", "sink": "cache", "fields": ["name"]}))
                .unwrap();
        let fp = fingerprint(&spec);
        assert!(fp.ends_with("index: None }"), "{fp}");
        assert!(!fp.contains("meta"), "{fp}");
        let with = viewkeeper_projections::spec::ProjectionSpec { meta: true, ..spec };
        assert_ne!(fingerprint(&with), fp);
    }
}
