//! `eval`: the retrieval metrics of the paper on one split, from a trained student or from
//! precomputed embeddings.
//!
//! The reference code needs hand-edited scripts to get its tables and picks its checkpoint on
//! the test set. Here the student is whatever its `train` stage chose on validation, and this
//! stage only measures it: cross-modal R@1/5/10 both ways and RSUM (i2t: the best rank over an
//! image's captions), optionally the mean over `folds` contiguous folds of the images (COCO 1K
//! with 5 folds of the 5K test split), and, when the dataset has extended positives (ECCV
//! Caption on COCO, the exact positives of the scenes dataset), mAP@R, R-Precision and R@1 per
//! direction as ECCV Caption defines them; when the dataset's images carry class labels
//! (`label` column), uni-modal image retrieval R@1 (query excluded) through the student's uni
//! image head, or through the embeddings given when there is none; with `sts:`, semantic
//! textual similarity (Spearman × 100 of the uni text head's cosine against gold scores, as
//! SentEval reports STS-B / SICK-R) for students that read text.
//!
//! Invariants:
//! * every image and caption of the split must have an embedding; a missing one is an error
//!   naming it, never a zero vector;
//! * embeddings are compared by cosine (rows are L2-normalised here);
//! * exact ties count against the query (a true item tied with a wrong one ranks after it), so
//!   a collapsed model scores zero, never chance;
//! * scores come from blocked matrix products (a bounded block of queries against the whole
//!   gallery at a time): memory grows with the gallery, never gallery × queries;
//! * a trained student embeds the split on the CPU (burn ndarray), from the same inputs it was
//!   trained on (features for `feature-heads`, pixels and `vocab.json` for `scenes-small`).
//!
//! Output tree: `metrics.json` (percentages, 0–100), `ranks.parquet` (per query: direction,
//! query id, 1-based rank of the first ground truth, top-1 id), `image_embeddings.arrow` and
//! `caption_embeddings.arrow` (the unit vectors measured, `id` + `embedding`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, StringArray, UInt32Array};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{Checked, ConfigError, Kind, StageContext, StageError, StageSummary};
use crate::features;
use crate::ml::clip::ClipInputs;
use crate::ml::embed::{self, EmbedError, Embedding, Head};
use crate::ml::retrieval::{self, Matrix, Ranks};
use crate::ml::scenes_small::PixelWordInputs;
use crate::ml::student::{Rows, Student};
use crate::pictures::Home;
use crate::teacher::Precision;
use crate::train::data;
use crate::train::load::TrainedStudent;

/// `with:` of an eval stage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// A `dataset` stage's output folder.
    pub dataset: String,
    /// The split measured [default: test].
    #[serde(default = "default_split")]
    pub split: String,
    /// A `train` stage's output folder.
    pub model: Option<String>,
    /// The features a `feature-heads` model reads (the ones it was trained on).
    pub image_features: Option<String>,
    pub text_features: Option<String>,
    /// Where the dataset's image paths are relative to, when it was imported with `images:`.
    pub images: Option<String>,
    /// Precomputed embeddings (Arrow IPC, `id` + `embedding`) instead of a model.
    pub image_embeddings: Option<String>,
    pub text_embeddings: Option<String>,
    /// Also report the mean over this many contiguous folds of the images (COCO 1K: 5).
    pub folds: Option<usize>,
    /// Semantic textual similarity: a TSV or CSV of sentence pairs with gold scores (columns
    /// `sentence1`, `sentence2`, `score`: the STS-B layout), measured as Spearman × 100 of the
    /// cosine through the student's uni text head. Needs a student that reads text.
    pub sts: Option<String>,
    /// The retrieval embedding of a trained student: `global` (the cross head, default) or
    /// `selfalign-concat` ([h ; ctx ; mean of locals], 3× wider; a student trained with
    /// `loss.cra`).
    #[serde(default, skip_serializing_if = "is_global")]
    pub embedding: Embedding,
}

fn is_global(e: &Embedding) -> bool {
    *e == Embedding::Global
}

