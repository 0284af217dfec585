//! The checks and timings of `cusa-pipe bench gpu`: does training compute the same numbers on
//! this device as the float64 references, does it learn and reload there, and how fast is a CLIP
//! step.
//!
//! Four parts, each generic over the backend so that the CPU dry run (ndarray, tiny shapes)
//! executes exactly the code the GPU run does, the objective in its GPU form
//! ([`Where::Device`]):
//! * **parity** — the tiny CLIP's forward (`tests/fixtures/clip-tiny`) against its float64
//!   fixture, and the losses (InfoNCE both reductions, VSE++, CSA, USA) against
//!   `losses.json`, values and every gradient, and SelfAlign's terms (Sinkhorn, LCA, CRA, the
//!   guides' batch norm) against `selfalign.json`, bounded for the device's arithmetic
//!   ([`Arithmetic`]): IEEE f32 (the CLIP within 1e-4, the losses 1e-5, SelfAlign 2e-5) or
//!   f32 with TF32 products (burn's CUDA: the CLIP within 2× a float64 emulation of TF32
//!   products, the losses 2⁻⁸, SelfAlign reported); bf16-mixed departs from the exact
//!   reference by 0.5–2× what the float64 emulation of the same rounding points departs;
//! * **parity-f64** — the same in f64 on the device, where no product is rounded: the formulas
//!   and the kernels, within the CPU's f64 bounds;
//! * **train** — a few steps of the tiny CLIP with base + CUSA on one batch: the loss must fall,
//!   and the weights saved with the training's own recorder must reload to the same embeddings;
//! * **step** — the time of one training step (forward, backward, AdamW, device synchronised)
//!   of a CLIP of any shape from random initialisation, base loss or +CUSA with precomputed
//!   teacher vectors, fp32 or bf16-mixed: the first step (kernel compilation and autotuning
//!   included) and the median of the timed ones.
//!
//! Invariants: nothing here asserts or panics on a failed check; every figure is returned with
//! its bound so the caller reports all of them, and a failure of one part never hides another.

use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::record::Recorder;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;
use serde_json::Value;

use super::bench::{clip_inputs, step_batches};
use super::checkpoint::{Recorder_, save};
use super::config::{BaseLoss, CsaConfig, LossConfig, UsaConfig};
use super::step::{StepBatch, StepSettings, step_once};
use crate::ml::Where;
use crate::ml::clip::model::Clip;
use crate::ml::clip::shape::ClipShape;
use crate::ml::clip::weights::{self, Checkpoint};
use crate::ml::clip::{ClipStudent, ClipStudentShape};
use crate::ml::loss::{self, Reduction};
use crate::ml::optim::GroupedAdamW;
use crate::ml::precision::Precision;
use crate::ml::student::Student;

/// One compared quantity: `value` must lie within `[low, high]` — unless the row is not
/// `judged`: a diagnostic, or a figure reported for a precision the bound was not made for
/// (see [`Arithmetic::Tf32`]), printed and kept in the JSON but not deciding the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Parity {
    pub check: String,
    pub value: f64,
    pub low: f64,
    pub high: f64,
    pub judged: bool,
}

impl Parity {
    fn within(check: impl Into<String>, value: f64, high: f64) -> Self {
        Self {
            check: check.into(),
            value,
            low: 0.0,
            high,
            judged: true,
        }
    }

    /// The same row, reported but not judged.
    fn reported(self) -> Self {
        Self {
            judged: false,
            ..self
        }
    }

    /// Within its bounds.
    pub fn within_bounds(&self) -> bool {
        (self.low..=self.high).contains(&self.value)
    }

    /// Within its bounds, or not judged.
    pub fn passed(&self) -> bool {
        !self.judged || self.within_bounds()
    }
}

/// What the device's float arithmetic is, which sets the parity bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arithmetic {
    /// IEEE f32 throughout (burn's CPU backends): the losses within 1e-5 relative, SelfAlign's
    /// terms within 2e-5, the CLIP's embeddings within 1e-4.
    F32,
    /// f32 tensors whose matrix products round their operands to TF32 (10-bit mantissa, unit
    /// roundoff u = 2⁻¹¹): burn 0.21's CUDA backend on tensor-core GPUs, where cubek-matmul's
    /// accelerated kernels take f32 products in TF32 and the autotuner chooses them for most
    /// shapes, with no switch to turn this off. The CLIP's embeddings must stay within twice the
    /// departure of a float64 emulation of TF32 products (`clip_tiny.json`'s `*_tf32`); the
    /// losses within 2⁻⁸ ≈ 3.9e-3 relative (8u; on an H200 the departures of the correct ones
    /// were at most 6e-4); SelfAlign's f32 rows are reported, not judged: no emulation bounds
    /// them (its Sinkhorn at ε 0.05 multiplies a product's error twentyfold). Their correctness
    /// on the device is judged in f64 ([`Part::ParityF64`]), where no product is rounded.
    Tf32,
    /// f64 throughout: the losses and SelfAlign's terms within 1e-6 relative (what the float64
    /// finite differences allow), the CLIP's embeddings within 1e-6 (f64 reaches 5e-8 on the
    /// CPU: some of the model's constants are f32 literals; f32 reaches 1e-6, TF32 1e-3).
    F64,
}

impl Arithmetic {
    /// The relative bound of the losses' values and gradients.
    fn losses(self) -> f64 {
        match self {
            Arithmetic::F32 => 1e-5,
            Arithmetic::Tf32 => 2f64.powi(-8),
            Arithmetic::F64 => 1e-6,
        }
    }

