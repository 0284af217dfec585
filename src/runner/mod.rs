//! Deciding and executing: which stages are fresh, which must run and why, and running them.
//!
//! [`Engine::assess`] is the single decision procedure, used by `status`, `run --dry-run` and
//! `run`: gather the stage's ingredients ([`crate::fingerprint::gather`]: project files through
//! the stat cache, upstream stages by their committed output digest), compute the fingerprint,
//! and look for a committed run record whose output tree is intact. Anything else yields typed
//! [`MissReason`]s, explained against the last result this pipeline committed for the stage (its
//! *head*).
//!
//! [`Engine::run`] executes the graph with `dagrs`: one node per stage, the upstream result
//! passed along the graph's channels, the work itself on blocking threads. Invariants:
//! * at most `-j` stages execute at once and GPUs are never over-committed ([`slots`]);
//! * a stage whose upstream failed is `skipped`; other branches go on; exit code 1;
//! * a fingerprint is executed by one process at a time (a lock per key); a run that waited
//!   re-checks the store and reports `cached` if the other run committed it;
//! * a stage's output is committed only if the stage returned `Ok` and the run was not
//!   interrupted; the run record is the commit point (see [`crate::store`]);
//! * with a remote (see [`crate::remote`]), a stage missing locally is restored from it when it
//!   holds the key (outcome `restored`, its recorded duration reported as time saved) and a
//!   stage that ran is pushed in the background; the remote never decides success;
//! * Ctrl-C/SIGTERM cancels: running programs' process groups get SIGTERM, then SIGKILL after
//!   a grace period; nothing partial is committed; the exit code is 130;
//! * a stage whose executor is a cluster ([`crate::executor`]) is decided here exactly like a
//!   local one (same key, same reasons, same restore from the remote), then submitted as a job
//!   ([`cluster`]) that holds one `-j` slot until it ends; completion is its committed record;
//! * a `cusa-pipe job` process ([`RunSettings::job`]) executes its one target stage locally,
//!   only for the key it was submitted with, and never executes an upstream stage: those must
//!   be committed (or restorable from the remote) already.

mod cluster;
pub mod report;
pub mod session;
pub mod slots;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use cusa_stages::api::{Cancel, StageContext, StageError, StageLog};
use dagrs::{
    Action, Content, DefaultNode, EnvVar, Graph, InChannels, Node, NodeId, NodeTable, OutChannels,
    Output,
};
use serde::Serialize;

use crate::executor::slurm::Slurm;
use crate::executor::watch::Watcher;
use crate::executor::{Choice, Cluster, ExecutorDecl, Placement};
use crate::fingerprint::content::Manifest;
use crate::fingerprint::gather::{Gathered, UpstreamOutput, gather, miss_reasons, pending_reasons};
use crate::fingerprint::{Fingerprint, Ingredients, MissReason};
use crate::graph::Dag;
use crate::spec::Pipeline;
use crate::store::{RunRecord, Store, StoreError, TreeState};
use report::{Outcome, Reporter, StageReport};
use slots::Slots;

/// A pipeline bound to a store.
pub struct Engine {
    pub pipeline: Pipeline,
    pub dag: Dag,
    pub store: Store,
    pub pipeline_id: String,
    /// The team cache, when one is configured and not turned off.
    pub remote: Option<Arc<crate::remote::Remote>>,
}

/// A committed output, as downstream stages see it.
#[derive(Clone, Debug)]
pub struct Committed {
    pub fingerprint: Fingerprint,
    pub digest: String,
    pub dir: PathBuf,
    pub manifest: Arc<Manifest>,
    /// Where it was computed, when by a cluster job.
    pub ran_on: Option<Placement>,
}

/// What an upstream stage left for its dependents.
#[derive(Clone, Debug)]
pub enum Upstream {
    Done(Committed),
    /// Not executed yet (status / dry run): downstream keys are unknown.
    Pending,
    /// Failed or skipped: dependents are skipped.
    Broken,
}

/// The decision for one stage.
pub struct Assessment {
    pub ingredients: Ingredients,
    /// `None` while an upstream stage is pending.
    pub fingerprint: Option<Fingerprint>,
    /// Resolved input paths (upstream ones only when done).
    pub inputs: BTreeMap<String, PathBuf>,
    pub fresh: Option<Committed>,
    pub reasons: Vec<MissReason>,
}

