//! SelfAlign's two terms on a CPU backend: each term's value and its gradients with respect to
//! its inputs computed together by hand over the tensors' host values, then handed to the
//! autodiff graph as one scalar whose gradient is the computed one ([`attach`]).
//!
//! Why it exists: written with tensor operations (what a GPU runs, `selfalign`'s
//! [`Where::Device`](super::Where) path), LCA and CRA are some twenty element-wise
//! passes forward and as many backward, each a fresh full-size tensor on burn-ndarray; here
//! each step is one loop over the values, rows in parallel, each row written in place, and
//! the matrix products go to the `gemm` crate, transposed operands read through their strides
//! (measured: no slower than making a transposed copy first).
//!
//! Invariants:
//! * the mathematics of the tensor path (docs/method.md): both are checked against the float64
//!   fixture, values and gradients (`stages/tests/selfalign.rs`);
//! * matrix products in the backend's float type (f32 or f64), every element-wise step in f64
//!   except the exponentials of f32 training (Sinkhorn's kernel and LCA's word softmax, by
//!   [`fast_exp`](super::fast_exp), within 2 ulp of f32's);
//! * each modality's locals are read and scaled to unit rows once per objective evaluation,
//!   whichever terms use them ([`HostLocals`], held by `selfalign::Share`);
//! * the row loops that carry most element-wise work (LCA's word rows, Sinkhorn's passes)
//!   run 4 f64 / 8 f32 lanes where the CPU has AVX2, chosen at run time, with the same
//!   operations in the same order either way (no fused multiply-add), so the same bits;
//! * the large host buffers (products, kernel, gradient rows) are kept between steps and
//!   written whole before they are read (`buffer`, `keep`): a fresh one is mapped page by
//!   page as it is first written, which doubled the cost of the largest product;
//! * the bytes do not depend on the thread count: products run in blocks of a fixed number of
//!   rows, each block on one thread with one summation order, and every reduction across rows
//!   is summed in row order;
//! * the scalar returned to the graph has the computed loss as its value, and as gradient with
//!   respect to each input that requires one, exactly the computed gradient: on burn-ndarray
//!   f32 under autodiff one operation per input that adds 0 and hands over g
//!   (`cpu_ops::given_gradient`), elsewhere Σ x·g − (Σ x·g, detached), which adds 0 to the
//!   value.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Element, Tensor, TensorData};
use rayon::prelude::*;
use std::sync::{Mutex, PoisonError};

use super::selfalign::{
    NO_NEGATIVES, hardest_negatives, host_kernel_f32, host_kernel_f64, host_scaling,
};

/// A float type the products run in: the backend's own (f32 when it trains in f32, f64 for
/// the float64 checks).
pub(crate) trait Real: Element + Copy + Send + Sync + 'static {
    fn of(x: f64) -> Self;
    fn get(self) -> f64;
    /// Sinkhorn's kernel E = exp((s − max s)/ε) of scores in this type (in f32).
    fn kernel(scores: Vec<Self>, epsilon: f64) -> Vec<f32>;
    /// f32 values in this type.
    fn from_f32s(v: Vec<f32>) -> Vec<Self>;
    /// Whether the word softmax's exponentials may be f32 ([`fast_exp`]): in f32 training,
    /// where the logits are f32 already; the float64 checks keep f64's.
    const FAST_EXP: bool;
    /// The kept buffers of this type ([`buffer`], [`keep`]).
    fn pool() -> &'static Mutex<Vec<Vec<Self>>>;
}

/// Kept f32 and f64 buffers, a few of each.
static POOL_F32: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
static POOL_F64: Mutex<Vec<Vec<f64>>> = Mutex::new(Vec::new());

/// Buffers smaller than this are not kept (the allocator reuses them anyway); at most
/// [`KEPT`] are kept per type, the largest: one step of LCA and both CRA directions gives back
/// about twenty (≈ 100 MB at batch 128, 1024 prototypes), which the next step takes again.
/// They stay allocated until the process ends (a training's process; the memory is of the
/// order of the step's own).
const KEPT_FROM: usize = 1 << 14;
const KEPT: usize = 24;

