//! `viewkeeper backfill`: the initial load of every source that has none yet (resumable
//! chunk by chunk), every document written once at the end, then exit. `run` then streams
//! on from exactly where the load ended. A bar shows the rendering on a terminal.

use super::compile;
use super::run::{run, Mode};
use crate::config::Config;
use crate::store::Store;
use std::path::Path;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub async fn backfill(cfg: &Config, data_dir: &Path, shutdown: CancellationToken) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let stats = run(
        cfg,
        data_dir,
        Mode::Backfill,
        shutdown,
        Some(super::progress::for_terminal()),
    )
    .await?;
    let (_, catalog) = compile(cfg)?;
    let rows = Store::open_read_only(data_dir, catalog)?.row_counts()?;
    info!(
        ?rows,
        changes = stats.changes,
        documents = stats.documents,
        dead_letters = stats.dead_letters,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "backfill finished"
    );
    Ok(())
}
