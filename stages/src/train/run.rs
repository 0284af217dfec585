//! The training loop: epochs of shuffled in-batch steps, validation after each epoch, a
//! checkpoint after each epoch, resume from the last one.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::config::{
    Architecture, BaseLoss, Device, LossConfig, Precision, StudentConfig, TrainConfig,
    TrainingRecord,
};
use super::data::{self, Rows, TrainingData};
use crate::api::{StageContext, StageError, StageSummary};
use crate::device::Choice;
use crate::ml::loss;
use crate::ml::optim::{GroupedAccumulator, GroupedAdamW, cosine_lr, warmup_factor};
use crate::ml::retrieval::{self, Matrix, Recalls};
use crate::ml::scenes_small::{ScenesSmall, ScenesSmallShape};
use crate::ml::student::{FeatureHeads, FeatureHeadsShape};
use crate::ml::student::{SplitInputs, Student};
use crate::pictures::Home;

/// Backends seed one process-wide generator: initialisations of concurrent train stages take
/// turns so each sees only its own seed.
static INIT: Mutex<()> = Mutex::new(());

type Recorder_ = NamedMpkFileRecorder<FullPrecisionSettings>;

/// Where training runs.
enum Placement {
    Cpu(String),
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

/// Picks the device; probes for a CUDA driver before any CUDA call (burn 0.21's CUDA backend
/// panics when there is none).
fn place(device: Device, gpus: &[usize]) -> Result<Placement, StageError> {
    match device.choose(gpus)? {
        Choice::Cpu(why) => Ok(Placement::Cpu(why)),
        #[cfg(feature = "cuda")]
        Choice::Gpu(_) if !cuda_driver_present() => device
            .without_cuda(
                "no CUDA driver was found (libcuda.so.1 does not load)",
                "install the NVIDIA driver, or use `device: cpu`",
            )
            .map(Placement::Cpu),
        #[cfg(feature = "cuda")]
        Choice::Gpu(gpu) => Ok(Placement::Cuda(gpu)),
    }
}

/// Whether the CUDA driver library loads (without initialising anything).
#[cfg(feature = "cuda")]
fn cuda_driver_present() -> bool {
    let name = std::ffi::CString::new("libcuda.so.1").expect("no NUL");
    // SAFETY: dlopen/dlclose of a library by name; nothing from it is called.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
    }
    true
}

pub fn train(c: &TrainConfig, ctx: &StageContext<'_>) -> Result<StageSummary, StageError> {
    match place(c.device, ctx.gpus)? {
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

/// The order of the training captions in epoch `epoch` (Fisher–Yates over
/// [`crate::rng::SplitMix64`]).
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng =
        crate::rng::SplitMix64::new(seed ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .map_or(f64::NAN, |v| v[0])
}

/// Resume state, written after every epoch.
#[derive(Serialize, Deserialize)]
struct State {
    epochs_done: usize,
    best_epoch: Option<usize>,
    best_rsum: f64,
    log: Vec<Value>,
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StageError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| StageError::io(format!("writing {}", path.display()), e))
}

/// Which of a student's heads embeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// The cross-modal heads (retrieval).
    Cross,
    /// The uni-modal heads (USA), which a student trained without USA does not have.
    Uni,
}

/// Unit-length embeddings (rows, dim) of all of a split's images (`images`) or captions through
/// `head`, in chunks of 512, without gradients; `None` when the student has no such head.
pub fn embed_rows<B: Backend, S: Student<B>>(
    model: &S,
    inputs: &S::Inputs,
    device: &B::Device,
    images: bool,
    head: Head,
) -> Option<(Vec<f32>, usize)> {
    let (mut out, mut dim) = (Vec::new(), 0);
    let n = if images {
        inputs.images()
    } else {
        inputs.captions()
    };
    for start in (0..n).step_by(512) {
        let idx: Vec<usize> = (start..(start + 512).min(n)).collect();
        let (cross, uni) = if images {
            model.encode_images(inputs, &idx, device)
        } else {
            model.encode_texts(inputs, &idx, device)
        };
        let rows = loss::l2_normalize(match head {
            Head::Cross => cross,
            Head::Uni => uni?,
        });
        dim = rows.dims()[1];
        let values = rows.into_data().convert::<f32>();
        out.extend_from_slice(
            values
                .as_slice::<f32>()
                .expect("converted to f32 just above"),
        );
    }
    Some((out, dim))
}

