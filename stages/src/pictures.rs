//! Decoded pictures of a split, for the students that read pixels (`scenes-small`, `clip`).
//!
//! The reference trains without augmentation, so each picture is decoded, resized and cropped
//! once and then read as bytes every epoch, once per caption. Held in the process's memory that
//! costs 3·s² bytes a picture (COCO's 113,287 Karpathy training pictures at 224 px: 17 GB, more
//! than many training boxes can spare beside the model). A training run therefore writes them
//! to a file beside its checkpoint and maps that file: the kernel's page cache keeps what fits
//! and reads the rest back from disk, the process's own memory holds one batch, and a resumed
//! run (or a rerun after a failure) maps the file instead of decoding again.
//!
//! Invariants:
//! - Row r is the r-th picture of the listing, exactly 3·s² bytes of 8-bit RGB in row-major
//!   order, at byte r·3·s².
//! - A file is mapped only when complete and when its description matches: the pixels are
//!   written under a `.part` name and renamed, then the description (`<file>.json`: the pictures'
//!   ids, paths, byte lengths and modification times, the preprocessing, the side) is written.
//!   A missing or different description, or a file of another length, is decoded again. A
//!   failed or cancelled decode leaves at most a `.part` file, which the next decode replaces.
//! - The file's folder is created when missing.
//! - Nothing writes to a mapped file: it lives in one stage run's checkpoint folder, which the
//!   engine's lock per fingerprint gives to one process at a time.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Deref;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::api::{Cancel, Progress, StageError};
use crate::teacher::preprocess::{self, Preprocess};

/// Pictures decoded per batch of work: bounds the memory a decode holds (≈ 150 MB at 224 px).
const DECODE_CHUNK: usize = 1024;

/// The decoded pictures of a split: `images × size × size × 3` bytes.
pub struct Pixels(Backing);

enum Backing {
    Owned(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl Pixels {
    /// Whether the bytes are a mapped file (not the process's own memory).
    #[cfg(test)]
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Backing::Mapped(_))
    }
}

impl Deref for Pixels {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Backing::Owned(v) => v,
            Backing::Mapped(m) => m,
        }
    }
}

impl From<Vec<u8>> for Pixels {
    fn from(bytes: Vec<u8>) -> Self {
        Pixels(Backing::Owned(bytes))
    }
}

/// Where a split's decoded pictures are kept.
#[derive(Clone, Copy)]
pub enum Home<'a> {
    /// In the process's memory (evaluation: one split, once).
    Memory,
    /// In this file, mapped; reused when it holds the same pictures decoded the same way.
    File(&'a Path),
}

/// What decoding reports to: progress (pictures) and cancellation.
pub struct Watch<'a> {
    pub progress: &'a dyn Progress,
    pub cancel: &'a Cancel,
}

/// The decoded pictures, and whether a complete earlier decode was reused.
pub struct Decoded {
    pub pixels: Pixels,
    pub reused: bool,
}

