//! `cusa-pipe metrics [PIPELINE] [--over AXIS] [--baseline STAGE] [--columns C,…] [--all]
//! [--json]`: one table of what the pipeline's stages measured, read from the cache — the
//! ablation table of a paper without a script.
//!
//! Over seeds: when matrix stages have a `seed` axis (or the axis `--over` names), their
//! elements are grouped by their other labels (`eval@variant=cusa`): mean ± sd and n per group,
//! and under each the paired difference to the stage's baseline group (its first, or
//! `--baseline`) matched seed by seed, with a 95 % Student-t interval, `*` when it excludes 0
//! ([`cusa_stages::seeds`], checked against scipy). `--over none` shows one row per run.
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
    /// Show each row's difference to this stage's results (over seeds: this group, e.g.
    /// `eval@variant=base`) [default over seeds: each stage's first group]
    #[arg(long, value_name = "STAGE")]
    baseline: Option<String>,
    /// Group matrix elements over this axis: mean ± sd, paired deltas with a 95 % CI
    /// [default: `seed` when a matrix has it; `none`: one row per run]
    #[arg(long, value_name = "AXIS")]
    over: Option<String>,
    /// Only these columns (comma-separated names as the table heads them)
    #[arg(long, value_name = "C,…", value_delimiter = ',')]
    columns: Vec<String>,
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

fn print_json(doc: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(doc).expect("metrics serialise")
    );
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
    let over = match args.over.as_deref() {
        Some("none") => None,
        Some(axis) => {
            let known = engine
                .pipeline
                .stages
                .iter()
                .any(|s| s.element.as_ref().is_some_and(|e| e.label(axis).is_some()));
            if !known {
                return Err(CliError::Usage(format!(
                    "no matrix stage of {} has an axis `{axis}`; `--over none` shows one row per run",
                    args.pipeline.display()
                )));
            }
            Some(axis.to_string())
        }
        None if !args.all
            && engine.pipeline.stages.iter().any(|s| {
                s.element
                    .as_ref()
                    .is_some_and(|e| e.label("seed").is_some())
            }) =>
        {
            Some("seed".to_string())
        }
        None => None,
    };
    if let (Some(_), true) = (&over, args.all) {
        return Err(CliError::Usage(
            "`--all` lists every cached run; it cannot group over seeds (drop `--over`)".into(),
        ));
    }
    if let (Some(b), None) = (&args.baseline, &over) {
        super::stage_index(&engine.pipeline, b)?;
    }
    let _lock = engine.store.lock(false, || {
        eprintln!("  waiting  the cache is locked by `cusa-pipe cache gc`")
    })?;
    let mut rows = rows(&engine, args.all);
    if !args.columns.is_empty() {
        // A stage that measured none of the columns asked for has no row.
        rows.retain(|r| r.record.results.keys().any(|k| args.columns.contains(k)));
    }
    if rows.is_empty() && !args.json {
        eprintln!(
            "nothing measured yet: no stage of {} has results in the cache (`eval` stages record theirs when they run)",
            args.pipeline.display()
        );
        return Ok(0);
    }
    if let Some(axis) = &over {
        return over_seeds(&args, &engine, &rows, axis);
    }
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
    // The union of the rows' columns, each row's order kept: a column first seen in a later
    // row goes right after the column it follows there (train's `i2t R@1`, then eval's R@5).
    let mut columns: Vec<&str> = Vec::new();
    for r in &rows {
        let mut after: Option<usize> = None;
        for k in r.record.results.keys() {
            if !(args.columns.is_empty() || args.columns.contains(k)) {
                continue;
            }
            match columns.iter().position(|c| c == k) {
                Some(i) => after = Some(i),
                None => {
                    let at = after.map_or(columns.len(), |i| i + 1);
                    columns.insert(at, k);
                    after = Some(at);
                }
            }
        }
    }
    let deltas = |r: &Row| -> Option<Map<String, Value>> {
        let base = base?;
        // Numbers measured on another split are not comparable (a training's validation
        // RSUM against a test RSUM).
        if r.record.results.get("split") != base.get("split") {
            return None;
        }
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
        print_json(&doc);
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
    for line in cusa_stages::seeds::align(&table) {
        println!("{line}");
    }
    if rows.iter().any(|r| r.state == "stale") {
        println!(
            "* measured with an older configuration of the stage; `cusa-pipe run` measures the current one"
        );
    }
    Ok(0)
}

