//! The local content-addressed store: committed stage results, and nothing half-written.
//!
//! Layout (every bucket carries a version in its name, so a format change starts a new one):
//!
//! | path                         | what                                                     |
//! |------------------------------|----------------------------------------------------------|
//! | `CACHEDIR.TAG`               | tells backup tools to skip the cache                     |
//! | `.lock`                      | shared by `run`/`status`, exclusive for `cache gc`       |
//! | `objects-v1/ab/cdef…`        | file contents by sha256, read-only; tree manifests too   |
//! | `trees-v1/<digest>/`         | an output tree as ordinary files: hard links to objects  |
//! | `runs-v1/ab/<fingerprint>.json` | run records: ingredients, output digest, timings      |
//! | `heads-v1/<pipeline>.json`   | per pipeline file: the last committed key of each stage  |
//! | `history-v1/*.json`          | one per `run`: which keys it used (gc keeps the last N)  |
//! | `logs-v1/<stage>/*.log`      | one log per stage execution                              |
//! | `stat-v1/`                   | stat caches of hashed folders (safe to delete)           |
//! | `staging-v1/<pid>-<rand>/`   | work directories of live runs, flock-ed by their owner   |
//! | `locks-v1/<fingerprint>.lock`| held while a key is executed, so two runs never both do  |
//! | `scratch-v1/<kind>/`         | resumable state of stage kinds (partial downloads)       |
//! | `quarantine-v1/`             | damaged objects moved aside                              |
//!
//! Commit protocol for a stage result (see [`Store::commit_tree`] and [`Store::commit`]):
//! 1. the stage writes into `staging-v1/<id>/out`;
//! 2. every file is hashed, made read-only, fsync-ed and hard-linked into `objects-v1/`
//!    (same filesystem, atomic, never replacing: the first copy of a content stays the object,
//!    so every tree links the same inode); existing objects are reused;
//! 3. the tree manifest is written as an object, the tree materialised as hard links in a
//!    staging folder and renamed into `trees-v1/<digest>`;
//! 4. the run record is written last (temp file, fsync, rename): **that is the commit point**,
//!    [`Store::commit`], the only writer of records (the remote's restore uses it too), which
//!    refuses a record whose tree is not wholly in the store.
//!
//! A crash before step 4 leaves only unreferenced objects (removed by `cache gc`) and staging
//! folders whose lock is free (removed by the next run). Reads verify: a tree is checked against
//! its manifest before a cached result is used (cheaply, through the stat cache), and
//! `cache verify` re-hashes every object.

pub mod atomic;
pub mod maintenance;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::fingerprint::content::{ContentHasher, HashError, Manifest, Node, Walk};
use crate::fingerprint::{Fingerprint, Ingredients};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `cause` is shown in the message and not chained as a source, so a caller printing the
    /// chain (`{:#}`) does not repeat it.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
    /// A command that writes was pointed at a cache it cannot write.
    #[error(
        "the cache at {} is read-only ({cause}); this command writes to it. Point `--cache-dir` \
         (or CUSA_PIPE_CACHE) at a writable folder; `status`, `path`, `metrics`, `dag`, \
         `cache verify` and `cache du` read a read-only cache as it is",
        root.display()
    )]
    ReadOnly {
        root: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error("{0}")]
    Damaged(String),
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |cause| StoreError::Io { context, cause }
}

/// A committed result: the commit point of a stage execution.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub fingerprint: Fingerprint,
    /// The stage's name when it was committed (informational; not part of the key).
    pub stage: String,
    pub ingredients: Ingredients,
    /// Digest of the output tree's manifest.
    pub output: String,
    pub files: usize,
    pub bytes: u64,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub seconds: f64,
    #[serde(default)]
    pub notes: Vec<String>,
    #[serde(default)]
    pub metrics: BTreeMap<String, Value>,
    /// What the stage measured (`cusa-pipe metrics` reads these), in the stage's order.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub results: serde_json::Map<String, Value>,
    /// The execution's log, relative to the cache root.
    pub log: Option<String>,
    /// The cusa-pipe version that committed it.
    pub tool: String,
    /// Where it was computed, when by a cluster job (`executor: slurm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ran_on: Option<crate::executor::Placement>,
}

