//! The `viewkeeper` binary: parses arguments and hands over to the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;
use viewkeeper::config::Config;

#[derive(Parser)]
#[command(
    name = "viewkeeper",
    version,
    about = "Keeps read models in step with many services' databases"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the worker: stream changes into the read models until SIGTERM/SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Where the state store and dead letters live (overrides `data_dir`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Initial load: read the existing rows of every source that has no checkpoint yet
    /// (resumable chunk by chunk), write every document once, and exit. Then `run`
    /// streams on from exactly where the load ended.
    ///
    /// With `--projection P --rebuild`: render P from the state store into a new
    /// versioned index while `run` keeps streaming, then swap the alias atomically.
    /// With `--projection P` alone: re-write every document of P through its alias.
    Backfill {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        projection: Option<String>,
        #[arg(long, requires = "projection")]
        rebuild: bool,
    },
    /// Positions, slots, stored rows and dead letters (works beside a running worker).
    Status {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Compare every read model with the source databases (missing, stale, extra,
    /// unresolved); exit code 0 only when clean. `--repair` re-writes what differs.
    /// Works beside a running worker (differences are re-checked before they count).
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        projection: Option<String>,
        #[arg(long)]
        repair: bool,
        /// Every finding, as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// The dead-letter store: what could not be applied, where it came from, and why.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
    /// The Postgres sources' replication slots.
    Slot {
        #[command(subcommand)]
        cmd: SlotCmd,
    },
    /// Load and validate a config file; print it with secrets redacted.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum SlotCmd {
    /// Each slot: active, confirmed position, retained WAL, lag.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Drop a source's slot (not while a worker streams from it).
    Drop {
        #[arg(long, short)]
        config: PathBuf,
        source: String,
        /// Confirm: without it, nothing is dropped.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum DlqCmd {
    /// List dead letters, oldest first.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its payload.
    Show {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        id: i64,
    },
    /// Send dead letters through the pipeline again (after a fix); those that go through
    /// are removed, the others stay with their reason. Works beside a running worker.
    Replay {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[arg(required_unless_present = "all")]
        ids: Vec<i64>,
    },
    /// Delete dead letters for good.
    Drop {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[arg(required_unless_present = "all")]
        ids: Vec<i64>,
        /// Confirm: without it, nothing is deleted.
        #[arg(long)]
        yes: bool,
    },
}

fn main() -> ExitCode {
    viewkeeper::logging::init();
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            println!("{cfg:#?}");
            println!("config {} is valid", config.display());
            Ok(())
        }
        Cmd::Status { config, data_dir, json } => {
            let cfg = Config::load(&config)?;
            let dir = data_dir.unwrap_or_else(|| cfg.data_dir.clone());
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(viewkeeper::admin::status(&cfg, &dir, json))
        }
        Cmd::Dlq {
            cmd:
                DlqCmd::List {
                    config,
                    data_dir,
                    limit,
                    json,
                },
        } => {
            let cfg = Config::load(&config)?;
            let dir = data_dir.unwrap_or_else(|| cfg.data_dir.clone());
            viewkeeper::admin::dlq_list(&cfg, &dir, limit, json)
        }
        Cmd::Dlq {
            cmd: DlqCmd::Show { config, data_dir, id },
        } => {
            let cfg = Config::load(&config)?;
            let dir = data_dir.unwrap_or_else(|| cfg.data_dir.clone());
            viewkeeper::admin::dlq_show(&cfg, &dir, id)
        }
        Cmd::Verify {
            config,
            data_dir,
            projection,
            repair,
            json,
        } => {
            let cfg = Config::load(&config)?;
            let dir = data_dir.unwrap_or_else(|| cfg.data_dir.clone());
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let clean = rt.block_on(viewkeeper::verify::verify(
                &cfg,
                &dir,
                projection.as_deref(),
                repair,
                json,
            ))?;
            if !clean {
                anyhow::bail!("the read models differ from the sources (listed above)");
            }
            Ok(())
        }
        Cmd::Dlq {
            cmd:
                DlqCmd::Replay {
                    config,
                    data_dir,
                    all,
                    ids,
                },
        } => {
            let cfg = Config::load(&config)?;
            let dir = data_dir.unwrap_or_else(|| cfg.data_dir.clone());
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let ids = (!all).then_some(ids);
            let (replayed, kept) = rt.block_on(async move {
                let shutdown = CancellationToken::new();
                let sd = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    sd.cancel();
                });
                viewkeeper::worker::dlq_replay(cfg, &dir, ids, shutdown).await
            })?;
            println!("replayed {replayed}, still failing {kept}");
            if kept > 0 {
                anyhow::bail!("{kept} dead letter(s) still fail (reasons in the log above)");
            }
            Ok(())
        }
        Cmd::Dlq {
            cmd:
                DlqCmd::Drop {
                    config,
                    data_dir,
                    all,
                    ids,
                    yes,
                },
        } => {
            let cfg = Config::load(&config)?;
            let dir = data_dir.unwrap_or_else(|| cfg.data_dir.clone());
            viewkeeper::admin::dlq_drop(&cfg, &dir, (!all).then_some(ids), yes)
        }
        Cmd::Slot {
            cmd: SlotCmd::List { config, json },
        } => {
            let cfg = Config::load(&config)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(viewkeeper::admin::slot_list(&cfg, json))
        }
        Cmd::Slot {
            cmd: SlotCmd::Drop { config, source, yes },
        } => {
            let cfg = Config::load(&config)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(viewkeeper::admin::slot_drop(&cfg, &source, yes))
        }
        Cmd::Run { config, data_dir } => run(config, data_dir, viewkeeper::worker::Mode::Run),
        Cmd::Backfill {
            config,
            data_dir,
            projection: None,
            ..
        } => run(config, data_dir, viewkeeper::worker::Mode::Backfill),
        Cmd::Backfill {
            config,
            data_dir,
            projection: Some(p),
            rebuild,
        } => run(
            config,
            data_dir,
            viewkeeper::worker::Mode::Rebuild {
                projection: p,
                new_index: rebuild,
            },
        ),
    }
}

/// Runs the worker (or the backfill) on a multi-threaded runtime until it ends or a
/// SIGTERM/SIGINT asks it to stop.
fn run(config: PathBuf, data_dir: Option<PathBuf>, mode: viewkeeper::worker::Mode) -> anyhow::Result<()> {
    let cfg = Config::load(&config)?;
    let data_dir = data_dir.unwrap_or_else(|| cfg.data_dir.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received");
            sd.cancel();
        });
        match mode {
            viewkeeper::worker::Mode::Rebuild { projection, new_index } => {
                viewkeeper::worker::rebuild(cfg, &data_dir, &projection, new_index, shutdown).await
            }
            mode => viewkeeper::worker::run(cfg, &data_dir, mode, shutdown).await,
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
