//! `kind: dataset` — any image-caption source turned into one normal form (see [`normal`]).
//!
//! ```yaml
//! coco:
//!   kind: dataset
//!   inputs:
//!     splits: ${karpathy/dataset_coco.json}
//!     images: ${coco_images}
//!   with:
//!     format: karpathy          # karpathy | cusa-json | table | scenes
//!     annotations: ${inputs.splits}
//!     images: ${inputs.images}  # image root; paths in the annotations are relative to it
//!     restval: train            # karpathy: train | keep | drop
//!     clean: cusa               # cusa (the reference pre_caption) | none
//!     max_words: 64
//!     on_error: fail            # fail | skip
//!     verify_images: false      # decode every image (in parallel)
//! ```
//!
//! `cusa-json` takes `annotations: {train: …, val: …, test: …}`; `table` takes one CSV, TSV,
//! JSONL or Parquet file plus `columns: {image, caption, split?, image_id?, caption_id?, label?}`
//! (`split:` names the split of rows without a split column); `scenes` generates the embedded
//! dataset (`scenes: {seed, train, val, test, size, captions_per_image}`; see [`scenes`]).
//! Without `images:` the image files are not checked (`report.json` says so).
//! `positives: {eccv: DIR, split: test}` adds the ECCV Caption extended positives (the
//! `eccv-caption` package's maps, e.g. fetched by a `download` stage) to a COCO import.

pub mod clean;
pub mod formats;
pub mod normal;
pub mod read;
pub mod scenes;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{Checked, ConfigError, Kind, StageContext, StageError, StageSummary};
use clean::Clean;
use formats::{Columns, PositivesConfig, Restval};
use normal::{OnError, Rules};
use scenes::ScenesConfig;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Karpathy,
    CusaJson,
    Table,
    Scenes,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Karpathy => "karpathy",
            Format::CusaJson => "cusa-json",
            Format::Table => "table",
            Format::Scenes => "scenes",
        }
    }
}

/// One annotation file, or one per split.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Annotations {
    One(String),
    PerSplit(BTreeMap<String, String>),
}

impl<'de> Deserialize<'de> for Annotations {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Annotations::One(s)),
            Value::Object(m) => m
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k, s)),
                    other => Err(D::Error::custom(format!(
                        "expected a file path, found `{other}`"
                    ))),
                })
                .collect::<Result<_, _>>()
                .map(Annotations::PerSplit),
            other => Err(D::Error::custom(format!(
                "expected a file path or a map of split → file, found `{other}`"
            ))),
        }
    }
}

/// The typed `with:` block of a dataset stage.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    pub format: Format,
    pub annotations: Option<Annotations>,
    pub images: Option<String>,
    #[serde(default)]
    pub restval: Option<Restval>,
    #[serde(default)]
    pub clean: Clean,
    #[serde(default = "default_max_words")]
    pub max_words: usize,
    #[serde(default)]
    pub on_error: OnError,
    #[serde(default)]
    pub verify_images: bool,
    pub columns: Option<Columns>,
    /// `table`: the split of rows without a split column.
    pub split: Option<String>,
    /// `table`: the CSV delimiter (default: `,`, or a tab for `.tsv`).
    pub delimiter: Option<String>,
    pub scenes: Option<ScenesConfig>,
    /// Extended positives from ECCV Caption (`{eccv: DIR, split: test}`).
    pub positives: Option<PositivesConfig>,
}

fn default_max_words() -> usize {
    64
}

impl DatasetConfig {
    /// Keys that must or must not be present for the format.
    fn check_keys(&self) -> Result<(), ConfigError> {
        let f = self.format;
        let not_for = |key: &str| {
            ConfigError::new(
                key,
                format!("`{key}` does not apply to format `{}`", f.name()),
            )
        };
        let needs = |key: &str, what: &str| {
            ConfigError::new("", format!("format `{}` needs `{key}:` ({what})", f.name()))
        };
        if f != Format::Karpathy && self.restval.is_some() {
            return Err(not_for("restval"));
        }
        if f != Format::Table {
            for (key, on) in [
                ("columns", self.columns.is_some()),
                ("split", self.split.is_some()),
                ("delimiter", self.delimiter.is_some()),
            ] {
                if on {
                    return Err(not_for(key));
                }
            }
        }
        if f != Format::Scenes && self.scenes.is_some() {
            return Err(not_for("scenes"));
        }
        if f == Format::Scenes && self.positives.is_some() {
            return Err(ConfigError::new(
                "positives",
                "the scenes dataset writes its own exact positives",
            )
            .with_help("remove `positives:`"));
        }
        match (f, &self.annotations) {
            (Format::Scenes, Some(_)) => Err(not_for("annotations")),
            (Format::Scenes, None) if self.images.is_some() => Err(not_for("images")),
            (Format::Scenes, None) => Ok(()),
            (Format::CusaJson, Some(Annotations::PerSplit(m))) if !m.is_empty() => Ok(()),
            (Format::CusaJson, _) => Err(needs(
                "annotations",
                "a map of split → JSON list, e.g. {train: …, test: …}",
            )),
            (_, Some(Annotations::One(_))) => {
                if f == Format::Table && self.columns.is_none() {
                    return Err(needs(
                        "columns",
                        "at least `image` and `caption` column names",
                    ));
                }
                if let Some(d) = &self.delimiter
                    && d.len() != 1
                    && d != "\\t"
                {
                    return Err(ConfigError::new(
                        "delimiter",
                        "the delimiter must be one character (or `\\t`)",
                    ));
                }
                Ok(())
            }
            (_, Some(Annotations::PerSplit(_))) => Err(ConfigError::new(
                "annotations",
                "expected one annotation file",
            )
            .with_help("a map of split → file is for `format: cusa-json`")),
            (_, None) => Err(needs(
                "annotations",
                "the annotation file, usually `${inputs.NAME}`",
            )),
        }
    }
}

