//! The training losses of docs/method.md, exactly: the base InfoNCE with multi-positive
//! targets, the VSE++ hinge with hardest negatives, CSA and USA.
//!
//! Invariants:
//! * every similarity is a cosine (rows L2-normalised with PyTorch's `F.normalize` epsilon);
//! * targets and teacher soft labels carry no gradient;
//! * KL divergences use PyTorch's `batchmean` (sum over all entries / B), with the teacher's
//!   entropy term included, so values equal `nn.KLDivLoss(reduction="batchmean")`;
//! * temperatures are plain tensors here: clamping them is the caller's job, done on the
//!   parameter values before every forward (as the reference code does), so a clamp never
//!   zeroes a gradient;
//! * InfoNCE and CSA compute the caption→image direction for the kind of device they run on
//!   ([`Where`]): a transposed view of S on the host, its own product on a GPU; both forms are
//!   checked.
//!
//! Checked against a float64 numpy implementation of the formulas with finite-difference
//! gradients (`scripts/fixtures/losses.py` → `stages/tests/fixtures/losses.json`).

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

use super::Where;

/// How the base InfoNCE is reduced over the B×B targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reduction {
    /// Sum over a row, mean over rows (Σ/B), the standard InfoNCE; its scale matches the
    /// `batchmean` of CSA/USA, so α and β mean the same at every batch size.
    Mean,
    /// The released CUSA code: mean over all B² entries (Σ/B²), i.e. the standard loss divided
    /// by B; α and β were tuned against it.
    Reference,
}

/// Rows scaled to unit length (`F.normalize`, eps 1e-12).
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// The B×B cosine similarities of the rows of `a` and `b`.
pub fn cosine<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    l2_normalize(a).matmul(l2_normalize(b).transpose())
}

/// `m / t` for a one-element temperature tensor `t`.
fn over<B: Backend>(m: Tensor<B, 2>, t: Tensor<B, 1>) -> Tensor<B, 2> {
    m / t.reshape([1, 1])
}

/// `same[i][j]` = image of row i is the image of row j.
pub fn same_image<B: Backend>(image_ids: &[u64], device: &B::Device) -> Tensor<B, 2, Bool> {
    let n = image_ids.len();
    let mut m = Vec::with_capacity(n * n);
    for a in image_ids {
        for b in image_ids {
            m.push(a == b);
        }
    }
    Tensor::<B, 1, Bool>::from_data(burn::tensor::TensorData::new(m, [n * n]), device)
        .reshape([n, n])
}

/// t_ij = 1[img(i)=img(j)] / Σ_k 1[img(i)=img(k)] (symmetric: rows of one image have equal
/// counts).
pub fn multi_positive_targets<B: Backend>(image_ids: &[u64], device: &B::Device) -> Tensor<B, 2> {
    let same = same_image::<B>(image_ids, device).float();
    let counts = same.clone().sum_dim(1);
    same / counts
}

/// S = cos(f_I, f_T)/τ and the caption→image direction Sᵀ: on the host a transposed view of S
/// (one product); on a device its own product cos(f_T, f_I)/τ, a contiguous matrix, so that no
/// reduction reads a transposed view (burn 0.21's CUDA backend reduced them wrongly on an H200).
/// The same values: each entry is the same dot product.
fn both_ways<B: Backend>(
    f_i: Tensor<B, 2>,
    f_t: Tensor<B, 2>,
    tau: Tensor<B, 1>,
    on: Where,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    match on {
        Where::Host => {
            let s = over(cosine(f_i, f_t), tau);
            (s.clone(), s.transpose())
        }
        Where::Device => (
            over(cosine(f_i.clone(), f_t.clone()), tau.clone()),
            over(cosine(f_t, f_i), tau),
        ),
    }
}

/// Base InfoNCE: ½(CE_i2t + CE_t2i) on S = cos(f_I, f_T)/τ with multi-positive `targets`
/// (symmetric, as [`multi_positive_targets`] makes them: on a device the caption direction
/// reads them as they are rather than through a transposed view).
pub fn infonce<B: Backend>(
    f_i: Tensor<B, 2>,
    f_t: Tensor<B, 2>,
    tau: Tensor<B, 1>,
    targets: Tensor<B, 2>,
    reduction: Reduction,
    on: Where,
) -> Tensor<B, 1> {
    let [b, _] = f_i.dims();
    let (s, s_t) = both_ways(f_i, f_t, tau, on);
    let targets_t = match on {
        Where::Host => targets.clone().transpose(),
        Where::Device => targets.clone(),
    };
    let ce_i2t = -(targets * log_softmax(s, 1)).sum();
    let ce_t2i = -(targets_t * log_softmax(s_t, 1)).sum();
    let scale = match reduction {
        Reduction::Mean => b as f64,
        Reduction::Reference => (b * b) as f64,
    };
    (ce_i2t + ce_t2i) / (2.0 * scale)
}

