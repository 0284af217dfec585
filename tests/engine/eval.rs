//! `eval` end to end: a trained student measured on the test split of a small scenes dataset
//! (R@K, folds, the exact extended positives), the same numbers again from the embeddings it
//! wrote, and the mistakes a user makes with it. `EVAL` is added to `train::project` (teachers,
//! soft labels, a short CUSA training).

use arrow_array::{Array, StringArray, UInt32Array};

use crate::support::Project;
use crate::train::project;

pub(crate) const EVAL: &str = r#"
eval:
  kind: eval
  inputs: {dataset: "${scenes}", model: "${train}", image: "${image_teacher/features.arrow}", text: "${text_teacher/features.arrow}"}
  with:
    dataset: ${inputs.dataset}
    model: ${inputs.model}
    image_features: ${inputs.image}
    text_features: ${inputs.text}
    folds: 2
again:
  kind: eval
  inputs: {dataset: "${scenes}", images: "${eval/image_embeddings.arrow}", captions: "${eval/caption_embeddings.arrow}"}
  with:
    dataset: ${inputs.dataset}
    image_embeddings: ${inputs.images}
    text_embeddings: ${inputs.captions}
    folds: 2
"#;

fn metrics(p: &Project, stage: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p.output(stage).join("metrics.json")).unwrap())
        .unwrap()
}