/// [`embed::embed_split`] with the error a stage reports.
fn embed_split<B: burn::tensor::backend::Backend, S: Student<B>>(
    model: &S,
    inputs: &S::Inputs,
    device: &B::Device,
    embedding: Embedding,
    dir: &Path,
) -> Result<(Vec<f32>, Vec<f32>, usize), StageError> {
    embed::embed_split(model, inputs, device, embedding).map_err(|e: EmbedError| {
        StageError::failed_with_hint(
            format!("{}: {e}", dir.display()),
            "use `embedding: global`, or train the model with `loss.cra`",
        )
    })
}

/// The rows through the uni head, `None` when the student has none.
fn embed_uni<B: burn::tensor::backend::Backend, S: Student<B>>(
    model: &S,
    inputs: &S::Inputs,
    device: &B::Device,
    images: bool,
) -> Option<(Vec<f32>, usize)> {
    embed::embed_rows(model, inputs, device, images, Head::Uni, Embedding::Global)
        .ok()
        .flatten()
}

fn default_split() -> String {
    "test".into()
}

impl EvalConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let embeddings = self.image_embeddings.is_some() || self.text_embeddings.is_some();
        match (&self.model, embeddings) {
            (Some(_), true) => Err(ConfigError::new(
                "model",
                "give either `model:` or `image_embeddings:` + `text_embeddings:`, not both",
            )),
            (None, false) => Err(ConfigError::new(
                "model",
                "missing: give `model:` (a train stage's output) or `image_embeddings:` + `text_embeddings:`",
            )),
            (None, true) if self.image_embeddings.is_none() || self.text_embeddings.is_none() => {
                Err(ConfigError::new(
                    if self.image_embeddings.is_none() {
                        "image_embeddings"
                    } else {
                        "text_embeddings"
                    },
                    "missing: precomputed embeddings need both `image_embeddings:` and `text_embeddings:`",
                ))
            }
            _ if self.folds == Some(0) => Err(ConfigError::new("folds", "must be at least 1")),
            (None, true) if self.embedding != Embedding::Global => Err(ConfigError::new(
                "embedding",
                "chooses how a trained student embeds: give `model:`, or drop `embedding:` with precomputed embeddings",
            )),
            (None, true) if self.sts.is_some() => Err(ConfigError::new(
                "sts",
                "STS embeds sentences with a student: give `model:` (a train stage's output), not precomputed embeddings",
            )),
            _ => Ok(()),
        }
    }
}

pub struct EvalKind;

impl Kind for EvalKind {
    type Config = EvalConfig;
    const NAME: &'static str = "eval";
    // 2: results in the run record (for `cusa-pipe metrics`).
    const VERSION: u32 = 2;

    fn validate(c: &mut EvalConfig, _declared: &[String]) -> Result<Checked, ConfigError> {
        c.validate()?;
        Ok(Checked::default())
    }

    fn run(&self, c: EvalConfig, ctx: &StageContext<'_>) -> Result<StageSummary, StageError> {
        evaluate(&c, ctx)
    }
}

/// Unit-length embeddings of a split's images and captions, with the ids and the caption →
/// image map.
struct Embedded {
    image_ids: Vec<String>,
    caption_ids: Vec<String>,
    image_of: Vec<usize>,
    images: Vec<f32>,
    captions: Vec<f32>,
    dim: usize,
    /// The images through the student's uni image head (when it has one), unit rows.
    uni_images: Option<(Vec<f32>, usize)>,
    /// `metrics.json`'s `uni.text` when `sts:` was given.
    sts: Option<Value>,
}

type Inference = burn::backend::NdArray<f32>;

