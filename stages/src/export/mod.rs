//! `export`: the model worth shipping out of a comparison, in formats other tools read, and a
//! report people open.
//!
//! The stage takes the compared runs (each a `train` output and the `eval` output that measured
//! it), chooses the one with the best **validation** RSUM (what its training chose its epoch
//! on; the test split only reports), and writes:
//!
//! | path                              | what                                                   |
//! |-----------------------------------|--------------------------------------------------------|
//! | `model/model.safetensors`         | the chosen weights, PyTorch layout (Linear `[out, in]`, LayerNorm `weight`/`bias`), names = module paths, the training config in the metadata |
//! | `model/config.json`               | the training config (architecture, losses, best epoch) |
//! | `model/vocab.json`                | the word vocabulary, for students that read words      |
//! | `model/` for a `clip` student     | the Hugging Face layout instead: `model.safetensors` (transformers' CLIPModel names), `config.json` (CLIPConfig), `merges.txt` + `vocab.json` (CLIPTokenizer), `heads.safetensors` (the method's heads), `training.json` (the training config) |
//! | `model/metrics.json`, `log.jsonl` | its validation record and per-epoch log                |
//! | `galleries/{image,caption}_embeddings.{arrow,parquet}` | the test embeddings of the chosen model |
//! | `report.html`                     | one self-contained page (no network): choice, metrics with deltas, curves, example retrievals |
//! | `export.json`                     | which run was chosen and every run's validation and test RSUM |
//!
//! Invariants: the choice never reads test numbers; every run must have a readable training
//! record and evaluation, or the stage fails naming it; the report embeds everything it shows
//! (SVG inline, thumbnails as data URLs), so it opens offline and can be mailed.

mod report;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{Checked, ConfigError, Kind, StageContext, StageError, StageSummary};
use crate::seeds;
use crate::train::load::TrainedStudent;

/// One compared run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// A label for tables and plots (`base`, `cusa`).
    pub name: String,
    /// A `train` stage's output folder.
    pub model: String,
    /// The `eval` stage's output folder that measured it.
    pub eval: String,
    /// The seed of this run, when the runs repeat each `name` over seeds: the report then
    /// adds mean ± sd per name and paired deltas to the baseline, seed by seed (`seeds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<Value>,
    /// The `softlabel` stage's output the run was trained with (CUSA runs): the report then
    /// shows its teachers' false-negative signal and, when the runs span several, plots each
    /// name's difference to the baseline against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softlabels: Option<String>,
}

impl RunConfig {
    /// The seed's label (`1`), if any.
    fn seed_label(&self) -> Option<String> {
        self.seed.as_ref().map(|s| match s {
            Value::String(t) => t.clone(),
            other => other.to_string(),
        })
    }

    /// `cusa` or `cusa seed=1`: the run's row label.
    fn label(&self) -> String {
        match self.seed_label() {
            Some(s) => format!("{} seed={s}", self.name),
            None => self.name.clone(),
        }
    }
}

/// `with:` of an export stage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// The `dataset` stage's output the runs were trained and measured on (captions, pictures
    /// and extended positives of the example retrievals).
    pub dataset: String,
    /// Where the dataset's image paths are relative to, when it was imported with `images:`.
    pub images: Option<String>,
    /// The compared runs, in table order.
    pub runs: Vec<RunConfig>,
    /// The run every other is compared with [default: the first].
    pub baseline: Option<String>,
    /// Caption queries shown with their top-5 images in the report [default: 4; 0: none].
    #[serde(default = "default_examples")]
    pub examples: usize,
    /// A title for the report [default: the stage's name].
    pub title: Option<String>,
}

fn default_examples() -> usize {
    4
}

