//! `kind: teacher` — frozen uni-modal embedders run once over a dataset, features stored as Arrow.
//!
//! CUSA's soft labels come from teacher features. Extracting them once, content-addressed and
//! cached, replaces the reference code's online text teacher (+17.9 % time per epoch) and its
//! missing image-extraction script.
//!
//! ```yaml
//! text_teacher:
//!   kind: teacher
//!   inputs:
//!     dataset: ${scenes}
//!     model: ${minilm/model.onnx}
//!     tokenizer: ${minilm_tokenizer/tokenizer.json}
//!     onnxruntime: ${onnxruntime/libonnxruntime.so.1.32.0}
//!   with:
//!     modality: text
//!     dataset: ${inputs.dataset}
//!     model: ${inputs.model}
//!     tokenizer: ${inputs.tokenizer}
//!     onnxruntime: ${inputs.onnxruntime}
//!     split: all              # or train / val / test
//!     max_length: 128         # tokens, truncation explicit and recorded
//!     output: last_hidden_state   # default: the model's first output
//!     pooling: mean           # mean (over the attention mask) | cls | none
//!     normalize: true         # L2
//!     batch_size: 64
//!     precision: f32          # or f16: half the size
//! ```
//!
//! Output: `features.arrow`, an Arrow IPC file with an `id` column (caption ids for text) and an
//! `embedding` FixedSizeList<Float32 | Float16, d> column, rows in id order, and schema metadata
//! naming the model's sha256, the output, pooling, normalisation, max_length and dims — so a
//! feature file always says what produced it. Image teachers are not part of this build yet.

mod image;
pub mod onnx_edit;
pub mod preprocess;
mod runtime;
mod text;

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{Checked, ConfigError, Kind, StageContext, StageError, StageSummary, closest};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    Text,
    Image,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    #[default]
    Mean,
    Cls,
    /// All tokens concatenated (e.g. Unicom's 49×768 patch tokens → 37,632 values).
    Flatten,
    None,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F16,
}

/// The typed `with:` block of a teacher stage.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    pub modality: Modality,
    /// A `dataset` stage's output folder.
    pub dataset: String,
    /// The ONNX model file.
    pub model: String,
    /// libonnxruntime.so (≥ 1.22).
    pub onnxruntime: String,
    /// `tokenizer.json` (text).
    pub tokenizer: Option<String>,
    /// `all` or one split.
    #[serde(default = "default_split")]
    pub split: String,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    pub output: Option<String>,
    #[serde(default)]
    pub pooling: Pooling,
    #[serde(default = "default_true")]
    pub normalize: bool,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Intra-op threads [default: every core; inference dominates a teacher's time, and a
    /// share of the cores would leave them idle once parallel stages finish].
    pub threads: Option<usize>,
    #[serde(default)]
    pub precision: Precision,
    /// Image preprocessing: a preset (`clip`, `imagenet`, `dinov2`) or the full settings.
    pub preprocess: Option<PreprocessChoice>,
    /// The image root, for datasets whose images live in another stage's output.
    pub images: Option<String>,
    /// Undecodable images: `fail` (default) or `skip` (left out and logged).
    #[serde(default)]
    pub on_error: crate::dataset::normal::OnError,
    /// `auto` (CUDA when built with it and granted a GPU, else CPU), `cpu` or `cuda`.
    #[serde(default)]
    pub device: crate::device::Device,
}

/// `preprocess:` — a preset name or explicit settings.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum PreprocessChoice {
    Preset(String),
    Custom(preprocess::Preprocess),
}

impl<'de> Deserialize<'de> for PreprocessChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(PreprocessChoice::Preset(s)),
            v @ Value::Object(_) => serde_json::from_value(v)
                .map(PreprocessChoice::Custom)
                .map_err(D::Error::custom),
            other => Err(D::Error::custom(format!(
                "expected a preset name or a map of settings, found `{other}`"
            ))),
        }
    }
}

impl PreprocessChoice {
    fn resolve(&self) -> Result<preprocess::Preprocess, ConfigError> {
        match self {
            PreprocessChoice::Custom(p) => {
                if !["rgb", "bgr"].contains(&p.channels.as_str()) || !["nchw", "nhwc"].contains(&p.layout.as_str()) {
                    return Err(ConfigError::new("preprocess", "`channels` is rgb or bgr and `layout` is nchw or nhwc"));
                }
                Ok(p.clone())
            }
            PreprocessChoice::Preset(name) => preprocess::Preprocess::preset(name).ok_or_else(|| {
                ConfigError::new("preprocess", format!("unknown preprocessing preset `{name}`"))
                    .with_help("presets: clip, imagenet, dinov2 — or give resize, crop, interpolation, mean and std")
            }),
        }
    }
}

