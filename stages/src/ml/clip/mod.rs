//! CLIP as a student: OpenAI's dual encoder in burn, loaded from pretrained weights and
//! fine-tuned with the method's losses.
//!
//! - [`shape`]: what rebuilding a CLIP needs (presets ViT-B/32, B/16, L/14, L/14@336; a
//!   transformers `config.json`; or read off a checkpoint's tensors).
//! - [`model`]: the two towers, field names = transformers' module paths.
//! - [`weights`]: Hugging Face and open_clip safetensors in, the Hugging Face layout out.
//! - [`tokenizer`]: CLIP's byte-level BPE, id for id with OpenAI's tokenizer.
//!
//! The student ([`ClipStudent`]) puts the heads of docs/method.md on CLIP's projected outputs, as
//! the reference code does (`ln_cross_*_projection` → `cross_*_projection` on
//! `encode_image`/`encode_text`): the cross heads give the retrieval embedding f (also in the
//! baseline), the uni heads the USA embedding g. CLIP's own logit scale is kept (and exported)
//! but not trained: the losses use the student's temperatures.

pub mod model;
pub mod shape;
pub mod tokenizer;
pub mod weights;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use self::model::Clip;
use self::shape::ClipShape;
use super::selfalign::{Locals, SelfAlign, SelfAlignShape};
use super::student::{Encoded, Heads, SplitInputs, Student, Temperatures, renumber};
use crate::pictures::Pixels;

/// CLIP's normalisation (the `clip` preprocessing preset's).
pub const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Preprocessed pictures (resized and centre-cropped, 8-bit) and token ids of one split.
pub struct ClipInputs {
    /// `images × size × size × 3` bytes (rows of RGB pixels).
    pub pixels: Pixels,
    pub size: usize,
    /// `[start] + BPE ids + [end]` of each caption, at most the context long.
    pub tokens: Vec<Vec<u32>>,
}

impl SplitInputs for ClipInputs {
    fn images(&self) -> usize {
        self.pixels.len() / (3 * self.size * self.size).max(1)
    }
    fn captions(&self) -> usize {
        self.tokens.len()
    }
}

impl ClipInputs {
    /// The pictures `rows`, normalised with CLIP's mean and std, `[rows, 3, s, s]`.
    pub fn pixel_batch<B: Backend>(&self, rows: &[usize], device: &B::Device) -> Tensor<B, 4> {
        let s = self.size;
        let plane = s * s;
        let mut data = vec![0.0f32; rows.len() * 3 * plane];
        for (k, &r) in rows.iter().enumerate() {
            let src = &self.pixels[r * 3 * plane..(r + 1) * 3 * plane];
            let dst = &mut data[k * 3 * plane..(k + 1) * 3 * plane];
            for (p, rgb) in src.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    dst[c * plane + p] = (rgb[c] as f32 / 255.0 - MEAN[c]) / STD[c];
                }
            }
        }
        Tensor::from_data(TensorData::new(data, [rows.len(), 3, s, s]), device)
    }

    /// The captions `rows` padded with 0 to the longest, and each one's end-of-text position.
    pub fn token_batch<B: Backend>(
        &self,
        rows: &[usize],
        device: &B::Device,
    ) -> (Tensor<B, 2, Int>, Vec<usize>) {
        let l = rows
            .iter()
            .map(|&r| self.tokens[r].len())
            .max()
            .unwrap_or(2);
        let mut ids = vec![0i64; rows.len() * l];
        let mut ends = Vec::with_capacity(rows.len());
        for (k, &r) in rows.iter().enumerate() {
            let t = &self.tokens[r];
            for (j, &id) in t.iter().enumerate() {
                ids[k * l + j] = id as i64;
            }
            ends.push(t.len() - 1);
        }
        (
            Tensor::from_data(TensorData::new(ids, [rows.len(), l]), device),
            ends,
        )
    }
}

/// Pretrained CLIP weights and the tokenizer that goes with them, read and checked against each
/// other.
pub struct Pretrained<B: Backend> {
    pub clip: Clip<B>,
    pub shape: ClipShape,
    pub layout: weights::Layout,
    pub tokenizer: tokenizer::ClipTokenizer,
}