/// One `run`'s entry in `history-v1/` (and on the remote): which keys it used, so `cache gc`
/// keeps what the last N runs needed. Written and read only through this type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The pipeline file as the user named it (informational).
    pub pipeline: String,
    #[serde(default)]
    pub dry_run: bool,
    pub stages: Vec<HistoryStage>,
}

/// One stage of a [`HistoryEntry`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryStage {
    pub name: String,
    /// The run's outcome word (`ran`, `cached`, `restored`, `failed`, …).
    pub outcome: String,
    /// The key it used; absent when it could not be computed.
    #[serde(default)]
    pub fingerprint: Option<Fingerprint>,
    #[serde(default)]
    pub reasons: Vec<String>,
    #[serde(default)]
    pub seconds: f64,
}

impl HistoryEntry {
    /// The keys the run used.
    pub fn fingerprints(&self) -> impl Iterator<Item = &Fingerprint> {
        self.stages.iter().filter_map(|s| s.fingerprint.as_ref())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("history serialises")
    }

    /// An entry as stored; `None` if unreadable (a history file never fails a command).
    pub fn from_bytes(bytes: &[u8]) -> Option<HistoryEntry> {
        serde_json::from_slice(bytes).ok()
    }
}

impl RunRecord {
    /// Reads a record written by someone else (a remote, a cache folder shared on a disk) and
    /// checks what is later joined onto our folders: the key and the output are sha256
    /// digests, the log (if any) a `.log` file under `logs-v1/`
    /// ([`cusa_stages::safe_path::relative`]).
    pub fn from_untrusted(bytes: &[u8]) -> Result<RunRecord, String> {
        let record: RunRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        record.validate()?;
        Ok(record)
    }

    /// See [`RunRecord::from_untrusted`].
    pub fn validate(&self) -> Result<(), String> {
        use cusa_stages::safe_path::{is_sha256, relative};
        if !is_sha256(&self.fingerprint.0) {
            return Err("its key is not a sha256".into());
        }
        if !is_sha256(&self.output) {
            return Err("its output is not a sha256".into());
        }
        if let Some(log) = &self.log {
            relative(log).map_err(|why| format!("its log path: {why}"))?;
            if !log.starts_with("logs-v1/") || !log.ends_with(".log") {
                return Err(format!("its log `{log}` is not a log file of the cache"));
            }
        }
        Ok(())
    }
}

/// What a tree check found.
#[derive(Debug)]
pub enum TreeState {
    Intact(PathBuf),
    /// Objects are gone (gc, manual deletion).
    Missing(String),
    /// Content differs from the manifest (a flipped byte, a consumer writing into it).
    Damaged(String),
}

/// A held cache lock (shared or exclusive); released on drop. `None`: a read-only cache that
/// has no lock file (nothing has ever written it, so nothing can be writing it).
pub struct CacheLock {
    _file: Option<File>,
}

/// A staging work directory; its lock tells sweepers it is alive. Removed on drop.
pub struct Staging {
    pub dir: PathBuf,
    _lock: File,
}

impl Staging {
    /// Where the stage writes its output.
    pub fn out_dir(&self) -> PathBuf {
        self.dir.join("out")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        remove_tree(&self.dir);
    }
}

/// The store rooted at a cache directory.
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    hasher: ContentHasher,
    /// Opened by a command that only reads ([`Store::open_read_only`]): nothing is created,
    /// swept or repaired, and a staging folder is refused.
    read_only: bool,
}

/// Whether an I/O error says "you may not write here".
fn is_read_only(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ReadOnlyFilesystem | ErrorKind::PermissionDenied
    )
}

const BUCKETS: &[&str] = &[
    "objects-v1",
    "trees-v1",
    "runs-v1",
    "heads-v1",
    "history-v1",
    "logs-v1",
    "stat-v1",
    "staging-v1",
    "locks-v1",
    "scratch-v1",
];

