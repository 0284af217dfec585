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
//!   with the same bytes;
//! * CRA's "hardest negatives" are a weight mask over every candidate (1 above the k-th
//!   largest score, a share on its copies): exactly a sorted top-k's sum, ties included;
//! * Sinkhorn gives the same assignments computed on the host (CPU backends) or with tensor
//!   operations (GPU), and the host's sums have a fixed order (same bytes on any thread count);
//! * [`lca`] and [`cra_direction`] compute one function in two places: with tensor operations
//!   and autodiff ([`Where::Device`], a GPU) or by hand with their gradients on the host
//!   ([`Where::Host`], a CPU backend: `selfalign_host`).
//!
//! Checked against a float64 numpy implementation with finite-difference gradients
//! (`scripts/fixtures/selfalign.py` → `stages/tests/fixtures/selfalign.json`).

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{log_softmax, relu, softplus};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::Where;
use super::selfalign_host as host;
use std::any::Any;
use std::cell::RefCell;
use std::rc::Rc;

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
        let valid = Tensor::ones([b, n], (&states.device(), states.dtype()));
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

/// The host copies of one evaluation's locals, shared by the host terms (LCA reads both
/// modalities, each CRA direction one): each `Locals` is read and normalised once, by the first
/// term that needs it. A `Share` borrows the locals it holds copies of, so they cannot change
/// or go while it lives (one objective evaluation); the device path does not use it.
pub struct Share<'a, B: Backend> {
    held: RefCell<Vec<Held<'a, B>>>,
}

/// Locals and their host copy (a `HostLocals` of the backend's float type).
type Held<'a, B> = (&'a Locals<B>, Rc<dyn Any>);

impl<B: Backend> Default for Share<'_, B> {
    fn default() -> Self {
        Self {
            held: RefCell::new(Vec::new()),
        }
    }
}

impl<'a, B: Backend> Share<'a, B> {
    /// `locals` on the host in `T`: unit rows, their norms and the validity.
    pub(crate) fn host<T: host::Real>(&self, locals: &'a Locals<B>) -> Rc<host::HostLocals<T>> {
        let mut held = self.held.borrow_mut();
        let same = held
            .iter()
            .find(|(l, _)| std::ptr::eq(*l, locals))
            .and_then(|(_, h)| h.clone().downcast::<host::HostLocals<T>>().ok());
        same.unwrap_or_else(|| {
            let made = Rc::new(host::HostLocals::<T>::of(locals));
            held.push((locals, made.clone()));
            made
        })
    }
}

/// Rows of `[b, n, d]` scaled to unit length along the last axis (`F.normalize`, eps 1e-12).
pub fn l2_normalize3<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let norm = x.clone().square().sum_dim(2).sqrt().clamp_min(1e-12);
    // A product with the reciprocal: its backward is two full-size passes fewer than a
    // quotient's.
    x * norm.recip()
}

/// SwAV's Sinkhorn–Knopp assignments kept in scaling form: Q = n · diag(u) · E · diag(v) with
/// E = exp((s − max s)/ε). Each of the reference's normalisations (columns to mass 1/k, rows to
/// 1/n) only rescales columns or rows, so it updates v or u from one pass over E instead of
/// rewriting the n × k matrix: E is computed once, and a caller that needs a few rows of Q
/// (LCA: the regions words match) never forms the rest.
///
/// Two places to compute it, same function: on the host ([`Where::Host`], a CPU backend:
/// plain loops, E computed in place in the scores' own buffer, rows in parallel, column sums
/// in fixed blocks so the bytes do not depend on the thread count) or with tensor operations
/// where the tensors live ([`Where::Device`], a GPU: no copy to the host).
pub struct Assignments<B: Backend> {
    inner: Scaling<B>,
    n: usize,
    k: usize,
    device: B::Device,
}

enum Scaling<B: Backend> {
    Device {
        kernel: Tensor<B, 2>,
        /// u, `[n, 1]`.
        rows: Tensor<B, 2>,
        /// v, `[1, k]`.
        cols: Tensor<B, 2>,
    },
    Host {
        kernel: Vec<f32>,
        rows: Vec<f64>,
        cols: Vec<f64>,
    },
}

/// Rows per block of the host column sums (fixed, so the sums' order is too).
const BLOCK_ROWS: usize = 256;

/// E = exp((s − max s)/ε) of host scores, in f32 (computed in f64 when the scores are).
pub(crate) fn host_kernel(scores: TensorData, epsilon: f64) -> Vec<f32> {
    if scores.dtype == burn::tensor::DType::F64 {
        return host_kernel_f64(&scores.into_vec().expect("f64 scores"), epsilon);
    }
    host_kernel_f32(
        scores
            .convert::<f32>()
            .into_vec()
            .expect("converted to f32"),
        epsilon,
    )
}

