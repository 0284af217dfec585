//! Content digests of files and folders, remembered by stat so unchanged data is not re-read.
//!
//! A file's digest is its sha256. A folder's digest is the sha256 of its [`Manifest`]: the
//! sorted list of relative paths with each file's digest, size and executable bit (empty
//! folders included), encoded canonically. The same manifest describes committed output trees
//! in the store, so an input folder and an output tree with equal content have equal digests.
//! A folder's digest is streamed into the hasher entry by entry ([`ContentHasher::digest_path`]):
//! the manifest itself is built only for callers that keep it.
//!
//! The stat cache (one file per input root under `stat-v1/`) maps each relative path to
//! (device, inode, size, mtime ns, ctime ns) → digest. A file whose stat matches is not read;
//! any write changes mtime/ctime, so a flipped byte is seen. Files modified less than
//! [`RACY_WINDOW_NS`] before the cache was written are not trusted (git's "racily clean"
//! problem: a later write within the same timestamp tick would go unnoticed) and are hashed
//! again next time. The cache file is flat ([`StatCache`]): fixed-size records sorted by path
//! and one block of path bytes, read with one `read` and looked up in place, so a no-op check of
//! 100,000 files allocates nothing per file for it. Folders holding a `CACHEDIR.TAG` (caches,
//! ours included) are skipped, so a project input that contains the cache does not change with
//! every run. Misses are hashed in parallel with rayon. The cache is only an optimisation:
//! deleting `stat-v1/` is always safe, and a file it cannot read (truncated, another version's
//! format) counts as empty.

use std::fs::{File, Metadata};

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Modifications this close to the cache write are re-checked next time.
pub const RACY_WINDOW_NS: i128 = 1_000_000_000;

/// A hex sha256.
pub type Hex = String;

/// What the hasher needs to know of a file: its stat key (size included) and executable bit.
#[derive(Clone, Copy)]
struct FileStat {
    stat: Stat,
    exec: bool,
}

