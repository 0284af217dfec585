//! `train`: a student trained with a base loss and, optionally, CSA and USA from precomputed
//! soft labels and SelfAlign's LCA and CRA on its locals (docs/method.md), composed by name in
//! [`crate::ml::objective`], on burn — ndarray on the CPU, CUDA behind the `cuda` feature.
//!
//! Invariants:
//! * deterministic on the CPU: the same config and inputs give the same weights bytes (model
//!   initialisation under a process-wide lock around the backend seed, per-epoch shuffles from
//!   SplitMix64 of (seed, epoch), parameter ids by position), so downstream early cutoff works;
//! * the best epoch is chosen on the **validation** split (RSUM); the test split is never read
//!   here;
//! * a checkpoint after every epoch lives in `scratch-v1/train/<fingerprint>/`; a rerun of the
//!   same fingerprint after a kill resumes from it and ends with the same bytes as an
//!   uninterrupted run; it is removed once the stage succeeds;
//! * soft labels must cover every training caption and image (the `softlabel` stage checks);
//!   a training caption without a backbone feature is an error, never a zero vector.
//!
//! Output tree: `model.mpk` (best epoch, burn NamedMpk, full precision), `config.json` (the
//! architecture and training config, burn `Config`), `vocab.json` (scenes-small), `log.jsonl` (one line per epoch: losses by term,
//! temperatures, learning rate, validation R@1/5/10 and RSUM, seconds), `metrics.json`.

pub mod bench;
pub(crate) mod checkpoint;
pub mod config;
pub(crate) mod data;
pub mod device_check;
pub(crate) mod fit;
pub mod load;
pub(crate) mod step;
pub(crate) mod students;

use serde_json::Value;

use crate::api::{
    Checked, ConfigError, Kind, StageContext, StageError, StageSummary, parse_config,
};
pub use config::TrainConfig;

pub struct TrainKind;

impl Kind for TrainKind {
    type Config = TrainConfig;
    const NAME: &'static str = "train";
    // 2: config.json records the architecture (`student: {kind, …}`); scenes-small.
    // 3: `accumulate` (recorded in config.json); the clip student; presets fill defaults.
    // 4: `warmup` (recorded in config.json).
    // Defaults and presets need no bump: they are in the normalised config.
    const VERSION: u32 = 4;

    fn parse(with: &Value) -> Result<TrainConfig, ConfigError> {
        parse_config(&config::with_preset_defaults(with))
    }

    fn validate(c: &mut TrainConfig, _declared: &[String]) -> Result<Checked, ConfigError> {
        c.validate()?;
        c.normalise();
        Ok(Checked::default())
    }

    fn run(&self, c: TrainConfig, ctx: &StageContext<'_>) -> Result<StageSummary, StageError> {
        students::train(&c, ctx)
    }
}
