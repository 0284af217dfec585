//! The student set-ups of `train`: where it runs (CPU, bf16 on flex, CUDA), and for each
//! student kind the data it reads, the architecture it builds (uni heads with USA, locals and
//! SelfAlign parameters with LCA or CRA) and what it logs; then [`super::fit`] trains it.

use std::path::Path;

use super::checkpoint::pictures_file;
use super::config::{Architecture, Precision, StudentConfig, TrainConfig};
use super::data;
use super::fit::fit;
use crate::api::{StageContext, StageError, StageSummary};
#[cfg(feature = "cuda")]
use crate::device::Device;
use crate::device::{Placement, place};
use crate::ml::scenes_small::{ScenesSmall, ScenesSmallShape};
use crate::ml::selfalign::SelfAlignShape;
use crate::ml::student::{FeatureHeads, FeatureHeadsShape};
use crate::pictures::Home;
use burn::tensor::backend::AutodiffBackend;

/// The SelfAlign parameters of a student whose locals are `dim` wide, when LCA or CRA is on.
fn selfalign_shape(c: &TrainConfig, dim: usize) -> Option<SelfAlignShape> {
    c.loss.selfalign().then(|| SelfAlignShape {
        dim,
        prototypes: c.loss.lca.map_or(0, |l| l.prototypes),
        guides: c.loss.cra.is_some(),
    })
}

/// Why burn's CUDA backend does not train by default: the parity check of `cusa-pipe bench gpu`
/// failed on it (README, "On a GPU").
#[cfg(feature = "cuda")]
pub const CUDA_UNVERIFIED: &str = "burn 0.21's CUDA backend failed cusa-pipe's parity check on an H200 (InfoNCE and CSA values wrong, f32 products at TF32 precision; README, \"On a GPU\")";

/// The environment variable that lets a training run on that backend anyway (to check it).
#[cfg(feature = "cuda")]
pub const UNVERIFIED_CUDA_ENV: &str = "CUSA_PIPE_UNVERIFIED_CUDA";

/// Where a training runs: `placement` unless it is CUDA and `allow_unverified` is false; then
/// CUDA "cannot be used" in [`Device::without_cuda`]'s sense: `device: auto` trains on the CPU
/// (the log says why) and `device: cuda` is refused, naming the way out. Nothing trains
/// silently on a backend whose losses were measured wrong.
#[cfg(feature = "cuda")]
pub fn gate_cuda(
    device: Device,
    placement: Placement,
    allow_unverified: bool,
) -> Result<Placement, StageError> {
    match placement {
        Placement::Cuda(_) if !allow_unverified => device
            .without_cuda(
                CUDA_UNVERIFIED,
                &format!(
                    "use `device: cpu` or `auto`; to train on CUDA anyway (to check it), set {UNVERIFIED_CUDA_ENV}=1"
                ),
            )
            .map(Placement::Cpu),
        other => Ok(other),
    }
}

/// Trains the configured student where `device:` and the build allow.
pub fn train(c: &TrainConfig, ctx: &StageContext<'_>) -> Result<StageSummary, StageError> {
    let placement = place(c.device, ctx.gpus)?;
    #[cfg(feature = "cuda")]
    let placement = gate_cuda(
        c.device,
        placement,
        std::env::var_os(UNVERIFIED_CUDA_ENV).is_some_and(|v| v == "1"),
    )?;
    match placement {
        // burn-ndarray has no bf16; flex (burn's other CPU backend) has.
        Placement::Cpu(why) if c.precision == Precision::Bf16Mixed => {
            ctx.log.line(format!(
                "device: CPU (burn flex: bf16 products, for checking a recipe; no faster than fp32 on a CPU) — {why}"
            ));
            train_on::<burn::backend::Autodiff<burn::backend::Flex>>(
                c,
                ctx,
                Default::default(),
                "flex",
            )
        }
        Placement::Cpu(why) => {
            ctx.log.line(format!("device: CPU (burn ndarray) — {why}"));
            train_on::<burn::backend::Autodiff<burn::backend::NdArray<f32>>>(
                c,
                ctx,
                Default::default(),
                "ndarray",
            )
        }
        #[cfg(feature = "cuda")]
        Placement::Cuda(gpu) => {
            ctx.log.line(format!("device: CUDA GPU {gpu} (burn cuda)"));
            train_on::<burn::backend::Autodiff<burn::backend::Cuda>>(
                c,
                ctx,
                burn::backend::cuda::CudaDevice::new(gpu),
                "cuda",
            )
        }
    }
}

