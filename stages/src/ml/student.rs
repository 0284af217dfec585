//! Students: a backbone per modality, then the heads docs/method.md prescribes.
//!
//! Every student ends in, per modality, a *cross* head (LayerNorm → Linear(d, d)) whose output is
//! the retrieval embedding f, and — when USA is on — a separate *uni* head (a second LayerNorm →
//! Linear) whose output g is used only by USA. Head Linear weights start from N(0, 0.02²);
//! biases and LayerNorms keep burn's defaults. The learnable temperatures live in the student
//! too (so one optimiser and one checkpoint hold everything) and are clamped to their ranges on
//! the parameter values before every forward, as the reference code does.
//!
//! Parameter ids are assigned in visiting order after initialisation ([`renumber`]), so the
//! same architecture has the same ids in every process: a checkpoint's optimiser state finds
//! its parameters again on resume, and saved records are byte-identical across runs.

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

pub use super::selfalign::Locals;
use super::selfalign::SelfAlign;

/// Clamp ranges of the temperatures (docs/method.md).
pub const TAU_RANGE: (f64, f64) = (0.01, 0.10);
pub const TAU_C_RANGE: (f64, f64) = (0.10, 0.99);
pub const TAU_U_RANGE: (f64, f64) = (0.10, 1.00);

/// A Linear(d_in, d_out) whose weight is N(0, 0.02²) and whose bias keeps burn's default.
fn head_linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    let mut linear = LinearConfig::new(d_in, d_out).init(device);
    linear.weight = Param::from_tensor(Tensor::random(
        [d_in, d_out],
        Distribution::Normal(0.0, 0.02),
        device,
    ));
    linear
}

/// LayerNorm → Linear.
#[derive(Module, Debug)]
pub struct Head<B: Backend> {
    pub norm: LayerNorm<B>,
    pub linear: Linear<B>,
}

impl<B: Backend> Head<B> {
    pub fn new(d_in: usize, d_out: usize, device: &B::Device) -> Self {
        Self {
            norm: LayerNormConfig::new(d_in).init(device),
            linear: head_linear(d_in, d_out, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.linear.forward(self.norm.forward(x))
    }
}

/// The cross head and, with USA, the uni head of one modality.
#[derive(Module, Debug)]
pub struct Heads<B: Backend> {
    pub cross: Head<B>,
    pub uni: Option<Head<B>>,
}

impl<B: Backend> Heads<B> {
    pub fn new(d_in: usize, d_out: usize, uni: bool, device: &B::Device) -> Self {
        Self {
            cross: Head::new(d_in, d_out, device),
            uni: uni.then(|| Head::new(d_in, d_out, device)),
        }
    }
}

/// τ (base InfoNCE), τ_c (CSA), τ_ui / τ_ut (USA): one-element parameters.
#[derive(Module, Debug)]
pub struct Temperatures<B: Backend> {
    pub tau: Param<Tensor<B, 1>>,
    pub tau_c: Param<Tensor<B, 1>>,
    pub tau_ui: Param<Tensor<B, 1>>,
    pub tau_ut: Param<Tensor<B, 1>>,
}

fn scalar_param<B: Backend>(v: f64, device: &B::Device) -> Param<Tensor<B, 1>> {
    Param::from_tensor(Tensor::from_floats([v as f32], device))
}

/// `p` with its value clamped to `range`, same id, still a trainable leaf.
fn clamped<B: Backend>(p: Param<Tensor<B, 1>>, range: (f64, f64)) -> Param<Tensor<B, 1>> {
    p.map(|t| {
        t.detach()
            .set_require_grad(false)
            .clamp(range.0, range.1)
            .require_grad()
    })
}

impl<B: Backend> Temperatures<B> {
    /// Initial values: τ 0.05, τ_c 0.45, τ_ui = τ_ut = 0.45.
    pub fn new(device: &B::Device) -> Self {
        Self {
            tau: scalar_param(0.05, device),
            tau_c: scalar_param(0.45, device),
            tau_ui: scalar_param(0.45, device),
            tau_ut: scalar_param(0.45, device),
        }
    }

    /// Every temperature clamped to its range (done before every forward).
    pub fn clamp(self) -> Self {
        Self {
            tau: clamped(self.tau, TAU_RANGE),
            tau_c: clamped(self.tau_c, TAU_C_RANGE),
            tau_ui: clamped(self.tau_ui, TAU_U_RANGE),
            tau_ut: clamped(self.tau_ut, TAU_U_RANGE),
        }
    }

    /// Current values (τ, τ_c, τ_ui, τ_ut).
    pub fn values(&self) -> [f64; 4] {
        let v = |p: &Param<Tensor<B, 1>>| {
            p.val()
                .into_data()
                .convert::<f64>()
                .to_vec::<f64>()
                .map_or(f64::NAN, |v| v[0])
        };
        [
            v(&self.tau),
            v(&self.tau_c),
            v(&self.tau_ui),
            v(&self.tau_ut),
        ]
    }
}

/// Two-layer perceptron (Linear → GELU → Linear), the trainable backbone of `feature-heads`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn new(d_in: usize, hidden: usize, d_out: usize, device: &B::Device) -> Self {
        Self {
            fc1: LinearConfig::new(d_in, hidden).init(device),
            fc2: LinearConfig::new(hidden, d_out).init(device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.fc2.forward(super::cpu_ops::gelu(self.fc1.forward(x)))
    }
}

/// One modality's encoding of a batch: the cross-modal (retrieval) embedding f, the uni-modal
/// embedding g when the student has uni heads (USA), and the locals (image regions or word
/// states, with their padding) when the student has SelfAlign parameters.
pub struct Encoded<B: Backend> {
    pub cross: Tensor<B, 2>,
    pub uni: Option<Tensor<B, 2>>,
    pub locals: Option<Locals<B>>,
}

impl<B: Backend> Encoded<B> {
    /// Global embeddings only.
    pub fn global((cross, uni): (Tensor<B, 2>, Option<Tensor<B, 2>>)) -> Self {
        Self {
            cross,
            uni,
            locals: None,
        }
    }
}

/// What a student's forward returns for a batch of pairs (row i of both is pair i).
pub struct Embeddings<B: Backend> {
    pub image: Encoded<B>,
    pub text: Encoded<B>,
}

/// Row-major f32 rows (precomputed features, teacher vectors).
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub data: Vec<f32>,
    pub dim: usize,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
    /// The rows `idx`, concatenated.
    pub fn gather(&self, idx: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            out.extend_from_slice(self.row(i));
        }
        out
    }
    /// The rows `idx` as a `[idx.len(), dim]` tensor.
    pub fn tensor<B: Backend>(&self, idx: &[usize], device: &B::Device) -> Tensor<B, 2> {
        Tensor::from_data(
            burn::tensor::TensorData::new(self.gather(idx), [idx.len(), self.dim]),
            device,
        )
    }
}

