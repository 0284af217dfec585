//! `cusa-pipe job PIPELINE --stage NAME --fingerprint KEY` (hidden): what a cluster job runs.
//!
//! It executes exactly one stage, through the same code path as `cusa-pipe run` (assess,
//! lock, run in a staging folder, commit), only if the pipeline as this node sees it gives the
//! key the coordinator submitted, and only from upstream results already committed in its
//! cache or restorable from the team remote. With a remote, the result must be on it before
//! the job succeeds: with `cache: remote` that copy is what the coordinator waits for.

use std::path::PathBuf;

use clap::Args;

use super::{CliError, EXIT_INTERRUPTED, EXIT_STAGE_FAILED};
use crate::executor::Placement;
use crate::fingerprint::Fingerprint;
use crate::runner::report::Outcome;
use crate::runner::{JobTarget, RunSettings};
use crate::spec::Override;

#[derive(Args)]
pub struct JobArgs {
    /// The pipeline file (absolute, as the coordinator saw it)
    pipeline: PathBuf,
    /// The one stage to execute (its full name)
    #[arg(long)]
    stage: String,
    /// The key the coordinator decided on
    #[arg(long)]
    fingerprint: String,
    /// The coordinator's overrides
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
    /// Execute even if a result is committed (the coordinator's `--force`)
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    remote: super::RemoteArgs,
}

/// Where this process runs, from the scheduler's environment.
fn placement() -> Placement {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match env("SLURM_JOB_ID") {
        Some(job) => Placement {
            executor: "slurm".into(),
            job,
            node: env("SLURMD_NODENAME").or_else(|| env("HOSTNAME")),
        },
        None => Placement {
            executor: "job".into(),
            job: std::process::id().to_string(),
            node: env("HOSTNAME"),
        },
    }
}

pub fn job(args: JobArgs, cache_dir: Option<PathBuf>) -> Result<i32, CliError> {
    let engine = super::engine(&args.pipeline, &args.set, cache_dir)?;
    let idx = engine
        .pipeline
        .stages
        .iter()
        .position(|s| s.name == args.stage)
        .ok_or_else(|| {
            CliError::Usage(format!(
                "no stage `{}` in {}: the pipeline differs from the one the job was submitted for",
                args.stage,
                args.pipeline.display()
            ))
        })?;
    let expected = Fingerprint(args.fingerprint.clone());
    let cpus = std::env::var("SLURM_CPUS_PER_TASK")
        .ok()
        .and_then(|c| c.parse::<usize>().ok());
    let stage_gpus = engine.pipeline.stages[idx].gpus as usize;
    let settings = RunSettings {
        targets: vec![idx],
        force: if args.force {
            [idx].into_iter().collect()
        } else {
            Default::default()
        },
        jobs: 1,
        gpus: stage_gpus,
        dry_run: false,
        executor: Some(crate::executor::Choice::Local),
        job: Some(JobTarget {
            idx,
            expected: expected.clone(),
            placement: placement(),
            threads: cpus,
        }),
        forward: Vec::new(),
    };
    let mut engine = engine;
    let reporter = super::reporter_and_remote(&mut engine, &args.remote, false)?;
    let remote = engine.remote.clone();
    let result = crate::runner::session::execute(engine, &settings, reporter.clone())
        .map_err(|e| CliError::Other(e.into()))?;
    reporter.summary(&result.reports, result.interrupted);
    if result.interrupted {
        return Ok(EXIT_INTERRUPTED);
    }
    let target = result.reports.iter().find(|r| r.name == args.stage);
    let done = target.is_some_and(|r| {
        matches!(
            r.outcome,
            Outcome::Ran | Outcome::Cached | Outcome::Restored
        )
    });
    if !done {
        return Ok(EXIT_STAGE_FAILED);
    }
    if let Some(remote) = remote {
        // The coordinator of `cache: remote` waits for this copy: no copy, no success.
        match remote.has_record(&expected) {
            Ok(true) => {}
            Ok(false) => {
                eprintln!(
                    "error: `{}` is committed on this node but not on {}; see the warnings above",
                    args.stage,
                    remote.describe()
                );
                return Ok(EXIT_STAGE_FAILED);
            }
            Err(e) => {
                eprintln!(
                    "error: cannot check {} for the result: {e}",
                    remote.describe()
                );
                return Ok(EXIT_STAGE_FAILED);
            }
        }
    }
    Ok(0)
}