/// [`host_kernel`] of f64 scores.
pub(crate) fn host_kernel_f64(s: &[f64], epsilon: f64) -> Vec<f32> {
    use rayon::prelude::*;
    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    s.par_iter()
        .map(|&x| ((x - max) / epsilon).exp() as f32)
        .collect()
}

/// [`host_kernel`] of f32 scores, in place.
pub(crate) fn host_kernel_f32(mut e: Vec<f32>, epsilon: f64) -> Vec<f32> {
    use rayon::prelude::*;
    let max = e
        .par_chunks(1 << 14)
        .map(|c| c.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .reduce(|| f32::NEG_INFINITY, f32::max);
    let scale = (1.0 / epsilon) as f32;
    e.par_chunks_mut(1 << 14)
        .for_each(|c| super::fast_exp::exp_shifted(c, max, scale));
    e
}

/// u and v after `iterations` column-then-row normalisations of E (`n × k`, row-major).
///
/// In passes over blocks of [`BLOCK_ROWS`] rows, each pass doing one normalisation's rows and
/// the next one's column sums while a row is in cache: the first pass sums every row (for the
/// total) and every column, each later pass makes the rows' scales from the columns' and adds
/// the rows, so scaled, into the next column sums. `iterations` normalisations take
/// `iterations + 1` passes over E. Each column sum adds its blocks in block order, so the
/// result does not depend on the thread count.
pub(crate) fn host_scaling(
    e: &[f32],
    n: usize,
    k: usize,
    iterations: usize,
) -> (Vec<f64>, Vec<f64>) {
    use rayon::prelude::*;
    // One pass: per row r_i = Σ_j E_ij (cols None) or 1 / (n Σ_j E_ij v_j); with `sums`, each
    // block's Σ_i w_i E_ij, w_i = 1 or r_i. Returns the rows' values and the column sums.
    let pass = |cols: Option<&[f64]>, sums: bool| -> (Vec<f64>, Option<Vec<f64>>) {
        let mut rows = vec![0.0f64; n];
        let p = Pass {
            k,
            cols,
            n: n as f64,
        };
        let partial: Vec<Option<Vec<f64>>> = e
            .par_chunks(BLOCK_ROWS * k.max(1))
            .zip(rows.par_chunks_mut(BLOCK_ROWS))
            .map(|(block, out)| {
                let mut col = sums.then(|| vec![0.0f64; k]);
                scaling_block(p, block, out, col.as_deref_mut());
                col
            })
            .collect();
        let sums = sums.then(|| {
            partial
                .into_iter()
                .flatten()
                .fold(vec![0.0; k], |mut a, p| {
                    a.iter_mut().zip(p).for_each(|(a, p)| *a += p);
                    a
                })
        });
        (rows, sums)
    };
    let (row_totals, col_totals) = pass(None, iterations > 0);
    let total: f64 = row_totals
        .chunks(BLOCK_ROWS)
        .map(|c| c.iter().sum::<f64>())
        .collect::<Vec<f64>>()
        .iter()
        .sum();
    let mut rows = vec![1.0 / total; n];
    let mut cols = vec![1.0; k];
    // Σ_i u_i E_ij with u_i = 1/total for the first normalisation.
    let mut col_sums = col_totals.map(|c| c.into_iter().map(|s| s / total).collect::<Vec<_>>());
    for it in 0..iterations {
        let sums = col_sums
            .take()
            .expect("each pass before the last sums the columns");
        cols = sums.into_iter().map(|c| 1.0 / (k as f64 * c)).collect();
        let (r, next) = pass(Some(&cols), it + 1 < iterations);
        rows = r;
        col_sums = next;
    }
    (rows, cols)
}

/// One pass of [`host_scaling`]: `k` columns, the column scales v (`None`: plain sums), `n`
/// rows in all.
#[derive(Clone, Copy)]
struct Pass<'a> {
    k: usize,
    cols: Option<&'a [f64]>,
    n: f64,
}

