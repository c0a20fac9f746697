//! `viewkeeper verify [--projection P] [--repair] [--json]`: compares every read model
//! with the source databases, through the same projection code the worker renders with.
//!
//! Ground truth per table: the rows of the source database (Postgres sources, read like
//! the initial snapshot, so values convert identically), plus what only the state store
//! knows: tombstones of rows deleted in the source (a deleted product's last image) and
//! when a row was decommissioned. Tables of Debezium sources have no database to read:
//! their state-store rows stand in. Each document or cache entry the truth renders is
//! compared with the sink: **missing**, **stale** (the differing fields are named),
//! **extra** (in the sink, no row behind it), and active-set members. Documents with
//! **unresolved** references are listed too (information: the referenced row exists in
//! no source table either, else its document would differ).
//!
//! Beside a running worker, a difference may only be a change in flight: differences are
//! re-checked (fresh truth, the sink read again) for up to three rounds a second apart,
//! and only those that persist are reported. `--repair` re-writes stale and missing
//! entries (with a new version from the state store's clock, so the worker's later writes
//! still win) and removes extras, then checks again. Exit code 0 only when clean.

use crate::config::{Config, SinkConfig, SourceConfig};
use crate::store::{Catalog, Store};
use crate::worker::compile;
use anyhow::Context;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;
use viewkeeper_connectors::elasticsearch::SearchSink;
use viewkeeper_connectors::postgres::decode::TableBinding;
use viewkeeper_connectors::postgres::snapshot;
use viewkeeper_connectors::redis::{field_text, RedisSink};
use viewkeeper_connectors::sink::SinkDoc;
use viewkeeper_projections::model::{Key, Op, Row, StoredRow, Tombstone, TombstoneKind};
use viewkeeper_projections::render::{LookupError, Projection, RowLookup};

/// Rows by table, with the join indexes the projections look up by.
#[derive(Default)]
struct Truth {
    rows: HashMap<String, BTreeMap<Key, StoredRow>>,
    /// (table, columns) → JSON text of the values → keys.
    indexes: HashMap<(String, Vec<String>), HashMap<String, Vec<Key>>>,
}

impl Truth {
    fn index(&mut self, table: &str, cols: &[String]) {
        let mut ix: HashMap<String, Vec<Key>> = HashMap::new();
        for (k, r) in self.rows.get(table).into_iter().flatten() {
            let vals: Vec<&Value> = cols.iter().map(|c| r.image.get(c).unwrap_or(&Value::Null)).collect();
            ix.entry(serde_json::to_string(&vals).expect("JSON"))
                .or_default()
                .push(k.clone());
        }
        self.indexes.insert((table.to_string(), cols.to_vec()), ix);
    }
}

impl RowLookup for Truth {
    fn get(&self, table: &str, key: &Key) -> Result<Option<StoredRow>, LookupError> {
        Ok(self.rows.get(table).and_then(|t| t.get(key)).cloned())
    }

