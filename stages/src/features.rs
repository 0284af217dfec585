//! The feature file format shared by teachers (which write it) and the stages that read
//! teacher vectors (soft labels, feature-head students): Arrow IPC with an `id` column and an
//! `embedding` FixedSizeList of Float32 or Float16, rows in id order, schema metadata saying
//! where the vectors came from.
//!
//! Invariant: a reader gets f32 rows whatever the stored precision, and a file whose shape is
//! not this one is an error naming the file, never an empty or zero-filled table.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, FixedSizeListArray, Float16Array, Float32Array, RecordBatch, StringArray,
};
use arrow_schema::{Field, Schema};

use crate::api::StageError;
use crate::teacher::Precision;

/// Vectors by id, as read from a feature file.
#[derive(Debug, Clone)]
pub struct Features {
    pub ids: Vec<String>,
    /// Row-major, `ids.len() × dim`.
    pub data: Vec<f32>,
    pub dim: usize,
    pub metadata: HashMap<String, String>,
}

impl Features {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// id → row index.
    pub fn index(&self) -> HashMap<&str, usize> {
        self.ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i))
            .collect()
    }
}

/// Reads a feature file (any precision) into f32 rows.
pub fn read(path: &Path) -> Result<Features, StageError> {
    let bad = |what: String| {
        StageError::failed_with_hint(
            format!("{} is not a feature file: {what}", path.display()),
            "pass a `teacher` stage's features.arrow",
        )
    };
    let file = File::open(path).map_err(|e| {
        StageError::failed_with_hint(
            format!("cannot open {}: {e}", path.display()),
            "pass a `teacher` stage's features.arrow",
        )
    })?;
    let reader = arrow_ipc::reader::FileReader::try_new(std::io::BufReader::new(file), None)
        .map_err(|e| bad(e.to_string()))?;
    let metadata: HashMap<String, String> = reader.schema().metadata().clone().into();
    let mut out = Features {
        ids: Vec::new(),
        data: Vec::new(),
        dim: 0,
        metadata,
    };
    for batch in reader {
        let batch = batch.map_err(|e| bad(e.to_string()))?;
        let ids = batch
            .column_by_name("id")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| bad("no text column `id`".into()))?;
        let list = batch
            .column_by_name("embedding")
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
            .ok_or_else(|| bad("no FixedSizeList column `embedding`".into()))?;
        out.dim = list.value_length() as usize;
        let values = list.values();
        if let Some(v) = values.as_any().downcast_ref::<Float32Array>() {
            out.data.extend_from_slice(v.values());
        } else if let Some(v) = values.as_any().downcast_ref::<Float16Array>() {
            out.data.extend(v.values().iter().map(|x| x.to_f32()));
        } else {
            return Err(bad(format!("embedding items are {}", values.data_type())));
        }
        out.ids
            .extend(ids.iter().map(|s| s.unwrap_or_default().to_string()));
    }
    if out.data.len() != out.ids.len() * out.dim {
        return Err(bad("embedding rows and ids differ in number".into()));
    }
    Ok(out)
}

/// Rows of `dim` values as a FixedSizeList column of `values`' type.
pub fn fixed_rows(values: ArrayRef, dim: usize) -> Result<FixedSizeListArray, String> {
    let item = Arc::new(Field::new("item", values.data_type().clone(), false));
    FixedSizeListArray::try_new(item, dim as i32, values, None).map_err(|e| e.to_string())
}

/// Writes one record batch of `columns` (name, values) as an Arrow IPC file with `meta`.
pub fn write_ipc(
    path: &Path,
    columns: Vec<(&str, ArrayRef)>,
    meta: HashMap<String, String>,
) -> Result<(), StageError> {
    let err =
        |e: &dyn std::fmt::Display| StageError::failed(format!("writing {}: {e}", path.display()));
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, values)| Field::new(*name, values.data_type().clone(), false))
        .collect();
    let schema = Arc::new(Schema::new(fields).with_metadata(meta));
    let batch = RecordBatch::try_new(schema.clone(), columns.into_iter().map(|c| c.1).collect())
        .map_err(|e| err(&e))?;
    let file = File::create(path)
        .map_err(|e| StageError::io(format!("creating {}", path.display()), e))?;
    let mut w = arrow_ipc::writer::FileWriter::try_new(file, &schema).map_err(|e| err(&e))?;
    w.write(&batch).map_err(|e| err(&e))?;
    w.finish().map_err(|e| err(&e))
}

/// Writes a feature file: `id`, any `extra` text columns (e.g. a caption's `image_id`), then
/// `embedding` in `precision`.
pub fn write(
    path: &Path,
    ids: &[&str],
    extra: Vec<(&str, &[&str])>,
    data: &[f32],
    dim: usize,
    precision: Precision,
    meta: HashMap<String, String>,
) -> Result<(), StageError> {
    let values: ArrayRef = match precision {
        Precision::F32 => Arc::new(Float32Array::from(data.to_vec())),
        Precision::F16 => Arc::new(Float16Array::from(
            data.iter()
                .map(|v| half::f16::from_f32(*v))
                .collect::<Vec<_>>(),
        )),
    };
    let embedding = fixed_rows(values, dim)
        .map_err(|e| StageError::failed(format!("writing {}: {e}", path.display())))?;
    let mut columns: Vec<(&str, ArrayRef)> =
        vec![("id", Arc::new(StringArray::from_iter_values(ids)))];
    for (name, values) in extra {
        columns.push((name, Arc::new(StringArray::from_iter_values(values))));
    }
    columns.push(("embedding", Arc::new(embedding)));
    write_ipc(path, columns, meta)
}
