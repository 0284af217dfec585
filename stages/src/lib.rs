//! The stage kinds of cusa-pipe, and the single trait through which the engine drives them.
//!
//! Each kind is one module with a typed config, an implementation version and a `run` that
//! writes only under its output directory; see [`api`] for the contract. The engine receives
//! the kinds from [`registry`] and never reaches into a kind's module.

pub mod api;
pub mod command;
pub mod dataset;
pub mod device;
pub mod download;
pub mod eval;
pub mod export;
pub mod features;
pub mod ml;
pub mod pictures;
pub mod rng;
pub mod safe_path;
pub mod softlabel;
pub mod teacher;
pub mod train;

use std::collections::BTreeMap;
use std::sync::Arc;

use api::StageKind;

/// Every stage kind this build knows, by its `kind:` name.
pub fn registry() -> BTreeMap<&'static str, Arc<dyn StageKind>> {
    let kinds: Vec<Arc<dyn StageKind>> = vec![
        Arc::new(command::CommandKind),
        Arc::new(dataset::DatasetKind),
        Arc::new(download::DownloadKind),
        Arc::new(eval::EvalKind),
        Arc::new(export::ExportKind),
        Arc::new(softlabel::SoftlabelKind),
        Arc::new(teacher::TeacherKind),
        Arc::new(train::TrainKind),
    ];
    kinds.into_iter().map(|k| (k.name(), k)).collect()
}