/// Decodes the pictures `images` (id, path relative to `root`) with `prep`, which must give
/// `side`² pictures, into `home`. An undecodable picture fails naming it.
pub fn decode(
    images: &[(String, String)],
    root: &Path,
    prep: &Preprocess,
    side: usize,
    home: Home<'_>,
    watch: Option<Watch<'_>>,
) -> Result<Decoded, StageError> {
    let one = |(id, rel): &(String, String)| -> Result<Vec<u8>, StageError> {
        let path = root.join(rel);
        let img = preprocess::decode(&path).map_err(|e| {
            StageError::failed_with_hint(
                format!("cannot decode image `{id}` ({}): {e}", path.display()),
                "run the dataset stage with `verify_images: true` to find unreadable images",
            )
        })?;
        let raw = prep.pixels(&img).into_raw();
        if raw.len() != 3 * side * side {
            return Err(StageError::failed(format!(
                "image `{id}` ({}) gave {} bytes after preprocessing, not {side}×{side}×3",
                path.display(),
                raw.len()
            )));
        }
        Ok(raw)
    };
    let file = match home {
        Home::Memory => {
            let planes: Vec<Vec<u8>> = images.par_iter().map(one).collect::<Result<_, _>>()?;
            return Ok(Decoded {
                pixels: Pixels::from(planes.concat()),
                reused: false,
            });
        }
        Home::File(file) => file,
    };
    if images.is_empty() {
        return Ok(Decoded {
            pixels: Pixels::from(Vec::new()),
            reused: false,
        });
    }
    let description = describe(images, root, prep, side);
    let described = description_path(file);
    let expected_len = (images.len() * 3 * side * side) as u64;
    let complete = std::fs::read_to_string(&described).is_ok_and(|d| d == description)
        && std::fs::metadata(file).is_ok_and(|m| m.len() == expected_len);
    if !complete {
        let io = |what: &str, p: &Path, e| StageError::io(format!("{what} {}", p.display()), e);
        match std::fs::remove_file(&described) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("removing", &described, e));
            }
            _ => {}
        }
        if let Some(folder) = file.parent() {
            std::fs::create_dir_all(folder).map_err(|e| io("creating", folder, e))?;
        }
        let part = part_path(file);
        let mut out = BufWriter::with_capacity(
            1 << 20,
            File::create(&part).map_err(|e| io("creating", &part, e))?,
        );
        if let Some(w) = &watch {
            w.progress.set_items(Some(images.len() as u64));
            w.progress.set_position(0);
            w.progress.set_message("decoding pictures");
        }
        for (k, chunk) in images.chunks(DECODE_CHUNK).enumerate() {
            if watch.as_ref().is_some_and(|w| w.cancel.is_cancelled()) {
                return Err(StageError::Cancelled);
            }
            let planes: Vec<Vec<u8>> = chunk.par_iter().map(one).collect::<Result<_, _>>()?;
            for plane in planes {
                out.write_all(&plane).map_err(|e| io("writing", &part, e))?;
            }
            if let Some(w) = &watch {
                w.progress
                    .set_position((k * DECODE_CHUNK + chunk.len()) as u64);
            }
        }
        let out = out
            .into_inner()
            .map_err(|e| io("writing", &part, e.into_error()))?;
        out.sync_all().map_err(|e| io("writing", &part, e))?;
        drop(out);
        std::fs::rename(&part, file).map_err(|e| io("renaming", &part, e))?;
        let tmp = described.with_extension("json.part");
        std::fs::write(&tmp, &description)
            .and_then(|_| std::fs::rename(&tmp, &described))
            .map_err(|e| io("writing", &described, e))?;
    }
    let opened =
        File::open(file).map_err(|e| StageError::io(format!("opening {}", file.display()), e))?;
    // SAFETY: the file is complete and nothing writes to it while it is mapped (module
    // invariants: it belongs to this stage run's checkpoint folder, held under the engine's
    // lock for this fingerprint); it is only read through the map.
    let map = unsafe { memmap2::Mmap::map(&opened) }
        .map_err(|e| StageError::io(format!("mapping {}", file.display()), e))?;
    if map.len() as u64 != expected_len {
        return Err(StageError::failed(format!(
            "{} holds {} bytes, not the {expected_len} of {} decoded pictures",
            file.display(),
            map.len(),
            images.len()
        )));
    }
    Ok(Decoded {
        pixels: Pixels(Backing::Mapped(map)),
        reused: complete,
    })
}

fn description_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

fn part_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

