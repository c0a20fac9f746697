//! Comparing one projection's sink with what the truth renders: missing, stale (the
//! differing fields named), extra, active-set members, unresolved references.
//!
//! A split projection ([`super::split`]): `want` holds only this worker's documents, and
//! an entry of the sink that is not in it belongs to another worker: skipped, not extra.

use super::truth::Expected;
use crate::engine::meta::META_FIELD;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use viewkeeper_connectors::sinks::elasticsearch::SearchSink;
use viewkeeper_connectors::sinks::redis::{field_text, RedisSink};
use viewkeeper_core::model::Row;
use viewkeeper_projections::render::Projection;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Kind {
    Missing,
    Stale,
    Extra,
    ActiveSet,
    Unresolved,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub(super) struct Finding {
    pub(super) projection: String,
    pub(super) kind: Kind,
    pub(super) id: String,
    pub(super) detail: String,
}

impl Finding {
    pub(super) fn fails(&self) -> bool {
        self.kind != Kind::Unresolved
    }
}

pub(super) enum SinkRef {
    Redis(RedisSink),
    Search(SearchSink, String),
}

fn has_unresolved(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.get("unresolved") == Some(&json!(true)) || m.values().any(has_unresolved),
        Value::Array(a) => a.iter().any(has_unresolved),
        _ => false,
    }
}

/// The active set of a cache projection and the members the truth puts in it.
pub(super) fn active_members<'a>(
    p: &'a Projection,
    want: &BTreeMap<String, Expected>,
) -> Option<(&'a str, BTreeSet<String>)> {
    let (set, cond) = (p.spec.active_set.as_deref()?, p.spec.active_when.as_ref()?);
    let should = want
        .values()
        .filter(|e| {
            !e.tombstoned
                && e.body
                    .as_ref()
                    .and_then(|b| b.get(&cond.column))
                    .is_some_and(|v| cond.values.contains(v))
        })
        .map(|e| e.member.clone())
        .collect();
    Some((set, should))
}

