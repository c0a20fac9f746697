//! Progress: per-source checkpoints, the progress of initial snapshots and re-reads, the
//! documents a batch must still write (cleared with its checkpoint), the projections to
//! re-write whole, and the index a rebuild fills.

use super::{meta_get, meta_set, now_ms, Store, StoreError, StoreTx};
use rusqlite::{params, OptionalExtension};
use std::collections::{BTreeMap, HashMap};
use viewkeeper_core::model::Key;
use viewkeeper_core::source::{SnapshotMark, TableProgress};
use viewkeeper_core::Checkpoint;

/// Documents still to write: projection → root keys, with the newest batch tag among them.
#[derive(Debug, Default, PartialEq)]
pub struct Pending {
    pub roots: BTreeMap<String, Vec<Key>>,
    pub through: u64,
}

impl Store {
    pub fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT kind, pos_major FROM checkpoints WHERE source = ?1",
                params![source],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)),
            )
            .optional()?
            .and_then(|(kind, v)| Checkpoint::from_parts(&kind, v)))
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
    /// store and acknowledged by every sink, and that the documents of the batches tagged
    /// up to `written_through` are written. Call only then.
    pub fn set_checkpoints(
        &mut self,
        positions: &BTreeMap<String, Checkpoint>,
        written_through: Option<u64>,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            for (source, cp) in positions {
                tx.execute(
                    "INSERT INTO checkpoints(source, pos_major, pos_minor, updated_ms, kind) VALUES (?1, ?2, 0, ?3, ?4)
                     ON CONFLICT(source) DO UPDATE SET pos_major = excluded.pos_major,
                       updated_ms = excluded.updated_ms, kind = excluded.kind
                     WHERE excluded.pos_major > checkpoints.pos_major",
                    params![source, cp.value() as i64, now_ms(), cp.kind()],
                )?;
            }
            if let Some(t) = written_through {
                tx.execute("DELETE FROM pending WHERE batch <= ?1", params![t as i64])?;
            }
            Ok(())
        })
    }

    /// The documents batches applied but did not finish writing (a crash, or a stop
    /// during a sink outage): written first on the next start.
    pub fn pending(&self) -> Result<Pending, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT projection, key, batch FROM pending ORDER BY projection, key")?;
        let mut out = Pending::default();
        let mut q = st.query([])?;
        while let Some(r) = q.next()? {
            out.roots
                .entry(r.get(0)?)
                .or_default()
                .push(Key::from_canonical(r.get(1)?));
            out.through = out.through.max(r.get::<_, i64>(2)? as u64);
        }
        Ok(out)
    }

    /// Forgets the pending documents tagged up to `through` (written).
    pub fn clear_pending(&mut self, through: u64) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("DELETE FROM pending WHERE batch <= ?1", params![through as i64])?;
            Ok(())
        })
    }

    /// Where the initial snapshot of `source` stands, per table (`schema.table`).
    pub fn snapshot_progress(&self, source: &str) -> Result<HashMap<String, TableProgress>, StoreError> {
        self.progress("snapshot_progress", source)
    }

    /// Where the re-reads of `source`'s tables stand (tables whose needed columns grew).
    pub fn reload_progress(&self, source: &str) -> Result<HashMap<String, TableProgress>, StoreError> {
        self.progress("reload_progress", source)
    }

    /// Whether any re-read of a table of `source` (or of any source) is not done.
    pub fn reloads_pending(&self, source: Option<&str>) -> Result<bool, StoreError> {
        Ok(self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM reload_progress WHERE done = 0 AND (?1 IS NULL OR source = ?1))",
            params![source],
            |r| r.get(0),
        )?)
    }

    fn progress(&self, table: &str, source: &str) -> Result<HashMap<String, TableProgress>, StoreError> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT tbl, last_key, done FROM {table} WHERE source = ?1"))?;
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
        self.meta(&format!("rebuild:{projection}"))
    }

    pub fn set_rebuild_target(&mut self, projection: &str, index: Option<&str>) -> Result<(), StoreError> {
        let k = format!("rebuild:{projection}");
        self.write(|tx| meta_set(tx, &k, index))
    }

    /// Projections to re-write whole (their sink lost data, their index was created over
    /// a non-empty store, or their config changed), with why. Durable, so a re-write that
    /// a crash interrupted is done again on the next start.
    pub fn resyncs(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT substr(k, 8), v FROM meta WHERE k LIKE 'resync:%'")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn mark_resync(&mut self, projection: &str, why: &str) -> Result<(), StoreError> {
        let k = format!("resync:{projection}");
        self.write(|tx| {
            // The first reason stays: it is what started the re-write.
            if meta_get(tx, &k)?.is_none() {
                meta_set(tx, &k, Some(why))?;
            }
            Ok(())
        })
    }

    pub fn clear_resync(&mut self, projection: &str) -> Result<(), StoreError> {
        let k = format!("resync:{projection}");
        self.write(|tx| meta_set(tx, &k, None))
    }

    /// What a sink's storage was when every projection on it was last complete (e.g. the
    /// Redis server's run id): when the sink answers with another, it lost data.
    pub fn sink_identity(&self, sink: &str) -> Result<Option<String>, StoreError> {
        self.meta(&format!("sink_identity:{sink}"))
    }

    pub fn set_sink_identity(&mut self, sink: &str, identity: &str) -> Result<(), StoreError> {
        let k = format!("sink_identity:{sink}");
        self.write(|tx| meta_set(tx, &k, Some(identity)))
    }
}

impl StoreTx<'_> {
    /// Records a snapshot or re-read batch's progress with its rows.
    pub fn record_snapshot(&self, source: &str, mark: &SnapshotMark) -> Result<(), StoreError> {
        let (table, tbl, last, done) = match mark {
            SnapshotMark::Chunk { table, last_key } => (
                "snapshot_progress",
                table.as_str(),
                Some(serde_json::to_string(last_key).expect("JSON")),
                0,
            ),
            SnapshotMark::TableDone { table } => ("snapshot_progress", table.as_str(), None, 1),
            SnapshotMark::ReloadChunk { table, last_key } => (
                "reload_progress",
                table.as_str(),
                Some(serde_json::to_string(last_key).expect("JSON")),
                0,
            ),
            SnapshotMark::ReloadDone { table } => ("reload_progress", table.as_str(), None, 1),
            SnapshotMark::Complete | SnapshotMark::CatchUp | SnapshotMark::Restore => return Ok(()),
            SnapshotMark::Begin => {
                self.tx
                    .execute("DELETE FROM snapshot_progress WHERE source = ?1", params![source])?;
                return Ok(());
            }
        };
        self.tx.execute(
            &format!(
                "INSERT INTO {table}(source, tbl, last_key, done) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(source, tbl) DO UPDATE SET last_key = coalesce(excluded.last_key, {table}.last_key),
                   done = excluded.done"
            ),
            params![source, tbl, last, done],
        )?;
        Ok(())
    }

    /// Remembers root keys of `projection` that this transaction's batch (tagged `batch`,
    /// growing) must write; cleared by [`Store::set_checkpoints`] once written.
    pub fn add_pending<'k>(
        &self,
        projection: &str,
        keys: impl IntoIterator<Item = &'k Key>,
        batch: u64,
    ) -> Result<(), StoreError> {
        let mut st = self.tx.prepare_cached(
            "INSERT INTO pending(projection, key, batch) VALUES (?1, ?2, ?3)
             ON CONFLICT(projection, key) DO UPDATE SET batch = max(batch, excluded.batch)",
        )?;
        for k in keys {
            st.execute(params![projection, k.as_str(), batch as i64])?;
        }
        Ok(())
    }
}
