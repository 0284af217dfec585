//! The training loop: epochs of shuffled in-batch steps, validation after each epoch, a
//! checkpoint after each epoch, resume from the last one; then the outputs (best weights,
//! `config.json`, `log.jsonl`, `metrics.json`) and the run's summary.

use std::sync::Mutex;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde_json::{Value, json};

use super::checkpoint::{self, State};
use super::config::{Architecture, TrainConfig, TrainingRecord};
use super::data::{self, Rows, TrainingData};
use super::step::{StepBatch, StepSettings, step_once};
use crate::api::{StageContext, StageError, StageSummary};
use crate::ml::embed::{Embedding, embed_split};
use crate::ml::optim::{GroupedAdamW, warmup_factor};
use crate::ml::retrieval::{self, Matrix, Recalls};
use crate::ml::student::Student;

/// Backends seed one process-wide generator: initialisations of concurrent train stages take
/// turns so each sees only its own seed.
static INIT: Mutex<()> = Mutex::new(());

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

fn validate<B: Backend, S: Student<B>>(
    model: &S,
    split: &data::Split<S::Inputs>,
    device: &B::Device,
    embedding: Embedding,
) -> Result<Recalls, StageError> {
    let (images, captions, dim) = embed_split(model, &split.inputs, device, embedding)
        .map_err(|e| StageError::failed(e.to_string()))?;
    Ok(retrieval::recalls(
        &Matrix { data: &images, dim },
        &Matrix {
            data: &captions,
            dim,
        },
        &split.image_of,
    ))
}

/// The batches of one optimiser step: captions `chunk` of the split, their images and teacher
/// vectors.
fn step_batches<I>(data: &TrainingData<I>, chunks: &[&[usize]]) -> Vec<StepBatch> {
    let train = &data.train;
    chunks
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
        .collect()
}