/// Embeds the split with the trained student in `dir`, on the CPU.
fn embed_with_model(
    c: &EvalConfig,
    ctx: &StageContext<'_>,
    dataset: &Path,
    dir: &Path,
) -> Result<Embedded, StageError> {
    let device = Default::default();
    let trained = crate::train::load::load::<Inference>(dir, &device)?;
    let mut sts_result = None;
    let (split, ((images, captions, dim), uni_images)) = match trained.student {
        TrainedStudent::FeatureHeads { shape, model } => {
            let (Some(fi), Some(ft)) = (&c.image_features, &c.text_features) else {
                return Err(StageError::failed_with_hint(
                    format!(
                        "{} is a feature-heads student: it reads precomputed features",
                        dir.display()
                    ),
                    "give `image_features:` and `text_features:` (the teachers' features.arrow it was trained on, covering this split)",
                ));
            };
            let (pi, pt) = (ctx.resolve(fi), ctx.resolve(ft));
            let (fi, ft) = (features::read(&pi)?, features::read(&pt)?);
            let split = data::feature_split(dataset, &c.split, (&fi, &pi), (&ft, &pt))?;
            if split.inputs.images.dim != shape.image_dim
                || split.inputs.captions.dim != shape.text_dim
            {
                return Err(StageError::failed_with_hint(
                    format!(
                        "the features have dimensions {} / {}, the model was trained on {} / {}",
                        split.inputs.images.dim,
                        split.inputs.captions.dim,
                        shape.image_dim,
                        shape.text_dim
                    ),
                    "give the features the model was trained on",
                ));
            }
            if let Some(sts) = &c.sts {
                return Err(StageError::failed_with_hint(
                    format!(
                        "`sts: {sts}`: {} is a feature-heads student, it reads precomputed features, not sentences",
                        dir.display()
                    ),
                    "measure STS with a student that reads text (scenes-small), or drop `sts:`",
                ));
            }
            let embedded = embed_split(&model, &split.inputs, &device, c.embedding, dir)?;
            let uni = embed_uni(&model, &split.inputs, &device, true);
            (
                (split.image_ids, split.caption_ids, split.image_of),
                (embedded, uni),
            )
        }
        TrainedStudent::ScenesSmall {
            shape,
            model,
            vocab,
        } => {
            let root = c.images.as_deref().map(|p| ctx.resolve(p));
            let split = data::pixel_word_split(
                ctx,
                dataset,
                root.as_deref(),
                &c.split,
                shape.image_size,
                &vocab,
                Home::Memory,
            )?;
            let embedded = embed_split(&model, &split.inputs, &device, c.embedding, dir)?;
            let uni = embed_uni(&model, &split.inputs, &device, true);
            if let Some(sts) = &c.sts {
                let path = ctx.resolve(sts);
                let pairs = read_sts(&path)?;
                let words = pairs
                    .iter()
                    .flat_map(|(a, b, _)| [vocab.encode(a), vocab.encode(b)])
                    .collect();
                let sentences = PixelWordInputs {
                    pixels: Vec::new().into(),
                    size: shape.image_size,
                    words,
                };
                sts_result = Some(measure_sts(&model, &sentences, &pairs, &device, &path));
            }
            (
                (split.image_ids, split.caption_ids, split.image_of),
                (embedded, uni),
            )
        }
        TrainedStudent::Clip {
            shape,
            model,
            tokenizer,
        } => {
            let root = c.images.as_deref().map(|p| ctx.resolve(p));
            let context = shape.clip.text.context;
            let (split, cut) = data::clip_split(
                ctx,
                dataset,
                root.as_deref(),
                &c.split,
                shape.clip.vision.image_size,
                &tokenizer,
                context,
                Home::Memory,
            )?;
            if cut > 0 {
                ctx.log.line(format!(
                    "{cut} captions of split `{}` cut to CLIP's {context} tokens",
                    c.split
                ));
            }
            let embedded = embed_split(&model, &split.inputs, &device, c.embedding, dir)?;
            let uni = embed_uni(&model, &split.inputs, &device, true);
            if let Some(sts) = &c.sts {
                let path = ctx.resolve(sts);
                let pairs = read_sts(&path)?;
                let tokens = pairs
                    .iter()
                    .flat_map(|(a, b, _)| [a, b])
                    .map(|t| tokenizer.encode(t, context).0)
                    .collect();
                let sentences = ClipInputs {
                    pixels: Vec::new().into(),
                    size: shape.clip.vision.image_size,
                    tokens,
                };
                sts_result = Some(measure_sts(&model, &sentences, &pairs, &device, &path));
            }
            (
                (split.image_ids, split.caption_ids, split.image_of),
                (embedded, uni),
            )
        }
    };
    let (image_ids, caption_ids, image_of) = split;
    Ok(Embedded {
        image_ids,
        caption_ids,
        image_of,
        images,
        captions,
        dim,
        uni_images,
        sts: sts_result,
    })
}