impl ExportConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.runs.is_empty() {
            return Err(ConfigError::new(
                "runs",
                "give at least one run: `- {name: …, model: <train output>, eval: <eval output>}`",
            ));
        }
        for (i, r) in self.runs.iter().enumerate() {
            if let Some(s) = &r.seed
                && !(s.is_string() || s.is_number())
            {
                return Err(ConfigError::new(
                    format!("runs[{i}].seed"),
                    "a seed is a number or a label",
                ));
            }
            if self.runs[..i].iter().any(|o| o.label() == r.label()) {
                return Err(ConfigError::new(
                    format!("runs[{i}].name"),
                    format!(
                        "`{}` names two runs: a name (with its seed) labels one table row",
                        r.label()
                    ),
                ));
            }
        }
        if self.runs.iter().any(|r| r.seed.is_some()) && self.runs.iter().any(|r| r.seed.is_none())
        {
            return Err(ConfigError::new(
                "runs",
                "give every run a `seed:`, or none (the seed table pairs runs seed by seed)",
            ));
        }
        if let Some(b) = &self.baseline
            && !self.runs.iter().any(|r| &r.name == b)
        {
            let names: Vec<&str> = self.runs.iter().map(|r| r.name.as_str()).collect();
            return Err(ConfigError::new(
                "baseline",
                format!("no run is named `{b}` (runs: {})", names.join(", ")),
            ));
        }
        Ok(())
    }
}

pub struct ExportKind;

impl Kind for ExportKind {
    type Config = ExportConfig;
    const NAME: &'static str = "export";
    const VERSION: u32 = 2;

    fn validate(c: &mut ExportConfig, _declared: &[String]) -> Result<Checked, ConfigError> {
        c.validate()?;
        Ok(Checked::default())
    }

    fn run(&self, c: ExportConfig, ctx: &StageContext<'_>) -> Result<StageSummary, StageError> {
        export(&c, ctx)
    }
}

/// What the stage reads of one run.
pub(crate) struct Run {
    /// The row label: the name, with its seed if it has one.
    pub name: String,
    /// The name alone (the variant), and the seed.
    pub group: String,
    pub seed: Option<String>,
    pub model_dir: PathBuf,
    pub eval_dir: PathBuf,
    /// The training's config.json.
    pub config: Value,
    /// Per-epoch records of log.jsonl.
    pub log: Vec<Value>,
    /// Validation RSUM of the chosen epoch (train metrics.json).
    pub val_rsum: f64,
    /// The eval's metrics.json (test split, usually).
    pub test: Value,
    /// The teacher signal of the soft labels it trained with (`softlabels:`'s report.json
    /// `teacher_signal`), when given and measured.
    pub signal: Option<Value>,
}

fn read_json(path: &Path, what: &str) -> Result<Value, StageError> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            StageError::failed_with_hint(
                format!("{} has no readable {what}", path.display()),
                "`model:` must be a train stage's output and `eval:` the eval stage's output",
            )
        })
}

fn read_run(r: &RunConfig, ctx: &StageContext<'_>) -> Result<Run, StageError> {
    let model_dir = ctx.resolve(&r.model);
    let eval_dir = ctx.resolve(&r.eval);
    let config = read_json(&model_dir.join("config.json"), "config.json")?;
    let metrics = read_json(&model_dir.join("metrics.json"), "metrics.json")?;
    let val_rsum = metrics["val"]["rsum"].as_f64().ok_or_else(|| {
        StageError::failed(format!(
            "run `{}`: {} has no validation RSUM (`val.rsum`)",
            r.name,
            model_dir.join("metrics.json").display()
        ))
    })?;
    let log = std::fs::read_to_string(model_dir.join("log.jsonl"))
        .map_err(|e| {
            StageError::io(
                format!("reading {}", model_dir.join("log.jsonl").display()),
                e,
            )
        })?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let test = read_json(&eval_dir.join("metrics.json"), "metrics.json")?;
    let signal = match &r.softlabels {
        None => None,
        Some(dir) => {
            let path = ctx.resolve(dir).join("report.json");
            let report = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .ok_or_else(|| {
                    StageError::failed_with_hint(
                        format!("run `{}`: {} is not readable", r.name, path.display()),
                        "`softlabels:` must be a softlabel stage's output",
                    )
                })?;
            Some(report["teacher_signal"].clone()).filter(|v| !v.is_null())
        }
    };
    Ok(Run {
        name: r.label(),
        group: r.name.clone(),
        seed: r.seed_label(),
        model_dir,
        eval_dir,
        config,
        log,
        val_rsum,
        test,
        signal,
    })
}

