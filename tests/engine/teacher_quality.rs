//! The teacher-quality study (`examples/teacher-quality.yaml`) end to end at a tiny size: one
//! controlled level, one seed, two epochs, the real teachers beside it. The controlled teachers
//! hit their target AUC on batches they were not calibrated on, the soft labels built from
//! them measure the same signal, the sharp and matched runs train at their τ_s, the CSA-only
//! and USA-only runs with and without the uni heads, the reverse-KL run with KL(Q‖P), and the
//! export's report plots each run's difference to the baseline against the teachers' AUC.

use std::path::Path;

use serde_yaml_ng::Value;

use crate::support::Project;

fn json(path: std::path::PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The example pipeline, shrunk: a small dataset and student, one level (`auc62`), seed 0.
fn tiny_study() -> Project {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("examples/teacher-quality.yaml")).unwrap();
    let mut doc: Value = serde_yaml_ng::from_str(&text).unwrap();
    let yaml = |s: &str| -> Value { serde_yaml_ng::from_str(s).unwrap() };
    doc["params"]["seeds"] = yaml("[0]");
    doc["params"]["epochs"] = yaml("2");
    let stages = &mut doc["stages"];
    stages["scenes"]["with"]["scenes"] = yaml("{seed: 3, train: 80, val: 20, test: 20, size: 48}");
    for s in ["image_controlled", "text_controlled"] {
        assert!(stages[s]["matrix"]["teacher"].is_mapping(), "{s}");
        stages[s]["matrix"]["teacher"] = yaml("{auc62: 0.62}");
    }
    for s in [
        "softlabels_controlled",
        "cusa",
        "eval_cusa",
        "cusa_sharp",
        "eval_cusa_sharp",
    ] {
        assert!(stages[s]["matrix"]["teacher"].is_sequence(), "{s}");
        stages[s]["matrix"]["teacher"] = yaml("[auc62]");
    }
    // The matched runs: each teacher's own τ_s (the value), 0.62 at 0.25.
    assert!(stages["cusa_matched"]["matrix"]["teacher"].is_mapping());
    stages["cusa_matched"]["matrix"]["teacher"] = yaml("{auc62: 0.25}");
    stages["eval_cusa_matched"]["matrix"]["teacher"] = yaml("[auc62]");
    for s in [
        "base",
        "cusa_real",
        "cusa",
        "cusa_sharp",
        "cusa_real_sharp",
        "cusa_matched",
        "csa_real_sharp",
        "usa_real_sharp",
        "csa_reverse_real_sharp",
    ] {
        let with = &mut stages[s]["with"];
        with["student"] = yaml(
            "{kind: scenes-small, image_size: 32, channels: [16, 32], width: 32, heads: 2, layers: 1, dim: 32}",
        );
        with["batch_size"] = yaml("32");
        with["warmup"] = yaml("2");
    }
    let p = Project::new();
    p.write("pipeline.yaml", &serde_yaml_ng::to_string(&doc).unwrap());
    p
}

