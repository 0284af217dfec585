//! Step time of the loss variants on the same batches (teacher vectors precomputed), for
//! `cusa-pipe bench train`: the overhead of CSA/USA (and, on a student with locals, of LCA,
//! CRA and SelfAlign+CUSA) over the base loss, and throughput, with a
//! `feature-heads` student (the loss dominates), a `scenes-small` one (a trained backbone) and
//! a `clip` one (both CLIP towers fine-tuned).

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

use super::config::{BaseLoss, CraConfig, CsaConfig, LcaConfig, LossConfig, UsaConfig};
use super::step::{StepBatch, StepSettings, step_once};
use crate::ml::clip::shape::ClipShape;
use crate::ml::clip::{ClipInputs, ClipStudent, ClipStudentShape};
use crate::ml::loss::Reduction;
use crate::ml::optim::GroupedAdamW;
use crate::ml::scenes_small::{PixelWordInputs, ScenesSmall, ScenesSmallShape};
use crate::ml::selfalign::SelfAlignShape;
use crate::ml::student::{FeatureHeads, FeatureHeadsShape, FeatureInputs, Rows, Student};

/// One variant's figures.
#[derive(Debug, Clone)]
pub struct StepFigure {
    pub variant: &'static str,
    /// Median seconds per step.
    pub seconds_per_step: f64,
    pub pairs_per_second: f64,
}

/// Deterministic pseudo-random unit rows.
fn rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n * d);
    for _ in 0..n {
        let row: Vec<f32> = (0..d)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        out.extend(row.iter().map(|x| x / norm));
    }
    out
}

/// `n` pseudo-random `side`² RGB pictures, 8-bit rows.
fn pixels(n: usize, side: usize, seed: u64) -> Vec<u8> {
    rows(n, 3 * side * side, seed)
        .iter()
        .map(|x| ((x * 40.0 + 0.5).clamp(0.0, 1.0) * 255.0) as u8)
        .collect()
}

/// The loss variants: base, +CSA, +USA, +CUSA, and for students with locals +LCA, +CRA,
/// +SelfAlign (both) and +SelfAlign+CUSA, with the reference's hyperparameters.
fn variants(locals: bool) -> Vec<(&'static str, LossConfig)> {
    let loss = |csa: bool, usa: bool, lca: bool, cra: bool| LossConfig {
        base: BaseLoss::Infonce,
        reduction: None,
        margin: 0.2,
        csa: csa.then_some(CsaConfig { alpha: 0.1 }),
        usa: usa.then_some(UsaConfig { beta: 0.5 }),
        lca: lca.then(LcaConfig::default),
        cra: cra.then(CraConfig::default),
        soft_temperature: None,
        soft_kl: None,
    };
    let mut v = vec![
        ("base", loss(false, false, false, false)),
        ("+csa", loss(true, false, false, false)),
        ("+usa", loss(false, true, false, false)),
        ("+cusa", loss(true, true, false, false)),
    ];
    if locals {
        v.extend([
            ("+lca", loss(false, false, true, false)),
            ("+cra", loss(false, false, false, true)),
            ("+selfalign", loss(false, false, true, true)),
            ("+selfalign+cusa", loss(true, true, true, true)),
        ]);
    }
    v
}

/// The SelfAlign parameters a variant's student needs (locals `dim` wide).
fn selfalign_shape(loss: &LossConfig, dim: usize) -> Option<SelfAlignShape> {
    loss.selfalign().then(|| SelfAlignShape {
        dim,
        prototypes: loss.lca.map_or(0, |l| l.prototypes),
        guides: loss.cra.is_some(),
    })
}

/// Teacher width in the benchmarks (MiniLM / DINOv2-small).
const TEACHER_DIM: usize = 384;

/// Four batches of `batch` pairs; in each, row 5k+4 shows the image
/// of row 5k (multi-positive targets as in real batches), with fresh teacher vectors.
pub(crate) fn step_batches(batch: usize) -> Vec<StepBatch> {
    (0..4u64)
        .map(|k| {
            let image_rows: Vec<usize> = (0..batch)
                .map(|i| if i % 5 == 4 { i - 4 } else { i })
                .collect();
            let teacher_images = Rows {
                data: rows(batch, TEACHER_DIM, 37 + k),
                dim: TEACHER_DIM,
            }
            .gather(&image_rows);
            StepBatch {
                caption_rows: (0..batch).collect(),
                image_rows,
                teacher: Some((
                    Rows {
                        data: teacher_images,
                        dim: TEACHER_DIM,
                    },
                    Rows {
                        data: rows(batch, TEACHER_DIM, 41 + k),
                        dim: TEACHER_DIM,
                    },
                )),
            }
        })
        .collect()
}