/// A vector of `n` values for a result that overwrites every one of them: a kept buffer when
/// one holds `n` (old values still in it), a fresh zeroed one otherwise.
///
/// Why: a fresh vector of many megabytes is mapped by the kernel page by page as it is first
/// written; measured on the Sinkhorn scores product (4608 × 1024 floats), writing into a
/// fresh vector took twice as long as into a kept one (29 against 15 ms).
fn buffer<T: Real>(n: usize) -> Vec<T> {
    if n >= KEPT_FROM {
        let mut pool = T::pool().lock().unwrap_or_else(PoisonError::into_inner);
        let fits = (0..pool.len())
            .filter(|&i| pool[i].capacity() >= n)
            .min_by_key(|&i| pool[i].capacity());
        if let Some(i) = fits {
            let mut v = pool.swap_remove(i);
            drop(pool);
            if v.len() >= n {
                v.truncate(n);
            } else {
                v.resize(n, T::of(0.0));
            }
            return v;
        }
    }
    vec![T::of(0.0); n]
}

/// Gives a buffer back for a later [`buffer`] (the smallest kept one goes when too many are).
fn keep<T: Real>(v: Vec<T>) {
    if v.capacity() < KEPT_FROM {
        return;
    }
    let mut pool = T::pool().lock().unwrap_or_else(PoisonError::into_inner);
    pool.push(v);
    if pool.len() > KEPT {
        let smallest = (0..pool.len())
            .min_by_key(|&i| pool[i].capacity())
            .expect("not empty");
        pool.swap_remove(smallest);
    }
}

impl Real for f32 {
    const FAST_EXP: bool = true;
    fn pool() -> &'static Mutex<Vec<Vec<Self>>> {
        &POOL_F32
    }
    fn of(x: f64) -> Self {
        x as f32
    }
    fn get(self) -> f64 {
        self as f64
    }
    fn kernel(scores: Vec<Self>, epsilon: f64) -> Vec<f32> {
        host_kernel_f32(scores, epsilon)
    }
    fn from_f32s(v: Vec<f32>) -> Vec<Self> {
        v
    }
}

impl Real for f64 {
    const FAST_EXP: bool = false;
    fn pool() -> &'static Mutex<Vec<Vec<Self>>> {
        &POOL_F64
    }
    fn of(x: f64) -> Self {
        x
    }
    fn get(self) -> f64 {
        self
    }
    fn kernel(scores: Vec<Self>, epsilon: f64) -> Vec<f32> {
        host_kernel_f64(&scores, epsilon)
    }
    fn from_f32s(v: Vec<f32>) -> Vec<Self> {
        v.into_iter().map(f64::from).collect()
    }
}

/// One modality's locals on the host, as the terms use them: rows scaled to unit length
/// (`[b, n, d]`), their clamped norms and the validity `[b, n]` (see `selfalign::Share`).
pub(crate) struct HostLocals<T: Real> {
    pub unit: Vec<T>,
    pub norms: Vec<f64>,
    pub valid: Vec<f64>,
}

impl<T: Real> HostLocals<T> {
    pub(crate) fn of<B: Backend>(locals: &super::selfalign::Locals<B>) -> Self {
        let d = locals.states.dims()[2];
        let values: Vec<T> = read(locals.states.clone());
        let (unit, norms) = unit_rows(&values, d);
        keep(values);
        Self {
            unit,
            norms,
            valid: read(locals.valid.clone()),
        }
    }
}

impl<T: Real> Drop for HostLocals<T> {
    fn drop(&mut self) {
        keep(std::mem::take(&mut self.unit));
    }
}

/// Whether a tensor's values are f64 (then the products run in f64).
pub(crate) fn is_f64<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    t.dtype() == DType::F64
}

/// A host copy of a tensor's values in `T`.
pub(crate) fn read<B: Backend, const D: usize, T: Real>(t: Tensor<B, D>) -> Vec<T> {
    if let Some(v) = super::cpu_ops::f32_values(&t) {
        return T::from_f32s(v);
    }
    // The product makes a fresh tensor: reading one the autograd graph still shares goes
    // element by element on ndarray (10× slower than this extra pass).
    t.detach()
        .mul_scalar(1.0)
        .into_data()
        .convert::<T>()
        .into_vec::<T>()
        .expect("converted to the product type")
}

