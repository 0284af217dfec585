//! The stage kinds of cusa-pipe, and the single trait through which the engine drives them.
//!
//! Each kind is one module with a typed config, an implementation version and a `run` that
//! writes only under its output directory; see [`api`] for the contract. The engine receives
//! the kinds from [`registry`] and never reaches into a kind's module.

pub mod api;
pub mod command;
pub mod controlled;
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
pub mod seeds;
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
        Arc::new(controlled::ControlledKind),
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::registry;

    fn normalised(kind: &str, with: Value) -> Value {
        registry()[kind]
            .check(&with, &[])
            .unwrap_or_else(|e| panic!("{kind}: {} at {}", e.message, e.path))
            .config
    }

    #[test]
    fn a_preset_is_hashed_as_the_values_it_stands_for() {
        let heads = json!({"kind": "feature-heads", "image_features": "i", "text_features": "t"});
        let named = normalised(
            "train",
            json!({"dataset": "d", "student": heads, "preset": "cusa-clip"}),
        );
        let spelt_out = normalised(
            "train",
            json!({
                "dataset": "d", "student": heads, "preset": "cusa-clip",
                "lr": 1e-5, "lr_min": 1e-6, "weight_decay": 1e-4, "batch_size": 128, "epochs": 30,
                "decay_temperatures": true, "loss": {"reduction": "reference"},
            }),
        );
        assert_eq!(named, spelt_out);
        assert_eq!(named["lr"], json!(1e-5));
        assert_eq!(named["loss"]["reduction"], json!("reference"));
        // A different value is a different config.
        let other = normalised(
            "train",
            json!({"dataset": "d", "student": heads, "preset": "cusa-clip", "lr": 2e-5}),
        );
        assert_ne!(named, other);

        let base = json!({"modality": "image", "model": "m", "onnxruntime": "o", "dataset": "d"});
        let mut by_name = base.clone();
        by_name["preprocess"] = json!("clip");
        let mut by_value = base.clone();
        by_value["preprocess"] = json!({
            "resize": 224, "crop": 224, "interpolation": "bicubic",
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.2613026, 0.2757771],
        });
        assert_eq!(
            normalised("teacher", by_name),
            normalised("teacher", by_value)
        );
    }

    #[test]
    fn a_default_left_out_and_written_in_normalise_alike() {
        assert_eq!(
            normalised("command", json!({"run": "true"})),
            normalised("command", json!({"run": "true", "shell": true, "env": {}}))
        );
        assert_eq!(
            normalised("command", json!({"run": "true"})),
            json!({"run": "true", "shell": true, "env": {}})
        );
    }

    #[test]
    fn soft_labels_a_loss_does_not_read_are_not_part_of_the_config() {
        let heads = json!({"kind": "feature-heads", "image_features": "i", "text_features": "t"});
        let base = normalised(
            "train",
            json!({"dataset": "d", "student": heads, "softlabels": "s", "loss": {"base": "infonce"}}),
        );
        assert!(base["softlabels"].is_null());
        assert_eq!(
            base,
            normalised(
                "train",
                json!({"dataset": "d", "student": heads, "loss": {"base": "infonce"}})
            )
        );
        let csa = normalised(
            "train",
            json!({"dataset": "d", "student": heads, "softlabels": "s", "loss": {"csa": {"alpha": 1.0}}}),
        );
        assert_eq!(csa["softlabels"], json!("s"));
    }
}
