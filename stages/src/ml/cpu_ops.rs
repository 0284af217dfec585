//! Two steps of the CPU students as single-pass operations: GELU and the 3×3 stride-2
//! patches of the scenes-small convolutions, each with its own backward; and, for terms computed
//! on the host (SelfAlign's), a copy of a tensor's values without a pass through burn
//! ([`f32_values`]) and an operation that hands their computed gradient to the graph
//! ([`given_gradient`]).
//!
//! Why it exists: on burn-ndarray every tensor operation is a fresh full-size pass, and these
//! two are compositions of many. burn's GELU is five passes forward and fifteen backward (the
//! derivative of its tanh approximation, a `powf` and a `tanh` per element among them); the
//! patches are two zero-padding concatenations, nine strided slices and a concatenation
//! forward, and backward nine zero-filled `slice_assign`s summed into the padded input. A
//! profile of the scenes-small training step put half of its time in those two (GELU backward
//! alone about a quarter). Here each is one loop forward and one backward, rows in parallel,
//! registered with burn's autodiff as one operation through its extension API
//! ([`Backward`]).
//!
//! Invariants:
//! * **the same bits as burn's compositions**: every element goes through the same f32
//!   operations in the same order as burn-ndarray's passes (the same `erf`, the same constants
//!   rounded the same way; `tanh` by a cheaper f64 approximation rounded to f32 only where a
//!   rounding test proves the library's result rounds alike, the library call otherwise), and
//!   the patches' gradient sums each
//!   input element's contributions in the order burn's autodiff adds the nine views'
//!   gradients, +0.0 from views that do not cover it included. Tests compare values and
//!   gradients bit for bit with the compositions (`gelu` and `patches_reference`), and the
//!   scenes-small runs of examples/selfalign.yaml gave the same output hashes before and after;
//! * used only for burn-ndarray in f32 (`NdArray<f32>` and `Autodiff<NdArray<f32>>`, recognised
//!   by type, a contiguous f32 tensor): any other backend or float type (CUDA, flex, the f64
//!   checks) runs burn's own composition, unchanged;
//! * nothing here knows about students: plain functions of a tensor.

use std::any::Any;
use std::borrow::Cow;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::ndarray::{NdArray, NdArrayTensor};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Slice, Tensor, TensorPrimitive};
use rayon::prelude::*;

type Inner = NdArray<f32>;
type Cpu = Autodiff<Inner>;

/// Elements per parallel chunk of an element-wise pass.
const CHUNK: usize = 1 << 14;

/// `x` as a `T` if that is its type, else `x` back.
fn downcast<A: 'static, T: 'static>(x: A) -> Result<T, A> {
    let boxed: Box<dyn Any> = Box::new(x);
    match boxed.downcast::<T>() {
        Ok(t) => Ok(*t),
        Err(back) => Err(*back
            .downcast::<A>()
            .expect("a box holds the value it was given")),
    }
}

/// An f32 burn-ndarray tensor's values (a copy only if it is not contiguous). Only f32
/// tensors get here ([`host`] admits no other), and their gradients have their float type.
fn values(t: &NdArrayTensor) -> Cow<'_, [f32]> {
    let NdArrayTensor::F32(storage) = t else {
        panic!(
            "cpu_ops reads f32 tensors only, got {:?}",
            burn::tensor::TensorMetadata::dtype(t)
        );
    };
    let view = storage.view();
    match view.to_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(view.iter().copied().collect()),
    }
}

fn tensor(data: Vec<f32>, shape: &[usize]) -> NdArrayTensor {
    let array = burn::backend::ndarray::SharedArray::<f32>::from_shape_vec(shape.to_vec(), data)
        .expect("the data has the shape's length");
    NdArrayTensor::from(array)
}

fn shape_of(t: &NdArrayTensor) -> Vec<usize> {
    burn::tensor::TensorMetadata::shape(t).to_vec()
}

/// An f32 burn-ndarray tensor's primitive, with or without autodiff, or the tensor back.
enum Host<B: Backend, const D: usize> {
    Plain(Tensor<Inner, D>),
    Tracked(Tensor<Cpu, D>),
    Other(Tensor<B, D>),
}

fn host<B: Backend, const D: usize>(x: Tensor<B, D>) -> Host<B, D> {
    if x.dtype() != DType::F32 {
        return Host::Other(x);
    }
    match downcast::<_, Tensor<Cpu, D>>(x) {
        Ok(t) => Host::Tracked(t),
        Err(x) => match downcast::<_, Tensor<Inner, D>>(x) {
            Ok(t) => Host::Plain(t),
            Err(x) => Host::Other(x),
        },
    }
}

