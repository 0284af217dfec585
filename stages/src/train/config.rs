//! The `with:` of a train stage, and the record of it saved beside the weights.

use burn::config::Config;
use serde::{Deserialize, Serialize};

use crate::api::ConfigError;
pub use crate::device::Device;
use crate::ml::Where;
use crate::ml::embed::Embedding;
use crate::ml::loss::Reduction;
use crate::ml::objective::{Base, Objective, Term};
pub use crate::ml::precision::Precision;
pub use crate::ml::selfalign::{CraConfig, LcaConfig};

/// `with:` of a train stage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// A `dataset` stage's output folder.
    pub dataset: String,
    /// A `softlabel` stage's output folder (needed by `csa` and `usa`).
    pub softlabels: Option<String>,
    pub student: StudentConfig,
    #[serde(default)]
    pub loss: LossConfig,
    /// `cusa-reference`: the released code's choices (base-loss reduction Σ/(2B²), decayed
    /// temperatures) as defaults.
    pub preset: Option<Preset>,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Batches per optimiser step (gradient accumulation; each batch's in-batch losses see only
    /// its own negatives, like the reference's per-GPU losses: `accumulate: 4` with batch 128
    /// is its 4 GPUs × 128 on one device).
    #[serde(default = "default_accumulate")]
    pub accumulate: usize,
    /// Peak learning rate (first epoch).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Learning rate of the last epoch (cosine in between) [default: lr / 10].
    pub lr_min: Option<f64>,
    /// Optimiser steps of linear warm-up: step s (0-based) runs at (s+1)/warmup of the
    /// epoch's cosine rate until s = warmup (open_clip's `--warmup`) [default: 0, none, as the
    /// reference].
    #[serde(default)]
    pub warmup: usize,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// Decay the temperatures too [default: false; true with `preset: cusa-reference`].
    pub decay_temperatures: Option<bool>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_train_split")]
    pub split: String,
    /// The split that chooses the best epoch.
    #[serde(default = "default_val_split")]
    pub val_split: String,
    #[serde(default)]
    pub device: Device,
    /// What the student's matrix products compute in: `fp32`, or `bf16-mixed` (bf16 products,
    /// f32 weights and everything else; `student: clip` only).
    #[serde(default)]
    pub precision: Precision,
    /// VSRN's step schedule instead of the cosine: the rate × 0.1 every `lr_update` epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_update: Option<usize>,
    /// Clip the gradients' global L2 norm to this (PyTorch's `clip_grad_norm_`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    /// The embedding validation chooses the best epoch with: `global` (default) or
    /// `selfalign-concat` (needs `loss.cra`).
    #[serde(default, skip_serializing_if = "is_global")]
    pub embedding: Embedding,
}

fn is_global(e: &Embedding) -> bool {
    *e == Embedding::Global
}

fn default_epochs() -> usize {
    10
}
fn default_accumulate() -> usize {
    1
}
fn default_batch() -> usize {
    128
}
fn default_lr() -> f64 {
    1e-3
}
fn default_wd() -> f64 {
    1e-4
}
fn default_train_split() -> String {
    "train".into()
}
fn default_val_split() -> String {
    "val".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    CusaReference,
    /// `cusa-reference` plus the released CLIP fine-tuning recipe as defaults: AdamW lr 1e-5,
    /// cosine to 1e-6, weight decay 1e-4, batch 128, 30 epochs (COCO; Flickr30K used 40).
    CusaClip,
    /// The released SelfAlign (VSRN) recipe as defaults: VSE++ hinge (margin 0.2), Adam
    /// (no weight decay) lr 2e-4, × 0.1 every 15 epochs of 30, gradient norm clipped to 2.0,
    /// batch 128.
    SelfalignReference,
}

impl Preset {
    /// The `with:` keys this preset gives when the stage does not.
    pub fn defaults(self) -> &'static [(&'static str, f64)] {
        match self {
            Self::CusaReference => &[],
            Self::SelfalignReference => &[
                ("lr", 2e-4),
                ("weight_decay", 0.0),
                ("batch_size", 128.0),
                ("epochs", 30.0),
                ("lr_update", 15.0),
                ("grad_clip", 2.0),
            ],
            Self::CusaClip => &[
                ("lr", 1e-5),
                ("lr_min", 1e-6),
                ("weight_decay", 1e-4),
                ("batch_size", 128.0),
                ("epochs", 30.0),
            ],
        }
    }
}

