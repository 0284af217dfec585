//! Text teachers: `tokenizer.json` + an ONNX encoder → one vector per caption.
//!
//! Tokenisation uses the `tokenizers` crate with padding off and explicit truncation at
//! `max_length`. Captions are batched by token length (shortest first) so a batch pads to
//! nearly its own length, not the longest caption of the dataset; results go back to the
//! caption order. Inputs are found by name (`input_ids`, `attention_mask`, `token_type_ids`
//! when the model has it) and must be int64.

use ort::session::Session;
use ort::value::{Tensor, TensorElementType, ValueType};
use tokenizers::{Tokenizer, TruncationParams};

use super::{Pooling, pooled_output};
use crate::api::{StageContext, StageError};

/// Loads `tokenizer.json` with padding off and truncation at `max_length`.
pub fn tokenizer(path: &std::path::Path, max_length: usize) -> Result<Tokenizer, StageError> {
    let mut tok = Tokenizer::from_file(path).map_err(|e| {
        StageError::failed_with_hint(
            format!("{} is not a tokenizer.json: {e}", path.display()),
            "the `tokenizer` input must be a Hugging Face tokenizer.json",
        )
    })?;
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        max_length,
        ..TruncationParams::default()
    }))
    .map_err(|e| StageError::failed(format!("tokenizer truncation: {e}")))?;
    Ok(tok)
}

/// Refuses a tokenizer that can produce ids beyond the model's token-embedding table (found by
/// [`super::onnx_edit::embedding_rows`]); a table larger than the vocabulary is fine (models pad
/// their vocabulary to a multiple of 8 or 64). When the table cannot be traced the check is left
/// to inference, whose error says the same.
pub fn check_vocabulary(
    tok: &Tokenizer,
    tok_path: &std::path::Path,
    model: &[u8],
    model_path: &std::path::Path,
) -> Result<(), StageError> {
    let Some(max_id) = tok.get_vocab(true).into_values().max() else {
        return Err(StageError::failed(format!(
            "{} has an empty vocabulary",
            tok_path.display()
        )));
    };
    let Ok(Some((table, rows))) = super::onnx_edit::embedding_rows(model, "input_ids") else {
        return Ok(());
    };
    if u64::from(max_id) >= rows {
        return Err(StageError::failed_with_hint(
            format!(
                "{} does not match {}: the tokenizer has ids up to {max_id} ({} tokens), the model's token embedding `{table}` has {rows} rows",
                tok_path.display(),
                model_path.display(),
                tok.get_vocab_size(true)
            ),
            "use the tokenizer.json that was published with this model",
        ));
    }
    Ok(())
}

/// The model's text inputs, checked.
struct Inputs {
    ids: String,
    mask: Option<String>,
    types: Option<String>,
}

fn inputs(session: &Session) -> Result<Inputs, StageError> {
    let names: Vec<String> = session
        .inputs()
        .iter()
        .map(|i| i.name().to_string())
        .collect();
    for input in session.inputs() {
        match input.dtype() {
            ValueType::Tensor {
                ty: TensorElementType::Int64,
                shape,
                ..
            } if shape.len() == 2 => {}
            other => {
                return Err(StageError::failed_with_hint(
                    format!(
                        "model input `{}` is {other}, expected a 2-D int64 tensor (batch × tokens)",
                        input.name()
                    ),
                    "a text teacher takes token ids: input_ids, attention_mask, token_type_ids",
                ));
            }
        }
    }
    let find = |n: &str| names.iter().find(|x| *x == n).cloned();
    let ids = find("input_ids").ok_or_else(|| {
        StageError::failed_with_hint(
            format!(
                "the model has no `input_ids` input (inputs: {})",
                names.join(", ")
            ),
            "is this a text model?",
        )
    })?;
    let known = ["input_ids", "attention_mask", "token_type_ids"];
    if let Some(extra) = names.iter().find(|n| !known.contains(&n.as_str())) {
        return Err(StageError::failed(format!(
            "the model needs an input `{extra}` that a text teacher cannot provide"
        )));
    }
    Ok(Inputs {
        ids,
        mask: find("attention_mask"),
        types: find("token_type_ids"),
    })
}

/// Embeds `texts`; returns one row of `dim` floats per text, in order.
pub fn embed(
    session: &mut Session,
    tok: &Tokenizer,
    texts: &[String],
    output: &str,
    pooling: Pooling,
    batch_size: usize,
    ctx: &StageContext<'_>,
) -> Result<TextEmbedded, StageError> {
    let inputs = inputs(session)?;
    let vocab = tok.get_vocab_size(true);
    let started = std::time::Instant::now();
    let encodings = tok
        .encode_batch(texts.to_vec(), true)
        .map_err(|e| StageError::failed(format!("tokenizing: {e}")))?;
    let truncated = encodings
        .iter()
        .filter(|e| !e.get_overflowing().is_empty())
        .count();
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| (encodings[i].get_ids().len(), i));
    ctx.progress.set_items(Some(texts.len() as u64));
    let mut rows: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
    let mut dim = 0;
    let mut done = 0u64;
    for chunk in order.chunks(batch_size.max(1)) {
        if ctx.cancel.is_cancelled() {
            return Err(StageError::Cancelled);
        }
        let len = chunk
            .iter()
            .map(|&i| encodings[i].get_ids().len())
            .max()
            .unwrap_or(1)
            .max(1);
        let b = chunk.len();
        let mut ids = vec![0i64; b * len];
        let mut mask = vec![0i64; b * len];
        for (r, &i) in chunk.iter().enumerate() {
            for (t, (&id, &m)) in encodings[i]
                .get_ids()
                .iter()
                .zip(encodings[i].get_attention_mask())
                .enumerate()
            {
                ids[r * len + t] = id as i64;
                mask[r * len + t] = m as i64;
            }
        }
        let shape = [b, len];
        let tensor = |data: Vec<i64>| {
            Tensor::from_array((shape, data))
                .map_err(|e| StageError::failed(format!("building an input tensor: {e}")))
        };
        let mut feed: Vec<(String, ort::value::DynValue)> =
            vec![(inputs.ids.clone(), tensor(ids)?.into_dyn())];
        if let Some(m) = &inputs.mask {
            feed.push((m.clone(), tensor(mask.clone())?.into_dyn()));
        }
        if let Some(t) = &inputs.types {
            feed.push((t.clone(), tensor(vec![0i64; b * len])?.into_dyn()));
        }
        let outputs = session.run(feed).map_err(|e| {
            StageError::failed_with_hint(
                format!("inference failed: {e}"),
                format!("if token ids are out of range, the tokenizer (vocabulary {vocab}) does not match the model"),
            )
        })?;
        let pooled = pooled_output(&outputs, output, Some(&mask), pooling)?;
        dim = pooled.len() / b;
        for (r, &i) in chunk.iter().enumerate() {
            rows[i] = pooled[r * dim..(r + 1) * dim].to_vec();
        }
        done += b as u64;
        ctx.progress.set_position(done);
    }
    Ok(TextEmbedded {
        data: rows.concat(),
        dim,
        truncated,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What text embedding produced.
pub struct TextEmbedded {
    pub data: Vec<f32>,
    pub dim: usize,
    /// Captions longer than `max_length` tokens.
    pub truncated: usize,
    /// Time spent in batching, inference and pooling.
    pub seconds: f64,
}