    /// The relative bound of SelfAlign's rows, and whether they are judged by it (on TF32 they
    /// are reported against the f32 bound).
    fn selfalign(self) -> (f64, bool) {
        match self {
            Arithmetic::F32 => (2e-5, true),
            Arithmetic::Tf32 => (Arithmetic::F32.selfalign().0, false),
            Arithmetic::F64 => (1e-6, true),
        }
    }
}

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Number(n) => vec![n.as_f64().unwrap_or(f64::NAN)],
        Value::Array(rows) => rows.iter().flat_map(floats).collect(),
        _ => Vec::new(),
    }
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap_or_default()
}

/// ‖a − b‖ / ‖b‖ (infinite when the lengths differ).
fn relative(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>();
    (num / den.max(1e-300)).sqrt()
}

/// The largest error, relative to the entry where it exceeds 1 (infinite on a shape mismatch).
fn worst(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .fold(0.0, f64::max)
}

fn read_json(path: &Path) -> Result<Value, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The tiny CLIP of `fixtures/clip-tiny` in `precision` against `fixtures/clip_tiny.json`,
/// bounded for the device's `arithmetic` (bf16-mixed: against its own emulation either way).
pub fn clip_parity<B: Backend>(
    fixtures: &Path,
    precision: Precision,
    arithmetic: Arithmetic,
    device: &B::Device,
) -> Result<Vec<Parity>, String> {
    let reference = read_json(&fixtures.join("clip_tiny.json"))?;
    let checkpoint = Checkpoint::read(&fixtures.join("clip-tiny")).map_err(|e| e.to_string())?;
    let shape = checkpoint.shape(None).map_err(|e| e.to_string())?;
    let clip = weights::load::<B>(&checkpoint, &shape, device)
        .map_err(|e| e.to_string())?
        .with_precision(precision);
    let dims: Vec<usize> = floats(&reference["pixels_shape"])
        .iter()
        .map(|&v| v as usize)
        .collect();
    let [n, c, h, w] = dims[..] else {
        return Err("clip_tiny.json: `pixels_shape` is not 4 numbers".into());
    };
    let pixels: Vec<f32> = floats(&reference["pixels"])
        .iter()
        .map(|&v| v as f32)
        .collect();
    let pixels = Tensor::<B, 4>::from_data(TensorData::new(pixels, [n, c, h, w]), device);
    let ids: Vec<Vec<i64>> = reference["ids"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| floats(r).iter().map(|&v| v as i64).collect())
                .collect()
        })
        .unwrap_or_default();
    let l = ids.iter().map(Vec::len).max().unwrap_or(0);
    if ids.is_empty() || ids.iter().any(|r| r.len() < 2) {
        return Err("clip_tiny.json: `ids` holds no captions".into());
    }
    let mut flat = vec![0i64; ids.len() * l];
    for (k, row) in ids.iter().enumerate() {
        flat[k * l..k * l + row.len()].copy_from_slice(row);
    }
    let ends: Vec<usize> = ids.iter().map(|r| r.len() - 1).collect();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [ids.len(), l]), device);
    let got = [
        ("image_embeds", values(clip.encode_image(pixels))),
        ("text_embeds", values(clip.encode_text(tokens, &ends))),
    ];
    Ok(got
        .into_iter()
        .map(|(key, got)| {
            let exact = floats(&reference[key]);
            match (precision, arithmetic) {
                (Precision::Fp32, Arithmetic::F32) => {
                    Parity::within(format!("clip-tiny {key} fp32, worst error"), worst(&got, &exact), 1e-4)
                }
                (Precision::Fp32, Arithmetic::F64) => {
                    Parity::within(format!("clip-tiny {key} f64, worst error"), worst(&got, &exact), 1e-6)
                }
                (Precision::Fp32, Arithmetic::Tf32) => {
                    let emulated = floats(&reference[format!("{key}_tf32").as_str()]);
                    let expected = relative(&emulated, &exact);
                    Parity::within(
                        format!(
                            "clip-tiny {key} fp32 (TF32 products), departure ÷ the emulation's ({expected:.2e})"
                        ),
                        relative(&got, &exact) / expected,
                        2.0,
                    )
                }
                (Precision::Bf16Mixed, _) => {
                    let emulated = floats(&reference[format!("{key}_bf16").as_str()]);
                    let expected = relative(&emulated, &exact);
                    Parity {
                        check: format!(
                            "clip-tiny {key} bf16-mixed, departure ÷ the emulation's ({expected:.2e})"
                        ),
                        value: relative(&got, &exact) / expected,
                        low: 0.5,
                        high: 2.0,
                        judged: true,
                    }
                }
            }
        })
        .collect())
}

fn matrix<B: Backend>(v: &Value, device: &B::Device) -> Result<Tensor<B, 2>, String> {
    let rows = v
        .as_array()
        .ok_or("losses.json: a matrix is not an array")?;
    let d = rows.first().map_or(0, |r| floats(r).len());
    let flat: Vec<f64> = floats(v);
    if d == 0 || flat.len() != rows.len() * d {
        return Err("losses.json: a matrix has ragged or empty rows".into());
    }
    Ok(Tensor::from_data(
        TensorData::new(flat, [rows.len(), d]).convert::<B::FloatElem>(),
        device,
    ))
}

