//! Checkpoints: where a source can resume without losing anything before it. Not a row
//! [`crate::model::Position`]: a Postgres checkpoint is a WAL position, a Kafka one only
//! numbers the batches (the offsets themselves live in the consumer group), and the two
//! never compare.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Checkpoint {
    /// Postgres: the end LSN of the last transaction durable everywhere (also the flushed
    /// LSN reported to the server).
    Lsn(u64),
    /// Kafka: the sequence number of the last batch durable everywhere.
    Batch(u64),
}

impl Checkpoint {
    pub fn value(self) -> u64 {
        match self {
            Checkpoint::Lsn(v) | Checkpoint::Batch(v) => v,
        }
    }

    /// The stored kind's name (`lsn` or `batch`).
    pub fn kind(self) -> &'static str {
        match self {
            Checkpoint::Lsn(_) => "lsn",
            Checkpoint::Batch(_) => "batch",
        }
    }

    /// Rebuilds a checkpoint from its kind and value (as stored).
    pub fn from_parts(kind: &str, value: u64) -> Option<Checkpoint> {
        match kind {
            "lsn" => Some(Checkpoint::Lsn(value)),
            "batch" => Some(Checkpoint::Batch(value)),
            _ => None,
        }
    }

    /// The later of two checkpoints of one source (of another kind: `self`).
    pub fn max(self, other: Checkpoint) -> Checkpoint {
        match self.partial_cmp(&other) {
            Some(Ordering::Less) => other,
            _ => self,
        }
    }
}

/// Only checkpoints of one kind compare.
impl PartialOrd for Checkpoint {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        match (self, other) {
            (Checkpoint::Lsn(a), Checkpoint::Lsn(b)) | (Checkpoint::Batch(a), Checkpoint::Batch(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Checkpoint::Lsn(v) => write!(f, "{:X}/{:X}", v >> 32, v & 0xffff_ffff),
            Checkpoint::Batch(v) => write!(f, "batch {v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_kind_compares() {
        assert!(Checkpoint::Lsn(5) < Checkpoint::Lsn(6));
        assert_eq!(Checkpoint::Lsn(5).partial_cmp(&Checkpoint::Batch(6)), None);
        assert_eq!(Checkpoint::Lsn(9).max(Checkpoint::Lsn(3)), Checkpoint::Lsn(9));
        assert_eq!(Checkpoint::Batch(1).max(Checkpoint::Batch(3)), Checkpoint::Batch(3));
        assert_eq!(Checkpoint::Lsn(0x1_0000_0010).to_string(), "1/10");
        assert_eq!(Checkpoint::from_parts("batch", 4), Some(Checkpoint::Batch(4)));
    }
}