impl Store {
    /// Opens (creating if needed) the store at `root`, for a command that writes.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let read_only = |cause: std::io::Error| {
            if is_read_only(&cause) {
                StoreError::ReadOnly {
                    root: root.to_path_buf(),
                    cause,
                }
            } else {
                StoreError::Io {
                    context: format!("opening the cache at {}", root.display()),
                    cause,
                }
            }
        };
        fs::create_dir_all(root).map_err(read_only)?;
        let root = fs::canonicalize(root)
            .map_err(io(format!("opening the cache at {}", root.display())))?;
        for b in BUCKETS {
            fs::create_dir_all(root.join(b)).map_err(read_only)?;
        }
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(".lock"))
            .map_err(read_only)?;
        let tag = root.join("CACHEDIR.TAG");
        if !tag.exists() {
            let text = "Signature: 8a477f597d28d172789f06886806bc55\n# This file is a cache directory tag created by cusa-pipe.\n# For information about cache directory tags see https://bford.info/cachedir/\n";
            atomic::write_file(&tag, text.as_bytes(), false).map_err(io("writing CACHEDIR.TAG"))?;
        }
        let hasher = ContentHasher::new(Some(root.join("stat-v1")));
        Ok(Store {
            root,
            hasher,
            read_only: false,
        })
    }

    /// Opens the store at `root` for a command that only reads (`status`, `path`, `metrics`,
    /// `cache verify`, `cache du`): nothing is created, so a cache on a read-only disk or
    /// shared read-only by a team works, and a cache that does not exist is an empty one.
    pub fn open_read_only(root: &Path) -> Result<Store, StoreError> {
        let root = fs::canonicalize(root)
            .or_else(|_| std::path::absolute(root))
            .map_err(io(format!("opening the cache at {}", root.display())))?;
        let hasher = ContentHasher::new(Some(root.join("stat-v1")));
        Ok(Store {
            root,
            hasher,
            read_only: true,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn hasher(&self) -> &ContentHasher {
        &self.hasher
    }

    /// Takes the cache lock, shared (runs) or exclusive (gc); `waiting` is called once if
    /// another process holds it.
    pub fn lock(&self, exclusive: bool, waiting: impl FnOnce()) -> Result<CacheLock, StoreError> {
        let path = self.root.join(".lock");
        let file = if self.read_only {
            // flock works on a file opened for reading, so readers still wait for a `gc`.
            match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(CacheLock { _file: None }),
                Err(e) => {
                    return Err(StoreError::Io {
                        context: format!("opening the cache lock {}", path.display()),
                        cause: e,
                    });
                }
            }
        } else {
            File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io(format!("opening the cache lock {}", path.display())))?
        };
        let got = if exclusive {
            file.try_lock()
        } else {
            file.try_lock_shared()
        };
        if got.is_err() {
            waiting();
            if exclusive {
                file.lock()
            } else {
                file.lock_shared()
            }
            .map_err(io("locking the cache"))?;
        }
        Ok(CacheLock { _file: Some(file) })
    }

    /// Holds the execution lock of one fingerprint; `waiting` is called once if another
    /// process is executing it.
    pub fn lock_fingerprint(
        &self,
        fp: &Fingerprint,
        waiting: impl FnOnce(),
    ) -> Result<File, StoreError> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("locks-v1").join(format!("{fp}.lock")))
            .map_err(io("opening a stage lock"))?;
        if file.try_lock().is_err() {
            waiting();
            file.lock().map_err(io("locking a stage"))?;
        }
        Ok(file)
    }

    /// A fresh staging directory with an empty `out/`.
    pub fn staging(&self) -> Result<Staging, StoreError> {
        if self.read_only {
            return Err(StoreError::Damaged(format!(
                "the cache at {} was opened read-only: nothing can be rebuilt in it (run \
                 `cusa-pipe run` with a writable cache)",
                self.root.display()
            )));
        }
        let base = self.root.join("staging-v1");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", std::process::id()))
            .tempdir_in(&base)
            .map_err(io("creating a staging directory"))?
            .keep();
        let lock = File::create(dir.join(".lock")).map_err(io("creating a staging lock"))?;
        lock.lock().map_err(io("locking a staging directory"))?;
        fs::create_dir(dir.join("out")).map_err(io("creating a staging directory"))?;
        Ok(Staging { dir, _lock: lock })
    }

    /// Removes staging directories whose owner is gone. Returns how many were removed.
    pub fn sweep_staging(&self) -> usize {
        if self.read_only {
            return 0;
        }
        let mut swept = 0;
        for dir in self.staging_leftovers() {
            remove_tree(&dir);
            swept += 1;
        }
        swept
    }

    /// Staging directories not locked by a live process.
    pub fn staging_leftovers(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(self.root.join("staging-v1")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            let alive = match File::open(dir.join(".lock")) {
                Ok(f) => f.try_lock().is_err(),
                // Created but not yet locked: only a very young folder can be alive.
                Err(_) => entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|e| e.as_secs() < 60)),
            };
            if !alive {
                out.push(dir);
            }
        }
        out
    }

    pub fn scratch_dir(&self, kind: &str) -> PathBuf {
        self.root.join("scratch-v1").join(kind)
    }

    fn object_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("objects-v1")
            .join(&digest[..2])
            .join(&digest[2..])
    }

    fn tree_dir(&self, digest: &str) -> PathBuf {
        self.root.join("trees-v1").join(digest)
    }

    fn record_path(&self, fp: &Fingerprint) -> PathBuf {
        self.root
            .join("runs-v1")
            .join(&fp.0[..2])
            .join(format!("{fp}.json"))
    }

    /// Moves a staged output tree into the store; returns its manifest and digest.
    pub fn commit_tree(&self, staging: &Staging) -> Result<(Manifest, String), StoreError> {
        let out = staging.out_dir();
        let manifest = ContentHasher::new(None).manifest(
            &out,
            Walk {
                follow_links: false,
            },
        )?;
        let mut touched_dirs = std::collections::BTreeSet::new();
        for e in &manifest.entries {
            let Node::File { sha256, exec, .. } = &e.node else {
                continue;
            };
            let obj = self.object_path(sha256);
            if obj.exists() {
                continue;
            }
            let src = out.join(&e.path);
            let dir = obj.parent().expect("objects have a parent");
            fs::create_dir_all(dir).map_err(io("creating an object directory"))?;
            let f = File::open(&src).map_err(io(format!("opening {}", src.display())))?;
            f.sync_all().map_err(io("syncing an output file"))?;
            fs::set_permissions(
                &src,
                fs::Permissions::from_mode(if *exec { 0o555 } else { 0o444 }),
            )
            .map_err(io("making an object read-only"))?;
            if link_new_object(&src, &obj)
                .map_err(io(format!("moving {} into the store", e.path)))?
            {
                touched_dirs.insert(dir.to_path_buf());
            }
        }
        let digest = manifest.digest();
        self.put_object_bytes(&digest, &manifest.to_bytes(), staging)?;
        touched_dirs.insert(
            self.object_path(&digest)
                .parent()
                .expect("parent")
                .to_path_buf(),
        );
        for dir in touched_dirs {
            atomic::sync_dir(&dir).map_err(io("syncing the object store"))?;
        }
        self.materialize(&digest, &manifest, staging)?;
        Ok((manifest, digest))
    }

    fn put_object_bytes(
        &self,
        digest: &str,
        bytes: &[u8],
        staging: &Staging,
    ) -> Result<(), StoreError> {
        let obj = self.object_path(digest);
        if obj.exists() {
            return Ok(());
        }
        fs::create_dir_all(obj.parent().expect("parent"))
            .map_err(io("creating an object directory"))?;
        atomic::write_file_in(&obj, bytes, Some(&staging.dir), true)
            .map_err(io("writing a manifest"))?;
        fs::set_permissions(&obj, fs::Permissions::from_mode(0o444))
            .map_err(io("making an object read-only"))?;
        Ok(())
    }

    /// Builds `trees-v1/<digest>` from objects (hard links), atomically.
    fn materialize(
        &self,
        digest: &str,
        manifest: &Manifest,
        staging: &Staging,
    ) -> Result<(), StoreError> {
        let target = self.tree_dir(digest);
        if target.exists() {
            return Ok(());
        }
        let tmp = staging.dir.join(format!("tree-{}", &digest[..12]));
        fs::create_dir_all(&tmp).map_err(io("creating a tree"))?;
        for e in &manifest.entries {
            let path = tmp.join(&e.path);
            match &e.node {
                Node::Dir => fs::create_dir_all(&path).map_err(io("creating a tree folder"))?,
                Node::File { sha256, .. } => {
                    fs::create_dir_all(path.parent().expect("parent"))
                        .map_err(io("creating a tree folder"))?;
                    let obj = self.object_path(sha256);
                    fs::hard_link(&obj, &path).map_err(|e| match e.kind() {
                        ErrorKind::NotFound => {
                            StoreError::Damaged(format!("object {sha256} is missing"))
                        }
                        _ => StoreError::Io {
                            context: format!("linking {}", path.display()),
                            cause: e,
                        },
                    })?;
                }
            }
        }
        set_tree_read_only(&tmp, true);
        match fs::rename(&tmp, &target) {
            Ok(()) => {}
            // Another run materialised the same tree first.
            Err(_) if target.exists() => remove_tree(&tmp),
            Err(e) => {
                return Err(StoreError::Io {
                    context: "moving a tree into the store".into(),
                    cause: e,
                });
            }
        }
        atomic::sync_dir(&self.root.join("trees-v1")).map_err(io("syncing trees"))?;
        self.hasher.prime(&target, manifest);
        Ok(())
    }

    /// The manifest of a committed tree, verified against its digest.
    pub fn manifest(&self, digest: &str) -> Result<Manifest, StoreError> {
        let path = self.object_path(digest);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => {
                StoreError::Damaged(format!("tree manifest {} is missing", &digest[..12]))
            }
            _ => StoreError::Io {
                context: format!("reading {}", path.display()),
                cause: e,
            },
        })?;
        if hex::encode(Sha256::digest(&bytes)) != digest {
            return Err(StoreError::Damaged(format!(
                "tree manifest {} does not match its digest",
                &digest[..12]
            )));
        }
        Manifest::from_untrusted(&bytes)
            .map_err(|e| StoreError::Damaged(format!("tree manifest {}: {e}", &digest[..12])))
    }

    /// Checks a committed tree before it is used, re-materialising it from objects if its
    /// folder is gone. Damaged objects are moved to quarantine so the next commit replaces them.
    pub fn check_tree(&self, digest: &str) -> Result<TreeState, StoreError> {
        self.check_tree_once(digest, true)
    }

    /// [`Store::check_tree`]; `rebuild`: a tree found damaged whose objects are all intact is
    /// rebuilt from them and checked again (once).
    fn check_tree_once(&self, digest: &str, rebuild: bool) -> Result<TreeState, StoreError> {
        let manifest = match self.manifest(digest) {
            Ok(m) => m,
            Err(StoreError::Damaged(d)) => return Ok(TreeState::Missing(d)),
            Err(e) => return Err(e),
        };
        let dir = self.tree_dir(digest);
        if !dir.exists() {
            for e in &manifest.entries {
                if let Node::File { sha256, .. } = &e.node
                    && !self.object_path(sha256).exists()
                {
                    return Ok(TreeState::Missing(format!(
                        "object of `{}` is missing",
                        e.path
                    )));
                }
            }
            let staging = self.staging()?;
            match self.materialize(digest, &manifest, &staging) {
                Ok(()) => {}
                Err(StoreError::Damaged(d)) => return Ok(TreeState::Missing(d)),
                Err(e) => return Err(e),
            }
        }
        let actual = match self.hasher.manifest(
            &dir,
            Walk {
                follow_links: false,
            },
        ) {
            Ok(m) => m,
            Err(e) => return Ok(TreeState::Damaged(e.to_string())),
        };
        if actual == manifest {
            return Ok(TreeState::Intact(dir));
        }
        let detail = first_difference(&manifest, &actual);
        // Quarantine objects whose content no longer matches their name, then drop the tree.
        // A tree file that differs is not proof that its object does: a file replaced inside
        // the tree (a new inode) leaves the object intact, and other trees still link it.
        let want: BTreeMap<&str, &Node> = manifest
            .entries
            .iter()
            .map(|e| (e.path.as_str(), &e.node))
            .collect();
        if self.read_only {
            return Ok(TreeState::Damaged(detail));
        }
        let mut quarantined = false;
        for e in &actual.entries {
            if let (
                Node::File { sha256: got, .. },
                Some(Node::File {
                    sha256: expected, ..
                }),
            ) = (&e.node, want.get(e.path.as_str()))
                && got != expected
                && !self.object_intact(expected)
            {
                self.quarantine(expected);
                quarantined = true;
            }
        }
        remove_tree(&dir);
        if rebuild && !quarantined {
            // Only the tree was touched (a file replaced or added in it): its objects rebuild it.
            return self.check_tree_once(digest, false);
        }
        Ok(TreeState::Damaged(detail))
    }

    /// Whether the object `digest` exists and its content hashes to its name.
    pub fn object_intact(&self, digest: &str) -> bool {
        crate::fingerprint::content::sha256_file(&self.object_path(digest))
            .is_ok_and(|d| hex::encode(d) == digest)
    }

    /// Moves a damaged object aside (kept for inspection, never served again).
    pub fn quarantine(&self, digest: &str) {
        if self.read_only {
            return;
        }
        let obj = self.object_path(digest);
        let q = self.root.join("quarantine-v1");
        if fs::create_dir_all(&q).is_ok() {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let _ = fs::rename(&obj, q.join(format!("{digest}.{stamp}")));
        }
    }

    /// Whether the object `digest` is in the store.
    pub fn has_object(&self, digest: &str) -> bool {
        self.object_path(digest).exists()
    }

    /// Where the object `digest` lives (it may not exist).
    pub fn object_file(&self, digest: &str) -> PathBuf {
        self.object_path(digest)
    }

    /// Moves a file whose content the caller has verified to be `digest` into the objects
    /// (read-only, fsync-ed, renamed: the same steps as [`Store::commit_tree`]). Used by the
    /// remote to bring downloaded objects in; an object already present is kept.
    pub fn adopt_object(&self, digest: &str, file: &Path, exec: bool) -> Result<(), StoreError> {
        let obj = self.object_path(digest);
        if obj.exists() {
            let _ = fs::remove_file(file);
            return Ok(());
        }
        let dir = obj.parent().expect("objects have a parent");
        fs::create_dir_all(dir).map_err(io("creating an object directory"))?;
        File::open(file)
            .and_then(|f| f.sync_all())
            .map_err(io(format!("syncing {}", file.display())))?;
        fs::set_permissions(
            file,
            fs::Permissions::from_mode(if exec { 0o555 } else { 0o444 }),
        )
        .map_err(io("making an object read-only"))?;
        link_new_object(file, &obj).map_err(io(format!(
            "moving object {} into the store",
            &digest[..12]
        )))?;
        let _ = fs::remove_file(file);
        atomic::sync_dir(dir).map_err(io("syncing the object store"))
    }

    /// The record file of `fp`, relative to the root (the remote mirrors these paths).
    pub fn record_relative(fp: &Fingerprint) -> String {
        format!("runs-v1/{}/{fp}.json", &fp.0[..2])
    }

    /// The object file of `digest`, relative to the root.
    pub fn object_relative(digest: &str) -> String {
        format!("objects-v1/{}/{}", &digest[..2], &digest[2..])
    }

    /// The run record of a fingerprint, if committed and readable.
    pub fn read_record(&self, fp: &Fingerprint) -> Option<RunRecord> {
        let bytes = fs::read(self.record_path(fp)).ok()?;
        RunRecord::from_untrusted(&bytes)
            .ok()
            .filter(|r| &r.fingerprint == fp)
    }

    /// Every readable run record in the store, oldest first.
    pub fn records(&self) -> Vec<RunRecord> {
        let mut out: Vec<RunRecord> = walkdir::WalkDir::new(self.root.join("runs-v1"))
            .min_depth(2)
            .max_depth(2)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| RunRecord::from_untrusted(&fs::read(e.path()).ok()?).ok())
            .collect();
        out.sort_by(|a, b| a.started_at.cmp(&b.started_at));
        out
    }

    /// **The commit point**, and the only way a run record is written: for a stage run (after
    /// [`Store::commit_tree`]) and for a result restored from a remote (after its objects were
    /// adopted) alike. The record is refused unless its output's manifest and every object it
    /// names are already in the store, so a record can never precede its tree, whatever order
    /// a caller tries.
    pub fn commit(&self, staging: &Staging, record: &RunRecord) -> Result<(), StoreError> {
        record
            .validate()
            .map_err(|e| StoreError::Damaged(format!("run record {}: {e}", record.fingerprint)))?;
        let manifest = self.manifest(&record.output)?;
        if let Some(e) = manifest.entries.iter().find(
            |e| matches!(&e.node, Node::File { sha256, .. } if !self.object_path(sha256).exists()),
        ) {
            return Err(StoreError::Damaged(format!(
                "the object of `{}` is not in the store: the record of `{}` would precede its tree",
                e.path, record.stage
            )));
        }
        self.write_record(record, staging)
    }

    /// Writes a run record (see [`Store::commit`]).
    fn write_record(&self, record: &RunRecord, staging: &Staging) -> Result<(), StoreError> {
        let path = self.record_path(&record.fingerprint);
        fs::create_dir_all(path.parent().expect("parent"))
            .map_err(io("creating the records folder"))?;
        let bytes = serde_json::to_vec_pretty(record).expect("records serialise");
        atomic::write_file_in(&path, &bytes, Some(&staging.dir), true)
            .map_err(io("writing the run record"))
    }

    /// Removes a run record (its result will be recomputed).
    pub fn remove_record(&self, fp: &Fingerprint) {
        if self.read_only {
            return;
        }
        let _ = fs::remove_file(self.record_path(fp));
    }

    /// A path for a new stage log, relative to the root and absolute.
    pub fn new_log_path(&self, stage: &str, fp: &Fingerprint) -> (String, PathBuf) {
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .replace(':', "");
        let rel = format!(
            "logs-v1/{stage}/{stamp}-{}-{}.log",
            fp.short(),
            std::process::id()
        );
        let abs = self.root.join(&rel);
        let _ = fs::create_dir_all(abs.parent().expect("parent"));
        (rel, abs)
    }

    /// Last committed fingerprint per stage for one pipeline file.
    pub fn heads(&self, pipeline_id: &str) -> BTreeMap<String, Fingerprint> {
        fs::read(
            self.root
                .join("heads-v1")
                .join(format!("{pipeline_id}.json")),
        )
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
    }

    /// Records `stage → fp` in the pipeline's heads (read-modify-write under a lock).
    pub fn set_head(
        &self,
        pipeline_id: &str,
        stage: &str,
        fp: &Fingerprint,
    ) -> Result<(), StoreError> {
        let dir = self.root.join("heads-v1");
        let lock = File::create(dir.join(format!("{pipeline_id}.lock")))
            .map_err(io("opening the heads lock"))?;
        lock.lock().map_err(io("locking the heads"))?;
        let mut heads = self.heads(pipeline_id);
        if heads.get(stage) == Some(fp) {
            return Ok(());
        }
        heads.insert(stage.to_string(), fp.clone());
        let bytes = serde_json::to_vec_pretty(&heads).expect("heads serialise");
        atomic::write_file(&dir.join(format!("{pipeline_id}.json")), &bytes, true)
            .map_err(io("writing the heads"))
    }

    /// Appends one run's history entry.
    pub fn write_history(&self, entry: &HistoryEntry) -> Result<(), StoreError> {
        atomic::write_file(
            &self.root.join(history_relative()),
            &entry.to_bytes(),
            false,
        )
        .map_err(io("writing the run history"))
    }
}