impl Assessment {
    fn of(
        gathered: Gathered,
        fingerprint: Option<Fingerprint>,
        fresh: Option<Committed>,
        reasons: Vec<MissReason>,
    ) -> Assessment {
        Assessment {
            ingredients: gathered.ingredients,
            fingerprint,
            inputs: gathered.paths,
            fresh,
            reasons,
        }
    }
}

/// A stage that cannot even be assessed (missing input file, bad sub-path).
#[derive(Debug)]
pub struct Blocked {
    pub message: String,
    pub hint: Option<String>,
}

impl From<StoreError> for Blocked {
    fn from(e: StoreError) -> Self {
        Blocked {
            message: format!("cache error: {e}"),
            hint: Some("run `cusa-pipe cache verify`".into()),
        }
    }
}

/// One row of `cusa-pipe status`.
#[derive(Debug, Serialize)]
pub struct StatusRow {
    pub name: String,
    /// For an element of a matrix stage: the stage as written and its labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matrix: Option<crate::spec::Element>,
    /// `fresh`, `stale` or `error`.
    pub state: &'static str,
    #[serde(serialize_with = "report_reasons")]
    pub reasons: Vec<MissReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where its fresh result was computed, when by a cluster job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ran_on: Option<Placement>,
}

fn report_reasons<S: serde::Serializer>(r: &[MissReason], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(r.iter().map(ToString::to_string))
}

/// `run` settings, already validated.
#[derive(Debug, Clone, Default)]
pub struct RunSettings {
    /// Indices of the stages asked for (empty: all).
    pub targets: Vec<usize>,
    pub force: BTreeSet<usize>,
    pub jobs: usize,
    pub gpus: usize,
    pub dry_run: bool,
    /// `--executor`: where stages run, over what the file says.
    pub executor: Option<Choice>,
    /// Set in a `cusa-pipe job` process: the one stage it executes.
    pub job: Option<JobTarget>,
    /// Arguments a cluster job repeats after `cusa-pipe job PIPELINE` (`--set`, `--remote`).
    pub forward: Vec<String>,
}

/// The stage a `cusa-pipe job` process was submitted for.
#[derive(Debug, Clone)]
pub struct JobTarget {
    pub idx: usize,
    /// The key the coordinator decided on; any other is refused.
    pub expected: Fingerprint,
    /// Where this process runs (recorded with the result).
    pub placement: Placement,
    /// CPUs the scheduler gave the job (`SLURM_CPUS_PER_TASK`), for the stage's threads.
    pub threads: Option<usize>,
}

/// How a run ended.
pub struct RunResult {
    pub reports: Vec<StageReport>,
    pub interrupted: bool,
}

impl Engine {
    pub fn new(pipeline: Pipeline, dag: Dag, store: Store) -> Engine {
        let pipeline_id = crate::store::pipeline_id(&pipeline.file);
        Engine {
            pipeline,
            dag,
            store,
            pipeline_id,
            remote: None,
        }
    }

    /// Where stage `idx` executes in a run with `settings`: a `cusa-pipe job` process runs
    /// its stage here; otherwise `--executor` over the file's `executor:`.
    pub fn executor_of(&self, idx: usize, settings: &RunSettings) -> ExecutorDecl {
        if settings.job.is_some() {
            return ExecutorDecl::Local;
        }
        let stage = &self.pipeline.stages[idx];
        crate::executor::effective(
            &stage.executor,
            stage.executor_own,
            &self.pipeline.executor,
            settings.executor,
        )
    }

    /// Decides whether stage `idx` is fresh, given what its upstream stages left.
    pub fn assess(
        &self,
        idx: usize,
        ups: &HashMap<String, Upstream>,
        forced: bool,
    ) -> Result<Assessment, Blocked> {
        let stage = &self.pipeline.stages[idx];
        let mut gathered = gather(&self.pipeline, stage, self.store.hasher(), |up| {
            match ups.get(up) {
                Some(Upstream::Done(c)) => Some(UpstreamOutput {
                    digest: &c.digest,
                    manifest: &c.manifest,
                    dir: &c.dir,
                }),
                _ => None,
            }
        })
        .map_err(|e| Blocked {
            message: e.message,
            hint: e.hint,
        })?;
        let head = self
            .store
            .heads(&self.pipeline_id)
            .get(&stage.name)
            .cloned();
        let previous = head.as_ref().and_then(|h| self.store.read_record(h));
        let previous = previous.as_ref().map(|r| &r.ingredients);

        if !gathered.pending.is_empty() {
            // The key is unknown until upstream runs; still show this stage's own changes.
            let reasons = pending_reasons(&mut gathered, previous);
            return Ok(Assessment::of(gathered, None, None, reasons));
        }
        let fp = gathered.ingredients.fingerprint();
        if forced {
            return Ok(Assessment::of(
                gathered,
                Some(fp),
                None,
                vec![MissReason::Forced],
            ));
        }
        let reasons = match self.committed(&fp)? {
            Some(Ok(c)) => return Ok(Assessment::of(gathered, Some(fp), Some(c), vec![])),
            Some(Err(damage)) => vec![damage],
            None => miss_reasons(&fp, &gathered.ingredients, head.as_ref(), previous),
        };
        Ok(Assessment::of(gathered, Some(fp), None, reasons))
    }