/// One block of a [`Pass`], 4 f64 lanes at a time where the CPU has AVX2 (no fused
/// multiply-add either way: the same bits).
fn scaling_block(p: Pass<'_>, block: &[f32], out: &mut [f64], sums: Option<&mut [f64]>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { scaling_block_avx2(p, block, out, sums) };
        return;
    }
    scaling_block_plain(p, block, out, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn scaling_block_avx2(p: Pass<'_>, block: &[f32], out: &mut [f64], sums: Option<&mut [f64]>) {
    scaling_block_plain(p, block, out, sums)
}

#[inline(always)]
fn scaling_block_plain(p: Pass<'_>, block: &[f32], out: &mut [f64], mut sums: Option<&mut [f64]>) {
    let Pass { k, cols, n } = p;
    for (row, r) in block.chunks_exact(k.max(1)).zip(out.iter_mut()) {
        let (value, weight) = match cols {
            None => (dot_lanes(row, None), 1.0),
            Some(v) => {
                let scale = 1.0 / (n * dot_lanes(row, Some(v)));
                (scale, scale)
            }
        };
        *r = value;
        if let Some(sums) = sums.as_deref_mut() {
            for (c, &x) in sums.iter_mut().zip(row) {
                *c += weight * x as f64;
            }
        }
    }
}

/// Σ xᵢ·yᵢ (y = 1 when `None`) in f64, over eight interleaved partial sums: one fixed order
/// that the compiler turns into vector instructions (a plain running sum cannot be).
#[inline(always)]
fn dot_lanes(x: &[f32], y: Option<&[f64]>) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let whole = x.len() / LANES * LANES;
    match y {
        Some(y) => {
            for (xs, ys) in x[..whole].chunks_exact(LANES).zip(y.chunks_exact(LANES)) {
                for ((a, &x), &y) in acc.iter_mut().zip(xs).zip(ys) {
                    *a += x as f64 * y;
                }
            }
            for (i, &x) in x[whole..].iter().enumerate() {
                acc[i] += x as f64 * y[whole + i];
            }
        }
        None => {
            for xs in x[..whole].chunks_exact(LANES) {
                for (a, &x) in acc.iter_mut().zip(xs) {
                    *a += x as f64;
                }
            }
            for (i, &x) in x[whole..].iter().enumerate() {
                acc[i] += x as f64;
            }
        }
    }
    acc.iter().sum()
}

impl<B: Backend> Assignments<B> {
    /// Scores `[n, k]` (cosines of n items to k prototypes) → the assignments after
    /// `iterations` column-then-row normalisations. No gradient.
    pub fn new(scores: Tensor<B, 2>, epsilon: f64, iterations: usize, place: Where) -> Self {
        let [n, k] = scores.dims();
        let device = scores.device();
        let s = scores.detach();
        let inner = match place {
            Where::Host => {
                let kernel = host_kernel(s.into_data(), epsilon);
                let (rows, cols) = host_scaling(&kernel, n, k, iterations);
                Scaling::Host { kernel, rows, cols }
            }
            Where::Device => {
                // exp(s/ε) up to a constant factor, which the first normalisation removes.
                let max = s.clone().max().reshape([1, 1]);
                let kernel = (s - max).mul_scalar(1.0 / epsilon).exp();
                // The reference's first step divides by the total (it matters with no
                // iteration).
                // In the kernel's float type: a device's default type is fixed by the first
                // tensor made on it in the process, and need not be this one.
                let dtype = kernel.dtype();
                let mut rows =
                    Tensor::ones([n, 1], (&device, dtype)) / kernel.clone().sum().reshape([1, 1]);
                let mut cols = Tensor::ones([1, k], (&device, dtype));
                for _ in 0..iterations {
                    // Column sums of diag(u)·E·diag(v) are (uᵀE)_j·v_j: dividing them by
                    // k·(uᵀE)_j·v_j leaves v_j = 1/(k·(uᵀE)_j); rows likewise.
                    let col = (kernel.clone() * rows).sum_dim(0);
                    cols = (col * k as f64).recip();
                    let row = (kernel.clone() * cols.clone()).sum_dim(1);
                    rows = (row * n as f64).recip();
                }
                Scaling::Device { kernel, rows, cols }
            }
        };
        Self {
            inner,
            n,
            k,
            device,
        }
    }

    /// Rows `index` of Q, `[index.len, k]`.
    pub fn select(&self, index: &[usize]) -> Tensor<B, 2> {
        let (n, k) = (self.n as f64, self.k);
        match &self.inner {
            Scaling::Device { kernel, rows, cols } => {
                let index = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(index.iter().map(|&i| i as i64).collect(), [index.len()])
                        .convert::<B::IntElem>(),
                    &self.device,
                );
                let u = rows.clone().select(0, index.clone());
                (kernel.clone().select(0, index) * u * cols.clone() * n).detach()
            }
            Scaling::Host { kernel, rows, cols } => {
                let mut q = Vec::with_capacity(index.len() * k);
                for &i in index {
                    let scale = n * rows[i];
                    q.extend(
                        kernel[i * k..(i + 1) * k]
                            .iter()
                            .zip(cols)
                            .map(|(&x, &v)| scale * x as f64 * v),
                    );
                }
                Tensor::from_data(
                    TensorData::new(q, [index.len(), k]).convert::<B::FloatElem>(),
                    &self.device,
                )
            }
        }
    }

    /// All of Q, `[n, k]`.
    pub fn dense(self) -> Tensor<B, 2> {
        let all: Vec<usize> = (0..self.n).collect();
        self.select(&all)
    }
}