fn default_split() -> String {
    "all".into()
}
fn default_max_length() -> usize {
    128
}
fn default_true() -> bool {
    true
}
fn default_batch() -> usize {
    64
}

pub struct TeacherKind;

impl Kind for TeacherKind {
    type Config = TeacherConfig;
    const NAME: &'static str = "teacher";
    const VERSION: u32 = 1;

    fn validate(c: &mut TeacherConfig, _declared: &[String]) -> Result<Checked, ConfigError> {
        if c.modality == Modality::Text && c.tokenizer.is_none() {
            return Err(ConfigError::new(
                "",
                "a text teacher needs `tokenizer:` (a tokenizer.json)",
            ));
        }
        if c.batch_size == 0 || c.max_length == 0 {
            return Err(ConfigError::new(
                if c.batch_size == 0 {
                    "batch_size"
                } else {
                    "max_length"
                },
                "must be at least 1",
            ));
        }
        // A preset is hashed as the values it stands for: a preset edited in a later release
        // reruns exactly the teachers that use it.
        match (&c.preprocess, c.modality) {
            (Some(choice), _) => c.preprocess = Some(PreprocessChoice::Custom(choice.resolve()?)),
            (None, Modality::Image) => {
                return Err(ConfigError::at_key(
                    "",
                    "an image teacher needs `preprocess:` (a preset or the settings)",
                )
                .with_help("e.g. `preprocess: clip` (also `imagenet`, `dinov2`)"));
            }
            (None, Modality::Text) => {}
        }
        Ok(Checked::default())
    }