/// Writes the weights in `dir` as safetensors at `path`, with the training config as metadata.
fn write_safetensors(dir: &Path, config: &Value, path: &Path) -> Result<usize, StageError> {
    type B = burn::backend::NdArray<f32>;
    let trained = crate::train::load::load::<B>(dir, &Default::default())?;
    // PyTorch's layout, what other tools expect of safetensors: Linear weights [out, in],
    // LayerNorm `weight`/`bias`.
    let mut store = SafetensorsStore::from_file(path)
        .with_to_adapter(BurnToPyTorchAdapter)
        .metadata("config", config.to_string())
        .metadata("producer", "cusa-pipe");
    let saved = match trained.student {
        TrainedStudent::FeatureHeads { model, .. } => {
            model.save_into(&mut store).map(|_| model.num_params())
        }
        TrainedStudent::ScenesSmall { model, .. } => {
            model.save_into(&mut store).map(|_| model.num_params())
        }
        TrainedStudent::Clip {
            shape,
            model,
            tokenizer,
        } => {
            return write_clip(&shape, &model, &tokenizer, config, path);
        }
    };
    saved.map_err(|e| StageError::failed(format!("writing {}: {e}", path.display())))
}

/// A fine-tuned CLIP in the Hugging Face layout beside `path` (`model.safetensors` with
/// transformers' names, its `config.json`, the tokenizer's `merges.txt` + `vocab.json`), and the
/// heads of the method in `heads.safetensors` (PyTorch layout: `image_heads.cross.norm.weight`,
/// …; the retrieval embedding is `cross.linear(cross.norm(get_image_features(x)))`), with
/// SelfAlign's parameters under `selfalign.` when it was trained with them.
fn write_clip(
    shape: &crate::ml::clip::ClipStudentShape,
    model: &crate::ml::clip::ClipStudent<burn::backend::NdArray<f32>>,
    tokenizer: &crate::ml::clip::tokenizer::ClipTokenizer,
    config: &Value,
    path: &Path,
) -> Result<usize, StageError> {
    use crate::ml::clip::weights::{pytorch_tensors, write_safetensors};
    type B = burn::backend::NdArray<f32>;
    let dir = path.parent().unwrap_or(Path::new("."));
    let failed =
        |what: &Path, e: String| StageError::failed(format!("writing {}: {e}", what.display()));
    let metadata = |extra: Option<&Value>| {
        let mut m = std::collections::HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("producer".to_string(), "cusa-pipe".to_string()),
        ]);
        if let Some(c) = extra {
            m.insert("training".into(), c.to_string());
        }
        Some(m)
    };
    let clip = pytorch_tensors::<B, _>(&model.clip, "").map_err(|e| failed(path, e))?;
    write_safetensors(path, &clip, metadata(Some(config))).map_err(|e| failed(path, e))?;
    let mut heads =
        pytorch_tensors::<B, _>(&model.image_heads, "image_heads.").map_err(|e| failed(path, e))?;
    heads.extend(
        pytorch_tensors::<B, _>(&model.text_heads, "text_heads.").map_err(|e| failed(path, e))?,
    );
    // SelfAlign's prototypes and guides (`selfalign.image_guide.linear.weight`, …): the
    // guides make the context part of the `selfalign-concat` embedding.
    if let Some(selfalign) = &model.selfalign {
        heads
            .extend(pytorch_tensors::<B, _>(selfalign, "selfalign.").map_err(|e| failed(path, e))?);
    }
    let heads_path = dir.join("heads.safetensors");
    write_safetensors(&heads_path, &heads, metadata(None)).map_err(|e| failed(&heads_path, e))?;
    let hf_config = dir.join("config.json");
    // transformers pools the text at the first `eos_token_id`: the ids of this vocabulary's
    // special tokens, not OpenAI's defaults (which a smaller vocabulary does not have).
    let mut hf = shape.clip.to_hf_config();
    for (key, token) in [
        ("bos_token_id", "<|startoftext|>"),
        ("eos_token_id", "<|endoftext|>"),
        ("pad_token_id", "<|endoftext|>"),
    ] {
        if let Some(id) = tokenizer.vocab().get(token) {
            hf["text_config"][key] = json!(id);
        }
    }
    std::fs::write(&hf_config, crate::api::json_text(&hf, "config.json")?)
        .map_err(|e| StageError::io(format!("writing {}", hf_config.display()), e))?;
    tokenizer
        .write_hf(dir)
        .map_err(|e| StageError::io("writing the tokenizer files", e))?;
    for (name, doc) in hf_processor_configs(&shape.clip) {
        let file = dir.join(name);
        std::fs::write(&file, crate::api::json_text(&doc, name)?)
            .map_err(|e| StageError::io(format!("writing {}", file.display()), e))?;
    }
    Ok(clip.iter().chain(&heads).map(|(_, _, d)| d.len()).sum())
}