/// Reads the data, builds the configured student and trains it.
fn train_on<B: AutodiffBackend>(
    c: &TrainConfig,
    ctx: &StageContext<'_>,
    device: B::Device,
    backend: &str,
) -> Result<StageSummary, StageError> {
    let uni_heads = c.loss.usa.is_some();
    match &c.student {
        StudentConfig::FeatureHeads {
            image_features,
            text_features,
            hidden,
            dim,
        } => {
            let data = data::load_features(
                ctx,
                &c.dataset,
                &c.split,
                &c.val_split,
                image_features,
                text_features,
                c.softlabels.as_deref(),
            )?;
            let shape = FeatureHeadsShape {
                image_dim: data.train.inputs.images.dim,
                text_dim: data.train.inputs.captions.dim,
                hidden: *hidden,
                dim: *dim,
                uni_heads,
            };
            ctx.log.line(format!(
                "student feature-heads {}→{hidden}→{dim} / {}→{hidden}→{dim}{}",
                shape.image_dim,
                shape.text_dim,
                if uni_heads { ", uni heads" } else { "" }
            ));
            fit::<B, FeatureHeads<B>>(
                c,
                ctx,
                &data,
                |d| FeatureHeads::new(shape, d),
                Architecture::FeatureHeads(shape),
                device,
                backend,
            )
        }
        StudentConfig::ScenesSmall {
            images,
            image_size,
            channels,
            width,
            layers,
            heads,
            max_words,
            min_count,
            dim,
        } => {
            let dataset = ctx.resolve(&c.dataset);
            let root = images.as_deref().map(|p| ctx.resolve(p));
            let vocab = data::vocabulary(&dataset, &c.split, *min_count, *max_words)?;
            let data = data::training_data(
                ctx,
                &dataset,
                &c.split,
                &c.val_split,
                c.softlabels.as_deref(),
                |name, role| {
                    data::pixel_word_split(
                        ctx,
                        &dataset,
                        root.as_deref(),
                        name,
                        *image_size,
                        &vocab,
                        Home::File(&pictures_file(ctx, role)),
                    )
                },
            )?;
            let shape = ScenesSmallShape {
                image_size: *image_size,
                channels: channels.clone(),
                vocab: vocab.len(),
                max_words: *max_words,
                width: *width,
                layers: *layers,
                heads: *heads,
                dim: *dim,
                uni_heads,
                selfalign: selfalign_shape(c, *dim),
            };
            ctx.log.line(format!(
                "student scenes-small: CNN {image_size}px {channels:?}, transformer {layers}×{width} ({heads} heads) over {} words, dim {dim}{}",
                vocab.len(),
                if uni_heads { ", uni heads" } else { "" }
            ));
            if let Some(a) = shape.selfalign {
                let (layer, grid, c_regions) =
                    crate::ml::scenes_small::region_layer(*image_size, channels);
                ctx.log.line(format!(
                    "locals: {} regions (convolution {} of {}, {grid}×{grid}×{c_regions}) and the word states, projected to {}; {}",
                    grid * grid,
                    layer + 1,
                    channels.len(),
                    a.dim,
                    selfalign_note(a)
                ));
            }
            std::fs::write(
                ctx.out_dir.join("vocab.json"),
                crate::api::json_text(&vocab, "the vocabulary")?,
            )
            .map_err(|e| StageError::io("writing vocab.json", e))?;
            let init_shape = shape.clone();
            fit::<B, ScenesSmall<B>>(
                c,
                ctx,
                &data,
                move |d| ScenesSmall::new(&init_shape, d),
                Architecture::ScenesSmall(shape),
                device,
                backend,
            )
        }
        StudentConfig::Clip {
            weights,
            tokenizer,
            images,
            heads,
            activation,
        } => {
            let dataset = ctx.resolve(&c.dataset);
            let root = images.as_deref().map(|p| ctx.resolve(p));
            let weights_path = ctx.resolve(weights);
            let tokenizer_path = match tokenizer {
                Some(t) => ctx.resolve(t),
                None if weights_path.is_dir() => weights_path.clone(),
                None => weights_path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
            };
            let pretrained = crate::ml::clip::pretrained::<B>(
                &weights_path,
                &tokenizer_path,
                *heads,
                *activation,
                &device,
            )
            .map_err(|e| {
                StageError::failed_with_hint(
                    e,
                    "`student.weights:` takes a Hugging Face CLIPModel folder or a CLIP .safetensors file (Hugging Face or open_clip names); `student.tokenizer:` its merges (bpe_simple_vocab_16e6.txt.gz or merges.txt)",
                )
            })?;
            let s = pretrained.shape;
            let size = s.vision.image_size;
            // Captions cut to the context, in the training and the validation split.
            let mut cut = Vec::new();
            let data = data::training_data(
                ctx,
                &dataset,
                &c.split,
                &c.val_split,
                c.softlabels.as_deref(),
                |name, role| {
                    let (split, n) = data::clip_split(
                        ctx,
                        &dataset,
                        root.as_deref(),
                        name,
                        size,
                        &pretrained.tokenizer,
                        s.text.context,
                        Home::File(&pictures_file(ctx, role)),
                    )?;
                    cut.push(n);
                    Ok(split)
                },
            )?;
            let (cut_train, cut_val) = (cut[0], cut[1]);
            ctx.log.line(format!(
                "student clip ({} weights): ViT {}×{} ({} heads, patch {}, {} px) + text {}×{} ({} heads, {} tokens), embed {}{}",
                pretrained.layout,
                s.vision.tower.layers,
                s.vision.tower.width,
                s.vision.tower.heads,
                s.vision.patch_size,
                size,
                s.text.tower.layers,
                s.text.tower.width,
                s.text.tower.heads,
                s.text.context,
                s.embed_dim,
                if uni_heads { ", uni heads" } else { "" }
            ));
            ctx.log.line(format!(
                "precision: {}{}",
                c.precision,
                match c.precision {
                    Precision::Fp32 => "",
                    Precision::Bf16Mixed =>
                        " (matrix products in bf16; weights, optimiser, norms, softmax and losses in f32)",
                }
            ));
            let mut summary_notes = Vec::new();
            if cut_train + cut_val > 0 {
                let note = format!(
                    "{cut_train} training and {cut_val} validation captions cut to CLIP's {} tokens",
                    s.text.context
                );
                ctx.log.line(&note);
                summary_notes.push(note);
            }
            pretrained
                .tokenizer
                .write_hf(ctx.out_dir)
                .map_err(|e| StageError::io("writing the tokenizer files", e))?;
            let shape = crate::ml::clip::ClipStudentShape {
                clip: s,
                uni_heads,
                selfalign: selfalign_shape(c, s.embed_dim),
            };
            if let Some(a) = shape.selfalign {
                let grid = s.grid();
                if let Some(cra) = c.loss.cra
                    && cra.hardest > (c.batch_size - 1) * grid * grid
                {
                    return Err(StageError::failed_with_hint(
                        format!(
                            "`loss.cra.hardest: {}` but a batch of {} has only {} patches of other images ({grid}×{grid} per image) to choose negatives from",
                            cra.hardest,
                            c.batch_size,
                            (c.batch_size - 1) * grid * grid
                        ),
                        "lower `loss.cra.hardest` or raise `batch_size`",
                    ));
                }
                ctx.log.line(format!(
                    "locals: the last layer's {} patch tokens and the token states, through CLIP's final norms and projections ({} wide); {}",
                    grid * grid,
                    a.dim,
                    selfalign_note(a)
                ));
            }
            let init_shape = shape.clone();
            let clip = pretrained.clip;
            let mut summary = fit::<B, crate::ml::clip::ClipStudent<B>>(
                c,
                ctx,
                &data,
                move |d| {
                    crate::ml::clip::ClipStudent::new(
                        clip.with_precision(c.precision),
                        &init_shape,
                        d,
                    )
                },
                Architecture::Clip(shape),
                device,
                backend,
            )?;
            summary.notes.extend(summary_notes);
            Ok(summary)
        }
    }
}

