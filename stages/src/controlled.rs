//! `controlled-teacher`: teacher features of a chosen quality, for measuring the method.
//!
//! CUSA's premise is that frozen uni-modal teachers know which other captions and images of a
//! batch also match (the one-hot target's false negatives). How much they must know for the
//! student to gain is what this kind lets one measure: on the embedded `scenes` dataset, whose
//! exact content is known, it writes teacher vectors in the normal feature format (Arrow, `id`
//! and `embedding`, one row per image or caption of every split, in id order) whose signal — the
//! ROC AUC [`crate::softlabel::signal`] reports — is set by `target_auc`. Real teachers stay
//! the default everywhere; these exist to measure the method.
//!
//! ## The vectors
//! * **Content**, from the item's own modality only (a teacher never sees the other one): an
//!   image is described by which of `reference` captions hold for its scene; a caption by
//!   which of `reference` scenes it holds for. The references are drawn from the dataset's own
//!   generator (scenes, and one caption of a random kind per scene) with the stage's `seed`,
//!   independent of the dataset's items. The cosine of two content vectors is |A ∩ B| /
//!   √(|A| |B|) for the sets of references they satisfy. (Standardising the indicators by
//!   their rates was tried and is worse: on the scenes' training split the text content's AUC
//!   drops from 0.71 to 0.41, below chance, because it then mostly measures how specific a
//!   caption is; IDF weights change the AUCs by less than 0.005; graded truth — the share of
//!   each statement's attributes the best object has — lowers it to 0.58.) A caption true of
//!   none of the references — about a quarter of them, mostly the fully specified
//!   inventories of two or three objects — has no content part: at `max` its vector is zero
//!   (its soft-label row uniform), below it only noise. This is one reason the text content's
//!   AUC stays at ≈ 0.71.
//! * **Noise**: an independent standard normal vector per item (`noise_dim` wide), seeded by
//!   the stage's seed and the item's id.
//! * The written vector is `[cos θ · ĉ ; sin θ · ĝ]` (ĉ, ĝ unit): θ = 0 is the content alone
//!   (the best this kind can do: `target_auc: max`), θ = π/2 pure noise (AUC 0.5).
//!
//! Even the content alone does not reach AUC 1: a uni-modal teacher cannot know everything the
//! truth depends on (image→text: whether caption l holds for image k depends on which of image
//! l's captions is drawn; text→image: whether caption k holds for image l depends on more of
//! image l than its caption l says). The ceiling is measured and reported, and a target above
//! it is refused with its value.
//!
//! ## Calibration
//! θ is found by bisection so that the AUC over `batches` training batches (drawn as training
//! draws them, one seed) equals the target; the AUC is then re-measured on batches it was not
//! fitted on (the training split with another seed, and the validation split) and reported.
//!
//! Invariants: the bytes are a pure function of the dataset's content and the config; the
//! dataset must be the scenes generator's output, verified caption by caption against the
//! content rebuilt from the settings its report.json records (a mismatch is an error, never
//! vectors of other items).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::json;

use crate::api::{Checked, ConfigError, Kind, StageContext, StageError, StageSummary};
use crate::dataset::scenes::{self, Caption, Generated, Scene, SplitMix64};
use crate::softlabel::signal::{self, Inputs, Which};
use crate::teacher::{Modality, Precision};

/// The signal asked for: an AUC, or the content alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetAuc {
    Auc(f64),
    Max,
}

impl Serialize for TargetAuc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TargetAuc::Auc(v) => s.serialize_f64(*v),
            TargetAuc::Max => s.serialize_str("max"),
        }
    }
}

