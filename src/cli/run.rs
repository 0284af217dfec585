//! `cusa-pipe run [PIPELINE] [STAGE…] [--dry-run] [--force STAGE…|--force-all] [--set K=V…] [-j N] [--gpus N] [--json] [--remote NAME|URL | --no-remote]``

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

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
