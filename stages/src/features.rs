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
use arrow_schema::{DataType, Field, Schema};

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

/// Writes `features.arrow`.
pub fn write(
    path: &Path,
    ids: &[String],
    data: &[f32],
    dim: usize,
    precision: Precision,
    meta: HashMap<String, String>,
) -> Result<(), StageError> {
    let err =
        |e: &dyn std::fmt::Display| StageError::failed(format!("writing {}: {e}", path.display()));
    let (item, values): (DataType, ArrayRef) = match precision {
        Precision::F32 => (
            DataType::Float32,
            Arc::new(Float32Array::from(data.to_vec())),
        ),
        Precision::F16 => (
            DataType::Float16,
            Arc::new(Float16Array::from(
                data.iter()
                    .map(|v| half::f16::from_f32(*v))
                    .collect::<Vec<_>>(),
            )),
        ),
    };
    let item_field = Arc::new(Field::new("item", item, false));
    let list = FixedSizeListArray::try_new(item_field.clone(), dim as i32, values, None)
        .map_err(|e| err(&e))?;
    let schema = Arc::new(
        Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new(
                "embedding",
                DataType::FixedSizeList(item_field, dim as i32),
                false,
            ),
        ])
        .with_metadata(meta),
    );
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(StringArray::from_iter_values(ids)), Arc::new(list)],
    )
    .map_err(|e| err(&e))?;
    let file = File::create(path)
        .map_err(|e| StageError::io(format!("creating {}", path.display()), e))?;
    let mut w = arrow_ipc::writer::FileWriter::try_new(file, &schema).map_err(|e| err(&e))?;
    w.write(&batch).map_err(|e| err(&e))?;
    w.finish().map_err(|e| err(&e))?;
    debug_assert_eq!(batch.column(1).len(), ids.len());
    Ok(())
}
