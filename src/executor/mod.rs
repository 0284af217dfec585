//! Where a stage runs: on this machine (`local`, the default) or as a job of a cluster
//! scheduler (`slurm`). An executor decides *where* a stage executes, never *what* it
//! computes: the key, the explanation and the commit point are the engine's, wherever the
//! stage ran.
//!
//! | piece | what it owns |
//! |---|---|
//! | [`ExecutorDecl`] | the `executor:` key, pipeline-wide and per stage, typed and merged |
//! | [`Cluster`] | one scheduler's three verbs: submit one job, poll many, cancel many |
//! | [`watch::Watcher`] | the run's single polling loop over all its jobs, with backoff |
//! | [`slurm::Slurm`] | `sbatch --parsable`, one batched `squeue`, one batched `scancel` |
//! | [`Placement`] | where a committed result was computed (`slurm job 1234 (node)`) |
//!
//! Invariants:
//! * the executor never enters a fingerprint: the same stage run locally or on a node has one
//!   key and, for a deterministic stage, the same bytes;
//! * **completion is the committed record** (in the cache the nodes share, or on the team
//!   remote): a job the scheduler calls `COMPLETED` that committed nothing is a failure, and a
//!   job that committed is a success whatever happened after;
//! * the scheduler is asked about all of a run's jobs in one call per interval (never one call
//!   per job), the interval growing while nothing changes;
//! * an interrupted run cancels every job it submitted in one call and waits (bounded) until
//!   none is pending or running;
//! * a job ended by the cluster rather than by its program (preempted, node failure, cancelled
//!   from outside) is resubmitted up to `max_resubmits` times; training resumes from its
//!   per-epoch checkpoint in the cache's scratch folder.
//!
//! Another scheduler (Kubernetes Jobs) is another [`Cluster`]: `submit` creates a Job running
//! the same `cusa-pipe job …` command in an image that has the binary, `poll` lists the run's
//! Jobs by a label in one request, `cancel` deletes them by that label; the cache is the team
//! remote (`cache: remote`), as a pod has no shared filesystem.

pub mod slurm;
pub mod watch;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use cusa_stages::api::{ConfigError, PointsAt, parse_config};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What `executor:` says, after the pipeline-wide value and the stage's own are merged.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum ExecutorDecl {
    #[default]
    Local,
    Slurm(Box<SlurmSettings>),
}

impl ExecutorDecl {
    pub fn name(&self) -> &'static str {
        match self {
            ExecutorDecl::Local => "local",
            ExecutorDecl::Slurm(_) => "slurm",
        }
    }
}

/// `executor: {kind: slurm, …}`. Every key is optional; a stage's keys override the
/// pipeline's, and `sbatch_args` add to them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSettings {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--qos`.
    pub qos: Option<String>,
    /// `--time`, in Slurm's forms (`30`, `1:30:00`, `2-00:00:00`).
    pub time: Option<String>,
    /// More `sbatch` flags, passed as written (`--constraint=a100`, `--exclusive`).
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    /// The cusa-pipe binary as the nodes see it [default: this binary's path, which must be on
    /// a filesystem the nodes share].
    pub binary: Option<PathBuf>,
    /// How `resources: {gpu: N}` is asked for: `gres` (`--gres=gpu:N`, default) or `gpus`
    /// (`--gpus=N`).
    pub gpu_request: Option<GpuRequest>,
    /// Where jobs find their inputs and commit: `shared` (this run's cache folder, on a
    /// filesystem the nodes share; default) or `remote` (a node-local cache, inputs restored
    /// from and results pushed to the team remote).
    pub cache: Option<CacheMode>,
    /// The node-local cache folder of `cache: remote`, expanded by the job's shell
    /// [default: `${TMPDIR:-/tmp}/cusa-pipe-job-cache`].
    pub job_cache: Option<String>,
    /// How often a job the cluster ended (preempted, node failure, cancelled from outside) is
    /// submitted again [default: 3].
    pub max_resubmits: Option<u32>,
    /// The first polling interval, and the one after any change [default: 5s].
    pub poll_interval: Option<String>,
    /// The longest polling interval while nothing changes [default: 60s].
    pub poll_max: Option<String>,
    /// Where job logs are written (one file per job) [default: `logs-v1/slurm` in the cache].
    pub log_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuRequest {
    Gres,
    Gpus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    Shared,
    Remote,
}

pub const DEFAULT_MAX_RESUBMITS: u32 = 3;
pub const DEFAULT_JOB_CACHE: &str = "${TMPDIR:-/tmp}/cusa-pipe-job-cache";