/// Makes `src` the object at `obj` unless an object is there already; returns whether it did.
///
/// A hard link, not a rename: two commits bringing the same content at once must not replace
/// each other's object, or the tree materialised from the first would link an inode that is no
/// longer the object (and a repair of one would not reach the other). The first one wins; the
/// content is the same by its name. `src` stays in the staging folder, removed with it.
fn link_new_object(src: &Path, obj: &Path) -> std::io::Result<bool> {
    match fs::hard_link(src, obj) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// A new history file's path relative to the cache root (the remote uses the same):
/// `history-v1/<nanoseconds>-<pid>.json`, so names sort by time.
pub fn history_relative() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "history-v1/{:020}-{}.json",
        now.as_nanos(),
        std::process::id()
    )
}

/// The identity of a pipeline file in the store (its absolute path, hashed).
pub fn pipeline_id(file: &Path) -> String {
    let abs = fs::canonicalize(file)
        .or_else(|_| std::path::absolute(file))
        .unwrap_or_else(|_| file.to_path_buf());
    hex::encode(&Sha256::digest(abs.as_os_str().as_encoded_bytes())[..12])
}

fn first_difference(want: &Manifest, got: &Manifest) -> String {
    let w: BTreeMap<&str, &Node> = want
        .entries
        .iter()
        .map(|e| (e.path.as_str(), &e.node))
        .collect();
    let g: BTreeMap<&str, &Node> = got
        .entries
        .iter()
        .map(|e| (e.path.as_str(), &e.node))
        .collect();
    for (path, node) in &w {
        match g.get(path) {
            None => return format!("`{path}` is missing"),
            Some(n) if n != node => return format!("`{path}` does not match its digest"),
            _ => {}
        }
    }
    match g.keys().find(|p| !w.contains_key(*p)) {
        Some(p) => format!("unexpected `{p}`"),
        None => "contents differ".into(),
    }
}

