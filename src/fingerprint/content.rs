//! Content digests of files and folders, remembered by stat so unchanged data is not re-read.
//!
//! A file's digest is its sha256. A folder's digest is the sha256 of its [`Manifest`]: the
//! sorted list of relative paths with each file's digest, size and executable bit (empty
//! folders included), encoded canonically. The same manifest describes committed output trees
//! in the store, so an input folder and an output tree with equal content have equal digests.
//!
//! The stat cache (one file per input root under `stat-v1/`) maps each relative path to
//! (device, inode, size, mtime ns, ctime ns) → digest. A file whose stat matches is not read;
//! any write changes mtime/ctime, so a flipped byte is seen. Files modified less than
//! [`RACY_WINDOW_NS`] before the cache was written are not trusted (git's "racily clean"
//! problem: a later write within the same timestamp tick would go unnoticed) and are hashed
//! again next time. Folders holding a `CACHEDIR.TAG` (caches, ours included) are skipped, so a
//! project input that contains the cache does not change with every run. Misses are hashed in parallel with rayon. The cache is only an
//! optimisation: deleting `stat-v1/` is always safe.

use std::collections::HashMap;
use std::fs::{File, Metadata};

use std::io::Read;
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

/// Files found by a walk: relative path and metadata.
type FileList = Vec<(String, FileStat)>;

/// What the hasher needs to know of a file: its stat key, size and executable bit.
#[derive(Clone, Copy)]
pub struct FileStat {
    stat: Stat,
    size: u64,
    exec: bool,
}