impl SlurmSettings {
    /// `self` (a stage's keys) over `base` (the pipeline's).
    pub fn over(self, base: &SlurmSettings) -> SlurmSettings {
        let mut sbatch_args = base.sbatch_args.clone();
        sbatch_args.extend(self.sbatch_args);
        SlurmSettings {
            partition: self.partition.or_else(|| base.partition.clone()),
            account: self.account.or_else(|| base.account.clone()),
            qos: self.qos.or_else(|| base.qos.clone()),
            time: self.time.or_else(|| base.time.clone()),
            sbatch_args,
            binary: self.binary.or_else(|| base.binary.clone()),
            gpu_request: self.gpu_request.or(base.gpu_request),
            cache: self.cache.or(base.cache),
            job_cache: self.job_cache.or_else(|| base.job_cache.clone()),
            max_resubmits: self.max_resubmits.or(base.max_resubmits),
            poll_interval: self.poll_interval.or_else(|| base.poll_interval.clone()),
            poll_max: self.poll_max.or_else(|| base.poll_max.clone()),
            log_dir: self.log_dir.or_else(|| base.log_dir.clone()),
        }
    }

    pub fn cache_mode(&self) -> CacheMode {
        self.cache.unwrap_or(CacheMode::Shared)
    }

    pub fn max_resubmits(&self) -> u32 {
        self.max_resubmits.unwrap_or(DEFAULT_MAX_RESUBMITS)
    }

    /// The polling interval bounds (validated at load).
    pub fn poll(&self) -> (Duration, Duration) {
        let min = self
            .poll_interval
            .as_deref()
            .and_then(|s| humantime::parse_duration(s).ok())
            .unwrap_or(Duration::from_secs(5));
        let max = self
            .poll_max
            .as_deref()
            .and_then(|s| humantime::parse_duration(s).ok())
            .unwrap_or(Duration::from_secs(60))
            .max(min);
        (min, max)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let err = |path: &str, message: String, help: &str| ConfigError {
            path: path.into(),
            points_at: PointsAt::Value,
            message,
            help: Some(help.into()),
        };
        if let Some(t) = &self.time
            && !slurm::valid_time(t)
        {
            return Err(err(
                "time",
                format!("`{t}` is not a Slurm time limit"),
                "write minutes (`90`), `HH:MM:SS`, or `D-HH:MM:SS` (`2-00:00:00`)",
            ));
        }
        for (key, value) in [
            ("poll_interval", &self.poll_interval),
            ("poll_max", &self.poll_max),
        ] {
            if let Some(v) = value {
                match humantime::parse_duration(v) {
                    Ok(d) if d >= Duration::from_millis(100) => {}
                    Ok(_) => {
                        return Err(err(
                            key,
                            format!("`{v}` polls the scheduler too often"),
                            "poll at most every 100ms; a cluster's admins prefer seconds (`5s`)",
                        ));
                    }
                    Err(e) => {
                        return Err(err(
                            key,
                            format!("`{v}` is not a duration: {e}"),
                            "e.g. `5s`, `1m`",
                        ));
                    }
                }
            }
        }
        for (i, a) in self.sbatch_args.iter().enumerate() {
            if !a.starts_with('-') {
                return Err(err(
                    &format!("sbatch_args[{i}]"),
                    format!("`{a}` is not an sbatch flag"),
                    "write each flag with its value as one item: `--constraint=a100`",
                ));
            }
            if ["--wrap", "--parsable", "--output", "--job-name", "--chdir"]
                .iter()
                .any(|own| a == own || a.starts_with(&format!("{own}=")))
            {
                return Err(err(
                    &format!("sbatch_args[{i}]"),
                    format!("`{a}` is set by cusa-pipe for every job"),
                    "remove it: cusa-pipe names the job, its log and its command itself",
                ));
            }
        }
        Ok(())
    }
}

