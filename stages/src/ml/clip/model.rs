//! CLIP's two towers in burn, generic over the backend.
//!
//! Field names are transformers' `CLIPModel` module paths (`vision_model.pre_layrnorm`, sic),
//! so a Hugging Face checkpoint's keys are this module's parameter paths and only the PyTorch
//! layout differences remain for the loader (Linear `[out, in]`, LayerNorm `weight`/`bias`, a
//! 0-d `logit_scale`).
//!
//! The patch embedding is a stride-p convolution without bias; it is computed as what it is, a
//! matrix product of the flattened patches with the kernel (burn-ndarray's conv2d backward is
//! far slower than its matrix products), from a kernel stored in PyTorch's `[width, 3, p, p]`.
//! Text: the causal mask makes every position's state independent of what follows, so a batch
//! is padded only to its longest caption (not to 77) and the end-of-text state is read at each
//! caption's own last position; padding ids never influence the result.
//! Every matrix product goes through the model's [`Precision`] (f32, or bf16 products with f32
//! around them); it is a setting of the run, not saved with the weights.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};

use super::shape::{Activation, ClipShape, Tower};
use crate::ml::precision::Precision;

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub heads: usize,
}

impl<B: Backend> Attention<B> {
    fn new(width: usize, heads: usize, device: &B::Device) -> Self {
        let l = || LinearConfig::new(width, width).init(device);
        Self {
            q_proj: l(),
            k_proj: l(),
            v_proj: l(),
            out_proj: l(),
            heads,
        }
    }

    /// `x` `[b, l, w]`; `mask` `[l, l]` added to the scores (0 or a large negative).
    fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<Tensor<B, 2>>,
        precision: Precision,
    ) -> Tensor<B, 3> {
        let [b, l, w] = x.dims();
        let hd = w / self.heads;
        let split = |t: Tensor<B, 3>| t.reshape([b, l, self.heads, hd]).swap_dims(1, 2);
        let q = split(precision.linear(&self.q_proj, x.clone())) * (hd as f64).powf(-0.5);
        let k = split(precision.linear(&self.k_proj, x.clone()));
        let v = split(precision.linear(&self.v_proj, x));
        let mut scores = precision.matmul(q, k.swap_dims(2, 3));
        if let Some(m) = mask {
            scores = scores + m.reshape([1, 1, l, l]);
        }
        let out = precision
            .matmul(softmax(scores, 3), v)
            .swap_dims(1, 2)
            .reshape([b, l, w]);
        precision.linear(&self.out_proj, out)
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    /// quick-GELU when true, exact GELU otherwise.
    pub quick_gelu: bool,
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 3>, precision: Precision) -> Tensor<B, 3> {
        let h = precision.linear(&self.fc1, x);
        let h = if self.quick_gelu {
            h.clone() * sigmoid(h * 1.702)
        } else {
            crate::ml::cpu_ops::gelu(h)
        };
        precision.linear(&self.fc2, h)
    }
}

/// A pre-norm residual block.
#[derive(Module, Debug)]
pub struct EncoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: Mlp<B>,
    pub layer_norm2: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    pub layers: Vec<EncoderLayer<B>>,
}

impl<B: Backend> Encoder<B> {
    fn new(t: &Tower, device: &B::Device) -> Self {
        let layers = (0..t.layers)
            .map(|_| EncoderLayer {
                self_attn: Attention::new(t.width, t.heads, device),
                layer_norm1: LayerNormConfig::new(t.width).init(device),
                mlp: Mlp {
                    fc1: LinearConfig::new(t.width, t.mlp).init(device),
                    fc2: LinearConfig::new(t.mlp, t.width).init(device),
                    quick_gelu: t.activation == Activation::QuickGelu,
                },
                layer_norm2: LayerNormConfig::new(t.width).init(device),
            })
            .collect();
        Self { layers }
    }