/// Unit-length cross-modal embeddings (images, captions, dim) of a split.
pub fn embed_split<B: Backend, S: Student<B>>(
    model: &S,
    inputs: &S::Inputs,
    device: &B::Device,
) -> (Vec<f32>, Vec<f32>, usize) {
    let cross = |images| {
        embed_rows(model, inputs, device, images, Head::Cross)
            .expect("every student has cross heads")
    };
    let ((i, dim), (t, _)) = (cross(true), cross(false));
    (i, t, dim)
}

fn validate<B: Backend, S: Student<B>>(
    model: &S,
    split: &data::Split<S::Inputs>,
    device: &B::Device,
) -> Recalls {
    let (images, captions, dim) = embed_split(model, &split.inputs, device);
    retrieval::recalls(
        &Matrix { data: &images, dim },
        &Matrix {
            data: &captions,
            dim,
        },
        &split.image_of,
    )
}

/// One batch: which captions and images of the split's inputs, and their teacher vectors.
pub struct StepBatch {
    /// Caption rows; the batch's i-th pair is (caption_rows[i], image_rows[i]).
    pub caption_rows: Vec<usize>,
    /// Image row of each pair (equal rows = the same image: multi-positive targets).
    pub image_rows: Vec<usize>,
    /// Teacher vectors (image, text) per pair, for CSA/USA.
    pub teacher: Option<(Rows, Rows)>,
}

/// One optimisation step: clamp the temperatures, then per batch the forward, the configured
/// loss terms and the backward, then AdamW on the mean of the batches' gradients. More than one
/// batch is gradient accumulation: each batch's in-batch losses see only its own negatives, as
/// the reference's per-GPU losses under data parallelism do (4 GPUs × 128 = `accumulate: 4`
/// with `batch_size: 128`). Returns the model, the mean total loss and the mean (base, α·CSA,
/// β·USA) terms.
#[allow(clippy::too_many_arguments)]
pub fn step_once<B: AutodiffBackend, S: Student<B> + AutodiffModule<B>>(
    model: S,
    optim: &mut GroupedAdamW<S, B>,
    losses: &LossConfig,
    reduction: loss::Reduction,
    lr: f64,
    inputs: &S::Inputs,
    batches: &[&StepBatch],
    device: &B::Device,
) -> (S, f64, [f64; 3]) {
    let model = model.clamped();
    let k = batches.len().max(1) as f64;
    let (mut value, mut term) = (0.0, [0.0; 3]);
    if let [batch] = batches {
        let (total, v, t) = batch_loss(&model, losses, reduction, inputs, batch, device);
        let grads = total.backward();
        return (optim.step(lr, model, grads), v, t);
    }
    let mut accumulated = GroupedAccumulator::default();
    for batch in batches {
        let (total, v, t) = batch_loss(&model, losses, reduction, inputs, batch, device);
        let grads = optim.group(&model, (total / k).backward());
        accumulated.accumulate(&model, grads);
        value += v / k;
        for j in 0..3 {
            term[j] += t[j] / k;
        }
    }
    (
        optim.step_grouped(lr, model, accumulated.grads()),
        value,
        term,
    )
}

