//! `softlabel`: the teachers' vectors joined to a training split, ready for CSA/USA.
//!
//! The reference code trains on zero image features when its feature file fails to load
//! (uniform soft labels, silently). Here coverage is a precondition: every caption of the split
//! and every image it points to must have a teacher vector, or the stage fails naming the
//! missing ids. Vectors are L2-normalised once here (the soft labels are cosine softmaxes).
//!
//! Output tree:
//! * `captions.arrow` — one row per caption of the split in caption-id order (the training
//!   order): `id`, `image_id`, `embedding` (text teacher, unit length);
//! * `images.arrow` — one row per image of the split in image-id order: `id`, `embedding`;
//! * with `neighbours: k`, `image_neighbours.arrow` / `caption_neighbours.arrow`: each item's k
//!   nearest other items by teacher cosine (exact, blocked matrix products), as row indices
//!   into the files above plus the cosines;
//! * `report.json` — counts, dimensions, teacher metadata, soft-label statistics, and — when
//!   the dataset knows the split's true positives (the scenes: every split) — the teachers'
//!   false-negative signal ([`signal`]): AUC, soft-label mass on true positives vs uniform and
//!   neighbour precision per direction, also a note, and in the run record's results (in
//!   percent: the `cusa-pipe metrics` columns `i2t teacher AUC`, `i2t mass %`, …).

pub mod signal;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{Float32Array, UInt32Array};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{Checked, ConfigError, Kind, StageContext, StageError, StageSummary};
use crate::features::{self, Features};
use crate::teacher::Precision;

/// `with:` of a softlabel stage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SoftlabelConfig {
    /// A `dataset` stage's output folder.
    pub dataset: String,
    /// The image teacher's features.arrow (keyed by image id).
    pub image_features: String,
    /// The text teacher's features.arrow (keyed by caption id).
    pub text_features: String,
    /// The split to train on [default: train].
    #[serde(default = "default_split")]
    pub split: String,
    /// Also write each item's k nearest teacher neighbours.
    pub neighbours: Option<usize>,
    /// How the teachers' false-negative signal is measured (when the split has positives).
    #[serde(default)]
    pub signal: SignalConfig,
}

/// `signal:` of a softlabel stage: the batches and τ_s the diagnostics imitate.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SignalConfig {
    /// The training batch size [default: 128].
    #[serde(default = "default_signal_batch")]
    pub batch_size: usize,
    /// How many batches are drawn [default: 200].
    #[serde(default = "default_signal_batches")]
    pub batches: usize,
    /// τ_s of the soft labels [default: 1.0, CUSA's].
    #[serde(default = "default_signal_temperature")]
    pub temperature: f64,
    /// Neighbours for precision@k [default: 10].
    #[serde(default = "default_signal_k")]
    pub k: usize,
}

fn default_signal_batch() -> usize {
    128
}
fn default_signal_batches() -> usize {
    200
}
fn default_signal_temperature() -> f64 {
    1.0
}
fn default_signal_k() -> usize {
    10
}

impl Default for SignalConfig {
    fn default() -> Self {
        SignalConfig {
            batch_size: default_signal_batch(),
            batches: default_signal_batches(),
            temperature: default_signal_temperature(),
            k: default_signal_k(),
        }
    }
}

fn default_split() -> String {
    "train".into()
}

pub struct SoftlabelKind;

impl Kind for SoftlabelKind {
    type Config = SoftlabelConfig;
    const NAME: &'static str = "softlabel";
    // 2: report.json carries the teacher signal; its teacher metadata sorted.
    // 3: the teacher signal in the run record's results (`cusa-pipe metrics`); the output
    //    tree is unchanged, so the stages downstream stay fresh.
    // 4: the signal splits the mass into own image / true positives / negatives, at τ_s and
    //    at a sweep of temperatures (report.json changes: the stages downstream rerun, to the
    //    same results).
    const VERSION: u32 = 4;

