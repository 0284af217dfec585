//! AdamW with weight-decay groups and the per-epoch cosine schedule.
//!
//! burn's AdamW decays every parameter it steps, so the groups are two optimisers over disjoint
//! parameter sets: matrices (rank ≥ 2) are decayed; biases, LayerNorm gains and other 1-D
//! parameters are not. The temperatures are 1-D: undecayed by default, decayed with
//! `decay_temperatures` (the released CUSA code decays them, and its preset follows it).
//! PyTorch's AdamW epsilon (1e-8) and update rule (p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + ε)).

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

use super::params::float_params;

/// Which parameters are decayed.
pub struct DecayGroups {
    pub decayed: Vec<ParamId>,
    pub plain: Vec<ParamId>,
}

/// Splits a module's parameters: rank ≥ 2 decayed, rank 1 not, temperatures (parameters
/// under a field named `temperatures`) decayed only when `decay_temperatures`.
pub fn decay_groups<B: Backend, M: burn::module::Module<B>>(
    module: &M,
    decay_temperatures: bool,
) -> DecayGroups {
    let mut groups = DecayGroups {
        decayed: Vec::new(),
        plain: Vec::new(),
    };
    for p in float_params(module) {
        let decay = if p.is_under("temperatures") {
            decay_temperatures
        } else {
            p.shape.len() >= 2
        };
        if decay {
            groups.decayed.push(p.id);
        } else {
            groups.plain.push(p.id);
        }
    }
    groups
}

/// Learning rate of epoch `epoch` (0-based) with VSRN's step schedule: `lr` × 0.1 every
/// `every` epochs.
pub fn step_lr(lr: f64, epoch: usize, every: usize) -> f64 {
    lr * 0.1f64.powi((epoch / every.max(1)) as i32)
}

/// Learning rate of epoch `epoch` (0-based) of `epochs`: cosine from `lr` to `lr_min`, one value
/// per epoch (the reference's schedule). [`warmup_factor`] scales it during a warm-up.
pub fn cosine_lr(lr: f64, lr_min: f64, epoch: usize, epochs: usize) -> f64 {
    if epochs <= 1 {
        return lr;
    }
    let progress = epoch as f64 / (epochs - 1) as f64;
    lr_min + 0.5 * (lr - lr_min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The factor on the learning rate of optimiser step `step` (0-based) with `warmup` steps of
/// linear warm-up: (step+1)/warmup during the warm-up, then 1.
pub fn warmup_factor(step: u64, warmup: usize) -> f64 {
    if (step as usize) < warmup {
        (step + 1) as f64 / warmup as f64
    } else {
        1.0
    }
}

/// The two AdamW optimisers of the decay groups.
pub struct GroupedAdamW<M: AutodiffModule<B>, B: AutodiffBackend> {
    pub decayed: OptimizerAdaptor<AdamW, M, B>,
    pub plain: OptimizerAdaptor<AdamW, M, B>,
    groups: DecayGroups,
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> GroupedAdamW<M, B> {
    pub fn new(model: &M, weight_decay: f64, decay_temperatures: bool) -> Self {
        let config = |wd: f64| {
            AdamWConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(wd as f32)
        };
        Self {
            decayed: config(weight_decay).init(),
            plain: config(0.0).init(),
            groups: decay_groups::<B, M>(model, decay_temperatures),
        }
    }

    /// One step of both groups from the gradients of a loss.
    pub fn step(&mut self, lr: f64, model: M, grads: B::Gradients) -> M {
        let grouped = self.group(&model, grads);
        self.step_grouped(lr, model, grouped)
    }

    /// The gradients of a loss, split by decay group.
    pub fn group(&self, model: &M, mut grads: B::Gradients) -> GroupedGradients {
        GroupedGradients {
            decayed: GradientsParams::from_params(&mut grads, model, &self.groups.decayed),
            plain: GradientsParams::from_params(&mut grads, model, &self.groups.plain),
        }
    }

    /// One step of both groups from gradients already split (e.g. accumulated).
    pub fn step_grouped(&mut self, lr: f64, model: M, grads: GroupedGradients) -> M {
        let model = self.decayed.step(lr, model, grads.decayed);
        self.plain.step(lr, model, grads.plain)
    }
}

/// Gradients by decay group.
pub struct GroupedGradients {
    pub decayed: GradientsParams,
    pub plain: GradientsParams,
}

impl GroupedGradients {
    /// Scales every gradient by max_norm / (‖g‖ + 1e-6) when that is below 1, ‖g‖ the L2 norm of
    /// all of them together (PyTorch's `clip_grad_norm_`, which the SelfAlign recipe uses);
    /// returns ‖g‖.
    pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        max_norm: f64,
    ) -> f64 {
        struct SquaredNorm<'a>(&'a GroupedGradients, f64);
        impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                for group in [&self.0.decayed, &self.0.plain] {
                    if let Some(g) = group.get::<B::InnerBackend, D>(param.id) {
                        self.1 += g
                            .square()
                            .sum()
                            .into_data()
                            .convert::<f64>()
                            .to_vec::<f64>()
                            .map_or(0.0, |v| v[0]);
                    }
                }
            }
        }
        struct Scale<'a>(&'a mut GroupedGradients, f64);
        impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                for group in [&mut self.0.decayed, &mut self.0.plain] {
                    if let Some(g) = group.remove::<B::InnerBackend, D>(param.id) {
                        group.register(param.id, g * self.1);
                    }
                }
            }
        }
        let mut squared = SquaredNorm(self, 0.0);
        model.visit(&mut squared);
        let norm = squared.1.sqrt();
        let coefficient = max_norm / (norm + 1e-6);
        if coefficient < 1.0 {
            model.visit(&mut Scale(self, coefficient));
        }
        norm
    }
}