impl FileStat {
    fn of(m: &Metadata) -> Self {
        FileStat {
            stat: Stat::of(m),
            exec: m.permissions().mode() & 0o111 != 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is a symbolic link; stage outputs must be regular files and folders")]
    Symlink { path: PathBuf },
    #[error("{path} is neither a file nor a folder")]
    Special { path: PathBuf },
    #[error("{path}: file name is not valid UTF-8")]
    NonUtf8 { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HashError + '_ {
    move |source| HashError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One entry of a folder manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path with `/` separators.
    pub path: String,
    #[serde(flatten)]
    pub node: Node,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Node {
    File {
        sha256: Hex,
        size: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        exec: bool,
    },
    Dir,
}

/// The content of a folder, sorted by path.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Canonical bytes ([`crate::canonical`]); their sha256 is the folder's digest. Written
    /// directly (keys in sorted order, [`encode_entry`]) because a manifest can list millions of
    /// files; a test pins these bytes to the generic encoder.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.entries.len() * 128);
        out.extend_from_slice(MANIFEST_OPEN);
        for (i, e) in self.entries.iter().enumerate() {
            let node = match &e.node {
                Node::File { sha256, size, exec } => Some((sha256.as_bytes(), *size, *exec)),
                Node::Dir => None,
            };
            encode_entry(&mut out, i > 0, &e.path, node);
        }
        out.extend_from_slice(MANIFEST_CLOSE);
        out
    }

    pub fn digest(&self) -> Hex {
        hex::encode(Sha256::digest(self.to_bytes()))
    }

    /// Parses a manifest read from outside this process and [`Manifest::validate`]s it.
    pub fn from_untrusted(bytes: &[u8]) -> Result<Manifest, String> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks a manifest read from outside this process (a remote, a shared cache folder)
    /// before any of its paths is materialised: every path relative and below the tree
    /// ([`cusa_stages::safe_path::relative`]), no path twice, no file that another entry would
    /// sit inside, every digest a lowercase sha256.
    pub fn validate(&self) -> Result<(), String> {
        let mut files = std::collections::HashSet::new();
        let mut seen = std::collections::HashSet::with_capacity(self.entries.len());
        for e in &self.entries {
            cusa_stages::safe_path::relative(&e.path).map_err(|why| format!("entry {why}"))?;
            if !seen.insert(e.path.as_str()) {
                return Err(format!("entry `{}` is listed twice", e.path));
            }
            if let Node::File { sha256, .. } = &e.node {
                if !cusa_stages::safe_path::is_sha256(sha256) {
                    return Err(format!("entry `{}` has no valid sha256", e.path));
                }
                files.insert(e.path.as_str());
            }
        }
        for e in &self.entries {
            let mut parent = e.path.as_str();
            while let Some((up, _)) = parent.rsplit_once('/') {
                if files.contains(up) {
                    return Err(format!("entry `{}` is inside the file `{up}`", e.path));
                }
                parent = up;
            }
        }
        Ok(())
    }

    /// Total bytes of the files.
    pub fn size(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| {
                if let Node::File { size, .. } = e.node {
                    size
                } else {
                    0
                }
            })
            .sum()
    }

    /// Digest of a path inside the tree: a file's sha256, or the digest of the sub-folder's
    /// manifest (paths relative to it). `None` if the path is not in the tree.
    pub fn sub_digest(&self, sub: &str) -> Option<Hex> {
        let sub = sub.trim_matches('/');
        if let Some(e) = self.entries.iter().find(|e| e.path == sub)
            && let Node::File { sha256, .. } = &e.node
        {
            return Some(sha256.clone());
        }
        let prefix = format!("{sub}/");
        let entries: Vec<Entry> = self
            .entries
            .iter()
            .filter_map(|e| {
                e.path.strip_prefix(&prefix).map(|rest| Entry {
                    path: rest.to_string(),
                    node: e.node.clone(),
                })
            })
            .collect();
        let is_dir = self
            .entries
            .iter()
            .any(|e| e.path == sub && e.node == Node::Dir);
        (is_dir || !entries.is_empty()).then(|| Manifest { entries }.digest())
    }
}

const MANIFEST_OPEN: &[u8] = b"{\"entries\":[";
const MANIFEST_CLOSE: &[u8] = b"]}";

/// Appends one manifest entry's canonical bytes: a file (`Some((hex sha256, size, exec))`) or
/// a folder (`None`), preceded by a comma unless it is the first.
fn encode_entry(out: &mut Vec<u8>, comma: bool, path: &str, file: Option<(&[u8], u64, bool)>) {
    if comma {
        out.push(b',');
    }
    let quoted = |out: &mut Vec<u8>| {
        // JSON string: only `"`, `\` and control characters need escaping (serde_json's rule).
        if path.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            out.push(b'"');
            out.extend_from_slice(path.as_bytes());
            out.push(b'"');
        } else {
            out.extend_from_slice(
                serde_json::to_string(path)
                    .expect("strings serialise")
                    .as_bytes(),
            );
        }
    };
    match file {
        Some((sha256, size, exec)) => {
            out.push(b'{');
            if exec {
                out.extend_from_slice(b"\"exec\":true,");
            }
            out.extend_from_slice(b"\"path\":");
            quoted(out);
            out.extend_from_slice(b",\"sha256\":\"");
            out.extend_from_slice(sha256);
            out.extend_from_slice(b"\",\"size\":");
            let _ = write!(out, "{size}"); // writing to a Vec cannot fail
            out.extend_from_slice(b",\"type\":\"file\"}");
        }
        None => {
            out.extend_from_slice(b"{\"path\":");
            quoted(out);
            out.extend_from_slice(b",\"type\":\"dir\"}");
        }
    }
}

