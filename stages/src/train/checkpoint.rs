//! A training's checkpoint: after every epoch the weights (with the temperatures, prototypes
//! and guides), both optimisers' state and the progress, in `scratch-v1/train/<fingerprint>/`.
//!
//! Invariants: the state file is written last and atomically, so a kill at any point leaves
//! either the previous epoch's checkpoint or this one's, never a mix; a rerun of the same
//! fingerprint resumes from it and ends with the bytes of an uninterrupted run; the folder is
//! removed once the stage succeeds.

use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module};
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{StageContext, StageError};
use crate::ml::optim::GroupedAdamW;

pub(crate) type Recorder_ = NamedMpkFileRecorder<FullPrecisionSettings>;

/// Resume state, written after every epoch.
#[derive(Serialize, Deserialize)]
pub(crate) struct State {
    pub epochs_done: usize,
    pub best_epoch: Option<usize>,
    pub best_rsum: f64,
    pub log: Vec<Value>,
}

impl State {
    pub fn fresh() -> Self {
        Self {
            epochs_done: 0,
            best_epoch: None,
            best_rsum: f64::NEG_INFINITY,
            log: Vec::new(),
        }
    }
}

pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StageError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| StageError::io(format!("writing {}", path.display()), e))
}

/// This run's checkpoint folder: its weights, optimiser state and progress after each epoch,
/// and its decoded pictures; kept when the run fails or is killed, removed when it ends.
pub(crate) fn checkpoint_dir(ctx: &StageContext<'_>) -> PathBuf {
    ctx.scratch_dir.join(ctx.fingerprint)
}

/// The file of the decoded pictures of the `train` or `val` split, in the checkpoint folder.
pub(crate) fn pictures_file(ctx: &StageContext<'_>, role: &str) -> PathBuf {
    checkpoint_dir(ctx).join(format!("pictures-{role}.rgb"))
}

pub(crate) fn save<B: Backend, M: Module<B>>(model: &M, path: &Path) -> Result<(), StageError> {
    model
        .clone()
        .save_file(path.to_path_buf(), &Recorder_::new())
        .map_err(|e| StageError::failed(format!("saving weights to {}: {e}", path.display())))
}

/// A model and its optimisers.
pub(crate) type Trainee<M, B> = (M, GroupedAdamW<M, B>);

/// The saved progress in `dir`, with the model and optimisers loaded from it; `None` when
/// there is none (a fresh start).
pub(crate) fn resume<B: AutodiffBackend, M: AutodiffModule<B>>(
    dir: &Path,
    (model, mut optim): Trainee<M, B>,
    device: &B::Device,
) -> Result<(Trainee<M, B>, Option<State>), StageError> {
    let Some(saved) = std::fs::read(dir.join("state.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<State>(&bytes).ok())
    else {
        return Ok(((model, optim), None));
    };
    let load_err = |e: &dyn std::fmt::Display| {
        StageError::failed_with_hint(
            format!("cannot load the checkpoint in {}: {e}", dir.display()),
            "delete that folder to start this training from scratch",
        )
    };
    let recorder = Recorder_::new();
    let model =
        super::load::load_checked(model, &dir.join("model"), device).map_err(|e| load_err(&e))?;
    optim.decayed = optim.decayed.load_record(
        recorder
            .load(dir.join("optim-decayed"), device)
            .map_err(|e| load_err(&e))?,
    );
    optim.plain = optim.plain.load_record(
        recorder
            .load(dir.join("optim-plain"), device)
            .map_err(|e| load_err(&e))?,
    );
    Ok(((model, optim), Some(saved)))
}

/// The end-of-epoch checkpoint: weights, both optimisers, then the state that points at them.
pub(crate) fn save_epoch<B: AutodiffBackend, M: AutodiffModule<B>>(
    dir: &Path,
    model: &M,
    optim: &GroupedAdamW<M, B>,
    state: &State,
) -> Result<(), StageError> {
    let recorder = Recorder_::new();
    save(model, &dir.join("model"))?;
    let failed =
        |e: burn::record::RecorderError| StageError::failed(format!("saving the checkpoint: {e}"));
    recorder
        .record(optim.decayed.to_record(), dir.join("optim-decayed"))
        .map_err(failed)?;
    recorder
        .record(optim.plain.to_record(), dir.join("optim-plain"))
        .map_err(failed)?;
    write_atomically(
        &dir.join("state.json"),
        &serde_json::to_vec(state).unwrap_or_default(),
    )
}
