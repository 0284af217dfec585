//! `cache verify`, `cache gc` and `cache du`.
//!
//! * verify re-hashes every object (in parallel) and checks that every run record's tree and
//!   objects exist and that materialised trees still link the right objects. With `repair`,
//!   damaged objects go to quarantine and the records that need them are removed, so the next
//!   run recomputes exactly those stages.
//! * gc marks from roots (run records the caller keeps: the current pipeline's heads and the
//!   last N runs), then removes every record, tree, object and log not reachable from them.
//!   It runs under the exclusive cache lock, so no run is writing meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use super::{HistoryEntry, RunRecord, Store, StoreError, inode, io, remove_tree};
use crate::fingerprint::Fingerprint;
use crate::fingerprint::content::{Node, sha256_file};

/// What `cache verify` found.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub objects: usize,
    pub bytes: u64,
    pub records: usize,
    /// Objects whose content does not match their name.
    pub damaged_objects: Vec<String>,
    /// Problems of records / trees, in words.
    pub problems: Vec<String>,
    /// Staging folders left by killed runs (harmless; swept by the next run).
    pub staging_leftovers: usize,
    /// Records removed and objects quarantined by `--repair`.
    pub repaired: Vec<String>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.damaged_objects.is_empty() && self.problems.is_empty()
    }
}

/// What `cache gc` removed (or would remove).
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub kept_records: usize,
    pub records: Vec<String>,
    pub trees: usize,
    pub objects: usize,
    pub bytes: u64,
    pub logs: usize,
    pub dry_run: bool,
}

/// Sizes for `cache du`.
#[derive(Debug, Default, Serialize)]
pub struct DuReport {
    pub objects: usize,
    pub object_bytes: u64,
    pub records: usize,
    pub log_bytes: u64,
    pub scratch_bytes: u64,
    pub quarantine_bytes: u64,
}

