//! `cusa-pipe cache verify | gc [--dry-run] | du`

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Subcommand;

use super::CliError;
use crate::runner::report::human;
use crate::store::Store;

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Re-hash every object and check every run record
    Verify {
        /// Quarantine damaged objects and drop the records that need them
        #[arg(long)]
        repair: bool,
        /// The pipeline file (locates the default cache)
        #[arg(long, default_value = "pipeline.yaml")]
        pipeline: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove results not used by the current pipeline nor by the last N runs
    Gc {
        /// Show what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
        /// Also keep everything the last N runs used
        #[arg(long, default_value_t = 5, value_name = "N")]
        keep_runs: usize,
        /// The pipeline file whose results are kept
        #[arg(long, default_value = "pipeline.yaml")]
        pipeline: PathBuf,
        /// Collect the team cache instead of the local one: the pipeline's remote, or the one
        /// named. Dry run unless `--delete` is given
        #[arg(long, value_name = "NAME|URL", num_args = 0..=1, default_missing_value = "")]
        remote: Option<String>,
        /// With `--remote`: delete (the default only shows what would go)
        #[arg(long, requires = "remote")]
        delete: bool,
        /// With `--remote`: keep every result of these stages (repeatable or comma-separated)
        #[arg(long, value_name = "STAGE", requires = "remote")]
        keep: Vec<String>,
        /// With `--remote`: never delete what is younger than this [default: the remote's
        /// `grace`, 24h]
        #[arg(long, value_name = "DURATION", requires = "remote")]
        grace: Option<humantime::Duration>,
    },
    /// Show how much space the cache uses
    Du {
        /// The pipeline file whose stages are listed
        #[arg(long, default_value = "pipeline.yaml")]
        pipeline: PathBuf,
    },
}

/// The store for `pipeline` (or `./cache` when the file does not exist).
/// `write`: the command changes the cache (`verify --repair`, `gc`); otherwise it is opened
/// read-only and may live on a read-only disk.
fn open(
    pipeline: &std::path::Path,
    cache_dir: Option<PathBuf>,
    write: bool,
) -> Result<Store, CliError> {
    let dir = std::path::absolute(pipeline)
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()))
        .unwrap_or_default();
    let root = super::cache_root(cache_dir, &dir);
    Ok(if write {
        Store::open(&root)?
    } else {
        Store::open_read_only(&root)?
    })
}

pub fn cache(cmd: CacheCommand, cache_dir: Option<PathBuf>) -> Result<i32, CliError> {
    match cmd {
        CacheCommand::Verify {
            repair,
            pipeline,
            json,
        } => {
            let store = open(&pipeline, cache_dir, repair)?;
            let _lock = store.lock(repair, || {
                eprintln!("  waiting  another cusa-pipe process holds the cache lock")
            })?;
            let report = store.verify(repair)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serialises")
                );
            } else {
                println!(
                    "checked {} objects ({}) and {} run records",
                    report.objects,
                    human(report.bytes),
                    report.records
                );
                for d in &report.damaged_objects {
                    println!("damaged  object {d}");
                }
                for p in &report.problems {
                    println!("problem  {p}");
                }
                for r in &report.repaired {
                    println!("repaired {r}");
                }
                if report.staging_leftovers > 0 {
                    println!(
                        "note     {} staging folder(s) from interrupted runs (removed by the next run)",
                        report.staging_leftovers
                    );
                }
                if report.is_clean() {
                    println!("cache is intact");
                } else if !repair {
                    println!(
                        "run `cusa-pipe cache verify --repair` to drop damaged results; the next run recomputes them"
                    );
                }
            }
            Ok(if report.is_clean() || repair { 0 } else { 1 })
        }
        CacheCommand::Gc {
            remote: Some(remote),
            dry_run,
            keep_runs,
            pipeline,
            delete,
            keep,
            grace,
        } => remote_gc(RemoteGc {
            remote,
            delete: delete && !dry_run,
            keep_runs,
            pipeline,
            keep,
            grace: grace.map(Into::into),
            cache_dir,
        }),
        CacheCommand::Gc {
            dry_run,
            keep_runs,
            pipeline,
            ..
        } => {
            let store = open(&pipeline, cache_dir, true)?;
            let _lock = store.lock(true, || eprintln!("  waiting  for running cusa-pipe processes to finish (gc needs the cache alone)"))?;
            let mut keep: BTreeSet<_> = store.recent_fingerprints(keep_runs);
            if pipeline.exists() {
                let id = crate::store::pipeline_id(&pipeline);
                let names: BTreeSet<String> = match super::load(&pipeline, &[]) {
                    Ok((p, _)) => p.stages.iter().map(|s| s.name.clone()).collect(),
                    Err(_) => BTreeSet::new(),
                };
                keep.extend(
                    store
                        .heads(&id)
                        .into_iter()
                        .filter(|(n, _)| names.is_empty() || names.contains(n))
                        .map(|(_, fp)| fp),
                );
            }
            let report = store.gc(&keep, dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for r in &report.records {
                println!("{verb}: {r}");
            }
            println!(
                "{verb} {} result(s), {} object(s) ({}), {} log(s); kept {} result(s)",
                report.records.len(),
                report.objects,
                human(report.bytes),
                report.logs,
                report.kept_records
            );
            Ok(0)
        }
        CacheCommand::Du { pipeline } => {
            let store = open(&pipeline, cache_dir, false)?;
            let du = store.du();
            println!(
                "objects     {:>10}  ({} files)",
                human(du.object_bytes),
                du.objects
            );
            println!("records     {:>10}", du.records);
            println!("logs        {:>10}", human(du.log_bytes));
            println!("scratch     {:>10}", human(du.scratch_bytes));
            println!("quarantine  {:>10}", human(du.quarantine_bytes));
            if pipeline.exists() {
                let heads = store.heads(&crate::store::pipeline_id(&pipeline));
                for (stage, size) in store.output_sizes(&heads) {
                    match size {
                        Some((files, bytes)) => {
                            println!("  {stage:<20} {:>10}  ({files} entries)", human(bytes))
                        }
                        None => println!("  {stage:<20} {:>10}", "-"),
                    }
                }
            }
            Ok(0)
        }
    }
}

