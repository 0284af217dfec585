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
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    let weights = dir.join("model");
    let student = match architecture {
        Architecture::FeatureHeads(shape) => TrainedStudent::FeatureHeads {
            model: FeatureHeads::<B>::new(shape, device)
                .load_file(weights, &recorder, device)
                .map_err(|e| weights_error(dir, e))?,
            shape,
        },
        Architecture::ScenesSmall(shape) => {
            let vocab: WordVocab = std::fs::read(dir.join("vocab.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| weights_error(dir, "no readable vocab.json"))?;
            TrainedStudent::ScenesSmall {
                model: ScenesSmall::<B>::new(&shape, device)
                    .load_file(weights, &recorder, device)
                    .map_err(|e| weights_error(dir, e))?,
                shape,
                vocab,
            }
        }
        Architecture::Clip(shape) => {
            let tokenizer = ClipTokenizer::from_path(dir).map_err(|e| weights_error(dir, e))?;
            TrainedStudent::Clip {
                model: ClipStudent::<B>::empty(&shape, device)
                    .load_file(weights, &recorder, device)
                    .map_err(|e| weights_error(dir, e))?,
                shape,
                tokenizer,
            }
        }
    };
    Ok(Trained { config, student })
}
