//! The team cache: the local store's committed results mirrored in an object store (S3, GCS,
//! Azure, HTTP/WebDAV or a shared folder), so a teammate's identical stage is restored instead
//! of recomputed.
//!
//! Layout under the remote's URL (the same relative paths as the local store, see
//! [`crate::store`]):
//!
//! | key                               | what                                                  |
//! |-----------------------------------|-------------------------------------------------------|
//! | `objects-v1/ab/cdef…`             | file contents and tree manifests, by sha256           |
//! | `runs-v1/ab/<fingerprint>.json`   | run records: **the commit point**                     |
//! | `logs-v1/<stage>/<file>.log`      | the log of the execution a record came from           |
//! | `history-v1/<stamp>-<pid>.json`   | which records each pushing run used (`cache gc`)      |
//!
//! Invariants:
//! * **Records last.** A push uploads every object a record needs, then the log, then the
//!   record, with a conditional put (`If-None-Match: *` on S3, `create_new` on a folder): two
//!   teammates pushing the same key at once both succeed and the first record stays. Stores
//!   without conditional puts (HTTP) overwrite, which is harmless: a record only names objects
//!   that were uploaded before it.
//! * **Nothing unverified enters the local store.** Every object restored is hashed while it
//!   downloads and adopted only if its sha256 is its name; a corrupt remote object is a warning
//!   and the stage runs locally. Local objects are re-hashed as they are uploaded, so a damaged
//!   local object is never spread.
//! * **The remote is untrusted.** A record and a tree manifest are validated before anything is
//!   written locally (`RunRecord::from_untrusted`, `Manifest::validate`: sha256 names, paths
//!   relative and below the tree, logs under `logs-v1/`); a bad one is refused like a corrupt
//!   object. The next push that has the good result repairs it ([`PushCheck::Verify`]).
//! * **Best effort.** A remote that is down, slow or refuses the credentials gives one warning,
//!   then is left alone for the rest of the process: the run goes on locally and never fails
//!   because of it. `push` / `pull`, which ask for the remote by name, do fail.
//! * **No per-object HEADs.** A push lists `objects-v1/` once (paged LIST: 1,000 keys a request)
//!   and uploads what is missing; a record already on the remote short-cuts the whole push
//!   (unless the push verifies: then every object it needs is downloaded and re-hashed).
//! * **Grace.** `cache gc --remote` never deletes what is younger than the grace period, and a
//!   push re-uploads an object it relies on when the listing shows it older than half the grace
//!   period; so an object a concurrent push counts on cannot be deleted under it.

pub mod config;
pub mod gc;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::fingerprint::Fingerprint;
use crate::fingerprint::content::{Manifest, Node};
use crate::store::{RunRecord, Store, StoreError};
pub use config::{RemoteSettings, RemoteSource};

/// Objects at least this large go up in parts (multipart upload).
const MULTIPART_FROM: u64 = 32 << 20;
/// Part size of multipart uploads.
const PART: usize = 16 << 20;
/// Objects transferred at once (`CUSA_PIPE_REMOTE_CONCURRENCY` overrides).
fn concurrency() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("CUSA_PIPE_REMOTE_CONCURRENCY")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(64)
    })
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The remote's settings are wrong (bad URL, unknown option).
    #[error("{0}")]
    Config(String),
    /// The remote cannot be used now (a `file://` folder that cannot be created or opened).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Store(#[from] object_store::Error),
    #[error("{0}")]
    Local(#[from] StoreError),
    /// A remote object does not match its digest, or a record is unreadable.
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl RemoteError {
    /// Errors that say the remote cannot be used now (as opposed to one bad object).
    fn is_transport(&self) -> bool {
        matches!(
            self,
            RemoteError::Store(_) | RemoteError::Config(_) | RemoteError::Unavailable(_)
        )
    }
}

/// What a push did.
#[derive(Debug, Default, Clone, Copy)]
pub struct PushStats {
    pub objects: usize,
    pub bytes: u64,
    /// The record was on the remote already (pushed by someone else, or before).
    pub already: bool,
    /// Remote objects found damaged or missing under an existing record, uploaded again
    /// ([`PushCheck::Verify`]).
    pub repaired: usize,
    /// The remote's record was unreadable, or named another output whose copy was not
    /// verified, and was replaced by ours.
    pub record_replaced: bool,
}

/// How far a push trusts what the remote already holds for its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushCheck {
    /// A record on the remote means the result is there (one request: the normal case).
    Trust,
    /// The remote's record is read and every object it needs is downloaded and re-hashed;
    /// anything damaged or missing is uploaded again from the local copy, and a record that is
    /// unreadable or names another output is replaced. Used after a restore of the key failed
    /// on a corrupt entry, for stages run with `--force`, and by `push --verify`.
    Verify,
}