/// A digest of a project input: a file or a folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathDigest {
    pub digest: Hex,
    pub is_dir: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stat {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stat {
    fn of(m: &Metadata) -> Self {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Stat {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }
}

/// A stat cache file, read whole and looked up in place.
///
/// Layout (little-endian): magic `cusastat`, version u32 (2), record count u32, written-at ns
/// i64, root length u32 + root bytes; then one 80-byte record per file, sorted by path bytes:
/// path offset u32 and length u32 (into the path block), dev, ino, size (u64), mtime ns, ctime
/// ns (i64), sha256 (32 bytes); then the path block. Anything else parses as an empty cache.
struct StatCache {
    bytes: Vec<u8>,
    count: usize,
    records: usize,
    paths: usize,
    written_at_ns: i64,
}

const STAT_MAGIC: &[u8; 8] = b"cusastat";
const STAT_VERSION: u32 = 2;
const STAT_RECORD: usize = 80;

impl StatCache {
    fn empty() -> StatCache {
        StatCache {
            bytes: Vec::new(),
            count: 0,
            records: 0,
            paths: 0,
            written_at_ns: 0,
        }
    }

    fn read(path: &Path) -> StatCache {
        std::fs::read(path)
            .ok()
            .and_then(StatCache::parse)
            .unwrap_or_else(StatCache::empty)
    }

    fn parse(bytes: Vec<u8>) -> Option<StatCache> {
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
        };
        if bytes.get(..8)? != STAT_MAGIC || u32_at(8)? != STAT_VERSION {
            return None;
        }
        let count = u32_at(12)? as usize;
        let written_at_ns = i64::from_le_bytes(bytes.get(16..24)?.try_into().ok()?);
        let records = 28usize.checked_add(u32_at(24)? as usize)?;
        let paths = records.checked_add(count.checked_mul(STAT_RECORD)?)?;
        if paths > bytes.len() {
            return None;
        }
        let cache = StatCache {
            count,
            records,
            paths,
            written_at_ns,
            bytes,
        };
        // Every path inside the block, valid UTF-8 and in strictly increasing order.
        let mut previous: Option<&[u8]> = None;
        for i in 0..count {
            let r = cache.records + i * STAT_RECORD;
            let off = u32::from_le_bytes(cache.bytes[r..r + 4].try_into().ok()?) as usize;
            let len = u32::from_le_bytes(cache.bytes[r + 4..r + 8].try_into().ok()?) as usize;
            let start = cache.paths.checked_add(off)?;
            let path = cache.bytes.get(start..start.checked_add(len)?)?;
            std::str::from_utf8(path).ok()?;
            if previous.is_some_and(|p| p >= path) {
                return None;
            }
            previous = Some(path);
        }
        Some(cache)
    }

    fn record(&self, i: usize) -> &[u8] {
        let r = self.records + i * STAT_RECORD;
        &self.bytes[r..r + STAT_RECORD]
    }

    fn path(&self, i: usize) -> &[u8] {
        let r = self.record(i);
        let off = u32::from_le_bytes(r[0..4].try_into().expect("4 bytes")) as usize;
        let len = u32::from_le_bytes(r[4..8].try_into().expect("4 bytes")) as usize;
        &self.bytes[self.paths + off..self.paths + off + len]
    }

    fn stat(&self, i: usize) -> Stat {
        let r = self.record(i);
        let u = |at: usize| u64::from_le_bytes(r[at..at + 8].try_into().expect("8 bytes"));
        Stat {
            dev: u(8),
            ino: u(16),
            size: u(24),
            mtime_ns: u(32) as i64,
            ctime_ns: u(40) as i64,
        }
    }

    fn digest(&self, i: usize) -> [u8; 32] {
        self.record(i)[48..80].try_into().expect("32 bytes")
    }

    /// Whether record `i` was old enough when the cache was written to be trusted.
    fn trusted(&self, i: usize) -> bool {
        (self.stat(i).mtime_ns as i128) < self.written_at_ns as i128 - RACY_WINDOW_NS
    }

    /// The cache file for `files` (sorted by path, as the walk returns them).
    fn encode<'a>(
        root: &Path,
        files: impl Iterator<Item = (&'a str, Stat, &'a [u8; 32])> + Clone,
    ) -> Vec<u8> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let root = root.as_os_str().as_encoded_bytes();
        let (count, path_bytes) = files
            .clone()
            .fold((0usize, 0usize), |(n, b), (p, _, _)| (n + 1, b + p.len()));
        let mut out = Vec::with_capacity(28 + root.len() + count * STAT_RECORD + path_bytes);
        out.extend_from_slice(STAT_MAGIC);
        out.extend_from_slice(&STAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(count as u32).to_le_bytes());
        out.extend_from_slice(&now.to_le_bytes());
        out.extend_from_slice(&(root.len() as u32).to_le_bytes());
        out.extend_from_slice(root);
        let mut off = 0u32;
        for (path, st, digest) in files.clone() {
            out.extend_from_slice(&off.to_le_bytes());
            out.extend_from_slice(&(path.len() as u32).to_le_bytes());
            for v in [
                st.dev,
                st.ino,
                st.size,
                st.mtime_ns as u64,
                st.ctime_ns as u64,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(digest);
            off += path.len() as u32;
        }
        for (path, _, _) in files {
            out.extend_from_slice(path.as_bytes());
        }
        out
    }
}

