//! SelfAlign (TMM 2023) for dual encoders with local features, exactly as docs/method.md
//! states it: the concept-level term (LCA: words predict the prototype assignment of the image
//! region they match) and the context-level term (CRA: a global guide per modality against the
//! other modality's locals), with their learnable parameters.
//!
//! Invariants:
//! * the Sinkhorn assignments, the word → region matches and every image-side input of LCA
//!   carry no gradient (the reference detaches the image side); the prototypes get gradients
//!   only through the words' predictions, and none while frozen (the caller passes them
//!   detached);
//! * LCA reads L2-normalised locals; prototype rows are unit length at every step (the student
//!   re-normalises them before every forward, with the temperature clamp);
//! * padding never counts: padded words are neither predicted, nor positives, nor negatives,
//!   and they do not enter the means a guide is computed from;
//! * a guide's batch norm normalises with the batch's statistics in training (biased variance,
//!   as PyTorch's `BatchNorm1d`) and with its running statistics at inference; the running
//!   statistics are plain values (momentum 0.1, unbiased variance), updated by the training loop
//!   after each step, never by gradients — so they are in the checkpoint and a resumed run ends
//!   with the same bytes.
//!
//! Checked against a float64 numpy implementation with finite-difference gradients
//! (`scripts/fixtures/selfalign.py` → `stages/tests/fixtures/selfalign.json`).

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{log_softmax, relu, softplus};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Distribution, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// `loss.lca:` — the concept-level term.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LcaConfig {
    #[serde(default = "one")]
    pub weight: f64,
    /// Number of prototypes K.
    #[serde(default = "default_prototypes")]
    pub prototypes: usize,
    /// Sinkhorn's entropy ε.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    #[serde(default = "default_sinkhorn_iterations")]
    pub sinkhorn_iterations: usize,
    /// Temperature of the words' prototype predictions.
    #[serde(default = "default_lca_temperature")]
    pub temperature: f64,
    /// Epochs during which the prototypes get no gradient.
    #[serde(default = "one_usize")]
    pub freeze_epochs: usize,
}

impl Default for LcaConfig {
    fn default() -> Self {
        Self {
            weight: 1.0,
            prototypes: default_prototypes(),
            epsilon: default_epsilon(),
            sinkhorn_iterations: default_sinkhorn_iterations(),
            temperature: default_lca_temperature(),
            freeze_epochs: 1,
        }
    }
}

/// `loss.cra:` — the context-level term.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CraConfig {
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default = "default_cra_temperature")]
    pub temperature: f64,
    /// Negatives kept per guide (the most similar locals of the other samples).
    #[serde(default = "default_hardest")]
    pub hardest: usize,
}

impl Default for CraConfig {
    fn default() -> Self {
        Self {
            weight: 1.0,
            temperature: default_cra_temperature(),
            hardest: default_hardest(),
        }
    }
}

fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn default_prototypes() -> usize {
    1024
}
fn default_epsilon() -> f64 {
    0.05
}
fn default_sinkhorn_iterations() -> usize {
    2
}
fn default_lca_temperature() -> f64 {
    0.1
}
fn default_cra_temperature() -> f64 {
    0.7
}
fn default_hardest() -> usize {
    512
}

/// What a student's SelfAlign parameters are rebuilt from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfAlignShape {
    /// Width of the locals (and of the prototypes and guides).
    pub dim: usize,
    /// K prototypes (LCA), 0 without LCA.
    pub prototypes: usize,
    /// Guide heads (CRA).
    pub guides: bool,
}

/// The per-position features of a batch, one modality: `states` `[b, n, d]` and `valid`
/// `[b, n]` (1 for a real word or region, 0 for padding).
#[derive(Debug, Clone)]
pub struct Locals<B: Backend> {
    pub states: Tensor<B, 3>,
    pub valid: Tensor<B, 2>,
}

impl<B: Backend> Locals<B> {
    /// Locals without padding (image regions).
    pub fn dense(states: Tensor<B, 3>) -> Self {
        let [b, n, _] = states.dims();
        let valid = Tensor::ones([b, n], &states.device());
        Self { states, valid }
    }

    /// The mean of each row's valid locals, `[b, d]`.
    pub fn mean(&self) -> Tensor<B, 2> {
        let [b, n, d] = self.states.dims();
        let keep = self.valid.clone().reshape([b, n, 1]);
        let count = self.valid.clone().sum_dim(1).clamp_min(1.0);
        (self.states.clone() * keep).sum_dim(1).reshape([b, d]) / count
    }
}

/// Rows of `[b, n, d]` scaled to unit length along the last axis (`F.normalize`, eps 1e-12).
pub fn l2_normalize3<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let norm = x.clone().square().sum_dim(2).sqrt().clamp_min(1e-12);
    x / norm
}