/// What the SelfAlign parameters are, for the log.
fn selfalign_note(a: SelfAlignShape) -> String {
    match (a.prototypes, a.guides) {
        (0, _) => "guide heads (CRA)".into(),
        (k, false) => format!("{k} prototypes (LCA)"),
        (k, true) => format!("{k} prototypes (LCA) and guide heads (CRA)"),
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    #[test]
    fn unverified_cuda_trains_on_the_cpu_on_auto_and_is_refused_on_cuda() {
        let Ok(Placement::Cpu(why)) = gate_cuda(Device::Auto, Placement::Cuda(0), false) else {
            panic!("`auto` falls back to the CPU")
        };
        assert_eq!(why, CUDA_UNVERIFIED);
        let Err(refused) = gate_cuda(Device::Cuda, Placement::Cuda(0), false) else {
            panic!("`cuda` is refused")
        };
        assert!(
            refused
                .to_string()
                .contains("failed cusa-pipe's parity check"),
            "{refused}"
        );
        assert!(matches!(
            gate_cuda(Device::Cuda, Placement::Cuda(1), true),
            Ok(Placement::Cuda(1))
        ));
        assert!(matches!(
            gate_cuda(Device::Auto, Placement::Cpu("no GPU".into()), false),
            Ok(Placement::Cpu(w)) if w == "no GPU"
        ));
    }
}
