//! Several workers over Kafka: how a Debezium source's topics are assigned
//! ([`Assignment`]), what a partitioned source commits beside its offsets (who owns a
//! partition and its clock, [`OwnerMark`]), and how the sources of one worker wait for
//! each other ([`Gate`]).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// `assignment` of a `[sources.NAME]` of kind `debezium`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Assignment {
    /// One worker of the consumer group holds every partition (a second member makes
    /// both hold).
    #[default]
    Whole,
    /// The topics are split across the workers of the group (co-partitioned: partition
    /// `p` of every topic goes to one worker); a worker writes the documents whose root
    /// row arrived in a partition it owns.
    Partitioned,
    /// Every worker reads every partition itself (assigned, no group); offsets are kept
    /// in the worker's state store with the rows they produced.
    Shared,
}

impl Assignment {
    pub fn as_str(self) -> &'static str {
        match self {
            Assignment::Whole => "whole",
            Assignment::Partitioned => "partitioned",
            Assignment::Shared => "shared",
        }
    }
}

/// Where a worker stands on a partition, as committed with its offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerState {
    /// Taking it over (restoring its rows); nothing of it written by this worker yet
    /// except, maybe, part of the takeover.
    Claimed,
    /// Writing its documents; everything up to the committed offset is in them.
    Owned,
    /// Given up at a rebalance (its documents may have missed changes since).
    Released,
}

/// The commit metadata of a partitioned source: `viewkeeper worker=<id> clock=<v> state=<s>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerMark {
    pub worker: String,
    /// The highest version the worker had reserved when it committed.
    pub clock: u64,
    pub state: OwnerState,
}

impl OwnerMark {
    pub fn text(&self) -> String {
        let state = match self.state {
            OwnerState::Claimed => "claimed",
            OwnerState::Owned => "owned",
            OwnerState::Released => "released",
        };
        format!("viewkeeper worker={} clock={} state={state}", self.worker, self.clock)
    }

    /// The mark in commit metadata (`None`: not one of ours, or none).
    pub fn parse(text: &str) -> Option<OwnerMark> {
        let mut words = text.split_whitespace();
        if words.next()? != "viewkeeper" {
            return None;
        }
        let (mut worker, mut clock, mut state) = (None, None, None);
        for w in words {
            match w.split_once('=')? {
                ("worker", v) => worker = Some(v.to_string()),
                ("clock", v) => clock = v.parse().ok(),
                ("state", "claimed") => state = Some(OwnerState::Claimed),
                ("state", "owned") => state = Some(OwnerState::Owned),
                ("state", "released") => state = Some(OwnerState::Released),
                _ => {}
            }
        }
        Some(OwnerMark {
            worker: worker?,
            clock: clock?,
            state: state?,
        })
    }
}

/// What a worker's Kafka sources need of its state store.
#[derive(Clone, Debug, Default)]
pub struct Scaling {
    /// The store's worker id (named in commits).
    pub worker_id: String,
    /// Stream (`topic[partition]`) → next offset the store applied, at start.
    pub offsets: BTreeMap<String, u64>,
    /// The highest version the store reserved (committed as the owner's clock).
    pub clock: Arc<AtomicU64>,
    pub gate: Arc<Gate>,
}

/// How one worker's sources wait for each other: shared sources deliver nothing before
/// the partitioned source knows what it owns (their changes would fan out to documents
/// of an unknown owner), and a takeover renders only once every shared source caught up
/// to where its topics ended when it started (documents joined with half-read products
/// would go backwards).
#[derive(Debug)]
pub struct Gate {
    known: watch::Sender<bool>,
    shared: Mutex<BTreeMap<String, bool>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            known: watch::channel(false).0,
            shared: Mutex::default(),
        }
    }
}

impl Gate {
    /// A shared source that will report catching up.
    pub fn register_shared(&self, source: &str) {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(source.to_string(), false);
    }

    pub fn caught_up(&self, source: &str) {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(source.to_string(), true);
    }

    /// Shared sources not caught up yet.
    pub fn behind(&self) -> Vec<String> {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, up)| !**up)
            .map(|(s, _)| s.clone())
            .collect()
    }

    pub fn set_known(&self) {
        self.known.send_replace(true);
    }

    pub fn known(&self) -> bool {
        *self.known.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_marks_round_trip_and_foreign_metadata_is_none() {
        let m = OwnerMark {
            worker: "host-1a2b3c4d".into(),
            clock: 1 << 60,
            state: OwnerState::Released,
        };
        assert_eq!(OwnerMark::parse(&m.text()), Some(m));
        assert_eq!(OwnerMark::parse(""), None);
        assert_eq!(OwnerMark::parse("some other client"), None);
        assert_eq!(OwnerMark::parse("viewkeeper worker=a clock=x state=owned"), None);
        assert_eq!(OwnerMark::parse("viewkeeper worker=a clock=1"), None);
    }

    #[test]
    fn the_gate_lists_shared_sources_behind() {
        let g = Gate::default();
        g.register_shared("catalog");
        g.register_shared("identity");
        g.caught_up("identity");
        assert_eq!(g.behind(), vec!["catalog".to_string()]);
        assert!(!g.known());
        g.set_known();
        assert!(g.known());
    }
}
