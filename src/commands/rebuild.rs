//! `viewkeeper backfill --projection P [--rebuild]`: with `--rebuild`, renders P from the
//! state store into a new versioned index (`{alias}_v{N+1}`, or the configured version
//! when higher) while a running worker keeps writing the live one and, through the
//! registration in the state store, the new one too; then refreshes it and swaps the alias
//! in one `_aliases` call. Without `--rebuild`, re-writes every document of P through its
//! alias. Works beside a running `viewkeeper run` on the same data dir (SQLite serializes
//! the two processes' writes; a config that needs more than the store keeps is refused).

use super::{standalone_engine, Client};
use crate::config::Config;
use anyhow::bail;
use std::path::Path;
use tokio_util::sync::CancellationToken;
use tracing::info;
use viewkeeper_core::sink::IndexLayout;

pub async fn rebuild(
    cfg: &Config,
    data_dir: &Path,
    projection: &str,
    new_index: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if !cfg.projections.contains_key(projection) {
        bail!(
            "unknown projection '{projection}' (declared: {})",
            cfg.projections.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    if let Some((source, governed)) = cfg.split() {
        if governed.contains(&cfg.projections[projection].root) {
            bail!("projection '{projection}' is split across the workers of source '{source}' (assignment = \"partitioned\"): a rebuild beside one worker would see only that worker's partitions; `backfill --rebuild` does not support split projections yet");
        }
    }
    let Some((mut engine, clients)) = standalone_engine(cfg, data_dir, &shutdown).await? else {
        return Ok(());
    };
    engine.progress = super::progress::for_terminal();
    let pi = engine
        .projections
        .iter()
        .position(|p| p.name == projection)
        .expect("checked above");
    let started = std::time::Instant::now();
    if !new_index {
        engine.render_all(pi, None, &shutdown).await?;
        info!(
            projection,
            documents = engine.stats.documents,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "re-written"
        );
        return Ok(());
    }
    let p = engine.projections[pi].clone();
    let (Some(ix), Some(Client::Search(search))) = (&p.spec.index, clients.get(&p.spec.sink)) else {
        bail!("projection '{projection}' does not write to a search index: only search projections can be rebuilt into a new index");
    };
    let old = search.alias_target(&ix.alias).await?;
    let current = old
        .as_deref()
        .and_then(|o| o.rsplit_once("_v"))
        .and_then(|(_, v)| v.parse::<u32>().ok())
        .unwrap_or(0);
    let new = format!("{}_v{}", ix.alias, (current + 1).max(ix.version));
    let registered = engine.store.rebuild_target(projection)?;
    if registered.as_deref() == Some(new.as_str()) {
        info!(projection, index = %new, "resuming an interrupted rebuild into its index");
    } else {
        let layout = IndexLayout {
            alias: ix.alias.clone(),
            index: new.clone(),
            settings: ix.settings.clone(),
            mappings: ix.mappings.clone(),
        };
        search.create_index(&new, &layout).await?;
        engine.store.set_rebuild_target(projection, Some(&new))?;
    }
    info!(projection, alias = %ix.alias, from = old.as_deref().unwrap_or("-"), to = %new, "rebuilding");
    if !engine.render_all(pi, Some(&new), &shutdown).await? {
        return Ok(()); // interrupted: the registration stays, a rerun resumes
    }
    search.refresh(&new).await?;
    let (before, after) = (search.count(&ix.alias).await.unwrap_or(0), search.count(&new).await?);
    search.swap_alias(&ix.alias, old.as_deref(), &new).await?;
    engine.store.set_rebuild_target(projection, None)?;
    if let (Some(old), false) = (old.as_deref(), ix.keep_old_index) {
        search.delete_index(old).await?;
    }
    info!(
        projection,
        alias = %ix.alias,
        index = %new,
        documents_before = before,
        documents_after = after,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "alias swapped"
    );
    Ok(())
}