/// Sets (or clears) the write bits of every folder in a tree (files are objects: read-only).
fn set_tree_read_only(root: &Path, read_only: bool) {
    for entry in walkdir::WalkDir::new(root)
        .contents_first(read_only)
        .into_iter()
        .flatten()
    {
        if entry.file_type().is_dir() {
            let mode = if read_only { 0o555 } else { 0o755 };
            let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(mode));
        }
    }
}

/// Removes a folder even if parts of it are read-only.
pub fn remove_tree(dir: &Path) {
    if fs::remove_dir_all(dir).is_ok() || !dir.exists() {
        return;
    }
    set_tree_read_only(dir, false);
    let _ = fs::remove_dir_all(dir);
}

/// Inode of a path, if it exists.
pub(crate) fn inode(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(output: &str) -> RunRecord {
        RunRecord {
            fingerprint: Fingerprint("c".repeat(64)),
            stage: "s".into(),
            ingredients: serde_json::from_value(serde_json::json!({
                "schema": 2, "kind": "command", "kind_version": 1, "config": {},
                "params": {}, "inputs": {}
            }))
            .unwrap(),
            output: output.into(),
            files: 1,
            bytes: 2,
            started_at: "2026-01-01T00:00:00Z".into(),
            seconds: 0.0,
            notes: vec![],
            metrics: Default::default(),
            results: Default::default(),
            log: None,
            tool: "test".into(),
            ran_on: None,
        }
    }

    /// A store with one committed tree (`a.txt`): the store, its staging, manifest and digest.
    fn one_tree(dir: &Path) -> (Store, Staging, Manifest, String) {
        let store = Store::open(dir).unwrap();
        let staging = store.staging().unwrap();
        fs::write(staging.out_dir().join("a.txt"), "a\n").unwrap();
        let (manifest, digest) = store.commit_tree(&staging).unwrap();
        (store, staging, manifest, digest)
    }

    /// A committed tree, its record committed: readable.
    #[test]
    fn a_record_is_committed_after_its_tree() {
        let dir = tempfile::tempdir().unwrap();
        let (store, staging, _, digest) = one_tree(dir.path());
        let r = record(&digest);
        store.commit(&staging, &r).unwrap();
        assert_eq!(store.read_record(&r.fingerprint).unwrap().output, digest);
    }

    /// An object lost between the tree and the record (a failure injected there): the record is
    /// refused and nothing is committed.
    #[test]
    fn a_record_never_precedes_its_tree() {
        let dir = tempfile::tempdir().unwrap();
        let (store, staging, manifest, digest) = one_tree(dir.path());
        let Node::File { sha256, .. } = &manifest.entries[0].node else {
            panic!("a file")
        };
        fs::remove_file(store.object_path(sha256)).unwrap();
        let r = record(&digest);
        let err = store.commit(&staging, &r).unwrap_err();
        assert!(err.to_string().contains("would precede its tree"), "{err}");
        assert!(store.read_record(&r.fingerprint).is_none());
        // A manifest that is not in the store at all, likewise.
        let r = record(&"d".repeat(64));
        assert!(store.commit(&staging, &r).is_err());
        assert!(store.read_record(&r.fingerprint).is_none());
    }

    /// History entries are written and read back through one type; `gc` keeps the keys of the
    /// newest N runs.
    #[test]
    fn history_round_trips_and_keeps_the_newest_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let entry = |fp: char| HistoryEntry {
            pipeline: "p.yaml".into(),
            dry_run: false,
            stages: vec![
                HistoryStage {
                    name: "a".into(),
                    outcome: "ran".into(),
                    fingerprint: Some(Fingerprint(fp.to_string().repeat(64))),
                    reasons: vec!["no record (never ran)".into()],
                    seconds: 1.5,
                },
                HistoryStage {
                    name: "b".into(),
                    outcome: "failed".into(),
                    fingerprint: None,
                    reasons: vec![],
                    seconds: 0.0,
                },
            ],
        };
        assert_eq!(
            HistoryEntry::from_bytes(&entry('a').to_bytes()),
            Some(entry('a'))
        );
        for fp in ['a', 'b', 'c'] {
            store.write_history(&entry(fp)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        fs::write(
            store.root().join("history-v1/99999999999999999999-1.json"),
            "{",
        )
        .unwrap();
        let kept = store.recent_fingerprints(3);
        let want: std::collections::BTreeSet<Fingerprint> = ['b', 'c']
            .iter()
            .map(|c| Fingerprint(c.to_string().repeat(64)))
            .collect();
        assert_eq!(kept, want);
    }
}
