//! `export` end to end: the chosen weights as safetensors a PyTorch user can load, the
//! galleries as Arrow and Parquet, and a report that opens offline.

use crate::eval::EVAL;
use crate::train::project;

const EXPORT: &str = r#"
export:
  kind: export
  inputs: {dataset: "${scenes}", model: "${train}", eval: "${eval}", again: "${again}"}
  with:
    dataset: ${inputs.dataset}
    title: "A <small> ablation"
    baseline: twice
    examples: 2
    runs:
      - {name: once, model: "${inputs.model}", eval: "${inputs.eval}"}
      - {name: twice, model: "${inputs.model}", eval: "${inputs.again}"}
"#;

#[test]
fn export_writes_safetensors_galleries_and_a_self_contained_report() {
    let p = project("    epochs: 2\n");
    p.add_stages(EVAL);
    p.add_stages(EXPORT);
    let r = p.run(&["run", "-j", "1", "export"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = p.output("export");
    // Same validation RSUM: the first run is chosen; the choice is recorded.
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("export.json")).unwrap()).unwrap();
    assert_eq!(doc["chosen"], "once");
    assert_eq!(doc["chosen_on"], "validation RSUM");
    assert_eq!(doc["baseline"], "twice");
    assert!(r.stderr.contains("exported `once`"), "{}", r.stderr);

    // Safetensors in PyTorch's layout, with the training config in the metadata.
    let bytes = std::fs::read(out.join("model/model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(meta.metadata().as_ref().unwrap().get("config").unwrap()).unwrap();
    let trained: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model/config.json")).unwrap()).unwrap();
    assert_eq!(config, trained);
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shape = |name: &str| {
        tensors
            .tensor(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .shape()
            .to_vec()
    };
    let student = &trained["student"];
    let (hidden, dim) = (
        student["hidden"].as_u64().unwrap() as usize,
        student["dim"].as_u64().unwrap() as usize,
    );
    let image_dim = student["image_dim"].as_u64().unwrap() as usize;
    // Linear weights are [out, in]; LayerNorm parameters are weight/bias.
    assert_eq!(shape("image_backbone.fc1.weight"), [hidden, image_dim]);
    assert_eq!(shape("image_heads.cross.linear.weight"), [dim, dim]);
    assert_eq!(shape("text_heads.cross.norm.weight"), [dim]);
    assert_eq!(
        tensors
            .tensor("text_heads.cross.norm.weight")
            .unwrap()
            .dtype(),
        safetensors::Dtype::F32
    );

    // Galleries: the eval's Arrow files, and the same rows as Parquet.
    for g in ["image_embeddings", "caption_embeddings"] {
        let arrow = std::fs::read(out.join(format!("galleries/{g}.arrow"))).unwrap();
        let reader =
            arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(arrow), None).unwrap();
        let arrow_rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
        let file = std::fs::File::open(out.join(format!("galleries/{g}.parquet"))).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let parquet_rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(
            (arrow_rows, parquet_rows),
            if g == "image_embeddings" {
                (10, 10)
            } else {
                (50, 50)
            }
        );
    }

    // The report: both runs, curves, thumbnails inline, nothing fetched from anywhere.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("<h1>A &lt;small&gt; ablation</h1>"),
        "the title is escaped"
    );
    assert!(html.contains("<td>once ★</td>") && html.contains("<td>twice</td>"));
    assert_eq!(html.matches("<svg").count(), 4, "four charts");
    assert!(html.contains("Validation RSUM"));
    assert_eq!(html.matches("class=\"query\"").count(), 2);
    assert!(html.contains("src=\"data:image/png;base64,"));
    let fetches = regex::Regex::new(
        r#"(?i)(src|href)\s*=\s*"(https?:|//)|<script|@import|url\(\s*['"]?https?:"#,
    )
    .unwrap();
    assert!(!fetches.is_match(&html), "{:?}", fetches.find(&html));
}

#[test]
fn export_mistakes_name_the_key() {
    let p = project("    epochs: 1\n");
    p.add_stages(EVAL);
    p.add_stages(EXPORT);
    let r = p.run(&["run", "export", "--set", "export.with.baseline=thrice"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("no run is named `thrice` (runs: once, twice)"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("baseline"), "{}", r.stderr);
    let yaml = p.read("pipeline.yaml").replace("name: twice", "name: once");
    p.write("pipeline.yaml", &yaml);
    let r = p.run(&["run", "export"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    // Pointed at the second run's name in the file.
    assert!(r.stderr.contains("|       - name: once\n"), "{}", r.stderr);
    assert!(r.stderr.contains("`once` names two runs"), "{}", r.stderr);
}
