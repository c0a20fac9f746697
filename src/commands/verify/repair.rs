//! `--repair`: re-writes stale and missing entries from a truth read after the repair's
//! versions were reserved (so a change the worker applies after that read is versioned
//! above the repair and wins over it), removes extras, repairs active sets.

use super::compare::{active_members, Finding, Kind, SinkRef};
use super::truth::Expected;
use std::collections::{BTreeMap, BTreeSet};
use viewkeeper_core::sink::{SinkDoc, Target};
use viewkeeper_projections::render::Projection;

/// Re-writes what differs: stale and missing entries from the truth, extras removed.
/// `first`: the first of the versions reserved for it, taken before `want` was read.
/// `split`: `want` is this worker's share of a split projection; an id not in it (any
/// more) is another worker's, and left alone.
pub(super) async fn repair(
    p: &Projection,
    sink: &SinkRef,
    want: &BTreeMap<String, Expected>,
    findings: &[Finding],
    first: u64,
    split: bool,
) -> anyhow::Result<usize> {
    let ids: BTreeSet<&String> = findings
        .iter()
        .filter(|f| f.projection == p.name && matches!(f.kind, Kind::Missing | Kind::Stale | Kind::Extra))
        .map(|f| &f.id)
        .filter(|id| !split || want.contains_key(*id))
        .collect();
    let active = active_members(p, want).map(|(_, m)| m).unwrap_or_default();
    let target = Target {
        projection: p.name.clone(),
        active_set: p.spec.active_set.clone(),
        tombstone_ttl_ms: p.spec.tombstone_ttl_ms,
        ..Default::default()
    };
    let mut write = Vec::new();
    let mut extra = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        match want.get(*id).filter(|e| e.body.is_some()) {
            Some(e) => write.push(SinkDoc {
                root: e.root.clone(),
                id: (*id).clone(),
                member: e.member.clone(),
                body: e.body.clone(),
                version: first + i as u64,
                tombstoned: e.tombstoned,
                active: active.contains(&e.member),
            }),
            None => extra.push(SinkDoc {
                root: String::new(),
                id: (*id).clone(),
                member: (*id).clone(),
                body: None,
                version: first + i as u64,
                tombstoned: true,
                active: false,
            }),
        }
    }
    match sink {
        SinkRef::Redis(r) => {
            r.write_docs(&target, &write).await?;
            let keys: Vec<String> = extra.iter().map(|d| d.id.clone()).collect();
            r.remove(&keys, None).await?;
            if let Some((set, should)) = active_members(p, want) {
                let mine: BTreeSet<&String> = want.values().map(|e| &e.member).collect();
                let (add, rem): (Vec<String>, Vec<String>) = findings
                    .iter()
                    .filter(|f| f.projection == p.name && f.kind == Kind::ActiveSet)
                    .filter(|f| !split || mine.contains(&f.id))
                    .map(|f| f.id.clone())
                    .partition(|m| should.contains(m));
                r.set_members(set, &add, &rem).await?;
            }
        }
        SinkRef::Search(s, alias) => {
            write.extend(extra.iter().cloned());
            s.write(alias, &write).await?;
            s.refresh(alias).await?;
        }
    }
    Ok(write.len() + extra.len())
}