/// `executor:` as written (`local`, `slurm`, or a mapping with `kind`) → typed. Errors are
/// relative to the `executor` key.
pub fn parse_decl(v: &Value) -> Result<ExecutorDecl, ConfigError> {
    let kinds = "`local` or `slurm`";
    let (kind, rest) = match v {
        Value::String(s) => (s.clone(), serde_json::Map::new()),
        Value::Object(m) => {
            let mut rest = m.clone();
            let kind = match rest.remove("kind") {
                Some(Value::String(s)) => s,
                Some(_) => {
                    return Err(ConfigError {
                        path: "kind".into(),
                        points_at: PointsAt::Value,
                        message: "`kind` must be a name".into(),
                        help: Some(format!("write {kinds}")),
                    });
                }
                None => {
                    return Err(ConfigError {
                        path: String::new(),
                        points_at: PointsAt::Key,
                        message: "the executor has no `kind`".into(),
                        help: Some(format!("add `kind:` ({kinds})")),
                    });
                }
            };
            (kind, rest)
        }
        _ => {
            return Err(ConfigError {
                path: String::new(),
                points_at: PointsAt::Value,
                message: "`executor` must be a name or a mapping".into(),
                help: Some(
                    "e.g. `executor: local`, or `executor: {kind: slurm, partition: gpu}`".into(),
                ),
            });
        }
    };
    let at_kind = if v.is_string() { "" } else { "kind" };
    match kind.as_str() {
        "local" => match rest.keys().next() {
            None => Ok(ExecutorDecl::Local),
            Some(k) => Err(ConfigError {
                path: k.clone(),
                points_at: PointsAt::Key,
                message: format!("the local executor has no setting `{k}`"),
                help: Some("remove it, or use `kind: slurm`".into()),
            }),
        },
        "slurm" => {
            let s: SlurmSettings = parse_config(&Value::Object(rest))?;
            s.validate()?;
            Ok(ExecutorDecl::Slurm(Box::new(s)))
        }
        other => Err(ConfigError {
            path: at_kind.into(),
            points_at: PointsAt::Value,
            message: format!("unknown executor `{other}`"),
            help: Some(
                match cusa_stages::api::closest(other, &["local", "slurm"]) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None => format!("executors: {kinds}"),
                },
            ),
        }),
    }
}

/// The executor of one stage: its own `executor:` over the pipeline's (a stage's slurm keys
/// override the pipeline's slurm keys), else the pipeline's, else local.
pub fn merge(pipeline: &ExecutorDecl, stage: Option<ExecutorDecl>) -> ExecutorDecl {
    match (stage, pipeline) {
        (None, p) => p.clone(),
        (Some(ExecutorDecl::Slurm(s)), ExecutorDecl::Slurm(base)) => {
            ExecutorDecl::Slurm(Box::new((*s).over(base)))
        }
        (Some(s), _) => s,
    }
}

/// `run --executor local|slurm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// Everything on this machine, whatever the file says.
    Local,
    /// Slurm for every stage the file does not keep `local` itself.
    Slurm,
}

/// Where a stage executes in one run: `choice` (the command line) over what the file says.
/// `own` is whether the stage wrote `executor:` itself.
pub fn effective(
    file: &ExecutorDecl,
    own: bool,
    pipeline: &ExecutorDecl,
    choice: Option<Choice>,
) -> ExecutorDecl {
    match choice {
        None => file.clone(),
        Some(Choice::Local) => ExecutorDecl::Local,
        Some(Choice::Slurm) => match file {
            ExecutorDecl::Slurm(_) => file.clone(),
            ExecutorDecl::Local if own => ExecutorDecl::Local,
            ExecutorDecl::Local => match pipeline {
                ExecutorDecl::Slurm(s) => ExecutorDecl::Slurm(s.clone()),
                ExecutorDecl::Local => ExecutorDecl::Slurm(Box::default()),
            },
        },
    }
}

/// Where a committed result was computed, when not by the `run` that reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The executor's name (`slurm`).
    pub executor: String,
    /// The scheduler's job id.
    pub job: String,
    /// The node the job ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} job {}", self.executor, self.job)?;
        if let Some(n) = &self.node {
            write!(f, " ({n})")?;
        }
        Ok(())
    }
}

/// A job's scheduler id.
pub type JobId = String;

/// What to submit: one `cusa-pipe job` command for one stage.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The job's name (run id + stage, made safe for the scheduler).
    pub name: String,
    /// The folder the job starts in (the project).
    pub workdir: PathBuf,
    /// The job's log (stdout and stderr); the scheduler's job id placeholder is allowed.
    pub log: PathBuf,
    /// The shell command the job runs.
    pub command: String,
    pub cpus: Option<u32>,
    pub memory: Option<String>,
    pub gpus: u32,
}

/// A job's state as the scheduler reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Running,
    /// Finished with exit code 0 (the scheduler's word; the record decides success).
    Completed,
    /// Its program exited non-zero.
    Failed,
    /// Cancelled (by this run, a user or an admin).
    Cancelled,
    /// Preempted, or requeued by the cluster.
    Preempted,
    /// The node failed or the job could not start on it.
    NodeFail,
    /// Hit its time limit.
    Timeout,
    OutOfMemory,
    /// The scheduler no longer knows the job (purged from its memory, no accounting).
    Vanished,
    /// A state this code does not know (treated as still active).
    Other(String),
}

impl JobState {
    pub fn is_finished(&self) -> bool {
        !matches!(
            self,
            JobState::Pending | JobState::Running | JobState::Other(_)
        )
    }

    /// Ended by the cluster rather than by the stage's program: worth another submission.
    pub fn is_cluster_loss(&self) -> bool {
        matches!(
            self,
            JobState::Cancelled | JobState::Preempted | JobState::NodeFail
        )
    }
}