/// `with` with the defaults of its `preset:` filled in where the stage gives none.
pub fn with_preset_defaults(with: &serde_json::Value) -> serde_json::Value {
    let mut with = with.clone();
    let preset = with
        .get("preset")
        .cloned()
        .and_then(|p| serde_json::from_value::<Preset>(p).ok());
    if let (Some(p), Some(map)) = (preset, with.as_object_mut()) {
        for (key, value) in p.defaults() {
            let v = if value.fract() == 0.0 && *value >= 1.0 {
                serde_json::Value::from(*value as u64)
            } else {
                serde_json::Value::from(*value)
            };
            map.entry(key.to_string()).or_insert(v);
        }
        if p == Preset::SelfalignReference {
            let loss = map
                .entry("loss".to_string())
                .or_insert_with(|| serde_json::json!({}));
            if let Some(loss) = loss.as_object_mut() {
                loss.entry("base".to_string())
                    .or_insert_with(|| serde_json::json!("vse"));
            }
        }
    }
    with
}

/// The student architecture.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum StudentConfig {
    /// An MLP per modality over frozen precomputed features, then the heads.
    FeatureHeads {
        /// features.arrow of an image embedder, covering the train and validation images.
        image_features: String,
        /// features.arrow of a text embedder, covering the train and validation captions.
        text_features: String,
        #[serde(default = "default_hidden")]
        hidden: usize,
        #[serde(default = "default_dim")]
        dim: usize,
    },
    /// A small CNN and a small word-level transformer trained from scratch on the dataset's
    /// pictures and captions (the vocabulary comes from the training captions).
    ScenesSmall {
        /// Where the image paths are relative to, when the dataset was imported with `images:`.
        images: Option<String>,
        /// Side the pictures are resized (and centre-cropped) to.
        #[serde(default = "default_image_size")]
        image_size: usize,
        /// Output channels of the stride-2 convolutions.
        #[serde(default = "default_channels")]
        channels: Vec<usize>,
        /// Transformer width.
        #[serde(default = "default_width")]
        width: usize,
        #[serde(default = "default_layers")]
        layers: usize,
        #[serde(default = "default_heads")]
        heads: usize,
        /// Captions are cut after this many words.
        #[serde(default = "default_max_words")]
        max_words: usize,
        /// Words seen fewer times in the training captions are `[UNK]`.
        #[serde(default = "default_min_count")]
        min_count: usize,
        #[serde(default = "default_dim")]
        dim: usize,
    },
    /// CLIP (OpenAI's architecture) from pretrained weights, fine-tuned whole, with the heads
    /// on its projected outputs.
    Clip {
        /// A Hugging Face CLIPModel folder (`model.safetensors` + `config.json`) or a
        /// `.safetensors` file in the Hugging Face or open_clip layout.
        weights: String,
        /// The BPE merges: OpenAI's `bpe_simple_vocab_16e6.txt.gz`, a `merges.txt`, or a folder
        /// with `merges.txt` (+ `vocab.json`) [default: the `weights` folder].
        tokenizer: Option<String>,
        /// Where the image paths are relative to, when the dataset was imported with `images:`.
        images: Option<String>,
        /// Attention heads of both towers, for checkpoints without a config.json whose widths
        /// are not 64 per head.
        heads: Option<usize>,
        /// `quick_gelu` (OpenAI) or `gelu` (many open_clip models), for checkpoints without a
        /// config.json [default: quick_gelu].
        activation: Option<crate::ml::clip::shape::Activation>,
    },
}

fn default_image_size() -> usize {
    48
}
fn default_channels() -> Vec<usize> {
    vec![32, 64, 128, 256]
}
fn default_width() -> usize {
    128
}
fn default_layers() -> usize {
    2
}
fn default_heads() -> usize {
    4
}
fn default_max_words() -> usize {
    32
}
fn default_min_count() -> usize {
    1
}

fn default_hidden() -> usize {
    512
}
fn default_dim() -> usize {
    256
}