/// Sentence pairs and gold scores of an STS file (`sentence1`, `sentence2`, `score` columns;
/// tab-separated for `.tsv`/`.txt`, taken literally as STS-B's quotes are, else CSV).
fn read_sts(path: &Path) -> Result<Vec<(String, String, f64)>, StageError> {
    let tsv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("tsv") || e.eq_ignore_ascii_case("txt"));
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(if tsv { b'\t' } else { b',' })
        .quoting(!tsv)
        .flexible(true)
        .from_path(path)
        .map_err(|e| {
            StageError::failed(format!("cannot read the STS file {}: {e}", path.display()))
        })?;
    let headers = reader
        .headers()
        .map_err(|e| StageError::failed(format!("{}: {e}", path.display())))?
        .clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                StageError::failed_with_hint(
                    format!(
                        "{} has no `{name}` column (columns: {})",
                        path.display(),
                        headers.iter().collect::<Vec<_>>().join(", ")
                    ),
                    "an STS file has a header row with `sentence1`, `sentence2` and `score` (the STS-B layout)",
                )
            })
    };
    let (s1, s2, score) = (column("sentence1")?, column("sentence2")?, column("score")?);
    let mut pairs = Vec::new();
    for (n, record) in reader.records().enumerate() {
        let line = n + 2;
        let record = record
            .map_err(|e| StageError::failed(format!("{} line {line}: {e}", path.display())))?;
        let field = |i: usize, name: &str| {
            record.get(i).ok_or_else(|| {
                StageError::failed(format!("{} line {line}: no `{name}` field", path.display()))
            })
        };
        let value = field(score, "score")?;
        let gold: f64 = value.trim().parse().map_err(|_| {
            StageError::failed(format!(
                "{} line {line}: the score `{value}` is not a number",
                path.display()
            ))
        })?;
        pairs.push((
            field(s1, "sentence1")?.to_string(),
            field(s2, "sentence2")?.to_string(),
            gold,
        ));
    }
    if pairs.len() < 2 {
        return Err(StageError::failed(format!(
            "{} has {} sentence pair(s): a correlation needs at least 2",
            path.display(),
            pairs.len()
        )));
    }
    Ok(pairs)
}

/// Spearman × 100 between the gold scores and the cosine of each pair through the uni text
/// head (the cross head when the student has none).
fn measure_sts<B: burn::tensor::backend::Backend, S: Student<B>>(
    model: &S,
    sentences: &S::Inputs,
    pairs: &[(String, String, f64)],
    device: &B::Device,
    path: &Path,
) -> Value {
    let (rows, dim, head) = match embed_uni(model, sentences, device, false) {
        Some((rows, dim)) => (rows, dim, "uni"),
        None => {
            let (rows, dim) = embed::embed_rows(
                model,
                sentences,
                device,
                false,
                Head::Cross,
                Embedding::Global,
            )
            .ok()
            .flatten()
            .expect("every student has cross heads");
            (rows, dim, "cross")
        }
    };
    let cosine: Vec<f64> = (0..pairs.len())
        .map(|k| {
            let (a, b) = (
                &rows[2 * k * dim..(2 * k + 1) * dim],
                &rows[(2 * k + 1) * dim..(2 * k + 2) * dim],
            );
            a.iter().zip(b).map(|(x, y)| f64::from(x * y)).sum()
        })
        .collect();
    let gold: Vec<f64> = pairs.iter().map(|p| p.2).collect();
    let rho = crate::ml::stats::spearman(&cosine, &gold);
    json!({
        "STS Spearman": if rho.is_finite() { json!(100.0 * rho) } else { Value::Null },
        "pairs": pairs.len(),
        "head": head,
        "file": path.file_name().map(|f| f.to_string_lossy().into_owned()),
    })
}

fn normalized(mut rows: Rows) -> Rows {
    for row in rows.data.chunks_mut(rows.dim.max(1)) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|x| *x /= norm);
        }
    }
    rows
}

