//! The export's `report.html`: one page that needs nothing but a browser — no script, no
//! network. Curves are SVG drawn by `plotters`, thumbnails are PNG data URLs; everything the
//! page shows comes from the runs' own records (config.json, log.jsonl, metrics.json) and the
//! chosen run's embeddings, so the page and the numbers in the cache cannot disagree.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use plotters::prelude::*;
use serde_json::Value;

use super::Run;
use crate::api::StageError;
use crate::dataset::read;
use crate::features;
use crate::seeds;

pub(crate) struct Inputs<'a> {
    pub title: &'a str,
    pub runs: &'a [Run],
    pub chosen: usize,
    pub baseline: usize,
    pub dataset: &'a Path,
    pub images_root: Option<PathBuf>,
    pub examples: usize,
}

/// Tableau 10: distinguishable, and the same colour for a run in every chart.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

type Series = (String, Vec<(f64, f64)>);

/// One line chart as an SVG element (epochs on x).
fn line_chart(
    title: &str,
    y_label: &str,
    series: &[Series],
    legend: SeriesLabelPosition,
) -> Result<String, StageError> {
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        if y.is_finite() {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
    }
    if x0 > x1 {
        return Ok(String::new());
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let mut svg = String::new();
    let fail = |e: &dyn std::fmt::Display| StageError::failed(format!("drawing `{title}`: {e}"));
    {
        let root = SVGBackend::with_string(&mut svg, (480, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(y_label)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| fail(&e))?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    pts.iter().copied().filter(|p| p.1.is_finite()),
                    color.stroke_width(2),
                ))
                .map_err(|e| fail(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(legend)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .draw()
            .map_err(|e| fail(&e))?;
        root.present().map_err(|e| fail(&e))?;
    }
    Ok(svg)
}

/// `(epoch, value)` of one key of a run's log (`val.rsum` reaches into objects).
fn curve(run: &Run, key: &str) -> Vec<(f64, f64)> {
    run.log
        .iter()
        .filter_map(|e| {
            let v = key.split('.').fold(e, |v, k| &v[k]);
            Some((e["epoch"].as_f64()?, v.as_f64()?))
        })
        .collect()
}

/// How a loss term is named on the report's curves.
fn term_label(name: &str) -> String {
    match name {
        "base" => "base".into(),
        "selfalign" => "SelfAlign".into(),
        other => other.to_uppercase(),
    }
}

fn number(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// Over seeds (when the runs have them): per name mean ± sd and n, under it the paired
/// difference to the baseline seed by seed with its 95 % interval — `cusa-pipe metrics`'s table.
fn seed_table(i: &Inputs<'_>, html: &mut String) {
    let Some((rows, columns)) = super::seed_table(i.runs, i.baseline, &super::SEED_COLUMNS) else {
        return;
    };
    let base = &i.runs[i.baseline].group;
    let _ = write!(
        html,
        "<h2>Over seeds</h2>\n<p class=\"note\">Mean ± sample standard deviation over the seeds (n); under each, the mean paired difference to <b>{}</b> \
         seed by seed with its 95 % confidence interval (Student t); <b>*</b>: the interval excludes 0.</p>\n<table class=\"metrics\"><tr><th>run</th><th>n</th>",
        esc(base)
    );
    for c in &columns {
        let _ = write!(html, "<th>{}</th>", esc(c));
    }
    html.push_str("</tr>\n");
    for r in &rows {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td>",
            esc(&r.group),
            r.seeds.len()
        );
        for (c, d) in r.columns.iter().zip(&r.deltas) {
            let value = c
                .as_ref()
                .map(seeds::show_summary)
                .unwrap_or_else(|| "–".into());
            let delta = match d {
                Some(p) => {
                    let class = match p.diff.mean {
                        m if m > 0.0 => "up",
                        m if m < 0.0 => "down",
                        _ => "",
                    };
                    format!(
                        "<span class=\"{class}\">{}</span>",
                        esc(&seeds::show_paired(p))
                    )
                }
                None => String::new(),
            };
            let _ = write!(html, "<td>{}{delta}</td>", esc(&value));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
}

/// One name's point of the teacher-signal chart: its soft labels' AUCs and its difference to
/// the baseline.
struct SignalPoint {
    group: String,
    i2t_auc: f64,
    t2i_auc: f64,
    /// Per column (`RSUM`, `mAP@R t2i`): mean difference to the baseline over the paired seeds,
    /// its sample sd and 95 % interval, and how many seeds.
    deltas: Vec<(String, Option<seeds::Paired>)>,
}

/// Every name whose runs trained on soft labels with a measured teacher signal, with its
/// differences to the baseline (seed by seed when the runs have seeds, else run against run).
fn signal_groups(runs: &[Run], baseline: usize) -> Vec<SignalPoint> {
    let columns: [(&str, &[&str]); 2] = [
        ("RSUM", &["rsum"]),
        ("mAP@R t2i", &["extended", "t2i", "mAP@R"]),
    ];
    let table = super::seed_table(runs, baseline, &columns);
    let mut out = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for r in runs {
        let Some(signal) = &r.signal else { continue };
        if seen.contains(&r.group.as_str()) {
            continue;
        }
        seen.push(&r.group);
        let (Some(i2t), Some(t2i)) = (signal["i2t"]["auc"].as_f64(), signal["t2i"]["auc"].as_f64())
        else {
            continue;
        };
        let deltas = match &table {
            Some((rows, names)) => {
                let row = rows.iter().find(|x| x.group == r.group);
                names
                    .iter()
                    .enumerate()
                    .map(|(k, n)| (n.clone(), row.and_then(|x| x.deltas[k])))
                    .collect()
            }
            None => columns
                .iter()
                .map(|(n, path)| {
                    let get = |run: &Run| path.iter().fold(&run.test, |v, k| &v[*k]).as_f64();
                    let d = get(r)
                        .zip(get(&runs[baseline]))
                        .map(|(a, b)| seeds::Paired {
                            diff: seeds::summary(&[a - b]),
                            ci: None,
                        });
                    (n.to_string(), d)
                })
                .collect(),
        };
        out.push(SignalPoint {
            group: r.group.clone(),
            i2t_auc: i2t,
            t2i_auc: t2i,
            deltas,
        });
    }
    out
}

/// The teacher-signal points as JSON (export.json's `against_teacher_signal`).
pub(crate) fn signal_points(runs: &[Run], baseline: usize) -> Vec<Value> {
    signal_groups(runs, baseline)
        .into_iter()
        .map(|p| {
            let deltas: serde_json::Map<String, Value> = p
                .deltas
                .iter()
                .map(|(n, d)| {
                    (
                        n.clone(),
                        match d {
                            Some(d) => serde_json::json!({
                                "mean": d.diff.mean,
                                "sd": d.diff.sd,
                                "n": d.diff.n,
                                "ci95": d.ci.map(|(a, b)| vec![a, b]),
                            }),
                            None => Value::Null,
                        },
                    )
                })
                .collect();
            serde_json::json!({
                "name": p.group,
                "i2t_auc": p.i2t_auc,
                "t2i_auc": p.t2i_auc,
                "mean_auc": 0.5 * (p.i2t_auc + p.t2i_auc),
                "delta": deltas,
            })
        })
        .collect()
}

/// A scatter of (x, mean ± sd) points with their labels, as an SVG element.
fn error_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(String, f64, f64, f64)],
) -> Result<String, StageError> {
    if points.is_empty() {
        return Ok(String::new());
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, 0.0f64, 0.0f64);
    for (_, x, m, sd) in points {
        (x0, x1) = (x0.min(*x), x1.max(*x));
        (y0, y1) = (y0.min(m - sd), y1.max(m + sd));
    }
    let xpad = ((x1 - x0) * 0.1).max(0.01);
    let ypad = ((y1 - y0) * 0.1).max(0.1);
    let mut svg = String::new();
    let fail = |e: &dyn std::fmt::Display| StageError::failed(format!("drawing `{title}`: {e}"));
    {
        let root = SVGBackend::with_string(&mut svg, (480, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(56)
            .build_cartesian_2d((x0 - xpad)..(x1 + xpad), (y0 - ypad)..(y1 + ypad))
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .x_label_formatter(&|x| format!("{x:.2}"))
            .y_desc(y_label)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| fail(&e))?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x0 - xpad, 0.0), (x1 + xpad, 0.0)],
                RGBColor(160, 160, 160).stroke_width(1),
            )))
            .map_err(|e| fail(&e))?;
        let color = COLORS[0];
        chart
            .draw_series(points.iter().map(|(_, x, m, sd)| {
                ErrorBar::new_vertical(*x, m - sd, *m, m + sd, color.filled(), 8)
            }))
            .map_err(|e| fail(&e))?;
        chart
            .draw_series(points.iter().map(|(name, x, m, _)| {
                Text::new(name.clone(), (*x, *m), ("sans-serif", 12).into_font())
            }))
            .map_err(|e| fail(&e))?;
        root.present().map_err(|e| fail(&e))?;
    }
    Ok(svg)
}