    fn run(&self, c: TeacherConfig, ctx: &StageContext<'_>) -> Result<StageSummary, StageError> {
        let path = |p: &str| ctx.resolve(p);
        let (model_path, lib, dataset) = (path(&c.model), path(&c.onnxruntime), path(&c.dataset));
        let model_bytes = std::fs::read(&model_path)
            .map_err(|e| StageError::io(format!("reading {}", model_path.display()), e))?;
        let model_sha = crate::download::sha256_file(&model_path)?;
        let env = runtime::environment(&lib)?;
        let threads = c.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        let (model_bytes, output) = select_output(model_bytes, c.output.as_deref(), &model_path)?;
        let (mut session, placement) =
            runtime::session(&env, &model_bytes, threads, &model_path, c.device, ctx.gpus)?;
        ctx.log.line(format!(
            "ONNX Runtime: {} execution provider ({})",
            placement.provider, placement.why
        ));
        let mut meta = HashMap::from([
            ("model_sha256".to_string(), model_sha),
            ("output".to_string(), output.clone()),
            ("pooling".to_string(), crate::api::config_name(&c.pooling)),
            ("normalize".to_string(), c.normalize.to_string()),
            ("split".to_string(), c.split.clone()),
        ]);
        let mut summary = StageSummary::default();
        let (ids, mut data, dim) = match c.modality {
            Modality::Text => {
                let (ids, texts) = crate::dataset::read::captions_text(&dataset, &c.split)?;
                if ids.is_empty() {
                    return Err(StageError::failed(format!(
                        "no captions in split `{}` of {}",
                        c.split,
                        dataset.display()
                    )));
                }
                let tok_path = path(c.tokenizer.as_deref().unwrap_or_default());
                let tok = text::tokenizer(&tok_path, c.max_length)?;
                text::check_vocabulary(&tok, &tok_path, &model_bytes, &model_path)?;
                ctx.log.line(format!(
                    "{} captions, {threads} threads, output `{output}`, pooling {:?}",
                    ids.len(),
                    c.pooling
                ));
                let e = text::embed(
                    &mut session,
                    &tok,
                    &texts,
                    &output,
                    c.pooling,
                    c.batch_size,
                    ctx,
                )?;
                let (data, dim, truncated) = (e.data, e.dim, e.truncated);
                summary
                    .metrics
                    .insert("embed_seconds".into(), Value::from(e.seconds));
                meta.insert("modality".into(), "text".into());
                meta.insert(
                    "tokenizer_sha256".into(),
                    crate::download::sha256_file(&tok_path)?,
                );
                meta.insert("max_length".into(), c.max_length.to_string());
                summary.notes.push(format!(
                    "{} captions → {dim}-d features ({truncated} truncated at {} tokens)",
                    ids.len(),
                    c.max_length
                ));
                summary
                    .metrics
                    .insert("truncated".into(), Value::from(truncated));
                (ids, data, dim)
            }
            Modality::Image => {
                let pre = c
                    .preprocess
                    .as_ref()
                    .ok_or_else(|| StageError::failed("an image teacher needs `preprocess:`"))?
                    .resolve()
                    .map_err(|e| StageError::failed(e.message))?;
                let root =
                    crate::dataset::read::image_root(&dataset, c.images.as_deref().map(path))?;
                let items: Vec<image::Item> = crate::dataset::read::images(&dataset, &c.split)?
                    .into_iter()
                    .map(|(id, rel)| image::Item {
                        id,
                        path: root.join(rel),
                    })
                    .collect();
                if items.is_empty() {
                    return Err(StageError::failed(format!(
                        "no images in split `{}` of {}",
                        c.split,
                        dataset.display()
                    )));
                }
                ctx.log.line(format!(
                    "{} images, {threads} threads, output `{output}`, pooling {:?}",
                    items.len(),
                    c.pooling
                ));
                let skip = c.on_error == crate::dataset::normal::OnError::Skip;
                let e = image::embed(
                    &mut session,
                    &items,
                    &pre,
                    &output,
                    c.pooling,
                    c.batch_size,
                    skip,
                    ctx,
                )?;
                if e.ids.is_empty() {
                    return Err(StageError::failed(format!(
                        "none of the {} images could be decoded (first: {})",
                        items.len(),
                        e.skipped[0]
                    )));
                }
                meta.insert("modality".into(), "image".into());
                meta.insert("preprocess".into(), format!("{pre:?}"));
                summary
                    .notes
                    .push(format!("{} images → {}-d features", e.ids.len(), e.dim));
                if !e.skipped.is_empty() {
                    summary.notes.push(format!(
                        "skipped {} undecodable image(s), first: {}",
                        e.skipped.len(),
                        e.skipped[0]
                    ));
                }
                summary
                    .metrics
                    .insert("skipped".into(), Value::from(e.skipped.len()));
                summary
                    .metrics
                    .insert("embed_seconds".into(), Value::from(e.seconds));
                (e.ids, e.data, e.dim)
            }
        };
        if c.normalize {
            for row in data.chunks_mut(dim.max(1)) {
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                if norm > 0.0 {
                    row.iter_mut().for_each(|v| *v /= norm);
                }
            }
        }
        meta.insert("dims".into(), dim.to_string());
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        crate::features::write(
            &ctx.out_dir.join("features.arrow"),
            &id_refs,
            Vec::new(),
            &data,
            dim,
            c.precision,
            meta,
        )?;
        summary
            .metrics
            .insert("rows".into(), Value::from(ids.len()));
        summary.metrics.insert("dims".into(), Value::from(dim));
        Ok(summary)
    }
}

/// The output to read: the model's first output by default; a named graph output; or any
/// tensor produced inside the graph, which then becomes the graph's only output, with the graph
/// pruned to what it needs (see [`onnx_edit::prune_to`]): nothing after it is computed.
fn select_output(
    model: Vec<u8>,
    wanted: Option<&str>,
    path: &Path,
) -> Result<(Vec<u8>, String), StageError> {
    let (outputs, produced) = onnx_edit::tensor_names(&model).map_err(|e| {
        StageError::failed_with_hint(
            format!("{} is {e}", path.display()),
            "the `model` input must be an ONNX model file (.onnx)",
        )
    })?;
    match wanted {
        None => outputs
            .first()
            .cloned()
            .map(|o| (model, o))
            .ok_or_else(|| StageError::failed("the model has no outputs")),
        Some(w) if outputs.iter().any(|o| o == w) => Ok((model, w.to_string())),
        Some(w) if produced.iter().any(|o| o == w) => {
            let (pruned, _) = onnx_edit::prune_to(&model, w)
                .map_err(|e| StageError::failed(format!("editing {}: {e}", path.display())))?;
            Ok((pruned, w.to_string()))
        }
        Some(w) => {
            let mut names: Vec<&str> = outputs
                .iter()
                .chain(&produced)
                .map(String::as_str)
                .collect();
            names.sort_by_key(|n| (strsim::osa_distance(w, n), *n));
            names.dedup();
            let shown: Vec<&str> = names.iter().take(8).copied().collect();
            Err(StageError::failed_with_hint(
                format!("the model has no tensor `{w}`"),
                match closest(w, &names) {
                    Some(c) => format!(
                        "did you mean `{c}`? tensors, nearest first: {}",
                        shown.join(", ")
                    ),
                    None => format!("tensors, nearest first: {}", shown.join(", ")),
                },
            ))
        }
    }
}

