//! Unpacking downloaded archives into the output tree.
//!
//! Datasets ship as archives (COCO's `train2014.zip`, the Karpathy splits'
//! `caption_datasets.zip`); `extract: zip` unpacks them so later stages read ordinary files.
//! Entries whose path would leave the output tree (absolute, `..`) are refused ("zip slip").

use std::fs::File;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::api::{StageContext, StageError};

/// Archive formats `extract:` understands.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Extract {
    Zip,
}

/// Unpacks `archive` into `into`; returns the number of files written.
pub fn unpack(
    kind: Extract,
    archive: &Path,
    into: &Path,
    ctx: &StageContext<'_>,
) -> Result<usize, StageError> {
    let Extract::Zip = kind;
    let name = archive
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let file = File::open(archive).map_err(|e| StageError::io(format!("opening {name}"), e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        StageError::failed_with_hint(
            format!("{name} is not a valid zip archive: {e}"),
            "check `extract:` and the URL",
        )
    })?;
    let mut files = 0;
    for i in 0..zip.len() {
        if ctx.cancel.is_cancelled() {
            return Err(StageError::Cancelled);
        }
        let mut entry = zip
            .by_index(i)
            .map_err(|e| StageError::failed(format!("{name}: entry {i}: {e}")))?;
        let rel = entry.enclosed_name().ok_or_else(|| {
            StageError::failed(format!(
                "{name}: entry `{}` would be written outside the output folder",
                entry.name()
            ))
        })?;
        let dest = into.join(rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&dest)
                .map_err(|e| StageError::io(format!("creating {}", dest.display()), e))?;
            continue;
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StageError::io(format!("creating {}", parent.display()), e))?;
        }
        let mut out = File::create(&dest)
            .map_err(|e| StageError::io(format!("creating {}", dest.display()), e))?;
        io::copy(&mut entry, &mut out)
            .map_err(|e| StageError::io(format!("{name}: extracting {}", entry.name()), e))?;
        files += 1;
        if files % 1000 == 0 {
            ctx.progress.set_message(&format!("{name}: {files} files"));
        }
    }
    ctx.log.line(format!("{name}: extracted {files} files"));
    Ok(files)
}
