//! `cusa-pipe run [PIPELINE] [STAGE…] [--dry-run] [--force STAGE…|--force-all] [--set K=V…] [-j N] [--gpus N] [--json] [--remote NAME|URL | --no-remote]``

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Args;

use super::{CliError, EXIT_INTERRUPTED, EXIT_STAGE_FAILED};
use crate::runner::report::Outcome;
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
    /// Where stages run: `local` (all on this machine) or `slurm` (every stage the file
    /// does not keep `executor: local`) [default: the file's `executor:`, else local]
    #[arg(long, value_name = "KIND")]
    executor: Option<crate::executor::Choice>,
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
        executor: args.executor,
        job: None,
        forward: forward(&args.set, &args.remote),
    };
    let mut engine = engine;
    let reporter = super::reporter_and_remote(&mut engine, &args.remote, true)?;
    check_cluster_settings(&engine, &settings, &selected)?;
    let result = crate::runner::session::execute(engine, &settings, reporter.clone())
        .map_err(|e| CliError::Other(e.into()))?;
    reporter.summary(&result.reports, result.interrupted);
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

/// What a cluster job repeats of this command line: the overrides and the remote choice (the
/// cache folder is passed by the executor).
fn forward(set: &[Override], remote: &super::RemoteArgs) -> Vec<String> {
    let mut out = Vec::new();
    for o in set {
        out.push("--set".to_string());
        out.push(format!("{}={}", o.key, o.value));
    }
    if let Some(r) = &remote.remote {
        out.push("--remote".into());
        out.push(r.clone());
    }
    if remote.no_remote {
        out.push("--no-remote".into());
    }
    out
}

/// A stage whose jobs use `cache: remote` needs a team remote to reach; said before anything
/// is submitted.
fn check_cluster_settings(
    engine: &crate::runner::Engine,
    settings: &RunSettings,
    selected: &[usize],
) -> Result<(), CliError> {
    if settings.dry_run {
        return Ok(());
    }
    for &i in selected {
        if let crate::executor::ExecutorDecl::Slurm(s) = engine.executor_of(i, settings)
            && s.cache_mode() == crate::executor::CacheMode::Remote
            && engine.remote.is_none()
        {
            return Err(CliError::Usage(format!(
                "stage `{}` runs on Slurm with `cache: remote`, but no team remote is configured \
                 (add `remote:` to {}, or pass `--remote URL`)",
                engine.pipeline.stages[i].name,
                engine.pipeline.file.display()
            )));
        }
    }
    Ok(())
}