/// One table per matrix stage (and one for the other measured stages): its elements grouped
/// over `axis`, compared with its baseline group seed by seed.
fn over_seeds(
    args: &MetricsArgs,
    engine: &crate::runner::Engine,
    rows: &[Row],
    axis: &str,
) -> Result<i32, CliError> {
    use cusa_stages::seeds;
    struct Table {
        stage: String,
        groups: Vec<String>,
        runs: Vec<seeds::Run>,
        /// Numeric columns in the order the stage kind gives them.
        columns: Vec<String>,
        stale: bool,
    }
    let element = |name: &str| {
        engine
            .pipeline
            .stages
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.element.clone())
    };
    let mut tables: Vec<Table> = Vec::new();
    for r in rows {
        let (stage, group, seed) = match element(&r.stage) {
            Some(e) if e.label(axis).is_some() => {
                let rest = e.without(axis);
                let group = if rest.is_empty() {
                    e.stage.clone()
                } else {
                    format!("{}@{rest}", e.stage)
                };
                (
                    e.stage.clone(),
                    group,
                    e.label(axis).unwrap_or_default().to_string(),
                )
            }
            // Not repeated over the axis: a group of one, in the table of the other stages.
            _ => (String::new(), r.stage.clone(), String::new()),
        };
        let numbers: Vec<(&String, f64)> = r
            .record
            .results
            .iter()
            .filter(|(k, _)| args.columns.is_empty() || args.columns.contains(k))
            .filter_map(|(k, v)| Some((k, v.as_f64()?)))
            .collect();
        if numbers.is_empty() {
            // None of the columns asked for (e.g. `--columns rsum` and a softlabel stage's
            // teacher signal): no table of empty rows.
            continue;
        }
        let t = match tables.iter_mut().position(|t| t.stage == stage) {
            Some(i) => &mut tables[i],
            None => {
                tables.push(Table {
                    stage: stage.clone(),
                    groups: Vec::new(),
                    runs: Vec::new(),
                    columns: Vec::new(),
                    stale: false,
                });
                tables.last_mut().expect("just pushed")
            }
        };
        for (k, _) in &numbers {
            if !t.columns.contains(k) {
                t.columns.push((*k).clone());
            }
        }
        let values: std::collections::BTreeMap<String, f64> =
            numbers.into_iter().map(|(k, v)| (k.clone(), v)).collect();
        if !t.groups.contains(&group) {
            t.groups.push(group.clone());
        }
        t.stale |= r.state == "stale";
        t.runs.push(seeds::Run {
            group,
            seed,
            values,
        });
    }
    // The matrix stages' tables first (the ablation), then the other measured stages'.
    tables.sort_by_key(|t| t.stage.is_empty());
    if let Some(b) = &args.baseline
        && !tables.iter().any(|t| t.groups.contains(b))
    {
        let all: Vec<&str> = tables
            .iter()
            .flat_map(|t| t.groups.iter().map(String::as_str))
            .collect();
        return Err(CliError::Usage(format!(
            "no measured group `{b}` over {axis}; groups: {}",
            all.join(", ")
        )));
    }
    let compared: Vec<(&Table, String, Vec<seeds::Row>)> = tables
        .iter()
        .map(|t| {
            let baseline = args
                .baseline
                .clone()
                .filter(|b| t.groups.contains(b))
                .unwrap_or_else(|| t.groups[0].clone());
            let rows = seeds::compare(&t.runs, &t.groups, &baseline, &t.columns);
            (t, baseline, rows)
        })
        .collect();
    if args.json {
        let stat = |s: &seeds::Summary| json!({"n": s.n, "mean": s.mean, "sd": s.sd});
        let doc = json!({
            "pipeline": engine.pipeline.file.display().to_string(),
            "over": axis,
            "tables": compared.iter().map(|(t, baseline, rows)| json!({
                "stage": t.stage,
                "baseline": baseline,
                "columns": t.columns,
                "level": seeds::LEVEL,
                "rows": rows.iter().map(|r| json!({
                    "group": r.group,
                    "seeds": r.seeds,
                    "stats": t.columns.iter().zip(&r.columns)
                        .filter_map(|(c, s)| Some((c.clone(), stat(s.as_ref()?))))
                        .collect::<Map<String, Value>>(),
                    "delta": (r.group != *baseline).then(|| t.columns.iter().zip(&r.deltas)
                        .filter_map(|(c, d)| {
                            let d = d.as_ref()?;
                            Some((c.clone(), json!({
                                "n": d.diff.n,
                                "mean": d.diff.mean,
                                "sd": d.diff.sd,
                                "ci": d.ci.map(|(lo, hi)| [lo, hi]),
                                "excludes_zero": d.excludes_zero(),
                            })))
                        })
                        .collect::<Map<String, Value>>()),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        print_json(&doc);
        return Ok(0);
    }
    for (k, (t, baseline, rows)) in compared.iter().enumerate() {
        if k > 0 {
            println!();
        }
        let first = if t.stage.is_empty() {
            "stage".to_string()
        } else {
            format!("{} over {axis}", t.stage)
        };
        let cols = &t.columns;
        // Rows named by their labels alone: the stage is the table's title.
        let rows: Vec<seeds::Row> = rows
            .iter()
            .map(|r| seeds::Row {
                group: r
                    .group
                    .strip_prefix(&format!("{}@", t.stage))
                    .unwrap_or(&r.group)
                    .to_string(),
                ..r.clone()
            })
            .collect();
        let base = baseline
            .strip_prefix(&format!("{}@", t.stage))
            .unwrap_or(baseline);
        let mut lines = seeds::render(&rows, cols, base, &first);
        if t.stage.is_empty() || rows.len() < 2 {
            lines.pop();
        }
        for l in lines {
            println!("{l}");
        }
        if t.stale {
            println!(
                "(some runs were measured with an older configuration; `cusa-pipe run` measures the current one)"
            );
        }
    }
    Ok(0)
}
