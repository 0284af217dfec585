//! `scenes-small`: a dual encoder trained from scratch, sized for the embedded scenes dataset
//! on a laptop CPU.
//!
//! Images: `size`×`size` RGB, scaled to (v/255 − 0.5)/0.25, through one 3×3 stride-2
//! convolution + GELU per entry of `channels` (48 px and [32, 64, 128, 256] → 3×3×256), then
//! global average pooling ([`ConvEncoder`] says how the convolutions are computed). Captions: word ids of a [`WordVocab`] built from the training
//! captions, token + learned position embeddings of width `width`, a pre-LayerNorm transformer
//! encoder (`layers`, `heads`, feed-forward 2·width, GELU, no dropout: dropout draws from the
//! backend's process-wide generator, which concurrent stages share, and would break
//! same-seed-same-bytes), padding masked, mean over the real words. Both then go through the
//! heads of docs/method.md ([`Heads`]).

use burn::module::Module;
use burn::nn::activation::Activation;
use burn::nn::attention::MhaInput;
use burn::nn::transformer::{TransformerEncoder, TransformerEncoderConfig};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use super::cpu_ops;
use super::selfalign::{Locals, SelfAlign, SelfAlignShape};
use super::student::{Encoded, Heads, SplitInputs, Student, Temperatures, renumber};
use super::vocab::PAD;
use crate::pictures::Pixels;

/// Decoded pictures and word ids of one split.
pub struct PixelWordInputs {
    /// `images × size × size × 3` bytes (rows of RGB pixels).
    pub pixels: Pixels,
    pub size: usize,
    /// Word ids of each caption (non-empty, at most `max_words`).
    pub words: Vec<Vec<u32>>,
}

impl SplitInputs for PixelWordInputs {
    fn images(&self) -> usize {
        self.pixels.len() / (3 * self.size * self.size).max(1)
    }
    fn captions(&self) -> usize {
        self.words.len()
    }
}

/// Shape of a `scenes-small` student.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScenesSmallShape {
    pub image_size: usize,
    pub channels: Vec<usize>,
    pub vocab: usize,
    pub max_words: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub dim: usize,
    pub uni_heads: bool,
    /// SelfAlign parameters (and the local projections they read), when trained with LCA or
    /// CRA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selfalign: Option<SelfAlignShape>,
}

/// Side of the smallest region grid the image locals come from (the reference's 36 detector
/// regions are a 6×6 grid's worth).
pub const REGION_GRID: usize = 6;

/// Which convolution's output holds the image locals: the deepest whose grid is at least
/// [`REGION_GRID`] on a side (the first, largest, when none is): (layer, grid side, channels). At 48 px
/// with [32, 64, 128, 256] that is the third, 6×6×128: 36 regions.
pub fn region_layer(image_size: usize, channels: &[usize]) -> (usize, usize, usize) {
    let mut side = image_size;
    let mut chosen = None;
    for (i, &c) in channels.iter().enumerate() {
        side = side.div_ceil(2);
        if side >= REGION_GRID || chosen.is_none() {
            chosen = Some((i, side, c));
        }
    }
    chosen.unwrap_or((0, image_size, 3))
}

/// 3×3 stride-2 convolutions (padding 1) + GELU, then global average pooling, on
/// channels-last tensors.
///
/// Each convolution is computed as what it is, a matrix product over 3×3 patches: the nine
/// strided views of the padded input side by side (`[b, h', w', 9·c]`), then a Linear(9·c,
/// c_out). Same function and initialisation (Kaiming-uniform over the 9·c inputs) as a
/// `Conv2d`, but burn-ndarray's conv2d backward is ~30× slower than its forward (13.9 s vs
/// 0.44 s for a batch of 128 at 48 px with [32, 64, 128, 256] on 2 cores), while matrix
/// products train at full speed. The patches and the GELU are `cpu_ops`' single-pass
/// versions on burn-ndarray (same bits as the tensor compositions other backends run).
#[derive(Module, Debug)]
pub struct ConvEncoder<B: Backend> {
    pub convs: Vec<Linear<B>>,
}

impl<B: Backend> ConvEncoder<B> {
    pub fn new(channels: &[usize], device: &B::Device) -> Self {
        let mut c_in = 3;
        let convs = channels
            .iter()
            .map(|&c_out| {
                let layer = LinearConfig::new(9 * c_in, c_out).init(device);
                c_in = c_out;
                layer
            })
            .collect();
        Self { convs }
    }