#[test]
fn eval_measures_a_trained_student_on_the_test_split_and_agrees_with_its_own_embeddings() {
    let p = project("    epochs: 4\n");
    p.add_stages(EVAL);
    let r = p.run(&["run", "-j", "1", "again"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = metrics(&p, "eval");
    assert_eq!(m["split"], "test");
    assert_eq!(
        (m["images"].as_u64(), m["captions"].as_u64()),
        (Some(10), Some(50))
    );
    let recall = |d: &str, k: &str| m[d][k].as_f64().unwrap();
    let sum: f64 = ["i2t", "t2i"]
        .iter()
        .flat_map(|d| ["R@1", "R@5", "R@10"].map(|k| recall(d, k)))
        .sum();
    assert!((sum - m["rsum"].as_f64().unwrap()).abs() < 1e-9);
    // 10 test images: R@10 of t2i is 100 % by construction.
    assert_eq!(recall("t2i", "R@10"), 100.0);
    assert_eq!(m["folds"]["folds"], 2);
    // Extended positives of the scenes: every query has at least its own ground truth.
    for d in ["i2t", "t2i"] {
        let e = &m["extended"][d];
        assert_eq!(e["queries"], if d == "i2t" { 10 } else { 50 }, "{m}");
        for k in ["mAP@R", "R-P", "R@1"] {
            let v = e[k].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&v), "{k} = {v}");
        }
    }
    // The embeddings it wrote give the same numbers.
    let again = metrics(&p, "again");
    for k in ["i2t", "t2i", "rsum", "extended", "folds"] {
        assert_eq!(again[k], m[k], "{k}");
    }
    // One rank per query, 1-based.
    let file = std::fs::File::open(p.output("eval").join("ranks.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let (mut rows, mut first_t2i) = (0, 0);
    for batch in reader {
        let batch = batch.unwrap();
        let direction = batch
            .column_by_name("direction")
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .clone();
        let rank = batch
            .column_by_name("rank")
            .unwrap()
            .as_any()
            .downcast_ref::<UInt32Array>()
            .unwrap()
            .clone();
        for i in 0..batch.num_rows() {
            assert!(rank.value(i) >= 1);
            if direction.value(i) == "t2i" && rank.value(i) == 1 {
                first_t2i += 1;
            }
        }
        rows += batch.num_rows();
    }
    assert_eq!(rows, 60);
    assert!((recall("t2i", "R@1") - 100.0 * first_t2i as f64 / 50.0).abs() < 1e-9);
}

#[test]
fn eval_mistakes_name_the_key_or_the_missing_ids() {
    let p = project("    epochs: 1\n");
    p.add_stages(EVAL);
    // Both a model and embeddings: refused before anything runs.
    let r = p.run(&["run", "eval", "--set", "eval.with.image_embeddings=x.arrow"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("give either `model:` or `image_embeddings:` + `text_embeddings:`, not both"),
        "{}",
        r.stderr
    );
    // A feature-heads model without its features.
    let r = p.run(&[
        "run",
        "-j",
        "1",
        "eval",
        "--set",
        "eval.with.image_features=null",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("is a feature-heads student: it reads precomputed features"),
        "{}",
        r.stderr
    );
    // STS needs a student that reads sentences.
    let r = p.run(&["run", "-j", "1", "eval", "--set", "eval.with.sts=sts.tsv"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("is a feature-heads student, it reads precomputed features, not sentences"),
        "{}",
        r.stderr
    );
    let r = p.run(&["run", "again", "--set", "again.with.sts=sts.tsv"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("STS embeds sentences with a student"),
        "{}",
        r.stderr
    );
    // Embeddings of the validation split asked to cover the test split.
    let r = p.run(&["run", "-j", "1", "again", "--set", "eval.with.split=val"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("10 of 10 images of split `test` have no feature in"),
        "{}",
        r.stderr
    );
}

#[test]
fn metrics_tabulates_the_eval_stages_with_deltas_and_every_cached_run() {
    let p = project("    epochs: 1\n");
    p.add_stages(EVAL);
    let r = p.run(&["run", "-j", "1", "again"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The numbers come from a trained model: the layout is the snapshot, the values are
    // checked against metrics.json below.
    let numbers = regex::Regex::new(r"[-+]?\d+\.\d").unwrap();
    let table = p.transcript(&["metrics", "--baseline", "again"]);
    let masked = numbers.replace_all(&table, |c: &regex::Captures| "#".repeat(c[0].len()));
    insta::assert_snapshot!(masked, @r"
    $ cusa-pipe metrics --baseline again
    stage         split  best epoch  i2t R@1  i2t R@5  i2t R@10  t2i R@1  t2i R@5  t2i R@10   rsum  rsum 2-fold  i2t mAP@R  t2i mAP@R  i2t R-P  t2i R-P  i2t teacher AUC  i2t mass %  i2t uniform %  i2t own %  i2t P@10  t2i teacher AUC  t2i mass %  t2i uniform %  t2i own %  t2i P@10
    softlabels    train           -        -        -         -        -        -         -      -            -          -          -        -        -             ####         ###            ###        ###      ####             ####         ###            ###        ###      ####
    train           val           1     ####        -         -      ###        -         -  #####            -          -          -        -        -                -           -              -          -         -                -           -              -          -         -
    eval           test           -     ####     ####      ####      ###     ####     #####  #####        #####       ####       ####     ####     ####                -           -              -          -         -                -           -              -          -         -
      Δ vs again                        ####     ####      ####     ####     ####      ####   ####         ####       ####       ####     ####     ####
    again          test           -     ####     ####      ####      ###     ####     #####  #####        #####       ####       ####     ####     ####                -           -              -          -         -                -           -              -          -         -
    [exit 0]
    ");
    let m = metrics(&p, "eval");
    let r = p.run(&["metrics", "--baseline", "eval", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r["stage"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["softlabels", "train", "eval", "again"]
    );
    // The softlabel stage's teacher signal on the training split, in percent.
    let signal = &rows[0]["results"];
    assert_eq!(signal["split"], "train");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.output("softlabels").join("report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        signal["t2i teacher AUC"].as_f64(),
        Some(100.0 * report["teacher_signal"]["t2i"]["auc"].as_f64().unwrap())
    );
    // The training records what it chose its epoch on (the validation split) too.
    assert_eq!(rows[1]["results"]["split"], "val");
    let rows = &rows[2..];
    let results = &rows[0]["results"];
    assert_eq!(results["split"], "test");
    assert_eq!(results["i2t R@1"], m["i2t"]["R@1"]);
    assert_eq!(results["rsum"], m["rsum"]);
    assert_eq!(results["rsum 2-fold"], m["folds"]["rsum"]);
    assert_eq!(results["t2i mAP@R"], m["extended"]["t2i"]["mAP@R"]);
    // The same embeddings measured twice: every delta is zero.
    for (k, d) in rows[1]["delta"].as_object().unwrap() {
        assert_eq!(d.as_f64(), Some(0.0), "{k}");
    }
    // Another configuration: the table follows the pipeline as it is now, `--all` keeps both.
    let r = p.run(&["run", "-j", "1", "eval", "--set", "eval.with.split=val"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let stale = p.run(&["metrics", "--set", "eval.with.folds=3"]);
    assert!(
        stale
            .stdout
            .lines()
            .any(|l| l.starts_with("eval *") && l.contains(" val ")),
        "{}",
        stale.stdout
    );
    assert!(
        stale
            .stdout
            .contains("* measured with an older configuration"),
        "{}",
        stale.stdout
    );
    let r = p.run(&["metrics", "--all", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let runs: Vec<(String, String, String)> = doc["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap().into(),
                r["state"].as_str().unwrap().into(),
                r["results"]["split"].as_str().unwrap().into(),
            )
        })
        .collect();
    let mut sorted = runs.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            ("again".into(), "current".into(), "test".into()),
            ("eval".into(), "cached".into(), "val".into()),
            ("eval".into(), "current".into(), "test".into()),
            ("softlabels".into(), "current".into(), "train".into()),
            ("train".into(), "current".into(), "val".into()),
        ],
        "{runs:?}"
    );
    // A baseline that does not exist is a usage error with a suggestion.
    let r = p.run(&["metrics", "--baseline", "evl"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("did you mean `eval`?"), "{}", r.stderr);
}

#[test]
fn eval_measures_uni_modal_label_retrieval_when_the_dataset_has_labels() {
    // Six pictures in three classes; the embeddings are chosen so that one bird's nearest
    // neighbour is a dog: label R@1 = 5/6. Captions sit on their own image.
    let p = Project::new();
    let names = [
        "x/1.jpg", "x/2.jpg", "x/3.jpg", "x/4.jpg", "x/5.jpg", "x/6.jpg",
    ];
    crate::dataset::images(&p, &names);
    let labels = ["dog", "dog", "cat", "cat", "bird", "bird"];
    let mut csv = String::from("filepath,sentence,split,label\n");
    for (n, l) in names.iter().zip(labels) {
        csv.push_str(&format!("{n},a {l},test,{l}\n"));
    }
    p.write("list.csv", &csv);
    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  d:\n    kind: dataset\n    inputs: {t: list.csv, images: images}\n    with: {format: table, annotations: \"${inputs.t}\", images: \"${inputs.images}\", columns: {image: filepath, caption: sentence, split: split, label: label}}\n",
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = p.output("d");
    let image_ids = crate::dataset::column(&out.join("images.parquet"), "image_id");
    let image_paths = crate::dataset::column(&out.join("images.parquet"), "path");
    let caption_ids = crate::dataset::column(&out.join("captions.parquet"), "caption_id");
    let caption_images = crate::dataset::column(&out.join("captions.parquet"), "image_id");
    let vector = |path: &str| -> [f32; 3] {
        match path.rsplit('/').next().unwrap() {
            "1.jpg" => [1.0, 0.0, 0.0],
            "2.jpg" => [0.9, 0.1, 0.0],
            "3.jpg" => [0.0, 1.0, 0.0],
            "4.jpg" => [0.1, 0.9, 0.0],
            "5.jpg" => [0.0, 0.1, 1.0],
            _ => [0.97, 0.0, 0.2], // a bird closest to the first dog
        }
    };
    let path_of: std::collections::HashMap<&str, &str> = image_ids
        .iter()
        .map(String::as_str)
        .zip(image_paths.iter().map(String::as_str))
        .collect();
    let write = |file: &str, ids: &[String], of: &dyn Fn(usize) -> [f32; 3]| {
        let data: Vec<f32> = (0..ids.len()).flat_map(of).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        cusa_stages::features::write(
            &p.path().join(file),
            &ids,
            vec![],
            &data,
            3,
            cusa_stages::teacher::Precision::F32,
            Default::default(),
        )
        .unwrap();
    };
    write("images.arrow", &image_ids, &|i| {
        vector(path_of[image_ids[i].as_str()])
    });
    write("captions.arrow", &caption_ids, &|c| {
        vector(path_of[caption_images[c].as_str()])
    });
    p.add_stages(
        "  e:\n    kind: eval\n    inputs: {dataset: \"${d}\", i: images.arrow, t: captions.arrow}\n    with: {dataset: \"${inputs.dataset}\", image_embeddings: \"${inputs.i}\", text_embeddings: \"${inputs.t}\"}\n",
    );
    let r = p.run(&["run", "e"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = metrics(&p, "e");
    let uni = &m["uni"]["image"];
    assert!(
        (uni["label R@1"].as_f64().unwrap() - 500.0 / 6.0).abs() < 1e-9,
        "{m}"
    );
    assert_eq!(
        (uni["queries"].as_u64(), uni["classes"].as_u64()),
        (Some(6), Some(3))
    );
    // Precomputed embeddings have no uni head: the embeddings given are measured.
    assert_eq!(uni["head"], "cross");
    let r = p.run(&["metrics", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        doc["rows"][0]["results"]["image label R@1"],
        uni["label R@1"]
    );
}
