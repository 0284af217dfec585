//! The `with:` of a train stage, and the record of it saved beside the weights.

use burn::config::Config;
use serde::{Deserialize, Serialize};

use crate::api::ConfigError;
pub use crate::device::Device;
use crate::ml::loss::Reduction;

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
    /// Peak learning rate (first epoch).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Learning rate of the last epoch (cosine in between) [default: lr / 10].
    pub lr_min: Option<f64>,
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
}

fn default_epochs() -> usize {
    10
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
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            base: BaseLoss::Infonce,
            reduction: None,
            margin: default_margin(),
            csa: None,
            usa: None,
        }
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
        Ok(())
    }

    pub fn reduction(&self) -> Reduction {
        self.loss.reduction.unwrap_or(match self.preset {
            Some(Preset::CusaReference) => Reduction::Reference,
            None => Reduction::Mean,
        })
    }

    pub fn decay_temperatures(&self) -> bool {
        self.decay_temperatures
            .unwrap_or(self.preset == Some(Preset::CusaReference))
    }

    pub fn lr_min(&self) -> f64 {
        self.lr_min.unwrap_or(self.lr / 10.0)
    }
}

/// What was trained, saved as `config.json` beside the weights (burn `Config`): enough to
/// rebuild the student and to know how it was trained.
#[derive(Config, Debug)]
pub struct TrainingRecord {
    pub student: String,
    pub image_dim: usize,
    pub text_dim: usize,
    pub hidden: usize,
    pub dim: usize,
    pub uni_heads: bool,
    pub base_loss: String,
    pub reduction: String,
    pub alpha: Option<f64>,
    pub beta: Option<f64>,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub lr_min: f64,
    pub weight_decay: f64,
    pub decay_temperatures: bool,
    pub seed: u64,
    pub best_epoch: usize,
    pub backend: String,
}