/// Every loss of `losses.json` and its gradients with respect to every embedding and
/// temperature, written for `place` ([`Where`]), each within `tol` relative (1e-5 for f32 on the
/// CPU, 1e-6 for f64; [`Arithmetic`] for a device); inputs that must not influence a loss must
/// get a zero (or no) gradient.
pub fn loss_parity_within<B: AutodiffBackend>(
    fixture_path: &Path,
    device: &B::Device,
    tol: f64,
    place: Where,
) -> Result<Vec<Parity>, String> {
    let f = read_json(fixture_path)?;
    let inputs = &f["inputs"];
    let temps = &f["temperatures"];
    let ids: Vec<u64> = floats(&f["image_ids"]).iter().map(|&v| v as u64).collect();
    let leaf = |name: &str| matrix::<B>(&inputs[name], device).map(|t| t.require_grad());
    let temp = |name: &str| {
        let v = temps[name]
            .as_f64()
            .ok_or(format!("losses.json: no temperature {name}"))?;
        Ok::<_, String>(
            Tensor::<B, 1>::from_data(
                TensorData::new(vec![v], [1]).convert::<B::FloatElem>(),
                device,
            )
            .require_grad(),
        )
    };
    let p_image = loss::soft_labels(matrix::<B>(&inputs["u"], device)?, 1.0);
    let p_text = loss::soft_labels(matrix::<B>(&inputs["v"], device)?, 1.0);
    let mut out = vec![
        Parity::within(
            "soft labels (image)",
            relative(
                &values(p_image.clone()),
                &floats(&f["soft_labels"]["image"]),
            ),
            tol,
        ),
        Parity::within(
            "soft labels (text)",
            relative(&values(p_text.clone()), &floats(&f["soft_labels"]["text"])),
            tol,
        ),
    ];
    // A diagnostic for the backend: the caption→image log-probabilities computed as the losses
    // do (log_softmax of the transposed similarity matrix) and from their own product (a
    // contiguous matrix); any difference beyond rounding implicates reductions over transposed
    // views (on an H200, InfoNCE and CSA — the two losses that have them — came out wrong).
    {
        let (f_i, f_t) = (
            matrix::<B>(&inputs["f_i"], device)?,
            matrix::<B>(&inputs["f_t"], device)?,
        );
        let via_transpose = log_softmax(loss::cosine(f_i.clone(), f_t.clone()).transpose(), 1);
        let own = log_softmax(loss::cosine(f_t, f_i), 1);
        let (a, b) = (values(via_transpose), values(own));
        out.push(
            Parity::within(
                "diagnostic: log_softmax(sᵀ) vs log_softmax(own product), largest",
                a.iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max),
                1e-3,
            )
            .reported(),
        );
    }
    let kl_of = |case: &str| {
        if case.ends_with("_reverse") {
            loss::Kl::Reverse
        } else {
            loss::Kl::Forward
        }
    };
    for case in [
        "infonce_reference",
        "infonce_mean",
        "vse",
        "csa",
        "usa",
        "csa_reverse",
        "usa_reverse",
    ] {
        let expected = &f["cases"][case];
        let (f_i, f_t, g_i, g_t) = (leaf("f_i")?, leaf("f_t")?, leaf("g_i")?, leaf("g_t")?);
        let (tau, tau_c, tau_ui, tau_ut) = (
            temp("tau")?,
            temp("tau_c")?,
            temp("tau_ui")?,
            temp("tau_ut")?,
        );
        let value = match case {
            "infonce_reference" | "infonce_mean" => {
                let reduction = if case.ends_with("reference") {
                    Reduction::Reference
                } else {
                    Reduction::Mean
                };
                let targets = loss::multi_positive_targets::<B>(&ids, device);
                loss::infonce(
                    f_i.clone(),
                    f_t.clone(),
                    tau.clone(),
                    targets,
                    reduction,
                    place,
                )
            }
            "vse" => loss::vse_hardest(
                f_i.clone(),
                f_t.clone(),
                loss::same_image::<B>(&ids, device),
                0.2,
            ),
            "csa" | "csa_reverse" => loss::csa(
                f_i.clone(),
                f_t.clone(),
                tau_c.clone(),
                p_image.clone(),
                p_text.clone(),
                kl_of(case),
                place,
            ),
            _ => loss::usa(
                g_i.clone(),
                g_t.clone(),
                tau_ui.clone(),
                tau_ut.clone(),
                p_image.clone(),
                p_text.clone(),
                kl_of(case),
            ),
        };
        let got = values(value.clone());
        let want = expected["value"].as_f64().unwrap_or(f64::NAN);
        out.push(Parity::within(
            format!("{case} value"),
            got.first()
                .map_or(f64::INFINITY, |g| ((g - want) / want).abs()),
            tol,
        ));
        let grads = value.backward();
        let named: [(&str, Option<Vec<f64>>); 8] = [
            ("f_i", f_i.grad(&grads).map(values)),
            ("f_t", f_t.grad(&grads).map(values)),
            ("g_i", g_i.grad(&grads).map(values)),
            ("g_t", g_t.grad(&grads).map(values)),
            ("tau", tau.grad(&grads).map(values)),
            ("tau_c", tau_c.grad(&grads).map(values)),
            ("tau_ui", tau_ui.grad(&grads).map(values)),
            ("tau_ut", tau_ut.grad(&grads).map(values)),
        ];
        for (name, grad) in named {
            match (expected["grad"].get(name), grad) {
                (Some(w), Some(g)) => out.push(Parity::within(
                    format!("{case} d/d{name}"),
                    relative(&g, &floats(w)),
                    tol,
                )),
                (Some(_), None) => out.push(Parity::within(
                    format!("{case} d/d{name} (missing)"),
                    f64::INFINITY,
                    tol,
                )),
                (None, Some(g)) => out.push(Parity::within(
                    format!("{case} d/d{name} (must be zero), largest"),
                    g.iter().fold(0.0, |m, x| m.max(x.abs())),
                    0.0,
                )),
                (None, None) => {}
            }
        }
    }
    Ok(out)
}