/// Times `steps` steps (after `warmup`) of each variant on the same batches, interleaved
/// round-robin so drift in machine load hits every variant alike. `student(loss)` builds a
/// fresh student for a variant (uni heads for USA, SelfAlign parameters for LCA/CRA);
/// `inputs[k]` feeds batch k. Prototypes are trained from the first step (the timing includes
/// their gradient).
fn time_variants<B, S>(
    device: &B::Device,
    batch: usize,
    locals: bool,
    student: impl Fn(&LossConfig) -> S,
    inputs: &[S::Inputs],
    steps: usize,
    warmup: usize,
) -> Vec<StepFigure>
where
    B: AutodiffBackend,
    S: Student<B> + AutodiffModule<B>,
{
    let batches = step_batches(batch);
    let mut states: Vec<_> = variants(locals)
        .into_iter()
        .map(|(name, losses)| {
            let model = student(&losses);
            let optim = GroupedAdamW::new(&model, 1e-4, false);
            let objective = losses.objective(Reduction::Mean);
            (name, objective, Some(model), optim, Vec::new())
        })
        .collect();
    let settings = StepSettings {
        lr: 1e-3,
        grad_clip: None,
        epoch: 1,
    };
    for i in 0..warmup + steps {
        for (_, objective, model, optim, times) in states.iter_mut() {
            let k = i % batches.len();
            let started = Instant::now();
            let (next, _) = step_once(
                model.take().expect("model"),
                optim,
                objective,
                settings,
                &inputs[k],
                &[&batches[k]],
                device,
            )
            .expect("every variant's student has what its terms need");
            *model = Some(next);
            if i >= warmup {
                times.push(started.elapsed().as_secs_f64());
            }
        }
    }
    states
        .into_iter()
        .map(|(variant, _, _, _, mut times)| {
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            StepFigure {
                variant,
                seconds_per_step: median,
                pairs_per_second: batch as f64 / median,
            }
        })
        .collect()
}

/// The variants with a `feature-heads` student over `feature_dim`-wide features.
pub fn feature_heads_step_times<B: AutodiffBackend>(
    device: &B::Device,
    batch: usize,
    feature_dim: usize,
    hidden: usize,
    dim: usize,
    steps: usize,
    warmup: usize,
) -> Vec<StepFigure> {
    let inputs: Vec<FeatureInputs> = (0..4u64)
        .map(|k| FeatureInputs {
            images: Rows {
                data: rows(batch, feature_dim, 11 + k),
                dim: feature_dim,
            },
            captions: Rows {
                data: rows(batch, feature_dim, 23 + k),
                dim: feature_dim,
            },
        })
        .collect();
    let student = |loss: &LossConfig| {
        FeatureHeads::<B>::new(
            FeatureHeadsShape {
                image_dim: feature_dim,
                text_dim: feature_dim,
                hidden,
                dim,
                uni_heads: loss.usa.is_some(),
            },
            device,
        )
    };
    time_variants(device, batch, false, student, &inputs, steps, warmup)
}

/// The variants with a `scenes-small` student (CNN over `shape.image_size`² pictures,
/// transformer over 12-word captions): the overhead on a backbone that is trained.
pub fn scenes_small_step_times<B: AutodiffBackend>(
    device: &B::Device,
    batch: usize,
    shape: &ScenesSmallShape,
    steps: usize,
    warmup: usize,
) -> Vec<StepFigure> {
    let side = shape.image_size;
    let inputs: Vec<PixelWordInputs> = (0..4u64)
        .map(|k| PixelWordInputs {
            pixels: pixels(batch, side, 53 + k).into(),
            size: side,
            words: (0..batch)
                .map(|i| {
                    (0..12)
                        .map(|w| 2 + ((i * 31 + w * 7 + k as usize) % (shape.vocab - 2)) as u32)
                        .collect()
                })
                .collect(),
        })
        .collect();
    let student = |loss: &LossConfig| {
        ScenesSmall::<B>::new(
            &ScenesSmallShape {
                uni_heads: loss.usa.is_some(),
                selfalign: selfalign_shape(loss, shape.dim),
                ..shape.clone()
            },
            device,
        )
    };
    time_variants(device, batch, true, student, &inputs, steps, warmup)
}