/// Soft assignments of `scores` `[n, k]` (cosines of n items to k prototypes) by SwAV's
/// Sinkhorn–Knopp: equal mass per prototype, each row summing to 1. No gradient.
pub fn sinkhorn<B: Backend>(scores: Tensor<B, 2>, epsilon: f64, iterations: usize) -> Tensor<B, 2> {
    let [n, k] = scores.dims();
    let s = scores.detach();
    // exp(s/ε) up to a constant factor, which the first normalisation removes.
    let max = s.clone().max().reshape([1, 1]);
    let mut q = ((s - max) / epsilon).exp();
    q = q.clone() / q.sum().reshape([1, 1]);
    for _ in 0..iterations {
        q = q.clone() / q.sum_dim(0) / k as f64;
        q = q.clone() / q.sum_dim(1) / n as f64;
    }
    (q * n as f64).detach()
}

/// LCA (without its weight): each valid word predicts, through softmax(prototypes · t / τ), the
/// Sinkhorn assignment of the region of its paired image it is most similar to; cross-entropy
/// averaged over a caption's valid words, then over captions. `image` and `text` are the pairs'
/// locals (row i of both belong to pair i); `prototypes` `[k, d]` are unit rows (detached while
/// frozen).
pub fn lca<B: Backend>(
    image: &Locals<B>,
    text: &Locals<B>,
    prototypes: Tensor<B, 2>,
    epsilon: f64,
    iterations: usize,
    temperature: f64,
) -> Tensor<B, 1> {
    let [b, r, d] = image.states.dims();
    let [_, l, _] = text.states.dims();
    let device = image.states.device();
    let v = l2_normalize3(image.states.clone()).detach();
    let t = l2_normalize3(text.states.clone());
    let q = sinkhorn(
        v.clone()
            .reshape([b * r, d])
            .matmul(prototypes.clone().detach().transpose()),
        epsilon,
        iterations,
    );
    // The region of its own image each word matches best: row b·r + argmax of the flat list.
    let best = t.clone().detach().matmul(v.swap_dims(1, 2)).argmax(2); // [b, l, 1]
    let offsets = Tensor::<B, 1, Int>::arange(0..b as i64, &device).reshape([b, 1, 1]) * r as i64;
    let target = q.select(0, (best + offsets).reshape([b * l]));
    let logits = t.reshape([b * l, d]).matmul(prototypes.transpose()) / temperature;
    let ce = (target * log_softmax(logits, 1))
        .sum_dim(1)
        .neg()
        .reshape([b, l]);
    let count = text.valid.clone().sum_dim(1).clamp_min(1.0);
    ((ce * text.valid.clone()).sum_dim(1) / count).mean()
}

/// `log Σ exp` along axis 1, `[b, n]` → `[b, 1]`.
fn logsumexp<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let m = x.clone().max_dim(1).detach();
    m.clone() + (x - m).exp().sum_dim(1).log()
}

/// Value far below any scaled cosine: excluded candidates (exp of it is 0).
const EXCLUDED: f64 = -1e9;

/// One direction of CRA: each guide (row i of `guides`, `[b, d]`) against the valid locals of
/// its own pair (positives) and the `hardest` most similar valid locals of samples showing
/// another image (negatives; `same[i][j]` is true when pairs i and j show the same image), by
/// InfoNCE on cosines / `temperature`: per positive p, −log(e^p / (e^p + Σ_neg e^n)), averaged
/// over a guide's positives, then over guides. Fewer candidates than `hardest` keeps them all.
pub fn cra_direction<B: Backend>(
    guides: Tensor<B, 2>,
    locals: &Locals<B>,
    same: Tensor<B, 2, Bool>,
    temperature: f64,
    hardest: usize,
) -> Tensor<B, 1> {
    let [b, n, d] = locals.states.dims();
    let g = super::loss::l2_normalize(guides);
    let l = l2_normalize3(locals.states.clone());
    let positives = (g.clone().reshape([b, 1, d]) * l.clone())
        .sum_dim(2)
        .reshape([b, n])
        / temperature;
    let scores = g.matmul(l.reshape([b * n, d]).transpose()) / temperature; // [b, b·n]
    let invalid = locals.valid.clone().equal_elem(0.0).reshape([1, b * n]);
    let excluded = same
        .reshape([b, b, 1])
        .expand([b, b, n])
        .reshape([b, b * n])
        .bool_or(invalid.expand([b, b * n]));
    let candidates = scores.mask_fill(excluded, EXCLUDED);
    let k = hardest.min(b * n).max(1);
    let (_, idx) = candidates.clone().detach().topk_with_indices(k, 1);
    let negatives = logsumexp(candidates.gather(1, idx)); // [b, 1]
    let per_positive = softplus(negatives - positives, 1.0);
    let count = locals.valid.clone().sum_dim(1).clamp_min(1.0);
    ((per_positive * locals.valid.clone()).sum_dim(1) / count).mean()
}

/// Batch statistics of a guide's pre-norm activations, for the running statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    pub mean: Vec<f32>,
    /// Unbiased (n − 1) variance, as PyTorch's running variance takes it.
    pub var: Vec<f32>,
}