    fn validate(c: &mut SoftlabelConfig, _declared: &[String]) -> Result<Checked, ConfigError> {
        if c.neighbours == Some(0) {
            return Err(ConfigError::new("neighbours", "must be at least 1"));
        }
        for (key, bad) in [
            ("signal.batch_size", c.signal.batch_size < 2),
            ("signal.batches", c.signal.batches == 0),
            ("signal.k", c.signal.k == 0),
        ] {
            if bad {
                return Err(ConfigError::new(
                    key,
                    if key == "signal.batch_size" {
                        "must be at least 2"
                    } else {
                        "must be at least 1"
                    },
                ));
            }
        }
        if !(c.signal.temperature.is_finite() && c.signal.temperature > 0.0) {
            return Err(ConfigError::new("signal.temperature", "must be positive"));
        }
        Ok(Checked::default())
    }

    fn run(&self, c: SoftlabelConfig, ctx: &StageContext<'_>) -> Result<StageSummary, StageError> {
        let dataset = ctx.resolve(&c.dataset);
        let captions = crate::dataset::read::captions(&dataset, &c.split)?;
        if captions.is_empty() {
            return Err(StageError::failed_with_hint(
                format!(
                    "split `{}` of {} has no captions",
                    c.split,
                    dataset.display()
                ),
                "name a split the dataset has (`split:`)",
            ));
        }
        let images = crate::dataset::read::images(&dataset, &c.split)?;
        let image_teacher = features::read(&ctx.resolve(&c.image_features))?;
        let text_teacher = features::read(&ctx.resolve(&c.text_features))?;
        ctx.log.line(format!(
            "split `{}`: {} captions of {} images; image teacher {}-d ({} rows), text teacher {}-d ({} rows)",
            c.split,
            captions.len(),
            images.len(),
            image_teacher.dim,
            image_teacher.ids.len(),
            text_teacher.dim,
            text_teacher.ids.len()
        ));

        let image_ids: Vec<&str> = images.iter().map(|(id, _)| id.as_str()).collect();
        let caption_ids: Vec<&str> = captions.iter().map(|r| r.caption_id.as_str()).collect();
        let image_rows = covered(&image_teacher, &image_ids, "image", &c.image_features)?;
        let caption_rows = covered(&text_teacher, &caption_ids, "caption", &c.text_features)?;
        let image_index: HashMap<&str, u32> = image_ids
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, i as u32))
            .collect();
        let mut caption_image = Vec::with_capacity(captions.len());
        for r in &captions {
            let Some(&row) = image_index.get(r.image_id.as_str()) else {
                return Err(StageError::failed(format!(
                    "caption `{}` points to image `{}`, which is not in split `{}`",
                    r.caption_id, r.image_id, c.split
                )));
            };
            caption_image.push(row);
        }

        let image_vectors = gather_normalized(&image_teacher, &image_rows);
        let caption_vectors = gather_normalized(&text_teacher, &caption_rows);
        let (di, dt) = (image_teacher.dim, text_teacher.dim);
        let out = ctx.out_dir;
        features::write(
            &out.join("images.arrow"),
            &image_ids,
            Vec::new(),
            &image_vectors,
            di,
            Precision::F32,
            provenance(&image_teacher.metadata),
        )?;
        let caption_image_ids: Vec<&str> = captions.iter().map(|r| r.image_id.as_str()).collect();
        features::write(
            &out.join("captions.arrow"),
            &caption_ids,
            vec![("image_id", &caption_image_ids)],
            &caption_vectors,
            dt,
            Precision::F32,
            provenance(&text_teacher.metadata),
        )?;

        let mut summary = StageSummary::default();
        if let Some(k) = c.neighbours {
            let started = std::time::Instant::now();
            let img_nn = nearest(&image_vectors, di, k, ctx)?;
            let cap_nn = nearest(&caption_vectors, dt, k, ctx)?;
            write_neighbours(&out.join("image_neighbours.arrow"), &img_nn)?;
            write_neighbours(&out.join("caption_neighbours.arrow"), &cap_nn)?;
            ctx.log.line(format!(
                "{k} nearest teacher neighbours of {} images and {} captions in {:.2}s",
                image_ids.len(),
                caption_ids.len(),
                started.elapsed().as_secs_f64()
            ));
        }

        // How much the teachers see beyond the paired caption: the mean cosine between a
        // caption's text-teacher vector and those of the other captions of its image, and of
        // other images' captions.
        let stats = teacher_statistics(&caption_vectors, dt, &caption_image);
        let signal = teacher_signal(
            &dataset,
            &c,
            &image_ids,
            &caption_ids,
            &caption_image,
            (&image_vectors, di),
            (&caption_vectors, dt),
            ctx,
        )?;
        let report = json!({
            "split": c.split,
            "captions": captions.len(),
            "images": images.len(),
            "image_dim": di,
            "text_dim": dt,
            // Sorted: a HashMap's order is random per process, and JSON keeps key order.
            "image_teacher": image_teacher.metadata.iter().collect::<std::collections::BTreeMap<_, _>>(),
            "text_teacher": text_teacher.metadata.iter().collect::<std::collections::BTreeMap<_, _>>(),
            "text_teacher_mean_cosine": stats,
            "neighbours": c.neighbours,
            "teacher_signal": signal,
        });
        std::fs::write(
            out.join("report.json"),
            crate::api::json_text(&report, "report.json")?,
        )
        .map_err(|e| StageError::io("writing report.json", e))?;
        summary.notes.push(format!(
            "{} captions of {} images (split `{}`): {di}-d image and {dt}-d text soft-label vectors",
            captions.len(),
            images.len(),
            c.split
        ));
        summary
            .metrics
            .insert("captions".into(), Value::from(captions.len()));
        summary
            .metrics
            .insert("images".into(), Value::from(images.len()));
        if let Some(s) = &signal {
            let (i, t) = (&s.i2t, &s.t2i);
            summary.notes.push(format!(
                "teacher signal on true positives (batches of {}, τ_s {}): i2t AUC {:.3}, soft-label mass {:.4} vs uniform {:.4}, P@{} {:.3} vs random {:.3}; t2i AUC {:.3}, mass {:.4} vs {:.4}, P@{} {:.3} vs {:.3}",
                s.batch_size, s.temperature,
                i.auc, i.mass_on_positives, i.mass_uniform, s.k, i.precision_at_k, i.precision_random,
                t.auc, t.mass_on_positives, t.mass_uniform, s.k, t.precision_at_k, t.precision_random,
            ));
            // Where the mass goes as τ_s sharpens: own pair / true positives, per direction.
            let sweep = |d: &signal::Direction| {
                d.by_temperature
                    .iter()
                    .map(|m| format!("{} {:.3}/{:.3}", m.temperature, m.own, m.positives))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            summary.notes.push(format!(
                "soft-label mass on the own image / on true positives by τ_s: i2t {}; t2i {} (uniform {:.3} on true positives)",
                sweep(i),
                sweep(t),
                i.mass_uniform
            ));
            for (name, d) in [("i2t", i), ("t2i", t)] {
                summary
                    .metrics
                    .insert(format!("teacher_signal_{name}_auc"), json!(d.auc));
            }
            // `metrics`' columns, in percent like the retrieval figures (one decimal there;
            // report.json keeps every digit).
            let results = &mut summary.results;
            results.insert("split".into(), json!(c.split));
            for (name, d) in [("i2t", i), ("t2i", t)] {
                let percent = |x: f64| json!(100.0 * x);
                results.insert(format!("{name} teacher AUC"), percent(d.auc));
                results.insert(format!("{name} mass %"), percent(d.mass_on_positives));
                results.insert(format!("{name} uniform %"), percent(d.mass_uniform));
                results.insert(format!("{name} own %"), percent(d.mass_on_own));
                results.insert(format!("{name} P@{}", s.k), percent(d.precision_at_k));
            }
        }
        Ok(summary)
    }
}