/// Soft assignments of `scores` `[n, k]` (cosines of n items to k prototypes) by SwAV's
/// Sinkhorn–Knopp: equal mass per prototype, each row summing to 1. No gradient.
pub fn sinkhorn<B: Backend>(
    scores: Tensor<B, 2>,
    epsilon: f64,
    iterations: usize,
    place: Where,
) -> Tensor<B, 2> {
    Assignments::new(scores, epsilon, iterations, place).dense()
}

/// LCA (without its weight): each valid word predicts, through softmax(prototypes · t / τ), the
/// Sinkhorn assignment of the region of its paired image it is most similar to; cross-entropy
/// averaged over a caption's valid words, then over captions. `image` and `text` are the pairs'
/// locals (row i of both belong to pair i); `prototypes` `[k, d]` are unit rows (detached while
/// frozen).
pub fn lca<'a, B: Backend>(
    image: &'a Locals<B>,
    text: &'a Locals<B>,
    prototypes: Tensor<B, 2>,
    c: &LcaConfig,
    place: Where,
    share: &Share<'a, B>,
) -> Tensor<B, 1> {
    if place == Where::Host {
        return lca_on_host(image, text, prototypes, c, share);
    }
    let [b, r, d] = image.states.dims();
    let [_, l, _] = text.states.dims();
    let v = l2_normalize3(image.states.clone()).detach();
    let t = l2_normalize3(text.states.clone());
    let q = Assignments::new(
        v.clone()
            .reshape([b * r, d])
            .matmul(prototypes.clone().detach().transpose()),
        c.epsilon,
        c.sinkhorn_iterations,
        place,
    );
    // The region of its own image each word matches best: row b·r + argmax of the flat list.
    let best = t.clone().detach().matmul(v.swap_dims(1, 2)).argmax(2); // [b, l, 1]
    let best: Vec<i64> = best
        .into_data()
        .convert::<i64>()
        .into_vec()
        .expect("converted to i64");
    let rows: Vec<usize> = best
        .iter()
        .enumerate()
        .map(|(w, &region)| (w / l) * r + region as usize)
        .collect();
    let target = q.select(&rows);
    let logits = t.reshape([b * l, d]).matmul(prototypes.transpose()) / c.temperature;
    let ce = (target * log_softmax(logits, 1))
        .sum_dim(1)
        .neg()
        .reshape([b, l]);
    let count = text.valid.clone().sum_dim(1).clamp_min(1.0);
    ((ce * text.valid.clone()).sum_dim(1) / count).mean()
}

/// Stands for the log-sum of a guide with no negative at all (every local in the batch is its
/// own image's or padding): far below any scaled cosine, so its softplus and gradient are 0.
pub(crate) const NO_NEGATIVES: f64 = -1e9;

/// Host-side selection of CRA's hardest negatives for one direction: for guide i, the valid
/// locals of pairs showing another image, and among them the `k` most similar, as weights over
/// all b·n locals — 1 above the k-th largest score, the k-th value's share (places left ÷
/// copies) on each copy of it, 0 elsewhere — so Σ w·e^x is exactly the sum over a top-k
/// selection (tied scores are equal whichever copies a sort keeps: repeated images give exact
/// ties) and the gradient needs no gather or scatter. `shift` is each row's largest candidate
/// (for a stable log-sum-exp), `None` where a guide has no candidate at all.
pub(crate) struct Hardest {
    pub(crate) weights: Vec<f32>,
    pub(crate) shift: Vec<Option<f64>>,
}