/// Reads the checkpoint at `weights` (shape from its config.json, else from its tensors with
/// `heads` / `activation` as given) and the merges at `tokenizer`.
pub fn pretrained<B: Backend>(
    weights_path: &std::path::Path,
    tokenizer_path: &std::path::Path,
    heads: Option<usize>,
    activation: Option<shape::Activation>,
    device: &B::Device,
) -> Result<Pretrained<B>, String> {
    let checkpoint = weights::Checkpoint::read(weights_path).map_err(|e| e.to_string())?;
    let mut shape = checkpoint.shape(activation).map_err(|e| e.to_string())?;
    if let Some(h) = heads {
        shape.vision.tower.heads = h;
        shape.text.tower.heads = h;
        shape.check().map_err(|e| format!("`heads: {h}`: {e}"))?;
    }
    let tokenizer =
        tokenizer::ClipTokenizer::from_path(tokenizer_path).map_err(|e| e.to_string())?;
    if tokenizer.vocab_size() != shape.text.vocab {
        return Err(format!(
            "the tokenizer at {} has {} tokens, the text tower of {} embeds {}: they do not belong together",
            tokenizer_path.display(),
            tokenizer.vocab_size(),
            weights_path.display(),
            shape.text.vocab
        ));
    }
    let clip = weights::load::<B>(&checkpoint, &shape, device).map_err(|e| e.to_string())?;
    Ok(Pretrained {
        clip,
        shape,
        layout: checkpoint.layout,
        tokenizer,
    })
}

/// What a trained CLIP student is rebuilt from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClipStudentShape {
    pub clip: ClipShape,
    pub uni_heads: bool,
    /// SelfAlign parameters, when trained with LCA or CRA (locals: the last layer's patch and
    /// token states through CLIP's own final norms and projections, `embed_dim` wide).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selfalign: Option<SelfAlignShape>,
}

/// CLIP with the heads of docs/method.md on its projected outputs.
#[derive(Module, Debug)]
pub struct ClipStudent<B: Backend> {
    pub clip: Clip<B>,
    pub image_heads: Heads<B>,
    pub text_heads: Heads<B>,
    pub temperatures: Temperatures<B>,
    pub selfalign: Option<SelfAlign<B>>,
}

impl<B: Backend> ClipStudent<B> {
    /// The student around `clip` (pretrained weights, already loaded), with new heads.
    pub fn new(clip: Clip<B>, shape: &ClipStudentShape, device: &B::Device) -> Self {
        let d = shape.clip.embed_dim;
        renumber(Self {
            clip,
            image_heads: Heads::new(d, d, shape.uni_heads, device),
            text_heads: Heads::new(d, d, shape.uni_heads, device),
            temperatures: Temperatures::new(device),
            selfalign: shape.selfalign.map(|a| SelfAlign::new(a, device)),
        })
    }

    /// A student of `shape` with random weights (to load a trained record over).
    pub fn empty(shape: &ClipStudentShape, device: &B::Device) -> Self {
        Self::new(Clip::new(&shape.clip, device), shape, device)
    }
}

impl<B: Backend> Student<B> for ClipStudent<B> {
    type Inputs = ClipInputs;

    fn encode_images(&self, inputs: &ClipInputs, rows: &[usize], device: &B::Device) -> Encoded<B> {
        let x = inputs.pixel_batch(rows, device);
        let (pooled, patches) = self.clip.encode_image_tokens(x, self.selfalign.is_some());
        let (cross, uni) = self.image_heads.forward(pooled);
        Encoded {
            cross,
            uni,
            locals: patches.map(Locals::dense),
        }
    }

    fn encode_texts(&self, inputs: &ClipInputs, rows: &[usize], device: &B::Device) -> Encoded<B> {
        let (ids, ends) = inputs.token_batch(rows, device);
        let l = ids.dims()[1];
        let (pooled, states) = self
            .clip
            .encode_text_tokens(ids, &ends, self.selfalign.is_some());
        // The words: every position after start-of-text and before end-of-text.
        let locals = states.map(|states| {
            let valid: Vec<f32> = ends
                .iter()
                .flat_map(|&e| (0..l).map(move |k| f32::from(u8::from(k >= 1 && k < e))))
                .collect();
            Locals {
                states,
                valid: Tensor::from_data(TensorData::new(valid, [ends.len(), l]), device),
            }
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
