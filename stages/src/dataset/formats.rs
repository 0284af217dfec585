//! Readers: each turns one annotation format into a [`RawDataset`].
//!
//! * `karpathy` — `dataset_coco.json` / `dataset_flickr30k.json`: `images[]` with `filepath`
//!   (COCO) / `filename`, `split`, `cocoid` or `imgid`, `sentences[]` with `raw` and `sentid`.
//!   `restval` (COCO's extra training images) is folded into `train`, kept, or dropped.
//! * `cusa-json` — one JSON list per split, as the CUSA reference code reads them: objects
//!   with `image_path` (or `image`), `caption` (a string, or a list of strings) and an optional
//!   `image_id`; an image may appear in several objects.
//! * `table` — CSV, TSV, JSONL or Parquet, one row per caption, with configurable columns.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use arrow_array::{Array, RecordBatch};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::normal::{Dropped, RawCaption, RawDataset, RawImage};
use crate::api::StageError;

/// Where COCO's `restval` images go.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Restval {
    #[default]
    Train,
    Keep,
    Drop,
}

fn read_json(path: &Path) -> Result<Vec<u8>, StageError> {
    std::fs::read(path).map_err(|e| StageError::io(format!("reading {}", path.display()), e))
}

fn bad_json(path: &Path, e: serde_json::Error, what: &str) -> StageError {
    StageError::failed_with_hint(
        format!("{} is not a valid {what} file: {e}", path.display()),
        format!("check that `format:` matches the file ({what})"),
    )
}

#[derive(Deserialize)]
struct KarpathyFile {
    images: Vec<KarpathyImage>,
}

#[derive(Deserialize)]
struct KarpathyImage {
    #[serde(default)]
    filepath: Option<String>,
    filename: String,
    split: String,
    #[serde(default)]
    cocoid: Option<u64>,
    #[serde(default)]
    imgid: Option<u64>,
    sentences: Vec<KarpathySentence>,
}

#[derive(Deserialize)]
struct KarpathySentence {
    raw: String,
    sentid: u64,
}

/// Karpathy split files. Image ids are COCO ids when present (`cocoid`), else `imgid`;
/// caption ids are `sentid`.
pub fn karpathy(path: &Path, restval: Restval) -> Result<RawDataset, StageError> {
    let file: KarpathyFile = serde_json::from_slice(&read_json(path)?)
        .map_err(|e| bad_json(path, e, "Karpathy split"))?;
    let mut out = RawDataset::default();
    let mut dropped = Vec::new();
    for img in file.images {
        let id = match (img.cocoid, img.imgid) {
            (Some(c), _) => c.to_string(),
            (None, Some(i)) => i.to_string(),
            (None, None) => img.filename.clone(),
        };
        let split = match (img.split.as_str(), restval) {
            ("restval", Restval::Train) => "train".to_string(),
            ("restval", Restval::Drop) => {
                dropped.push(id);
                continue;
            }
            (s, _) => s.to_string(),
        };
        let path = match &img.filepath {
            Some(dir) if !dir.is_empty() => format!("{dir}/{}", img.filename),
            _ => img.filename.clone(),
        };
        for s in img.sentences {
            out.captions.push(RawCaption {
                id: s.sentid.to_string(),
                image_id: id.clone(),
                text: s.raw,
            });
        }
        out.images.push(RawImage {
            id,
            path,
            split,
            label: None,
            size: None,
        });
    }
    if !dropped.is_empty() {
        out.dropped.push(Dropped {
            reason: "restval image (restval: drop)".into(),
            count: dropped.len(),
            first: dropped.into_iter().take(5).collect(),
        });
    }
    Ok(out)
}