pub(crate) fn hardest_negatives(
    scores: &[f64],
    image_ids: &[u64],
    valid: &[f64],
    n: usize,
    k: usize,
) -> Hardest {
    use rayon::prelude::*;
    let b = image_ids.len();
    let cols = b * n;
    if cols == 0 {
        return Hardest {
            weights: Vec::new(),
            shift: vec![None; b],
        };
    }
    let mut weights = vec![0.0f32; b * cols];
    // Rows in parallel: each row's selection is its own, so the result does not depend on
    // the thread count.
    let shift = weights
        .par_chunks_mut(cols)
        .zip(scores.par_chunks(cols))
        .enumerate()
        .map_init(Vec::new, |pool: &mut Vec<f64>, (i, (w, row))| {
            // The candidates in column order: valid locals of pairs showing another image.
            let candidates = || {
                (0..b)
                    .filter(move |&p| image_ids[p] != image_ids[i])
                    .flat_map(move |p| p * n..(p + 1) * n)
                    .filter(|&j| valid[j] != 0.0)
            };
            pool.clear();
            pool.extend(candidates().map(|j| row[j]));
            if pool.is_empty() {
                return None;
            }
            let take = k.min(pool.len());
            let (_, &mut kth, _) = pool.select_nth_unstable_by(take - 1, |a, b| b.total_cmp(a));
            let (above, copies) = pool.iter().fold((0, 0), |(a, c), &x| {
                (a + usize::from(x > kth), c + usize::from(x == kth))
            });
            let share = (take - above) as f32 / copies as f32;
            for j in candidates() {
                w[j] = if row[j] > kth {
                    1.0
                } else if row[j] == kth {
                    share
                } else {
                    0.0
                };
            }
            Some(pool.iter().copied().fold(f64::NEG_INFINITY, f64::max))
        })
        .collect();
    Hardest { weights, shift }
}

/// A host copy of a tensor's values.
fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    host::read(t)
}

/// One direction of CRA: each guide (row i of `guides`, `[b, d]`) against the valid locals of
/// its own pair (positives) and the `hardest` most similar valid locals of samples showing
/// another image (negatives; pairs i and j show the same image when `image_ids[i] ==
/// image_ids[j]`), by InfoNCE on cosines / `temperature`: per positive p, −log(e^p / (e^p +
/// Σ_neg e^n)), averaged over a guide's positives, then over guides. Fewer candidates than
/// `hardest` keeps them all.
pub fn cra_direction<'a, B: Backend>(
    guides: Tensor<B, 2>,
    locals: &'a Locals<B>,
    image_ids: &[u64],
    temperature: f64,
    hardest: usize,
    place: Where,
    share: &Share<'a, B>,
) -> Tensor<B, 1> {
    if place == Where::Host {
        return cra_on_host(guides, locals, image_ids, (temperature, hardest), share);
    }
    let [b, n, d] = locals.states.dims();
    let device = guides.device();
    let g = super::loss::l2_normalize(guides);
    let l = l2_normalize3(locals.states.clone());
    // Guide i · its own pair's locals: one small product per pair.
    let positives = l
        .clone()
        .matmul(g.clone().reshape([b, d, 1]))
        .reshape([b, n])
        / temperature;
    let scores = g.matmul(l.reshape([b * n, d]).transpose()) / temperature; // [b, b·n]
    let hard = hardest_negatives(
        &host(scores.clone()),
        image_ids,
        &host(locals.valid.clone()),
        n,
        hardest.max(1),
    );
    let column = |v: Vec<f64>| {
        Tensor::<B, 2>::from_data(
            TensorData::new(v, [b, 1]).convert::<B::FloatElem>(),
            &device,
        )
    };
    let weights = Tensor::<B, 2>::from_data(
        TensorData::new(hard.weights, [b, b * n]).convert::<B::FloatElem>(),
        &device,
    );
    // A guide without candidates: shift 0 keeps the exponentials finite (their weights are 0),
    // 1 added to its empty sum makes the log 0, and its log-sum is NO_NEGATIVES.
    let per_row = |f: fn(Option<f64>) -> f64| column(hard.shift.iter().copied().map(f).collect());
    let shift = per_row(|s| s.unwrap_or(0.0));
    let empty = per_row(|s| if s.is_none() { 1.0 } else { 0.0 });
    let base = per_row(|s| s.unwrap_or(NO_NEGATIVES));
    let sum = ((scores - shift).exp() * weights).sum_dim(1) + empty;
    let negatives = base + sum.log(); // [b, 1]
    let per_positive = softplus(negatives - positives, 1.0);
    let count = locals.valid.clone().sum_dim(1).clamp_min(1.0);
    ((per_positive * locals.valid.clone()).sum_dim(1) / count).mean()
}

