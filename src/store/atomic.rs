//! The one way cusa-pipe replaces a file: write a temporary file on the same filesystem,
//! fsync it, rename it over the target, fsync the directory. A reader sees the old bytes or the
//! new bytes, never a mix, even after a crash or kill -9.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Atomically writes `bytes` to `path`. The temporary file lives in `tmp_dir` when given (the
/// store passes its staging directory, so a crash leaves debris only where it is swept), else
/// beside `path`. `durable` adds the fsyncs; caches that may be lost skip them.
pub fn write_file_in(
    path: &Path,
    bytes: &[u8],
    tmp_dir: Option<&Path>,
    durable: bool,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("path has no parent"))?;
    let tmp_parent = tmp_dir.unwrap_or(dir);
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(tmp_parent)?;
    tmp.write_all(bytes)?;
    if durable {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

/// [`write_file_in`] with the temporary file beside the target.
pub fn write_file(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    write_file_in(path, bytes, None, durable)
}

/// fsync of a directory, so a rename into it survives a power loss.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