/// Hashes files and folders, with a stat cache in `stat_dir` (or none).
#[derive(Clone)]
pub struct ContentHasher {
    stat_dir: Option<PathBuf>,
}

/// Options for walking a folder.
#[derive(Clone, Copy)]
pub struct Walk {
    /// Follow symbolic links (project inputs) or refuse them (stage outputs).
    pub follow_links: bool,
}

impl ContentHasher {
    pub fn new(stat_dir: Option<PathBuf>) -> Self {
        Self { stat_dir }
    }

    /// Digest of a file or folder. A folder's manifest is streamed into the hasher, never
    /// held whole.
    pub fn digest_path(&self, path: &Path, walk: Walk) -> Result<PathDigest, HashError> {
        let meta = if walk.follow_links {
            std::fs::metadata(path)
        } else {
            std::fs::symlink_metadata(path)
        }
        .map_err(io_err(path))?;
        if meta.is_dir() {
            let (found, digests) = self.listing(path, walk)?;
            let mut hasher = Sha256::new();
            let mut chunk = Vec::with_capacity(1 << 16);
            chunk.extend_from_slice(MANIFEST_OPEN);
            let mut hex = [0u8; 64];
            for (i, ((rel, item), digest)) in found.iter().zip(&digests).enumerate() {
                let node = match item {
                    Found::File(st) => {
                        hex::encode_to_slice(digest, &mut hex).expect("64 bytes for 32");
                        Some((&hex[..], st.stat.size, st.exec))
                    }
                    Found::Dir => None,
                };
                encode_entry(&mut chunk, i > 0, rel, node);
                if chunk.len() >= 1 << 16 {
                    hasher.update(&chunk);
                    chunk.clear();
                }
            }
            chunk.extend_from_slice(MANIFEST_CLOSE);
            hasher.update(&chunk);
            Ok(PathDigest {
                digest: hex::encode(hasher.finalize()),
                is_dir: true,
            })
        } else if meta.is_file() {
            let cache = self.load(path);
            let found = [(String::new(), Found::File(FileStat::of(&meta)))];
            let digests = self.digests(path, &found, &cache)?;
            Ok(PathDigest {
                digest: hex::encode(digests[0]),
                is_dir: false,
            })
        } else if meta.file_type().is_symlink() {
            Err(HashError::Symlink {
                path: path.to_path_buf(),
            })
        } else {
            Err(HashError::Special {
                path: path.to_path_buf(),
            })
        }
    }

    /// The manifest of a folder.
    pub fn manifest(&self, root: &Path, walk: Walk) -> Result<Manifest, HashError> {
        let (found, digests) = self.listing(root, walk)?;
        let entries = found
            .into_iter()
            .zip(digests)
            .map(|((path, item), digest)| Entry {
                path,
                node: match item {
                    Found::File(st) => Node::File {
                        sha256: hex::encode(digest),
                        size: st.stat.size,
                        exec: st.exec,
                    },
                    Found::Dir => Node::Dir,
                },
            })
            .collect();
        Ok(Manifest { entries })
    }

    /// A folder's entries in manifest order (sorted by path; a folder only when nothing lies
    /// below it) with, beside each, its digest (zeros for a folder), through the stat cache.
    fn listing(&self, root: &Path, walk: Walk) -> Result<Listing, HashError> {
        // Reading the stat cache overlaps with the walk.
        let (found, cache) = rayon::join(|| walk_tree(root, walk.follow_links), || self.load(root));
        let found = found?;
        let digests = self.digests(root, &found, &cache)?;
        Ok((found, digests))
    }