    /// The committed, intact result of `fp`: `None` if there is no record, `Some(Err(reason))`
    /// if its output is damaged (the record is then dropped so the stage reruns).
    fn committed(
        &self,
        fp: &Fingerprint,
    ) -> Result<Option<Result<Committed, MissReason>>, StoreError> {
        let Some(record) = self.store.read_record(fp) else {
            return Ok(None);
        };
        match self.store.check_tree(&record.output)? {
            TreeState::Intact(dir) => {
                let manifest = Arc::new(self.store.manifest(&record.output)?);
                Ok(Some(Ok(Committed {
                    fingerprint: fp.clone(),
                    digest: record.output,
                    dir,
                    manifest,
                    ran_on: record.ran_on,
                })))
            }
            TreeState::Damaged(detail) | TreeState::Missing(detail) => {
                self.store.remove_record(fp);
                Ok(Some(Err(MissReason::OutputDamaged { detail })))
            }
        }
    }

    /// The committed, intact result of `fp`, if any.
    pub fn committed_result(&self, fp: &Fingerprint) -> Option<Committed> {
        match self.committed(fp) {
            Ok(Some(Ok(c))) => Some(c),
            _ => None,
        }
    }

    /// Every stage's state without executing anything (`status`, `run --dry-run`).
    pub fn status(&self, forced: &BTreeSet<usize>) -> Vec<StatusRow> {
        let mut ups: HashMap<String, Upstream> = HashMap::new();
        let mut rows = Vec::new();
        for &i in &self.dag.order {
            let name = self.pipeline.stages[i].name.clone();
            let matrix = self.pipeline.stages[i].element.clone();
            let broken_up = self.dag.deps[i]
                .iter()
                .map(|&j| &self.pipeline.stages[j].name)
                .find(|n| matches!(ups.get(*n), Some(Upstream::Broken)));
            if let Some(up) = broken_up {
                rows.push(StatusRow {
                    name: name.clone(),
                    matrix: matrix.clone(),
                    state: "error",
                    reasons: vec![],
                    fingerprint: None,
                    error: Some(format!("upstream `{up}` cannot be assessed")),
                    ran_on: None,
                });
                ups.insert(name, Upstream::Broken);
                continue;
            }
            match self.assess(i, &ups, forced.contains(&i)) {
                Ok(a) => {
                    let state = if a.fresh.is_some() { "fresh" } else { "stale" };
                    ups.insert(
                        name.clone(),
                        a.fresh
                            .clone()
                            .map(Upstream::Done)
                            .unwrap_or(Upstream::Pending),
                    );
                    rows.push(StatusRow {
                        name,
                        matrix: matrix.clone(),
                        state,
                        reasons: a.reasons,
                        fingerprint: a.fingerprint,
                        error: None,
                        ran_on: a.fresh.and_then(|c| c.ran_on),
                    });
                }
                Err(b) => {
                    ups.insert(name.clone(), Upstream::Broken);
                    rows.push(StatusRow {
                        name,
                        matrix: matrix.clone(),
                        state: "error",
                        reasons: vec![],
                        fingerprint: None,
                        error: Some(b.message),
                        ran_on: None,
                    });
                }
            }
        }
        rows
    }