struct RemoteGc {
    remote: String,
    delete: bool,
    keep_runs: usize,
    pipeline: PathBuf,
    keep: Vec<String>,
    grace: Option<std::time::Duration>,
    cache_dir: Option<PathBuf>,
}

/// `cache gc --remote`: roots are the pipeline's current keys (assessed locally), the named
/// stages, the last N pushing runs, and everything younger than the grace period.
fn remote_gc(a: RemoteGc) -> Result<i32, CliError> {
    let engine = super::engine(&a.pipeline, &[], a.cache_dir)?;
    let args = super::RemoteArgs {
        remote: (!a.remote.is_empty()).then_some(a.remote.clone()),
        no_remote: false,
    };
    let remote = super::connect_remote(
        &engine.pipeline,
        &args,
        Box::new(|w| eprintln!("{w}")),
        false,
    )?
    .ok_or_else(|| {
        CliError::Usage(format!(
            "no remote: {} has no `remote:` and none was named (`--remote NAME|URL`)",
            a.pipeline.display()
        ))
    })?;
    let keep_stages: BTreeSet<String> = super::stage_indices(&engine.pipeline, &a.keep)?
        .into_iter()
        .map(|i| engine.pipeline.stages[i].name.clone())
        .collect();
    // The pipeline's current keys: from local results, else from the remote's records (so a
    // machine without the results still computes downstream keys).
    let mut fingerprints = BTreeSet::new();
    let mut failure = None;
    super::remote::walk(&engine, &engine.dag.order, |_, a| {
        use crate::runner::Upstream;
        match (&a.fresh, &a.fingerprint) {
            (Some(c), _) => {
                fingerprints.insert(c.fingerprint.clone());
                Upstream::Done(c.clone())
            }
            (None, Some(fp)) => {
                fingerprints.insert(fp.clone());
                if failure.is_some() {
                    return Upstream::Pending;
                }
                match remote.remote_result(fp) {
                    Ok(Some((record, manifest))) => Upstream::Done(crate::runner::Committed {
                        fingerprint: fp.clone(),
                        digest: record.output,
                        dir: PathBuf::new(),
                        manifest: std::sync::Arc::new(manifest),
                        ran_on: record.ran_on,
                    }),
                    Ok(None) => Upstream::Pending,
                    Err(e) => {
                        failure = Some(e);
                        Upstream::Pending
                    }
                }
            }
            (None, None) => Upstream::Pending,
        }
    });
    if let Some(e) = failure {
        return Err(CliError::Other(anyhow::anyhow!(
            "{}: {e}",
            remote.describe()
        )));
    }
    let roots = crate::remote::gc::GcRoots {
        fingerprints,
        stages: keep_stages,
        runs: a.keep_runs,
        grace: a.grace.unwrap_or(remote.settings.grace),
    };
    let report = remote
        .gc(&roots, a.delete)
        .map_err(|e| CliError::Other(anyhow::anyhow!("{}: {e}", remote.describe())))?;
    let verb = if a.delete { "deleted" } else { "would delete" };
    for r in &report.records {
        println!("{verb}: {r}");
    }
    println!(
        "{verb} {} result(s), {} object(s) ({}), {} log(s), {} history entr{} on {}; kept {} result(s); {} unreferenced object(s) younger than {} left",
        report.records.len(),
        report.objects,
        human(report.bytes),
        report.logs,
        report.histories,
        if report.histories == 1 { "y" } else { "ies" },
        remote.describe(),
        report.kept_records,
        report.young,
        humantime::format_duration(roots.grace),
    );
    if !a.delete {
        println!("dry run: nothing deleted; add `--delete` to delete");
    }
    Ok(0)
}