/// The base loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseLoss {
    /// InfoNCE with multi-positive targets and a learnable τ in [0.01, 0.10].
    #[default]
    Infonce,
    /// VSE++: hardest-negative hinge.
    Vse,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    #[serde(default)]
    pub base: BaseLoss,
    /// InfoNCE reduction: `mean` (Σ/B, default) or `reference` (Σ/B², the released code).
    pub reduction: Option<Reduction>,
    /// VSE++ margin.
    #[serde(default = "default_margin")]
    pub margin: f64,
    pub csa: Option<CsaConfig>,
    pub usa: Option<UsaConfig>,
    /// SelfAlign's concept-level term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lca: Option<LcaConfig>,
    /// SelfAlign's context-level term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cra: Option<CraConfig>,
    /// τ_s of the teachers' soft labels, P = softmax(cos / τ_s), read by CSA and USA
    /// [default: 1.0, CUSA's: nearly uniform rows; smaller lets the teachers' ranking through].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_temperature: Option<f64>,
    /// The direction of CSA's and USA's KL: `forward` KL(P‖Q) [default: the paper's and its
    /// code's] or `reverse` KL(Q‖P). Unset is forward (and leaves the fingerprint as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_kl: Option<crate::ml::loss::Kl>,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            base: BaseLoss::Infonce,
            reduction: None,
            margin: default_margin(),
            csa: None,
            usa: None,
            lca: None,
            cra: None,
            soft_temperature: None,
            soft_kl: None,
        }
    }
}

impl LossConfig {
    /// The objective these settings name (`reduction`: the InfoNCE reduction in force).
    pub fn objective(&self, reduction: Reduction) -> Objective {
        let mut terms = vec![Term::Base(match self.base {
            BaseLoss::Infonce => Base::Infonce(reduction),
            BaseLoss::Vse => Base::Vse(self.margin),
        })];
        terms.extend(self.csa.map(|c| Term::Csa { alpha: c.alpha }));
        terms.extend(self.usa.map(|u| Term::Usa { beta: u.beta }));
        terms.extend(self.lca.map(Term::Lca));
        terms.extend(self.cra.map(Term::Cra));
        Objective {
            terms,
            soft_temperature: self.soft_temperature.unwrap_or(1.0),
            soft_kl: self.soft_kl.unwrap_or_default(),
            on: Where::Host,
        }
    }

    /// Whether a SelfAlign term is on (the student needs locals).
    pub fn selfalign(&self) -> bool {
        self.lca.is_some() || self.cra.is_some()
    }
}