/// Per-split CUSA JSON lists.
pub fn cusa_json(files: &[(String, &Path)]) -> Result<RawDataset, StageError> {
    let mut out = RawDataset::default();
    let mut index: HashMap<String, (usize, usize)> = HashMap::new();
    let mut per_image: HashMap<String, usize> = HashMap::new();
    for (split, path) in files {
        let rows: Vec<Value> = serde_json::from_slice(&read_json(path)?)
            .map_err(|e| bad_json(path, e, "CUSA JSON list"))?;
        for (n, row) in rows.iter().enumerate() {
            let at = |what: &str| StageError::failed(format!("{} row {n}: {what}", path.display()));
            let image = row
                .get("image_path")
                .or_else(|| row.get("image"))
                .and_then(Value::as_str)
                .ok_or_else(|| at("no `image_path`"))?;
            let image_id = match row.get("image_id") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(x)) => x.to_string(),
                _ => image.to_string(),
            };
            let texts: Vec<&str> = match row.get("caption") {
                Some(Value::String(s)) => vec![s.as_str()],
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| v.as_str().ok_or_else(|| at("a caption is not a string")))
                    .collect::<Result<_, _>>()?,
                _ => return Err(at("no `caption`")),
            };
            match index.get(&image_id) {
                Some(&(i, _)) if out.images[i].split != *split => {
                    return Err(StageError::failed(format!(
                        "image `{image_id}` is in both the {} and the {split} split",
                        out.images[i].split
                    )));
                }
                Some(&(i, first)) if out.images[i].path != image => {
                    return Err(two_files(
                        path,
                        &image_id,
                        (first, &out.images[i].path),
                        (n, image),
                        Some("image_id"),
                    ));
                }
                Some(_) => {}
                None => {
                    index.insert(image_id.clone(), (out.images.len(), n));
                    out.images.push(RawImage {
                        id: image_id.clone(),
                        path: image.to_string(),
                        split: split.clone(),
                        label: None,
                        size: None,
                    });
                }
            }
            for text in texts {
                let k = per_image.entry(image_id.clone()).or_insert(0);
                out.captions.push(RawCaption {
                    id: format!("{image_id}#{k}"),
                    image_id: image_id.clone(),
                    text: text.to_string(),
                });
                *k += 1;
            }
        }
    }
    Ok(out)
}

/// Column names of a `table`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Columns {
    /// Image path, relative to the image root.
    pub image: String,
    pub caption: String,
    pub split: Option<String>,
    pub image_id: Option<String>,
    pub caption_id: Option<String>,
    pub label: Option<String>,
}

/// Rows of a table as optional strings, by column name.
struct Rows {
    names: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

fn read_rows(path: &Path, delimiter: Option<u8>) -> Result<Rows, StageError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "parquet" => read_parquet(path),
        "jsonl" | "ndjson" => read_jsonl(path),
        _ => {
            let delim = delimiter.unwrap_or(if ext == "tsv" { b'\t' } else { b',' });
            let mut r = csv::ReaderBuilder::new()
                .delimiter(delim)
                .from_path(path)
                .map_err(|e| StageError::failed(format!("reading {}: {e}", path.display())))?;
            let names = r
                .headers()
                .map_err(|e| StageError::failed(format!("{}: {e}", path.display())))?
                .iter()
                .map(str::to_string)
                .collect();
            let mut rows = Vec::new();
            for rec in r.records() {
                let rec =
                    rec.map_err(|e| StageError::failed(format!("{}: {e}", path.display())))?;
                rows.push(rec.iter().map(|v| Some(v.to_string())).collect());
            }
            Ok(Rows { names, rows })
        }
    }
}

fn read_jsonl(path: &Path) -> Result<Rows, StageError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    let mut names: Vec<String> = Vec::new();
    let mut objects = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Map<String, Value> = serde_json::from_str(line)
            .map_err(|e| StageError::failed(format!("{} line {}: {e}", path.display(), n + 1)))?;
        for k in v.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
        objects.push(v);
    }
    let rows = objects
        .iter()
        .map(|o| {
            names
                .iter()
                .map(|k| match o.get(k) {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(other) => Some(other.to_string()),
                })
                .collect()
        })
        .collect();
    Ok(Rows { names, rows })
}

fn read_parquet(path: &Path) -> Result<Rows, StageError> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let err =
        |e: &dyn std::fmt::Display| StageError::failed(format!("reading {}: {e}", path.display()));
    let file =
        File::open(path).map_err(|e| StageError::io(format!("opening {}", path.display()), e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| err(&e))?
        .build()
        .map_err(|e| err(&e))?;
    let mut names = Vec::new();
    let mut rows = Vec::new();
    for batch in reader {
        let batch: RecordBatch = batch.map_err(|e| err(&e))?;
        if names.is_empty() {
            names = batch
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
        }
        let cols: Vec<Vec<Option<String>>> = batch
            .columns()
            .iter()
            .map(|c| column_strings(c.as_ref()))
            .collect::<Result<_, _>>()
            .map_err(|e| err(&e))?;
        for r in 0..batch.num_rows() {
            rows.push(cols.iter().map(|c| c[r].clone()).collect());
        }
    }
    Ok(Rows { names, rows })
}