/// One job's state in a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    pub id: JobId,
    pub state: JobState,
    /// The scheduler's own state name (`FAILED`, `PREEMPTED`, …).
    pub word: String,
    pub node: Option<String>,
    /// The program's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    pub reason: Option<String>,
}

/// A scheduler error: a command that could not run or answered nonsense.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClusterError(pub String);

/// A cluster scheduler's verbs (see the module doc for Kubernetes).
pub trait Cluster: Send + Sync {
    /// Its settings for one job (partition, account, …).
    type Settings: Send + Sync;
    /// The executor's name in messages and records (`slurm`).
    fn name(&self) -> &'static str;
    /// Submits one job; returns its id.
    fn submit(&self, job: &JobSpec, settings: &Self::Settings) -> Result<JobId, ClusterError>;
    /// The state of all `jobs`, in one call; a job the scheduler does not know is left out.
    fn poll(&self, jobs: &[JobId]) -> Result<Vec<JobStatus>, ClusterError>;
    /// Asks what `poll` no longer knows (an accounting database), in one call; `None` when
    /// there is none.
    fn history(&self, jobs: &[JobId]) -> Option<Vec<JobStatus>>;
    /// Cancels all `jobs` in one call.
    fn cancel(&self, jobs: &[JobId]) -> Result<(), ClusterError>;
}

/// A name a scheduler accepts: letters, digits, `-`, `_` and `.`; the rest become `_`.
pub fn job_name(run: &str, stage: &str) -> String {
    let safe: String = stage
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("cusa-{run}-{safe}")
}

/// A short id for one `run`, naming its jobs.
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mixed = (nanos as u64) ^ ((std::process::id() as u64) << 40);
    format!("{:08x}", (mixed ^ (mixed >> 32)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_stage_overrides_the_pipeline_and_adds_sbatch_args() {
        let p = parse_decl(
            &json!({"kind": "slurm", "partition": "cpu", "account": "lab",
            "sbatch_args": ["--exclusive"]}),
        )
        .unwrap();
        let s = parse_decl(&json!({"kind": "slurm", "partition": "gpu",
            "sbatch_args": ["--constraint=a100"]}))
        .unwrap();
        let ExecutorDecl::Slurm(m) = merge(&p, Some(s)) else {
            panic!("slurm expected")
        };
        assert_eq!(m.partition.as_deref(), Some("gpu"));
        assert_eq!(m.account.as_deref(), Some("lab"));
        assert_eq!(m.sbatch_args, vec!["--exclusive", "--constraint=a100"]);
        assert_eq!(merge(&p, Some(ExecutorDecl::Local)), ExecutorDecl::Local);
    }

    #[test]
    fn the_command_line_chooses_over_the_file_but_keeps_a_stage_local_by_its_own_word() {
        let slurm = ExecutorDecl::Slurm(Box::new(SlurmSettings {
            partition: Some("gpu".into()),
            ..Default::default()
        }));
        let local = ExecutorDecl::Local;
        assert_eq!(effective(&slurm, false, &slurm, Some(Choice::Local)), local);
        assert_eq!(effective(&local, true, &slurm, Some(Choice::Slurm)), local);
        assert_eq!(effective(&local, false, &slurm, Some(Choice::Slurm)), slurm);
        assert_eq!(
            effective(&local, false, &local, Some(Choice::Slurm)),
            ExecutorDecl::Slurm(Box::default())
        );
        assert_eq!(effective(&slurm, false, &local, None), slurm);
    }

    #[test]
    fn bad_settings_name_their_key() {
        let e = parse_decl(&json!({"kind": "slurm", "time": "soon"})).unwrap_err();
        assert_eq!(e.path, "time");
        let e = parse_decl(&json!({"kind": "slurm", "partiton": "gpu"})).unwrap_err();
        assert_eq!(e.path, "partiton");
        assert!(e.help.unwrap().contains("partition"));
        let e = parse_decl(&json!({"kind": "slurm", "sbatch_args": ["--wrap=ls"]})).unwrap_err();
        assert_eq!(e.path, "sbatch_args[0]");
        let e = parse_decl(&json!("slrum")).unwrap_err();
        assert!(e.help.unwrap().contains("slurm"));
        let e = parse_decl(&json!({"kind": "local", "partition": "x"})).unwrap_err();
        assert_eq!(e.path, "partition");
        let e = parse_decl(&json!({"kind": "slurm", "poll_interval": "1ms"})).unwrap_err();
        assert_eq!(e.path, "poll_interval");
    }

    #[test]
    fn job_names_are_safe_for_the_scheduler() {
        assert_eq!(
            job_name("ab12", "train@seed=1,variant=cusa"),
            "cusa-ab12-train_seed_1_variant_cusa"
        );
    }
}
