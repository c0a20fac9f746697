//! `viewkeeper dlq list|show|replay|drop`: the dead-letter store. `list`, `show` and
//! `drop` work on the state store (read-only, except `drop`, which SQLite serializes with
//! the worker's writes); `replay` sends letters through the pipeline again.

use super::run::fed_tables;
use super::{open_read_only, standalone_engine};
use crate::config::{Config, SourceConfig};
use crate::store::Store;
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::path::Path;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use viewkeeper_connectors::sources::debezium::{self, topic_tables, Decoded};
use viewkeeper_core::model::Key;
use viewkeeper_core::source::SourceBatch;
use viewkeeper_core::{DeadLetter, Stage};

fn letter_json(d: &DeadLetter, with_payload: bool) -> Value {
    let mut v = serde_json::to_value(d).expect("serializable");
    if !with_payload {
        v.as_object_mut().expect("object").remove("payload");
    }
    v
}

/// `viewkeeper dlq list`: the oldest `limit` dead letters.
pub fn dlq_list(cfg: &Config, data_dir: &Path, limit: usize, as_json: bool) -> anyhow::Result<()> {
    let store = open_read_only(cfg, data_dir)?;
    let total = store.dead_letter_count()?;
    let letters = store.dead_letters(limit)?;
    if as_json {
        let list: Vec<Value> = letters.iter().map(|d| letter_json(d, false)).collect();
        println!("{}", json!({ "total": total, "dead_letters": list }));
        return Ok(());
    }
    println!(
        "{total} dead letter(s){}",
        if total as usize > letters.len() {
            format!(", showing {}", letters.len())
        } else {
            String::new()
        }
    );
    for d in &letters {
        let reason: String = d.reason.chars().take(160).collect();
        println!(
            "#{} {} {} table={} key={} stage={} position={}: {}",
            d.id,
            viewkeeper_core::model::format_ms(d.at_ms),
            d.source,
            d.table,
            d.key,
            d.stage,
            d.position,
            reason
        );
    }
    Ok(())
}

/// `viewkeeper dlq show ID`: one dead letter with its payload.
pub fn dlq_show(cfg: &Config, data_dir: &Path, id: i64) -> anyhow::Result<()> {
    let store = open_read_only(cfg, data_dir)?;
    let d = store
        .dead_letter(id)?
        .with_context(|| format!("no dead letter #{id}"))?;
    println!("{}", serde_json::to_string_pretty(&letter_json(&d, true))?);
    Ok(())
}

/// `viewkeeper dlq drop`: deletes dead letters (all, or by id); only with `yes`.
pub fn dlq_drop(cfg: &Config, data_dir: &Path, ids: Option<Vec<i64>>, yes: bool) -> anyhow::Result<()> {
    let (_, catalog) = super::compile(cfg)?;
    let ro = open_read_only(cfg, data_dir)?;
    let ids: Vec<i64> = match ids {
        Some(ids) => ids,
        None => ro.dead_letters(usize::MAX >> 1)?.iter().map(|d| d.id).collect(),
    };
    drop(ro);
    if !yes {
        println!(
            "would delete {} dead letter(s): {:?}; add --yes to delete them",
            ids.len(),
            ids
        );
        return Ok(());
    }
    let mut store = Store::open_beside(data_dir, catalog)?;
    let n = store.delete_dead_letters(&ids)?;
    println!("deleted {n} dead letter(s)");
    Ok(())
}

/// `viewkeeper dlq replay`: sends dead letters through the pipeline again; a letter
/// that goes through is removed, one that still fails stays (its reason printed).
/// * `render:P`, `sink:S:P`: the root's document of P is rendered and written again
///   (after a config or mapping fix).
/// * `apply`: every document reading the row is rendered again (its stored image may
///   have been completed since).
/// * `decode` of a Debezium record: the record (kept as the payload) is decoded again
///   and goes through apply, render and write like any batch.
/// * `decode` of a Postgres message: cannot be replayed (the message needs its
///   replication context); it stays, with that reason.
pub async fn dlq_replay(
    cfg: Config,
    data_dir: &Path,
    ids: Option<Vec<i64>>,
    shutdown: CancellationToken,
) -> anyhow::Result<(usize, usize)> {
    let Some((mut engine, _)) = standalone_engine(&cfg, data_dir, &shutdown).await? else {
        return Ok((0, 0));
    };
    let letters: Vec<DeadLetter> = engine
        .store
        .dead_letters(usize::MAX >> 1)?
        .into_iter()
        .filter(|d| ids.as_ref().is_none_or(|ids| ids.contains(&d.id)))
        .collect();
    if let Some(ids) = &ids {
        if let Some(id) = ids.iter().find(|id| !letters.iter().any(|d| d.id == **id)) {
            bail!("no dead letter #{id}");
        }
    }
    let (mut done, mut failed) = (Vec::new(), 0usize);
    for d in letters {
        let names: Vec<String> = engine.projections.iter().map(|p| p.name.clone()).collect();
        let pi_named = |name: &str| names.iter().position(|p| p == name);
        let outcome: anyhow::Result<Option<Vec<DeadLetter>>> = async {
            let key = Key::from_canonical(d.key.clone());
            match &d.stage {
                Stage::Render { projection } | Stage::Sink { projection, .. } => {
                    let pi = pi_named(projection)
                        .with_context(|| format!("projection '{projection}' is no longer in the config"))?;
                    Ok(engine.rewrite(pi, &[key], &shutdown).await?)
                }
                Stage::Apply => {
                    let mut letters = Vec::new();
                    for pi in 0..engine.projections.len() {
                        let roots = engine.roots_of(pi, &d.table, &key)?;
                        match engine.rewrite(pi, &roots, &shutdown).await? {
                            Some(l) => letters.extend(l),
                            None => return Ok(None),
                        }
                    }
                    Ok(Some(letters))
                }
                Stage::Decode => {
                    let Some(SourceConfig::Debezium(dz)) = cfg.sources.get(&d.source) else {
                        bail!("a Postgres message cannot be replayed without its replication context; fix the row in the source (an UPDATE re-sends it) and drop this letter");
                    };
                    let topic = d.position.rsplit_once('[').map(|(t, _)| t.to_string()).unwrap_or_default();
                    let topics = topic_tables(&d.source, dz, &fed_tables(&cfg, &d.source))?;
                    let table = topics.get(&topic).with_context(|| format!("no table reads topic '{topic}'"))?;
                    let key_bytes = (!d.key.is_empty()).then_some(d.key.as_bytes());
                    let decoded = debezium::decode(&topic, key_bytes, Some(d.payload.as_bytes()), table)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    let changes = match decoded {
                        Decoded::Change(c) => vec![c],
                        Decoded::Skip(_) => vec![],
                    };
                    let batch = SourceBatch {
                        source: d.source.clone(),
                        changes,
                        ..Default::default()
                    };
                    Ok(engine.process(vec![batch], &shutdown).await?.then(Vec::new))
                }
            }
        }
        .await;
        match outcome {
            Ok(None) => break, // shutdown
            Ok(Some(still)) if still.is_empty() => {
                info!(id = d.id, stage = %d.stage, key = %d.key, "replayed");
                done.push(d.id);
            }
            Ok(Some(still)) => {
                failed += 1;
                warn!(id = d.id, stage = %d.stage, key = %d.key, reason = %still[0].reason, "still fails; kept");
            }
            Err(e) => {
                failed += 1;
                warn!(id = d.id, stage = %d.stage, key = %d.key, error = %e, "cannot replay; kept");
            }
        }
    }
    engine.store.delete_dead_letters(&done)?;
    Ok((done.len(), failed))
}
