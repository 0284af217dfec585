//! `cusa-pipe push | pull [PIPELINE] [STAGE…] [--remote NAME|URL]`, and the end-of-run wait for
//! background pushes.
//!
//! Unlike `run`, where the remote is best effort, these commands ask for the remote by name:
//! a remote that cannot be reached is an error (exit 1).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::{CliError, EXIT_STAGE_FAILED};
use crate::remote::Remote;
use crate::runner::report::human;
use crate::runner::{Engine, Upstream};
use crate::spec::Override;

/// `push` and `pull` take the same arguments.
#[derive(Args)]
pub struct TransferArgs {
    /// [PIPELINE] [STAGE…]: the pipeline file (default pipeline.yaml) and the stages to move
    /// (default: every stage; to pull a stage its upstream results must be known)
    #[arg(value_name = "PIPELINE|STAGE")]
    words: Vec<String>,
    /// Override a value (as for `run`), to move the results of that configuration
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
    #[command(flatten)]
    remote: super::RemoteArgs,
    /// `push` only: download and re-hash what the remote already holds for these results,
    /// uploading again whatever is damaged or missing and replacing an unreadable record
    #[arg(long)]
    verify: bool,
}

/// The engine and its remote, or a usage error when none is configured.
fn engine_with_remote(
    words: &[String],
    set: &[Override],
    remote: &super::RemoteArgs,
    cache_dir: Option<PathBuf>,
) -> Result<(Engine, Arc<Remote>, Vec<usize>), CliError> {
    let (file, stages) = super::split_pipeline_and_stages(words);
    let engine = super::engine(&file, set, cache_dir)?;
    let targets = super::stage_indices(&engine.pipeline, &stages)?;
    let remote = super::connect_remote(
        &engine.pipeline,
        remote,
        Box::new(|w| eprintln!("{w}")),
        false,
    )?
    .ok_or_else(|| {
        CliError::Usage(format!(
            "no remote: {} has no `remote:`, no `--remote NAME|URL` was given and the user \
             config has no `default`",
            file.display()
        ))
    })?;
    Ok((engine, remote, targets))
}

/// Walks the stages in order, as `status` does, calling `visit` with each stage's assessment.
/// `visit` returns what dependents see (push, pull, and the roots of `cache gc --remote`).
pub(super) fn walk(
    engine: &Engine,
    order: &[usize],
    mut visit: impl FnMut(usize, &crate::runner::Assessment) -> Upstream,
) {
    let mut ups: HashMap<String, Upstream> = HashMap::new();
    for &i in order {
        let name = engine.pipeline.stages[i].name.clone();
        let up = match engine.assess(i, &ups, false) {
            Ok(a) => visit(i, &a),
            Err(_) => Upstream::Broken,
        };
        ups.insert(name, up);
    }
}