/// What a restore brought.
#[derive(Debug, Default, Clone, Copy)]
pub struct PullStats {
    pub objects: usize,
    pub bytes: u64,
}

/// A background push: the stage's name and the task.
type PendingPush = (
    String,
    tokio::task::JoinHandle<Result<PushStats, RemoteError>>,
);

/// The connection to one remote, with its own small async runtime.
pub struct Remote {
    pub settings: RemoteSettings,
    inner: Arc<Inner>,
    runtime: tokio::runtime::Runtime,
    disabled: AtomicBool,
    warn: Box<dyn Fn(&str) + Send + Sync>,
    pending: Mutex<Vec<PendingPush>>,
    /// Keys whose restore found a corrupt entry: their next push verifies and repairs.
    suspect: Mutex<std::collections::HashSet<Fingerprint>>,
}

pub(crate) struct Inner {
    store: Arc<dyn ObjectStore>,
    /// The URL's path, without slashes at the ends ("" at the bucket's root).
    prefix: String,
    grace: Duration,
    /// Objects on the remote and their last-modified time (unix seconds), listed once.
    index: tokio::sync::Mutex<Option<HashMap<String, i64>>>,
}

impl Remote {
    /// Connects (lazily: nothing goes over the network until the first request).
    pub fn connect(
        settings: RemoteSettings,
        warn: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Result<Remote, RemoteError> {
        // TLS through rustls with ring (see Cargo.toml); a no-op when already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (store, prefix) = config::object_store_for(&settings)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("remote")
            .enable_all()
            .build()
            .map_err(RemoteError::Io)?;
        Ok(Remote {
            inner: Arc::new(Inner {
                store,
                prefix,
                grace: settings.grace,
                index: tokio::sync::Mutex::new(None),
            }),
            settings,
            runtime,
            disabled: AtomicBool::new(false),
            warn,
            pending: Mutex::new(Vec::new()),
            suspect: Mutex::new(Default::default()),
        })
    }

    /// `name (url)` for messages.
    pub fn describe(&self) -> String {
        if self.settings.name == self.settings.url {
            format!("remote `{}`", self.settings.url)
        } else {
            format!("remote `{}` ({})", self.settings.name, self.settings.url)
        }
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::SeqCst)
    }

    /// Reports a failure: one warning (then silence) for transport errors, one per corrupt
    /// object.
    pub fn failed(&self, what: &str, e: &RemoteError) {
        if e.is_transport() {
            if !self.disabled.swap(true, Ordering::SeqCst) {
                (self.warn)(&format!(
                    "warning: {}: {what}: {}; going on without it (stages run locally)",
                    self.describe(),
                    one_line(&e.to_string())
                ));
            }
        } else {
            (self.warn)(&format!(
                "warning: {}: {what}: {}",
                self.describe(),
                one_line(&e.to_string())
            ));
        }
    }

    /// Restores the result of `fp` from the remote into `local`, if the remote has it: objects
    /// verified, then the record written locally (the local commit point). `None` on a miss and
    /// on any failure (after a warning).
    pub fn restore(&self, local: &Store, fp: &Fingerprint, stage: &str) -> Option<RunRecord> {
        if !self.settings.read || self.is_disabled() {
            return None;
        }
        match self.try_restore(local, fp) {
            Ok(r) => r.map(|(record, _)| record),
            Err(e) => {
                if matches!(e, RemoteError::Corrupt(_)) {
                    self.suspect.lock().expect("suspect").insert(fp.clone());
                }
                self.failed(&format!("restoring `{stage}`"), &e);
                None
            }
        }
    }

    /// [`Remote::restore`] with its errors.
    pub fn try_restore(
        &self,
        local: &Store,
        fp: &Fingerprint,
    ) -> Result<Option<(RunRecord, PullStats)>, RemoteError> {
        let staging = local.staging()?;
        let inner = self.inner.clone();
        let got =
            self.runtime
                .block_on(inner.restore(local.clone(), fp.clone(), staging.dir.clone()))?;
        let Some((record, stats)) = got else {
            return Ok(None);
        };
        local.commit(&staging, &record)?;
        Ok(Some((record, stats)))
    }