/// Field-level difference of a cache entry (None: equal).
fn redis_diff(want: &Row, have: &BTreeMap<String, String>) -> Option<String> {
    let want: BTreeMap<String, String> = want
        .iter()
        .filter_map(|(k, v)| field_text(v).map(|t| (k.clone(), t)))
        .collect();
    // `_version` and `_meta` (freshness, a projection's `meta = true`) are not content.
    let have: BTreeMap<&String, &String> = have
        .iter()
        .filter(|(k, _)| *k != "_version" && *k != META_FIELD)
        .collect();
    let mut fields: Vec<String> = want
        .iter()
        .filter(|(k, v)| have.get(k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    fields.extend(have.keys().filter(|k| !want.contains_key(**k)).map(|k| k.to_string()));
    (!fields.is_empty()).then(|| format!("fields differ: {}", fields.join(", ")))
}

fn doc_diff(want: &Row, have: &Value) -> Option<String> {
    let mut have = have.as_object().cloned().unwrap_or_default();
    have.remove(META_FIELD);
    let mut fields: Vec<String> = want
        .iter()
        .filter(|(k, v)| have.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    fields.extend(have.keys().filter(|k| !want.contains_key(*k)).cloned());
    (!fields.is_empty()).then(|| format!("fields differ: {}", fields.join(", ")))
}

/// Compares one projection; `only`: restrict to these ids (a re-check round; an active
/// set is always checked whole: one SMEMBERS). `split`: `want` holds only this worker's
/// share; sink entries not in it are skipped (returned: their ids), not extra, and only
/// the members of `want` are checked in an active set.
pub(super) async fn compare(
    p: &Projection,
    others: &[&Projection],
    sink: &SinkRef,
    want: &BTreeMap<String, Expected>,
    only: Option<&BTreeSet<String>>,
    split: bool,
) -> anyhow::Result<(Vec<Finding>, BTreeSet<String>)> {
    let f = |kind, id: &str, detail: String| Finding {
        projection: p.name.clone(),
        kind,
        id: id.to_string(),
        detail,
    };
    let mut out = Vec::new();
    let mut skipped = BTreeSet::new();
    let theirs = |id: &str| split && !want.contains_key(id);
    let ids: Vec<String> = match only {
        Some(o) => o.iter().cloned().collect(),
        None => want.keys().cloned().collect(),
    };
    match sink {
        SinkRef::Redis(r) => {
            let have = r.read(&ids).await?;
            for (id, h) in ids.iter().zip(&have) {
                if theirs(id) {
                    if !h.is_empty() {
                        skipped.insert(id.clone());
                    }
                    continue;
                }
                match (want.get(id).and_then(|e| e.body.as_ref().map(|b| (b, e))), h.is_empty()) {
                    (None, false) => out.push(f(Kind::Extra, id, "no row behind this entry".into())),
                    (None, true) => {}
                    (Some((_, e)), true) if e.tombstoned && p.spec.tombstone_ttl_ms.is_some() => {} // expired
                    (Some(_), true) => out.push(f(Kind::Missing, id, "no entry".into())),
                    (Some((b, _)), false) => {
                        if let Some(d) = redis_diff(b, h) {
                            out.push(f(Kind::Stale, id, d));
                        }
                    }
                }
            }
            if only.is_none() {
                for k in r.scan(&p.id_pattern()).await? {
                    if !want.contains_key(&k) && owns(p, others, &k) {
                        if split {
                            skipped.insert(k);
                        } else {
                            out.push(f(Kind::Extra, &k, "no row behind this entry".into()));
                        }
                    }
                }
            }
            // The set is checked whole (one SMEMBERS), also in re-check rounds.
            if let Some((set, should)) = active_members(p, want) {
                let members = r.members(set).await?;
                // Split: members of other workers' entries are theirs to keep.
                let mine: BTreeSet<&String> = want.values().map(|e| &e.member).collect();
                for m in should.difference(&members) {
                    out.push(f(Kind::ActiveSet, m, format!("missing from {set}")));
                }
                for m in members.difference(&should).filter(|m| !split || mine.contains(m)) {
                    out.push(f(Kind::ActiveSet, m, format!("in {set} but not active")));
                }
            }
        }
        SinkRef::Search(s, alias) => {
            let have: BTreeMap<String, Value> = match only {
                None => s.scan(alias).await?.into_iter().collect(),
                Some(o) => {
                    let mut m = BTreeMap::new();
                    for id in o {
                        if let Some(v) = s.get(alias, id).await? {
                            m.insert(id.clone(), v);
                        }
                    }
                    m
                }
            };
            for id in &ids {
                if theirs(id) {
                    if have.contains_key(id) {
                        skipped.insert(id.clone());
                    }
                    continue;
                }
                match (want.get(id).and_then(|e| e.body.as_ref()), have.get(id)) {
                    (Some(_), None) => out.push(f(Kind::Missing, id, "no document".into())),
                    (None, Some(_)) => out.push(f(Kind::Extra, id, "no row behind this document".into())),
                    (Some(b), Some(h)) => {
                        if let Some(d) = doc_diff(b, h) {
                            out.push(f(Kind::Stale, id, d));
                        }
                    }
                    (None, None) => {}
                }
            }
            if only.is_none() {
                for id in have.keys().filter(|id| !want.contains_key(*id)) {
                    if split {
                        skipped.insert(id.clone());
                    } else {
                        out.push(f(Kind::Extra, id, "no row behind this document".into()));
                    }
                }
            }
        }
    }
    if only.is_none() {
        for (id, e) in want {
            if e.body
                .as_ref()
                .is_some_and(|b| has_unresolved(&Value::Object(b.clone())))
            {
                out.push(f(Kind::Unresolved, id, "references a row no source has".into()));
            }
        }
    }
    Ok((out, skipped))
}

/// Whether a key found by scanning `p`'s pattern is one of `p`'s entries: it has the shape
/// of `p`'s ids, of no more specific template of another projection on the same sink
/// (templates may overlap: `p:{id}:desc` is more specific than `p:{id}`; of two equally
/// specific ones, neither owns it), and is no projection's active set.
pub fn owns(p: &Projection, others: &[&Projection], key: &str) -> bool {
    p.id_matches(key)
        && p.spec.active_set.as_deref() != Some(key)
        && !others.iter().any(|o| {
            o.name != p.name
                && (o.spec.active_set.as_deref() == Some(key)
                    || (o.id_matches(key) && o.id_literal_len() >= p.id_literal_len()))
        })
}