pub struct DatasetKind;

impl Kind for DatasetKind {
    type Config = DatasetConfig;
    const NAME: &'static str = "dataset";
    // 2: the scenes format records its generator settings in report.json.
    const VERSION: u32 = 2;

    fn validate(config: &mut DatasetConfig, _declared: &[String]) -> Result<Checked, ConfigError> {
        config.check_keys()?;
        if config.max_words == 0 {
            return Err(ConfigError::new(
                "max_words",
                "`max_words` must be at least 1",
            ));
        }
        Ok(Checked::default())
    }

    fn run(
        &self,
        config: DatasetConfig,
        ctx: &StageContext<'_>,
    ) -> Result<StageSummary, StageError> {
        let project = |p: &str| ctx.resolve(p);
        let one = || match &config.annotations {
            Some(Annotations::One(p)) => Ok(project(p)),
            _ => Err(StageError::failed("missing `annotations`")),
        };
        ctx.log
            .line(format!("reading format `{}`", config.format.name()));
        let raw = match config.format {
            Format::Karpathy => formats::karpathy(&one()?, config.restval.unwrap_or_default())?,
            Format::CusaJson => {
                let Some(Annotations::PerSplit(files)) = &config.annotations else {
                    return Err(StageError::failed("missing `annotations`"));
                };
                let files: Vec<(String, PathBuf)> =
                    files.iter().map(|(s, p)| (s.clone(), project(p))).collect();
                let refs: Vec<(String, &Path)> = files
                    .iter()
                    .map(|(s, p)| (s.clone(), p.as_path()))
                    .collect();
                formats::cusa_json(&refs)?
            }
            Format::Table => {
                let delimiter = config
                    .delimiter
                    .as_deref()
                    .map(|d| if d == "\\t" { b'\t' } else { d.as_bytes()[0] });
                let columns = config
                    .columns
                    .as_ref()
                    .ok_or_else(|| StageError::failed("missing `columns`"))?;
                formats::table(
                    &one()?,
                    columns,
                    config.split.as_deref().unwrap_or("train"),
                    delimiter,
                )?
            }
            Format::Scenes => {
                scenes::generate(&config.scenes.clone().unwrap_or_default(), ctx.out_dir)?
            }
        };
        let mut raw = raw;
        if let Some(pos) = &config.positives {
            let (positives, dropped) =
                formats::eccv_positives(&project(&pos.eccv), &pos.split, &raw)?;
            ctx.log.line(format!(
                "ECCV Caption: {} positive pairs on the {} split",
                positives.len(),
                pos.split
            ));
            raw.positives.extend(positives);
            raw.dropped.extend(dropped);
        }
        if ctx.cancel.is_cancelled() {
            return Err(StageError::Cancelled);
        }
        let images_root = config.images.as_deref().map(project);
        let (root, root_label): (Option<&Path>, &str) = match (config.format, &images_root) {
            (Format::Scenes, _) => (Some(ctx.out_dir), "output"),
            (_, Some(r)) => (Some(r.as_path()), "input"),
            (_, None) => (None, "none"),
        };
        if let Some(r) = root
            && !r.is_dir()
        {
            return Err(StageError::failed_with_hint(
                format!("the image root {} is not a folder", r.display()),
                "`images:` is the folder the annotation paths are relative to",
            ));
        }
        let rules = Rules {
            clean: config.clean,
            max_words: config.max_words,
            on_error: config.on_error,
            verify_images: config.verify_images,
            image_root: root,
        };
        let normal = normal::normalize(raw, &rules)?;
        normal::write(
            ctx.out_dir,
            &normal,
            config.format.name(),
            root_label,
            &rules,
            (config.format == Format::Scenes)
                .then(|| config.scenes.clone().unwrap_or_default())
                .as_ref(),
        )?;

        let mut summary = StageSummary::default();
        let mut per_split: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for i in &normal.images {
            per_split.entry(i.raw.split.as_str()).or_default().0 += 1;
        }
        for c in &normal.captions {
            per_split.entry(c.split.as_ref()).or_default().1 += 1;
        }
        let counts: Vec<String> = per_split
            .iter()
            .map(|(s, (i, c))| format!("{s} {i} images / {c} captions"))
            .collect();
        summary.notes.push(counts.join(", "));
        for d in &normal.dropped {
            summary.notes.push(format!(
                "dropped {} × {} (see report.json)",
                d.count, d.reason
            ));
        }
        if root.is_none() {
            summary
                .notes
                .push("image files were not checked: no `images:` given".into());
        }
        summary
            .metrics
            .insert("images".into(), Value::from(normal.images.len()));
        summary
            .metrics
            .insert("captions".into(), Value::from(normal.captions.len()));
        summary
            .metrics
            .insert("positives".into(), Value::from(normal.positives.len()));
        Ok(summary)
    }
}
