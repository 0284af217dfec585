//! Pretrained CLIP weights in, fine-tuned CLIP weights out, in the Hugging Face layout.
//!
//! Reading accepts a transformers `CLIPModel` checkpoint (`model.safetensors`, a folder holding
//! it and maybe `config.json`) or an open_clip / OpenAI state dict saved as safetensors
//! (`visual.transformer.resblocks.N.attn.in_proj_weight`, …). Both become one set of tensors
//! under transformers' names, in float32: open_clip's fused `in_proj` is split into q/k/v and
//! its `[width, embed]` projections are transposed; half-precision tensors are widened; the
//! `position_ids` / `attn_mask` buffers are dropped. burn-store's applier then puts them onto a [`Clip`]
//! with the PyTorch adapter (Linear `[out, in]` → `[in, out]`, LayerNorm `weight`/`bias` →
//! `gamma`/`beta`) plus the one CLIP-specific difference (a 0-d `logit_scale`).
//!
//! Invariant: a load either applies every parameter of the model from the file or fails, naming
//! the missing, unexpected and mis-shaped tensors under the checkpoint's own names. Nothing is
//! left at its random initialisation silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use burn::module::ParamId;
use burn::store::{
    ApplyError, BurnToPyTorchAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter,
    TensorSnapshot,
};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, TensorData};
use safetensors::{Dtype, SafeTensors};

use super::model::Clip;
use super::shape::{Activation, ClipShape, TextShape, Tower, VisionShape};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
}

/// Which naming the checkpoint used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    HuggingFace,
    OpenClip,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::HuggingFace => "Hugging Face CLIPModel",
            Self::OpenClip => "open_clip",
        })
    }
}

/// A float32 tensor under transformers' name.
struct Named {
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// A checkpoint read and renamed, before it is applied to a model.
pub struct Checkpoint {
    pub path: PathBuf,
    pub layout: Layout,
    /// `config.json` beside the weights, when there is one.
    pub hf_config: Option<serde_json::Value>,
    tensors: BTreeMap<String, Named>,
}

fn invalid(path: &Path, why: impl Into<String>) -> WeightsError {
    WeightsError::Invalid {
        path: path.display().to_string(),
        why: why.into(),
    }
}

fn to_f32(path: &Path, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, WeightsError> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => {
            return Err(invalid(
                path,
                format!("tensor `{name}` is {other:?}; CLIP weights must be floating point"),
            ));
        }
    })
}

/// `[r, c]` → `[c, r]`.
fn transpose(t: Named) -> Named {
    let (r, c) = (t.shape[0], t.shape[1]);
    let mut data = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            data[j * r + i] = t.data[i * c + j];
        }
    }
    Named {
        shape: vec![c, r],
        data,
    }
}

/// open_clip's name of a block's part → transformers' (`None`: not a block tensor).
fn open_clip_block(rest: &str) -> Option<String> {
    let (k, tail) = rest.split_once('.')?;
    k.parse::<usize>().ok()?;
    let mapped = match tail {
        "ln_1.weight" => "layer_norm1.weight",
        "ln_1.bias" => "layer_norm1.bias",
        "ln_2.weight" => "layer_norm2.weight",
        "ln_2.bias" => "layer_norm2.bias",
        "mlp.c_fc.weight" => "mlp.fc1.weight",
        "mlp.c_fc.bias" => "mlp.fc1.bias",
        "mlp.c_proj.weight" => "mlp.fc2.weight",
        "mlp.c_proj.bias" => "mlp.fc2.bias",
        "attn.out_proj.weight" => "self_attn.out_proj.weight",
        "attn.out_proj.bias" => "self_attn.out_proj.bias",
        "attn.in_proj_weight" => "self_attn.in_proj.weight",
        "attn.in_proj_bias" => "self_attn.in_proj.bias",
        _ => return None,
    };
    Some(format!("{k}.{mapped}"))
}