/// The configured loss of one batch (not yet differentiated), its value and its terms.
fn batch_loss<B: AutodiffBackend, S: Student<B> + AutodiffModule<B>>(
    model: &S,
    losses: &LossConfig,
    reduction: loss::Reduction,
    inputs: &S::Inputs,
    batch: &StepBatch,
    device: &B::Device,
) -> (Tensor<B, 1>, f64, [f64; 3]) {
    let b = batch.caption_rows.len();
    let image_ids: Vec<u64> = batch.image_rows.iter().map(|&r| r as u64).collect();
    let (f_i, g_i) = model.encode_images(inputs, &batch.image_rows, device);
    let (f_t, g_t) = model.encode_texts(inputs, &batch.caption_rows, device);
    let temps = model.temperatures();
    let base = match losses.base {
        BaseLoss::Infonce => loss::infonce(
            f_i.clone(),
            f_t.clone(),
            temps.tau.val(),
            loss::multi_positive_targets::<B>(&image_ids, device),
            reduction,
        ),
        BaseLoss::Vse => loss::vse_hardest(
            f_i.clone(),
            f_t.clone(),
            loss::same_image::<B>(&image_ids, device),
            losses.margin,
        ),
    };
    let mut total = base.clone();
    let mut term = [scalar(base.detach()), 0.0, 0.0];
    if let Some((ti, tc)) = &batch.teacher
        && (losses.csa.is_some() || losses.usa.is_some())
    {
        let all: Vec<usize> = (0..b).collect();
        let p_image = loss::soft_labels(ti.tensor::<B>(&all, device), 1.0);
        let p_text = loss::soft_labels(tc.tensor::<B>(&all, device), 1.0);
        if let Some(csa) = losses.csa {
            let l = loss::csa(
                f_i.clone(),
                f_t.clone(),
                temps.tau_c.val(),
                p_image.clone(),
                p_text.clone(),
            ) * csa.alpha;
            term[1] = scalar(l.clone().detach());
            total = total + l;
        }
        if let (Some(usa), Some(g_i), Some(g_t)) = (losses.usa, g_i, g_t) {
            let l = loss::usa(
                g_i,
                g_t,
                temps.tau_ui.val(),
                temps.tau_ut.val(),
                p_image,
                p_text,
            ) * usa.beta;
            term[2] = scalar(l.clone().detach());
            total = total + l;
        }
    }
    let value = scalar(total.clone().detach());
    (total, value, term)
}

/// This run's checkpoint folder: its weights, optimiser state and progress after each epoch,
/// and its decoded pictures; kept when the run fails or is killed, removed when it ends.
fn checkpoint_dir(ctx: &StageContext<'_>) -> std::path::PathBuf {
    ctx.scratch_dir.join(ctx.fingerprint)
}

/// The file of the decoded pictures of the `train` or `val` split, in the checkpoint folder.
fn pictures_file(ctx: &StageContext<'_>, role: &str) -> std::path::PathBuf {
    checkpoint_dir(ctx).join(format!("pictures-{role}.rgb"))
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
            };
            ctx.log.line(format!(
                "student scenes-small: CNN {image_size}px {channels:?}, transformer {layers}×{width} ({heads} heads) over {} words, dim {dim}{}",
                vocab.len(),
                if uni_heads { ", uni heads" } else { "" }
            ));
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
            let shape = crate::ml::clip::ClipStudentShape { clip: s, uni_heads };
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