impl Store {
    fn all_objects(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        let base = self.root.join("objects-v1");
        for dir in fs::read_dir(&base).into_iter().flatten().flatten() {
            let prefix = dir.file_name().to_string_lossy().into_owned();
            for f in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if prefix.len() == 2 && !name.starts_with('.') {
                    out.push((format!("{prefix}{name}"), f.path()));
                }
            }
        }
        out.sort();
        out
    }

    /// Every readable run record, with its path.
    pub fn all_records(&self) -> Vec<(PathBuf, Option<RunRecord>)> {
        let mut out = Vec::new();
        for dir in fs::read_dir(self.root.join("runs-v1"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                let path = f.path();
                if path.extension().is_some_and(|e| e == "json") {
                    let rec = fs::read(&path)
                        .ok()
                        .and_then(|b| RunRecord::from_untrusted(&b).ok());
                    out.push((path, rec));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Re-hashes everything; see the module doc.
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, StoreError> {
        let objects = self.all_objects();
        type Checked = (String, Result<([u8; 32], u64), String>);
        let results: Vec<Checked> = objects
            .par_iter()
            .map(|(digest, path)| {
                let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                (
                    digest.clone(),
                    sha256_file(path)
                        .map(|d| (d, size))
                        .map_err(|e| e.to_string()),
                )
            })
            .collect();
        let mut report = VerifyReport {
            objects: objects.len(),
            ..Default::default()
        };
        for (digest, r) in results {
            match r {
                Ok((d, size)) if hex::encode(d) == digest => report.bytes += size,
                Ok(_) => report.damaged_objects.push(digest),
                Err(e) => report
                    .problems
                    .push(format!("object {}: {e}", &digest[..12])),
            }
        }
        let damaged: BTreeSet<&String> = report.damaged_objects.iter().collect();
        let mut bad_records: Vec<(PathBuf, String)> = Vec::new();
        // Trees that no longer link their (intact) objects: rebuilt, the record kept.
        let mut stale_trees: Vec<(String, String)> = Vec::new();
        for (path, rec) in self.all_records() {
            report.records += 1;
            let Some(rec) = rec else {
                let why = format!(
                    "unreadable run record {} (not a record, or one naming paths outside the cache)",
                    path.strip_prefix(&self.root).unwrap_or(&path).display()
                );
                bad_records.push((path, why));
                continue;
            };
            let problem = match self.manifest(&rec.output) {
                Err(e) => Some(e.to_string()),
                Ok(m) => m.entries.iter().find_map(|e| match &e.node {
                    Node::File { sha256, .. } if damaged.contains(sha256) => {
                        Some(format!("`{}` is damaged", e.path))
                    }
                    Node::File { sha256, .. } if !self.object_path(sha256).exists() => {
                        Some(format!("`{}` is missing", e.path))
                    }
                    Node::File { .. } => None,
                    Node::Dir => None,
                }),
            };
            if problem.is_none()
                && let Ok(m) = self.manifest(&rec.output)
                && self.tree_dir(&rec.output).exists()
                && let Some(e) = m.entries.iter().find(|e| match &e.node {
                    Node::File { sha256, .. } => {
                        inode(&self.tree_dir(&rec.output).join(&e.path))
                            != inode(&self.object_path(sha256))
                    }
                    Node::Dir => false,
                })
            {
                stale_trees.push((
                    rec.output.clone(),
                    format!(
                        "stage `{}` ({}): `{}` in its tree is not the stored object (its objects are intact: --repair rebuilds the tree)",
                        rec.stage,
                        rec.fingerprint.short(),
                        e.path
                    ),
                ));
            }
            if let Some(p) = problem {
                bad_records.push((
                    path,
                    format!("stage `{}` ({}): {p}", rec.stage, rec.fingerprint.short()),
                ));
            }
        }
        report.staging_leftovers = self.staging_leftovers().len();
        for (output, why) in &stale_trees {
            report.problems.push(why.clone());
            if repair {
                remove_tree(&self.tree_dir(output));
                match self.check_tree(output) {
                    Ok(super::TreeState::Intact(_)) => {
                        report.repaired.push(format!("rebuilt tree: {why}"))
                    }
                    Ok(_) | Err(_) => report
                        .problems
                        .push(format!("could not rebuild the tree {}", &output[..12])),
                }
            }
        }
        for (path, why) in &bad_records {
            report.problems.push(why.clone());
            if repair {
                let _ = fs::remove_file(path);
                report.repaired.push(format!("removed record: {why}"));
            }
        }
        if repair {
            for d in &report.damaged_objects {
                self.quarantine(d);
                report
                    .repaired
                    .push(format!("quarantined object {}", &d[..12]));
            }
            // Trees linking quarantined objects are removed; they are re-materialised on use.
            for entry in fs::read_dir(self.root.join("trees-v1"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let digest = entry.file_name().to_string_lossy().into_owned();
                if let Ok(m) = self.manifest(&digest) {
                    let broken = m.entries.iter().any(|e| matches!(&e.node, Node::File { sha256, .. } if damaged.contains(sha256)));
                    if broken {
                        remove_tree(&entry.path());
                    }
                }
            }
        }
        Ok(report)
    }

    /// Removes everything not reachable from `keep`; see the module doc.
    pub fn gc(&self, keep: &BTreeSet<Fingerprint>, dry_run: bool) -> Result<GcReport, StoreError> {
        let mut report = GcReport {
            dry_run,
            ..Default::default()
        };
        let mut live_trees = BTreeSet::new();
        let mut live_objects = BTreeSet::new();
        let mut live_logs = BTreeSet::new();
        let mut doomed_records = Vec::new();
        for (path, rec) in self.all_records() {
            match rec {
                Some(rec) if keep.contains(&rec.fingerprint) => {
                    report.kept_records += 1;
                    live_trees.insert(rec.output.clone());
                    if let Some(log) = &rec.log {
                        live_logs.insert(self.root.join(log));
                    }
                }
                Some(rec) => {
                    report
                        .records
                        .push(format!("{} ({})", rec.stage, rec.fingerprint.short()));
                    doomed_records.push(path);
                }
                None => {
                    report
                        .records
                        .push(format!("unreadable record {}", path.display()));
                    doomed_records.push(path);
                }
            }
        }
        for t in &live_trees {
            live_objects.insert(t.clone());
            if let Ok(m) = self.manifest(t) {
                for e in m.entries {
                    if let Node::File { sha256, .. } = e.node {
                        live_objects.insert(sha256);
                    }
                }
            }
        }
        let doomed_objects: Vec<(String, PathBuf)> = self
            .all_objects()
            .into_iter()
            .filter(|(d, _)| !live_objects.contains(d))
            .collect();
        let doomed_trees: Vec<PathBuf> = fs::read_dir(self.root.join("trees-v1"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !live_trees.contains(&e.file_name().to_string_lossy().into_owned()))
            .map(|e| e.path())
            .collect();
        let doomed_logs: Vec<PathBuf> = walkdir::WalkDir::new(self.root.join("logs-v1"))
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file() && !live_logs.contains(e.path()))
            .map(|e| e.into_path())
            .collect();
        report.objects = doomed_objects.len();
        report.bytes = doomed_objects
            .iter()
            .filter_map(|(_, p)| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        report.trees = doomed_trees.len();
        report.logs = doomed_logs.len();
        if dry_run {
            return Ok(report);
        }
        // Records first: once a record is gone nothing refers to its tree.
        for p in &doomed_records {
            fs::remove_file(p).map_err(io(format!("removing {}", p.display())))?;
        }
        for t in &doomed_trees {
            remove_tree(t);
        }
        for (_, p) in &doomed_objects {
            fs::remove_file(p).map_err(io(format!("removing {}", p.display())))?;
        }
        for l in &doomed_logs {
            let _ = fs::remove_file(l);
        }
        // Under the exclusive lock no run holds a stage lock; their files can go.
        for e in fs::read_dir(self.root.join("locks-v1"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = fs::remove_file(e.path());
        }
        self.sweep_staging();
        Ok(report)
    }

    /// Recent history entries' fingerprints (newest first), `n` runs deep.
    pub fn recent_fingerprints(&self, n: usize) -> BTreeSet<Fingerprint> {
        let mut files: Vec<PathBuf> = fs::read_dir(self.root.join("history-v1"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        files.reverse();
        files
            .into_iter()
            .take(n)
            .filter_map(|f| HistoryEntry::from_bytes(&fs::read(f).ok()?))
            .flat_map(|h| h.fingerprints().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Sizes of the cache's parts.
    pub fn du(&self) -> DuReport {
        let size_of = |dir: &Path| -> u64 {
            walkdir::WalkDir::new(dir)
                .into_iter()
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        };
        let objects = self.all_objects();
        DuReport {
            objects: objects.len(),
            object_bytes: objects
                .iter()
                .filter_map(|(_, p)| fs::metadata(p).ok())
                .map(|m| m.len())
                .sum(),
            records: self.all_records().len(),
            log_bytes: size_of(&self.root.join("logs-v1")),
            scratch_bytes: size_of(&self.root.join("scratch-v1")),
            quarantine_bytes: size_of(&self.root.join("quarantine-v1")),
        }
    }

    /// Output sizes of the given records, by stage name.
    pub fn output_sizes(
        &self,
        fps: &BTreeMap<String, Fingerprint>,
    ) -> Vec<(String, Option<(usize, u64)>)> {
        fps.iter()
            .map(|(stage, fp)| {
                (
                    stage.clone(),
                    self.read_record(fp).map(|r| (r.files, r.bytes)),
                )
            })
            .collect()
    }
}
