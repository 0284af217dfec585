//! The normal form every dataset format is turned into, and its validation.
//!
//! Output tree of a `dataset` stage:
//!
//! | file               | columns                                                        |
//! |--------------------|----------------------------------------------------------------|
//! | `images.parquet`   | image_id, path, split, width?, height?, label?                 |
//! | `captions.parquet` | caption_id, image_id, split, text, text_clean                  |
//! | `positives.parquet`| query_kind (`caption`/`image`), query_id, positive_id (optional) |
//! | `report.json`      | counts per split, every dropped row and why, settings          |
//!
//! `path` is relative to the image root: the stage's `images:` input, or the stage's own output
//! tree when it wrote the images (`report.json`'s `image_root` says which), so the bytes never
//! depend on where the cache lives. Rows keep the input order; the files are byte-for-byte
//! deterministic for the same input.
//!
//! Image paths must stay below the image root (no absolute path, no `..`: see
//! [`crate::safe_path`]): a file outside the `images:` input is not part of its hash, so a
//! change to it would leave the stage fresh. Symbolic links inside the root are followed, and
//! hashed through. An image id given to two files in a table is an error (formats.rs).
//!
//! Validation (`on_error: fail | skip`): duplicate image or caption ids, captions of unknown
//! images, captions empty after cleaning, image paths outside the root, missing or (with
//! `verify_images`) undecodable image files, and images left without captions. `fail` stops
//! the stage naming counts and the first offenders; `skip` drops them and lists them in
//! `report.json`. Nothing is dropped silently.

use std::collections::{BTreeMap, HashMap, HashSet};

use rustc_hash::{FxHashMap, FxHashSet};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::clean::{Clean, clean};
use crate::api::StageError;

/// One image as a reader found it.
#[derive(Debug, Clone)]
pub struct RawImage {
    pub id: String,
    /// Relative to the image root.
    pub path: String,
    pub split: String,
    pub label: Option<String>,
    /// Known sizes (the scenes generator knows them); otherwise read when verifying.
    pub size: Option<(u32, u32)>,
}

/// One caption as a reader found it.
#[derive(Debug, Clone)]
pub struct RawCaption {
    pub id: String,
    pub image_id: String,
    pub text: String,
}

/// An extended positive: `positive_id` is a true match of the query.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Positive {
    /// `caption` (query is a caption, positive an image) or `image`.
    pub query_kind: &'static str,
    pub query_id: String,
    pub positive_id: String,
}

/// What a reader produced.
#[derive(Debug, Default)]
pub struct RawDataset {
    pub images: Vec<RawImage>,
    pub captions: Vec<RawCaption>,
    pub positives: Vec<Positive>,
    /// Rows the reader itself left out on purpose (e.g. `restval: drop`).
    pub dropped: Vec<Dropped>,
}

/// What to do with bad rows.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Fail,
    Skip,
}

/// Rows dropped for one reason.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Dropped {
    pub reason: String,
    pub count: usize,
    /// The first offenders (ids), at most [`FIRST`].
    pub first: Vec<String>,
}

const FIRST: usize = 5;

/// Settings that shape validation.
pub struct Rules<'a> {
    pub clean: Clean,
    pub max_words: usize,
    pub on_error: OnError,
    pub verify_images: bool,
    /// The folder image paths are relative to; `None` skips the existence check.
    pub image_root: Option<&'a Path>,
}

/// A validated dataset.
pub struct Normal {
    pub images: Vec<NormalImage>,
    pub captions: Vec<NormalCaption>,
    pub positives: Vec<Positive>,
    pub dropped: Vec<Dropped>,
}

pub struct NormalImage {
    pub raw: RawImage,
    pub size: Option<(u32, u32)>,
}

pub struct NormalCaption {
    pub raw: RawCaption,
    /// Shared by every caption of the split.
    pub split: Arc<str>,
    pub clean: String,
}

/// Collects offenders per reason.
#[derive(Default)]
struct Problems {
    by_reason: BTreeMap<&'static str, Vec<String>>,
}

impl Problems {
    fn add(&mut self, reason: &'static str, id: impl Into<String>) {
        self.by_reason.entry(reason).or_default().push(id.into());
    }