/// The training loop proper, for any student.
pub(crate) fn fit<B, S>(
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
    let mut objective = c.loss.objective(c.reduction());
    if backend == "cuda" {
        objective.on = crate::ml::Where::Device;
    }
    ctx.log.line(format!(
        "objective: {}{}{}{}",
        objective.names().join(" + "),
        match c.loss.soft_temperature {
            Some(t) => format!(" (soft labels at τ_s {t})"),
            None => String::new(),
        },
        if objective.soft_kl == crate::ml::loss::Kl::Reverse {
            " (reverse KL: KL(Q‖P))"
        } else {
            ""
        },
        if c.embedding == Embedding::SelfalignConcat {
            "; validation with the selfalign-concat embedding"
        } else {
            ""
        }
    ));
    let model: S = {
        let _turn = INIT.lock().unwrap_or_else(|p| p.into_inner());
        B::seed(&device, c.seed);
        init(&device)
    };
    let optim = GroupedAdamW::new(&model, c.weight_decay, c.decay_temperatures());
    let checkpoint_dir = checkpoint::checkpoint_dir(ctx);
    let ((mut model, mut optim), saved) =
        checkpoint::resume(&checkpoint_dir, (model, optim), &device)?;
    let mut state = match saved {
        Some(saved) => {
            ctx.log.line(format!(
                "resuming after epoch {} from {}",
                saved.epochs_done,
                checkpoint_dir.display()
            ));
            saved
        }
        None => State::fresh(),
    };
    std::fs::create_dir_all(&checkpoint_dir)
        .map_err(|e| StageError::io(format!("creating {}", checkpoint_dir.display()), e))?;

    let n = train.caption_ids.len();
    let steps_per_epoch = n / c.batch_size + usize::from(n % c.batch_size >= 2);
    ctx.progress
        .set_items(Some((steps_per_epoch * c.epochs) as u64));
    ctx.progress
        .set_position((steps_per_epoch * state.epochs_done) as u64);
    let mut step = (steps_per_epoch * state.epochs_done) as u64;
    let names = objective.names();
    for epoch in state.epochs_done..c.epochs {
        let started = Instant::now();
        let lr = c.epoch_lr(epoch);
        let order = epoch_order(n, c.seed, epoch);
        // The total, then each term, summed over the epoch's batches.
        let mut total_sum = 0.0f64;
        let mut term_sums = vec![0.0f64; names.len()];
        let mut batches = 0usize;
        let chunks: Vec<&[usize]> = order
            .chunks(c.batch_size)
            .filter(|chunk| chunk.len() >= 2)
            .collect();
        let groups_per_epoch = steps_per_epoch.div_ceil(c.accumulate.max(1));
        // The rate of the epoch's last step: the schedule's value, or less inside a warm-up.
        let mut step_lr = lr;
        for (g, group) in chunks.chunks(c.accumulate.max(1)).enumerate() {
            if ctx.cancel.is_cancelled() {
                return Err(StageError::Cancelled);
            }
            let group_batches = step_batches(data, group);
            let refs: Vec<&StepBatch> = group_batches.iter().collect();
            let optimiser_step = (epoch * groups_per_epoch + g) as u64;
            step_lr = lr * warmup_factor(optimiser_step, c.warmup);
            let settings = StepSettings {
                lr: step_lr,
                grad_clip: c.grad_clip,
                epoch,
            };
            let (next, values) = step_once(
                model,
                &mut optim,
                &objective,
                settings,
                &train.inputs,
                &refs,
                &device,
            )
            .map_err(|e| StageError::failed(e.to_string()))?;
            model = next;
            if !values.total.is_finite() {
                return Err(StageError::failed_with_hint(
                    format!(
                        "the loss became {} in epoch {} (step {step})",
                        values.total,
                        epoch + 1
                    ),
                    "lower `lr`, or check the features for NaN",
                ));
            }
            let weight = group.len() as f64;
            total_sum += values.total * weight;
            for (sum, (_, v)) in term_sums.iter_mut().zip(&values.terms) {
                *sum += v * weight;
            }
            batches += group.len();
            step += group.len() as u64;
            ctx.progress.set_position(step);
            ctx.progress.set_message(&format!(
                "epoch {}/{} loss {:.4}",
                epoch + 1,
                c.epochs,
                total_sum / batches as f64
            ));
        }
        let m = model.clone().clamped();
        let recalls = validate(&m.valid(), val, &device, c.embedding)?;
        let seconds = started.elapsed().as_secs_f64();
        let t = m.temperatures().values();
        let mean = |sum: f64| sum / batches.max(1) as f64;
        // Keys in the order of earlier releases: the base term and τ first, the other terms
        // (with the temperatures they own) after the throughput.
        let mut line = json!({
            "epoch": epoch + 1,
            "lr": step_lr,
            "loss": mean(total_sum),
            "loss_base": mean(term_sums[0]),
            "tau": t[0],
            "val": recalls,
            "seconds": seconds,
            "pairs_per_second": (batches * c.batch_size).min(n) as f64 / seconds,
        });
        // The temperatures the terms own, by name.
        let temperature = |name: &str| match name {
            "tau_c" => Some(t[1]),
            "tau_ui" => Some(t[2]),
            "tau_ut" => Some(t[3]),
            _ => None,
        };
        for (term, sum) in objective.terms.iter().zip(&term_sums).skip(1) {
            line[format!("loss_{}", term.name())] = json!(mean(*sum));
            for p in term.parameters() {
                if let Some(v) = temperature(p) {
                    line[*p] = json!(v);
                }
            }
        }
        ctx.log.line(line.to_string());
        if recalls.rsum > state.best_rsum {
            state.best_rsum = recalls.rsum;
            state.best_epoch = Some(epoch + 1);
            checkpoint::save(&m, &checkpoint_dir.join("best"))?;
        }
        state.log.push(line);
        model = m;
        state.epochs_done = epoch + 1;
        checkpoint::save_epoch(&checkpoint_dir, &model, &optim, &state)?;
    }
    finish(c, ctx, &state, architecture, backend, &objective)
}

/// The outputs of a finished training (best weights, `config.json`, `log.jsonl`,
/// `metrics.json`), the checkpoint removed, and the summary.
fn finish(
    c: &TrainConfig,
    ctx: &StageContext<'_>,
    state: &State,
    architecture: Architecture,
    backend: &str,
    objective: &crate::ml::objective::Objective,
) -> Result<StageSummary, StageError> {
    let checkpoint_dir = checkpoint::checkpoint_dir(ctx);
    let best_epoch = state.best_epoch.unwrap_or(c.epochs);
    std::fs::copy(
        checkpoint_dir.join("best.mpk"),
        ctx.out_dir.join("model.mpk"),
    )
    .map_err(|e| StageError::io("copying the best weights", e))?;
    let record = TrainingRecord {
        student: architecture,
        base_loss: crate::api::config_name(&c.loss.base),
        reduction: format!("{:?}", c.reduction()).to_lowercase(),
        alpha: c.loss.csa.map(|x| x.alpha),
        beta: c.loss.usa.map(|x| x.beta),
        terms: objective.names().iter().map(|n| n.to_string()).collect(),
        lca: c.loss.lca,
        cra: c.loss.cra,
        embedding: c.embedding,
        lr_update: c.lr_update,
        grad_clip: c.grad_clip,
        epochs: c.epochs,
        batch_size: c.batch_size,
        accumulate: c.accumulate,
        lr: c.lr,
        lr_min: c.lr_update.is_none().then(|| c.lr_min()),
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
    let mut metrics = json!({"best_epoch": best_epoch, "val": best["val"]});
    // The best epoch's loss terms, by name.
    for name in objective.names() {
        let key = format!("loss_{name}");
        metrics[&key] = best[&key].clone();
    }
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