/// A Parquet column as strings (text and integer columns).
fn column_strings(a: &dyn Array) -> Result<Vec<Option<String>>, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type, UInt32Type, UInt64Type};
    use arrow_schema::DataType as D;
    let n = a.len();
    let get = |i: usize, f: &dyn Fn(usize) -> String| if a.is_null(i) { None } else { Some(f(i)) };
    Ok(match a.data_type() {
        D::Utf8 => (0..n)
            .map(|i| get(i, &|i| a.as_string::<i32>().value(i).to_string()))
            .collect(),
        D::LargeUtf8 => (0..n)
            .map(|i| get(i, &|i| a.as_string::<i64>().value(i).to_string()))
            .collect(),
        D::Utf8View => (0..n)
            .map(|i| get(i, &|i| a.as_string_view().value(i).to_string()))
            .collect(),
        D::Int64 => (0..n)
            .map(|i| get(i, &|i| a.as_primitive::<Int64Type>().value(i).to_string()))
            .collect(),
        D::Int32 => (0..n)
            .map(|i| get(i, &|i| a.as_primitive::<Int32Type>().value(i).to_string()))
            .collect(),
        D::UInt64 => (0..n)
            .map(|i| get(i, &|i| a.as_primitive::<UInt64Type>().value(i).to_string()))
            .collect(),
        D::UInt32 => (0..n)
            .map(|i| get(i, &|i| a.as_primitive::<UInt32Type>().value(i).to_string()))
            .collect(),
        other => {
            return Err(format!(
                "column type {other} is not supported (use text or integers)"
            ));
        }
    })
}

/// One image id given to two different files: the rows would be merged into one image and the
/// second file silently lost, so it is an error whatever `on_error` says.
fn two_files(
    table: &Path,
    id: &str,
    (first_row, first): (usize, &str),
    (row, second): (usize, &str),
    id_column: Option<&str>,
) -> StageError {
    StageError::failed_with_hint(
        format!(
            "{} row {row}: image id `{id}` names two files: `{first}` (row {first_row}) and `{second}`",
            table.display()
        ),
        match id_column {
            Some(c) => format!(
                "every file needs its own id in column `{c}`; captions of one image repeat both its id and its file"
            ),
            None => "every file needs its own image id; captions of one image repeat both its id and its file".into(),
        },
    )
}

