//! Reading a `dataset` stage's normal form back: the tables other stages consume (teachers,
//! soft labels, training, evaluation). Rows of a split come sorted by id, the order every
//! downstream file uses.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::{Array, StringArray};
use serde_json::Value;

use crate::api::StageError;

/// Text columns `columns` of `table` for one split (or `all`), rows sorted by the first column.
fn read_columns<const N: usize>(
    path: &Path,
    split: &str,
    columns: [&str; N],
) -> Result<Vec<[String; N]>, StageError> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = File::open(path).map_err(|e| {
        StageError::failed_with_hint(
            format!("cannot open {}: {e}", path.display()),
            "the `dataset` input must be a dataset stage's output",
        )
    })?;
    let err =
        |e: &dyn std::fmt::Display| StageError::failed(format!("reading {}: {e}", path.display()));
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| err(&e))?
        .build()
        .map_err(|e| err(&e))?;
    let mut rows: Vec<[String; N]> = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| err(&e))?;
        let col = |name: &str| -> Result<StringArray, StageError> {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
                .ok_or_else(|| {
                    StageError::failed(format!("{} has no text column `{name}`", path.display()))
                })
        };
        // A table without splits (positives) is read whole.
        let splits = if split == "all" {
            None
        } else {
            Some(col("split")?)
        };
        let cols = columns
            .iter()
            .map(|c| col(c))
            .collect::<Result<Vec<_>, _>>()?;
        for i in 0..batch.num_rows() {
            if splits.as_ref().is_none_or(|s| s.value(i) == split) {
                rows.push(std::array::from_fn(|k| cols[k].value(i).to_string()));
            }
        }
    }
    rows.sort_by(|a, b| a[0].cmp(&b[0]));
    Ok(rows)
}

/// Caption ids and cleaned texts of a split, in id order.
pub fn captions_text(
    dataset: &Path,
    split: &str,
) -> Result<(Vec<String>, Vec<String>), StageError> {
    Ok(read_columns(
        &dataset.join("captions.parquet"),
        split,
        ["caption_id", "text_clean"],
    )?
    .into_iter()
    .map(|[id, text]| (id, text))
    .unzip())
}

/// One caption of a split.
#[derive(Debug, Clone)]
pub struct CaptionRow {
    pub caption_id: String,
    pub image_id: String,
    pub text: String,
}

/// Class labels of a split's images (`images.parquet`'s optional `label` column), by image
/// id; `None` when the dataset has no labels. Images without a label are left out.
pub fn image_labels(
    dataset: &Path,
    split: &str,
) -> Result<Option<std::collections::HashMap<String, String>>, StageError> {
    let path = dataset.join("images.parquet");
    let has_label = File::open(&path)
        .ok()
        .and_then(|f| {
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).ok()
        })
        .is_some_and(|b| b.schema().column_with_name("label").is_some());
    if !has_label {
        return Ok(None);
    }
    let rows = read_columns(&path, split, ["image_id", "label"])?;
    Ok(Some(
        rows.into_iter()
            .filter(|[_, label]| !label.is_empty())
            .map(|[id, label]| (id, label))
            .collect(),
    ))
}

/// Captions of a split with their image, in caption-id order.
pub fn captions(dataset: &Path, split: &str) -> Result<Vec<CaptionRow>, StageError> {
    Ok(read_columns(
        &dataset.join("captions.parquet"),
        split,
        ["caption_id", "image_id", "text_clean"],
    )?
    .into_iter()
    .map(|[caption_id, image_id, text]| CaptionRow {
        caption_id,
        image_id,
        text,
    })
    .collect())
}

/// The extended positives (`query_kind`, `query_id`, `positive_id`), when the dataset has them.
pub fn positives(dataset: &Path) -> Result<Option<Vec<[String; 3]>>, StageError> {
    let path = dataset.join("positives.parquet");
    if !path.exists() {
        return Ok(None);
    }
    read_columns(&path, "all", ["query_kind", "query_id", "positive_id"]).map(Some)
}

/// Image ids and paths (relative to the dataset's image root) of a split, in id order.
pub fn images(dataset: &Path, split: &str) -> Result<Vec<(String, String)>, StageError> {
    Ok(
        read_columns(&dataset.join("images.parquet"), split, ["image_id", "path"])?
            .into_iter()
            .map(|[id, path]| (id, path))
            .collect(),
    )
}

/// The settings a `scenes` dataset was generated with (its report.json's `scenes`), from
/// which its exact content follows; `None` for any other dataset.
pub fn scenes_settings(dataset: &Path) -> Result<Option<super::scenes::ScenesConfig>, StageError> {
    let report = report(dataset)?;
    if report["format"].as_str() != Some("scenes") {
        return Ok(None);
    }
    serde_json::from_value(report["scenes"].clone())
        .map(Some)
        .map_err(|e| {
            StageError::failed_with_hint(
                format!(
                    "{}/report.json records no readable scenes settings: {e}",
                    dataset.display()
                ),
                "it was written by an older cusa-pipe: rerun the dataset stage (`run --force`)",
            )
        })
}

/// Caption ids with their raw (uncleaned) text, all splits, in id order.
pub fn captions_raw(dataset: &Path) -> Result<Vec<(String, String)>, StageError> {
    Ok(read_columns(
        &dataset.join("captions.parquet"),
        "all",
        ["caption_id", "text"],
    )?
    .into_iter()
    .map(|[id, text]| (id, text))
    .collect())
}

/// A dataset stage's report.json (its settings, counts and dropped rows).
fn report(dataset: &Path) -> Result<Value, StageError> {
    std::fs::read(dataset.join("report.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            StageError::failed(format!(
                "{} has no readable report.json: is it a dataset stage's output?",
                dataset.display()
            ))
        })
}

/// How a dataset's captions were cleaned (its report.json's `clean` and `max_words`), in words
/// for whoever embeds new text with a model trained on them.
pub fn text_cleaning(dataset: &Path) -> Result<Value, StageError> {
    let report = report(dataset)?;
    let clean: Option<super::clean::Clean> = serde_json::from_value(report["clean"].clone()).ok();
    let max_words = report["max_words"].as_u64().unwrap_or(0) as usize;
    Ok(serde_json::json!({
        "dataset_clean": report["clean"],
        "max_words": report["max_words"],
        "rule": clean.map_or_else(
            || "not recorded in the dataset's report.json".to_string(),
            |c| c.rule(max_words),
        ),
        "then": "CLIPTokenizer's own normalisation (ftfy fixes, HTML unescape, whitespace collapsed, lower-case)",
    }))
}

/// Where a dataset's image paths are relative to (its report.json says).
pub fn image_root(dataset: &Path, given: Option<PathBuf>) -> Result<PathBuf, StageError> {
    let report = report(dataset)?;
    match (report["image_root"].as_str(), given) {
        (Some("output"), _) => Ok(dataset.to_path_buf()),
        (_, Some(root)) => Ok(root),
        (Some("input"), None) => Err(StageError::failed_with_hint(
            "the dataset's image paths are relative to its `images:` input",
            "give this stage the same folder: `images: ${inputs.images}`",
        )),
        _ => Err(StageError::failed_with_hint(
            "the dataset was imported without an image root",
            "add `images:` to the dataset stage",
        )),
    }
}