/// What a student reads of one split (images and captions, by row).
pub trait SplitInputs: Sync {
    fn images(&self) -> usize;
    fn captions(&self) -> usize;
}

/// A trainable dual encoder: encodes rows of a split's inputs to the cross-modal embedding f,
/// with uni heads the uni-modal embedding g, with SelfAlign parameters its locals; owns the
/// learnable temperatures and the SelfAlign parameters (one optimiser and one checkpoint hold
/// everything).
pub trait Student<B: Backend>: Module<B> {
    type Inputs: SplitInputs;
    /// The images `rows`.
    fn encode_images(
        &self,
        inputs: &Self::Inputs,
        rows: &[usize],
        device: &B::Device,
    ) -> Encoded<B>;
    /// The captions `rows`.
    fn encode_texts(&self, inputs: &Self::Inputs, rows: &[usize], device: &B::Device)
    -> Encoded<B>;
    /// A batch of pairs: the images `image_rows` and the captions `caption_rows`.
    fn forward(
        &self,
        inputs: &Self::Inputs,
        image_rows: &[usize],
        caption_rows: &[usize],
        device: &B::Device,
    ) -> Embeddings<B> {
        Embeddings {
            image: self.encode_images(inputs, image_rows, device),
            text: self.encode_texts(inputs, caption_rows, device),
        }
    }
    fn temperatures(&self) -> &Temperatures<B>;
    /// The SelfAlign parameters (prototypes, guides), for students with locals trained with it.
    fn selfalign(&self) -> Option<&SelfAlign<B>> {
        None
    }
    /// The student with its SelfAlign parameters replaced by `f` of them.
    fn map_selfalign(self, _f: impl FnOnce(SelfAlign<B>) -> SelfAlign<B>) -> Self
    where
        Self: Sized,
    {
        self
    }
    /// The student with its temperatures clamped and its prototype rows at unit length (before
    /// every forward).
    fn clamped(self) -> Self;
}

/// Precomputed backbone features of a split's images and captions (`feature-heads`).
pub struct FeatureInputs {
    pub images: Rows,
    pub captions: Rows,
}

impl SplitInputs for FeatureInputs {
    fn images(&self) -> usize {
        self.images.len()
    }
    fn captions(&self) -> usize {
        self.captions.len()
    }
}

/// `feature-heads`: an MLP per modality over frozen precomputed features (any teacher's
/// output), then the heads. Fast experiments on any data.
#[derive(Module, Debug)]
pub struct FeatureHeads<B: Backend> {
    pub image_backbone: Mlp<B>,
    pub text_backbone: Mlp<B>,
    pub image_heads: Heads<B>,
    pub text_heads: Heads<B>,
    pub temperatures: Temperatures<B>,
}

/// Shape of a `feature-heads` student.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeatureHeadsShape {
    pub image_dim: usize,
    pub text_dim: usize,
    pub hidden: usize,
    pub dim: usize,
    pub uni_heads: bool,
}