/// Reads precomputed embeddings for the split.
fn embed_precomputed(
    c: &EvalConfig,
    ctx: &StageContext<'_>,
    dataset: &Path,
) -> Result<Embedded, StageError> {
    let pi = ctx.resolve(c.image_embeddings.as_deref().unwrap_or_default());
    let pt = ctx.resolve(c.text_embeddings.as_deref().unwrap_or_default());
    let (fi, ft) = (features::read(&pi)?, features::read(&pt)?);
    if fi.dim != ft.dim {
        return Err(StageError::failed_with_hint(
            format!(
                "the image embeddings ({}) have dimension {}, the caption embeddings ({}) {}",
                pi.display(),
                fi.dim,
                pt.display(),
                ft.dim
            ),
            "both galleries must live in the same embedding space",
        ));
    }
    let split = data::feature_split(dataset, &c.split, (&fi, &pi), (&ft, &pt))?;
    let images = normalized(split.inputs.images);
    let captions = normalized(split.inputs.captions);
    Ok(Embedded {
        image_ids: split.image_ids,
        caption_ids: split.caption_ids,
        image_of: split.image_of,
        images: images.data,
        captions: captions.data,
        dim: fi.dim,
        uni_images: None,
        sts: None,
    })
}

/// Positive gallery rows per query (i2t: caption rows per image, t2i: image rows per
/// caption), for the ids of this split; `None` without positives for it.
fn positive_sets(dataset: &Path, e: &Embedded) -> Result<Option<[Vec<Vec<usize>>; 2]>, StageError> {
    let Some(rows) = crate::dataset::read::positives(dataset)? else {
        return Ok(None);
    };
    let index = |ids: &[String]| -> HashMap<String, usize> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect()
    };
    let (images, captions) = (index(&e.image_ids), index(&e.caption_ids));
    let mut i2t = vec![Vec::new(); e.image_ids.len()];
    let mut t2i = vec![Vec::new(); e.caption_ids.len()];
    let mut any = false;
    for [kind, query, positive] in rows {
        match kind.as_str() {
            "image" => {
                if let (Some(&q), Some(&p)) = (images.get(&query), captions.get(&positive)) {
                    i2t[q].push(p);
                    any = true;
                }
            }
            "caption" => {
                if let (Some(&q), Some(&p)) = (captions.get(&query), images.get(&positive)) {
                    t2i[q].push(p);
                    any = true;
                }
            }
            _ => {}
        }
    }
    Ok(any.then_some([i2t, t2i]))
}

fn directions(r: &retrieval::Recalls) -> Value {
    json!({
        "i2t": {"R@1": r.i2t_r1, "R@5": r.i2t_r5, "R@10": r.i2t_r10},
        "t2i": {"R@1": r.t2i_r1, "R@5": r.t2i_r5, "R@10": r.t2i_r10},
        "rsum": r.rsum,
    })
}

/// Mean recalls over `folds` contiguous folds of the images (each with its captions).
fn fold_recalls(e: &Embedded, folds: usize) -> Value {
    let ni = e.image_ids.len();
    let size = ni.div_ceil(folds);
    let mut per_fold = Vec::with_capacity(folds);
    for f in 0..folds {
        let range = f * size..((f + 1) * size).min(ni);
        if range.is_empty() {
            continue;
        }
        let captions: Vec<usize> = (0..e.caption_ids.len())
            .filter(|&c| range.contains(&e.image_of[c]))
            .collect();
        let cap_data: Vec<f32> = captions
            .iter()
            .flat_map(|&c| e.captions[c * e.dim..(c + 1) * e.dim].iter().copied())
            .collect();
        let image_of: Vec<usize> = captions
            .iter()
            .map(|&c| e.image_of[c] - range.start)
            .collect();
        per_fold.push(retrieval::recalls(
            &Matrix {
                data: &e.images[range.start * e.dim..range.end * e.dim],
                dim: e.dim,
            },
            &Matrix {
                data: &cap_data,
                dim: e.dim,
            },
            &image_of,
        ));
    }
    let mut out = directions(&retrieval::Recalls::mean(&per_fold));
    out["folds"] = json!(per_fold.len());
    out
}