/// The teachers' false-negative signal on the split ([`signal`]), when the dataset knows its
/// true positives; `None` (and a log line) otherwise.
#[allow(clippy::too_many_arguments)]
fn teacher_signal(
    dataset: &Path,
    c: &SoftlabelConfig,
    image_ids: &[&str],
    caption_ids: &[&str],
    caption_image: &[u32],
    (images, di): (&[f32], usize),
    (captions, dt): (&[f32], usize),
    ctx: &StageContext<'_>,
) -> Result<Option<signal::Signal>, StageError> {
    let Some(rows) = crate::dataset::read::positives(dataset)? else {
        ctx.log
            .line("the dataset has no extended positives: teacher signal not measured");
        return Ok(None);
    };
    let image_row: HashMap<&str, u32> = image_ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as u32))
        .collect();
    let caption_row: HashMap<&str, u32> = caption_ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as u32))
        .collect();
    let mut positives = std::collections::HashSet::new();
    for [kind, query, positive] in &rows {
        let (caption, image) = match kind.as_str() {
            "caption" => (query.as_str(), positive.as_str()),
            _ => (positive.as_str(), query.as_str()),
        };
        if let (Some(&c), Some(&i)) = (caption_row.get(caption), image_row.get(image))
            && caption_image[c as usize] != i
        {
            positives.insert((c, i));
        }
    }
    if positives.is_empty() {
        ctx.log.line(format!(
            "no extended positives within split `{}`: teacher signal not measured",
            c.split
        ));
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let batches = signal::batches(
        caption_ids.len(),
        c.signal.batch_size,
        c.signal.batches,
        0x5EED,
    );
    let inputs = signal::Inputs {
        images,
        dim_i: di,
        captions,
        dim_t: dt,
        caption_image,
        positives: &positives,
    };
    let s = signal::measure(&inputs, &batches, c.signal.temperature, c.signal.k);
    ctx.log.line(format!(
        "teacher signal over {} batches of {} ({} extended positive pairs) in {:.2}s",
        batches.len(),
        s.batch_size,
        positives.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(Some(s))
}

/// Row of each id in `teacher`, or an error naming the ids without a vector.
fn covered(
    teacher: &Features,
    ids: &[&str],
    what: &str,
    file: &str,
) -> Result<Vec<usize>, StageError> {
    let index = teacher.index();
    let mut rows = Vec::with_capacity(ids.len());
    let mut missing = Vec::new();
    for id in ids {
        match index.get(id) {
            Some(&r) => rows.push(r),
            None => missing.push(*id),
        }
    }
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(5).copied().collect();
        return Err(StageError::failed_with_hint(
            format!(
                "{} of {} {what}s have no teacher vector in {file} (first: {})",
                missing.len(),
                ids.len(),
                shown.join(", ")
            ),
            "run the teacher on this dataset with `split: all` or the training split; soft labels are never filled with zeros",
        ));
    }
    Ok(rows)
}

/// The rows of `f`, each scaled to unit length.
fn gather_normalized(f: &Features, rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * f.dim);
    for &r in rows {
        let v = f.row(r);
        let norm = v
            .iter()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        out.extend(v.iter().map(|x| (*x as f64 / norm) as f32));
    }
    out
}

