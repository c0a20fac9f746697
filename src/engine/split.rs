//! Several workers over one partitioned Kafka source: which documents this worker writes.
//!
//! The source's topics are split across the workers of one consumer group; the tables of
//! `shared` sources are read whole by every worker. A document belongs to the partition
//! its root row arrived in (a root of a shared table: that partition modulo the
//! partitioned source's partition count), and is written only by the worker owning that
//! partition. Ownership travels in-band ([`Ownership`] on a batch), so it changes exactly
//! between two batches:
//! * documents of partitions not owned are not rendered;
//! * while a rebalance may take partitions away they are *suspended*: affected documents
//!   are remembered, and written if the partitions stay;
//! * partitions taken over come with their rows restored (read up to where the previous
//!   owner got, not rendered) and the previous owners' clocks: the clock is raised above
//!   those, then every document of them is written again from this worker's state;
//! * until the first ownership is known (at start), the documents owed from an earlier
//!   run and marked re-writes wait, then go to the owned partitions.

use super::{Engine, EngineError};
use crate::store::streams::{partition_of, OwnershipRecord};
use crate::store::StoreTx;
use std::collections::{BTreeMap, BTreeSet};
use tracing::info;
use viewkeeper_core::model::Key;
use viewkeeper_core::source::Ownership;

#[derive(Debug, Default)]
pub struct Split {
    /// The partitioned source.
    pub source: String,
    /// Tables of the partitioned and the shared sources: the roots whose documents are split.
    pub governed: BTreeSet<String>,
    /// `None` until the first ownership arrives.
    own: Option<Ownership>,
    /// Per suspended partition (or `None`: before the first ownership), per projection:
    /// documents affected meanwhile.
    waiting: BTreeMap<Option<u32>, BTreeMap<usize, BTreeSet<Key>>>,
}

/// Whose a root is.
enum Whose {
    Mine,
    Waiting(Option<u32>),
    Others,
}

impl Split {
    pub fn new(source: String, governed: BTreeSet<String>) -> Split {
        Split {
            source,
            governed,
            ..Default::default()
        }
    }

    /// What is owned now, for the store.
    pub fn record(&self) -> OwnershipRecord {
        let own = self.own.clone().unwrap_or_default();
        OwnershipRecord {
            source: self.source.clone(),
            partitions: own.partitions,
            owned: own.owned.into_iter().collect(),
            governed: self.governed.iter().cloned().collect(),
            since_ms: super::observe::now_ms(),
        }
    }

    /// As the worker whose store recorded `rec` (a command beside it: `dlq replay`).
    pub fn owning(source: String, governed: BTreeSet<String>, rec: &OwnershipRecord) -> Split {
        Split {
            own: Some(Ownership {
                partitions: rec.partitions,
                owned: rec.owned.iter().copied().collect(),
                ..Default::default()
            }),
            ..Split::new(source, governed)
        }
    }

    pub fn known(&self) -> bool {
        self.own.is_some()
    }

    fn whose(&self, origin: Option<&str>) -> Whose {
        let Some(own) = &self.own else {
            return Whose::Waiting(None);
        };
        let Some(p) = origin.and_then(partition_of) else {
            return Whose::Others; // no row (nothing to render) or not from Kafka
        };
        let p = p % own.partitions.max(1);
        if own.owned.contains(&p) {
            Whose::Mine
        } else if own.suspended.contains(&p) {
            Whose::Waiting(Some(p))
        } else {
            Whose::Others
        }
    }

    /// Documents of projection `pi` owed from an earlier run: written once the first
    /// ownership says which are this worker's.
    pub fn hold(&mut self, pi: usize, keys: &[Key]) {
        self.waiting
            .entry(None)
            .or_default()
            .entry(pi)
            .or_default()
            .extend(keys.iter().cloned());
    }

    /// Keeps in `keys` (documents of projection `pi` rooted in `root`) only the ones this
    /// worker writes now; remembers those of suspended partitions.
    pub fn retain(
        &mut self,
        pi: usize,
        root: &str,
        keys: &mut BTreeSet<Key>,
        tx: &StoreTx<'_>,
    ) -> Result<(), EngineError> {
        if !self.governed.contains(root) {
            return Ok(());
        }
        let mut kept = BTreeSet::new();
        for k in std::mem::take(keys) {
            match self.whose(tx.origin_of(root, &k)?.as_deref()) {
                Whose::Mine => {
                    kept.insert(k);
                }
                Whose::Waiting(p) => {
                    self.waiting.entry(p).or_default().entry(pi).or_default().insert(k);
                }
                Whose::Others => {}
            }
        }
        *keys = kept;
        Ok(())
    }

    /// Takes ownership `new` (its changes applied); adds to `affected` what waited for
    /// partitions now owned. Returns the partitions taken over.
    pub fn take(&mut self, new: Ownership, affected: &mut [BTreeSet<Key>]) -> BTreeSet<u32> {
        info!(source = %self.source, owned = ?new.owned, suspended = ?new.suspended, takeover = ?new.takeover,
            partitions = new.partitions, "ownership");
        let takeover = new.takeover.clone();
        self.own = Some(new);
        for (p, by_projection) in std::mem::take(&mut self.waiting) {
            let own = self.own.as_ref().expect("set");
            if p.is_some_and(|p| own.suspended.contains(&p)) {
                self.waiting.insert(p, by_projection);
                continue;
            }
            // Before the first ownership: the roots are filtered again, below. A suspended
            // partition owned again: written; one gone: its new owner writes it.
            if p.is_none() || p.is_some_and(|p| own.owned.contains(&p)) {
                for (pi, keys) in by_projection {
                    affected[pi].extend(keys);
                }
            }
        }
        takeover
    }

