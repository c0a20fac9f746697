//! The `viewkeeper` binary: parses arguments and hands over to the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;
use viewkeeper::config::Config;

/// mimalloc instead of glibc's malloc: allocation was 40% of the worker's time in the
/// backfill profile, and glibc's per-thread arenas inflated the streaming RSS (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Wait until a source position is durable in every read model of a running worker
    /// (read-your-writes): exit 0 once reached, 3 on timeout, 1 on any other failure.
    /// Prints the worker's answer (with the current position) as JSON.
    Wait(viewkeeper::commands::wait::WaitArgs),
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
    let cli = Cli::parse();
    if let Cmd::Wait(args) = cli.cmd {
        return wait(args);
    }
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `viewkeeper wait`: its own exit codes (0 reached, 3 timed out, 1 failed).
fn wait(args: viewkeeper::commands::wait::WaitArgs) -> ExitCode {
    let r = runtime(false).and_then(|rt| Ok(rt.block_on(viewkeeper::commands::wait::wait(&args))?));
    match r {
        Ok((reached, answer)) => {
            println!("{answer}");
            if reached {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "timed out after {} ms: source {} is durable at {}",
                    answer["timeout_ms"], args.source, answer["position"]
                );
                ExitCode::from(viewkeeper::commands::wait::TIMED_OUT)
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    use viewkeeper::commands::{backfill, dlq, rebuild, run, status, verify};
    let load = |config: &PathBuf, data_dir: Option<PathBuf>| -> anyhow::Result<(Config, PathBuf)> {
        let cfg = Config::load(config)?;
        let dir = data_dir.unwrap_or_else(|| cfg.data_dir.clone());
        Ok((cfg, dir))
    };
    match cli.cmd {
        Cmd::Wait(_) => unreachable!("handled in main"),
        Cmd::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            println!("{cfg:#?}");
            println!("config {} is valid", config.display());
            Ok(())
        }
        Cmd::Status { config, data_dir, json } => {
            let (cfg, dir) = load(&config, data_dir)?;
            runtime(false)?.block_on(status::status(&cfg, &dir, json))
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
            let (cfg, dir) = load(&config, data_dir)?;
            dlq::dlq_list(&cfg, &dir, limit, json)
        }
        Cmd::Dlq {
            cmd: DlqCmd::Show { config, data_dir, id },
        } => {
            let (cfg, dir) = load(&config, data_dir)?;
            dlq::dlq_show(&cfg, &dir, id)
        }
        Cmd::Verify {
            config,
            data_dir,
            projection,
            repair,
            json,
        } => {
            let (cfg, dir) = load(&config, data_dir)?;
            let clean = runtime(true)?.block_on(verify::verify(&cfg, &dir, projection.as_deref(), repair, json))?;
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
            let (cfg, dir) = load(&config, data_dir)?;
            let ids = (!all).then_some(ids);
            let (replayed, kept) = runtime(true)?.block_on(async move {
                let shutdown = stop_on_signal();
                dlq::dlq_replay(cfg, &dir, ids, shutdown).await
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
            let (cfg, dir) = load(&config, data_dir)?;
            dlq::dlq_drop(&cfg, &dir, (!all).then_some(ids), yes)
        }
        Cmd::Slot {
            cmd: SlotCmd::List { config, json },
        } => {
            let cfg = Config::load(&config)?;
            runtime(false)?.block_on(status::slot_list(&cfg, json))
        }
        Cmd::Slot {
            cmd: SlotCmd::Drop { config, source, yes },
        } => {
            let cfg = Config::load(&config)?;
            runtime(false)?.block_on(status::slot_drop(&cfg, &source, yes))
        }
        Cmd::Run { config, data_dir } => {
            let (cfg, dir) = load(&config, data_dir)?;
            runtime(true)?.block_on(async move {
                run::run(&cfg, &dir, run::Mode::Run, stop_on_signal(), None)
                    .await
                    .map(|_| ())
            })
        }
        Cmd::Backfill {
            config,
            data_dir,
            projection: None,
            ..
        } => {
            let (cfg, dir) = load(&config, data_dir)?;
            runtime(true)?.block_on(async move { backfill::backfill(&cfg, &dir, stop_on_signal()).await })
        }
        Cmd::Backfill {
            config,
            data_dir,
            projection: Some(p),
            rebuild,
        } => {
            let (cfg, dir) = load(&config, data_dir)?;
            runtime(true)?.block_on(async move { rebuild::rebuild(&cfg, &dir, &p, rebuild, stop_on_signal()).await })
        }
    }
}

/// A tokio runtime: multi-threaded for the worker and the commands that write.
fn runtime(multi: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if multi {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().context("starting the runtime")
}

/// A token cancelled by SIGTERM or SIGINT (call inside the runtime).
fn stop_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        viewkeeper::commands::signal().await;
        tracing::info!("shutdown signal received");
        sd.cancel();
    });
    shutdown
}
