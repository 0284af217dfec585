//! Reading a trained student back from a train stage's output tree (`config.json` with the
//! architecture, `model.mpk`, `vocab.json` for students that read words, `merges.txt` +
//! `vocab.json` for CLIP).
//!
//! One place for every reader (eval embeds with it, export converts it), so a new student kind
//! is taught to all of them at once. Errors name the folder and say what `model:` must be.

use std::path::Path;

use burn::module::Module;
use burn::prelude::Backend;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use serde_json::Value;

use crate::api::StageError;
use crate::ml::clip::tokenizer::ClipTokenizer;
use crate::ml::clip::{ClipStudent, ClipStudentShape};
use crate::ml::params::float_params;
use crate::ml::scenes_small::{ScenesSmall, ScenesSmallShape};
use crate::ml::student::{FeatureHeads, FeatureHeadsShape};
use crate::ml::vocab::WordVocab;
use crate::train::config::Architecture;

/// A trained student, by kind, with what rebuilding it needed.
// Loaded once per stage and matched at once: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum TrainedStudent<B: Backend> {
    FeatureHeads {
        shape: FeatureHeadsShape,
        model: FeatureHeads<B>,
    },
    ScenesSmall {
        shape: ScenesSmallShape,
        model: ScenesSmall<B>,
        vocab: WordVocab,
    },
    Clip {
        shape: ClipStudentShape,
        model: ClipStudent<B>,
        tokenizer: ClipTokenizer,
    },
}

/// A train stage's output, loaded.
pub struct Trained<B: Backend> {
    /// `config.json` as written by the train stage (architecture and how it was trained).
    pub config: Value,
    pub student: TrainedStudent<B>,
}

fn weights_error(dir: &Path, e: impl std::fmt::Display) -> StageError {
    StageError::failed_with_hint(
        format!("cannot load the weights in {}: {e}", dir.display()),
        "`model:` must be a train stage's output (model.mpk + config.json)",
    )
}

/// Every float parameter of a module: its path and shape.
fn param_shapes<B: Backend, M: Module<B>>(model: &M) -> Vec<(String, Vec<usize>)> {
    float_params(model)
        .into_iter()
        .map(|p| (p.path, p.shape))
        .collect()
}

/// Loads the weights at `file` (`<file>.mpk`) into `model` (built from the architecture they
/// were saved with) and checks that every tensor has the shape the architecture needs: burn
/// takes a record's tensors as they come, and a mismatch would only show as a panic in the
/// first forward. A shape error says which tensor.
pub(crate) fn load_checked<B: Backend, M: Module<B>>(
    model: M,
    file: &Path,
    device: &B::Device,
) -> Result<M, WeightsError> {
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    let wanted = param_shapes(&model);
    let loaded = model
        .load_file(file.to_path_buf(), &recorder, device)
        .map_err(|e| WeightsError::Unreadable(e.to_string()))?;
    let got = param_shapes(&loaded);
    if got.len() != wanted.len() {
        return Err(WeightsError::Mismatch(format!(
            "{} tensors where the architecture has {}",
            got.len(),
            wanted.len()
        )));
    }
    for ((path, want), (_, have)) in wanted.iter().zip(&got) {
        if want != have {
            return Err(WeightsError::Mismatch(format!(
                "`{path}` is {have:?} in the weights, the architecture needs {want:?}"
            )));
        }
    }
    Ok(loaded)
}

/// Why saved weights did not load.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WeightsError {
    /// The file is missing or not a record of this module.
    #[error("{0}")]
    Unreadable(String),
    /// A record of another architecture.
    #[error("{0}")]
    Mismatch(String),
}

/// [`load_checked`] of a train output's `model.mpk`, against its `config.json`.
fn load_output<B: Backend, M: Module<B>>(
    model: M,
    dir: &Path,
    device: &B::Device,
) -> Result<M, StageError> {
    load_checked(model, &dir.join("model"), device).map_err(|e| match e {
        WeightsError::Unreadable(e) => weights_error(dir, e),
        WeightsError::Mismatch(e) => StageError::failed_with_hint(
            format!(
                "the weights in {} do not fit its config.json: {e}",
                dir.display()
            ),
            "model.mpk and config.json must come from the same training: rerun the train stage (or restore its output) instead of editing them",
        ),
    })
}

/// Loads the student trained into `dir` onto `device`.
pub fn load<B: Backend>(dir: &Path, device: &B::Device) -> Result<Trained<B>, StageError> {
    let config: Value = std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            StageError::failed_with_hint(
                format!("{} has no readable config.json", dir.display()),
                "`model:` must be a train stage's output",
            )
        })?;
    let architecture: Architecture = serde_json::from_value(config["student"].clone())
        .map_err(|e| weights_error(dir, format!("config.json: `student`: {e}")))?;
    let student = match architecture {
        Architecture::FeatureHeads(shape) => TrainedStudent::FeatureHeads {
            model: load_output(FeatureHeads::<B>::new(shape, device), dir, device)?,
            shape,
        },
        Architecture::ScenesSmall(shape) => {
            let vocab: WordVocab = std::fs::read(dir.join("vocab.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| weights_error(dir, "no readable vocab.json"))?;
            TrainedStudent::ScenesSmall {
                model: load_output(ScenesSmall::<B>::new(&shape, device), dir, device)?,
                shape,
                vocab,
            }
        }
        Architecture::Clip(shape) => {
            let tokenizer = ClipTokenizer::from_path(dir).map_err(|e| weights_error(dir, e))?;
            TrainedStudent::Clip {
                model: load_output(ClipStudent::<B>::empty(&shape, device), dir, device)?,
                shape,
                tokenizer,
            }
        }
    };
    Ok(Trained { config, student })
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::NdArray<f32>;

    fn shape(hidden: usize) -> FeatureHeadsShape {
        FeatureHeadsShape {
            image_dim: 6,
            text_dim: 5,
            hidden,
            dim: 4,
            uni_heads: true,
        }
    }

    /// A train output folder: `model.mpk` of one architecture, `config.json` naming another.
    fn folder(saved: FeatureHeadsShape, named: FeatureHeadsShape) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let device = Default::default();
        FeatureHeads::<B>::new(saved, &device)
            .save_file(
                dir.path().join("model"),
                &NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
            )
            .unwrap();
        let config = serde_json::json!({"student": Architecture::FeatureHeads(named)});
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        dir
    }

    #[test]
    fn weights_of_another_architecture_are_named_not_panicked_on() {
        let device = Default::default();
        let fits = folder(shape(8), shape(8));
        assert!(load::<B>(fits.path(), &device).is_ok());
        assert_eq!(
            param_shapes(&FeatureHeads::<B>::new(shape(8), &device))[0].0,
            "image_backbone.fc1.weight"
        );

        let other = folder(shape(8), shape(16));
        let e = load::<B>(other.path(), &device)
            .err()
            .expect("a mismatch fails");
        let message = e.to_string();
        assert!(
            message.contains("`image_backbone.fc1.weight` is [6, 8] in the weights, the architecture needs [6, 16]"),
            "{message}"
        );
        assert!(message.contains("do not fit its config.json"), "{message}");

        std::fs::remove_file(fits.path().join("model.mpk")).unwrap();
        let e = load::<B>(fits.path(), &device)
            .err()
            .expect("no weights fails");
        assert!(e.to_string().contains("cannot load the weights in"), "{e}");
        assert_eq!(
            e.hint(),
            Some("`model:` must be a train stage's output (model.mpk + config.json)")
        );
    }
}
