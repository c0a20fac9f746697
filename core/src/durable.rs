//! How far each source is durable in every sink: what `/v1/wait` (read-your-writes)
//! waits for. Published through a `tokio::sync::watch` channel per source; waiters
//! subscribe and are woken on every advance (no polling).
//!
//! * Postgres: every transaction committed at or before [`Durable::lsn`] is in the state
//!   store and in every sink. It is the checkpoint (a commit's end LSN), or the server's
//!   WAL end from a keepalive while the source was idle and caught up (then nothing the
//!   publication carries lies between the last commit and that position).
//! * Kafka: per topic and partition, the next offset to read: every record below it is
//!   durable everywhere.

use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// WAL page size (Postgres' default `XLOG_BLCKSZ`) and the longest page header: no WAL
/// record lies in the header, so a position inside it is equivalent to the page start.
const WAL_PAGE: u64 = 8192;
const WAL_LONG_PAGE_HEADER: u64 = 40;

/// A source's durable position (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Durable {
    /// Postgres: durable through this WAL position.
    pub lsn: Option<u64>,
    /// Kafka: `(topic, partition)` → the next offset to read.
    pub offsets: BTreeMap<(String, i32), i64>,
}

impl Durable {
    /// Whether every change committed at or before `lsn` is durable. A position taken with
    /// `pg_current_wal_insert_lsn()` right after a commit that ended on a page boundary
    /// lies past the page header (the insert position skips it): it counts as reached.
    pub fn covers_lsn(&self, lsn: u64) -> bool {
        self.lsn
            .is_some_and(|d| lsn <= d || (d % WAL_PAGE == 0 && lsn <= d + WAL_LONG_PAGE_HEADER))
    }

    /// Whether the record at `offset` of `topic[partition]` is durable.
    pub fn covers_offset(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.offsets
            .get(&(topic.to_string(), partition))
            .is_some_and(|next| *next > offset)
    }

    /// Raises the LSN (never lowers it); `true` when it moved.
    pub fn raise_lsn(&mut self, lsn: u64) -> bool {
        let newer = self.lsn.is_none_or(|d| lsn > d);
        if newer {
            self.lsn = Some(lsn);
        }
        newer
    }

    /// Raises partitions' next offsets (never lowers one); `true` when one moved.
    pub fn raise_offsets<'a>(&mut self, offsets: impl IntoIterator<Item = (&'a (String, i32), &'a i64)>) -> bool {
        let mut moved = false;
        for (tp, next) in offsets {
            let e = self.offsets.entry(tp.clone()).or_insert(i64::MIN);
            if *next > *e {
                *e = *next;
                moved = true;
            }
        }
        moved
    }
}

/// The publishing side of one source's [`Durable`] (shared by the engine, which raises
/// Postgres checkpoints, and a Kafka source, which raises offsets).
pub type DurableTx = Arc<watch::Sender<Durable>>;

/// A new, empty publisher.
pub fn durable_channel() -> DurableTx {
    Arc::new(watch::Sender::new(Durable::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_and_offsets_cover_what_is_durable() {
        let mut d = Durable::default();
        assert!(!d.covers_lsn(1));
        assert!(d.raise_lsn(0x1000));
        assert!(!d.raise_lsn(0x0fff));
        assert!(d.covers_lsn(0x1000) && d.covers_lsn(5) && !d.covers_lsn(0x1001));
        // On a page boundary: the header after it holds no record.
        d.raise_lsn(3 * 8192);
        assert!(d.covers_lsn(3 * 8192 + 24) && d.covers_lsn(3 * 8192 + 40));
        assert!(!d.covers_lsn(3 * 8192 + 41));
        let tp = ("t".to_string(), 0);
        assert!(!d.covers_offset("t", 0, 0));
        assert!(d.raise_offsets([(&tp, &5)]));
        assert!(!d.raise_offsets([(&tp, &4)]));
        assert!(d.covers_offset("t", 0, 4) && !d.covers_offset("t", 0, 5) && !d.covers_offset("t", 1, 0));
    }
}