    fn summary(&self) -> Vec<Dropped> {
        self.by_reason
            .iter()
            .map(|(reason, ids)| Dropped {
                reason: reason.to_string(),
                count: ids.len(),
                first: ids.iter().take(FIRST).cloned().collect(),
            })
            .collect()
    }
}

/// Validates and cleans; see the module doc for the rules.
pub fn normalize(raw: RawDataset, rules: &Rules<'_>) -> Result<Normal, StageError> {
    let mut problems = Problems::default();

    // Images: unique ids, existing (and decodable) files. Ids are compared by reference:
    // a COCO import checks 600k ids, and cloning each one costs more than the check.
    let duplicate: Vec<bool> = {
        let mut seen = FxHashSet::default();
        raw.images
            .iter()
            .map(|i| !seen.insert(i.id.as_str()))
            .collect()
    };
    let mut images: Vec<RawImage> = Vec::with_capacity(raw.images.len());
    for (img, dup) in raw.images.into_iter().zip(duplicate) {
        if dup {
            problems.add("duplicate image id", img.id);
        } else if crate::safe_path::relative(&img.path).is_err() {
            // Absolute, `..` or empty parts: the file would be read from outside the `images:`
            // input, whose content is what the fingerprint hashes.
            problems.add(
                "image path not below the images root",
                format!("{} ({})", img.id, img.path),
            );
        } else {
            images.push(img);
        }
    }
    let sizes: Vec<Result<Option<(u32, u32)>, &'static str>> = images
        .par_iter()
        .map(|img| {
            let Some(root) = rules.image_root else {
                return Ok(img.size);
            };
            let path = root.join(&img.path);
            if !path.is_file() {
                return Err("image file missing");
            }
            if rules.verify_images {
                let decoded = image::ImageReader::open(&path)
                    .ok()
                    .and_then(|r| r.with_guessed_format().ok())
                    .and_then(|r| r.decode().ok());
                return match decoded {
                    Some(im) => Ok(Some((im.width(), im.height()))),
                    None => Err("image file cannot be decoded"),
                };
            }
            Ok(img.size)
        })
        .collect();
    let mut kept_images = Vec::with_capacity(images.len());
    for (img, size) in images.into_iter().zip(sizes) {
        match size {
            Ok(size) => kept_images.push(NormalImage { raw: img, size }),
            Err(reason) => problems.add(reason, img.id),
        }
    }

    // Captions: unique ids, known images, non-empty after cleaning (cleaned in parallel).
    let split_names: FxHashMap<&str, Arc<str>> = kept_images
        .iter()
        .map(|i| (i.raw.split.as_str(), Arc::from(i.raw.split.as_str())))
        .collect();
    let split_of: FxHashMap<&str, &Arc<str>> = kept_images
        .iter()
        .map(|i| (i.raw.id.as_str(), &split_names[i.raw.split.as_str()]))
        .collect();
    let duplicate: Vec<bool> = {
        let mut seen = FxHashSet::default();
        raw.captions
            .iter()
            .map(|c| !seen.insert(c.id.as_str()))
            .collect()
    };
    let cleaned: Vec<Option<String>> = raw
        .captions
        .par_iter()
        .map(|c| clean(&c.text, rules.clean, rules.max_words))
        .collect();
    let mut captions = Vec::with_capacity(raw.captions.len());
    for ((c, dup), text) in raw.captions.into_iter().zip(duplicate).zip(cleaned) {
        if dup {
            problems.add("duplicate caption id", c.id);
            continue;
        }
        let Some(split) = split_of.get(c.image_id.as_str()) else {
            problems.add("caption of an unknown or dropped image", c.id);
            continue;
        };
        match text {
            Some(text) => captions.push(NormalCaption {
                split: Arc::clone(split),
                clean: text,
                raw: c,
            }),
            None => problems.add("caption empty after cleaning", c.id),
        }
    }
    let with_captions: HashSet<&str> = captions.iter().map(|c| c.raw.image_id.as_str()).collect();
    let mut lonely = Vec::new();
    for img in &kept_images {
        if !with_captions.contains(img.raw.id.as_str()) {
            lonely.push(img.raw.id.clone());
        }
    }
    for id in &lonely {
        problems.add("image without captions", id.clone());
    }

    if rules.on_error == OnError::Fail && !problems.by_reason.is_empty() {
        let lines: Vec<String> = problems
            .summary()
            .iter()
            .map(|d| format!("{} × {} (first: {})", d.count, d.reason, d.first.join(", ")))
            .collect();
        return Err(StageError::failed_with_hint(
            format!("the dataset has bad rows: {}", lines.join("; ")),
            "fix the data, or set `on_error: skip` to drop them (they are listed in report.json)",
        ));
    }
    let lonely: HashSet<String> = lonely.into_iter().collect();
    kept_images.retain(|i| !lonely.contains(&i.raw.id));

    // Positives must refer to rows that survived.
    let image_ids: HashSet<&str> = kept_images.iter().map(|i| i.raw.id.as_str()).collect();
    let caption_ids: HashSet<&str> = captions.iter().map(|c| c.raw.id.as_str()).collect();
    let positives = raw
        .positives
        .into_iter()
        .filter(|p| match p.query_kind {
            "caption" => {
                caption_ids.contains(p.query_id.as_str())
                    && image_ids.contains(p.positive_id.as_str())
            }
            _ => {
                image_ids.contains(p.query_id.as_str())
                    && caption_ids.contains(p.positive_id.as_str())
            }
        })
        .collect();

    let mut dropped = raw.dropped;
    dropped.extend(problems.summary());
    Ok(Normal {
        images: kept_images,
        captions,
        positives,
        dropped,
    })
}