/// Sums the gradients of several backward passes (gradient accumulation), by group.
pub struct GroupedAccumulator<M> {
    decayed: burn::optim::GradientsAccumulator<M>,
    plain: burn::optim::GradientsAccumulator<M>,
}

impl<M> Default for GroupedAccumulator<M> {
    fn default() -> Self {
        Self {
            decayed: burn::optim::GradientsAccumulator::new(),
            plain: burn::optim::GradientsAccumulator::new(),
        }
    }
}

impl<M> GroupedAccumulator<M> {
    pub fn accumulate<B: AutodiffBackend>(&mut self, model: &M, grads: GroupedGradients)
    where
        M: AutodiffModule<B>,
    {
        self.decayed.accumulate(model, grads.decayed);
        self.plain.accumulate(model, grads.plain);
    }

    /// The sums so far (the accumulator starts again empty).
    pub fn grads(&mut self) -> GroupedGradients {
        GroupedGradients {
            decayed: self.decayed.grads(),
            plain: self.plain.grads(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::params::FloatParam;
    use crate::ml::student::{FeatureHeads, FeatureHeadsShape};

    #[test]
    fn matrices_are_decayed_vectors_not_and_temperatures_as_asked() {
        type B = burn::backend::NdArray<f32>;
        let shape = FeatureHeadsShape {
            image_dim: 6,
            text_dim: 5,
            hidden: 8,
            dim: 4,
            uni_heads: true,
        };
        let model = FeatureHeads::<B>::new(shape, &Default::default());
        let params = float_params(&model);
        let paths = |ids: &[ParamId]| -> Vec<String> {
            params
                .iter()
                .filter(|p| ids.contains(&p.id))
                .map(|p| p.path.clone())
                .collect()
        };
        let temperatures = [
            "temperatures.tau",
            "temperatures.tau_c",
            "temperatures.tau_ui",
            "temperatures.tau_ut",
        ];
        for decay_temperatures in [false, true] {
            let groups = decay_groups::<B, _>(&model, decay_temperatures);
            let (decayed, plain) = (paths(&groups.decayed), paths(&groups.plain));
            assert_eq!(decayed.len() + plain.len(), params.len());
            for p in &params {
                let is_temperature = temperatures.contains(&p.path.as_str());
                let want_decayed = if is_temperature {
                    decay_temperatures
                } else {
                    p.shape.len() >= 2
                };
                assert_eq!(decayed.contains(&p.path), want_decayed, "{p:?}");
            }
            assert!(
                params
                    .iter()
                    .filter(|p: &&FloatParam| p.is_under("temperatures"))
                    .count()
                    == 4
            );
            assert!(
                decayed.iter().any(|p| p.ends_with("fc1.weight")),
                "{decayed:?}"
            );
            assert!(plain.iter().any(|p| p.ends_with("fc1.bias")), "{plain:?}");
        }
    }

    #[test]
    fn cosine_goes_from_lr_to_lr_min() {
        assert_eq!(cosine_lr(1e-3, 1e-4, 0, 10), 1e-3);
        assert!((cosine_lr(1e-3, 1e-4, 9, 10) - 1e-4).abs() < 1e-15);
        assert!((cosine_lr(1.0, 0.0, 2, 5) - 0.5).abs() < 1e-12);
        assert_eq!(cosine_lr(1e-3, 1e-4, 0, 1), 1e-3);
    }

    #[test]
    fn step_schedule_divides_by_ten_every_lr_update_epochs() {
        assert_eq!(step_lr(2e-4, 0, 15), 2e-4);
        assert_eq!(step_lr(2e-4, 14, 15), 2e-4);
        assert!((step_lr(2e-4, 15, 15) - 2e-5).abs() < 1e-18);
        assert!((step_lr(2e-4, 30, 15) - 2e-6).abs() < 1e-19);
    }

    #[test]
    fn clipping_scales_all_gradients_to_the_global_norm() {
        type A = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
        let device = Default::default();
        let shape = FeatureHeadsShape {
            image_dim: 3,
            text_dim: 3,
            hidden: 4,
            dim: 2,
            uni_heads: false,
        };
        let model = FeatureHeads::<A>::new(shape, &device);
        let x = Tensor::<A, 2>::ones([2, 3], &device);
        let loss = |m: &FeatureHeads<A>| {
            (m.image_backbone.forward(x.clone()).sum() + m.text_backbone.forward(x.clone()).sum())
                * 10.0
        };
        let optim = GroupedAdamW::new(&model, 0.0, false);
        let mut grads = optim.group(&model, loss(&model).backward());
        let before = grads.clip_global_norm(&model, 1e9);
        assert!(before > 1.0, "{before}");
        let same = grads.clip_global_norm(&model, 1e9);
        assert!(
            (same - before).abs() < 1e-3 * before,
            "no clipping below the bound"
        );
        grads.clip_global_norm(&model, 2.0);
        let after = grads.clip_global_norm(&model, 1e9);
        assert!((after - 2.0).abs() < 1e-4, "{after}");
    }

    #[test]
    fn warmup_rises_linearly_then_stays_at_one() {
        assert_eq!(warmup_factor(0, 4), 0.25);
        assert_eq!(warmup_factor(2, 4), 0.75);
        assert_eq!(warmup_factor(3, 4), 1.0);
        assert_eq!(warmup_factor(100, 4), 1.0);
        assert_eq!(warmup_factor(0, 0), 1.0);
    }
}