/// What the teachers behind each run's soft labels knew (the softlabel stage's diagnostics),
/// and — when the runs span more than one signal — each name's difference to the baseline
/// against the teachers' AUC.
fn signal_section(i: &Inputs<'_>, html: &mut String) -> Result<(), StageError> {
    let shown: Vec<&Run> = {
        let mut seen: Vec<&str> = Vec::new();
        i.runs
            .iter()
            .filter(|r| r.signal.is_some())
            .filter(|r| {
                let new = !seen.contains(&r.group.as_str());
                seen.push(&r.group);
                new
            })
            .collect()
    };
    if shown.is_empty() {
        return Ok(());
    }
    let first = shown[0].signal.as_ref().expect("filtered");
    let _ = write!(
        html,
        "<h2>Teacher signal</h2>\n<p class=\"note\">What the soft labels know about the one-hot target's false negatives, measured on the training split's exact positives \
         over {} batches of {} at τ_s {} (the softlabel stage's diagnostics): ROC AUC of the teacher similarity for true positives vs negatives (0.5: no signal), \
         the soft labels' mass on true positives against a uniform row's, their mass on the row's own image (all of it in the one-hot target), and precision@{} of the teacher's nearest neighbours against random.</p>\n\
         <table class=\"metrics\"><tr><th>run</th><th>i2t AUC</th><th>i2t mass (uniform)</th><th>i2t own</th><th>i2t P@k (random)</th><th>t2i AUC</th><th>t2i mass (uniform)</th><th>t2i own</th><th>t2i P@k (random)</th></tr>\n",
        first["batches"], first["batch_size"], first["temperature"], first["k"]
    );
    for r in &shown {
        let s = r.signal.as_ref().expect("filtered");
        let f = |d: &str, k: &str| s[d][k].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{:.3}</td><td>{:.4} ({:.4})</td><td>{:.3}</td><td>{:.3} ({:.3})</td><td>{:.3}</td><td>{:.4} ({:.4})</td><td>{:.3}</td><td>{:.3} ({:.3})</td></tr>",
            esc(&r.group),
            f("i2t", "auc"),
            f("i2t", "mass_on_positives"),
            f("i2t", "mass_uniform"),
            f("i2t", "mass_on_own"),
            f("i2t", "precision_at_k"),
            f("i2t", "precision_random"),
            f("t2i", "auc"),
            f("t2i", "mass_on_positives"),
            f("t2i", "mass_uniform"),
            f("t2i", "mass_on_own"),
            f("t2i", "precision_at_k"),
            f("t2i", "precision_random"),
        );
    }
    html.push_str("</table>\n");
    let points = signal_groups(i.runs, i.baseline);
    if points.len() < 2 {
        return Ok(());
    }
    let base = &i.runs[i.baseline].group;
    let _ = writeln!(
        html,
        "<p class=\"note\">Each name's mean difference to <b>{}</b> on the {} split (paired seed by seed; bars: ± the sample sd over seeds) against its teachers' AUC, the mean of i2t and t2i.</p>\n<div class=\"charts\">",
        esc(base),
        esc(i.runs[i.baseline].test["split"].as_str().unwrap_or("test"))
    );
    for (k, (column, label)) in [("RSUM", "Δ RSUM"), ("mAP@R t2i", "Δ t2i mAP@R")]
        .iter()
        .enumerate()
    {
        let pts: Vec<(String, f64, f64, f64)> = points
            .iter()
            .filter_map(|p| {
                let d = p.deltas.get(k).and_then(|(_, d)| d.as_ref())?;
                Some((
                    p.group.clone(),
                    0.5 * (p.i2t_auc + p.t2i_auc),
                    d.diff.mean,
                    d.diff.sd.unwrap_or(0.0),
                ))
            })
            .collect();
        html.push_str(&error_chart(
            &format!("{label} vs {base}, by teacher AUC ({column})"),
            "teacher AUC (mean of i2t, t2i)",
            label,
            &pts,
        )?);
    }
    html.push_str("</div>\n");
    Ok(())
}