    /// The keys of `rows` (root keys with their origins) this worker writes, or, with
    /// `only`, those of partitions `only`.
    pub fn owned_keys(&self, rows: Vec<(Key, Option<String>)>, only: Option<&BTreeSet<u32>>) -> Vec<Key> {
        let Some(own) = &self.own else { return vec![] };
        let n = own.partitions.max(1);
        rows.into_iter()
            .filter(|(_, o)| {
                o.as_deref().and_then(partition_of).is_some_and(|p| {
                    let p = p % n;
                    own.owned.contains(&p) && only.is_none_or(|only| only.contains(&p))
                })
            })
            .map(|(k, _)| k)
            .collect()
    }
}

impl Engine {
    /// Whether projection `pi`'s documents are split across workers.
    pub(super) fn split_governs(&self, pi: usize) -> bool {
        self.split
            .as_ref()
            .is_some_and(|s| s.governed.contains(self.projections[pi].root_table()))
    }

    /// The root keys a whole re-write of projection `pi` renders: all of them, or of a
    /// split projection those this worker owns (of partitions `only`).
    pub(super) fn rewrite_keys(&self, pi: usize, only: Option<&BTreeSet<u32>>) -> Result<Vec<Key>, EngineError> {
        let root = self.projections[pi].root_table();
        match &self.split {
            Some(s) if s.governed.contains(root) => {
                let rows = tokio::task::block_in_place(|| self.store.keys_with_origin(root))?;
                Ok(s.owned_keys(rows, only))
            }
            _ => Ok(tokio::task::block_in_place(|| self.store.keys(root))?),
        }
    }
}

impl Engine {
    /// Partitions `only` taken over: raises the clock above the versions the sink holds
    /// for their documents of projection `pi` (written by their previous owners, whose
    /// clocks may be ahead of this worker's), then writes every one of them again from
    /// this worker's rows. `false`: shutdown.
    pub(super) async fn take_over(
        &mut self,
        pi: usize,
        only: &BTreeSet<u32>,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<bool, EngineError> {
        let keys = self.rewrite_keys(pi, Some(only))?;
        let p = &self.projections[pi];
        let ids = tokio::task::block_in_place(|| -> Result<Vec<String>, EngineError> {
            let mut ids = Vec::with_capacity(keys.len());
            for k in &keys {
                match p.doc_id(k, &self.store) {
                    Ok(Some(id)) => ids.push(id),
                    Ok(None) => {}
                    Err(viewkeeper_projections::render::RenderError::Lookup(e)) => {
                        return Err(EngineError::Lookup(e.to_string()))
                    }
                    Err(_) => {} // the render dead-letters it
                }
            }
            Ok(ids)
        })?;
        let sink = self.sinks[&p.spec.sink].clone();
        let mut backoff = viewkeeper_core::retry::backoff(self.retry_min, self.retry_max);
        let floor = loop {
            match sink.max_version(&self.targets[pi], &ids).await {
                Ok(v) => break v.unwrap_or(0),
                Err(e) => {
                    let delay = backoff.delay();
                    tracing::warn!(projection = %p.name, error = %e, "cannot read the versions of the documents taken over; retrying");
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        info!(projection = %p.name, partitions = ?only, documents = ids.len(), clock_floor = floor, "taking documents over");
        tokio::task::block_in_place(|| -> Result<(), EngineError> {
            let tx = self.store.begin()?;
            tx.raise_clock(floor)?;
            tx.commit()?;
            Ok(())
        })?;
        self.render_all_of(pi, None, Some(only), shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn own(owned: &[u32], suspended: &[u32]) -> Ownership {
        Ownership {
            partitions: 4,
            owned: owned.iter().copied().collect(),
            suspended: suspended.iter().copied().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn owned_keys_follow_the_root_partition_modulo_the_partition_count() {
        let mut s = Split::new("ordering".into(), ["orders".to_string()].into());
        let k = |i: i64| Key::from_values(&[json!(i)]);
        let rows = || {
            vec![
                (k(1), Some("t[1]".to_string())),
                (k(2), Some("t[2]".to_string())),
                (k(5), Some("products[5]".to_string())),
                (k(9), None),
            ]
        };
        assert!(
            s.owned_keys(rows(), None).is_empty(),
            "nothing before the first ownership"
        );
        s.take(own(&[1], &[]), &mut []);
        assert_eq!(s.owned_keys(rows(), None), vec![k(1), k(5)]);
        assert_eq!(s.owned_keys(rows(), Some(&[2].into())), Vec::<Key>::new());
    }

    #[test]
    fn suspended_partitions_keep_their_documents_until_they_stay_or_go() {
        let mut s = Split::new("ordering".into(), ["orders".to_string()].into());
        s.own = Some(own(&[], &[1, 2]));
        let k = |i: i64| Key::from_values(&[json!(i)]);
        s.waiting.entry(Some(1)).or_default().entry(0).or_default().insert(k(1));
        s.waiting.entry(Some(2)).or_default().entry(0).or_default().insert(k(2));
        let mut affected = vec![BTreeSet::new()];
        s.take(own(&[1], &[]), &mut affected);
        assert_eq!(affected[0], [k(1)].into(), "partition 1 stayed, 2 went");
        assert!(s.waiting.is_empty());
    }
}