    /// `[b, s, s, 3]` (channels last) → `[b, channels.last]`, and with `regions: Some(layer)`
    /// that convolution's output cells `[b, h·w, c]` (row-major).
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        regions: Option<usize>,
    ) -> (Tensor<B, 2>, Option<Tensor<B, 3>>) {
        let mut cells = None;
        for (i, conv) in self.convs.iter().enumerate() {
            let p = cpu_ops::patches(x);
            let [b, h, w, k] = p.dims();
            let y = conv.forward(p.reshape([b * h * w, k]));
            let c = y.dims()[1];
            x = cpu_ops::gelu(y.reshape([b, h, w, c]));
            if regions == Some(i) {
                cells = Some(x.clone().reshape([b, h * w, c]));
            }
        }
        let [b, _, _, c] = x.dims();
        (x.mean_dim(2).mean_dim(1).reshape([b, c]), cells)
    }
}

/// Word + position embeddings, a transformer encoder, mean over the real words.
#[derive(Module, Debug)]
pub struct WordTransformer<B: Backend> {
    pub tokens: Embedding<B>,
    pub positions: Embedding<B>,
    pub encoder: TransformerEncoder<B>,
}

impl<B: Backend> WordTransformer<B> {
    pub fn new(s: &ScenesSmallShape, device: &B::Device) -> Self {
        Self {
            tokens: EmbeddingConfig::new(s.vocab, s.width).init(device),
            positions: EmbeddingConfig::new(s.max_words, s.width).init(device),
            encoder: TransformerEncoderConfig::new(s.width, 2 * s.width, s.heads, s.layers)
                .with_dropout(0.0)
                .with_norm_first(true)
                .init(device),
        }
    }

    /// `ids` `[b, l]` with `pad` true on padding → `[b, width]`, and the word states
    /// `[b, l, width]`.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        pad: Tensor<B, 2, Bool>,
    ) -> (Tensor<B, 2>, Tensor<B, 3>) {
        let [b, l] = ids.dims();
        let width = self.tokens.weight.dims()[1];
        let positions = self
            .positions
            .weight
            .val()
            .slice([0..l, 0..width])
            .reshape([1, l, width]);
        let x = self.tokens.forward(ids) + positions;
        let h = encode(&self.encoder, x, pad.clone());
        let keep = pad.bool_not().float().reshape([b, l, 1]);
        let count = keep.clone().sum_dim(1).reshape([b, 1]).clamp_min(1.0);
        ((h.clone() * keep).sum_dim(1).reshape([b, width]) / count, h)
    }
}

/// burn's `TransformerEncoder::forward` with a padding mask, layer by layer as burn writes it,
/// the feed-forward's exact GELU computed by `cpu_ops` (one pass each way on burn-ndarray, the
/// same bits): the parameters stay burn's modules, so checkpoints do not change.
fn encode<B: Backend>(
    encoder: &TransformerEncoder<B>,
    mut x: Tensor<B, 3>,
    pad: Tensor<B, 2, Bool>,
) -> Tensor<B, 3> {
    for layer in &encoder.layers {
        let mut residual = x.clone();
        if layer.norm_first {
            residual = layer.norm_2.forward(residual);
        }
        let residual = layer
            .mha
            .forward(MhaInput::self_attn(residual).mask_pad(pad.clone()))
            .context;
        x = x + layer.dropout.forward(residual);
        let residual = if layer.norm_first {
            layer.norm_1.forward(x.clone())
        } else {
            x = layer.norm_1.forward(x);
            x.clone()
        };
        let ff = &layer.pwff;
        let h = ff.linear_inner.forward(residual);
        let h = match &ff.activation {
            Activation::Gelu(g) if !g.approximate => cpu_ops::gelu(h),
            other => other.forward(h),
        };
        let residual = ff.linear_outer.forward(ff.dropout.forward(h));
        x = x + layer.dropout.forward(residual);
        if !layer.norm_first {
            x = layer.norm_2.forward(x);
        }
    }
    x
}

#[derive(Module, Debug)]
pub struct ScenesSmall<B: Backend> {
    pub image_backbone: ConvEncoder<B>,
    pub text_backbone: WordTransformer<B>,
    pub image_heads: Heads<B>,
    pub text_heads: Heads<B>,
    pub temperatures: Temperatures<B>,
    /// Linear(channels of the region layer, d) onto the image cells and Linear(width, d) onto
    /// the word states: the locals, in one shared width (SelfAlign only).
    pub image_locals: Option<Linear<B>>,
    pub text_locals: Option<Linear<B>>,
    pub selfalign: Option<SelfAlign<B>>,
}

