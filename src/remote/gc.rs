//! `cache gc --remote`: mark and sweep on the remote, dry-run unless asked to delete.
//!
//! Roots: the records of the current pipeline's stages (the caller passes their keys), every
//! record of the stages named with `--keep`, the records used by the last N runs that pushed
//! (`history-v1/` on the remote, so teammates' runs count too), and anything younger than the
//! grace period. From the kept records: their tree manifests, the objects those list, their
//! logs. Deletion order is records, then objects and logs: a record never names a deleted
//! object unless a concurrent push re-used an object older than the grace period, which a push
//! never does (it re-uploads those; see [`super`]).

use std::collections::BTreeSet;

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{Remote, RemoteError, now_unix};
use crate::fingerprint::Fingerprint;
use crate::fingerprint::content::{Manifest, Node};
use crate::store::RunRecord;

/// What `cache gc --remote` removed (or would remove).
#[derive(Debug, Default, Serialize)]
pub struct RemoteGcReport {
    pub kept_records: usize,
    /// `stage (fingerprint)` of each record removed.
    pub records: Vec<String>,
    pub objects: usize,
    pub bytes: u64,
    pub logs: usize,
    pub histories: usize,
    /// Unreferenced objects left because they are younger than the grace period.
    pub young: usize,
    pub deleted: bool,
}

/// What to keep besides the young.
pub struct GcRoots {
    pub fingerprints: BTreeSet<Fingerprint>,
    pub stages: BTreeSet<String>,
    pub runs: usize,
    pub grace: std::time::Duration,
}

impl Remote {
    /// Marks from `roots` and deletes the rest if `delete`.
    pub fn gc(&self, roots: &GcRoots, delete: bool) -> Result<RemoteGcReport, RemoteError> {
        let inner = self.inner();
        self.block_on(async move {
            let young_after = now_unix() - roots.grace.as_secs() as i64;
            let mut report = RemoteGcReport {
                deleted: delete,
                ..Default::default()
            };
            // Histories: the newest N are roots; old ones beyond them go.
            let mut histories = inner.list("history-v1").await?;
            histories.sort_by(|a, b| b.0.cmp(&a.0));
            let mut keep_fps = roots.fingerprints.clone();
            let mut doomed_histories = Vec::new();
            for (i, (rel, modified, _)) in histories.iter().enumerate() {
                if i < roots.runs {
                    let got = inner.store.get(&inner.key(rel)).await?.bytes().await?;
                    if let Some(h) = crate::store::HistoryEntry::from_bytes(&got) {
                        keep_fps.extend(h.fingerprints().cloned());
                    }
                } else if *modified <= young_after {
                    doomed_histories.push(rel.clone());
                }
            }
            // Records: every one is read (stage names are inside).
            let records = inner.list("runs-v1").await?;
            let read: Vec<(String, i64, Option<RunRecord>)> =
                futures::stream::iter(records.into_iter().map(|(rel, modified, _)| {
                    let inner = inner.clone();
                    async move {
                        let got = inner.store.get(&inner.key(&rel)).await?.bytes().await?;
                        Ok::<_, RemoteError>((rel, modified, RunRecord::from_untrusted(&got).ok()))
                    }
                }))
                .buffer_unordered(super::concurrency())
                .try_collect()
                .await?;
            let mut kept: Vec<RunRecord> = Vec::new();
            let mut doomed_records = Vec::new();
            for (rel, modified, rec) in read {
                let young = modified > young_after;
                match rec {
                    Some(r)
                        if young
                            || keep_fps.contains(&r.fingerprint)
                            || roots.stages.contains(&r.stage) =>
                    {
                        kept.push(r)
                    }
                    Some(r) => {
                        report
                            .records
                            .push(format!("{} ({})", r.stage, r.fingerprint.short()));
                        doomed_records.push(rel);
                    }
                    None if young => {}
                    None => {
                        report.records.push(format!("unreadable record {rel}"));
                        doomed_records.push(rel);
                    }
                }
            }
            report.kept_records = kept.len();
            let mut live: BTreeSet<String> = BTreeSet::new();
            let mut live_logs: BTreeSet<String> = BTreeSet::new();
            for r in &kept {
                live.insert(r.output.clone());
                if let Some(l) = &r.log {
                    live_logs.insert(l.clone());
                }
                let key = inner.key(&crate::store::Store::object_relative(&r.output));
                let Ok(got) = inner.store.get(&key).await else {
                    continue;
                };
                let bytes = got.bytes().await?;
                if hex::encode(Sha256::digest(&bytes)) != r.output {
                    continue;
                }
                if let Ok(m) = Manifest::from_untrusted(&bytes) {
                    for e in m.entries {
                        if let Node::File { sha256, .. } = e.node {
                            live.insert(sha256);
                        }
                    }
                }
            }
            let mut doomed_objects = Vec::new();
            for (rel, modified, size) in inner.list("objects-v1").await? {
                let digest = rel
                    .strip_prefix("objects-v1/")
                    .unwrap_or(&rel)
                    .replace('/', "");
                if live.contains(&digest) {
                    continue;
                }
                if modified > young_after {
                    report.young += 1;
                    continue;
                }
                report.bytes += size;
                doomed_objects.push(rel);
            }
            report.objects = doomed_objects.len();
            let doomed_logs: Vec<String> = inner
                .list("logs-v1")
                .await?
                .into_iter()
                .filter(|(rel, modified, _)| !live_logs.contains(rel) && *modified <= young_after)
                .map(|(rel, _, _)| rel)
                .collect();
            report.logs = doomed_logs.len();
            report.histories = doomed_histories.len();
            if delete {
                // Records first: once a record is gone nothing refers to its objects.
                for group in [
                    doomed_records,
                    doomed_objects,
                    doomed_logs,
                    doomed_histories,
                ] {
                    let keys: Vec<_> = group.iter().map(|r| Ok(inner.key(r))).collect();
                    let mut gone = inner
                        .store
                        .delete_stream(futures::stream::iter(keys).boxed());
                    while let Some(r) = gone.next().await {
                        match r {
                            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
            }
            Ok(report)
        })
    }
}