/// VSE++: Σ over the batch of the hardest-negative hinge in each direction, margin `margin`;
/// rows of the same image are never negatives.
pub fn vse_hardest<B: Backend>(
    f_i: Tensor<B, 2>,
    f_t: Tensor<B, 2>,
    same: Tensor<B, 2, Bool>,
    margin: f64,
) -> Tensor<B, 1> {
    let [b, _] = f_i.dims();
    let s = cosine(f_i, f_t);
    let eye = Tensor::<B, 2>::eye(b, &s.device());
    let diag = (s.clone() * eye).sum_dim(1); // [B, 1]
    let cost_t = (s.clone() - diag.clone() + margin)
        .clamp_min(0.0)
        .mask_fill(same.clone(), 0.0);
    let cost_i = (s - diag.transpose() + margin)
        .clamp_min(0.0)
        .mask_fill(same, 0.0);
    cost_t.max_dim(1).sum() + cost_i.max_dim(0).sum()
}

/// Teacher soft labels P_ij = softmax_j(cos(x_i, x_j)/τ_s), without gradient.
pub fn soft_labels<B: Backend>(teacher: Tensor<B, 2>, tau_s: f64) -> Tensor<B, 2> {
    let t = teacher.detach();
    softmax(cosine(t.clone(), t) / tau_s, 1).detach()
}

/// KL(P‖Q) with `batchmean`: Σ_ij P_ij (log P_ij − log Q_ij) / B, given log Q.
pub fn kl_batchmean<B: Backend>(p: Tensor<B, 2>, log_q: Tensor<B, 2>) -> Tensor<B, 1> {
    let [b, _] = p.dims();
    (p.clone() * (log_soft_labels(p) - log_q)).sum() / b as f64
}

/// log P of soft labels, zeros clamped to 1e-30 (both KL directions read it).
fn log_soft_labels<B: Backend>(p: Tensor<B, 2>) -> Tensor<B, 2> {
    p.clamp_min(1e-30).log()
}

/// KL(Q‖P) with `batchmean`: Σ_ij Q_ij (log Q_ij − log P_ij) / B, given log Q — the reverse
/// of [`kl_batchmean`] (mode-seeking: the student's mass goes where the teacher's is, rather
/// than covering all of the teacher's).
pub fn kl_reverse_batchmean<B: Backend>(p: Tensor<B, 2>, log_q: Tensor<B, 2>) -> Tensor<B, 1> {
    let [b, _] = p.dims();
    (log_q.clone().exp() * (log_q - log_soft_labels(p))).sum() / b as f64
}

/// Which way CSA and USA measure the distance of the student's distribution Q to the
/// teachers' P: `forward` KL(P‖Q) (the paper's and its code's), or `reverse` KL(Q‖P).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kl {
    #[default]
    Forward,
    Reverse,
}

impl Kl {
    /// The divergence, batchmean, given P and log Q.
    pub fn of<B: Backend>(self, p: Tensor<B, 2>, log_q: Tensor<B, 2>) -> Tensor<B, 1> {
        match self {
            Kl::Forward => kl_batchmean(p, log_q),
            Kl::Reverse => kl_reverse_batchmean(p, log_q),
        }
    }
}

/// CSA without α: ½(KL(P^II‖Q^i2t) + KL(P^TT‖Q^t2i)), Q from cos(f_I, f_T)/τ_c (each KL
/// the other way round with [`Kl::Reverse`]).
pub fn csa<B: Backend>(
    f_i: Tensor<B, 2>,
    f_t: Tensor<B, 2>,
    tau_c: Tensor<B, 1>,
    p_image: Tensor<B, 2>,
    p_text: Tensor<B, 2>,
    kl: Kl,
    on: Where,
) -> Tensor<B, 1> {
    let (s, s_t) = both_ways(f_i, f_t, tau_c, on);
    (kl.of(p_image, log_softmax(s, 1)) + kl.of(p_text, log_softmax(s_t, 1))) / 2.0
}

/// USA without β: ½(KL(P^II‖Q^II) + KL(P^TT‖Q^TT)), Q from the uni heads' own similarities
/// (each KL the other way round with [`Kl::Reverse`]).
pub fn usa<B: Backend>(
    g_i: Tensor<B, 2>,
    g_t: Tensor<B, 2>,
    tau_ui: Tensor<B, 1>,
    tau_ut: Tensor<B, 1>,
    p_image: Tensor<B, 2>,
    p_text: Tensor<B, 2>,
    kl: Kl,
) -> Tensor<B, 1> {
    let q_ii = log_softmax(over(cosine(g_i.clone(), g_i), tau_ui), 1);
    let q_tt = log_softmax(over(cosine(g_t.clone(), g_t), tau_ut), 1);
    (kl.of(p_image, q_ii) + kl.of(p_text, q_tt)) / 2.0
}
