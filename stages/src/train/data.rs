//! The tensors a training run needs, read once: backbone features of the training and
//! validation items, and the teachers' soft-label vectors aligned to the training captions.

use std::collections::HashMap;
use std::path::Path;

use crate::api::{StageContext, StageError};
use crate::features::{self, Features};

/// Row-major f32 rows.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub data: Vec<f32>,
    pub dim: usize,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
    /// The rows `idx`, concatenated.
    pub fn gather(&self, idx: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            out.extend_from_slice(self.row(i));
        }
        out
    }
}

/// One split: its images and captions, with the caption → image map.
pub struct Split {
    pub image_ids: Vec<String>,
    pub caption_ids: Vec<String>,
    /// Row of each caption's image in `image_ids`.
    pub image_of: Vec<usize>,
    /// Backbone input of each image / caption (feature-heads: precomputed features).
    pub images: Rows,
    pub captions: Rows,
}

/// Everything a run reads.
pub struct TrainingData {
    pub train: Split,
    pub val: Split,
    /// Soft-label vectors per training image row / caption row (unit length), when CSA/USA.
    pub teacher_images: Option<Rows>,
    pub teacher_captions: Option<Rows>,
}

fn gather_by_id(
    f: &Features,
    index: &HashMap<&str, usize>,
    ids: &[String],
    what: &str,
    file: &Path,
    split: &str,
) -> Result<Rows, StageError> {
    let mut data = Vec::with_capacity(ids.len() * f.dim);
    let mut missing = Vec::new();
    for id in ids {
        match index.get(id.as_str()) {
            Some(&r) => data.extend_from_slice(f.row(r)),
            None => missing.push(id.as_str()),
        }
    }
    if !missing.is_empty() {
        return Err(StageError::failed_with_hint(
            format!(
                "{} of {} {what}s of split `{split}` have no feature in {} (first: {})",
                missing.len(),
                ids.len(),
                file.display(),
                missing[..missing.len().min(5)].join(", ")
            ),
            "extract the features with `split: all` (or covering this split); missing features are never filled with zeros",
        ));
    }
    Ok(Rows { data, dim: f.dim })
}

fn split(
    dataset: &Path,
    name: &str,
    image_features: (&Features, &Path),
    text_features: (&Features, &Path),
) -> Result<Split, StageError> {
    let images = crate::dataset::read::images(dataset, name)?;
    let captions = crate::dataset::read::captions(dataset, name)?;
    if captions.is_empty() {
        return Err(StageError::failed_with_hint(
            format!("split `{name}` of {} has no captions", dataset.display()),
            "name splits the dataset has (`split:`, `val_split:`)",
        ));
    }
    let image_ids: Vec<String> = images.into_iter().map(|(id, _)| id).collect();
    let row: HashMap<&str, usize> = image_ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut image_of = Vec::with_capacity(captions.len());
    for c in &captions {
        image_of.push(*row.get(c.image_id.as_str()).ok_or_else(|| {
            StageError::failed(format!(
                "caption `{}` points to image `{}`, which is not in split `{name}`",
                c.caption_id, c.image_id
            ))
        })?);
    }
    let caption_ids: Vec<String> = captions.into_iter().map(|c| c.caption_id).collect();
    let (fi, pi) = image_features;
    let (ft, pt) = text_features;
    let images = gather_by_id(fi, &fi.index(), &image_ids, "image", pi, name)?;
    let captions = gather_by_id(ft, &ft.index(), &caption_ids, "caption", pt, name)?;
    Ok(Split {
        image_ids,
        caption_ids,
        image_of,
        images,
        captions,
    })
}

/// Reads the dataset, the backbone features and (when `softlabels`) the soft labels.
pub fn load(
    ctx: &StageContext<'_>,
    dataset: &str,
    train_split: &str,
    val_split: &str,
    image_features: &str,
    text_features: &str,
    softlabels: Option<&str>,
) -> Result<TrainingData, StageError> {
    let dataset = ctx.resolve(dataset);
    let (pi, pt) = (ctx.resolve(image_features), ctx.resolve(text_features));
    let fi = features::read(&pi)?;
    let ft = features::read(&pt)?;
    let train = split(&dataset, train_split, (&fi, &pi), (&ft, &pt))?;
    let val = split(&dataset, val_split, (&fi, &pi), (&ft, &pt))?;
    let (mut teacher_images, mut teacher_captions) = (None, None);
    if let Some(dir) = softlabels {
        let dir = ctx.resolve(dir);
        let si = features::read(&dir.join("images.arrow"))?;
        let sc = features::read(&dir.join("captions.arrow"))?;
        if sc.ids != train.caption_ids || si.ids != train.image_ids {
            return Err(StageError::failed_with_hint(
                format!(
                    "the soft labels in {} were made for other captions or images than split `{train_split}` of {} ({} vs {} captions)",
                    dir.display(),
                    dataset.display(),
                    sc.ids.len(),
                    train.caption_ids.len()
                ),
                "point `softlabels:` at a softlabel stage over the same dataset and split",
            ));
        }
        teacher_images = Some(Rows {
            data: si.data,
            dim: si.dim,
        });
        teacher_captions = Some(Rows {
            data: sc.data,
            dim: sc.dim,
        });
    }
    Ok(TrainingData {
        train,
        val,
        teacher_images,
        teacher_captions,
    })
}
