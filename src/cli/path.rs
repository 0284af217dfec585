//! `cusa-pipe path STAGE[/sub/path] [PIPELINE]`: where a fresh stage output is on disk.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Args;

use super::CliError;
use crate::runner::report::reasons_text;

#[derive(Args)]
pub struct PathArgs {
    /// A stage, optionally with a path inside its output
    #[arg(value_name = "STAGE[/sub/path]")]
    target: String,
    /// The pipeline file
    #[arg(default_value = "pipeline.yaml")]
    pipeline: PathBuf,
    /// Evaluate with these overrides (as `run --set` would)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<crate::spec::Override>,
}

pub fn path(args: PathArgs, cache_dir: Option<PathBuf>) -> Result<i32, CliError> {
    let (name, sub) = match args.target.split_once('/') {
        Some((n, s)) => (n.to_string(), Some(s.trim_matches('/').to_string())),
        None => (args.target.clone(), None),
    };
    let engine = super::engine_read_only(&args.pipeline, &args.set, cache_dir)?;
    let idx = super::stage_index(&engine.pipeline, &name)?;
    let name = engine.pipeline.stages[idx].name.clone();
    let _lock = engine.store.lock(false, || {
        eprintln!("  waiting  the cache is locked by `cusa-pipe cache gc`")
    })?;
    let rows = engine.status(&BTreeSet::new());
    let row = rows
        .iter()
        .find(|r| r.name == name)
        .expect("every stage has a row");
    if row.state != "fresh" {
        let why = row
            .error
            .clone()
            .unwrap_or_else(|| reasons_text(&row.reasons));
        return Err(CliError::Other(anyhow::anyhow!(
            "stage `{name}` has no up-to-date output ({why}); run `cusa-pipe run {}` first",
            engine.pipeline.stages[idx].name
        )));
    }
    let fp = row.fingerprint.clone().expect("fresh rows have a key");
    let record = engine
        .store
        .read_record(&fp)
        .ok_or_else(|| anyhow::anyhow!("the run record of `{name}` disappeared"))?;
    let dir = match engine.store.check_tree(&record.output)? {
        crate::store::TreeState::Intact(dir) => dir,
        crate::store::TreeState::Damaged(d) | crate::store::TreeState::Missing(d) => {
            return Err(CliError::Other(anyhow::anyhow!(
                "the output of `{name}` is damaged: {d}"
            )));
        }
    };
    let target = match &sub {
        Some(s) => dir.join(s),
        None => dir,
    };
    if !target.exists() {
        return Err(CliError::Usage(format!(
            "`{}` is not in the output of `{name}`",
            sub.unwrap_or_default()
        )));
    }
    println!("{}", target.display());
    Ok(0)
}