#[test]
fn the_teacher_quality_study_runs_end_to_end_at_a_tiny_size() {
    let p = tiny_study();
    let r = p.run(&["run", "--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, r.stdout);
    let outcomes = Project::outcomes(&r.stdout);
    for stage in [
        "image_controlled@teacher=auc62",
        "text_controlled@teacher=auc62",
        "softlabels_controlled@teacher=auc62",
        "base@seed=0",
        "cusa_real@seed=0",
        "cusa@teacher=auc62,seed=0",
        "eval_cusa@teacher=auc62,seed=0",
        "cusa_sharp@teacher=auc62,seed=0",
        "cusa_real_sharp@seed=0",
        "cusa_matched@teacher=auc62,seed=0",
        "eval_cusa_matched@teacher=auc62,seed=0",
        "csa_real_sharp@seed=0",
        "eval_csa_real_sharp@seed=0",
        "usa_real_sharp@seed=0",
        "eval_usa_real_sharp@seed=0",
        "csa_reverse_real_sharp@seed=0",
        "eval_csa_reverse_real_sharp@seed=0",
        "report",
    ] {
        assert!(
            outcomes.iter().any(|(n, o)| n == stage && o == "ran"),
            "{stage}: {outcomes:?}"
        );
    }

    // The controlled teachers hit 0.62 on held-out batches; the soft labels built from them
    // measure the same AUC (their own batches) in the direction each teacher feeds.
    let soft = json(
        p.output("softlabels_controlled@teacher=auc62")
            .join("report.json"),
    );
    for (stage, direction) in [
        ("image_controlled@teacher=auc62", "i2t"),
        ("text_controlled@teacher=auc62", "t2i"),
    ] {
        let report = json(p.output(stage).join("report.json"));
        assert_eq!(report["direction"], direction);
        let heldout = report["heldout_auc"].as_f64().unwrap();
        assert!((heldout - 0.62).abs() < 0.03, "{stage}: held out {heldout}");
        let content = report["calibration"]["content_alone_auc"].as_f64().unwrap();
        assert!(content > 0.62, "{stage}: content alone {content}");
        let measured = soft["teacher_signal"][direction]["auc"].as_f64().unwrap();
        assert!(
            (measured - 0.62).abs() < 0.03,
            "{stage}: the soft labels measure {measured}"
        );
        let (ids, rows, meta) =
            crate::support::read_features(&p.output(stage).join("features.arrow"));
        let expected = if direction == "i2t" { 120 } else { 600 };
        assert_eq!(ids.len(), expected, "{stage}: every split's items");
        assert_eq!(rows[0].len(), 512 + 256);
        assert_eq!(meta["teacher"], "controlled");
    }

    // The sharp runs train at their own τ_s; the others at CUSA's.
    assert!(
        p.latest_log("cusa_sharp@teacher=auc62,seed=0")
            .contains("objective: base + csa + usa (soft labels at τ_s 0.1)")
    );
    assert!(
        p.latest_log("cusa@teacher=auc62,seed=0")
            .contains("objective: base + csa + usa\n")
    );
    // The matched runs at their teacher's own τ_s (the matrix value).
    assert!(
        p.latest_log("cusa_matched@teacher=auc62,seed=0")
            .contains("objective: base + csa + usa (soft labels at τ_s 0.25)")
    );
    // CSA alone: no USA, so no uni heads.
    let csa = p.latest_log("csa_real_sharp@seed=0");
    assert!(
        csa.contains("objective: base + csa (soft labels at τ_s 0.1)")
            && !csa.contains("uni heads"),
        "{csa}"
    );
    assert!(
        p.latest_log("cusa_real_sharp@seed=0")
            .contains(", uni heads\n")
    );
    // USA alone: the uni heads, no cross-modal soft labels.
    let usa = p.latest_log("usa_real_sharp@seed=0");
    assert!(
        usa.contains("objective: base + usa (soft labels at τ_s 0.1)")
            && usa.contains(", uni heads\n"),
        "{usa}"
    );
    // The reverse KL, said in the log (the forward runs say nothing).
    assert!(
        p.latest_log("csa_reverse_real_sharp@seed=0")
            .contains("objective: base + csa (soft labels at τ_s 0.1) (reverse KL: KL(Q‖P))")
    );
    assert!(!csa.contains("reverse"));

    // The export pairs each CUSA run with its teachers' signal and plots the differences.
    let export = json(p.output("report").join("export.json"));
    let points = export["against_teacher_signal"].as_array().unwrap();
    let names: Vec<&str> = points.iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "real",
            "auc62",
            "real-sharp",
            "auc62-sharp",
            "real-sharp-usa",
            "real-sharp-csa-reverse",
            "real-sharp-csa",
            "auc62-matched"
        ]
    );
    for x in points {
        let d = &x["delta"]["RSUM"];
        assert_eq!(d["n"], 1, "{x}");
        assert!(d["mean"].as_f64().unwrap().is_finite(), "{x}");
        let mean = x["mean_auc"].as_f64().unwrap();
        let (i, t) = (
            x["i2t_auc"].as_f64().unwrap(),
            x["t2i_auc"].as_f64().unwrap(),
        );
        assert!((mean - 0.5 * (i + t)).abs() < 1e-12);
    }
    let base = &export["runs"][0];
    assert_eq!(base["name"], "base");
    assert!(
        base["teacher_signal"].is_null(),
        "the base run read no soft labels"
    );
    let html = std::fs::read_to_string(p.output("report").join("report.html")).unwrap();
    assert!(
        html.contains("<h2>Teacher signal</h2>"),
        "no signal section"
    );
    assert!(html.contains("Δ RSUM vs base, by teacher AUC"), "no chart");
}

#[test]
fn controlled_teachers_refuse_data_without_exact_content() {
    let p = Project::new();
    p.write("caps.csv", "image,caption\na.png,a red circle\n");
    p.write(
        "pipeline.yaml",
        r#"version: 1
stages:
  data:
    kind: dataset
    inputs: {t: caps.csv}
    with: {format: table, annotations: "${inputs.t}", columns: {image: image, caption: caption}}
  teacher:
    kind: controlled-teacher
    with: {dataset: "${data}", modality: text, target_auc: 0.7}
"#,
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(
        all.contains(
            "is not a scenes dataset: controlled teachers are built from each item's exact content"
        ),
        "{all}"
    );
    assert!(all.contains("format: scenes"), "{all}");
}