/// ReLU(BatchNorm(Linear(x))): a modality's global guide from the mean of its locals.
#[derive(Module, Debug)]
pub struct Guide<B: Backend> {
    pub linear: Linear<B>,
    pub gamma: Param<Tensor<B, 1>>,
    pub beta: Param<Tensor<B, 1>>,
    /// Running statistics (no gradient; see the module's invariants).
    pub running_mean: Param<Tensor<B, 1>>,
    pub running_var: Param<Tensor<B, 1>>,
}

/// PyTorch's `BatchNorm1d` defaults.
pub const BN_EPSILON: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

fn constant<B: Backend>(v: f32, d: usize, device: &B::Device) -> Param<Tensor<B, 1>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(vec![v; d], [d]), device))
        .set_require_grad(false)
}

impl<B: Backend> Guide<B> {
    pub fn new(d: usize, device: &B::Device) -> Self {
        Self {
            linear: LinearConfig::new(d, d).init(device),
            gamma: Param::from_tensor(Tensor::ones([d], device)),
            beta: Param::from_tensor(Tensor::zeros([d], device)),
            running_mean: constant(0.0, d, device),
            running_var: constant(1.0, d, device),
        }
    }

    fn affine(&self, normalised: Tensor<B, 2>) -> Tensor<B, 2> {
        let d = normalised.dims()[1];
        relu(normalised * self.gamma.val().reshape([1, d]) + self.beta.val().reshape([1, d]))
    }

    /// Training mode: normalised with the batch's statistics; returns them for the running
    /// statistics.
    pub fn forward_train(&self, x: Tensor<B, 2>) -> (Tensor<B, 2>, BatchStats) {
        let h = self.linear.forward(x);
        let [b, _] = h.dims();
        let mean = h.clone().mean_dim(0);
        let centred = h - mean.clone();
        let var = centred.clone().square().mean_dim(0);
        let stats = BatchStats {
            mean: values(mean),
            var: values(var.clone())
                .into_iter()
                .map(|v| v * b as f32 / (b.max(2) - 1) as f32)
                .collect(),
        };
        (self.affine(centred / (var + BN_EPSILON).sqrt()), stats)
    }

    /// Inference mode: normalised with the running statistics.
    pub fn forward_eval(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let h = self.linear.forward(x);
        let d = h.dims()[1];
        let mean = self.running_mean.val().reshape([1, d]);
        let std = (self.running_var.val().reshape([1, d]) + BN_EPSILON).sqrt();
        self.affine((h - mean) / std)
    }

    /// The guide with its running statistics moved towards a batch's (momentum 0.1).
    pub fn update_running(mut self, stats: &BatchStats) -> Self {
        let blend = |p: Param<Tensor<B, 1>>, batch: &[f32]| {
            p.map(|t| {
                let device = t.device();
                let old = values(t);
                let new: Vec<f32> = old
                    .iter()
                    .zip(batch)
                    .map(|(o, n)| {
                        ((1.0 - BN_MOMENTUM) * *o as f64 + BN_MOMENTUM * *n as f64) as f32
                    })
                    .collect();
                let d = new.len();
                Tensor::from_data(TensorData::new(new, [d]), &device)
            })
        };
        self.running_mean = blend(self.running_mean, &stats.mean).set_require_grad(false);
        self.running_var = blend(self.running_var, &stats.var).set_require_grad(false);
        self
    }
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.detach()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default()
}

/// A student's SelfAlign parameters: the LCA prototypes and the CRA guide heads.
#[derive(Module, Debug)]
pub struct SelfAlign<B: Backend> {
    /// `[k, d]`, unit rows.
    pub prototypes: Option<Param<Tensor<B, 2>>>,
    pub image_guide: Option<Guide<B>>,
    pub text_guide: Option<Guide<B>>,
}

/// The running-statistics updates of one training batch (image, text).
pub type GuideStats = (BatchStats, BatchStats);

impl<B: Backend> SelfAlign<B> {
    /// Prototypes N(0, 1) then unit rows (as SwAV's normalised linear layer starts); guides
    /// with burn's Linear initialisation, γ 1, β 0, running mean 0 and variance 1.
    pub fn new(shape: SelfAlignShape, device: &B::Device) -> Self {
        let prototypes = (shape.prototypes > 0).then(|| {
            let p = Tensor::random(
                [shape.prototypes, shape.dim],
                Distribution::Normal(0.0, 1.0),
                device,
            );
            Param::from_tensor(super::loss::l2_normalize(p))
        });
        Self {
            prototypes,
            image_guide: shape.guides.then(|| Guide::new(shape.dim, device)),
            text_guide: shape.guides.then(|| Guide::new(shape.dim, device)),
        }
    }

    /// Prototype rows scaled to unit length (same parameter, still trainable).
    pub fn normalised(mut self) -> Self {
        self.prototypes = self.prototypes.map(|p| {
            p.map(|t| super::loss::l2_normalize(t.detach().set_require_grad(false)).require_grad())
        });
        self
    }

    /// Both guides' running statistics moved towards a batch's.
    pub fn update_running(mut self, stats: &GuideStats) -> Self {
        self.image_guide = self.image_guide.map(|g| g.update_running(&stats.0));
        self.text_guide = self.text_guide.map(|g| g.update_running(&stats.1));
        self
    }
}