/// Everything `report.json` says.
#[derive(Serialize)]
pub struct Report<'a> {
    pub format: &'a str,
    /// `input` (the `images:` input) or `output` (this stage's own output tree).
    pub image_root: &'a str,
    pub clean: String,
    pub max_words: usize,
    pub splits: BTreeMap<String, SplitCounts>,
    pub positives: usize,
    /// Per split: how many images each caption truly describes (when positives are known).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub positives_per_caption: BTreeMap<String, PositiveStats>,
    pub dropped: &'a [Dropped],
    /// The generator's settings (the scenes format): the exact content behind every file
    /// follows from them ([`super::scenes::content`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenes: Option<&'a super::scenes::ScenesConfig>,
}

/// Distribution of positive images per caption query in one split.
#[derive(Serialize)]
pub struct PositiveStats {
    pub captions: usize,
    pub mean: f64,
    pub median: usize,
    pub max: usize,
    /// Share of captions that describe more than their own image.
    pub with_extended: f64,
}

#[derive(Serialize, Default)]
pub struct SplitCounts {
    pub images: usize,
    pub captions: usize,
}

fn writer_props() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by(concat!("cusa-pipe ", env!("CARGO_PKG_VERSION")).to_string())
        .build()
}

pub(crate) fn write_batch(
    path: &Path,
    columns: Vec<(&str, ArrayRef, bool)>,
) -> Result<(), StageError> {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(name, arr, nullable)| Field::new(*name, arr.data_type().clone(), *nullable))
            .collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_new(
        schema.clone(),
        columns.into_iter().map(|(_, a, _)| a).collect(),
    )
    .map_err(|e| StageError::failed(format!("building {}: {e}", path.display())))?;
    let file = File::create(path)
        .map_err(|e| StageError::io(format!("creating {}", path.display()), e))?;
    let mut writer = ArrowWriter::try_new(file, schema, Some(writer_props()))
        .map_err(|e| StageError::failed(format!("writing {}: {e}", path.display())))?;
    writer
        .write(&batch)
        .map_err(|e| StageError::failed(format!("writing {}: {e}", path.display())))?;
    writer
        .close()
        .map_err(|e| StageError::failed(format!("writing {}: {e}", path.display())))?;
    Ok(())
}

fn strings<'a>(it: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(it))
}