/// What `CLIPProcessor.from_pretrained` / `AutoProcessor` read besides the vocabulary: the image
/// processor's config (the training's preprocessing: bicubic resize of the shortest side to the
/// tower's size, centre crop, CLIP's mean and std) and the tokenizer's (CLIPTokenizer, its
/// special tokens, the context length).
fn hf_processor_configs(shape: &crate::ml::clip::shape::ClipShape) -> [(&'static str, Value); 3] {
    use crate::ml::clip::{MEAN, STD};
    let size = shape.vision.image_size;
    let (start, end) = ("<|startoftext|>", "<|endoftext|>");
    [
        (
            "preprocessor_config.json",
            json!({
                "crop_size": {"height": size, "width": size},
                "do_center_crop": true,
                "do_convert_rgb": true,
                "do_normalize": true,
                "do_rescale": true,
                "do_resize": true,
                "image_mean": MEAN,
                "image_std": STD,
                "image_processor_type": "CLIPImageProcessor",
                "processor_class": "CLIPProcessor",
                "resample": 3,
                "rescale_factor": 1.0 / 255.0,
                "size": {"shortest_edge": size},
            }),
        ),
        (
            "tokenizer_config.json",
            json!({
                "add_prefix_space": false,
                "bos_token": start,
                "clean_up_tokenization_spaces": false,
                "do_lower_case": true,
                "eos_token": end,
                "errors": "replace",
                "model_max_length": shape.text.context,
                "pad_token": end,
                "processor_class": "CLIPProcessor",
                "tokenizer_class": "CLIPTokenizer",
                "unk_token": end,
            }),
        ),
        (
            "special_tokens_map.json",
            json!({"bos_token": start, "eos_token": end, "pad_token": end, "unk_token": end}),
        ),
    ]
}

fn copy(from: &Path, to: &Path) -> Result<(), StageError> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| StageError::io(format!("copying {} to {}", from.display(), to.display()), e))
}

/// Arrow IPC → Parquet, same columns.
fn arrow_to_parquet(from: &Path, to: &Path) -> Result<(), StageError> {
    let io = |e: &dyn std::fmt::Display| {
        StageError::failed(format!("{} → {}: {e}", from.display(), to.display()))
    };
    let file = std::fs::File::open(from)
        .map_err(|e| StageError::io(format!("opening {}", from.display()), e))?;
    let reader = arrow_ipc::reader::FileReader::try_new(file, None).map_err(|e| io(&e))?;
    let schema = reader.schema();
    let out = std::fs::File::create(to)
        .map_err(|e| StageError::io(format!("creating {}", to.display()), e))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(out, schema, Some(props)).map_err(|e| io(&e))?;
    for batch in reader {
        writer
            .write(&batch.map_err(|e| io(&e))?)
            .map_err(|e| io(&e))?;
    }
    writer.close().map_err(|e| io(&e))?;
    Ok(())
}