/// `value` as a one-element tensor whose gradient with respect to each input of `parts` is
/// the gradient paired with it (inputs that need none are left out by the caller).
pub(crate) fn attach<B: Backend>(
    value: f64,
    device: &B::Device,
    parts: Vec<(Tensor<B, 1>, Vec<f64>)>,
) -> Tensor<B, 1> {
    let mut out = Tensor::<B, 1>::from_data(
        TensorData::new(vec![value], [1]).convert::<B::FloatElem>(),
        device,
    );
    for (x, grad) in parts {
        // burn-ndarray f32 under autodiff: an operation that hands over the gradient.
        let x = match super::cpu_ops::given_gradient(x, &grad) {
            Ok(carrier) => {
                out = out + carrier;
                keep(grad);
                continue;
            }
            Err(x) => x,
        };
        let g = Tensor::<B, 1>::from_data(
            TensorData::new(grad, x.shape()).convert::<B::FloatElem>(),
            device,
        );
        let s = (x * g).sum();
        out = out + (s.clone() - s.detach());
    }
    out
}

/// Rows (or columns) per block of an `m`-row (`m`-column) product: an eighth of them (work
/// for up to eight threads, and the other operand packed once per block), at least 32. A
/// function of the shape alone.
fn block_rows(m: usize) -> usize {
    m.div_ceil(8).max(32)
}

/// `a · b` (`m × k` times `k × n`, both row-major), row-major `m × n`; blocks of
/// [`block_rows`] rows in parallel, one thread each.
fn product<T: Real>(m: usize, n: usize, k: usize, a: &[T], b: &[T]) -> Vec<T> {
    product_strided(m, n, k, (a, 1, k), (b, 1, n))
}

/// `a · bᵀ` with `b` stored `n × k` row-major (rows of `a` against rows of `b`).
fn product_nt<T: Real>(m: usize, n: usize, k: usize, a: &[T], b: &[T]) -> Vec<T> {
    product_strided(m, n, k, (a, 1, k), (b, k, 1))
}

/// `aᵀ · b` with `a` stored `k × m` row-major.
fn product_tn<T: Real>(m: usize, n: usize, k: usize, a: &[T], b: &[T]) -> Vec<T> {
    product_strided(m, n, k, (a, m, 1), (b, 1, n))
}

