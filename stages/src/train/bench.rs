//! Step time of the loss variants on the same batches (features precomputed), for
//! `cusa-pipe bench train`: the overhead of CSA/USA over the base loss, and throughput.

use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;

use super::config::{BaseLoss, CsaConfig, LossConfig, UsaConfig};
use super::run::{StepBatch, step_once};
use crate::ml::loss::Reduction;
use crate::ml::optim::GroupedAdamW;
use crate::ml::student::{FeatureHeads, FeatureHeadsShape, FeatureInputs, Rows};

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

/// Times `steps` steps (after `warmup`) of base, +CSA, +USA and +CUSA on the same batches,
/// interleaved round-robin so drift in machine load hits every variant alike.
pub fn step_times<B: AutodiffBackend>(
    device: &B::Device,
    batch: usize,
    feature_dim: usize,
    hidden: usize,
    dim: usize,
    steps: usize,
    warmup: usize,
) -> Vec<StepFigure> {
    let variants: [(&'static str, Option<f64>, Option<f64>); 4] = [
        ("base", None, None),
        ("+csa", Some(0.1), None),
        ("+usa", None, Some(0.5)),
        ("+cusa", Some(0.1), Some(0.5)),
    ];
    // Four batches of fresh vectors; in each, row 5k+4 shows the image of row 5k:
    // multi-positive targets as in real batches.
    let rows_of = |seed: u64| Rows {
        data: rows(batch, feature_dim, seed),
        dim: feature_dim,
    };
    let batches: Vec<(FeatureInputs, StepBatch)> = (0..4)
        .map(|k| {
            let inputs = FeatureInputs {
                images: rows_of(11 + k),
                captions: rows_of(23 + k),
            };
            let image_rows: Vec<usize> = (0..batch)
                .map(|i| if i % 5 == 4 { i - 4 } else { i })
                .collect();
            let teacher_images = Rows {
                data: rows_of(37 + k).gather(&image_rows),
                dim: feature_dim,
            };
            let step = StepBatch {
                caption_rows: (0..batch).collect(),
                image_rows,
                teacher: Some((teacher_images, rows_of(41 + k))),
            };
            (inputs, step)
        })
        .collect();
    let mut states: Vec<_> = variants
        .iter()
        .map(|&(name, alpha, beta)| {
            let losses = LossConfig {
                base: BaseLoss::Infonce,
                reduction: None,
                margin: 0.2,
                csa: alpha.map(|alpha| CsaConfig { alpha }),
                usa: beta.map(|beta| UsaConfig { beta }),
            };
            let shape = FeatureHeadsShape {
                image_dim: feature_dim,
                text_dim: feature_dim,
                hidden,
                dim,
                uni_heads: beta.is_some(),
            };
            let model = FeatureHeads::<B>::new(shape, device);
            let optim = GroupedAdamW::new(&model, 1e-4, false);
            (name, losses, Some(model), optim, Vec::new())
        })
        .collect();
    for i in 0..warmup + steps {
        for (_, losses, model, optim, times) in states.iter_mut() {
            let (inputs, b) = &batches[i % batches.len()];
            let started = Instant::now();
            let (next, _, _) = step_once(
                model.take().expect("model"),
                optim,
                losses,
                Reduction::Mean,
                1e-3,
                inputs,
                b,
                device,
            );
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