fn export(c: &ExportConfig, ctx: &StageContext<'_>) -> Result<StageSummary, StageError> {
    let runs: Vec<Run> = c
        .runs
        .iter()
        .map(|r| read_run(r, ctx))
        .collect::<Result<_, _>>()?;
    // The choice: best validation RSUM, the first among equals.
    let chosen = runs.iter().enumerate().fold(0, |best, (i, r)| {
        if r.val_rsum > runs[best].val_rsum {
            i
        } else {
            best
        }
    });
    let baseline = c
        .baseline
        .as_ref()
        .and_then(|b| runs.iter().position(|r| &r.group == b))
        .unwrap_or(0);
    let best = &runs[chosen];
    // The chosen run is compared with the baseline trained with its own seed.
    let paired = runs
        .iter()
        .position(|r| r.group == runs[baseline].group && r.seed == best.seed)
        .unwrap_or(baseline);
    ctx.log.line(format!(
        "chosen on validation RSUM: `{}` ({:.1}; {})",
        best.name,
        best.val_rsum,
        runs.iter()
            .map(|r| format!("{} {:.1}", r.name, r.val_rsum))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let out = ctx.out_dir;
    let model_out = out.join("model");
    let galleries = out.join("galleries");
    for d in [&model_out, &galleries] {
        std::fs::create_dir_all(d)
            .map_err(|e| StageError::io(format!("creating {}", d.display()), e))?;
    }
    let params = write_safetensors(
        &best.model_dir,
        &best.config,
        &model_out.join("model.safetensors"),
    )?;
    // A CLIP export is in the Hugging Face layout: config.json and vocab.json are
    // transformers' there, and the training record goes beside them as training.json.
    let hf_layout = best.config["student"]["kind"] == "clip";
    for f in ["config.json", "metrics.json", "log.jsonl", "vocab.json"] {
        let from = best.model_dir.join(f);
        let to = match f {
            "config.json" if hf_layout => model_out.join("training.json"),
            "vocab.json" if hf_layout => continue,
            _ => model_out.join(f),
        };
        if from.exists() {
            copy(&from, &to)?;
        }
    }
    if hf_layout {
        // Captions must be cleaned as the training cleaned them: embedding the raw text moves
        // the vectors.
        let path = model_out.join("training.json");
        let mut training = read_json(&path, "training.json")?;
        training["text_cleaning"] = crate::dataset::read::text_cleaning(&ctx.resolve(&c.dataset))?;
        std::fs::write(&path, crate::api::json_text(&training, "training.json")?)
            .map_err(|e| StageError::io(format!("writing {}", path.display()), e))?;
    }
    for g in ["image_embeddings", "caption_embeddings"] {
        let from = best.eval_dir.join(format!("{g}.arrow"));
        copy(&from, &galleries.join(format!("{g}.arrow")))?;
        arrow_to_parquet(&from, &galleries.join(format!("{g}.parquet")))?;
    }

    let dataset = ctx.resolve(&c.dataset);
    let images_root = c.images.as_deref().map(|p| ctx.resolve(p));
    let title = c.title.clone().unwrap_or_else(|| ctx.stage.to_string());
    let html = report::render(&report::Inputs {
        title: &title,
        runs: &runs,
        chosen,
        baseline,
        dataset: &dataset,
        images_root,
        examples: c.examples,
    })?;
    std::fs::write(out.join("report.html"), html)
        .map_err(|e| StageError::io("writing report.html", e))?;

    let summary_doc = json!({
        "chosen": best.group,
        "chosen_seed": best.seed,
        "chosen_on": "validation RSUM",
        "baseline": runs[baseline].group,
        "parameters": params,
        "runs": runs.iter().map(|r| json!({
            "name": r.group,
            "seed": r.seed,
            "val_rsum": r.val_rsum,
            "test_rsum": r.test["rsum"],
            "split": r.test["split"],
            "teacher_signal": r.signal.as_ref().map(|s| json!({
                "i2t_auc": s["i2t"]["auc"],
                "t2i_auc": s["t2i"]["auc"],
            })),
        })).collect::<Vec<_>>(),
        "against_teacher_signal": report::signal_points(&runs, baseline),
    });
    std::fs::write(
        out.join("export.json"),
        crate::api::json_text(&summary_doc, "summary.json")?,
    )
    .map_err(|e| StageError::io("writing export.json", e))?;

    let mut summary = StageSummary::default();
    summary.notes.push(format!(
        "exported `{}` (best validation RSUM {:.1}; test RSUM {:.1}, {:+.1} vs `{}`), {params} parameters; report.html",
        best.name,
        best.val_rsum,
        best.test["rsum"].as_f64().unwrap_or(f64::NAN),
        best.test["rsum"].as_f64().unwrap_or(f64::NAN)
            - runs[paired].test["rsum"].as_f64().unwrap_or(f64::NAN),
        runs[paired].name
    ));
    match seed_table(&runs, baseline, &SEED_COLUMNS[..4]) {
        Some((rows, columns)) => {
            summary
                .notes
                .extend(seeds::render(&rows, &columns, &runs[baseline].group, "run"))
        }
        None => summary
            .notes
            .extend(ablation_lines(&runs, chosen, baseline)),
    }
    summary.metrics.insert("parameters".into(), json!(params));
    Ok(summary)
}

/// The seed table's columns: a label and where the number is (`val` in the training's
/// metrics, otherwise in the eval's).
pub(crate) const SEED_COLUMNS: [(&str, &[&str]); 6] = [
    ("val RSUM", &["val", "rsum"]),
    ("RSUM", &["rsum"]),
    ("mAP@R i2t", &["extended", "i2t", "mAP@R"]),
    ("mAP@R t2i", &["extended", "t2i", "mAP@R"]),
    ("R-P i2t", &["extended", "i2t", "R-P"]),
    ("R-P t2i", &["extended", "t2i", "R-P"]),
];

/// Runs repeated over seeds, as the rows of the seed table (mean ± sd per name, paired deltas
/// to the baseline's name); `None` when the runs have no seeds.
pub(crate) fn seed_table(
    runs: &[Run],
    baseline: usize,
    columns: &[(&str, &[&str])],
) -> Option<(Vec<seeds::Row>, Vec<String>)> {
    if runs.iter().any(|r| r.seed.is_none()) {
        return None;
    }
    let get = |r: &Run, path: &[&str]| -> Option<f64> {
        match path {
            ["val", "rsum"] => Some(r.val_rsum),
            _ => path.iter().fold(&r.test, |v, k| &v[*k]).as_f64(),
        }
    };
    let shown: Vec<&(&str, &[&str])> = columns
        .iter()
        .filter(|(_, p)| runs.iter().any(|r| get(r, p).is_some()))
        .collect();
    let names: Vec<String> = shown.iter().map(|(n, _)| n.to_string()).collect();
    let measured: Vec<seeds::Run> = runs
        .iter()
        .map(|r| seeds::Run {
            group: r.group.clone(),
            seed: r.seed.clone().unwrap_or_default(),
            values: shown
                .iter()
                .filter_map(|(n, p)| Some((n.to_string(), get(r, p)?)))
                .collect(),
        })
        .collect();
    let mut groups: Vec<String> = Vec::new();
    for r in runs {
        if !groups.contains(&r.group) {
            groups.push(r.group.clone());
        }
    }
    Some((
        seeds::compare(&measured, &groups, &runs[baseline].group, &names),
        names,
    ))
}

/// The comparison in a few lines for the run's output (the full table is in the report and
/// `cusa-pipe metrics`): per run, validation RSUM, test RSUM and mAP@R, deltas to the baseline.
fn ablation_lines(runs: &[Run], chosen: usize, baseline: usize) -> Vec<String> {
    let width = runs
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0);
    let base = &runs[baseline];
    let figure = |r: &Run, path: &[&str]| -> String {
        let get = |m: &Value| path.iter().fold(m, |v, k| &v[*k]).as_f64();
        match (get(&r.test), get(&base.test)) {
            (Some(v), Some(b)) if !std::ptr::eq(r, base) => format!("{v:5.1} ({:+5.1})", v - b),
            (Some(v), _) => format!("{v:5.1}        "),
            (None, _) => "    –        ".into(),
        }
    };
    let split = base.test["split"].as_str().unwrap_or("test");
    let mut lines = vec![format!(
        "{:width$}  val RSUM  {split} RSUM        mAP@R i2t      mAP@R t2i",
        ""
    )];
    for (k, r) in runs.iter().enumerate() {
        lines.push(
            format!(
                "{:width$}  {:8.1}  {}  {}  {}{}",
                r.name,
                r.val_rsum,
                figure(r, &["rsum"]),
                figure(r, &["extended", "i2t", "mAP@R"]),
                figure(r, &["extended", "t2i", "mAP@R"]),
                if k == chosen { "  ← exported" } else { "" }
            )
            .trim_end()
            .to_string(),
        );
    }
    lines
}