/// A caption table.
pub fn table(
    path: &Path,
    columns: &Columns,
    default_split: &str,
    delimiter: Option<u8>,
) -> Result<RawDataset, StageError> {
    let rows = read_rows(path, delimiter)?;
    let col = |name: &Option<String>, role: &str| -> Result<Option<usize>, StageError> {
        match name {
            None => Ok(None),
            Some(n) => rows
                .names
                .iter()
                .position(|c| c == n)
                .map(Some)
                .ok_or_else(|| {
                    let names: Vec<&str> = rows.names.iter().map(String::as_str).collect();
                    StageError::failed_with_hint(
                        format!("{} has no column `{n}` (the {role} column)", path.display()),
                        match crate::api::closest(n, &names) {
                            Some(c) => format!("did you mean `{c}`? columns: {}", names.join(", ")),
                            None => format!("columns: {}", names.join(", ")),
                        },
                    )
                }),
        }
    };
    let image = col(&Some(columns.image.clone()), "image")?.expect("given");
    let caption = col(&Some(columns.caption.clone()), "caption")?.expect("given");
    let split = col(&columns.split, "split")?;
    let image_id = col(&columns.image_id, "image id")?;
    let caption_id = col(&columns.caption_id, "caption id")?;
    let label = col(&columns.label, "label")?;

    let mut out = RawDataset::default();
    // Image id → (its index in `out.images`, the first row naming it).
    let mut index: HashMap<String, (usize, usize)> = HashMap::new();
    for (n, row) in rows.rows.iter().enumerate() {
        let cell = |c: usize| row.get(c).cloned().flatten();
        let line = n + 1;
        let image_path = cell(image).filter(|s| !s.is_empty()).ok_or_else(|| {
            StageError::failed(format!(
                "{} row {line}: empty `{}`",
                path.display(),
                columns.image
            ))
        })?;
        let id = image_id
            .and_then(cell)
            .unwrap_or_else(|| image_path.clone());
        let row_split = split
            .and_then(cell)
            .unwrap_or_else(|| default_split.to_string());
        match index.get(&id) {
            Some(&(i, _)) if out.images[i].split != row_split => {
                return Err(StageError::failed(format!(
                    "{} row {line}: image `{id}` is in both the {} and the {row_split} split",
                    path.display(),
                    out.images[i].split
                )));
            }
            Some(&(i, first)) if out.images[i].path != image_path => {
                return Err(two_files(
                    path,
                    &id,
                    (first, &out.images[i].path),
                    (line, &image_path),
                    image_id
                        .is_some()
                        .then_some(columns.image_id.as_deref())
                        .flatten(),
                ));
            }
            Some(_) => {}
            None => {
                index.insert(id.clone(), (out.images.len(), line));
                out.images.push(RawImage {
                    id: id.clone(),
                    path: image_path,
                    split: row_split,
                    label: label.and_then(cell),
                    size: None,
                });
            }
        }
        let cid = caption_id
            .and_then(cell)
            .unwrap_or_else(|| format!("row{line}"));
        out.captions.push(RawCaption {
            id: cid,
            image_id: id,
            text: cell(caption).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// `positives: {eccv: DIR, split: test}`: the ECCV Caption extended positives.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PositivesConfig {
    /// A folder holding the `eccv-caption` package's `eccv_image_to_caption.json` and
    /// `eccv_caption_to_image.json` (e.g. a `download` stage with a pip source).
    pub eccv: String,
    /// The split the maps describe (the COCO 5K test split).
    #[serde(default = "default_positive_split")]
    pub split: String,
}

fn default_positive_split() -> String {
    "test".into()
}

/// Reads the ECCV Caption maps (COCO image ids → COCO caption annotation ids and back; the
/// Karpathy import uses the same ids: `cocoid`, `sentid`) and keeps the pairs whose both ids are
/// in `split` of `raw`. Returns the positives and, if some ids are not in the split, what was left out.
pub fn eccv_positives(
    dir: &Path,
    split: &str,
    raw: &RawDataset,
) -> Result<(Vec<super::normal::Positive>, Option<Dropped>), StageError> {
    use std::collections::{BTreeMap, HashSet};
    let images: HashSet<&str> = raw
        .images
        .iter()
        .filter(|i| i.split == split)
        .map(|i| i.id.as_str())
        .collect();
    let split_of_image: HashMap<&str, &str> = raw
        .images
        .iter()
        .map(|i| (i.id.as_str(), i.split.as_str()))
        .collect();
    let captions: HashSet<&str> = raw
        .captions
        .iter()
        .filter(|c| split_of_image.get(c.image_id.as_str()) == Some(&split))
        .map(|c| c.id.as_str())
        .collect();
    if images.is_empty() {
        return Err(StageError::failed_with_hint(
            format!("the dataset has no `{split}` split to put the ECCV positives on"),
            "ECCV Caption describes the COCO 5K test split of the Karpathy splits",
        ));
    }
    let mut out = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    for (file, kind, query_set, positive_set) in [
        ("eccv_image_to_caption.json", "image", &images, &captions),
        ("eccv_caption_to_image.json", "caption", &captions, &images),
    ] {
        let path = dir.join(file);
        let map: BTreeMap<String, Vec<Value>> = serde_json::from_slice(&read_json(&path).map_err(|_| {
            StageError::failed_with_hint(
                format!("{} is missing", path.display()),
                "`positives.eccv` is the folder with the eccv-caption package's JSON maps (members eccv_caption/data/eccv_*.json)",
            )
        })?)
        .map_err(|e| bad_json(&path, e, "ECCV Caption map"))?;
        for (query, positives) in map {
            if !query_set.contains(query.as_str()) {
                missing.push(format!("{kind} {query}"));
                continue;
            }
            for p in positives {
                let p = match p {
                    Value::Number(n) => n.to_string(),
                    Value::String(s) => s,
                    other => {
                        return Err(StageError::failed(format!(
                            "{}: `{other}` is not an id",
                            path.display()
                        )));
                    }
                };
                if positive_set.contains(p.as_str()) {
                    out.push(super::normal::Positive {
                        query_kind: kind,
                        query_id: query.clone(),
                        positive_id: p,
                    });
                } else {
                    missing.push(format!("{kind} {query} → {p}"));
                }
            }
        }
    }
    let dropped = (!missing.is_empty()).then(|| Dropped {
        reason: format!("ECCV positive not in the {split} split"),
        count: missing.len(),
        first: missing.iter().take(5).cloned().collect(),
    });
    Ok((out, dropped))
}