/// The training loop proper, for any student.
fn fit<B, S>(
    c: &TrainConfig,
    ctx: &StageContext<'_>,
    data: &TrainingData<S::Inputs>,
    init: impl FnOnce(&B::Device) -> S,
    architecture: Architecture,
    device: B::Device,
    backend: &str,
) -> Result<StageSummary, StageError>
where
    B: AutodiffBackend,
    S: Student<B> + AutodiffModule<B>,
    S::InnerModule: Student<B::InnerBackend, Inputs = S::Inputs>,
{
    let (train, val) = (&data.train, &data.val);
    ctx.log.line(format!(
        "train: {} captions of {} images; val: {} captions of {} images",
        train.caption_ids.len(),
        train.image_ids.len(),
        val.caption_ids.len(),
        val.image_ids.len(),
    ));
    let mut model: S = {
        let _turn = INIT.lock().unwrap_or_else(|p| p.into_inner());
        B::seed(&device, c.seed);
        init(&device)
    };
    let mut optim = GroupedAdamW::new(&model, c.weight_decay, c.decay_temperatures());
    let recorder = Recorder_::new();
    let checkpoint_dir = checkpoint_dir(ctx);
    let mut state = State {
        epochs_done: 0,
        best_epoch: None,
        best_rsum: f64::NEG_INFINITY,
        log: Vec::new(),
    };
    let state_path = checkpoint_dir.join("state.json");
    if let Ok(bytes) = std::fs::read(&state_path)
        && let Ok(saved) = serde_json::from_slice::<State>(&bytes)
    {
        let load_err = |e: &dyn std::fmt::Display| {
            StageError::failed_with_hint(
                format!(
                    "cannot load the checkpoint in {}: {e}",
                    checkpoint_dir.display()
                ),
                "delete that folder to start this training from scratch",
            )
        };
        model = super::load::load_checked(model, &checkpoint_dir.join("model"), &device)
            .map_err(|e| load_err(&e))?;
        optim.decayed = optim.decayed.load_record(
            recorder
                .load(checkpoint_dir.join("optim-decayed"), &device)
                .map_err(|e| load_err(&e))?,
        );
        optim.plain = optim.plain.load_record(
            recorder
                .load(checkpoint_dir.join("optim-plain"), &device)
                .map_err(|e| load_err(&e))?,
        );
        ctx.log.line(format!(
            "resuming after epoch {} from {}",
            saved.epochs_done,
            checkpoint_dir.display()
        ));
        state = saved;
    }
    std::fs::create_dir_all(&checkpoint_dir)
        .map_err(|e| StageError::io(format!("creating {}", checkpoint_dir.display()), e))?;

    let n = train.caption_ids.len();
    let steps_per_epoch = n / c.batch_size + usize::from(n % c.batch_size >= 2);
    ctx.progress
        .set_items(Some((steps_per_epoch * c.epochs) as u64));
    ctx.progress
        .set_position((steps_per_epoch * state.epochs_done) as u64);
    let reduction = c.reduction();
    let mut step = (steps_per_epoch * state.epochs_done) as u64;
    for epoch in state.epochs_done..c.epochs {
        let started = Instant::now();
        let lr = cosine_lr(c.lr, c.lr_min(), epoch, c.epochs);
        let order = epoch_order(n, c.seed, epoch);
        let mut sums = [0.0f64; 4]; // total, base, csa, usa
        let mut batches = 0usize;
        let chunks: Vec<&[usize]> = order
            .chunks(c.batch_size)
            .filter(|chunk| chunk.len() >= 2)
            .collect();
        let groups_per_epoch = steps_per_epoch.div_ceil(c.accumulate.max(1));
        // The rate of the epoch's last step: the cosine value, or less inside a warm-up.
        let mut step_lr = lr;
        for (g, group) in chunks.chunks(c.accumulate.max(1)).enumerate() {
            if ctx.cancel.is_cancelled() {
                return Err(StageError::Cancelled);
            }
            let group_batches: Vec<StepBatch> = group
                .iter()
                .map(|chunk| {
                    let image_rows: Vec<usize> = chunk.iter().map(|&k| train.image_of[k]).collect();
                    let teacher = data
                        .teacher_images
                        .as_ref()
                        .zip(data.teacher_captions.as_ref())
                        .map(|(ti, tc)| {
                            (
                                Rows {
                                    data: ti.gather(&image_rows),
                                    dim: ti.dim,
                                },
                                Rows {
                                    data: tc.gather(chunk),
                                    dim: tc.dim,
                                },
                            )
                        });
                    StepBatch {
                        caption_rows: chunk.to_vec(),
                        image_rows,
                        teacher,
                    }
                })
                .collect();
            let refs: Vec<&StepBatch> = group_batches.iter().collect();
            let optimiser_step = (epoch * groups_per_epoch + g) as u64;
            step_lr = lr * warmup_factor(optimiser_step, c.warmup);
            let (next, value, term) = step_once(
                model,
                &mut optim,
                &c.loss,
                reduction,
                step_lr,
                &train.inputs,
                &refs,
                &device,
            );
            model = next;
            if !value.is_finite() {
                return Err(StageError::failed_with_hint(
                    format!(
                        "the loss became {value} in epoch {} (step {step})",
                        epoch + 1
                    ),
                    "lower `lr`, or check the features for NaN",
                ));
            }
            let weight = group.len() as f64;
            sums[0] += value * weight;
            for k in 0..3 {
                sums[k + 1] += term[k] * weight;
            }
            batches += group.len();
            step += group.len() as u64;
            ctx.progress.set_position(step);
            ctx.progress.set_message(&format!(
                "epoch {}/{} loss {:.4}",
                epoch + 1,
                c.epochs,
                sums[0] / batches as f64
            ));
        }
        let model = {
            let m = model.clone().clamped();
            let recalls = validate(&m.valid(), val, &device);
            let seconds = started.elapsed().as_secs_f64();
            let t = m.temperatures().values();
            let mean = |k: usize| sums[k] / batches.max(1) as f64;
            let mut line = json!({
                "epoch": epoch + 1,
                "lr": step_lr,
                "loss": mean(0),
                "loss_base": mean(1),
                "tau": t[0],
                "val": recalls,
                "seconds": seconds,
                "pairs_per_second": (batches * c.batch_size).min(n) as f64 / seconds,
            });
            if c.loss.csa.is_some() {
                line["loss_csa"] = json!(mean(2));
                line["tau_c"] = json!(t[1]);
            }
            if c.loss.usa.is_some() {
                line["loss_usa"] = json!(mean(3));
                line["tau_ui"] = json!(t[2]);
                line["tau_ut"] = json!(t[3]);
            }
            ctx.log.line(line.to_string());
            if recalls.rsum > state.best_rsum {
                state.best_rsum = recalls.rsum;
                state.best_epoch = Some(epoch + 1);
                save(&recorder, &m, &checkpoint_dir.join("best"))?;
            }
            state.log.push(line);
            m
        };
        // The checkpoint: weights, both optimisers, then the state that points at them.
        save(&recorder, &model, &checkpoint_dir.join("model"))?;
        recorder
            .record(
                optim.decayed.to_record(),
                checkpoint_dir.join("optim-decayed"),
            )
            .map_err(|e| StageError::failed(format!("saving the checkpoint: {e}")))?;
        recorder
            .record(optim.plain.to_record(), checkpoint_dir.join("optim-plain"))
            .map_err(|e| StageError::failed(format!("saving the checkpoint: {e}")))?;
        state.epochs_done = epoch + 1;
        write_atomically(&state_path, &serde_json::to_vec(&state).unwrap_or_default())?;
    }

    let best_epoch = state.best_epoch.unwrap_or(c.epochs);
    std::fs::copy(
        checkpoint_dir.join("best.mpk"),
        ctx.out_dir.join("model.mpk"),
    )
    .map_err(|e| StageError::io("copying the best weights", e))?;
    let record = TrainingRecord {
        student: architecture,
        base_loss: crate::api::config_name(&c.loss.base),
        reduction: format!("{reduction:?}").to_lowercase(),
        alpha: c.loss.csa.map(|x| x.alpha),
        beta: c.loss.usa.map(|x| x.beta),
        epochs: c.epochs,
        batch_size: c.batch_size,
        accumulate: c.accumulate,
        lr: c.lr,
        lr_min: c.lr_min(),
        warmup: c.warmup,
        weight_decay: c.weight_decay,
        decay_temperatures: c.decay_temperatures(),
        seed: c.seed,
        best_epoch,
        backend: backend.to_string(),
        precision: c.precision,
    };
    burn::config::Config::save(&record, ctx.out_dir.join("config.json"))
        .map_err(|e| StageError::io("writing config.json", e))?;
    let log: String = state.log.iter().map(|l| l.to_string() + "\n").collect();
    std::fs::write(ctx.out_dir.join("log.jsonl"), log)
        .map_err(|e| StageError::io("writing log.jsonl", e))?;
    let best = &state.log[best_epoch - 1];
    let metrics = json!({"best_epoch": best_epoch, "val": best["val"]});
    std::fs::write(
        ctx.out_dir.join("metrics.json"),
        crate::api::json_text(&metrics, "metrics.json")?,
    )
    .map_err(|e| StageError::io("writing metrics.json", e))?;
    let _ = std::fs::remove_dir_all(&checkpoint_dir);

    let mut summary = StageSummary::default();
    summary.notes.push(format!(
        "best epoch {best_epoch}/{}: val RSUM {:.1} (R@1 i2t {:.1}, t2i {:.1})",
        c.epochs,
        best["val"]["rsum"].as_f64().unwrap_or(f64::NAN),
        best["val"]["i2t_r1"].as_f64().unwrap_or(f64::NAN),
        best["val"]["t2i_r1"].as_f64().unwrap_or(f64::NAN)
    ));
    summary
        .metrics
        .insert("best_epoch".into(), Value::from(best_epoch));
    summary
        .metrics
        .insert("val_rsum".into(), best["val"]["rsum"].clone());
    // For `cusa-pipe metrics`: what the choice of settings is made on (never the test split).
    summary.results.insert("split".into(), json!("val"));
    summary
        .results
        .insert("best epoch".into(), Value::from(best_epoch));
    for (column, key) in [
        ("i2t R@1", "i2t_r1"),
        ("t2i R@1", "t2i_r1"),
        ("rsum", "rsum"),
    ] {
        summary
            .results
            .insert(column.into(), best["val"][key].clone());
    }
    Ok(summary)
}