impl FileStat {
    fn of(m: &Metadata) -> Self {
        FileStat {
            stat: Stat::of(m),
            size: m.len(),
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
    /// directly (keys in sorted order) because a manifest can list millions of files; a test
    /// pins these bytes to the generic encoder.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.entries.len() * 128);
        out.extend_from_slice(b"{\"entries\":[");
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let path = serde_json::to_string(&e.path).expect("strings serialise");
            match &e.node {
                Node::File { sha256, size, exec } => {
                    out.push(b'{');
                    if *exec {
                        out.extend_from_slice(b"\"exec\":true,");
                    }
                    out.extend_from_slice(b"\"path\":");
                    out.extend_from_slice(path.as_bytes());
                    out.extend_from_slice(b",\"sha256\":\"");
                    out.extend_from_slice(sha256.as_bytes());
                    out.extend_from_slice(
                        format!("\",\"size\":{size},\"type\":\"file\"}}").as_bytes(),
                    );
                }
                Node::Dir => {
                    out.extend_from_slice(b"{\"path\":");
                    out.extend_from_slice(path.as_bytes());
                    out.extend_from_slice(b",\"type\":\"dir\"}");
                }
            }
        }
        out.extend_from_slice(b"]}");
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

/// A digest of a project input: a file or a folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathDigest {
    pub digest: Hex,
    pub is_dir: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
struct Stat {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stat {
    fn of(m: &Metadata) -> Self {
        Stat {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
struct StatCacheFile {
    root: String,
    written_at_ns: i128,
    entries: Vec<(String, Stat, [u8; 32])>,
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

    /// Digest of a file or folder.
    pub fn digest_path(&self, path: &Path, walk: Walk) -> Result<PathDigest, HashError> {
        let meta = if walk.follow_links {
            std::fs::metadata(path)
        } else {
            std::fs::symlink_metadata(path)
        }
        .map_err(io_err(path))?;
        if meta.is_dir() {
            Ok(PathDigest {
                digest: self.manifest(path, walk)?.digest(),
                is_dir: true,
            })
        } else if meta.is_file() {
            let old = self.load(path);
            let (digest, _) =
                self.manifest_of_files(path, vec![(String::new(), FileStat::of(&meta))], old)?;
            Ok(PathDigest {
                digest: digest[0].clone(),
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
        // Reading the stat cache overlaps with the walk.
        let (found, old) = rayon::join(|| walk_tree(root, walk.follow_links), || self.load(root));
        let found = found?;
        let mut entries: Vec<Entry> = Vec::new();
        let mut files: FileList = Vec::with_capacity(found.len());
        for (rel, item) in found {
            match item {
                Found::Dir => entries.push(Entry {
                    path: rel,
                    node: Node::Dir,
                }),
                Found::File(st) => files.push((rel, st)),
            }
        }
        let (digests, files) = self.manifest_of_files(root, files, old)?;
        for ((rel, st), sha256) in files.into_iter().zip(digests) {
            entries.push(Entry {
                path: rel,
                node: Node::File {
                    sha256,
                    size: st.size,
                    exec: st.exec,
                },
            });
        }
        // A folder is listed only when nothing lies below it: a file's path implies its parents.
        let mut parents: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for e in &entries {
            let mut p = e.path.as_str();
            while let Some(cut) = p.rfind('/') {
                p = &p[..cut];
                parents.insert(p);
            }
        }
        let parents: std::collections::HashSet<String> =
            parents.into_iter().map(str::to_string).collect();
        entries.retain(|e| e.node != Node::Dir || !parents.contains(&e.path));
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Manifest { entries })
    }

    /// Digests of `files` (paths relative to `root`; "" is `root` itself), using the stat
    /// cache. Returns digests in the order given, with the metadata.
    fn manifest_of_files(
        &self,
        root: &Path,
        files: FileList,
        old: StatCacheFile,
    ) -> Result<(Vec<Hex>, FileList), HashError> {
        let cache_path = self.cache_path(root);
        let trusted_before = old.written_at_ns - RACY_WINDOW_NS;
        let known: HashMap<&str, (&Stat, &[u8; 32])> = old
            .entries
            .iter()
            .filter(|(_, s, _)| s.mtime_ns < trusted_before)
            .map(|(p, s, d)| (p.as_str(), (s, d)))
            .collect();

        let stats: Vec<Stat> = files.iter().map(|(_, f)| f.stat).collect();
        let digests: Vec<Result<[u8; 32], HashError>> = files
            .par_iter()
            .zip(stats.par_iter())
            .map(|((rel, _), stat)| match known.get(rel.as_str()) {
                Some((s, d)) if *s == stat => Ok(**d),
                _ => {
                    let path = if rel.is_empty() {
                        root.to_path_buf()
                    } else {
                        root.join(rel)
                    };
                    sha256_file(&path)
                }
            })
            .collect();
        let digests: Vec<[u8; 32]> = digests.into_iter().collect::<Result<_, _>>()?;
        let misses = files
            .iter()
            .zip(&stats)
            .filter(|((rel, _), st)| !matches!(known.get(rel.as_str()), Some((s, _)) if *s == *st))
            .count();
        let still_racy = old.entries.len() != known.len();
        if let Some(cache_path) = cache_path
            && (misses > 0 || still_racy || old.entries.len() != files.len())
        {
            let entries = files
                .iter()
                .zip(&stats)
                .zip(&digests)
                .map(|(((rel, _), st), d)| (rel.clone(), *st, *d))
                .collect();
            save_stat_cache(&cache_path, root, entries);
        }
        Ok((digests.iter().map(hex::encode).collect(), files))
    }

    /// The stat cache of `root` (empty when there is none or it is unreadable).
    fn load(&self, root: &Path) -> StatCacheFile {
        self.cache_path(root)
            .as_deref()
            .map(load_stat_cache)
            .unwrap_or_default()
    }

    /// Records that `root`'s files have the digests in `manifest` (just hashed by the caller),
    /// so the next read needs only stats.
    pub fn prime(&self, root: &Path, manifest: &Manifest) {
        let Some(cache_path) = self.cache_path(root) else {
            return;
        };
        let mut entries = Vec::new();
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
                entries.push((e.path.clone(), Stat::of(&meta), digest));
            }
        }
        save_stat_cache(&cache_path, root, entries);
    }

    fn cache_path(&self, root: &Path) -> Option<PathBuf> {
        let dir = self.stat_dir.as_ref()?;
        let abs = std::path::absolute(root).ok()?;
        let key = hex::encode(&Sha256::digest(abs.as_os_str().as_encoded_bytes())[..16]);
        Some(dir.join(format!("{key}.bin")))
    }
}

/// What the walk found at a relative path.
enum Found {
    Dir,
    File(FileStat),
}

/// Lists a folder recursively: sub-folders are read in parallel, each entry costs one stat
/// (none for folders, whose type comes from the directory entry). Symbolic links are followed
/// (with loop detection) or refused.
fn walk_tree(root: &Path, follow_links: bool) -> Result<Vec<(String, Found)>, HashError> {
    let meta = std::fs::metadata(root).map_err(io_err(root))?;
    let mut out = walk_dir(
        root,
        String::new(),
        follow_links,
        &[(meta.dev(), meta.ino())],
    )?;
    out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn walk_dir(
    dir: &Path,
    rel: String,
    follow: bool,
    ancestors: &[(u64, u64)],
) -> Result<Vec<(String, Found)>, HashError> {
    let mut out = Vec::new();
    let mut subdirs: Vec<(PathBuf, String, (u64, u64))> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| HashError::NonUtf8 { path: path.clone() })?;
        let child_rel = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let mut ft = entry.file_type().map_err(io_err(&path))?;
        let mut meta = None;
        if ft.is_symlink() {
            if !follow {
                return Err(HashError::Symlink { path });
            }
            let m = std::fs::metadata(&path).map_err(io_err(&path))?;
            ft = m.file_type();
            meta = Some(m);
        }
        if ft.is_dir() {
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
                None => entry.metadata().map_err(io_err(&path))?,
            };
            out.push((child_rel, Found::File(FileStat::of(&m))));
        } else {
            return Err(HashError::Special { path });
        }
    }
    let nested: Vec<Result<Vec<(String, Found)>, HashError>> = subdirs
        .into_par_iter()
        .map(|(path, child_rel, id)| {
            let mut chain = ancestors.to_vec();
            chain.push(id);
            let mut v = walk_dir(&path, child_rel.clone(), follow, &chain)?;
            v.push((child_rel, Found::Dir));
            Ok(v)
        })
        .collect();
    for n in nested {
        out.extend(n?);
    }
    Ok(out)
}

fn load_stat_cache(path: &Path) -> StatCacheFile {
    std::fs::read(path)
        .ok()
        .and_then(|b| postcard::from_bytes(&b).ok())
        .unwrap_or_default()
}

fn save_stat_cache(path: &Path, root: &Path, entries: Vec<(String, Stat, [u8; 32])>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    let file = StatCacheFile {
        root: root.to_string_lossy().into_owned(),
        written_at_ns: now,
        entries,
    };
    if let (Ok(bytes), Some(dir)) = (postcard::to_allocvec(&file), path.parent()) {
        // Best effort: a lost cache only costs re-hashing.
        let _ = std::fs::create_dir_all(dir);
        let _ = crate::store::atomic::write_file(path, &bytes, false);
    }
}

/// sha256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<[u8; 32], HashError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
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
        let mut c: StatCacheFile =
            postcard::from_bytes(&std::fs::read(&cache_file).unwrap()).unwrap();
        c.entries[0].2 = [7u8; 32];
        std::fs::write(&cache_file, postcard::to_allocvec(&c).unwrap()).unwrap();
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