/// The metrics table: one row per run, the delta to the baseline under each value.
fn metrics_table(i: &Inputs<'_>, html: &mut String) {
    let columns: Vec<(&str, Vec<&str>)> = vec![
        ("i2t R@1", vec!["i2t", "R@1"]),
        ("i2t R@5", vec!["i2t", "R@5"]),
        ("i2t R@10", vec!["i2t", "R@10"]),
        ("t2i R@1", vec!["t2i", "R@1"]),
        ("t2i R@5", vec!["t2i", "R@5"]),
        ("t2i R@10", vec!["t2i", "R@10"]),
        ("RSUM", vec!["rsum"]),
        ("mAP@R i2t", vec!["extended", "i2t", "mAP@R"]),
        ("mAP@R t2i", vec!["extended", "t2i", "mAP@R"]),
        ("R-P i2t", vec!["extended", "i2t", "R-P"]),
        ("R-P t2i", vec!["extended", "t2i", "R-P"]),
    ];
    let get = |m: &Value, path: &[&str]| number(path.iter().fold(m, |v, k| &v[*k]));
    let shown: Vec<&(&str, Vec<&str>)> = columns
        .iter()
        .filter(|(_, p)| i.runs.iter().any(|r| get(&r.test, p).is_some()))
        .collect();
    let base = &i.runs[i.baseline];
    let split = i.runs[i.chosen].test["split"].as_str().unwrap_or("test");
    let _ = write!(
        html,
        "<h2>Metrics on the {} split</h2>\n<p class=\"note\">Percentages; the small figure under each value is the difference to <b>{}</b>. \
         The last column is the validation RSUM the choice was made on.</p>\n<table class=\"metrics\"><tr><th>run</th>",
        esc(split),
        esc(&base.name)
    );
    for (name, _) in &shown {
        let _ = write!(html, "<th>{}</th>", esc(name));
    }
    html.push_str("<th>val RSUM</th></tr>\n");
    for (k, r) in i.runs.iter().enumerate() {
        let class = if k == i.chosen {
            " class=\"chosen\""
        } else {
            ""
        };
        let _ = write!(
            html,
            "<tr{class}><td>{}{}</td>",
            esc(&r.name),
            if k == i.chosen { " ★" } else { "" }
        );
        for (_, path) in &shown {
            match get(&r.test, path) {
                Some(v) => {
                    let delta = get(&base.test, path)
                        .filter(|_| k != i.baseline)
                        .map(|b| v - b);
                    let d = match delta {
                        Some(d) if d > 0.0 => format!("<span class=\"up\">{d:+.1}</span>"),
                        Some(d) if d < 0.0 => format!("<span class=\"down\">{d:+.1}</span>"),
                        Some(d) => format!("<span>{d:+.1}</span>"),
                        None => String::new(),
                    };
                    let _ = write!(html, "<td>{v:.1}{d}</td>");
                }
                None => html.push_str("<td>–</td>"),
            }
        }
        let _ = writeln!(html, "<td>{:.1}</td></tr>", r.val_rsum);
    }
    html.push_str("</table>\n");
}