/// [`lca`] on the host: value and gradients by hand (`selfalign_host`), in the backend's float
/// type.
fn lca_on_host<'a, B: Backend>(
    image: &'a Locals<B>,
    text: &'a Locals<B>,
    prototypes: Tensor<B, 2>,
    c: &LcaConfig,
    share: &Share<'a, B>,
) -> Tensor<B, 1> {
    fn run<'a, B: Backend, T: host::Real>(
        (image, text): (&'a Locals<B>, &'a Locals<B>),
        prototypes: &Tensor<B, 2>,
        c: &LcaConfig,
        want: (bool, bool),
        share: &Share<'a, B>,
    ) -> (f64, Option<Vec<f64>>, Option<Vec<f64>>) {
        let [b, r, d] = image.states.dims();
        let [_, l, _] = text.states.dims();
        let [k, _] = prototypes.dims();
        let (v, t) = (share.host::<T>(image), share.host::<T>(text));
        let input = host::LcaInput::<T> {
            image: &v,
            text: &t,
            prototypes: &host::read(prototypes.clone()),
            b,
            r,
            l,
            d,
            k,
        };
        host::lca(&input, c, want)
    }
    let device = prototypes.device();
    // The word states are computed tensors (burn only reports leaves as requiring a
    // gradient): always differentiated. The prototypes are the parameter itself, or detached
    // while frozen.
    let want = (true, prototypes.is_require_grad());
    let (value, d_text, d_prototypes) = if host::is_f64(&text.states) {
        run::<B, f64>((image, text), &prototypes, c, want, share)
    } else {
        run::<B, f32>((image, text), &prototypes, c, want, share)
    };
    let mut parts = Vec::new();
    if let Some(g) = d_text {
        parts.push((flat(text.states.clone()), g));
    }
    if let Some(g) = d_prototypes {
        parts.push((flat(prototypes), g));
    }
    host::attach(value, &device, parts)
}

/// [`cra_direction`] on the host: value and gradients by hand (`selfalign_host`), in the
/// backend's float type.
fn cra_on_host<'a, B: Backend>(
    guides: Tensor<B, 2>,
    locals: &'a Locals<B>,
    image_ids: &[u64],
    (temperature, hardest): (f64, usize),
    share: &Share<'a, B>,
) -> Tensor<B, 1> {
    fn run<'a, B: Backend, T: host::Real>(
        guides: &Tensor<B, 2>,
        locals: &'a Locals<B>,
        image_ids: &[u64],
        (temperature, hardest): (f64, usize),
        share: &Share<'a, B>,
    ) -> (f64, Vec<f64>, Vec<f64>) {
        host::cra_direction::<T>(
            &host::read(guides.clone()),
            &share.host::<T>(locals),
            image_ids,
            locals.states.dims().into(),
            temperature,
            hardest,
        )
    }
    let device = guides.device();
    // Both inputs are computed tensors, always differentiated.
    let settings = (temperature, hardest);
    let (value, d_guides, d_locals) = if host::is_f64(&guides) {
        run::<B, f64>(&guides, locals, image_ids, settings, share)
    } else {
        run::<B, f32>(&guides, locals, image_ids, settings, share)
    };
    let parts = vec![
        (flat(guides), d_guides),
        (flat(locals.states.clone()), d_locals),
    ];
    host::attach(value, &device, parts)
}