impl<B: Backend> ScenesSmall<B> {
    pub fn new(s: &ScenesSmallShape, device: &B::Device) -> Self {
        let c_last = *s.channels.last().unwrap_or(&3);
        let (_, _, c_regions) = region_layer(s.image_size, &s.channels);
        renumber(Self {
            image_backbone: ConvEncoder::new(&s.channels, device),
            text_backbone: WordTransformer::new(s, device),
            image_heads: Heads::new(c_last, s.dim, s.uni_heads, device),
            text_heads: Heads::new(s.width, s.dim, s.uni_heads, device),
            temperatures: Temperatures::new(device),
            image_locals: s
                .selfalign
                .map(|a| LinearConfig::new(c_regions, a.dim).init(device)),
            text_locals: s
                .selfalign
                .map(|a| LinearConfig::new(s.width, a.dim).init(device)),
            selfalign: s.selfalign.map(|a| SelfAlign::new(a, device)),
        })
    }
}

/// The pictures `rows` as a normalised `[rows, size, size, 3]` tensor.
pub fn pixel_batch<B: Backend>(
    inputs: &PixelWordInputs,
    rows: &[usize],
    device: &B::Device,
) -> Tensor<B, 4> {
    let s = inputs.size;
    let per = 3 * s * s;
    let mut data = Vec::with_capacity(rows.len() * per);
    for &r in rows {
        data.extend(
            inputs.pixels[r * per..(r + 1) * per]
                .iter()
                .map(|&v| (v as f32 / 255.0 - 0.5) / 0.25),
        );
    }
    Tensor::from_data(TensorData::new(data, [rows.len(), s, s, 3]), device)
}

/// The captions `rows` as padded ids and the padding mask.
pub fn word_batch<B: Backend>(
    inputs: &PixelWordInputs,
    rows: &[usize],
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Bool>) {
    let l = rows
        .iter()
        .map(|&r| inputs.words[r].len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = Vec::with_capacity(rows.len() * l);
    let mut pad = Vec::with_capacity(rows.len() * l);
    for &r in rows {
        let w = &inputs.words[r];
        for k in 0..l {
            ids.push(w.get(k).copied().unwrap_or(PAD) as i64);
            pad.push(k >= w.len());
        }
    }
    (
        Tensor::from_data(TensorData::new(ids, [rows.len(), l]), device),
        Tensor::from_data(TensorData::new(pad, [rows.len(), l]), device),
    )
}

/// `[b, n, c]` through a Linear as one `[b·n, c]` product: burn applies a Linear to a 3-d
/// input as b batched products, and its weight gradient as b `[c, d]` products summed
/// afterwards (a `[b, c, d]` intermediate); one 2-d product does the same work once.
fn rows_through<B: Backend>(p: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, n, c] = x.dims();
    let y = p.forward(x.reshape([b * n, c]));
    let d = y.dims()[1];
    y.reshape([b, n, d])
}

impl<B: Backend> Student<B> for ScenesSmall<B> {
    type Inputs = PixelWordInputs;

    fn encode_images(
        &self,
        inputs: &PixelWordInputs,
        rows: &[usize],
        device: &B::Device,
    ) -> Encoded<B> {
        let x = pixel_batch(inputs, rows, device);
        let layer = self.image_locals.as_ref().map(|_| {
            let s = inputs.size;
            let channels: Vec<usize> = self
                .image_backbone
                .convs
                .iter()
                .map(|c| c.weight.dims()[1])
                .collect();
            region_layer(s, &channels).0
        });
        let (pooled, cells) = self.image_backbone.forward(x, layer);
        let locals = self
            .image_locals
            .as_ref()
            .zip(cells)
            .map(|(p, cells)| Locals::dense(rows_through(p, cells)));
        let (cross, uni) = self.image_heads.forward(pooled);
        Encoded { cross, uni, locals }
    }

    fn encode_texts(
        &self,
        inputs: &PixelWordInputs,
        rows: &[usize],
        device: &B::Device,
    ) -> Encoded<B> {
        let (ids, pad) = word_batch(inputs, rows, device);
        let (pooled, states) = self.text_backbone.forward(ids, pad.clone());
        let locals = self.text_locals.as_ref().map(|p| Locals {
            states: rows_through(p, states),
            valid: pad.bool_not().float(),
        });
        let (cross, uni) = self.text_heads.forward(pooled);
        Encoded { cross, uni, locals }
    }

    fn temperatures(&self) -> &Temperatures<B> {
        &self.temperatures
    }

    fn selfalign(&self) -> Option<&SelfAlign<B>> {
        self.selfalign.as_ref()
    }

    fn map_selfalign(mut self, f: impl FnOnce(SelfAlign<B>) -> SelfAlign<B>) -> Self {
        self.selfalign = self.selfalign.map(f);
        self
    }