impl<B: Backend> FeatureHeads<B> {
    pub fn new(shape: FeatureHeadsShape, device: &B::Device) -> Self {
        let s = shape;
        renumber(Self {
            image_backbone: Mlp::new(s.image_dim, s.hidden, s.dim, device),
            text_backbone: Mlp::new(s.text_dim, s.hidden, s.dim, device),
            image_heads: Heads::new(s.dim, s.dim, s.uni_heads, device),
            text_heads: Heads::new(s.dim, s.dim, s.uni_heads, device),
            temperatures: Temperatures::new(device),
        })
    }
}

impl<B: Backend> Heads<B> {
    /// (cross, uni) embeddings of backbone outputs `h`.
    pub fn forward(&self, h: Tensor<B, 2>) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
        let g = self.uni.as_ref().map(|u| u.forward(h.clone()));
        (self.cross.forward(h), g)
    }
}

impl<B: Backend> Student<B> for FeatureHeads<B> {
    type Inputs = FeatureInputs;

    fn encode_images(
        &self,
        inputs: &FeatureInputs,
        rows: &[usize],
        device: &B::Device,
    ) -> Encoded<B> {
        let x = inputs.images.tensor(rows, device);
        Encoded::global(self.image_heads.forward(self.image_backbone.forward(x)))
    }

    fn encode_texts(
        &self,
        inputs: &FeatureInputs,
        rows: &[usize],
        device: &B::Device,
    ) -> Encoded<B> {
        let x = inputs.captions.tensor(rows, device);
        Encoded::global(self.text_heads.forward(self.text_backbone.forward(x)))
    }

    fn temperatures(&self) -> &Temperatures<B> {
        &self.temperatures
    }

    fn clamped(mut self) -> Self {
        self.temperatures = self.temperatures.clamp();
        self
    }
}

/// Gives every parameter the id of its position in visiting order.
pub fn renumber<B: Backend, M: Module<B>>(module: M) -> M {
    struct Numbering(u64);
    impl<B: Backend> ModuleMapper<B> for Numbering {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (_, tensor, mapper) = param.consume();
            self.0 += 1;
            Param::from_mapped_value(ParamId::from(self.0), tensor, mapper)
        }
    }
    module.map(&mut Numbering(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};

    type B = Autodiff<NdArray<f32>>;

    #[test]
    fn temperatures_are_clamped_to_their_bounds_and_stay_trainable() {
        let device = Default::default();
        let mut t = Temperatures::<B>::new(&device);
        assert_eq!(
            t.values(),
            [0.05, 0.45, 0.45, 0.45].map(|v: f64| v as f32 as f64)
        );
        let set = |v: f32| Param::from_tensor(Tensor::<B, 1>::from_floats([v], &device));
        // Below and above every range.
        t.tau = set(0.001);
        t.tau_c = set(1.5);
        t.tau_ui = set(0.01);
        t.tau_ut = set(7.0);
        let ids = [t.tau.id, t.tau_c.id, t.tau_ui.id, t.tau_ut.id];
        let t = t.clamp();
        assert_eq!(
            t.values(),
            [0.01, 0.99, 0.10, 1.00].map(|v: f64| v as f32 as f64)
        );
        assert_eq!(
            [t.tau.id, t.tau_c.id, t.tau_ui.id, t.tau_ut.id],
            ids,
            "same parameters"
        );
        // Inside the range nothing moves; at a bound the gradient still reaches the value.
        let t = Temperatures::<B>::new(&device).clamp();
        assert_eq!(t.values()[0], 0.05f32 as f64);
        let grads = (t.tau.val() * 3.0).sum().backward();
        let g = t.tau.val().grad(&grads).expect("a trainable leaf");
        assert_eq!(g.into_data().to_vec::<f32>().unwrap(), vec![3.0]);
    }

    #[test]
    fn parameter_ids_follow_the_architecture_not_the_process() {
        let device = Default::default();
        let shape = FeatureHeadsShape {
            image_dim: 6,
            text_dim: 5,
            hidden: 4,
            dim: 3,
            uni_heads: true,
        };
        let ids = |m: &FeatureHeads<B>| {
            let g = crate::ml::optim::decay_groups::<B, _>(m, false);
            (g.decayed, g.plain)
        };
        let (a, b) = (
            FeatureHeads::<B>::new(shape, &device),
            FeatureHeads::<B>::new(shape, &device),
        );
        assert_eq!(ids(&a), ids(&b));
        let (decayed, plain) = ids(&a);
        // Matrices: 2 per MLP × 2 + 1 per head × 4 = 8. Not decayed: 4 MLP biases, 4 head
        // biases, 4 LayerNorms × (gain, bias), 4 temperatures = 20.
        assert_eq!(decayed.len(), 8);
        assert_eq!(plain.len(), 4 + 4 + 8 + 4);
        let with_temps = crate::ml::optim::decay_groups::<B, _>(&a, true);
        assert_eq!(with_temps.decayed.len(), 12);
    }
}