/// A tensor as one row of its values (same graph node's gradient).
fn flat<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, 1> {
    let n = t.shape().num_elements();
    t.reshape([n])
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
    host::read(t)
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};

    type B = Autodiff<NdArray<f64>>;

    fn tensor<const D: usize>(v: Vec<f64>, shape: [usize; D]) -> Tensor<B, D> {
        Tensor::from_data(
            TensorData::new(v, shape).convert::<f64>(),
            &Default::default(),
        )
    }

    /// CRA's direction by its definition: sort each guide's candidates, keep the `k` largest.
    fn cra_by_sorting(g: &[f64], l: &[f64], ids: &[u64], n: usize, d: usize, k: usize) -> f64 {
        let unit = |v: &[f64]| {
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| x / norm).collect::<Vec<_>>()
        };
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let b = ids.len();
        let locals: Vec<Vec<f64>> = l.chunks(d).map(unit).collect();
        let mut total = 0.0;
        for i in 0..b {
            let gi = unit(&g[i * d..(i + 1) * d]);
            let mut negatives: Vec<f64> = (0..b * n)
                .filter(|&j| ids[j / n] != ids[i])
                .map(|j| dot(&gi, &locals[j]) / 0.7)
                .collect();
            negatives.sort_by(|a, b| b.total_cmp(a));
            negatives.truncate(k);
            let max = negatives.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + negatives.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            total += (0..n)
                .map(|p| {
                    let pos = dot(&gi, &locals[i * n + p]) / 0.7;
                    (1.0 + (lse - pos).exp()).ln()
                })
                .sum::<f64>()
                / n as f64;
        }
        total / b as f64
    }

    #[test]
    fn hardest_negatives_by_weights_equal_a_sorted_top_k_even_through_ties() {
        let (b, n, d) = (4, 3, 5);
        // Pairs 1 and 2 show one image: their regions are equal, every score of them comes
        // twice, and most cuts below split such a pair of copies.
        let ids = [0u64, 1, 1, 2];
        let mut l: Vec<f64> = (0..b * n * d)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) / 7.0)
            .collect();
        let copy = l[n * d..2 * n * d].to_vec();
        l[2 * n * d..3 * n * d].copy_from_slice(&copy);
        let g: Vec<f64> = (0..b * d)
            .map(|i| ((i * 29 % 19) as f64 - 9.0) / 5.0)
            .collect();
        // Some cut below must split tied copies, or the test shows nothing about ties: guide
        // 0's candidates (pairs 1, 2, 3) in order, each of pair 1's scores twice.
        let unit = |v: &[f64]| {
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| x / norm).collect::<Vec<_>>()
        };
        let g0 = unit(&g[..d]);
        let mut sorted: Vec<f64> = (n..b * n)
            .map(|j| {
                unit(&l[j * d..(j + 1) * d])
                    .iter()
                    .zip(&g0)
                    .map(|(x, y)| x * y)
                    .sum()
            })
            .collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        assert!(
            (1..sorted.len()).any(|k| sorted[k - 1] == sorted[k]),
            "no k cuts a pair of tied copies: {sorted:?}"
        );
        for (k, place) in (1..=9).flat_map(|k| [(k, Where::Host), (k, Where::Device)]) {
            let locals = Locals::dense(tensor(l.clone(), [b, n, d]));
            let got = cra_direction(
                tensor(g.clone(), [b, d]),
                &locals,
                &ids,
                0.7,
                k,
                place,
                &Share::default(),
            );
            let got = host(got)[0];
            let want = cra_by_sorting(&g, &l, &ids, n, d, k);
            // (Within f32 rounding: a test binary that also runs the f32 backend on the same
            // CPU device can make this one compute in f32; a wrong tie rule is off by far more.)
            assert!(
                (got - want).abs() < 1e-6 * want.abs(),
                "k {k}, {place:?}: {got} vs {want}"
            );
        }
    }

    /// Sinkhorn's scaling: the fused passes give the definition's u and v (column then row
    /// normalisations, one after the other, in f64), and the AVX2 build of a block the same
    /// bits as the plain one.
    #[test]
    fn host_scaling_is_the_alternating_normalisation() {
        let (n, k) = (600, 37);
        let e: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 + 1e-3)
            .collect();
        for iterations in [0, 1, 2, 3] {
            let (u, v) = host_scaling(&e, n, k, iterations);
            let total: f64 = e.iter().map(|&x| x as f64).sum();
            let (mut rows, mut cols) = (vec![1.0 / total; n], vec![1.0; k]);
            for _ in 0..iterations {
                cols = (0..k)
                    .map(|j| {
                        1.0 / (k as f64
                            * (0..n).map(|i| rows[i] * e[i * k + j] as f64).sum::<f64>())
                    })
                    .collect();
                rows = (0..n)
                    .map(|i| {
                        1.0 / (n as f64
                            * (0..k).map(|j| e[i * k + j] as f64 * cols[j]).sum::<f64>())
                    })
                    .collect();
            }
            let close = |a: &[f64], b: &[f64]| {
                a.iter()
                    .zip(b)
                    .all(|(a, b)| (a - b).abs() <= 1e-12 * b.abs())
            };
            assert!(
                close(&u, &rows) && close(&v, &cols),
                "{iterations} iterations"
            );
        }
        let cols: Vec<f64> = (0..k).map(|j| 1.0 + j as f64 / 7.0).collect();
        let block = &e[..BLOCK_ROWS * k];
        let run = |plain: bool, cols: Option<&[f64]>| {
            let (mut out, mut sums) = (vec![0.0; BLOCK_ROWS], vec![0.0; k]);
            let p = Pass {
                k,
                cols,
                n: n as f64,
            };
            if plain {
                scaling_block_plain(p, block, &mut out, Some(&mut sums));
            } else {
                scaling_block(p, block, &mut out, Some(&mut sums));
            }
            out.iter()
                .chain(&sums)
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        for c in [None, Some(&cols[..])] {
            assert_eq!(run(true, c), run(false, c));
        }
    }

    #[test]
    fn a_guide_without_negatives_adds_nothing_and_keeps_gradients_finite() {
        let (b, n, d) = (2, 2, 3);
        let g = tensor(vec![0.3, -0.2, 0.9, 0.1, 0.4, -0.5], [b, d]).require_grad();
        let l = tensor(
            (0..b * n * d).map(|i| (i as f64 - 5.5) / 3.0).collect(),
            [b, n, d],
        )
        .require_grad();
        for place in [Where::Host, Where::Device] {
            // One image in the whole batch: no guide has a negative.
            let locals = Locals::dense(l.clone());
            let share = Share::default();
            let value = cra_direction(g.clone(), &locals, &[7, 7], 0.7, 512, place, &share);
            assert_eq!(host(value.clone())[0], 0.0, "{place:?}");
            let grads = value.backward();
            for grad in [host(g.grad(&grads).unwrap()), host(l.grad(&grads).unwrap())] {
                assert!(grad.iter().all(|x| x.is_finite()), "{place:?}: {grad:?}");
            }
        }
    }

    #[test]
    fn host_terms_and_gradients_have_the_same_bits_on_any_thread_count() {
        // Products of 120 and more rows: several blocks (32 rows at least), split over the threads.
        let (b, r, l, d, k) = (24, 5, 4, 6, 70);
        let values = |n: usize, seed: usize| -> Vec<f64> {
            (0..n)
                .map(|i| (((i + seed) * 7919 % 409) as f64 - 204.0) / 101.0)
                .collect()
        };
        let ids: Vec<u64> = (0..b as u64).map(|i| i / 3).collect();
        let mut valid = vec![1.0; b * l];
        valid.iter_mut().skip(3).step_by(7).for_each(|v| *v = 0.0);
        let run = || {
            let image = tensor(values(b * r * d, 1), [b, r, d]).require_grad();
            let text = tensor(values(b * l * d, 2), [b, l, d]).require_grad();
            let prototypes = crate::ml::loss::l2_normalize(tensor(values(k * d, 3), [k, d]))
                .detach()
                .require_grad();
            let text_locals = Locals {
                states: text.clone(),
                valid: tensor(valid.clone(), [b, l]),
            };
            let image_locals = Locals::dense(image.clone());
            // One share for the three, as the objective evaluates them.
            let share = Share::default();
            let lca_value = lca(
                &image_locals,
                &text_locals,
                prototypes.clone(),
                &LcaConfig::default(),
                Where::Host,
                &share,
            );
            let guides = tensor(values(b * d, 4), [b, d]).require_grad();
            let t2v = cra_direction(
                guides.clone(),
                &image_locals,
                &ids,
                0.7,
                9,
                Where::Host,
                &share,
            );
            let v2t = cra_direction(
                guides.clone(),
                &text_locals,
                &ids,
                0.7,
                9,
                Where::Host,
                &share,
            );
            let total = lca_value + t2v + v2t;
            let grads = total.clone().backward();
            let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
            [
                bits(host(total)),
                bits(host(image.grad(&grads).unwrap())),
                bits(host(text.grad(&grads).unwrap())),
                bits(host(prototypes.grad(&grads).unwrap())),
                bits(host(guides.grad(&grads).unwrap())),
            ]
        };
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(run)
        };
        let one = on(1);
        assert!(one[3].iter().any(|&x| x != 0), "prototypes get a gradient");
        assert_eq!(one, on(3));
    }

    #[test]
    fn host_and_device_sinkhorn_agree() {
        // f64 whatever the ndarray device's default float type (the first tensor any test in
        // this process makes fixes it, and the f32 tests share the device).
        let f64_tensor = |v: Vec<f64>, shape: [usize; 2]| -> Tensor<B, 2> {
            Tensor::from_data(
                TensorData::new(v, shape),
                (&Default::default(), burn::tensor::DType::F64),
            )
        };
        let (n, k) = (40, 16);
        let scores: Vec<f64> = (0..n * k)
            .map(|i| ((i * 7919 % 201) as f64 - 100.0) / 100.0)
            .collect();
        for iterations in [0, 1, 2, 3] {
            let host_q = host(sinkhorn(
                f64_tensor(scores.clone(), [n, k]),
                0.05,
                iterations,
                Where::Host,
            ));
            let device_q = host(sinkhorn(
                f64_tensor(scores.clone(), [n, k]),
                0.05,
                iterations,
                Where::Device,
            ));
            for (h, d) in host_q.iter().zip(&device_q) {
                assert!(
                    (h - d).abs() <= 1e-4 * d.abs().max(1e-3),
                    "{iterations}: {h} vs {d}"
                );
            }
            if iterations > 0 {
                // Rows sum to 1 after a row normalisation.
                for row in host_q.chunks(k) {
                    assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-5);
                }
            }
        }
    }
}