/// Reads the `output` tensor of a batch's results and pools it to one row per item.
pub fn pooled_output(
    outputs: &ort::session::SessionOutputs<'_>,
    output: &str,
    mask: Option<&[i64]>,
    pooling: Pooling,
) -> Result<Vec<f32>, StageError> {
    let value = outputs
        .get(output)
        .ok_or_else(|| StageError::failed(format!("the model returned no `{output}`")))?;
    let (shape, data) = value.try_extract_tensor::<f32>().map_err(|e| {
        StageError::failed(format!("output `{output}` is not a float32 tensor: {e}"))
    })?;
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    pool_batch(data, &dims, mask, pooling)
}

/// Pools a batch output of shape `dims` ([B, T, D] or [B, D]) to [B, D].
pub fn pool_batch(
    data: &[f32],
    dims: &[usize],
    mask: Option<&[i64]>,
    pooling: Pooling,
) -> Result<Vec<f32>, StageError> {
    match (dims, pooling) {
        ([_, _], Pooling::None | Pooling::Flatten) => Ok(data.to_vec()),
        ([_, _], p) => Err(StageError::failed_with_hint(
            format!(
                "the output is already one vector per item; pooling `{p:?}` needs per-token outputs"
            ),
            "set `pooling: none`",
        )),
        ([b, t, d], Pooling::Mean) => {
            let mut out = vec![0f32; b * d];
            for i in 0..*b {
                let mut count = 0f64;
                let mut acc = vec![0f64; *d];
                for j in 0..*t {
                    let m = mask.map(|m| m[i * t + j]).unwrap_or(1);
                    if m != 0 {
                        count += 1.0;
                        let row = &data[(i * t + j) * d..(i * t + j + 1) * d];
                        acc.iter_mut().zip(row).for_each(|(a, v)| *a += *v as f64);
                    }
                }
                let count = count.max(1e-9);
                out[i * d..(i + 1) * d]
                    .iter_mut()
                    .zip(&acc)
                    .for_each(|(o, a)| *o = (a / count) as f32);
            }
            Ok(out)
        }
        ([b, t, d], Pooling::Cls) => Ok((0..*b)
            .flat_map(|i| data[i * t * d..i * t * d + d].to_vec())
            .collect()),
        ([_, _, _], Pooling::None) => Err(StageError::failed_with_hint(
            "the output has one vector per token; `pooling: none` needs one vector per item",
            "choose `pooling: mean` or `pooling: cls`",
        )),
        (other, _) => Err(StageError::failed(format!(
            "cannot pool an output of shape {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_ignores_masked_tokens_and_cls_takes_the_first() {
        // Two items, three tokens, two dims.
        let data = [
            1.0, 2.0, 3.0, 4.0, 100.0, 100.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0,
        ];
        let mask = [1, 1, 0, 1, 1, 1];
        assert_eq!(
            pool_batch(&data, &[2, 3, 2], Some(&mask), Pooling::Mean).unwrap(),
            vec![2.0, 3.0, 7.0, 8.0]
        );
        assert_eq!(
            pool_batch(&data, &[2, 3, 2], Some(&mask), Pooling::Cls).unwrap(),
            vec![1.0, 2.0, 5.0, 6.0]
        );
        assert!(pool_batch(&data, &[2, 3, 2], None, Pooling::None).is_err());
        assert_eq!(
            pool_batch(&data[..4], &[2, 2], None, Pooling::None).unwrap(),
            data[..4].to_vec()
        );
        assert!(pool_batch(&data[..4], &[2, 2], None, Pooling::Mean).is_err());
    }
}