/// open_clip's name → transformers' (`None`: unknown, reported as unexpected).
fn open_clip_name(name: &str) -> Option<String> {
    let fixed = match name {
        "visual.conv1.weight" => "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding" => "vision_model.embeddings.class_embedding",
        "visual.positional_embedding" => "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight" => "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias" => "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight" => "vision_model.post_layernorm.weight",
        "visual.ln_post.bias" => "vision_model.post_layernorm.bias",
        "visual.proj" => "visual_projection.weight",
        "token_embedding.weight" => "text_model.embeddings.token_embedding.weight",
        "positional_embedding" => "text_model.embeddings.position_embedding.weight",
        "ln_final.weight" => "text_model.final_layer_norm.weight",
        "ln_final.bias" => "text_model.final_layer_norm.bias",
        "text_projection" => "text_projection.weight",
        "logit_scale" => "logit_scale",
        _ => {
            if let Some(rest) = name.strip_prefix("visual.transformer.resblocks.") {
                return open_clip_block(rest).map(|b| format!("vision_model.encoder.layers.{b}"));
            }
            if let Some(rest) = name.strip_prefix("transformer.resblocks.") {
                return open_clip_block(rest).map(|b| format!("text_model.encoder.layers.{b}"));
            }
            return None;
        }
    };
    Some(fixed.to_string())
}

/// Buffers checkpoints carry that are not parameters.
fn is_buffer(name: &str) -> bool {
    name.ends_with("position_ids") || name.ends_with("attn_mask")
}