/// A copy of `x`'s values when it is an f32 burn-ndarray tensor (with or without autodiff):
/// one copy of its storage, where reading it through `into_data` costs a pass and a copy more.
/// `None` on any other backend or float type.
pub(crate) fn f32_values<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<Vec<f32>> {
    match host(x.clone()) {
        Host::Plain(t) => Some(values(&t.into_primitive().tensor()).into_owned()),
        Host::Tracked(t) => Some(values(&t.into_primitive().tensor().primitive).into_owned()),
        Host::Other(_) => None,
    }
}

fn back<B: Backend, T: 'static, const D: usize>(t: T) -> Tensor<B, D> {
    downcast::<T, Tensor<B, D>>(t)
        .ok()
        .expect("the backend the tensor came from")
}

/// `f` of every element, in parallel chunks (no zero-filled buffer first).
fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    x.par_iter().with_min_len(CHUNK).map(|&x| f(x)).collect()
}

/// `x` through one of this module's operations: `forward` maps the input's values and shape
/// to the output's; with autodiff, `step` is registered as its backward with `state(input)`.
/// Any other backend or float type runs `reference` (burn's composition).
fn apply<B, O, const D: usize>(
    x: Tensor<B, D>,
    reference: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
    forward: impl FnOnce(&[f32], [usize; D]) -> (Vec<f32>, [usize; D]),
    step: O,
    state: impl FnOnce(&NdArrayTensor) -> O::State,
) -> Tensor<B, D>
where
    B: Backend,
    O: Backward<Inner, 1>,
{
    let dims = x.dims();
    match host(x) {
        Host::Other(x) => reference(x),
        Host::Plain(x) => {
            let p = x.into_primitive().tensor();
            let (v, shape) = forward(&values(&p), dims);
            let y = tensor(v, &shape);
            back(Tensor::<Inner, D>::from_primitive(TensorPrimitive::Float(
                y,
            )))
        }
        Host::Tracked(x) => {
            let p = x.into_primitive().tensor();
            let (v, shape) = forward(&values(&p.primitive), dims);
            let y = tensor(v, &shape);
            let out = match step
                .prepare::<NoCheckpointing>([p.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(state(&p.primitive), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            back(Tensor::<Cpu, D>::from_primitive(TensorPrimitive::Float(
                out,
            )))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A computed gradient

#[derive(Debug)]
struct GivenGradient;

impl Backward<Inner, 1> for GivenGradient {
    /// The gradient of the output with respect to the input, in the input's layout.
    type State = (Vec<f32>, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (given, shape) = ops.state;
        unary::<Inner, _>(ops.parents, ops.node, grads, |upstream| {
            let u = values(&upstream)[0];
            tensor(map(&given, |g| g * u), &shape)
        });
    }
}

/// A one-element tensor holding 0 whose gradient with respect to `x` is `gradient` (rounded
/// to f32, times the gradient it receives): how a term computed outside the graph hands its
/// own gradient to burn's autodiff, without the product and sum an expression of tensors
/// takes each way. Only for an f32 burn-ndarray tensor under autodiff; `Err` gives `x` back
/// otherwise.
pub(crate) fn given_gradient<B: Backend>(
    x: Tensor<B, 1>,
    gradient: &[f64],
) -> Result<Tensor<B, 1>, Tensor<B, 1>> {
    assert_eq!(
        x.dims()[0],
        gradient.len(),
        "a gradient element per element"
    );
    match host(x) {
        Host::Tracked(x) => {
            let p = x.into_primitive().tensor();
            let shape = shape_of(&p.primitive);
            let given: Vec<f32> = gradient
                .par_iter()
                .with_min_len(CHUNK)
                .map(|&g| g as f32)
                .collect();
            let zero = tensor(vec![0.0], &[1]);
            let out = match GivenGradient
                .prepare::<NoCheckpointing>([p.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((given, shape), zero),
                OpsKind::UnTracked(prep) => prep.finish(zero),
            };
            Ok(back(Tensor::<Cpu, 1>::from_primitive(
                TensorPrimitive::Float(out),
            )))
        }
        Host::Plain(x) => Err(back(x)),
        Host::Other(x) => Err(x),
    }
}

// ---------------------------------------------------------------------------------------------
// GELU

/// burn's GELU forward on one element: x/√2, erf (libm, in f64), +1, ×x, /2, each rounded to
/// f32 as burn-ndarray's passes round it.
#[inline]
fn gelu_value(x: f32) -> f32 {
    let sqrt2 = core::f64::consts::SQRT_2 as f32;
    let e = libm::erf((x / sqrt2) as f64) as f32;
    (x * (e + 1.0)) / 2.0
}

/// Relative distance from an f32 rounding boundary beyond which any value that close to an
/// f64 `t` rounds to the same f32 as `t` (2^-36). The approximation below is within 2^-45
/// of the true value, glibc's f64 `tanh` within 2 ulp (2^-51).
const SAFE: f64 = 1.0 / (1u64 << 36) as f64;

/// `t` rounded to f32 when every value within [`SAFE`] of it rounds the same (Ziv's rounding
/// test): then the library's result rounds the same too.
#[inline]
fn round_if_safe(t: f64) -> Option<f32> {
    let f = t as f32;
    let safe = (t * (1.0 - SAFE)) as f32 == f
        && (t * (1.0 + SAFE)) as f32 == f
        && (t == 0.0 || t.abs() >= f32::MIN_POSITIVE as f64);
    safe.then_some(f)
}

/// `(x as f64).tanh() as f32` with the same bits: a cheaper accurate approximation, rounded
/// when the rounding test says it is safe (all but about one in 4,000 values), glibc's
/// `tanh` otherwise.
#[inline]
fn tanh_f32(x: f32) -> f32 {
    let y = x as f64;
    let a = y.abs();
    let t = if a < 0.01 {
        // The odd Taylor series to x⁹ (the next term is below 1e-22 relative).
        let z = y * y;
        y * (1.0 + z * (-1.0 / 3.0 + z * (2.0 / 15.0 + z * (-17.0 / 315.0 + z * (62.0 / 2835.0)))))
    } else if a < 20.0 {
        // 1 − 2/(e^{2a} + 1): at a ≥ 0.01 no cancellation beyond 1e-13 relative.
        (1.0 - 2.0 / ((2.0 * a).exp() + 1.0)).copysign(y)
    } else if a >= 20.0 {
        1.0f64.copysign(y)
    } else {
        return y.tanh() as f32; // NaN
    };
    round_if_safe(t).unwrap_or_else(|| y.tanh() as f32)
}

/// burn's GELU backward on one element (the derivative of the tanh approximation, its
/// constants rounded from f64), times the incoming gradient. `three` is 3.0, passed in so
/// that `powf` stays the library call burn-ndarray makes (glibc's `powf` is not correctly
/// rounded, so the cube cannot be computed any other way with its bits).
#[inline]
fn gelu_gradient(x: f32, grad: f32, three: f32) -> f32 {
    let x3 = x.powf(three);
    let c1 = x3 * (0.0356774f64 as f32);
    let c2 = x * (0.797885f64 as f32);
    let c3 = x3 * (0.0535161f64 as f32);
    let c4 = x * (0.398942f64 as f32);
    let inner1 = c1 + c2;
    let inner2 = c3 + c4;
    let tanh = tanh_f32(inner1);
    let sech = -(tanh * tanh) + 1.0;
    let y1 = tanh * 0.5;
    let y2 = inner2 * sech + 0.5;
    (y1 + y2) * grad
}

#[derive(Debug)]
struct GeluStep;

impl Backward<Inner, 1> for GeluStep {
    /// The input.
    type State = NdArrayTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let input = ops.state;
        unary::<Inner, _>(ops.parents, ops.node, grads, |grad| {
            let (x, g) = (values(&input), values(&grad));
            let three = std::hint::black_box(3.0f32);
            let out: Vec<f32> = x
                .par_iter()
                .zip(g.par_iter())
                .with_min_len(CHUNK)
                .map(|(&x, &g)| gelu_gradient(x, g, three))
                .collect();
            tensor(out, &shape_of(&grad))
        });
    }
}

/// GELU (the erf form, as `burn::tensor::activation::gelu`): one pass forward and one
/// backward on burn-ndarray f32, burn's own composition elsewhere; the same bits either way.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    apply(
        x,
        burn::tensor::activation::gelu,
        |v, dims| (map(v, gelu_value), dims),
        GeluStep,
        NdArrayTensor::clone,
    )
}

// ---------------------------------------------------------------------------------------------
// 3×3 stride-2 patches

/// Output side of a stride-2 patch grid over `n` positions.
fn out_side(n: usize) -> usize {
    n.div_ceil(2)
}

/// `[b, h, w, c]` → `[b, ⌈h/2⌉, ⌈w/2⌉, 9c]`: for each output cell the 3×3 neighbourhood of the
/// zero-padded input at (2y, 2x), rows then columns, channels innermost.
fn patches_forward(x: &[f32], [b, h, w, c]: [usize; 4]) -> Vec<f32> {
    let (ho, wo) = (out_side(h), out_side(w));
    let row = wo * 9 * c;
    let mut out = vec![0.0f32; b * ho * row];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(row).enumerate().for_each(|(r, dst)| {
        let (bi, oy) = (r / ho, r % ho);
        for ox in 0..wo {
            for ky in 0..3 {
                let Some(y) = (2 * oy + ky).checked_sub(1).filter(|&y| y < h) else {
                    continue;
                };
                for kx in 0..3 {
                    let Some(xx) = (2 * ox + kx).checked_sub(1).filter(|&xx| xx < w) else {
                        continue;
                    };
                    let src = ((bi * h + y) * w + xx) * c;
                    let at = (ox * 9 + ky * 3 + kx) * c;
                    dst[at..at + c].copy_from_slice(&x[src..src + c]);
                }
            }
        }
    });
    out
}

/// The gradient of [`patches_forward`]'s input: for each input element, the nine views'
/// gradients (+0.0 where a view does not cover it) summed as burn's autodiff sums them — the
/// first view's, then each next one added to the running sum, in [`VIEW_ORDER`].
fn patches_backward(g: &[f32], [b, h, w, c]: [usize; 4]) -> Vec<f32> {
    let (ho, wo) = (out_side(h), out_side(w));
    let row = w * c;
    let mut out = vec![0.0f32; b * h * row];
    if out.is_empty() {
        return out;
    }
    // The output cell (along one axis) whose view k covers input position p, if any.
    let cover = |p: usize, k: usize, n: usize| -> Option<usize> {
        let q = (p + 1).checked_sub(k)?;
        (q % 2 == 0 && q / 2 < n).then_some(q / 2)
    };
    out.par_chunks_mut(row).enumerate().for_each(|(r, dst)| {
        let (bi, y) = (r / h, r % h);
        for xx in 0..w {
            let acc = &mut dst[xx * c..(xx + 1) * c];
            for (i, &k) in VIEW_ORDER.iter().enumerate() {
                let (ky, kx) = (k / 3, k % 3);
                let cell = cover(y, ky, ho).zip(cover(xx, kx, wo));
                match (i, cell) {
                    (0, Some((oy, ox))) => {
                        let at = ((bi * ho + oy) * wo + ox) * 9 * c + k * c;
                        acc.copy_from_slice(&g[at..at + c]);
                    }
                    (0, None) => acc.fill(0.0),
                    (_, Some((oy, ox))) => {
                        let at = ((bi * ho + oy) * wo + ox) * 9 * c + k * c;
                        for (a, &v) in acc.iter_mut().zip(&g[at..at + c]) {
                            *a += v;
                        }
                    }
                    (_, None) => {
                        // A view's +0.0: turns a running −0.0 into +0.0, as burn's sum does.
                        for a in acc.iter_mut() {
                            *a += 0.0;
                        }
                    }
                }
            }
        }
    });
    out
}

/// The order in which burn's autodiff adds the nine views' gradients into the padded input:
/// the last view created first (found, and held, by the bit-for-bit test below).
const VIEW_ORDER: [usize; 9] = [8, 7, 6, 5, 4, 3, 2, 1, 0];

#[derive(Debug)]
struct PatchesStep;

impl Backward<Inner, 1> for PatchesStep {
    /// The input's shape.
    type State = [usize; 4];

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dims = ops.state;
        unary::<Inner, _>(ops.parents, ops.node, grads, |grad| {
            tensor(patches_backward(&values(&grad), dims), &dims)
        });
    }
}

/// The composition `patches` replaces, kept as the reference the tests compare with (and
/// what other backends run): zero padding by concatenation, nine strided views, one
/// concatenation.
pub fn patches_reference<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, w, c] = x.dims();
    let (ho, wo) = (out_side(h), out_side(w));
    let device = x.device();
    let rows = Tensor::zeros([b, 1, w, c], &device);
    let x = Tensor::cat(vec![rows.clone(), x, rows], 1);
    let cols = Tensor::zeros([b, h + 2, 1, c], &device);
    let padded = Tensor::cat(vec![cols.clone(), x, cols], 2);
    let mut views = Vec::with_capacity(9);
    for ky in 0..3 {
        for kx in 0..3 {
            views.push(padded.clone().slice([
                Slice::full(),
                Slice::new(ky as isize, Some((ky + 2 * ho - 1) as isize), 2),
                Slice::new(kx as isize, Some((kx + 2 * wo - 1) as isize), 2),
                Slice::full(),
            ]));
        }
    }
    Tensor::cat(views, 3)
}

/// The 3×3 stride-2 patches of `x` `[b, h, w, c]` with one zero row/column on every side:
/// `[b, ⌈h/2⌉, ⌈w/2⌉, 9·c]` (rows, then columns, then channels of the neighbourhood). One
/// pass each way on burn-ndarray f32; [`patches_reference`] elsewhere; the same bits.
pub fn patches<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let dims = x.dims();
    apply(
        x,
        patches_reference,
        |v, dims| (patches_forward(v, dims), patch_dims(dims)),
        PatchesStep,
        |_| dims,
    )
}