/// `a · b` (`m × k` times `k × n`), each operand read through its (column stride, row
/// stride): a transposed operand needs no transposed copy (the `gemm` crate packs either
/// layout; measured as fast as, or faster than, a copy first). Row-major `m × n` out, in
/// blocks in parallel, one thread each: blocks of [`block_rows`] rows, or of as many columns
/// when the result is wider than tall (then the large operand is packed once in all instead
/// of once per block: CRA's 128 × 4608 cosines took 2.3 instead of 3.7 ms). Either way each
/// value is one `gemm` call's, summed in one order, so the split does not change a bit.
fn product_strided<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    (a, a_cs, a_rs): (&[T], usize, usize),
    (b, b_cs, b_rs): (&[T], usize, usize),
) -> Vec<T> {
    let fits = |len: usize, rows: usize, cols: usize, cs: usize, rs: usize| {
        len == rows * cols && (rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len)
    };
    assert!(
        fits(a.len(), m, k, a_cs, a_rs) && fits(b.len(), k, n, b_cs, b_rs),
        "product operand shapes"
    );
    let mut out = buffer::<T>(m * n);
    if m == 0 || n == 0 || k == 0 {
        out.fill(T::of(0.0));
        return out;
    }
    // One block: `rows` rows from `row`, `cols` columns from `col`, of a · b into out.
    struct Out<T>(*mut T);
    // SAFETY: blocks write disjoint elements of `out` (below), which outlives them.
    unsafe impl<T> Sync for Out<T> {}
    impl<T> Out<T> {
        /// The element `offset` values from the start (a method, so that closures capture
        /// the whole `Out` rather than its pointer field).
        fn at(&self, offset: usize) -> *mut T {
            // SAFETY: callers pass offsets within out (see `block`).
            unsafe { self.0.add(offset) }
        }
    }
    let dst = Out(out.as_mut_ptr());
    let block = |row: usize, rows: usize, col: usize, cols: usize| {
        // SAFETY: out is m × n (column stride 1, row stride n) and the block's rows·cols
        // values from (row, col) lie within it; a is read from row `row` for `rows` rows and
        // b from column `col` for `cols` columns, within their lengths (checked by `fits`
        // above for all m rows and n columns); read_dst = false only writes the block's
        // values of out, and no two blocks share one.
        unsafe {
            gemm::gemm(
                rows,
                cols,
                k,
                dst.at(row * n + col),
                1,
                n as isize,
                false,
                a.as_ptr().add(row * a_rs),
                a_cs as isize,
                a_rs as isize,
                b.as_ptr().add(col * b_cs),
                b_cs as isize,
                b_rs as isize,
                T::of(0.0),
                T::of(1.0),
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    if n > m {
        let width = block_rows(n);
        (0..n.div_ceil(width)).into_par_iter().for_each(|j| {
            let col = j * width;
            block(0, m, col, width.min(n - col));
        });
    } else {
        let height = block_rows(m);
        (0..m.div_ceil(height)).into_par_iter().for_each(|i| {
            let row = i * height;
            block(row, height.min(m - row), 0, n);
        });
    }
    out
}

/// Rows (`d` wide) scaled to unit length (`F.normalize`: the norm clamped at 1e-12), with the
/// clamped norms.
fn unit_rows<T: Real>(x: &[T], d: usize) -> (Vec<T>, Vec<f64>) {
    let norms: Vec<f64> = x
        .par_chunks(d.max(1))
        .map(|row| {
            row.iter()
                .map(|v| v.get() * v.get())
                .sum::<f64>()
                .sqrt()
                .max(1e-12)
        })
        .collect();
    let mut unit = buffer::<T>(x.len());
    unit.par_chunks_mut(d.max(1))
        .zip(x.par_chunks(d.max(1)))
        .zip(&norms)
        .for_each(|((u, row), &norm)| {
            u.iter_mut()
                .zip(row)
                .for_each(|(u, v)| *u = T::of(v.get() / norm))
        });
    (unit, norms)
}

/// The gradient of x given that of x̂ = x / max(|x|, ε), row by row: (dx̂ − x̂ (x̂·dx̂)) / |x|,
/// or dx̂ / ε where the clamp holds (the norm then gets no gradient).
fn unit_rows_backward<T: Real>(unit: &[T], norms: &[f64], d_unit: &[T], d: usize) -> Vec<f64> {
    let mut out = buffer::<f64>(unit.len());
    out.par_chunks_mut(d.max(1))
        .zip(unit.par_chunks(d.max(1)))
        .zip(d_unit.par_chunks(d.max(1)))
        .zip(norms)
        .for_each(|(((out, u), du), &norm)| {
            let clamped = norm <= 1e-12;
            let along: f64 = if clamped {
                0.0
            } else {
                u.iter().zip(du).map(|(u, g)| u.get() * g.get()).sum()
            };
            for ((o, u), g) in out.iter_mut().zip(u).zip(du) {
                *o = (g.get() - u.get() * along) / norm;
            }
        });
    out
}

/// Σ over the rows of a caption or guide, each `valid` weight over the row's count (at least
/// 1), over the batch: the weights `valid / (count · b)` of the mean of means both terms take.
fn mean_of_means_weights(valid: &[f64], b: usize, n: usize) -> Vec<f64> {
    valid
        .chunks(n.max(1))
        .flat_map(|row| {
            let count = row.iter().sum::<f64>().max(1.0);
            row.iter().map(move |v| v / (count * b as f64))
        })
        .collect()
}

/// One CRA direction's value and gradients (see `selfalign::cra_direction`): `guides`
/// `[b, d]` before normalisation, `locals` `[b, n, d]` as the terms share them. The gradients
/// with respect to the guides and the locals (before normalisation), as f64 in their layout.
pub(crate) fn cra_direction<T: Real>(
    guides: &[T],
    locals: &HostLocals<T>,
    image_ids: &[u64],
    (b, n, d): (usize, usize, usize),
    temperature: f64,
    hardest: usize,
) -> (f64, Vec<f64>, Vec<f64>) {
    let cols = b * n;
    let (g, g_norms) = unit_rows(guides, d);
    let (l, l_norms, valid) = (&locals.unit, &locals.norms, &locals.valid);
    let cosines = product_nt(b, cols, d, &g, l);
    let mut scores = buffer::<f64>(cosines.len());
    scores
        .par_iter_mut()
        .zip(&cosines)
        .for_each(|(s, c)| *s = c.get() / temperature);
    keep(cosines);
    let hard = hardest_negatives(&scores, image_ids, valid, n, hardest.max(1));
    let weight = mean_of_means_weights(valid, b, n);
    // Per guide: its log-sum over the kept negatives, its loss, its gradient row (written in
    // place; one f64 scratch row per thread).
    let mut d_scores = buffer::<T>(b * cols);
    let losses: Vec<f64> = d_scores
        .par_chunks_mut(cols.max(1))
        .enumerate()
        .map_init(
            || (vec![0.0f64; cols], vec![0.0f64; n]),
            |(grad, d_positive), (i, out)| {
                let s = &scores[i * cols..(i + 1) * cols];
                let w = &hard.weights[i * cols..(i + 1) * cols];
                let (lse, sum) = match hard.shift[i] {
                    Some(shift) => {
                        let mut sum = 0.0;
                        for ((t, &x), &w) in grad.iter_mut().zip(s).zip(w) {
                            *t = if w == 0.0 {
                                0.0
                            } else {
                                w as f64 * (x - shift).exp()
                            };
                            sum += *t;
                        }
                        (shift + sum.ln(), Some(sum))
                    }
                    None => (NO_NEGATIVES, None),
                };
                let (mut loss, mut d_lse) = (0.0, 0.0);
                for (m, d) in d_positive.iter_mut().enumerate() {
                    let a = weight[i * n + m];
                    *d = 0.0;
                    if a == 0.0 {
                        continue;
                    }
                    let x = lse - s[i * n + m];
                    // softplus(x) = log(1 + eˣ) and its derivative σ(x), stable both ways.
                    loss += a * (x.max(0.0) + (-x.abs()).exp().ln_1p());
                    let sigma = if x >= 0.0 {
                        1.0 / (1.0 + (-x).exp())
                    } else {
                        x.exp() / (1.0 + x.exp())
                    };
                    d_lse += a * sigma;
                    *d = 0.0 - a * sigma;
                }
                // The row starts at 0 (a guide without negatives keeps 0 off its positives).
                let negative = |j: usize| sum.map_or(0.0, |sum| d_lse * grad[j] / sum);
                if sum.is_some() {
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = T::of((0.0 + negative(j)) / temperature);
                    }
                } else {
                    out.fill(T::of(0.0));
                }
                for (m, &d) in d_positive.iter().enumerate() {
                    if d != 0.0 {
                        let j = i * n + m;
                        out[j] = T::of((d + negative(j)) / temperature);
                    }
                }
                loss
            },
        )
        .collect();
    let value = losses.iter().sum();
    keep(scores);
    let d_unit = product(b, d, cols, &d_scores, l);
    let d_guides = unit_rows_backward(&g, &g_norms, &d_unit, d);
    keep(d_unit);
    let d_unit = product_tn(cols, d, b, &d_scores, &g);
    let d_locals = unit_rows_backward(l, l_norms, &d_unit, d);
    for used in [d_unit, d_scores, g] {
        keep(used);
    }
    (value, d_guides, d_locals)
}

/// One word of LCA's cross-entropy: its logits against the prototypes, its region's kernel
/// row with the row scale n·u and the column scales v (its assignment q_j = n·u·E_j·v_j), its
/// weight in the mean of means and the temperature.
struct WordRow<'a, T> {
    logits: &'a [T],
    kernel: &'a [f32],
    cols: &'a [f64],
    scale: f64,
    weight: f64,
    temperature: f64,
}

impl<T: Real> WordRow<'_, T> {
    /// The word's weighted loss a·(lse(z/τ)·Σq − Σ q·z/τ), and its gradient with respect to
    /// the logits, a·(softmax(z/τ)·Σq − q)/τ, written into `grad`; `zt`, `e32` are scratch
    /// rows of the logits' length. Sums over eight lanes (one fixed order); AVX2 where the CPU
    /// has it (the same bits: no fused multiply-add either way).
    fn cross_entropy(&self, grad: &mut [T], zt: &mut [f64], e32: &mut [f32]) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { self.cross_entropy_avx2(grad, zt, e32) };
        }
        self.cross_entropy_plain(grad, zt, e32)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn cross_entropy_avx2(&self, grad: &mut [T], zt: &mut [f64], e32: &mut [f32]) -> f64 {
        self.cross_entropy_plain(grad, zt, e32)
    }

    #[inline(always)]
    fn cross_entropy_plain(&self, grad: &mut [T], zt: &mut [f64], e32: &mut [f32]) -> f64 {
        const LANES: usize = 8;
        let tau = self.temperature;
        let k = zt.len();
        let whole = k / LANES * LANES;
        // Passes over whole groups of eight lanes, then the tail into the first lanes.
        let mut max = [f64::NEG_INFINITY; LANES];
        for (t, z) in zt[..whole]
            .chunks_exact_mut(LANES)
            .zip(self.logits[..whole].chunks_exact(LANES))
        {
            for i in 0..LANES {
                t[i] = z[i].get() / tau;
                max[i] = max[i].max(t[i]);
            }
        }
        for (i, (t, z)) in zt[whole..]
            .iter_mut()
            .zip(&self.logits[whole..])
            .enumerate()
        {
            *t = z.get() / tau;
            max[i] = max[i].max(*t);
        }
        let max = max.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // q_j, the word's assignment to prototype j.
        let (scale, kernel, cols) = (self.scale, self.kernel, self.cols);
        let q = |kv: f32, v: f64| scale * kv as f64 * v;
        // The exponentials: f32's (fast_exp) in f32 training, f64's otherwise.
        let (mut sum, mut mass, mut qz) = ([0.0f64; LANES], [0.0f64; LANES], [0.0f64; LANES]);
        if T::FAST_EXP {
            for (e, t) in e32.iter_mut().zip(zt.iter()) {
                *e = super::fast_exp::exp1((t - max) as f32);
            }
            let groups = e32[..whole]
                .chunks_exact(LANES)
                .zip(zt[..whole].chunks_exact(LANES))
                .zip(kernel[..whole].chunks_exact(LANES))
                .zip(cols[..whole].chunks_exact(LANES));
            for (((e, t), kv), v) in groups {
                for i in 0..LANES {
                    let q = q(kv[i], v[i]);
                    sum[i] += e[i] as f64;
                    mass[i] += q;
                    qz[i] += q * t[i];
                }
            }
            for j in whole..k {
                let (i, q) = (j - whole, q(kernel[j], cols[j]));
                sum[i] += e32[j] as f64;
                mass[i] += q;
                qz[i] += q * zt[j];
            }
        } else {
            // Kept in zt's place (instead of e32) once the logit has been summed.
            for (j, t) in zt.iter_mut().enumerate() {
                let q = q(kernel[j], cols[j]);
                mass[j % LANES] += q;
                qz[j % LANES] += q * *t;
                *t = (*t - max).exp();
                sum[j % LANES] += *t;
            }
        }
        let total = |x: [f64; LANES]| x.iter().sum::<f64>();
        let (sum, mass, qz) = (total(sum), total(mass), total(qz));
        let lse = max + sum.ln();
        let (share, a) = (mass / sum, self.weight / tau);
        let rows = grad.iter_mut().zip(kernel).zip(cols);
        if T::FAST_EXP {
            for (((g, &kv), &v), &e) in rows.zip(e32.iter()) {
                *g = T::of(a * (e as f64 * share - q(kv, v)));
            }
        } else {
            for (((g, &kv), &v), &e) in rows.zip(zt.iter()) {
                *g = T::of(a * (e * share - q(kv, v)));
            }
        }
        self.weight * (lse * mass - qz)
    }
}