    /// The digest of every file in `found` (paths relative to `root`, sorted; "" is `root`
    /// itself), aligned with it (zeros for folders): from `cache` where a trusted record's stat
    /// matches, read otherwise (in parallel). The cache is rewritten when anything was read, a
    /// record was untrusted or the file set changed.
    fn digests(
        &self,
        root: &Path,
        found: &[(String, Found)],
        cache: &StatCache,
    ) -> Result<Vec<[u8; 32]>, HashError> {
        const FOLDER: u32 = u32::MAX;
        const MISS: u32 = u32::MAX - 1;
        // Both lists are sorted by path bytes: one merge finds every file's record.
        let mut known: Vec<u32> = Vec::with_capacity(found.len());
        let (mut j, mut misses, mut files) = (0, 0, 0);
        for (rel, item) in found {
            let Found::File(st) = item else {
                known.push(FOLDER);
                continue;
            };
            files += 1;
            let rel = rel.as_bytes();
            while j < cache.count && cache.path(j) < rel {
                j += 1;
            }
            if j < cache.count
                && cache.path(j) == rel
                && cache.trusted(j)
                && cache.stat(j) == st.stat
            {
                known.push(j as u32);
            } else {
                known.push(MISS);
                misses += 1;
            }
        }
        let digests: Vec<[u8; 32]> = found
            .par_iter()
            .zip(known.par_iter())
            .map_init(
                || vec![0u8; 256 * 1024],
                |buffer, ((rel, _), &k)| match k {
                    FOLDER => Ok([0; 32]),
                    MISS => {
                        let path = if rel.is_empty() {
                            root.to_path_buf()
                        } else {
                            root.join(rel)
                        };
                        sha256_into(&path, buffer)
                    }
                    k => Ok(cache.digest(k as usize)),
                },
            )
            .collect::<Result<_, _>>()?;
        // Records too recent to trust are rewritten, so they can be trusted next time.
        let untrusted = (0..cache.count).any(|i| !cache.trusted(i));
        if let Some(cache_path) = self.cache_path(root)
            && (misses > 0 || untrusted || cache.count != files)
        {
            let records = found
                .iter()
                .zip(&digests)
                .filter_map(|((rel, item), d)| match item {
                    Found::File(st) => Some((rel.as_str(), st.stat, d)),
                    Found::Dir => None,
                });
            save_stat_cache(&cache_path, &StatCache::encode(root, records));
        }
        Ok(digests)
    }

    /// The stat cache of `root` (empty when there is none or it is unreadable).
    fn load(&self, root: &Path) -> StatCache {
        self.cache_path(root)
            .as_deref()
            .map(StatCache::read)
            .unwrap_or_else(StatCache::empty)
    }

    /// Records that `root`'s files have the digests in `manifest` (just hashed by the caller),
    /// so the next read needs only stats.
    pub fn prime(&self, root: &Path, manifest: &Manifest) {
        let Some(cache_path) = self.cache_path(root) else {
            return;
        };
        let mut records = Vec::new();
        for e in &manifest.entries {
            if let Node::File { sha256, .. } = &e.node {
                let (Ok(meta), Ok(bytes)) = (
                    std::fs::symlink_metadata(root.join(&e.path)),
                    hex::decode(sha256),
                ) else {
                    return;
                };
                let Ok(digest) = <[u8; 32]>::try_from(bytes.as_slice()) else {
                    return;
                };
                records.push((e.path.as_str(), Stat::of(&meta), digest));
            }
        }
        // Manifest entries are sorted by path, as the cache's records must be.
        let records = records.iter().map(|(p, st, d)| (*p, *st, d));
        save_stat_cache(&cache_path, &StatCache::encode(root, records));
    }

    fn cache_path(&self, root: &Path) -> Option<PathBuf> {
        let dir = self.stat_dir.as_ref()?;
        let abs = std::path::absolute(root).ok()?;
        let key = hex::encode(&Sha256::digest(abs.as_os_str().as_encoded_bytes())[..16]);
        Some(dir.join(format!("{key}.bin")))
    }
}

/// A walk's entries and, aligned with them, their digests.
type Listing = (Vec<(String, Found)>, Vec<[u8; 32]>);

/// What the walk found at a relative path.
enum Found {
    /// A folder with nothing below it (a folder with content is implied by its files).
    Dir,
    File(FileStat),
}

/// Lists a folder recursively, sorted by path: sub-folders are read in parallel, each file
/// costs one stat (none for folders, whose type comes from the directory entry). Symbolic
/// links are followed (with loop detection) or refused.
fn walk_tree(root: &Path, follow_links: bool) -> Result<Vec<(String, Found)>, HashError> {
    let meta = std::fs::metadata(root).map_err(io_err(root))?;
    walk_dir(
        root,
        String::new(),
        follow_links,
        &[(meta.dev(), meta.ino())],
    )
}