    fn clamped(mut self) -> Self {
        self.temperatures = self.temperatures.clamp();
        self.selfalign = self.selfalign.map(SelfAlign::normalised);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    /// `encode` is burn's encoder forward with the GELU swapped for `cpu_ops`' one: the same
    /// values and parameter gradients, bit for bit, with padding in the batch.
    #[test]
    fn the_word_encoder_has_burns_bits() {
        use burn::backend::Autodiff;
        use burn::nn::transformer::TransformerEncoderInput;
        use burn::tensor::Distribution;
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let encoder = TransformerEncoderConfig::new(16, 32, 4, 2)
            .with_dropout(0.0)
            .with_norm_first(true)
            .init::<A>(&device);
        let x = Tensor::<A, 3>::random([3, 5, 16], Distribution::Normal(0.0, 1.0), &device);
        let pad = Tensor::<A, 2, Bool>::from_data(
            TensorData::new(
                (0..15)
                    .map(|i| i % 5 >= [5, 3, 1][i / 5])
                    .collect::<Vec<_>>(),
                [3, 5],
            ),
            &device,
        );
        let bits = |t: Tensor<NdArray<f32>, 3>| -> Vec<u32> {
            let v = t.into_data().to_vec::<f32>().expect("f32");
            v.into_iter().map(f32::to_bits).collect()
        };
        let run = |ours: bool| {
            let y = if ours {
                encode(&encoder, x.clone(), pad.clone())
            } else {
                encoder.forward(TransformerEncoderInput::new(x.clone()).mask_pad(pad.clone()))
            };
            let grads = (y.clone() * y.clone()).sum().backward();
            let layer = &encoder.layers[0];
            let w = layer
                .pwff
                .linear_inner
                .weight
                .val()
                .grad(&grads)
                .expect("grad");
            let q = layer.mha.query.weight.val().grad(&grads).expect("grad");
            (bits(y.inner()), w, q)
        };
        let (ours, theirs) = (run(true), run(false));
        assert!(ours.0 == theirs.0, "encoder outputs differ");
        let flat = |t: Tensor<NdArray<f32>, 2>| bits(t.unsqueeze::<3>());
        assert!(
            flat(ours.1) == flat(theirs.1),
            "feed-forward gradients differ"
        );
        assert!(flat(ours.2) == flat(theirs.2), "attention gradients differ");
    }

    #[test]
    fn padding_does_not_change_a_captions_embedding() {
        let device = Default::default();
        let shape = ScenesSmallShape {
            image_size: 16,
            channels: vec![4, 8],
            vocab: 10,
            max_words: 6,
            width: 8,
            layers: 1,
            heads: 2,
            dim: 4,
            uni_heads: true,
            selfalign: Some(SelfAlignShape {
                dim: 5,
                prototypes: 7,
                guides: true,
            }),
        };
        let m = ScenesSmall::<B>::new(&shape, &device);
        let inputs = PixelWordInputs {
            pixels: (0..2 * 3 * 16 * 16)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<u8>>()
                .into(),
            size: 16,
            words: vec![vec![2, 3], vec![4, 5, 6, 7, 8]],
        };
        // Caption 0 alone (no padding) and beside a longer one (padded to 5 words).
        let alone = m.encode_texts(&inputs, &[0], &device);
        let padded = m.encode_texts(&inputs, &[0, 1], &device);
        let a = alone.cross.into_data().to_vec::<f32>().unwrap();
        let p = padded.cross.into_data().to_vec::<f32>().unwrap();
        for (x, y) in a.iter().zip(&p[..4]) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {p:?}");
        }
        assert_eq!(padded.uni.expect("uni heads").dims(), [2, 4]);
        // Word states of the real words, padded to the longest; the mask says which are real.
        let words = padded.locals.expect("locals with SelfAlign");
        assert_eq!(words.states.dims(), [2, 5, 5]);
        assert_eq!(
            words.valid.into_data().to_vec::<f32>().unwrap(),
            [1., 1., 0., 0., 0., 1., 1., 1., 1., 1.]
        );
        let alone_words = alone
            .locals
            .expect("locals")
            .states
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let padded_words = words.states.into_data().to_vec::<f32>().unwrap();
        for (x, y) in alone_words.iter().zip(&padded_words[..10]) {
            assert!((x - y).abs() < 1e-5, "word states do not see the padding");
        }
        let images = m.encode_images(&inputs, &[1, 0, 1], &device);
        assert_eq!(images.cross.dims(), [3, 4]);
        // 16 px, [4, 8]: 8×8 then 4×4; the 8×8 grid (≥ 6) holds the regions.
        assert_eq!(region_layer(16, &[4, 8]), (0, 8, 4));
        assert_eq!(images.locals.expect("regions").states.dims(), [3, 64, 5]);
        assert_eq!(region_layer(48, &[32, 64, 128, 256]), (2, 6, 128));
        assert_eq!(region_layer(8, &[4, 8]), (0, 4, 4));
        assert_eq!(inputs.images(), 2);
    }
}