    /// Starts pushing a committed result; [`Remote::finish`] waits for it. A key whose
    /// restore found a corrupt entry in this process is pushed with [`PushCheck::Verify`]
    /// whatever `check` says, so the good local copy repairs the remote.
    pub fn push_in_background(&self, local: &Store, record: RunRecord, check: PushCheck) {
        if !self.settings.write || self.is_disabled() {
            return;
        }
        let check = if self
            .suspect
            .lock()
            .expect("suspect")
            .contains(&record.fingerprint)
        {
            PushCheck::Verify
        } else {
            check
        };
        let inner = self.inner.clone();
        let stage = record.stage.clone();
        let handle = self.runtime.spawn(inner.push(local.clone(), record, check));
        self.pending.lock().expect("pending").push((stage, handle));
    }

    /// Pushes now, trusting a record already there (`bench remote`).
    pub fn push_now(&self, local: &Store, record: RunRecord) -> Result<PushStats, RemoteError> {
        let inner = self.inner.clone();
        self.runtime
            .block_on(inner.push(local.clone(), record, PushCheck::Trust))
    }

    /// Whether the remote holds a record for `fp` (`run --dry-run`, `pull`).
    pub fn has_record(&self, fp: &Fingerprint) -> Result<bool, RemoteError> {
        let inner = self.inner.clone();
        let key = inner.key(&Store::record_relative(fp));
        match self
            .runtime
            .block_on(async move { inner.store.head(&key).await })
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The remote's record of `fp` and its tree manifest (verified), without downloading the
    /// tree: enough to compute downstream keys (`cache gc --remote` on a machine that lacks the
    /// results).
    pub fn remote_result(
        &self,
        fp: &Fingerprint,
    ) -> Result<Option<(RunRecord, Manifest)>, RemoteError> {
        let inner = self.inner.clone();
        let fp = fp.clone();
        self.runtime.block_on(async move {
            let got = match inner
                .store
                .get(&inner.key(&Store::record_relative(&fp)))
                .await
            {
                Ok(g) => g.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let Ok(record) = RunRecord::from_untrusted(&got) else {
                return Ok(None);
            };
            let key = inner.key(&Store::object_relative(&record.output));
            let bytes = match inner.store.get(&key).await {
                Ok(g) => g.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            if hex::encode(Sha256::digest(&bytes)) != record.output {
                return Ok(None);
            }
            Ok(Manifest::from_untrusted(&bytes).ok().map(|m| (record, m)))
        })
    }

    /// Pushes still running.
    pub fn pending(&self) -> usize {
        self.pending
            .lock()
            .expect("pending")
            .iter()
            .filter(|(_, h)| !h.is_finished())
            .count()
    }

    /// Waits for background pushes, calling `tick(done, total)` as they end; returns each
    /// stage's outcome (nothing is warned here: the caller decides).
    pub fn finish(
        &self,
        mut tick: impl FnMut(usize, usize),
    ) -> Vec<(String, Result<PushStats, RemoteError>)> {
        let handles: Vec<_> = std::mem::take(&mut *self.pending.lock().expect("pending"));
        let total = handles.len();
        let mut out = Vec::with_capacity(total);
        for (done, (stage, h)) in handles.into_iter().enumerate() {
            let r = match self.runtime.block_on(h) {
                Ok(r) => r,
                Err(e) => Err(RemoteError::Corrupt(format!("the push stopped: {e}"))),
            };
            out.push((stage, r));
            tick(done + 1, total);
        }
        out
    }

    /// Uploads a history entry (which records a run used), for `cache gc --remote`.
    pub fn push_history(&self, entry: &crate::store::HistoryEntry) {
        if !self.settings.write || self.is_disabled() {
            return;
        }
        let inner = self.inner.clone();
        let bytes = entry.to_bytes();
        let key = inner.key(&crate::store::history_relative());
        let put = self
            .runtime
            .block_on(async move { inner.store.put(&key, PutPayload::from(bytes)).await });
        if let Err(e) = put {
            self.failed("recording the run's history", &e.into());
        }
    }

    pub(crate) fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    pub(crate) fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Inner {
    fn key(&self, relative: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(relative)
        } else {
            Key::from(format!("{}/{relative}", self.prefix))
        }
    }

    /// The path of `key` relative to the prefix.
    fn relative(&self, key: &Key) -> String {
        let s = key.as_ref();
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&self.prefix)
                .map(|r| r.trim_start_matches('/').to_string())
                .unwrap_or_else(|| s.to_string())
        }
    }

    /// Every key under `bucket/` (relative) with its last-modified time and size.
    async fn list(&self, bucket: &str) -> Result<Vec<(String, i64, u64)>, RemoteError> {
        let prefix = self.key(bucket);
        let metas: Vec<object_store::ObjectMeta> =
            self.store.list(Some(&prefix)).try_collect().await?;
        Ok(metas
            .into_iter()
            .map(|m| {
                (
                    self.relative(&m.location),
                    m.last_modified.timestamp(),
                    m.size,
                )
            })
            .collect())
    }

    /// Loads the index of objects once.
    async fn objects_index(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<HashMap<String, i64>>>, RemoteError> {
        let mut guard = self.index.lock().await;
        if guard.is_none() {
            let mut map = HashMap::new();
            for (rel, modified, _) in self.list("objects-v1").await? {
                if let Some(rest) = rel.strip_prefix("objects-v1/") {
                    map.insert(rest.replace('/', ""), modified);
                }
            }
            *guard = Some(map);
        }
        Ok(guard)
    }

    async fn push(
        self: Arc<Self>,
        local: Store,
        record: RunRecord,
        check: PushCheck,
    ) -> Result<PushStats, RemoteError> {
        let record_key = self.key(&Store::record_relative(&record.fingerprint));
        // What the remote holds for this key: nothing, a usable record, or a broken one.
        let existing: Option<Option<RunRecord>> = match check {
            PushCheck::Trust => match self.store.head(&record_key).await {
                Ok(_) => {
                    return Ok(PushStats {
                        already: true,
                        ..Default::default()
                    });
                }
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            },
            PushCheck::Verify => match self.store.get(&record_key).await {
                Ok(got) => {
                    let bytes = got.bytes().await?;
                    Some(
                        RunRecord::from_untrusted(&bytes)
                            .ok()
                            .filter(|r| r.fingerprint == record.fingerprint),
                    )
                }
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            },
        };
        let manifest = local.manifest(&record.output)?;
        let mut wanted: BTreeMap<String, Option<u64>> = BTreeMap::new();
        wanted.insert(record.output.clone(), None);
        for e in &manifest.entries {
            if let Node::File { sha256, size, .. } = &e.node {
                wanted.insert(sha256.clone(), Some(*size));
            }
        }
        // What the remote lacks, or holds so long that a gc may be about to take it; when
        // verifying, also what it holds damaged.
        let refresh_before = now_unix() - (self.grace.as_secs() / 2) as i64;
        let listed: Vec<(String, Option<u64>, bool)> = {
            let index = self.objects_index().await?;
            let index = index.as_ref().expect("loaded");
            wanted
                .into_iter()
                .map(|(d, size)| {
                    let fresh = index.get(&d).is_some_and(|&t| t >= refresh_before);
                    (d, size, fresh)
                })
                .collect()
        };
        let verify = check == PushCheck::Verify && existing.is_some();
        let needed: Vec<(String, bool)> =
            futures::stream::iter(listed.into_iter().map(|(digest, size, fresh)| {
                let this = self.clone();
                async move {
                    if !fresh {
                        return Ok::<_, RemoteError>(Some((digest, false)));
                    }
                    if verify && !this.remote_object_intact(&digest, size).await? {
                        return Ok(Some((digest, true)));
                    }
                    Ok(None)
                }
            }))
            .buffer_unordered(concurrency())
            .try_filter_map(|x| async move { Ok(x) })
            .try_collect()
            .await?;
        let uploads = futures::stream::iter(needed.into_iter().map(|(digest, damaged)| {
            let this = self.clone();
            let path = local.object_file(&digest);
            async move {
                let bytes = this.upload_object(&digest, &path).await?;
                Ok::<_, RemoteError>((digest, bytes, damaged))
            }
        }))
        .buffer_unordered(concurrency())
        .try_collect::<Vec<_>>()
        .await?;
        let now = now_unix();
        if let Some(index) = self.index.lock().await.as_mut() {
            for (d, _, _) in &uploads {
                index.insert(d.clone(), now);
            }
        }
        let repaired = uploads.iter().filter(|u| u.2).count();
        let mut stats = PushStats {
            objects: uploads.len(),
            bytes: uploads.iter().map(|u| u.1).sum(),
            already: false,
            repaired,
            record_replaced: false,
        };
        if let Some(remote_record) = &existing
            && remote_record
                .as_ref()
                .is_some_and(|r| r.output == record.output)
        {
            // The remote's record is ours and every object under it is intact now.
            stats.already = repaired == 0 && stats.objects == 0;
            return Ok(stats);
        }
        if let Some(log) = &record.log {
            let path = local.root().join(log);
            if let Ok(bytes) = tokio::fs::read(&path).await {
                self.store
                    .put(&self.key(log), PutPayload::from(bytes))
                    .await?;
            }
        }
        // The commit point on the remote. A verified push replaces a broken record, or one
        // naming another output (a record is only a pointer to a result of the same key, and
        // ours is the one whose objects were just checked).
        let bytes = serde_json::to_vec_pretty(&record).expect("records serialise");
        if existing.is_some() {
            self.store.put(&record_key, PutPayload::from(bytes)).await?;
            stats.record_replaced = true;
            return Ok(stats);
        }
        let put = self
            .store
            .put_opts(
                &record_key,
                PutPayload::from(bytes.clone()),
                PutOptions::from(PutMode::Create),
            )
            .await;
        match put {
            Ok(_) => Ok(stats),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(PushStats {
                already: true,
                ..stats
            }),
            Err(object_store::Error::NotImplemented { .. }) => {
                self.store.put(&record_key, PutPayload::from(bytes)).await?;
                Ok(stats)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the remote's copy of `digest` exists and hashes to its name (downloaded and
    /// hashed as it streams; nothing is written).
    async fn remote_object_intact(
        &self,
        digest: &str,
        size: Option<u64>,
    ) -> Result<bool, RemoteError> {
        let key = self.key(&Store::object_relative(digest));
        let got = match self.store.get(&key).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if size.is_some_and(|s| s != got.meta.size) {
            return Ok(false);
        }
        let mut stream = got.into_stream();
        let mut hasher = Sha256::new();
        while let Some(chunk) = stream.next().await {
            hasher.update(&chunk?);
        }
        Ok(hex::encode(hasher.finalize()) == digest)
    }

    /// Uploads one local object, re-hashing it on the way; returns its size.
    async fn upload_object(&self, digest: &str, path: &Path) -> Result<u64, RemoteError> {
        let key = self.key(&Store::object_relative(digest));
        let size = tokio::fs::metadata(path).await?.len();
        let damaged = || {
            RemoteError::Local(StoreError::Damaged(format!(
                "local object {} does not match its digest (run `cusa-pipe cache verify --repair`)",
                &digest[..12]
            )))
        };
        if size < MULTIPART_FROM {
            let bytes = tokio::fs::read(path).await?;
            if hex::encode(Sha256::digest(&bytes)) != digest {
                return Err(damaged());
            }
            self.store.put(&key, PutPayload::from(bytes)).await?;
            return Ok(size);
        }
        let upload = self.store.put_multipart(&key).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut file = tokio::fs::File::open(path).await?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 8 << 20];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            writer.wait_for_capacity(8).await?;
            writer.write(&buf[..n]);
        }
        if hex::encode(hasher.finalize()) != digest {
            let _ = writer.abort().await;
            return Err(damaged());
        }
        writer.finish().await?;
        Ok(size)
    }

    /// Downloads one object into `dir`, verifying it; returns the temporary file and its size.
    /// A large object (its size known from the manifest) comes in ranges fetched in parallel,
    /// written and hashed in order.
    async fn download_object(
        &self,
        digest: &str,
        dir: &Path,
        size_hint: Option<u64>,
    ) -> Result<(PathBuf, u64), RemoteError> {
        let key = self.key(&Store::object_relative(digest));
        let tmp = dir.join(format!("dl-{digest}"));
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        match size_hint {
            Some(total) if total >= MULTIPART_FROM => {
                let ranges: Vec<std::ops::Range<u64>> = (0..total)
                    .step_by(PART)
                    .map(|start| start..(start + PART as u64).min(total))
                    .collect();
                let mut parts = futures::stream::iter(ranges.into_iter().map(|r| {
                    let key = key.clone();
                    async move { self.store.get_range(&key, r).await }
                }))
                .buffered(8);
                while let Some(part) = parts.next().await {
                    let part: Bytes = part?;
                    hasher.update(&part);
                    size += part.len() as u64;
                    file.write_all(&part).await?;
                }
            }
            _ => {
                let got = self.store.get(&key).await.map_err(|e| match e {
                    // Gone (a gc, a manual deletion): this result cannot come from here, the
                    // remote itself is fine.
                    object_store::Error::NotFound { .. } => RemoteError::Corrupt(format!(
                        "object {} is missing on the remote",
                        &digest[..12]
                    )),
                    e => e.into(),
                })?;
                let mut stream = got.into_stream();
                while let Some(chunk) = stream.next().await {
                    let chunk: Bytes = chunk?;
                    hasher.update(&chunk);
                    size += chunk.len() as u64;
                    file.write_all(&chunk).await?;
                }
            }
        }
        file.flush().await?;
        drop(file);
        if hex::encode(hasher.finalize()) != digest {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(RemoteError::Corrupt(format!(
                "object {} on the remote does not match its digest (ignored; a push of this \
                 stage replaces it)",
                &digest[..12]
            )));
        }
        Ok((tmp, size))
    }

    async fn restore(
        self: Arc<Self>,
        local: Store,
        fp: Fingerprint,
        dir: PathBuf,
    ) -> Result<Option<(RunRecord, PullStats)>, RemoteError> {
        let got = match self
            .store
            .get(&self.key(&Store::record_relative(&fp)))
            .await
        {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let bytes = got.bytes().await?;
        let record = RunRecord::from_untrusted(&bytes).map_err(|e| {
            RemoteError::Corrupt(format!(
                "run record {} is unreadable ({e}; ignored, a push of this stage replaces it)",
                fp.short()
            ))
        })?;
        if record.fingerprint != fp {
            return Err(RemoteError::Corrupt(format!(
                "run record {} names another key",
                fp.short()
            )));
        }
        let mut stats = PullStats::default();
        let manifest = if local.has_object(&record.output) {
            local.manifest(&record.output)?
        } else {
            let (tmp, size) = self.download_object(&record.output, &dir, None).await?;
            // The manifest is checked before it enters the store: its paths are materialised
            // later, under our cache.
            let checked = match tokio::fs::read(&tmp).await {
                Ok(bytes) => Manifest::from_untrusted(&bytes).map_err(|e| {
                    RemoteError::Corrupt(format!(
                        "tree manifest {} of run record {} is refused ({e}; ignored, a push of \
                         this stage replaces it)",
                        &record.output[..12],
                        fp.short()
                    ))
                }),
                Err(e) => Err(RemoteError::Io(e)),
            };
            let manifest = match checked {
                Ok(m) => m,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e);
                }
            };
            local.adopt_object(&record.output, &tmp, false)?;
            stats.objects += 1;
            stats.bytes += size;
            manifest
        };
        let mut missing: BTreeMap<String, (bool, u64)> = BTreeMap::new();
        for e in &manifest.entries {
            if let Node::File { sha256, exec, size } = &e.node
                && !local.has_object(sha256)
            {
                missing.insert(sha256.clone(), (*exec, *size));
            }
        }
        let fetched: Vec<(String, bool, PathBuf, u64)> =
            futures::stream::iter(missing.into_iter().map(|(digest, (exec, size))| {
                let this = self.clone();
                let dir = dir.clone();
                async move {
                    let (tmp, size) = this.download_object(&digest, &dir, Some(size)).await?;
                    Ok::<_, RemoteError>((digest, exec, tmp, size))
                }
            }))
            .buffer_unordered(concurrency())
            .try_collect()
            .await?;
        let local2 = local.clone();
        let adopted = tokio::task::spawn_blocking(move || {
            for (digest, exec, tmp, _) in &fetched {
                local2.adopt_object(digest, tmp, *exec)?;
            }
            Ok::<_, StoreError>(fetched.iter().map(|f| f.3).collect::<Vec<_>>())
        })
        .await
        .map_err(|e| RemoteError::Corrupt(e.to_string()))??;
        stats.objects += adopted.len();
        stats.bytes += adopted.iter().sum::<u64>();
        if let Some(log) = &record.log
            && let Ok(g) = self.store.get(&self.key(log)).await
            && let Ok(b) = g.bytes().await
        {
            let path = local.root().join(log);
            if let Some(parent) = path.parent() {
                let _ = tokio::fs::create_dir_all(parent).await;
            }
            let _ = tokio::fs::write(&path, &b).await;
        }
        Ok(Some((record, stats)))
    }
}