/// One folder's entries, sorted by path. Each folder sorts only its own children (in parallel
/// with the others): a sub-folder's entries all start with `name/`, so its block sorts among
/// its siblings under that key (`/` included: `a/x` comes after `a.txt`), an empty folder under
/// its bare name.
fn walk_dir(
    dir: &Path,
    rel: String,
    follow: bool,
    ancestors: &[(u64, u64)],
) -> Result<Vec<(String, Found)>, HashError> {
    let mut files: Vec<(String, Found)> = Vec::new();
    let mut subdirs: Vec<(PathBuf, String, (u64, u64))> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(HashError::NonUtf8 { path: entry.path() });
        };
        let child_rel = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let mut ft = entry.file_type().map_err(|e| io_err(&entry.path())(e))?;
        let mut meta = None;
        if ft.is_symlink() {
            let path = entry.path();
            if !follow {
                return Err(HashError::Symlink { path });
            }
            let m = std::fs::metadata(&path).map_err(io_err(&path))?;
            ft = m.file_type();
            meta = Some(m);
        }
        if ft.is_dir() {
            let path = entry.path();
            let id = match &meta {
                Some(m) => (m.dev(), m.ino()),
                None => {
                    let m = entry.metadata().map_err(io_err(&path))?;
                    (m.dev(), m.ino())
                }
            };
            // A cache folder (marked by CACHEDIR.TAG, as ours is) is never content: a project
            // input that contains the cache would otherwise change with every run.
            if path.join("CACHEDIR.TAG").is_file() {
                continue;
            }
            if ancestors.contains(&id) {
                return Err(HashError::Io {
                    path,
                    source: std::io::Error::other("symbolic link loop"),
                });
            }
            subdirs.push((path, child_rel, id));
        } else if ft.is_file() {
            let m = match meta {
                Some(m) => m,
                // fstatat on the open directory: no path is built for a file.
                None => entry.metadata().map_err(|e| io_err(&entry.path())(e))?,
            };
            files.push((child_rel, Found::File(FileStat::of(&m))));
        } else {
            return Err(HashError::Special { path: entry.path() });
        }
    }
    type Block = (String, Vec<(String, Found)>);
    let nested: Vec<Result<Block, HashError>> = subdirs
        .into_par_iter()
        .map(|(path, child_rel, id)| {
            let mut chain = ancestors.to_vec();
            chain.push(id);
            let mut v = walk_dir(&path, child_rel.clone(), follow, &chain)?;
            // A folder is listed only when nothing lies below it.
            let key = if v.is_empty() {
                v.push((child_rel.clone(), Found::Dir));
                child_rel
            } else {
                format!("{child_rel}/")
            };
            Ok((key, v))
        })
        .collect();
    let mut blocks: Vec<Block> = nested.into_iter().collect::<Result<_, _>>()?;
    files.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    if blocks.is_empty() {
        return Ok(files);
    }
    blocks.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    // Merge the sorted files with the sorted sub-folder blocks.
    let total = files.len() + blocks.iter().map(|(_, v)| v.len()).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    let mut blocks = blocks.into_iter().peekable();
    for file in files {
        while let Some((_, block)) = blocks.next_if(|(key, _)| *key < file.0) {
            out.extend(block);
        }
        out.push(file);
    }
    for (_, block) in blocks {
        out.extend(block);
    }
    Ok(out)
}

fn save_stat_cache(path: &Path, bytes: &[u8]) {
    if let Some(dir) = path.parent() {
        // Best effort: a lost cache only costs re-hashing.
        let _ = std::fs::create_dir_all(dir);
        let _ = crate::store::atomic::write_file(path, bytes, false);
    }
}

/// sha256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<[u8; 32], HashError> {
    sha256_into(path, &mut vec![0u8; 256 * 1024])
}

