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
//! entries and removes extras, then checks again ([`repair`]). Exit code 0 only when clean.
//!
//! A source split between workers by partition (the store's `ownership` record,
//! [`split`]): a projection rooted in a governed table is compared only on the documents
//! of this worker's root rows; sink documents of other root rows, or of none this store
//! has, are other workers' (counted, never extra, never repaired).
//!
//! Files: [`truth`] (the databases' rows, and what they render), [`compare`] (the sinks
//! against it), [`repair`], [`split`].

mod compare;
mod repair;
mod split;
mod truth;

pub use compare::owns;
pub use truth::sample_ids;

use super::{compile, search_client};
use crate::config::{Config, SinkConfig};
use crate::store::Store;
use anyhow::Context;
use compare::{compare, Finding, Kind, SinkRef};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;
use truth::{expected, load_truth, Expected, Truth};
use viewkeeper_connectors::sinks::redis::RedisSink;
use viewkeeper_projections::render::Projection;

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
    // A split source: which documents are this worker's.
    let split_conn = split::open(data_dir)?;
    let ownership = split::read_ownership(&split_conn)?;
    let split_of = |p: &Projection| {
        ownership
            .as_ref()
            .filter(|o| o.governed.iter().any(|t| t == p.root_table()))
    };
    // What the truth renders for `p` that this worker answers for, and the ids of the
    // rest (other workers' documents).
    let want_of = |p: &Projection, truth: &Truth| -> anyhow::Result<(BTreeMap<String, Expected>, BTreeSet<String>)> {
        let want = expected(p, truth)?;
        let Some(o) = split_of(p) else {
            return Ok((want, BTreeSet::new()));
        };
        // Read after the truth: every root row it has is there.
        let origins = split::origins(&split_conn, p.root_table())?;
        Ok(split::mine(want, |root| {
            o.owns(origins.get(root).and_then(|x| x.as_deref()))
        }))
    };
    let mut sinks = BTreeMap::new();
    for (name, sc) in &cfg.sinks {
        let s = match sc {
            SinkConfig::Redis(r) => SinkRef::Redis(RedisSink::connect(name, r).await?),
            SinkConfig::Elasticsearch(e) => SinkRef::Search(search_client(cfg, name, e)?, String::new()),
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
    // Per projection: ids of other workers' documents (rendered here, or in the sink).
    let mut theirs: Vec<BTreeSet<String>> = Vec::new();
    for p in &projections {
        let (want, mut not_mine) = want_of(p, &truth)?;
        if let SinkRef::Search(s, alias) = &sink_of(p)? {
            s.refresh(alias).await?;
        }
        let (found, skipped) = compare(p, &on_sink(p), &sink_of(p)?, &want, None, split_of(p).is_some()).await?;
        findings.extend(found);
        not_mine.extend(skipped);
        wants.push(want);
        theirs.push(not_mine);
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
            wants[pi] = want_of(p, &truth)?.0;
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
            let (rechecked, _) = compare(
                p,
                &on_sink(p),
                &sink_of(p)?,
                &wants[pi],
                Some(&ids),
                split_of(p).is_some(),
            )
            .await?;
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
            let (want, not_mine) = want_of(p, &truth)?;
            wants[pi] = want;
            theirs[pi] = not_mine;
            let base = first + per * pi as u64;
            let split = split_of(p).is_some();
            repaired += repair::repair(p, &sink_of(p)?, &wants[pi], &findings, base, split).await?;
        }
        let mut after = Vec::new();
        for (pi, p) in projections.iter().enumerate() {
            let (found, skipped) =
                compare(p, &on_sink(p), &sink_of(p)?, &wants[pi], None, split_of(p).is_some()).await?;
            after.extend(found);
            theirs[pi].extend(skipped);
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
    // Split projections: how many documents are other workers'.
    let other_workers: BTreeMap<String, usize> = theirs
        .iter()
        .zip(&projections)
        .filter(|(_, p)| split_of(p).is_some())
        .map(|(t, p)| (p.name.clone(), t.len()))
        .collect();
    if as_json {
        println!(
            "{}",
            json!({"clean": failing == 0, "checked": counts, "repaired": repaired, "findings": findings,
                   "ownership": ownership, "other_workers": other_workers})
        );
    } else {
        if let Some(o) = &ownership {
            println!(
                "split source {}: this worker owns partitions {:?} of {} (tables {})",
                o.source,
                o.owned,
                o.partitions,
                o.governed.join(", ")
            );
        }
        for (p, n) in &counts {
            let of_p: Vec<&Finding> = findings.iter().filter(|f| &f.projection == p).collect();
            let differences = of_p.iter().filter(|f| f.fails()).count();
            match (other_workers.get(p), &ownership) {
                (Some(m), Some(o)) => println!(
                    "{p}: {n} documents of partitions {:?} compared; {m} belong to other workers; {differences} differences",
                    o.owned
                ),
                _ => println!("{p}: {n} expected, {differences} differences"),
            }
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
