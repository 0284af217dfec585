//! `cusa-pipe run [PIPELINE] [STAGE…] [--dry-run] [--force STAGE…|--force-all] [--set K=V…] [-j N] [--gpus N] [--json] [--remote NAME|URL | --no-remote]``

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use cusa_stages::api::Cancel;
use signal_hook::consts::{SIGINT, SIGTERM};

use super::{CliError, EXIT_INTERRUPTED, EXIT_STAGE_FAILED};
use crate::runner::report::{Outcome, Reporter};
use crate::runner::{RunSettings, detect_gpus};
use crate::spec::Override;

#[derive(Args)]
pub struct RunArgs {
    /// [PIPELINE] [STAGE…]: the pipeline file (default pipeline.yaml) and stages to run
    #[arg(value_name = "PIPELINE|STAGE")]
    words: Vec<String>,
    /// Show what would run and why, without running
    #[arg(long)]
    dry_run: bool,
    /// Rerun these stages even if cached (repeatable or comma-separated)
    #[arg(long, value_name = "STAGE", num_args = 1.., conflicts_with = "force_all")]
    force: Vec<String>,
    /// Rerun every selected stage
    #[arg(long)]
    force_all: bool,
    /// Override a value for this run: `params.n=2000`, `total.with.run=…`
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
    /// Stages executed at once [default: number of cores]
    #[arg(short = 'j', long, value_name = "N")]
    jobs: Option<usize>,
    /// GPU slots [default: GPUs detected, 0 without an NVIDIA driver]
    #[arg(long, value_name = "N")]
    gpus: Option<usize>,
    /// Print one JSON document on stdout
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    remote: super::RemoteArgs,
}

pub fn run(args: RunArgs, cache_dir: Option<PathBuf>) -> Result<i32, CliError> {
    let (file, stages) = super::split_pipeline_and_stages(&args.words);
    let engine = super::engine(&file, &args.set, cache_dir)?;
    let targets = super::stage_indices(&engine.pipeline, &stages)?;
    let selected = if targets.is_empty() {
        engine.dag.order.clone()
    } else {
        engine.dag.closure(&targets)
    };
    super::check_project_inputs(&engine.pipeline, &selected)?;
    let force: BTreeSet<usize> = if args.force_all {
        (0..engine.pipeline.stages.len()).collect()
    } else {
        super::stage_indices(&engine.pipeline, &args.force)?
            .into_iter()
            .collect()
    };
    if args.jobs == Some(0) {
        return Err(CliError::Usage(
            "`-j 0`: at least one stage must be able to run".into(),
        ));
    }
    let settings = RunSettings {
        targets,
        force,
        jobs: args.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        gpus: args.gpus.unwrap_or_else(detect_gpus),
        dry_run: args.dry_run,
    };
    let width = super::name_width(&engine.pipeline);
    let reporter = Arc::new(Reporter::new(width));
    let mut engine = engine;
    engine.remote = {
        let reporter = reporter.clone();
        super::connect_remote(
            &engine.pipeline,
            &args.remote,
            Box::new(move |w| reporter.line(w)),
            true,
        )?
    };
    let _lock = engine.store.lock(false, || {
        reporter.waiting("the cache is locked by `cusa-pipe cache gc`")
    })?;
    let swept = engine.store.sweep_staging();
    if swept > 0 {
        reporter.line(&format!(
            "  cleaned  {swept} staging folder(s) left by an interrupted run"
        ));
    }

    let cancel = Cancel::new();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| CliError::Other(e.into()))?;
    let signal_handle = signals.handle();
    let watcher = {
        let (cancel, reporter) = (cancel.clone(), reporter.clone());
        std::thread::spawn(move || {
            for (n, _) in signals.forever().enumerate() {
                if n == 0 {
                    reporter.line(
                        "interrupted: stopping running stages (press Ctrl-C again to kill them)",
                    );
                    cancel.cancel(libc::SIGTERM);
                    let cancel = cancel.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        cancel.signal_groups(libc::SIGKILL);
                    });
                } else {
                    cancel.signal_groups(libc::SIGKILL);
                }
            }
        })
    };

    let engine = Arc::new(engine);
    let result = engine.run(&settings, reporter.clone(), cancel);
    signal_handle.close();
    let _ = watcher.join();

    if let Some(remote) = &engine.remote {
        super::remote::wait_for_pushes(remote, &reporter);
    }
    reporter.summary(&result.reports, result.interrupted);
    let history = crate::store::HistoryEntry {
        pipeline: engine.pipeline.file.display().to_string(),
        dry_run: args.dry_run,
        stages: result
            .reports
            .iter()
            .map(|r| crate::store::HistoryStage {
                name: r.name.clone(),
                outcome: r.outcome.key().to_string(),
                fingerprint: r.fingerprint.clone(),
                reasons: r.reasons.iter().map(ToString::to_string).collect(),
                seconds: r.seconds,
            })
            .collect(),
    };
    if !args.dry_run
        && let Err(e) = engine.store.write_history(&history)
    {
        reporter.line(&format!("warning: {e}"));
    }
    if !args.dry_run
        && let Some(remote) = &engine.remote
        && result.reports.iter().any(|r| r.outcome == Outcome::Ran)
    {
        remote.push_history(&history);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "stages": result.reports }))
                .expect("reports serialise")
        );
    }
    Ok(if result.interrupted {
        EXIT_INTERRUPTED
    } else if result.reports.iter().any(|r| r.outcome == Outcome::Failed) {
        EXIT_STAGE_FAILED
    } else {
        0
    })
}