/// sha256 of a file's bytes, read through `buffer` (reused across files by the callers that
/// hash many: a fresh buffer per file would be fresh pages per file).
fn sha256_into(path: &Path, buffer: &mut [u8]) -> Result<[u8; 32], HashError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    loop {
        let n = file.read(buffer).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    #[test]
    fn folder_digest_depends_on_content_and_names_not_on_location() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for root in [a.path(), b.path()] {
            write(&root.join("x/1.txt"), b"one");
            write(&root.join("2.txt"), b"two");
            std::fs::create_dir_all(root.join("empty/inner")).unwrap();
        }
        let h = ContentHasher::new(None);
        let walk = Walk { follow_links: true };
        let ma = h.manifest(a.path(), walk).unwrap();
        assert_eq!(ma.digest(), h.manifest(b.path(), walk).unwrap().digest());
        // The streamed digest is the digest of the manifest's bytes, escapes, folders, the
        // executable bit and `a.txt` before `a/` included.
        write(&a.path().join("a \"q\"\\.txt"), b"q");
        write(&a.path().join("a/\ttab"), b"t");
        std::fs::create_dir_all(a.path().join("a.d")).unwrap();
        let exec = a.path().join("run.sh");
        write(&exec, b"#!/bin/sh");
        std::fs::set_permissions(&exec, std::fs::Permissions::from_mode(0o755)).unwrap();
        let full = h.manifest(a.path(), walk).unwrap();
        let streamed = h.digest_path(a.path(), walk).unwrap();
        assert_eq!(streamed.digest, full.digest());
        assert!(streamed.is_dir);
        let mut sorted = full.entries.clone();
        sorted.sort_by(|x, y| x.path.cmp(&y.path));
        assert_eq!(sorted, full.entries, "the walk returns manifest order");
        let ma = h.manifest(a.path(), walk).unwrap();
        for p in ["a \"q\"\\.txt", "a/\ttab", "a.d", "run.sh"] {
            std::fs::remove_file(a.path().join(p))
                .or_else(|_| std::fs::remove_dir(a.path().join(p)))
                .unwrap();
        }
        std::fs::remove_dir(a.path().join("a")).unwrap();
        assert_ne!(ma.digest(), h.manifest(a.path(), walk).unwrap().digest());
        let ma = h.manifest(a.path(), walk).unwrap();
        assert_eq!(ma.digest(), h.manifest(b.path(), walk).unwrap().digest());
        let paths: Vec<&str> = ma.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["2.txt", "empty/inner", "x/1.txt"]);
        write(&b.path().join("x/1.txt"), b"ONE");
        assert_ne!(ma.digest(), h.manifest(b.path(), walk).unwrap().digest());
    }

    #[test]
    fn manifest_bytes_are_the_canonical_encoding() {
        let m = Manifest {
            entries: vec![
                Entry {
                    path: "a \"quoted\" é.txt".into(),
                    node: Node::File {
                        sha256: "ab".repeat(32),
                        size: 3,
                        exec: false,
                    },
                },
                Entry {
                    path: "bin/run.sh".into(),
                    node: Node::File {
                        sha256: "cd".repeat(32),
                        size: 0,
                        exec: true,
                    },
                },
                Entry {
                    path: "empty".into(),
                    node: Node::Dir,
                },
            ],
        };
        assert_eq!(m.to_bytes(), crate::canonical::to_vec(&m));
    }

    #[test]
    fn symlinks_are_followed_for_inputs_and_refused_in_outputs() {
        let d = tempfile::tempdir().unwrap();
        write(&d.path().join("real/f.txt"), b"f");
        std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
        let h = ContentHasher::new(None);
        let m = h.manifest(d.path(), Walk { follow_links: true }).unwrap();
        let paths: Vec<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["link/f.txt", "real/f.txt"]);
        assert!(matches!(
            h.manifest(
                d.path(),
                Walk {
                    follow_links: false
                }
            ),
            Err(HashError::Symlink { .. })
        ));
        std::os::unix::fs::symlink(d.path(), d.path().join("real/loop")).unwrap();
        let err = h
            .manifest(d.path(), Walk { follow_links: true })
            .unwrap_err();
        assert!(err.to_string().contains("symbolic link loop"), "{err}");
    }

    #[test]
    fn cache_folders_are_not_content() {
        let d = tempfile::tempdir().unwrap();
        write(&d.path().join("data.txt"), b"d");
        let h = ContentHasher::new(None);
        let walk = Walk { follow_links: true };
        let before = h.manifest(d.path(), walk).unwrap();
        write(
            &d.path().join("cache/CACHEDIR.TAG"),
            b"Signature: 8a477f597d28d172789f06886806bc55",
        );
        write(&d.path().join("cache/objects/x"), b"changes every run");
        assert_eq!(h.manifest(d.path(), walk).unwrap(), before);
    }

    #[test]
    fn sub_digests_address_files_and_folders() {
        let d = tempfile::tempdir().unwrap();
        write(&d.path().join("a/b.txt"), b"b");
        write(&d.path().join("c.txt"), b"c");
        let m = ContentHasher::new(None)
            .manifest(
                d.path(),
                Walk {
                    follow_links: false,
                },
            )
            .unwrap();
        assert_eq!(
            m.sub_digest("c.txt").unwrap(),
            hex::encode(Sha256::digest(b"c"))
        );
        let sub = tempfile::tempdir().unwrap();
        write(&sub.path().join("b.txt"), b"b");
        let expected = ContentHasher::new(None)
            .manifest(
                sub.path(),
                Walk {
                    follow_links: false,
                },
            )
            .unwrap()
            .digest();
        assert_eq!(m.sub_digest("a").unwrap(), expected);
        assert_eq!(m.sub_digest("nope"), None);
    }

    /// Replaces the cached digest of the first entry of the only stat cache in `dir`.
    fn poison_first_entry(dir: &Path) {
        let cache_file = std::fs::read_dir(dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let c = StatCache::parse(std::fs::read(&cache_file).unwrap()).unwrap();
        assert!(c.count > 0);
        let mut bytes = c.bytes.clone();
        let digest_at = c.records + 48;
        bytes[digest_at..digest_at + 32].copy_from_slice(&[7u8; 32]);
        std::fs::write(&cache_file, bytes).unwrap();
    }

    #[test]
    fn stat_cache_files_round_trip_and_damage_reads_as_empty() {
        let d = tempfile::tempdir().unwrap();
        let st = |n: u64| Stat {
            dev: 1,
            ino: n,
            size: n * 10,
            mtime_ns: -5,
            ctime_ns: i64::MAX,
        };
        let records = [("a b", st(1), [1u8; 32]), ("a/é", st(2), [2u8; 32])];
        let bytes = StatCache::encode(d.path(), records.iter().map(|(p, s, d)| (*p, *s, d)));
        let c = StatCache::parse(bytes.clone()).unwrap();
        assert_eq!(c.count, 2);
        for (i, (path, stat, digest)) in records.iter().enumerate() {
            assert_eq!(
                (c.path(i), c.stat(i), c.digest(i)),
                (path.as_bytes(), *stat, *digest)
            );
        }
        assert!(c.trusted(0), "modified long before the write");
        // Truncated anywhere, or out of order: not a cache.
        for cut in [0, 7, 27, bytes.len() - 1] {
            assert!(
                StatCache::parse(bytes[..cut].to_vec()).is_none(),
                "cut {cut}"
            );
        }
        let swapped = StatCache::encode(
            d.path(),
            [&records[1], &records[0]]
                .into_iter()
                .map(|(p, s, d)| (*p, *s, d)),
        );
        assert!(StatCache::parse(swapped).is_none());
        assert!(StatCache::parse(b"\x01\x02postcard".to_vec()).is_none());
    }

    #[test]
    fn stat_cache_skips_unchanged_files_and_sees_rewrites() {
        let d = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        write(&data.join("f.bin"), b"0123456789");
        // Age the file beyond the racy window so the cache may trust it.
        let old = SystemTime::now() - std::time::Duration::from_secs(10);
        File::options()
            .write(true)
            .open(data.join("f.bin"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let h = ContentHasher::new(Some(cache.path().to_path_buf()));
        let walk = Walk { follow_links: true };
        let first = h.manifest(&data, walk).unwrap();
        // Poison the cached digest: a trusted stat match must return the cached value...
        poison_first_entry(cache.path());
        let cached = h.manifest(&data, walk).unwrap();
        assert_ne!(cached, first, "an unchanged stat must not re-read the file");
        // ...and any write (same size) must be noticed.
        std::fs::write(data.join("f.bin"), b"0123456780").unwrap();
        let changed = h.manifest(&data, walk).unwrap();
        let Node::File { sha256, .. } = &changed.entries[0].node else {
            panic!()
        };
        assert_eq!(sha256, &hex::encode(Sha256::digest(b"0123456780")));
    }

    #[test]
    fn recently_modified_files_are_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        write(&d.path().join("f"), b"x");
        let h = ContentHasher::new(Some(cache.path().to_path_buf()));
        let walk = Walk { follow_links: true };
        h.manifest(d.path(), walk).unwrap();
        poison_first_entry(cache.path());
        let m = h.manifest(d.path(), walk).unwrap();
        let Node::File { sha256, .. } = &m.entries[0].node else {
            panic!()
        };
        assert_eq!(
            sha256,
            &hex::encode(Sha256::digest(b"x")),
            "a racily clean entry must be re-hashed"
        );
    }
}