fn default_margin() -> f64 {
    0.2
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CsaConfig {
    pub alpha: f64,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UsaConfig {
    pub beta: f64,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.epochs == 0 {
            return Err(ConfigError::new("epochs", "must be at least 1"));
        }
        if self.batch_size < 2 {
            return Err(ConfigError::new(
                "batch_size",
                "must be at least 2 (in-batch negatives)",
            ));
        }
        if self.accumulate == 0 {
            return Err(ConfigError::new(
                "accumulate",
                "must be at least 1 (batches per optimiser step)",
            ));
        }
        if self.lr.is_nan() || self.lr <= 0.0 {
            return Err(ConfigError::new("lr", "must be positive"));
        }
        if let Some(m) = self.lr_min
            && !(0.0..=self.lr).contains(&m)
        {
            return Err(ConfigError::new("lr_min", "must be between 0 and `lr`"));
        }
        if (self.loss.csa.is_some() || self.loss.usa.is_some()) && self.softlabels.is_none() {
            return Err(ConfigError::new(
                "softlabels",
                "`loss.csa` and `loss.usa` need `softlabels:` (a softlabel stage's output)",
            ));
        }
        if self.loss.base == BaseLoss::Vse && self.loss.reduction.is_some() {
            return Err(ConfigError::new(
                "loss.reduction",
                "applies to `base: infonce` only (VSE++ sums over the batch)",
            ));
        }
        if let StudentConfig::ScenesSmall {
            image_size,
            channels,
            width,
            layers,
            heads,
            max_words,
            dim,
            ..
        } = &self.student
        {
            let key = |k: &str| format!("student.{k}");
            if !(8..=1024).contains(image_size) {
                return Err(ConfigError::new(
                    key("image_size"),
                    "must be between 8 and 1024",
                ));
            }
            if channels.is_empty() || channels.contains(&0) {
                return Err(ConfigError::new(
                    key("channels"),
                    "must list at least one positive channel count",
                ));
            }
            if *heads == 0 || *width == 0 || width % heads != 0 {
                return Err(ConfigError::new(
                    key("heads"),
                    format!("must divide `width` ({width})"),
                ));
            }
            if *layers == 0 || *max_words == 0 || *dim == 0 {
                return Err(ConfigError::new(
                    key("layers"),
                    "`layers`, `max_words` and `dim` must be at least 1",
                ));
            }
        }
        if self.precision == Precision::Bf16Mixed
            && !matches!(self.student, StudentConfig::Clip { .. })
        {
            return Err(ConfigError::new(
                "precision",
                "`bf16-mixed` applies to `student: {kind: clip}` (the small students compute in fp32); remove the key",
            ));
        }
        if let StudentConfig::Clip { heads: Some(0), .. } = &self.student {
            return Err(ConfigError::new("student.heads", "must be at least 1"));
        }
        self.validate_selfalign()?;
        if let Some(c) = self.loss.csa
            && (c.alpha.is_nan() || c.alpha < 0.0)
        {
            return Err(ConfigError::new("loss.csa.alpha", "must be ≥ 0"));
        }
        if let Some(u) = self.loss.usa
            && (u.beta.is_nan() || u.beta < 0.0)
        {
            return Err(ConfigError::new("loss.usa.beta", "must be ≥ 0"));
        }
        if let Some(t) = self.loss.soft_temperature {
            if !(t.is_finite() && t > 0.0) {
                return Err(ConfigError::new(
                    "loss.soft_temperature",
                    "must be positive",
                ));
            }
            if self.loss.csa.is_none() && self.loss.usa.is_none() {
                return Err(ConfigError::new(
                    "loss.soft_temperature",
                    "only the CSA and USA terms read soft labels: add `csa:` or `usa:`, or drop it",
                ));
            }
        }
        if self.loss.soft_kl.is_some() && self.loss.csa.is_none() && self.loss.usa.is_none() {
            return Err(ConfigError::new(
                "loss.soft_kl",
                "only the CSA and USA terms compare with soft labels: add `csa:` or `usa:`, or drop it",
            ));
        }
        Ok(())
    }

    /// The SelfAlign keys: a student with locals, sensible values, `hardest` within the
    /// batch's regions, the step schedule and clipping.
    fn validate_selfalign(&self) -> Result<(), ConfigError> {
        let nonneg = |v: f64| !v.is_nan() && v >= 0.0;
        let positive = |v: f64| !v.is_nan() && v > 0.0;
        if self.loss.selfalign() && matches!(self.student, StudentConfig::FeatureHeads { .. }) {
            let key = if self.loss.lca.is_some() {
                "loss.lca"
            } else {
                "loss.cra"
            };
            return Err(ConfigError::new(
                key,
                "SelfAlign aligns words with image regions: it needs a student with local features (`scenes-small` or `clip`); `feature-heads` reads one pooled vector per image and caption",
            ));
        }
        if let Some(l) = self.loss.lca {
            if l.prototypes == 0 {
                return Err(ConfigError::new(
                    "loss.lca.prototypes",
                    "must be at least 1",
                ));
            }
            if !nonneg(l.weight) {
                return Err(ConfigError::new("loss.lca.weight", "must be ≥ 0"));
            }
            if !positive(l.epsilon) {
                return Err(ConfigError::new("loss.lca.epsilon", "must be positive"));
            }
            if !positive(l.temperature) {
                return Err(ConfigError::new("loss.lca.temperature", "must be positive"));
            }
            if l.sinkhorn_iterations == 0 {
                return Err(ConfigError::new(
                    "loss.lca.sinkhorn_iterations",
                    "must be at least 1",
                ));
            }
        }
        if let Some(c) = self.loss.cra {
            if !nonneg(c.weight) {
                return Err(ConfigError::new("loss.cra.weight", "must be ≥ 0"));
            }
            if !positive(c.temperature) {
                return Err(ConfigError::new("loss.cra.temperature", "must be positive"));
            }
            if c.hardest == 0 {
                return Err(ConfigError::new("loss.cra.hardest", "must be at least 1"));
            }
            if let StudentConfig::ScenesSmall {
                image_size,
                channels,
                ..
            } = &self.student
            {
                let (_, grid, _) = crate::ml::scenes_small::region_layer(*image_size, channels);
                let available = (self.batch_size - 1) * grid * grid;
                if c.hardest > available {
                    return Err(ConfigError::new(
                        "loss.cra.hardest",
                        format!(
                            "is {} but a batch of {} has only {available} regions of other images to choose negatives from ({} per image, {grid}×{grid}); lower `hardest` or raise `batch_size`",
                            c.hardest,
                            self.batch_size,
                            grid * grid
                        ),
                    ));
                }
            }
        }
        if self.embedding == Embedding::SelfalignConcat && self.loss.cra.is_none() {
            return Err(ConfigError::new(
                "embedding",
                "`selfalign-concat` concatenates the CRA guides: it needs `loss.cra`",
            ));
        }
        if self.lr_update == Some(0) {
            return Err(ConfigError::new(
                "lr_update",
                "must be at least 1 (epochs between the ×0.1 steps of the learning rate)",
            ));
        }
        if self.lr_update.is_some() && self.lr_min.is_some() {
            return Err(ConfigError::new(
                "lr_min",
                "belongs to the cosine schedule; with `lr_update` (the step schedule) remove it",
            ));
        }
        if let Some(g) = self.grad_clip
            && !positive(g)
        {
            return Err(ConfigError::new("grad_clip", "must be positive"));
        }
        Ok(())
    }

    /// Writes the defaults that depend on other keys (the preset's reduction and temperature
    /// decay, `lr_min` = lr/10) into the config, so the key hashes the values training uses.
    pub fn normalise(&mut self) {
        // Soft labels are read by CSA and USA only: without them the run does not depend on
        // the soft labels (a base run in a matrix with `softlabels:` keeps its key when they
        // change).
        if self.loss.csa.is_none() && self.loss.usa.is_none() {
            self.softlabels = None;
        }
        if self.loss.base == BaseLoss::Infonce {
            self.loss.reduction = Some(self.reduction());
        }
        self.decay_temperatures = Some(self.decay_temperatures());
        if self.lr_update.is_none() {
            self.lr_min = Some(self.lr_min());
        }
    }

    /// The learning rate of epoch `epoch` (0-based): the step schedule with `lr_update`, else
    /// the cosine to `lr_min`.
    pub fn epoch_lr(&self, epoch: usize) -> f64 {
        match self.lr_update {
            Some(every) => crate::ml::optim::step_lr(self.lr, epoch, every),
            None => crate::ml::optim::cosine_lr(self.lr, self.lr_min(), epoch, self.epochs),
        }
    }

    pub fn reduction(&self) -> Reduction {
        self.loss.reduction.unwrap_or(match self.preset {
            Some(Preset::CusaReference | Preset::CusaClip) => Reduction::Reference,
            Some(Preset::SelfalignReference) | None => Reduction::Mean,
        })
    }

    pub fn decay_temperatures(&self) -> bool {
        self.decay_temperatures.unwrap_or(matches!(
            self.preset,
            Some(Preset::CusaReference | Preset::CusaClip)
        ))
    }

    pub fn lr_min(&self) -> f64 {
        self.lr_min.unwrap_or(self.lr / 10.0)
    }
}

/// A student's architecture (`kind` + shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Architecture {
    FeatureHeads(crate::ml::student::FeatureHeadsShape),
    ScenesSmall(crate::ml::scenes_small::ScenesSmallShape),
    Clip(crate::ml::clip::ClipStudentShape),
}

