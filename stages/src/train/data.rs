//! The tensors a training run needs, read once: the students' inputs for the training and
//! validation items (precomputed features, or decoded pictures and word ids), and the teachers'
//! soft-label vectors aligned to the training captions. A training run keeps its decoded
//! pictures in files beside its checkpoint, mapped (see [`crate::pictures`]).

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;

use crate::api::{StageContext, StageError};
use crate::dataset::read::CaptionRow;
use crate::features::{self, Features};
use crate::ml::clip::ClipInputs;
use crate::ml::clip::tokenizer::ClipTokenizer;
use crate::ml::scenes_small::PixelWordInputs;
use crate::ml::student::FeatureInputs;
pub use crate::ml::student::Rows;
use crate::ml::vocab::WordVocab;
use crate::pictures::{self, Home, Pixels, Watch};

/// One split: its images and captions, with the caption → image map, and what the student
/// reads of them.
pub struct Split<I> {
    pub image_ids: Vec<String>,
    pub caption_ids: Vec<String>,
    /// Row of each caption's image in `image_ids`.
    pub image_of: Vec<usize>,
    pub inputs: I,
}

/// Everything a run reads.
pub struct TrainingData<I> {
    pub train: Split<I>,
    pub val: Split<I>,
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

/// A split's image ids (with paths) and captions, in id order, with the caption → image map.
struct Listing {
    images: Vec<(String, String)>,
    captions: Vec<CaptionRow>,
    image_of: Vec<usize>,
}

fn listing(dataset: &Path, name: &str) -> Result<Listing, StageError> {
    let images = crate::dataset::read::images(dataset, name)?;
    let captions = crate::dataset::read::captions(dataset, name)?;
    if captions.is_empty() {
        return Err(StageError::failed_with_hint(
            format!("split `{name}` of {} has no captions", dataset.display()),
            "name splits the dataset has (`split:`, `val_split:`)",
        ));
    }
    let row: HashMap<&str, usize> = images
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.as_str(), i))
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
    Ok(Listing {
        images,
        captions,
        image_of,
    })
}

impl Listing {
    fn into_split<I>(self, inputs: I) -> Split<I> {
        Split {
            image_ids: self.images.into_iter().map(|(id, _)| id).collect(),
            caption_ids: self.captions.into_iter().map(|c| c.caption_id).collect(),
            image_of: self.image_of,
            inputs,
        }
    }
}

/// A split with precomputed features as the student's inputs (`feature-heads`).
pub fn feature_split(
    dataset: &Path,
    name: &str,
    image_features: (&Features, &Path),
    text_features: (&Features, &Path),
) -> Result<Split<FeatureInputs>, StageError> {
    let l = listing(dataset, name)?;
    let image_ids: Vec<String> = l.images.iter().map(|(id, _)| id.clone()).collect();
    let caption_ids: Vec<String> = l.captions.iter().map(|c| c.caption_id.clone()).collect();
    let (fi, pi) = image_features;
    let (ft, pt) = text_features;
    let images = gather_by_id(fi, &fi.index(), &image_ids, "image", pi, name)?;
    let captions = gather_by_id(ft, &ft.index(), &caption_ids, "caption", pt, name)?;
    Ok(l.into_split(FeatureInputs { images, captions }))
}

/// The training split's word vocabulary.
pub fn vocabulary(
    dataset: &Path,
    name: &str,
    min_count: usize,
    max_words: usize,
) -> Result<WordVocab, StageError> {
    let captions = crate::dataset::read::captions(dataset, name)?;
    let vocab = WordVocab::build(
        captions.iter().map(|c| c.text.as_str()),
        min_count,
        max_words,
    );
    if vocab.is_empty() {
        return Err(StageError::failed_with_hint(
            format!(
                "the captions of split `{name}` of {} give an empty vocabulary (min_count {min_count})",
                dataset.display()
            ),
            "lower `min_count`",
        ));
    }
    Ok(vocab)
}

/// The listing's pictures decoded, resized and cropped by `prep` to `side`², into `home`
/// (reported to the stage's log and progress).
fn decoded_pixels(
    ctx: &StageContext<'_>,
    l: &Listing,
    name: &str,
    root: &Path,
    prep: &crate::teacher::preprocess::Preprocess,
    side: usize,
    home: Home<'_>,
) -> Result<Pixels, StageError> {
    let started = std::time::Instant::now();
    let watch = Watch {
        progress: ctx.progress,
        cancel: ctx.cancel,
    };
    let decoded = pictures::decode(&l.images, root, prep, side, home, Some(watch))?;
    if let Home::File(file) = home {
        let mb = decoded.pixels.len() as f64 / 1e6;
        let n = l.images.len();
        ctx.log.line(if decoded.reused {
            format!(
                "pictures of split `{name}`: {n} at {side} px, {mb:.1} MB mapped from the earlier decode in {}",
                file.display()
            )
        } else {
            format!(
                "pictures of split `{name}`: {n} decoded at {side} px in {:.1} s, {mb:.1} MB mapped from {}",
                started.elapsed().as_secs_f64(),
                file.display()
            )
        });
    }
    Ok(decoded.pixels)
}