    fn find(&self, table: &str, columns: &[String], values: &[Value]) -> Result<Vec<StoredRow>, LookupError> {
        let Some(rows) = self.rows.get(table) else {
            return Ok(vec![]);
        };
        match self.indexes.get(&(table.to_string(), columns.to_vec())) {
            Some(ix) => Ok(ix
                .get(&serde_json::to_string(&values.iter().collect::<Vec<_>>()).expect("JSON"))
                .into_iter()
                .flatten()
                .filter_map(|k| rows.get(k).cloned())
                .collect()),
            None => Ok(rows
                .values()
                .filter(|r| columns.iter().zip(values).all(|(c, v)| r.image.get(c) == Some(v)))
                .cloned()
                .collect()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Missing,
    Stale,
    Extra,
    ActiveSet,
    Unresolved,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
struct Finding {
    projection: String,
    kind: Kind,
    id: String,
    detail: String,
}

impl Finding {
    fn fails(&self) -> bool {
        self.kind != Kind::Unresolved
    }
}

enum SinkRef {
    Redis(RedisSink),
    Search(SearchSink, String),
}

/// One expected entry: rendered body (`None`: no entry should exist), tombstoned, member.
struct Expected {
    body: Option<Row>,
    tombstoned: bool,
    member: String,
    root: String,
}

fn member_of(key: &Key) -> String {
    key.values()
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(":")
}

fn has_unresolved(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.get("unresolved") == Some(&json!(true)) || m.values().any(has_unresolved),
        Value::Array(a) => a.iter().any(has_unresolved),
        _ => false,
    }
}

/// Reads the truth: every table the projections read.
async fn load_truth(
    cfg: &Config,
    catalog: &Catalog,
    store: &Store,
    tables: &BTreeSet<String>,
) -> anyhow::Result<Truth> {
    let mut truth = Truth::default();
    for alias in tables {
        let spec = &catalog.tables[alias];
        let needed = catalog.needed_columns.get(alias).cloned().unwrap_or_default();
        let stored: BTreeMap<Key, StoredRow> = store
            .keys(alias)?
            .into_iter()
            .filter_map(|k| RowLookup::get(store, alias, &k).ok().flatten().map(|r| (k, r)))
            .collect();
        let mut rows = BTreeMap::new();
        match &cfg.sources[&spec.source] {
            SourceConfig::Debezium(_) => rows = stored,
            SourceConfig::Postgres(pg) => {
                let (c, task) = pg.connect().await.with_context(|| format!("source {}", spec.source))?;
                c.batch_execute(snapshot::SESSION_SETTINGS).await?;
                let binding = TableBinding {
                    alias: alias.clone(),
                    primary_key: spec.primary_key.clone(),
                };
                let tc = snapshot::columns(&c, &spec.name, &binding)
                    .await
                    .map_err(anyhow::Error::msg)?;
                let mut last: Option<Vec<String>> = None;
                loop {
                    let (batch, next) = snapshot::read_chunk(
                        &c,
                        &spec.source,
                        (&spec.name, &binding, &tc),
                        last.as_deref(),
                        Default::default(),
                        10_000,
                    )
                    .await
                    .map_err(anyhow::Error::msg)?;
                    for ch in batch.changes {
                        let Op::Upsert { cells } = ch.op else { continue };
                        let image: Row = cells
                            .into_iter()
                            .filter(|(col, _)| needed.contains(col))
                            .filter_map(|(col, cell)| match cell {
                                viewkeeper_projections::model::Cell::Value(v) => Some((col, v)),
                                viewkeeper_projections::model::Cell::Unchanged => None,
                            })
                            .collect();
                        let old = stored.get(&ch.key).and_then(|r| r.tombstone.clone());
                        let tombstone = match &spec.decommissioned {
                            Some(rule) if rule.matches(&image) => Some(Tombstone {
                                kind: TombstoneKind::Decommissioned,
                                at_ms: old
                                    .filter(|t| t.kind == TombstoneKind::Decommissioned)
                                    .and_then(|t| t.at_ms),
                            }),
                            _ => None,
                        };
                        rows.insert(
                            ch.key.clone(),
                            StoredRow {
                                key: ch.key,
                                image,
                                tombstone,
                            },
                        );
                    }
                    match next {
                        Some(n) => last = Some(n),
                        None => break,
                    }
                }
                drop(c);
                let _ = task.await;
                // Deleted in the source: only the state store remembers them.
                for (k, r) in stored {
                    if !rows.contains_key(&k) && r.tombstone.as_ref().is_some_and(|t| t.kind == TombstoneKind::Deleted)
                    {
                        rows.insert(k, r);
                    }
                }
            }
        }
        truth.rows.insert(alias.clone(), rows);
    }
    Ok(truth)
}

/// What the truth renders for projection `p`, by sink id.
fn expected(p: &Projection, truth: &Truth) -> anyhow::Result<BTreeMap<String, Expected>> {
    let mut out = BTreeMap::new();
    for key in truth.rows.get(p.root_table()).into_iter().flatten().map(|(k, _)| k) {
        if let Some(r) = p.render(key, truth).map_err(|e| anyhow::anyhow!("{}: {e}", p.name))? {
            out.insert(
                r.id,
                Expected {
                    body: r.body,
                    tombstoned: r.tombstoned,
                    member: member_of(key),
                    root: key.as_str().to_string(),
                },
            );
        }
    }
    Ok(out)
}

/// The active set of a cache projection and the members the truth puts in it.
fn active_members<'a>(p: &'a Projection, want: &BTreeMap<String, Expected>) -> Option<(&'a str, BTreeSet<String>)> {
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
    let have: BTreeMap<&String, &String> = have.iter().filter(|(k, _)| *k != "_version").collect();
    let mut fields: Vec<String> = want
        .iter()
        .filter(|(k, v)| have.get(k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    fields.extend(have.keys().filter(|k| !want.contains_key(**k)).map(|k| k.to_string()));
    (!fields.is_empty()).then(|| format!("fields differ: {}", fields.join(", ")))
}

fn doc_diff(want: &Row, have: &Value) -> Option<String> {
    let have = have.as_object().cloned().unwrap_or_default();
    let mut fields: Vec<String> = want
        .iter()
        .filter(|(k, v)| have.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    fields.extend(have.keys().filter(|k| !want.contains_key(*k)).cloned());
    (!fields.is_empty()).then(|| format!("fields differ: {}", fields.join(", ")))
}

/// Compares one projection; `only`: restrict to these ids (a re-check round; an active
/// set is always checked whole: one SMEMBERS).
async fn compare(
    p: &Projection,
    others: &[&Projection],
    sink: &SinkRef,
    want: &BTreeMap<String, Expected>,
    only: Option<&BTreeSet<String>>,
) -> anyhow::Result<Vec<Finding>> {
    let f = |kind, id: &str, detail: String| Finding {
        projection: p.name.clone(),
        kind,
        id: id.to_string(),
        detail,
    };
    let mut out = Vec::new();
    let ids: Vec<String> = match only {
        Some(o) => o.iter().cloned().collect(),
        None => want.keys().cloned().collect(),
    };
    match sink {
        SinkRef::Redis(r) => {
            let have = r.read(&ids).await?;
            for (id, h) in ids.iter().zip(&have) {
                match (want.get(id).and_then(|e| e.body.as_ref().map(|b| (b, e))), h.is_empty()) {
                    (None, false) => out.push(f(Kind::Extra, id, "no row behind this entry".into())),
                    (None, true) => {}
                    (Some((_, e)), true) if e.tombstoned && p.spec.tombstone_ttl_s.is_some() => {} // expired
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
                        out.push(f(Kind::Extra, &k, "no row behind this entry".into()));
                    }
                }
            }
            // The set is checked whole (one SMEMBERS), also in re-check rounds.
            if let Some((set, should)) = active_members(p, want) {
                let members = r.members(set).await?;
                for m in should.difference(&members) {
                    out.push(f(Kind::ActiveSet, m, format!("missing from {set}")));
                }
                for m in members.difference(&should) {
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
                    out.push(f(Kind::Extra, id, "no row behind this document".into()));
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
    Ok(out)
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

/// Re-writes what differs: stale and missing entries from the truth, extras removed.
/// `first`: the first of the versions reserved for it, taken before `want` was read.
async fn repair(
    p: &Projection,
    sink: &SinkRef,
    want: &BTreeMap<String, Expected>,
    findings: &[Finding],
    first: u64,
) -> anyhow::Result<usize> {
    let ids: BTreeSet<&String> = findings
        .iter()
        .filter(|f| f.projection == p.name && matches!(f.kind, Kind::Missing | Kind::Stale | Kind::Extra))
        .map(|f| &f.id)
        .collect();
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
            }),
            None => extra.push(SinkDoc {
                root: String::new(),
                id: (*id).clone(),
                member: (*id).clone(),
                body: None,
                version: first + i as u64,
                tombstoned: true,
            }),
        }
    }
    match sink {
        SinkRef::Redis(r) => {
            r.write(&p.spec, &write).await?;
            let keys: Vec<String> = extra.iter().map(|d| d.id.clone()).collect();
            r.remove(&keys, None).await?;
            if let Some((set, should)) = active_members(p, want) {
                let (add, rem): (Vec<String>, Vec<String>) = findings
                    .iter()
                    .filter(|f| f.projection == p.name && f.kind == Kind::ActiveSet)
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

/// Runs the comparison; `Ok(true)` when clean (after repair, with `repair`).
pub async fn verify(
    cfg: &Config,
    data_dir: &Path,
    only: Option<&str>,
    do_repair: bool,
    as_json: bool,
) -> anyhow::Result<bool> {
    let (projections, catalog) = compile(cfg)?;
    // A blackhole sink keeps nothing to compare.
    let kept = |p: &Projection| !matches!(cfg.sinks.get(&p.spec.sink), Some(SinkConfig::Blackhole(_)));
    let projections: Vec<Projection> = projections
        .into_iter()
        .filter(|p| only.is_none_or(|o| p.name == o) && kept(p))
        .collect();
    if let Some(o) = only.filter(|_| projections.is_empty()) {
        anyhow::bail!("no projection '{o}' with a sink to compare in the config");
    }
    let store = Store::open_read_only(data_dir, catalog.clone()).with_context(|| {
        format!(
            "no state store in {} (has `viewkeeper run` ever run there?)",
            data_dir.display()
        )
    })?;
    let mut sinks = BTreeMap::new();
    for (name, sc) in &cfg.sinks {
        let s = match sc {
            SinkConfig::Redis(r) => SinkRef::Redis(r.connect(name, r.pipeline).await?),
            SinkConfig::Elasticsearch(e) => SinkRef::Search(e.client(name, &cfg.engine)?, String::new()),
            SinkConfig::Blackhole(_) => continue,
        };
        sinks.insert(name.clone(), s);
    }
    let sink_of = |p: &Projection| -> anyhow::Result<SinkRef> {
        Ok(match &sinks[&p.spec.sink] {
            SinkRef::Redis(r) => SinkRef::Redis(r.clone()),
            SinkRef::Search(s, _) => {
                let alias = p
                    .spec
                    .index
                    .as_ref()
                    .map(|i| i.alias.clone())
                    .context("a search projection without an index")?;
                SinkRef::Search(s.clone(), alias)
            }
        })
    };
    // Every projection of the config on the same sink (also those not verified now): keys
    // of theirs are never another's extras.
    let (all, _) = compile(cfg)?;
    let on_sink = |p: &Projection| -> Vec<&Projection> { all.iter().filter(|o| o.spec.sink == p.spec.sink).collect() };
    let tables: BTreeSet<String> = catalog
        .tables
        .keys()
        .filter(|t| projections.iter().any(|p| p.uses_table(t)))
        .cloned()
        .collect();
    let truth_now = || async {
        let mut t = load_truth(cfg, &catalog, &store, &tables).await?;
        for p in &projections {
            for (table, cols) in p.join_indexes() {
                t.index(&table, &cols);
            }
        }
        anyhow::Ok(t)
    };

    let mut truth = truth_now().await?;
    let mut findings: Vec<Finding> = Vec::new();
    let mut wants = Vec::new();
    for p in &projections {
        let want = expected(p, &truth)?;
        if let SinkRef::Search(s, alias) = &sink_of(p)? {
            s.refresh(alias).await?;
        }
        findings.extend(compare(p, &on_sink(p), &sink_of(p)?, &want, None).await?);
        wants.push(want);
    }
    // Re-check what differs: a worker may have had it in flight.
    for _ in 0..3 {
        if !findings.iter().any(Finding::fails) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        truth = truth_now().await?;
        let mut again = Vec::new();
        for (pi, p) in projections.iter().enumerate() {
            wants[pi] = expected(p, &truth)?;
            let ids: BTreeSet<String> = findings
                .iter()
                .filter(|f| f.projection == p.name && f.fails() && f.kind != Kind::ActiveSet)
                .map(|f| f.id.clone())
                .collect();
            let members: BTreeSet<&String> = findings
                .iter()
                .filter(|f| f.projection == p.name && f.kind == Kind::ActiveSet)
                .map(|f| &f.id)
                .collect();
            if ids.is_empty() && members.is_empty() {
                continue;
            }
            // A difference counts only if it is there in every round.
            let rechecked = compare(p, &on_sink(p), &sink_of(p)?, &wants[pi], Some(&ids)).await?;
            again.extend(
                rechecked
                    .into_iter()
                    .filter(|f| f.kind != Kind::ActiveSet || members.contains(&f.id)),
            );
        }
        again.extend(findings.iter().filter(|f| !f.fails()).cloned());
        findings = again;
    }
    findings.sort();
    findings.dedup();

    let mut repaired = 0;
    if do_repair && findings.iter().any(Finding::fails) {
        crate::failpoint::pause("verify-before-repair").await;
        // Versions first, then the truth the repair writes: whatever the worker applies
        // after this read is versioned above the repair and wins over it, and what it
        // applied before is in this read. (Reading first and versioning after would let a
        // repair write older content over a newer write of the worker's.)
        let mut w = Store::open_beside(data_dir, catalog.clone())
            .context("opening the state store for the repair's versions")?;
        let per = findings.len() as u64 + 1;
        let first = {
            let tx = w.begin()?;
            let v = tx.next_versions(per * projections.len() as u64)?;
            tx.commit()?;
            v
        };
        drop(w);
        let truth = truth_now().await?;
        for (pi, p) in projections.iter().enumerate() {
            wants[pi] = expected(p, &truth)?;
            let base = first + per * pi as u64;
            repaired += repair(p, &sink_of(p)?, &wants[pi], &findings, base).await?;
        }
        let mut after = Vec::new();
        for (pi, p) in projections.iter().enumerate() {
            after.extend(compare(p, &on_sink(p), &sink_of(p)?, &wants[pi], None).await?);
        }
        after.sort();
        findings = after;
    }
    let failing = findings.iter().filter(|f| f.fails()).count();
    let counts: BTreeMap<String, usize> = wants
        .iter()
        .zip(&projections)
        .map(|(w, p)| (p.name.clone(), w.len()))
        .collect();
    if as_json {
        println!(
            "{}",
            json!({"clean": failing == 0, "checked": counts, "repaired": repaired, "findings": findings})
        );
    } else {
        for (p, n) in &counts {
            let of_p: Vec<&Finding> = findings.iter().filter(|f| &f.projection == p).collect();
            println!(
                "{p}: {n} expected, {} differences",
                of_p.iter().filter(|f| f.fails()).count()
            );
            for f in of_p.iter().take(20) {
                println!("  {:?} {}: {}", f.kind, f.id, f.detail);
            }
            if of_p.len() > 20 {
                println!("  … {} more (--json lists all)", of_p.len() - 20);
            }
        }
        if repaired > 0 {
            println!("repaired {repaired} entries");
        }
        println!("{}", if failing == 0 { "clean" } else { "NOT clean" });
    }
    Ok(failing == 0)
}

/// Ids of up to `n` live documents of `p`, rendered from the state store (rows that
/// cannot render are skipped): a sample to check that a sink still holds what it was sent.
pub fn sample_ids(store: &Store, p: &Projection, n: usize) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for k in store.live_keys(p.root_table(), n)? {
        if let Ok(Some(r)) = p.render(&k, store) {
            if r.body.is_some() && !r.tombstoned {
                out.push(r.id);
            }
        }
    }
    Ok(out)
}