/// Uni-modal image retrieval R@1 from the dataset's class labels, through the uni image head
/// when the student has one (else the embeddings measured); `None` without labels.
fn label_retrieval(dataset: &Path, split: &str, e: &Embedded) -> Result<Option<Value>, StageError> {
    let Some(labels) = crate::dataset::read::image_labels(dataset, split)? else {
        return Ok(None);
    };
    if labels.is_empty() {
        return Ok(None);
    }
    let mut classes: HashMap<&str, u32> = HashMap::new();
    let of: Vec<Option<u32>> = e
        .image_ids
        .iter()
        .map(|id| {
            let label = labels.get(id)?;
            let next = classes.len() as u32;
            Some(*classes.entry(label.as_str()).or_insert(next))
        })
        .collect();
    let (rows, dim, head) = match &e.uni_images {
        Some((rows, dim)) => (rows.as_slice(), *dim, "uni"),
        None => (e.images.as_slice(), e.dim, "cross"),
    };
    let (r1, queries) = retrieval::label_r1(&Matrix { data: rows, dim }, &of);
    Ok(Some(
        json!({"label R@1": r1, "queries": queries, "classes": classes.len(), "head": head}),
    ))
}

/// The run record's results: the numbers of `metrics.json` a comparison table shows, flat and
/// in the paper's order (split, R@K both ways, RSUM, the k-fold RSUM, the extended metrics).
fn results_row(metrics: &Value) -> serde_json::Map<String, Value> {
    let mut row = serde_json::Map::new();
    row.insert("split".into(), metrics["split"].clone());
    for d in ["i2t", "t2i"] {
        for k in ["R@1", "R@5", "R@10"] {
            row.insert(format!("{d} {k}"), metrics[d][k].clone());
        }
    }
    row.insert("rsum".into(), metrics["rsum"].clone());
    if let Some(folds) = metrics["folds"]["folds"].as_u64() {
        row.insert(
            format!("rsum {folds}-fold"),
            metrics["folds"]["rsum"].clone(),
        );
    }
    for k in ["mAP@R", "R-P"] {
        for d in ["i2t", "t2i"] {
            if let Some(v) = metrics["extended"][d].get(k) {
                row.insert(format!("{d} {k}"), v.clone());
            }
        }
    }
    if let Some(v) = metrics["uni"]["image"].get("label R@1") {
        row.insert("image label R@1".into(), v.clone());
    }
    if let Some(v) = metrics["uni"]["text"].get("STS Spearman") {
        row.insert("STS Spearman".into(), v.clone());
    }
    row
}

fn write_ranks(path: &Path, e: &Embedded, ranks: &Ranks) -> Result<(), StageError> {
    let n = ranks.i2t.len() + ranks.t2i.len();
    let mut direction = Vec::with_capacity(n);
    let mut query = Vec::with_capacity(n);
    let mut rank = Vec::with_capacity(n);
    let mut top1 = Vec::with_capacity(n);
    for (i, (&r, &t)) in ranks.i2t.iter().zip(&ranks.i2t_top1).enumerate() {
        direction.push("i2t");
        query.push(e.image_ids[i].as_str());
        rank.push(r as u32 + 1);
        top1.push(e.caption_ids[t].as_str());
    }
    for (c, (&r, &t)) in ranks.t2i.iter().zip(&ranks.t2i_top1).enumerate() {
        direction.push("t2i");
        query.push(e.caption_ids[c].as_str());
        rank.push(r as u32 + 1);
        top1.push(e.image_ids[t].as_str());
    }
    let strings = |v: Vec<&str>| -> ArrayRef { Arc::new(StringArray::from_iter_values(v)) };
    crate::dataset::normal::write_batch(
        path,
        vec![
            ("direction", strings(direction), false),
            ("query_id", strings(query), false),
            ("rank", Arc::new(UInt32Array::from(rank)) as ArrayRef, false),
            ("top1_id", strings(top1), false),
        ],
    )
}