    fn forward(
        &self,
        mut x: Tensor<B, 3>,
        mask: Option<Tensor<B, 2>>,
        precision: Precision,
    ) -> Tensor<B, 3> {
        for layer in &self.layers {
            let h = layer.self_attn.forward(
                layer.layer_norm1.forward(x.clone()),
                mask.clone(),
                precision,
            );
            x = x + h;
            let h = layer
                .mlp
                .forward(layer.layer_norm2.forward(x.clone()), precision);
            x = x + h;
        }
        x
    }
}

/// The patch kernel, PyTorch's `[width, 3, p, p]`.
#[derive(Module, Debug)]
pub struct PatchEmbedding<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
}

#[derive(Module, Debug)]
pub struct VisionEmbeddings<B: Backend> {
    pub class_embedding: Param<Tensor<B, 1>>,
    pub patch_embedding: PatchEmbedding<B>,
    pub position_embedding: Embedding<B>,
}

#[derive(Module, Debug)]
pub struct VisionTransformer<B: Backend> {
    pub embeddings: VisionEmbeddings<B>,
    pub pre_layrnorm: LayerNorm<B>,
    pub encoder: Encoder<B>,
    pub post_layernorm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct TextEmbeddings<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub position_embedding: Embedding<B>,
}

#[derive(Module, Debug)]
pub struct TextTransformer<B: Backend> {
    pub embeddings: TextEmbeddings<B>,
    pub encoder: Encoder<B>,
    pub final_layer_norm: LayerNorm<B>,
}

/// CLIP: both towers, their projections and the logit scale.
#[derive(Module, Debug)]
pub struct Clip<B: Backend> {
    pub text_model: TextTransformer<B>,
    pub vision_model: VisionTransformer<B>,
    pub visual_projection: Linear<B>,
    pub text_projection: Linear<B>,
    /// log of the logit scale (CLIP's own loss; kept so an exported model is complete).
    pub logit_scale: Param<Tensor<B, 1>>,
    /// What the matrix products compute in (not saved: a setting of the run, not a weight).
    #[module(skip)]
    pub precision: Precision,
}

impl<B: Backend> Clip<B> {
    /// A randomly initialised CLIP of `shape` (weights are normally loaded over it).
    pub fn new(shape: &ClipShape, device: &B::Device) -> Self {
        let (v, t) = (&shape.vision, &shape.text);
        let w = v.tower.width;
        let p = v.patch_size;
        let grid = shape.grid();
        let normal = |std: f64| Distribution::Normal(0.0, std);
        Self {
            vision_model: VisionTransformer {
                embeddings: VisionEmbeddings {
                    class_embedding: Param::from_tensor(Tensor::random(
                        [w],
                        normal((w as f64).powf(-0.5)),
                        device,
                    )),
                    patch_embedding: PatchEmbedding {
                        weight: Param::from_tensor(Tensor::random(
                            [w, 3, p, p],
                            normal(0.02),
                            device,
                        )),
                    },
                    position_embedding: EmbeddingConfig::new(grid * grid + 1, w).init(device),
                },
                pre_layrnorm: LayerNormConfig::new(w).init(device),
                encoder: Encoder::new(&v.tower, device),
                post_layernorm: LayerNormConfig::new(w).init(device),
            },
            text_model: TextTransformer {
                embeddings: TextEmbeddings {
                    token_embedding: EmbeddingConfig::new(t.vocab, t.tower.width).init(device),
                    position_embedding: EmbeddingConfig::new(t.context, t.tower.width).init(device),
                },
                encoder: Encoder::new(&t.tower, device),
                final_layer_norm: LayerNormConfig::new(t.tower.width).init(device),
            },
            visual_projection: LinearConfig::new(w, shape.embed_dim)
                .with_bias(false)
                .init(device),
            text_projection: LinearConfig::new(t.tower.width, shape.embed_dim)
                .with_bias(false)
                .init(device),
            logit_scale: Param::from_tensor(Tensor::from_floats([(1.0f32 / 0.07).ln()], device)),
            precision: Precision::Fp32,
        }
    }

    /// This CLIP computing its matrix products in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Projected image embeddings (not normalised) of `pixels` `[b, 3, s, s]` (normalised
    /// with CLIP's mean and std).
    pub fn encode_image(&self, pixels: Tensor<B, 4>) -> Tensor<B, 2> {
        self.encode_image_tokens(pixels, false).0
    }