    /// Executes the selected stages (and what they need); see the module doc.
    pub fn run(
        self: &Arc<Self>,
        settings: &RunSettings,
        reporter: Arc<Reporter>,
        cancel: Cancel,
    ) -> RunResult {
        let selected = if settings.targets.is_empty() {
            self.dag.order.clone()
        } else {
            self.dag.closure(&settings.targets)
        };
        let executors: HashMap<usize, ExecutorDecl> = selected
            .iter()
            .map(|&i| (i, self.executor_of(i, settings)))
            .collect();
        let watcher = if settings.dry_run {
            None
        } else {
            cluster::slurm_watcher(
                executors.values().filter_map(|e| match e {
                    ExecutorDecl::Slurm(s) => Some((**s).clone()),
                    ExecutorDecl::Local => None,
                }),
                &cancel,
                reporter.clone(),
            )
        };
        let shared = Arc::new(Shared {
            engine: self.clone(),
            settings: settings.clone(),
            reporter: reporter.clone(),
            cancel: cancel.clone(),
            executors,
            watcher,
            run_id: crate::executor::run_id(),
            slots: Slots::new(settings.jobs, settings.gpus),
            reports: Mutex::new(HashMap::new()),
            position: selected
                .iter()
                .enumerate()
                .map(|(pos, &i)| (i, pos))
                .collect(),
        });

        let mut table = NodeTable::new();
        let mut graph = Graph::new();
        let mut ids: HashMap<usize, NodeId> = HashMap::new();
        let mut nodes = Vec::new();
        for &i in &selected {
            let node = DefaultNode::new(self.pipeline.stages[i].name.clone(), &mut table);
            ids.insert(i, node.id());
            nodes.push((i, node));
        }
        for (i, mut node) in nodes {
            let upstream: Vec<(String, NodeId)> = self.dag.deps[i]
                .iter()
                .map(|&j| (self.pipeline.stages[j].name.clone(), ids[&j]))
                .collect();
            node.set_action(StageAction {
                idx: i,
                upstream,
                shared: shared.clone(),
            });
            graph.add_node(node).expect("node ids are unique");
        }
        for &i in &selected {
            let downstream: Vec<NodeId> = self.dag.dependents[i]
                .iter()
                .filter_map(|j| ids.get(j).copied())
                .collect();
            if !downstream.is_empty() {
                graph
                    .add_edge(ids[&i], downstream)
                    .expect("edges join known nodes");
            }
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(settings.jobs.max(1) + selected.len() + 4)
            .enable_all()
            .build()
            .expect("a tokio runtime can be built");
        let outcome = runtime.block_on(graph.async_start());
        if let Err(e) = outcome {
            reporter.line(&format!("internal error: the scheduler stopped: {e}"));
        }
        if let Some(w) = &shared.watcher {
            let (cancelled, _) = w.shutdown();
            if !cancelled.is_empty() {
                reporter.line(&format!(
                    "cancelled {} {} job(s): {}",
                    cancelled.len(),
                    w.cluster().name(),
                    cancelled.join(" ")
                ));
            }
        }

        let mut reports_by_idx = shared
            .reports
            .lock()
            .expect("reports")
            .drain()
            .collect::<HashMap<_, _>>();
        let reports: Vec<StageReport> = selected
            .iter()
            .map(|i| {
                let mut r = reports_by_idx.remove(i).unwrap_or_else(|| {
                    let mut r = StageReport::new(&self.pipeline.stages[*i].name, Outcome::Skipped);
                    r.error = Some("not scheduled".into());
                    r
                });
                r.matrix = self.pipeline.stages[*i].element.clone();
                r
            })
            .collect();
        RunResult {
            reports,
            interrupted: cancel.is_cancelled(),
        }
    }
}

/// State shared by every stage of one run.
struct Shared {
    engine: Arc<Engine>,
    settings: RunSettings,
    reporter: Arc<Reporter>,
    cancel: Cancel,
    /// Where each selected stage executes in this run.
    executors: HashMap<usize, ExecutorDecl>,
    /// The run's single poller of its Slurm jobs, when any stage runs on Slurm.
    watcher: Option<Watcher<Slurm>>,
    /// Names this run's cluster jobs.
    run_id: String,
    slots: Slots,
    reports: Mutex<HashMap<usize, StageReport>>,
    /// Stage index → position in the run's topological order (scheduling priority).
    position: HashMap<usize, usize>,
}

struct StageAction {
    idx: usize,
    upstream: Vec<(String, NodeId)>,
    shared: Arc<Shared>,
}

#[dagrs::async_trait::async_trait]
impl Action for StageAction {
    async fn run(
        &self,
        input: &mut InChannels,
        output: &mut OutChannels,
        _env: Arc<EnvVar>,
    ) -> Output {
        let mut ups = HashMap::new();
        for (name, id) in &self.upstream {
            let got = input
                .recv_from(id)
                .await
                .ok()
                .and_then(|c| c.into_inner::<Upstream>())
                .map(|u| (*u).clone());
            ups.insert(name.clone(), got.unwrap_or(Upstream::Broken));
        }
        let shared = self.shared.clone();
        let idx = self.idx;
        let result = tokio::task::spawn_blocking(move || execute(&shared, idx, ups))
            .await
            .unwrap_or_else(|panic| {
                let mut r = StageReport::new(
                    &self.shared.engine.pipeline.stages[idx].name,
                    Outcome::Failed,
                );
                r.error = Some(format!("internal error: {panic}"));
                self.shared.reporter.finished(&r);
                self.shared.reports.lock().expect("reports").insert(idx, r);
                Upstream::Broken
            });
        output.broadcast(Content::new(result)).await;
        Output::empty()
    }
}

/// Assesses, and if needed executes and commits, one stage. Records its report.
fn execute(shared: &Shared, idx: usize, ups: HashMap<String, Upstream>) -> Upstream {
    let engine = &shared.engine;
    let stage = &engine.pipeline.stages[idx];
    let mut report = StageReport::new(&stage.name, Outcome::Skipped);
    let _turn = shared.slots.turn(shared.position[&idx]);
    let started = Instant::now();
    let (result, report) = (|| {
        if let Some(up) = engine.dag.deps[idx]
            .iter()
            .map(|&j| &engine.pipeline.stages[j].name)
            .find(|n| matches!(ups.get(*n), Some(Upstream::Broken)))
        {
            report.error = Some(format!("upstream `{up}` did not finish"));
            return (Upstream::Broken, report);
        }
        if shared.cancel.is_cancelled() {
            report.error = Some("interrupted before it started".into());
            return (Upstream::Broken, report);
        }
        let forced = shared.settings.force.contains(&idx);
        let a = match engine.assess(idx, &ups, forced) {
            Ok(a) => a,
            Err(b) => {
                report.outcome = Outcome::Failed;
                report.error = Some(b.message);
                report.hint = b.hint;
                return (Upstream::Broken, report);
            }
        };
        report.fingerprint = a.fingerprint.clone();
        if let Some(job) = &shared.settings.job
            && job.idx == idx
            && a.fingerprint.as_ref() != Some(&job.expected)
        {
            report.outcome = Outcome::Failed;
            report.error = Some(format!(
                "this node computes the key {} for the stage, but it was submitted for {}: the \
                 project or its cache differ between the submitting machine and this node",
                a.fingerprint.as_ref().map_or(
                    "(unknown: an upstream stage is not committed)".into(),
                    |f| f.to_string()
                ),
                job.expected
            ));
            report.hint = Some(
                "the project folder (pipeline file and inputs) must be the same on the nodes; \
                 `cusa-pipe status` on both shows the difference"
                    .into(),
            );
            return (Upstream::Broken, report);
        }
        if let Some(c) = a.fresh {
            report.outcome = Outcome::Cached;
            record_head(engine, &stage.name, &c.fingerprint, &mut report);
            // A job resubmitted after its result was committed: make sure the remote has it.
            if let (Some(job), Some(remote)) = (&shared.settings.job, &engine.remote)
                && job.idx == idx
                && let Some(record) = engine.store.read_record(&c.fingerprint)
            {
                remote.push_in_background(&engine.store, record, crate::remote::PushCheck::Trust);
            }
            return (Upstream::Done(c), report);
        }
        report.reasons = a.reasons.clone();
        if shared.settings.dry_run || a.fingerprint.is_none() {
            report.outcome = Outcome::WouldRun;
            if let (Some(remote), Some(fp)) = (&engine.remote, &a.fingerprint)
                && !forced
                && remote.settings.read
                && !remote.is_disabled()
                && remote.has_record(fp).unwrap_or(false)
            {
                report
                    .notes
                    .push(format!("on {}: would be restored", remote.describe()));
            }
            return (Upstream::Pending, report);
        }
        let fp = a.fingerprint.clone().expect("checked above");
        if !forced
            && let Some(remote) = &engine.remote
            && let Some(record) = remote.restore(&engine.store, &fp, &stage.name)
        {
            match engine.committed(&fp) {
                Ok(Some(Ok(c))) => {
                    report.outcome = Outcome::Restored;
                    report.seconds = record.seconds;
                    record_head(engine, &stage.name, &fp, &mut report);
                    return (Upstream::Done(c), report);
                }
                _ => shared.reporter.line(&format!(
                    "warning: `{}`: the result restored from {} could not be read back; running it",
                    stage.name,
                    remote.describe()
                )),
            }
        }
        if let Some(job) = &shared.settings.job
            && job.idx != idx
        {
            report.outcome = Outcome::Failed;
            report.error = Some(format!(
                "upstream `{}` has no committed result in {}{}",
                stage.name,
                engine.store.root().display(),
                if engine.remote.is_some() {
                    " nor on the team remote"
                } else {
                    ""
                }
            ));
            report.hint = Some(
                "a job runs only its own stage: its inputs must be in a cache shared with the \
                 submitting machine, or on the team remote (`executor: {cache: remote}`)"
                    .into(),
            );
            return (Upstream::Broken, report);
        }
        if let ExecutorDecl::Slurm(settings) = &shared.executors[&idx] {
            let _grant = shared.slots.acquire(shared.position[&idx], 0);
            if shared.cancel.is_cancelled() {
                report.error = Some("interrupted before it was submitted".into());
                return (Upstream::Broken, report);
            }
            return match cluster::run_as_job(shared, idx, &a, &fp, settings, &ups, &mut report) {
                Ok(c) => {
                    report.outcome = Outcome::Ran;
                    record_head(engine, &stage.name, &fp, &mut report);
                    (Upstream::Done(c), report)
                }
                Err(()) => {
                    report.outcome = Outcome::Failed;
                    (Upstream::Broken, report)
                }
            };
        }
        if stage.gpus as usize > shared.settings.gpus {
            report.outcome = Outcome::Failed;
            report.error = Some(format!(
                "needs {} GPU(s); {} available",
                stage.gpus, shared.settings.gpus
            ));
            report.hint = Some(
                "run on a machine with GPUs, or pass `--gpus N` if detection missed them".into(),
            );
            return (Upstream::Broken, report);
        }
        let grant = shared
            .slots
            .acquire(shared.position[&idx], stage.gpus as usize);
        let lock = engine.store.lock_fingerprint(&fp, || {
            shared.reporter.waiting(&format!("`{}`: the same computation is already running (another stage or cusa-pipe process)", stage.name))
        });
        let _lock = match lock {
            Ok(l) => l,
            Err(e) => {
                report.outcome = Outcome::Failed;
                report.error = Some(e.to_string());
                return (Upstream::Broken, report);
            }
        };
        if !forced && let Ok(Some(Ok(c))) = engine.committed(&fp) {
            report.outcome = Outcome::Cached;
            report.notes.push("committed by a concurrent run".into());
            record_head(engine, &stage.name, &fp, &mut report);
            return (Upstream::Done(c), report);
        }
        match run_and_commit(shared, idx, &a, &fp, &grant.gpus, &mut report) {
            Ok((c, record)) => {
                report.outcome = Outcome::Ran;
                if let Some(remote) = &engine.remote {
                    // `--force` says the result was not trusted: the remote's copy of it is
                    // not trusted either.
                    let check = if forced {
                        crate::remote::PushCheck::Verify
                    } else {
                        crate::remote::PushCheck::Trust
                    };
                    remote.push_in_background(&engine.store, record, check);
                }
                (Upstream::Done(c), report)
            }
            Err(()) => {
                report.outcome = Outcome::Failed;
                (Upstream::Broken, report)
            }
        }
    })();
    let mut report = report;
    if report.outcome == Outcome::Ran || report.outcome == Outcome::Failed {
        report.seconds = started.elapsed().as_secs_f64();
    }
    shared.reporter.finished(&report);
    shared.reports.lock().expect("reports").insert(idx, report);
    result
}

/// Records `fp` as the stage's head (the result later misses are explained against). A failure
/// is a note on the stage's line, not a failed stage: the result is committed, only the next
/// explanation would be less precise.
fn record_head(engine: &Engine, stage: &str, fp: &Fingerprint, report: &mut StageReport) {
    if let Err(e) = engine.store.set_head(&engine.pipeline_id, stage, fp) {
        report.notes.push(format!(
            "could not record this result as the stage's latest ({e}); `status` may explain the next change less precisely"
        ));
    }
}

/// Runs the stage in a staging directory and commits its output.
fn run_and_commit(
    shared: &Shared,
    idx: usize,
    a: &Assessment,
    fp: &Fingerprint,
    gpus: &[usize],
    report: &mut StageReport,
) -> Result<(Committed, RunRecord), ()> {
    let engine = &shared.engine;
    let store = &engine.store;
    let stage = &engine.pipeline.stages[idx];
    let fail = |report: &mut StageReport, msg: String| {
        report.error = Some(msg);
    };
    let staging = store.staging().map_err(|e| fail(report, e.to_string()))?;
    let (log_rel, log_abs) = store.new_log_path(&stage.name, fp);
    let log = StageLog::create(&log_abs)
        .map_err(|e| fail(report, format!("cannot create the stage log: {e}")))?;
    report.log = Some(log_abs.clone());
    log.line(format!(
        "# stage `{}` ({}), fingerprint {fp}",
        stage.name,
        stage.kind.name()
    ));
    log.line(format!(
        "# runs because: {}",
        report::reasons_text(&a.reasons)
    ));
    let out_dir = staging.out_dir();
    let bound = crate::spec::interpolate::resolve_paths(
        &stage.config,
        &a.inputs,
        &out_dir,
        stage.kind.shell_keys(),
    );
    let scratch = store.scratch_dir(stage.kind.name());
    let progress = shared.reporter.started(&stage.name, &a.reasons);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let fingerprint = fp.to_string();
    let ctx = StageContext {
        stage: &stage.name,
        project_dir: &engine.pipeline.dir,
        out_dir: &out_dir,
        scratch_dir: &scratch,
        fingerprint: &fingerprint,
        inputs: &a.inputs,
        gpus,
        threads: shared
            .settings
            .job
            .as_ref()
            .and_then(|j| j.threads)
            .unwrap_or((cores / shared.settings.jobs.max(1)).max(1)),
        log: &log,
        progress: &progress,
        cancel: &shared.cancel,
    };
    let started_at = SystemTime::now();
    let clock = Instant::now();
    let summary = stage.kind.run(&bound, &ctx);
    let summary = match summary {
        Ok(s) if !shared.cancel.is_cancelled() => s,
        Ok(_) | Err(StageError::Cancelled) => {
            log.line("# interrupted: nothing committed");
            fail(report, "interrupted: nothing committed".into());
            return Err(());
        }
        Err(e) => {
            report.log_tail = log.tail(20);
            log.line(format!("# failed: {e}"));
            report.hint = e.hint().map(str::to_string);
            fail(report, e.to_string());
            return Err(());
        }
    };
    let seconds = clock.elapsed().as_secs_f64();
    let (manifest, digest) = store.commit_tree(&staging).map_err(|e| {
        log.line(format!("# commit failed: {e}"));
        fail(report, format!("could not commit the output: {e}"));
    })?;
    let record = RunRecord {
        fingerprint: fp.clone(),
        stage: stage.name.clone(),
        ingredients: a.ingredients.clone(),
        output: digest.clone(),
        files: manifest.entries.len(),
        bytes: manifest.size(),
        started_at: humantime::format_rfc3339_seconds(started_at).to_string(),
        seconds,
        notes: summary.notes.clone(),
        metrics: summary.metrics,
        results: summary.results,
        log: Some(log_rel),
        tool: concat!("cusa-pipe ", env!("CARGO_PKG_VERSION")).to_string(),
        ran_on: shared.settings.job.as_ref().map(|j| j.placement.clone()),
    };
    if shared.cancel.is_cancelled() {
        fail(report, "interrupted: nothing committed".into());
        return Err(());
    }
    store
        .commit(&staging, &record)
        .map_err(|e| fail(report, format!("could not write the run record: {e}")))?;
    log.line(format!("# committed output {digest} in {seconds:.2}s"));
    report.notes = summary.notes;
    record_head(engine, &stage.name, fp, report);
    let dir = match store.check_tree(&digest) {
        Ok(TreeState::Intact(dir)) => dir,
        _ => {
            fail(report, "the committed output could not be read back".into());
            return Err(());
        }
    };
    Ok((
        Committed {
            fingerprint: fp.clone(),
            digest,
            dir,
            manifest: Arc::new(manifest),
            ran_on: record.ran_on.clone(),
        },
        record,
    ))
}

/// GPUs visible on this machine (NVIDIA driver's device list), 0 without a driver.
pub fn detect_gpus() -> usize {
    std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|d| d.flatten().count())
        .unwrap_or(0)
}
