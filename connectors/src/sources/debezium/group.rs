//! Several workers over Kafka: how a Debezium source's topics are assigned
//! ([`Assignment`]), what they need of the worker's state store ([`Scaling`]), and how
//! the sources of one worker wait for each other ([`Gate`]).

use serde::Deserialize;
use std::collections::BTreeMap;
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

/// What a worker's Kafka sources need of its state store.
#[derive(Clone, Debug, Default)]
pub struct Scaling {
    /// The store's worker id (the consumer's `client.id`, so the group's members name
    /// their workers).
    pub worker_id: String,
    /// Stream (`topic[partition]`) → next offset the store applied, at start.
    pub offsets: BTreeMap<String, u64>,
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