    /// [`Self::encode_image`], and with `patches` the last layer's patch tokens through the same
    /// `post_layernorm` and `visual_projection` as the class token, `[b, grid², embed]`.
    pub fn encode_image_tokens(
        &self,
        pixels: Tensor<B, 4>,
        with_patches: bool,
    ) -> (Tensor<B, 2>, Option<Tensor<B, 3>>) {
        let vm = &self.vision_model;
        let kernel = vm.embeddings.patch_embedding.weight.val();
        let [w, c, p, _] = kernel.dims();
        let [b, _, s, _] = pixels.dims();
        let g = s / p;
        let patches = pixels
            .reshape([b, c, g, p, g, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, g * g, c * p * p]);
        let x = self.precision.matmul(
            patches,
            kernel.reshape([w, c * p * p]).transpose().unsqueeze::<3>(),
        );
        let cls = vm
            .embeddings
            .class_embedding
            .val()
            .reshape([1, 1, w])
            .expand([b, 1, w]);
        let positions = vm
            .embeddings
            .position_embedding
            .weight
            .val()
            .unsqueeze::<3>();
        let x = Tensor::cat(vec![cls, x], 1) + positions;
        let x = vm
            .encoder
            .forward(vm.pre_layrnorm.forward(x), None, self.precision);
        let n = x.dims()[1];
        let tokens = with_patches.then(|| {
            let cells = vm
                .post_layernorm
                .forward(x.clone().slice([0..b, 1..n, 0..w]));
            self.precision.linear(&self.visual_projection, cells)
        });
        let pooled = x.slice([0..b, 0..1, 0..w]).reshape([b, w]);
        let pooled = self
            .precision
            .linear(&self.visual_projection, vm.post_layernorm.forward(pooled));
        (pooled, tokens)
    }

    /// Projected text embeddings (not normalised) of `ids` `[b, l]`, whose end-of-text tokens
    /// are at `ends` (one position per row).
    pub fn encode_text(&self, ids: Tensor<B, 2, Int>, ends: &[usize]) -> Tensor<B, 2> {
        self.encode_text_tokens(ids, ends, false).0
    }

    /// [`Self::encode_text`], and with `states` every position's final state through the same
    /// `final_layer_norm` and `text_projection`, `[b, l, embed]`.
    pub fn encode_text_tokens(
        &self,
        ids: Tensor<B, 2, Int>,
        ends: &[usize],
        states: bool,
    ) -> (Tensor<B, 2>, Option<Tensor<B, 3>>) {
        let tm = &self.text_model;
        let [b, l] = ids.dims();
        let device = ids.device();
        let width = tm.embeddings.token_embedding.weight.dims()[1];
        let positions = tm
            .embeddings
            .position_embedding
            .weight
            .val()
            .slice([0..l, 0..width])
            .unsqueeze::<3>();
        let x = tm.embeddings.token_embedding.forward(ids) + positions;
        let x = tm
            .encoder
            .forward(x, Some(causal_mask(l, &device)), self.precision);
        let x = tm.final_layer_norm.forward(x).reshape([b * l, width]);
        let rows: Vec<i64> = ends
            .iter()
            .enumerate()
            .map(|(i, &e)| (i * l + e) as i64)
            .collect();
        let all = states.then(|| {
            let e = self.text_projection.weight.dims()[1];
            self.precision
                .linear(&self.text_projection, x.clone())
                .reshape([b, l, e])
        });
        let pooled = x.select(0, Tensor::from_data(TensorData::new(rows, [b]), &device));
        (self.precision.linear(&self.text_projection, pooled), all)
    }
}

/// 0 on and below the diagonal, a large negative above it.
fn causal_mask<B: Backend>(l: usize, device: &B::Device) -> Tensor<B, 2> {
    let data: Vec<f32> = (0..l * l)
        .map(|k| if k % l > k / l { -1e9 } else { 0.0 })
        .collect();
    Tensor::from_data(TensorData::new(data, [l, l]), device)
}
