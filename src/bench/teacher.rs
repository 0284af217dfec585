//! `cusa-pipe bench teacher`: the quickstart's teachers against Python on the same model,
//! threads and inputs (`scripts/bench/teacher_python.py`), and our decode + preprocess path
//! against PIL + numpy.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use rayon::prelude::*;

use super::{cores, run_quiet};

/// The stages of the root pipeline that the benchmark needs.
const STAGES: [&str; 6] = [
    "scenes",
    "onnxruntime",
    "minilm",
    "minilm_tokenizer",
    "image_model",
    "text_teacher",
];

pub fn teacher(root: &Path, python: &Path) -> anyhow::Result<i32> {
    let dir = root.join("teacher");
    std::fs::create_dir_all(&dir)?;
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipeline.yaml");
    std::fs::copy(&quickstart, dir.join("pipeline.yaml"))?;
    std::fs::create_dir_all(dir.join("scripts"))?;
    for s in ["dataset_summary.py", "positive_stats.py", "summarize.py"] {
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("scripts")
                .join(s),
            dir.join("scripts").join(s),
        )?;
    }
    let exe = std::env::current_exe()?;
    let mut args = vec!["run", "-j", "1", "pipeline.yaml"];
    args.extend(STAGES);
    run_quiet(Command::new(&exe).current_dir(&dir).args(&args))?;
    let path = |stage: &str| -> anyhow::Result<String> {
        let out = Command::new(&exe)
            .current_dir(&dir)
            .args(["path", stage])
            .output()?;
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    };
    let dataset = path("scenes")?;
    // (whole stage, inference loop) seconds: the loop's time is in the run record's metrics.
    let seconds = |stage: &str, set: &[&str]| -> anyhow::Result<(f64, f64)> {
        // `--force` takes several values: it goes after the positional arguments.
        let mut a = vec![
            "run",
            "-j",
            "1",
            "--json",
            "pipeline.yaml",
            stage,
            "--force",
            stage,
        ];
        a.extend_from_slice(set);
        let out = Command::new(&exe).current_dir(&dir).args(&a).output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("run --json")?;
        let s = v["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == stage)
            .context("no such stage")?;
        let fp = s["fingerprint"].as_str().context("no fingerprint")?;
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(
            dir.join("cache/runs-v1")
                .join(&fp[..2])
                .join(format!("{fp}.json")),
        )?)?;
        Ok((
            s["seconds"].as_f64().context("no timing")?,
            record["metrics"]["embed_seconds"]
                .as_f64()
                .context("no embed_seconds")?,
        ))
    };
    let captions = 7500.0;
    let text_s = seconds("text_teacher", &[])?;
    // The image teacher on the 300 pictures of the test split.
    let image_s = seconds("image_teacher", &["--set", "image_teacher.with.split=test"])?;

    // Decode + preprocess alone, in parallel, on the same PNGs.
    let pngs: Vec<std::path::PathBuf> = (0..300)
        .map(|i| Path::new(&dataset).join(format!("images/test/test-{i:05}.png")))
        .collect();
    let preset =
        cusa_stages::teacher::preprocess::Preprocess::preset("dinov2").context("preset")?;
    let t = Instant::now();
    for _ in 0..5 {
        pngs.par_iter().try_for_each(|p| -> anyhow::Result<()> {
            let img = cusa_stages::teacher::preprocess::decode(p).map_err(anyhow::Error::msg)?;
            let mut out = Vec::with_capacity(3 * 224 * 224);
            preset.tensor(&preset.pixels(&img), &mut out);
            Ok(())
        })?;
    }
    let prep_rate = 5.0 * pngs.len() as f64 / t.elapsed().as_secs_f64();

    println!(
        "data: the quickstart's scenes (7,500 captions; 300 test images, 96 px → 224), {} cores, 2 inference threads each side",
        cores()
    );
    let ok = Command::new(python)
        .args([
            "-c",
            "import onnxruntime, onnx, tokenizers, PIL, pyarrow, numpy",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!(
            "  {} lacks onnxruntime/onnx/tokenizers/pillow/pyarrow/numpy: pass --python",
            python.display()
        );
        bail!("no Python peer");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench/teacher_python.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(&dataset)
        .arg(format!("{}/model.onnx", path("minilm")?))
        .arg(format!("{}/tokenizer.json", path("minilm_tokenizer")?))
        .arg(format!("{}/vit_s_focus.onnx", path("image_model")?))
        .arg("300")
        .output()?;
    if !out.status.success() {
        bail!(
            "the Python peer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let peer: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let (pt, pi, pp) = (
        peer["texts_per_s"].as_f64().unwrap_or(0.0),
        peer["images_per_s"].as_f64().unwrap_or(0.0),
        peer["preprocess_per_s"].as_f64().unwrap_or(0.0),
    );
    let (text_stage, text_loop) = (captions / text_s.0, captions / text_s.1);
    let (image_stage, image_loop) = (300.0 / image_s.0, 300.0 / image_s.1);
    println!("  text teacher (MiniLM int8, tokenise + infer + pool)");
    println!(
        "    cusa-pipe {text_loop:>7.1} texts/s (whole stage with setup, hashing, commit: {text_stage:.1})   Python {pt:>7.1} texts/s   {:.2}×  (goal ≥ 1.0×)",
        text_loop / pt
    );
    println!("  image teacher (ViT-S, decode + preprocess + infer + pool)");
    println!(
        "    cusa-pipe {image_loop:>7.1} images/s (whole stage: {image_stage:.1})   Python {pi:>7.1} images/s   {:.2}×  (goal ≥ 1.2×)",
        image_loop / pi
    );
    println!("  decode + preprocess only (PNG 96 px → resize 256 → crop 224 → normalise)");
    println!(
        "    cusa-pipe {prep_rate:>7.1} images/s (all cores)   PIL + numpy {pp:>7.1} images/s   {:.2}×  (goal ≥ 4×)",
        prep_rate / pp
    );
    Ok(0)
}