fn save<B: Backend, M: Module<B>>(
    recorder: &Recorder_,
    model: &M,
    path: &Path,
) -> Result<(), StageError> {
    model
        .clone()
        .save_file(path.to_path_buf(), recorder)
        .map_err(|e| StageError::failed(format!("saving weights to {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::student::{FeatureHeads, FeatureHeadsShape, FeatureInputs};

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
        let reduction = loss::Reduction::Mean;

        let mut optim = GroupedAdamW::new(&model, 1e-2, false);
        let (accumulated, value, _) = step_once(
            model.clone(),
            &mut optim,
            &losses,
            reduction,
            1e-2,
            &inputs,
            &[&a, &b],
            &device,
        );
        // The same step from one backward through the mean of both losses (Adam's update is
        // nearly invariant to the gradients' scale, so this shows that both batches count, each
        // with its own in-batch negatives; `value` shows the mean).
        let mut optim = GroupedAdamW::new(&model, 1e-2, false);
        let clamped = model.clone().clamped();
        let (la, va, _) = batch_loss(&clamped, &losses, reduction, &inputs, &a, &device);
        let (lb, vb, _) = batch_loss(&clamped, &losses, reduction, &inputs, &b, &device);
        assert!((value - (va + vb) / 2.0).abs() < 1e-6);
        let joint = optim.step(1e-2, clamped, ((la + lb) / 2.0).backward());

        let all: Vec<usize> = (0..8).collect();
        let embed = |m: &FeatureHeads<B>| {
            let (f, g) = m.encode_images(&inputs, &all, &device);
            let (t, _) = m.encode_texts(&inputs, &all, &device);
            [f, g.unwrap(), t]
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