/// `batches` batches of `batch` pseudo-random pictures and captions of `text_len` tokens
/// (start, words, end) for a CLIP of `shape`.
pub(crate) fn clip_inputs(
    shape: &ClipShape,
    batch: usize,
    text_len: usize,
    batches: usize,
) -> Vec<ClipInputs> {
    let side = shape.vision.image_size;
    let vocab = shape.text.vocab;
    let words = text_len.clamp(2, shape.text.context) - 2;
    (0..batches as u64)
        .map(|k| ClipInputs {
            pixels: pixels(batch, side, 59 + k).into(),
            size: side,
            tokens: (0..batch)
                .map(|i| {
                    let mut t = vec![(vocab - 2) as u32];
                    t.extend(
                        (0..words).map(|w| ((i * 31 + w * 7 + k as usize) % (vocab - 2)) as u32),
                    );
                    t.push((vocab - 1) as u32);
                    t
                })
                .collect(),
        })
        .collect()
}

/// The variants with a `clip` student of `shape` (random weights: the step time does not depend
/// on their values), captions of 12 BPE tokens between start and end of text.
pub fn clip_step_times<B: AutodiffBackend>(
    device: &B::Device,
    batch: usize,
    shape: &ClipShape,
    steps: usize,
    warmup: usize,
) -> Vec<StepFigure> {
    let inputs = clip_inputs(shape, batch, 14, 4);
    let student = |loss: &LossConfig| {
        ClipStudent::<B>::empty(
            &ClipStudentShape {
                clip: *shape,
                uni_heads: loss.usa.is_some(),
                selfalign: None,
            },
            device,
        )
    };
    time_variants(device, batch, false, student, &inputs, steps, warmup)
}

/// [`clip_step_times`] on the CPU, instantiated here (see [`feature_heads_step_times_cpu`]).
pub fn clip_step_times_cpu(
    batch: usize,
    shape: &ClipShape,
    steps: usize,
    warmup: usize,
) -> Vec<StepFigure> {
    clip_step_times::<Cpu>(&Default::default(), batch, shape, steps, warmup)
}

/// The CPU backend the benchmarks run on.
pub type Cpu = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

/// [`feature_heads_step_times`] on the CPU, instantiated here: generic code is compiled in the
/// crate that names the concrete backend, and this crate is the one built with optimisations
/// in the dev profile (the binary's own crate is not).
pub fn feature_heads_step_times_cpu(
    batch: usize,
    feature_dim: usize,
    hidden: usize,
    dim: usize,
    steps: usize,
    warmup: usize,
) -> Vec<StepFigure> {
    feature_heads_step_times::<Cpu>(
        &Default::default(),
        batch,
        feature_dim,
        hidden,
        dim,
        steps,
        warmup,
    )
}

/// [`scenes_small_step_times`] on the CPU, instantiated here (see
/// [`feature_heads_step_times_cpu`]).
pub fn scenes_small_step_times_cpu(
    batch: usize,
    shape: &ScenesSmallShape,
    steps: usize,
    warmup: usize,
) -> Vec<StepFigure> {
    scenes_small_step_times::<Cpu>(&Default::default(), batch, shape, steps, warmup)
}

/// [`scenes_small_step_times`] on burn's other CPU backend, flex (f32), for comparison with
/// ndarray (instantiated here, see [`feature_heads_step_times_cpu`]).
pub fn scenes_small_step_times_flex(
    batch: usize,
    shape: &ScenesSmallShape,
    steps: usize,
    warmup: usize,
) -> Vec<StepFigure> {
    scenes_small_step_times::<burn::backend::Autodiff<burn::backend::Flex>>(
        &Default::default(),
        batch,
        shape,
        steps,
        warmup,
    )
}