pub fn push(args: TransferArgs, cache_dir: Option<PathBuf>) -> Result<i32, CliError> {
    let (engine, remote, targets) =
        engine_with_remote(&args.words, &args.set, &args.remote, cache_dir)?;
    let _lock = engine.store.lock(false, || {
        eprintln!("  waiting  the cache is locked by `cusa-pipe cache gc`")
    })?;
    let wanted: Vec<usize> = if targets.is_empty() {
        engine.dag.order.clone()
    } else {
        targets.clone()
    };
    let order = engine.dag.closure(&wanted);
    let width = super::name_width(&engine.pipeline);
    let mut missing = 0;
    walk(&engine, &order, |i, a| {
        let name = &engine.pipeline.stages[i].name;
        match &a.fresh {
            Some(c) => {
                if wanted.contains(&i)
                    && let Some(record) = engine.store.read_record(&c.fingerprint)
                {
                    let check = if args.verify {
                        crate::remote::PushCheck::Verify
                    } else {
                        crate::remote::PushCheck::Trust
                    };
                    remote.push_in_background(&engine.store, record, check);
                }
                Upstream::Done(c.clone())
            }
            None => {
                if wanted.contains(&i) {
                    missing += 1;
                    eprintln!(
                        "{:>9}  {name:width$}  no committed result for this configuration (run it first)",
                        "missing"
                    );
                }
                Upstream::Pending
            }
        }
    });
    let results = remote.finish(|_, _| {});
    let mut failed = 0;
    let (mut pushed, mut bytes, mut objects) = (0, 0, 0);
    for (stage, r) in &results {
        match r {
            Ok(s) if s.already => {
                eprintln!("{:>9}  {stage:width$}  already on the remote", "present")
            }
            Ok(s) => {
                pushed += 1;
                bytes += s.bytes;
                objects += s.objects;
                let (label, what) = match (s.repaired > 0, s.record_replaced) {
                    (_, true) => ("repaired", "object(s) uploaded again, record replaced"),
                    (true, false) => ("repaired", "damaged or missing object(s) uploaded again"),
                    (false, false) => ("pushed", "object(s)"),
                };
                eprintln!(
                    "{label:>9}  {stage:width$}  {} {what}, {}",
                    s.objects,
                    human(s.bytes)
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!("{:>9}  {stage:width$}  {e}", "failed");
            }
        }
    }
    eprintln!(
        "pushed {pushed} result(s) ({objects} object(s), {}) to {}{}",
        human(bytes),
        remote.describe(),
        if missing > 0 {
            format!("; {missing} stage(s) have no local result")
        } else {
            String::new()
        }
    );
    Ok(if failed > 0 { EXIT_STAGE_FAILED } else { 0 })
}

pub fn pull(args: TransferArgs, cache_dir: Option<PathBuf>) -> Result<i32, CliError> {
    let (engine, remote, targets) =
        engine_with_remote(&args.words, &args.set, &args.remote, cache_dir)?;
    if args.verify {
        return Err(CliError::Usage(
            "`--verify` is for `push` (a pull verifies every object it downloads)".into(),
        ));
    }
    let _lock = engine.store.lock(false, || {
        eprintln!("  waiting  the cache is locked by `cusa-pipe cache gc`")
    })?;
    engine.store.sweep_staging();
    let order = if targets.is_empty() {
        engine.dag.order.clone()
    } else {
        engine.dag.closure(&targets)
    };
    let width = super::name_width(&engine.pipeline);
    let (mut pulled, mut local, mut absent, mut failed) = (0, 0, 0, 0);
    let (mut objects, mut bytes) = (0usize, 0u64);
    walk(&engine, &order, |i, a| {
        let name = &engine.pipeline.stages[i].name;
        if let Some(c) = &a.fresh {
            local += 1;
            eprintln!("{:>9}  {name:width$}", "cached");
            return Upstream::Done(c.clone());
        }
        let Some(fp) = &a.fingerprint else {
            absent += 1;
            eprintln!(
                "{:>9}  {name:width$}  its inputs are not all known locally (pull or run upstream stages first)",
                "missing"
            );
            return Upstream::Pending;
        };
        match remote.try_restore(&engine.store, fp) {
            Ok(Some((record, stats))) => {
                if let Err(e) = engine.store.set_head(&engine.pipeline_id, name, fp) {
                    eprintln!(
                        "warning: `{name}`: could not record the restored result as the stage's latest: {e}"
                    );
                }
                pulled += 1;
                objects += stats.objects;
                bytes += stats.bytes;
                eprintln!(
                    "{:>9}  {name:width$}  {} object(s), {} (saves {})",
                    "restored",
                    stats.objects,
                    human(stats.bytes),
                    crate::runner::report::seconds(record.seconds)
                );
                match engine.committed_result(fp) {
                    Some(c) => Upstream::Done(c),
                    None => Upstream::Pending,
                }
            }
            Ok(None) => {
                absent += 1;
                eprintln!("{:>9}  {name:width$}  not on the remote", "missing");
                Upstream::Pending
            }
            Err(e) => {
                failed += 1;
                eprintln!("{:>9}  {name:width$}  {e}", "failed");
                Upstream::Pending
            }
        }
    });
    eprintln!(
        "restored {pulled} result(s) ({objects} object(s), {}) from {}; {local} already local, {absent} missing",
        human(bytes),
        remote.describe()
    );
    Ok(if failed > 0 { EXIT_STAGE_FAILED } else { 0 })
}