fn evaluate(c: &EvalConfig, ctx: &StageContext<'_>) -> Result<StageSummary, StageError> {
    let dataset = ctx.resolve(&c.dataset);
    let e = match &c.model {
        Some(dir) => embed_with_model(c, ctx, &dataset, &ctx.resolve(dir))?,
        None => embed_precomputed(c, ctx, &dataset)?,
    };
    ctx.log.line(format!(
        "split `{}`: {} images, {} captions, dimension {}",
        c.split,
        e.image_ids.len(),
        e.caption_ids.len(),
        e.dim
    ));
    let images = Matrix {
        data: &e.images,
        dim: e.dim,
    };
    let captions = Matrix {
        data: &e.captions,
        dim: e.dim,
    };
    let positives = positive_sets(&dataset, &e)?;
    let started = std::time::Instant::now();
    let (ranks, extended) = retrieval::measure(&images, &captions, &e.image_of, positives.as_ref());
    // Every image and every caption was a query once.
    let queries = (e.image_ids.len() + e.caption_ids.len()).max(1);
    let ms_per_query = started.elapsed().as_secs_f64() * 1e3 / queries as f64;
    let embedding_name = match (&c.model, c.embedding) {
        (None, _) => "precomputed",
        (Some(_), Embedding::Global) => "global",
        (Some(_), Embedding::SelfalignConcat) => "selfalign-concat",
    };
    ctx.log.line(format!(
        "retrieval: {embedding_name} embedding, {} wide, {ms_per_query:.4} ms per query ({queries} queries, both directions)",
        e.dim
    ));
    let recalls = ranks.recalls();
    let mut metrics = directions(&recalls);
    metrics["split"] = json!(c.split);
    metrics["images"] = json!(e.image_ids.len());
    metrics["captions"] = json!(e.caption_ids.len());
    // The width is part of the result; the time is measured, so it goes to the run record.
    metrics["embedding"] = json!({"kind": embedding_name, "dim": e.dim});
    if let Some(folds) = c.folds {
        metrics["folds"] = fold_recalls(&e, folds);
    }
    if let Some(image) = label_retrieval(&dataset, &c.split, &e)? {
        metrics["uni"]["image"] = image;
    }
    if let Some(text) = &e.sts {
        metrics["uni"]["text"] = text.clone();
    }
    let mut note_extended = String::new();
    if let Some([a, b]) = extended {
        note_extended = format!(
            "; extended mAP@R i2t {:.1}, t2i {:.1}",
            a.map_at_r, b.map_at_r
        );
        metrics["extended"] = json!({"i2t": a, "t2i": b});
    }
    let out = ctx.out_dir;
    std::fs::write(
        out.join("metrics.json"),
        crate::api::json_text(&metrics, "metrics.json")?,
    )
    .map_err(|e| StageError::io("writing metrics.json", e))?;
    write_ranks(&out.join("ranks.parquet"), &e, &ranks)?;
    fn ids(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let image_of: Vec<&str> = e
        .image_of
        .iter()
        .map(|&i| e.image_ids[i].as_str())
        .collect();
    features::write(
        &out.join("image_embeddings.arrow"),
        &ids(&e.image_ids),
        vec![],
        &e.images,
        e.dim,
        Precision::F32,
        HashMap::new(),
    )?;
    features::write(
        &out.join("caption_embeddings.arrow"),
        &ids(&e.caption_ids),
        vec![("image_id", &image_of)],
        &e.captions,
        e.dim,
        Precision::F32,
        HashMap::new(),
    )?;
    let mut summary = StageSummary::default();
    summary.notes.push(format!(
        "{}: RSUM {:.1} (R@1 i2t {:.1}, t2i {:.1}){note_extended}",
        c.split, recalls.rsum, recalls.i2t_r1, recalls.t2i_r1
    ));
    summary.notes.push(format!(
        "{embedding_name} embedding, {} wide: {ms_per_query:.4} ms per retrieval query",
        e.dim
    ));
    summary.metrics.insert("rsum".into(), json!(recalls.rsum));
    summary.metrics.insert("embedding_dim".into(), json!(e.dim));
    summary
        .metrics
        .insert("retrieval_ms_per_query".into(), json!(ms_per_query));
    summary.results = results_row(&metrics);
    Ok(summary)
}