/// Metadata of a soft-label table: the teacher's, prefixed, and that rows are unit length.
fn provenance(teacher_meta: &HashMap<String, String>) -> HashMap<String, String> {
    let mut meta: HashMap<String, String> = teacher_meta
        .iter()
        .map(|(k, v)| (format!("teacher.{k}"), v.clone()))
        .collect();
    meta.insert("normalized".into(), "true".into());
    meta
}

/// One item's nearest neighbours: row indices and cosines, most similar first.
pub type Neighbours = (Vec<u32>, Vec<f32>);

/// For each row of the unit vectors `x` (n × d), the `k` most similar other rows (ties broken
/// by the lower index), exact: blocks of 256 queries against all rows, in parallel.
pub fn nearest(
    x: &[f32],
    d: usize,
    k: usize,
    ctx: &StageContext<'_>,
) -> Result<Vec<Neighbours>, StageError> {
    let n = x.len() / d;
    let k = k.min(n.saturating_sub(1));
    let mut out = Vec::with_capacity(n);
    for block in (0..n).collect::<Vec<_>>().chunks(256) {
        if ctx.cancel.is_cancelled() {
            return Err(StageError::Cancelled);
        }
        let rows: Vec<Neighbours> = block
            .par_iter()
            .map(|&q| {
                let qv = &x[q * d..(q + 1) * d];
                let mut sims: Vec<(f32, u32)> = (0..n)
                    .filter(|&j| j != q)
                    .map(|j| {
                        let s: f32 = qv
                            .iter()
                            .zip(&x[j * d..(j + 1) * d])
                            .map(|(a, b)| a * b)
                            .sum();
                        (s, j as u32)
                    })
                    .collect();
                let cmp = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
                if k < sims.len() {
                    sims.select_nth_unstable_by(k, cmp);
                    sims.truncate(k);
                }
                sims.sort_by(cmp);
                sims.into_iter().map(|(s, j)| (j, s)).unzip()
            })
            .collect();
        out.extend(rows);
    }
    Ok(out)
}