/// What was trained, saved as `config.json` beside the weights (burn `Config`): enough to
/// rebuild the student and to know how it was trained.
#[derive(Config, Debug)]
pub struct TrainingRecord {
    /// The architecture, enough to rebuild the student before loading `model.mpk`.
    pub student: Architecture,
    pub base_loss: String,
    pub reduction: String,
    pub alpha: Option<f64>,
    pub beta: Option<f64>,
    /// The objective's terms, in order (`base`, `csa`, …).
    #[config(default = "Vec::new()")]
    pub terms: Vec<String>,
    pub lca: Option<LcaConfig>,
    pub cra: Option<CraConfig>,
    /// The embedding the best epoch was chosen with.
    #[config(default = "Embedding::Global")]
    pub embedding: Embedding,
    pub lr_update: Option<usize>,
    pub grad_clip: Option<f64>,
    pub epochs: usize,
    pub batch_size: usize,
    /// Batches per optimiser step.
    #[config(default = 1)]
    pub accumulate: usize,
    pub lr: f64,
    /// The cosine's last rate (none with the step schedule).
    pub lr_min: Option<f64>,
    /// Optimiser steps of linear warm-up.
    #[config(default = 0)]
    pub warmup: usize,
    pub weight_decay: f64,
    pub decay_temperatures: bool,
    pub seed: u64,
    pub best_epoch: usize,
    pub backend: String,
    /// What the matrix products computed in during training.
    #[config(default = "Precision::Fp32")]
    pub precision: Precision,
}