/// A split with decoded pictures (resized to `size`², centre-cropped when not square) and word
/// ids as the student's inputs (`scenes-small`).
pub fn pixel_word_split(
    ctx: &StageContext<'_>,
    dataset: &Path,
    images_root: Option<&Path>,
    name: &str,
    size: usize,
    vocab: &WordVocab,
    home: Home<'_>,
) -> Result<Split<PixelWordInputs>, StageError> {
    use crate::teacher::preprocess::{Interpolation, Preprocess, Resize};
    let l = listing(dataset, name)?;
    let root = crate::dataset::read::image_root(dataset, images_root.map(Path::to_path_buf))?;
    let prep = Preprocess {
        resize: Resize::Shortest(size as u32),
        crop: Some(size as u32),
        interpolation: Interpolation::Bilinear,
        mean: [0.0; 3],
        std: [1.0; 3],
        channels: "rgb".into(),
        layout: "nchw".into(),
    };
    let pixels = decoded_pixels(ctx, &l, name, &root, &prep, size, home)?;
    let words = l.captions.iter().map(|c| vocab.encode(&c.text)).collect();
    Ok(l.into_split(PixelWordInputs {
        pixels,
        size,
        words,
    }))
}

/// A split with CLIP-preprocessed pictures (bicubic resize of the shortest side, centre crop,
/// 8-bit; normalised per batch) and CLIP token ids as the student's inputs (`clip`). Returns
/// how many captions were cut to the context.
#[allow(clippy::too_many_arguments)]
pub fn clip_split(
    ctx: &StageContext<'_>,
    dataset: &Path,
    images_root: Option<&Path>,
    name: &str,
    size: usize,
    tokenizer: &ClipTokenizer,
    context: usize,
    home: Home<'_>,
) -> Result<(Split<ClipInputs>, usize), StageError> {
    use crate::teacher::preprocess::{Preprocess, Resize};
    let l = listing(dataset, name)?;
    let root = crate::dataset::read::image_root(dataset, images_root.map(Path::to_path_buf))?;
    let mut prep = Preprocess::preset("clip").expect("a named preset");
    prep.resize = Resize::Shortest(size as u32);
    prep.crop = Some(size as u32);
    let pixels = decoded_pixels(ctx, &l, name, &root, &prep, size, home)?;
    let encoded: Vec<(Vec<u32>, bool)> = l
        .captions
        .par_iter()
        .map(|c| tokenizer.encode(&c.text, context))
        .collect();
    let truncated = encoded.iter().filter(|(_, cut)| *cut).count();
    let tokens = encoded.into_iter().map(|(ids, _)| ids).collect();
    Ok((
        l.into_split(ClipInputs {
            pixels,
            size,
            tokens,
        }),
        truncated,
    ))
}

/// The soft labels of a softlabel stage's output, checked to be made for `train`.
pub fn soft_labels<I>(
    ctx: &StageContext<'_>,
    dir: &str,
    dataset: &Path,
    train: &Split<I>,
    train_split: &str,
) -> Result<(Rows, Rows), StageError> {
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
    Ok((
        Rows {
            data: si.data,
            dim: si.dim,
        },
        Rows {
            data: sc.data,
            dim: sc.dim,
        },
    ))
}

/// Reads the dataset, the backbone features and (when `softlabels`) the soft labels of a
/// `feature-heads` run.
pub fn load_features(
    ctx: &StageContext<'_>,
    dataset: &str,
    train_split: &str,
    val_split: &str,
    image_features: &str,
    text_features: &str,
    softlabels: Option<&str>,
) -> Result<TrainingData<FeatureInputs>, StageError> {
    let dataset = ctx.resolve(dataset);
    let (pi, pt) = (ctx.resolve(image_features), ctx.resolve(text_features));
    let fi = features::read(&pi)?;
    let ft = features::read(&pt)?;
    training_data(
        ctx,
        &dataset,
        train_split,
        val_split,
        softlabels,
        |name, _| feature_split(&dataset, name, (&fi, &pi), (&ft, &pt)),
    )
}

/// The training and validation splits as `split` reads a split by name and role (`train`,
/// `val`), paired with the soft labels of the training split when there are some.
pub fn training_data<I>(
    ctx: &StageContext<'_>,
    dataset: &Path,
    train_split: &str,
    val_split: &str,
    softlabels: Option<&str>,
    mut split: impl FnMut(&str, &str) -> Result<Split<I>, StageError>,
) -> Result<TrainingData<I>, StageError> {
    let train = split(train_split, "train")?;
    let val = split(val_split, "val")?;
    with_soft_labels(ctx, dataset, train, val, train_split, softlabels)
}

/// Pairs the splits with the soft labels, when there are some.
pub fn with_soft_labels<I>(
    ctx: &StageContext<'_>,
    dataset: &Path,
    train: Split<I>,
    val: Split<I>,
    train_split: &str,
    softlabels: Option<&str>,
) -> Result<TrainingData<I>, StageError> {
    let (teacher_images, teacher_captions) = match softlabels {
        Some(dir) => {
            let (i, c) = soft_labels(ctx, dir, dataset, &train, train_split)?;
            (Some(i), Some(c))
        }
        None => (None, None),
    };
    Ok(TrainingData {
        train,
        val,
        teacher_images,
        teacher_captions,
    })
}
