//! SelfAlign through the pipeline: the tiny `scenes-small` and `clip` students train with LCA,
//! CRA, CSA and USA at once (the step schedule and gradient clipping of its preset), resume
//! after `kill -9` to the same bytes (prototypes, guides and their running statistics are in the
//! checkpoint), are evaluated with the global and the `selfalign-concat` embedding, and
//! exported; bad SelfAlign settings are located errors before anything trains.

use crate::support::{Project, sha256_hex};
use crate::train::{kill_after_epochs, project};

fn json(path: std::path::PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn epochs(p: &Project, stage: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p.output(stage).join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The train tests' project with a scenes-small student trained with every term.
fn small_project() -> Project {
    let p = project("");
    p.add_stages(
        r#"
small:
  kind: train
  inputs: {dataset: "${scenes}", softlabels: "${softlabels}"}
  with:
    dataset: ${inputs.dataset}
    softlabels: ${inputs.softlabels}
    student: {kind: scenes-small, image_size: 32, channels: [16, 32], width: 32, heads: 2, layers: 1, dim: 32}
    loss: {csa: {alpha: 1.0}, usa: {beta: 1.0}, lca: {prototypes: 16}, cra: {hardest: 64}}
    batch_size: 16
    epochs: 3
    lr: 0.002
    lr_update: 2
    grad_clip: 2.0
    embedding: selfalign-concat
eval_global:
  kind: eval
  inputs: {dataset: "${scenes}", model: "${small}"}
  with: {dataset: "${inputs.dataset}", model: "${inputs.model}"}
eval_concat:
  kind: eval
  inputs: {dataset: "${scenes}", model: "${small}"}
  with: {dataset: "${inputs.dataset}", model: "${inputs.model}", embedding: selfalign-concat}
export:
  kind: export
  inputs: {dataset: "${scenes}", model: "${small}", global: "${eval_global}", concat: "${eval_concat}"}
  with:
    dataset: ${inputs.dataset}
    runs:
      - {name: global, model: "${inputs.model}", eval: "${inputs.global}"}
      - {name: concat, model: "${inputs.model}", eval: "${inputs.concat}"}
"#,
    );
    p
}

#[test]
fn scenes_small_trains_with_selfalign_and_cusa_resumes_and_evaluates_both_embeddings() {
    let p = small_project();
    let r = p.run(&["run", "-j", "1", "softlabels"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Killed after the first epoch (prototypes frozen in it): the rerun resumes in epoch 2.
    let _ = kill_after_epochs(&p, "small", 1);
    let r = p.run(&["run", "-j", "1", "export"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let log = p.latest_log("small");
    assert!(log.contains("resuming after epoch"), "{log}");
    assert!(
        log.contains("locals: 64 regions (convolution 2 of 2, 8×8×32) and the word states, projected to 32; 16 prototypes (LCA) and guide heads (CRA)"),
        "{log}"
    );
    assert!(
        log.contains("objective: base + csa + usa + lca + cra; validation with the selfalign-concat embedding"),
        "{log}"
    );
    let resumed = sha256_hex(&std::fs::read(p.output("small").join("model.mpk")).unwrap());

    // Every term logged by name, every epoch; the step schedule: ×0.1 after 2 epochs.
    let lines = epochs(&p, "small");
    assert_eq!(lines.len(), 3);
    for e in &lines {
        for k in ["loss_base", "loss_csa", "loss_usa", "loss_lca", "loss_cra"] {
            let v = e[k].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v > 0.0, "{k}: {e}");
        }
        let sum: f64 = ["loss_base", "loss_csa", "loss_usa", "loss_lca", "loss_cra"]
            .iter()
            .map(|k| e[k].as_f64().unwrap())
            .sum();
        let total = e["loss"].as_f64().unwrap();
        assert!(
            (sum - total).abs() < 1e-4 * total,
            "the total is the sum of the terms: {e}"
        );
    }
    let lr: Vec<f64> = lines.iter().map(|e| e["lr"].as_f64().unwrap()).collect();
    assert_eq!(lr[..2], [0.002, 0.002]);
    assert!((lr[2] - 0.0002).abs() < 1e-12, "{lr:?}");
    let config = json(p.output("small").join("config.json"));
    assert_eq!(
        config["terms"],
        serde_json::json!(["base", "csa", "usa", "lca", "cra"])
    );
    assert_eq!(
        config["student"]["selfalign"],
        serde_json::json!({"dim": 32, "prototypes": 16, "guides": true})
    );
    assert_eq!(config["embedding"], "selfalign-concat");
    assert_eq!(config["lr_update"], 2);
    assert_eq!(config["lr_min"], serde_json::Value::Null);
    let metrics = json(p.output("small").join("metrics.json"));
    assert!(metrics["loss_lca"].as_f64().is_some(), "{metrics}");

    // Both embeddings measured: the concatenation is three times as wide.
    let global = json(p.output("eval_global").join("metrics.json"));
    let concat = json(p.output("eval_concat").join("metrics.json"));
    assert_eq!(
        global["embedding"],
        serde_json::json!({"kind": "global", "dim": 32})
    );
    assert_eq!(
        concat["embedding"],
        serde_json::json!({"kind": "selfalign-concat", "dim": 96})
    );
    // Different vectors were measured (not the same ones relabelled).
    let bytes =
        |stage: &str| std::fs::read(p.output(stage).join("caption_embeddings.arrow")).unwrap();
    assert_ne!(bytes("eval_global"), bytes("eval_concat"));
    let eval_log = p.latest_log("eval_concat");
    assert!(
        eval_log.contains("retrieval: selfalign-concat embedding, 96 wide,")
            && eval_log.contains("ms per query (60 queries, both directions)"),
        "{eval_log}"
    );
    let r = p.run(&["status", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(p.output("export").join("report.html").exists());

    // Same bytes as an uninterrupted run.
    let r = p.run(&["run", "-j", "1", "small", "--force", "small"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let again = sha256_hex(&std::fs::read(p.output("small").join("model.mpk")).unwrap());
    assert_eq!(resumed, again, "resumed and uninterrupted runs agree");

    // The global embedding of a student without guides cannot be concatenated: a clear error.
    p.add_stages(
        r#"
plain:
  kind: train
  inputs: {dataset: "${scenes}"}
  with:
    dataset: ${inputs.dataset}
    student: {kind: scenes-small, image_size: 32, channels: [16, 32], width: 32, heads: 2, layers: 1, dim: 32}
    loss: {lca: {prototypes: 16}}
    batch_size: 16
    epochs: 1
eval_plain:
  kind: eval
  inputs: {dataset: "${scenes}", model: "${plain}"}
  with: {dataset: "${inputs.dataset}", model: "${inputs.model}", embedding: selfalign-concat}
"#,
    );
    let r = p.run(&["run", "-j", "1", "eval_plain"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("`embedding: selfalign-concat` needs a student trained with `loss.cra`"),
        "{}",
        r.stderr
    );
    let log = p.latest_log("plain");
    assert!(log.contains("16 prototypes (LCA)"), "{log}");
    assert!(log.contains("objective: base + lca"), "{log}");
}

#[test]
fn selfalign_mistakes_are_located_and_nothing_trains() {
    let p = small_project();
    let cases = [
        // SelfAlign on a student without locals.
        (
            "train.with.loss.lca={prototypes: 8}",
            "it needs a student with local features (`scenes-small` or `clip`)",
        ),
        // More hardest negatives than a batch has regions of other images.
        (
            "small.with.loss.cra.hardest=100000",
            "is 100000 but a batch of 16 has only 960 regions of other images to choose negatives from (64 per image, 8×8)",
        ),
        ("small.with.loss.lca.prototypes=0", "must be at least 1"),
        (
            "small.with.lr_update=0",
            "must be at least 1 (epochs between the ×0.1 steps of the learning rate)",
        ),
        // Removing CRA leaves `embedding: selfalign-concat` in the file without its guides.
        (
            "small.with.loss.cra=null",
            "`selfalign-concat` concatenates the CRA guides: it needs `loss.cra`",
        ),
    ];
    for (set, message) in cases {
        let r = p.run(&["run", "--set", set]);
        assert_eq!(r.code, 2, "{set}: {}", r.stderr);
        assert!(r.stderr.contains(message), "{set}: {}", r.stderr);
        let at = if set.ends_with("cra=null") {
            "--> pipeline.yaml:".to_string()
        } else {
            format!("--> --set {set}")
        };
        assert!(r.stderr.contains(&at), "{set}: located: {}", r.stderr);
    }
    // Written in the file: the error points at the key's line and column.
    p.add_stages(
        r#"
stepped:
  kind: train
  inputs: {dataset: "${scenes}"}
  with:
    dataset: ${inputs.dataset}
    student: {kind: scenes-small, image_size: 32, channels: [16, 32], width: 32, heads: 2, layers: 1, dim: 32}
    loss: {lca: {prototypes: 0}}
"#,
    );
    let r = p.run(&["run", "stepped"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let yaml = std::fs::read_to_string(p.path().join("pipeline.yaml")).unwrap();
    let (line, text) = yaml
        .lines()
        .enumerate()
        .find(|(_, l)| l.trim() == "prototypes: 0")
        .expect("the bad key in the file");
    let column = text.find('0').unwrap() + 1;
    assert!(
        r.stderr.contains("must be at least 1 (stage `stepped`)")
            && r.stderr
                .contains(&format!("--> pipeline.yaml:{}:{column}", line + 1)),
        "{}",
        r.stderr
    );
    assert!(
        !p.path().join("cache/scratch-v1/train").exists(),
        "nothing trained"
    );
}

#[test]
fn clip_trains_with_selfalign_and_cusa_and_evaluates_the_concatenation() {
    let p = crate::clip::project();
    p.add_stages(
        r#"
clip_all:
  kind: train
  inputs: {dataset: "${scenes}", softlabels: "${softlabels}", weights: clip-tiny}
  with:
    dataset: ${inputs.dataset}
    softlabels: ${inputs.softlabels}
    student: {kind: clip, weights: "${inputs.weights}"}
    loss: {csa: {alpha: 0.1}, usa: {beta: 0.5}, lca: {prototypes: 32}, cra: {hardest: 128}}
    preset: selfalign-reference
    epochs: 2
    batch_size: 16
    lr_update: 1
    lr: 0.0001
clip_concat:
  kind: eval
  inputs: {dataset: "${scenes}", model: "${clip_all}"}
  with: {dataset: "${inputs.dataset}", model: "${inputs.model}", embedding: selfalign-concat}
clip_export:
  kind: export
  inputs: {dataset: "${scenes}", model: "${clip_all}", eval: "${clip_concat}"}
  with:
    dataset: ${inputs.dataset}
    runs: [{name: selfalign, model: "${inputs.model}", eval: "${inputs.eval}"}]
"#,
    );
    let r = p.run(&["run", "-j", "1", "clip_export"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let log = p.latest_log("clip_all");
    assert!(
        log.contains("locals: the last layer's 16 patch tokens and the token states, through CLIP's final norms and projections (48 wide); 32 prototypes (LCA) and guide heads (CRA)"),
        "{log}"
    );
    // The preset's recipe: VSE++, no weight decay, clipping, the step schedule.
    let config = json(p.output("clip_all").join("config.json"));
    assert_eq!(
        (
            config["base_loss"].as_str(),
            config["weight_decay"].as_f64(),
            config["grad_clip"].as_f64(),
            config["decay_temperatures"].as_bool()
        ),
        (Some("vse"), Some(0.0), Some(2.0), Some(false))
    );
    for e in epochs(&p, "clip_all") {
        for k in ["loss_base", "loss_csa", "loss_usa", "loss_lca", "loss_cra"] {
            assert!(e[k].as_f64().unwrap_or(f64::NAN).is_finite(), "{k}: {e}");
        }
    }
    let concat = json(p.output("clip_concat").join("metrics.json"));
    assert_eq!(concat["embedding"]["dim"], 144, "{concat}");
    // The guides travel with the exported heads.
    let heads = std::fs::read(p.output("clip_export").join("model/heads.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&heads).unwrap();
    let mut names: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| n.starts_with("selfalign."))
        .map(str::to_string)
        .collect();
    names.sort();
    assert!(
        names.contains(&"selfalign.prototypes".to_string())
            && names.contains(&"selfalign.image_guide.running_var".to_string()),
        "{names:?}"
    );
    assert_eq!(st.tensor("selfalign.prototypes").unwrap().shape(), [32, 48]);
}