/// Writes the normal form and `report.json` into `out`.
pub fn write(
    out: &Path,
    n: &Normal,
    format: &str,
    image_root: &str,
    rules: &Rules<'_>,
    scenes: Option<&super::scenes::ScenesConfig>,
) -> Result<(), StageError> {
    let imgs = &n.images;
    let has_labels = imgs.iter().any(|i| i.raw.label.is_some());
    let mut cols: Vec<(&str, ArrayRef, bool)> = vec![
        (
            "image_id",
            strings(imgs.iter().map(|i| i.raw.id.as_str())),
            false,
        ),
        (
            "path",
            strings(imgs.iter().map(|i| i.raw.path.as_str())),
            false,
        ),
        (
            "split",
            strings(imgs.iter().map(|i| i.raw.split.as_str())),
            false,
        ),
        (
            "width",
            Arc::new(UInt32Array::from_iter(
                imgs.iter().map(|i| i.size.map(|s| s.0)),
            )),
            true,
        ),
        (
            "height",
            Arc::new(UInt32Array::from_iter(
                imgs.iter().map(|i| i.size.map(|s| s.1)),
            )),
            true,
        ),
    ];
    if has_labels {
        cols.push((
            "label",
            Arc::new(StringArray::from_iter(
                imgs.iter().map(|i| i.raw.label.as_deref()),
            )),
            true,
        ));
    }
    write_batch(&out.join("images.parquet"), cols)?;

    let caps = &n.captions;
    write_batch(
        &out.join("captions.parquet"),
        vec![
            (
                "caption_id",
                strings(caps.iter().map(|c| c.raw.id.as_str())),
                false,
            ),
            (
                "image_id",
                strings(caps.iter().map(|c| c.raw.image_id.as_str())),
                false,
            ),
            (
                "split",
                strings(caps.iter().map(|c| c.split.as_ref())),
                false,
            ),
            (
                "text",
                strings(caps.iter().map(|c| c.raw.text.as_str())),
                false,
            ),
            (
                "text_clean",
                strings(caps.iter().map(|c| c.clean.as_str())),
                false,
            ),
        ],
    )?;

    if !n.positives.is_empty() {
        let p = &n.positives;
        write_batch(
            &out.join("positives.parquet"),
            vec![
                ("query_kind", strings(p.iter().map(|x| x.query_kind)), false),
                (
                    "query_id",
                    strings(p.iter().map(|x| x.query_id.as_str())),
                    false,
                ),
                (
                    "positive_id",
                    strings(p.iter().map(|x| x.positive_id.as_str())),
                    false,
                ),
            ],
        )?;
    }

    let mut splits: BTreeMap<String, SplitCounts> = BTreeMap::new();
    for i in imgs {
        splits.entry(i.raw.split.clone()).or_default().images += 1;
    }
    for c in caps {
        splits.entry(c.split.to_string()).or_default().captions += 1;
    }
    let mut per_caption: HashMap<&str, usize> = HashMap::new();
    for p in n.positives.iter().filter(|p| p.query_kind == "caption") {
        *per_caption.entry(p.query_id.as_str()).or_default() += 1;
    }
    let mut by_split: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    if !per_caption.is_empty() {
        for c in caps {
            by_split
                .entry(c.split.to_string())
                .or_default()
                .push(per_caption.get(c.raw.id.as_str()).copied().unwrap_or(0));
        }
    }
    let positives_per_caption = by_split
        .into_iter()
        .map(|(split, mut v)| {
            v.sort_unstable();
            let stats = PositiveStats {
                captions: v.len(),
                mean: (v.iter().sum::<usize>() as f64 / v.len() as f64 * 100.0).round() / 100.0,
                median: v[v.len() / 2],
                max: *v.last().unwrap_or(&0),
                with_extended: (v.iter().filter(|&&k| k > 1).count() as f64 / v.len() as f64
                    * 1000.0)
                    .round()
                    / 1000.0,
            };
            (split, stats)
        })
        .collect();
    let report = Report {
        positives_per_caption,
        format,
        image_root,
        clean: crate::api::config_name(&rules.clean),
        max_words: rules.max_words,
        splits,
        positives: n.positives.len(),
        dropped: &n.dropped,
        scenes,
    };
    let bytes = serde_json::to_vec_pretty(&report).expect("reports serialise");
    std::fs::write(out.join("report.json"), bytes)
        .map_err(|e| StageError::io("writing report.json", e))
}