fn thumbnail(path: &Path) -> Option<String> {
    let img = image::open(path).ok()?.thumbnail(112, 112);
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .ok()?;
    Some(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    ))
}

/// Top-5 images of a few caption queries, for the chosen run and the baseline; ground truth
/// and extended positives marked.
fn examples(i: &Inputs<'_>, html: &mut String) -> Result<(), StageError> {
    let chosen = &i.runs[i.chosen];
    let split = chosen.test["split"].as_str().unwrap_or("test").to_string();
    let captions = read::captions(i.dataset, &split)?;
    let pictures: HashMap<String, String> = read::images(i.dataset, &split)?.into_iter().collect();
    let root = read::image_root(i.dataset, i.images_root.clone())?;
    let mut positives: HashMap<String, HashSet<String>> = HashMap::new();
    for [kind, query, positive] in read::positives(i.dataset)?.unwrap_or_default() {
        if kind == "caption" {
            positives.entry(query).or_default().insert(positive);
        }
    }
    if captions.is_empty() || i.examples == 0 {
        return Ok(());
    }
    let mut compared = vec![i.chosen];
    if i.baseline != i.chosen {
        compared.push(i.baseline);
    }
    let galleries: Vec<(features::Features, features::Features)> = compared
        .iter()
        .map(|&k| {
            let dir = &i.runs[k].eval_dir;
            Ok((
                features::read(&dir.join("image_embeddings.arrow"))?,
                features::read(&dir.join("caption_embeddings.arrow"))?,
            ))
        })
        .collect::<Result<_, StageError>>()?;
    let mut thumbs: HashMap<String, Option<String>> = HashMap::new();
    let _ = write!(
        html,
        "<h2>Example retrievals ({} split)</h2>\n<p class=\"note\">Top-5 images for caption queries. \
         <span class=\"gt\">green</span>: the caption's own image; <span class=\"ext\">amber</span>: another image the caption also describes (extended positive).</p>\n",
        esc(&split)
    );
    let n = i.examples.min(captions.len());
    for q in 0..n {
        let caption = &captions[q * captions.len() / n];
        let _ = write!(html, "<div class=\"query\"><p>“{}”</p>", esc(&caption.text));
        for (g, &k) in galleries.iter().zip(&compared) {
            let (images, texts) = g;
            let Some(row) = texts.ids.iter().position(|id| id == &caption.caption_id) else {
                continue;
            };
            let qv = texts.row(row);
            let mut scored: Vec<(f32, usize)> = (0..images.ids.len())
                .map(|j| (images.row(j).iter().zip(qv).map(|(a, b)| a * b).sum(), j))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let _ = write!(
                html,
                "<div class=\"row\"><span class=\"who\">{}</span>",
                esc(&i.runs[k].name)
            );
            for &(score, j) in scored.iter().take(5) {
                let id = &images.ids[j];
                let class = if id == &caption.image_id {
                    "gt"
                } else if positives
                    .get(&caption.caption_id)
                    .is_some_and(|p| p.contains(id))
                {
                    "ext"
                } else {
                    "miss"
                };
                let src = thumbs
                    .entry(id.clone())
                    .or_insert_with(|| pictures.get(id).and_then(|p| thumbnail(&root.join(p))))
                    .clone();
                match src {
                    Some(src) => {
                        let _ = write!(
                            html,
                            "<figure class=\"{class}\"><img src=\"{src}\" alt=\"{}\"><figcaption>{score:.2}</figcaption></figure>",
                            esc(id)
                        );
                    }
                    None => {
                        let _ = write!(
                            html,
                            "<figure class=\"{class}\"><div class=\"noimg\">{}</div><figcaption>{score:.2}</figcaption></figure>",
                            esc(id)
                        );
                    }
                }
            }
            html.push_str("</div>");
        }
        html.push_str("</div>\n");
    }
    Ok(())
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1040px;color:#222}\
h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}.note{color:#555;font-size:.9em}\
table.metrics{border-collapse:collapse;font-variant-numeric:tabular-nums}\
table.metrics th,table.metrics td{padding:.3em .6em;text-align:right;border-bottom:1px solid #eee}\
table.metrics td:first-child,table.metrics th:first-child{text-align:left}\
table.metrics td span{display:block;font-size:.75em;color:#777}table.metrics td span.up{color:#1a7f37}\
table.metrics td span.down{color:#c62828}tr.chosen{background:#f3f8ff;font-weight:600}\
.charts{display:flex;flex-wrap:wrap;gap:8px}.query{margin:1em 0}.query p{margin:.2em 0;font-style:italic}\
.row{display:flex;align-items:center;gap:6px;margin:4px 0}.who{width:4em;font-size:.85em;color:#555}\
figure{margin:0;border:4px solid #ddd;text-align:center}figure img{display:block;width:112px;height:112px;object-fit:cover}\
figure.gt{border-color:#2e7d32}figure.ext{border-color:#f9a825}figcaption{font-size:.75em;color:#555}\
.noimg{width:112px;height:112px;font-size:.7em;display:flex;align-items:center;justify-content:center}\
span.gt{color:#2e7d32;font-weight:600}span.ext{color:#b07b00;font-weight:600}pre{background:#f6f6f6;padding:1em;overflow:auto}";

pub(crate) fn render(i: &Inputs<'_>) -> Result<String, StageError> {
    let chosen = &i.runs[i.chosen];
    let base = &i.runs[i.baseline];
    let mut html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        esc(i.title),
        esc(i.title)
    );
    let test_rsum = chosen.test["rsum"].as_f64().unwrap_or(f64::NAN);
    let base_rsum = base.test["rsum"].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        html,
        "<p>Exported <b>{}</b>: the best validation RSUM of {} runs ({:.1}, epoch {} of {}). \
         On the {} split: RSUM {test_rsum:.1}, {:+.1} vs <b>{}</b>. The test split was not used for any choice.</p>",
        esc(&chosen.name),
        i.runs.len(),
        chosen.val_rsum,
        chosen.config["best_epoch"],
        chosen.config["epochs"],
        esc(chosen.test["split"].as_str().unwrap_or("test")),
        test_rsum - base_rsum,
        esc(&base.name),
    );
    seed_table(i, &mut html);
    metrics_table(i, &mut html);
    signal_section(i, &mut html)?;

    html.push_str("<h2>Training</h2>\n<div class=\"charts\">\n");
    let per_run = |key: &str| -> Vec<Series> {
        i.runs
            .iter()
            .map(|r| (r.name.clone(), curve(r, key)))
            .collect()
    };
    html.push_str(&line_chart(
        "Training loss (all terms)",
        "loss",
        &per_run("loss"),
        SeriesLabelPosition::UpperRight,
    )?);
    html.push_str(&line_chart(
        "Validation RSUM",
        "RSUM",
        &per_run("val.rsum"),
        SeriesLabelPosition::LowerRight,
    )?);
    // Every term the run logged (`loss_<name>`, in the objective's order), by name.
    let terms: Vec<Series> = chosen
        .log
        .first()
        .and_then(Value::as_object)
        .map(|first| {
            first
                .keys()
                .filter_map(|k| k.strip_prefix("loss_").map(|n| (n, k)))
                .map(|(n, k)| (term_label(n), curve(chosen, k)))
                .filter(|(_, p)| !p.is_empty())
                .collect()
        })
        .unwrap_or_default();
    html.push_str(&line_chart(
        &format!("Loss terms of {}", chosen.name),
        "loss",
        &terms,
        SeriesLabelPosition::UpperRight,
    )?);
    let temps: Vec<Series> = [
        ("τ", "tau"),
        ("τ_c", "tau_c"),
        ("τ_ui", "tau_ui"),
        ("τ_ut", "tau_ut"),
    ]
    .iter()
    .map(|(n, k)| (n.to_string(), curve(chosen, k)))
    .filter(|(_, p)| !p.is_empty())
    .collect();
    html.push_str(&line_chart(
        &format!("Temperatures of {}", chosen.name),
        "temperature",
        &temps,
        SeriesLabelPosition::MiddleRight,
    )?);
    html.push_str("</div>\n");

    examples(i, &mut html)?;

    let _ = write!(
        html,
        "<h2>Configuration of {}</h2>\n<pre>{}</pre>\n</body></html>\n",
        esc(&chosen.name),
        esc(&serde_json::to_string_pretty(&chosen.config).unwrap_or_default())
    );
    Ok(html)
}