/// LCA's shape and settings, for [`lca`].
pub(crate) struct LcaInput<'a, T: Real> {
    /// Image locals `[b, r, d]` and word states `[b, l, d]` as the terms share them (the
    /// image side gets no gradient).
    pub image: &'a HostLocals<T>,
    pub text: &'a HostLocals<T>,
    /// `[k, d]`, unit rows.
    pub prototypes: &'a [T],
    pub b: usize,
    pub r: usize,
    pub l: usize,
    pub d: usize,
    pub k: usize,
}

/// LCA's value and gradients (see `selfalign::lca`) for the word states and the prototypes,
/// each when asked for, as f64 in the inputs' layout.
pub(crate) fn lca<T: Real>(
    x: &LcaInput<T>,
    c: &super::selfalign::LcaConfig,
    (want_text, want_prototypes): (bool, bool),
) -> (f64, Option<Vec<f64>>, Option<Vec<f64>>) {
    let LcaInput { b, r, l, d, k, .. } = *x;
    let (v, t, t_norms) = (&x.image.unit, &x.text.unit, &x.text.norms);
    // Sinkhorn over every region of the batch, in scaling form.
    let regions = b * r;
    let scores = product_nt(regions, k, d, v, x.prototypes);
    let kernel = T::kernel(scores, c.epsilon);
    let (u, cols) = host_scaling(&kernel, regions, k, c.sinkhorn_iterations);
    // Each word's region: the most similar of its own image's (the first of equals).
    let best: Vec<usize> = (0..b)
        .into_par_iter()
        .flat_map_iter(|p| {
            let sims = product_nt(
                l,
                r,
                d,
                &t[p * l * d..(p + 1) * l * d],
                &v[p * r * d..(p + 1) * r * d],
            );
            (0..l)
                .map(|w| {
                    let row = &sims[w * r..(w + 1) * r];
                    let mut best = 0;
                    for (m, s) in row.iter().enumerate() {
                        if s.get() > row[best].get() {
                            best = m;
                        }
                    }
                    p * r + best
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let logits = product_nt(b * l, k, d, t, x.prototypes);
    let weight = mean_of_means_weights(&x.text.valid, b, l);
    // Per word: its cross-entropy against its region's assignment and its gradient row,
    // written in place (f64 and f32 scratch rows per thread).
    let mut d_logits = buffer::<T>(b * l * k);
    let losses: Vec<f64> = d_logits
        .par_chunks_mut(k.max(1))
        .enumerate()
        .map_init(
            || (vec![0.0f64; k], vec![0.0f32; k]),
            |(zt, e32), (w, grad)| {
                let a = weight[w];
                if a == 0.0 {
                    grad.fill(T::of(0.0));
                    return 0.0;
                }
                let region = best[w];
                let row = WordRow {
                    logits: &logits[w * k..(w + 1) * k],
                    kernel: &kernel[region * k..(region + 1) * k],
                    cols: &cols,
                    scale: regions as f64 * u[region],
                    weight: a,
                    temperature: c.temperature,
                };
                row.cross_entropy(grad, zt, e32)
            },
        )
        .collect();
    let value = losses.iter().sum();
    let d_text = want_text.then(|| {
        let d_unit = product(b * l, d, k, &d_logits, x.prototypes);
        let d_text = unit_rows_backward(t, t_norms, &d_unit, d);
        keep(d_unit);
        d_text
    });
    let d_prototypes = want_prototypes.then(|| {
        let grad = product_tn(k, d, b * l, &d_logits, t);
        let mut wide = buffer::<f64>(grad.len());
        wide.par_iter_mut()
            .zip(&grad)
            .for_each(|(w, g)| *w = g.get());
        keep(grad);
        wide
    });
    keep(kernel);
    for used in [logits, d_logits] {
        keep(used);
    }
    (value, d_text, d_prototypes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word row's loss and gradient: the AVX2 build and the plain one give the same bits,
    /// in f32 (the f32 exponential) and f64, with a tail shorter than the eight lanes; and
    /// the loss is the definition's, computed directly in f64.
    #[test]
    fn word_rows_have_the_same_bits_on_every_lane_width() {
        fn check<T: Real>(k: usize) {
            let value = |i: usize, m: usize| ((i * 7919 + m) % 4001) as f64 / 4001.0;
            let logits: Vec<T> = (0..k).map(|i| T::of(value(i, 3) * 2.0 - 1.0)).collect();
            let kernel: Vec<f32> = (0..k).map(|i| value(i, 5) as f32 + 1e-3).collect();
            let cols: Vec<f64> = (0..k)
                .map(|i| 1.0 / (k as f64 * (0.5 + value(i, 7))))
                .collect();
            let row = WordRow {
                logits: &logits,
                kernel: &kernel,
                cols: &cols,
                scale: 3.0,
                weight: 0.25,
                temperature: 0.1,
            };
            let run = |plain: bool| {
                let mut grad = vec![T::of(0.0); k];
                let (mut zt, mut e32) = (vec![0.0; k], vec![0.0f32; k]);
                let loss = if plain {
                    row.cross_entropy_plain(&mut grad, &mut zt, &mut e32)
                } else {
                    row.cross_entropy(&mut grad, &mut zt, &mut e32)
                };
                let mut bits: Vec<u64> = grad.iter().map(|g| g.get().to_bits()).collect();
                bits.push(loss.to_bits());
                (loss, bits)
            };
            let ((loss, plain), (_, dispatched)) = (run(true), run(false));
            assert_eq!(plain, dispatched, "k {k}");
            // a·(lse(z/τ)·Σq − Σ q·z/τ), by its definition.
            let z: Vec<f64> = logits.iter().map(|z| z.get() / 0.1).collect();
            let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + z.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
            let q: Vec<f64> = (0..k).map(|j| 3.0 * kernel[j] as f64 * cols[j]).collect();
            let want = 0.25
                * (lse * q.iter().sum::<f64>() - q.iter().zip(&z).map(|(q, z)| q * z).sum::<f64>());
            assert!(
                (loss - want).abs() <= 1e-6 * want.abs(),
                "k {k}: {loss} vs {want}"
            );
        }
        for k in [1, 7, 8, 1027] {
            check::<f32>(k);
            check::<f64>(k);
        }
    }

    /// Products through strides equal a plain float64 triple loop, with shapes that cut the
    /// row blocks (tall results) and the column blocks (wide ones) raggedly, twice each: the
    /// results are large enough to be kept, so the second time writes into buffers that
    /// still hold the first time's values; and an empty inner dimension gives zeros even into
    /// a kept buffer (its result is smaller than the ones kept before it).
    #[test]
    fn strided_products_are_the_products() {
        let value = |i: usize| ((i * 7919) % 211) as f64 / 211.0 - 0.5;
        let transpose = |x: &[f64], rows: usize, cols: usize| -> Vec<f64> {
            (0..rows * cols)
                .map(|i| x[(i % rows) * cols + i / rows])
                .collect()
        };
        let shapes = [
            (301, 70, 45),
            (70, 301, 45),
            (301, 70, 45),
            (70, 301, 45),
            (30, 600, 0),
        ];
        assert!(shapes.iter().all(|&(m, n, _)| m * n >= KEPT_FROM));
        for (m, n, k) in shapes {
            let a: Vec<f64> = (0..m * k).map(|i| value(i + m)).collect();
            let b: Vec<f64> = (0..k * n).map(|i| value(i + 5 * n)).collect();
            let reference: Vec<f64> = (0..m * n)
                .map(|x| (0..k).map(|p| a[x / n * k + p] * b[p * n + x % n]).sum())
                .collect();
            let close = |got: Vec<f64>| {
                let ok = got.len() == reference.len()
                    && got
                        .iter()
                        .zip(&reference)
                        .all(|(g, r)| (g - r).abs() <= 1e-12);
                keep(got);
                ok
            };
            assert!(close(product(m, n, k, &a, &b)), "{m}×{n}×{k}");
            assert!(close(product_nt(m, n, k, &a, &transpose(&b, k, n))));
            assert!(close(product_tn(m, n, k, &transpose(&a, m, k), &b)));
        }
    }
}
