//! `cusa-pipe status [PIPELINE] [--json]`: every stage fresh or stale, with reasons.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Args;

use super::CliError;
use crate::runner::report::reasons_text;
use crate::spec::Override;

#[derive(Args)]
pub struct StatusArgs {
    /// The pipeline file
    #[arg(default_value = "pipeline.yaml")]
    pipeline: PathBuf,
    /// Evaluate with these overrides (as `run --set` would)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
    /// Print one JSON document on stdout
    #[arg(long)]
    json: bool,
}

pub fn status(args: StatusArgs, cache_dir: Option<PathBuf>) -> Result<i32, CliError> {
    let engine = super::engine_read_only(&args.pipeline, &args.set, cache_dir)?;
    let _lock = engine.store.lock(false, || {
        eprintln!("  waiting  the cache is locked by `cusa-pipe cache gc`")
    })?;
    let rows = engine.status(&BTreeSet::new());
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "stages": rows }))
                .expect("rows serialise")
        );
    } else {
        let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
        for r in &rows {
            let detail = match (&r.error, r.state) {
                (Some(e), _) => e.clone(),
                (None, "fresh") => {
                    let short = r
                        .fingerprint
                        .as_ref()
                        .map(|f| f.short().to_string())
                        .unwrap_or_default();
                    match &r.ran_on {
                        Some(p) => format!("{short}  ran on {p}"),
                        None => short,
                    }
                }
                _ => reasons_text(&r.reasons),
            };
            println!(
                "{}",
                format!("{:>5}  {:width$}  {detail}", r.state, r.name).trim_end()
            );
        }
    }
    Ok(if rows.iter().any(|r| r.state == "error") {
        1
    } else {
        0
    })
}
