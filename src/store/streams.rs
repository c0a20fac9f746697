//! What a worker that shares a source with others keeps about itself: its id, and how
//! far it applied each stream (`topic[partition]`) of a Kafka source, stored in the same
//! transaction as the rows. A shared source resumes from these offsets (its records are
//! in no consumer group); a partitioned one restores the partitions it takes over from
//! them (see `connectors::sources::debezium::consumer`).

use super::merge::Rows;
use super::{meta_get, meta_set, Store, StoreError, StoreTx};
use rusqlite::params;
use std::collections::BTreeMap;
use viewkeeper_core::model::{Change, Key};

impl StoreTx<'_> {
    /// Records the next offset of every stream `changes` came from (raised, never lowered).
    pub fn record_streams(&self, changes: &[Change]) -> Result<(), StoreError> {
        let mut next: BTreeMap<&str, u64> = BTreeMap::new();
        for c in changes {
            if let Some(o) = &c.origin {
                let e = next.entry(o.stream.as_str()).or_default();
                *e = (*e).max(o.offset + 1);
            }
        }
        if next.is_empty() {
            return Ok(());
        }
        let mut st = self.tx.prepare_cached(
            "INSERT INTO streams(stream, next) VALUES (?1, ?2)
             ON CONFLICT(stream) DO UPDATE SET next = max(next, excluded.next)",
        )?;
        for (stream, n) in next {
            st.execute(params![stream, n as i64])?;
        }
        Ok(())
    }

    /// Records what this worker owns now (see [`Ownership`](viewkeeper_core::source::Ownership)):
    /// read by `verify` and `status` beside the worker.
    pub fn record_ownership(&self, o: &OwnershipRecord) -> Result<(), StoreError> {
        self.set_meta("ownership", Some(&serde_json::to_string(o).expect("JSON")))
    }

    /// The stream (`topic[partition]`) the stored row of `table` with `key` last came
    /// from (`None`: no such row, or not from a Kafka source).
    pub fn origin_of(&self, table: &str, key: &Key) -> Result<Option<String>, StoreError> {
        Ok(self.load(table, key)?.and_then(|s| s.origin).map(|o| o.stream))
    }
}

/// What a worker of a partitioned source owns, as the state store keeps it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OwnershipRecord {
    /// The partitioned source.
    pub source: String,
    /// Its topics' partition count.
    pub partitions: u32,
    pub owned: Vec<u32>,
    /// Tables whose rows' documents are split (of the partitioned and the shared sources).
    pub governed: Vec<String>,
    /// When it last changed (ms since the epoch).
    pub since_ms: i64,
}

impl OwnershipRecord {
    /// Whether this worker writes the document whose root row came from `origin`.
    pub fn owns(&self, origin: Option<&str>) -> bool {
        origin
            .and_then(partition_of)
            .is_some_and(|p| self.owned.contains(&(p % self.partitions.max(1))))
    }
}

impl Store {
    /// What this store's worker owns of a partitioned source (`None`: not split).
    pub fn ownership(&self) -> Result<Option<OwnershipRecord>, StoreError> {
        Ok(meta_get(&self.conn, "ownership")?.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Stream → the next offset to read (everything before it is applied).
    pub fn stream_offsets(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut st = self.conn.prepare("SELECT stream, next FROM streams")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Keys of every stored row of `table` with the stream each last came from.
    pub fn keys_with_origin(&self, table: &str) -> Result<Vec<(Key, Option<String>)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT key, origin FROM rows WHERE tbl = ?1 ORDER BY key")?;
        let rows = st.query_map(params![table], |r| {
            Ok((
                Key::from_canonical(r.get::<_, String>(0)?),
                r.get::<_, Option<String>>(1)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// This store's worker id, if a worker made one ([`Store::worker_id`]).
    pub fn stored_worker_id(&self) -> Result<Option<String>, StoreError> {
        meta_get(&self.conn, "worker_id")
    }

    /// This store's worker id (`<host>-<8 hex>`), made at the first call and kept: the
    /// consumer's `client.id`, so the group's members name their workers; it goes with
    /// the state it describes.
    pub fn worker_id(&mut self) -> Result<String, StoreError> {
        if let Some(id) = meta_get(&self.conn, "worker_id")? {
            return Ok(id);
        }
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "worker".into());
        let host: String = host
            .trim()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
            .collect();
        let id = format!("{host}-{:08x}", h.finish() as u32);
        meta_set(&self.conn, "worker_id", Some(&id))?;
        Ok(id)
    }
}

/// The partition of a stream `topic[partition]`.
pub fn partition_of(stream: &str) -> Option<u32> {
    let open = stream.rfind('[')?;
    stream[open + 1..].strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::partition_of;

    #[test]
    fn partitions_are_read_from_stream_names() {
        assert_eq!(partition_of("shop.public.orders[3]"), Some(3));
        assert_eq!(partition_of("a[b][12]"), Some(12));
        assert_eq!(partition_of("orders"), None);
        assert_eq!(partition_of("orders[x]"), None);
    }
}