fn patch_dims([b, h, w, c]: [usize; 4]) -> [usize; 4] {
    [b, out_side(h), out_side(w), 9 * c]
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    fn bits<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<u32> {
        t.into_data()
            .to_vec::<f32>()
            .expect("f32")
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    /// Values spread over GELU's interesting range, with exact zeros, negative zeros,
    /// large magnitudes and a few special values.
    fn awkward(n: usize) -> Vec<f32> {
        let dev = Default::default();
        let mut v = Tensor::<Inner, 1>::random([n], Distribution::Normal(0.0, 3.0), &dev)
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
        let special = [0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 1e4, -1e4, 7.5e-8];
        for (i, s) in special.iter().enumerate() {
            v[i * 7 % n] = *s;
        }
        v
    }

    /// The fast `tanh` against glibc's, bit for bit, over f32 inputs drawn across
    /// their bit patterns (every exponent GELU can meet), around the branch points and the
    /// values whose tanh rounds next to 1.
    #[test]
    fn fast_tanh_has_the_librarys_bits() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut inputs: Vec<f32> = (0..400_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Magnitudes from 2^-40 to 2^40, either sign.
                let bits = (state as u32 & 0x807F_FFFF) | ((87 + (state >> 40) % 80) as u32) << 23;
                f32::from_bits(bits)
            })
            .collect();
        for centre in [0.01f32, 20.0, 9.0, 9.1, 8.5, 1.0, 0.5] {
            let mut v = centre;
            for _ in 0..2_000 {
                inputs.extend([v, -v]);
                v = f32::from_bits(v.to_bits() + 1);
            }
        }
        inputs.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-45,
            3e38,
        ]);
        for x in inputs {
            let want = ((x as f64).tanh() as f32).to_bits();
            assert_eq!(tanh_f32(x).to_bits(), want, "tanh({x:e})");
        }
    }

    /// The bit-for-bit tests below compare the fast path with burn's only if the fast path
    /// runs: f32 ndarray tensors (with and without autodiff) take it, nothing else does.
    #[test]
    fn only_f32_ndarray_tensors_take_the_fast_path() {
        let dev = Default::default();
        let tracked = Tensor::<Cpu, 2>::zeros([2, 3], &dev);
        assert!(matches!(host(tracked), Host::Tracked(_)));
        let plain = Tensor::<Inner, 2>::zeros([2, 3], &dev);
        assert!(matches!(host(plain), Host::Plain(_)));
        type F64 = Autodiff<NdArray<f64>>;
        let other = Tensor::<F64, 2>::zeros([2, 3], &dev);
        assert!(matches!(host(other), Host::Other(_)));
    }

    #[test]
    fn gelu_has_burns_bits_forward_and_backward() {
        let dev = Default::default();
        let n = 70_001; // several chunks, a ragged last one
        let x = awkward(n);
        let up = awkward(n).into_iter().rev().collect::<Vec<_>>();
        let run = |fused: bool| {
            let x =
                Tensor::<Cpu, 1>::from_data(TensorData::new(x.clone(), [n]), &dev).require_grad();
            let y = if fused {
                gelu(x.clone())
            } else {
                burn::tensor::activation::gelu(x.clone())
            };
            let g = Tensor::<Cpu, 1>::from_data(TensorData::new(up.clone(), [n]), &dev);
            let grads = (y.clone() * g).sum().backward();
            (bits(y.inner()), bits(x.grad(&grads).expect("x's gradient")))
        };
        let (ours, theirs) = (run(true), run(false));
        assert!(ours.0 == theirs.0, "GELU values differ from burn's");
        assert!(ours.1 == theirs.1, "GELU gradients differ from burn's");
        // Without autodiff, the same values.
        let plain = gelu(Tensor::<Inner, 1>::from_data(
            TensorData::new(x.clone(), [n]),
            &dev,
        ));
        assert!(bits(plain) == theirs.0);
    }

    #[test]
    fn patches_have_the_compositions_bits_forward_and_backward() {
        let dev = Default::default();
        // Even and odd sides (the last view then hangs over the padding), one channel and many.
        for dims in [[2, 6, 6, 3], [3, 7, 5, 2], [1, 1, 2, 1], [2, 9, 8, 16]] {
            let n: usize = dims.iter().product();
            let x = awkward(n);
            let out = patch_dims(dims);
            let m: usize = out.iter().product();
            let up = awkward(m.max(10))
                .into_iter()
                .take(m)
                .rev()
                .collect::<Vec<_>>();
            let run = |fused: bool| {
                let x = Tensor::<Cpu, 4>::from_data(TensorData::new(x.clone(), dims), &dev)
                    .require_grad();
                // Used twice, as the region layer's cells are: the gradient gets two parts.
                let y = if fused {
                    patches(x.clone())
                } else {
                    patches_reference(x.clone())
                };
                let g = Tensor::<Cpu, 4>::from_data(TensorData::new(up.clone(), out), &dev);
                let grads = ((y.clone() * g).sum() + x.clone().sum()).backward();
                (bits(y.inner()), bits(x.grad(&grads).expect("x's gradient")))
            };
            let (ours, theirs) = (run(true), run(false));
            assert!(ours.0 == theirs.0, "{dims:?}: patches differ");
            assert!(ours.1 == theirs.1, "{dims:?}: patch gradients differ");
            let plain = patches(Tensor::<Inner, 4>::from_data(
                TensorData::new(x.clone(), dims),
                &dev,
            ));
            assert!(bits(plain) == theirs.0);
        }
    }

    /// The handed-over gradient is the input's gradient (scaled by what the output receives),
    /// the output adds 0, and only tracked f32 ndarray tensors take the operation.
    #[test]
    fn a_given_gradient_is_the_inputs_gradient() {
        let dev = Default::default();
        let n = 40_003;
        let x = awkward(n);
        let given: Vec<f64> = awkward(n).iter().rev().map(|&v| v as f64 * 0.1).collect();
        let xt = Tensor::<Cpu, 1>::from_data(TensorData::new(x.clone(), [n]), &dev).require_grad();
        let carrier = given_gradient(xt.clone(), &given).expect("a tracked f32 tensor");
        let out = carrier.clone() * 3.0 + xt.clone().sum();
        assert_eq!(bits(carrier.inner()), vec![0.0f32.to_bits()]);
        let grads = out.backward();
        let expected: Vec<u32> = given
            .iter()
            .map(|&g| ((g as f32) * 3.0 + 1.0).to_bits())
            .collect();
        assert!(bits(xt.grad(&grads).expect("x's gradient")) == expected);
        let plain = Tensor::<Inner, 1>::from_data(TensorData::new(x.clone(), [n]), &dev);
        assert!(given_gradient(plain, &given).is_err());
        type F64 = Autodiff<NdArray<f64>>;
        let other = Tensor::<F64, 1>::zeros([n], &dev).require_grad();
        assert!(given_gradient(other, &given).is_err());
    }

    /// The host copy has the tensor's values in its logical order, laid out contiguously or not.
    #[test]
    fn f32_values_read_any_layout() {
        let dev = Default::default();
        let x = Tensor::<Cpu, 2>::random([37, 11], Distribution::Normal(0.0, 1.0), &dev);
        for t in [
            x.clone(),
            x.clone().transpose(),
            x.clone().slice([3..20, 2..9]),
        ] {
            let expected = t.clone().into_data().to_vec::<f32>().expect("f32");
            assert_eq!(f32_values(&t), Some(expected.clone()));
            assert_eq!(f32_values(&t.inner()), Some(expected));
        }
        type F64 = NdArray<f64>;
        assert_eq!(f32_values(&Tensor::<F64, 1>::zeros([3], &dev)), None);
    }
}