/// The base loss (InfoNCE, per-sample mean) alone, or with CSA (α 0.1) and USA (β 0.5).
pub fn step_loss(cusa: bool) -> LossConfig {
    LossConfig {
        base: BaseLoss::Infonce,
        reduction: None,
        margin: 0.2,
        csa: cusa.then_some(CsaConfig { alpha: 0.1 }),
        usa: cusa.then_some(UsaConfig { beta: 0.5 }),
        lca: None,
        cra: None,
        soft_temperature: None,
        soft_kl: None,
    }
}

/// What the short training did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSmoke {
    /// The objective at each step.
    pub losses: Vec<f64>,
    /// Largest difference of the reloaded model's embeddings from the trained one's.
    pub reload_difference: f64,
    pub seconds: f64,
}

impl TrainSmoke {
    /// The loss fell (last below first, both finite) and the reload gave the same embeddings.
    pub fn passed(&self) -> bool {
        match (self.losses.first(), self.losses.last()) {
            (Some(a), Some(b)) => {
                a.is_finite() && b.is_finite() && b < a && self.reload_difference == 0.0
            }
            _ => false,
        }
    }
}

/// `steps` steps of the tiny CLIP of `fixtures/clip-tiny` (uni heads, base + CUSA, lr 1e-3) on
/// one batch of 32 pairs, then a save to `scratch` and a reload into a fresh student.
pub fn train_smoke<B: AutodiffBackend>(
    fixtures: &Path,
    scratch: &Path,
    steps: usize,
    precision: Precision,
    device: &B::Device,
) -> Result<TrainSmoke, String> {
    let started = Instant::now();
    // The heads' random initialisation, seeded (burn's backend-wide generator): every run of
    // the part on a device starts from the same loss.
    B::seed(device, 7);
    let checkpoint = Checkpoint::read(&fixtures.join("clip-tiny")).map_err(|e| e.to_string())?;
    let clip_shape = checkpoint.shape(None).map_err(|e| e.to_string())?;
    let clip = weights::load::<B>(&checkpoint, &clip_shape, device)
        .map_err(|e| e.to_string())?
        .with_precision(precision);
    let shape = ClipStudentShape {
        clip: clip_shape,
        uni_heads: true,
        selfalign: None,
    };
    let batch = 32;
    let mut model = ClipStudent::new(clip, &shape, device);
    let mut optim = GroupedAdamW::new(&model, 1e-4, false);
    let mut objective = step_loss(true).objective(Reduction::Mean);
    objective.on = if std::env::var("XHOST").is_ok() {
        Where::Host
    } else {
        Where::Device
    }; // the GPU's form, in the dry run too
    let inputs = clip_inputs(&clip_shape, batch, 14, 1).remove(0);
    let batches = step_batches(batch);
    let settings = StepSettings {
        lr: 1e-3,
        grad_clip: None,
        epoch: 0,
    };
    let mut losses = Vec::new();
    for _ in 0..steps {
        let (next, v) = step_once(
            model,
            &mut optim,
            &objective,
            settings,
            &inputs,
            &[&batches[0]],
            device,
        )
        .map_err(|e| e.to_string())?;
        model = next;
        losses.push(v.total);
    }
    std::fs::create_dir_all(scratch).map_err(|e| format!("creating {}: {e}", scratch.display()))?;
    let file = scratch.join("train-smoke.mpk");
    save(&model, &file).map_err(|e| e.to_string())?;
    let trained = model.valid();
    let record: <ClipStudent<B::InnerBackend> as Module<B::InnerBackend>>::Record =
        Recorder::<B::InnerBackend>::load(&Recorder_::new(), file.clone(), device)
            .map_err(|e| format!("reloading {}: {e}", file.display()))?;
    let mut reloaded = ClipStudent::<B::InnerBackend>::empty(&shape, device).load_record(record);
    reloaded.clip = reloaded.clip.with_precision(precision);
    let rows: Vec<usize> = (0..batch).collect();
    let embed = |m: &ClipStudent<B::InnerBackend>| {
        let e = m.forward(&inputs, &rows, &rows, device);
        [values(e.image.cross), values(e.text.cross)].concat()
    };
    let (a, b) = (embed(&trained), embed(&reloaded));
    let reload_difference = if a.len() == b.len() {
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    } else {
        f64::INFINITY
    };
    Ok(TrainSmoke {
        losses,
        reload_difference,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One timed configuration.
#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    /// `base` or `+cusa`.
    pub loss: String,
    pub precision: String,
    pub batch: usize,
    pub text_len: usize,
    /// The first step: kernel compilation and autotuning included.
    pub first_step_s: f64,
    /// Median of the timed steps (after `warmup`).
    pub median_step_s: f64,
    pub images_per_s: f64,
    pub steps: usize,
    pub warmup: usize,
    /// The objective after the last step (finite, or the step diverged).
    pub last_loss: f64,
}

/// Times `steps` steps (after `warmup`, the first one timed apart) of a randomly initialised
/// CLIP of `shape` with the base loss or +CUSA (teacher vectors precomputed), in `precision`,
/// on four rotating batches; the device is synchronised after every step.
#[allow(clippy::too_many_arguments)]
pub fn clip_step_timing<B: AutodiffBackend>(
    shape: &ClipShape,
    batch: usize,
    text_len: usize,
    precision: Precision,
    cusa: bool,
    steps: usize,
    warmup: usize,
    device: &B::Device,
) -> Result<StepTiming, String> {
    let student_shape = ClipStudentShape {
        clip: *shape,
        uni_heads: cusa,
        selfalign: None,
    };
    let mut model = ClipStudent::new(
        Clip::<B>::new(shape, device).with_precision(precision),
        &student_shape,
        device,
    );
    let mut optim = GroupedAdamW::new(&model, 1e-4, false);
    let mut objective = step_loss(cusa).objective(Reduction::Mean);
    objective.on = Where::Device; // the GPU's form, in the dry run too
    let inputs = clip_inputs(shape, batch, text_len, 4);
    let batches: Vec<StepBatch> = step_batches(batch);
    let settings = StepSettings {
        lr: 1e-5,
        grad_clip: None,
        epoch: 1,
    };
    let (mut first, mut times, mut last) = (0.0, Vec::new(), f64::NAN);
    for i in 0..1 + warmup + steps {
        let k = i % batches.len();
        let started = Instant::now();
        let (next, v) = step_once(
            model,
            &mut optim,
            &objective,
            settings,
            &inputs[k],
            &[&batches[k]],
            device,
        )
        .map_err(|e| e.to_string())?;
        model = next;
        B::sync(device).map_err(|e| format!("synchronising the device: {e:?}"))?;
        let t = started.elapsed().as_secs_f64();
        last = v.total;
        if i == 0 {
            first = t;
        } else if i > warmup {
            times.push(t);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(first);
    Ok(StepTiming {
        loss: if cusa { "+cusa" } else { "base" }.into(),
        precision: precision.to_string(),
        batch,
        text_len,
        first_step_s: first,
        median_step_s: median,
        images_per_s: batch as f64 / median,
        steps,
        warmup,
        last_loss: last,
    })
}

/// Which part of the check one run does (`parity`, `parity-f64`, `train`, `step`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// In the device's f32 arithmetic ([`Arithmetic`]).
    Parity,
    /// The losses, SelfAlign's terms and the CLIP in f64 on the device: the formulas and the
    /// kernels, with no product rounded to TF32, within the CPU's f64 bounds.
    #[serde(rename = "parity-f64")]
    ParityF64,
    Train,
    Step,
}

/// What one run of a part is told.
#[derive(Debug, Clone)]
pub struct Plan {
    pub part: Part,
    /// `tests/fixtures` (clip-tiny, clip_tiny.json) of the repository.
    pub fixtures: std::path::PathBuf,
    /// `losses.json` (stages/tests/fixtures).
    pub losses: std::path::PathBuf,
    /// `selfalign.json` (stages/tests/fixtures).
    pub selfalign: std::path::PathBuf,
    /// Where the train part saves its weights.
    pub scratch: std::path::PathBuf,
    /// Parity: bf16-mixed is checked as well as fp32 when this is bf16-mixed; train and step
    /// run in it.
    pub precision: Precision,
    /// Step: +CUSA instead of the base loss.
    pub cusa: bool,
    /// Step: the CLIP timed.
    pub shape: ClipShape,
    pub batch: usize,
    pub text_len: usize,
    pub steps: usize,
    pub warmup: usize,
    /// Train: steps of the short training.
    pub train_steps: usize,
}

/// What a part measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Parity(Vec<Parity>),
    Train(TrainSmoke),
    Step(StepTiming),
}

impl Outcome {
    pub fn passed(&self) -> bool {
        match self {
            Outcome::Parity(rows) => rows.iter().all(Parity::passed),
            Outcome::Train(t) => t.passed(),
            Outcome::Step(s) => s.last_loss.is_finite(),
        }
    }
}

/// Runs `plan` on backend `B`, whose arithmetic is `arithmetic`; returns the backend's own name
/// for `device` with the outcome. Parity rows are also handed to `each` as soon as their group
/// is computed (the losses, then SelfAlign's terms, then the fp32 CLIP, then the bf16 one), so a
/// part killed by its timeout still leaves what it compared. Every part computes the objective
/// in its GPU form ([`Where::Device`]), on the CPU of the dry run too.
pub fn run<B: AutodiffBackend>(
    plan: &Plan,
    device: &B::Device,
    arithmetic: Arithmetic,
    each: &mut dyn FnMut(&Parity),
) -> Result<(String, Outcome), String> {
    let name = B::name(device);
    let outcome = match plan.part {
        Part::Parity | Part::ParityF64 => {
            let mut rows = Vec::new();
            let mut group = |new: Vec<Parity>| {
                new.iter().for_each(&mut *each);
                rows.extend(new);
            };
            group(loss_parity_within::<B>(
                &plan.losses,
                device,
                arithmetic.losses(),
                Where::Device,
            )?);
            let (tol, judged) = arithmetic.selfalign();
            let selfalign =
                selfalign_parity_within::<B>(&plan.selfalign, device, tol, Where::Device)?;
            group(if judged {
                selfalign
            } else {
                selfalign.into_iter().map(Parity::reported).collect()
            });
            group(clip_parity::<B>(
                &plan.fixtures,
                Precision::Fp32,
                arithmetic,
                device,
            )?);
            if plan.precision == Precision::Bf16Mixed && plan.part == Part::Parity {
                group(clip_parity::<B>(
                    &plan.fixtures,
                    Precision::Bf16Mixed,
                    arithmetic,
                    device,
                )?);
            }
            Outcome::Parity(rows)
        }
        Part::Train => Outcome::Train(train_smoke::<B>(
            &plan.fixtures,
            &plan.scratch,
            plan.train_steps,
            plan.precision,
            device,
        )?),
        Part::Step => Outcome::Step(clip_step_timing::<B>(
            &plan.shape,
            plan.batch,
            plan.text_len,
            plan.precision,
            plan.cusa,
            plan.steps,
            plan.warmup,
            device,
        )?),
    };
    Ok((name, outcome))
}

/// [`run`] on the CPU (ndarray, IEEE f32, or f64 for `parity-f64`; no bf16), instantiated in
/// this crate, which is built with optimisations in the dev profile.
pub fn run_cpu(plan: &Plan, each: &mut dyn FnMut(&Parity)) -> Result<(String, Outcome), String> {
    if plan.precision == Precision::Bf16Mixed {
        return Err(
            "the CPU backend of the check (ndarray) has no bf16: use `--precision fp32`".into(),
        );
    }
    match plan.part {
        Part::ParityF64 => run::<CpuF64>(plan, &Default::default(), Arithmetic::F64, each),
        _ => run::<Cpu>(plan, &Default::default(), Arithmetic::F32, each),
    }
}

/// [`run`] on CUDA GPU `gpu`: f32 with TF32 products ([`Arithmetic::Tf32`]), or f64 for
/// `parity-f64`.
#[cfg(feature = "cuda")]
pub fn run_cuda(
    plan: &Plan,
    gpu: usize,
    each: &mut dyn FnMut(&Parity),
) -> Result<(String, Outcome), String> {
    let device = burn::backend::cuda::CudaDevice::new(gpu);
    match plan.part {
        Part::ParityF64 => run::<CudaF64>(plan, &device, Arithmetic::F64, each),
        _ => run::<Cuda>(plan, &device, Arithmetic::Tf32, each),
    }
}

/// The CPU backend of the dry run.
pub type Cpu = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

/// The CPU backend of the dry run's `parity-f64`.
pub type CpuF64 = burn::backend::Autodiff<burn::backend::NdArray<f64>>;

/// CUDA (burn's fused CUDA backend) with autodiff.
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Autodiff<burn::backend::Cuda>;

/// The same in f64 (`parity-f64`).
#[cfg(feature = "cuda")]
pub type CudaF64 = burn::backend::Autodiff<burn::backend::Cuda<f64>>;

/// A fixture array as a tensor of `shape` (an error when the count does not match).
fn shaped<B: Backend, const D: usize>(
    v: &Value,
    shape: [usize; D],
    device: &B::Device,
) -> Result<Tensor<B, D>, String> {
    let data = floats(v);
    if data.len() != shape.iter().product::<usize>() {
        return Err(format!(
            "selfalign.json: {} values for a {shape:?} tensor",
            data.len()
        ));
    }
    Ok(Tensor::from_data(
        TensorData::new(data, shape).convert::<B::FloatElem>(),
        device,
    ))
}

/// The largest magnitude of an optional gradient (0 when there is none).
fn largest(g: Option<Vec<f64>>) -> f64 {
    g.map_or(0.0, |g| g.iter().fold(0.0, |m, x| m.max(x.abs())))
}

/// SelfAlign's terms against `selfalign.json` (6 pairs, 4 regions, 5 words, width 5, 7
/// prototypes): Sinkhorn; LCA through the objective with the prototypes trained and frozen
/// (the image side detached); CRA through the objective (both guides, hardest negatives,
/// padding, repeated images); the guide's batch norm in training mode (output, batch statistics,
/// gradients) and eval mode, and its running statistics' momentum update — each within `tol`
/// relative.
pub fn selfalign_parity_within<B: AutodiffBackend>(
    fixture_path: &Path,
    device: &B::Device,
    tol: f64,
    place: Where,
) -> Result<Vec<Parity>, String> {
    use burn::module::Param;

    use crate::ml::objective::{BatchTargets, Objective, Term};
    use crate::ml::selfalign::{
        self, CraConfig, Guide, LcaConfig, Locals, SelfAlign, l2_normalize3,
    };
    use crate::ml::student::{Embeddings, Encoded, Temperatures};

    const N: usize = 6;
    const R: usize = 4;
    const L: usize = 5;
    const D: usize = 5;
    const K: usize = 7;
    let f = read_json(fixture_path)?;
    let inputs = &f["inputs"];
    let setting = |k: &str| {
        f["settings"][k]
            .as_f64()
            .ok_or(format!("selfalign.json: no setting {k}"))
    };
    let ids: Vec<u64> = floats(&f["image_ids"]).iter().map(|&v| v as u64).collect();
    let lengths: Vec<usize> = floats(&f["lengths"]).iter().map(|&v| v as usize).collect();
    if ids.len() != N || lengths.len() != N {
        return Err("selfalign.json: image_ids and lengths must have 6 entries".into());
    }
    let targets = |epoch| BatchTargets::<B> {
        image_ids: ids.clone(),
        soft_labels: None,
        epoch,
    };
    let temps = Temperatures::<B>::new(device);
    let leaf_v = || shaped::<B, 3>(&inputs["v"], [N, R, D], device).map(|t| t.require_grad());
    let leaf_t = || shaped::<B, 3>(&inputs["t"], [N, L, D], device).map(|t| t.require_grad());
    let prototypes = || shaped::<B, 2>(&inputs["prototypes"], [K, D], device);
    let guide = |g: &Value| -> Result<Guide<B>, String> {
        let mut guide = Guide::new(D, device);
        guide.linear.weight = Param::from_tensor(shaped(&g["weight"], [D, D], device)?);
        guide.linear.bias = Some(Param::from_tensor(shaped(&g["bias"], [D], device)?));
        guide.gamma = Param::from_tensor(shaped(&g["gamma"], [D], device)?);
        guide.beta = Param::from_tensor(shaped(&g["beta"], [D], device)?);
        guide.running_mean =
            Param::from_tensor(shaped(&g["running_mean"], [D], device)?).set_require_grad(false);
        guide.running_var =
            Param::from_tensor(shaped(&g["running_var"], [D], device)?).set_require_grad(false);
        Ok(guide)
    };
    let valid = || {
        let mask: Vec<f32> = lengths
            .iter()
            .flat_map(|&n| (0..L).map(move |j| if j < n { 1.0 } else { 0.0 }))
            .collect();
        Tensor::<B, 2>::from_data(
            TensorData::new(mask, [N, L]).convert::<B::FloatElem>(),
            device,
        )
    };
    let embeddings = |v: Tensor<B, 3>, t: Tensor<B, 3>| Embeddings {
        image: Encoded {
            cross: Tensor::zeros([N, 2], device),
            uni: None,
            locals: Some(Locals::dense(v)),
        },
        text: Encoded {
            cross: Tensor::zeros([N, 2], device),
            uni: None,
            locals: Some(Locals {
                states: t,
                valid: valid(),
            }),
        },
    };
    let value_error = |got: Tensor<B, 1>, want: &Value| {
        let w = want.as_f64().unwrap_or(f64::NAN);
        values(got)
            .first()
            .map_or(f64::INFINITY, |g| ((g - w) / w).abs())
    };
    let mut out = Vec::new();

    // Sinkhorn over all regions of the batch.
    let q = selfalign::sinkhorn(
        l2_normalize3(shaped::<B, 3>(&inputs["v"], [N, R, D], device)?)
            .reshape([N * R, D])
            .matmul(prototypes()?.transpose()),
        setting("epsilon")?,
        setting("sinkhorn_iterations")? as usize,
        place,
    );
    out.push(Parity::within(
        "selfalign sinkhorn",
        relative(&values(q), &floats(&f["sinkhorn"])),
        tol,
    ));

    // LCA through the objective, prototypes trained (epoch ≥ freeze_epochs) and frozen.
    let objective = Objective {
        terms: vec![Term::Lca(LcaConfig {
            weight: 1.0,
            prototypes: K,
            epsilon: setting("epsilon")?,
            sinkhorn_iterations: setting("sinkhorn_iterations")? as usize,
            temperature: setting("lca_temperature")?,
            freeze_epochs: 1,
        })],
        soft_temperature: 1.0,
        soft_kl: Default::default(),
        on: place,
    };
    let want = &f["cases"]["lca"];
    for epoch in [1, 0] {
        let (v, t) = (leaf_v()?, leaf_t()?);
        let params = SelfAlign {
            prototypes: Some(Param::from_tensor(prototypes()?)),
            image_guide: None,
            text_guide: None,
        };
        let e = embeddings(v.clone(), t.clone());
        let o = objective
            .evaluate(&e, &temps, Some(&params), &targets(epoch))
            .map_err(|e| e.to_string())?;
        let state = if epoch == 0 { "frozen" } else { "trained" };
        out.push(Parity::within(
            format!("lca ({state} prototypes) value"),
            value_error(o.total.clone(), &want["value"]),
            tol,
        ));
        let grads = o.total.backward();
        out.push(Parity::within(
            format!("lca ({state} prototypes) d/dt"),
            t.grad(&grads).map_or(f64::INFINITY, |g| {
                relative(&values(g), &floats(&want["grad"]["t"]))
            }),
            tol,
        ));
        out.push(Parity::within(
            format!("lca ({state} prototypes) d/dv (detached: zero), largest"),
            largest(v.grad(&grads).map(values)),
            0.0,
        ));
        let c = params
            .prototypes
            .as_ref()
            .and_then(|p| p.val().grad(&grads))
            .map(values);
        out.push(if epoch == 0 {
            Parity::within(
                "lca (frozen prototypes) d/dprototypes (zero), largest",
                largest(c),
                0.0,
            )
        } else {
            Parity::within(
                "lca (trained prototypes) d/dprototypes",
                c.map_or(f64::INFINITY, |g| relative(&g, &floats(&want["grad"]["c"]))),
                tol,
            )
        });
    }

    // CRA through the objective: both guides in training mode, both directions.
    let objective = Objective {
        terms: vec![Term::Cra(CraConfig {
            weight: 1.0,
            temperature: setting("cra_temperature")?,
            hardest: setting("hardest")? as usize,
        })],
        soft_temperature: 1.0,
        soft_kl: Default::default(),
        on: place,
    };
    let (v, t) = (leaf_v()?, leaf_t()?);
    let params = SelfAlign {
        prototypes: None,
        image_guide: Some(guide(&inputs["guides"]["image"])?),
        text_guide: Some(guide(&inputs["guides"]["text"])?),
    };
    let o = objective
        .evaluate(
            &embeddings(v.clone(), t.clone()),
            &temps,
            Some(&params),
            &targets(0),
        )
        .map_err(|e| e.to_string())?;
    let want = &f["cases"]["cra"];
    out.push(Parity::within(
        "cra value",
        value_error(o.total.clone(), &want["value"]),
        tol,
    ));
    let text_stats = o.guide_stats.clone().map(|(_, text)| text);
    let grads = o.total.backward();
    let weight_grad = |g: &Option<Guide<B>>| {
        g.as_ref()
            .and_then(|g| g.linear.weight.val().grad(&grads))
            .map(values)
    };
    for (name, grad) in [
        ("v", v.grad(&grads).map(values)),
        ("t", t.grad(&grads).map(values)),
        ("wi_weight", weight_grad(&params.image_guide)),
        ("wt_weight", weight_grad(&params.text_guide)),
    ] {
        out.push(Parity::within(
            format!("cra d/d{name}"),
            grad.map_or(f64::INFINITY, |g| {
                relative(&g, &floats(&want["grad"][name]))
            }),
            tol,
        ));
    }

    // The text guide alone, training mode: output, batch statistics, gradients.
    let want = &f["cases"]["guide_train"];
    let g = guide(&inputs["guides"]["text"])?;
    let x = Locals {
        states: shaped::<B, 3>(&inputs["t"], [N, L, D], device)?,
        valid: valid(),
    }
    .mean()
    .detach()
    .require_grad();
    let (y, stats) = g.forward_train(x.clone());
    out.push(Parity::within(
        "guide (train) output",
        relative(&values(y.clone()), &floats(&want["output"])),
        tol,
    ));
    let f64s = |v: &[f32]| v.iter().map(|x| *x as f64).collect::<Vec<_>>();
    out.push(Parity::within(
        "guide (train) batch mean",
        relative(&f64s(&stats.mean), &floats(&want["batch_mean"])),
        tol.max(1e-5),
    ));
    out.push(Parity::within(
        "guide (train) batch variance (unbiased)",
        relative(&f64s(&stats.var), &floats(&want["batch_var_unbiased"])),
        tol.max(1e-5),
    ));
    out.push(Parity::within(
        "guide statistics reported by the objective differ, largest",
        text_stats.map_or(f64::INFINITY, |s| {
            s.mean
                .iter()
                .chain(&s.var)
                .zip(stats.mean.iter().chain(&stats.var))
                .fold(0.0, |m, (a, b)| m.max((a - b).abs() as f64))
        }),
        0.0,
    ));
    let mix = shaped::<B, 2>(&want["mix"], [N, D], device)?;
    let grads = (y * mix).sum().backward();
    for (name, grad) in [
        ("x", x.grad(&grads).map(values)),
        ("weight", g.linear.weight.val().grad(&grads).map(values)),
        ("gamma", g.gamma.val().grad(&grads).map(values)),
        ("beta", g.beta.val().grad(&grads).map(values)),
    ] {
        out.push(Parity::within(
            format!("guide (train) d/d{name}"),
            grad.map_or(f64::INFINITY, |g| {
                relative(&g, &floats(&want["grad"][name]))
            }),
            tol,
        ));
    }
    out.push(Parity::within(
        "guide running statistics d/d (not trained: none), largest",
        largest(g.running_mean.val().grad(&grads).map(values)),
        0.0,
    ));

    // Eval mode: the running statistics, not the batch's.
    out.push(Parity::within(
        "guide (eval) output",
        relative(
            &values(g.forward_eval(x.detach())),
            &floats(&f["cases"]["guide_eval"]["output"]),
        ),
        tol,
    ));

    // The running statistics move by momentum 0.1 towards the batch's.
    let before = values(g.running_mean.val());
    let moved = values(g.clone().update_running(&stats).running_mean.val());
    out.push(Parity::within(
        "guide running mean after one update (momentum 0.1), largest error",
        before
            .iter()
            .zip(&moved)
            .zip(&stats.mean)
            .fold(0.0, |m, ((b, mv), n)| {
                m.max((mv - (0.9 * b + 0.1 * *n as f64)).abs())
            }),
        1e-5,
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    /// The bounds of a TF32 device, exercised on the CPU's IEEE f32: the CLIP's departure is a
    /// small fraction of the TF32 emulation's (the `*_tf32` fields are read), the losses hold
    /// their 2⁻⁸, and SelfAlign's rows come back reported, not judged.
    #[test]
    fn tf32_bounds_read_the_emulation_and_report_selfalign() {
        let device = Default::default();
        let rows =
            clip_parity::<Cpu>(&fixtures(), Precision::Fp32, Arithmetic::Tf32, &device).unwrap();
        assert_eq!(rows.len(), 2);
        for r in &rows {
            assert!(r.check.contains("TF32 products"), "{r:?}");
            // f32 departs ~1e-6, the emulation ~6e-4.
            assert!(r.judged && r.value > 0.0 && r.value < 0.05, "{r:?}");
        }
        assert_eq!(Arithmetic::Tf32.losses(), 1.0 / 256.0);
        assert!(!Arithmetic::Tf32.selfalign().1);

        let plan = Plan {
            part: Part::Parity,
            fixtures: fixtures(),
            losses: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/losses.json"),
            selfalign: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/selfalign.json"),
            scratch: std::env::temp_dir(),
            precision: Precision::Fp32,
            cusa: false,
            shape: crate::ml::clip::shape::ClipShape::preset("ViT-B-32").unwrap(),
            batch: 1,
            text_len: 2,
            steps: 1,
            warmup: 0,
            train_steps: 1,
        };
        let (_, outcome) = run::<Cpu>(&plan, &device, Arithmetic::Tf32, &mut |_| {}).unwrap();
        let Outcome::Parity(rows) = &outcome else {
            panic!("a parity outcome: {outcome:?}");
        };
        assert!(outcome.passed());
        let reported: Vec<&str> = rows
            .iter()
            .filter(|r| !r.judged)
            .map(|r| r.check.as_str())
            .collect();
        assert!(reported.contains(&"cra d/dv"), "{reported:?}");
        assert!(reported.iter().any(|c| c.starts_with("diagnostic")));
        let judged_losses = rows
            .iter()
            .filter(|r| r.judged && r.check.starts_with("infonce"))
            .inspect(|r| assert_eq!(r.high, 1.0 / 256.0, "{r:?}"))
            .count();
        assert!(judged_losses > 0);
    }

    /// A row that is not judged never fails the part, but says whether it was within bounds.
    #[test]
    fn reported_rows_do_not_decide() {
        let out = Parity::within("x", 2.0, 1.0).reported();
        assert!(out.passed() && !out.within_bounds() && !out.judged);
        assert!(!Parity::within("x", 2.0, 1.0).passed());
        assert!(!Outcome::Parity(vec![Parity::within("x", 2.0, 1.0), out.clone()]).passed());
        assert!(Outcome::Parity(vec![Parity::within("y", 0.5, 1.0), out]).passed());
    }
}
