//! Image teachers: decode, preprocess, run, pool.
//!
//! Batches are decoded and preprocessed in parallel (rayon) on a producer thread while the
//! previous batch runs through the model, so on a GPU the path we own is not the bottleneck.
//! The model's single input must be a float32 rank-4 tensor; fixed spatial sizes are checked
//! against the preprocessing before anything runs.

use std::path::PathBuf;
use std::sync::mpsc::sync_channel;

use ort::session::Session;
use ort::value::{Tensor, TensorElementType, ValueType};
use rayon::prelude::*;

use super::preprocess::Preprocess;
use super::{Pooling, pooled_output};
use crate::api::{StageContext, StageError};

/// One image to embed.
pub struct Item {
    pub id: String,
    pub path: PathBuf,
}

/// What embedding produced.
pub struct Embedded {
    pub ids: Vec<String>,
    pub data: Vec<f32>,
    pub dim: usize,
    /// Images that could not be decoded (with `on_error: skip`).
    pub skipped: Vec<String>,
    /// Time from the first decode to the last pooled batch.
    pub seconds: f64,
}

fn input(session: &Session, pre: &Preprocess) -> Result<String, StageError> {
    let inputs = session.inputs();
    if inputs.len() != 1 {
        let names: Vec<&str> = inputs.iter().map(|i| i.name()).collect();
        return Err(StageError::failed(format!(
            "an image teacher needs a model with one input; this one has {}",
            names.join(", ")
        )));
    }
    let (w, h) = pre.output_size();
    match inputs[0].dtype() {
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape,
            ..
        } if shape.len() == 4 => {
            let (sh, sw) = if pre.layout == "nhwc" {
                (shape[1], shape[2])
            } else {
                (shape[2], shape[3])
            };
            let channels = if pre.layout == "nhwc" {
                shape[3]
            } else {
                shape[1]
            };
            if channels > 0 && channels != 3 {
                return Err(StageError::failed_with_hint(
                    format!(
                        "model input `{}` has {channels} channels where the layout `{}` puts colour",
                        inputs[0].name(),
                        pre.layout
                    ),
                    "set `layout:` (nchw or nhwc) to the model's",
                ));
            }
            if (sh > 0 && sh as u32 != h) || (sw > 0 && sw as u32 != w) {
                return Err(StageError::failed_with_hint(
                    format!(
                        "model input `{}` is {sw}×{sh} but the preprocessing makes {w}×{h}",
                        inputs[0].name()
                    ),
                    "change `resize`/`crop` (or the preset) to the model's input size",
                ));
            }
            Ok(inputs[0].name().to_string())
        }
        other => Err(StageError::failed_with_hint(
            format!(
                "model input `{}` is {other}, expected a float32 image batch (rank 4)",
                inputs[0].name()
            ),
            "is this an image model?",
        )),
    }
}

fn load(item: &Item, pre: &Preprocess) -> Result<Vec<f32>, String> {
    let img = super::preprocess::decode(&item.path)?;
    let pixels = pre.pixels(&img);
    let mut out = Vec::with_capacity((pixels.width() * pixels.height() * 3) as usize);
    pre.tensor(&pixels, &mut out);
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub fn embed(
    session: &mut Session,
    items: &[Item],
    pre: &Preprocess,
    output: &str,
    pooling: Pooling,
    batch_size: usize,
    skip_bad: bool,
    ctx: &StageContext<'_>,
) -> Result<Embedded, StageError> {
    let input_name = input(session, pre)?;
    let (w, h) = pre.output_size();
    let shape = if pre.layout == "nhwc" {
        [0, h as usize, w as usize, 3]
    } else {
        [0, 3, h as usize, w as usize]
    };
    ctx.progress.set_items(Some(items.len() as u64));
    let mut result = Embedded {
        ids: Vec::new(),
        data: Vec::new(),
        dim: 0,
        skipped: Vec::new(),
        seconds: 0.0,
    };
    let started = std::time::Instant::now();
    let batch_size = batch_size.max(1);
    std::thread::scope(|scope| -> Result<(), StageError> {
        let (tx, rx) = sync_channel::<Vec<Result<Vec<f32>, String>>>(1);
        scope.spawn(move || {
            for chunk in items.chunks(batch_size) {
                let prepared: Vec<Result<Vec<f32>, String>> =
                    chunk.par_iter().map(|it| load(it, pre)).collect();
                if tx.send(prepared).is_err() {
                    break;
                }
            }
        });
        for (chunk, prepared) in items.chunks(batch_size).zip(rx) {
            if ctx.cancel.is_cancelled() {
                return Err(StageError::Cancelled);
            }
            let mut batch = Vec::with_capacity(prepared.len() * 3 * (w * h) as usize);
            let mut ids = Vec::new();
            for (item, p) in chunk.iter().zip(prepared) {
                match p {
                    Ok(t) => {
                        batch.extend(t);
                        ids.push(item.id.clone());
                    }
                    Err(e) if skip_bad => {
                        ctx.log.line(format!(
                            "skipping {} ({}): {e}",
                            item.id,
                            item.path.display()
                        ));
                        result.skipped.push(item.id.clone());
                    }
                    Err(e) => {
                        return Err(StageError::failed_with_hint(
                            format!(
                                "cannot decode image `{}` ({}): {e}",
                                item.id,
                                item.path.display()
                            ),
                            "fix or remove the file, or set `on_error: skip` to leave it out (it is listed in the log)",
                        ));
                    }
                }
            }
            if ids.is_empty() {
                continue;
            }
            let mut s = shape;
            s[0] = ids.len();
            let tensor = Tensor::from_array((s, batch))
                .map_err(|e| StageError::failed(format!("building the image batch: {e}")))?;
            let outputs = session
                .run(vec![(input_name.clone(), tensor.into_dyn())])
                .map_err(|e| StageError::failed(format!("inference failed: {e}")))?;
            let pooled = pooled_output(&outputs, output, None, pooling)?;
            result.dim = pooled.len() / ids.len();
            result.data.extend(pooled);
            result.ids.extend(ids);
            ctx.progress
                .set_position((result.ids.len() + result.skipped.len()) as u64);
        }
        Ok(())
    })?;
    result.seconds = started.elapsed().as_secs_f64();
    Ok(result)
}