impl Checkpoint {
    /// Reads `path`: a `.safetensors` file, or a folder with `model.safetensors`.
    pub fn read(path: &Path) -> Result<Self, WeightsError> {
        let file = if path.is_dir() {
            path.join("model.safetensors")
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file).map_err(|e| WeightsError::Read {
            path: file.display().to_string(),
            source: e,
        })?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| invalid(&file, format!("not a safetensors file: {e}")))?;
        let names: Vec<String> = st
            .names()
            .into_iter()
            .map(|n| n.strip_prefix("module.").unwrap_or(n).to_string())
            .collect();
        let layout = if names.iter().any(|n| n.starts_with("vision_model.")) {
            Layout::HuggingFace
        } else if names.iter().any(|n| n.starts_with("visual.")) {
            Layout::OpenClip
        } else {
            let mut some = names.clone();
            some.sort();
            some.truncate(5);
            return Err(invalid(
                &file,
                format!(
                    "not a CLIP checkpoint: no `vision_model.*` (Hugging Face) or `visual.*` (open_clip) tensors (first names: {})",
                    some.join(", ")
                ),
            ));
        };
        let mut tensors = BTreeMap::new();
        for (raw, name) in st.names().into_iter().zip(&names) {
            if is_buffer(name) {
                continue;
            }
            let view = st.tensor(raw).expect("a listed name");
            let t = Named {
                shape: view.shape().to_vec(),
                data: to_f32(&file, name, view.dtype(), view.data())?,
            };
            match layout {
                Layout::HuggingFace => {
                    tensors.insert(name.clone(), t);
                }
                Layout::OpenClip => {
                    let Some(hf) = open_clip_name(name) else {
                        // Kept under its own name: reported as unexpected by `apply`.
                        tensors.insert(name.clone(), t);
                        continue;
                    };
                    if let Some(prefix) = hf.strip_suffix("in_proj.weight") {
                        let w = t.shape.get(1).copied().unwrap_or(0);
                        if t.shape.len() != 2 || t.shape[0] != 3 * w {
                            return Err(invalid(
                                &file,
                                format!("`{name}` has shape {:?}, not [3·width, width]", t.shape),
                            ));
                        }
                        for (k, part) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                            tensors.insert(
                                format!("{prefix}{part}.weight"),
                                Named {
                                    shape: vec![w, w],
                                    data: t.data[k * w * w..(k + 1) * w * w].to_vec(),
                                },
                            );
                        }
                    } else if let Some(prefix) = hf.strip_suffix("in_proj.bias") {
                        let w = t.data.len() / 3;
                        for (k, part) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                            tensors.insert(
                                format!("{prefix}{part}.bias"),
                                Named {
                                    shape: vec![w],
                                    data: t.data[k * w..(k + 1) * w].to_vec(),
                                },
                            );
                        }
                    } else if hf.ends_with("projection.weight") && t.shape.len() == 2 {
                        // open_clip multiplies `x @ proj`: [width, embed].
                        tensors.insert(hf, transpose(t));
                    } else {
                        tensors.insert(hf, t);
                    }
                }
            }
        }
        let hf_config = file
            .parent()
            .map(|d| d.join("config.json"))
            .filter(|c| c.is_file() && layout == Layout::HuggingFace)
            .map(|c| {
                std::fs::read(&c)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .ok_or_else(|| invalid(&c, "not a JSON object"))
            })
            .transpose()?;
        Ok(Self {
            path: file,
            layout,
            hf_config,
            tensors,
        })
    }

    fn dims(&self, name: &str) -> Result<&[usize], WeightsError> {
        self.tensors
            .get(name)
            .map(|t| t.shape.as_slice())
            .ok_or_else(|| invalid(&self.path, format!("tensor `{name}` is missing")))
    }

    fn layers(&self, tower: &str) -> usize {
        let prefix = format!("{tower}.encoder.layers.");
        self.tensors
            .keys()
            .filter_map(|k| {
                k.strip_prefix(&prefix)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |m| m + 1)
    }

    /// The model's shape: `config.json` when the checkpoint has one, else read off the
    /// tensors (heads: width / 64, as in every released CLIP; `activation` as given).
    pub fn shape(&self, activation: Option<Activation>) -> Result<ClipShape, WeightsError> {
        if let Some(c) = &self.hf_config {
            let mut s = ClipShape::from_hf_config(c)
                .map_err(|e| invalid(&self.path.with_file_name("config.json"), e))?;
            if let Some(a) = activation {
                s.vision.tower.activation = a;
                s.text.tower.activation = a;
            }
            return Ok(s);
        }
        let activation = activation.unwrap_or(Activation::QuickGelu);
        let tower = |prefix: &str, width: usize| -> Result<Tower, WeightsError> {
            let mlp = self.dims(&format!("{prefix}.encoder.layers.0.mlp.fc1.weight"))?[0];
            Ok(Tower {
                width,
                layers: self.layers(prefix),
                heads: (width / 64).max(1),
                mlp,
                activation,
            })
        };
        let vision_width = self.dims("vision_model.embeddings.class_embedding")?[0];
        let kernel = self.dims("vision_model.embeddings.patch_embedding.weight")?;
        let patch = kernel.get(2).copied().unwrap_or(0);
        let positions = self.dims("vision_model.embeddings.position_embedding.weight")?[0];
        let grid = ((positions.saturating_sub(1)) as f64).sqrt().round() as usize;
        let token = self.dims("text_model.embeddings.token_embedding.weight")?;
        let (vocab, text_width) = (token[0], token.get(1).copied().unwrap_or(0));
        let context = self.dims("text_model.embeddings.position_embedding.weight")?[0];
        let shape = ClipShape {
            vision: VisionShape {
                tower: tower("vision_model", vision_width)?,
                image_size: grid * patch,
                patch_size: patch,
            },
            text: TextShape {
                tower: tower("text_model", text_width)?,
                vocab,
                context,
            },
            embed_dim: self.dims("visual_projection.weight")?[0],
        };
        shape.check().map_err(|e| invalid(&self.path, e))?;
        Ok(shape)
    }

    /// Applies every tensor onto `model`; fails naming what is missing, unexpected or
    /// mis-shaped.
    pub fn apply<B: Backend>(&self, model: &mut Clip<B>) -> Result<(), WeightsError> {
        // The tensors go to burn-store's applier as snapshots directly (no re-serialising): it
        // matches them to the model's paths and adapts them in the model's context, keeping
        // their dtype, so they are given in the backend's float type (f64 for the check's
        // `parity-f64`).
        let snapshots: Vec<TensorSnapshot> = self
            .tensors
            .iter()
            .map(|(name, t)| {
                TensorSnapshot::from_data(
                    TensorData::new(t.data.clone(), t.shape.clone()).convert::<B::FloatElem>(),
                    name.split('.').map(str::to_string).collect(),
                    Vec::new(),
                    ParamId::new(),
                )
            })
            .collect();
        let result = model.apply(
            snapshots,
            None,
            Some(Box::new(ClipAdapter::from_pytorch())),
            false,
        );
        let hf = |p: &str| p.replace(".gamma", ".weight").replace(".beta", ".bias");
        let mut problems = Vec::new();
        let mut shown = |what: &str, mut names: Vec<String>| {
            if names.is_empty() {
                return;
            }
            names.sort();
            let n = names.len();
            names.truncate(6);
            problems.push(format!(
                "{n} {what}: {}{}",
                names.join(", "),
                if n > 6 { ", …" } else { "" }
            ));
        };
        shown(
            "missing",
            result.missing.iter().map(|(p, _)| hf(p)).collect(),
        );
        // burn-store finds a LayerNorm's `gamma` under its PyTorch name `weight` but still lists
        // `weight` as unused: what was applied under its alternative name is not unexpected.
        let applied: std::collections::HashSet<String> =
            result.applied.iter().map(|p| hf(p)).collect();
        shown(
            "unexpected",
            result
                .unused
                .iter()
                .filter(|p| !applied.contains(*p))
                .cloned()
                .collect(),
        );
        shown(
            "mis-shaped",
            result
                .errors
                .iter()
                .map(|e| match e {
                    ApplyError::ShapeMismatch { path, expected, .. } => {
                        // Both in the file's (PyTorch) layout: Linear weights are [out, in].
                        let name = hf(path);
                        let mut model = expected.as_slice().to_vec();
                        if model.len() == 2
                            && name.ends_with(".weight")
                            && !name.contains("embedding")
                        {
                            model.reverse();
                        }
                        let file = self.tensors.get(&name).map(|t| t.shape.clone());
                        format!(
                            "{name} (file {:?}, model {model:?})",
                            file.unwrap_or_default()
                        )
                    }
                    other => other.to_string(),
                })
                .collect(),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(invalid(
                &self.path,
                format!(
                    "does not fit the CLIP shape it was read as ({} layout): {}",
                    self.layout,
                    problems.join("; ")
                ),
            ))
        }
    }
}

