//! `cusa-pipe metrics [PIPELINE] [--baseline STAGE] [--all] [--json]`: one table of what the
//! pipeline's stages measured, read from the cache — the ablation table of a paper without a
//! script.
//!
//! The engine does not know what a metric means: a stage kind puts the numbers worth comparing
//! in its summary's `results` (columns in the kind's order) and they are kept in the run record.
//! A row is a stage whose current configuration has a committed run with results; a stage
//! whose configuration changed since shows its last committed results, marked stale. `--all`
//! lists every cached run of the pipeline's stages instead (older configurations included),
//! oldest first. Deltas are numeric differences to the baseline row (the current run of the
//! baseline stage).

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Args;
use serde_json::{Map, Value, json};

use super::CliError;
use crate::spec::Override;
use crate::store::RunRecord;

#[derive(Args)]
pub struct MetricsArgs {
    /// The pipeline file
    #[arg(default_value = "pipeline.yaml")]
    pipeline: PathBuf,
    /// Show each row's difference to this stage's results
    #[arg(long, value_name = "STAGE")]
    baseline: Option<String>,
    /// Every cached run of the pipeline's stages, not only the current configuration's
    #[arg(long)]
    all: bool,
    /// Evaluate with these overrides (as `run --set` would)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
    /// Print one JSON document on stdout
    #[arg(long)]
    json: bool,
}

/// One row of the table.
struct Row {
    stage: String,
    /// `current` (the configuration of the pipeline now), `stale` (an older one: the stage
    /// must rerun) or, with `--all`, `cached` (an older run still in the cache).
    state: &'static str,
    record: RunRecord,
}

fn rows(engine: &crate::runner::Engine, all: bool) -> Vec<Row> {
    let status = engine.status(&BTreeSet::new());
    let current: std::collections::HashMap<&str, _> = status
        .iter()
        .filter(|r| r.state == "fresh")
        .filter_map(|r| Some((r.name.as_str(), r.fingerprint.clone()?)))
        .collect();
    if all {
        let names: BTreeSet<&str> = engine
            .pipeline
            .stages
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        return engine
            .store
            .records()
            .into_iter()
            .filter(|r| names.contains(r.stage.as_str()) && !r.results.is_empty())
            .map(|record| Row {
                stage: record.stage.clone(),
                state: if current.get(record.stage.as_str()) == Some(&record.fingerprint) {
                    "current"
                } else {
                    "cached"
                },
                record,
            })
            .collect();
    }
    let heads = engine.store.heads(&engine.pipeline_id);
    let mut out = Vec::new();
    for &i in &engine.dag.order {
        let name = &engine.pipeline.stages[i].name;
        let (fp, state) = match (current.get(name.as_str()), heads.get(name)) {
            (Some(fp), _) => (fp, "current"),
            (None, Some(head)) => (head, "stale"),
            (None, None) => continue,
        };
        if let Some(record) = engine
            .store
            .read_record(fp)
            .filter(|r| !r.results.is_empty())
        {
            out.push(Row {
                stage: name.clone(),
                state,
                record,
            });
        }
    }
    out
}

/// `value − base` for numbers, nothing otherwise.
fn delta(value: &Value, base: &Value) -> Option<f64> {
    Some(value.as_f64()? - base.as_f64()?)
}

fn cell(v: Option<&Value>) -> String {
    match v {
        Some(Value::Number(n)) if n.is_f64() => format!("{:.1}", n.as_f64().unwrap_or(f64::NAN)),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

pub fn metrics(args: MetricsArgs, cache_dir: Option<PathBuf>) -> Result<i32, CliError> {
    let engine = super::engine_read_only(&args.pipeline, &args.set, cache_dir)?;
    if let Some(b) = &args.baseline {
        super::stage_indices(&engine.pipeline, std::slice::from_ref(b))?;
    }
    let _lock = engine.store.lock(false, || {
        eprintln!("  waiting  the cache is locked by `cusa-pipe cache gc`")
    })?;
    let rows = rows(&engine, args.all);
    let base: Option<&Map<String, Value>> = match &args.baseline {
        None => None,
        Some(b) => Some(
            rows.iter()
                .find(|r| &r.stage == b && r.state == "current")
                .or_else(|| rows.iter().rev().find(|r| &r.stage == b))
                .map(|r| &r.record.results)
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "stage `{b}` has no measured results in the cache; run `cusa-pipe run {} {b}` first",
                        args.pipeline.display()
                    ))
                })?,
        ),
    };
    let mut columns: Vec<&str> = Vec::new();
    for r in &rows {
        for k in r.record.results.keys() {
            if !columns.contains(&k.as_str()) {
                columns.push(k);
            }
        }
    }
    let deltas = |r: &Row| -> Option<Map<String, Value>> {
        let base = base?;
        Some(
            columns
                .iter()
                .filter_map(|&c| {
                    let d = delta(r.record.results.get(c)?, base.get(c)?)?;
                    Some((c.to_string(), json!(d)))
                })
                .collect(),
        )
    };
    if args.json {
        let doc = json!({
            "pipeline": engine.pipeline.file.display().to_string(),
            "baseline": args.baseline,
            "columns": columns,
            "rows": rows.iter().map(|r| json!({
                "stage": r.stage,
                "state": r.state,
                "fingerprint": r.record.fingerprint.to_string(),
                "started_at": r.record.started_at,
                "results": r.record.results,
                "delta": deltas(r),
            })).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("metrics serialise")
        );
        return Ok(0);
    }
    if rows.is_empty() {
        eprintln!(
            "nothing measured yet: no stage of {} has results in the cache (`eval` stages record theirs when they run)",
            args.pipeline.display()
        );
        return Ok(0);
    }
    let label = |r: &Row| -> String {
        let mark = match r.state {
            "stale" => " *",
            _ => "",
        };
        if args.all {
            format!("{} {}{mark}", r.stage, r.record.fingerprint.short())
        } else {
            format!("{}{mark}", r.stage)
        }
    };
    let delta_label = format!("  Δ vs {}", args.baseline.as_deref().unwrap_or_default());
    let first = rows
        .iter()
        .map(|r| label(r).chars().count())
        .chain([5, delta_label.chars().count()])
        .max()
        .unwrap_or(5);
    let mut table: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["stage".to_string()];
    header.extend(columns.iter().map(|c| c.to_string()));
    table.push(header);
    for r in &rows {
        let mut line = vec![label(r)];
        line.extend(columns.iter().map(|c| cell(r.record.results.get(*c))));
        table.push(line);
        if let Some(d) = deltas(r).filter(|_| args.baseline.as_ref() != Some(&r.stage)) {
            let mut line = vec![delta_label.clone()];
            line.extend(
                columns
                    .iter()
                    .map(|c| match d.get(*c).and_then(Value::as_f64) {
                        Some(x) => format!("{x:+.1}"),
                        None => String::new(),
                    }),
            );
            table.push(line);
        }
    }
    let widths: Vec<usize> = (0..=columns.len())
        .map(|j| {
            table
                .iter()
                .map(|l| l[j].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for line in &table {
        let mut text = format!("{:first$}", line[0]);
        for (j, c) in line.iter().enumerate().skip(1) {
            text.push_str(&format!("  {c:>w$}", w = widths[j]));
        }
        println!("{}", text.trim_end());
    }
    if rows.iter().any(|r| r.state == "stale") {
        println!(
            "* measured with an older configuration of the stage; `cusa-pipe run` measures the current one"
        );
    }
    Ok(0)
}
