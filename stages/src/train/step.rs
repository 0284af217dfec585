//! One optimisation step: the forward of each batch, the objective's terms by name, the
//! backward, gradient clipping, AdamW, and the guides' running statistics.

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

use super::data::Rows;
use crate::ml::loss;
use crate::ml::objective::{BatchTargets, Evaluated, Objective, ObjectiveError};
use crate::ml::optim::{GroupedAccumulator, GroupedAdamW};
use crate::ml::selfalign::GuideStats;
use crate::ml::student::Student;

/// One batch: which captions and images of the split's inputs, and their teacher vectors.
pub struct StepBatch {
    /// Caption rows; the batch's i-th pair is (caption_rows[i], image_rows[i]).
    pub caption_rows: Vec<usize>,
    /// Image row of each pair (equal rows = the same image: multi-positive targets).
    pub image_rows: Vec<usize>,
    /// Teacher vectors (image, text) per pair, for CSA/USA.
    pub teacher: Option<(Rows, Rows)>,
}

/// How a step runs besides its batches.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    pub lr: f64,
    /// Clip the gradients' global norm to this.
    pub grad_clip: Option<f64>,
    /// 0-based epoch (frozen prototypes).
    pub epoch: usize,
}

/// What a step measured: the mean total and the mean of each term's weighted value, by name,
/// over its batches.
#[derive(Debug, Clone, PartialEq)]
pub struct StepValues {
    pub total: f64,
    pub terms: Vec<(&'static str, f64)>,
}

/// One optimisation step: clamp the temperatures (and re-normalise the prototypes), then per
/// batch the forward, the objective and the backward, then AdamW on the mean of the batches'
/// gradients (clipped when asked), then the guides' running statistics. More than one batch
/// is gradient accumulation: each batch's in-batch losses see only its own negatives, as the
/// reference's per-GPU losses under data parallelism do (4 GPUs × 128 = `accumulate: 4` with
/// `batch_size: 128`).
pub fn step_once<B: AutodiffBackend, S: Student<B> + AutodiffModule<B>>(
    model: S,
    optim: &mut GroupedAdamW<S, B>,
    objective: &Objective,
    settings: StepSettings,
    inputs: &S::Inputs,
    batches: &[&StepBatch],
    device: &B::Device,
) -> Result<(S, StepValues), ObjectiveError> {
    let model = model.clamped();
    let k = batches.len().max(1) as f64;
    let mut values = StepValues {
        total: 0.0,
        terms: objective.names().into_iter().map(|n| (n, 0.0)).collect(),
    };
    let mut accumulated = GroupedAccumulator::default();
    let mut stats: Vec<GuideStats> = Vec::new();
    let single = batches.len() == 1;
    let mut grads = None;
    for batch in batches {
        let e = batch_loss(&model, objective, settings.epoch, inputs, batch, device)?;
        values.total += scalar(e.total.clone().detach()) / k;
        let total = if single { e.total } else { e.total / k };
        let g = optim.group(&model, total.backward());
        if single {
            grads = Some(g);
        } else {
            accumulated.accumulate(&model, g);
        }
        for ((_, sum), (_, v)) in values.terms.iter_mut().zip(&e.values) {
            *sum += v / k;
        }
        stats.extend(e.guide_stats);
    }
    let mut grads = grads.unwrap_or_else(|| accumulated.grads());
    if let Some(max) = settings.grad_clip {
        grads.clip_global_norm(&model, max);
    }
    let mut model = optim.step_grouped(settings.lr, model, grads);
    for s in &stats {
        model = model.map_selfalign(|a| a.update_running(s));
    }
    Ok((model, values))
}

fn scalar<B: burn::tensor::backend::Backend>(t: burn::tensor::Tensor<B, 1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .map_or(f64::NAN, |v| v[0])
}

/// The objective of one batch (not yet differentiated).
pub(crate) fn batch_loss<B: AutodiffBackend, S: Student<B> + AutodiffModule<B>>(
    model: &S,
    objective: &Objective,
    epoch: usize,
    inputs: &S::Inputs,
    batch: &StepBatch,
    device: &B::Device,
) -> Result<Evaluated<B>, ObjectiveError> {
    let b = batch.caption_rows.len();
    let e = model.forward(inputs, &batch.image_rows, &batch.caption_rows, device);
    let needs = objective.needs();
    let soft_labels = batch
        .teacher
        .as_ref()
        .filter(|_| needs.soft_labels)
        .map(|(ti, tc)| {
            let all: Vec<usize> = (0..b).collect();
            (
                loss::soft_labels(ti.tensor::<B>(&all, device), objective.soft_temperature),
                loss::soft_labels(tc.tensor::<B>(&all, device), objective.soft_temperature),
            )
        });
    let targets = BatchTargets {
        image_ids: batch.image_rows.iter().map(|&r| r as u64).collect(),
        soft_labels,
        epoch,
    };
    objective.evaluate(&e, model.temperatures(), model.selfalign(), &targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::student::{FeatureHeads, FeatureHeadsShape, FeatureInputs};
    use crate::train::config::LossConfig;
    use burn::tensor::backend::Backend;

    type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

    fn rows(n: usize, d: usize, seed: u64) -> Rows {
        let mut state = seed;
        let data = (0..n * d)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        Rows { data, dim: d }
    }

    #[test]
    fn accumulated_batches_step_on_the_mean_of_their_gradients() {
        let device = Default::default();
        let shape = FeatureHeadsShape {
            image_dim: 6,
            text_dim: 5,
            hidden: 8,
            dim: 4,
            uni_heads: true,
        };
        B::seed(&device, 7);
        let model = FeatureHeads::<B>::new(shape, &device);
        let inputs = FeatureInputs {
            images: rows(8, 6, 1),
            captions: rows(8, 5, 2),
        };
        let batch = |captions: Vec<usize>, images: Vec<usize>, seed| StepBatch {
            teacher: Some((rows(4, 3, seed), rows(4, 3, seed + 1))),
            caption_rows: captions,
            image_rows: images,
        };
        let a = batch(vec![0, 1, 2, 3], vec![0, 1, 1, 3], 10);
        let b = batch(vec![4, 5, 6, 7], vec![4, 5, 6, 7], 20);
        let losses = LossConfig {
            csa: Some(super::super::config::CsaConfig { alpha: 0.5 }),
            usa: Some(super::super::config::UsaConfig { beta: 0.7 }),
            ..LossConfig::default()
        };
        let objective = losses.objective(loss::Reduction::Mean);
        let settings = StepSettings {
            lr: 1e-2,
            grad_clip: None,
            epoch: 0,
        };

        let mut optim = GroupedAdamW::new(&model, 1e-2, false);
        let (accumulated, values) = step_once(
            model.clone(),
            &mut optim,
            &objective,
            settings,
            &inputs,
            &[&a, &b],
            &device,
        )
        .unwrap();
        assert_eq!(
            values.terms.iter().map(|t| t.0).collect::<Vec<_>>(),
            ["base", "csa", "usa"]
        );
        let value = values.total;
        // The same step from one backward through the mean of both losses (Adam's update is
        // nearly invariant to the gradients' scale, so this shows that both batches count, each
        // with its own in-batch negatives; `value` shows the mean).
        let mut optim = GroupedAdamW::new(&model, 1e-2, false);
        let clamped = model.clone().clamped();
        let la = batch_loss(&clamped, &objective, 0, &inputs, &a, &device).unwrap();
        let lb = batch_loss(&clamped, &objective, 0, &inputs, &b, &device).unwrap();
        let sum =
            |e: &crate::ml::objective::Evaluated<B>| e.values.iter().map(|v| v.1).sum::<f64>();
        assert!((value - (sum(&la) + sum(&lb)) / 2.0).abs() < 1e-5);
        let joint = optim.step(1e-2, clamped, ((la.total + lb.total) / 2.0).backward());

        let all: Vec<usize> = (0..8).collect();
        let embed = |m: &FeatureHeads<B>| {
            let i = m.encode_images(&inputs, &all, &device);
            let t = m.encode_texts(&inputs, &all, &device);
            [i.cross, i.uni.unwrap(), t.cross]
                .map(|x| x.into_data().to_vec::<f32>().unwrap())
                .concat()
        };
        let (x, y, before) = (embed(&accumulated), embed(&joint), embed(&model));
        let moved: f32 = x.iter().zip(&before).map(|(p, q)| (p - q).abs()).sum();
        assert!(moved > 1e-3, "the step changed the model");
        for (p, q) in x.iter().zip(&y) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
}