// safetensors stores little-endian values; the byte view below relies on the machine's order.
const _: () = assert!(cfg!(target_endian = "little"));

fn bytemuck_f32(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every bit pattern is a valid u8; the slice covers exactly
    // the same memory. Little-endian machines only (what safetensors stores).
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

/// burn-store's PyTorch adapter, plus CLIP's 0-d `logit_scale` (a `[1]` parameter here).
#[derive(Clone)]
struct ClipAdapter {
    to_burn: bool,
}

impl ClipAdapter {
    fn from_pytorch() -> Self {
        Self { to_burn: true }
    }
    fn to_pytorch() -> Self {
        Self { to_burn: false }
    }
}

impl ModuleAdapter for ClipAdapter {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let adapted = if self.to_burn {
            PyTorchToBurnAdapter.adapt(snapshot)
        } else {
            BurnToPyTorchAdapter.adapt(snapshot)
        };
        if adapted.full_path() != "logit_scale" {
            return adapted;
        }
        let shape: Vec<usize> = if self.to_burn { vec![1] } else { vec![] };
        let data = adapted.clone_data_fn();
        let target = Shape::from(shape.clone());
        TensorSnapshot::from_closure(
            Rc::new(move || {
                let mut d: TensorData = data()?;
                d.shape = Shape::from(shape.clone());
                Ok(d)
            }),
            adapted.dtype,
            target,
            adapted.path_stack.clone().unwrap_or_default(),
            adapted.container_stack.clone().unwrap_or_default(),
            adapted.tensor_id.unwrap_or_default(),
        )
    }

    fn get_alternative_param_name(&self, param_name: &str, container_type: &str) -> Option<String> {
        if self.to_burn {
            PyTorchToBurnAdapter.get_alternative_param_name(param_name, container_type)
        } else {
            BurnToPyTorchAdapter.get_alternative_param_name(param_name, container_type)
        }
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// A float32 tensor to write: name, shape, values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The tensors of `module` under PyTorch names and layouts (`prefix` + module path), float32.
pub fn pytorch_tensors<B: Backend, M: ModuleSnapshot<B>>(
    module: &M,
    prefix: &str,
) -> Result<Vec<NamedTensor>, String> {
    module
        .collect(None, Some(Box::new(ClipAdapter::to_pytorch())), false)
        .into_iter()
        .map(|s| {
            let data = s
                .to_data()
                .map_err(|e| format!("{}: {e:?}", s.full_path()))?
                .convert_dtype(DType::F32);
            let values = data
                .to_vec::<f32>()
                .map_err(|e| format!("{}: {e:?}", s.full_path()))?;
            Ok((
                format!("{prefix}{}", s.full_path()),
                data.shape.as_slice().to_vec(),
                values,
            ))
        })
        .collect()
}

/// Writes `tensors` as a safetensors file (names sorted, float32), with `metadata`.
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<(), String> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, shape, data)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytemuck_f32(data))
                .map(|v| (k.clone(), v))
                .map_err(|e| format!("{k}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| e.to_string())
}

/// A [`Clip`] of the checkpoint's shape with the checkpoint's weights.
pub fn load<B: Backend>(
    checkpoint: &Checkpoint,
    shape: &ClipShape,
    device: &B::Device,
) -> Result<Clip<B>, WeightsError> {
    let mut model = Clip::<B>::new(shape, device);
    checkpoint.apply(&mut model)?;
    Ok(model)
}