/// What a decoded file holds: the side, the preprocessing, and a digest of the pictures' ids,
/// paths, byte lengths and modification times (a picture replaced in place is decoded again).
fn describe(images: &[(String, String)], root: &Path, prep: &Preprocess, side: usize) -> String {
    let stats: Vec<(u64, u128)> = images
        .par_iter()
        .map(|(_, rel)| {
            std::fs::metadata(root.join(rel)).map_or((0, 0), |m| {
                let modified = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                (m.len(), modified)
            })
        })
        .collect();
    let mut digest = Sha256::new();
    for ((id, rel), (len, modified)) in images.iter().zip(&stats) {
        digest.update(format!("{id}\t{rel}\t{len}\t{modified}\n").as_bytes());
    }
    serde_json::json!({
        "format": 1,
        "pictures": images.len(),
        "side": side,
        "preprocess": format!("{prep:?}"),
        "root": root.display().to_string(),
        "listing_sha256": hex::encode(digest.finalize()),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::teacher::preprocess::{Interpolation, Resize};

    fn prep(side: u32) -> Preprocess {
        Preprocess {
            resize: Resize::Shortest(side),
            crop: Some(side),
            interpolation: Interpolation::Bilinear,
            mean: [0.0; 3],
            std: [1.0; 3],
            channels: "rgb".into(),
            layout: "nchw".into(),
        }
    }

    /// Three real picture files (PNG and JPEG, one not square) and their listing.
    fn pictures(dir: &Path) -> Vec<(String, String)> {
        let mut listing = Vec::new();
        for (k, (w, h, ext)) in [(40, 30, "png"), (24, 24, "jpg"), (30, 50, "png")]
            .into_iter()
            .enumerate()
        {
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x * 6) as u8, (y * 5) as u8, (k * 90) as u8])
            });
            let name = format!("p{k}.{ext}");
            img.save(dir.join(&name)).unwrap();
            listing.push((format!("id{k}"), name));
        }
        listing
    }

    #[test]
    fn a_mapped_file_holds_the_same_rows_as_memory_and_is_reused_until_a_picture_changes() {
        let dir = tempfile::tempdir().unwrap();
        let listing = pictures(dir.path());
        let file = dir.path().join("pictures.rgb");
        let p16 = prep(16);
        let memory = decode(&listing, dir.path(), &p16, 16, Home::Memory, None).unwrap();
        assert!(!memory.pixels.is_mapped());
        assert_eq!(memory.pixels.len(), 3 * 16 * 16 * 3);

        let mapped = decode(&listing, dir.path(), &p16, 16, Home::File(&file), None).unwrap();
        assert!(mapped.pixels.is_mapped() && !mapped.reused);
        assert_eq!(&*mapped.pixels, &*memory.pixels);
        assert!(!part_path(&file).exists());
        drop(mapped);

        let again = decode(&listing, dir.path(), &p16, 16, Home::File(&file), None).unwrap();
        assert!(again.reused, "a complete decode is mapped again");
        assert_eq!(&*again.pixels, &*memory.pixels);
        drop(again);

        // Another side or another order: decoded again.
        let small = decode(&listing, dir.path(), &prep(8), 8, Home::File(&file), None);
        assert!(!small.unwrap().reused);
        let reversed: Vec<_> = listing.iter().rev().cloned().collect();
        let r = decode(&reversed, dir.path(), &p16, 16, Home::File(&file), None).unwrap();
        assert!(!r.reused);
        assert_eq!(&r.pixels[..3 * 256], &memory.pixels[2 * 3 * 256..]);
        drop(r);

        // A picture replaced in place (other content, other length): decoded again.
        let _ = decode(&listing, dir.path(), &p16, 16, Home::File(&file), None).unwrap();
        image::RgbImage::from_pixel(41, 30, image::Rgb([200, 10, 10]))
            .save(dir.path().join("p0.png"))
            .unwrap();
        let changed = decode(&listing, dir.path(), &p16, 16, Home::File(&file), None).unwrap();
        assert!(!changed.reused);
        assert_eq!(&changed.pixels[..3], &[200, 10, 10]);
        assert_eq!(&changed.pixels[3 * 256..], &memory.pixels[3 * 256..]);
    }

    #[test]
    fn an_undecodable_picture_is_named_and_leaves_no_mapped_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut listing = pictures(dir.path());
        let file = dir.path().join("pictures.rgb");
        let p16 = prep(16);
        decode(&listing, dir.path(), &p16, 16, Home::File(&file), None).unwrap();
        std::fs::write(dir.path().join("broken.jpg"), b"\xFF\xD8\xFF not a jpeg").unwrap();
        listing.push(("broken".into(), "broken.jpg".into()));
        let e = decode(&listing, dir.path(), &p16, 16, Home::File(&file), None)
            .err()
            .expect("an undecodable picture fails");
        let message = e.to_string();
        assert!(
            message.contains("cannot decode image `broken`"),
            "{message}"
        );
        assert!(message.contains("broken.jpg"), "{message}");
        // The earlier decode's description is gone, so its file is never taken for this listing.
        assert!(!description_path(&file).exists());
        listing.pop();
        let r = decode(&listing, dir.path(), &p16, 16, Home::File(&file), None).unwrap();
        assert!(!r.reused);
    }

    #[test]
    fn a_cancelled_decode_stops_before_writing_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let listing = pictures(dir.path());
        let file = dir.path().join("pictures.rgb");
        let cancel = Cancel::new();
        cancel.cancel(libc::SIGINT);
        let watch = Watch {
            progress: &crate::api::NoProgress,
            cancel: &cancel,
        };
        let r = decode(
            &listing,
            dir.path(),
            &prep(16),
            16,
            Home::File(&file),
            Some(watch),
        );
        assert!(matches!(r, Err(StageError::Cancelled)));
        assert!(!file.exists() && !description_path(&file).exists());
    }
}
