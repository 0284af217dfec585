//! Inference: a split's unit-length embeddings through a trained (or training) student, for
//! validation and for `eval`.
//!
//! Invariants:
//! * no gradients (callers pass an inner-backend student), chunks of 512 rows, so memory does
//!   not grow with the split;
//! * every returned row is L2-normalised; guides run in inference mode (running statistics);
//! * `selfalign-concat` is the reference's retrieval vector, [h ; ½·ctx ; ½·m̄] for images and
//!   [h ; m̄ ; ctx] for captions (h the cross embedding, ctx the guide, m̄ the mean of the valid
//!   locals, each part unit length before weighting), so an image–caption cosine is
//!   (h·h′ + ½ ctx·m̄′ + ½ m̄·ctx′) over the norms: three times the width of `global`.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use super::loss::l2_normalize;
use super::student::{Encoded, SplitInputs, Student};

/// Which of a student's heads embeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// The cross-modal heads (retrieval).
    Cross,
    /// The uni-modal heads (USA), which a student trained without USA does not have.
    Uni,
}

/// The retrieval embedding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Embedding {
    /// The cross head's output.
    #[default]
    Global,
    /// SelfAlign's concatenation of the cross embedding, the guide and the mean of the locals
    /// (needs a student trained with `cra`).
    SelfalignConcat,
}

/// Why a student cannot give an embedding.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(
        "`embedding: selfalign-concat` needs a student trained with `loss.cra` (its guide heads make the context part); this one has none"
    )]
    NoGuides,
}

/// One chunk's rows of `embedding` (not yet unit length).
fn rows_of<B: Backend, S: Student<B>>(
    model: &S,
    encoded: Encoded<B>,
    images: bool,
    embedding: Embedding,
    head: Head,
) -> Result<Option<Tensor<B, 2>>, EmbedError> {
    match (head, embedding) {
        (Head::Uni, _) => Ok(encoded.uni),
        (Head::Cross, Embedding::Global) => Ok(Some(encoded.cross)),
        (Head::Cross, Embedding::SelfalignConcat) => {
            let guides = model
                .selfalign()
                .and_then(|s| Some((s.image_guide.as_ref()?, s.text_guide.as_ref()?)));
            let (Some((gi, gt)), Some(locals)) = (guides, encoded.locals) else {
                return Err(EmbedError::NoGuides);
            };
            let mean = locals.mean();
            let h = l2_normalize(encoded.cross);
            let parts = if images {
                let ctx = l2_normalize(gi.forward_eval(mean.clone()));
                vec![h, ctx * 0.5, l2_normalize(mean) * 0.5]
            } else {
                let ctx = l2_normalize(gt.forward_eval(mean.clone()));
                vec![h, l2_normalize(mean), ctx]
            };
            Ok(Some(Tensor::cat(parts, 1)))
        }
    }
}

/// Unit-length embeddings (rows, dim) of all of a split's images (`images`) or captions through
/// `head` (the cross head as `embedding`), in chunks of 512; `None` when the student has no
/// such head.
pub fn embed_rows<B: Backend, S: Student<B>>(
    model: &S,
    inputs: &S::Inputs,
    device: &B::Device,
    images: bool,
    head: Head,
    embedding: Embedding,
) -> Result<Option<(Vec<f32>, usize)>, EmbedError> {
    let (mut out, mut dim) = (Vec::new(), 0);
    let n = if images {
        inputs.images()
    } else {
        inputs.captions()
    };
    for start in (0..n).step_by(512) {
        let idx: Vec<usize> = (start..(start + 512).min(n)).collect();
        let encoded = if images {
            model.encode_images(inputs, &idx, device)
        } else {
            model.encode_texts(inputs, &idx, device)
        };
        let Some(rows) = rows_of(model, encoded, images, embedding, head)? else {
            return Ok(None);
        };
        let rows = l2_normalize(rows);
        dim = rows.dims()[1];
        let values = rows.into_data().convert::<f32>();
        out.extend_from_slice(
            values
                .as_slice::<f32>()
                .expect("converted to f32 just above"),
        );
    }
    Ok(Some((out, dim)))
}

/// Unit-length retrieval embeddings (images, captions, dim) of a split.
pub fn embed_split<B: Backend, S: Student<B>>(
    model: &S,
    inputs: &S::Inputs,
    device: &B::Device,
    embedding: Embedding,
) -> Result<(Vec<f32>, Vec<f32>, usize), EmbedError> {
    let cross = |images| {
        embed_rows(model, inputs, device, images, Head::Cross, embedding)
            .map(|r| r.expect("every student has cross heads"))
    };
    let ((i, dim), (t, _)) = (cross(true)?, cross(false)?);
    Ok((i, t, dim))
}