fn write_neighbours(path: &Path, rows: &[Neighbours]) -> Result<(), StageError> {
    let k = rows.first().map_or(0, |r| r.0.len());
    let err = |e: String| StageError::failed(format!("writing {}: {e}", path.display()));
    let indices = features::fixed_rows(
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().flat_map(|r| r.0.iter().copied()),
        )),
        k,
    )
    .map_err(err)?;
    let cosines = features::fixed_rows(
        Arc::new(Float32Array::from_iter_values(
            rows.iter().flat_map(|r| r.1.iter().copied()),
        )),
        k,
    )
    .map_err(err)?;
    features::write_ipc(
        path,
        vec![
            ("neighbours", Arc::new(indices)),
            ("cosine", Arc::new(cosines)),
        ],
        HashMap::new(),
    )
}

/// Mean text-teacher cosine between captions of the same image (every pair) and of different
/// images (a fixed sample of at most 200,000 pairs, so COCO-sized splits stay fast).
fn teacher_statistics(x: &[f32], d: usize, image_of: &[u32]) -> Value {
    let n = image_of.len();
    let dot = |i: usize, j: usize| -> f64 {
        x[i * d..(i + 1) * d]
            .iter()
            .zip(&x[j * d..(j + 1) * d])
            .map(|(a, b)| a * b)
            .sum::<f32>() as f64
    };
    // Ordered by image: the f64 sum below must add in the same order in every process (a
    // HashMap's order is random per process, which changed the report's last digits).
    let mut by_image: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, img) in image_of.iter().enumerate() {
        by_image.entry(*img).or_default().push(i);
    }
    let (mut same, mut same_n) = (0.0, 0u64);
    for rows in by_image.values() {
        for (a, &i) in rows.iter().enumerate() {
            for &j in &rows[a + 1..] {
                same += dot(i, j);
                same_n += 1;
            }
        }
    }
    let (mut other, mut other_n) = (0.0, 0u64);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..200_000.min(n * n) {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let (i, j) = ((state >> 33) as usize % n, (state >> 11) as usize % n);
        if image_of[i] != image_of[j] {
            other += dot(i, j);
            other_n += 1;
        }
    }
    let mean = |s: f64, k: u64| {
        if k > 0 {
            Value::from(s / k as f64)
        } else {
            Value::Null
        }
    };
    json!({"same_image": mean(same, same_n), "other_images": mean(other, other_n)})
}