impl<'de> Deserialize<'de> for TargetAuc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = TargetAuc;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an AUC between 0.5 and 1 (e.g. 0.8) or `max`")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<TargetAuc, E> {
                Ok(TargetAuc::Auc(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<TargetAuc, E> {
                Ok(TargetAuc::Auc(v as f64))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<TargetAuc, E> {
                Ok(TargetAuc::Auc(v as f64))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TargetAuc, E> {
                match v {
                    "max" => Ok(TargetAuc::Max),
                    other => match other.trim().parse::<f64>() {
                        Ok(x) => Ok(TargetAuc::Auc(x)),
                        Err(_) => Err(E::custom(format!(
                            "`{other}` is not an AUC: write a number between 0.5 and 1 (e.g. 0.8) or `max`"
                        ))),
                    },
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `with:` of a controlled-teacher stage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlledConfig {
    /// A `dataset` stage of `format: scenes`.
    pub dataset: String,
    /// `image` (vectors per image id, for P^II / i2t) or `text` (per caption id, P^TT / t2i).
    pub modality: Modality,
    /// The ROC AUC to reach on training batches, in (0.5, ceiling), or `max`.
    pub target_auc: TargetAuc,
    /// Batch size of the batches the AUC is measured on (the training batch size)
    /// [default: 128].
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// How many calibration batches [default: 200].
    #[serde(default = "default_batches")]
    pub batches: usize,
    /// Seeds the references, the noise and the calibration batches [default: 0].
    #[serde(default)]
    pub seed: u64,
    /// How many reference scenes / captions describe an item [default: 512].
    #[serde(default = "default_reference")]
    pub reference: usize,
    /// Width of the noise part [default: 256].
    #[serde(default = "default_noise_dim")]
    pub noise_dim: usize,
    /// The split θ is calibrated on [default: train].
    #[serde(default = "default_split")]
    pub split: String,
}

fn default_batch() -> usize {
    128
}
fn default_batches() -> usize {
    200
}
fn default_reference() -> usize {
    512
}
fn default_noise_dim() -> usize {
    256
}
fn default_split() -> String {
    "train".into()
}

pub struct ControlledKind;

impl Kind for ControlledKind {
    type Config = ControlledConfig;
    const NAME: &'static str = "controlled-teacher";
    const VERSION: u32 = 1;

    fn validate(c: &mut ControlledConfig, _declared: &[String]) -> Result<Checked, ConfigError> {
        if let TargetAuc::Auc(v) = c.target_auc
            && !(v.is_finite() && v > 0.5 && v < 1.0)
        {
            return Err(ConfigError::new(
                "target_auc",
                format!(
                    "{v} is not an AUC above chance: write a number between 0.5 and 1, or `max`"
                ),
            ));
        }
        if c.batch_size < 2 {
            return Err(ConfigError::new("batch_size", "must be at least 2"));
        }
        if c.batches == 0 {
            return Err(ConfigError::new("batches", "must be at least 1"));
        }
        if c.reference < 16 {
            return Err(ConfigError::new("reference", "must be at least 16"));
        }
        if c.noise_dim < 16 {
            return Err(ConfigError::new("noise_dim", "must be at least 16"));
        }
        Ok(Checked::default())
    }

    fn run(&self, c: ControlledConfig, ctx: &StageContext<'_>) -> Result<StageSummary, StageError> {
        let dataset = ctx.resolve(&c.dataset);
        let Some(settings) = crate::dataset::read::scenes_settings(&dataset)? else {
            return Err(StageError::failed_with_hint(
                format!(
                    "{} is not a scenes dataset: controlled teachers are built from each item's exact content",
                    dataset.display()
                ),
                "pass a `dataset` stage with `format: scenes`; for other data use a `teacher` stage",
            ));
        };
        let items = scenes::content(&settings);
        verify(&dataset, &items)?;
        if ctx.cancel.is_cancelled() {
            return Err(StageError::Cancelled);
        }
        let cancelled = || ctx.cancel.is_cancelled();
        let Calibrated {
            built,
            which,
            theta,
            ceiling,
            chance,
            calibrated,
            heldout,
            other_splits,
        } = calibrate(&c, &items, &cancelled, &mut |line| ctx.log.line(line))?;
        let all: Vec<usize> = (0..built.ids.len()).collect();
        let (vectors, dim) = built.vectors(theta, &all);
        let ids: Vec<&str> = built.ids.iter().map(String::as_str).collect();
        let mut meta = HashMap::new();
        meta.insert("teacher".to_string(), "controlled".to_string());
        meta.insert("modality".to_string(), c.modality_word().to_string());
        meta.insert(
            "target_auc".to_string(),
            serde_json::to_string(&c.target_auc).unwrap_or_default(),
        );
        meta.insert("theta".to_string(), format!("{theta:.6}"));
        meta.insert("auc_heldout".to_string(), format!("{heldout:.6}"));
        crate::features::write(
            &ctx.out_dir.join("features.arrow"),
            &ids,
            Vec::new(),
            &vectors,
            dim,
            Precision::F32,
            meta,
        )?;
        let report = json!({
            "modality": c.modality_word(),
            "direction": which.name(),
            "target_auc": c.target_auc,
            "theta": theta,
            "content_weight": theta.cos().powi(2),
            "rows": ids.len(),
            "dim": dim,
            "reference": c.reference,
            "noise_dim": c.noise_dim,
            "calibration": {
                "split": c.split,
                "batch_size": c.batch_size,
                "batches": c.batches,
                "content_alone_auc": ceiling,
                "noise_alone_auc": chance,
                "auc": calibrated,
            },
            "heldout_auc": heldout,
            "other_splits_auc": other_splits,
        });
        std::fs::write(
            ctx.out_dir.join("report.json"),
            crate::api::json_text(&report, "report.json")?,
        )
        .map_err(|e| StageError::io("writing report.json", e))?;

        let mut summary = StageSummary::default();
        let others: Vec<String> = other_splits
            .iter()
            .map(|(k, v)| format!("{k} {v:.3}"))
            .collect();
        summary.notes.push(format!(
            "controlled {} teacher ({}): target AUC {}, reached {calibrated:.3} on calibration batches, {heldout:.3} held out ({}); content alone {ceiling:.3}; {} rows × {dim}",
            c.modality_word(),
            which.name(),
            match c.target_auc { TargetAuc::Auc(v) => format!("{v}"), TargetAuc::Max => "max".into() },
            others.join(", "),
            ids.len()
        ));
        summary.metrics.insert("auc_heldout".into(), json!(heldout));
        summary.metrics.insert("theta".into(), json!(theta));
        summary
            .metrics
            .insert("content_alone_auc".into(), json!(ceiling));
        Ok(summary)
    }
}

/// What calibration found: the vectors' parts, θ and the AUCs it was judged by.
pub struct Calibrated {
    built: Built,
    pub which: Which,
    pub theta: f64,
    /// AUC of the content alone (θ = 0) on the calibration batches.
    pub ceiling: f64,
    /// AUC of the noise alone (θ = π/2).
    pub chance: f64,
    /// AUC at θ on the calibration batches.
    pub calibrated: f64,
    /// AUC at θ on other batches of the calibration split.
    pub heldout: f64,
    /// AUC at θ on the other splits.
    pub other_splits: BTreeMap<&'static str, f64>,
}

/// Builds the content and noise vectors of `items` and finds θ for `c.target_auc` (module
/// doc, "Calibration").
pub fn calibrate(
    c: &ControlledConfig,
    items: &[Generated],
    cancelled: &dyn Fn() -> bool,
    log: &mut dyn FnMut(String),
) -> Result<Calibrated, StageError> {
    let started = std::time::Instant::now();
    let refs = References::draw(c.seed, c.reference);
    let built = Built::new(c, items, &refs);
    log(format!(
        "{} {} content vectors over {} references in {:.2}s",
        built.ids.len(),
        c.modality_word(),
        c.reference,
        started.elapsed().as_secs_f64()
    ));

    let which = match c.modality {
        Modality::Image => Which::I2t,
        Modality::Text => Which::T2i,
    };
    let calibration = Split::new(items, &c.split);
    if calibration.captions.len() < 2 || calibration.positives.is_empty() {
        return Err(StageError::failed_with_hint(
            format!(
                "split `{}` has no captions with extended positives to calibrate on",
                c.split
            ),
            "`split:` names one of the dataset's splits: train, val or test (default: train)",
        ));
    }
    let cal_batches = signal::batches(
        calibration.captions.len(),
        c.batch_size,
        c.batches,
        c.seed ^ 0xCA1B,
    );
    let cal_rows = calibration.rows(&built, c.modality);
    let auc_at = |theta: f64, split: &Split, rows: &[usize], batches: &[Vec<u32>]| {
        let (vectors, dim) = built.vectors(theta, rows);
        split.auc(&vectors, dim, which, batches)
    };
    let ceiling = auc_at(0.0, &calibration, &cal_rows, &cal_batches);
    let chance = auc_at(
        std::f64::consts::FRAC_PI_2,
        &calibration,
        &cal_rows,
        &cal_batches,
    );
    log(format!(
        "split `{}`: content alone AUC {ceiling:.4}, noise alone {chance:.4}",
        c.split
    ));
    let theta = match c.target_auc {
        TargetAuc::Max => 0.0,
        TargetAuc::Auc(target) => {
            if target > ceiling {
                return Err(StageError::failed_with_hint(
                    format!(
                        "target_auc {target} is above what the {} content alone reaches on split `{}`: AUC {ceiling:.3}",
                        c.modality_word(),
                        c.split
                    ),
                    format!(
                        "ask for at most {:.2}, or `max` for the content alone",
                        (ceiling * 100.0).floor() / 100.0
                    ),
                ));
            }
            // AUC falls as θ grows; 30 halvings pin θ far below the AUC's resolution.
            let (mut lo, mut hi) = (0.0f64, std::f64::consts::FRAC_PI_2);
            for _ in 0..30 {
                if cancelled() {
                    return Err(StageError::Cancelled);
                }
                let mid = 0.5 * (lo + hi);
                if auc_at(mid, &calibration, &cal_rows, &cal_batches) > target {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            0.5 * (lo + hi)
        }
    };
    let calibrated = auc_at(theta, &calibration, &cal_rows, &cal_batches);
    // Held out: batches θ was not fitted on.
    let heldout_batches = signal::batches(
        calibration.captions.len(),
        c.batch_size,
        c.batches,
        c.seed ^ 0x4E1D0u64,
    );
    let heldout = auc_at(theta, &calibration, &cal_rows, &heldout_batches);
    let mut other_splits = BTreeMap::new();
    for name in ["train", "val", "test"] {
        if name == c.split {
            continue;
        }
        let split = Split::new(items, name);
        if split.captions.len() < 2 || split.positives.is_empty() {
            continue;
        }
        let batches = signal::batches(
            split.captions.len(),
            c.batch_size,
            c.batches,
            c.seed ^ 0x4E1D1u64,
        );
        let rows = split.rows(&built, c.modality);
        other_splits.insert(name, auc_at(theta, &split, &rows, &batches));
    }

    Ok(Calibrated {
        built,
        which,
        theta,
        ceiling,
        chance,
        calibrated,
        heldout,
        other_splits,
    })
}

impl ControlledConfig {
    fn modality_word(&self) -> &'static str {
        match self.modality {
            Modality::Image => "image",
            Modality::Text => "text",
        }
    }
}

/// Checks that the rebuilt content is the dataset's: the same caption ids with the same text.
fn verify(dataset: &Path, items: &[Generated]) -> Result<(), StageError> {
    let stored = crate::dataset::read::captions_raw(dataset)?;
    let mut rebuilt: BTreeMap<String, &str> = BTreeMap::new();
    for g in items {
        for (k, cap) in g.captions.iter().enumerate() {
            rebuilt.insert(format!("{}-{k}", g.id), cap.text.as_str());
        }
    }
    let mismatch = |what: String| {
        StageError::failed_with_hint(
            format!(
                "{}: the captions are not those its recorded scenes settings generate ({what})",
                dataset.display()
            ),
            "the dataset's files were changed after it was generated: rerun the dataset stage (`run --force`)",
        )
    };
    if stored.len() != rebuilt.len() {
        return Err(mismatch(format!(
            "{} captions stored, {} generated",
            stored.len(),
            rebuilt.len()
        )));
    }
    for (id, text) in &stored {
        match rebuilt.get(id) {
            Some(t) if t == text => {}
            Some(t) => {
                return Err(mismatch(format!(
                    "caption `{id}` is {text:?}, generated {t:?}"
                )));
            }
            None => return Err(mismatch(format!("caption `{id}` is not generated"))),
        }
    }
    Ok(())
}

/// The reference scenes and captions content vectors are measured against.
struct References {
    scenes: Vec<Scene>,
    captions: Vec<Caption>,
}

impl References {
    fn draw(seed: u64, n: usize) -> Self {
        let mut rng = SplitMix64::new(seed ^ 0x5EED_CAFE_F00D_0001);
        let mut scenes = Vec::with_capacity(n);
        let mut captions = Vec::with_capacity(n);
        for _ in 0..n {
            let scene = scenes::random_scene(&mut rng);
            let kind = rng.below(5);
            captions.push(scenes::caption(&scene, kind, &mut rng));
            scenes.push(scene);
        }
        References { scenes, captions }
    }
}

/// Every item's unit content and noise vectors, in id order.
struct Built {
    ids: Vec<String>,
    content: Vec<f32>,
    content_dim: usize,
    noise: Vec<f32>,
    noise_dim: usize,
    /// Row in `ids` by id.
    row: HashMap<String, usize>,
}

/// FNV-1a of an id: the per-item noise stream.
fn id_hash(id: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01B3);
    }
    h
}

fn unit(v: &mut [f32]) {
    let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if n > 0.0 {
        for x in v {
            *x = (*x as f64 / n) as f32;
        }
    }
}

impl Built {
    fn new(c: &ControlledConfig, items: &[Generated], refs: &References) -> Self {
        // Rows: images or captions of every split, in id order.
        let mut rows: Vec<(String, Facts<'_>)> = match c.modality {
            Modality::Image => items
                .iter()
                .map(|g| (g.id.clone(), Facts::Scene(&g.scene)))
                .collect(),
            Modality::Text => items
                .iter()
                .flat_map(|g| {
                    g.captions
                        .iter()
                        .enumerate()
                        .map(move |(k, cap)| (format!("{}-{k}", g.id), Facts::Caption(cap)))
                })
                .collect(),
        };
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let content_dim = c.reference;
        let noise_dim = c.noise_dim;
        let per_row: Vec<(Vec<f32>, Vec<f32>)> = rows
            .par_iter()
            .map(|(id, facts)| {
                let truth: Vec<bool> = match facts {
                    Facts::Scene(s) => refs.captions.iter().map(|cap| cap.holds(s)).collect(),
                    Facts::Caption(cap) => refs.scenes.iter().map(|s| cap.holds(s)).collect(),
                };
                let mut content: Vec<f32> = truth.iter().map(|&t| t as u8 as f32).collect();
                unit(&mut content);
                let mut rng = SplitMix64::new(c.seed ^ 0x0015_E000_0000_0000 ^ id_hash(id));
                let mut noise = Vec::with_capacity(noise_dim);
                while noise.len() < noise_dim {
                    // Box–Muller from two uniforms in (0, 1].
                    let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    let r = (-2.0 * u1.ln()).sqrt();
                    let a = std::f64::consts::TAU * u2;
                    noise.push((r * a.cos()) as f32);
                    if noise.len() < noise_dim {
                        noise.push((r * a.sin()) as f32);
                    }
                }
                unit(&mut noise);
                (content, noise)
            })
            .collect();
        let mut content = Vec::with_capacity(rows.len() * content_dim);
        let mut noise = Vec::with_capacity(rows.len() * noise_dim);
        for (cv, nv) in per_row {
            content.extend(cv);
            noise.extend(nv);
        }
        let ids: Vec<String> = rows.into_iter().map(|(id, _)| id).collect();
        let row = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        Built {
            ids,
            content,
            content_dim,
            noise,
            noise_dim,
            row,
        }
    }

    /// `[cos θ · ĉ ; sin θ · ĝ]` of the given rows, and its width.
    fn vectors(&self, theta: f64, rows: &[usize]) -> (Vec<f32>, usize) {
        let dim = self.content_dim + self.noise_dim;
        let (a, b) = (theta.cos(), theta.sin());
        let mut out = Vec::with_capacity(rows.len() * dim);
        for &r in rows {
            let c = &self.content[r * self.content_dim..(r + 1) * self.content_dim];
            let n = &self.noise[r * self.noise_dim..(r + 1) * self.noise_dim];
            out.extend(c.iter().map(|x| (*x as f64 * a) as f32));
            out.extend(n.iter().map(|x| (*x as f64 * b) as f32));
        }
        (out, dim)
    }
}

enum Facts<'a> {
    Scene(&'a Scene),
    Caption(&'a Caption),
}

/// One split's captions and images as the soft labels index them (id order), with the exact
/// extended positives.
struct Split {
    /// Caption ids, sorted.
    captions: Vec<String>,
    /// Image ids, sorted.
    images: Vec<String>,
    caption_image: Vec<u32>,
    positives: HashSet<(u32, u32)>,
}

impl Split {
    fn new(items: &[Generated], name: &str) -> Self {
        let mut split: Vec<&Generated> = items.iter().filter(|g| g.split == name).collect();
        split.sort_by(|a, b| a.id.cmp(&b.id));
        let mut captions: Vec<(String, u32, &Caption)> = Vec::new();
        for (i, g) in split.iter().enumerate() {
            for (k, cap) in g.captions.iter().enumerate() {
                captions.push((format!("{}-{k}", g.id), i as u32, cap));
            }
        }
        captions.sort_by(|a, b| a.0.cmp(&b.0));
        let positives: HashSet<(u32, u32)> = captions
            .par_iter()
            .enumerate()
            .flat_map_iter(|(c, (_, own, cap))| {
                split
                    .iter()
                    .enumerate()
                    .filter(move |(i, g)| *i as u32 != *own && cap.holds(&g.scene))
                    .map(move |(i, _)| (c as u32, i as u32))
            })
            .collect();
        Split {
            caption_image: captions.iter().map(|c| c.1).collect(),
            captions: captions.into_iter().map(|c| c.0).collect(),
            images: split.iter().map(|g| g.id.clone()).collect(),
            positives,
        }
    }

    /// The rows of `built` holding this split's items of `modality`, in the split's order.
    fn rows(&self, built: &Built, modality: Modality) -> Vec<usize> {
        let ids = match modality {
            Modality::Image => &self.images,
            Modality::Text => &self.captions,
        };
        ids.iter().map(|id| built.row[id]).collect()
    }

    fn auc(&self, vectors: &[f32], dim: usize, which: Which, batches: &[Vec<u32>]) -> f64 {
        let inputs = match which {
            Which::I2t => Inputs {
                images: vectors,
                dim_i: dim,
                captions: &[],
                dim_t: 1,
                caption_image: &self.caption_image,
                positives: &self.positives,
            },
            Which::T2i => Inputs {
                images: &[],
                dim_i: 1,
                captions: vectors,
                dim_t: dim,
                caption_image: &self.caption_image,
                positives: &self.positives,
            },
        };
        signal::direction_auc(&inputs, batches, which)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::dataset::scenes::ScenesConfig;

    fn config(modality: &str, target: serde_json::Value) -> ControlledConfig {
        let with =
            json!({"dataset": "d", "modality": modality, "target_auc": target, "batches": 40});
        let checked = crate::registry()["controlled-teacher"]
            .check(&with, &[])
            .unwrap_or_else(|e| panic!("{}: {}", e.path, e.message));
        serde_json::from_value(checked.config).unwrap()
    }

    fn items() -> Vec<Generated> {
        scenes::content(&ScenesConfig {
            seed: 5,
            train: 400,
            val: 150,
            test: 0,
            ..ScenesConfig::default()
        })
    }

    #[test]
    fn target_auc_is_a_number_above_chance_or_max() {
        let check = |with: serde_json::Value| {
            crate::registry()["controlled-teacher"]
                .check(&with, &[])
                .err()
                .map(|e| (e.path, e.message))
        };
        let base =
            |t: serde_json::Value| json!({"dataset": "d", "modality": "image", "target_auc": t});
        assert_eq!(check(base(json!(0.8))), None);
        assert_eq!(check(base(json!("max"))), None);
        assert_eq!(config("text", json!("max")).target_auc, TargetAuc::Max);
        for bad in [json!(0.5), json!(0.3), json!(1.0), json!(2)] {
            let (path, message) = check(base(bad.clone())).expect("refused");
            assert_eq!(path, "target_auc", "{bad}");
            assert!(message.contains("between 0.5 and 1"), "{message}");
        }
        let (path, message) = check(base(json!("best"))).expect("refused");
        assert_eq!(path, "target_auc");
        assert!(message.contains("`best` is not an AUC"), "{message}");
        let (path, _) =
            check(json!({"dataset": "d", "modality": "image", "target_auc": 0.7, "noise": 1}))
                .expect("refused");
        assert_eq!(path, "noise");
    }

    /// The check: the calibrated teachers hit their target within ±0.03 on batches θ
    /// was not fitted on, in both directions, and on another split.
    #[test]
    fn calibrated_teachers_hit_their_target_on_held_out_batches() {
        let items = items();
        for modality in ["image", "text"] {
            let max = calibrate(
                &config(modality, json!("max")),
                &items,
                &|| false,
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(max.theta, 0.0);
            assert!(
                max.ceiling > 0.65,
                "{modality}: the content alone carries signal ({})",
                max.ceiling
            );
            assert!(
                (max.chance - 0.5).abs() < 0.03,
                "{modality}: noise alone is chance ({})",
                max.chance
            );
            let target = 0.6;
            let got = calibrate(
                &config(modality, json!(target)),
                &items,
                &|| false,
                &mut |_| {},
            )
            .unwrap();
            assert!(
                (got.calibrated - target).abs() < 0.005,
                "{modality} {target}: {}",
                got.calibrated
            );
            assert!(
                (got.heldout - target).abs() < 0.03,
                "{modality} {target}: held out {}",
                got.heldout
            );
            let val = got.other_splits["val"];
            assert!(
                (val - target).abs() < 0.03,
                "{modality} {target}: val {val}"
            );
            assert!(got.theta > 0.0 && got.theta < std::f64::consts::FRAC_PI_2);
            // Above the ceiling: refused with the ceiling's value.
            let err = calibrate(
                &config(modality, json!(0.99)),
                &items,
                &|| false,
                &mut |_| {},
            )
            .err()
            .expect("refused");
            let text = err.to_string();
            assert!(
                text.contains("content alone reaches on split `train`: AUC"),
                "{text}"
            );
        }
    }

    /// The vectors are unit length, the same for the same config, and the noise part is the
    /// item's own (not its position's).
    #[test]
    fn vectors_are_unit_and_reproducible() {
        let items = items();
        let c = config("text", json!(0.6));
        let a = calibrate(&c, &items, &|| false, &mut |_| {}).unwrap();
        let b = calibrate(&c, &items, &|| false, &mut |_| {}).unwrap();
        assert_eq!(a.theta, b.theta);
        let all: Vec<usize> = (0..a.built.ids.len()).collect();
        let (va, dim) = a.built.vectors(a.theta, &all);
        assert_eq!(va, b.built.vectors(b.theta, &all).0);
        assert_eq!(dim, 512 + 256);
        // Unit length, except a caption true of none of the references (a fully specified
        // inventory of two or three objects): it has no content part, only the noise's sin θ.
        let noise_only = a.theta.sin().powi(2);
        let mut without_content = 0;
        for row in va.chunks(dim) {
            let n: f64 = row.iter().map(|x| (*x as f64).powi(2)).sum();
            if (n - noise_only).abs() < 1e-5 {
                without_content += 1;
            } else {
                assert!((n - 1.0).abs() < 1e-5, "{n}");
            }
        }
        let share = without_content as f64 / all.len() as f64;
        eprintln!(
            "captions without content: {without_content} of {} ({share:.3})",
            all.len()
        );
        assert!(share > 0.1 && share < 0.35, "{share}");
        // Fewer items (another split size) leave an item's noise as it was.
        let fewer = scenes::content(&ScenesConfig {
            seed: 5,
            train: 50,
            val: 0,
            test: 0,
            ..ScenesConfig::default()
        });
        let small = Built::new(&c, &fewer, &References::draw(c.seed, c.reference));
        let id = &small.ids[7];
        let (r_small, r_big) = (small.row[id], a.built.row[id]);
        assert_eq!(
            small.noise[r_small * 256..(r_small + 1) * 256],
            a.built.noise[r_big * 256..(r_big + 1) * 256]
        );
    }
}
